"""One egress proxy per live browser VM, listening on a Unix socket in the VM's state dir,
and what the proxies decided, made visible.

The socket lives inside the directory the runtime binds into the VM, so a restarted
controller can bind a fresh socket at the same path and the running VM sees it.

Every decision of a proxy comes here (``_observe``, on the proxy's loop, no I/O). Denials
are counted per session and host in memory and written every ``flush_interval`` (and at
once for a host seen for the first time): one ``egress_hosts`` row per host with its count,
and one timeline event (``egress``/``denied``) the first time a host is denied, so a page
that loads a blocked script a thousand times makes one entry, not a thousand. The
Prometheus counter is by provider and registrable domain, at most ``MAX_METRIC_HOSTS``
distinct domains per provider (then ``other``), so a page cannot grow the label set.
The browser's own background noise (``KNOWN_NOISE``) is counted, but makes no timeline
event and no notice for the person. In learn mode allowed hosts are recorded too, for
``airlock egress suggest``.

A CLI VM gets a proxy too (``start_cli``): the vendor CLIs and the ``oauth2`` refresher in
it refresh their logins at the providers' token endpoints, and reach the vendors' APIs,
through it. Its policy (``cli_vm_policy``) is every provider's own rules and required
endpoints (no SSO bundles: nobody signs in there); its denials count in the metric and
the log, under the provider name ``cli``, not on any session's timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from airlock.aio import TaskOwner
from airlock.clock import Clock
from airlock.domain.egress_policy import (
    Decision,
    EgressPolicy,
    HostRule,
    Verdict,
    registrable_domain,
    render_items,
)
from airlock.egress import EgressProxy
from airlock.metrics import Metrics
from airlock.services.bus import SessionBus
from airlock.store.db import Database
from airlock.store.tables import EgressHost

log = logging.getLogger("airlock.egress")

MAX_METRIC_HOSTS = 50  # distinct registrable domains per provider in the metric's labels
CLI_POLICY = "cli"  # the provider name a CLI VM's policy and metrics carry
MAX_HOSTS_PER_SESSION = 500  # distinct hosts counted per session; more go to "(other)"
_VISIBLE = (Decision.DENIED,)  # what the person is told about (noise is not)


@dataclass(slots=True)
class _Tally:
    count: int
    first_at: datetime
    last_at: datetime


@dataclass(slots=True)
class _Vm:
    proxy: EgressProxy
    session_id: str
    provider: str


def cli_vm_policy(policies: Mapping[str, EgressPolicy]) -> EgressPolicy:
    """What a CLI VM may reach: each provider's rules, required endpoints and targets (the
    operator's overrides included), without SSO bundles; learn mode does not carry over."""
    allow: dict[HostRule, None] = {}
    deny: dict[HostRule, None] = {}
    targets: dict[HostRule, tuple[str, int]] = {}
    for policy in policies.values():
        allow.update(dict.fromkeys((*policy.required, *policy.allow)))
        deny.update(dict.fromkeys(policy.deny))
        targets.update(policy.targets)
    return EgressPolicy(
        CLI_POLICY, allow=tuple(allow), deny=tuple(deny), targets=tuple(targets.items())
    )


class EgressManager:
    def __init__(
        self,
        *,
        policies: Mapping[str, EgressPolicy] | None = None,
        db: Database | None = None,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        bus: SessionBus | None = None,
        flush_interval: float = 2.0,
    ) -> None:
        self.policies = dict(policies or {})
        self.cli_policy = cli_vm_policy(self.policies)
        self._db = db
        self._clock = clock or Clock()
        self._metrics = metrics
        self._bus = bus
        self._flush_interval = flush_interval
        self._proxies: dict[str, _Vm] = {}
        # (session, provider, host, port, decision) -> counted since the last flush
        self._pending: dict[tuple[str, str, str, int, str], _Tally] = {}
        self._seen: dict[str, set[tuple[str, int, str]]] = {}  # per session, this process
        self._metric_hosts: dict[str, set[str]] = {}
        self._wake = asyncio.Event()
        # One flush at a time: two would both insert a new host's row (the loop's and a
        # reader's), and the second would break the unique index on PostgreSQL.
        self._flush_lock = asyncio.Lock()
        self._tasks = TaskOwner("egress")
        self._flusher: asyncio.Task[None] | None = None
        for policy in self.policies.values():
            if policy.learn:
                log.warning(
                    "egress LEARN MODE is on for %s: its browser VMs may reach ANY host name "
                    "(recorded; see `airlock egress suggest %s`)",
                    policy.provider,
                    policy.provider,
                    extra={"egress": "learn", "provider": policy.provider},
                )

    def policy(self, provider_id: str) -> EgressPolicy:
        policy = self.policies.get(provider_id)
        if policy is None:
            raise KeyError(f"no egress policy for provider {provider_id!r}")
        return policy

    async def start(
        self, vm_id: str, socket_path: Path, provider_id: str, *, session_id: str
    ) -> None:
        await self.stop(vm_id)
        policy = self.policy(provider_id)
        if policy.learn:
            log.warning(
                "egress LEARN MODE for session %s (%s): any host name is allowed and recorded",
                session_id,
                provider_id,
                extra={"session_id": session_id, "vm_id": vm_id, "egress": "learn"},
            )

        def observe(verdict: Verdict) -> None:
            self._observe(session_id, policy, verdict)

        proxy = EgressProxy(policy, vm_id=vm_id, observer=observe)
        await proxy.serve(socket_path)
        self._proxies[vm_id] = _Vm(proxy, session_id, provider_id)
        if self._db is not None and self._flusher is None and not self._tasks.closed:
            self._flusher = self._tasks.spawn(self._flush_loop(), name="egress-flush")

    async def start_cli(self, vm_id: str, socket_path: Path) -> None:
        """The proxy of a CLI VM (``cli_policy``); its decisions are not a session's."""
        await self.stop(vm_id)
        if not socket_path.parent.is_dir():  # a runtime without state dirs on this host
            log.warning("CLI VM %s has no state dir here: no egress proxy", vm_id)
            return
        policy = self.cli_policy

        def observe(verdict: Verdict) -> None:
            self._observe("", policy, verdict)

        proxy = EgressProxy(policy, vm_id=vm_id, observer=observe)
        await proxy.serve(socket_path)
        self._proxies[vm_id] = _Vm(proxy, "", CLI_POLICY)

    async def stop(self, vm_id: str) -> None:
        vm = self._proxies.pop(vm_id, None)
        if vm is not None:
            await vm.proxy.close()
            await self.flush()
            if not any(v.session_id == vm.session_id for v in self._proxies.values()):
                self._seen.pop(vm.session_id, None)

    def __contains__(self, vm_id: str) -> bool:
        return vm_id in self._proxies

    async def close(self) -> None:
        for vm_id in list(self._proxies):
            await self.stop(vm_id)
        await self._tasks.close()
        await self.flush()

    # --- what the proxies decided ------------------------------------------------------

    def _observe(self, session_id: str, policy: EgressPolicy, verdict: Verdict) -> None:
        record = verdict.decision is not Decision.ALLOWED or policy.learn
        if self._metrics is not None and verdict.decision is not Decision.ALLOWED:
            self._metrics.egress_denials.labels(
                policy.provider, verdict.decision.value, self._metric_host(policy, verdict)
            ).inc()
        if not record or self._db is None or not session_id:
            return
        seen = self._seen.setdefault(session_id, set())
        host = verdict.host
        if (host, verdict.port, verdict.decision.value) not in seen:
            if len(seen) >= MAX_HOSTS_PER_SESSION:
                host = "(other)"
            else:
                self._wake.set()  # a new host: write it (and its event) now, not later
            seen.add((host, verdict.port, verdict.decision.value))
        now = self._clock.now()
        key = (session_id, policy.provider, host, verdict.port, verdict.decision.value)
        tally = self._pending.get(key)
        if tally is None:
            self._pending[key] = _Tally(1, now, now)
        else:
            tally.count += 1
            tally.last_at = now

    def _metric_host(self, policy: EgressPolicy, verdict: Verdict) -> str:
        domain = registrable_domain(verdict.host) if verdict.reason != "an IP address" else "ip"
        known = self._metric_hosts.setdefault(policy.provider, set())
        if domain in known:
            return domain
        if len(known) >= MAX_METRIC_HOSTS:
            return "other"
        known.add(domain)
        return domain

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with self._clock.timeout(self._flush_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # the database may be away for a moment: keep counting
                log.exception("could not write egress counts; retrying")
                await asyncio.sleep(self._flush_interval)

    async def flush(self) -> None:
        """Write what was counted since the last flush; a new denied host gets its event."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending or self._db is None:
            return
        pending, self._pending = self._pending, {}
        sessions: set[str] = set()
        try:
            async with self._db.transaction() as repo:
                for (session_id, provider, host, port, decision), tally in pending.items():
                    new = await repo.add_egress_count(
                        session_id=session_id,
                        provider=provider,
                        host=host,
                        port=port,
                        decision=decision,
                        count=tally.count,
                        first_at=tally.first_at,
                        last_at=tally.last_at,
                    )
                    if new and decision in (Decision.DENIED, Decision.LEARNED):
                        repo.add_event(
                            at=tally.first_at,
                            kind="egress",
                            subject_id=session_id,
                            session_id=session_id,
                            cause=decision,
                            actor="egress",
                            detail={"host": host, "port": port, "provider": provider},
                        )
                    if new and decision == Decision.DENIED:
                        sessions.add(session_id)
                        log.warning(
                            "session %s: the egress policy denied %s:%d (%s)",
                            session_id,
                            host,
                            port,
                            provider,
                            extra={"session_id": session_id, "egress_dest": f"{host}:{port}"},
                        )
        except BaseException:
            for key, tally in pending.items():  # put them back: counted, not yet written
                merged = self._pending.setdefault(key, _Tally(0, tally.first_at, tally.last_at))
                merged.count += tally.count
                merged.first_at = min(merged.first_at, tally.first_at)
            raise
        if self._bus is not None and sessions:
            await self._bus.publish(*sessions)

    async def hosts(self, session_id: str) -> list[EgressHost]:
        """The session's counted hosts, after writing what is pending."""
        await self.flush()
        if self._db is None:
            return []
        async with self._db.read() as repo:
            return await repo.egress_hosts(session_id)

    async def blocked(self, session_id: str) -> tuple[int, list[str]]:
        """What the person's page was denied: connections and host names (no noise)."""
        rows = [r for r in await self.hosts(session_id) if r.decision in _VISIBLE]
        return sum(r.count for r in rows), [r.host for r in rows]


async def suggest(db: Database, policy: EgressPolicy) -> str:
    """A ready policy for ``policy.provider`` from what its learn-mode sessions reached:
    the settings line for ``AIRLOCK_EGRESS_<PROVIDER>_POLICY`` and a comment of evidence."""
    async with db.read() as repo:
        observed = await repo.egress_observed(
            policy.provider, [Decision.ALLOWED.value, Decision.LEARNED.value]
        )
    required = set(policy.required)
    hosts = [
        (host, port)
        for host, port, _, _, _ in observed
        if host != "(other)" and not any(r.matches(host, port) for r in required)
    ]
    name = f"AIRLOCK_EGRESS_{policy.provider.upper()}_POLICY"
    if not observed:
        return (
            f"# no learn-mode observations for {policy.provider} yet: set "
            f"AIRLOCK_EGRESS_{policy.provider.upper()}_LEARN=true and log in once\n"
        )
    sessions = max(n for _, _, n, _, _ in observed)
    first = min(a for _, _, _, a, _ in observed)
    last = max(b for _, _, _, _, b in observed)
    lines = [
        f"# {policy.provider}: {len(hosts)} host(s) seen in learn mode "
        f"(up to {sessions} session(s) each, {first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M} UTC)",
    ]
    lines += [f"#   {h}:{p}  sessions={n}" for h, p, n, _, _ in observed if (h, p) in hosts]
    if policy.required:
        lines.append("# always allowed: " + ", ".join(str(r) for r in policy.required))
    if any(h == "(other)" for h, *_ in observed):
        lines.append(f"# more hosts than {MAX_HOSTS_PER_SESSION} per session were seen: not listed")
    lines.append(f"{name}={render_items(hosts)}")
    return "\n".join(lines) + "\n"
