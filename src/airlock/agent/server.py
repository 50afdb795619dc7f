"""The guest agent: the one program the controller talks to inside a VM.

It runs inside every browser VM and CLI VM, answers the controller over
``{state_dir}/agent.sock`` (the wire protocol is ``agent.protocol``), and in a browser VM also
owns the screen (``display``: Xvnc served only on ``{state_dir}/vnc.sock``, Chromium as its
only window). In every VM it offers the controller's egress proxy on
``127.0.0.1:EGRESS_PORT``. This module holds the connection and the op table; the jobs are
``capture`` (the login and its credential files), ``display``, ``lease``, ``entropy``
(``restored``), ``files`` (atomic writes, shredding) and ``streams`` (lines, pipes).

Standard library only: the guest image may have nothing but ``python3-minimal``. It logs to
stderr (the runtime sends that to ``agent.log`` on the host) and never logs file contents,
URLs' query strings or secrets.

    python -m airlock.agent.server --state-dir DIR --role browser|cli [--screen 1280x800]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from airlock.agent import capture, entropy, protocol, streams
from airlock.agent.capture import Login
from airlock.agent.config import Config
from airlock.agent.display import DISPLAY, OPEN_SOCKET_NAME, Display
from airlock.agent.files import shred, write_planned
from airlock.agent.lease import Lease, lease_args, read_boot_lease
from airlock.agent.oparg import (
    OpError,
    file_plan,
    home_path,
    number,
    rel_path,
    run_args,
    str_dict,
    str_list,
    target_path,
)
from airlock.agent.protocol import EGRESS_PORT, LEASE_EXPIRED_EXIT, START_PAGE_PORT
from airlock.agent.tasks import Owner, exited, spawn_piped

log = logging.getLogger("airlock.agent")

OUTPUT_CAP = 64 * 1024  # per stream of a ``run``: enough to verify, too little to exfiltrate
HELLO_TIMEOUT_S = 10.0
MAX_RUN_TIMEOUT_S = 600.0
MAX_CAPTURE_TIMEOUT_S = 300.0

Handler = Callable[[dict[str, Any]], Awaitable[Mapping[str, object]]]


class Agent:
    """One agent process: the controller's connection and the op table. Every background
    task it starts is named and kept by its ``Owner``; the screen is its ``Display``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._secret = b""
        self._started = time.monotonic()
        self._owner = Owner()
        self._stop = asyncio.Event()
        self._servers: list[asyncio.Server] = []
        self._login: Login | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.display = Display(config, self._owner)
        self.lease = Lease()  # no end until a boot lease or a ``lease`` op sets one
        self.exit_code = 0
        self.ops: dict[str, Handler] = {
            "ping": self._op_ping,
            "start_login": self._op_start_login,
            "login_status": self._op_login_status,
            "capture": self._op_capture,
            "ack_capture": self._op_ack_capture,
            "write_files": self._op_write_files,
            "run": self._op_run,
            "wipe": self._op_wipe,
            "restored": self._op_restored,
            "lease": self._op_lease,
        }

    # -- life cycle -------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        self._secret = (cfg.state_dir / "agent.secret").read_bytes().strip()
        if not self._secret:
            raise SystemExit("agent.secret is empty")
        cfg.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(cfg.run_dir, 0o700)
        cfg.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        boot_lease = read_boot_lease(cfg.state_dir)
        if boot_lease is not None:
            self.lease.set(*boot_lease)
            log.info("boot lease: %d ms + %d ms margin", *boot_lease)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._start_servers()
            if cfg.role == "browser":
                self._owner.spawn(self.display.browser_stack(), "browser-stack")
            if self.lease.end is not None:
                self._owner.spawn(self._lease_watch(), "lease-watch")
            log.info("agent %s up: role=%s pid=%d", protocol.VERSION, cfg.role, os.getpid())
            await self._stop.wait()
            log.info("agent stopping")
        finally:
            await self._shutdown()

    async def _start_servers(self) -> None:
        cfg = self.config
        sock = cfg.state_dir / "agent.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        old_umask = os.umask(0o177)  # the socket is born 0600, no window where it is wider
        try:
            self._servers.append(
                await asyncio.start_unix_server(
                    self._on_client, path=str(sock), limit=protocol.MAX_MESSAGE + 1
                )
            )
            open_sock = cfg.run_dir / OPEN_SOCKET_NAME
            with contextlib.suppress(FileNotFoundError):
                open_sock.unlink()
            self._servers.append(
                await asyncio.start_unix_server(self.display.on_open_url, path=str(open_sock))
            )
        finally:
            os.umask(old_umask)
        self._servers.append(await asyncio.start_server(self._on_egress, "127.0.0.1", EGRESS_PORT))
        if cfg.role == "browser":
            self._servers.append(
                await asyncio.start_server(self.display.on_start_page, "127.0.0.1", START_PAGE_PORT)
            )
        self.display.write_browser_helper()

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        await self._owner.cancel_all()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)

    def _child_env(self) -> dict[str, str]:
        """What a login CLI or a ``run`` sees: the agent's environment plus the proxy."""
        env = dict(os.environ)
        env["HOME"] = str(self.config.home)
        proxy = f"http://127.0.0.1:{EGRESS_PORT}"
        for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
            env[name] = proxy
        env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
        return env

    def _subst(self, value: str) -> str:
        return value.replace("{python}", sys.executable).replace("{home}", str(self.config.home))

    # -- the lease ----------------------------------------------------------------------------

    async def _lease_watch(self) -> None:
        """End the VM when the lease (plus its margin) runs out with no renewal."""
        await self.lease.run_out()
        log.warning("the lease ran out and no controller renewed it: this VM ends itself")
        self.exit_code = LEASE_EXPIRED_EXIT
        self._stop.set()

    async def _op_lease(self, message: dict[str, Any]) -> protocol.LeaseResult:
        """Renew (or shorten) the lease: this VM ends itself ``for_ms + margin_ms`` from now,
        on its own monotonic clock, unless renewed again. A duration, not an epoch, so the
        guest's wall clock never enters into it."""
        if self.config.role != "browser" and self.lease.end is None:
            raise OpError("no_lease", "a CLI VM has no lease: it lives until it is deleted")
        for_ms, margin_ms = lease_args(message)
        first = self.lease.end is None
        self.lease.set(for_ms, margin_ms)
        if first:
            self._owner.spawn(self._lease_watch(), "lease-watch")
        return {"ends_in_ms": for_ms + margin_ms}

    # -- the controller's connection --------------------------------------------------------

    async def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(protocol.encode(message))
        await writer.drain()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = self._owner.adopt_current_task("agent-connection")
        handed_over = False
        try:
            handed_over = await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except protocol.ProtocolError as exc:
            with contextlib.suppress(Exception):
                await self._send(writer, _error(None, "bad_message", str(exc)))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("connection handler failed")
        finally:
            if not handed_over:
                writer.close()
            self._owner.release(task)

    def _secret_ok(self, value: Any) -> bool:
        if not isinstance(value, str):
            return False
        return hmac.compare_digest(value.encode(), self._secret)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Hello, then requests one at a time. True when the stream became a ``connect`` pipe."""
        try:
            line = await asyncio.wait_for(streams.read_line(reader), HELLO_TIMEOUT_S)
        except TimeoutError:
            return False
        if line is None:
            return False
        hello = protocol.decode(line)
        if hello.get("op") != "hello" or not self._secret_ok(hello.get("secret")):
            log.warning("refused a connection: no hello or wrong secret")
            await self._send(
                writer, _error(None, "unauthorized", "say hello with this VM's secret first")
            )
            return False
        await self._send(
            writer, {"ok": True, "result": {"agent": protocol.VERSION, "role": self.config.role}}
        )
        while True:
            line = await streams.read_line(reader)
            if line is None:
                return False
            message = protocol.decode(line)
            rid = message.get("id")
            op = message.get("op")
            if op == "connect":
                return await self._op_connect(rid, message, reader, writer)
            handler = self.ops.get(op) if isinstance(op, str) else None
            if handler is None:
                await self._send(writer, _error(rid, "unknown_op", f"no operation {op!r}"))
                continue
            try:
                result = await handler(message)
            except OpError as exc:
                response = _error(rid, exc.code, exc.message)
            except Exception as exc:
                log.exception("operation %s failed", op)
                response = _error(rid, "internal", f"{op} failed: {type(exc).__name__}")
            else:
                response = {"id": rid, "ok": True, "result": result}
            await self._send(writer, response)

    # -- operations -------------------------------------------------------------------------

    async def _op_ping(self, message: dict[str, Any]) -> protocol.PingResult:
        result: protocol.PingResult = {
            "role": self.config.role,
            "uptime_s": round(time.monotonic() - self._started, 3),
        }
        if self.display.display_ready:
            result["display"] = DISPLAY
        if (ends_in_ms := self.lease.ends_in_ms()) is not None:
            result["lease_ends_in_ms"] = ends_in_ms
        if self.config.role == "browser":
            result["browser"] = self.display.browser_ready
        return result

    async def _op_start_login(self, message: dict[str, Any]) -> protocol.StartLoginResult:
        plan = message.get("login")
        if not isinstance(plan, dict):
            raise OpError("bad_request", "login must be a LoginPlan object")
        argv = [self._subst(a) for a in str_list(plan.get("argv"), "argv")]
        env_extra = {k: self._subst(v) for k, v in str_dict(plan.get("env"), "env").items()}
        watch = str_list(plan.get("watch"), "watch", allow_empty=True)
        for rel in watch:
            home_path(self.config.home, rel)
        provider = plan.get("provider")
        if not isinstance(provider, str):
            raise OpError("bad_request", "provider must be a string")
        if self._login is not None and self._login.proc.returncode is None:
            raise OpError("conflict", "a login is already running in this VM")
        if self._login is not None and self._login.captured is not None:
            raise OpError("conflict", "a capture awaits ack_capture; it would be stranded")
        if self._watcher is not None:
            self._watcher.cancel()
        env = self._child_env()
        env.update(env_extra)
        env["BROWSER"] = str(self.config.run_dir / "browser")
        out = os.open(
            self.config.run_dir / "login.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )  # the CLI's output stays in the VM: it may print codes or tokens
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                cwd=self.config.home,
                process_group=0,  # its own group, in the VM's session (CPU weight)
            )
        except OSError as exc:
            raise OpError("spawn_failed", f"cannot start {argv[0]}: {exc.strerror}") from None
        finally:
            os.close(out)
        self._owner.children.add(proc)
        self._login = Login(provider=provider, proc=proc, watch=watch)
        self.display.set_url(None)
        log.info("login %s started: pid %d", provider, proc.pid)
        self._owner.spawn(self._reap_login(self._login), "login-reaper")
        if watch:  # nothing to watch: the capture never comes (a plan that only opens a URL)
            self._watcher = self._owner.spawn(
                capture.watch(self.config.home, self._login), "capture-watcher"
            )
        return {"started": True}

    async def _reap_login(self, login: Login) -> None:
        code = await login.proc.wait()
        self._owner.children.discard(login.proc)
        log.info("login %s exited with %s", login.provider, code)

    async def _op_login_status(self, message: dict[str, Any]) -> protocol.LoginStatusResult:
        login = self._login
        state: Literal["idle", "running", "exited"]
        code: int | None
        if login is None:
            state, code = "idle", None
        else:
            code = login.proc.returncode
            state = "running" if code is None else "exited"
        return {
            "state": state,
            "exit_code": code,
            "url": self.display.url,
            "captured": login is not None and login.captured is not None,
        }

    async def _op_capture(self, message: dict[str, Any]) -> protocol.CaptureResult:
        timeout = number(message.get("timeout_s"), "timeout_s", 0.0, MAX_CAPTURE_TIMEOUT_S)
        login = self._login
        if login is None:
            raise OpError("no_login", "no login has been started in this VM")
        if login.captured is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(login.captured_event.wait(), timeout)
        if login.captured is None:
            return {"captured": False}
        return {
            "captured": True,
            "files": {p: base64.b64encode(d).decode("ascii") for p, d in login.captured.items()},
        }

    async def _op_ack_capture(self, message: dict[str, Any]) -> protocol.WipedResult:
        login = self._login
        if login is None or login.captured is None:
            return {"wiped": []}
        wiped = [rel for rel in login.captured if shred(home_path(self.config.home, rel))]
        login.captured = None
        login.watch = []
        login.captured_event.clear()
        log.info("capture acknowledged: wiped %d file(s)", len(wiped))
        return {"wiped": wiped}

    async def _op_write_files(self, message: dict[str, Any]) -> protocol.WrittenResult:
        home = self.config.home
        plan = file_plan(message.get("files"), lambda path: target_path(home, path))
        written = write_planned(plan)
        log.info("wrote %d file(s)", len(written))
        return {"written": written}

    async def _op_run(self, message: dict[str, Any]) -> protocol.RunResult:
        argv, timeout, extra_env = run_args(message, MAX_RUN_TIMEOUT_S)
        env = self._child_env() | extra_env
        # its own group, in the VM's session (CPU weight)
        proc = await spawn_piped(argv, env=env, cwd=self.config.home, process_group=0)
        self._owner.children.add(proc)
        assert proc.stdout is not None and proc.stderr is not None
        out, err = bytearray(), bytearray()
        truncated = False

        async def drain(stream: asyncio.StreamReader, buf: bytearray) -> None:
            nonlocal truncated
            while chunk := await stream.read(streams.PIPE_CHUNK):
                room = OUTPUT_CAP - len(buf)
                buf += chunk[: max(room, 0)]
                truncated = truncated or len(chunk) > room

        readers = asyncio.gather(drain(proc.stdout, out), drain(proc.stderr, err))
        timed_out = False
        try:
            timed_out = not await exited(proc, timeout)
            await self._owner.kill(proc)
            # The group outlives its leader while a child is left: no stray child outlives a
            # ``run`` (and none keeps its pipes open). The pgid is not reused while it exists.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            # Output still in the pipes after exit; a child that left the group is cut off.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(readers), 1.0)
        finally:
            readers.cancel()
            await asyncio.gather(readers, return_exceptions=True)
            await self._owner.kill(proc)
        return {
            "exit_code": None if timed_out else proc.returncode,
            "stdout": out.decode("utf-8", "replace"),
            "stderr": err.decode("utf-8", "replace"),
            "timed_out": timed_out,
            "truncated": truncated,
        }

    async def _op_wipe(self, message: dict[str, Any]) -> protocol.WipedResult:
        paths = str_list(message.get("paths"), "paths", allow_empty=True)
        wiped = [p for p in paths if shred(target_path(self.config.home, rel_path(p, "path")))]
        log.info("wiped %d file(s)", len(wiped))
        return {"wiped": wiped}

    async def _op_restored(self, message: dict[str, Any]) -> protocol.RestoredResult:
        """This VM was resumed from a snapshot that other VMs share: take fresh entropy from
        the host into the kernel's pool, a new machine id, and a new secret (the snapshot's
        is known to every clone). Firecracker's VMGenID already reseeds the kernel's CRNG on
        Linux >= 5.18; this covers what it does not (ids, our secret) and older kernels."""
        self._secret, result = entropy.restore(message)
        return result

    async def _op_connect(
        self,
        rid: Any,
        message: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        port = message.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            await self._send(writer, _error(rid, "bad_request", "port must be 1..65535"))
            return False
        try:
            inner = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        except (OSError, TimeoutError) as exc:
            await self._send(writer, _error(rid, "connect_failed", f"port {port}: {exc}"))
            return False
        await self._send(writer, {"id": rid, "ok": True, "result": {"connected": True}})
        await streams.splice((reader, writer), inner)
        return True

    # -- egress forwarder -------------------------------------------------------------------

    async def _on_egress(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """127.0.0.1:EGRESS_PORT -> the host's egress proxy socket, byte for byte."""
        task = self._owner.adopt_current_task("egress-connection")
        try:
            try:
                upstream = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(self.config.egress_socket)), 5
                )
            except (OSError, TimeoutError):
                writer.close()  # no proxy for this VM (yet): refuse, do not hang
                return
            await streams.splice((reader, writer), upstream)
        except Exception:
            log.exception("egress connection failed")
            writer.close()
        finally:
            self._owner.release(task)


def _error(rid: Any, code: str, message: str) -> dict[str, Any]:
    response: dict[str, Any] = {"ok": False, "error": {"code": code, "message": message}}
    if rid is not None:
        response = {"id": rid, **response}
    return response


def _screen(value: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("screen must look like 1280x800") from None
    if not (320 <= w <= 7680 and 240 <= h <= 4320):
        raise argparse.ArgumentTypeError("screen size out of range")
    return w, h


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="airlock.agent.server", description=__doc__)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--role", choices=("browser", "cli"), required=True)
    parser.add_argument("--screen", type=_screen, default=(1280, 800))
    parser.add_argument("--xvnc", default="Xvnc")
    parser.add_argument("--chromium", default="chromium")
    parser.add_argument(
        "--browser-processes",
        choices=("single", "multi"),
        default="single",
        help="Chromium as one process (less CPU per login) or its usual process per site",
    )
    parser.add_argument(
        "--egress-socket", type=Path, help="default: {state_dir}/egress.sock (may appear later)"
    )
    parser.add_argument("--run-dir", type=Path, help="private scratch dir (default: $TMPDIR)")
    args = parser.parse_args(argv)
    home = Path(os.environ.get("HOME") or "/home/airlock")
    run_dir = args.run_dir or Path(tempfile.gettempdir()) / "airlock-agent"
    return Config(
        state_dir=args.state_dir,
        role=args.role,
        screen=args.screen,
        home=home,
        run_dir=run_dir,
        xvnc=args.xvnc,
        chromium=args.chromium,
        egress_socket=args.egress_socket or args.state_dir / "egress.sock",
        single_process=args.browser_processes == "single",
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s"
    )
    config = parse_args(argv)
    agent = Agent(config)
    asyncio.run(agent.run())
    sys.exit(agent.exit_code)


if __name__ == "__main__":
    main()
