"""Auth sessions as the API sees them: start, read, keepalive, complete, cancel, and
recovery after a controller restart.

How a login starts is decided in ``domain.sessions.start_paths`` (a warm VM, or a cold
boot, or the quota's refusal); what happens on the VM afterwards (boot, login, capture
watch, failure) is ``session_login.LoginRunner``'s. Every deadline comes from
``domain.deadlines.DeadlinePolicy`` and is written to the VM row; nothing here sleeps until
one (the scheduler does).
"""

from __future__ import annotations

import builtins
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from airlock.aio import TaskOwner
from airlock.clock import Clock
from airlock.domain.deadlines import DeadlinePolicy
from airlock.domain.leases import LeasePolicy
from airlock.domain.quotas import Limits, Scope, StartKind
from airlock.domain.sessions import LIVE as LIVE_SESSIONS
from airlock.domain.sessions import FailureReason, SessionStatus, StartPath, start_paths
from airlock.domain.vms import DestroyReason, VmRole, VmState
from airlock.errors import Conflict, Forbidden, InvalidInput, NotFound, Unavailable
from airlock.metrics import Metrics
from airlock.providers.base import Provider
from airlock.runtimes.base import Runtime
from airlock.services import grant_records, quotas, records
from airlock.services.bus import SessionBus
from airlock.services.egress import EgressManager
from airlock.services.leases import browser_spec
from airlock.services.placement import Placement, no_host
from airlock.services.scheduler import Scheduler
from airlock.services.session_login import LoginRunner, short_error
from airlock.services.vm_boot import BootFailed, VmBooter, add_vm, new_vm
from airlock.services.warm_pool import WarmPool
from airlock.store.db import Database
from airlock.store.repo import Repo
from airlock.store.tables import AuthSession, Credential, Event, Vm
from airlock.vault import Sealed, Vault

log = logging.getLogger("airlock.sessions")

_ID_ALPHABET = set("0123456789abcdef")


def new_session_id() -> str:
    return secrets.token_hex(16)


def check_session_id(session_id: str) -> str:
    if len(session_id) != 32 or not set(session_id) <= _ID_ALPHABET:
        raise InvalidInput(f"malformed session id {session_id[:40]!r}", code="invalid_id")
    return session_id


class SessionService:
    def __init__(
        self,
        *,
        db: Database,
        runtime: Runtime,
        clock: Clock,
        policy: DeadlinePolicy,
        providers: dict[str, Provider],
        vault: Vault,
        metrics: Metrics,
        bus: SessionBus,
        egress: EgressManager,
        scheduler: Scheduler,
        tasks: TaskOwner,
        boot_timeout: float,
        limits: Limits,
        warm_pool: WarmPool | None = None,
        lease: LeasePolicy | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.clock = clock
        self.policy = policy
        self.providers = providers
        self.vault = vault
        self.metrics = metrics
        self.bus = bus
        self.egress = egress
        self.scheduler = scheduler
        self.tasks = tasks
        self.limits = limits
        self.warm_pool = warm_pool
        self.lease = lease  # the browser VM's own deadline (domain.leases); None: no lease
        self.placement = placement
        # Set by Core: wake the boot queue of the node a VM was placed on.
        self.poke: Callable[[str], Awaitable[None]] | None = None
        boots = VmBooter(
            db=db, runtime=runtime, clock=clock, metrics=metrics, boot_timeout=boot_timeout
        )
        self.login = LoginRunner(
            db=db,
            runtime=runtime,
            clock=clock,
            policy=policy,
            vault=vault,
            metrics=metrics,
            bus=bus,
            egress=egress,
            scheduler=scheduler,
            tasks=tasks,
            boots=boots,
            lease=lease,
        )

    @property
    def after_capture(self) -> Callable[[str], Awaitable[None]] | None:
        """Set by Core: the handoff into the session's CLI VM, after the capture is stored."""
        return self.login.after_capture

    @after_capture.setter
    def after_capture(self, hook: Callable[[str], Awaitable[None]] | None) -> None:
        self.login.after_capture = hook

    # --- reading -----------------------------------------------------------------------
    async def get(self, session_id: str, user_id: str | None) -> tuple[AuthSession, Vm | None]:
        """The session and its VM; 404 when missing or not ``user_id``'s (None: any)."""
        check_session_id(session_id)
        async with self.db.read() as repo:
            session = await repo.auth_session(session_id)
            if session is None or (user_id is not None and session.user_id != user_id):
                raise NotFound(
                    f"no auth session {session_id} for this user", code="session_not_found"
                )
            vm = await repo.vm(session.vm_id) if session.vm_id else None
            return session, vm

    async def view(
        self, session_id: str, user_id: str | None
    ) -> tuple[AuthSession, Vm | None, Credential | None]:
        """``get`` and the capture's metadata in one read: what an SSE stream re-reads at
        every change, so it costs one transaction, not two."""
        check_session_id(session_id)
        async with self.db.read() as repo:
            session = await repo.auth_session(session_id)
            if session is None or (user_id is not None and session.user_id != user_id):
                raise NotFound(
                    f"no auth session {session_id} for this user", code="session_not_found"
                )
            vm = await repo.vm(session.vm_id) if session.vm_id else None
            return session, vm, await repo.credential_of_session(session_id)

    async def list(
        self, user_id: str | None, status: str | None = None, limit: int = 100
    ) -> list[tuple[AuthSession, Vm | None]]:
        if status is not None and status not in set(SessionStatus):
            raise InvalidInput(f"unknown status {status!r}", code="invalid_status")
        async with self.db.read() as repo:
            sessions = await repo.auth_sessions(
                user_id=user_id, statuses=[status] if status else None, limit=limit
            )
            vms = {vm.id: vm for vm in await repo.vms(ids=[s.vm_id for s in sessions if s.vm_id])}
        return [(s, vms.get(s.vm_id) if s.vm_id else None) for s in sessions]

    async def credential(self, session_id: str) -> Credential | None:
        """The capture's metadata row. Callers check ownership with ``get`` first."""
        async with self.db.read() as repo:
            return await repo.credential_of_session(session_id)

    async def credentials_of(self, session_ids: Sequence[str]) -> dict[str, Credential]:
        async with self.db.read() as repo:
            return await repo.credentials_of(session_ids)

    async def export_secret(
        self,
        session: AuthSession,
        credential: Credential,
        *,
        actor: str,
        is_service: bool,
        export_enabled: bool,
    ) -> dict[str, Any]:
        """Decrypt a capture for a trusted backend. Only service tokens, only with
        ``AIRLOCK_CREDENTIAL_EXPORT=true``; the read is recorded before the value leaves."""
        if not is_service:
            raise Forbidden("secret credential values are never given to user tokens")
        if not export_enabled:
            raise Forbidden(
                "credential export is off on this controller (AIRLOCK_CREDENTIAL_EXPORT=false)",
                code="credential_export_disabled",
            )
        plaintext = await self._newest_secret(session, credential)
        async with self.db.transaction() as repo:
            repo.add_event(
                at=self.clock.now(),
                kind="credential",
                subject_id=session.id,
                session_id=session.id,
                vm_id=session.vm_id,
                cause="secret_read",
                actor=actor,
                detail={"provider": credential.provider},
            )
        log.info(
            "credential secret exported",
            extra={"session_id": session.id, "provider": credential.provider, "actor": actor},
        )
        secret: dict[str, Any] = json.loads(plaintext)
        return secret

    async def _newest_secret(self, session: AuthSession, credential: Credential) -> bytes:
        """The login's newest version (what its holder last refreshed), not the capture's
        copy, whose refresh token the CLI may long have rotated (``services.grants``)."""
        async with self.db.read() as repo:
            grant = await repo.grant(credential.grant_id) if credential.grant_id else None
            version = await repo.grant_version(grant.id, grant.current_version) if grant else None
        if grant is None or version is None:
            return self.vault.open_sealed(
                Sealed(credential.key_id, credential.nonce, credential.ciphertext),
                context=f"{session.id}:{credential.provider}",
            )
        if version.key_id is None or version.nonce is None or version.ciphertext is None:
            raise Conflict(
                "this login was replaced by a newer one and its secrets were wiped",
                code="credentials_superseded",
            )
        return self.vault.open_sealed(
            Sealed(version.key_id, version.nonce, version.ciphertext),
            context=grant_records.context_of(grant, version),
        )

    async def events(self, session: AuthSession) -> builtins.list[Event]:
        async with self.db.read() as repo:
            return await repo.events_for_session(
                session.id, [session.vm_id] if session.vm_id else []
            )

    def provider(self, provider_id: str) -> Provider:
        provider = self.providers.get(provider_id)
        if provider is None:
            known = ", ".join(sorted(self.providers))
            raise InvalidInput(
                f"unknown provider {provider_id!r} (known: {known})", code="unknown_provider"
            )
        return provider

    # --- start -------------------------------------------------------------------------
    async def start(
        self, *, user_id: str, provider_id: str, actor: str, cli_vm_id: str | None = None
    ) -> tuple[AuthSession, Vm]:
        """Start a login: on a warm VM when the pool has one (the answer then says
        ``awaiting_user`` already), else on a new VM row whose boot runs in the background."""
        provider = self.provider(provider_id)
        reason = provider.available()
        if reason is not None:
            raise Unavailable(
                f"provider {provider_id} is not available here: {reason}",
                code="provider_unavailable",
            )
        now = self.clock.now()
        session = AuthSession(
            id=new_session_id(),
            user_id=user_id,
            provider=provider_id,
            status=SessionStatus.INITIALIZING,
            cli_vm_id=cli_vm_id,
            created_at=now,
            updated_at=now,
        )
        async with self.db.transaction() as repo:
            if cli_vm_id is not None:
                await _check_cli_target(repo, cli_vm_id, user_id)
            vm, path = await self._take_vm(repo, session, actor=actor)
            session.vm_id = vm.id
            await repo.session.flush()  # the VM row exists before the session names it
            repo.add_session(session)
            repo.add_event(
                at=now,
                kind="session",
                subject_id=session.id,
                session_id=session.id,
                vm_id=vm.id,
                to_state=SessionStatus.INITIALIZING,
                cause="started",
                actor=actor,
                detail={"provider": provider_id},
            )
        log.info(
            "session started",
            extra={
                "session_id": session.id,
                "vm_id": vm.id,
                "provider": provider_id,
                "actor": actor,
                "path": path,
            },
        )
        self.scheduler.poke()
        if vm.node and vm.node != self.db.node:
            # Placed on another node: its boot queue boots the VM (or starts the login on
            # its warm VM) and watches the login; this answer says initializing.
            if self.poke is not None:
                await self.poke(vm.node)
            return session, vm
        if path is StartPath.WARM:
            return await self._start_warm(session, vm, provider)
        self.tasks.spawn(
            self.login.boot(session.id, vm.id, user_id, provider), name=f"boot:{session.id}"
        )
        return session, vm

    async def _take_vm(
        self, repo: Repo, session: AuthSession, *, actor: str
    ) -> tuple[Vm, StartPath]:
        """The session's VM, by the first way ``start_paths`` allows that works: a warm VM
        claimed (a conditional claim: it goes to one session only), or a new row to boot.
        Raises the quota's refusal when none does."""
        now = session.created_at
        destroy_after = self.policy.on_created(now)
        refusal = await quotas.check(
            repo,
            StartKind.LOGIN,
            user_id=session.user_id,
            limits=self.limits,
            clock=self.clock,
            login_timeout=self.policy.durations.login_timeout,
        )
        if self.placement is not None and refusal is not None and refusal.scope is Scope.NODE:
            refusal = None  # where there is room is placement's to say, across the nodes
        for path in start_paths(refusal, pool=self.warm_pool is not None):
            if path is StartPath.WARM and self.warm_pool is not None:
                warm = await self.warm_pool.claim(
                    repo,
                    user_id=session.user_id,
                    now=now,
                    destroy_after=destroy_after,
                    reason=DestroyReason.LOGIN_TIMEOUT,
                )
                if warm is not None:
                    repo.add_event(
                        at=now,
                        kind="vm",
                        subject_id=warm.id,
                        vm_id=warm.id,
                        session_id=session.id,
                        cause="warm_claimed",
                        actor=actor,
                    )
                    return warm, path
            elif path is StartPath.COLD:
                node = self.db.node
                if self.placement is not None:
                    # A node with a warm VM first, else the freer of two with room (its
                    # quota lock held until the row is in); nowhere: 503, Retry-After.
                    placed = await self.placement.choose(repo, VmRole.BROWSER)
                    if placed is None:
                        raise no_host("a browser VM")
                    node = placed.node
                    warm = None
                    if placed.warm and node != self.db.node and self.warm_pool is not None:
                        warm = await self.warm_pool.claim(
                            repo,
                            user_id=session.user_id,
                            now=now,
                            destroy_after=destroy_after,
                            reason=DestroyReason.LOGIN_TIMEOUT,
                            node=node,
                        )
                    if warm is not None:
                        repo.add_event(
                            at=now,
                            kind="vm",
                            subject_id=warm.id,
                            vm_id=warm.id,
                            session_id=session.id,
                            cause="warm_claimed",
                            actor=actor,
                            detail={"node": node},
                        )
                        return warm, StartPath.WARM
                vm = new_vm(
                    role=VmRole.BROWSER,
                    runtime=self.runtime.name,
                    user_id=session.user_id,
                    now=now,
                    destroy_after=destroy_after,
                    destroy_reason=DestroyReason.LOGIN_TIMEOUT,
                    guest_lease_until=self.lease.boot_until(now) if self.lease else None,
                )
                vm.node = node
                add_vm(repo, vm, cause="session_started", actor=actor, session_id=session.id)
                return vm, path
        if refusal is None:  # start_paths always offers a cold start without a refusal
            raise RuntimeError("no way to start a login, and no refusal")
        raise quotas.error(refusal)

    async def _start_warm(
        self, session: AuthSession, vm: Vm, provider: Provider
    ) -> tuple[AuthSession, Vm]:
        """A warm VM is booted already: start the login now, so the answer may say
        ``awaiting_user``; then refill (not before: a boot would compete for the CPU)."""
        state_dir = Path(str(vm.detail.get("state_dir", "")))
        await self.login.start_login(session.id, vm.id, provider, state_dir, {})
        if self.warm_pool is not None:
            self.warm_pool.poke()
        fresh, fresh_vm = await self.get(session.id, None)
        return fresh, fresh_vm or vm

    # --- what the frontend calls -------------------------------------------------------
    async def keepalive(self, session_id: str, user_id: str | None) -> datetime | None:
        """A person is still looking: extend the VM's deadline within the policy's caps."""
        check_session_id(session_id)
        now = self.clock.now()
        async with self.db.transaction() as repo:
            session = await repo.auth_session(session_id)
            if session is None or (user_id is not None and session.user_id != user_id):
                raise NotFound(
                    f"no auth session {session_id} for this user", code="session_not_found"
                )
            vm = await repo.vm(session.vm_id, lock=True) if session.vm_id else None
            if vm is None or VmState(vm.state).terminal:
                return None
            new = self.policy.on_viewer_activity(
                now=now,
                current=vm.destroy_after,
                vm_state=VmState(vm.state),
                vm_created_at=vm.created_at,
                session_status=SessionStatus(session.status),
                completed_at=session.completed_at,
            )
            moved = new != vm.destroy_after and await repo.set_vm(
                vm.id, [VmState(vm.state)], destroy_after=new, updated_at=now
            )
            if moved:
                vm.destroy_after = new
        if moved:  # a keepalive that moved nothing wakes no watcher here or on the peers
            await self.bus.publish(session_id)
        return vm.destroy_after

    async def complete(
        self, session_id: str, user_id: str | None, actor: str
    ) -> tuple[AuthSession, Vm | None]:
        """The frontend has what it needs: destroy the browser VM now. Idempotent."""
        session, vm = await self.get(session_id, user_id)
        if not SessionStatus(session.status).terminal:
            raise Conflict(
                f"session {session_id} is still {session.status}; nothing to complete",
                code="session_not_finished",
            )
        destroyed_here = vm is not None and await self.scheduler.destroy_now(
            vm.id, reason=DestroyReason.COMPLETED, actor=actor
        )
        if destroyed_here and session.completed_at is not None:
            self.metrics.completion_to_handoff.observe(
                (self.clock.now() - session.completed_at).total_seconds()
            )
        return await self.get(session_id, user_id)

    async def cancel(
        self, session_id: str, user_id: str | None, actor: str
    ) -> tuple[AuthSession, Vm | None]:
        """Cancel (if not terminal) and destroy the VM now. Idempotent."""
        _, vm = await self.get(session_id, user_id)
        now = self.clock.now()
        async with self.db.transaction() as repo:
            fresh = await repo.auth_session(session_id)
            if fresh is not None and not SessionStatus(fresh.status).terminal:
                await records.move_session(
                    repo, fresh, SessionStatus.CANCELLED, now=now, cause="cancelled", actor=actor
                )
                self.metrics.sessions.labels(SessionStatus.CANCELLED).inc()
        if vm is not None:
            await self.scheduler.destroy_now(vm.id, reason=DestroyReason.CANCELLED, actor=actor)
        await self.bus.publish(session_id)
        return await self.get(session_id, user_id)

    # --- placed here by another node ---------------------------------------------------
    async def take_up(self, vm: Vm) -> str | None:
        """A browser VM placed on this node by another: boot it (a warm one: just start its
        login) and run its login as if the start had come here. None when done (or nothing
        is left to do), else why not: the row is handed back for another node."""
        async with self.db.read() as repo:
            session = await repo.session_of_vm(vm.id)
        if session is None or SessionStatus(session.status).terminal:
            return None  # cancelled meanwhile: the scheduler ends the row
        provider = self.providers.get(session.provider)
        if provider is None:
            await self.login.fail(
                session.id,
                FailureReason.LOGIN_FAILED,
                f"provider {session.provider} is not configured on node {self.db.node}",
            )
            return None
        if vm.state == VmState.RUNNING:
            state_dir = Path(str(vm.detail.get("state_dir", "")))
            await self.login.start_login(session.id, vm.id, provider, state_dir, {})
            return None
        spec = browser_spec(vm.id, vm.user_id, self.lease)
        try:
            running = await self.login.boots.boot(spec, source="cold", session_id=session.id)
        except BootFailed as failed:
            return f"the browser VM did not start: {short_error(failed.cause)}"
        await self.login.start_login(
            session.id, vm.id, provider, running.state_dir, dict(running.detail)
        )
        return None

    async def give_up(self, vm: Vm, why: str) -> None:
        """No node could start this login's VM: the login fails with the reason."""
        async with self.db.read() as repo:
            session = await repo.session_of_vm(vm.id)
        if session is not None:
            await self.login.fail(
                session.id, FailureReason.VM_BOOT_FAILED, f"{why}; start the login again"
            )

    # --- after a restart ---------------------------------------------------------------
    async def recover(self) -> None:
        """Take over from a previous controller process: sessions whose boot was cut off
        fail (their VM then ends on the failure grace); sessions awaiting the user get
        their egress proxy and capture watcher back."""
        async with self.db.transaction() as repo:
            pending = await repo.auth_sessions(statuses=LIVE_SESSIONS)
            vms = {vm.id: vm for vm in await repo.vms(ids=[s.vm_id for s in pending if s.vm_id])}
        running = {vm.vm_id: vm for vm in await self.runtime.list()}
        for session in pending:
            vm = vms.get(session.vm_id or "")
            if vm is not None and vm.node and vm.node != self.db.node:
                continue  # another node's login: that node booted it and watches it
            if vm is not None and vm.boot_claimed_at is None:
                continue  # placed here, not taken up yet: the boot queue takes it up
            if session.status == SessionStatus.INITIALIZING:
                await self.login.fail(
                    session.id,
                    FailureReason.CONTROLLER_RESTARTED,
                    "the controller restarted while the browser VM was starting",
                )
                continue
            if vm is None or vm.id not in running or vm.state != VmState.RUNNING:
                continue  # the reconciler judges VMs that are gone
            provider = self.providers.get(session.provider)
            if provider is None:
                await self.login.fail(
                    session.id,
                    FailureReason.LOGIN_FAILED,
                    f"provider {session.provider} is no longer configured",
                )
                continue
            await self.egress.start(
                vm.id,
                running[vm.id].state_dir / "egress.sock",
                provider.id,
                session_id=session.id,
            )
            self.tasks.spawn(
                self.login.watch(session.id, vm.id, provider), name=f"watch:{session.id}"
            )
            log.info(
                "adopted session after restart", extra={"session_id": session.id, "vm_id": vm.id}
            )


async def _check_cli_target(repo: Repo, cli_vm_id: str, user_id: str) -> None:
    """The CLI VM a login hands its capture to: the user's own, and still alive."""
    target = await repo.vm(cli_vm_id)
    if (
        target is None
        or target.user_id != user_id
        or target.role != VmRole.CLI
        or VmState(target.state).terminal
    ):
        raise NotFound(f"no CLI VM {cli_vm_id} for this user", code="vm_not_found")
