"""Nodes (one controller per host, on one database) and the cluster key's fingerprints.

``nodes``: each controller's registration and heartbeat, its capacity and what it holds,
and the operator's intent (``active`` or ``draining``); ``down`` is read from the heartbeat.
The VM column ``boot_claimed_at``: placement writes a VM row for the node that is to boot it; that
node's controller claims it (a conditional update, ``SKIP LOCKED``) exactly once. Empty: not
taken up yet. Rows from before are all claimed (their controller booted them).
``cluster_keys``: a fingerprint of every vault key a controller started with (never the key),
so a controller with another key file refuses to start instead of handing out viewer tokens
and seals its peers cannot check or open.

Revision ID: 0006_nodes
Revises: 0005_grants
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_nodes"
down_revision = "0005_grants"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("internal_url", sa.String(512), nullable=False),
        sa.Column("public_url", sa.String(512), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("browser_capacity", sa.Integer, nullable=False),
        sa.Column("cli_capacity", sa.Integer, nullable=False),
        sa.Column("browser_in_use", sa.Integer, nullable=False),
        sa.Column("cli_in_use", sa.Integer, nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("ready", sa.Boolean, nullable=False),
    )
    op.create_table(
        "cluster_keys",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("first_node", sa.String(128), nullable=False),
        sa.Column("seen_at", TS, nullable=False),
    )

    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("boot_claimed_at", TS, nullable=True))
    op.execute("UPDATE vms SET boot_claimed_at = created_at")
    op.create_index("ix_vms_node_unclaimed", "vms", ["node", "boot_claimed_at"])


def downgrade() -> None:
    op.drop_index("ix_vms_node_unclaimed", "vms")
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("boot_claimed_at")
    op.drop_table("cluster_keys")
    op.drop_table("nodes")
