"""The browser VM's lease: how long a VM lives on without a controller.

A browser VM ends itself when its lease (plus a margin) runs out and no controller renewed
it, so a controller that never comes back leaks nothing. The controller grants the lease at
boot and renews it on every pass; the row records the moment after which the VM may have
ended itself, always a little *before* the VM's own moment (it is timed from before the
controller asked, and recorded only once the VM has the lease), so a VM that ended itself
is never mistaken for one that vanished (``reconcile.decide``). CLI VMs have no lease.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


def _ms(delta: timedelta) -> int:
    return int(delta.total_seconds() * 1000)


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    length: timedelta  # what each renewal grants
    margin: timedelta  # slack past the lease before the VM ends itself
    boot: timedelta  # how long a boot may take: the boot lease covers it on top

    def __post_init__(self) -> None:
        if self.length <= timedelta(0) or self.margin < timedelta(0) or self.boot < timedelta(0):
            raise ValueError("a lease needs a positive length and non-negative margin and boot")

    @property
    def boot_lease_ms(self) -> int:
        """The boot lease (from the agent's start): the boot time plus one lease."""
        return _ms(self.boot + self.length)

    @property
    def length_ms(self) -> int:
        return _ms(self.length)

    @property
    def margin_ms(self) -> int:
        return _ms(self.margin)

    def boot_until(self, created_at: datetime) -> datetime:
        """What the row records when the VM is created (its agent starts later)."""
        return created_at + self.boot + self.length + self.margin

    def renewed_until(self, asked_at: datetime) -> datetime:
        """What the row records once the VM confirmed a renewal asked for at ``asked_at``."""
        return asked_at + self.length + self.margin

    @property
    def renew_every(self) -> timedelta:
        """How often to renew: three tries within one lease, so one slow pass costs nothing."""
        return self.length / 3
