"""Closed-loop referrals: one row per referral (FHIR Task status) and every update offered to
it, applied or refused.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "referrals",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("referral_key", sa.String(255), nullable=False, unique=True),
        sa.Column("patient_key", sa.String(255), nullable=True),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("priority", sa.String(16), nullable=True),
        sa.Column("type", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("referring", sa.Text, nullable=True),
        sa.Column("referred_to", sa.Text, nullable=True),
        sa.Column("needs", sa.Text, nullable=True),
        sa.Column("matches", sa.Text, nullable=True),
        sa.Column("due_at", When, nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.Column("updated_at", When, nullable=False),
        sa.Column("closed_at", When, nullable=True),
        sa.Column("alerted_at", When, nullable=True),
        sa.Column("snapshot", sa.Text, nullable=True),
    )
    op.create_index("ix_referrals_status", "referrals", ["status", "due_at"])
    op.create_index("ix_referrals_patient", "referrals", ["patient_key"])
    op.create_table(
        "referral_events",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column(
            "referral_id",
            IdType,
            sa.ForeignKey("referrals.id", ondelete="CASCADE"),
            nullable=True,
        ),
        sa.Column("referral_key", sa.String(255), nullable=True),
        sa.Column("message_id", IdType, nullable=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("from_status", sa.String(24), nullable=True),
        sa.Column("to_status", sa.String(24), nullable=True),
        sa.Column("accepted", sa.Boolean, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("at", When, nullable=False),
    )
    op.create_index("ix_referral_events_referral", "referral_events", ["referral_id"])
    op.create_index("ix_referral_events_key", "referral_events", ["referral_key"])
    op.create_index("ix_referral_events_message", "referral_events", ["message_id"])


def downgrade() -> None:
    op.drop_table("referral_events")
    op.drop_table("referrals")
