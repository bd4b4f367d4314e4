"""MessageStore: SQLAlchemy Core over SQLite (WAL, the embedded default) or PostgreSQL.

Core, not the ORM: intake inserts messages in groups of hundreds per commit, and the ORM's
unit of work would cost more than the commit itself.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import socket
import sqlite3
import stat
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from alembic.util import CommandError as AlembicError
from sqlalchemy import (
    ColumnElement,
    Engine,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal_column,
    not_,
    or_,
    select,
    true,
    update,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, NoSuchModuleError

from carehub import __version__
from carehub.events import facility_code
from carehub.hl7.charsets import decode_message
from carehub.hl7.header import MessageHeader, read_cx
from carehub.hl7.view import DIGEST_CHARS, MessageView, NotHL7Error, raw_digest
from carehub.search import MessageFilter
from carehub.store.failure_run import FailureRun
from carehub.store.schema import (
    UNFINISHED,
    DeliveryStatus,
    MessageStatus,
    deliveries,
    delivery_in,
    encounter_events,
    encounters,
    followups,
    message_events,
    message_steps,
    messages,
    notifications,
    patient_merges,
    patient_preferences,
    referral_events,
    referrals,
    store_identity,
)
from carehub.store.write_gate import WriteGate

log = logging.getLogger(__name__)

Durability = Literal["process", "power"]
MIGRATIONS = Path(__file__).parent / "migrations"
RESENT = "resent"


class StoreError(RuntimeError):
    """The store cannot be opened or written."""


class StoreBusy(StoreError):
    """Another writer holds SQLite's write lock right now; nothing was written. Only raised
    when ``intake_waits_for_lock`` is False."""


class GateBusy(StoreBusy):
    """The writer holding the lock is in this process: ``intake_gate_free`` will be called
    when it lets go, so there is no need to poll."""


@dataclass(slots=True)
class NewMessage:
    """What intake hands the store for one received frame."""

    raw: bytes
    transport: str
    listener: str
    peer: str | None
    status: MessageStatus
    ack_code: str
    header: MessageHeader | None = None
    charset: str | None = None
    detail: str | None = None
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: The text as intake decoded it, handed on to the worker with the row (RecentMessages).
    text: str | None = None
    #: The hash of the content (MessageView.content_digest) that ends the identity; intake
    #: hands it over, else it is computed from ``raw`` when first needed.
    digest: str | None = None
    #: Set by the insert: a stored message with the same sender and control ID but other
    #: content (a control ID reused; the newest of its group, else one the index finds
    #: first), noted in this row's intake detail.
    reuses: int | None = None
    #: patient() once worked out: the insert and intake's queueing both ask for it.
    _patient: tuple[str | None, str | None] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def sender_key(self) -> str | None:
        """MSH-3, MSH-4 and MSH-10, each followed by a separator: how every identity of this
        sender and control ID begins, whatever the content (see ``identity``)."""
        if self.status is not MessageStatus.RECEIVED or self.header is None:
            return None  # refused and rejected frames never stand in for a later good resend
        h = self.header
        if not h.control_id:
            return None
        return _fit(_SEPARATOR.join((h.sending_application, h.sending_facility, h.control_id, "")))

    def identity(self) -> str | None:
        """The key a resend shares with the original: MSH-3, MSH-4, MSH-10 and a hash of the
        content. Senders reuse control IDs (a counter reset by an interface restart, a test
        system, a replay with corrected content), so only the same sender, control ID *and*
        content make a resend; the same control ID with other content is a new message."""
        key = self.sender_key()
        if key is None:
            return None
        if self.digest is None:
            self.digest = message_digest(self.raw, self.charset)
        return key + self.digest

    def intake_note(self) -> str | None:
        """What intake noted, with a reused control ID first: the operator's first question."""
        if self.reuses is None or self.header is None:
            return self.detail
        h = self.header
        note = (
            f"MSH-10 {h.control_id} from {h.sending_application}/{h.sending_facility} was used "
            f"before by message {self.reuses} with different content; stored as a new message"
        )
        return f"{note}; {self.detail}" if self.detail else note

    def values(self, time: Callable[[datetime], Any]) -> tuple[Any, ...]:
        """The row in _INSERT_COLUMNS order, times converted by ``time`` for the driver.

        Whatever the sender wrote goes in as its column can hold it (see ``_fit``), so that
        one message with a 40-character MSH-9 cannot fail the commit of every message in
        its group on PostgreSQL."""
        h = self.header
        patient_id, authority = self.patient()
        received = time(self.received_at)
        detail = _fit(self.intake_note())
        return (
            received,
            self.transport,
            self.listener,
            _fit(self.peer, _PEER),
            self.raw,
            len(self.raw),
            _fit(self.charset, _CHARSET),
            _fit(h.sending_application, _NAME) if h else None,
            _fit(h.sending_facility, _NAME) if h else None,
            _fit(h.receiving_application, _NAME) if h else None,
            _fit(h.receiving_facility, _NAME) if h else None,
            _fit(h.message_type or None, _CODE) if h else None,
            event_column(h),
            _fit(h.structure or None, _CODE) if h else None,
            _fit(h.control_id or None, _CONTROL_ID) if h else None,
            _fit(h.version or None, _CODE) if h else None,
            patient_id,
            authority,
            self.ack_code,
            self.status.value,
            received,
            detail,
            detail,  # intake_detail: what intake noted, kept when later statuses replace detail
            self.identity(),
        )

    def patient(self) -> tuple[str | None, str | None]:
        """(patient_id, patient_authority) as the row holds them (patient_columns); the
        order key of the message's deliveries is made of them."""
        if self._patient is None:
            self._patient = patient_columns(self.header)
        return self._patient

    def stored(self, message_id: int) -> StoredMessage:
        """The row as committed under ``message_id``, as get_many would read it back."""
        row = dict(zip(_INSERT_COLUMNS, self.values(_as_is), strict=True))
        del row["identity"]
        return StoredMessage(id=message_id, decoded=self.text, **row)


def message_digest(raw: bytes, charset: str | None) -> str:
    """``MessageView.content_digest`` of stored bytes, decoded as intake decodes them (the
    identity of a row written without one, and migration 0009's rewrite of older rows)."""
    decoded = decode_message(raw, charset or "utf-8")
    try:
        view = MessageView(decoded.text, decoded.charset)
    except NotHL7Error:
        return raw_digest(raw)
    return view.content_digest(raw if decoded.lossy else None)


def _padding_free_digest(raw: bytes, charset: str | None) -> str | None:
    """MessageView.padding_free_digest of stored bytes, decoded as intake decodes them; None
    when they are not read as text exactly (their resends are told by their bytes alone)."""
    decoded = decode_message(raw, charset or "utf-8")
    if decoded.lossy:
        return None
    try:
        return MessageView(decoded.text, decoded.charset).padding_free_digest()
    except NotHL7Error:
        return None


#: The character after the separator (0x1F) that ends a sender key: every identity that begins
#: with a key sorts below the key with this in place of its last character.
_AFTER_SEPARATOR = "\x20"
#: What separates the parts of an identity (NewMessage.sender_key).
_SEPARATOR = "\x1f"
#: Beyond this many messages with one control ID, a search reads the control_id column
#: instead of binding every id.
_IDS_BY_CONTROL_ID = 5000


class _EarlierUses:
    """For each message of a group, in order: whether it is a resend, and which earlier
    message used its sender and control ID with other content (``probed``, what the store
    holds, from MessageStore._probe_uses; then the group's own messages as they go in)."""

    __slots__ = ("_group", "_identities", "_probed")

    def __init__(self, probed: dict[str, tuple[int | None, int | None]]) -> None:
        self._probed = probed
        self._group: dict[str, int] = {}  # sender key -> newest message of the group with it
        self._identities: set[str] = set()

    def check(self, identity: str | None) -> tuple[bool, int | None]:
        """(a resend, the earlier message it reuses the control ID of, or None)."""
        if identity is None:
            return False, None
        same, other = self._probed.get(identity, (None, None))
        if same is not None or identity in self._identities:
            return True, None
        return False, self._group.get(identity[:-DIGEST_CHARS], other)

    def add(self, identity: str | None, message_id: int) -> None:
        """A message of the group goes in under ``message_id``: later ones see it."""
        if identity is not None:
            self._identities.add(identity)
            self._group[identity[:-DIGEST_CHARS]] = message_id


def _fit(value: str | None, limit: int | None = None) -> str | None:
    """A value from the sender as a text column can hold it: at most ``limit`` characters, and
    NUL shown as U+FFFD. PostgreSQL refuses both a longer value and a NUL (SQLite takes them),
    and the raw message keeps the value whole. The same value always fits the same way, so a
    resend's identity still matches the original's."""
    if value is None or ("\x00" not in value and (limit is None or len(value) <= limit)):
        return value
    value = value.replace("\x00", "\ufffd")
    return value if limit is None else value[:limit]


def _length(column: str) -> int:
    length: int = messages.c[column].type.length  # type: ignore[attr-defined]
    return length


_PEER = _length("peer")
_CHARSET = _length("charset")
_NAME = _length("sending_application")  # applications, facilities, patient id and authority
_CODE = _length("message_type")  # type, event, structure, version
_CONTROL_ID = _length("control_id")


@dataclass(slots=True, frozen=True)
class InsertOutcome:
    """Where a submitted message ended up: its row id, and whether it was a resend."""

    message_id: int
    duplicate: bool
    #: A new message that reuses the sender and control ID of this earlier, different one.
    reuses: int | None = None


@dataclass(slots=True, frozen=True)
class StatusChange:
    at: datetime
    event: str
    detail: str | None


def patient_columns(header: MessageHeader | None) -> tuple[str | None, str | None]:
    """(patient_id, patient_authority) of a message row: the identifier that names the
    patient (header.primary_patient_id, as Patient.key is chosen) and its assigning
    authority, else the sending facility's code (scoped_authority); (None, None) when the
    message names no patient."""
    if header is None or (patient := header.patient) is None:
        return None, None
    authority = scoped_authority(patient.authority, header.sending_facility) or ""
    return _fit(patient.value, _NAME), _fit(authority, _NAME)


def event_column(header: MessageHeader | None) -> str | None:
    """trigger_event of a message row: the header's (MSH-9.2, else EVN-1), what
    `messages list --event` finds and route conditions test."""
    return _fit(header.trigger_event or None, _CODE) if header is not None else None


@dataclass(slots=True, frozen=True)
class StoredMessage:
    id: int
    received_at: datetime
    transport: str
    listener: str
    peer: str | None
    raw: bytes
    size: int
    charset: str | None
    sending_application: str | None
    sending_facility: str | None
    receiving_application: str | None
    receiving_facility: str | None
    message_type: str | None
    trigger_event: str | None
    structure: str | None
    control_id: str | None
    version: str | None
    patient_id: str | None
    patient_authority: str | None
    ack_code: str
    status: str
    status_at: datetime
    detail: str | None
    intake_detail: str | None = None  # what intake noted; `detail` follows the latest status
    #: The decoded text, when intake handed it over (see RecentMessages); else decoded on use.
    decoded: str | None = field(default=None, repr=False, compare=False)

    @property
    def identity(self) -> str:
        """MSH-3, MSH-4, MSH-10 and a hash of the content, as the store's identity: which
        message of which sender this is, for dry runs that have no row ids. Senders reuse
        control IDs (the public samples all say MSG00001), so without the content two
        different messages of one dry run would be taken for one."""
        parts = (self.sending_application, self.sending_facility, self.control_id)
        digest = message_digest(self.raw, self.charset)
        return "\x1f".join([*(part or "" for part in parts), digest])

    @property
    def text(self) -> str:
        if self.decoded is not None:
            return self.decoded
        return decoded_text(self.raw, self.charset)

    def summary(self) -> dict[str, Any]:
        """JSON-ready header facts (no message body)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            if name == "raw":
                continue
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, datetime) else value
        return out


def decoded_text(raw: bytes, charset: str | None) -> str:
    """A stored message's text, decoded as intake decoded it (MSH-18, else its charset)."""
    from carehub.hl7.charsets import decode_message

    return decode_message(raw, charset or "utf-8").text


@dataclass(slots=True, frozen=True)
class PrunePlan:
    """What retention does with the messages received before ``cutoff`` (and, in ``care``,
    with the care and referral records last changed before it).

    A message that still has work is kept unless ``include_unfinished``: one not routed yet,
    one with a delivery waiting or being sent, one with a dead letter (a delivery that gave
    up, which an operator may still retry). Each kept message is counted once, under the
    first of those reasons that holds."""

    cutoff: datetime
    older: int  # messages received before the cutoff
    unrouted: int  # still 'received': stored and ACKed, not routed yet
    waiting: int  # a delivery pending or being sent
    dead: int  # a dead letter, and nothing waiting
    #: The care and referral records the same retention deletes and keeps.
    care: CareRecordsPlan
    include_unfinished: bool = False

    @property
    def unfinished(self) -> int:
        """Older messages that still have work, kept or not."""
        return self.unrouted + self.waiting + self.dead

    @property
    def kept(self) -> int:
        return 0 if self.include_unfinished else self.unfinished

    @property
    def deleted(self) -> int:
        return self.older - self.kept


#: The care and referral tables retention deletes from, in the order their counts are told.
CARE_RECORD_TABLES = (
    "encounters",
    "encounter_events",
    "notifications",
    "followups",
    "referrals",
    "referral_events",
    "patient_merges",
)

#: A notification the notify step holds for its recipient's next digest: not sent yet.
_HELD_FOR_DIGEST = "digest"


@dataclass(slots=True, frozen=True)
class CareRecordsPlan:
    """What retention does with the care-transition and referral records (they hold names,
    birth dates, addresses and care-team addresses as long as they stay).

    Finished records last changed before the cutoff go: an encounter that is no longer open
    (discharged, cancelled, closed), with its events, notifications and follow-ups; a closed
    referral (rejected, completed, cancelled, failed), with its events; a referral event that
    matched no referral; a notification without a visit left in the store. An older encounter
    that is still open, has a follow-up pending, or a notification held for the next digest,
    an open referral, and a notification without a visit held for a digest are kept unless
    ``include_unfinished``, and counted (each encounter once, under the first reason).

    A patient merge goes once it and every merge chained to it are older than the cutoff and
    nothing left in the store (a message, an encounter, a follow-up, a referral, a
    notification, a patient's standing opt-out) carries any key of that chain: while anything
    does, a message for the retired identifier, late or reprocessed, must still reach the
    surviving record and honour its opt-out. Those are counted in ``merges_in_use``, whatever
    ``include_unfinished`` says. Patient preferences are never deleted: an opt-out is the
    patient's standing instruction, not a record of care."""

    deleted: dict[str, int]  # table name (CARE_RECORD_TABLES) -> rows
    open_encounters: int
    encounters_with_followups: int  # closed, with a follow-up open or overdue
    encounters_with_digest: int  # closed, with a notification held for a digest
    open_referrals: int
    notices_for_digest: int  # without a visit, held for a digest
    merges_in_use: int  # older than the cutoff, kept: their patients still have records
    include_unfinished: bool = False

    @property
    def unfinished(self) -> int:
        """Older records that still have work, kept or not."""
        return (
            self.open_encounters
            + self.encounters_with_followups
            + self.encounters_with_digest
            + self.open_referrals
            + self.notices_for_digest
        )

    @property
    def kept(self) -> int:
        return 0 if self.include_unfinished else self.unfinished

    @property
    def total(self) -> int:
        """Rows deleted, every table together."""
        return sum(self.deleted.values())


@dataclass(slots=True, frozen=True)
class PruneResult:
    messages_deleted: int
    bytes_before: int | None
    bytes_after: int | None
    #: What was found before deleting: how many were kept, and why.
    plan: PrunePlan | None = None
    #: Care and referral rows deleted, per table (CARE_RECORD_TABLES).
    care_deleted: dict[str, int] = field(default_factory=dict)
    #: SQLite: bytes of the database's pages holding data (pages less the free list), before
    #: and after: what the rows take, whether or not VACUUM gave the freed pages back.
    used_before: int | None = None
    used_after: int | None = None
    #: SQLite: bytes left in the WAL after the final checkpoint (a reader, such as a serving
    #: hub, can keep it from being trimmed; the hub's checkpointer trims it later).
    wal_after: int | None = None
    #: SQLite: whether VACUUM ran, and if not, why (not asked for, or too little disk).
    vacuumed: bool = False
    not_vacuumed: str | None = None


def _utc(value: datetime) -> datetime:
    """SQLite stores a datetime's wall clock and drops its offset, so write and compare in UTC
    (a non-UTC offset used to be stored, and compared, as if it were UTC)."""
    return value.astimezone(UTC) if value.tzinfo else value


_INSERT_COLUMNS = (
    "received_at", "transport", "listener", "peer", "raw", "size", "charset",
    "sending_application", "sending_facility", "receiving_application", "receiving_facility",
    "message_type", "trigger_event", "structure", "control_id", "version", "patient_id",
    "patient_authority", "ack_code", "status", "status_at", "detail", "intake_detail", "identity",
)  # fmt: skip

#: A message_events row, in the order the driver-level inserts take its values.
EVENT_COLUMNS = ("message_id", "at", "event", "detail")

#: Rows per multi-row INSERT: 24 parameters each stays far below SQLite's 32,766 limit.
_ROWS_PER_STATEMENT = 200

#: The id SQLite intake numbers a group after: the highest id in the table, or the highest one
#: retention ever deleted (schema.id_floors), whichever is higher.
_SQL_LAST_MESSAGE_ID = (
    "SELECT max(coalesce((SELECT max(id) FROM messages), 0), "
    "coalesce((SELECT last_id FROM id_floors WHERE table_name = 'messages'), 0))"
)
#: Before retention deletes messages on SQLite: remember the highest id there has been.
_SQL_KEEP_MESSAGE_ID_FLOOR = (
    "INSERT INTO id_floors (table_name, last_id) "
    f"SELECT 'messages', ({_SQL_LAST_MESSAGE_ID}) WHERE true "
    "ON CONFLICT (table_name) DO UPDATE SET last_id = excluded.last_id"
)

#: Tables retention deletes from (a message's steps, deliveries and attempts by ON DELETE
#: CASCADE): those VACUUM goes over on PostgreSQL, and whose size prune reports there.
_PRUNED_TABLES = (
    "messages",
    "message_events",
    "message_steps",
    "deliveries",
    "delivery_attempts",
    *CARE_RECORD_TABLES,
)

#: The intake event a message's ACK code stands for: the first entry of its history.
INTAKE_EVENT_BY_ACK = {
    "AA": MessageStatus.RECEIVED.value,
    "AE": MessageStatus.REFUSED.value,
    "AR": MessageStatus.REJECTED.value,
}


def _sqlite_time(value: datetime) -> str:
    """The text SQLAlchemy's SQLite DateTime reads back: naive UTC, microseconds."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]  # without the "+00:00"


def _as_is(value: datetime) -> datetime:
    return value


class DriverSQL:
    """Plain SQL in the driver's own placeholder style, for the statements run for every
    message or batch (intake's inserts, the worker's routing results and attempts).

    SQLAlchemy Core spends more Python time per row binding parameters (a dict per row, a
    processor per datetime) than SQLite takes to run the statement: under
    bench/bench_routing.py its parameter handling alone was 12% of the hub's event loop.
    Statements written here take rows as tuples, with times converted once per batch by
    ``time``. Everything else goes through SQLAlchemy."""

    def __init__(self, is_sqlite: bool) -> None:
        self.mark = "?" if is_sqlite else "%s"
        #: A datetime as the column stores it: SQLAlchemy's SQLite text, or as is.
        self.time: Callable[[datetime], Any] = _sqlite_time if is_sqlite else _as_is

    def marks(self, count: int) -> str:
        """``count`` placeholders, comma-separated (a row's values, or an IN list)."""
        return ", ".join([self.mark] * count)

    def insert(self, table: str, columns: tuple[str, ...]) -> str:
        return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({self.marks(len(columns))})"


def _aware(value: datetime) -> datetime:
    """SQLite hands datetimes back naive; they were written in UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


#: Seconds a SQLite call waits for a write lock another connection holds (SQLite's busy timeout).
LOCK_TIMEOUT = 30.0

#: libpq's bounds on every PostgreSQL connection, so that a server or network that goes
#: silent (a dropped route, a dead host) fails the connection within about 15 s instead of
#: leaving it waiting forever: connecting at all takes at most connect_timeout seconds, an
#: idle or waiting connection is probed after keepalives_idle seconds and given up after
#: keepalives_count unanswered probes, and data the server has not acknowledged fails the
#: connection after tcp_user_timeout milliseconds. A value the store URL sets wins.
PG_CONNECTION_BOUNDS: dict[str, int] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}
#: The same bounds asked of the server for its end of each connection (session settings):
#: a transaction whose client was lost, or hung up on (MessageStore.hang_up), then ends
#: within seconds. Left open, it would hold the rows it wrote, and a resend of its message
#: would wait on them for as long as the server's own keepalive takes (two hours, usually).
PG_SERVER_BOUNDS: dict[str, int] = {
    "tcp_keepalives_idle": 5,
    "tcp_keepalives_interval": 2,
    "tcp_keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}

#: Seconds /health waits for the store to answer a check (``ping``, ``can_write``).
PROBE_PATIENCE = 5.0


#: Rows a search reads per query (see MessageStore.search).
SEARCH_PAGE = 500

#: A message's id as an expression: SQLite then answers min()/max() over a received_at range
#: from that index, instead of walking the primary key past every older message.
_ID_BY_INDEX = messages.c.id + literal_column("0")


def first_id_since(conn: Any, since: datetime) -> int | None:
    """The lowest id of the messages received at or after ``since`` (None: there are none),
    read from the received_at index: where a window of recent messages starts."""
    found = conn.execute(
        select(func.min(_ID_BY_INDEX)).where(messages.c.received_at >= _utc(since))
    ).scalar()
    return int(found) if found is not None else None


#: The SQLite store's file in the data dir.
STORE_FILE = "carehub.db"


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / STORE_FILE).resolve()}"


#: What SQLite keeps beside a database file; each holds messages as the database does.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")
#: The mode of a store file: the hub's user only.
PRIVATE_FILE_MODE = 0o600
#: Permission bits that open a file to other accounts (its group and everyone).
_OTHER_ACCOUNTS = 0o077


def keep_store_private(database: Path) -> None:
    """Create a SQLite store's database file with mode 0600 before SQLite opens it, whichever
    command makes the store: SQLite gives the -wal, -shm and -journal files its database's
    mode whatever the umask, so all of them are the hub's user's only. A store found open to
    other accounts (made by an earlier release, or copied in with a loose mode) is made
    private at once, with a WARNING naming each file: it holds patient messages, and
    refusing to start would stop every feed over what the hub can put right itself."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(database, os.O_RDWR | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    if os.name != "posix":  # no group and other bits to take away
        return
    for path in (database, *(Path(f"{database}{suffix}") for suffix in SQLITE_COMPANIONS)):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:  # not there (no -journal in WAL mode), or for SQLite to report
            continue
        if not mode & _OTHER_ACCOUNTS:
            continue
        try:
            os.chmod(path, mode & ~_OTHER_ACCOUNTS)
        except OSError as err:
            log.warning(
                "store file %s is open to other accounts (mode %03o) and could not be made "
                "private (%s): it holds patient messages; make it the hub's user's only "
                "(chmod 600)",
                path,
                mode,
                err.strerror or type(err).__name__,
            )
        else:
            log.warning(
                "store file %s was open to other accounts (mode %03o): made private "
                "(mode %03o); it holds patient messages, so check who may have read it and "
                "any copies made from it",
                path,
                mode,
                mode & ~_OTHER_ACCOUNTS,
            )


#: Messages RecentMessages holds at most: a worker further behind than this reads the store.
RECENT_CAPACITY = 4096


class RecentMessages:
    """Messages this process stored moments ago, held for the in-process worker.

    In the embedded default the worker routes each message a few milliseconds after intake
    committed it; reading it back from the store and decoding its text again cost 5% of the
    hub's event loop under bench/bench_routing.py. Intake leaves each accepted message here,
    and the worker takes it (each is taken once; an unclaimed one ages out past
    RECENT_CAPACITY). What the worker takes is the row as committed, so a message routed
    meanwhile by another path still reads 'received' here: the routing result's own
    eligibility check (Outbox.record_routing) is what keeps it from being routed twice."""

    def __init__(self, capacity: int = RECENT_CAPACITY) -> None:
        self.capacity = capacity
        self._items: dict[int, StoredMessage] = {}
        self._lock = threading.Lock()  # intake and worker share a thread only on SQLite

    def add(self, message: StoredMessage) -> None:
        with self._lock:
            self._items[message.id] = message
            if len(self._items) > self.capacity:
                del self._items[next(iter(self._items))]

    def take(self, message_id: int) -> StoredMessage | None:
        with self._lock:
            return self._items.pop(message_id, None)


#: Built once: the worker reads every batch of messages through it (see outbox.py on why).
_MESSAGES_BY_ID = select(messages).where(messages.c.id.in_(bindparam("ids", expanding=True)))


def server_connect_args(url: str) -> dict[str, Any]:
    """PG_CONNECTION_BOUNDS, less what the URL sets itself, for every engine carehub opens on
    a database server (the store's, `routes check`'s); a URL SQLAlchemy has no dialect for is
    a StoreError that says how to write one for PostgreSQL."""
    parsed = make_url(url)
    try:
        parsed.get_dialect()
    except NoSuchModuleError as err:
        if parsed.get_backend_name() == "postgres":
            raise StoreError(
                f"{err}: a PostgreSQL store URL begins postgresql+psycopg:// "
                "(postgresql+psycopg://USER@HOST/DATABASE)"
            ) from err
        raise
    if parsed.get_driver_name() not in ("psycopg", "psycopg2"):
        return {}  # libpq's parameters mean nothing to other drivers
    return {key: value for key, value in PG_CONNECTION_BOUNDS.items() if key not in parsed.query}


def _database_place(conn: Any) -> str:
    """Where this PostgreSQL database lives: the cluster's system identifier (new for every
    cluster initdb makes) and the database's OID (new for every CREATE DATABASE). A dump
    restored with pg_restore into a database made anew, or onto another cluster, is in
    another place. The system identifier is readable without superuser on a stock server;
    where a managed service hides it, the OID alone tells."""
    oid = conn.exec_driver_sql(
        "SELECT oid FROM pg_database WHERE datname = current_database()"
    ).scalar()
    system: object = "hidden"
    try:
        with conn.begin_nested():
            system = conn.exec_driver_sql(
                "SELECT system_identifier FROM pg_control_system()"
            ).scalar()
    except DBAPIError:
        pass
    return f"{system}/{oid}"


def _hang_up(connection: Any) -> None:
    """Shut a psycopg connection's socket down, from any thread: whoever waits on it gets an
    error at once, where an answer might otherwise never come. Only the socket is shut, not
    closed: its owner still closes the connection, and the descriptor stays its own."""
    if connection.closed:
        return
    with socket.socket(fileno=os.dup(connection.pgconn.socket)) as duplicate:
        duplicate.shutdown(socket.SHUT_RDWR)


class _Probe:
    """A check of the store that answers within ``patience`` seconds, for /health: a load
    balancer waiting on a server that went silent would otherwise wait forever, and not take
    the hub out. The check runs on a thread of its own, one at a time: a check still waiting
    from an earlier call past its patience counts as failed at once."""

    def __init__(self, check: Callable[[], bool], patience: float) -> None:
        self._check = check
        self._patience = patience
        self._lock = threading.Lock()
        self._running: tuple[float, threading.Event, list[bool]] | None = None

    def __call__(self) -> bool:
        with self._lock:
            if self._running is None or self._running[1].is_set():
                self._running = (time.monotonic(), threading.Event(), [])
                threading.Thread(
                    target=self._run, args=self._running[1:], name="store-probe", daemon=True
                ).start()
            started, finished, result = self._running
        finished.wait(max(0.0, started + self._patience - time.monotonic()))
        return bool(result) and result[0]

    def _run(self, finished: threading.Event, result: list[bool]) -> None:
        try:
            result.append(self._check())
        except Exception:
            result.append(False)
        finally:
            finished.set()


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


@functools.cache
def schema_head() -> str:
    """The newest schema revision this release's code knows (its migrations' head)."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, "the migrations have no head"
    return head


def _known_revision(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except AlembicError:
        return False


def _newer_schema(revision: str, head: str | None) -> str:
    return (
        f"the store was upgraded by a newer carehub (schema revision {revision}; carehub "
        f"{__version__} knows revisions up to {head}): run the newer release"
    )


#: Trigger events whose MRG segments name identifiers merged into the PID's (as events.py).
_MERGE_TRIGGERS = frozenset({"A30", "A34", "A36", "A39", "A40"})


def scoped_authority(authority: str | None, sending_facility: str | None) -> str | None:
    """The authority a patient identifier is keyed by: its own (CX.4 as header.read_cx
    reads it), else the sending facility's code (MSH-4), as
    carehub.events.scoped_identifier scopes Patient.key, so two
    hospitals' 55501 sent without one are two patients (and two order keys). Rows stored
    before hold an empty authority: read through this, they key as their sender's."""
    return authority or facility_code(sending_facility) or None


def _patient_of(message: StoredMessage) -> tuple[str, str | None]:
    """(PID-3.1, its authority as scoped_authority gives it): the patient whose earlier
    messages go first (MessageStore.unrouted_before)."""
    return (
        message.patient_id or "",
        scoped_authority(message.patient_authority, message.sending_facility),
    )


def _merged_identifiers(message: StoredMessage) -> list[tuple[str, str | None]]:
    """(identifier, authority) of each MRG-1 of a merge message, read as PID-3 is
    (header.read_cx): the identifiers it retires, one without an authority scoped by the
    sender as PID-3 is (scoped_authority)."""
    if (message.trigger_event or "").upper() not in _MERGE_TRIGGERS:
        return []
    try:
        view = MessageView(message.text)
    except NotHL7Error:
        return []
    seps = view.separators
    found = []
    for position, text in enumerate(view.segments):
        if not text.startswith("MRG" + seps.field):
            continue
        fields = view.fields(position)
        for repetition in (fields[1] if len(fields) > 1 else "").split(seps.repetition):
            retired = read_cx(repetition.split(seps.component, 5), seps)
            if retired is not None:
                authority = scoped_authority(retired.authority, message.sending_facility)
                found.append((retired.value, authority))
    return found


class MessageStore:
    """Durable storage for received messages and the audit trail of their lifecycle."""

    def __init__(
        self,
        url: str,
        *,
        durability: Durability = "process",
        background_checkpoint: bool = False,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self.url = url
        self.durability = durability
        self.is_sqlite = url.startswith("sqlite")
        self.sql = DriverSQL(self.is_sqlite)
        #: SQLite only: one writer at a time inside the process, intake first.
        self.write_gate = WriteGate()
        #: PostgreSQL: every connection the engine opened and has not let go (see hang_up).
        self._server_connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._server_connections_lock = threading.Lock()
        self.engine = self._create_engine(url, background_checkpoint, lock_timeout)
        self._ping_probe = _Probe(self._ping_now, PROBE_PATIENCE)
        self._write_probe = _Probe(self._can_write_now, PROBE_PATIENCE)
        self._checkpointer: _WalCheckpointer | None = None
        if self.is_sqlite and background_checkpoint:
            self._checkpointer = _WalCheckpointer(self.engine)
        self._intake_connection: Any = None
        #: False: intake's SQLite writes fail fast with StoreBusy instead of waiting.
        self.intake_waits_for_lock = True
        #: With intake_waits_for_lock False: called (from any thread) when the write gate that
        #: refused an intake group is let go.
        self.intake_gate_free: Callable[[], None] | None = None
        #: Set when a worker runs in this process: intake leaves it what it stores.
        self.recent: RecentMessages | None = None
        self._prepare_insert_sql()

    # -- lifecycle ------------------------------------------------------------------------
    def _create_engine(self, url: str, background_checkpoint: bool, lock_timeout: float) -> Engine:
        if not self.is_sqlite:
            engine = create_engine(
                url,
                pool_pre_ping=True,
                pool_size=5,
                max_overflow=10,
                hide_parameters=True,
                connect_args=server_connect_args(url),
            )
            event.listen(engine, "connect", self._on_server_connect)
            return engine
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            keep_store_private(Path(path))
        # hide_parameters: a database error must never print message bodies or identifiers
        # into the logs (SQLAlchemy otherwise quotes the statement's parameters).
        engine = create_engine(
            url,
            connect_args={"timeout": lock_timeout, "check_same_thread": False},
            hide_parameters=True,
        )
        self.write_gate.install(engine)
        synchronous = "FULL" if self.durability == "power" else "NORMAL"

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA foreign_keys=ON")
            if background_checkpoint:
                # Checkpoints run on their own thread so a commit never waits for one.
                cursor.execute("PRAGMA wal_autocheckpoint=0")
                cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            cursor.close()

        return engine

    def migration_pending(self) -> bool:
        """Whether ``migrate`` would change the schema: it is older than this release's (a
        newer one, from a later release, is not migrated: ``schema_behind`` says why)."""
        script = ScriptDirectory.from_config(_alembic_config())
        revision = self.schema_revision()
        if revision == script.get_current_head():
            return False
        return revision is None or _known_revision(script, revision)

    def schema_behind(self) -> str | None:
        """Why this store's schema does not fit this release (None when it does): older, and
        waiting for ``migrate`` (run by `carehub store upgrade`, `serve` and `worker`), or
        newer, migrated by a later release that this one cannot follow."""
        script = ScriptDirectory.from_config(_alembic_config())
        head = script.get_current_head()
        revision = self.schema_revision()
        if revision == head:
            return None
        if revision is not None and not _known_revision(script, revision):
            return _newer_schema(revision, head)
        return (
            f"the store's schema is at revision {revision or 'none'} and this carehub "
            f"{__version__} needs {head}: run `carehub store upgrade` (or start `carehub serve` "
            "or `carehub worker`, which upgrade it) once no process of an earlier carehub "
            "release runs on the store (it could not work with the newer schema)"
        )

    def migrate(self) -> None:
        """Bring the schema to the newest revision (a no-op when it already is).

        On PostgreSQL, `serve` and every `carehub worker` migrate as they start, often at the
        same moment: the first to arrive takes a transaction-scoped advisory lock for the
        schema and migrates, the others wait for its commit and then find nothing to do
        (without it, one of two processes starting on a new schema failed on "duplicate key
        value violates unique constraint pg_type_typname_nsp_index")."""
        cfg = _alembic_config()
        script = ScriptDirectory.from_config(cfg)
        with self.engine.begin() as conn:
            if not self.is_sqlite:
                conn.exec_driver_sql(
                    "SELECT pg_advisory_xact_lock(hashtext('carehub migrate ' || current_schema()))"
                )
            revision = self.schema_revision(conn)
            if revision is not None and not _known_revision(script, revision):
                raise StoreError(_newer_schema(revision, script.get_current_head()))
            cfg.attributes["connection"] = conn
            alembic_command.upgrade(cfg, "head")

    @functools.cached_property
    def instance_id(self) -> str:
        """The identity this store puts into what it sends under its message ids
        (idempotency keys, FHIR message ids), since message ids start at 1 in every store.

        Its own random id (store_identity, made with the schema) and, on PostgreSQL, where
        the database lives (``_database_place``). A store restored from a backup numbers its
        messages on from where the backup ended, so it must not send under the keys of the
        store it came from: restored into a database made anew or onto another cluster, its
        identity is new by itself; restored where neither changes (a SQLite file copied
        back, a file-level restore of the same cluster), `carehub store renew-identity`
        gives it a new random id (``renew_identity``). SQLite's is the random id alone."""
        with self.engine.connect() as conn:
            found = conn.execute(select(store_identity.c.id)).scalar()
            if found is None:
                raise RuntimeError("the store has no identity: run its migrations (carehub serve)")
            if self.is_sqlite:
                return str(found)
            place = _database_place(conn)
        return str(uuid.uuid5(uuid.UUID(str(found)), place))

    def renew_identity(self) -> str:
        """Give the store a new random id (see ``instance_id``); returns it. What was sent
        before keeps its keys (each delivery holds its own); what is sent from now on goes
        under new ones. Processes running on the store keep the identity they read until
        they restart."""
        renewed = str(uuid.uuid4())
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(store_identity).values(id=renewed, created_at=datetime.now(UTC))
            ).rowcount
        if not changed:
            raise StoreError("the store has no identity: run its migrations (carehub serve)")
        self.__dict__.pop("instance_id", None)  # read again on its next use
        return renewed

    def downgrade(self, revision: str) -> None:
        """Take the schema back to ``revision`` (Alembic's downgrade), for the release that
        knew it; a revision this release does not know is a StoreError."""
        cfg = _alembic_config()
        script = ScriptDirectory.from_config(cfg)
        if not _known_revision(script, revision):
            head = script.get_current_head()
            raise StoreError(f"no schema revision {revision!r} (this release knows 0001 to {head})")
        current = self.schema_revision()
        if current is not None and revision >= current:
            raise StoreError(f"the store is at revision {current}, not later than {revision}")
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            alembic_command.downgrade(cfg, revision)

    def schema_revision(self, conn: Any = None) -> str | None:
        """The schema's Alembic revision, None for a database without carehub's tables."""
        if conn is None:
            with self.engine.connect() as own:
                return self.schema_revision(own)
        if "alembic_version" not in sa_inspect(conn).get_table_names():
            return None
        found = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        return str(found) if found is not None else None

    def _on_server_connect(self, dbapi_connection: Any, _record: Any) -> None:
        """Keep the new connection for ``hang_up``, and ask the server for its bounds
        (PG_SERVER_BOUNDS; a server or pooler that refuses them still gets the connection)."""
        with self._server_connections_lock:
            self._server_connections.add(dbapi_connection)
        settings = ", ".join(
            f"set_config('{name}', '{value}', false)" for name, value in PG_SERVER_BOUNDS.items()
        )
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"SELECT {settings}")
            dbapi_connection.commit()
        except Exception as err:
            log.debug("the server did not take its connection bounds: %s", err)
            dbapi_connection.rollback()
        finally:
            cursor.close()

    def hang_up(self) -> None:
        """PostgreSQL: shut the socket of every connection this store has open, in use or
        idle in the pool. Called when the server has left a commit unanswered for longer than
        it may take (group_commit.COMMIT_PATIENCE): every thread waiting on it (intake's
        writer, the heartbeat, a health check) then fails at once instead of when, if ever,
        an answer comes, and the next use connects anew, within PG_CONNECTION_BOUNDS. TCP
        keepalives cannot tell a silent peer that still acknowledges packets (a proxy or a
        load balancer whose server is gone, a hung server process) from a slow query."""
        with self._server_connections_lock:
            connections = list(self._server_connections)
        for connection in connections:
            with contextlib.suppress(Exception):  # closed meanwhile: nothing to hang up
                _hang_up(connection)

    def close(self) -> None:
        if self._intake_connection is not None:
            with contextlib.suppress(Exception):
                self._intake_connection.close()
            self._intake_connection = None
        if self._checkpointer:
            self._checkpointer.stop()
        self.engine.dispose()

    def ping(self) -> bool:
        """Whether the store answers a read within PROBE_PATIENCE."""
        return self._ping_probe()

    def _ping_now(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except Exception:
            return False

    def can_write(self) -> bool:
        """Whether a write commits now, answered within PROBE_PATIENCE: a held write lock
        still answers a read, so this takes the write lock, updates the store identity row
        (unchanged) and commits. On SQLite it waits CAN_WRITE_WAIT for the lock at most, on a
        connection of its own: /health must answer a balancer at once, and the pool's
        connections wait LOCK_TIMEOUT.

        On SQLite that proves the lock and nothing more: SQLite writes no page for a row
        set to what it holds, so a full disk commits it. Whether a message fits is
        ``short_of_room``'s to say."""
        return self._write_probe()

    def _can_write_now(self) -> bool:
        touch = "UPDATE store_identity SET created_at = created_at"
        try:
            if not self.is_sqlite:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(touch)
                return True
            path = self.url.removeprefix("sqlite:///")
            with contextlib.closing(sqlite3.connect(path, timeout=CAN_WRITE_WAIT)) as raw:
                raw.execute("BEGIN IMMEDIATE")
                raw.execute(touch)
                raw.commit()
            return True
        except Exception:
            return False

    def free_space(self) -> int | None:
        """Bytes this process may still write on the filesystem of a SQLite store's file;
        None for PostgreSQL (its disk is the server's, and its own write probe fails when
        that is full), for an in-memory store, or when the filesystem cannot be asked."""
        folder = self._file_folder()
        if folder is None:
            return None
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            return None

    def short_of_room(self, need: int) -> str | None:
        """Why a message may not fit now, or None when it may: a SQLite store whose
        filesystem has less than ``need`` bytes free. A full disk still takes a write that
        fits in the pages the WAL file already has (``can_write``'s among them), while a
        message that needs the file to grow is refused: only the free space tells them
        apart. None too where free space says nothing (``free_space``)."""
        free = self.free_space()
        if free is None or free >= need:
            return None
        return (
            f"{_amount(free)} free on the filesystem of {self._file_folder()}, "
            f"{_amount(need)} needed"
        )

    def _file_folder(self) -> Path | None:
        if not self.is_sqlite:
            return None
        path = self.url.removeprefix("sqlite:///")
        if not path or path == ":memory:":
            return None
        return Path(path).parent

    def stored_already(self, batch: list[NewMessage]) -> list[int | None]:
        """For each message of ``batch``, the id of the stored message it repeats (a
        resend, as ``insert_messages`` would find it), or None; with reads alone. While the
        disk is full a resend's "resent" history row cannot be written, yet the message it
        repeats is stored: its sender is answered AA all the same (GroupCommit), rather
        than told to resend, again and again, what the hub holds."""
        identities = [item.identity() for item in batch]
        if not any(identities):
            return [None] * len(batch)
        connection = self.engine.raw_connection()
        try:
            cursor = connection.cursor()
            uses = self._probe_uses(cursor, identities)
            found: list[int | None] = []
            for i, (item, identity) in enumerate(zip(batch, identities, strict=True)):
                # A message that differs from a stored one in trailing delimiters only takes
                # that one's digest here, as it would on its way in.
                self._check_use(cursor, uses, item, identity, batch[:i])
                row = None
                if identity is not None:
                    row = cursor.execute(self._sql_find, (item.identity(),)).fetchone()
                found.append(int(row[0]) if row is not None else None)
            return found
        finally:
            with contextlib.suppress(Exception):
                connection.rollback()
            connection.close()

    # -- writes ---------------------------------------------------------------------------
    def _prepare_insert_sql(self) -> None:
        """Plain SQL for the intake hot path, in the driver's own placeholder style.

        Intake writes thousands of rows a second; going through the driver's cursor directly
        costs about a third of SQLAlchemy Core's per-row work (measured: 35k vs 10k rows/s in
        groups of 8 on SQLite). ``ON CONFLICT (identity) DO NOTHING RETURNING id`` reads the
        same on SQLite and PostgreSQL: no row back means a resend of a stored message.
        """
        sql = self.sql
        self._sql_insert = (
            sql.insert("messages", _INSERT_COLUMNS)
            + " ON CONFLICT (identity) DO NOTHING RETURNING id"
        )
        self._sql_find = f"SELECT id FROM messages WHERE identity = {sql.mark}"
        self._sql_insert_many_cache: dict[int, str] = {}
        self._sql_uses_cache: dict[int, str] = {}
        self._sql_event = sql.insert("message_events", EVENT_COLUMNS)

    def insert_messages(self, batch: list[NewMessage]) -> list[InsertOutcome]:
        """Store a group of messages in one transaction; resends map to their original row.

        Intake's writer holds one driver connection for its whole life rather than checking
        one out of the pool per commit: at thousands of commits a second the pool's
        bookkeeping costs more than SQLite's own commit. Only the one writer calls this.
        """
        if self._intake_connection is None:
            self._intake_connection = self.engine.raw_connection()
            if self.is_sqlite and not self.intake_waits_for_lock:
                # Fail at once rather than sleep in SQLite's busy handler (which backs off 1,
                # 2, 5, 10 ms ...) with the event loop blocked: the caller retries soon.
                self._intake_connection.cursor().execute("PRAGMA busy_timeout=0")
        connection = self._intake_connection
        gate = self.write_gate if self.is_sqlite else None
        if gate is not None:
            if self.intake_waits_for_lock:
                entered = gate.enter_intake()
            else:
                entered = gate.try_enter_intake(self.intake_gate_free)
            if not entered:
                raise GateBusy("another writer in this process holds the write lock")
        cursor = connection.cursor()
        try:
            if self.is_sqlite:
                outcomes = self._insert_sqlite(connection, cursor, batch)
            else:
                outcomes = self._insert(cursor, batch)
            connection.commit()
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) and "busy" not in str(err):
                self._drop_intake_connection(connection)
                raise
            with contextlib.suppress(Exception):
                connection.rollback()
            raise StoreBusy(str(err)) from err
        except Exception:
            self._drop_intake_connection(connection)
            raise
        finally:
            with contextlib.suppress(Exception):  # closed already if the connection was dropped
                cursor.close()
            if gate is not None:
                gate.leave_intake()
        if self._checkpointer:
            self._checkpointer.poke()
        if self.recent is not None:
            for item, outcome in zip(batch, outcomes, strict=True):
                if not outcome.duplicate and item.status is MessageStatus.RECEIVED:
                    self.recent.add(item.stored(outcome.message_id))
        return outcomes

    def _drop_intake_connection(self, connection: Any) -> None:
        """A broken connection is replaced on the next write."""
        self._intake_connection = None
        with contextlib.suppress(Exception):
            connection.rollback()
        connection.invalidate()

    def _insert_sqlite(
        self, connection: Any, cursor: Any, batch: list[NewMessage]
    ) -> list[InsertOutcome]:
        """The whole group in five statements, whatever its size.

        Every statement is a trip from Python into SQLite that hands the GIL back and must win
        it again, and each costs Python-side work of its own; a statement (and a fetch) per
        message made those trips grow with the group. So the group takes the write lock first
        (BEGIN IMMEDIATE), numbers its rows after the highest id, finds the earlier uses of its
        control IDs (``_probe_uses``) and goes in as one multi-row INSERT. The connection's
        change count says whether every row went in; only when a resend was among them are
        the rows looked up one by one."""
        cursor.execute("BEGIN IMMEDIATE")
        base = cursor.execute(_SQL_LAST_MESSAGE_ID).fetchone()[0]
        identities = [item.identity() for item in batch]
        uses = self._probe_uses(cursor, identities)
        for i, (item, identity) in enumerate(zip(batch, identities, strict=True)):
            resend, item.reuses = self._check_use(cursor, uses, item, identity, batch[:i])
            if not resend:
                uses.add(item.identity(), base + 1 + i)  # the id the INSERT below gives it
        before = connection.total_changes
        for start in range(0, len(batch), _ROWS_PER_STATEMENT):
            chunk = batch[start : start + _ROWS_PER_STATEMENT]
            params: list[Any] = []
            for offset, item in enumerate(chunk, start=base + 1 + start):
                params.append(offset)
                params.extend(item.values(self.sql.time))
            cursor.execute(self._sql_insert_many(len(chunk)), params)
        if connection.total_changes - before == len(batch):
            return [InsertOutcome(base + 1 + i, False, item.reuses) for i, item in enumerate(batch)]
        stored = {
            row[0]
            for row in cursor.execute("SELECT id FROM messages WHERE id > ?", (base,)).fetchall()
        }
        outcomes: list[InsertOutcome] = []
        resends: list[tuple[Any, ...]] = []
        for i, item in enumerate(batch):
            if base + 1 + i in stored:
                outcomes.append(InsertOutcome(base + 1 + i, False, item.reuses))
                continue
            original = cursor.execute(self._sql_find, (item.identity(),)).fetchone()[0]
            outcomes.append(InsertOutcome(original, True))
            resends.append(self._resent_event(original, item))
        cursor.executemany(self._sql_event, resends)
        return outcomes

    def _sql_insert_many(self, rows: int) -> str:
        statement = self._sql_insert_many_cache.get(rows)
        if statement is None:
            row = "(" + ", ".join("?" for _ in range(len(_INSERT_COLUMNS) + 1)) + ")"
            statement = (
                f"INSERT INTO messages (id, {', '.join(_INSERT_COLUMNS)}) VALUES "
                + ", ".join(row for _ in range(rows))
                + " ON CONFLICT (identity) DO NOTHING"
            )
            self._sql_insert_many_cache[rows] = statement
        return statement

    def _probe_uses(self, cursor: Any, identities: list[str | None]) -> _EarlierUses:
        """What the store holds of each identity's sender and control ID: the row with that
        very identity (the message is a resend), and one row with another (it reuses the
        control ID).

        One statement per group, two seeks on the unique identity index per message: every
        identity of one sender and control ID begins with its key (NewMessage.sender_key), so
        they sort together, and the first of them that is not this message's own is found in
        a range of the index without reading the rest (a sender that sends one control ID
        all day costs no more than one that never repeats). Measured: 11 us a group of 8 on
        SQLite and 44 us on PostgreSQL, with 25,000 messages stored."""
        wanted = list(dict.fromkeys(i for i in identities if i is not None))
        probed: dict[str, tuple[int | None, int | None]] = {}
        for start in range(0, len(wanted), _ROWS_PER_STATEMENT):
            chunk = wanted[start : start + _ROWS_PER_STATEMENT]
            params: list[str] = []
            for identity in chunk:
                key = identity[:-DIGEST_CHARS]
                params += (key, key[:-1] + _AFTER_SEPARATOR, identity)
            cursor.execute(self._sql_uses(len(chunk)), params)
            for identity, same, other in cursor.fetchall():
                probed[identity] = (same, other)
        return _EarlierUses(probed)

    def _check_use(
        self,
        cursor: Any,
        uses: _EarlierUses,
        item: NewMessage,
        identity: str | None,
        earlier_in_group: list[NewMessage],
    ) -> tuple[bool, int | None]:
        """``uses.check``, and when the control ID was used before with other content: whether
        that content differs from this only in trailing delimiters (padding_free_digest), as
        when an engine on the way wrote the message out again. Then this is a resend of it:
        it takes that message's digest, and so its identity, and goes the way of every resend.
        Only here, where a control ID is met again, is the message hashed that way: dropping
        the delimiters costs more than the rest of the digest."""
        resend, reuses = uses.check(identity)
        if resend or reuses is None or identity is None:
            return resend, reuses
        twin = self._padding_twin(cursor, item, identity, earlier_in_group)
        if twin is None:
            return resend, reuses
        item.digest = twin
        return uses.check(item.identity())

    def _padding_twin(
        self, cursor: Any, item: NewMessage, identity: str, earlier_in_group: list[NewMessage]
    ) -> str | None:
        """The digest of an earlier message with this sender and control ID (stored, or of
        this group) that says the same as ``item`` but for trailing delimiters, or None."""
        wanted = _padding_free_digest(item.raw, item.charset)
        if wanted is None:
            return None
        key = identity[:-DIGEST_CHARS]
        for other in earlier_in_group:
            if (other.identity() or "").startswith(key) and (
                _padding_free_digest(other.raw, other.charset) == wanted
            ):
                return other.digest
        mark = self.sql.mark
        cursor.execute(
            f"SELECT identity, raw, charset FROM messages WHERE identity >= {mark} "
            f"AND identity < {mark} ORDER BY id",
            (key, key[:-1] + _AFTER_SEPARATOR),
        )
        for stored_identity, raw, charset in cursor.fetchall():
            if _padding_free_digest(bytes(raw), charset) == wanted:
                return str(stored_identity)[-DIGEST_CHARS:]
        return None

    def _sql_uses(self, count: int) -> str:
        statement = self._sql_uses_cache.get(count)
        if statement is None:
            mark = self.sql.mark
            rows = ", ".join(f"({mark}, {mark}, {mark})" for _ in range(count))
            statement = (
                f"WITH p (lo, hi, mine) AS (VALUES {rows}) SELECT p.mine, "
                "(SELECT m.id FROM messages AS m WHERE m.identity = p.mine), "
                "(SELECT m.id FROM messages AS m WHERE m.identity >= p.lo "
                "AND m.identity < p.hi AND m.identity <> p.mine ORDER BY m.identity LIMIT 1) "
                "FROM p"
            )
            self._sql_uses_cache[count] = statement
        return statement

    def _resent_event(self, original: int, item: NewMessage) -> tuple[Any, ...]:
        detail = (
            f"resent by the sender via {item.transport}:{item.listener}; answered AA, "
            "not stored again"
        )
        return (original, self.sql.time(item.received_at), RESENT, detail)

    def _insert(self, cursor: Any, batch: list[NewMessage]) -> list[InsertOutcome]:
        """One row per new message (its intake event is read from that row); a resend adds a
        "resent" history row to the message it repeats. The earlier uses of the group's
        control IDs are probed once, before its inserts; should another hub's writer store a
        use in between, this message's note misses it, but the unique identity still tells a
        resend from a new message."""
        outcomes: list[InsertOutcome] = []
        resends: list[tuple[Any, ...]] = []
        identities = [item.identity() for item in batch]
        uses = self._probe_uses(cursor, identities)
        for i, (item, identity) in enumerate(zip(batch, identities, strict=True)):
            _, item.reuses = self._check_use(cursor, uses, item, identity, batch[:i])
            cursor.execute(self._sql_insert, item.values(self.sql.time))
            row = cursor.fetchone()
            if row is not None:
                uses.add(item.identity(), row[0])
                outcomes.append(InsertOutcome(row[0], False, item.reuses))
                continue
            cursor.execute(self._sql_find, (item.identity(),))
            original = cursor.fetchone()[0]
            outcomes.append(InsertOutcome(original, True))
            resends.append(self._resent_event(original, item))
        if resends:
            cursor.executemany(self._sql_event, resends)
        return outcomes

    def set_status(self, message_id: int, status: MessageStatus, detail: str | None = None) -> None:
        """Move a message to a new status and record the change."""
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(
                update(messages)
                .where(messages.c.id == message_id)
                .values(status=status.value, status_at=now, detail=detail)
            )
            conn.execute(
                insert(message_events),
                {"message_id": message_id, "at": now, "event": status.value, "detail": detail},
            )

    def clear_step_problem(self, message_id: int, problem: str, note: str) -> str | None:
        """A problem a route step raised (StepProblem, recorded as the step's error) was dealt
        with since: the message, failed for it alone in its latest routing run, takes the
        status a message routed without it has. It is routed again, with ``note`` in its
        history saying why, and then delivered or failed as its deliveries stand (routed
        while some still wait; filtered when it has none). Returns the status it ends in;
        None, changing nothing, when it is not failed for ``problem`` alone (not routed yet,
        routed again since, or failed for something else too). The step rows that raised it
        are marked ``cleared`` (their error kept as their output): settling the message again
        later (a dead letter of it retried) must not fail it for a problem dealt with, and
        `messages show` tells the step that raised it from one that still fails."""
        from carehub.store.outbox import Outbox  # outbox builds on this module

        outbox = Outbox(self)
        now = datetime.now(UTC)
        failed, routed = MessageStatus.FAILED.value, MessageStatus.ROUTED.value
        with self.engine.connect() as conn, conn.begin() as transaction:
            # Written first: the write holds the row (SQLite: the store) until the commit, so
            # what is read next is current, and a worker settling the message waits for it.
            if not conn.execute(
                update(messages)
                .where(messages.c.id == message_id, messages.c.status == failed)
                .values(status=routed, status_at=now, detail=note)
            ).rowcount:
                return None
            steps = conn.execute(
                select(
                    message_steps.c.id,
                    message_steps.c.run,
                    message_steps.c.outcome,
                    message_steps.c.output,
                )
                .where(message_steps.c.message_id == message_id)
                .order_by(message_steps.c.id)
            ).all()
            latest = max((row.run for row in steps), default=None)
            raised = [row for row in steps if row.run == latest and row.outcome == "error"]
            errors = [self._step_error(row.output) for row in raised]
            if not errors or not all(text.endswith(f": {problem}") for text in errors):
                transaction.rollback()
                return None
            conn.execute(
                update(message_steps)
                .where(message_steps.c.id.in_([row.id for row in raised]))
                .values(outcome="cleared")  # message_steps.outcome fits 16 characters
            )
            entered = routed
            if (
                conn.execute(
                    select(deliveries.c.id).where(deliveries.c.message_id == message_id).limit(1)
                ).first()
                is None
            ):
                # Nothing to deliver: final, as a message its routes filter (MessageStatus).
                entered = MessageStatus.FILTERED.value
                conn.execute(
                    update(messages).where(messages.c.id == message_id).values(status=entered)
                )
            conn.execute(
                insert(message_events),
                {"message_id": message_id, "at": now, "event": entered, "detail": note},
            )
            outbox.settle_messages(conn, {message_id}, self.sql.time(now))
            return conn.execute(
                select(messages.c.status).where(messages.c.id == message_id)
            ).scalar()

    @staticmethod
    def _step_error(output: str | None) -> str:
        """A failed step's recorded error (its output, JSON text) as text."""
        with contextlib.suppress(ValueError, TypeError):
            value = json.loads(output or '""')
            return value if isinstance(value, str) else str(value)
        return output or ""

    # -- reads ----------------------------------------------------------------------------
    def get(self, message_id: int) -> StoredMessage | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(messages).where(messages.c.id == message_id)).first()
        return self._to_stored(row._mapping) if row else None

    def get_many(self, message_ids: list[int]) -> list[StoredMessage]:
        """Messages by id, in the order asked for (missing ids are left out)."""
        if not message_ids:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(_MESSAGES_BY_ID, {"ids": message_ids})
            found = {r.id: self._to_stored(r._mapping) for r in rows}
        return [found[i] for i in message_ids if i in found]

    def take_for_routing(self, message_ids: list[int]) -> list[StoredMessage]:
        """Messages by id for the worker: those intake just stored in this process from
        ``recent``, the rest from the store (see RecentMessages)."""
        if self.recent is None:
            return self.get_many(message_ids)
        found: dict[int, StoredMessage] = {}
        missing = []
        for message_id in message_ids:
            message = self.recent.take(message_id)
            if message is None:
                missing.append(message_id)
            else:
                found[message_id] = message
        if missing:
            found.update((m.id, m) for m in self.get_many(missing))
        return [found[i] for i in message_ids if i in found]

    def unrouted_before(self, batch: list[StoredMessage]) -> list[int]:
        """Messages still waiting to be routed that came before this batch's messages of the
        same patient, oldest first: stranded by a crash between commit and queueing, or by a
        worker that could not route them, and found otherwise only by the once-a-minute
        sweep, after their patient's later messages had gone out."""
        first: dict[tuple[str, str | None], int] = {}
        for message in batch:
            # A merge is also the retired identifier's message: what came under that
            # identifier before it (the duplicate registration's admission) goes first.
            for key in (_patient_of(message), *_merged_identifiers(message)):
                if key[0]:
                    first[key] = min(first.get(key, message.id), message.id)
        if not first:
            return []
        taken = {message.id for message in batch}
        patients = sorted({pid for pid, _ in first})
        # The worker asks this for every routing batch: written as the driver's SQL, since
        # building and compiling a statement each time cost SQLAlchemy four times what SQLite
        # took to answer it (the status index finds the few rows waiting).
        marks = ", ".join(self.sql.mark for _ in patients)
        query = (
            "SELECT id, patient_id, patient_authority, sending_facility FROM messages "
            f"WHERE status = '{MessageStatus.RECEIVED.value}' AND id < {self.sql.mark} "
            f"AND patient_id IN ({marks}) ORDER BY id"
        )
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(query, (max(first.values()), *patients)).all()
        # A row stored before identifiers were scoped by their sender has no authority: it
        # is its sender's patient (scoped_authority), as the batch's messages are.
        return [
            row_id
            for row_id, patient_id, authority, facility in rows
            if row_id not in taken
            and row_id < first.get((patient_id, scoped_authority(authority, facility)), -1)
        ]

    def history(self, message_id: int) -> list[StatusChange]:
        """Every status the message has been in, oldest first: its intake event (from the
        message row), then each change since (message_events)."""
        with self.engine.connect() as conn:
            intake = conn.execute(
                select(messages.c.received_at, messages.c.ack_code, messages.c.intake_detail).where(
                    messages.c.id == message_id
                )
            ).first()
            if intake is None:
                return []
            rows = conn.execute(
                select(message_events.c.at, message_events.c.event, message_events.c.detail)
                .where(message_events.c.message_id == message_id)
                .order_by(message_events.c.id)
            )
            first = StatusChange(
                _aware(intake.received_at),
                INTAKE_EVENT_BY_ACK.get(intake.ack_code, MessageStatus.REJECTED.value),
                intake.intake_detail,
            )
            return [first, *(StatusChange(_aware(r.at), r.event, r.detail) for r in rows)]

    def find(
        self,
        *,
        status: str | None = None,
        message_type: str | None = None,
        event: str | None = None,
        patient: str | None = None,
        since: datetime | None = None,
        limit: int | None = 100,
    ) -> list[StoredMessage]:
        """Messages matching every given filter, newest first (``search``, as a list)."""
        filters = MessageFilter(
            status=status, message_type=message_type, event=event, patient=patient, since=since
        )
        return list(self.search(filters, limit=limit))

    def search(
        self,
        filters: MessageFilter,
        *,
        limit: int | None = None,
        page_size: int = SEARCH_PAGE,
        on_page: Callable[[int], None] | None = None,
    ) -> Iterator[StoredMessage]:
        """Messages matching ``filters``, newest first, at most ``limit`` (None: all).

        The store is read in pages of ``page_size`` rows by id, each page below the last id
        seen and in a read of its own: a search through a million rows never holds them in
        memory, nor holds a read open for minutes (which would keep SQLite from checkpointing
        its WAL). Column filters go into the SQL; content filters (``filters.reads_content``)
        are checked on each page's rows, and reading stops as soon as ``limit`` rows matched.
        ``on_page`` is told after every page how many rows have been read so far."""
        if limit is not None and limit < 1:
            return
        where = self._search_conditions(filters)
        with self.engine.connect() as conn:
            bounds = self._id_bounds(conn, filters)
            if bounds is not None and filters.control_id:
                with_control_id = self._ids_with_control_id(conn, filters.control_id)
                if not with_control_id:
                    bounds = None
                elif len(with_control_id) <= _IDS_BY_CONTROL_ID:
                    where.append(messages.c.id.in_(with_control_id))
        if bounds is None:
            if on_page is not None:
                on_page(0)
            return
        low, high = bounds
        if low is not None:
            where.append(messages.c.id >= low)
        below = None if high is None else high + 1
        found = scanned = 0
        # Content filters read only what they test, and the whole row of a match: building
        # every scanned row would double the time a search through a large store takes.
        wanted_columns = (
            (messages.c.id, messages.c.raw, messages.c.charset)
            if filters.reads_content
            else (messages,)
        )
        while True:
            want = page_size
            if limit is not None and not filters.reads_content:
                want = min(page_size, limit - found)
            query = select(*wanted_columns).where(*where).order_by(messages.c.id.desc())
            if below is not None:
                query = query.where(messages.c.id < below)
            with self.engine.connect() as conn:
                rows = conn.execute(query.limit(want)).all()
            scanned += len(rows)
            if on_page is not None:
                on_page(scanned)
            if filters.reads_content:
                ids = [
                    r.id
                    for r in rows
                    if filters.matches_text(decoded_text(bytes(r.raw), r.charset))
                ]
                if limit is not None:
                    ids = ids[: limit - found]
                page = self.get_many(ids)
            else:
                page = [self._to_stored(r._mapping) for r in rows]
            for message in page:
                yield message
                found += 1
            if len(rows) < want or (limit is not None and found >= limit):
                return
            below = rows[-1].id

    def _search_conditions(self, filters: MessageFilter) -> list[ColumnElement[bool]]:
        """The SQL half of a search: every filter that reads a column."""
        c = messages.c
        where: list[ColumnElement[bool]] = []
        if filters.status:
            where.append(c.status == filters.status)
        if filters.message_type:
            type_column: ColumnElement[Any] = c.message_type
            if self.is_sqlite and not filters.event:
                # Alone, the type could only use the (type, event) index, which hands SQLite
                # the rows out of id order: it would sort every ADT in the store for each
                # page. As an expression it is checked on the rows read by id instead.
                type_column = c.message_type.concat("")
            where.append(type_column == filters.message_type.upper())
        if filters.event:
            where.append(c.trigger_event == filters.event.upper())
        if filters.patient:
            where.append(c.patient_id == filters.patient)
        if filters.patient_authority:
            where.append(c.patient_authority == filters.patient_authority)
        if filters.listener:
            named = [
                c.listener == name
                if transport is None
                else and_(c.transport == transport, c.listener == name)
                for transport, name in filters.listener_forms()
            ]
            where.append(or_(*named))
        senders = (
            (c.sending_application, filters.sending_application),
            (c.sending_facility, filters.sending_facility),
        )
        for column, wanted in senders:
            if wanted:
                # The column holds the whole field (LAB^2.16.840.1^ISO): match it, or its
                # first component, as the field was written when it was stored.
                value = _fit(wanted, _NAME) or ""
                where.append(
                    or_(column == value, func.substr(column, 1, len(value) + 1) == value + "^")
                )
        if filters.control_id:
            where.append(c.control_id == _fit(filters.control_id, _CONTROL_ID))
        if filters.since is not None:
            where.append(c.received_at >= _utc(filters.since))
        if filters.until is not None:
            where.append(c.received_at < _utc(filters.until))
        return where

    @staticmethod
    def _ids_with_control_id(conn: Any, control_id: str) -> list[int]:
        """The ids of every message with this MSH-10, from the identity index rather than by
        reading the table ("did MSG00123 come in?" is an operator's most common question).

        Each sender's identities sort together, each beginning with its key (application,
        facility, control ID: NewMessage.sender_key), so the index is walked sender by
        sender: one seek finds the next sender, one more the range of its identities with
        this control ID. A store of millions of messages from a few dozen senders answers in
        milliseconds. Rows without an identity (refused or rejected at intake) are few, and
        are read through the status index."""
        c = messages.c
        found: list[int] = []
        next_sender = select(c.identity).where(c.identity >= bindparam("from"))
        next_sender = next_sender.order_by(c.identity).limit(1)
        start = ""
        while (identity := conn.execute(next_sender, {"from": start}).scalar()) is not None:
            application, facility, *_ = identity.split(_SEPARATOR)
            sender = f"{application}{_SEPARATOR}{facility}{_SEPARATOR}"
            key = _fit(f"{sender}{control_id}{_SEPARATOR}") or ""
            found += conn.execute(
                select(c.id).where(c.identity >= key, c.identity < key[:-1] + _AFTER_SEPARATOR)
            ).scalars()
            start = sender[:-1] + _AFTER_SEPARATOR  # past every identity of this sender
        unidentified = (MessageStatus.REFUSED.value, MessageStatus.REJECTED.value)
        found += conn.execute(
            select(c.id).where(
                c.status.in_(unidentified), c.control_id == _fit(control_id, _CONTROL_ID)
            )
        ).scalars()
        return found

    @staticmethod
    def _id_bounds(conn: Any, filters: MessageFilter) -> tuple[int | None, int | None] | None:
        """The lowest and highest id of the messages received in the filter's time window,
        from the received_at index; None when no message was received in it.

        Pages go by id, not time: without these bounds a search of the last two hours would
        go on reading every older row only to find none of them in the window. ``id + 0``
        keeps SQLite from answering min()/max() by walking the primary key (for a recent
        window, nearly the whole table) instead of the index (see _ID_BY_INDEX)."""
        low = high = None
        if filters.since is not None:
            low = first_id_since(conn, filters.since)
            if low is None:
                return None
        if filters.until is not None:
            high = conn.execute(
                select(func.max(_ID_BY_INDEX)).where(messages.c.received_at < _utc(filters.until))
            ).scalar()
            if high is None:
                return None
        return low, high

    def count(self, status: str | None = None) -> int:
        query = select(func.count()).select_from(messages)
        if status:
            query = query.where(messages.c.status == status)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def listeners(self) -> list[tuple[str, str]]:
        """Each (transport, listener) that stored messages came in by. No index holds them, so
        this reads the whole table: for naming them when a search by listener found nothing."""
        c = messages.c
        query = select(c.transport, c.listener).distinct().order_by(c.transport, c.listener)
        with self.engine.connect() as conn:
            return [(row.transport, row.listener) for row in conn.execute(query)]

    def control_id_counts(self) -> dict[str, int]:
        """How many rows hold each MSH-10 (used to prove nothing was stored twice)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(messages.c.control_id, func.count()).group_by(messages.c.control_id)
            )
            return {r[0]: r[1] for r in rows if r[0] is not None}

    @staticmethod
    def _to_stored(mapping: Any) -> StoredMessage:
        values = dict(mapping)
        values.pop("identity", None)
        values["received_at"] = _aware(values["received_at"])
        values["status_at"] = _aware(values["status_at"])
        values["raw"] = bytes(values["raw"])
        return StoredMessage(**values)

    # -- retention ------------------------------------------------------------------------
    def prune_plan(self, older_than: timedelta, *, include_unfinished: bool = False) -> PrunePlan:
        """What ``prune`` would delete and keep now, changing nothing (a dry run)."""
        cutoff = datetime.now(UTC) - older_than
        with self.engine.connect() as conn:
            return _prune_plan(conn, cutoff, include_unfinished)

    def prune(
        self,
        older_than: timedelta,
        *,
        full_vacuum: bool = False,
        include_unfinished: bool = False,
        vacuum: bool = True,
    ) -> PruneResult:
        """Delete messages received before now - older_than, and the care and referral
        records finished before then (see CareRecordsPlan), then give the space back.

        Retention is for finished work: a message that still has work (not routed yet, a
        delivery waiting, a dead letter), an open encounter or referral, a pending follow-up
        is kept unless ``include_unfinished``, because deleting it loses the work without a
        trace.

        The rows go in batches, one short transaction each (see _PruneBatches), so that a
        hub serving from the store meanwhile still stores and acknowledges messages: in one
        transaction, SQLite's write lock was held for minutes and intake answered "not
        stored". On SQLite, ``vacuum`` runs VACUUM at the end, which gives the freed pages
        back to the disk but holds the write lock for its whole run and needs room for a
        second copy of the store (see _vacuum_room); without it the freed pages stay in the
        file and new rows reuse them. On PostgreSQL plain VACUUM always runs (it blocks no
        writer), VACUUM FULL with ``full_vacuum``."""
        cutoff = datetime.now(UTC) - older_than
        before = self._file_size()
        used_before = self._bytes_in_use()
        with self.engine.begin() as conn:
            if self.is_sqlite:  # so that the ids deleted are never handed out again
                conn.exec_driver_sql(_SQL_KEEP_MESSAGE_ID_FLOOR)
        # What was found before deleting; each batch checks its rows again as it deletes.
        with self.engine.connect() as conn:
            plan = _prune_plan(conn, cutoff, include_unfinished)
        batches = _PruneBatches(self.engine)
        where = _prunable(cutoff, include_unfinished)

        def messages_batch(conn: Any, ids: list[int]) -> int:
            going = select(messages.c.id).where(messages.c.id.in_(ids), *where)
            conn.execute(delete(message_events).where(message_events.c.message_id.in_(going)))
            return conn.execute(delete(messages).where(messages.c.id.in_(ids), *where)).rowcount

        deleted = batches.run(messages.c.id, where, messages_batch)
        care_deleted = _CareRetention(cutoff, include_unfinished).delete_in(batches)
        not_vacuumed: str | None = None
        wal_after: int | None = None
        if self.is_sqlite:
            not_vacuumed = self._vacuum_room() if vacuum else "not asked for"
            if not_vacuumed is None:
                with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                    c.exec_driver_sql("VACUUM")
            wal_after = self._truncate_wal()
        else:
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                verb = "VACUUM (FULL, ANALYZE)" if full_vacuum else "VACUUM (ANALYZE)"
                for table in _PRUNED_TABLES:
                    conn.exec_driver_sql(f"{verb} {table}")
        return PruneResult(
            deleted,
            before,
            self._file_size(),
            plan,
            care_deleted,
            used_before=used_before,
            used_after=self._bytes_in_use(),
            wal_after=wal_after,
            vacuumed=self.is_sqlite and not_vacuumed is None,
            not_vacuumed=not_vacuumed,
        )

    def _vacuum_room(self) -> str | None:
        """Why VACUUM may not run for lack of disk space, or None when it may.

        VACUUM writes the store's live pages to a temporary database (in SQLite's temporary
        folder, SQLITE_TMPDIR or TMPDIR or /var/tmp or /tmp) and then copies them back
        through the WAL next to the store: about twice the live data, on one filesystem or
        split over two. Running out halfway fails the VACUUM, after the deletes were
        committed, with the disk full under a serving hub."""
        used = self._bytes_in_use() or 0
        folder = self._file_folder()
        if folder is None:
            return None
        need = {folder: used}
        temp = Path(os.environ.get("SQLITE_TMPDIR") or tempfile.gettempdir())
        try:
            same = os.stat(folder).st_dev == os.stat(temp).st_dev
        except OSError:
            same = True
        if same:
            need[folder] = 2 * used
        else:
            need[temp] = used
        for place, bytes_needed in need.items():
            bytes_needed += bytes_needed // 10  # and a margin for what grows meanwhile
            try:
                free = shutil.disk_usage(place).free
            except OSError:
                continue
            if free < bytes_needed:
                return (
                    f"VACUUM needs about {_amount(bytes_needed)} free on the filesystem of "
                    f"{place} and {_amount(free)} is"
                )
        return None

    def _truncate_wal(self) -> int:
        """Checkpoint the WAL and trim it to nothing; the WAL's size in bytes afterwards.

        A TRUNCATE checkpoint waits for readers, and gives up (busy) when one still reads an
        older snapshot, as a serving hub may: then it is tried again for a few seconds, and
        the WAL left over is reported as such (the hub's own checkpointer trims it later)."""
        deadline = time.monotonic() + _TRUNCATE_PATIENCE
        while True:
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                row = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").first()
            busy = row is not None and bool(row[0])
            if not busy or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        path = self._database_path()
        wal = path.with_name(path.name + "-wal") if path is not None else None
        return wal.stat().st_size if wal is not None and wal.exists() else 0

    def _database_path(self) -> Path | None:
        path = self.url.removeprefix("sqlite:///")
        return Path(path) if self.is_sqlite and path and path != ":memory:" else None

    def _bytes_in_use(self) -> int | None:
        """SQLite: bytes of the database's pages that hold data (its pages less its free
        list, what the WAL holds counted as written); None on PostgreSQL."""
        pages = self._pages()
        return None if pages is None else pages[0] - pages[1]

    def _pages(self) -> tuple[int, int] | None:
        """SQLite: the database's size and its free list's, in bytes, as they are with the
        WAL's pages written back (the database file's size once checkpointed)."""
        if not self.is_sqlite:
            return None
        with self.engine.connect() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
            free = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
            size = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
        return int(pages) * int(size), int(free) * int(size)

    def _file_size(self) -> int | None:
        """Bytes the store takes: SQLite's database file as it is once its WAL is written
        back (the WAL is reported on its own: a WAL a reader kept from being trimmed is not
        the store growing), or on PostgreSQL the tables retention deletes from, with their
        indexes and TOAST (what VACUUM FULL gives back)."""
        if not self.is_sqlite:
            sizes = " + ".join(f"pg_total_relation_size('{table}')" for table in _PRUNED_TABLES)
            with self.engine.connect() as conn:
                return int(conn.exec_driver_sql(f"SELECT {sizes}").scalar_one())
        pages = self._pages()
        return None if pages is None else pages[0]


#: How long prune retries a WAL checkpoint that a reader keeps from trimming the WAL.
_TRUNCATE_PATIENCE = 3.0

#: Rows retention deletes per transaction at first; then each batch is sized to hold SQLite's
#: write lock for about _BATCH_SECONDS, between these bounds.
_BATCH_FIRST = 200
_BATCH_MIN = 10
_BATCH_MAX = 1_000
_BATCH_SECONDS = 0.05
#: The least time the write lock is let go between two batches. Intake retries SQLite's lock
#: every half millisecond (group_commit.LOCK_RETRY), so it gets in within this; the pause also
#: grows to the time the last batch held the lock, leaving the routing worker an equal share.
_BATCH_PAUSE = 0.01


class _PruneBatches:
    """Retention's deletes, a bounded batch of rows per transaction.

    Each batch picks the next ids that match (in id order, after the last batch's), then
    deletes those of them that still match, with their dependent rows, and commits: the write
    lock is held for one batch at a time, and let go between batches so that intake's group
    commit and the routing worker write in between. SQLite's automatic checkpoints run after
    the commits, so the WAL stays about one batch long instead of the whole prune."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.size = _BATCH_FIRST

    def run(
        self,
        id_column: Any,
        where: list[ColumnElement[bool]] | ColumnElement[bool],
        delete_batch: Callable[[Any, list[int]], int],
    ) -> int:
        """Delete, batch by batch, the rows of ``id_column``'s table matching ``where``;
        ``delete_batch(conn, ids)`` deletes those of ``ids`` that still match and returns
        how many. The total deleted."""
        conditions = where if isinstance(where, list) else [where]
        after: Any = None
        total = 0
        while True:
            query = select(id_column).where(*conditions).order_by(id_column).limit(self.size)
            if after is not None:
                query = query.where(id_column > after)
            started = time.monotonic()
            with self.engine.begin() as conn:
                ids = list(conn.execute(query).scalars())
                if not ids:
                    return total
                total += delete_batch(conn, ids) or 0
            held = time.monotonic() - started
            after = ids[-1]
            if len(ids) < self.size:
                return total
            scaled = int(self.size * _BATCH_SECONDS / max(held, 0.001))
            self.size = max(_BATCH_MIN, min(_BATCH_MAX, scaled, 2 * self.size))
            time.sleep(max(_BATCH_PAUSE, held))


def _with_work() -> Any:
    """The ids of messages with a delivery waiting, being sent or dead. Two selects, so that
    each reads its partial index: an IN of all three statuses implies neither's condition."""
    unfinished = select(deliveries.c.message_id).where(delivery_in(deliveries, *UNFINISHED))
    dead = select(deliveries.c.message_id).where(delivery_in(deliveries, DeliveryStatus.DEAD))
    return unfinished.union_all(dead)


def _prunable(cutoff: datetime, include_unfinished: bool) -> list[ColumnElement[bool]]:
    """The messages retention deletes: received before ``cutoff`` and, unless
    ``include_unfinished``, with no work left."""
    where: list[ColumnElement[bool]] = [messages.c.received_at < cutoff]
    if not include_unfinished:
        where.append(messages.c.status != MessageStatus.RECEIVED.value)
        where.append(messages.c.id.not_in(_with_work()))
    return where


def _prune_plan(conn: Any, cutoff: datetime, include_unfinished: bool) -> PrunePlan:
    """Count the older messages, and those of them with work left, by reason. The reasons are
    read through the outbox's partial indexes, so they cost what is waiting, not the store."""
    old = messages.c.received_at < cutoff
    routed = messages.c.status != MessageStatus.RECEIVED.value
    older = conn.execute(select(func.count()).select_from(messages).where(old)).scalar_one()
    unrouted = conn.execute(
        select(func.count())
        .select_from(messages)
        .where(old, messages.c.status == MessageStatus.RECEIVED.value)
    ).scalar_one()
    joined = deliveries.join(messages, messages.c.id == deliveries.c.message_id)
    per_message = func.count(func.distinct(deliveries.c.message_id))
    unfinished = delivery_in(deliveries, *UNFINISHED)
    waiting = conn.execute(
        select(per_message).select_from(joined).where(unfinished, old, routed)
    ).scalar_one()
    waiting_ids = select(deliveries.c.message_id).where(unfinished)
    dead = conn.execute(
        select(per_message)
        .select_from(joined)
        .where(
            delivery_in(deliveries, DeliveryStatus.DEAD),
            old,
            routed,
            deliveries.c.message_id.not_in(waiting_ids),
        )
    ).scalar_one()
    care = _CareRetention(cutoff, include_unfinished).plan(conn)
    return PrunePlan(cutoff, older, unrouted, waiting, dead, care, include_unfinished)


#: Patient keys per query when retention asks which of them the store still holds.
_KEYS_PER_QUERY = 500


class _CareRetention:
    """Which care and referral rows retention deletes (CareRecordsPlan says what and why),
    as the WHERE clauses the dry run counts with and the prune deletes with."""

    def __init__(self, cutoff: datetime, include_unfinished: bool) -> None:
        from carehub.care.encounters import OPEN_STATES
        from carehub.care.followup import PENDING
        from carehub.referrals.state import CLOSED_STATUSES

        self.cutoff = cutoff
        self.include_unfinished = include_unfinished
        self._older_encounter = encounters.c.updated_at < cutoff
        self._open = encounters.c.state.in_(OPEN_STATES)
        self._followup_pending = encounters.c.id.in_(
            select(followups.c.encounter_id).where(followups.c.status.in_(PENDING))
        )
        self._notice_held = encounters.c.id.in_(
            select(notifications.c.encounter_id).where(
                notifications.c.status == _HELD_FOR_DIGEST,
                notifications.c.encounter_id.is_not(None),  # NOT IN over a NULL matches nothing
            )
        )
        self._older_referral = referrals.c.updated_at < cutoff
        self._closed_referral = referrals.c.status.in_(CLOSED_STATUSES)
        visit_gone = or_(
            notifications.c.encounter_id.is_(None),
            notifications.c.encounter_id.not_in(select(encounters.c.id)),
        )
        self._older_notice_without_visit = and_(notifications.c.created_at < cutoff, visit_gone)

    # -- what goes ---------------------------------------------------------------------------
    def encounters(self) -> list[ColumnElement[bool]]:
        where = [self._older_encounter]
        if not self.include_unfinished:
            where += [not_(self._open), not_(self._followup_pending), not_(self._notice_held)]
        return where

    def _of_encounters(self, column: Any) -> ColumnElement[bool]:
        """Rows of the encounters that go; false, never NULL, for a row without one (so that
        NOT of it reads as "stays")."""
        going = select(encounters.c.id).where(*self.encounters())
        return and_(column.is_not(None), column.in_(going))

    def notifications(self) -> ColumnElement[bool]:
        without_visit = self._older_notice_without_visit
        if not self.include_unfinished:
            without_visit = and_(without_visit, notifications.c.status != _HELD_FOR_DIGEST)
        return or_(self._of_encounters(notifications.c.encounter_id), without_visit)

    def referrals(self) -> list[ColumnElement[bool]]:
        where = [self._older_referral]
        if not self.include_unfinished:
            where.append(self._closed_referral)
        return where

    def referral_events(self) -> ColumnElement[bool]:
        unmatched = and_(
            referral_events.c.referral_id.is_(None), referral_events.c.at < self.cutoff
        )
        of_referrals = referral_events.c.referral_id.in_(
            select(referrals.c.id).where(*self.referrals())
        )
        return or_(of_referrals, unmatched)

    def merges(self, conn: Any) -> tuple[list[int], int]:
        """The ids of the patient merges that go, and how many older ones stay: their chain
        has a newer merge, or a key of it is carried by a row that stays (see
        CareRecordsPlan)."""
        rows = conn.execute(
            select(
                patient_merges.c.id,
                patient_merges.c.retired_key,
                patient_merges.c.surviving_key,
                patient_merges.c.merged_at,
            )
        ).all()
        chain_of = _chains([(row.retired_key, row.surviving_key) for row in rows])
        chains: dict[str, list[Any]] = {}
        for row in rows:
            chains.setdefault(chain_of[row.retired_key], []).append(row)
        older = {
            chain: members
            for chain, members in chains.items()
            if all(_aware(row.merged_at) < self.cutoff for row in members)
        }
        keys = {
            key
            for members in older.values()
            for row in members
            for key in (row.retired_key, row.surviving_key)
        }
        carried = {chain_of[key] for key in self._keys_still_held(conn, keys)}
        doomed = [
            row.id for chain, rows_of in older.items() if chain not in carried for row in rows_of
        ]
        older_rows = sum(1 for row in rows if _aware(row.merged_at) < self.cutoff)
        return doomed, older_rows - len(doomed)

    def _keys_still_held(self, conn: Any, keys: set[str]) -> set[str]:
        """Which of ``keys`` a row that retention keeps still carries."""
        from carehub.workqueue import patient_key

        staying = [
            (encounters.c.patient_key, not_(and_(*self.encounters()))),
            (followups.c.patient_key, not_(self._of_encounters(followups.c.encounter_id))),
            (notifications.c.patient_key, not_(self.notifications())),
            (referrals.c.patient_key, not_(and_(*self.referrals()))),
            (patient_preferences.c.patient_key, true()),
        ]
        message_stays = not_(and_(*_prunable(self.cutoff, self.include_unfinished)))
        ordered = sorted(keys)
        held: set[str] = set()
        for start in range(0, len(ordered), _KEYS_PER_QUERY):
            chunk = ordered[start : start + _KEYS_PER_QUERY]
            for column, stays in staying:
                found = conn.execute(select(column).distinct().where(column.in_(chunk), stays))
                held.update(found.scalars())
            # A message carries the key its PID-3 makes (authority|id); asked by the id,
            # which ix_messages_patient finds, and the key compared whole.
            values = {
                part for key in chunk for part in (key.partition("|")[2], key.rpartition("|")[2])
            }
            found = conn.execute(
                select(
                    messages.c.patient_id,
                    messages.c.patient_authority,
                    messages.c.sending_facility,
                )
                .distinct()
                .where(messages.c.patient_id.in_(sorted(values)), message_stays)
            )
            for value, authority, facility in found:
                # A row stored before identifiers were scoped carries both keys: the bare
                # one it was keyed by then, and its sender's (scoped_authority).
                held.add(patient_key(value, authority, 0))
                held.add(patient_key(value, scoped_authority(authority, facility), 0))
        return held & keys

    # -- dry run and prune -------------------------------------------------------------------
    def plan(self, conn: Any) -> CareRecordsPlan:
        def count(table: Any, *where: ColumnElement[bool]) -> int:
            return int(
                conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()
            )

        doomed_merges, merges_in_use = self.merges(conn)
        deleted = {
            "encounters": count(encounters, *self.encounters()),
            "encounter_events": count(
                encounter_events, self._of_encounters(encounter_events.c.encounter_id)
            ),
            "notifications": count(notifications, self.notifications()),
            "followups": count(followups, self._of_encounters(followups.c.encounter_id)),
            "referrals": count(referrals, *self.referrals()),
            "referral_events": count(referral_events, self.referral_events()),
            "patient_merges": len(doomed_merges),
        }
        closed = [self._older_encounter, not_(self._open)]
        return CareRecordsPlan(
            deleted=deleted,
            open_encounters=count(encounters, self._older_encounter, self._open),
            encounters_with_followups=count(encounters, *closed, self._followup_pending),
            encounters_with_digest=count(
                encounters, *closed, not_(self._followup_pending), self._notice_held
            ),
            open_referrals=count(referrals, self._older_referral, not_(self._closed_referral)),
            notices_for_digest=count(
                notifications,
                self._older_notice_without_visit,
                notifications.c.status == _HELD_FOR_DIGEST,
            ),
            merges_in_use=merges_in_use,
            include_unfinished=self.include_unfinished,
        )

    def delete_in(self, batches: _PruneBatches) -> dict[str, int]:
        """Delete what ``plan`` counts, a batch at a time (see _PruneBatches), children
        before their parents; rows deleted per table. A visit's and a referral's rows go in
        the batch that deletes it. The rows that stay are the same before and after, so the
        merges they decide are the ones the plan counted."""
        with batches.engine.connect() as conn:
            doomed_merges, _ = self.merges(conn)
        counts = dict.fromkeys(CARE_RECORD_TABLES, 0)

        def gone(conn: Any, table: str, statement: Any) -> None:
            counts[table] += conn.execute(statement).rowcount or 0

        def visits(conn: Any, ids: list[int]) -> int:
            going = select(encounters.c.id).where(encounters.c.id.in_(ids), *self.encounters())
            gone(conn, "notifications", delete(notifications).where(
                notifications.c.encounter_id.is_not(None), notifications.c.encounter_id.in_(going)
            ))  # fmt: skip
            gone(conn, "followups", delete(followups).where(followups.c.encounter_id.in_(going)))
            gone(conn, "encounter_events", delete(encounter_events).where(
                encounter_events.c.encounter_id.in_(going)
            ))  # fmt: skip
            where = [encounters.c.id.in_(ids), *self.encounters()]
            gone(conn, "encounters", delete(encounters).where(*where))
            return len(ids)

        def notices(conn: Any, ids: list[int]) -> int:
            where = [notifications.c.id.in_(ids), self.notifications()]
            gone(conn, "notifications", delete(notifications).where(*where))
            return len(ids)

        def referrals_(conn: Any, ids: list[int]) -> int:
            going = select(referrals.c.id).where(referrals.c.id.in_(ids), *self.referrals())
            gone(conn, "referral_events", delete(referral_events).where(
                referral_events.c.referral_id.in_(going)
            ))  # fmt: skip
            where = [referrals.c.id.in_(ids), *self.referrals()]
            gone(conn, "referrals", delete(referrals).where(*where))
            return len(ids)

        def unmatched(conn: Any, ids: list[int]) -> int:
            where = [referral_events.c.id.in_(ids), self.referral_events()]
            gone(conn, "referral_events", delete(referral_events).where(*where))
            return len(ids)

        batches.run(encounters.c.id, self.encounters(), visits)
        batches.run(notifications.c.id, self.notifications(), notices)
        batches.run(referrals.c.id, self.referrals(), referrals_)
        batches.run(referral_events.c.id, self.referral_events(), unmatched)
        for start in range(0, len(doomed_merges), _KEYS_PER_QUERY):
            chunk = doomed_merges[start : start + _KEYS_PER_QUERY]
            with batches.engine.begin() as conn:
                gone(conn, "patient_merges", delete(patient_merges).where(
                    patient_merges.c.id.in_(chunk)
                ))  # fmt: skip
        return counts


def _chains(links: list[tuple[str, str]]) -> dict[str, str]:
    """Each key of ``links`` (retired, surviving) -> one key that names its chain: keys
    linked by merges, directly or through others, share it."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        parent.setdefault(key, key)
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for retired, surviving in links:
        parent[root(retired)] = root(surviving)
    return {key: root(key) for key in list(parent)}


#: A WAL holding more pages than this after a passive checkpoint gets a RESTART one (16 MB
#: of 4 KB pages); the file is trimmed to WAL_SIZE_LIMIT bytes when SQLite starts it over.
RESTART_FRAMES = 4_096
WAL_SIZE_LIMIT = 16 * 1024 * 1024


#: Seconds can_write waits for SQLite's write lock.
CAN_WRITE_WAIT = 0.2


def _amount(size: int) -> str:
    """A number of bytes as a person reads it: 64 KiB, 2.0 MiB."""
    if size < 1024 * 1024:
        return f"{size // 1024} KiB"
    if size < 1024**3:
        return f"{size / 1024**2:.1f} MiB"
    return f"{size / 1024**3:.1f} GiB"


class _WalCheckpointer:
    """Runs WAL checkpoints off the commit path, and keeps the WAL file from growing.

    A passive checkpoint copies what it can to the database file and never blocks a writer;
    SQLite starts the WAL over from its beginning only after a checkpoint has copied all of
    it. One passive checkpoint a second fell behind a steady feed: in 40 s of
    bench/bench_routing.py the WAL grew to 2.8 GB, and every read slowed as it searched a
    longer WAL index (end to end fell from 1,207 to 1,000 msg/s across a 60 s run). So
    checkpoints run back to back while commits come, and when the WAL still holds more than
    ``restart_frames`` pages a RESTART checkpoint waits for readers to finish, so that the
    next write starts the WAL over (and ``journal_size_limit`` trims the file)."""

    def __init__(
        self, engine: Engine, pause: float = 0.05, restart_frames: int = RESTART_FRAMES
    ) -> None:
        self._engine = engine
        self._pause = pause
        self._restart_frames = restart_frames
        self._failures = FailureRun(
            "WAL checkpoint", "the WAL file grows until one succeeds", "checkpoint(s)", logger=log
        )
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self._checkpoint("TRUNCATE")

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                return
            if self._checkpoint("PASSIVE") > self._restart_frames:
                self._checkpoint("RESTART")
            self._stopping.wait(self._pause)

    def _checkpoint(self, mode: str) -> int:
        """Run one checkpoint; the WAL's length in pages (0 when unknown)."""
        try:
            with self._engine.connect() as conn:
                row = conn.exec_driver_sql(f"PRAGMA wal_checkpoint({mode})").first()
        except Exception as err:  # a failed checkpoint is retried on the next one
            self._failures.failed(err)
            return 0
        self._failures.succeeded()
        return int(row[1]) if row is not None and row[1] is not None and row[1] > 0 else 0
