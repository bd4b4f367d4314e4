"""An index of each visit's timeline by transition, so the latest event of a kind is found
without reading the whole timeline.

Every A04 and A01 a visit takes asks whether its ED arrival or admission was already told (the
latest of those transitions), and every A11 and A13 which admission or discharge it takes back.
Through the index by visit alone that read each event of the visit, and a feed that sends no
PV1-19 adds one for every A08: such a patient's messages slowed down as their visit's timeline
grew. The index has the id too, so the latest one is the last entry of its kind.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-10
"""

from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_encounter_events_transition",
        "encounter_events",
        ["encounter_id", "transition", "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_encounter_events_transition", table_name="encounter_events")
