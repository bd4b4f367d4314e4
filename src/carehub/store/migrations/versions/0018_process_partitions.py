"""Each running process records how many partition queues it spreads patients over.

`serve` publishes a patient's messages to the queue its partition count picks, and each worker
consumes the queues its own count names: a serve with 16 and workers with 8 left half the
patients in queues no worker consumed, routed only by the sweep, and nothing said so. With the
count in each process's row, a process starting beside others that use another count warns,
and `carehub status` shows it. NULL: the in-process queue, or a process from before this.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-09
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable without a default: added in place on SQLite and PostgreSQL, no table rewrite.
    op.add_column("hub_processes", sa.Column("partitions", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("hub_processes") as batch:
        batch.drop_column("partitions")
