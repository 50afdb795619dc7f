"""The ``fake`` runtime: VMs for controller-scale work (tests, ``make bench``), never for people.

A fake VM is a record and a tiny process. The record is its state dir, as every runtime
keeps it (``meta.json``, ``agent.secret``, ``pid``, and ``home/`` for its user's files); the
process is ``sleep infinity`` in a session of its own, whose life is the VM's life: ``list``
finds it by its pid record after a controller restart (adopt), and a process that died is a
VM that vanished (the reconciler marks it ``lost``). So the controller does all its real
work (rows, deadlines, the scheduler, the reconciler, leases, egress sockets, SSE) while a
VM costs about one page of memory, and a thousand sessions fit on one machine.

The guest agent's protocol (``agent.protocol``) is answered in the controller's process by
``FakeAgent``, over a socketpair per connection, so ``AgentClient`` speaks to it exactly as
to a real agent: hello with the VM's secret, then ``ping``, ``start_login`` (recorded: no
program runs and there is no browser, so a test or a benchmark finishes the login by writing
the watched files with ``write_files``, as the login program would), ``login_status``,
``capture`` and ``ack_capture`` (the watched files under ``home/``), ``write_files`` and
``wipe`` (only under ``home/``), ``run`` (a real process **on the host**, in ``home/``:
there is no isolation at all), and ``lease`` (``list`` ends a VM whose lease ran out, as
the VM would have ended itself; with no controller left at all a fake VM's process stays,
until the next controller reaps it as an orphan). The agent's side costs the controller's
CPU here, where a real VM would pay for it: a benchmark's controller figures include it.

Its screen is ``FakeScreen``: an RFB 3.8 server (security None, raw encoding, 32 bits a
pixel) that shows one grey picture and remembers the keys it was sent, so the viewer page
and the VNC proxy work against fake VMs too.

It is never the default (``AIRLOCK_RUNTIME=fake`` selects it), and its ``check()`` reports
that it is in use, so ``airlock doctor`` fails on a host configured with it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import contextlib
import hmac
import json
import logging
import os
import shutil
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from airlock.agent import protocol, streams
from airlock.agent.capture import MAX_CAPTURE_FILE
from airlock.agent.client import AgentClient
from airlock.agent.files import shred, write_atomic
from airlock.agent.lease import lease_args
from airlock.agent.oparg import OpError, home_path, number, rel_path, str_dict, str_list
from airlock.domain.vms import VmRole
from airlock.errors import RuntimeFailure
from airlock.runtimes.base import RunningVm, Stream, VmSpec
from airlock.runtimes.skeleton import VmDirRuntime, record_pid, write_meta, write_private
from airlock.runtimes.vmdir import PidRecord, is_alive, read_json, read_meta, read_pid

log = logging.getLogger(__name__)

IN_USE = (
    "the fake runtime is in use (AIRLOCK_RUNTIME=fake): VMs are records and idle processes, "
    "with no browser, a blank screen and no isolation; for tests and benchmarks only"
)
SLEEP = "/bin/sleep"
LOGIN_FILE = "login.json"  # the recorded login plan, so a restarted controller still captures
HELLO_TIMEOUT_S = 10.0
CAPTURE_POLL_S = 1.0  # how often a capture looks for files written other than by write_files
KILL_TIMEOUT_S = 5.0
OUTPUT_CAP = 64 * 1024  # per stream of a ``run``, as the real agent
MAX_RUN_TIMEOUT_S = 600.0
MAX_CAPTURE_TIMEOUT_S = 300.0
MAX_CUT_TEXT = 1024 * 1024  # the longest paste the fake screen takes
KEYS_KEPT = 4096  # the keysyms a fake screen remembers (what a person typed, for tests)
GREY = (0x44, 0x44, 0x44)  # the fake screen's one colour
RUN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Handler = Callable[["_Vm", dict[str, Any]], Awaitable[Mapping[str, object]]]


@dataclass(slots=True)
class _Vm:
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


def _spawn_idle() -> int:
    """The VM's process: ``sleep infinity`` in a session of its own (so it outlives the
    controller, as a real VM does), with nothing of the controller's open."""
    null = os.devnull
    return os.posix_spawn(
        SLEEP,
        ["sleep", "infinity"],
        {"PATH": RUN_PATH, "LANG": "C.UTF-8"},
        setsid=True,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, null, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, null, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, null, os.O_WRONLY, 0),
        ],
    )


def _kill_now(pid: int) -> None:
    """A create's clean-up: its process, just started, goes at once."""
    with contextlib.suppress(ProcessLookupError, ChildProcessError):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _reap(pid: int) -> None:
    """Collect the exit status of a VM process that is this controller's child (one started
    by an earlier controller is not: init reaps it)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _kill(record: PidRecord) -> bool:
    """SIGKILL through a pidfd (no pid-reuse race), waiting for the exit on the event loop
    (a pidfd is readable once its process has exited); False if it was not running."""
    try:
        pidfd = os.pidfd_open(record.pid)
    except ProcessLookupError:
        return False
    try:
        if not is_alive(record):  # checked after pidfd_open: the pidfd pins this process
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(pidfd, _set_once, exited)
        try:
            async with asyncio.timeout(KILL_TIMEOUT_S):
                await exited
        except TimeoutError:
            raise RuntimeFailure(f"fake VM process {record.pid} did not die") from None
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
    _reap(record.pid)
    return True


def _pid_of(state_dir: Path) -> tuple[bool, PidRecord | None]:
    """Whether the state dir is there, and the VM process it records."""
    if not state_dir.is_dir():
        return False, None
    return True, read_pid(state_dir)


def _remove(state_dir: Path, record: PidRecord | None) -> None:
    """Reap the VM's process if it is ours and gone, then remove its files."""
    if record is not None:
        _reap(record.pid)
    shutil.rmtree(state_dir, ignore_errors=True)


class FakeRuntime(VmDirRuntime):
    """Fake VMs; see the module docstring."""

    name = "fake"
    label = "fake VM"
    creating_grace_s = 10.0
    missing_dir_is_empty = True

    def __init__(self, vms_dir: Path) -> None:
        super().__init__(vms_dir)
        self._vms: dict[str, _Vm] = {}
        self.agent = FakeAgent(self)

    # -- create -----------------------------------------------------------------------------

    async def create(self, spec: VmSpec) -> RunningVm:
        state_dir = self._state_dir(spec.vm_id)
        started = time.monotonic()
        async with self._creating_vm(spec.vm_id, state_dir / "meta.json", heading="meta.json") as c:
            try:
                self.vms_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                state_dir.mkdir(mode=0o700)
            except FileExistsError:
                raise RuntimeFailure(f"VM {spec.vm_id} already exists", code="vm_exists") from None
            except OSError as exc:
                raise RuntimeFailure(f"cannot create {state_dir}: {exc.strerror}") from None
            c.push(lambda: shutil.rmtree(state_dir, ignore_errors=True))
            write_meta(
                state_dir,
                spec,
                self.name,
                labels=spec.labels,
                screen=f"{spec.screen[0]}x{spec.screen[1]}",
            )
            write_private(state_dir / "agent.secret", os.urandom(24).hex().encode() + b"\n")
            (state_dir / "home").mkdir(mode=0o700)
            try:
                pid = _spawn_idle()
            except OSError as exc:
                raise RuntimeFailure(f"cannot start {SLEEP}: {exc.strerror}") from None
            c.push(lambda: _kill_now(pid))
            record_pid(state_dir / "pid", pid, what="the fake VM's process")
            vm = _Vm(spec.vm_id, spec.role, state_dir / "home", state_dir, screen=spec.screen)
            if spec.lease_ms is not None:
                vm.lease_end = time.monotonic() + (spec.lease_ms + spec.lease_margin_ms) / 1000
            self._vms[spec.vm_id] = vm
        boot_ms = round((time.monotonic() - started) * 1000)
        return RunningVm(
            vm_id=spec.vm_id,
            role=spec.role,
            pid=pid,
            state_dir=state_dir,
            detail={"boot_ms": str(boot_ms), "fake": "true"},
        )

    # -- destroy ----------------------------------------------------------------------------

    async def _destroy_locked(self, vm_id: str, state_dir: Path) -> bool:
        vm = self._vms.pop(vm_id, None)
        if vm is not None:
            await self.agent.hang_up(vm)
        # On the loop, not in a thread: a stat, a 20-byte read and a few unlinks cost less
        # than the hop to a thread would add to every destroy's lag.
        present, record = _pid_of(state_dir)
        if not present:
            return False
        killed = await _kill(record) if record is not None else False
        _remove(state_dir, record)
        return killed

    # -- list -------------------------------------------------------------------------------

    async def list(self) -> builtins.list[RunningVm]:
        await self._end_expired_leases()
        found = await asyncio.to_thread(self._scan, frozenset(self._creating))
        # What the agent remembers of VMs that are gone. Not of a VM created while the scan
        # ran (its dir is newer than the scan): its process lives.
        seen = {vm.vm_id for vm in found}
        for vm_id in [v for v in self._vms if v not in seen and v not in self._creating]:
            vm = self._vms[vm_id]
            record = read_pid(vm.state_dir)
            if record is not None and is_alive(record):
                continue
            del self._vms[vm_id]
            await self.agent.hang_up(vm)
        return found

    async def _end_expired_leases(self) -> None:
        """A browser VM whose lease ran out unrenewed ends itself (``agent.lease``): here
        its process is killed, and the scan then finds it gone."""
        now = time.monotonic()
        for vm in [v for v in self._vms.values() if v.lease_end is not None]:
            if vm.lease_end is not None and vm.lease_end <= now:
                log.warning("fake VM %s: its lease ran out unrenewed; it ends itself", vm.vm_id)
                vm.lease_end = None
                record = read_pid(vm.state_dir)
                if record is not None:
                    with contextlib.suppress(RuntimeFailure):
                        await _kill(record)

    def _remove_gone(self, vm_id: str, state_dir: Path) -> None:
        _remove(state_dir, read_pid(state_dir))

    def _detail(self, meta: dict[str, Any]) -> dict[str, str]:
        return {"fake": "true"}

    # -- the agent --------------------------------------------------------------------------

    def vm(self, vm_id: str) -> _Vm:
        """The agent's memory of a live VM (rebuilt from its state dir after a restart);
        RuntimeFailure when the VM is not there or its process has died."""
        state_dir = self._existing(vm_id)
        record = read_pid(state_dir)
        if record is None or not is_alive(record):
            raise RuntimeFailure(f"fake VM {vm_id} is not running", code="vm_not_found")
        vm = self._vms.get(vm_id)
        if vm is None:
            meta = read_meta(state_dir)
            try:
                role = VmRole(str(meta.get("role")))
            except ValueError:
                role = VmRole.CLI
            vm = _Vm(vm_id, role, state_dir / "home", state_dir, screen=_screen(meta))
            login = read_json(state_dir / LOGIN_FILE)
            if login:
                vm.login = login
            self._vms[vm_id] = vm
        return vm

    async def _connect_agent(
        self, state_dir: Path, secret: str, timeout_s: float = 10
    ) -> AgentClient:
        vm = self.vm(state_dir.name)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            reader, writer = await asyncio.open_connection(
                sock=ours, limit=protocol.MAX_MESSAGE + 1
            )
        except BaseException:
            ours.close()
            theirs.close()
            raise
        try:
            await self.agent.serve(vm, theirs)
        except BaseException:
            writer.close()
            raise
        return await AgentClient.connect(reader, writer, secret, timeout_s=timeout_s)

    async def _connect_vnc(self, state_dir: Path) -> Stream:
        vm = self.vm(state_dir.name)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            stream = await asyncio.open_connection(sock=ours)
            reader, writer = await asyncio.open_connection(sock=theirs)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        _own(vm, FakeScreen(vm).serve(reader, writer), f"fake-screen:{vm.vm_id}")
        return stream

    async def close(self) -> None:
        """Hang up every agent connection (a test's or a benchmark's end)."""
        for vm in builtins.list(self._vms.values()):
            await self.agent.hang_up(vm)

    # -- check ------------------------------------------------------------------------------

    async def check(self) -> builtins.list[str]:
        problems = [IN_USE]
        if not os.access(SLEEP, os.X_OK):
            problems.append(f"{SLEEP} is missing (coreutils): a fake VM's process")
        try:
            self.vms_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not os.access(self.vms_dir, os.W_OK | os.X_OK):
                problems.append(f"{self.vms_dir} is not writable")
        except OSError as exc:
            problems.append(f"cannot create {self.vms_dir}: {exc.strerror}")
        return problems


class FakeAgent:
    """The guest agent's protocol, answered in the controller's process for fake VMs."""

    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
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

    async def serve(self, vm: _Vm, sock: socket.socket) -> None:
        """Answer one connection, in a task the VM owns (its destroy hangs it up)."""
        try:
            reader, writer = await asyncio.open_connection(
                sock=sock, limit=protocol.MAX_MESSAGE + 1
            )
        except BaseException:
            sock.close()
            raise
        _own(vm, self._connection(vm, reader, writer), f"fake-agent:{vm.vm_id}")

    async def hang_up(self, vm: _Vm) -> None:
        tasks = builtins.list(vm.connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=KILL_TIMEOUT_S)

    async def _connection(
        self, vm: _Vm, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
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
        self, vm: _Vm, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
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

    async def _answer(self, vm: _Vm, rid: Any, message: dict[str, Any]) -> dict[str, Any]:
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

    async def _ping(self, vm: _Vm, message: dict[str, Any]) -> protocol.PingResult:
        result: protocol.PingResult = {
            "role": vm.role.value,
            "uptime_s": round(time.monotonic() - vm.started, 3),
        }
        if vm.lease_end is not None:
            result["lease_ends_in_ms"] = max(0, round((vm.lease_end - time.monotonic()) * 1000))
        if vm.role is VmRole.BROWSER:
            result["browser"] = True  # nothing to wait for: there is no browser
        return result

    async def _start_login(self, vm: _Vm, message: dict[str, Any]) -> protocol.StartLoginResult:
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

    async def _login_status(self, vm: _Vm, message: dict[str, Any]) -> protocol.LoginStatusResult:
        state: Literal["idle", "running"] = "idle" if vm.login is None else "running"
        return {"state": state, "exit_code": None, "url": None, "captured": vm.captured is not None}

    def _read_capture(self, vm: _Vm) -> dict[str, bytes] | None:
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

    async def _capture(self, vm: _Vm, message: dict[str, Any]) -> protocol.CaptureResult:
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(vm.changed.wait(), min(left, CAPTURE_POLL_S))
        if vm.captured is None:
            return {"captured": False}
        return {
            "captured": True,
            "files": {p: base64.b64encode(d).decode("ascii") for p, d in vm.captured.items()},
        }

    async def _ack_capture(self, vm: _Vm, message: dict[str, Any]) -> protocol.WipedResult:
        if vm.captured is None:
            return {"wiped": []}
        wiped = [rel for rel in vm.captured if shred(home_path(vm.home, rel))]
        vm.captured = None
        vm.login = None
        with contextlib.suppress(FileNotFoundError):
            (vm.state_dir / LOGIN_FILE).unlink()
        return {"wiped": wiped}

    async def _write_files(self, vm: _Vm, message: dict[str, Any]) -> protocol.WrittenResult:
        files = message.get("files")
        if not isinstance(files, list):
            raise OpError("bad_request", "files must be a list")
        plan: builtins.list[tuple[str, Path, bytes, int]] = []
        for item in files:  # validate everything before writing anything
            if not isinstance(item, dict):
                raise OpError("bad_request", "each file must be an object")
            path = rel_path(item.get("path"), "path")
            try:
                content = base64.b64decode(item.get("content_b64", ""), validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise OpError("bad_request", f"content_b64 of {path} is not base64") from None
            mode = item.get("mode", 0o600)
            if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
                raise OpError("bad_request", f"mode of {path} must be an int in 0..0o7777")
            plan.append((path, _in_home(vm, path), content, mode))
        written: builtins.list[str] = []
        for path, target, content, mode in plan:
            try:
                write_atomic(target, content, mode)
            except OSError as exc:
                raise OpError("write_failed", f"cannot write {path}: {exc.strerror}") from None
            written.append(path)
        vm.changed.set()
        return {"written": written}

    async def _wipe(self, vm: _Vm, message: dict[str, Any]) -> protocol.WipedResult:
        paths = str_list(message.get("paths"), "paths", allow_empty=True)
        return {"wiped": [p for p in paths if shred(_in_home(vm, rel_path(p, "path")))]}

    async def _run(self, vm: _Vm, message: dict[str, Any]) -> protocol.RunResult:
        argv = str_list(message.get("argv"), "argv")
        timeout = number(message.get("timeout_s"), "timeout_s", 30.0, MAX_RUN_TIMEOUT_S)
        env = {"PATH": RUN_PATH, "HOME": str(vm.home), "LANG": "C.UTF-8"}
        env.update(str_dict(message.get("env"), "env"))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=vm.home,
                start_new_session=True,
            )
        except OSError as exc:
            raise OpError("spawn_failed", f"cannot start {argv[0]}: {exc.strerror}") from None
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

    async def _lease(self, vm: _Vm, message: dict[str, Any]) -> protocol.LeaseResult:
        if vm.role is not VmRole.BROWSER and vm.lease_end is None:
            raise OpError("no_lease", "a CLI VM has no lease: it lives until it is deleted")
        for_ms, margin_ms = lease_args(message)
        vm.lease_end = time.monotonic() + (for_ms + margin_ms) / 1000
        return {"ends_in_ms": for_ms + margin_ms}


def _own(vm: _Vm, coro: Coroutine[Any, Any, None], name: str) -> None:
    """Run one connection of ``vm`` in a task the VM owns (its destroy hangs it up)."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    vm.connections.add(task)
    task.add_done_callback(vm.connections.discard)


def _screen(meta: dict[str, Any]) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in str(meta.get("screen", "")).split("x"))
    except ValueError:
        return (1280, 800)
    return width, height


class FakeScreen:
    """A fake VM's VNC server: RFB 3.8 with security None; one grey picture in raw encoding
    at 32 bits a pixel (any channel layout the client asks for); key presses remembered.
    Enough for the viewer page, the VNC proxy and a test that types."""

    # client message type -> bytes after the type byte (ClientCutText's text comes after)
    SIZES: ClassVar[dict[int, int]] = {0: 19, 2: 3, 3: 9, 4: 7, 5: 5, 6: 7}

    def __init__(self, vm: _Vm) -> None:
        self.vm = vm
        self.pixel = self._pixel(32, False, 255, 255, 255, 16, 8, 0)

    @staticmethod
    def _pixel(
        bpp: int, big: bool, rmax: int, gmax: int, bmax: int, rs: int, gs: int, bs: int
    ) -> bytes:
        r, g, b = GREY
        value = (r * rmax // 255) << rs | (g * gmax // 255) << gs | (b * bmax // 255) << bs
        return value.to_bytes(bpp // 8, "big" if big else "little")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # the VM was destroyed: its screen goes with it
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        width, height = self.vm.screen
        writer.write(b"RFB 003.008\n")
        if not (await reader.readexactly(12)).startswith(b"RFB 003."):
            return
        writer.write(b"\x01\x01")  # one security type: None
        if await reader.readexactly(1) != b"\x01":
            return
        writer.write(struct.pack(">I", 0))  # SecurityResult: OK
        await reader.readexactly(1)  # ClientInit (shared or not: all are)
        name = f"airlock fake VM {self.vm.vm_id}".encode()
        pixel_format = struct.pack(">BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
        writer.write(struct.pack(">HH", width, height) + pixel_format)
        writer.write(struct.pack(">I", len(name)) + name)
        await writer.drain()
        while True:
            kind = (await reader.readexactly(1))[0]
            size = self.SIZES.get(kind)
            if size is None:
                return  # not RFB: hang up, as a VNC server does
            body = await reader.readexactly(size)
            if kind == 0:  # SetPixelFormat
                bpp, _depth, big, true_colour, *rest = struct.unpack(">xxxBBBBHHHBBBxxx", body)
                if bpp != 32 or not true_colour:
                    return  # only what noVNC and the tests ask for
                self.pixel = self._pixel(bpp, bool(big), *rest)
            elif kind == 2:  # SetEncodings: raw is always there
                (count,) = struct.unpack(">xH", body)
                await reader.readexactly(4 * count)
            elif kind == 3:  # FramebufferUpdateRequest: nothing ever changes
                incremental, x, y, w, h = struct.unpack(">BHHHH", body)
                if not incremental:
                    w, h = max(0, min(w, width - x)), max(0, min(h, height - y))
                    header = struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", x, y, w, h, 0)
                    writer.write(header + self.pixel * (w * h))
                    await writer.drain()
            elif kind == 4:  # KeyEvent
                down, keysym = struct.unpack(">BxxI", body)
                if down:
                    self.vm.keys.append(keysym)
            elif kind == 6:  # ClientCutText
                (length,) = struct.unpack(">xxxI", body)
                if length > MAX_CUT_TEXT:
                    return
                await reader.readexactly(length)


def _in_home(vm: _Vm, value: str) -> Path:
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
