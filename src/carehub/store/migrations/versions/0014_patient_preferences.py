"""A patient's do-not-notify choice, kept from the message that stated it.

The care-team step reads it from a field (``opt_out_field``, e.g. PD1-12) of each message; a
discharge whose PD1-12 was empty used to be told to everyone although the registration had
said "Y". The choice now stays until a message says otherwise.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    id_type = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "patient_preferences",
        sa.Column("patient_key", sa.String(255), primary_key=True),
        sa.Column("opted_out", sa.Boolean(), nullable=False),
        sa.Column("value", sa.String(255), nullable=True),
        sa.Column("message_id", id_type, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("patient_preferences")
