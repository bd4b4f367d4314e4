"""A dead letter holds its patient's line to its destination: the place-in-line check reads dead
letters by (destination, order_key, id), and each dead letter says whether it holds its line.

``holds_line`` is set when a delivery becomes a dead letter, from its destination's
``retry.after_dead_letter`` (and again on each worker start, for the routes as they are then);
NULL on every other delivery. Dead letters left from before this change are NULL until a worker
starts and gives them their destination's setting.

Both indexes are partial, like 0007's: the dead letters by line for the claim's check, and the
dead letters an operator discarded (status ``discarded``, kept for the record), which are
listed on their own and would otherwise be found only by reading the whole outbox.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

DEAD = sa.text("status = 'dead'")
DISCARDED = sa.text("status = 'discarded'")
#: outbox.PARKED: the due time of a delivery waiting behind a dead or retrying one in its line.
PARKED = datetime(9999, 1, 1, tzinfo=UTC)
_deliveries = sa.table(
    "deliveries",
    sa.column("status", sa.String),
    sa.column("not_before", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    # A nullable column without a default: added in place on SQLite and PostgreSQL alike,
    # with no rewrite of the table.
    op.add_column("deliveries", sa.Column("holds_line", sa.Boolean(), nullable=True))
    op.create_index(
        "ix_deliveries_dead_line",
        "deliveries",
        ["destination", "order_key", "id"],
        sqlite_where=DEAD,
        postgresql_where=DEAD,
    )
    op.create_index(
        "ix_deliveries_discarded",
        "deliveries",
        ["id"],
        sqlite_where=DISCARDED,
        postgresql_where=DISCARDED,
    )


def downgrade() -> None:
    """Discarded dead letters become dead letters again (the older schema knows no other way
    to keep a delivery that will not be sent), and deliveries parked behind a dead or retrying
    one are due now: the older claim would wait for their due time."""
    op.execute("UPDATE deliveries SET status = 'dead' WHERE status = 'discarded'")
    d = _deliveries.c
    op.get_bind().execute(
        sa.update(_deliveries)
        .where(d.status == "pending", d.not_before >= PARKED)
        .values(not_before=datetime.now(UTC))
    )
    op.drop_index("ix_deliveries_discarded", "deliveries")
    op.drop_index("ix_deliveries_dead_line", "deliveries")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("holds_line")
