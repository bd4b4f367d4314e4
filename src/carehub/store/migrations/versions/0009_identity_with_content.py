"""A message's identity ends with a hash of its content: MSH-3, MSH-4, MSH-10 and the digest
(store.NewMessage.identity), so that only a true resend is taken for the original, and a
different message that reuses a control ID is stored as a new one.

Every stored identity is rewritten to the new form, in batches of rows read by id so that a
store of millions of messages is never held in memory: the old identity was exactly the new
one's sender key without its last separator, so the new one is the old one, the separator and
the digest of the row's own bytes, decoded as intake decoded them.

On PostgreSQL the column is compared byte by byte from now on (collation "C"): the default
collation may order by language rules that skip control characters, and intake finds the
earlier uses of a control ID by a range of the unique identity index (see
MessageStore._uses_of), which needs every identity of one sender and control ID to sort
together.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

from carehub.store.store import DIGEST_CHARS, message_digest

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

#: Rows read and rewritten at a time: a message can be megabytes (an embedded document).
BATCH = 200

_messages = sa.table(
    "messages",
    sa.column("id", sa.BigInteger),
    sa.column("raw", sa.LargeBinary),
    sa.column("charset", sa.String),
    sa.column("identity", sa.Text),
)
_SEPARATOR = "\x1f"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute('ALTER TABLE messages ALTER COLUMN identity TYPE TEXT COLLATE "C"')
    m = _messages.c
    page = (
        sa.select(m.id, m.raw, m.charset, m.identity)
        .where(m.identity.is_not(None), m.id > sa.bindparam("after"))
        .order_by(m.id)
        .limit(BATCH)
    )
    rewrite = (
        sa.update(_messages)
        .where(m.id == sa.bindparam("row_id"))
        .values(identity=sa.bindparam("new_identity"))
    )
    after = 0
    while True:
        rows = bind.execute(page, {"after": after}).all()
        if not rows:
            return
        bind.execute(
            rewrite,
            [
                {
                    "row_id": row.id,
                    "new_identity": row.identity
                    + _SEPARATOR
                    + message_digest(bytes(row.raw), row.charset),
                }
                for row in rows
            ],
        )
        after = rows[-1].id


def downgrade() -> None:
    """Back to MSH-3, MSH-4 and MSH-10 alone. Where messages share those (a control ID reused
    with other content), the first keeps the identity and the others have none: the older
    schema holds one row per identity, and a later resend of them is stored again."""
    cut = f"substr(identity, 1, length(identity) - {DIGEST_CHARS + 1})"
    op.execute(
        "UPDATE messages SET identity = NULL WHERE id IN (SELECT id FROM (SELECT id, "
        f"row_number() OVER (PARTITION BY {cut} ORDER BY id) AS n FROM messages "
        "WHERE identity IS NOT NULL) AS ranked WHERE n > 1)"
    )
    op.execute(f"UPDATE messages SET identity = {cut} WHERE identity IS NOT NULL")
    if op.get_bind().dialect.name == "postgresql":
        op.execute('ALTER TABLE messages ALTER COLUMN identity TYPE TEXT COLLATE "default"')
