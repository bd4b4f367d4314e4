"""Message store: messages and their status history.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("transport", sa.String(16), nullable=False),
        sa.Column("listener", sa.String(64), nullable=False),
        sa.Column("peer", sa.String(255), nullable=True),
        sa.Column("raw", sa.LargeBinary, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("charset", sa.String(32), nullable=True),
        sa.Column("sending_application", sa.String(255), nullable=True),
        sa.Column("sending_facility", sa.String(255), nullable=True),
        sa.Column("receiving_application", sa.String(255), nullable=True),
        sa.Column("receiving_facility", sa.String(255), nullable=True),
        sa.Column("message_type", sa.String(16), nullable=True),
        sa.Column("trigger_event", sa.String(16), nullable=True),
        sa.Column("structure", sa.String(16), nullable=True),
        sa.Column("control_id", sa.String(199), nullable=True),
        sa.Column("version", sa.String(16), nullable=True),
        sa.Column("patient_id", sa.String(255), nullable=True),
        sa.Column("patient_authority", sa.String(255), nullable=True),
        sa.Column("ack_code", sa.String(2), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("identity", sa.Text, nullable=True),
        sa.UniqueConstraint("identity", name="uq_messages_identity"),
    )
    op.create_index("ix_messages_received_at", "messages", ["received_at"])
    op.create_index("ix_messages_status", "messages", ["status"])
    op.create_index("ix_messages_type_event", "messages", ["message_type", "trigger_event"])
    op.create_index("ix_messages_patient", "messages", ["patient_id", "patient_authority"])
    op.create_table(
        "message_events",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column(
            "message_id",
            IdType,
            sa.ForeignKey("messages.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
    )
    op.create_index("ix_message_events_message", "message_events", ["message_id"])


def downgrade() -> None:
    op.drop_table("message_events")
    op.drop_table("messages")
