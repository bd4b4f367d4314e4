"""Care transitions: encounters, their timeline, merges, notifications, follow-ups; and the
time a destination accepted each delivery.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("accepted_at", When, nullable=True))
    # Claims walk pending deliveries in id order. With (status, not_before) available the
    # planner sorted the whole due backlog before applying the LIMIT.
    op.drop_index("ix_deliveries_due", "deliveries")
    op.create_index("ix_deliveries_line", "deliveries", ["status", "id"])
    op.create_table(
        "encounters",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("patient_key", sa.String(255), nullable=False),
        sa.Column("visit_key", sa.String(255), nullable=False),
        sa.Column("facility", sa.String(255), nullable=True),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("patient_class", sa.String(8), nullable=True),
        sa.Column("location", sa.String(255), nullable=True),
        sa.Column("opened_at", When, nullable=True),
        sa.Column("admitted_at", When, nullable=True),
        sa.Column("discharged_at", When, nullable=True),
        sa.Column("disposition", sa.String(16), nullable=True),
        sa.Column("discharged_to", sa.String(255), nullable=True),
        sa.Column("snapshot", sa.Text, nullable=True),
        sa.Column("last_message_id", IdType, nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.Column("updated_at", When, nullable=False),
        sa.UniqueConstraint("patient_key", "visit_key", name="uq_encounters_visit"),
    )
    op.create_index("ix_encounters_state", "encounters", ["state", "updated_at"])
    op.create_table(
        "encounter_events",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column(
            "encounter_id",
            IdType,
            sa.ForeignKey("encounters.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("message_id", IdType, nullable=True),
        sa.Column("trigger_event", sa.String(8), nullable=True),
        sa.Column("transition", sa.String(32), nullable=False),
        sa.Column("occurred_at", When, nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("recorded_at", When, nullable=False),
        sa.UniqueConstraint("message_id", "encounter_id", name="uq_encounter_events_message"),
    )
    op.create_index("ix_encounter_events_encounter", "encounter_events", ["encounter_id"])
    op.create_table(
        "patient_merges",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("retired_key", sa.String(255), nullable=False, unique=True),
        sa.Column("surviving_key", sa.String(255), nullable=False),
        sa.Column("message_id", IdType, nullable=True),
        sa.Column("merged_at", When, nullable=False),
    )
    op.create_table(
        "notifications",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("encounter_id", IdType, nullable=True),
        sa.Column("message_id", IdType, nullable=True),
        sa.Column("patient_key", sa.String(255), nullable=False),
        sa.Column("recipient", sa.String(255), nullable=False),
        sa.Column("role", sa.String(64), nullable=True),
        sa.Column("channel", sa.String(32), nullable=True),
        sa.Column("address", sa.String(255), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("delivery_key", sa.String(128), nullable=True),
        sa.Column("created_at", When, nullable=False),
    )
    op.create_index(
        "ix_notifications_encounter", "notifications", ["encounter_id", "recipient"]
    )
    op.create_index("ix_notifications_status", "notifications", ["status"])
    op.create_table(
        "followups",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column(
            "encounter_id",
            IdType,
            sa.ForeignKey("encounters.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("patient_key", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("due_at", When, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", When, nullable=False),
        sa.Column("closed_at", When, nullable=True),
        sa.Column("alerted_at", When, nullable=True),
    )
    op.create_index("ix_followups_due", "followups", ["status", "due_at"])


def downgrade() -> None:
    op.drop_table("followups")
    op.drop_table("notifications")
    op.drop_table("patient_merges")
    op.drop_table("encounter_events")
    op.drop_table("encounters")
    op.drop_index("ix_deliveries_line", "deliveries")
    op.create_index("ix_deliveries_due", "deliveries", ["status", "not_before"])
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("accepted_at")
