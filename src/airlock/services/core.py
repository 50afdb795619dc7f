"""``Core``: one controller's parts, wired from ``Settings``. The API and the CLI both
build one; tests build as many as they like (each with its own data dir or database).

``start()`` migrates the database, reconciles once (adopting what a previous process left
running), recovers sessions, then owns the scheduler and reconciler loops (and, on
PostgreSQL, the events channel: ``LISTEN/NOTIFY`` between controllers). ``close()``
stops the loops and proxies but leaves VMs running: they outlive the controller, and the
next one adopts them.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from airlock.aio import TaskOwner
from airlock.clock import Clock
from airlock.domain.deadlines import DeadlinePolicy, Durations
from airlock.domain.egress_policy import EgressPolicy, PolicyError
from airlock.domain.leases import LeasePolicy
from airlock.domain.nodes import NodeTimes
from airlock.domain.quotas import Limits
from airlock.domain.vms import VmRole
from airlock.errors import RuntimeFailure
from airlock.metrics import Metrics
from airlock.providers.base import Provider
from airlock.providers.claude_code import ClaudeCodeProvider
from airlock.providers.codex import CodexProvider
from airlock.providers.gemini_cli import GeminiCliProvider
from airlock.providers.oauth2 import OAuth2Provider, demo_oauth2_provider
from airlock.runtimes.base import Runtime
from airlock.runtimes.host_checks import HostCheck
from airlock.services.bus import SessionBus
from airlock.services.credential_health import CredentialHealth
from airlock.services.egress import EgressManager
from airlock.services.grants import GrantService
from airlock.services.handoff import HandoffService
from airlock.services.leases import LeaseKeeper
from airlock.services.node_link import NodeCredentials, NodeLink, RoutedRuntime
from airlock.services.nodes import NodeService, check_cluster_key
from airlock.services.placement import BootQueue, Placement
from airlock.services.platform_jwt import JwtConfig, PlatformJwtVerifier
from airlock.services.reconciler import Reconciler
from airlock.services.scheduler import Scheduler
from airlock.services.sessions import SessionService
from airlock.services.tokens import TokenService
from airlock.services.vms import VmService
from airlock.services.warm_pool import WarmPool
from airlock.settings import Settings
from airlock.store.db import Database
from airlock.store.notify import Channel
from airlock.store.tables import Vm
from airlock.vault import Vault

log = logging.getLogger("airlock.core")


def durations(settings: Settings) -> Durations:
    return Durations(
        grace_success=settings.grace_success,
        grace_failure=settings.grace_failure,
        max_drain=settings.max_drain,
        login_timeout=settings.login_timeout,
        max_session=settings.max_session,
        idle_extension=settings.idle_extension,
        keep_failed=settings.debug_keep_failed_vms,
        debug_retention=settings.debug_retention,
    )


def limits(settings: Settings) -> Limits:
    return Limits(
        user_sessions=settings.user_max_sessions,
        user_cli_vms=settings.user_max_cli_vms,
        user_starts_per_minute=settings.user_starts_per_minute,
        node_browser_vms=settings.max_concurrent_vms,
        node_cli_vms=settings.max_concurrent_cli_vms,
    )


# The runtimes enforce AIRLOCK_VM_BOOT_TIMEOUT_MS themselves and say why a boot failed (the
# console's first error); the services' own timeout is a backstop that fires only after it,
# so it never cuts that report off with a bare TimeoutError.
BOOT_BACKSTOP_S = 10.0


def _service_boot_timeout(settings: Settings) -> float:
    return settings.vm_boot_timeout.total_seconds() + BOOT_BACKSTOP_S


def make_runtime(settings: Settings) -> Runtime:
    if settings.runtime == "sandbox":
        from airlock.runtimes.confine import Limits
        from airlock.runtimes.sandbox import SandboxRuntime

        return SandboxRuntime(
            settings.vms_dir,
            browser_single_process=settings.browser_single_process,
            limits=Limits(settings.vm_memory_mb, settings.vm_pids_max, settings.vm_cpu_weight),
            disk_mb=settings.vm_disk_mb,
            uid_base=settings.vm_uid_base,
        )
    if settings.runtime == "qemu":
        from airlock.runtimes.qemu import QemuRuntime

        return QemuRuntime(
            settings.vms_dir,
            settings.image_dir,
            memory_mb=settings.qemu_memory_mb,
            accel=settings.qemu_accel,
            boot_timeout_s=settings.vm_boot_timeout.total_seconds(),
            browser_single_process=settings.browser_single_process,
            uid_base=settings.vm_uid_base,
        )
    if settings.runtime == "firecracker":
        from airlock.images import find_image
        from airlock.runtimes.confine import UID_COUNT
        from airlock.runtimes.firecracker import FirecrackerRuntime
        from airlock.runtimes.firecracker_vmm import GuestImage, Jail

        def image(role: VmRole) -> GuestImage | None:
            found = find_image(settings.image_dir, role.value)
            return GuestImage.from_dir(found.path) if found is not None else None

        # Jailed by default: each Firecracker in its own chroot, cgroup and the jailer's
        # unprivileged uid/gid (the last of the VM uid range, kept for it). Only a root
        # controller can jail; check() says when the jailer is missing.
        jail = None
        firecracker = shutil.which("firecracker")
        if firecracker is not None and os.geteuid() == 0:
            uid = settings.vm_uid_base + UID_COUNT - 1
            jail = Jail(shutil.which("jailer") or "jailer", firecracker, uid=uid, gid=uid)
        return FirecrackerRuntime(
            settings.vms_dir,
            jail=jail,
            image=image,
            boot_timeout_s=settings.vm_boot_timeout.total_seconds(),
            templates_dir=settings.data_dir / "firecracker-templates",  # snapshot warm starts
            browser_single_process=settings.browser_single_process,
        )
    if settings.runtime == "fake":
        from airlock.runtimes.fake import FakeRuntime

        log.warning("AIRLOCK_RUNTIME=fake: VMs are records and idle processes (tests only)")
        return FakeRuntime(settings.vms_dir)
    raise NotImplementedError(f"runtime {settings.runtime!r} is not built yet (see the issues)")


def platform_jwt(settings: Settings) -> PlatformJwtVerifier | None:
    """The verifier of the platform's user JWTs, when a JWKS is configured."""
    if not settings.jwt_jwks_url:
        return None
    assert settings.jwt_issuer and settings.jwt_audience  # Settings checks they come together
    return PlatformJwtVerifier(
        JwtConfig(
            jwks_url=settings.jwt_jwks_url,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            user_claim=settings.jwt_user_claim,
            algorithms=tuple(settings.jwt_algorithm_list),
            leeway=timedelta(milliseconds=settings.jwt_leeway_ms),
            cache_for=timedelta(milliseconds=settings.jwt_jwks_cache_ms),
            refetch_interval=timedelta(milliseconds=settings.jwt_jwks_refetch_ms),
        )
    )


def runtime_host_checks(settings: Settings) -> dict[str, Callable[[], list[HostCheck]]]:
    """What each runtime needs of this host, asked of the runtime's own host module, by
    runtime name (``airlock doctor`` shows them all, required for the configured one)."""
    from airlock.runtimes import firecracker_vmm, kvm_probe, sandbox_host

    return {
        "sandbox": sandbox_host.host_checks,
        "qemu": lambda: kvm_probe.host_checks(settings.image_dir, settings.qemu_accel),
        "firecracker": firecracker_vmm.host_checks,
    }


def make_providers(settings: Settings, *, demo: bool) -> dict[str, Provider]:
    if demo:
        oauth2 = demo_oauth2_provider(settings.demo_idp_port)
    else:
        oauth2 = OAuth2Provider(
            authorize_url=settings.oauth2_authorize_url,
            token_url=settings.oauth2_token_url,
            client_id=settings.oauth2_client_id,
            scopes=settings.oauth2_scopes.split(),
            introspect_url=settings.oauth2_introspect_url,
        )
    vendors: list[Provider] = [ClaudeCodeProvider(), CodexProvider(), GeminiCliProvider()]
    return {p.id: p for p in (oauth2, *vendors)}


def egress_policies(settings: Settings, providers: dict[str, Provider]) -> dict[str, EgressPolicy]:
    """Each provider's own policy with the operator's settings applied. A bad setting
    stops the start with a message naming it."""
    policies: dict[str, EgressPolicy] = {}
    for provider_id, provider in providers.items():
        try:
            policies[provider_id] = provider.egress_policy().with_overrides(
                settings.egress_overrides(provider_id)
            )
        except PolicyError as exc:
            name = f"AIRLOCK_EGRESS_{provider_id.upper()}_*"
            raise ValueError(f"egress settings for {provider_id} ({name}): {exc}") from None
    return policies


class Core:
    def __init__(
        self,
        settings: Settings,
        *,
        demo: bool = False,
        runtime: Runtime | None = None,
        clock: Clock | None = None,
        providers: dict[str, Provider] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or Clock()
        self.db = Database(settings.db_url, node=settings.node_name)
        self.runtime = runtime or make_runtime(settings)
        self.providers = providers if providers is not None else make_providers(settings, demo=demo)
        self.metrics = Metrics()
        self.bus = SessionBus()
        # PostgreSQL: changes reach the other controllers' watchers by LISTEN/NOTIFY (one
        # connection, its own loop); SQLite is one node, the in-process bus is all it needs.
        self.channel: Channel | None = None
        if self.db.is_postgres:
            self.channel = Channel(
                settings.db_url, on_message=self.bus.receive, on_connect=self.bus.wake_all
            )
            self.bus.attach(self.channel.send)
        self.tasks = TaskOwner("core")
        self.egress = EgressManager(
            policies=egress_policies(settings, self.providers),
            db=self.db,
            clock=self.clock,
            metrics=self.metrics,
            bus=self.bus,
            flush_interval=settings.egress_flush_ms / 1000,
        )
        self.policy = DeadlinePolicy(durations(settings))
        self.limits = limits(settings)
        self.lease = LeasePolicy(
            length=settings.vm_lease, margin=settings.vm_lease_margin, boot=settings.vm_boot_timeout
        )
        self.leases = LeaseKeeper(
            db=self.db,
            runtime=self.runtime,
            clock=self.clock,
            policy=self.lease,
            metrics=self.metrics,
        )
        self.vault: Vault | None = None
        self.tokens = TokenService(self.db, self.clock)
        self.platform_jwt = platform_jwt(settings)
        self.scheduler = Scheduler(
            db=self.db,
            runtime=self.runtime,
            clock=self.clock,
            metrics=self.metrics,
            bus=self.bus,
            tasks=self.tasks,
            on_destroyed=self._vm_gone,
        )
        self.reconciler = Reconciler(
            db=self.db,
            runtime=self.runtime,
            clock=self.clock,
            metrics=self.metrics,
            bus=self.bus,
            interval=settings.reconcile_interval,
            boot_timeout=settings.vm_boot_timeout,
            on_gone=self._vm_gone,
        )
        node_times = NodeTimes(settings.node_heartbeat, settings.node_lease, settings.node_grace)
        self.placement = Placement(name=settings.node_name, clock=self.clock, times=node_times)
        self.vms = VmService(
            db=self.db,
            runtime=self.runtime,
            clock=self.clock,
            metrics=self.metrics,
            scheduler=self.scheduler,
            boot_timeout=_service_boot_timeout(settings),
            limits=self.limits,
            placement=self.placement,
            on_running=lambda vm_id, state_dir: self.egress.start_cli(
                vm_id, state_dir / "egress.sock"
            ),
        )
        self.vms.poke = self._poke
        self.boot_queue = BootQueue(
            db=self.db,
            clock=self.clock,
            placement=self.placement,
            tasks=self.tasks,
            take_up=self._take_up,
            give_up=self._give_up,
            poke_peer=self._poke,
            capacity=self._capacity,
        )
        self.warm_pool = WarmPool(
            db=self.db,
            runtime=self.runtime,
            clock=self.clock,
            metrics=self.metrics,
            scheduler=self.scheduler,
            tasks=self.tasks,
            size=settings.warm_pool,
            max_age=settings.warm_pool_max_age,
            boot_timeout=_service_boot_timeout(settings),
            max_browser_vms=settings.max_concurrent_vms,
            lease=self.lease,
        )
        self.nodes = NodeService(
            db=self.db,
            clock=self.clock,
            metrics=self.metrics,
            bus=self.bus,
            name=settings.node_name,
            internal_url=settings.internal_url,
            public_url=settings.base_url,
            browser_capacity=settings.max_concurrent_vms,
            cli_capacity=settings.max_concurrent_cli_vms,
            times=node_times,
        )
        self._sessions: SessionService | None = None
        self._routed: RoutedRuntime | None = None
        self._credentials: NodeCredentials | None = None

    @property
    def routed(self) -> RoutedRuntime:
        """The runtime whose streams reach a VM on whichever node holds it."""
        if self._routed is None:
            raise RuntimeError("Core.open() has not run")
        return self._routed

    @property
    def node_credentials(self) -> NodeCredentials:
        if self._credentials is None:
            raise RuntimeError("Core.open() has not run")
        return self._credentials

    async def _internal_url(self, node: str) -> str | None:
        async with self.db.read() as repo:
            row = await repo.node_row(node)
        return row.internal_url if row is not None else None
        self.grants: GrantService | None = None

    async def _vm_gone(self, vm_id: str) -> None:
        """A VM is destroyed or vanished: its egress stops, its logins go to the vault."""
        await self.egress.stop(vm_id)
        if self.grants is not None:
            await self.grants.released(vm_id)

    @property
    def sessions(self) -> SessionService:
        if self._sessions is None:
            raise RuntimeError("Core.start() has not run")
        return self._sessions

    async def open(self) -> None:
        """Database and vault only: what the CLI needs for tokens and listings."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        _private(self.settings.data_dir)
        await self.db.migrate()
        self.vault = Vault.open(self.settings.key_file)
        await check_cluster_key(
            self.db,
            self.vault,
            key_file=self.settings.key_file,
            node=self.settings.node_name,
            now=self.clock.now(),
        )
        self._credentials = NodeCredentials(self.vault, self.settings.node_name, self.clock)
        self._routed = RoutedRuntime(
            self.runtime,
            db=self.db,
            link=NodeLink(self._credentials, self.tasks),
            node=self.settings.node_name,
            internal_url=self._internal_url,
        )
        self.scheduler.remote_destroy = self._remote_destroy
        self._sessions = SessionService(
            db=self.db,
            runtime=self.runtime,
            clock=self.clock,
            policy=self.policy,
            providers=self.providers,
            vault=self.vault,
            metrics=self.metrics,
            bus=self.bus,
            egress=self.egress,
            scheduler=self.scheduler,
            tasks=self.tasks,
            boot_timeout=_service_boot_timeout(self.settings),
            limits=self.limits,
            warm_pool=self.warm_pool,
            lease=self.lease,
            placement=self.placement,
        )
        self._sessions.poke = self._poke
        self.grants = GrantService(
            db=self.db,
            runtime=self.routed,  # a login's holder VM may be on another node
            clock=self.clock,
            vault=self.vault,
            providers=self.providers,
            tasks=self.tasks,
            sync_interval=self.settings.credential_sync,
            retention=self.settings.credential_retention,
        )
        self.scheduler.before_destroy = self.grants.before_destroy
        self.handoff = HandoffService(
            db=self.db,
            runtime=self.routed,
            clock=self.clock,
            grants=self.grants,
            providers=self.providers,
            bus=self.bus,
        )
        self._sessions.after_capture = self.handoff.after_capture
        self.health = CredentialHealth(
            db=self.db,
            runtime=self.routed,
            clock=self.clock,
            vault=self.vault,
            providers=self.providers,
            bus=self.bus,
            interval_s=self.settings.credential_check_ms / 1000,
            expiring_within=timedelta(milliseconds=self.settings.credential_expiring_ms),
        )

    async def start(self) -> None:
        """Open, adopt what runs, recover sessions, then run the loops. The node is
        registered not ready first (so peers can reach it), and ready only after its
        reconcile: a node that returns kills what the database says is gone and adopts
        what is still wanted before it takes new VMs."""
        await self.open()
        self.settings.vms_dir.mkdir(parents=True, exist_ok=True)
        await self.nodes.register(ready=False)
        report = await self.reconciler.reconcile_once()
        log.info(
            "start-up reconcile: %d running, %d actions",
            report.running,
            len(report.applied),
            extra={"skipped": report.skipped},
        )
        await self.sessions.recover()
        await self.nodes.register(ready=True)
        self.tasks.spawn(self.nodes.run(), name="nodes")
        self.tasks.spawn(self.boot_queue.run(), name="boot-queue")
        await self.vms.adopt()
        if self.channel is not None:
            self.tasks.spawn(self.channel.run(), name="events")
        self.tasks.spawn(self.scheduler.run(), name="scheduler")
        self.tasks.spawn(self.reconciler.run(), name="reconciler")
        self.tasks.spawn(self.leases.run(), name="leases")
        if self.settings.credential_check_ms > 0:
            self.tasks.spawn(self.health.run(), name="credential-health")
        if self.grants is not None:
            self.tasks.spawn(self.grants.run(), name="credential-sync")
        if self.settings.warm_pool > 0:
            await self.warm_pool.recover()
            self.tasks.spawn(self.warm_pool.run(), name="warm-pool")

    # --- placement: what this node does with VMs placed on it --------------------------
    async def _poke(self, node: str) -> None:
        if node == self.settings.node_name:
            self.boot_queue.poke()
            return
        url = await self._internal_url(node)
        if url is not None:
            await self.routed.link.poke(url)

    def _capacity(self, role: VmRole) -> int:
        if role is VmRole.BROWSER:
            return self.settings.max_concurrent_vms
        return self.settings.max_concurrent_cli_vms

    async def _take_up(self, vm: Vm) -> str | None:
        if vm.role == VmRole.CLI.value:
            return await self.vms.take_up(vm, actor="placement")
        return await self.sessions.take_up(vm)

    async def _give_up(self, vm: Vm, why: str) -> None:
        if vm.role == VmRole.CLI.value:
            await self.vms.give_up(vm, why, actor="placement")
        else:
            await self.sessions.give_up(vm, why)

    async def _remote_destroy(self, node: str, vm_id: str, reason: str, actor: str) -> bool:
        url = await self._internal_url(node)
        if url is None:
            raise RuntimeFailure(f"{vm_id} is on node {node}, which is not registered")
        return await self.routed.link.destroy(url, vm_id, reason=reason, actor=actor)

    async def close(self) -> None:
        await self.tasks.close()
        if self.channel is not None:
            await self.channel.flush()  # what a CLI process changed reaches the controllers
        # A runtime that holds connections in this process (the fake runtime's agents)
        # hangs them up; the others keep nothing here that outlives the tasks.
        close = getattr(self.runtime, "close", None)
        if close is not None:
            await close()
        if self.platform_jwt is not None:
            await self.platform_jwt.close()
        await self.egress.close()
        await self.db.close()


def _private(path: Path) -> None:
    path.chmod(0o700)
