"""Patient keys stored under an identifier without an assigning authority take the sending
facility's code, as carehub has keyed them since such identifiers were scoped by MSH-4.

Rows stored before hold the bare key (``|55501``, a message row an empty authority): an A40
naming the id found none of them, a readmission did not see the earlier discharge, and
``--patient 55501^GEN_HOSP`` (or ``GEN_HOSP|55501``) did not list them. Each such row is given
the code of the facility that sent it (carehub.events.facility_code of MSH-4, as
store.scoped_authority reads it):

- a message row, its own MSH-4 (``patient_authority``);
- a visit (``encounters``: patient and visit keys, and the transitions recorded on its
  timeline, which a reprocessed message replays), the MSH-4 of the messages on its timeline,
  when they all name one facility; without any left (retention), the one of its latest care
  event; visits whose messages name two facilities keep their keys, as they are still found;
- its follow-up items and notification rows, the visit's; a notification of no visit, the
  message it was recorded for, when that is about the same patient and not an organisation's
  answer (RRI);
- a patient merge and a stated opt-out, the message that made them;
- a referral's patient, its referrer's latest message (the referral's snapshot).

A row whose facility cannot be told (no MSH-4, no message left) keeps its key and is read as
before; so does one whose new key another row already has. How many rows were keyed and how
many kept their keys is logged, by table, with no identifier. Rows already keyed are never
touched, so the revision may run again (after a downgrade) without changing anything more.

Delivery order keys stay as they are: the outbox keeps a patient's deliveries behind the
older ones in a bare line (Outbox._join_unscoped), and a notice's order key cannot always be
told from the message it is filed under (an answer from an organisation), so it is left to
drain.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-10
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from alembic import op

from carehub.events import facility_code

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

log = logging.getLogger("carehub.store.migrations")

#: Ids bound in one IN list (SQLite's older builds take 999 variables a statement).
CHUNK = 500
#: Facilities given their code in one UPDATE (three variables each).
FACILITIES = 300
#: What key and authority columns hold (schema: String(255)).
KEY_LENGTH = 255

_messages = sa.table(
    "messages",
    sa.column("id", sa.BigInteger),
    sa.column("sending_facility", sa.String),
    sa.column("message_type", sa.String),
    sa.column("patient_id", sa.String),
    sa.column("patient_authority", sa.String),
)
_encounters = sa.table(
    "encounters",
    sa.column("id", sa.BigInteger),
    sa.column("patient_key", sa.String),
    sa.column("visit_key", sa.String),
    sa.column("snapshot", sa.Text),
)
_encounter_events = sa.table(
    "encounter_events",
    sa.column("id", sa.BigInteger),
    sa.column("encounter_id", sa.BigInteger),
    sa.column("message_id", sa.BigInteger),
    sa.column("detail", sa.Text),
)
_followups = sa.table(
    "followups",
    sa.column("id", sa.BigInteger),
    sa.column("encounter_id", sa.BigInteger),
    sa.column("patient_key", sa.String),
)
_notifications = sa.table(
    "notifications",
    sa.column("id", sa.BigInteger),
    sa.column("encounter_id", sa.BigInteger),
    sa.column("message_id", sa.BigInteger),
    sa.column("patient_key", sa.String),
)
_merges = sa.table(
    "patient_merges",
    sa.column("id", sa.BigInteger),
    sa.column("retired_key", sa.String),
    sa.column("surviving_key", sa.String),
    sa.column("message_id", sa.BigInteger),
)
_preferences = sa.table(
    "patient_preferences",
    sa.column("patient_key", sa.String),
    sa.column("message_id", sa.BigInteger),
)
_referrals = sa.table(
    "referrals",
    sa.column("id", sa.BigInteger),
    sa.column("patient_key", sa.String),
    sa.column("snapshot", sa.Text),
)


def _bare(column: Any) -> Any:
    """A key with no authority: ``|55501``."""
    return column.like("|%")


def _scoped(key: Any, code: str) -> Any:
    """``key`` with ``code`` as its authority when it has none; anything else unchanged."""
    if isinstance(key, str) and key.startswith("|"):
        return f"{code}{key}"[:KEY_LENGTH]
    return key


def _chunks(values: Iterable[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    ordered = sorted(values)
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


class _Codes:
    """MSH-4 text -> its facility code (None: it names none), each worked out once."""

    def __init__(self) -> None:
        self._known: dict[str | None, str | None] = {}

    def __call__(self, facility: str | None) -> str | None:
        if facility not in self._known:
            code = facility_code(facility) if facility else None
            self._known[facility] = code[:KEY_LENGTH] if code else None
        return self._known[facility]

    def of_snapshot(self, snapshot: str | None) -> str | None:
        """The code of the sending facility a stored care event (JSON) names."""
        try:
            found = json.loads(snapshot) if snapshot else None
        except ValueError:
            return None
        facility = found.get("sending_facility") if isinstance(found, dict) else None
        return self(facility) if isinstance(facility, str) else None


def _count(bind: Any, table: Any, condition: Any) -> int:
    return int(
        bind.execute(sa.select(sa.func.count()).select_from(table).where(condition)).scalar()
    )


def _write(bind: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """``sql`` (a ``?`` for each value) run for each of ``rows`` through the driver: on a
    large store SQLAlchemy's work for each row of an executemany cost more than the
    database's."""
    if rows:
        bind.exec_driver_sql(sql if bind.dialect.name == "sqlite" else sql.replace("?", "%s"), rows)


def _message_rows(bind: Any, codes: _Codes) -> None:
    """messages.patient_authority: the row's own MSH-4 code, one UPDATE a few hundred
    facilities at a time (a CASE on the facility), so the table is read once per batch."""
    m = _messages.c
    bare = sa.and_(
        m.patient_id.is_not(None),
        m.patient_id != "",
        sa.or_(m.patient_authority.is_(None), m.patient_authority == ""),
    )
    facilities = bind.execute(
        sa.select(m.sending_facility).distinct().where(bare, m.sending_facility.is_not(None))
    ).scalars()
    known = {facility: code for facility in facilities if (code := codes(facility)) is not None}
    for chunk in _chunks(known, FACILITIES):
        case = sa.case({facility: known[facility] for facility in chunk}, value=m.sending_facility)
        bind.execute(
            sa.update(_messages)
            .where(bare, m.sending_facility.in_(chunk))
            .values(patient_authority=case)
        )


def _visit_codes(bind: Any, codes: _Codes) -> tuple[dict[int, str], int]:
    """Each visit some row keys by a bare key -> its facility code (see the module doc),
    and how many such visits name two facilities (kept as they are). The facilities of
    their messages come in one query, the messages table read once."""
    e, ev, f, n, m = (
        _encounters.c,
        _encounter_events.c,
        _followups.c,
        _notifications.c,
        _messages.c,
    )
    bare_visits = sa.select(e.id).where(sa.or_(_bare(e.patient_key), _bare(e.visit_key)))
    bare_followups = sa.select(f.encounter_id).where(_bare(f.patient_key))
    bare_notices = sa.select(n.encounter_id).where(
        _bare(n.patient_key), n.encounter_id.is_not(None)
    )
    wanted: set[int] = set()
    for query in (bare_visits, bare_followups.distinct(), bare_notices.distinct()):
        wanted.update(int(i) for i in bind.execute(query).scalars())
    if not wanted:
        return {}, 0
    named: dict[int, set[str | None]] = {}
    rows = bind.execute(
        sa.select(ev.encounter_id, m.sending_facility)
        .select_from(_encounter_events.join(_messages, m.id == ev.message_id))
        .where(
            sa.or_(
                ev.encounter_id.in_(bare_visits),
                ev.encounter_id.in_(bare_followups),
                ev.encounter_id.in_(bare_notices),
            )
        )
        .group_by(ev.encounter_id, m.sending_facility)
    )
    for encounter_id, facility in rows:
        named.setdefault(int(encounter_id), set()).add(codes(facility))
    found: dict[int, str] = {}
    mixed = 0
    for encounter_id, facilities in named.items():
        if len(facilities) > 1:
            mixed += 1
        elif (code := next(iter(facilities))) is not None:
            found[encounter_id] = code
    for chunk in _chunks(wanted - named.keys()):
        rows = bind.execute(sa.select(e.id, e.snapshot).where(e.id.in_(chunk)))
        for encounter_id, snapshot in rows:
            if (code := codes.of_snapshot(snapshot)) is not None:
                found[int(encounter_id)] = code
    return found, mixed


def _visits(bind: Any, visit_codes: dict[int, str]) -> set[int]:
    """Re-key the visits, one by one, so that two that would take the same keys cannot both
    (nor one the keys of a visit stored under them already): that one keeps its own, and so
    do its rows. Returns the visits keyed now."""
    e = _encounters.c
    bare = sa.or_(_bare(e.patient_key), _bare(e.visit_key))
    planned: list[tuple[Any, ...]] = []
    for encounter_id, patient_key, visit_key in bind.execute(
        sa.select(e.id, e.patient_key, e.visit_key).where(bare)
    ):
        code = visit_codes.get(int(encounter_id))
        if code is not None:
            patient_key, visit_key = _scoped(patient_key, code), _scoped(visit_key, code)
            planned.append((patient_key, visit_key, encounter_id, patient_key, visit_key))
    _write(
        bind,
        "UPDATE encounters SET patient_key = ?, visit_key = ? WHERE id = ? AND NOT EXISTS "
        "(SELECT 1 FROM encounters other WHERE other.patient_key = ? AND other.visit_key = ?)",
        planned,
    )
    kept = {int(i) for i in bind.execute(sa.select(e.id).where(bare)).scalars()}
    return set(visit_codes) - kept


#: How a timeline row's detail (json.dumps, default separators) writes a bare key: the
#: transition's and its summary's patient and visit keys, and the first of a merge's retired
#: keys; a later one follows another list item. Only keys are strings that begin with a bar
#: (a bar inside a string is never at its start, and quotes inside one are escaped).
_BARE_IN_DETAIL = ('"patient_key": "|', '"visit_key": "|', '"retired_keys": ["|', '", "|')
#: The visits keyed now and their codes, for the statements that follow them to their rows.
_KEYED = "carehub_0019_keyed_visits"


def _visit_rows(bind: Any, keyed: dict[int, str]) -> None:
    """The follow-ups, notifications and timeline rows of the visits keyed now, each table
    in one statement joined to a temporary table of those visits and their codes (row by
    row took most of the revision's time on PostgreSQL). The timeline's transitions
    (``result``, replayed when a message is applied again) are rewritten as text, in the
    database: reading and writing each one's JSON took longer still."""
    if not keyed:
        return
    bind.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {_KEYED} (encounter_id BIGINT PRIMARY KEY, "
        "code VARCHAR(255) NOT NULL, written VARCHAR(1024) NOT NULL)"
    )
    _write(
        bind,
        f"INSERT INTO {_KEYED} (encounter_id, code, written) VALUES (?, ?, ?)",
        # ``written``: the code as the detail's JSON has it (json.dumps, ensure_ascii=False).
        [(i, code, json.dumps(code, ensure_ascii=False)[1:-1]) for i, code in keyed.items()],
    )
    of_row = f"(SELECT {{}} FROM {_KEYED} k WHERE k.encounter_id = {{}}.encounter_id)"
    for table in ("followups", "notifications"):
        bind.exec_driver_sql(
            f"UPDATE {table} SET patient_key = {of_row.format('code', table)} || patient_key "
            f"WHERE encounter_id IN (SELECT encounter_id FROM {_KEYED}) "
            "AND substr(patient_key, 1, 1) = '|'"
        )
    detail = "detail"
    written = of_row.format("written", "encounter_events")
    for bare in _BARE_IN_DETAIL:
        quoted = bare.replace("'", "''")
        detail = f"replace({detail}, '{quoted}', '{quoted[:-1]}' || {written} || '|')"
    _write(
        bind,
        f"UPDATE encounter_events SET detail = {detail} "
        f"WHERE encounter_id IN (SELECT encounter_id FROM {_KEYED}) AND detail LIKE ?",
        [('%"|%',)],
    )
    bind.exec_driver_sql(f"DROP TABLE {_KEYED}")


def _notifications_of_no_visit(bind: Any, codes: _Codes) -> None:
    """A bare-keyed notification of no visit (a referral's overdue alert), or of one
    retention deleted: its message's facility, when that message is about the same patient
    (PID-3.1) and is not an answer from an organisation (whose MSH-4 is the organisation's,
    not the patient's hospital's). One of a visit that keeps its keys keeps its own."""
    n, m, e = _notifications.c, _messages.c, _encounters.c
    rows = bind.execute(
        sa.select(n.id, n.patient_key, m.patient_id, m.message_type, m.sending_facility)
        .select_from(
            _notifications.join(_messages, m.id == n.message_id).outerjoin(
                _encounters, e.id == n.encounter_id
            )
        )
        .where(_bare(n.patient_key), e.id.is_(None))
    )
    planned = [
        (_scoped(key, code), row_id)
        for row_id, key, patient_id, message_type, facility in rows
        if key[1:] == patient_id
        and (message_type or "").upper() != "RRI"
        and (code := codes(facility)) is not None
    ]
    _write(bind, "UPDATE notifications SET patient_key = ? WHERE id = ?", planned)


def _merge_rows(bind: Any, codes: _Codes) -> None:
    """patient_merges: the A40's MSH-4 code, for both keys (an MRG-1 without an authority
    shares the survivor's). A retired key another merge already has stays as it is."""
    p, m = _merges.c, _messages.c
    rows = bind.execute(
        sa.select(p.id, p.retired_key, p.surviving_key, m.sending_facility)
        .select_from(_merges.join(_messages, m.id == p.message_id))
        .where(sa.or_(_bare(p.retired_key), _bare(p.surviving_key)))
        .order_by(p.id)
    )
    planned = [
        (_scoped(retired, code), _scoped(surviving, code), row_id, _scoped(retired, code), row_id)
        for row_id, retired, surviving, facility in rows
        if (code := codes(facility)) is not None
    ]
    _write(
        bind,
        "UPDATE patient_merges SET retired_key = ?, surviving_key = ? WHERE id = ? AND NOT "
        "EXISTS (SELECT 1 FROM patient_merges other WHERE other.retired_key = ? "
        "AND other.id <> ?)",
        planned,
    )


def _preference_rows(bind: Any, codes: _Codes) -> None:
    """patient_preferences: the MSH-4 code of the message that stated the choice. Where the
    patient has one under the new key already (stated since), that one stands."""
    p, m = _preferences.c, _messages.c
    rows = bind.execute(
        sa.select(p.patient_key, m.sending_facility)
        .select_from(_preferences.join(_messages, m.id == p.message_id))
        .where(_bare(p.patient_key))
    )
    planned = [
        (_scoped(key, code), key, _scoped(key, code))
        for key, facility in rows
        if (code := codes(facility)) is not None
    ]
    _write(
        bind,
        "UPDATE patient_preferences SET patient_key = ? WHERE patient_key = ? AND NOT EXISTS "
        "(SELECT 1 FROM patient_preferences other WHERE other.patient_key = ?)",
        planned,
    )


def _referral_rows(bind: Any, codes: _Codes) -> None:
    """referrals.patient_key: the referrer's MSH-4 code, from its latest care event."""
    r = _referrals.c
    ids = bind.execute(sa.select(r.id).where(_bare(r.patient_key))).scalars().all()
    planned = []
    for chunk in _chunks(ids):
        rows = bind.execute(sa.select(r.id, r.patient_key, r.snapshot).where(r.id.in_(chunk)))
        for row_id, key, snapshot in rows:
            if (code := codes.of_snapshot(snapshot)) is not None:
                planned.append((_scoped(key, code), row_id))
    _write(bind, "UPDATE referrals SET patient_key = ? WHERE id = ?", planned)


def _left_bare() -> list[tuple[str, Any, Any]]:
    """What is counted, as the log names it: (label, table, the condition of a row that has
    a patient key without an authority)."""
    m = _messages.c
    return [
        (
            "message(s)",
            _messages,
            sa.and_(
                m.patient_id.is_not(None),
                m.patient_id != "",
                sa.or_(m.patient_authority.is_(None), m.patient_authority == ""),
            ),
        ),
        (
            "visit(s)",
            _encounters,
            sa.or_(_bare(_encounters.c.patient_key), _bare(_encounters.c.visit_key)),
        ),
        ("follow-up(s)", _followups, _bare(_followups.c.patient_key)),
        ("notification(s)", _notifications, _bare(_notifications.c.patient_key)),
        (
            "patient merge(s)",
            _merges,
            sa.or_(_bare(_merges.c.retired_key), _bare(_merges.c.surviving_key)),
        ),
        ("opt-out choice(s)", _preferences, _bare(_preferences.c.patient_key)),
        ("referral(s)", _referrals, _bare(_referrals.c.patient_key)),
    ]


def _counts(bind: Any) -> dict[str, int]:
    return {label: _count(bind, table, where) for label, table, where in _left_bare()}


def upgrade() -> None:
    """Messages first (their own MSH-4), then visits and what follows them, then the rows
    that name the message that made them; a store with no bare key is left untouched."""
    bind = op.get_bind()
    before = _counts(bind)
    if not any(before.values()):
        return
    codes = _Codes()
    _message_rows(bind, codes)
    visit_codes, mixed = _visit_codes(bind, codes)
    keyed = _visits(bind, visit_codes)
    _visit_rows(bind, {encounter_id: visit_codes[encounter_id] for encounter_id in keyed})
    _notifications_of_no_visit(bind, codes)
    _merge_rows(bind, codes)
    _preference_rows(bind, codes)
    _referral_rows(bind, codes)
    after = _counts(bind)
    done = ", ".join(
        f"{before[label] - after[label]} {label}"
        for label in before
        if before[label] > after[label]
    )
    if done:
        log.info(
            "store revision 0019: patient identifiers sent without an assigning authority "
            "are now keyed by their sending facility in %s",
            done,
        )
    left = ", ".join(f"{after[label]} {label}" for label in after if after[label])
    if left:
        mixed_note = f"; {mixed} visit(s) have messages from more than one" if mixed else ""
        log.warning(
            "store revision 0019: %s keep the patient key they had, with no assigning "
            "authority: the facility that sent them could not be told (no MSH-4, no message "
            "left%s), or another row has the new key already. They are found as before, by "
            "the identifier alone",
            left,
            mixed_note,
        )


def downgrade() -> None:
    """Keys stay keyed by their sending facility: which of them this revision gave their
    authority cannot be told from those the release made so since, and the older release
    reads a facility's code as an assigning authority like any other."""
