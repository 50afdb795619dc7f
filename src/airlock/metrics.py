"""The lifecycle's metrics (lifecycle.md, "Metrics the lifecycle must expose").

One ``Metrics`` per controller, on its own registry, so tests can run many controllers in
one process and read each one's numbers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60)
_LAG = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LIFETIME = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 86400)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.vm_lifetime = Histogram(
            "airlock_vm_lifetime_seconds",
            "VM creation to destroy.",
            ["role", "runtime"],
            buckets=_LIFETIME,
            registry=r,
        )
        self.vm_boot = Histogram(
            "airlock_vm_boot_seconds",
            "VM create call to agent answering.",
            ["role", "runtime", "start"],
            buckets=_LATENCY,
            registry=r,
        )
        self.session_ready = Histogram(
            "airlock_session_ready_seconds",
            "Session start to awaiting_user.",
            buckets=_LATENCY,
            registry=r,
        )
        self.completion_to_handoff = Histogram(
            "airlock_completion_to_handoff_seconds",
            "Session completed to result seen by the frontend or injected.",
            buckets=_LATENCY,
            registry=r,
        )
        self.destroy_lag = Histogram(
            "airlock_destroy_lag_seconds",
            "Actual destroy minus destroy_after.",
            buckets=_LAG,
            registry=r,
        )
        self.premature_destructions = Counter(
            "airlock_premature_vm_destructions",
            "VMs that vanished while they should live.",
            registry=r,
        )
        self.orphans_reaped = Counter(
            "airlock_orphan_vms_reaped",
            "VMs running without a live row, destroyed.",
            registry=r,
        )
        self.sessions = Counter(
            "airlock_sessions",
            "Sessions that reached a terminal status.",
            ["status"],
            registry=r,
        )
        self.vms = Gauge("airlock_vms", "VMs by role and state.", ["role", "state"], registry=r)
        self.credentials = Gauge(
            "airlock_credentials",
            "Logins (not superseded) by provider and health state: active, expiring, expired, "
            "revoked, needs_login.",
            ["provider", "state"],
            registry=r,
        )
        self.destroys = Counter(
            "airlock_vm_destroys",
            "Destroys performed (one per VM).",
            ["role", "reason"],
            registry=r,
        )
        self.destroy_failures = Counter(
            "airlock_vm_destroy_failures", "Runtime destroy calls that failed.", registry=r
        )
        self.reconcile_failures = Counter(
            "airlock_reconcile_skipped",
            "Reconcile rounds skipped because the runtime could not be listed.",
            registry=r,
        )
        self.lease_renewal_failures = Counter(
            "airlock_vm_lease_renewal_failures",
            "Browser VM lease renewals the VM did not confirm (it keeps its last lease).",
            registry=r,
        )

        self.egress_denials = Counter(
            "airlock_egress_denials",
            "Egress connections outside the policy, by provider, kind (denied, noise: the "
            "browser's own background traffic, learned: let through by learn mode) and "
            "registrable domain (at most 50 per provider, then 'other').",
            ["provider", "kind", "domain"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
