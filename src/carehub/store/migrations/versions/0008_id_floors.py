"""Message ids are never used twice: retention records the highest id it deleted in
``id_floors``, and SQLite intake numbers new messages after it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "id_floors",
        sa.Column("table_name", sa.String(64), primary_key=True),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("id_floors")
