"""Routing: step outputs, the delivery outbox and its attempts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "message_steps",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column(
            "message_id", IdType, sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("run", sa.Integer, nullable=False),
        sa.Column("route", sa.String(128), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("step", sa.String(128), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("output", sa.Text, nullable=True),
        sa.Column("at", When, nullable=False),
    )
    op.create_index("ix_message_steps_message", "message_steps", ["message_id"])
    op.create_table(
        "deliveries",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column(
            "message_id", IdType, sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("run", sa.Integer, nullable=False),
        sa.Column("route", sa.String(128), nullable=False),
        sa.Column("destination", sa.String(255), nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=False, unique=True),
        sa.Column("order_key", sa.String(255), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("content_type", sa.String(128), nullable=False),
        sa.Column("metadata", sa.Text, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("not_before", When, nullable=False),
        sa.Column("lease_until", When, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("receipt", sa.Text, nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.Column("updated_at", When, nullable=False),
    )
    op.create_index("ix_deliveries_due", "deliveries", ["status", "not_before"])
    op.create_index("ix_deliveries_order", "deliveries", ["destination", "order_key", "status"])
    op.create_index("ix_deliveries_message", "deliveries", ["message_id"])
    op.create_table(
        "delivery_attempts",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column(
            "delivery_id",
            IdType,
            sa.ForeignKey("deliveries.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("started_at", When, nullable=False),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
    )
    op.create_index("ix_delivery_attempts_delivery", "delivery_attempts", ["delivery_id"])


def downgrade() -> None:
    op.drop_table("delivery_attempts")
    op.drop_table("deliveries")
    op.drop_table("message_steps")
