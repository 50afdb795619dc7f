"""What the agent owns: its background tasks and its child processes, so that shutting down
ends all of them. Standard library only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from airlock.agent.oparg import OpError

log = logging.getLogger("airlock.agent")


class Owner:
    """Every background task is named and kept; every child is killed at the end."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.children: set[asyncio.subprocess.Process] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task %s failed: %r", task.get_name(), exc)

    def adopt_current_task(self, name: str) -> asyncio.Task[Any] | None:
        """Connection handlers are created by asyncio's servers; own them too."""
        task = asyncio.current_task()
        if task is not None:
            task.set_name(name)
            self.tasks.add(task)
        return task

    def release(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self.tasks.discard(task)

    async def cancel_all(self) -> None:
        """Cancel every task but the caller's, then kill every child."""
        current = asyncio.current_task()
        tasks = [t for t in self.tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proc in list(self.children):
            await self.kill(proc)

    async def kill(self, proc: asyncio.subprocess.Process) -> None:
        """SIGKILL the process group we started it in, then reap. Not ``proc.kill()``: it polls,
        and so may reap the child behind asyncio's child watcher (which then reports 255)."""
        if proc.returncode is None:
            for kill, target in ((os.killpg, proc.pid), (os.kill, proc.pid)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(target, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        self.children.discard(proc)


async def exited(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """Whether the process itself exits within ``timeout``. Not ``Process.wait()``: that also
    waits for its pipes, which a child it left in the background may hold open."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return True  # gone and reaped already
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_reader(pidfd, done.set)
    try:
        await asyncio.wait_for(done.wait(), timeout)
        return True
    except TimeoutError:
        return proc.returncode is not None
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def spawn_piped(
    argv: list[str], *, env: dict[str, str], cwd: Path, **options: Any
) -> asyncio.subprocess.Process:
    """Start a ``run`` op's program, its output piped back and no input; OpError
    ``spawn_failed`` when it cannot start."""
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=cwd,
            **options,
        )
    except OSError as exc:
        raise OpError("spawn_failed", f"cannot start {argv[0]}: {exc.strerror}") from None
