"""Message rows name their patient as the care records do, and hold the trigger event that
route conditions test.

A message row's patient (``patient_id``, ``patient_authority``) is the order key of its
forwards and of its place in the work queue, what ``messages list --patient`` finds, what
the routing of a patient's later messages waits behind (MessageStore.unrouted_before) and
what keeps a patient merge through retention. It is now read from PID-3 as Patient.key is
(carehub.hl7.header.read_cx): the identifier stripped and cut at its first subcomponent,
and the assigning authority CX.4's namespace ID, else its universal ID. Before, only the
namespace ID was read, so an identifier whose authority is an OID alone
(``12345^^^&2.16.840.1.113883.19.5&ISO^MR``, common in HIE feeds) was keyed by each sending
facility's code: one patient's admission from one campus and discharge from another had two
order keys, two work-queue partitions and two delivery lines, and neither was the key the
visit was recorded under.

Each stored message's header is read again from its bytes, decoded as intake decoded them,
in batches of rows read by id so that a large store is never held in memory: as the release
before read it, and as intake reads it now (store.patient_columns, store.event_column). A row
that holds what the release before read, where that differs from what is read now, takes
the new values; a row that holds anything else (written by hand, say) is left as it is:

- ``patient_id`` and ``patient_authority``, and the order key of the message's deliveries
  that were in its line under the old key (pending, sending, dead and holding the line, or
  finished), so a patient's waiting deliveries and the ones routed from now on are one line
  and keep their order;
- ``trigger_event``: MSH-9.2, else EVN-1 (a v2.1 or v2.2 feed's ``ADT`` with ``EVN|A03``
  was stored with no event), so ``messages list --event`` and ``--type ADT^A03`` find it,
  and a merge sent so is followed by unrouted_before.

The care records (visits, follow-ups, notifications, merges, referrals) were keyed by
Patient.key all along and are not touched. How many rows changed is logged, with no
identifier. A row changed no longer holds what the release before read, so the revision may
run again (after a downgrade) without changing anything more.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-20
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from alembic import op

from carehub.hl7.charsets import decode_message
from carehub.hl7.header import MessageHeader, PatientId
from carehub.hl7.view import MessageView, unescape
from carehub.store.store import event_column, patient_columns
from carehub.workqueue import patient_key

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None

log = logging.getLogger("carehub.store.migrations")

#: Rows read at a time: a message can be megabytes (an embedded document).
BATCH = 200

_messages = sa.table(
    "messages",
    sa.column("id", sa.BigInteger),
    sa.column("raw", sa.LargeBinary),
    sa.column("charset", sa.String),
    sa.column("message_type", sa.String),
    sa.column("trigger_event", sa.String),
    sa.column("patient_id", sa.String),
    sa.column("patient_authority", sa.String),
)


def _read_before(view: MessageView) -> tuple[PatientId | None, str]:
    """(the patient, the trigger event) as the release before read a header: PID-3's MR
    repetition, else its first, with CX.1 as written and CX.4's namespace ID alone, else
    PID-2.1 and PID-2.4.1; MSH-9.2 alone for the event."""
    seps = view.separators
    msh_9 = view.msh(9).split(seps.repetition, 1)[0].split(seps.component)
    event = unescape(msh_9[1], seps).strip() if len(msh_9) > 1 else ""
    position = view.first("PID")
    if position is None:
        return None, event
    fields = view.fields(position)
    first: PatientId | None = None
    for repetition in (fields[3] if len(fields) > 3 else "").split(seps.repetition):
        parts = repetition.split(seps.component)
        if not parts[0]:
            continue
        parts += [""] * (5 - len(parts))
        if seps.escape in repetition:
            parts = [unescape(part, seps) for part in parts]
        found = PatientId(parts[0], parts[3].split(seps.subcomponent, 1)[0], parts[4])
        if found.type_code.upper() == "MR":
            return found, event
        first = first or found
    if first is not None:
        return first, event
    legacy = view.get("PID-2.1")
    return (PatientId(legacy, view.get("PID-2.4.1")) if legacy else None), event


def _headers(raw: Any, charset: str | None) -> tuple[MessageHeader, MessageHeader] | None:
    """(the header as the release before read the stored bytes, as intake reads them now);
    None when they hold no message."""
    try:
        decoded = decode_message(bytes(raw), charset or "utf-8")
        view = MessageView(decoded.text, decoded.charset)
        now = MessageHeader.read(view)
    except (ValueError, LookupError):  # not HL7 (NotHL7Error), or a codec no longer known
        return None
    patient, event = _read_before(view)
    return replace(now, patient=patient, trigger_event=event), now


def _same(stored: tuple[Any, ...], read: tuple[Any, ...]) -> bool:
    """Whether a row holds these values ('' and NULL alike)."""
    return tuple(v or None for v in stored) == tuple(v or None for v in read)


def _write(bind: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """``sql`` (a ``?`` for each value) run for each of ``rows`` through the driver."""
    if rows:
        bind.exec_driver_sql(sql if bind.dialect.name == "sqlite" else sql.replace("?", "%s"), rows)


def upgrade() -> None:
    bind = op.get_bind()
    m = _messages.c
    # A row whose header was read has a type or a patient; one refused before its header
    # could be read (delimiters unusable) has neither, and nothing to read again.
    page = (
        sa.select(m.id, m.raw, m.charset, m.trigger_event, m.patient_id, m.patient_authority)
        .where(
            sa.or_(m.message_type.is_not(None), m.patient_id.is_not(None)),
            m.id > sa.bindparam("after"),
        )
        .order_by(m.id)
        .limit(BATCH)
    )
    counts = {"patients": 0, "events": 0, "deliveries": 0}
    after = 0
    while True:
        rows = bind.execute(page, {"after": after}).all()
        if not rows:
            break
        after = rows[-1].id
        patients: list[tuple[Any, ...]] = []
        lines: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        for row in rows:
            headers = _headers(row.raw, row.charset)
            if headers is None:
                continue
            before, now = headers
            stored = (row.patient_id, row.patient_authority)
            keyed = patient_columns(now)
            if _same(stored, patient_columns(before)) and not _same(stored, keyed):
                patients.append((*keyed, row.id))
                old = patient_key(row.patient_id, row.patient_authority, row.id)
                new = patient_key(*keyed, row.id)
                if new != old:
                    lines.append((new, row.id, old))
            event = event_column(now)
            if _same((row.trigger_event,), (event_column(before),)) and not _same(
                (row.trigger_event,), (event,)
            ):
                events.append((event, row.id))
        _write(
            bind, "UPDATE messages SET patient_id = ?, patient_authority = ? WHERE id = ?", patients
        )
        _write(bind, "UPDATE messages SET trigger_event = ? WHERE id = ?", events)
        if lines:
            sql = "UPDATE deliveries SET order_key = ? WHERE message_id = ? AND order_key = ?"
            if bind.dialect.name != "sqlite":
                sql = sql.replace("?", "%s")
            for line in lines:
                counts["deliveries"] += bind.exec_driver_sql(sql, line).rowcount
        counts["patients"] += len(patients)
        counts["events"] += len(events)
    if any(counts.values()):
        log.info(
            "store revision 0024: %d message(s) now name their patient as their care records "
            "do (%d delivery(ies) moved to that patient's line); %d message(s) now hold the "
            "trigger event route conditions test (MSH-9.2, else EVN-1)",
            counts["patients"],
            counts["deliveries"],
            counts["events"],
        )


def downgrade() -> None:
    """Rows keep what this revision gave them: which rows it changed cannot be told from the
    ones the release has stored so since, and the older release reads any authority and
    trigger event a row holds (what it stores from then on, it keys as it did)."""
