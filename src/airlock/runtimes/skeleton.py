"""What every runtime does the same way, so that each backend keeps only its I/O.

A backend (``sandbox``, ``qemu``, ``firecracker``) subclasses ``VmDirRuntime`` and supplies
how a VM is launched, torn down and reached (``_destroy_locked``, ``_connect_agent``,
``_connect_vnc``, ``_remove_gone``, ...). The base holds the rest: the VM id check, the
set of VMs being created and the per-VM locks, create-with-abort (``Creation``: clean-up
steps pushed as each step of a create succeeds, run once in reverse on failure), the scan
of the state dirs, whose decision is one pure function (``vm_state``), and the streams'
error handling. Runtimes may not import each other; they share this module and ``vmdir``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import enum
import json
import logging
import os
import re
import select
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from airlock.agent.client import AgentClient
from airlock.domain.vms import VmRole
from airlock.errors import RuntimeFailure
from airlock.runtimes.base import RunningVm, Stream, VmSpec
from airlock.runtimes.vmdir import (
    PidRecord,
    is_alive,
    is_young,
    log_excerpt,
    proc_stat,
    read_meta,
    read_pid,
)

VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# -- files ----------------------------------------------------------------------------------


def make_state_dir(
    vms_dir: Path, state_dir: Path, vm_id: str, make: Callable[[], None] | None = None
) -> None:
    """Create a VM's state dir (``make``, if given, creates it its own way), refusing one
    that exists: two creates of one id must not share a directory."""
    try:
        vms_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if make is None:
            state_dir.mkdir(mode=0o700)
        else:
            make()
    except FileExistsError:
        raise RuntimeFailure(f"VM {vm_id} already exists", code="vm_exists") from None
    except OSError as exc:
        raise RuntimeFailure(f"cannot create {state_dir}: {exc.strerror}") from None


def vms_dir_problems(vms_dir: Path) -> builtins.list[str]:
    """What a runtime's ``check()`` says when it cannot keep its VMs' state dirs."""
    try:
        vms_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        return [f"cannot create {vms_dir}: {exc.strerror}"]
    if not os.access(vms_dir, os.W_OK | os.X_OK):
        return [f"{vms_dir} is not writable"]
    return []


def write_private(path: Path, data: bytes, *, replace: bool = False) -> None:
    """0600, written whole and synced; ``replace`` swaps it in atomically for an existing
    file (else the file must not exist yet)."""
    target = path.with_name(path.name + ".new") if replace else path
    flags = os.O_TRUNC if replace else os.O_EXCL
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | flags | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if replace:
        os.replace(target, path)


def write_meta(state_dir: Path, spec: VmSpec, runtime: str, **extra: Any) -> dict[str, Any]:
    """The VM's ``meta.json``: who it is for and when it was made (``list`` reads it back,
    ``vmdir.is_young`` its age), then what the backend adds."""
    meta: dict[str, Any] = {
        "vm_id": spec.vm_id,
        "role": spec.role.value,
        "user_id": spec.user_id,
        "created_at": datetime.now(UTC).isoformat(),
        "runtime": runtime,
        **extra,
    }
    write_private(state_dir / "meta.json", json.dumps(meta, indent=2).encode() + b"\n")
    return meta


def record_pid(path: Path, pid: int, *, what: str = "process", in_place: bool = False) -> PidRecord:
    """Write ``pid`` and its start time to ``path``; ``in_place`` overwrites the existing
    inode (one a sandbox sees through a read-only bind) instead of swapping in a new one."""
    found = proc_stat(pid)
    if found is None or found[0] in ("Z", "X"):
        raise RuntimeFailure(f"{what} {pid} exited at once")
    record = PidRecord(pid, found[1])
    data = f"{record.pid} {record.start_time}\n".encode()
    if not in_place:
        write_private(path, data, replace=True)
        return record
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def lease_config(spec: VmSpec) -> dict[str, str]:
    """The boot lease for a guest init (``agent.guest``) that hands it to the agent."""
    if spec.lease_ms is None:
        return {}
    return {"lease_ms": str(spec.lease_ms), "lease_margin_ms": str(spec.lease_margin_ms)}


# -- processes ------------------------------------------------------------------------------


def kill(
    record: PidRecord | None,
    *,
    what: str = "process",
    timeout_s: float = 10.0,
    before: Callable[[int], None] | None = None,
) -> bool:
    """SIGKILL through a pidfd (no pid-reuse race) and wait until it has exited. False if
    it was not running. ``before(pid)`` runs once the pidfd pins the live process, just
    before the signal."""
    if record is None:
        return False
    try:
        pidfd = os.pidfd_open(record.pid)
    except ProcessLookupError:
        return False
    try:
        if not is_alive(record):  # checked after pidfd_open: the pidfd pins this process
            return False
        if before is not None:
            before(record.pid)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)  # readable once the process has exited
        if not poller.poll(int(timeout_s * 1000)):
            raise RuntimeFailure(f"{what} {record.pid} did not die within {timeout_s:g} s")
    finally:
        os.close(pidfd)
    return True


# -- the scan's decision --------------------------------------------------------------------


class VmState(enum.StrEnum):
    """What ``list`` makes of one state dir."""

    RUNNING = "running"  # the recorded process lives
    UNRECORDED = "unrecorded"  # a process of this VM runs that the pid file does not name
    CREATING = "creating"  # no live process yet, but a create may be in flight
    GONE = "gone"  # nothing runs and nothing will: clean up after it


@dataclass(frozen=True, slots=True)
class Observed:
    """What the state dir and /proc say of one VM."""

    recorded: bool  # the pid file names a process
    alive: bool  # that very process (pid and start time) runs
    unrecorded: bool = False  # another process started for this state dir runs
    creating: bool = False  # this controller is creating it now
    young: bool = False  # its meta says it was made within the creating grace


def vm_state(seen: Observed) -> VmState:
    """The one decision of the scan. A dir without a pid record that is young may be a
    create of a controller that died, or of one still running: not gone yet."""
    if seen.recorded and seen.alive:
        return VmState.RUNNING
    if seen.unrecorded:
        return VmState.UNRECORDED
    if seen.creating or (not seen.recorded and seen.young):
        return VmState.CREATING
    return VmState.GONE


# -- create with abort ----------------------------------------------------------------------


class Creation:
    """One create in flight: the clean-up steps pushed as its steps succeed, run once, in
    reverse, if it fails (in a thread: they complete even while the task is cancelled)."""

    def __init__(self, vm_id: str, log_path: Path, heading: str, verb: str) -> None:
        self.vm_id = vm_id
        self.log_path = log_path
        self.heading = heading
        self.verb = verb
        self._steps: list[Callable[[], object]] = []

    def push(self, step: Callable[[], object]) -> None:
        self._steps.append(step)

    def _undo(self) -> None:
        steps, self._steps = self._steps, []
        errors: list[Exception] = []
        for step in reversed(steps):
            try:
                step()
            except Exception as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup(f"cleaning up after VM {self.vm_id}", errors)

    async def abort(self, exc: BaseException) -> BaseException:
        """Undo what was done; return the error to raise, with the log's useful part. With
        nothing to undo (it failed before it made anything), the error itself."""
        if not self._steps:
            return exc
        tail = log_excerpt(self.log_path)
        await asyncio.to_thread(self._undo)
        if not isinstance(exc, Exception):
            return exc  # cancellation and the like pass through unchanged
        reason = exc.message if isinstance(exc, RuntimeFailure) else repr(exc)
        return RuntimeFailure(
            f"VM {self.vm_id} did not {self.verb}: {reason}\n--- {self.heading} ---\n{tail}"
        )


# -- the base -------------------------------------------------------------------------------


class VmDirRuntime:
    """The shared part of a runtime whose VMs each keep ``{vms_dir}/{vm_id}/``."""

    name: str  # what the protocol and meta.json call it: "sandbox", "qemu"
    label: ClassVar[str]  # how its log lines name a VM: "sandbox", "qemu VM"
    vm_id_pattern: ClassVar[re.Pattern[str]] = VM_ID
    creating_grace_s: ClassVar[float] = 60.0
    missing_dir_is_empty: ClassVar[bool] = False  # a vms dir not made yet lists no VMs

    def __init__(self, vms_dir: Path) -> None:
        self.vms_dir = Path(vms_dir).absolute()
        self._creating: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._log = logging.getLogger(type(self).__module__)

    # -- paths ------------------------------------------------------------------------------

    def _state_dir(self, vm_id: str) -> Path:
        if not self.vm_id_pattern.fullmatch(vm_id):
            raise RuntimeFailure(f"not a valid VM id: {vm_id!r}", code="bad_vm_id")
        return self.vms_dir / vm_id

    def _existing(self, vm_id: str) -> Path:
        state_dir = self._state_dir(vm_id)
        if not state_dir.is_dir():
            raise RuntimeFailure(f"no VM {vm_id} in this runtime", code="vm_not_found")
        return state_dir

    # -- create -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _creating_vm(
        self, vm_id: str, log_path: Path, *, heading: str, verb: str = "boot"
    ) -> AsyncIterator[Creation]:
        """Mark ``vm_id`` as being created (``list`` must not take it for a dead VM's
        leftovers) and, if the body fails, run its clean-up and raise the boot error."""
        if vm_id in self._creating:
            raise RuntimeFailure(f"VM {vm_id} is being created", code="vm_exists")
        self._creating.add(vm_id)
        creation = Creation(vm_id, log_path, heading, verb)
        try:
            yield creation
        except BaseException as exc:
            error = await creation.abort(exc)
            if error is exc:
                raise
            raise error from exc
        finally:
            self._creating.discard(vm_id)

    # -- destroy ----------------------------------------------------------------------------

    async def destroy(self, vm_id: str) -> bool:
        try:
            state_dir = self._state_dir(vm_id)
        except RuntimeFailure:
            return False  # no such id can exist
        lock = self._locks.setdefault(vm_id, asyncio.Lock())
        async with lock:
            killed = await self._destroy_locked(vm_id, state_dir)
        self._locks.pop(vm_id, None)
        self._log.info("%s %s destroyed (was running: %s)", self.label, vm_id, killed)
        return killed

    async def _destroy_locked(self, vm_id: str, state_dir: Path) -> bool:
        """Stop the VM and remove its files, under its lock; whether it was running."""
        raise NotImplementedError

    # -- list -------------------------------------------------------------------------------

    def _scan(self, creating: frozenset[str]) -> builtins.list[RunningVm]:
        """Every state dir, decided by ``vm_state``; the gone are cleaned up after."""
        try:
            entries = sorted(os.scandir(self.vms_dir), key=lambda e: e.name)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and self.missing_dir_is_empty:
                return []
            raise RuntimeFailure(f"cannot read {self.vms_dir}: {exc.strerror}") from None
        found: builtins.list[RunningVm] = []
        for entry in entries:
            if not self.vm_id_pattern.fullmatch(entry.name):
                continue
            state_dir = self._entry_dir(entry)
            if state_dir is None:
                continue
            meta = read_meta(state_dir)
            record = read_pid(state_dir)
            alive = record is not None and is_alive(record)
            state = vm_state(
                Observed(
                    recorded=record is not None,
                    alive=alive,
                    unrecorded=not alive and self._runs_unrecorded(state_dir),
                    creating=entry.name in creating,
                    young=record is None and is_young(meta, self.creating_grace_s),
                )
            )
            if state is VmState.GONE:
                self._log.info("%s %s is gone; cleaning up after it", self.label, entry.name)
                with contextlib.suppress(OSError, RuntimeFailure):
                    self._remove_gone(entry.name, state_dir)
                continue
            if not self._keep(entry.name, state, state_dir):
                continue
            try:
                role = VmRole(str(meta.get("role")))
            except ValueError:
                role = VmRole.BROWSER  # unreadable meta: still report it, so it gets reaped
            detail = {
                "state": state.value,
                "created_at": str(meta.get("created_at", "")),
                "user_id": str(meta.get("user_id", "")),
                **self._detail(meta),
            }
            pid = record.pid if record is not None and state is VmState.RUNNING else None
            found.append(RunningVm(entry.name, role, pid, state_dir, detail))
        return found

    def _entry_dir(self, entry: os.DirEntry[str]) -> Path | None:
        """The state dir an entry of ``vms_dir`` is, or None to pass it over."""
        return Path(entry.path) if entry.is_dir(follow_symlinks=False) else None

    def _remove_gone(self, vm_id: str, state_dir: Path) -> None:
        """Clean up after a VM that is gone (its dir, and whatever else it had)."""
        raise NotImplementedError

    def _runs_unrecorded(self, state_dir: Path) -> bool:
        """Whether a process of this VM runs that its pid file does not name."""
        return False

    def _keep(self, vm_id: str, state: VmState, state_dir: Path) -> bool:
        """Whether to report a VM the scan found; a gone one is never reported, and
        an override may remove others (e.g. stale templates) and say False."""
        return True

    def _detail(self, meta: dict[str, Any]) -> dict[str, str]:
        return {}

    # -- streams ----------------------------------------------------------------------------

    async def agent_client(self, vm_id: str) -> AgentClient:
        """A connected, authenticated ``AgentClient`` (``open_agent`` returns its stream)."""
        state_dir = self._existing(vm_id)
        try:
            secret = (state_dir / "agent.secret").read_text().strip()
            return await self._connect_agent(state_dir, secret)
        except OSError as exc:  # TimeoutError is one
            raise RuntimeFailure(f"cannot reach the agent of {vm_id}: {exc}") from None

    async def open_agent(self, vm_id: str) -> Stream:
        return (await self.agent_client(vm_id)).stream

    async def open_vnc(self, vm_id: str) -> Stream:
        state_dir = self._existing(vm_id)
        try:
            return await self._connect_vnc(state_dir)
        except OSError as exc:
            raise RuntimeFailure(f"cannot reach the VNC server of {vm_id}: {exc}") from None

    async def _connect_agent(
        self, state_dir: Path, secret: str, timeout_s: float = 10
    ) -> AgentClient:
        raise NotImplementedError

    async def _connect_vnc(self, state_dir: Path) -> Stream:
        raise NotImplementedError
