"""Every setting Airlock reads, from ``AIRLOCK_*`` environment variables or a ``.env`` file.

Settings are built where the process starts (``create_app()``, the CLI), never at import,
so tests can make as many differently configured controllers as they like.
Durations are milliseconds in the environment (the contract of ``http-api.md``) and
exposed as ``timedelta`` properties, so no code below does unit arithmetic.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RuntimeName = Literal["sandbox", "qemu", "firecracker"]


class Settings(BaseSettings):
    """The controller's configuration. Each field is documented in the README."""

    model_config = SettingsConfigDict(
        env_prefix="AIRLOCK_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # --- where it listens -------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the HTTP API listens on.")
    port: int = Field(4000, ge=0, le=65535, description="Port the HTTP API listens on.")
    public_url: str | None = Field(
        None,
        description="Base URL users reach the API at; builds novncURL. Default http://{host}:{port}.",
    )

    # --- where it keeps things --------------------------------------------------------
    data_dir: Path = Field(Path("./data"), description="Database, keys and VM state.")
    database_url: str | None = Field(
        None, description="SQLAlchemy async URL. Default: SQLite file in the data dir."
    )
    runtime: RuntimeName = Field("sandbox", description="Which VM runtime runs the VMs.")
    image_dir: Path = Field(
        Path("~/.cache/airlock/images"),
        description="Guest images for the qemu and firecracker runtimes (content-addressed).",
    )
    qemu_memory_mb: int = Field(512, ge=128, description="Memory of each qemu VM, in MiB.")
    qemu_accel: Literal["auto", "kvm", "tcg"] = Field(
        "auto", description="qemu accelerator: auto probes whether KVM runs a stock kernel."
    )
    secret_key_file: Path | None = Field(
        None, description="AES-GCM key file for credentials; created 0600 on first start."
    )

    # --- the lifecycle (lifecycle.md, "Deadlines are data") ---------------------------
    grace_success_ms: int = Field(
        30_000,
        ge=0,
        validation_alias=AliasChoices("AIRLOCK_GRACE_SUCCESS_MS", "BROWSER_VM_GRACE_PERIOD_MS"),
        description="How long a browser VM stays after a successful login.",
    )
    grace_failure_ms: int = Field(5_000, ge=0, description="How long it stays after a failure.")
    max_drain_ms: int = Field(120_000, ge=0, description="Cap on keepalives after completion.")
    login_timeout_ms: int = Field(600_000, gt=0, description="Login deadline from session start.")
    max_session_ms: int = Field(1_800_000, gt=0, description="Cap on viewer extensions.")
    idle_extension_ms: int = Field(120_000, ge=0, description="Extension per viewer keepalive.")
    debug_keep_failed_vms: bool = Field(False, description="Retain failed VMs for debugging.")
    debug_retention_ms: int = Field(
        3_600_000, ge=0, description="How long a retained VM is kept; 0 keeps it until deleted."
    )
    reconcile_interval_ms: int = Field(5_000, gt=0, description="Reconciler period.")
    warm_pool: int = Field(0, ge=0, description="Booted browser VMs kept ready.")
    warm_pool_max_age_ms: int = Field(
        600_000, gt=0, description="A warm VM unused this long is retired and replaced."
    )
    credential_export: bool = Field(
        False, description="Allow service tokens to read secret credential values."
    )
    viewer_token_ttl_ms: int = Field(
        600_000, gt=0, description="How long a viewer token (in novncURL) opens the viewer."
    )

    # --- the demo identity provider and the generic oauth2 provider -------------------
    demo_user: str = Field("demo", description="The demo identity provider's user name.")
    demo_password: str = Field("demo", description="The demo identity provider's password.")
    demo_idp_port: int = Field(4001, ge=0, le=65535, description="Port of the demo IdP.")
    oauth2_authorize_url: str | None = Field(None, description="oauth2 provider: authorize URL.")
    oauth2_token_url: str | None = Field(None, description="oauth2 provider: token URL.")
    oauth2_client_id: str | None = Field(None, description="oauth2 provider: client id.")
    oauth2_scopes: str = Field("openid profile", description="oauth2 provider: scopes.")
    oauth2_allowed_hosts: str = Field(
        "", description="Extra host:port pairs the browser VM may reach (comma separated)."
    )

    # --- operations -------------------------------------------------------------------
    node_name: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=128,
        description="This host's name on VM rows: a controller schedules and reconciles only "
        "its own node's VMs when several share one database.",
    )
    log_level: str = Field("INFO", description="Logging level.")
    log_json: bool | None = Field(None, description="JSON logs; default: when not a TTY.")
    vm_boot_timeout_ms: int = Field(60_000, gt=0, description="How long a VM may take to boot.")
    max_concurrent_vms: int = Field(
        64,
        gt=0,
        description="Browser VMs a controller runs: every live one counts, warm, draining, "
        "retained and destroying included. A start past it is 503 with Retry-After.",
    )
    max_concurrent_cli_vms: int = Field(
        64, gt=0, description="CLI VMs a controller runs (their own cap); past it 503."
    )

    # --- quotas and rate limits ------------------------------------------------------
    user_max_sessions: int = Field(
        3, gt=0, description="Live login sessions one user may have at once; past it 429."
    )
    user_max_cli_vms: int = Field(
        5, gt=0, description="Live CLI VMs one user may have (every node); past it 429."
    )
    user_starts_per_minute: int = Field(
        10, gt=0, description="Logins plus CLI VMs one user may start a minute; past it 429."
    )
    client_requests_per_minute: int = Field(
        600,
        ge=0,
        description="Per client address: requests to routes without an API token (viewer "
        "pages and sockets, operations) and refused API tokens; past it 429. "
        "0 turns the limit off.",
    )
    trusted_proxies: str = Field(
        "",
        description="Comma-separated addresses or networks (CIDR) of reverse proxies whose "
        "X-Forwarded-For names the client; from anyone else the header is ignored.",
    )
    browser_single_process: bool = Field(
        True,
        description="Chromium in a browser VM runs as one process: about a third less CPU "
        "per login. Chromium calls the mode unsupported; false gives its usual process model.",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        import ipaddress

        for part in filter(None, (p.strip() for p in value.split(","))):
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(f"not an address or network (CIDR): {part!r}") from None
        return value

    @field_validator("image_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    # Derived values: one place that turns settings into what the code uses.
    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'airlock.db'}"

    @property
    def key_file(self) -> Path:
        return self.secret_key_file or self.data_dir / "secret.key"

    @property
    def vms_dir(self) -> Path:
        return self.data_dir / "vms"

    @property
    def grace_success(self) -> timedelta:
        return timedelta(milliseconds=self.grace_success_ms)

    @property
    def grace_failure(self) -> timedelta:
        return timedelta(milliseconds=self.grace_failure_ms)

    @property
    def max_drain(self) -> timedelta:
        return timedelta(milliseconds=self.max_drain_ms)

    @property
    def login_timeout(self) -> timedelta:
        return timedelta(milliseconds=self.login_timeout_ms)

    @property
    def max_session(self) -> timedelta:
        return timedelta(milliseconds=self.max_session_ms)

    @property
    def idle_extension(self) -> timedelta:
        return timedelta(milliseconds=self.idle_extension_ms)

    @property
    def debug_retention(self) -> timedelta | None:
        return timedelta(milliseconds=self.debug_retention_ms) if self.debug_retention_ms else None

    @property
    def reconcile_interval(self) -> timedelta:
        return timedelta(milliseconds=self.reconcile_interval_ms)

    @property
    def viewer_token_ttl(self) -> timedelta:
        return timedelta(milliseconds=self.viewer_token_ttl_ms)

    @property
    def warm_pool_max_age(self) -> timedelta:
        return timedelta(milliseconds=self.warm_pool_max_age_ms)

    @property
    def vm_boot_timeout(self) -> timedelta:
        return timedelta(milliseconds=self.vm_boot_timeout_ms)
