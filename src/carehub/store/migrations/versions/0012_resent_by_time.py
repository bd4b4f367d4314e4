"""Resends by time: a partial index of the "resent" history rows by when they came.

`carehub status` counts each listener's resends in its window (a sender resending a lot is not
getting its ACKs in time); the resent rows are few among the history rows, so the index holds
only them.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_RESENT = sa.text("event = 'resent'")


def upgrade() -> None:
    op.create_index(
        "ix_message_events_resent",
        "message_events",
        ["at"],
        sqlite_where=_RESENT,
        postgresql_where=_RESENT,
    )


def downgrade() -> None:
    op.drop_index("ix_message_events_resent", table_name="message_events")
