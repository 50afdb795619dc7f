"""The handoff: captured credentials into the user's CLI VM, where the vendor CLI just works.

After a capture (``SessionService`` calls ``after_capture``) for a session started with
``cliVmId``, and on ``POST /api/vms/{vmId}/credentials`` for a CLI VM created later, the
controller decrypts the credentials and, through the VM's guest agent:

1. writes the vendor's own files from ``raw`` (byte for byte) plus companion settings the
   CLI needs to start without prompts (only where the VM has none), each atomically
   (temp file + rename) with mode 0600, as the VM's user;
2. reads them back (SHA-256, mode, owner), so a torn or foreign file is never reported as
   injected;
3. asks the CLI itself (``Provider.verification``) whether it is logged in.

The result is recorded on the credentials row (``injected_*``: what the session JSON's
``credentials`` say under ``injected``) and as an audit event.

A login has one holder (``services.grants``): putting it into a VM while another VM holds it
is a **move**. Under the login's move lease the controller takes the files back from the old
holder (read, removed there), seals them in the vault when the CLI had refreshed them, and
only then writes them into the new VM. A holder that cannot be reached makes the move fail
(``holder_unreachable``, 503) unless the caller says ``force``; then the event and the
answer say that a stale copy may remain there. A login captured for an account that already
has one replaces it (renewal in place): the new files go where the old login was, or into
the session's ``cliVmId``, and the old holder loses the old files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from airlock.agent.client import AgentClient, FileWrite
from airlock.clock import Clock
from airlock.domain import grants as grant_policy
from airlock.domain.grants import MoveOutcome, VersionSource
from airlock.domain.vms import VmRole, VmState
from airlock.errors import AirlockError, Conflict, CredentialError, NotFound, Unavailable
from airlock.providers.base import InjectFile, Provider, RunOutcome
from airlock.runtimes.base import Runtime
from airlock.services.bus import SessionBus
from airlock.services.grant_records import record_capture
from airlock.services.grants import GrantService, HolderUnreachable, Lease
from airlock.store.db import Database
from airlock.store.tables import Grant

log = logging.getLogger("airlock.handoff")

# Read back what was written, from inside the VM: digest, mode and owner of each file, and
# the uid the agent (the VM's user) runs as. Standard library only.
_READ_BACK = (
    "import hashlib, json, os, sys\n"
    "out = {'uid': os.getuid(), 'files': {}}\n"
    "for p in sys.argv[1:]:\n"
    "    try:\n"
    "        st = os.lstat(p)\n"
    "        with open(p, 'rb') as f:\n"
    "            digest = hashlib.sha256(f.read()).hexdigest()\n"
    "        out['files'][p] = [digest, st.st_mode & 0o7777, st.st_uid]\n"
    "    except OSError as e:\n"
    "        out['files'][p] = [None, None, e.errno]\n"
    "print(json.dumps(out))\n"
)
_CHANGED = "changed since written"
_EXISTING = 'for p; do [ -e "$p" ] && printf "%s\\n" "$p"; done; exit 0'


@dataclass(frozen=True, slots=True)
class Injection:
    """What one handoff did. ``moved_from``: the VM the login was taken from (None: it came
    from the vault); ``other_holders`` and ``notice``: a VM that may still hold a stale copy
    (only after a forced move from a holder that could not be reached)."""

    vm_id: str
    provider: str
    session_id: str
    at: datetime
    verified: bool
    check: str
    summary: str
    files: list[str]
    grant_id: str = ""
    version: int = 1
    moved_from: str | None = None
    other_holders: list[str] = field(default_factory=list)
    notice: str | None = None


class HandoffService:
    def __init__(
        self,
        *,
        db: Database,
        runtime: Runtime,
        clock: Clock,
        grants: GrantService,
        providers: dict[str, Provider],
        bus: SessionBus,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.clock = clock
        self.grants = grants
        self.providers = providers
        self.bus = bus

    async def after_capture(self, session_id: str) -> None:
        """Place a fresh capture: into the session's CLI VM if it named one, else where the
        login it renews was. Never raises: the capture is stored; a failed handoff is an
        event, and the route can retry."""
        async with self.db.read() as repo:
            session = await repo.auth_session(session_id)
            cred = await repo.credential_of_session(session_id)
            grant = await repo.grant(cred.grant_id) if cred and cred.grant_id else None
            renewed = (
                [
                    g
                    for g in await repo.grants(superseded=True, user_id=grant.user_id)
                    if g.superseded_by == grant.id
                ]
                if grant
                else []
            )
            live = {
                vm.id
                for vm in await repo.vms(
                    ids=[g.holder_vm_id for g in renewed if g.holder_vm_id],
                    states=[s.value for s in VmState if s.live],
                )
            }
        if session is None or grant is None:
            return
        target = session.cli_vm_id
        if target is None:
            target = next((g.holder_vm_id for g in renewed if g.holder_vm_id in live), None)
        for old in renewed:
            await self._retire(old, grant, keep_files=old.holder_vm_id == target)
        if target is None:
            return
        try:
            await self.place(grant, target, session.user_id, actor="controller")
        except AirlockError as exc:
            log.warning(
                "handoff failed: %s",
                exc.message,
                extra={"session_id": session_id, "vm_id": target},
            )
        except Exception:
            log.exception("handoff failed", extra={"session_id": session_id, "vm_id": target})
        await self.bus.publish(session_id)

    async def _retire(self, old: Grant, new: Grant, *, keep_files: bool) -> None:
        """A login replaced by a new one of the same account: its holder gives it up (its
        files are removed there, unless the new login's files are about to overwrite them)."""
        holder = old.holder_vm_id
        if holder is None:
            return
        async with self.grants.moving(old.id, target=None) as lease:
            assert lease is not None  # a waiting claim returns a lease or raises
            if not keep_files:
                try:
                    # The same provider's files: the new login's paths (the old one's
                    # secrets, and so its file list, were wiped when it was superseded).
                    paths = sorted((await self.grants.current(new)).raw)
                    await self.grants.files(holder, paths, take=True)
                except (HolderUnreachable, CredentialError) as exc:
                    log.warning("the renewed login stays in %s: %s", holder, exc.message)
            now = self.clock.now()
            async with self.db.transaction() as repo:
                await repo.set_grant_if_owner(
                    old.id, lease.owner, holder_vm_id=None, holder_since=now
                )
                repo.add_event(
                    at=now,
                    kind="credential",
                    subject_id=old.session_id or old.id,
                    session_id=old.session_id,
                    vm_id=holder,
                    cause="retired",
                    actor="controller",
                    detail={
                        "provider": old.provider,
                        "grantId": old.id,
                        "from": holder,
                        "filesRemoved": not keep_files,
                    },
                )

    async def inject_latest(
        self, *, vm_id: str, user_id: str, provider_id: str, actor: str, force: bool = False
    ) -> Injection:
        """The user's newest login for ``provider_id`` into one of their CLI VMs: a move
        when another VM holds it."""
        if provider_id not in self.providers:
            known = ", ".join(sorted(self.providers))
            raise NotFound(
                f"unknown provider {provider_id!r} (known: {known})", code="provider_not_found"
            )
        async with self.db.transaction() as repo:
            vm = await repo.vm(vm_id)
            if vm is None or vm.user_id != user_id or vm.role != VmRole.CLI:
                raise NotFound(f"no CLI VM {vm_id} for this user", code="vm_not_found")
            # A capture stored by a controller that knew no logins becomes one now.
            for capture in await repo.captures_without_grant(user_id, provider_id):
                await record_capture(repo, capture.session_id, now=capture.captured_at)
            logins = await repo.grants(user_id=user_id, provider=provider_id)
        if not logins:
            raise NotFound(
                f"no {provider_id} credentials captured for this user; log in first",
                code="credentials_not_found",
            )
        injection = await self.place(logins[0], vm_id, user_id, actor=actor, force=force)
        if logins[0].session_id:
            await self.bus.publish(logins[0].session_id)
        return injection

    # --- the move ----------------------------------------------------------------------
    async def place(
        self, grant: Grant, vm_id: str, user_id: str, *, actor: str, force: bool = False
    ) -> Injection:
        """Make ``vm_id`` the login's one holder (``services.grants``, module docstring)."""
        provider = self.providers.get(grant.provider)
        if provider is None:
            raise Unavailable(
                f"provider {grant.provider} is no longer configured", code="provider_unavailable"
            )
        await self._check_target(vm_id, user_id, grant, actor)
        async with self.grants.moving(grant.id, target=vm_id) as lease:
            assert lease is not None
            async with self.db.read() as repo:
                row = await repo.grant(grant.id)
            if row is None:
                raise NotFound("the login was deleted during the handoff")
            grant = row
            plan = grant_policy.plan_move(holder=grant.holder_vm_id, target=vm_id)
            stale: str | None = None
            if plan.take_from is not None:
                stale = await self._take_from(
                    grant, plan.take_from, lease, actor, force=force and not plan.same_vm
                )
            await self._displace(grant, vm_id, actor)
            return await self._deliver(
                grant,
                provider,
                vm_id,
                actor,
                lease,
                moved_from=None if plan.same_vm else plan.take_from,
                stale=stale,
                same_vm=plan.same_vm,
            )

    async def _take_from(
        self, grant: Grant, holder: str, lease: Lease, actor: str, *, force: bool
    ) -> str | None:
        """Take the login back from its holder: its files removed there, sealed here when
        they changed, the vault its holder until the target has it. Returns the holder when
        a stale copy may remain (forced)."""
        async with self.db.read() as repo:
            vm = await repo.vm(holder)
        gone = vm is None or VmState(vm.state).terminal
        stale: str | None = None
        if not gone:
            try:
                files = await self.grants.take(holder, grant)
                await self.grants.seal(
                    grant, files, source=VersionSource.MOVE, vm_id=holder, lease=lease
                )
            except HolderUnreachable as exc:
                if not force:
                    await self.grants.event(
                        grant, "move_refused", holder, actor, {"error": exc.message[:300]}
                    )
                    raise HolderUnreachable(
                        f"the {grant.provider} login is held by CLI VM {holder}, which cannot "
                        f"be reached ({exc.message}); nothing was moved. Retry, or pass "
                        "force=true to move the vault's newest version anyway (a stale copy "
                        "may remain there)"
                    ) from None
                stale = holder
                await self.grants.event(
                    grant,
                    "move_forced",
                    holder,
                    actor,
                    {
                        "from": holder,
                        "error": exc.message[:300],
                        "notice": f"a stale copy may remain in {holder}",
                    },
                )
        now = self.clock.now()
        async with self.db.transaction() as repo:
            if not await repo.set_grant_if_owner(
                grant.id, lease.owner, holder_vm_id=None, holder_since=now, updated_at=now
            ):
                raise Conflict(
                    f"the move lease of login {grant.id} was lost", code="move_lease_lost"
                )
        return stale

    async def _displace(self, grant: Grant, vm_id: str, actor: str) -> None:
        """Another login of the same provider (another account) held by the target: its
        files are about to be overwritten, so the vault takes it back first."""
        async with self.db.read() as repo:
            others = [
                g
                for g in await repo.grants(holder_vm_id=vm_id, provider=grant.provider)
                if g.id != grant.id
            ]
        for other in others:
            async with self.grants.moving(other.id, target=None) as lease:
                assert lease is not None
                try:
                    files = await self.grants.read(vm_id, other)
                    await self.grants.seal(
                        other, files, source=VersionSource.MOVE, vm_id=vm_id, lease=lease
                    )
                except (HolderUnreachable, CredentialError):
                    pass
                now = self.clock.now()
                async with self.db.transaction() as repo:
                    await repo.set_grant_if_owner(
                        other.id, lease.owner, holder_vm_id=None, holder_since=now
                    )
                await self.grants.event(
                    other, "displaced", vm_id, actor, {"from": vm_id, "by": grant.id}
                )

    async def _deliver(
        self,
        grant: Grant,
        provider: Provider,
        vm_id: str,
        actor: str,
        lease: Lease,
        *,
        moved_from: str | None,
        stale: str | None,
        same_vm: bool,
    ) -> Injection:
        creds = await self.grants.current(grant)
        plan = provider.injection(creds)
        written: list[str] = []
        check_ms: int | None = None
        try:
            agent = AgentClient(*await self.runtime.open_agent(vm_id))
            try:
                files = await self._skip_existing(agent, plan)
                written = await agent.write_files(
                    [FileWrite(f.path, f.content, f.mode) for f in files]
                )
                intact, summary = await self._read_back(agent, files)
                if not intact and summary.startswith(_CHANGED):
                    intact, summary = await self._refreshed_since(grant, provider, vm_id, files)
                check = "read-back of the written files (SHA-256, mode 0600, owner)"
                verification = provider.verification()
                if intact and verification is not None:
                    check = verification.check
                    started = time.monotonic()
                    result = await agent.run(verification.argv, timeout_s=verification.timeout_s)
                    check_ms = round((time.monotonic() - started) * 1000)
                    intact, summary = verification.judge(
                        RunOutcome(result.exit_code, result.stdout, result.stderr)
                    )
            finally:
                await agent.close()
        except AirlockError as exc:
            await self._failed(grant, vm_id, actor, exc.message, moved_from=moved_from)
            if await self._vm_state(vm_id) not in (VmState.RUNNING, None):
                raise Conflict(
                    f"CLI VM {vm_id} is being destroyed; the credentials were not injected",
                    code="vm_not_running",
                ) from None
            raise Unavailable(
                f"could not inject into CLI VM {vm_id}: {exc.message}", code="injection_failed"
            ) from None
        return await self._record(
            grant,
            vm_id,
            actor,
            lease,
            verified=intact,
            check=check,
            summary=summary,
            written=written,
            check_ms=check_ms,
            moved_from=moved_from,
            stale=stale,
            same_vm=same_vm,
        )

    async def _check_target(self, vm_id: str, user_id: str, grant: Grant, actor: str) -> None:
        async with self.db.read() as repo:
            vm = await repo.vm(vm_id)
        if vm is None or vm.user_id != user_id or vm.role != VmRole.CLI:
            raise NotFound(f"no CLI VM {vm_id} for this user", code="vm_not_found")
        if vm.state != VmState.RUNNING:
            starting = vm.state == VmState.CREATING
            what = "is still starting" if starting else "is being destroyed"
            if VmState(vm.state).terminal:
                what = f"is {vm.state}"
            message = f"CLI VM {vm_id} {what}; the credentials were not injected"
            await self._failed(grant, vm_id, actor, message, moved_from=None)
            raise Conflict(message, code="vm_not_running")

    async def _vm_state(self, vm_id: str) -> VmState | None:
        async with self.db.read() as repo:
            vm = await repo.vm(vm_id)
        return VmState(vm.state) if vm is not None else None

    async def _skip_existing(self, agent: AgentClient, plan: list[InjectFile]) -> list[InjectFile]:
        optional = [f.path for f in plan if f.only_if_absent]
        if not optional:
            return plan
        result = await agent.run(["/bin/sh", "-c", _EXISTING, "sh", *optional], timeout_s=10)
        existing = set(result.stdout.splitlines())
        return [f for f in plan if not (f.only_if_absent and f.path in existing)]

    async def _read_back(self, agent: AgentClient, files: list[InjectFile]) -> tuple[bool, str]:
        result = await agent.run(
            ["python3", "-c", _READ_BACK, *[f.path for f in files]], timeout_s=20
        )
        try:
            report: dict[str, Any] = json.loads(result.stdout)
            uid = report["uid"]
            seen = report["files"]
        except (ValueError, KeyError, TypeError):
            return False, f"read-back failed (exit {result.exit_code})"
        changed = []
        for f in files:
            digest, mode, owner = seen.get(f.path, [None, None, None])
            if digest is None:
                return False, f"{f.path} does not hold what was written"
            if mode != f.mode or owner != uid:
                return False, f"{f.path} has mode {mode:o} owner {owner}, expected {f.mode:o} {uid}"
            if digest != hashlib.sha256(f.content).hexdigest():
                changed.append(f.path)
        if changed:
            return False, f"{_CHANGED}: {', '.join(changed)}"
        return True, f"{len(files)} file(s) intact, mode 0600, owned by uid {uid}"

    async def _refreshed_since(
        self, grant: Grant, provider: Provider, vm_id: str, files: list[InjectFile]
    ) -> tuple[bool, str]:
        """A file that changed between the write and the read-back: the VM's CLI may have
        refreshed it at once (it holds the login now). Accepted only when it is a valid
        login of the same account, as the provider reads it; the next sync seals it."""
        written = {f.path: f.content for f in files if not f.only_if_absent}
        try:
            now_there = await self.grants.files(vm_id, sorted(written), take=False)
            current = {p: c for p, c in now_there.items() if c is not None}
            creds = provider.normalise({**written, **current}, now=self.clock.now())
        except (HolderUnreachable, CredentialError):
            return False, "the login's files changed after they were written"
        account = grant_policy.account_key(asdict(creds.account))
        if account and grant.account and account != grant.account:
            return False, "the login's files changed after they were written (another account)"
        return True, "the files were written, and the CLI in the VM has refreshed them since"

    async def _failed(
        self, grant: Grant, vm_id: str, actor: str, message: str, *, moved_from: str | None
    ) -> None:
        detail: dict[str, Any] = {"error": message[:300]}
        if moved_from is not None:
            detail["from"] = moved_from
            detail["notice"] = "the login is in the vault: inject it again"
        await self.grants.event(grant, "injection_failed", vm_id, actor, detail)

    async def _record(
        self,
        grant: Grant,
        vm_id: str,
        actor: str,
        lease: Lease,
        *,
        verified: bool,
        check: str,
        summary: str,
        written: list[str],
        check_ms: int | None,
        moved_from: str | None,
        stale: str | None,
        same_vm: bool,
    ) -> Injection:
        now = self.clock.now()
        notice = None
        if stale is not None:
            notice = (
                f"{stale} could not be reached: a stale copy of this {grant.provider} login "
                "may remain there; if its CLI refreshes it, this VM may be logged out"
            )
        outcome = MoveOutcome.MOVED if moved_from is not None else MoveOutcome.INJECTED
        async with self.db.transaction() as repo:
            row = await repo.grant(grant.id, lock=True)
            if row is None or row.move_owner != lease.owner:
                raise Conflict(
                    f"the move lease of login {grant.id} was lost", code="move_lease_lost"
                )
            await repo.set_grant(grant.id, holder_vm_id=vm_id, holder_since=now, updated_at=now)
            if same_vm:
                outcome = MoveOutcome.ALREADY_THERE
            cred = await repo.credential_of_session(grant.session_id) if grant.session_id else None
            if cred is not None:
                cred.injected_vm_id, cred.injected_at, cred.injected_verified = vm_id, now, verified
            repo.add_event(
                at=now,
                kind="credential",
                subject_id=grant.session_id or grant.id,
                session_id=grant.session_id,
                vm_id=vm_id,
                cause="injected",
                actor=actor,
                detail={
                    "provider": grant.provider,
                    "grantId": grant.id,
                    "move": outcome.value,
                    "from": moved_from,
                    "to": vm_id,
                    "version": row.current_version,
                    "verified": verified,
                    "check": check,
                    "result": summary,
                    "checkMs": check_ms,
                    "files": written,
                    "otherHolders": [stale] if stale else [],
                    **({"notice": notice} if notice else {}),
                },
            )
            version = row.current_version
        log.info(
            "credentials injected",
            extra={
                "session_id": grant.session_id,
                "vm_id": vm_id,
                "provider": grant.provider,
                "verified": verified,
            },
        )
        return Injection(
            vm_id=vm_id,
            provider=grant.provider,
            session_id=grant.session_id or "",
            at=now,
            verified=verified,
            check=check,
            summary=summary,
            files=written,
            grant_id=grant.id,
            version=version,
            moved_from=moved_from,
            other_holders=[stale] if stale else [],
            notice=notice,
        )
