"""Host-side helpers every runtime shares: a VM's state dir, its pid record, its sockets.

Each runtime keeps ``{vms_dir}/{vm_id}/`` with ``meta.json`` and a ``pid`` file holding the
host pid *and* its start time (``/proc/PID/stat`` field 22), so a restarted controller finds
what it started and never mistakes a reused pid for its VM. Runtimes may not import each
other; they share this module and ``skeleton`` (the part of a runtime that is not its I/O).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The runtimes' Unix-socket helpers are the guest's (standard library), re-exported here.
from airlock.agent.streams import UNIX_PATH_MAX as UNIX_PATH_MAX
from airlock.agent.streams import Stream as Stream
from airlock.agent.streams import open_unix as open_unix
from airlock.agent.streams import unix_path as unix_path


@dataclass(frozen=True, slots=True)
class PidRecord:
    """A host pid and its start time in clock ticks: together, one process for sure."""

    pid: int
    start_time: int


def read_small(path: str | Path) -> bytes:
    """A small file's bytes, with plain ``os`` calls: a scan of 1,000 VMs reads three files
    each, and ``Path.read_bytes`` costs four times as much CPU (12 us against 3 us)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, or None if there is none."""
    try:
        raw = read_small(f"/proc/{pid}/stat")
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()  # the command may contain spaces and ")"
    try:
        return fields[0].decode(), int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


def is_alive(record: PidRecord) -> bool:
    found = proc_stat(record.pid)
    return found is not None and found[1] == record.start_time and found[0] not in ("Z", "X")


def read_pid(state_dir: Path, name: str = "pid") -> PidRecord | None:
    """The record in ``state_dir/name``; None if there is none (or not a whole one)."""
    try:
        pid, start = read_small(state_dir / name).split()
        return PidRecord(int(pid), int(start))
    except (OSError, ValueError):
        return None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; {} if it is missing, unreadable or not an object."""
    try:
        value = json.loads(read_small(path))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_meta(state_dir: Path) -> dict[str, Any]:
    return read_json(state_dir / "meta.json")


def is_young(meta: dict[str, Any], grace_s: float) -> bool:
    """Whether the VM was created less than ``grace_s`` ago: a state dir without a live pid
    that young may be a create still in flight, not a dead VM."""
    try:
        created = datetime.fromisoformat(str(meta["created_at"]))
    except (KeyError, ValueError):
        return False
    return (datetime.now(UTC) - created).total_seconds() < grace_s


# CPU weights: the nice value of a VM's scheduling group. The controller runs at 0, so its
# deadlines come first. A VM being killed goes ahead of everything: its processes' exit
# (Chromium's unmapping) is short, bounded work that the destroy's deadline waits on
# (200 sessions ten at a time: destroy lag p50 196 -> 144 ms, p99 529 -> 465 ms vs 0).
VM_NICE = 10
DYING_VM_NICE = -10


def set_cpu_nice(pid: int, nice: int) -> bool:
    """Set the CPU weight of a VM: every process of ``pid``'s session.

    Why: a browser VM's Chromium costs about 0.8 core-seconds to start and render. At equal
    weight, ten VMs busy at once starve the controller, and VMs are destroyed late (measured
    on two cores, 40 sessions ten at a time: destroy lag p99 2.5 s with VMs at nice 0,
    0.7 s at nice 10). Every VM still gets all the CPU the controller does not want.

    With the kernel's autogroup scheduling (Debian's default) each session is one scheduling
    group and a process's own nice counts only inside it, so the group's nice
    (``/proc/PID/autogroup``) is set; without autogroup, each process's nice. Raising a
    priority again needs CAP_SYS_NICE. Best effort: False when it could not be set.
    """
    try:
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
        return True
    except OSError:
        pass
    try:
        sid = os.getsid(pid)
    except OSError:
        return False
    done = False
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    os.setpriority(os.PRIO_PROCESS, int(name), nice)
                    done = True
            except OSError:
                continue
    return done


# What a failed boot keeps of a VM's log. A guest that logs one error hundreds of times a
# second leaves megabytes of the same lines, and the last few thousand bytes of such a log
# are copies of the same traceback; the first copy, and what came before it, say why.
EXCERPT_HEAD_BYTES = 64 * 1024
EXCERPT_TAIL_BYTES = 16 * 1024
EXCERPT_MAX_CHARS = 4000
# A leading timestamp (the kernel's ``[    1.234567]``, logging's ``2026-12-01 10:00:00,123``)
# and hex addresses: what differs between copies of one message.
_STAMP = re.compile(r"^\s*(\[\s*\d+\.\d+\]|\d{4}-\d\d-\d\d[ T][\d:.,]+)\s*")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def log_excerpt(path: Path, *, max_chars: int = EXCERPT_MAX_CHARS) -> str:
    """The useful part of a VM's log: its start and its end, each distinct line once (in
    the order it first appeared) with ``[xN]`` where it repeats; lines that differ only in
    a leading timestamp or in addresses count as the same. At most ``max_chars``: its start
    and its end, when even that is too long."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            head = f.read(EXCERPT_HEAD_BYTES)
            tail = b""
            if size > EXCERPT_HEAD_BYTES:
                f.seek(max(EXCERPT_HEAD_BYTES, size - EXCERPT_TAIL_BYTES))
                tail = f.read()
    except OSError:
        return f"(no {path.name})"
    lines = head.decode("utf-8", "replace").splitlines()
    if size > len(head) and lines:
        lines.pop()  # cut in the middle
    skipped = size - len(head) - len(tail)
    if tail:
        tail_lines = tail.decode("utf-8", "replace").splitlines()
        if skipped > 0:
            tail_lines = tail_lines[1:]  # the first is cut in the middle
            lines.append(f"... {skipped} bytes not shown ...")
        lines += tail_lines
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for line in lines:
        shape = _ADDRESS.sub("0x#", _STAMP.sub("", line)).strip()
        if not shape:
            continue
        counts[shape] = counts.get(shape, 0) + 1
        first.setdefault(shape, line.rstrip())
    text = "\n".join(
        first[shape] + (f"  [x{counts[shape]}]" if counts[shape] > 1 else "") for shape in first
    )
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]}\n...\n{text[-half:]}"
