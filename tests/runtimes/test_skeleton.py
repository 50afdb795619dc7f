"""The runtimes' shared skeleton: the scan's decision, create-with-abort, private files."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from airlock.errors import RuntimeFailure
from airlock.runtimes.skeleton import (
    Creation,
    Observed,
    VmState,
    kill,
    record_pid,
    vm_state,
    write_private,
)
from airlock.runtimes.vmdir import PidRecord, is_alive, read_pid


@pytest.mark.parametrize(
    ("seen", "state"),
    [
        (Observed(recorded=True, alive=True), VmState.RUNNING),
        # A live recorded process wins over everything else the dir says.
        (Observed(True, True, unrecorded=True, creating=True, young=True), VmState.RUNNING),
        (Observed(recorded=True, alive=False, unrecorded=True), VmState.UNRECORDED),
        (Observed(recorded=False, alive=False, unrecorded=True), VmState.UNRECORDED),
        (Observed(recorded=False, alive=False, unrecorded=True, creating=True), VmState.UNRECORDED),
        (Observed(recorded=True, alive=False, creating=True), VmState.CREATING),
        (Observed(recorded=False, alive=False, young=True), VmState.CREATING),
        # A recorded process that died is gone, however young the VM.
        (Observed(recorded=True, alive=False, young=True), VmState.GONE),
        (Observed(recorded=False, alive=False), VmState.GONE),
        (Observed(recorded=True, alive=False), VmState.GONE),
    ],
)
def test_the_scan_decides_from_what_it_sees(seen: Observed, state: VmState) -> None:
    assert vm_state(seen) is state


def test_every_observation_has_exactly_the_documented_decision() -> None:
    """All 32 combinations, against the rule written out once more in words."""
    for recorded, alive, unrecorded, creating, young in itertools.product([False, True], repeat=5):
        seen = Observed(recorded, alive, unrecorded, creating, young)
        if recorded and alive:
            expected = VmState.RUNNING
        elif unrecorded:
            expected = VmState.UNRECORDED
        elif creating or (young and not recorded):
            expected = VmState.CREATING
        else:
            expected = VmState.GONE
        assert vm_state(seen) is expected, seen


async def test_a_failed_create_undoes_its_steps_once_in_reverse(tmp_path: Path) -> None:
    (tmp_path / "agent.log").write_text("boot 1\nkernel panic\n")
    done: list[str] = []
    creation = Creation("vm1", tmp_path / "agent.log", "agent.log", "boot")
    creation.push(lambda: done.append("dir"))
    creation.push(lambda: done.append("process"))
    error = await creation.abort(ValueError("boom"))
    assert done == ["process", "dir"]
    assert isinstance(error, RuntimeFailure)
    assert error.message.startswith("VM vm1 did not boot: ValueError('boom')\n--- agent.log ---\n")
    assert "kernel panic" in error.message
    again = ValueError("again")  # run once: a second abort has nothing left to undo
    assert await creation.abort(again) is again and done == ["process", "dir"]


async def test_cancellation_passes_through_the_abort_unchanged(tmp_path: Path) -> None:
    done: list[str] = []
    creation = Creation("vm1", tmp_path / "none.log", "log", "start")
    creation.push(lambda: done.append("teardown"))
    cancelled = asyncio.CancelledError()
    assert await creation.abort(cancelled) is cancelled
    assert done == ["teardown"]


async def test_a_create_that_made_nothing_raises_its_own_error(tmp_path: Path) -> None:
    exists = RuntimeFailure("VM vm1 already exists", code="vm_exists")
    assert await Creation("vm1", tmp_path / "x.log", "log", "boot").abort(exists) is exists


async def test_clean_up_errors_are_joined_and_every_step_still_runs(tmp_path: Path) -> None:
    done: list[str] = []

    def fails(what: str) -> None:
        done.append(what)
        raise OSError(what)

    creation = Creation("vm1", tmp_path / "x.log", "log", "boot")
    creation.push(lambda: fails("first"))
    creation.push(lambda: done.append("middle"))
    creation.push(lambda: fails("last"))
    with pytest.raises(ExceptionGroup) as raised:
        await creation.abort(ValueError("boom"))
    assert done == ["last", "middle", "first"]
    assert [str(e) for e in raised.value.exceptions] == ["last", "first"]


def test_private_files_are_0600_and_never_clobbered(tmp_path: Path) -> None:
    path = tmp_path / "agent.secret"
    write_private(path, b"one\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"one\n"
    with pytest.raises(FileExistsError):
        write_private(path, b"two\n")
    inode = path.stat().st_ino
    write_private(path, b"two\n", replace=True)
    assert path.read_bytes() == b"two\n" and path.stat().st_ino != inode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.secret"]


def test_a_pid_record_names_one_process_and_kill_ends_it(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "pid").write_bytes(b"")
        inode = (tmp_path / "pid").stat().st_ino
        record = record_pid(tmp_path / "pid", proc.pid, in_place=True)
        assert (tmp_path / "pid").stat().st_ino == inode  # the same file, rewritten
        assert read_pid(tmp_path) == record and is_alive(record)
        assert not kill(PidRecord(proc.pid, record.start_time + 1))  # a reused pid: not it
        assert proc.poll() is None
        assert kill(record) is True
        assert proc.wait(timeout=10) == -9
        assert not kill(record)
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(RuntimeFailure, match="exited at once"):
        record_pid(tmp_path / "mux.pid", proc.pid)
    assert not os.path.exists(tmp_path / "mux.pid")
