"""Each delivery keeps, beside its last error, the part of it the log may show.

A failed send's error can end with what the destination answered (an HTTP body, an ACK's ERR
text), and that can quote the message: a patient's name, a phone number. The log has only ever
shown the channel's own account (DeliveryError.loggable), but `carehub status`, meant for
dashboards and monitoring, showed the whole stored text. The worker now stores the loggable
part too, and status shows only that; the full text stays for the views of one message
(`messages show`, `dead-letters list`). Rows written before this have NULL here: status shows
them by the rule the log uses for a channel that does not say where the answer begins (the
words before the first ': ').

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable without a default: added in place on SQLite and PostgreSQL, no table rewrite.
    op.add_column("deliveries", sa.Column("last_error_loggable", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("last_error_loggable")
