"""The ``fake`` runtime: VMs for controller-scale work (tests, ``make bench``), never for
people.

A fake VM is a record and a tiny process. The record is its state dir, as every runtime
keeps it (``meta.json``, ``agent.secret``, ``pid``, and ``home/`` for its user's files); the
process is ``sleep infinity`` in a session of its own, whose life is the VM's life: ``list``
finds it by its pid record after a controller restart (adopt), and a process that died is a
VM that vanished (the reconciler marks it ``lost``). So the controller does all its real
work (rows, deadlines, the scheduler, the reconciler, leases, egress sockets, SSE) while a
VM costs about one page of memory, and a thousand sessions fit on one machine.

The guest agent's protocol (``agent.protocol``) is answered in the controller's process by
``FakeAgent`` (``runtimes.fake_agent``), over a socketpair per connection, so ``AgentClient``
speaks to it exactly as to a real agent: hello with the VM's secret, then ``ping``,
``start_login`` (recorded: no program runs and there is no browser, so a test or a benchmark
finishes the login by writing the watched files with ``write_files``, as the login program
would), ``login_status``, ``capture`` and ``ack_capture`` (the watched files under
``home/``), ``write_files`` and ``wipe`` (only under ``home/``), ``run`` (a real process
**on the host**, in ``home/``: there is no isolation at all), and ``lease`` (``list`` ends a
VM whose lease ran out, as the VM would have ended itself; with no controller left at all a
fake VM's process stays, until the next controller reaps it as an orphan). The agent's side
costs the controller's CPU here, where a real VM would pay for it: a benchmark's controller
figures include it.

Its screen is ``FakeScreen`` (``runtimes.fake_screen``): an RFB 3.8 server (security None, raw
encoding, 32 bits a pixel) that shows one grey picture and remembers the keys it was sent,
so the viewer page and the VNC proxy work against fake VMs too.

It is never the default (``AIRLOCK_RUNTIME=fake`` selects it), and its ``check()`` reports
that it is in use, so ``airlock doctor`` fails on a host configured with it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from airlock.agent import protocol
from airlock.agent.client import AgentClient
from airlock.domain.vms import VmRole
from airlock.errors import RuntimeFailure
from airlock.runtimes.base import RunningVm, Stream, VmSpec
from airlock.runtimes.fake_agent import (
    KILL_TIMEOUT_S,
    LOGIN_FILE,
    RUN_PATH,
    FakeAgent,
    FakeVm,
    own_connection,
)
from airlock.runtimes.fake_screen import FakeScreen
from airlock.runtimes.skeleton import (
    VmDirRuntime,
    kill,
    make_state_dir,
    record_pid,
    vms_dir_problems,
    write_meta,
    write_private,
)
from airlock.runtimes.vmdir import PidRecord, is_alive, read_json, read_meta, read_pid

log = logging.getLogger(__name__)

IN_USE = (
    "the fake runtime is in use (AIRLOCK_RUNTIME=fake): VMs are records and idle processes, "
    "with no browser, a blank screen and no isolation; for tests and benchmarks only"
)
SLEEP = "/bin/sleep"


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
    """``skeleton.kill`` off the event loop, then the exit status collected if the process
    is this controller's child; False if it was not running."""
    killed = await asyncio.to_thread(kill, record, what="fake VM process", timeout_s=KILL_TIMEOUT_S)
    if killed:
        _reap(record.pid)
    return killed


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
        self._vms: dict[str, FakeVm] = {}
        self.agent = FakeAgent()

    # -- create -----------------------------------------------------------------------------

    async def create(self, spec: VmSpec) -> RunningVm:
        state_dir = self._state_dir(spec.vm_id)
        started = time.monotonic()
        async with self._creating_vm(spec.vm_id, state_dir / "meta.json", heading="meta.json") as c:
            make_state_dir(self.vms_dir, state_dir, spec.vm_id)
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
            vm = FakeVm(spec.vm_id, spec.role, state_dir / "home", state_dir, screen=spec.screen)
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

    def vm(self, vm_id: str) -> FakeVm:
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
            vm = FakeVm(vm_id, role, state_dir / "home", state_dir, screen=_screen(meta))
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
        own_connection(vm, FakeScreen(vm).serve(reader, writer), f"fake-screen:{vm.vm_id}")
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
        return problems + vms_dir_problems(self.vms_dir)


def _screen(meta: dict[str, Any]) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in str(meta.get("screen", "")).split("x"))
    except ValueError:
        return (1280, 800)
    return width, height
