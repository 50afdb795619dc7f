"""The hosts each session's browser VM was denied (or, in learn mode, allowed), counted.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "egress_hosts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("count", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
        sa.Column("first_at", TS, nullable=False),
        sa.Column("last_at", TS, nullable=False),
    )
    op.create_index(
        "ix_egress_hosts_session_host",
        "egress_hosts",
        ["session_id", "host", "port", "decision"],
        unique=True,
    )
    op.create_index("ix_egress_hosts_provider_decision", "egress_hosts", ["provider", "decision"])


def downgrade() -> None:
    op.drop_index("ix_egress_hosts_provider_decision", "egress_hosts")
    op.drop_index("ix_egress_hosts_session_host", "egress_hosts")
    op.drop_table("egress_hosts")
