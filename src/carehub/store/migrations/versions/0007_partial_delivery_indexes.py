"""Delivery indexes hold only the rows still in play: pending ones by due time, unfinished ones
by destination and patient line, and dead letters.

The full indexes held every delivery ever made, keyed on its status, so each status change
moved an entry in two of them, one at a random place (the patient's line): under
bench/bench_routing.py that was two pages written to the WAL per delivery per change. Partial
indexes keep a few pages of rows that are pending or being sent; a delivery enters them when
planned and leaves when it is finished.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

PENDING = sa.text("status = 'pending'")
UNFINISHED = sa.text("status IN ('pending', 'sending')")
DEAD = sa.text("status = 'dead'")


def upgrade() -> None:
    op.drop_index("ix_deliveries_due", "deliveries")
    op.drop_index("ix_deliveries_order", "deliveries")
    op.create_index(
        "ix_deliveries_due",
        "deliveries",
        ["not_before", "id"],
        sqlite_where=PENDING,
        postgresql_where=PENDING,
    )
    op.create_index(
        "ix_deliveries_unfinished",
        "deliveries",
        ["destination", "order_key", "id"],
        sqlite_where=UNFINISHED,
        postgresql_where=UNFINISHED,
    )
    op.create_index(
        "ix_deliveries_dead", "deliveries", ["id"], sqlite_where=DEAD, postgresql_where=DEAD
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_dead", "deliveries")
    op.drop_index("ix_deliveries_unfinished", "deliveries")
    op.drop_index("ix_deliveries_due", "deliveries")
    op.create_index("ix_deliveries_order", "deliveries", ["destination", "order_key", "status"])
    op.create_index("ix_deliveries_due", "deliveries", ["status", "not_before", "id"])
