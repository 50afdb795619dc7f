"""VMs record the lease the controller last granted them.

A browser VM ends itself when its lease runs out and no controller renews it. The row keeps
the moment after which it may have done so (the last lease granted, plus its margin), so
that a controller that comes back tells a VM that ended itself (``lease_expired``) from one
that vanished while it should have been alive (``lost``). NULL: no lease (a CLI VM, or a
row from before this revision).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("guest_lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("guest_lease_until")
