"""Auth sessions: start, boot the browser VM, watch for the capture, keepalive, complete,
cancel, and recovery after a controller restart.

Every deadline comes from ``domain.deadlines.DeadlinePolicy`` and is written to the VM row;
this module never sleeps until a deadline (the scheduler does). The credentials are stored
encrypted in the same transaction that marks the session ``completed`` and schedules the
VM's end (invariant 6), and only then does the agent wipe them from the VM.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from airlock.agent.client import AgentClient
from airlock.aio import TaskOwner
from airlock.clock import Clock
from airlock.domain.deadlines import DeadlinePolicy
from airlock.domain.leases import LeasePolicy
from airlock.domain.quotas import Limits, Scope, StartKind
from airlock.domain.sessions import FailureReason, SessionStatus
from airlock.domain.vms import DestroyReason, VmRole, VmState
from airlock.errors import (
    AirlockError,
    Conflict,
    CredentialError,
    Forbidden,
    InvalidInput,
    NotFound,
    Unavailable,
)
from airlock.metrics import Metrics
from airlock.providers.base import Credentials, Provider
from airlock.runtimes.base import Runtime
from airlock.services import grants, quotas, records
from airlock.services.bus import SessionBus
from airlock.services.egress import EgressManager
from airlock.services.leases import browser_spec
from airlock.services.scheduler import Scheduler
from airlock.services.warm_pool import WarmPool
from airlock.store.db import Database
from airlock.store.tables import AuthSession, Credential, Event, Vm
from airlock.vault import Sealed, Vault

log = logging.getLogger("airlock.sessions")

CAPTURE_POLL_S = 10.0
_ID_ALPHABET = set("0123456789abcdef")


def new_session_id() -> str:
    return secrets.token_hex(16)


def new_vm_id() -> str:
    return "vm-" + secrets.token_hex(8)


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
        self.boot_timeout = boot_timeout
        self.limits = limits
        # Set by Core: the handoff into the session's CLI VM, after the capture is stored.
        self.after_capture: Callable[[str], Awaitable[None]] | None = None
        self.warm_pool = warm_pool
        self.lease = lease  # the browser VM's own deadline (domain.leases); None: no lease

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

    async def list(
        self, user_id: str | None, status: str | None = None, limit: int = 100
    ) -> list[tuple[AuthSession, Vm | None]]:
        if status is not None and status not in {s.value for s in SessionStatus}:
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
            context=grants.context_of(grant, version),
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
        provider = self.provider(provider_id)
        reason = provider.available()
        if reason is not None:
            raise Unavailable(
                f"provider {provider_id} is not available here: {reason}",
                code="provider_unavailable",
            )
        now = self.clock.now()
        session_id, vm_id = new_session_id(), new_vm_id()
        async with self.db.transaction() as repo:
            if cli_vm_id is not None:
                target = await repo.vm(cli_vm_id)
                if (
                    target is None
                    or target.user_id != user_id
                    or target.role != VmRole.CLI.value
                    or VmState(target.state).terminal
                ):
                    raise NotFound(f"no CLI VM {cli_vm_id} for this user", code="vm_not_found")
            refusal = await quotas.check(
                repo,
                StartKind.LOGIN,
                user_id=user_id,
                limits=self.limits,
                now=now,
                login_timeout=self.policy.durations.login_timeout,
            )
            if refusal is not None and refusal.scope is Scope.USER:
                raise quotas.error(refusal)
            # A warm VM if one is ready (a conditional claim: it goes to one session only).
            # It is counted already, so a full node can still hand out its warm VMs.
            warm = (
                await self.warm_pool.claim(
                    repo,
                    user_id=user_id,
                    now=now,
                    destroy_after=self.policy.on_created(now),
                    reason=DestroyReason.LOGIN_TIMEOUT.value,
                )
                if self.warm_pool is not None
                else None
            )
            if warm is None:
                if refusal is not None:
                    raise quotas.error(refusal)
                vm = Vm(
                    id=vm_id,
                    role=VmRole.BROWSER.value,
                    runtime=self.runtime.name,
                    user_id=user_id,
                    state=VmState.CREATING.value,
                    created_at=now,
                    updated_at=now,
                    destroy_after=self.policy.on_created(now),
                    destroy_reason=DestroyReason.LOGIN_TIMEOUT.value,
                    destroy_attempts=0,
                    warm=False,
                    detail={},
                    guest_lease_until=self.lease.boot_until(now) if self.lease else None,
                )
            else:
                vm, vm_id = warm, warm.id
            session = AuthSession(
                id=session_id,
                user_id=user_id,
                provider=provider_id,
                status=SessionStatus.INITIALIZING.value,
                vm_id=vm_id,
                cli_vm_id=cli_vm_id,
                created_at=now,
                updated_at=now,
            )
            if warm is None:
                repo.add_vm(vm)
                await repo.session.flush()  # the VM row exists before the session names it
            repo.add_session(session)
            repo.add_event(
                at=now,
                kind="vm",
                subject_id=vm_id,
                vm_id=vm_id,
                session_id=session_id,
                to_state=VmState.CREATING.value if warm is None else None,
                cause="session_started" if warm is None else "warm_claimed",
                actor=actor,
            )
            repo.add_event(
                at=now,
                kind="session",
                subject_id=session_id,
                session_id=session_id,
                vm_id=vm_id,
                to_state=SessionStatus.INITIALIZING.value,
                cause="started",
                actor=actor,
                detail={"provider": provider_id},
            )
        log.info(
            "session started",
            extra={
                "session_id": session_id,
                "vm_id": vm_id,
                "provider": provider_id,
                "actor": actor,
            },
        )
        self.scheduler.poke()
        if warm is not None and self.warm_pool is not None:
            # Booted already: start the login now, so the answer may say awaiting_user;
            # then refill (not before: a boot would compete with this login for the CPU).
            await self._start_login(
                session_id, vm_id, provider, Path(str(warm.detail.get("state_dir", ""))), {}
            )
            self.warm_pool.poke()
            fresh, fresh_vm = await self.get(session_id, None)
            return fresh, fresh_vm or vm
        self.tasks.spawn(
            self._boot(session_id, vm_id, user_id, provider), name=f"boot:{session_id}"
        )
        return session, vm

    async def _boot(self, session_id: str, vm_id: str, user_id: str, provider: Provider) -> None:
        started = time.monotonic()
        spec = browser_spec(vm_id, user_id, self.lease)
        try:
            async with asyncio.timeout(self.boot_timeout):
                running = await self.runtime.create(spec)
        except Exception as exc:
            # The whole story (the runtime adds the VM's own log) for the operator; the
            # session keeps its first line.
            log.warning("VM %s did not boot: %s", vm_id, exc, extra={"session_id": session_id})
            await self.runtime.destroy(vm_id)
            await self._fail(
                session_id,
                FailureReason.VM_BOOT_FAILED,
                f"the browser VM did not start: {_short(exc)}",
            )
            return
        self.metrics.vm_boot.labels("browser", self.runtime.name, "cold").observe(
            time.monotonic() - started
        )
        await self._start_login(
            session_id, vm_id, provider, running.state_dir, dict(running.detail)
        )

    async def _start_login(
        self,
        session_id: str,
        vm_id: str,
        provider: Provider,
        state_dir: Path,
        detail: dict[str, str],
    ) -> None:
        """On a booted VM (just booted, or warm): egress proxy, login, awaiting_user."""
        try:
            await self.egress.start(
                vm_id, state_dir / "egress.sock", provider.id, session_id=session_id
            )
            agent = await self._agent(vm_id)
            try:
                await agent.start_login(provider.login_plan())
            finally:
                await agent.close()
        except Exception as exc:
            await self._fail(
                session_id, FailureReason.LOGIN_FAILED, f"the login could not start: {_short(exc)}"
            )
            return
        now = self.clock.now()
        async with self.db.transaction() as repo:
            vm = await repo.vm(vm_id, lock=True)
            session = await repo.auth_session(session_id)
            ready = (
                vm is not None
                and session is not None
                and vm.state in (VmState.CREATING.value, VmState.RUNNING.value)
                and session.status == SessionStatus.INITIALIZING.value
            )
            if ready and vm is not None and vm.state == VmState.CREATING.value:
                await records.move_vm(
                    repo,
                    vm,
                    VmState.RUNNING,
                    now=now,
                    cause="booted",
                    actor="controller",
                    session_id=session_id,
                    running_at=now,
                    detail=detail,
                )
            if ready and session is not None:
                await records.move_session(
                    repo,
                    session,
                    SessionStatus.AWAITING_USER,
                    now=now,
                    cause="login_started",
                    actor="controller",
                )
                self.metrics.session_ready.observe((now - session.created_at).total_seconds())
        if not ready:
            # Cancelled or expired while booting: the destroy may have run before the VM
            # existed, so make sure nothing is left of it.
            await self.runtime.destroy(vm_id)
            await self.egress.stop(vm_id)
            return
        await self.bus.publish(session_id)
        if self.tasks.closed:
            return  # shutting down: the next controller's recover() watches this session
        self.tasks.spawn(self._watch(session_id, vm_id, provider), name=f"watch:{session_id}")

    async def _agent(self, vm_id: str) -> AgentClient:
        reader, writer = await self.runtime.open_agent(vm_id)
        return AgentClient(reader, writer)

    # --- capture -----------------------------------------------------------------------
    async def _watch(self, session_id: str, vm_id: str, provider: Provider) -> None:
        """Wait for the agent to report the credentials (once), then store and ack them."""
        failures = 0
        while await self._watched(session_id, vm_id):
            try:
                agent = await self._agent(vm_id)
                try:
                    files = await agent.capture_files(timeout_s=CAPTURE_POLL_S)
                    status = None if files is not None else await agent.login_status()
                finally:
                    await agent.close()
                failures = 0
            except Exception as exc:
                if not await self._watched(session_id, vm_id):
                    return  # cancelled or destroyed under the watch: the agent went with it
                failures += 1
                log.warning(
                    "agent unreachable (%d): %s",
                    failures,
                    _short(exc),
                    extra={"session_id": session_id, "vm_id": vm_id},
                )
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))
                continue
            if files is not None:
                await self._on_capture(session_id, vm_id, provider, files)
                return
            if status is not None and status.get("state") == "exited":
                await self._fail(
                    session_id,
                    FailureReason.LOGIN_FAILED,
                    f"the {provider.id} login program exited with code "
                    f"{status.get('exit_code')} without credentials",
                )
                return

    async def _watched(self, session_id: str, vm_id: str) -> bool:
        """Whether the session still waits for a capture from a VM that still runs."""
        async with self.db.read() as repo:
            session = await repo.auth_session(session_id)
            vm = await repo.vm(vm_id)
        return not (
            session is None
            or vm is None
            or SessionStatus(session.status).terminal
            or VmState(vm.state).terminal
            or vm.state == VmState.DESTROYING.value
        )

    async def _on_capture(
        self, session_id: str, vm_id: str, provider: Provider, files: dict[str, bytes]
    ) -> None:
        now = self.clock.now()
        stored = False
        try:
            creds = provider.normalise(files, now=now)
        except CredentialError as exc:
            await self._wipe(vm_id, session_id)
            await self._fail(session_id, FailureReason.CAPTURE_FAILED, exc.message)
            return
        async with self.db.transaction() as repo:
            session = await repo.auth_session(session_id)
            vm = await repo.vm(vm_id, lock=True)
            if session is None or vm is None:
                return
            if SessionStatus(session.status).terminal:
                log.info(
                    "capture after the session ended; discarded",
                    extra={"session_id": session_id, "vm_id": vm_id},
                )
            else:
                sealed = self.vault.seal(_plaintext(creds), context=f"{session_id}:{provider.id}")
                repo.add_credential(
                    Credential(
                        id=secrets.token_hex(8),
                        session_id=session_id,
                        user_id=session.user_id,
                        provider=provider.id,
                        key_id=sealed.key_id,
                        nonce=sealed.nonce,
                        ciphertext=sealed.ciphertext,
                        account=asdict(creds.account),
                        scopes=list(creds.scopes),
                        plan=creds.plan,
                        expires_at=creds.expires_at,
                        captured_at=now,
                    )
                )
                await grants.record_capture(repo, session_id, now=now)  # the login (one holder)
                repo.add_event(
                    at=now,
                    kind="credential",
                    subject_id=session_id,
                    session_id=session_id,
                    vm_id=vm_id,
                    cause="captured",
                    actor="agent",
                    detail={"provider": provider.id, "files": sorted(files)},
                )
                await records.move_session(
                    repo,
                    session,
                    SessionStatus.COMPLETED,
                    now=now,
                    cause="credentials_captured",
                    actor="agent",
                )
                self.metrics.sessions.labels(SessionStatus.COMPLETED.value).inc()
                stored = True
                if vm.state in (VmState.CREATING.value, VmState.RUNNING.value):
                    plan = self.policy.on_completed(now)
                    await records.move_vm(
                        repo,
                        vm,
                        plan.state,
                        now=now,
                        cause="completed",
                        actor="controller",
                        session_id=session_id,
                        destroy_after=plan.destroy_after,
                        destroy_reason=DestroyReason.GRACE_ENDED.value,
                    )
        await self._wipe(vm_id, session_id)
        await self.egress.stop(vm_id)
        self.scheduler.poke()
        await self.bus.publish(session_id)
        if stored and self.after_capture is not None:
            await self.after_capture(session_id)

    async def _wipe(self, vm_id: str, session_id: str) -> None:
        try:
            agent = await self._agent(vm_id)
            try:
                wiped = await agent.ack_capture()
            finally:
                await agent.close()
            log.info(
                "credentials wiped from the browser VM",
                extra={"session_id": session_id, "vm_id": vm_id, "files": len(wiped)},
            )
        except Exception as exc:
            # The VM is scheduled for destruction anyway; its files go with it.
            log.warning(
                "could not wipe the capture: %s",
                _short(exc),
                extra={"session_id": session_id, "vm_id": vm_id},
            )

    async def _fail(self, session_id: str, reason: FailureReason, message: str) -> None:
        now = self.clock.now()
        async with self.db.transaction() as repo:
            session = await repo.auth_session(session_id)
            if session is None or SessionStatus(session.status).terminal:
                return
            await records.move_session(
                repo,
                session,
                SessionStatus.FAILED,
                now=now,
                cause=reason.value,
                actor="controller",
                failure_reason=f"{reason.value}: {message}",
            )
            self.metrics.sessions.labels(SessionStatus.FAILED.value).inc()
            vm = await repo.vm(session.vm_id, lock=True) if session.vm_id else None
            if vm is not None and vm.state in (VmState.CREATING.value, VmState.RUNNING.value):
                plan = self.policy.on_failed(now)
                await records.move_vm(
                    repo,
                    vm,
                    plan.state,
                    now=now,
                    cause=reason.value,
                    actor="controller",
                    session_id=session_id,
                    destroy_after=plan.destroy_after,
                    destroy_reason=_reason_after_failure(plan.state),
                )
        self.scheduler.poke()
        await self.bus.publish(session_id)

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
            if new != vm.destroy_after and await repo.set_vm(
                vm.id, [VmState(vm.state)], destroy_after=new, updated_at=now
            ):
                vm.destroy_after = new
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
                self.metrics.sessions.labels(SessionStatus.CANCELLED.value).inc()
        if vm is not None:
            await self.scheduler.destroy_now(vm.id, reason=DestroyReason.CANCELLED, actor=actor)
        await self.bus.publish(session_id)
        return await self.get(session_id, user_id)

    # --- after a restart ---------------------------------------------------------------
    async def recover(self) -> None:
        """Take over from a previous controller process: sessions whose boot was cut off
        fail (their VM then ends on the failure grace); sessions awaiting the user get
        their egress proxy and capture watcher back."""
        async with self.db.transaction() as repo:
            pending = await repo.auth_sessions(
                statuses=[SessionStatus.INITIALIZING.value, SessionStatus.AWAITING_USER.value]
            )
            vms = {vm.id: vm for vm in await repo.vms(ids=[s.vm_id for s in pending if s.vm_id])}
        running = {vm.vm_id: vm for vm in await self.runtime.list()}
        for session in pending:
            vm = vms.get(session.vm_id or "")
            if session.status == SessionStatus.INITIALIZING.value:
                await self._fail(
                    session.id,
                    FailureReason.CONTROLLER_RESTARTED,
                    "the controller restarted while the browser VM was starting",
                )
                continue
            if vm is None or vm.id not in running or vm.state != VmState.RUNNING.value:
                continue  # the reconciler judges VMs that are gone
            provider = self.providers.get(session.provider)
            if provider is None:
                await self._fail(
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
            self.tasks.spawn(self._watch(session.id, vm.id, provider), name=f"watch:{session.id}")
            log.info(
                "adopted session after restart", extra={"session_id": session.id, "vm_id": vm.id}
            )


def _plaintext(creds: Credentials) -> bytes:
    body: dict[str, Any] = {
        "provider": creds.provider,
        "accessToken": creds.access_token,
        "refreshToken": creds.refresh_token,
        "expiresAt": creds.expires_at.isoformat() if creds.expires_at else None,
        "scopes": creds.scopes,
        "account": asdict(creds.account),
        "plan": creds.plan,
        "raw": {path: base64.b64encode(data).decode() for path, data in creds.raw.items()},
    }
    return json.dumps(body).encode()


def _reason_after_failure(state: VmState) -> str:
    if state is VmState.RETAINED:
        return DestroyReason.RETENTION_ENDED.value
    return DestroyReason.FAILED.value


def _short(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, AirlockError) else str(exc) or type(exc).__name__
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
