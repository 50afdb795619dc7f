"""The pure core: state machines, the deadline policy and the reconcile decision.

Nothing here does I/O, awaits, or reads a clock: time is an argument. Everything that
decides *what* should happen to a session or a VM lives here; ``services/`` makes it happen.
"""

from __future__ import annotations


class IllegalTransition(ValueError):
    """A state machine was asked for a move its transition table does not allow."""

    def __init__(self, machine: str, current: str, target: str) -> None:
        super().__init__(f"{machine}: {current} -> {target} is not allowed")
        self.machine = machine
        self.current = current
        self.target = target
