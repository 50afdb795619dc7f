"""VMs record the node (host) whose runtime runs them.

Several controllers may share one PostgreSQL, one per host. A host's scheduler and
reconciler act only on their own node's rows: another host's VMs cannot be destroyed or
observed from here, and must not be declared lost because this runtime does not list them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("node", sa.String(128), nullable=False, server_default=""))
    op.create_index("ix_vms_node_state", "vms", ["node", "state"])


def downgrade() -> None:
    op.drop_index("ix_vms_node_state", "vms")
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("node")
