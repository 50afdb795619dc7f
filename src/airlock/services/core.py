"""``Core``: one controller's parts, wired from ``Settings``. The API and the CLI both
build one; tests build as many as they like (each with its own data dir or database).

``start()`` migrates the database, reconciles once (adopting what a previous process left
running), recovers sessions, then owns the scheduler and reconciler loops. ``close()``
stops the loops and proxies but leaves VMs running: they outlive the controller, and the
next one adopts them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from airlock.aio import TaskOwner
from airlock.clock import Clock
from airlock.domain.deadlines import DeadlinePolicy, Durations
from airlock.domain.quotas import Limits
from airlock.domain.vms import VmRole
from airlock.metrics import Metrics
from airlock.providers.base import Provider
from airlock.providers.claude_code import ClaudeCodeProvider
from airlock.providers.codex import CodexProvider
from airlock.providers.gemini_cli import GeminiCliProvider
from airlock.providers.oauth2 import OAuth2Provider, demo_oauth2_provider, parse_routes
from airlock.runtimes.base import Runtime
from airlock.services.bus import SessionBus
from airlock.services.egress import EgressManager
from airlock.services.handoff import HandoffService
from airlock.services.reconciler import Reconciler
from airlock.services.scheduler import Scheduler
from airlock.services.sessions import SessionService
from airlock.services.tokens import TokenService
from airlock.services.vms import VmService
from airlock.services.warm_pool import WarmPool
from airlock.settings import Settings
from airlock.store.db import Database
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
        from airlock.runtimes.sandbox import SandboxRuntime

        return SandboxRuntime(
            settings.vms_dir, browser_single_process=settings.browser_single_process
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
        )
    if settings.runtime == "firecracker":
        from airlock.images import find_image
        from airlock.runtimes.firecracker import FirecrackerRuntime, GuestImage

        def image(role: VmRole) -> GuestImage | None:
            found = find_image(settings.image_dir, role.value)
            return GuestImage.from_dir(found.path) if found is not None else None

        return FirecrackerRuntime(
            settings.vms_dir,
            image=image,
            boot_timeout_s=settings.vm_boot_timeout.total_seconds(),
            templates_dir=settings.data_dir / "firecracker-templates",  # snapshot warm starts
            browser_single_process=settings.browser_single_process,
        )
    raise NotImplementedError(f"runtime {settings.runtime!r} is not built yet (see the issues)")


def make_providers(settings: Settings, *, demo: bool) -> dict[str, Provider]:
    extra = parse_routes(settings.oauth2_allowed_hosts)
    if demo:
        oauth2 = demo_oauth2_provider(settings.demo_idp_port)
    else:
        oauth2 = OAuth2Provider(
            authorize_url=settings.oauth2_authorize_url,
            token_url=settings.oauth2_token_url,
            client_id=settings.oauth2_client_id,
            scopes=settings.oauth2_scopes.split(),
            routes=extra,
        )
    vendors: list[Provider] = [ClaudeCodeProvider(), CodexProvider(), GeminiCliProvider()]
    return {p.id: p for p in (oauth2, *vendors)}


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
        self.tasks = TaskOwner("core")
        self.egress = EgressManager()
        self.policy = DeadlinePolicy(durations(settings))
        self.limits = limits(settings)
        self.vault: Vault | None = None
        self.tokens = TokenService(self.db, self.clock)
        self.scheduler = Scheduler(
            db=self.db,
            runtime=self.runtime,
            clock=self.clock,
            metrics=self.metrics,
            bus=self.bus,
            tasks=self.tasks,
            on_destroyed=self.egress.stop,
        )
        self.reconciler = Reconciler(
            db=self.db,
            runtime=self.runtime,
            clock=self.clock,
            metrics=self.metrics,
            bus=self.bus,
            interval=settings.reconcile_interval,
            boot_timeout=settings.vm_boot_timeout,
            on_gone=self.egress.stop,
        )
        self.vms = VmService(
            db=self.db,
            runtime=self.runtime,
            clock=self.clock,
            metrics=self.metrics,
            scheduler=self.scheduler,
            boot_timeout=_service_boot_timeout(settings),
            limits=self.limits,
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
        )
        self._sessions: SessionService | None = None

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
        )
        self.handoff = HandoffService(
            db=self.db,
            runtime=self.runtime,
            clock=self.clock,
            vault=self.vault,
            providers=self.providers,
            bus=self.bus,
        )
        self._sessions.after_capture = self.handoff.after_capture

    async def start(self) -> None:
        """Open, adopt what runs, recover sessions, then run the loops."""
        await self.open()
        self.settings.vms_dir.mkdir(parents=True, exist_ok=True)
        report = await self.reconciler.reconcile_once()
        log.info(
            "start-up reconcile: %d running, %d actions",
            report.running,
            len(report.applied),
            extra={"skipped": report.skipped},
        )
        await self.sessions.recover()
        self.tasks.spawn(self.scheduler.run(), name="scheduler")
        self.tasks.spawn(self.reconciler.run(), name="reconciler")
        if self.settings.warm_pool > 0:
            await self.warm_pool.recover()
            self.tasks.spawn(self.warm_pool.run(), name="warm-pool")

    async def close(self) -> None:
        await self.tasks.close()
        await self.egress.close()
        await self.db.close()


def _private(path: Path) -> None:
    path.chmod(0o700)
