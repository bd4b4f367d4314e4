"""A delivery can be given up on after a time of failing, not only after a count of attempts.

A forward's retry policy takes ``give_up_after`` (and with no limit written retries for a
day): a receiving system down for a maintenance window gets its backlog when it is back, where
eight attempts in about two minutes made every message a dead letter. Each delivery keeps the
span it is given (as it keeps ``max_attempts``, so `messages show` prints the limit that
applies) and when its current run of failures began. Rows written before this have NULL in
both: no time limit, and a run that counts from its next failure.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable without a default: added in place on SQLite and PostgreSQL, no table rewrite.
    op.add_column("deliveries", sa.Column("give_up_after", sa.Integer(), nullable=True))
    op.add_column(
        "deliveries", sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("failing_since")
        batch.drop_column("give_up_after")
