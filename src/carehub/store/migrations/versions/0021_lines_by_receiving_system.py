"""A delivery's line is its own column: forwards that reach one receiving system share it.

A patient's deliveries went out in order, and a dead letter held the later ones, per
destination (ROUTE/NAME). Two routes that split a feed by event and forward to the same EHR had
two lines, so the EHR got an A08 before the A01 it updates, and an A01 dead letter held nothing
of the other route. Each delivery now names its line (``line``): its destination's, which for
forwards to the same receiving system is the one they share (routing.table.share_lines).

This revision gives every delivery still in play (pending, being sent, a dead letter) its
destination as its line, which is what its line was, so each line keeps its order through the
upgrade; deliveries already finished keep NULL (their line was their destination). When a
worker starts with routes whose forwards share a line, it moves the deliveries still in play
of those forwards into it, in the order they were routed (Outbox.apply_line_policy).

The partial indexes a delivery's place in line is read through (unfinished deliveries, dead
letters) are by (line, order_key, id) now; one more partial index of the unfinished deliveries
by destination serves what is asked of one destination (pausing it, what waits for it).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-10
"""

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

UNFINISHED = sa.text("status IN ('pending', 'sending')")
DEAD = sa.text("status = 'dead'")


def _line_indexes(columns: list[str]) -> None:
    op.create_index(
        "ix_deliveries_unfinished",
        "deliveries",
        [*columns, "order_key", "id"],
        sqlite_where=UNFINISHED,
        postgresql_where=UNFINISHED,
    )
    op.create_index(
        "ix_deliveries_dead_line",
        "deliveries",
        [*columns, "order_key", "id"],
        sqlite_where=DEAD,
        postgresql_where=DEAD,
    )


def upgrade() -> None:
    # Nullable without a default: added in place on SQLite and PostgreSQL, no table rewrite.
    op.add_column("deliveries", sa.Column("line", sa.String(255), nullable=True))
    # Through the partial indexes of those rows: the delivered ones are not read.
    op.execute("UPDATE deliveries SET line = destination WHERE status IN ('pending', 'sending')")
    op.execute("UPDATE deliveries SET line = destination WHERE status = 'dead'")
    op.drop_index("ix_deliveries_unfinished", table_name="deliveries")
    op.drop_index("ix_deliveries_dead_line", table_name="deliveries")
    _line_indexes(["line"])
    op.create_index(
        "ix_deliveries_unfinished_destination",
        "deliveries",
        ["destination"],
        sqlite_where=UNFINISHED,
        postgresql_where=UNFINISHED,
    )


def downgrade() -> None:
    """Lines go back to one per destination: a delivery parked behind another forward's in
    a shared line is made due by the older release's sweep, which finds nothing before it."""
    op.drop_index("ix_deliveries_unfinished_destination", table_name="deliveries")
    op.drop_index("ix_deliveries_unfinished", table_name="deliveries")
    op.drop_index("ix_deliveries_dead_line", table_name="deliveries")
    _line_indexes(["destination"])
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("line")
