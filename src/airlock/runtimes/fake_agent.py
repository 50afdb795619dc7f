"""The guest agent's protocol (``agent.protocol``) answered in the controller's process for
the fake runtime's VMs (``runtimes.fake``), over a socketpair per connection, so
``AgentClient`` speaks to it exactly as to a real agent. ``FakeVm`` is what the fake agent of
one VM remembers; ``run`` executes a real process on the host, with no isolation at all.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from airlock.agent import protocol, streams
from airlock.agent.capture import MAX_CAPTURE_FILE
from airlock.agent.files import shred, write_planned
from airlock.agent.lease import lease_args
from airlock.agent.oparg import (
    OpError,
    file_plan,
    home_path,
    number,
    rel_path,
    run_args,
    str_dict,
    str_list,
)
from airlock.agent.tasks import spawn_piped
from airlock.domain.vms import VmRole
from airlock.runtimes.skeleton import write_private

log = logging.getLogger(__name__)

LOGIN_FILE = "login.json"  # the recorded login plan, so a restarted controller still captures
KILL_TIMEOUT_S = 5.0
HELLO_TIMEOUT_S = 10.0
CAPTURE_POLL_S = 1.0  # how often a capture looks for files written other than by write_files
OUTPUT_CAP = 64 * 1024  # per stream of a ``run``, as the real agent
MAX_RUN_TIMEOUT_S = 600.0
MAX_CAPTURE_TIMEOUT_S = 300.0
KEYS_KEPT = 4096  # the keysyms a fake screen remembers (what a person typed, for tests)
RUN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Handler = Callable[["FakeVm", dict[str, Any]], Awaitable[Mapping[str, object]]]


@dataclass(slots=True)
class FakeVm:
    """What the fake agent of one VM remembers (the login, the capture, the lease)."""

    vm_id: str
    role: VmRole
    home: Path
    state_dir: Path
    started: float = field(default_factory=time.monotonic)
    login: dict[str, Any] | None = None  # {"provider": str, "watch": [paths]}
    captured: dict[str, bytes] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # a write_files landed
    lease_end: float | None = None  # on the controller's monotonic clock
    connections: set[asyncio.Task[None]] = field(default_factory=set)
    screen: tuple[int, int] = (1280, 800)
    keys: deque[int] = field(default_factory=lambda: deque(maxlen=KEYS_KEPT))  # keys pressed


class FakeAgent:
    """The guest agent's protocol, answered in the controller's process for fake VMs."""

    def __init__(self) -> None:
        self.ops: dict[str, Handler] = {
            "ping": self._ping,
            "start_login": self._start_login,
            "login_status": self._login_status,
            "capture": self._capture,
            "ack_capture": self._ack_capture,
            "write_files": self._write_files,
            "run": self._run,
            "wipe": self._wipe,
            "lease": self._lease,
        }

    # -- connections ------------------------------------------------------------------------

    async def serve(self, vm: FakeVm, sock: socket.socket) -> None:
        """Answer one connection, in a task the VM owns (its destroy hangs it up)."""
        try:
            reader, writer = await asyncio.open_connection(
                sock=sock, limit=protocol.MAX_MESSAGE + 1
            )
        except BaseException:
            sock.close()
            raise
        own_connection(vm, self._connection(vm, reader, writer), f"fake-agent:{vm.vm_id}")

    async def hang_up(self, vm: FakeVm) -> None:
        tasks = builtins.list(vm.connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=KILL_TIMEOUT_S)

    async def _connection(
        self, vm: FakeVm, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await self._session(vm, reader, writer)
        except (OSError, protocol.ProtocolError, streams.TruncatedMessage, TimeoutError):
            pass  # a broken connection, or the VM's files went with its destroy
        except asyncio.CancelledError:
            pass  # the VM was destroyed: the connection goes with it
        finally:
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(protocol.encode(message))
        await writer.drain()

    async def _session(
        self, vm: FakeVm, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        line = await asyncio.wait_for(streams.read_line(reader), HELLO_TIMEOUT_S)
        if line is None:
            return
        hello = protocol.decode(line)
        secret = (vm.state_dir / "agent.secret").read_bytes().strip()
        given = hello.get("secret")
        if (
            hello.get("op") != "hello"
            or not isinstance(given, str)
            or not hmac.compare_digest(given.encode(), secret)
        ):
            await self._send(
                writer, _error(None, "unauthorized", "say hello with this VM's secret first")
            )
            return
        await self._send(
            writer, {"ok": True, "result": {"agent": protocol.VERSION, "role": vm.role.value}}
        )
        pending: asyncio.Future[bytes | None] | None = None
        op: asyncio.Future[dict[str, Any]] | None = None
        try:
            while True:
                if pending is None:
                    line = await streams.read_line(reader)
                else:
                    line, pending = await pending, None
                if line is None:
                    return
                message = protocol.decode(line)
                rid = message.get("id")
                # The op runs while the next read waits: a client that hangs up mid-op (a
                # long capture poll) ends the op instead of leaving it waiting here.
                op = asyncio.ensure_future(self._answer(vm, rid, message))
                pending = asyncio.ensure_future(streams.read_line(reader))
                await asyncio.wait({op, pending}, return_when=asyncio.FIRST_COMPLETED)
                if not op.done():
                    if pending.exception() is None and pending.result() is not None:
                        await op  # one request at a time, but answer in order anyway
                    else:
                        op.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await op
                        return
                await self._send(writer, op.result())
        finally:
            for task in (op, pending):  # hung up, or destroyed: nothing of it lingers
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

    async def _answer(self, vm: FakeVm, rid: Any, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return _error(rid, "unknown_op", f"no operation {op!r} in a fake VM")
        try:
            result = await handler(vm, message)
        except OpError as exc:
            return _error(rid, exc.code, exc.message)
        except Exception as exc:
            log.exception("fake agent: %s failed", op)
            return _error(rid, "internal", f"{op} failed: {type(exc).__name__}")
        return {"id": rid, "ok": True, "result": result}

    # -- operations -------------------------------------------------------------------------

    async def _ping(self, vm: FakeVm, message: dict[str, Any]) -> protocol.PingResult:
        result: protocol.PingResult = {
            "role": vm.role.value,
            "uptime_s": round(time.monotonic() - vm.started, 3),
        }
        if vm.lease_end is not None:
            result["lease_ends_in_ms"] = max(0, round((vm.lease_end - time.monotonic()) * 1000))
        if vm.role is VmRole.BROWSER:
            result["browser"] = True  # nothing to wait for: there is no browser
        return result

    async def _start_login(self, vm: FakeVm, message: dict[str, Any]) -> protocol.StartLoginResult:
        plan = message.get("login")
        if not isinstance(plan, dict):
            raise OpError("bad_request", "login must be a LoginPlan object")
        str_list(plan.get("argv"), "argv")
        str_dict(plan.get("env"), "env")
        watch = str_list(plan.get("watch"), "watch", allow_empty=True)
        for rel in watch:
            home_path(vm.home, rel)
        provider = plan.get("provider")
        if not isinstance(provider, str):
            raise OpError("bad_request", "provider must be a string")
        if vm.captured is not None:
            raise OpError("conflict", "a capture awaits ack_capture; it would be stranded")
        vm.login = {"provider": provider, "watch": watch}
        write_private(vm.state_dir / LOGIN_FILE, json.dumps(vm.login).encode(), replace=True)
        return {"started": True}

    async def _login_status(
        self, vm: FakeVm, message: dict[str, Any]
    ) -> protocol.LoginStatusResult:
        state: Literal["idle", "running"] = "idle" if vm.login is None else "running"
        return {"state": state, "exit_code": None, "url": None, "captured": vm.captured is not None}

    def _read_capture(self, vm: FakeVm) -> dict[str, bytes] | None:
        """Every watched file, once all exist and parse as JSON (a login's end)."""
        assert vm.login is not None
        files: dict[str, bytes] = {}
        for rel in vm.login["watch"]:
            path = home_path(vm.home, rel)
            try:
                if path.stat().st_size > MAX_CAPTURE_FILE:
                    return None
                data = path.read_bytes()
                json.loads(data)
            except (OSError, ValueError):
                return None
            files[rel] = data
        return files or None

    async def _capture(self, vm: FakeVm, message: dict[str, Any]) -> protocol.CaptureResult:
        timeout = number(message.get("timeout_s"), "timeout_s", 0.0, MAX_CAPTURE_TIMEOUT_S)
        if vm.login is None:
            raise OpError("no_login", "no login has been started in this VM")
        deadline = time.monotonic() + timeout
        while vm.captured is None:
            vm.changed.clear()
            vm.captured = self._read_capture(vm)
            left = deadline - time.monotonic()
            if vm.captured is not None or left <= 0:
                break
            # asyncio.timeout, not wait_for: on 3.11 wait_for makes a task per call, and a
            # thousand VMs' captures wait here once a second each.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, CAPTURE_POLL_S)):
                    await vm.changed.wait()
        if vm.captured is None:
            return {"captured": False}
        return {
            "captured": True,
            "files": {p: base64.b64encode(d).decode("ascii") for p, d in vm.captured.items()},
        }

    async def _ack_capture(self, vm: FakeVm, message: dict[str, Any]) -> protocol.WipedResult:
        if vm.captured is None:
            return {"wiped": []}
        wiped = [rel for rel in vm.captured if shred(home_path(vm.home, rel))]
        vm.captured = None
        vm.login = None
        with contextlib.suppress(FileNotFoundError):
            (vm.state_dir / LOGIN_FILE).unlink()
        return {"wiped": wiped}

    async def _write_files(self, vm: FakeVm, message: dict[str, Any]) -> protocol.WrittenResult:
        written = write_planned(file_plan(message.get("files"), lambda path: _in_home(vm, path)))
        vm.changed.set()
        return {"written": written}

    async def _wipe(self, vm: FakeVm, message: dict[str, Any]) -> protocol.WipedResult:
        paths = str_list(message.get("paths"), "paths", allow_empty=True)
        return {"wiped": [p for p in paths if shred(_in_home(vm, rel_path(p, "path")))]}

    async def _run(self, vm: FakeVm, message: dict[str, Any]) -> protocol.RunResult:
        argv, timeout, extra_env = run_args(message, MAX_RUN_TIMEOUT_S)
        env = {"PATH": RUN_PATH, "HOME": str(vm.home), "LANG": "C.UTF-8"} | extra_env
        proc = await spawn_piped(argv, env=env, cwd=vm.home, start_new_session=True)
        timed_out = False
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            timed_out = True
            out, err = b"", b""
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        return {
            "exit_code": None if timed_out else proc.returncode,
            "stdout": out[:OUTPUT_CAP].decode("utf-8", "replace"),
            "stderr": err[:OUTPUT_CAP].decode("utf-8", "replace"),
            "timed_out": timed_out,
            "truncated": len(out) > OUTPUT_CAP or len(err) > OUTPUT_CAP,
        }

    async def _lease(self, vm: FakeVm, message: dict[str, Any]) -> protocol.LeaseResult:
        if vm.role is not VmRole.BROWSER and vm.lease_end is None:
            raise OpError("no_lease", "a CLI VM has no lease: it lives until it is deleted")
        for_ms, margin_ms = lease_args(message)
        vm.lease_end = time.monotonic() + (for_ms + margin_ms) / 1000
        return {"ends_in_ms": for_ms + margin_ms}


def own_connection(vm: FakeVm, coro: Coroutine[Any, Any, None], name: str) -> None:
    """Run one connection of ``vm`` in a task the VM owns (its destroy hangs it up)."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    vm.connections.add(task)
    task.add_done_callback(vm.connections.discard)


def _in_home(vm: FakeVm, value: str) -> Path:
    """A path to write or wipe: under the fake VM's home, which is a directory of the host
    (a real agent writes an absolute path inside its VM; here it would land on the host)."""
    if Path(value).is_absolute():
        raise OpError("bad_request", f"{value!r}: a fake VM writes only under its home")
    return home_path(vm.home, value)


def _error(rid: Any, code: str, message: str) -> dict[str, Any]:
    response: dict[str, Any] = {"ok": False, "error": {"code": code, "message": message}}
    if rid is not None:
        response = {"id": rid, **response}
    return response
