"""Logins with exactly one holder: the vault's versions, the move lease, sync back.

A login (``store.tables.Grant``) may be refreshed in one place only: its holder, one CLI VM,
or nobody (the vault). This module keeps the vault's copy current and the holder single:

- ``record_capture``: a capture becomes a new login (version 1: the capture's own sealed
  blob). A capture of an account that already has a login supersedes it (renewal): the old
  login's secrets are wiped at once, and the handoff gives its holder the new files.
- ``moving``: the move lease. Taken under the row lock (``SELECT ... FOR UPDATE`` on
  PostgreSQL; SQLite's one write lock from ``BEGIN IMMEDIATE``), so two controllers cannot
  both hold it; held across the agent I/O of a move, not a database transaction, so that
  each step is committed as it happens (a crash after the files left the old holder still
  finds them sealed in the vault). A waiter polls until the lease is free.
- ``take`` / ``read``: the holder's credential files through its guest agent, removed there
  (take: renamed away first, so a CLI that refreshes during the read writes a new file that
  the next round of the same op takes too) or left in place (read).
- ``seal``: what was read becomes the newest version when it differs; the previous one is
  superseded, its secret wiped after ``AIRLOCK_CREDENTIAL_RETENTION_MS``.
- ``sync_all`` (the loop, every ``AIRLOCK_CREDENTIAL_SYNC_MS``), ``before_destroy`` (a CLI VM
  about to be destroyed) and ``released`` (one destroyed or lost): the vault keeps the newest
  refresh token and a VM that is gone hands its login back to the vault.

No secret leaves through here: events and logs carry paths, versions and VM ids only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from airlock.agent.client import AgentClient
from airlock.aio import TaskOwner
from airlock.clock import Clock
from airlock.domain import grants as policy
from airlock.domain.grants import VersionSource
from airlock.errors import AirlockError, Conflict, CredentialError, Unavailable
from airlock.providers.base import Credentials, Provider
from airlock.runtimes.base import Runtime
from airlock.services.grant_records import context_of, credentials_body, credentials_from_body
from airlock.store.db import Database
from airlock.store.tables import Grant, GrantVersion
from airlock.vault import Sealed, Vault

log = logging.getLogger("airlock.grants")

# Reads a login's files in the VM (home-relative paths; the agent runs it in the home) and
# prints them base64 in JSON. ``take`` renames each file away before reading it and shreds
# it after, again until the path stays empty: a CLI that refreshed meanwhile wrote a new file
# there, and the newest is what the vault must get. Where a refresher locks its file (a
# ``.lock`` beside it, flock: the ``oauth2`` refresher), the take holds that lock, so a
# refresh under way finishes first and none starts until the file is gone. Stdlib only.
_FILES = (
    "import base64, fcntl, json, os, sys\n"
    "take = sys.argv[1] == 'take'\n"
    "out = {}\n"
    "for p in sys.argv[2:]:\n"
    "    out[p] = None\n"
    "    lock = None\n"
    "    if take and os.path.exists(p + '.lock'):\n"
    "        lock = os.open(p + '.lock', os.O_RDWR | os.O_CLOEXEC)\n"
    "        fcntl.flock(lock, fcntl.LOCK_EX)\n"
    "    for _ in range(5):\n"
    "        src = p + '.airlock-take' if take else p\n"
    "        try:\n"
    "            if take:\n"
    "                os.rename(p, src)\n"
    "            with open(src, 'rb') as f:\n"
    "                data = f.read()\n"
    "        except FileNotFoundError:\n"
    "            break\n"
    "        out[p] = base64.b64encode(data).decode()\n"
    "        if not take:\n"
    "            break\n"
    "        with open(src, 'r+b') as f:\n"
    "            f.write(b'\\0' * len(data))\n"
    "            f.flush()\n"
    "            os.fsync(f.fileno())\n"
    "        os.unlink(src)\n"
    "    if lock is not None:\n"
    "        os.close(lock)\n"
    "print(json.dumps(out))\n"
)


class HolderUnreachable(Unavailable):
    """The login's holder could not be read back (VM lost, agent dead)."""

    code = "holder_unreachable"


@dataclass(frozen=True, slots=True)
class Lease:
    """A move lease held by this process: its owner id and the login it is on."""

    grant_id: str
    owner: str


class GrantService:
    def __init__(
        self,
        *,
        db: Database,
        runtime: Runtime,
        clock: Clock,
        vault: Vault,
        providers: Mapping[str, Provider],
        tasks: TaskOwner,
        sync_interval: timedelta,
        retention: timedelta,
        move_lease: timedelta = timedelta(seconds=120),
        move_wait: timedelta = timedelta(seconds=300),
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.clock = clock
        self.vault = vault
        self.providers = providers
        self.tasks = tasks
        self.sync_interval = sync_interval
        self.retention = retention
        self.move_lease = move_lease
        self.move_wait = move_wait
        # One waiter at a time per login in this process; others queue here, not in the
        # database. Across controllers the lease decides.
        self._local: dict[str, asyncio.Lock] = {}

    # --- reading ----------------------------------------------------------------------
    async def of_user(self, user_id: str) -> list[tuple[Grant, list[GrantVersion]]]:
        async with self.db.read() as repo:
            grants = await repo.grants(user_id=user_id)
            versions = await repo.grant_versions([g.id for g in grants])
        by: dict[str, list[GrantVersion]] = {}
        for v in versions:
            by.setdefault(v.grant_id, []).append(v)
        return [(g, by.get(g.id, [])) for g in grants]

    async def current(self, grant: Grant) -> Credentials:
        """The vault's newest version of a login, decrypted."""
        async with self.db.read() as repo:
            version = await repo.grant_version(grant.id, grant.current_version)
        if version is None or version.ciphertext is None or version.nonce is None:
            raise CredentialError(
                f"the {grant.provider} login {grant.id} has no sealed version; log in again"
            )
        return self.open(grant, version)

    def open(self, grant: Grant, version: GrantVersion) -> Credentials:
        assert version.key_id is not None and version.nonce is not None
        assert version.ciphertext is not None
        plaintext = self.vault.open_sealed(
            Sealed(version.key_id, version.nonce, version.ciphertext),
            context=context_of(grant, version),
        )
        return credentials_from_body(grant.provider, plaintext)

    # --- the move lease ---------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def moving(
        self, grant_id: str, *, target: str | None, wait: bool = True
    ) -> AsyncIterator[Lease | None]:
        """Hold the login's move lease for the block; None (without waiting) when ``wait``
        is False and someone else holds it. Raises ``Conflict`` when it stays taken for
        longer than the wait."""
        lock = self._local.setdefault(grant_id, asyncio.Lock())
        if not wait and lock.locked():
            yield None
            return
        async with lock:
            lease = await self._claim(grant_id, target=target, wait=wait)
            if lease is None:
                yield None
                return
            try:
                yield lease
            finally:
                with contextlib.suppress(Exception):
                    async with self.db.transaction() as repo:
                        await repo.set_grant_if_owner(
                            grant_id,
                            lease.owner,
                            move_owner=None,
                            move_lease_until=None,
                            move_target_vm_id=None,
                        )

    async def _claim(self, grant_id: str, *, target: str | None, wait: bool) -> Lease | None:
        owner = secrets.token_hex(8)
        give_up = self.clock.now() + self.move_wait
        delay = 0.02
        while True:
            now = self.clock.now()
            async with self.db.transaction() as repo:
                grant = await repo.grant(grant_id, lock=True)
                if grant is None:
                    raise Conflict(f"the login {grant_id} is gone", code="grant_not_found")
                if await repo.claim_move(
                    grant_id, owner=owner, now=now, until=now + self.move_lease, target=target
                ):
                    stale = grant.move_owner is not None and grant.move_target_vm_id
                    stale_target = grant.move_target_vm_id if stale else None
                    break
            if not wait:
                return None
            if now >= give_up:
                raise Conflict(
                    f"another move of the login {grant_id} is still under way; try again",
                    code="move_in_progress",
                    retry_after=5,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        lease = Lease(grant_id, owner)
        if stale_target and stale_target != grant.holder_vm_id:
            # A move that died half way may have written into its target: take that copy
            # back before anything else, so no second holder is left behind.
            await self._recover(grant, lease, stale_target)
        return lease

    async def _recover(self, grant: Grant, lease: Lease, vm_id: str) -> None:
        try:
            files = await self.take(vm_id, grant)
        except HolderUnreachable:
            return
        if any(v is not None for v in files.values()):
            await self.seal(grant, files, source=VersionSource.MOVE, vm_id=vm_id, lease=lease)
            await self.event(grant, "move_recovered", vm_id, "controller", {"from": vm_id})

    # --- the holder's files -----------------------------------------------------------
    async def files(self, vm_id: str, paths: list[str], *, take: bool) -> dict[str, bytes | None]:
        """The files at ``paths`` in ``vm_id`` (removed there with ``take``). Raises
        ``HolderUnreachable`` when its agent does not answer."""
        try:
            agent = AgentClient(*await self.runtime.open_agent(vm_id))
        except AirlockError as exc:
            raise HolderUnreachable(f"CLI VM {vm_id} cannot be reached: {exc.message}") from None
        except OSError as exc:
            raise HolderUnreachable(f"CLI VM {vm_id} cannot be reached: {exc}") from None
        try:
            result = await agent.run(
                ["python3", "-c", _FILES, "take" if take else "read", *paths], timeout_s=30
            )
        except AirlockError as exc:
            raise HolderUnreachable(
                f"CLI VM {vm_id} did not answer the read-back: {exc.message}"
            ) from None
        finally:
            await agent.close()
        try:
            seen = json.loads(result.stdout)
            return {
                p: (base64.b64decode(seen[p]) if seen.get(p) is not None else None) for p in paths
            }
        except (ValueError, KeyError, TypeError):
            raise HolderUnreachable(
                f"CLI VM {vm_id}: the read-back failed (exit {result.exit_code}, "
                f"{'truncated' if result.truncated else 'complete'})"
            ) from None

    async def take(self, vm_id: str, grant: Grant) -> dict[str, bytes | None]:
        creds = await self.current(grant)
        return await self.files(vm_id, sorted(creds.raw), take=True)

    async def read(self, vm_id: str, grant: Grant) -> dict[str, bytes | None]:
        creds = await self.current(grant)
        return await self.files(vm_id, sorted(creds.raw), take=False)

    async def seal(
        self,
        grant: Grant,
        files: Mapping[str, bytes | None],
        *,
        source: VersionSource,
        vm_id: str,
        lease: Lease | None,
    ) -> int | None:
        """Seal what was read back as the newest version when it differs from the vault's;
        the new version's number, or None when nothing changed (or it is unusable)."""
        read = {p: c for p, c in files.items() if c is not None}
        stored = await self.current(grant)
        if not policy.changed(stored.raw, read):
            async with self.db.transaction() as repo:
                await repo.set_grant(grant.id, last_synced_at=self.clock.now())
            return None
        provider = self.providers.get(grant.provider)
        merged = policy.merge_files(stored.raw, read)
        now = self.clock.now()
        try:
            if provider is None:
                raise CredentialError(f"provider {grant.provider} is no longer configured")
            creds = provider.normalise(merged, now=now)
        except CredentialError as exc:
            # A file the CLI (or someone in the VM) broke is not sealed over a good one.
            await self.event(
                grant, "sync_rejected", vm_id, "controller", {"error": exc.message[:300]}
            )
            return None
        creds = Credentials(
            provider=creds.provider,
            access_token=creds.access_token,
            refresh_token=creds.refresh_token,
            expires_at=creds.expires_at,
            scopes=creds.scopes,
            account=creds.account if any(asdict(creds.account).values()) else stored.account,
            plan=creds.plan or stored.plan,
            raw=merged,
        )
        async with self.db.transaction() as repo:
            row = await repo.grant(grant.id, lock=True)
            if row is None:
                return None
            if lease is not None and row.move_owner != lease.owner:
                raise Conflict(
                    f"the move lease of login {grant.id} was lost", code="move_lease_lost"
                )
            number = row.current_version + 1
            sealed = self.vault.seal(
                credentials_body(creds),
                context=policy.version_context(
                    grant_id=grant.id,
                    version=number,
                    provider=grant.provider,
                    source=source.value,
                    session_id=None,
                ),
            )
            await repo.add_version(
                row,
                source=source.value,
                key_id=sealed.key_id,
                nonce=sealed.nonce,
                ciphertext=sealed.ciphertext,
                now=now,
                vm_id=vm_id,
            )
            await repo.set_grant(
                grant.id,
                access_expires_at=creds.expires_at,
                last_refresh_seen_at=now,
                last_synced_at=now,
                updated_at=now,
            )
            repo.add_event(
                at=now,
                kind="credential",
                subject_id=grant.session_id or grant.id,
                session_id=grant.session_id,
                vm_id=vm_id,
                cause="synced" if source is VersionSource.SYNC else "taken",
                actor="controller",
                detail={
                    "provider": grant.provider,
                    "grantId": grant.id,
                    "version": number,
                    "source": source.value,
                    "files": sorted(p for p in read if stored.raw.get(p) != read[p]),
                },
            )
        grant.current_version = number
        log.info(
            "login version sealed",
            extra={"vm_id": vm_id, "provider": grant.provider, "version": number},
        )
        return number

    # --- sync back --------------------------------------------------------------------
    async def sync(self, grant_id: str, *, wait: bool = False) -> int | None:
        """Read the holder's files; seal them when the CLI refreshed them. None when nothing
        changed, the login is being moved (and ``wait`` is False), or its holder is gone."""
        async with self.moving(grant_id, target=None, wait=wait) as lease:
            if lease is None:
                return None
            async with self.db.read() as repo:
                grant = await repo.grant(grant_id)
            if grant is None or grant.holder_vm_id is None or grant.superseded_at is not None:
                return None
            try:
                files = await self.read(grant.holder_vm_id, grant)
            except HolderUnreachable as exc:
                log.info("sync back skipped: %s", exc.message, extra={"vm_id": grant.holder_vm_id})
                return None
            except CredentialError:
                return None
            return await self.seal(
                grant, files, source=VersionSource.SYNC, vm_id=grant.holder_vm_id, lease=lease
            )

    async def sync_all(self) -> int:
        """One round: every held login of this node's VMs; then the retention sweep."""
        async with self.db.read() as repo:
            held = await repo.grants(held=True)
            mine = {vm.id for vm in await repo.live_vms()}
        synced = 0
        for grant in held:
            if grant.holder_vm_id not in mine:
                continue
            try:
                if await self.sync(grant.id) is not None:
                    synced += 1
            except AirlockError as exc:
                log.warning(
                    "sync back failed: %s", exc.message, extra={"vm_id": grant.holder_vm_id}
                )
        await self.wipe_due()
        return synced

    async def wipe_due(self) -> int:
        now = self.clock.now()
        async with self.db.transaction() as repo:
            wiped = await repo.wipe_versions(superseded_before=now - self.retention, now=now)
        if wiped:
            log.info("wiped the secrets of %d superseded login version(s)", wiped)
        return wiped

    async def run(self) -> None:
        while not self.tasks.closed:
            try:
                await self.sync_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("credential sync round failed; retrying")
            await asyncio.sleep(self.sync_interval.total_seconds())

    # --- a holder that goes away ------------------------------------------------------
    async def before_destroy(self, vm_id: str) -> None:
        """A CLI VM is about to be destroyed: the vault takes each login it holds, newest
        files first. Never raises: the destroy goes ahead whatever happens here."""
        async with self.db.read() as repo:
            held = await repo.grants(holder_vm_id=vm_id, superseded=None)
        for grant in held:
            try:
                async with self.moving(grant.id, target=None) as lease:
                    assert lease is not None
                    try:
                        files = await self.take(vm_id, grant)
                        await self.seal(
                            grant, files, source=VersionSource.SYNC, vm_id=vm_id, lease=lease
                        )
                    except HolderUnreachable as exc:
                        log.warning("login not read back before destroy: %s", exc.message)
                    await self._to_vault(grant, vm_id, cause="returned", lease=lease)
            except Exception:
                log.exception("handing a login back before destroy failed", extra={"vm_id": vm_id})

    async def released(self, vm_id: str) -> None:
        """A CLI VM is destroyed or lost: each login it still holds goes back to the vault
        (whose newest version is the last one read back)."""
        async with self.db.read() as repo:
            held = await repo.grants(holder_vm_id=vm_id, superseded=None)
        for grant in held:
            try:
                async with self.moving(grant.id, target=None) as lease:
                    await self._to_vault(grant, vm_id, cause="returned", lease=lease)
            except Exception:
                log.exception("handing a login back failed", extra={"vm_id": vm_id})

    async def _to_vault(self, grant: Grant, vm_id: str, *, cause: str, lease: Lease | None) -> None:
        now = self.clock.now()
        async with self.db.transaction() as repo:
            row = await repo.grant(grant.id, lock=True)
            if row is None or row.holder_vm_id != vm_id:
                return
            await repo.set_grant(grant.id, holder_vm_id=None, holder_since=now, updated_at=now)
            repo.add_event(
                at=now,
                kind="credential",
                subject_id=grant.session_id or grant.id,
                session_id=grant.session_id,
                vm_id=vm_id,
                cause=cause,
                actor="controller",
                detail={
                    "provider": grant.provider,
                    "grantId": grant.id,
                    "from": vm_id,
                    "to": None,
                    "version": row.current_version,
                },
            )

    async def event(
        self, grant: Grant, cause: str, vm_id: str | None, actor: str, detail: dict[str, Any]
    ) -> None:
        async with self.db.transaction() as repo:
            repo.add_event(
                at=self.clock.now(),
                kind="credential",
                subject_id=grant.session_id or grant.id,
                session_id=grant.session_id,
                vm_id=vm_id,
                cause=cause,
                actor=actor,
                detail={"provider": grant.provider, "grantId": grant.id, **detail},
            )
