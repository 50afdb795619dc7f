"""The tables, as SQLAlchemy 2 mapped classes. The migrations in ``migrations/`` create
exactly these; a test compares the two.

Times are stored as timezone-aware UTC (``UtcDateTime``) on both SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import DestroyReason, VmRole, VmState


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, whatever the backend keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


E = TypeVar("E", bound=StrEnum)


class EnumText(TypeDecorator[E]):
    """A ``StrEnum`` kept in a plain string column: members (or their strings, which are
    checked) in, members out. The stored values are the enum's values, as before."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)


class Base(DeclarativeBase):
    type_annotation_map: dict[Any, Any] = {
        datetime: UtcDateTime,
        dict[str, Any]: JSON,
        list[str]: JSON,
    }


class Token(Base):
    """An API token. Only its SHA-256 is kept; the value is shown once at creation."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # user | service
    subject: Mapped[str] = mapped_column(String(128))  # user id or service name
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class Vm(Base):
    """A browser VM or CLI VM. Never deleted: a destroyed row is the tombstone."""

    __tablename__ = "vms"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[VmRole] = mapped_column(EnumText(VmRole, 16))
    runtime: Mapped[str] = mapped_column(String(32))
    # The host whose runtime runs it: only that host's controller can destroy or observe it.
    node: Mapped[str] = mapped_column(String(128), default="")
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    state: Mapped[VmState] = mapped_column(EnumText(VmState, 16))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    running_at: Mapped[datetime | None]
    destroy_after: Mapped[datetime | None]
    destroy_reason: Mapped[DestroyReason | None] = mapped_column(EnumText(DestroyReason, 32))
    destroyed_at: Mapped[datetime | None]
    # A claim on the destroy: whoever holds an unexpired lease is destroying it right now.
    lease_until: Mapped[datetime | None]
    # Not that lease: the browser VM's own. After this moment (the last lease the controller
    # granted, plus its margin) the VM may have ended itself; None for a VM without one.
    guest_lease_until: Mapped[datetime | None]
    destroy_attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    warm: Mapped[bool] = mapped_column(Boolean, default=False)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # When its node's controller took up its boot (or its login, for a warm VM placed from
    # another node); None: placed there, not taken up yet (``services.placement``).
    boot_claimed_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_vms_state_destroy_after", "state", "destroy_after"),
        Index("ix_vms_node_state", "node", "state"),
        Index("ix_vms_node_unclaimed", "node", "boot_claimed_at"),
    )


class AuthSession(Base):
    """One login of one provider for one user."""

    __tablename__ = "auth_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    provider: Mapped[str] = mapped_column(String(64))
    status: Mapped[SessionStatus] = mapped_column(EnumText(SessionStatus, 16))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    vm_id: Mapped[str | None] = mapped_column(ForeignKey("vms.id"))
    cli_vm_id: Mapped[str | None] = mapped_column(ForeignKey("vms.id"))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    ready_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_auth_sessions_status", "status"),)


class Credential(Base):
    """Captured credentials, AES-GCM encrypted (``vault``). Metadata stays readable."""

    __tablename__ = "credentials"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("auth_sessions.id"), unique=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    provider: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(64))
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    account: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    plan: Mapped[str | None] = mapped_column(String(64))
    expires_at: Mapped[datetime | None]
    captured_at: Mapped[datetime]
    injected_vm_id: Mapped[str | None] = mapped_column(String(64))
    injected_at: Mapped[datetime | None]
    injected_verified: Mapped[bool | None]
    # The login this capture made (``grants``); the capture is its version 1. NULL only for
    # a row written between the migration and the first start of a controller that knows it.
    grant_id: Mapped[str | None] = mapped_column(String(64), index=True)


class Grant(Base):
    """A login: one account of one provider for one user, with exactly one holder.

    ``holder_vm_id`` is the one CLI VM that may refresh it, NULL when only the vault has it.
    Its files live in ``grant_versions``; ``current_version`` is the newest. A move claims the
    row with a lease (``move_*``) taken under the row lock; health (``state`` and the
    expiries) is kept by the health checks."""

    __tablename__ = "grants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    provider: Mapped[str] = mapped_column(String(64))
    account: Mapped[str] = mapped_column(String(255), default="")  # domain.grants.account_key
    session_id: Mapped[str | None] = mapped_column(String(64))  # the capture's session
    holder_vm_id: Mapped[str | None] = mapped_column(String(64), index=True)
    holder_since: Mapped[datetime | None]
    state: Mapped[str] = mapped_column(String(16), default="active")  # domain.grants.GrantState
    state_reason: Mapped[str | None] = mapped_column(Text)
    state_changed_at: Mapped[datetime | None]
    access_expires_at: Mapped[datetime | None]
    refresh_expires_at: Mapped[datetime | None]
    last_refresh_seen_at: Mapped[datetime | None]
    last_checked_at: Mapped[datetime | None]
    last_synced_at: Mapped[datetime | None]
    current_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    # Renewal in place: a newer login of the same account replaced this one.
    superseded_at: Mapped[datetime | None]
    superseded_by: Mapped[str | None] = mapped_column(String(64))
    # A move under way: who (a random id per move), until when, and into which VM.
    move_owner: Mapped[str | None] = mapped_column(String(64))
    move_lease_until: Mapped[datetime | None]
    move_target_vm_id: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_grants_user_provider_account", "user_id", "provider", "account"),)


class GrantVersion(Base):
    """One sealed version of a login's files. Kept for audit; the secret of a superseded
    version is wiped (``nonce``/``ciphertext`` NULL, ``wiped_at`` set) after a retention."""

    __tablename__ = "grant_versions"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    grant_id: Mapped[str] = mapped_column(ForeignKey("grants.id"))
    version: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))  # domain.grants.VersionSource
    session_id: Mapped[str | None] = mapped_column(String(64))
    vm_id: Mapped[str | None] = mapped_column(String(64))  # read back from this VM
    key_id: Mapped[str | None] = mapped_column(String(64))
    nonce: Mapped[bytes | None] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
    superseded_at: Mapped[datetime | None]
    wiped_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_grant_versions_grant_version", "grant_id", "version", unique=True),
        Index("ix_grant_versions_superseded", "wiped_at", "superseded_at"),
    )


class Event(Base):
    """Append-only audit: every transition, its cause, who caused it, when."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(16))  # session | vm | credential | token
    subject_id: Mapped[str] = mapped_column(String(64))
    session_id: Mapped[str | None] = mapped_column(String(64), index=True)
    vm_id: Mapped[str | None] = mapped_column(String(64), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    cause: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(160))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class EgressHost(Base):
    """One host a session's browser VM asked the egress proxy for, per decision, counted:
    one row per (session, host, port, decision), however many connections it took. Denials
    are recorded always; allowed hosts only in learn mode (``airlock egress suggest``)."""

    __tablename__ = "egress_hosts"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    session_id: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    decision: Mapped[str] = mapped_column(String(16))  # allowed | learned | denied | noise
    count: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    first_at: Mapped[datetime]
    last_at: Mapped[datetime]

    __table_args__ = (
        Index(
            "ix_egress_hosts_session_host", "session_id", "host", "port", "decision", unique=True
        ),
        Index("ix_egress_hosts_provider_decision", "provider", "decision"),
    )


class Node(Base):
    """One controller (one host) of a cluster on this database: what its peers need to
    reach it, what it can hold, and its heartbeat. ``state`` is the operator's intent
    (``active`` or ``draining``); a node whose heartbeat is older than the lease is read as
    ``down`` (``domain.nodes``). ``ready`` is false from start-up until its first reconcile
    is done: it takes no new VMs before."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    internal_url: Mapped[str] = mapped_column(String(512))
    public_url: Mapped[str] = mapped_column(String(512))
    state: Mapped[str] = mapped_column(String(16))
    browser_capacity: Mapped[int] = mapped_column(Integer)
    cli_capacity: Mapped[int] = mapped_column(Integer)
    browser_in_use: Mapped[int] = mapped_column(Integer)
    cli_in_use: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    ready: Mapped[bool] = mapped_column(Boolean)


class ClusterKey(Base):
    """A fingerprint (HKDF of the key, never the key) of each vault key a controller of
    this database started with: a controller with a different key file refuses to start."""

    __tablename__ = "cluster_keys"

    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    first_node: Mapped[str] = mapped_column(String(128))
    seen_at: Mapped[datetime]
