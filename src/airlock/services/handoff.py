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

The result is recorded on the credentials row (``injected_*``: the session's
``credentials.injected``) and as an audit event. A refresh token should live in one place:
the browser VM's copy is wiped at capture, and when a credential goes into a VM while other
live VMs hold the same or an earlier token of that provider, the answer and the event say
that those may be logged out (the vendors rotate single-use refresh tokens).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from airlock.agent.client import AgentClient, FileWrite
from airlock.clock import Clock
from airlock.domain.vms import LIVE, VmRole, VmState
from airlock.errors import AirlockError, Conflict, CredentialError, NotFound, Unavailable
from airlock.providers.base import Account, Credentials, InjectFile, Provider, RunOutcome
from airlock.runtimes.base import Runtime
from airlock.services.bus import SessionBus
from airlock.store.db import Database
from airlock.store.repo import Repo
from airlock.store.tables import AuthSession, Credential, Event, Vm
from airlock.vault import Sealed, Vault

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
_EXISTING = 'for p; do [ -e "$p" ] && printf "%s\\n" "$p"; done; exit 0'


@dataclass(frozen=True, slots=True)
class Injection:
    """What one handoff did; ``notice`` warns about other holders of a refresh token."""

    vm_id: str
    provider: str
    session_id: str
    at: datetime
    verified: bool
    check: str
    summary: str
    files: list[str]
    other_holders: list[str] = field(default_factory=list)
    notice: str | None = None


class HandoffService:
    def __init__(
        self,
        *,
        db: Database,
        runtime: Runtime,
        clock: Clock,
        vault: Vault,
        providers: dict[str, Provider],
        bus: SessionBus,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.clock = clock
        self.vault = vault
        self.providers = providers
        self.bus = bus

    async def after_capture(self, session_id: str) -> None:
        """Inject a fresh capture into the session's CLI VM, if it named one. Never raises:
        the capture is stored; a failed handoff is an event, and the route can retry."""
        async with self.db.read() as repo:
            session = await repo.auth_session(session_id)
            cred = await repo.credential_of_session(session_id)
        if session is None or cred is None or session.cli_vm_id is None:
            return
        try:
            await self._inject(cred, session.cli_vm_id, session.user_id, actor="controller")
        except AirlockError as exc:
            log.warning(
                "handoff failed: %s",
                exc.message,
                extra={"session_id": session_id, "vm_id": session.cli_vm_id},
            )
        except Exception:
            log.exception(
                "handoff failed", extra={"session_id": session_id, "vm_id": session.cli_vm_id}
            )
        await self.bus.publish(session_id)

    async def inject_latest(
        self, *, vm_id: str, user_id: str, provider_id: str, actor: str
    ) -> Injection:
        """The user's latest capture for ``provider_id`` into one of their CLI VMs."""
        if provider_id not in self.providers:
            known = ", ".join(sorted(self.providers))
            raise NotFound(
                f"unknown provider {provider_id!r} (known: {known})", code="provider_not_found"
            )
        async with self.db.transaction() as repo:
            vm = await repo.vm(vm_id)
            if vm is None or vm.user_id != user_id or vm.role != VmRole.CLI:
                raise NotFound(f"no CLI VM {vm_id} for this user", code="vm_not_found")
            cred = await repo.session.scalar(
                select(Credential)
                .where(Credential.user_id == user_id, Credential.provider == provider_id)
                .order_by(Credential.captured_at.desc(), Credential.id.desc())
                .limit(1)
            )
        if cred is None:
            raise NotFound(
                f"no {provider_id} credentials captured for this user; log in first",
                code="credentials_not_found",
            )
        injection = await self._inject(cred, vm_id, user_id, actor=actor)
        await self.bus.publish(cred.session_id)
        return injection

    # --- the handoff itself ------------------------------------------------------------
    async def _inject(self, cred: Credential, vm_id: str, user_id: str, *, actor: str) -> Injection:
        provider = self.providers.get(cred.provider)
        if provider is None:
            raise Unavailable(
                f"provider {cred.provider} is no longer configured", code="provider_unavailable"
            )
        await self._check_target(vm_id, user_id, cred, actor)
        creds = self._decrypt(cred)
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
            await self._failed(cred, vm_id, actor, exc.message)
            if await self._vm_state(vm_id) not in (VmState.RUNNING, None):
                raise Conflict(
                    f"CLI VM {vm_id} is being destroyed; the credentials were not injected",
                    code="vm_not_running",
                ) from None
            raise Unavailable(
                f"could not inject into CLI VM {vm_id}: {exc.message}", code="injection_failed"
            ) from None
        return await self._record(cred, vm_id, actor, intact, check, summary, written, check_ms)

    async def _check_target(self, vm_id: str, user_id: str, cred: Credential, actor: str) -> None:
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
            await self._failed(cred, vm_id, actor, message)
            raise Conflict(message, code="vm_not_running")

    async def _vm_state(self, vm_id: str) -> VmState | None:
        async with self.db.read() as repo:
            vm = await repo.vm(vm_id)
        return VmState(vm.state) if vm is not None else None

    def _decrypt(self, cred: Credential) -> Credentials:
        plaintext = self.vault.open_sealed(
            Sealed(cred.key_id, cred.nonce, cred.ciphertext),
            context=f"{cred.session_id}:{cred.provider}",
        )
        body = json.loads(plaintext)
        try:
            raw = {p: base64.b64decode(d) for p, d in body["raw"].items()}
        except (KeyError, TypeError, ValueError):
            raise CredentialError("the stored credentials carry no raw files") from None
        account = body.get("account") or {}
        return Credentials(
            provider=cred.provider,
            access_token=body.get("accessToken") or "",
            refresh_token=body.get("refreshToken"),
            expires_at=cred.expires_at,
            scopes=list(cred.scopes or []),
            account=Account(
                id=account.get("id"),
                email=account.get("email"),
                organization=account.get("organization"),
            ),
            plan=cred.plan,
            raw=raw,
        )

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
        for f in files:
            digest, mode, owner = seen.get(f.path, [None, None, None])
            if digest != hashlib.sha256(f.content).hexdigest():
                return False, f"{f.path} does not hold what was written"
            if mode != f.mode or owner != uid:
                return False, f"{f.path} has mode {mode:o} owner {owner}, expected {f.mode:o} {uid}"
        return True, f"{len(files)} file(s) intact, mode 0600, owned by uid {uid}"

    async def _failed(self, cred: Credential, vm_id: str, actor: str, message: str) -> None:
        async with self.db.transaction() as repo:
            repo.add_event(
                at=self.clock.now(),
                kind="credential",
                subject_id=cred.session_id,
                session_id=cred.session_id,
                vm_id=vm_id,
                cause="injection_failed",
                actor=actor,
                detail={"provider": cred.provider, "error": message[:300]},
            )

    async def _record(
        self,
        cred: Credential,
        vm_id: str,
        actor: str,
        verified: bool,
        check: str,
        summary: str,
        written: list[str],
        check_ms: int | None,
    ) -> Injection:
        now = self.clock.now()
        async with self.db.transaction() as repo:
            others = await self._other_holders(repo, cred, vm_id)
            row = await repo.session.get(Credential, cred.id)
            if row is None:
                raise NotFound("the credentials were deleted during the handoff")
            row.injected_vm_id, row.injected_at, row.injected_verified = vm_id, now, verified
            notice = None
            if others:
                notice = (
                    f"{', '.join(others)} also hold{'s' if len(others) == 1 else ''} a "
                    f"{cred.provider} refresh token of this user and may be logged out: the "
                    "vendor rotates refresh tokens, and only one copy keeps working"
                )
            repo.add_event(
                at=now,
                kind="credential",
                subject_id=cred.session_id,
                session_id=cred.session_id,
                vm_id=vm_id,
                cause="injected",
                actor=actor,
                detail={
                    "provider": cred.provider,
                    "verified": verified,
                    "check": check,
                    "result": summary,
                    "checkMs": check_ms,
                    "files": written,
                    "otherHolders": others,
                    **({"notice": notice} if notice else {}),
                },
            )
        log.info(
            "credentials injected",
            extra={
                "session_id": cred.session_id,
                "vm_id": vm_id,
                "provider": cred.provider,
                "verified": verified,
            },
        )
        return Injection(
            vm_id=vm_id,
            provider=cred.provider,
            session_id=cred.session_id,
            at=now,
            verified=verified,
            check=check,
            summary=summary,
            files=written,
            other_holders=others,
            notice=notice,
        )

    async def _other_holders(self, repo: Repo, cred: Credential, vm_id: str) -> list[str]:
        """Live VMs other than ``vm_id`` that were given this user's credentials for the
        provider (this capture or an earlier one)."""
        held = await repo.session.scalars(
            select(Event.vm_id)
            .join(AuthSession, AuthSession.id == Event.session_id)
            .where(
                AuthSession.user_id == cred.user_id,
                AuthSession.provider == cred.provider,
                Event.kind == "credential",
                Event.cause == "injected",
                Event.vm_id != vm_id,
            )
        )
        ids = sorted({v for v in held if v})
        if not ids:
            return []
        live = await repo.session.scalars(
            select(Vm.id).where(Vm.id.in_(ids), Vm.state.in_(list(LIVE)))
        )
        return sorted(live)
