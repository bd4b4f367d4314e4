"""The store's own identity, part of every idempotency key and FHIR message id it sends.

Message ids start at 1 in every store: two hubs sending to one receiver (or one hub after its
store was rebuilt) gave different patients' deliveries the same ``Idempotency-Key``, and a
receiver that drops repeats by it dropped a real admission. The random id made here tells the
stores apart.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "store_identity",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.bulk_insert(table, [{"id": str(uuid.uuid4()), "created_at": datetime.now(UTC)}])


def downgrade() -> None:
    op.drop_table("store_identity")
