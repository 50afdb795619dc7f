"""Logins (grants) with exactly one holder, and the sealed versions of their files.

Every existing capture becomes a grant, its sealed credentials its version 1 (the same
ciphertext, which opens under the same context: ``domain.grants.version_context``). Its
holder is the CLI VM it was last injected into while that VM is still live, else the vault.
When a user has several captures of one account of one provider, the newest is the login;
the older ones are superseded by it (their holder is the vault; their secrets are wiped by
the retention sweep like any superseded version's). Downgrading drops both tables and the
link; the credentials rows are as they were.

Revision ID: 0005_grants
Revises: 0004
Create Date: 2026-12-01
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005_grants"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
_LIVE = ("creating", "running", "draining", "retained", "destroying")


def _account_key(account: Any) -> str:
    # As domain.grants.account_key (a migration does not import the code it migrates for).
    if isinstance(account, str):
        import json

        try:
            account = json.loads(account)
        except ValueError:
            return ""
    if not isinstance(account, dict):
        return ""
    for key in ("email", "id"):
        value = account.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip().lower()[:255]
    return ""


def upgrade() -> None:
    op.create_table(
        "grants",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("account", sa.String(255), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=True),
        sa.Column("holder_vm_id", sa.String(64), nullable=True),
        sa.Column("holder_since", TS, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text, nullable=True),
        sa.Column("state_changed_at", TS, nullable=True),
        sa.Column("access_expires_at", TS, nullable=True),
        sa.Column("refresh_expires_at", TS, nullable=True),
        sa.Column("last_refresh_seen_at", TS, nullable=True),
        sa.Column("last_checked_at", TS, nullable=True),
        sa.Column("last_synced_at", TS, nullable=True),
        sa.Column("current_version", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("superseded_at", TS, nullable=True),
        sa.Column("superseded_by", sa.String(64), nullable=True),
        sa.Column("move_owner", sa.String(64), nullable=True),
        sa.Column("move_lease_until", TS, nullable=True),
        sa.Column("move_target_vm_id", sa.String(64), nullable=True),
    )
    op.create_index("ix_grants_user_id", "grants", ["user_id"])
    op.create_index("ix_grants_holder_vm_id", "grants", ["holder_vm_id"])
    op.create_index("ix_grants_user_provider_account", "grants", ["user_id", "provider", "account"])
    op.create_table(
        "grant_versions",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("grant_id", sa.String(64), sa.ForeignKey("grants.id"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=True),
        sa.Column("vm_id", sa.String(64), nullable=True),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("nonce", sa.LargeBinary, nullable=True),
        sa.Column("ciphertext", sa.LargeBinary, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("superseded_at", TS, nullable=True),
        sa.Column("wiped_at", TS, nullable=True),
    )
    op.create_index(
        "ix_grant_versions_grant_version", "grant_versions", ["grant_id", "version"], unique=True
    )
    op.create_index("ix_grant_versions_superseded", "grant_versions", ["wiped_at", "superseded_at"])
    with op.batch_alter_table("credentials") as batch:
        batch.add_column(sa.Column("grant_id", sa.String(64), nullable=True))
    op.create_index("ix_credentials_grant_id", "credentials", ["grant_id"])
    _grants_from_credentials()


def _grants_from_credentials() -> None:
    bind = op.get_bind()
    creds = sa.table(
        "credentials",
        sa.column("id", sa.String),
        sa.column("session_id", sa.String),
        sa.column("user_id", sa.String),
        sa.column("provider", sa.String),
        sa.column("key_id", sa.String),
        sa.column("nonce", sa.LargeBinary),
        sa.column("ciphertext", sa.LargeBinary),
        sa.column("account", sa.JSON),
        sa.column("expires_at", TS),
        sa.column("captured_at", TS),
        sa.column("injected_vm_id", sa.String),
        sa.column("injected_at", TS),
        sa.column("grant_id", sa.String),
    )
    vms = sa.table("vms", sa.column("id", sa.String), sa.column("state", sa.String))
    grants = sa.table(
        "grants",
        *(
            sa.column(name, sa.String)
            for name in ("id", "user_id", "provider", "account", "session_id", "holder_vm_id")
        ),
        sa.column("state", sa.String),
        sa.column("holder_since", TS),
        sa.column("access_expires_at", TS),
        sa.column("current_version", sa.Integer),
        sa.column("created_at", TS),
        sa.column("updated_at", TS),
        sa.column("superseded_at", TS),
        sa.column("superseded_by", sa.String),
    )
    versions = sa.table(
        "grant_versions",
        sa.column("grant_id", sa.String),
        sa.column("version", sa.Integer),
        sa.column("source", sa.String),
        sa.column("session_id", sa.String),
        sa.column("vm_id", sa.String),
        sa.column("key_id", sa.String),
        sa.column("nonce", sa.LargeBinary),
        sa.column("ciphertext", sa.LargeBinary),
        sa.column("created_at", TS),
        sa.column("superseded_at", TS),
    )
    live = {row.id for row in bind.execute(sa.select(vms.c.id).where(vms.c.state.in_(_LIVE))).all()}
    rows = bind.execute(
        sa.select(creds).order_by(creds.c.captured_at.desc(), creds.c.id.desc())
    ).all()
    newest: dict[tuple[str, str, str], tuple[str, Any]] = {}
    holders: set[tuple[str, str]] = set()  # (vm, provider): one login's files per VM
    for row in rows:
        key = (row.user_id, row.provider, _account_key(row.account))
        winner, winner_at = newest.setdefault(key, (row.id, row.captured_at))
        holder = row.injected_vm_id if row.injected_vm_id in live else None
        if winner != row.id or (holder, row.provider) in holders:
            holder = None
        if holder is not None:
            holders.add((holder, row.provider))
        superseded = None if winner == row.id else winner_at
        bind.execute(
            grants.insert().values(
                id=row.id,
                user_id=row.user_id,
                provider=row.provider,
                account=key[2],
                session_id=row.session_id,
                holder_vm_id=holder,
                holder_since=row.injected_at if holder else None,
                state="active",
                access_expires_at=row.expires_at,
                current_version=1,
                created_at=row.captured_at,
                updated_at=row.captured_at,
                superseded_at=superseded,
                superseded_by=None if winner == row.id else winner,
            )
        )
        bind.execute(
            versions.insert().values(
                grant_id=row.id,
                version=1,
                source="capture",
                session_id=row.session_id,
                vm_id=None,
                key_id=row.key_id,
                nonce=row.nonce,
                ciphertext=row.ciphertext,
                created_at=row.captured_at,
                superseded_at=superseded,
            )
        )
        bind.execute(creds.update().where(creds.c.id == row.id).values(grant_id=row.id))


def downgrade() -> None:
    op.drop_index("ix_credentials_grant_id", "credentials")
    with op.batch_alter_table("credentials") as batch:
        batch.drop_column("grant_id")
    op.drop_index("ix_grant_versions_superseded", "grant_versions")
    op.drop_index("ix_grant_versions_grant_version", "grant_versions")
    op.drop_table("grant_versions")
    op.drop_index("ix_grants_user_provider_account", "grants")
    op.drop_index("ix_grants_holder_vm_id", "grants")
    op.drop_index("ix_grants_user_id", "grants")
    op.drop_table("grants")
