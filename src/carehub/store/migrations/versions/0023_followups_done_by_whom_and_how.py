"""A follow-up marked done says who did it, how, and any note.

Transitional-care billing and hand-offs need who made the contact or saw the patient and how
(phone, visit, portal): `carehub followups done --by --method --note` stores them on the item,
and `followups list` shows them. Rows written before this have NULL in all three.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable without a default: added in place on SQLite and PostgreSQL, no table rewrite.
    op.add_column("followups", sa.Column("done_by", sa.String(255), nullable=True))
    op.add_column("followups", sa.Column("done_method", sa.String(32), nullable=True))
    op.add_column("followups", sa.Column("done_note", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("followups") as batch:
        batch.drop_column("done_note")
        batch.drop_column("done_method")
        batch.drop_column("done_by")
