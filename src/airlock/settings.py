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

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from airlock.domain.egress_policy import Overrides

RuntimeName = Literal["sandbox", "qemu", "firecracker", "fake"]
EGRESS_PROVIDERS = ("oauth2", "claude_code", "codex", "gemini_cli")  # AIRLOCK_EGRESS_<ID>_*


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
    runtime: RuntimeName = Field(
        "sandbox",
        description="Which VM runtime runs the VMs (`fake`: records and idle processes, for "
        "tests and benchmarks only).",
    )
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
    events_resync_ms: int = Field(
        30_000,
        gt=0,
        description="An SSE stream re-reads its session at least this often, whatever it was "
        "told: a safety net only (changes arrive by notification, across controllers too).",
    )
    warm_pool: int = Field(0, ge=0, description="Booted browser VMs kept ready.")
    warm_pool_max_age_ms: int = Field(
        600_000, gt=0, description="A warm VM unused this long is retired and replaced."
    )
    credential_export: bool = Field(
        False, description="Allow service tokens to read secret credential values."
    )
    credential_check_ms: int = Field(
        300_000,
        ge=0,
        description="How often every login's health is decided again, and the CLI's offline "
        "status check run in the VM that holds it; 0 turns the schedule off.",
    )
    credential_expiring_ms: int = Field(
        7 * 24 * 3_600_000,
        ge=0,
        description="A login whose refresh token (or, with none, access token) ends within "
        "this is expiring.",
    )
    credential_sync_ms: int = Field(
        300_000,
        gt=0,
        description="How often each login's holder VM is read back; a refreshed login is "
        "sealed as its new version (also before a CLI VM is destroyed and at every move).",
    )
    credential_retention_ms: int = Field(
        604_800_000,
        ge=0,
        description="How long a superseded login version's secret is kept for audit before "
        "it is wiped (its metadata stays).",
    )
    viewer_token_ttl_ms: int = Field(
        600_000, gt=0, description="How long a viewer token (in novncURL) opens the viewer."
    )
    viewer_copy_out: bool = Field(
        True,
        description="Text copied in the browser VM reaches the person's clipboard (RFB "
        "ServerCutText). False: the VNC proxy drops it. View-only viewers never get it.",
    )
    viewer_clipboard_max: int = Field(
        65_536,
        gt=0,
        le=1_048_576,
        description="The longest paste (RFB ClientCutText, bytes) the VNC proxy passes into a "
        "VM; longer ones are dropped. Neither direction is ever logged.",
    )

    # --- the platform's identity: user JWTs besides Airlock's own tokens -------------
    jwt_jwks_url: str | None = Field(
        None,
        description="JWKS of the platform's identity provider; set it to accept its user JWTs "
        "as bearer tokens (needs the issuer and audience too).",
    )
    jwt_issuer: str | None = Field(None, description="The `iss` a platform JWT must carry.")
    jwt_audience: str | None = Field(None, description="The `aud` a platform JWT must carry.")
    jwt_user_claim: str = Field(
        "sub", min_length=1, description="The claim of a platform JWT that names the user."
    )
    jwt_algorithms: str = Field(
        "RS256,ES256",
        description="Signature algorithms accepted for platform JWTs (comma separated; "
        "asymmetric only).",
    )
    jwt_leeway_ms: int = Field(
        10_000, ge=0, le=300_000, description="Clock skew allowed on a JWT's exp, nbf and iat."
    )
    jwt_jwks_cache_ms: int = Field(
        300_000, gt=0, description="How long a fetched JWKS is used before it is fetched again."
    )
    jwt_jwks_refetch_ms: int = Field(
        10_000,
        ge=0,
        description="A token signed by a key not in the cached JWKS fetches it again at most "
        "this often (key rotation, without letting junk tokens hammer the IdP).",
    )

    # --- the browser VM's lease (lifecycle: a VM that ends itself) ---------------------
    vm_lease_ms: int = Field(
        60_000,
        ge=1_000,
        description="Each renewal lets a browser VM live this long; with no controller left to "
        "renew it, it ends itself.",
    )
    vm_lease_margin_ms: int = Field(
        30_000, ge=0, description="Slack past the lease before the browser VM ends itself."
    )

    # --- the demo identity provider and the generic oauth2 provider -------------------
    demo_user: str = Field("demo", description="The demo identity provider's user name.")
    demo_password: str = Field("demo", description="The demo identity provider's password.")
    demo_idp_port: int = Field(4001, ge=0, le=65535, description="Port of the demo IdP.")
    demo_idp_admin_token: str | None = Field(
        None,
        description="Bearer token of the demo IdP's /admin routes (grant counters, revoking a "
        "grant); unset, they do not exist.",
    )
    oauth2_authorize_url: str | None = Field(None, description="oauth2 provider: authorize URL.")
    oauth2_token_url: str | None = Field(None, description="oauth2 provider: token URL.")
    oauth2_client_id: str | None = Field(None, description="oauth2 provider: client id.")
    oauth2_introspect_url: str | None = Field(
        None,
        description="oauth2 provider: RFC 7662 introspection URL, for the scheduled check of a "
        "login's refresh token.",
    )
    oauth2_scopes: str = Field("openid profile", description="oauth2 provider: scopes.")
    oauth2_allowed_hosts: str = Field(
        "",
        description="oauth2 provider: extra egress rules (host[:port], *.suffix[:port], @bundle; "
        "comma separated), as AIRLOCK_EGRESS_OAUTH2_ALLOW.",
    )

    # --- egress policy per provider (README "Egress"): rules are host[:port],
    # *.suffix[:port] or @bundle, comma separated; port 443 unless given.
    egress_oauth2_policy: str | None = Field(
        None, description="oauth2: replaces its rules and bundles (the endpoints stay)."
    )
    egress_oauth2_allow: str = Field("", description="oauth2: rules and @bundles to add.")
    egress_oauth2_deny: str = Field(
        "", description="oauth2: rules denied whatever allows them; @bundle drops a bundle."
    )
    egress_oauth2_learn: bool = Field(False, description="oauth2: learn mode (allow and record).")
    egress_claude_code_policy: str | None = Field(
        None, description="claude_code: replaces its rules and bundles."
    )
    egress_claude_code_allow: str = Field("", description="claude_code: rules and @bundles to add.")
    egress_claude_code_deny: str = Field(
        "", description="claude_code: rules denied whatever allows them; @bundle drops a bundle."
    )
    egress_claude_code_learn: bool = Field(False, description="claude_code: learn mode.")
    egress_codex_policy: str | None = Field(
        None, description="codex: replaces its rules and bundles."
    )
    egress_codex_allow: str = Field("", description="codex: rules and @bundles to add.")
    egress_codex_deny: str = Field(
        "", description="codex: rules denied whatever allows them; @bundle drops a bundle."
    )
    egress_codex_learn: bool = Field(False, description="codex: learn mode.")
    egress_gemini_cli_policy: str | None = Field(
        None, description="gemini_cli: replaces its rules and bundles."
    )
    egress_gemini_cli_allow: str = Field("", description="gemini_cli: rules and @bundles to add.")
    egress_gemini_cli_deny: str = Field(
        "", description="gemini_cli: rules denied whatever allows them; @bundle drops a bundle."
    )
    egress_gemini_cli_learn: bool = Field(False, description="gemini_cli: learn mode.")
    egress_flush_ms: int = Field(
        2_000, gt=0, description="How often counted egress denials are written to the database."
    )

    # --- operations -------------------------------------------------------------------
    node_name: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$",
        description="This host's name on VM rows: a controller schedules and reconciles only "
        "its own node's VMs when several share one database.",
    )
    node_internal_url: str | None = Field(
        None,
        description="Base URL this node's peers reach it at (the internal link: VNC and agent "
        "streams, destroys). Default http://{host}:{port}.",
    )
    node_heartbeat_ms: int = Field(
        2_000, gt=0, description="How often a node writes its heartbeat and what it holds."
    )
    node_lease_ms: int = Field(
        15_000,
        gt=0,
        description="A node whose heartbeat is older than this is down: no new VMs go there.",
    )
    node_grace_ms: int = Field(
        300_000,
        ge=0,
        description="A node down this long past its lease has its live VMs marked lost and "
        "their sessions failed (nothing is destroyed: it kills them itself when it returns).",
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
    vm_memory_mb: int = Field(
        2048,
        ge=64,
        description="Memory limit of each sandbox VM's cgroup, in MiB (its tmpfs pages count).",
    )
    vm_pids_max: int = Field(
        1024, ge=16, description="Processes and threads a sandbox VM may have (pids.max)."
    )
    vm_cpu_weight: int = Field(
        100, ge=1, le=10_000, description="cgroup CPU weight of each sandbox VM (100: fair)."
    )
    vm_disk_mb: int = Field(
        1024,
        ge=16,
        description="Size of each writable tmpfs of a sandbox VM (state dir and CLI home, "
        "/tmp, /dev/shm, a browser's home), in MiB.",
    )
    vm_uid_base: int = Field(
        1_900_000_000,
        ge=1000,
        le=2**32 - 65536 - 2,
        description="First of the 65,536 host uids VMs run as, one each (root controller).",
    )

    browser_single_process: bool = Field(
        True,
        description="Chromium in a browser VM runs as one process: about a third less CPU "
        "per login. Chromium calls the mode unsupported; false gives its usual process model.",
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

    @field_validator("jwt_algorithms")
    @classmethod
    def _asymmetric(cls, value: str) -> str:
        names = [a.strip() for a in value.split(",") if a.strip()]
        allowed = {
            "RS256",
            "RS384",
            "RS512",
            "PS256",
            "PS384",
            "PS512",
            "ES256",
            "ES384",
            "ES512",
            "EdDSA",
        }
        if not names or not set(names) <= allowed:
            raise ValueError(f"use asymmetric JWT algorithms only: {', '.join(sorted(allowed))}")
        return ",".join(names)

    @model_validator(mode="after")
    def _jwt_complete(self) -> Settings:
        if self.jwt_jwks_url and not (self.jwt_issuer and self.jwt_audience):
            raise ValueError(
                "AIRLOCK_JWT_JWKS_URL needs AIRLOCK_JWT_ISSUER and AIRLOCK_JWT_AUDIENCE"
            )
        return self

    @model_validator(mode="after")
    def _node_times(self) -> Settings:
        if self.node_lease_ms <= self.node_heartbeat_ms:
            raise ValueError("AIRLOCK_NODE_LEASE_MS must be longer than AIRLOCK_NODE_HEARTBEAT_MS")
        return self

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
    def credential_sync(self) -> timedelta:
        return timedelta(milliseconds=self.credential_sync_ms)

    @property
    def credential_retention(self) -> timedelta:
        return timedelta(milliseconds=self.credential_retention_ms)

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
    def events_resync(self) -> timedelta:
        return timedelta(milliseconds=self.events_resync_ms)

    @property
    def viewer_token_ttl(self) -> timedelta:
        return timedelta(milliseconds=self.viewer_token_ttl_ms)

    @property
    def warm_pool_max_age(self) -> timedelta:
        return timedelta(milliseconds=self.warm_pool_max_age_ms)

    def egress_overrides(self, provider_id: str) -> Overrides:
        """The operator's ``AIRLOCK_EGRESS_<PROVIDER>_*`` settings for one provider."""
        if provider_id not in EGRESS_PROVIDERS:
            return Overrides()
        prefix = f"egress_{provider_id}_"
        allow: str = getattr(self, prefix + "allow")
        if provider_id == "oauth2" and self.oauth2_allowed_hosts:
            allow = ",".join(p for p in (self.oauth2_allowed_hosts, allow) if p)
        return Overrides(
            policy=getattr(self, prefix + "policy"),
            allow=allow,
            deny=getattr(self, prefix + "deny"),
            learn=getattr(self, prefix + "learn"),
        )

    @property
    def jwt_algorithm_list(self) -> list[str]:
        return self.jwt_algorithms.split(",")

    @property
    def vm_lease(self) -> timedelta:
        return timedelta(milliseconds=self.vm_lease_ms)

    @property
    def vm_lease_margin(self) -> timedelta:
        return timedelta(milliseconds=self.vm_lease_margin_ms)

    @property
    def internal_url(self) -> str:
        return (self.node_internal_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def node_heartbeat(self) -> timedelta:
        return timedelta(milliseconds=self.node_heartbeat_ms)

    @property
    def node_lease(self) -> timedelta:
        return timedelta(milliseconds=self.node_lease_ms)

    @property
    def node_grace(self) -> timedelta:
        return timedelta(milliseconds=self.node_grace_ms)

    @property
    def vm_boot_timeout(self) -> timedelta:
        return timedelta(milliseconds=self.vm_boot_timeout_ms)
