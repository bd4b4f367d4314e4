"""Deliveries with nothing to send are ``skipped``, not ``delivered``.

A FHIR channel that found nothing to send (a resend, a cancel of a notification the receiver
never had, a Task already closed at the organisation) recorded its delivery as delivered, with a
"not sent: ..." receipt and an accepted time: `deliveries list --status delivered` and the
quality measures counted deliveries that never went out. They get a status of their own; the
rows written that way before are turned into it, with the reason as their receipt and no
accepted time. A partial index counts them for /metrics, as 0010's count the discarded ones.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

SKIPPED = sa.text("status = 'skipped'")
#: The receipt the older release gave a delivery with nothing to send.
NOT_SENT = "not sent: "
_deliveries = sa.table(
    "deliveries",
    sa.column("status", sa.String),
    sa.column("receipt", sa.Text),
    sa.column("accepted_at", sa.DateTime(timezone=True)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    d = _deliveries.c
    op.get_bind().execute(
        sa.update(_deliveries)
        .where(d.status == "delivered", d.receipt.like(f"{NOT_SENT}%"))
        .values(
            status="skipped",
            receipt=sa.func.substr(d.receipt, len(NOT_SENT) + 1),
            accepted_at=None,
        )
    )
    op.create_index(
        "ix_deliveries_skipped",
        "deliveries",
        ["id"],
        sqlite_where=SKIPPED,
        postgresql_where=SKIPPED,
    )


def downgrade() -> None:
    """Skipped deliveries become what the older release made of them: delivered, with a
    "not sent: ..." receipt."""
    op.drop_index("ix_deliveries_skipped", table_name="deliveries")
    d = _deliveries.c
    op.get_bind().execute(
        sa.update(_deliveries)
        .where(d.status == "skipped")
        .values(
            status="delivered",
            receipt=sa.literal(NOT_SENT) + sa.func.coalesce(d.receipt, "nothing to send"),
            accepted_at=d.updated_at,
        )
    )
