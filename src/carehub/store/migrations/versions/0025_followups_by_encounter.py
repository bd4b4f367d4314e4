"""Follow-ups are indexed by their visit.

Deleting a visit (retention) cascades to its follow-ups through followups.encounter_id, and
a discharge looks up the follow-ups it opens by it: without an index each of those read the
whole table, so retention cost (visits deleted x follow-ups stored). Every other foreign key
retention deletes through already has its index.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-08
"""

from alembic import op

revision = "0025"
down_revision = "0024"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_followups_encounter", "followups", ["encounter_id"])


def downgrade() -> None:
    op.drop_index("ix_followups_encounter", table_name="followups")
