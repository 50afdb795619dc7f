"""Initial schema: tokens, vms, auth_sessions, credentials, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
    )
    op.create_table(
        "vms",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("running_at", TS, nullable=True),
        sa.Column("destroy_after", TS, nullable=True),
        sa.Column("destroy_reason", sa.String(32), nullable=True),
        sa.Column("destroyed_at", TS, nullable=True),
        sa.Column("lease_until", TS, nullable=True),
        sa.Column("destroy_attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("warm", sa.Boolean, nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_vms_user_id", "vms", ["user_id"])
    op.create_index("ix_vms_state_destroy_after", "vms", ["state", "destroy_after"])
    op.create_table(
        "auth_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("failure_reason", sa.Text, nullable=True),
        sa.Column("vm_id", sa.String(64), sa.ForeignKey("vms.id"), nullable=True),
        sa.Column("cli_vm_id", sa.String(64), sa.ForeignKey("vms.id"), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("ready_at", TS, nullable=True),
        sa.Column("completed_at", TS, nullable=True),
        sa.Column("ended_at", TS, nullable=True),
    )
    op.create_index("ix_auth_sessions_user_id", "auth_sessions", ["user_id"])
    op.create_index("ix_auth_sessions_status", "auth_sessions", ["status"])
    op.create_table(
        "credentials",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "session_id",
            sa.String(64),
            sa.ForeignKey("auth_sessions.id"),
            nullable=False,
            unique=True,
        ),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("nonce", sa.LargeBinary, nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("account", sa.JSON, nullable=False),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("plan", sa.String(64), nullable=True),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("captured_at", TS, nullable=False),
        sa.Column("injected_vm_id", sa.String(64), nullable=True),
        sa.Column("injected_at", TS, nullable=True),
        sa.Column("injected_verified", sa.Boolean, nullable=True),
    )
    op.create_index("ix_credentials_user_id", "credentials", ["user_id"])
    op.create_table(
        "events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("at", TS, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject_id", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=True),
        sa.Column("vm_id", sa.String(64), nullable=True),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=True),
        sa.Column("cause", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_events_session_id", "events", ["session_id"])
    op.create_index("ix_events_vm_id", "events", ["vm_id"])


def downgrade() -> None:
    for table in ("events", "credentials", "auth_sessions", "vms", "tokens"):
        op.drop_table(table)
