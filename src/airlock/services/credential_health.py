"""The logins' health, kept on a schedule: observe, decide (``domain.credential_health``),
record.

Every ``AIRLOCK_CREDENTIAL_CHECK_MS`` (and when asked, ``check_all``) each login that is not
superseded is looked at:

- its facts from the vault's newest version, normalised again by its provider: the access
  and refresh tokens' expiries, whether it has a refresh token at all (a version whose
  secret was wiped has nothing: ``needs_login``);
- where a CLI VM of this node holds it and the provider has an offline status check
  (``Provider.status_check``: ``claude auth status``, ``codex login status``, the ``oauth2``
  refresher's introspection of its refresh token), that check, run in the holder VM through
  its agent. Logins held by another node's VM are that node's to check; the vault's are only
  a matter of time.

A change of state is recorded with a conditional update (a move or renewal that changed the
login in between wins), as an audit event (``kind: grant``, from and to state, the check's
one-line summary) and, when a person must act, a log warning and a wake-up of the
``credentials`` SSE stream of the login's user (``bus`` key ``credentials:{user}``).
No secret is logged or put in an event.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from airlock.agent.client import AgentClient
from airlock.clock import Clock
from airlock.domain.credential_health import (
    CheckResult,
    HealthFacts,
    decide,
    needs_attention,
)
from airlock.domain.grants import GrantState, lease_free
from airlock.domain.vms import VmRole, VmState
from airlock.errors import AirlockError, CredentialError
from airlock.providers.base import Provider, RunOutcome
from airlock.runtimes.base import Runtime
from airlock.services.bus import SessionBus
from airlock.services.grant_records import context_of, credentials_from_body
from airlock.store.db import Database
from airlock.store.tables import Grant, GrantVersion, Vm
from airlock.vault import Sealed, Vault, VaultError

log = logging.getLogger("airlock.credentials")

CHECKS_AT_ONCE = 4  # status checks running in VMs at the same time


def bus_key(user_id: str) -> str:
    """The change bus's key for one user's logins (the credentials SSE stream waits on it)."""
    return f"credentials:{user_id}"


@dataclass(frozen=True, slots=True)
class HealthChange:
    grant_id: str
    user_id: str
    provider: str
    old: GrantState | None
    new: GrantState
    reason: str


@dataclass(frozen=True, slots=True)
class _Facts:
    access_expires_at: datetime | None
    refresh_expires_at: datetime | None
    has_refresh_token: bool
    has_secret: bool


class CredentialHealth:
    def __init__(
        self,
        *,
        db: Database,
        runtime: Runtime,
        clock: Clock,
        vault: Vault,
        providers: dict[str, Provider],
        bus: SessionBus,
        interval_s: float,
        expiring_within: timedelta,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.clock = clock
        self.vault = vault
        self.providers = providers
        self.bus = bus
        self.interval_s = interval_s
        self.expiring_within = expiring_within
        self._round = asyncio.Lock()

    async def run(self) -> None:
        """The scheduled check: a round now, then one every interval."""
        while True:
            try:
                await self.check_all()
            except Exception:  # the database may be away for a moment: try again later
                log.exception("the credential health round failed; retrying")
            await self.clock.sleep(self.interval_s)

    async def check_all(self) -> list[HealthChange]:
        """One round over every login that is not superseded; the changes it recorded."""
        async with self._round:
            async with self.db.read() as repo:
                grants = await repo.grants(superseded=False)
                versions = {
                    (v.grant_id, v.version): v
                    for v in await repo.grant_versions([g.id for g in grants])
                }
                holder_ids = [g.holder_vm_id for g in grants if g.holder_vm_id]
                vms = {vm.id: vm for vm in await repo.vms(ids=holder_ids)} if holder_ids else {}
            limit = asyncio.Semaphore(CHECKS_AT_ONCE)

            async def one(grant: Grant) -> HealthChange | None:
                # One login's failure (its VM, the database for a moment) is logged and
                # judged again next round; it neither ends the others' checks nor, as a
                # gather's first exception did, leaves them running past the round.
                async with limit:
                    version = versions.get((grant.id, grant.current_version))
                    vm = vms.get(grant.holder_vm_id or "")
                    try:
                        return await self._check_one(grant, version, vm)
                    except Exception:
                        log.exception(
                            "the health check of a login failed", extra={"grant_id": grant.id}
                        )
                        return None

            async with asyncio.TaskGroup() as group:
                checks = [group.create_task(one(g)) for g in grants]
        return [c for c in (task.result() for task in checks) if c is not None]

    async def _check_one(
        self, grant: Grant, version: GrantVersion | None, vm: Vm | None
    ) -> HealthChange | None:
        provider = self.providers.get(grant.provider)
        if not lease_free(_aware(grant.move_lease_until), self.clock.now()):
            return None  # a move has its files in flight: judge it next round
        facts = self._facts(grant, version, provider)
        check: CheckResult | None = None
        summary = ""
        ran = False
        if provider is not None and facts.has_secret and self._ours_and_running(vm):
            assert vm is not None
            status = provider.status_check()
            if status is not None:
                ran = True
                outcome = await self._run_check(vm.id, status.argv, status.timeout_s)
                if isinstance(outcome, RunOutcome):
                    check, summary = status.judge(outcome)
                else:
                    check, summary = CheckResult.UNKNOWN, outcome
        now = self.clock.now()
        previous = _state(grant.state)
        new = decide(
            HealthFacts(
                access_expires_at=facts.access_expires_at,
                refresh_expires_at=facts.refresh_expires_at,
                has_refresh_token=facts.has_refresh_token,
                last_refresh_seen_at=grant.last_refresh_seen_at,
                previous=previous,
                check=check,
                has_secret=facts.has_secret,
            ),
            now=now,
            expiring_within=self.expiring_within,
        )
        explained = _reason(new, facts)
        told = new in (GrantState.REVOKED, GrantState.NEEDS_LOGIN, GrantState.ACTIVE)
        reason = summary if summary and told else explained
        values: dict[str, object] = {
            "access_expires_at": facts.access_expires_at,
            "refresh_expires_at": facts.refresh_expires_at,
        }
        if ran:
            values["last_checked_at"] = now
        changed = new is not previous
        if changed:
            values.update(state=new.value, state_reason=reason[:500], state_changed_at=now)
        async with self.db.transaction() as repo:
            recorded = await repo.set_grant_health(
                grant.id,
                expect_state=grant.state,
                expect_version=grant.current_version,
                expect_holder=grant.holder_vm_id,
                now=now,
                updated_at=now,
                **values,
            )
            if not (recorded and changed):
                return None
            repo.add_event(
                at=now,
                kind="grant",
                subject_id=grant.id,
                session_id=grant.session_id,
                vm_id=grant.holder_vm_id,
                from_state=grant.state,
                to_state=new.value,
                cause="health_check" if ran else "health",
                actor="controller",
                detail={
                    "provider": grant.provider,
                    "grantId": grant.id,
                    "reason": reason[:300],
                    **({"check": check.value} if check is not None else {}),
                },
            )
        attention = needs_attention(previous, new)
        (log.warning if attention else log.info)(
            "login %s (%s) is now %s: %s",
            grant.id,
            grant.provider,
            new.value,
            reason[:200],
            extra={"grant_id": grant.id, "vm_id": grant.holder_vm_id, "provider": grant.provider},
        )
        await self.bus.publish(bus_key(grant.user_id))
        return HealthChange(grant.id, grant.user_id, grant.provider, previous, new, reason)

    def _ours_and_running(self, vm: Vm | None) -> bool:
        return (
            vm is not None
            and vm.role == VmRole.CLI.value
            and vm.state == VmState.RUNNING.value
            and vm.node == self.db.node
        )

    async def _run_check(self, vm_id: str, argv: list[str], timeout_s: float) -> RunOutcome | str:
        """The check's outcome, or why the VM could not be asked."""
        try:
            agent = AgentClient(*await self.runtime.open_agent(vm_id))
            try:
                result = await agent.run(argv, timeout_s=timeout_s)
            finally:
                await agent.close()
        except (AirlockError, OSError) as exc:
            text = exc.message if isinstance(exc, AirlockError) else str(exc)
            return f"the holder VM could not be asked: {text[:200]}"
        return RunOutcome(result.exit_code, result.stdout, result.stderr)

    def _facts(
        self, grant: Grant, version: GrantVersion | None, provider: Provider | None
    ) -> _Facts:
        """What the vault's newest version says; the row's own columns where it cannot."""
        fallback = _Facts(grant.access_expires_at, grant.refresh_expires_at, True, True)
        if version is None or version.ciphertext is None or version.nonce is None:
            return _Facts(grant.access_expires_at, grant.refresh_expires_at, False, False)
        if provider is None or version.key_id is None:
            return fallback
        try:
            stored = credentials_from_body(
                grant.provider,
                self.vault.open_sealed(
                    Sealed(version.key_id, version.nonce, version.ciphertext),
                    context=context_of(grant, version),
                ),
            )
        except (VaultError, CredentialError, ValueError):
            log.warning("login %s: its newest version does not open", grant.id)
            return fallback
        try:
            creds = provider.normalise(stored.raw, now=self.clock.now())
        except CredentialError:
            # The provider refuses the files as they are (an expired access token and no
            # refresh token, typically): what the vault's body says is what there is.
            return _Facts(stored.expires_at, None, stored.refresh_token is not None, True)
        return _Facts(
            creds.expires_at, creds.refresh_expires_at, creds.refresh_token is not None, True
        )


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite gives naive UTC datetimes back."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def _state(value: str | None) -> GrantState | None:
    try:
        return GrantState(value) if value else None
    except ValueError:
        return None


def _reason(state: GrantState, facts: _Facts) -> str:
    if state is GrantState.NEEDS_LOGIN and not facts.has_secret:
        return "the vault holds no secret of this login"
    if state in (GrantState.EXPIRING, GrantState.EXPIRED):
        end = facts.refresh_expires_at if facts.has_refresh_token else facts.access_expires_at
        what = "refresh token" if facts.has_refresh_token else "access token"
        verb = "ends" if state is GrantState.EXPIRING else "ended"
        return f"the {what} {verb} at {end:%Y-%m-%d %H:%M} UTC" if end else state.value
    return state.value
