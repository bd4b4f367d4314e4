"""Destinations an operator paused, and the trail of operator actions.

``paused_destinations`` holds a row per paused destination, so every worker on every host sees
the same state; a paused destination's pending deliveries are parked (due time
outbox.PARKED) and the claim skips its destination, so they are neither sent nor read by other
destinations' claims. ``operator_actions`` records who reprocessed, retried, discarded,
pruned, paused, resumed or reloaded, and when.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

#: outbox.PARKED.
PARKED = datetime(9999, 1, 1, tzinfo=UTC)


def upgrade() -> None:
    op.create_table(
        "paused_destinations",
        sa.Column("destination", sa.String(255), primary_key=True),
        sa.Column("channel", sa.String(64), nullable=True),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("paused_by", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    id_type = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "operator_actions",
        sa.Column("id", id_type, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("command", sa.String(64), nullable=False),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("counts", sa.Text(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_index("ix_operator_actions_at", "operator_actions", ["at"])


def downgrade() -> None:
    """Paused destinations' deliveries are due again (the older hub knows no pause: they are
    sent at once); the next worker's sweep parks again what waits behind a stalled line."""
    deliveries = sa.table(
        "deliveries",
        sa.column("status", sa.String),
        sa.column("destination", sa.String),
        sa.column("not_before", sa.DateTime(timezone=True)),
    )
    paused = sa.table("paused_destinations", sa.column("destination", sa.String))
    d = deliveries.c
    op.get_bind().execute(
        sa.update(deliveries)
        .where(
            d.status == "pending",
            d.not_before >= PARKED,
            d.destination.in_(sa.select(paused.c.destination)),
        )
        .values(not_before=datetime.now(UTC))
    )
    op.drop_index("ix_operator_actions_at", "operator_actions")
    op.drop_table("operator_actions")
    op.drop_table("paused_destinations")
