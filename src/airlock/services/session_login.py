"""A login on its browser VM, once the session row exists: boot (cold start), egress
proxy and login program, ``awaiting_user``, the capture watch, storing the capture, and
failing the session when any of it goes wrong.

The credentials are stored encrypted in the same transaction that marks the session
``completed`` and schedules the VM's end (invariant 6), and only then does the agent wipe
them from the VM. Deadlines come from ``domain.deadlines.DeadlinePolicy``; nothing here
sleeps until one (the scheduler does).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from airlock.agent.client import AgentClient
from airlock.aio import TaskOwner
from airlock.clock import Clock
from airlock.domain.deadlines import DeadlinePolicy, Plan
from airlock.domain.leases import LeasePolicy
from airlock.domain.sessions import FailureReason, SessionStatus
from airlock.domain.vms import DESTROYABLE, IN_SERVICE, DestroyReason, VmState
from airlock.errors import AirlockError, CredentialError
from airlock.metrics import Metrics
from airlock.providers.base import Credentials, Provider
from airlock.runtimes.base import Runtime
from airlock.services import grant_records, records
from airlock.services.bus import SessionBus
from airlock.services.egress import EgressManager
from airlock.services.leases import browser_spec
from airlock.services.scheduler import Scheduler
from airlock.services.vm_boot import BootFailed, VmBooter
from airlock.store.db import Database
from airlock.store.repo import Repo
from airlock.store.tables import Credential, Vm
from airlock.vault import Vault

log = logging.getLogger("airlock.sessions")

CAPTURE_POLL_S = 10.0
ROWS_EVERY = 3  # capture rounds between two reads of the session's rows (watch)


class LoginRunner:
    def __init__(
        self,
        *,
        db: Database,
        runtime: Runtime,
        clock: Clock,
        policy: DeadlinePolicy,
        vault: Vault,
        metrics: Metrics,
        bus: SessionBus,
        egress: EgressManager,
        scheduler: Scheduler,
        tasks: TaskOwner,
        boots: VmBooter,
        lease: LeasePolicy | None,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.clock = clock
        self.policy = policy
        self.vault = vault
        self.metrics = metrics
        self.bus = bus
        self.egress = egress
        self.scheduler = scheduler
        self.tasks = tasks
        self.boots = boots
        self.lease = lease
        # Set by Core: the handoff into the session's CLI VM, after the capture is stored.
        self.after_capture: Callable[[str], Awaitable[None]] | None = None

    async def boot(self, session_id: str, vm_id: str, user_id: str, provider: Provider) -> None:
        """Boot a cold VM for a started session, then start its login; a failed boot fails
        the session (its first line is the session's reason, the log has the rest)."""
        spec = browser_spec(vm_id, user_id, self.lease)
        try:
            running = await self.boots.boot(spec, source="cold", session_id=session_id)
        except BootFailed as failed:
            await self.fail(
                session_id,
                FailureReason.VM_BOOT_FAILED,
                f"the browser VM did not start: {short_error(failed.cause)}",
            )
            return
        await self.start_login(session_id, vm_id, provider, running.state_dir, dict(running.detail))

    async def start_login(
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
            await self.fail(
                session_id,
                FailureReason.LOGIN_FAILED,
                f"the login could not start: {short_error(exc)}",
            )
            return
        now = self.clock.now()
        async with self.db.transaction() as repo:
            vm = await repo.vm(vm_id, lock=True)
            session = await repo.auth_session(session_id)
            ready = (
                vm is not None
                and session is not None
                and vm.state in IN_SERVICE
                and session.status == SessionStatus.INITIALIZING
            )
            if ready and vm is not None and vm.state == VmState.CREATING:
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
        self.tasks.spawn(self.watch(session_id, vm_id, provider), name=f"watch:{session_id}")

    async def _agent(self, vm_id: str) -> AgentClient:
        reader, writer = await self.runtime.open_agent(vm_id)
        return AgentClient(reader, writer)

    # --- capture -----------------------------------------------------------------------
    async def watch(self, session_id: str, vm_id: str, provider: Provider) -> None:
        """Wait for the agent to report the credentials (once), then store and ack them.

        One agent connection serves round after round (a reconnect only after a failure),
        and the rows are read every ``ROWS_EVERY`` rounds: a cancel or a deadline destroys
        the VM, which ends the connection and brings a read at once, so a session that
        ended under a live VM is the only one found late, by at most that many rounds.
        With 1,000 logins waiting, a reconnect and two reads every 10 s each were a fifth
        of the controller's steady CPU."""
        failures = 0
        rounds = 0
        agent: AgentClient | None = None
        try:
            while True:
                if failures or rounds % ROWS_EVERY == 0:
                    watched = await self._still_watched(session_id, vm_id)
                    if watched is False:
                        return
                    if watched is None:  # the database cannot say right now: ask again later
                        failures += 1
                        await asyncio.sleep(min(0.2 * 2**failures, 5.0))
                        continue
                rounds += 1
                try:
                    if agent is None or agent.closed:
                        agent = await self._agent(vm_id)
                    files = await agent.capture_files(timeout_s=CAPTURE_POLL_S)
                    status = None if files is not None else await agent.login_status()
                    failures = 0
                except Exception as exc:
                    if agent is not None:
                        await agent.close()
                        agent = None
                    if await self._still_watched(session_id, vm_id) is False:
                        return  # cancelled or destroyed under the watch: the agent went with it
                    failures += 1
                    log.warning(
                        "agent unreachable (%d): %s",
                        failures,
                        short_error(exc),
                        extra={"session_id": session_id, "vm_id": vm_id},
                    )
                    await asyncio.sleep(min(0.2 * 2**failures, 5.0))
                    continue
                if files is not None:
                    await agent.close()
                    agent = None
                    await self._on_capture(session_id, vm_id, provider, files)
                    return
                if status is not None and status.get("state") == "exited":
                    await self.fail(
                        session_id,
                        FailureReason.LOGIN_FAILED,
                        f"the {provider.id} login program exited with code "
                        f"{status.get('exit_code')} without credentials",
                    )
                    return
        finally:
            if agent is not None:
                await agent.close()

    async def _still_watched(self, session_id: str, vm_id: str) -> bool | None:
        """``_watched``, or None while the database cannot answer (a pool timeout under
        load, a failover). The watch then waits and asks again: if it ended instead, the
        session would never see its capture until the controller restarted."""
        try:
            return await self._watched(session_id, vm_id)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning(
                "capture watch cannot read the session: %s",
                short_error(exc),
                extra={"session_id": session_id, "vm_id": vm_id},
            )
            return None

    async def _watched(self, session_id: str, vm_id: str) -> bool:
        """Whether the session still waits for a capture from a VM that still runs."""
        async with self.db.read() as repo:
            session = await repo.auth_session(session_id)
            vm = await repo.vm(vm_id)
        return (
            session is not None
            and vm is not None
            and not SessionStatus(session.status).terminal
            and vm.state in DESTROYABLE  # neither ended nor on its way out
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
            await self.fail(session_id, FailureReason.CAPTURE_FAILED, exc.message)
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
                # the login, with its one holder
                await grant_records.record_capture(repo, session_id, now=now)
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
                self.metrics.sessions.labels(SessionStatus.COMPLETED).inc()
                stored = True
                plan = self.policy.on_completed(now)
                end = DestroyReason.GRACE_ENDED
                await _wind_down(
                    repo, vm, plan, end, now=now, cause="completed", session_id=session_id
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
                short_error(exc),
                extra={"session_id": session_id, "vm_id": vm_id},
            )

    async def fail(self, session_id: str, reason: FailureReason, message: str) -> None:
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
                cause=reason,
                actor="controller",
                failure_reason=f"{reason}: {message}",
            )
            self.metrics.sessions.labels(SessionStatus.FAILED).inc()
            vm = await repo.vm(session.vm_id, lock=True) if session.vm_id else None
            if vm is not None:
                plan = self.policy.on_failed(now)
                end = _reason_after_failure(plan.state)
                await _wind_down(repo, vm, plan, end, now=now, cause=reason, session_id=session_id)
        self.scheduler.poke()
        await self.bus.publish(session_id)


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


async def _wind_down(
    repo: Repo,
    vm: Vm,
    plan: Plan,
    end: DestroyReason,
    *,
    now: datetime,
    cause: str,
    session_id: str,
) -> None:
    """The session ended: its VM, if still in service, follows the policy's plan (a
    grace, or a debug keep); ``end`` is the reason its destroy will carry."""
    if vm.state not in IN_SERVICE:
        return
    await records.move_vm(
        repo,
        vm,
        plan.state,
        now=now,
        cause=cause,
        actor="controller",
        session_id=session_id,
        destroy_after=plan.destroy_after,
        destroy_reason=end,
    )


def _reason_after_failure(state: VmState) -> DestroyReason:
    if state is VmState.RETAINED:
        return DestroyReason.RETENTION_ENDED
    return DestroyReason.FAILED


def short_error(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, AirlockError) else str(exc) or type(exc).__name__
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
