"""Claims walk pending deliveries in the order they fall due: index (status, not_before, id)
replaces (status, id).

A destination that is down holds its deliveries back until their next retry; walking in id
order, every claim stepped over all of them (a backlog of tens of thousands at one webhook
slowed every other destination's claims). Walking in due order, a claim reads only rows that
are due, however large the waiting backlog.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_deliveries_due", "deliveries", ["status", "not_before", "id"])
    op.drop_index("ix_deliveries_line", "deliveries")


def downgrade() -> None:
    op.create_index("ix_deliveries_line", "deliveries", ["status", "id"])
    op.drop_index("ix_deliveries_due", "deliveries")
