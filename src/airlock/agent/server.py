"""The guest agent: the one program the controller talks to inside a VM.

It runs inside every browser VM and CLI VM, answers the controller over
``{state_dir}/agent.sock`` (the wire protocol is ``agent.protocol``), and in a browser VM also
owns the screen: Xvnc (served only on ``{state_dir}/vnc.sock``) and Chromium as its only
window. In every VM it offers the controller's egress proxy on ``127.0.0.1:EGRESS_PORT``.

Standard library only: the guest image may have nothing but ``python3-minimal``. It logs to
stderr (the runtime sends that to ``agent.log`` on the host) and never logs file contents,
URLs' query strings or secrets.

    python -m airlock.agent.server --state-dir DIR --role browser|cli [--screen 1280x800]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import fcntl
import hmac
import json
import logging
import os
import secrets
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airlock.agent import chromium_policy, protocol, x11
from airlock.agent.protocol import EGRESS_PORT, LEASE_EXPIRED_EXIT, START_PAGE_PORT

log = logging.getLogger("airlock.agent")

OUTPUT_CAP = 64 * 1024  # per stream of a ``run``: enough to verify, too little to exfiltrate
MAX_CAPTURE_FILE = 1024 * 1024
POLL_S = 0.15  # capture poll period: a file must look the same on two polls this far apart
HELLO_TIMEOUT_S = 10.0
MAX_RUN_TIMEOUT_S = 600.0
MAX_CAPTURE_TIMEOUT_S = 300.0
START_PAGE_WAIT_S = 25.0  # how long the start page's request for the login URL is held
PIPE_CHUNK = 64 * 1024
DISPLAY = ":0"
X_SOCKET = "/tmp/.X11-unix/X0"
SCREEN_POLL_S = 0.5  # how soon the kiosk window follows a viewer's resize
START_PAGE_URL = f"http://127.0.0.1:{START_PAGE_PORT}/"
# What Chromium shows until the login URL is known: it asks the agent for the URL (the
# request is held until there is one) and replaces itself with it, so the login opens in
# place in the same app window. Loopback: Chromium never sends it through the proxy.
START_PAGE = (
    "<!doctype html><meta charset=utf-8><title>Starting…</title>"
    "<body style='font:20px sans-serif;display:flex;align-items:center;"
    "justify-content:center;height:90vh;color:#444'>Starting…"
    "<script>(async () => { for (;;) { try { const r = await fetch('/next', "
    "{cache: 'no-store'}); const url = r.ok ? await r.text() : ''; "
    "if (url) { location.replace(url); return; } } catch (e) { "
    "await new Promise((ok) => setTimeout(ok, 200)); } } })();</script>"
).encode()
OPEN_SOCKET_NAME = "open.sock"  # in the VM's private run dir, for the BROWSER helper
LEASE_FILE = "agent.lease"  # in the state dir: the boot lease, {"for_ms": n, "margin_ms": n}
MAX_LEASE_MS = 24 * 3600 * 1000

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class OpError(Exception):
    """An operation failed in a way the controller should see as ``{code, message}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class Config:
    state_dir: Path
    role: str
    screen: tuple[int, int]
    home: Path
    run_dir: Path
    xvnc: str
    chromium: str
    egress_socket: Path
    single_process: bool = True  # Chromium's process model: see _start_chromium


@dataclass(slots=True)
class Login:
    """The one login this VM runs, and what it has captured so far."""

    provider: str
    proc: asyncio.subprocess.Process
    watch: list[str]
    captured: dict[str, bytes] | None = None
    captured_event: asyncio.Event = field(default_factory=asyncio.Event)


async def read_line(
    reader: asyncio.StreamReader, limit: int = protocol.MAX_MESSAGE
) -> bytes | None:
    """One line of at most ``limit`` bytes, whatever the reader's own buffer limit; None at
    a clean EOF."""
    buf = bytearray()
    while True:
        try:
            buf += await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            buf += await reader.readexactly(exc.consumed)
        except asyncio.IncompleteReadError as exc:
            if exc.partial or buf:
                raise protocol.ProtocolError("stream ended inside a message") from None
            return None
        else:
            if len(buf) > limit:
                raise protocol.ProtocolError("message too large")
            return bytes(buf)
        if len(buf) > limit:
            raise protocol.ProtocolError("message too large")


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes until EOF, then half-close so the other direction can finish."""
    while data := await reader.read(PIPE_CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """Pipe two streams into each other until both directions end (or one breaks)."""
    forward = asyncio.ensure_future(pipe(a[0], b[1]))
    backward = asyncio.ensure_future(pipe(b[0], a[1]))
    try:
        pending: set[asyncio.Future[None]] = {forward, backward}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                break  # a reset on one side: the other direction cannot be useful any more
    finally:
        for t in (forward, backward):
            t.cancel()
        await asyncio.gather(forward, backward, return_exceptions=True)
        for _, w in (a, b):
            w.close()


def _rel_path(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise OpError("bad_request", f"{what} must be a non-empty path")
    return value


def _str_list(value: Any, what: str, *, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OpError("bad_request", f"{what} must be a list of strings")
    if not value and not allow_empty:
        raise OpError("bad_request", f"{what} must not be empty")
    return list(value)


def _str_dict(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise OpError("bad_request", f"{what} must map strings to strings")
    return dict(value)


def _number(value: Any, what: str, default: float, maximum: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise OpError("bad_request", f"{what} must be a non-negative number")
    return min(float(value), maximum)


def _lease_args(message: dict[str, Any]) -> tuple[int, int]:
    """``for_ms`` (1 ms to a day) and ``margin_ms`` (0 to a day, default 0), whole numbers."""

    def whole(name: str, minimum: int, default: int | None) -> int:
        value = message.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not minimum <= value <= MAX_LEASE_MS
        ):
            raise OpError(
                "bad_request", f"{name} must be a whole number of ms, {minimum} to {MAX_LEASE_MS}"
            )
        return value

    return whole("for_ms", 1, None), whole("margin_ms", 0, 0)


def shred(path: Path) -> bool:
    """Overwrite a file with zeros, flush it to disk, unlink it. False if it was not there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:  # a symlink or a directory: do not follow, just unlink if a link
        if path.is_symlink():
            path.unlink()
            return True
        raise OpError("wipe_failed", f"cannot open {path.name}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        zeros = bytes(min(size, PIPE_CHUNK))
        left = size
        while left > 0:
            left -= os.write(fd, zeros[: min(left, len(zeros))])
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    return True


def _makedirs_private(path: Path) -> None:
    """Create missing parents with mode 0700 (umask would otherwise widen or narrow it)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
        os.chmod(d, 0o700)


def write_atomic(path: Path, content: bytes, mode: int) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory."""
    _makedirs_private(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _redact(url: str) -> str:
    """A URL for the log: scheme, host and path only (query strings carry OAuth state)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class Agent:
    """One agent process. Every background task it starts is named and kept in ``_tasks``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._secret = b""
        self._started = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._servers: list[asyncio.Server] = []
        self._children: set[asyncio.subprocess.Process] = set()
        self._login: Login | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._url: str | None = None
        self._url_changed = asyncio.Event()  # set (and replaced) whenever _url changes
        self._start_page_served = False  # the URL went to the start page: later ones cannot
        self._browser_ready = False  # Chromium has asked its start page for the URL
        self._display_ready = False
        # The lease (browser VMs only): the moment, on this VM's monotonic clock, at which it
        # ends itself unless a controller renews it first. Monotonic, so a wall-clock jump in
        # the guest or on the host neither kills it early nor keeps it alive.
        self._lease_end: float | None = None
        self._lease_renewed = asyncio.Event()
        self.exit_code = 0
        self._ops: dict[str, Handler] = {
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

    # -- task ownership ---------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task %s failed: %r", task.get_name(), exc)

    def _adopt_current_task(self, name: str) -> asyncio.Task[Any] | None:
        """Connection handlers are created by asyncio's servers; own them too."""
        task = asyncio.current_task()
        if task is not None:
            task.set_name(name)
            self._tasks.add(task)
        return task

    # -- life cycle -------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        self._secret = (cfg.state_dir / "agent.secret").read_bytes().strip()
        if not self._secret:
            raise SystemExit("agent.secret is empty")
        cfg.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(cfg.run_dir, 0o700)
        cfg.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._load_boot_lease()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._start_servers()
            if cfg.role == "browser":
                self._spawn(self._browser_stack(), "browser-stack")
            if self._lease_end is not None:
                self._spawn(self._lease_watch(), "lease-watch")
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
                await asyncio.start_unix_server(self._on_open_url, path=str(open_sock))
            )
        finally:
            os.umask(old_umask)
        self._servers.append(await asyncio.start_server(self._on_egress, "127.0.0.1", EGRESS_PORT))
        if cfg.role == "browser":
            self._servers.append(
                await asyncio.start_server(self._on_start_page, "127.0.0.1", START_PAGE_PORT)
            )
        self._write_browser_helper()

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proc in list(self._children):
            await self._kill(proc)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        """SIGKILL the process group we started it in, then reap. Not ``proc.kill()``: it polls,
        and so may reap the child behind asyncio's child watcher (which then reports 255)."""
        if proc.returncode is None:
            for kill, target in ((os.killpg, proc.pid), (os.kill, proc.pid)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(target, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        self._children.discard(proc)

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

    def _home_path(self, rel: str) -> Path:
        """A watched path: relative to $HOME and staying inside it."""
        p = Path(rel)
        if p.is_absolute():
            raise OpError("bad_request", f"watched path {rel!r} must be relative to home")
        full = Path(os.path.normpath(self.config.home / p))
        if full == self.config.home or self.config.home not in full.parents:
            raise OpError("bad_request", f"watched path {rel!r} leaves home")
        return full

    def _target_path(self, value: str) -> Path:
        """A path to write or wipe: absolute as given, else relative to $HOME."""
        p = Path(value)
        return Path(os.path.normpath(p if p.is_absolute() else self.config.home / p))

    # -- the lease ----------------------------------------------------------------------------

    def _load_boot_lease(self) -> None:
        """The lease the VM boots with, from ``agent.lease`` in the state dir (written by the
        runtime for browser VMs, or by the guest init from its config disk). A lease file it
        cannot read stops the agent: the VM would otherwise live forever."""
        path = self.config.state_dir / LEASE_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        # Whatever the role: a browser VM whose image has no screen runs its agent as "cli"
        # (agent.guest), and it is leased all the same. The runtime leases only browser VMs.
        try:
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise OpError("bad_request", "the lease must be a JSON object")
            for_ms, margin_ms = _lease_args(value)
        except (ValueError, OpError) as exc:
            raise SystemExit(f"{LEASE_FILE} is not a lease: {exc}") from None
        self._set_lease(for_ms, margin_ms)
        log.info("boot lease: %d ms + %d ms margin", for_ms, margin_ms)

    def _set_lease(self, for_ms: int, margin_ms: int) -> None:
        self._lease_end = time.monotonic() + (for_ms + margin_ms) / 1000
        self._lease_renewed.set()

    async def _lease_watch(self) -> None:
        """End the VM when the lease (plus its margin) runs out with no renewal."""
        while True:
            assert self._lease_end is not None
            remaining = self._lease_end - time.monotonic()
            if remaining <= 0:
                break
            self._lease_renewed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lease_renewed.wait(), remaining)
        log.warning("the lease ran out and no controller renewed it: this VM ends itself")
        self.exit_code = LEASE_EXPIRED_EXIT
        self._stop.set()

    async def _op_lease(self, message: dict[str, Any]) -> dict[str, Any]:
        """Renew (or shorten) the lease: this VM ends itself ``for_ms + margin_ms`` from now,
        on its own monotonic clock, unless renewed again. A duration, not an epoch, so the
        guest's wall clock never enters into it."""
        if self.config.role != "browser" and self._lease_end is None:
            raise OpError("no_lease", "a CLI VM has no lease: it lives until it is deleted")
        for_ms, margin_ms = _lease_args(message)
        first = self._lease_end is None
        self._set_lease(for_ms, margin_ms)
        if first:
            self._spawn(self._lease_watch(), "lease-watch")
        return {"ends_in_ms": for_ms + margin_ms}

    # -- the controller's connection --------------------------------------------------------

    async def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(protocol.encode(message))
        await writer.drain()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = self._adopt_current_task("agent-connection")
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
            if task is not None:
                self._tasks.discard(task)

    def _secret_ok(self, value: Any) -> bool:
        if not isinstance(value, str):
            return False
        return hmac.compare_digest(value.encode(), self._secret)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Hello, then requests one at a time. True when the stream became a ``connect`` pipe."""
        try:
            line = await asyncio.wait_for(read_line(reader), HELLO_TIMEOUT_S)
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
            line = await read_line(reader)
            if line is None:
                return False
            message = protocol.decode(line)
            rid = message.get("id")
            op = message.get("op")
            if op == "connect":
                return await self._op_connect(rid, message, reader, writer)
            handler = self._ops.get(op) if isinstance(op, str) else None
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

    async def _op_ping(self, message: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {
            "role": self.config.role,
            "uptime_s": round(time.monotonic() - self._started, 3),
        }
        if self._display_ready:
            result["display"] = DISPLAY
        if self._lease_end is not None:
            result["lease_ends_in_ms"] = max(0, round((self._lease_end - time.monotonic()) * 1000))
        if self.config.role == "browser":
            result["browser"] = self._browser_ready
        return result

    async def _op_start_login(self, message: dict[str, Any]) -> dict[str, Any]:
        plan = message.get("login")
        if not isinstance(plan, dict):
            raise OpError("bad_request", "login must be a LoginPlan object")
        argv = [self._subst(a) for a in _str_list(plan.get("argv"), "argv")]
        env_extra = {k: self._subst(v) for k, v in _str_dict(plan.get("env"), "env").items()}
        watch = _str_list(plan.get("watch"), "watch", allow_empty=True)
        for rel in watch:
            self._home_path(rel)
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
        self._children.add(proc)
        self._login = Login(provider=provider, proc=proc, watch=watch)
        self._set_url(None)
        log.info("login %s started: pid %d", provider, proc.pid)
        self._spawn(self._reap_login(self._login), "login-reaper")
        if watch:  # nothing to watch: the capture never comes (a plan that only opens a URL)
            self._watcher = self._spawn(self._watch(self._login), "capture-watcher")
        return {"started": True}

    async def _reap_login(self, login: Login) -> None:
        code = await login.proc.wait()
        self._children.discard(login.proc)
        log.info("login %s exited with %s", login.provider, code)

    async def _op_login_status(self, message: dict[str, Any]) -> dict[str, Any]:
        login = self._login
        if login is None:
            state, code = "idle", None
        else:
            code = login.proc.returncode
            state = "running" if code is None else "exited"
        return {
            "state": state,
            "exit_code": code,
            "url": self._url,
            "captured": login is not None and login.captured is not None,
        }

    def _snapshot(self, login: Login) -> dict[str, tuple[int, int]] | None:
        """(size, mtime) of every watched file, or None until they all exist."""
        snap: dict[str, tuple[int, int]] = {}
        for rel in login.watch:
            try:
                st = os.stat(self._home_path(rel))
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CAPTURE_FILE:
                return None
            snap[rel] = (st.st_size, st.st_mtime_ns)
        return snap

    def _read_capture(self, login: Login) -> dict[str, bytes] | None:
        files: dict[str, bytes] = {}
        for rel in login.watch:
            try:
                data = self._home_path(rel).read_bytes()
                json.loads(data)
            except (OSError, ValueError):
                return None  # not there any more, or not (yet) complete JSON
            files[rel] = data
        return files

    async def _watch(self, login: Login) -> None:
        """Poll until every watched file exists, parses, and looked the same last poll."""
        previous: dict[str, tuple[int, int]] | None = None
        while login.captured is None:
            snap = self._snapshot(login)
            if snap is not None and snap == previous:
                files = self._read_capture(login)
                if files is not None and self._snapshot(login) == snap:
                    login.captured = files
                    login.captured_event.set()
                    log.info("captured %d file(s) for %s", len(files), login.provider)
                    return
            previous = snap
            await asyncio.sleep(POLL_S)

    async def _op_capture(self, message: dict[str, Any]) -> dict[str, Any]:
        timeout = _number(message.get("timeout_s"), "timeout_s", 0.0, MAX_CAPTURE_TIMEOUT_S)
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

    async def _op_ack_capture(self, message: dict[str, Any]) -> dict[str, Any]:
        login = self._login
        if login is None or login.captured is None:
            return {"wiped": []}
        wiped = [rel for rel in login.captured if shred(self._home_path(rel))]
        login.captured = None
        login.watch = []
        login.captured_event.clear()
        log.info("capture acknowledged: wiped %d file(s)", len(wiped))
        return {"wiped": wiped}

    async def _op_write_files(self, message: dict[str, Any]) -> dict[str, Any]:
        files = message.get("files")
        if not isinstance(files, list):
            raise OpError("bad_request", "files must be a list")
        plan: list[tuple[str, Path, bytes, int]] = []
        for item in files:  # validate everything before writing anything
            if not isinstance(item, dict):
                raise OpError("bad_request", "each file must be an object")
            path = _rel_path(item.get("path"), "path")
            try:
                content = base64.b64decode(item.get("content_b64", ""), validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise OpError("bad_request", f"content_b64 of {path} is not base64") from None
            mode = item.get("mode", 0o600)
            if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
                raise OpError("bad_request", f"mode of {path} must be an int in 0..0o7777")
            plan.append((path, self._target_path(path), content, mode))
        written: list[str] = []
        for path, target, content, mode in plan:
            try:
                write_atomic(target, content, mode)
            except OSError as exc:
                raise OpError("write_failed", f"cannot write {path}: {exc.strerror}") from None
            written.append(path)
        log.info("wrote %d file(s)", len(written))
        return {"written": written}

    async def _op_run(self, message: dict[str, Any]) -> dict[str, Any]:
        argv = _str_list(message.get("argv"), "argv")
        timeout = _number(message.get("timeout_s"), "timeout_s", 30.0, MAX_RUN_TIMEOUT_S)
        env = self._child_env()
        env.update(_str_dict(message.get("env"), "env"))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=self.config.home,
                process_group=0,  # its own group, in the VM's session (CPU weight)
            )
        except OSError as exc:
            raise OpError("spawn_failed", f"cannot start {argv[0]}: {exc.strerror}") from None
        self._children.add(proc)
        assert proc.stdout is not None and proc.stderr is not None
        out, err = bytearray(), bytearray()
        truncated = False

        async def drain(stream: asyncio.StreamReader, buf: bytearray) -> None:
            nonlocal truncated
            while chunk := await stream.read(PIPE_CHUNK):
                room = OUTPUT_CAP - len(buf)
                buf += chunk[: max(room, 0)]
                truncated = truncated or len(chunk) > room

        readers = asyncio.gather(drain(proc.stdout, out), drain(proc.stderr, err))
        timed_out = False
        try:
            timed_out = not await _exited(proc, timeout)
            await self._kill(proc)
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
            await self._kill(proc)
        return {
            "exit_code": None if timed_out else proc.returncode,
            "stdout": out.decode("utf-8", "replace"),
            "stderr": err.decode("utf-8", "replace"),
            "timed_out": timed_out,
            "truncated": truncated,
        }

    async def _op_wipe(self, message: dict[str, Any]) -> dict[str, Any]:
        paths = _str_list(message.get("paths"), "paths", allow_empty=True)
        wiped = [p for p in paths if shred(self._target_path(_rel_path(p, "path")))]
        log.info("wiped %d file(s)", len(wiped))
        return {"wiped": wiped}

    async def _op_restored(self, message: dict[str, Any]) -> dict[str, Any]:
        """This VM was resumed from a snapshot that other VMs share: take fresh entropy from
        the host into the kernel's pool, a new machine id, and a new secret (the snapshot's
        is known to every clone). Firecracker's VMGenID already reseeds the kernel's CRNG on
        Linux >= 5.18; this covers what it does not (ids, our secret) and older kernels."""
        secret = message.get("secret")
        if not isinstance(secret, str) or len(secret) < 32 or not secret.isprintable():
            raise OpError("bad_request", "secret must be a printable string of >= 32 chars")
        try:
            entropy = base64.b64decode(str(message.get("entropy", "")), validate=True)
        except (binascii.Error, ValueError):
            raise OpError("bad_request", "entropy must be base64") from None
        if not 32 <= len(entropy) <= 512:
            raise OpError("bad_request", "entropy must be 32 to 512 bytes")
        reseeded = reseed_kernel_rng(entropy)
        machine_id = False
        with contextlib.suppress(OSError):  # read-only where /etc is the host's (sandbox)
            write_atomic(Path("/etc/machine-id"), secrets.token_hex(16).encode() + b"\n", 0o444)
            machine_id = True
        self._secret = secret.encode()
        log.info("restored from a snapshot: rng %s, machine id %s", reseeded, machine_id)
        return {"reseeded": reseeded, "machine_id": machine_id}

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
        await splice((reader, writer), inner)
        return True

    # -- egress forwarder -------------------------------------------------------------------

    async def _on_egress(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """127.0.0.1:EGRESS_PORT -> the host's egress proxy socket, byte for byte."""
        task = self._adopt_current_task("egress-connection")
        try:
            try:
                upstream = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(self.config.egress_socket)), 5
                )
            except (OSError, TimeoutError):
                writer.close()  # no proxy for this VM (yet): refuse, do not hang
                return
            await splice((reader, writer), upstream)
        except Exception:
            log.exception("egress connection failed")
            writer.close()
        finally:
            if task is not None:
                self._tasks.discard(task)

    # -- BROWSER helper -> Chromium ---------------------------------------------------------

    def _write_browser_helper(self) -> None:
        """An executable for $BROWSER: it hands the URL to this agent and returns at once."""
        package_root = Path(protocol.__file__).resolve().parent.parent.parent
        script = (
            f"#!{sys.executable}\n"
            "import sys\n"
            f"sys.path.insert(0, {str(package_root)!r})\n"
            "from airlock.agent.open_url import main\n"
            f"sys.exit(main(sys.argv[1:], {str(self.config.run_dir / OPEN_SOCKET_NAME)!r}))\n"
        )
        write_atomic(self.config.run_dir / "browser", script.encode(), 0o700)

    async def _on_open_url(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = self._adopt_current_task("open-url-connection")
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            url = line.decode("utf-8", "replace").strip()
            scheme = urllib.parse.urlsplit(url).scheme
            if scheme not in ("http", "https"):
                writer.write(b"error: only http and https URLs\n")
            else:
                self._open_url(url)
                writer.write(b"ok\n")
            await writer.drain()
        except (OSError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    def _set_url(self, url: str | None) -> None:
        self._url = url
        self._url_changed.set()
        self._url_changed = asyncio.Event()

    def _open_url(self, url: str) -> None:
        log.info("opening %s", _redact(url))
        pending_start_page = not self._start_page_served
        self._set_url(url)
        if self.config.role != "browser" or pending_start_page:
            return  # the start page takes it (now, or when Chromium comes up)
        # The start page has gone to an earlier URL: hand this one to the running Chromium
        # through its own command line (the profile's singleton passes it on and exits).
        self._spawn(self._hand_to_chromium(url), "open-url")

    async def _hand_to_chromium(self, url: str) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._chromium_argv(url),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env=self._chromium_env(),
                process_group=0,
            )
        except OSError as exc:
            log.error("could not hand the URL to Chromium: %s", exc.strerror)
            return
        self._children.add(proc)
        if not await _exited(proc, 30):
            await self._kill(proc)
        self._children.discard(proc)

    # -- the start page: Chromium's first page, on loopback ---------------------------------

    async def _on_start_page(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """``GET /``: the start page; ``GET /next``: the login URL, held until there is one
        (at most ``START_PAGE_WAIT_S``, then an empty answer and the page asks again)."""
        task = self._adopt_current_task("start-page-connection")
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = request.split(b" ", 2)
            path = parts[1] if len(parts) == 3 and parts[0] == b"GET" else b""
            if path == b"/":
                self._browser_ready = True  # Chromium is up and loading its first page
                body, kind = START_PAGE, b"text/html; charset=utf-8"
            elif path == b"/next":
                self._browser_ready = True  # (the window is up too; it may not be seen yet)
                if self._url is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._url_changed.wait(), START_PAGE_WAIT_S)
                url = self._url or ""
                if url:
                    self._start_page_served = True
                body, kind = url.encode(), b"text/plain; charset=utf-8"
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: " + kind + b"\r\nCache-Control: no-store"
                b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
                b"Connection: close\r\n\r\n" + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    # -- the screen: Xvnc + Chromium --------------------------------------------------------

    async def _browser_stack(self) -> None:
        """Keep Xvnc and Chromium running; restart either if it dies (Ctrl+W quits kiosk)."""
        failures = 0
        while True:
            started = time.monotonic()
            xvnc = await self._start_xvnc()
            try:
                await self._wait_x_ready(xvnc)
                try:  # before Chromium reads the keymap (see x11.PRELOADED_KEYSYMS)
                    added = await asyncio.to_thread(x11.preload_keymap, X_SOCKET)
                    log.info("keymap: %d keysyms added", added)
                except (OSError, struct.error) as exc:
                    log.warning("cannot preload the keymap: %r", exc)
                self._display_ready = True
                while xvnc.returncode is None:
                    chrome_started = time.monotonic()
                    chrome = await self._start_chromium()
                    waits = [
                        self._spawn(xvnc.wait(), "xvnc-wait"),
                        self._spawn(chrome.wait(), "chromium-wait"),
                    ]
                    fitter = self._spawn(self._fit_window_to_screen(), "fit-window")
                    try:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for waiter in [*waits, fitter]:
                            waiter.cancel()
                        await self._kill(chrome)
                    log.warning("chromium exited with %s", chrome.returncode)
                    if time.monotonic() - chrome_started < 10:
                        failures += 1
                        await asyncio.sleep(min(0.5 * failures, 5))
                    else:
                        failures = 0
            except OSError as exc:
                log.error("display stack: %s", exc)
            finally:
                self._display_ready = False
                await self._kill(xvnc)
            log.warning("xvnc exited with %s", xvnc.returncode)
            if time.monotonic() - started < 10:
                failures += 1
                await asyncio.sleep(min(0.5 * failures, 5))

    async def _fit_window_to_screen(self) -> None:
        """Keep the kiosk window as large as the X screen, and focused. A viewer resizes the
        screen (noVNC's resizeSession: RFB SetDesktopSize, which Xvnc applies through RandR),
        but Chromium with no window manager keeps its window size, so the page would be cut
        off or leave a blank border. Polls (cheap: an X connection setup and a few round
        trips) and moves the window by X11 ConfigureWindow, gives it the input focus
        (``x11``: what a window manager would do)."""
        fitted: tuple[int, int] | None = None
        while True:
            try:
                size = await asyncio.to_thread(x11.fit_and_focus, X_SOCKET)
                if size:
                    # Chromium is on the display: ready for a URL (the start page takes it
                    # when it runs). Not later, at its window or the start page's request:
                    # those wait for more of Chromium's start (measured: start p50 1.8 or
                    # 2.2 s instead of 0.7 s under the product load).
                    self._browser_ready = True
                if isinstance(size, tuple) and size != fitted:
                    log.info("kiosk window fitted to the screen: %dx%d", *size)
                    fitted = size
            except (OSError, ValueError, struct.error) as exc:
                log.debug("cannot fit the window to the screen yet: %r", exc)
            await asyncio.sleep(SCREEN_POLL_S if fitted else 0.02)

    async def _start_xvnc(self) -> asyncio.subprocess.Process:
        cfg = self.config
        vnc = cfg.state_dir / "vnc.sock"
        for stale in (Path("/tmp/.X0-lock"), Path("/tmp/.X11-unix/X0"), vnc):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        w, h = cfg.screen
        argv = [
            cfg.xvnc,
            DISPLAY,
            "-geometry",
            f"{w}x{h}",
            "-depth",
            "24",
            "-rfbunixpath",
            str(vnc),
            "-rfbunixmode",
            "0600",
            "-rfbport",
            "-1",  # no TCP VNC port at all: only the Unix socket
            "-SecurityTypes",
            "None",  # the socket's directory is 0700 on the host; the controller authenticates
            "-nolisten",
            "tcp",
            "-desktop",
            "airlock",
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            process_group=0,  # not a session of its own: the VM is one scheduling group
        )
        self._children.add(proc)
        return proc

    async def _wait_x_ready(self, xvnc: asyncio.subprocess.Process) -> None:
        """Until the X socket accepts a connection and the VNC socket exists."""
        x_socket = "/tmp/.X11-unix/X0"
        vnc = self.config.state_dir / "vnc.sock"
        deadline = time.monotonic() + 15
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            if xvnc.returncode is not None:
                raise OSError(f"Xvnc exited with {xvnc.returncode} while starting")
            if vnc.exists():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.setblocking(False)
                    try:
                        await loop.sock_connect(s, x_socket)
                        return
                    except OSError:
                        pass
            await asyncio.sleep(0.01)
        raise OSError("Xvnc did not come up in 15 s")

    def _chromium_argv(self, url: str) -> list[str]:
        """Chromium's command line. No ``--remote-debugging-*`` and no ``--enable-automation``:
        Google refuses to sign in a browser that has either (and a DevTools port would let
        anything in the VM read the session's cookies). What DevTools did is done without
        it: the start page opens the login URL, ``x11`` fits and focuses the window."""
        cfg = self.config
        w, h = cfg.screen
        argv = [
            cfg.chromium,
            "--kiosk",
            # Its own sandbox needs to make user namespaces, which the VM refuses (seccomp,
            # bwrap --disable-userns): the VM's confinement is the boundary (README).
            "--no-sandbox",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-breakpad",
            "--noerrdialogs",
            "--password-store=basic",
            "--test-type",  # no "unsupported command-line flag" bar over the login page
            f"--user-data-dir={cfg.run_dir / 'chromium'}",
            f"--proxy-server=http://127.0.0.1:{EGRESS_PORT}",
            f"--window-size={w},{h}",
            "--window-position=0,0",
            # An app window: no toolbar or tab strip, whose WebUI costs a second core-second
            # at start (measured: 1.87 CPU-s vs 0.76 over the first 4.5 s); the login URL
            # replaces the start page in place. After a crash, straight back to the login.
            f"--app={url}",
        ]
        if cfg.single_process:
            # One process, not ten (zygote, GPU, network, storage, renderers): each is a
            # fork+exec of a 250 MB binary that initialises its own copy of the world.
            # Measured from launch to a loaded login page plus 1 s: 0.69 CPU-s instead of
            # 1.07 (median of 9). It gives up no isolation that exists here: with
            # --no-sandbox a renderer already runs as the browser's user, and the VM is
            # the boundary. A renderer crash takes the browser with it; _browser_stack
            # restarts it straight back to the login URL. Chromium calls the mode
            # unsupported, so an operator can turn it off (AIRLOCK_BROWSER_SINGLE_PROCESS).
            argv[1:1] = ["--single-process", "--no-zygote"]
        return argv

    def _chromium_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DISPLAY=DISPLAY, HOME=str(self.config.home), DBUS_SESSION_BUS_ADDRESS="disabled:"
        )
        return env

    async def _start_chromium(self) -> asyncio.subprocess.Process:
        _no_password_manager(self.config.run_dir / "chromium")
        chromium_policy.install()  # its own background traffic off (a sandbox binds it in)
        self._start_page_served = self._url is not None
        proc = await asyncio.create_subprocess_exec(
            *self._chromium_argv(self._url or START_PAGE_URL),
            stdin=asyncio.subprocess.DEVNULL,
            env=self._chromium_env(),
            process_group=0,  # not a session of its own: the VM is one scheduling group
        )
        self._children.add(proc)
        log.info("chromium started: pid %d", proc.pid)
        return proc


async def _exited(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """Whether the process itself exits within ``timeout``. Not ``Process.wait()``: that also
    waits for its pipes, which a child it left in the background may hold open."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return True  # gone and reaped already
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(pidfd, exited.set)
    try:
        await asyncio.wait_for(exited.wait(), timeout)
        return True
    except TimeoutError:
        return proc.returncode is not None
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def reseed_kernel_rng(entropy: bytes) -> str:
    """Mix ``entropy`` into the kernel's pool, credited and with a CRNG reseed where we may
    (``RNDADDENTROPY`` + ``RNDRESEEDCRNG``, needs CAP_SYS_ADMIN: Firecracker's
    random-for-clones.md), else as a plain write (mixed, not credited). Returns which."""
    with open("/dev/urandom", "wb", buffering=0) as dev:
        try:
            info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
            fcntl.ioctl(dev.fileno(), RNDADDENTROPY, info)
            with contextlib.suppress(OSError):
                fcntl.ioctl(dev.fileno(), RNDRESEEDCRNG)
            return "ioctl"
        except OSError:
            dev.write(entropy)
            return "write"


def _error(rid: Any, code: str, message: str) -> dict[str, Any]:
    response: dict[str, Any] = {"ok": False, "error": {"code": code, "message": message}}
    if rid is not None:
        response = {"id": rid, **response}
    return response


def _no_password_manager(user_data_dir: Path) -> None:
    """A fresh profile whose password manager is off: no "Save password?" bubble over the
    page after the person signs in, and no password kept in the VM's profile."""
    prefs = user_data_dir / "Default" / "Preferences"
    if prefs.exists():
        return
    prefs.parent.mkdir(parents=True, exist_ok=True)
    prefs.write_text(
        json.dumps(
            {"credentials_enable_service": False, "profile": {"password_manager_enabled": False}}
        )
    )


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
