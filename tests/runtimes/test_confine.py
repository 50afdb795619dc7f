"""The seccomp filter's syscall numbers are the kernel's (a wrong one once denied
epoll_wait instead of epoll_wait_old)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from airlock.runtimes import confine

HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


@pytest.mark.skipif(not HEADER.is_file(), reason="no kernel headers (linux-libc-dev)")
def test_denied_syscall_numbers_match_the_kernel_headers() -> None:
    numbers = dict(re.findall(r"#define __NR_(\w+) (\d+)", HEADER.read_text()))
    known = {name: nr for name, nr in confine.DENIED_SYSCALLS.items() if name in numbers}
    assert {name: int(numbers[name]) for name in known} == known
    # Calls newer than these headers are checked by number only: above the last one here.
    newest = max(int(n) for n in numbers.values())
    assert all(nr > newest for name, nr in confine.DENIED_SYSCALLS.items() if name not in known)
    for name, nr in (("ioctl", confine.NR_IOCTL), ("clone", confine.NR_CLONE)):
        assert int(numbers[name]) == nr
    assert int(numbers["clone3"]) == confine.NR_CLONE3
    assert int(numbers["personality"]) == confine.NR_PERSONALITY


def test_the_filter_is_whole_instructions_and_fits_the_kernels_limit() -> None:
    program = confine.seccomp_program()
    assert len(program) % 8 == 0 and 0 < len(program) // 8 <= 4096  # BPF_MAXINSNS
