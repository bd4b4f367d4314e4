"""Routing results and the delivery outbox, on the same database as the messages.

A message's routing result (step outputs, planned deliveries, new status) commits in one
transaction. Deliveries are then claimed by workers with a lease, sent, and finished with an
attempt row each; a failed attempt sets the next try time, and the last one makes it a dead
letter. Deliveries to one destination for one patient (a line) go out in order: a later one is
not claimed while an earlier one is still pending, nor while an earlier one is a dead letter
that holds its line (its destination's ``retry.after_dead_letter``, hold unless the channel's
notices are read one by one) until an operator retries or discards it. Forwards that reach one
receiving system share a line (routing.table.share_lines): each delivery names its line
(``line``), and every line query reads that, never the destination.

A delivery that waits behind a stalled line (a dead letter that holds it, or a delivery waiting
for its next retry) is parked: its due time is PARKED, so claims, which walk pending deliveries
by due time, never read it, and a down destination's backlog costs other claims nothing. It is
made due again when its line moves: a delivery sent after failing, a dead letter that lets the
line go on, retried or discarded. The worker's sweep mends what a race between workers left.

A destination an operator paused (``carehub destinations pause``) stalls every line to it: its
pending deliveries are parked, new ones are written parked, and the claim skips it, until it is
resumed; then each line goes on in order, as after a retry of dead letters.

A destination that works again after failing gets its deliveries waiting out a retry delay sent
early (claim_early). Such an attempt is recorded like any other, but its failure (the
destination flaps) is not counted against ``max_attempts`` and the delivery keeps the retry time
it had: bringing retries forward never shortens the schedule the routes promise. Its attempt row
says ``failed early``; find() counts them per delivery (DeliveryRecord.early_attempts).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from carehub.store.schema import (
    PENDING,
    UNFINISHED,
    DeliveryStatus,
    MessageStatus,
    deliveries,
    delivery_attempts,
    delivery_in,
    message_events,
    message_steps,
    messages,
    paused_destinations,
)
from carehub.store.store import EVENT_COLUMNS, DriverSQL, MessageStore, _aware, scoped_authority

if TYPE_CHECKING:
    from carehub.routing.router import PlannedDelivery, RoutingResult

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class DeliveryRecord:
    id: int
    message_id: int
    run: int
    route: str
    destination: str
    channel: str
    idempotency_key: str
    order_key: str
    payload: bytes
    content_type: str
    metadata: dict[str, str]
    status: str
    attempts: int
    max_attempts: int
    not_before: datetime
    last_error: str | None
    receipt: str | None
    created_at: datetime
    updated_at: datetime
    accepted_at: datetime | None = None
    #: A dead letter's: whether later deliveries of its line wait for it (see module doc).
    holds_line: bool | None = None
    #: While it is being sent: when its lease runs out. No process is named as holding a
    #: lease; its end time, as the holder last wrote it, says who holds it (see Outbox.finish).
    lease_until: datetime | None = None
    #: Of ``last_error``, what the log may show (DeliveryError.loggable); None for a delivery
    #: that never failed, and for errors recorded before the store kept it (migration 0017).
    last_error_loggable: str | None = None
    #: Failed attempts made early, as its destination seemed back, not counted in
    #: ``attempts`` (see the module doc); read by find() and get(), 0 elsewhere.
    early_attempts: int = 0
    #: The line it keeps its patient's order in (see the module doc); None on a delivery
    #: finished before lines had their own column, whose line was its destination.
    line: str | None = None
    #: Seconds from ``failing_since`` after which a failure makes it a dead letter; 0: no
    #: time limit (RetryPolicy.give_up_seconds).
    give_up_after: int = 0
    #: When its current run of failed attempts began; None while none has failed.
    failing_since: datetime | None = None


@dataclass(slots=True, frozen=True)
class AttemptResult:
    """The outcome of one send, as the delivery worker reports it."""

    delivery_id: int
    message_id: int
    attempt: int  # 1 for the first attempt
    started_at: datetime
    duration_ms: int
    delivered: bool
    detail: str
    retry_at: datetime | None = None  # None with delivered=False means: dead letter
    #: The delivery's line, so the deliveries behind it are parked or made due with it
    #: (``line``: DeliveryRecord.line; empty, its destination's).
    destination: str = ""
    order_key: str = ""
    line: str = ""
    #: For a dead letter: whether it holds its line (the destination's after_dead_letter).
    holds_line: bool = True
    #: The channel found nothing to send (NothingToSend): settled as skipped, ``detail``
    #: saying why; ``delivered`` is False.
    skipped: bool = False
    #: The lease the sender holds the delivery under (DeliveryRecord.lease_until, as last
    #: renewed): the result is recorded only while the delivery is still being sent under
    #: it. None: recorded whatever the delivery's state.
    lease_until: datetime | None = None
    #: Of a failure's ``detail``, what the log may show (DeliveryError.loggable), kept for
    #: `carehub status`; None: read from ``detail`` as the log reads an error that does not
    #: say where the destination's answer begins.
    loggable: str | None = None
    #: Sent before its retry time, brought forward as its destination seemed back (see
    #: Outbox.claim_early): a failure to be retried is not counted against max_attempts, and
    #: ``retry_at`` is the retry time the delivery already had.
    early: bool = False
    #: The limit this attempt was counted against (its destination's ``retry.max_attempts``
    #: as the routes have it now), written to the delivery so views show it; None keeps the
    #: delivery's own.
    max_attempts: int | None = None
    #: Likewise its ``retry.give_up_seconds`` (0: no time limit); None keeps the delivery's.
    give_up_after: int | None = None
    #: For a counted failure: when the delivery's run of failures began (this attempt's
    #: start, for its first); None leaves the delivery's as it is.
    failing_since: datetime | None = None

    @property
    def kept_on_schedule(self) -> bool:
        """An early attempt that failed and is retried at the delivery's own time: its
        attempt is in the history, not in the count."""
        return self.early and not self.delivered and not self.skipped and self.retry_at is not None


@dataclass(slots=True, frozen=True)
class LineReport:
    """What an operator's retry or discard of dead letters did to their lines."""

    count: int  # dead letters retried or discarded
    lines: int  # distinct (line, patient) lines they were in
    released: int  # deliveries that waited behind them and are now due
    #: Later deliveries of those lines that had been delivered before them (their order at the
    #: receiver is already broken: sent before this hub held lines, or with ``continue``).
    overtaken: int = 0
    overtaken_lines: int = 0


@dataclass(slots=True, frozen=True)
class Discard:
    """Who gave up on a dead letter, when, and the reason they gave."""

    at: datetime
    by: str | None
    reason: str | None


#: The outcome of a failed early attempt (AttemptResult.early), which does not count.
EARLY_FAILURE = "failed early"

#: The attempt detail discard_dead_letters writes, read back into who and why.
_DISCARD_DETAIL = re.compile(
    r"discarded by (?P<by>.*?) \(carehub dead-letters discard\)(?:: (?P<reason>.*))?", re.DOTALL
)


@dataclass(slots=True, frozen=True)
class PausedDestination:
    """A destination an operator paused: since when, by whom, why."""

    destination: str
    channel: str | None
    paused_at: datetime
    paused_by: str
    reason: str | None


@dataclass(slots=True, frozen=True)
class PauseReport:
    """What a pause or resume did: ``changed`` False when it already was paused (or was not)."""

    changed: bool
    waiting: int  # the destination's deliveries pending or being sent
    moved: int = 0  # parked by a pause, made due by a resume
    pause: PausedDestination | None = None  # the pause in force (pause) or ended (resume)


@dataclass(slots=True, frozen=True)
class StepRow:
    run: int
    route: str
    position: int
    step: str
    outcome: str
    output: Any
    at: datetime


@dataclass(slots=True, frozen=True)
class AttemptRow:
    number: int
    started_at: datetime
    duration_ms: int
    outcome: str
    detail: str | None


def _now() -> datetime:
    return datetime.now(UTC)


def _record(row: Any) -> DeliveryRecord:
    values = dict(row._mapping)
    for name in ("not_before", "created_at", "updated_at"):
        values[name] = _aware(values[name])
    values["give_up_after"] = values.get("give_up_after") or 0
    for name in ("accepted_at", "lease_until", "failing_since"):
        if values.get(name) is not None:
            values[name] = _aware(values[name])
    values["payload"] = bytes(values["payload"])
    values["metadata"] = json.loads(values["metadata"]) if values["metadata"] else {}
    return DeliveryRecord(**values)


#: A new delivery's columns, in the order ``_new_delivery_values`` gives them.
_DELIVERY_COLUMNS = (
    "message_id", "run", "route", "destination", "channel", "idempotency_key", "order_key",
    "payload", "content_type", "metadata", "status", "attempts", "max_attempts", "not_before",
    "lease_until", "created_at", "updated_at", "line", "give_up_after",
)  # fmt: skip


def _line_of(planned: PlannedDelivery) -> str:
    """The line a planned delivery goes in: its destination's, unless it shares one."""
    return planned.line or planned.destination


def _result_line(result: AttemptResult) -> str:
    """The line of the delivery an attempt was for (empty: its destination's)."""
    return result.line or result.destination


def _metadata_text(metadata: dict[str, Any] | None) -> str:
    """A delivery's metadata as its column holds it (JSON; ``{}`` when there is none)."""
    return json.dumps(metadata) if metadata else "{}"


def _new_delivery_values(
    planned: PlannedDelivery,
    message_id: int,
    run: int,
    now: Any,
    lease_until: Any = None,
    not_before: Any = None,
) -> tuple[Any, ...]:
    """A new delivery's row; times as the driver takes them. Pending (due ``now``, or
    ``not_before``: PARKED behind a stalled line), or with a lease already being sent (see
    Handover)."""
    outgoing = planned.outgoing
    return (
        message_id,
        run,
        planned.route,
        planned.destination,
        planned.channel,
        outgoing.idempotency_key,
        planned.order_key,
        outgoing.payload,
        outgoing.content_type,
        _metadata_text(outgoing.metadata),
        DeliveryStatus.PENDING.value if lease_until is None else DeliveryStatus.SENDING.value,
        0,
        planned.max_attempts,
        now if not_before is None else not_before,
        lease_until,
        now,
        now,
        _line_of(planned),
        planned.give_up_after,
    )


@dataclass(frozen=True, slots=True)
class PlaceTaken:
    """An earlier run's delivery a reprocess run met (Outbox._take_places): ``carried`` when
    the row now carries the new run's delivery; False when it was being sent, and the new
    run's delivery was left out."""

    message_id: int
    delivery_id: int
    was: str  # the earlier delivery's status: pending, dead or sending
    carried: bool


#: An earlier run's deliveries a reprocess run's delivery takes the place of (or, sending,
#: leaves to finish).
_TAKEN_OVER = (
    DeliveryStatus.PENDING.value,
    DeliveryStatus.DEAD.value,
    DeliveryStatus.SENDING.value,
)


@dataclass(slots=True)
class Handover:
    """Room a worker has to start new deliveries itself, offered to ``record_routing``.

    A delivery that routing has just planned and that is first in its line (nothing pending,
    being sent or holding the line as a dead letter before it in its line, for that patient)
    is written already leased and handed straight back, rather than written pending
    and claimed by a query a moment later. The worker takes at most ``room`` of them, none to
    a destination in ``full``."""

    room: int
    lease: timedelta
    full: frozenset[str] = frozenset()
    #: Filled in by record_routing: the deliveries now leased to the caller, in order.
    taken: list[DeliveryRecord] = field(default_factory=list)


#: The due time of a delivery parked behind a stalled line (see the module doc). Far beyond any
#: retry time, and within what both databases and Python's datetime hold.
#: Ids bound into one IN (...) list, well under SQLite's oldest limit of 999 variables.
_IDS_PER_STATEMENT = 500
PARKED = datetime(9999, 1, 1, tzinfo=UTC)
#: busy_lines' attempt count for a destination that is paused (not a line).
PAUSED_LINE = -2


def _literal(condition: Any) -> str:
    return str(condition.compile(compile_kwargs={"literal_binds": True}))


#: The unfinished-deliveries condition as SQL text, the same as its partial index's.
_UNFINISHED_SQL = _literal(delivery_in(deliveries, *UNFINISHED))
#: The statuses of a delivery not made yet: its message is still routed.
_UNFINISHED_VALUES = frozenset(status.value for status in UNFINISHED)
#: Of ``deliveries``, one that waits (pending, the due-index's condition written out).
_PENDING_SQL = _literal(delivery_in(deliveries, *PENDING))


def _stalled_before(row: str, alias: str) -> str:
    """SQL: something earlier in ``row``'s line stalls it, a delivery failed once and waiting
    (or being sent) again, or a dead letter that holds the line; each read through its
    partial index (the status conditions are written as the indexes have them). Or an
    operator paused ``row``'s destination: the whole destination stalls until resumed, so
    parking, the sweep and a line moving on all leave its deliveries parked."""
    line = (
        f"{alias}.line = {row}.line AND {alias}.order_key = {row}.order_key "
        f"AND {alias}.id < {row}.id"
    )
    unfinished = _UNFINISHED_SQL.replace("deliveries.", f"{alias}.")
    return (
        f"(EXISTS (SELECT 1 FROM deliveries {alias} WHERE {line} AND {unfinished} "
        f"AND {alias}.attempts > 0) "
        f"OR EXISTS (SELECT 1 FROM deliveries {alias} WHERE {line} "
        f"AND {alias}.status = '{DeliveryStatus.DEAD.value}' AND {alias}.holds_line) "
        f"OR EXISTS (SELECT 1 FROM paused_destinations {alias}p "
        f"WHERE {alias}p.destination = {row}.destination))"
    )


class _WorkerSQL(DriverSQL):
    """The writes the worker makes for every batch, as driver-level SQL (see DriverSQL)."""

    def __init__(self, is_sqlite: bool) -> None:
        super().__init__(is_sqlite)
        m = self.mark
        self.set_message_status = (
            f"UPDATE messages SET status = {m}, status_at = {m}, detail = {m} WHERE id = {m}"
        )
        self.add_events = self.insert("message_events", EVENT_COLUMNS)
        self.add_steps = self.insert(
            "message_steps",
            ("message_id", "run", "route", "position", "step", "outcome", "output", "at"),
        )
        self.add_deliveries = self.insert("deliveries", _DELIVERY_COLUMNS)
        self.add_attempts = self.insert(
            "delivery_attempts",
            ("delivery_id", "number", "started_at", "duration_ms", "outcome", "detail"),
        )
        self.record_attempt = (
            f"UPDATE deliveries SET attempts = {m}, "
            f"max_attempts = coalesce({m}, max_attempts), "
            f"give_up_after = coalesce({m}, give_up_after), "
            f"failing_since = coalesce({m}, failing_since), status = {m}, receipt = {m}, "
            f"last_error = {m}, last_error_loggable = {m}, "
            f"not_before = coalesce({m}, not_before), accepted_at = {m}, "
            f"holds_line = {m}, lease_until = NULL, updated_at = {m} WHERE id = {m}"
        )
        # Parameters: PARKED, line, order key, the id after which to park.
        self.park_line = (
            f"UPDATE deliveries SET not_before = {m} WHERE {_UNFINISHED_SQL} "
            f"AND {_PENDING_SQL} AND line = {m} AND order_key = {m} AND id > {m}"
        )
        # Parameters: PARKED, line, order key, PARKED. Those of the line a stalled delivery
        # is before.
        self.park_behind = (
            f"UPDATE deliveries SET not_before = {m} WHERE {_UNFINISHED_SQL} "
            f"AND {_PENDING_SQL} AND line = {m} AND order_key = {m} "
            f"AND not_before < {m} AND {_stalled_before('deliveries', 'e')}"
        )
        # Parameters: now, line, order key, PARKED. Only those no stalled delivery is
        # before: the rest of the line stays parked behind it.
        self.unpark_line = (
            f"UPDATE deliveries SET not_before = {m} WHERE {_UNFINISHED_SQL} "
            f"AND {_PENDING_SQL} AND line = {m} AND order_key = {m} "
            f"AND not_before >= {m} AND NOT {_stalled_before('deliveries', 'e')}"
        )
        # Parameters: the sorted line keys, as an array. PostgreSQL only (Outbox._lock_lines).
        self.lock_lines = (
            "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) "
            f"FROM unnest(CAST({m} AS text[])) AS k"
        )
        # The sweep's (Outbox.tidy_lines): found by a read, which takes no write lock however
        # many parked deliveries it passes, then changed by id, the line checked again.
        # Parameters: PARKED. Parked deliveries nothing stalls any more (a race between
        # workers, a dead letter pruned, a setting changed): read from the due index's end.
        self.stale_parked = (
            f"SELECT id FROM deliveries WHERE {_PENDING_SQL} "
            f"AND not_before >= {m} AND NOT {_stalled_before('deliveries', 'e')}"
        )
        # Parameters: PARKED, destination, PARKED. Every waiting delivery of a destination
        # being paused, through the index of unfinished deliveries by destination.
        self.park_destination = (
            f"UPDATE deliveries SET not_before = {m} WHERE {_UNFINISHED_SQL} "
            f"AND {_PENDING_SQL} AND destination = {m} AND not_before < {m}"
        )
        # Parameters: now, destination, PARKED. A resumed destination's parked deliveries
        # that nothing earlier in their line stalls: the rest follow as their lines move.
        self.unpark_destination = (
            f"UPDATE deliveries SET not_before = {m} WHERE {_UNFINISHED_SQL} "
            f"AND {_PENDING_SQL} AND destination = {m} "
            f"AND not_before >= {m} AND NOT {_stalled_before('deliveries', 'e')}"
        )
        # Parameters: destination. Its deliveries pending or being sent.
        self.count_waiting = (
            f"SELECT count(*) FROM deliveries WHERE {_UNFINISHED_SQL} AND destination = {m}"
        )
        # Parameters: now. Due deliveries a stalled one is before, which claims would
        # otherwise read and pass over every time.
        self.stalled_due = (
            f"SELECT id FROM deliveries WHERE {_PENDING_SQL} "
            f"AND not_before <= {m} AND {_stalled_before('deliveries', 'e')}"
        )

    def set_due(self, count: int, stalled: bool) -> str:
        """Parameters: the due time, then ``count`` ids; only those pending and (not) stalled
        still."""
        return (
            f"UPDATE deliveries SET not_before = {self.mark} WHERE id IN ({self.marks(count)}) "
            f"AND status = '{DeliveryStatus.PENDING.value}' "
            f"AND {'' if stalled else 'NOT '}{_stalled_before('deliveries', 'e')}"
        )

    def eligible(self, count: int) -> str:
        """Which of ``count`` messages are still waiting for their first routing."""
        return (
            f"SELECT id FROM messages WHERE id IN ({self.marks(count)}) "
            f"AND status = '{MessageStatus.RECEIVED.value}'"
        )

    def busy_lines(self, lines: int, order_keys: int, destinations: int | None = None) -> str:
        """Which (line, order key) lines already hold an unfinished delivery or a dead
        letter that holds the line, each with the highest attempt count among those waiting
        (above 0: one failed and waits to be tried again) or -1 for a dead letter: a new
        delivery there waits, parked when the line is stalled. One being sent again right
        now does not stall its line: when that send works, the finish unparks only what it
        sees, and a delivery another worker was routing into the line meanwhile would stay
        parked until the sweep; when it fails, the finish parks what is behind it. Then each of the
        destinations that is paused, as (destination, NULL, -2): its deliveries are written
        parked. Takes the lines and keys twice, then the destinations (as many as the lines
        unless said)."""
        where = f"line IN ({self.marks(lines)}) AND order_key IN ({self.marks(order_keys)})"
        destinations = lines if destinations is None else destinations
        return (
            "SELECT line, order_key, "
            f"max(CASE WHEN status = '{DeliveryStatus.PENDING.value}' THEN attempts ELSE 0 END) "
            f"FROM deliveries WHERE {where} "
            f"AND {_UNFINISHED_SQL} GROUP BY line, order_key "
            f"UNION ALL SELECT DISTINCT line, order_key, -1 FROM deliveries "
            f"WHERE {where} AND status = '{DeliveryStatus.DEAD.value}' AND holds_line "
            f"UNION ALL SELECT destination, NULL, -2 FROM paused_destinations "
            f"WHERE destination IN ({self.marks(destinations)})"
        )

    def line_senders(self, lines: int, order_keys: int) -> str:
        """The sending facility (MSH-4) and patient authority of each message with an
        unfinished delivery, or a dead letter that holds the line, in the lines (line, order
        key) named. Takes the lines and keys twice."""
        where = f"d.line IN ({self.marks(lines)}) AND d.order_key IN ({self.marks(order_keys)})"
        unfinished = _UNFINISHED_SQL.replace("deliveries.", "d.")
        return (
            "SELECT DISTINCT d.line, d.order_key, m.sending_facility, "
            "m.patient_authority FROM deliveries d JOIN messages m ON m.id = d.message_id "
            f"WHERE {where} AND {unfinished} "
            "UNION SELECT DISTINCT d.line, d.order_key, m.sending_facility, "
            "m.patient_authority FROM deliveries d JOIN messages m ON m.id = d.message_id "
            f"WHERE {where} AND d.status = '{DeliveryStatus.DEAD.value}' AND d.holds_line"
        )

    def ids_by_key(self, count: int) -> str:
        return (
            "SELECT idempotency_key, id FROM deliveries "
            f"WHERE idempotency_key IN ({self.marks(count)})"
        )

    def delivery_statuses(self, count: int) -> str:
        """Each delivery's status of ``count`` messages, with its message's status and
        detail."""
        return (
            "SELECT d.message_id, d.status, m.status, d.idempotency_key, m.detail "
            "FROM deliveries d "
            f"JOIN messages m ON m.id = d.message_id WHERE d.message_id IN ({self.marks(count)}) "
            "ORDER BY d.id"
        )


def _unscoped_line(order_key: str) -> tuple[str, str] | None:
    """(the authority, the order key without it) of a patient's order key ``AUTH|ID``: the
    line the patient's deliveries were in before an identifier sent without an authority was
    keyed by its sending facility (store.scoped_authority), when ``AUTH`` may be that
    facility's code; None for a key with no authority, or one of a message with no patient."""
    authority, bar, value = order_key.partition("|")
    if not (authority and bar and value) or authority == "message":
        return None
    return authority, f"|{value}"


def _with_unscoped_lines(lines: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``lines`` and, for each, the unscoped line it may join (see Outbox._join_unscoped)."""
    found: list[tuple[str, str]] = []
    for line, key in lines:
        found.append((line, key))
        unscoped = _unscoped_line(key)
        if unscoped is not None:
            found.append((line, unscoped[1]))
    return found


def _same_delivery(key: str, message_id: int) -> str:
    """What two deliveries of one message share when a reprocess made one of them again: the
    key without its routing run (``carehub-<message>-<run>-<digest>``, the digest naming the
    destination, and a notice's recipient and kind; router.idempotency_key). Keys of other
    forms are each their own."""
    prefix = f"carehub-{message_id}-"
    if key.startswith(prefix):
        run, _, digest = key[len(prefix) :].partition("-")
        if run.isdigit() and digest:
            return digest
    return key


# -- statements the worker runs for every batch, built once -------------------------------------
# Building a statement and computing its cache key cost SQLAlchemy more Python time than the
# database took to run it: under bench/bench_routing.py, 46% of the hub's event loop was in
# SQLAlchemy and 12% in the driver. A statement built once has its cache key computed once.
_LATEST_RUNS = (
    select(message_steps.c.message_id, func.max(message_steps.c.run))
    .where(message_steps.c.message_id.in_(bindparam("ids", expanding=True)))
    .group_by(message_steps.c.message_id)
)
#: Outbox._still_held: the deliveries of ``ids`` being sent, with their leases (built once,
#: as every batch of results reads it).
_STILL_HELD = (
    select(deliveries.c.id, deliveries.c.lease_until)
    .where(
        deliveries.c.id.in_(bindparam("ids", expanding=True)),
        deliveries.c.status == DeliveryStatus.SENDING.value,
    )
    .order_by(deliveries.c.id)
)
_STILL_HELD_LOCKED = _STILL_HELD.with_for_update()
#: DeliveryRecord.early_attempts of each delivery read: its failed early attempts, through the
#: index of attempts by delivery.
_EARLY_COUNT = (
    select(func.count())
    .where(
        delivery_attempts.c.delivery_id == deliveries.c.id,
        delivery_attempts.c.outcome == EARLY_FAILURE,
    )
    .scalar_subquery()
    .label("early_attempts")
)
#: The steps that raised, of messages ``ids`` (a problem cleared since is outcome "cleared").
_FAILED_STEPS = (
    select(
        message_steps.c.message_id,
        message_steps.c.run,
        message_steps.c.route,
        message_steps.c.output,
    )
    .where(
        message_steps.c.message_id.in_(bindparam("ids", expanding=True)),
        message_steps.c.outcome == "error",
    )
    .order_by(message_steps.c.id)
)


def _earlier_in_line(earlier: Any, *conditions: Any) -> Any:
    """EXISTS a delivery before this one in its line (line, patient) that meets
    ``conditions``."""
    return (
        select(earlier.c.id)
        .where(
            earlier.c.line == deliveries.c.line,
            earlier.c.order_key == deliveries.c.order_key,
            *conditions,
            earlier.c.id < deliveries.c.id,
        )
        .exists()
    )


def _first_in_line() -> list[Any]:
    """The conditions of a claim: nothing unfinished before the delivery in its line, no dead
    letter holding it, and its destination not paused."""
    earlier = aliased(deliveries)
    blocked = _earlier_in_line(earlier, delivery_in(earlier, *UNFINISHED))
    dead = aliased(deliveries)
    held = _earlier_in_line(
        dead, delivery_in(dead, DeliveryStatus.DEAD), dead.c.holds_line.is_(True)
    )
    # A paused destination's deliveries are parked; this catches one routed or released as
    # the pause was made (a probe of a table of a few rows, by its key).
    paused = (
        select(paused_destinations.c.destination)
        .where(paused_destinations.c.destination == deliveries.c.destination)
        .exists()
    )
    return [~blocked, ~held, ~paused]


def _claim_candidates(exclude_destinations: bool, skip_ids: bool) -> Select[Any]:
    """Pending deliveries that are due and first in their line (see Outbox.claim_due)."""
    query = select(deliveries.c.id).where(
        delivery_in(deliveries, *PENDING),
        deliveries.c.not_before <= bindparam("now"),
        *_first_in_line(),
    )
    if exclude_destinations:
        query = query.where(deliveries.c.destination.notin_(bindparam("exclude", expanding=True)))
    if skip_ids:
        query = query.where(deliveries.c.id.notin_(bindparam("skip", expanding=True)))
    return query.order_by(deliveries.c.not_before, deliveries.c.id).limit(bindparam("limit"))


_CLAIM_CANDIDATES = {
    (exclude, skip): _claim_candidates(exclude, skip)
    for exclude in (False, True)
    for skip in (False, True)
}
#: Outbox.claim_early: one destination's deliveries waiting out a retry delay (failed before,
#: due later, not parked), first in their line, soonest due first.
_EARLY_CANDIDATES = (
    select(deliveries.c.id)
    .where(
        delivery_in(deliveries, *PENDING),
        deliveries.c.destination == bindparam("destination"),
        deliveries.c.attempts > 0,
        deliveries.c.not_before > bindparam("now"),
        deliveries.c.not_before < PARKED,
        *_first_in_line(),
    )
    .order_by(deliveries.c.not_before, deliveries.c.id)
    .limit(bindparam("limit"))
)


#: Outbox.claim_probe: one destination's due deliveries, first in their line, soonest due
#: first: read through the index of unfinished deliveries by destination, so a claim for a
#: destination with few deliveries due never walks the other destinations' due rows.
def _probe_candidates(by_id: bool) -> Select[Any]:
    """One destination's due deliveries, first in their line, soonest due first (``by_id``:
    only the one named), read through the index of unfinished deliveries by destination, so
    a destination with few due never walks the other destinations' due rows."""
    query = select(deliveries.c.id).where(
        delivery_in(deliveries, *UNFINISHED),
        deliveries.c.destination == bindparam("destination"),
        deliveries.c.status == DeliveryStatus.PENDING.value,
        deliveries.c.not_before <= bindparam("now"),
        *_first_in_line(),
    )
    if by_id:
        query = query.where(deliveries.c.id == bindparam("id"))
    return query.order_by(deliveries.c.not_before, deliveries.c.id).limit(1)


_PROBE_CANDIDATES = {by_id: _probe_candidates(by_id) for by_id in (False, True)}
#: Outbox.claim_probe's delivery probed before: its due time while it is still pending.
_PROBE_KEPT = select(deliveries.c.not_before).where(
    deliveries.c.id == bindparam("id"),
    deliveries.c.destination == bindparam("destination"),
    delivery_in(deliveries, *PENDING),
)
# The rows are found by id; the status test only guards against another worker having taken
# one meanwhile. Wrapped in coalesce so no planner reads it as a way in: through the index of
# pending rows it would visit every one of them.
_TAKE = (
    update(deliveries)
    .where(
        deliveries.c.id.in_(bindparam("ids", expanding=True)),
        func.coalesce(deliveries.c.status, "") == DeliveryStatus.PENDING.value,
    )
    .values(
        status=DeliveryStatus.SENDING.value,
        lease_until=bindparam("_lease_until"),
        updated_at=bindparam("_now"),
    )
    .returning(*deliveries.c)
)


class Outbox:
    def __init__(self, store: MessageStore) -> None:
        self.store = store
        self.engine = store.engine
        self._sql = _WorkerSQL(store.is_sqlite)

    # -- routing --------------------------------------------------------------------------
    def next_run(self, message_id: int) -> int:
        """The number of the message's next routing run: 1 while it still waits for its
        first routing ('received'), else one past the highest run its steps or deliveries
        carry, and never below 2. A run that no route matched records no step, yet it was
        the first run: given 1 again, record_routing would drop the reprocess (it keeps a run
        1 only for a message still 'received'). A number an earlier run left no row under is
        safe to use again: no delivery key was made with it."""
        last_step = select(func.max(message_steps.c.run)).where(
            message_steps.c.message_id == message_id
        )
        last_delivery = select(func.max(deliveries.c.run)).where(
            deliveries.c.message_id == message_id
        )
        query = select(
            messages.c.status, last_step.scalar_subquery(), last_delivery.scalar_subquery()
        ).where(messages.c.id == message_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return 1
        status, last_step_run, last_delivery_run = row
        last = max(int(last_step_run or 0), int(last_delivery_run or 0))
        if status != MessageStatus.RECEIVED.value:
            last = max(last, 1)  # its first run is done, even one that recorded nothing
        return last + 1

    def record_routing(
        self,
        results: Iterable[RoutingResult],
        handover: Handover | None = None,
        places_taken: list[PlaceTaken] | None = None,
    ) -> list[int]:
        """Commit routing results in one transaction; returns the ids of messages recorded.

        A first run only applies to a message still 'received' (so a message queued twice is
        routed once); a reprocess (run > 1) applies whatever the status. Each table gets one
        multi-row statement per batch, not one per message. With a ``handover``, deliveries
        first in their line are leased to the caller at once (see Handover).

        A reprocess plans some deliveries under keys an earlier run already used (the notify
        step tells a recipient of a visit event once, whatever the run): those are left out,
        and taken off their route's result, so nobody is told the same thing twice. A
        reprocess delivery that an earlier run's delivery still waits to make (pending, or a
        dead letter) takes that delivery's place (_take_places; what happened is added to
        ``places_taken`` when given).
        """
        results = list(results)
        if not results:
            return []
        sql = self._sql
        moment = _now()
        now = sql.time(moment)
        with self.engine.begin() as conn:
            first_runs = [r.message_id for r in results if r.run == 1]
            eligible: set[int] = set()
            if first_runs:
                query = sql.eligible(len(first_runs))
                if not self.store.is_sqlite:
                    query += " FOR UPDATE"  # another worker may hold a copy
                eligible = {row[0] for row in conn.exec_driver_sql(query, tuple(first_runs))}
            chosen: dict[int, RoutingResult] = {}
            for result in results:
                if (result.run > 1 or result.message_id in eligible) and (
                    result.message_id not in chosen
                ):
                    chosen[result.message_id] = result
            if not chosen:
                return []
            # Every row is built before the first write: the write lock (SQLite's, and the
            # process's write gate) is then held only while the statements run, and intake's
            # commits wait that much less behind it.
            told: dict[int, dict[str, int]] = {}
            if any(result.run > 1 for result in chosen.values()):
                # Only a read: the status and steps written below then say what this run
                # queues, not what it planned.
                told = self._drop_known_deliveries(conn, chosen.values())
            statuses = {mid: _routing_status(r, told.get(mid)) for mid, r in chosen.items()}
            step_rows = [
                (
                    mid,
                    result.run,
                    s.route,
                    s.position,
                    s.step,
                    s.outcome,
                    s.encoded_output(),
                    now,
                )
                for mid, result in chosen.items()
                for s in result.steps
            ]
            if any(result.run > 1 for result in chosen.values()):
                taken = self._take_places(conn, [r for r in chosen.values() if r.run > 1], moment)
                if places_taken is not None:
                    places_taken.extend(taken)
                statuses.update(self._status_after_reprocess(conn, chosen.values(), statuses))
            status_rows = [
                (status.value, now, detail, mid) for mid, (status, detail) in statuses.items()
            ]
            event_rows = [
                (mid, now, status.value, detail) for mid, (status, detail) in statuses.items()
            ]
            planned = [
                (mid, result.run, d) for mid, result in chosen.items() for d in result.deliveries
            ]
            handed: list[int] = []  # positions in planned
            parked: set[int] = set()
            if planned:
                lines = ((_line_of(d), d.order_key) for _, _, d in planned)
                self._lock_lines(conn, _with_unscoped_lines(lines))
                handed, parked = self._place_in_line(conn, planned, handover)
            leased = set(handed)
            lease_until = sql.time(moment + handover.lease) if handover else None
            parked_at = sql.time(PARKED)
            delivery_rows = [
                _new_delivery_values(
                    d,
                    mid,
                    run,
                    now,
                    lease_until if i in leased else None,
                    parked_at if i in parked else None,
                )
                for i, (mid, run, d) in enumerate(planned)
            ]
            conn.exec_driver_sql(sql.set_message_status, status_rows)
            conn.exec_driver_sql(sql.add_events, event_rows)
            if step_rows:
                conn.exec_driver_sql(sql.add_steps, step_rows)
            if delivery_rows:
                conn.exec_driver_sql(sql.add_deliveries, delivery_rows)
            if parked:
                lines = {(_line_of(planned[i][2]), planned[i][2].order_key) for i in parked}
                self._recheck_parked(conn, lines, now)
            if handed:
                assert handover is not None
                handover.taken = self._handed_records(
                    conn, [planned[i] for i in handed], moment, moment + handover.lease
                )
        return list(chosen)

    def _status_after_reprocess(
        self,
        conn: Any,
        results: Iterable[RoutingResult],
        statuses: Mapping[int, tuple[MessageStatus, str | None]],
    ) -> dict[int, tuple[MessageStatus, str | None]]:
        """The status of each message whose reprocess run writes no delivery of its own
        (filtered, its destinations left out, its deliveries planned before or carried by an
        earlier one) and found no error: it follows the deliveries the message already has,
        the latest to each destination, as a finish settles it (delivered; failed for a dead
        letter; routed while one is still to make). A delivered message reprocessed for one
        destination whose route now filters it stays delivered. A message with no delivery at
        all keeps the run's own status (``statuses``: filtered, unrouted)."""
        idle = [r for r in results if r.run > 1 and not r.errors and not r.deliveries]
        if not idle:
            return {}
        ids = tuple(sorted(r.message_id for r in idle))
        if not self.store.is_sqlite:
            # A worker finishing one of these deliveries meanwhile settles the message after
            # this commit (it waits for the row), so it never leaves the status read here.
            conn.exec_driver_sql(
                f"SELECT id FROM messages WHERE id IN ({self._sql.marks(len(ids))}) "
                "ORDER BY id FOR UPDATE",
                ids,
            )
        latest: dict[int, dict[str, str]] = {}
        for message_id, status, _, key, _ in conn.exec_driver_sql(
            self._sql.delivery_statuses(len(ids)), ids
        ):
            latest.setdefault(message_id, {})[_same_delivery(key, message_id)] = status
        found: dict[int, tuple[MessageStatus, str | None]] = {}
        for result in idle:
            made = list(latest.get(result.message_id, {}).values())
            if not made:
                continue
            status, detail = statuses[result.message_id]
            waiting = sum(s in _UNFINISHED_VALUES for s in made)
            if waiting:
                if status is not MessageStatus.ROUTED:  # nothing of this run's own waits
                    found[result.message_id] = (
                        MessageStatus.ROUTED,
                        f"{detail}; {waiting} delivery(ies) of an earlier run still to make",
                    )
                continue
            matched = ", ".join(r.route for r in result.matched)
            said = f"routes {matched}; nothing new to deliver" if matched else "no route matched"
            settled, told = _settled(made, [])
            found[result.message_id] = (settled, f"{said}; {told}" if told else said)
        return found

    def _lock_lines(self, conn: Any, lines: Iterable[tuple[str, str]]) -> None:
        """PostgreSQL: hold these lines (line, patient) until the commit.

        Routing reads whether a line is stalled and writes its new delivery parked or due; a
        finish moves the line on and makes due what it sees parked in it. Run at the same
        moment on two workers, each read the other's work uncommitted: routing parked behind
        a head that was being delivered, the finish made due all but that row, and it waited
        for the sweep, up to a minute. Both hold the line instead, so the second waits for
        the first's commit and reads it. An operator's retry or discard of a dead letter
        holds its lines too, before it settles them, for the same race with routing; it does
        so after changing the dead letters, whose rows a reprocess's routing also locks
        before its lines, so the two never wait on each other. Taken in one order (sorted),
        so two batches never wait on each other; SQLite has one writer at a time, and routing
        there checks what it wrote parked once it holds the write lock (_recheck_parked)."""
        if self.store.is_sqlite:
            return
        keys = sorted({f"{line}\x1f{key}" for line, key in lines})
        if keys:
            conn.exec_driver_sql(self._sql.lock_lines, (keys,))

    def _recheck_parked(self, conn: Any, lines: Iterable[tuple[str, str]], now: Any) -> None:
        """SQLite: make due the deliveries just written parked in these lines that nothing
        stalls any more. Routing reads whether a line is stalled before its first write,
        outside SQLite's write lock (intake waits less behind it): a discard or retry of the
        dead letter, or a finish, committed by another process between that read and this
        write did not see the new row, which then waited for the sweep. After the write the
        lock is held and a read is current; only lines written parked pay for it. PostgreSQL
        holds the lines instead (_lock_lines)."""
        if not self.store.is_sqlite:
            return
        parked = self._sql.time(PARKED)
        rows = [(now, line, key, parked) for line, key in sorted(lines)]
        if rows:
            conn.exec_driver_sql(self._sql.unpark_line, rows)

    def _drop_known_deliveries(
        self, conn: Any, results: Iterable[RoutingResult]
    ) -> dict[int, dict[str, int]]:
        """Take off each route's result the deliveries whose idempotency key is already in the
        outbox (planned by an earlier run), and mark the step decisions that planned them
        suppressed ("told by run N"), so the run's record does not say it queued them.
        Returns, by message id, each key taken off and the run that made it."""
        results = list(results)
        keys = tuple({d.outgoing.idempotency_key for r in results for d in r.deliveries})
        if not keys:
            return {}
        known: dict[str, int] = {}
        for chunk in _chunks(list(keys), _IDS_PER_STATEMENT):
            query = select(deliveries.c.idempotency_key, deliveries.c.run).where(
                deliveries.c.idempotency_key.in_(chunk)
            )
            known.update({key: int(run) for key, run in conn.execute(query)})
        dropped: dict[int, dict[str, int]] = {}
        for result in results:
            for route in result.routes:
                for d in route.deliveries:
                    key = d.outgoing.idempotency_key
                    if key in known:
                        dropped.setdefault(result.message_id, {})[key] = known[key]
                route.deliveries = [
                    d for d in route.deliveries if d.outgoing.idempotency_key not in known
                ]
            if result.message_id in dropped:
                _mark_told(result, dropped[result.message_id])
        return dropped

    def _take_places(
        self, conn: Any, results: list[RoutingResult], now: datetime
    ) -> list[PlaceTaken]:
        """A reprocess run's deliveries that an earlier run's delivery of the same message to
        the same place (_same_delivery) has not made yet: the earlier row is rewritten to
        carry the new run's delivery, due now with a fresh set of attempts, and the new one
        is not written. It so keeps the earlier one's place in its patient's line: written as
        a new row it would queue behind the patient's later messages (an A03 delivered before
        the A01 it discharges, once the dead letter holding the line was discarded), and a
        pending earlier one would still go too, sending the message twice. One being sent
        right now is left to finish, and the new run's delivery is left out."""
        taken: list[PlaceTaken] = []
        lines: set[tuple[str, str]] = set()
        for result in results:
            wanted = {
                _same_delivery(d.outgoing.idempotency_key, result.message_id): (route, d)
                for route in result.routes
                for d in route.deliveries
            }
            if not wanted:
                continue
            earlier = conn.execute(
                select(deliveries.c.id, deliveries.c.idempotency_key, deliveries.c.status)
                .where(
                    deliveries.c.message_id == result.message_id,
                    deliveries.c.status.in_(_TAKEN_OVER),
                )
                .order_by(deliveries.c.id)
            ).all()
            for row in earlier:
                found = wanted.pop(_same_delivery(row.idempotency_key, result.message_id), None)
                if found is None:
                    continue
                route, planned = found
                route.deliveries = [d for d in route.deliveries if d is not planned]
                if row.status == DeliveryStatus.SENDING.value:
                    taken.append(PlaceTaken(result.message_id, row.id, row.status, False))
                    continue
                outgoing = planned.outgoing
                conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id == row.id, deliveries.c.status == row.status)
                    .values(
                        run=result.run,
                        route=planned.route,
                        channel=planned.channel,
                        idempotency_key=outgoing.idempotency_key,
                        payload=outgoing.payload,
                        content_type=outgoing.content_type,
                        metadata=_metadata_text(outgoing.metadata),
                        status=DeliveryStatus.PENDING.value,
                        attempts=0,
                        max_attempts=planned.max_attempts,
                        give_up_after=planned.give_up_after,
                        failing_since=None,
                        not_before=now,
                        lease_until=None,
                        holds_line=None,
                        updated_at=now,
                        line=_line_of(planned),
                    )
                )
                conn.execute(
                    insert(message_events),
                    {
                        "message_id": result.message_id,
                        "at": now,
                        "event": MessageStatus.ROUTED.value,
                        "detail": f"delivery #{row.id} ({row.status}) carries reprocess run "
                        f"{result.run}'s delivery to {planned.destination}, in its place",
                    },
                )
                taken.append(PlaceTaken(result.message_id, row.id, row.status, True))
                lines.add((_line_of(planned), planned.order_key))
        if lines:
            self._settle_lines(conn, lines, now)
        return taken

    def _place_in_line(
        self,
        conn: Any,
        planned: list[tuple[int, int, PlannedDelivery]],
        handover: Handover | None,
    ) -> tuple[list[int], set[int]]:
        """Positions of the planned deliveries that may be sent at once: first in their line
        (nothing unfinished or holding the line before them, in the store or earlier in this
        batch), to a destination the worker has room for, at most ``handover.room`` of them;
        and of those to write parked, as their line is stalled (see the module doc)."""
        destinations = tuple({d.destination for _, _, d in planned})
        lines = tuple({_line_of(d) for _, _, d in planned})
        keys = {d.order_key for _, _, d in planned}
        unscoped = {key: line for key in keys if (line := _unscoped_line(key)) is not None}
        asked = tuple(keys | {line for _, line in unscoped.values()})
        rows = conn.exec_driver_sql(
            self._sql.busy_lines(len(lines), len(asked), len(destinations)),
            (lines + asked) * 2 + destinations,
        )
        busy: set[tuple[str, str]] = set()
        stalled: set[tuple[str, str]] = set()
        paused: set[str] = set()
        for name, key, attempts in rows:
            if attempts == PAUSED_LINE:
                paused.add(name)  # a destination
                continue
            busy.add((name, key))
            if attempts:  # failed once and waiting, or a dead letter holding the line (-1)
                stalled.add((name, key))
        if unscoped:
            self._join_unscoped(conn, planned, unscoped, busy)
        room = handover.room if handover is not None else 0
        full = handover.full if handover is not None else frozenset()
        handed: list[int] = []
        parked: set[int] = set()
        for position, (_, _, d) in enumerate(planned):
            line = (_line_of(d), d.order_key)
            if line in stalled or d.destination in paused:
                parked.add(position)
                continue
            if line in busy:
                continue
            busy.add(line)  # whatever this one does, a later one in its line waits for it
            if len(handed) < room and d.destination not in full:
                handed.append(position)
        return handed, parked

    def _join_unscoped(
        self,
        conn: Any,
        planned: list[tuple[int, int, PlannedDelivery]],
        unscoped: dict[str, tuple[str, str]],
        busy: set[tuple[str, str]],
    ) -> None:
        """Put in their unscoped line (``|55501``) the planned deliveries whose own line
        (``GEN|55501``) is free while that one still holds a delivery of the same sender's
        patient, unfinished or dead and holding the line: routed before identifiers sent
        without an authority were keyed by their sending facility. So they wait behind it as
        they did before, and go on when it is retried or discarded; once it is empty, the
        patient's deliveries keep to their own line. What another facility's patient left in
        the unscoped line holds nothing of this one's."""
        joining = [
            d
            for _, _, d in planned
            if d.order_key in unscoped
            and (_line_of(d), d.order_key) not in busy
            and (_line_of(d), unscoped[d.order_key][1]) in busy
        ]
        if not joining:
            return
        lines = tuple({_line_of(d) for d in joining})
        keys = tuple({unscoped[d.order_key][1] for d in joining})
        rows = conn.exec_driver_sql(
            self._sql.line_senders(len(lines), len(keys)), (lines + keys) * 2
        )
        senders: dict[tuple[str, str], set[str | None]] = {}
        for line_name, key, facility, authority in rows:
            senders.setdefault((line_name, key), set()).add(scoped_authority(authority, facility))
        for d in joining:
            authority, line = unscoped[d.order_key]
            if authority in senders.get((_line_of(d), line), ()):
                d.order_key = line

    def _handed_records(
        self,
        conn: Any,
        handed: list[tuple[int, int, PlannedDelivery]],
        now: datetime,
        lease_until: datetime,
    ) -> list[DeliveryRecord]:
        """The records of deliveries just written leased: their ids from their keys."""
        keys = tuple(d.outgoing.idempotency_key for _, _, d in handed)
        ids = dict(conn.exec_driver_sql(self._sql.ids_by_key(len(keys)), keys).all())
        return [
            DeliveryRecord(
                id=ids[d.outgoing.idempotency_key],
                message_id=mid,
                run=run,
                route=d.route,
                destination=d.destination,
                channel=d.channel,
                idempotency_key=d.outgoing.idempotency_key,
                order_key=d.order_key,
                payload=d.outgoing.payload,
                content_type=d.outgoing.content_type,
                metadata=dict(d.outgoing.metadata),
                status=DeliveryStatus.SENDING.value,
                attempts=0,
                max_attempts=d.max_attempts,
                give_up_after=d.give_up_after,
                not_before=now,
                last_error=None,
                receipt=None,
                created_at=now,
                updated_at=now,
                lease_until=lease_until,
                line=_line_of(d),
            )
            for mid, run, d in handed
        ]

    def schedule(self, planned: PlannedDelivery, message_id: int, conn: Any = None) -> bool:
        """Put a delivery carehub decided on by itself (a digest, an overdue alert, a notice
        of an answer that came over HTTP) in the outbox, filed under ``message_id``. Its
        idempotency key makes this once-only: False when that key is already there."""
        key = planned.outgoing.idempotency_key
        try:
            with contextlib.ExitStack() as stack:
                if conn is None:
                    conn = stack.enter_context(self.engine.begin())
                exists = conn.execute(
                    select(deliveries.c.id).where(deliveries.c.idempotency_key == key)
                ).first()
                if exists is not None:
                    return False
                _, parked = self._place_in_line(conn, [(message_id, 0, planned)], None)
                now = self._sql.time(_now())
                row = _new_delivery_values(  # run 0
                    planned,
                    message_id,
                    0,
                    now,
                    not_before=self._sql.time(PARKED) if parked else None,
                )
                conn.exec_driver_sql(self._sql.add_deliveries, row)
                if parked:
                    self._recheck_parked(conn, [(_line_of(planned), planned.order_key)], now)
                return True
        except IntegrityError:  # another worker inserted the same key first: sent once
            return False

    def unrouted_message_ids(
        self, limit: int | None = None, received_before: datetime | None = None
    ) -> list[int]:
        """Messages stored and ACKed but not routed yet (re-queued on start)."""
        query = (
            select(messages.c.id)
            .where(messages.c.status == MessageStatus.RECEIVED.value)
            .order_by(messages.c.id)
        )
        if received_before is not None:
            query = query.where(messages.c.received_at < received_before)
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(query)]

    def steps(self, message_id: int) -> list[StepRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(message_steps)
                .where(message_steps.c.message_id == message_id)
                .order_by(message_steps.c.id)
            )
            return [
                StepRow(
                    r.run,
                    r.route,
                    r.position,
                    r.step,
                    r.outcome,
                    json.loads(r.output) if r.output else None,
                    _aware(r.at),
                )
                for r in rows
            ]

    # -- delivery -------------------------------------------------------------------------
    def claim_due(
        self,
        limit: int,
        lease: timedelta,
        now: datetime | None = None,
        exclude_destinations: list[str] | None = None,
        skip_ids: list[int] | None = None,
    ) -> list[DeliveryRecord]:
        """Take up to ``limit`` pending deliveries that are due and first in their line (their
        patient's, to their destination or the receiving system it shares a line to); they stay
        ours until the lease runs out.

        The query walks pending rows that are due, oldest due first (the partial index of
        pending rows by not_before, id), and stops at ``limit``, checking each candidate's
        place in line through the partial indexes of unfinished deliveries and of dead letters
        by (line, order_key, id): nothing unfinished before it, and no dead letter that
        holds the line. Rows waiting for a later retry, and rows parked behind a stalled line
        (see the module doc), are never read, so a down destination's backlog costs other
        destinations' claims nothing. Order within a patient's line comes from the
        place-in-line check, not the walk."""
        now = now or _now()
        candidates = _CLAIM_CANDIDATES[bool(exclude_destinations), bool(skip_ids)]
        params = {"now": now, "limit": limit, "exclude": exclude_destinations, "skip": skip_ids}
        with self.engine.begin() as conn:
            ids = [r[0] for r in conn.execute(candidates, params)]
            if not ids:
                return []
            taken = {"ids": ids, "_lease_until": now + lease, "_now": now}
            rows = conn.execute(_TAKE, taken).all()
        return sorted((_record(r) for r in rows), key=lambda d: d.id)

    def renew_leases(
        self, held: Mapping[int, datetime], lease: timedelta, now: datetime | None = None
    ) -> dict[int, datetime]:
        """Extend the leases of deliveries the caller holds (``held``: delivery id -> the
        lease it last wrote; Worker._lease_loop). Those finished or handed back meanwhile,
        or taken by another worker once their lease ran out, are left alone. Returns the new
        lease of each delivery renewed."""
        until = (now or _now()) + lease
        with self.engine.begin() as conn:
            still = self._still_held(conn, held)
            for chunk in _chunks(still, _IDS_PER_STATEMENT):
                conn.execute(
                    update(deliveries).where(deliveries.c.id.in_(chunk)).values(lease_until=until)
                )
        return dict.fromkeys(still, until)

    def _still_held(self, conn: Any, held: Mapping[int, datetime]) -> list[int]:
        """Of ``held`` (delivery id -> the lease the caller last wrote), those still being
        sent under that lease, locked until the commit (PostgreSQL). Once a lease runs out,
        another worker's sweep puts its delivery back in line and a claim leases it anew:
        whatever the first worker writes about it after that must be left out, or it would
        overwrite the second worker's send (hand it back, or finish it under its feet)."""
        still: list[int] = []
        query = _STILL_HELD if self.store.is_sqlite else _STILL_HELD_LOCKED
        for chunk in _chunks(sorted(held), _IDS_PER_STATEMENT):
            still.extend(
                delivery_id
                for delivery_id, until in conn.execute(query, {"ids": chunk})
                if until is not None and _aware(until) == held[delivery_id]
            )
        return still

    def release_expired_leases(self, now: datetime | None = None) -> int:
        """Deliveries whose worker stopped before finishing them go back in line."""
        now = now or _now()
        with self.engine.begin() as conn:
            return conn.execute(
                update(deliveries)
                .where(
                    delivery_in(deliveries, *UNFINISHED),  # reads the index of those
                    deliveries.c.status == DeliveryStatus.SENDING.value,
                    deliveries.c.lease_until < now,
                )
                .values(status=DeliveryStatus.PENDING.value, lease_until=None)
            ).rowcount

    def finish(self, results: list[AttemptResult]) -> list[int]:
        """Record attempts; returns ids of messages whose deliveries are now all finished.

        A result with a ``lease_until`` is recorded only if its delivery is still being sent
        under that lease (see _still_held); the others are left out, logged."""
        if not results:
            return []
        sql = self._sql
        now = sql.time(_now())
        leased = {r.delivery_id: r.lease_until for r in results if r.lease_until is not None}
        # Rows are built before the first write, so the write lock is held only while the
        # statements run (the lease check before it only reads).
        rows = self._finish_rows(results, now)
        with self.engine.begin() as conn:
            self._lock_lines(conn, ((_result_line(r), r.order_key) for r in results))
            lost = leased.keys() - set(self._still_held(conn, leased)) if leased else set()
            if lost:
                log.warning(
                    "%d attempt result(s) are not recorded: another worker took those "
                    "deliveries after their lease ran out",
                    len(lost),
                )
                results = [r for r in results if r.delivery_id not in lost]
                if not results:
                    return []
                rows = self._finish_rows(results, now)
            delivery_rows, attempt_rows, park, unpark = rows
            conn.exec_driver_sql(sql.record_attempt, delivery_rows)
            conn.exec_driver_sql(sql.add_attempts, attempt_rows)
            if park:
                conn.exec_driver_sql(sql.park_line, park)
            if unpark:
                conn.exec_driver_sql(sql.unpark_line, unpark)
            finished = self.settle_messages(conn, {r.message_id for r in results}, now)
        return finished

    def _finish_rows(
        self, results: list[AttemptResult], now: Any
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[Any], list[Any]]:
        """finish's rows: the deliveries' new state, their attempts, the lines to park and
        to unpark."""
        sql = self._sql
        delivery_rows = [
            (
                r.attempt - 1 if r.kept_on_schedule else r.attempt,
                r.max_attempts,
                r.give_up_after,
                sql.time(r.failing_since) if r.failing_since is not None else None,
                _final_status(r).value,
                r.detail if r.delivered or r.skipped else None,
                None if r.delivered or r.skipped else r.detail,
                None if r.delivered or r.skipped else r.loggable,
                sql.time(r.retry_at) if r.retry_at is not None else None,
                sql.time(r.started_at + timedelta(milliseconds=r.duration_ms))
                if r.delivered
                else None,
                r.holds_line if _final_status(r) is DeliveryStatus.DEAD else None,
                now,
                r.delivery_id,
            )
            for r in results
        ]
        attempt_rows = [
            (
                r.delivery_id,
                r.attempt,
                sql.time(r.started_at),
                r.duration_ms,
                _outcome(r),
                r.detail,
            )
            for r in results
        ]
        park, unpark = _line_moves(results, sql.time(PARKED), now)
        return delivery_rows, attempt_rows, park, unpark

    def settle_messages(self, conn: Any, message_ids: set[int], now: Any) -> list[int]:
        """Messages whose deliveries are all done become delivered, or failed if any died or
        a route raised in the latest run (the other routes finishing must not hide that; a
        step error cleared since, MessageStore.clear_step_problem, no longer counts). Of the
        deliveries a reprocess made again, only the latest counts (see _same_delivery). Runs
        in the caller's transaction (``conn``)."""
        by_message: dict[int, dict[str, str]] = {}
        routing_failed: set[int] = set()
        now_as: dict[int, tuple[str, str | None]] = {}  # each message's status and detail
        ids = tuple(sorted(message_ids))
        if not self.store.is_sqlite:
            # Two workers finishing deliveries of one message at the same moment would each
            # read the other's as still 'sending' (READ COMMITTED) and neither would settle
            # it. Locking the messages first makes the second wait for the first's commit;
            # its next read then sees both. Deliveries, then messages, in id order, as
            # retry_dead_letters locks them: no deadlock.
            conn.exec_driver_sql(
                f"SELECT id FROM messages WHERE id IN ({self._sql.marks(len(ids))}) "
                "ORDER BY id FOR UPDATE",
                ids,
            )
        rows = conn.exec_driver_sql(self._sql.delivery_statuses(len(ids)), ids)
        for message_id, status, message_status, key, message_detail in rows:
            by_message.setdefault(message_id, {})[_same_delivery(key, message_id)] = status
            now_as[message_id] = (message_status, message_detail)
            if message_status == MessageStatus.FAILED.value:
                routing_failed.add(message_id)
        done = {
            mid: list(latest.values())
            for mid, latest in by_message.items()
            if not any(s in _UNFINISHED_VALUES for s in latest.values())
        }
        if not done:
            return []
        # Only a message already marked failed can have a route that raised (routing marks it
        # so); the others skip the two step queries.
        suspects = [mid for mid in done if mid in routing_failed]
        errors = _route_errors(conn, suspects) if suspects else {}
        changes = []
        for message_id, statuses in sorted(done.items()):
            status, detail = _settled(statuses, errors.get(message_id, []))
            changes.append((message_id, status.value, detail))
        # A message that already says this (failed by its route when routed, and its other
        # deliveries now made) keeps its row as it is: its history tells each change once.
        news = [c for c in changes if now_as.get(c[0]) != (c[1], c[2])]
        sql = self._sql
        if news:
            conn.exec_driver_sql(
                sql.set_message_status, [(status, now, detail, mid) for mid, status, detail in news]
            )
            conn.exec_driver_sql(
                sql.add_events, [(mid, now, status, detail) for mid, status, detail in news]
            )
        return [mid for mid, _, _ in changes]

    def release(self, held: Mapping[int, datetime]) -> int:
        """Hand deliveries back unsent (``held``: delivery id -> the lease the caller last
        wrote), those still being sent under that lease (see _still_held). How many."""
        if not held:
            return 0
        with self.engine.begin() as conn:
            still = self._still_held(conn, held)
            for chunk in _chunks(still, _IDS_PER_STATEMENT):
                conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id.in_(chunk))
                    .values(status=DeliveryStatus.PENDING.value, lease_until=None)
                )
        return len(still)

    def release_leases(self) -> int:
        """Put deliveries claimed by a process that is gone back in line (single-host start)."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(deliveries)
                .where(
                    delivery_in(deliveries, *UNFINISHED),  # reads the index of those
                    deliveries.c.status == DeliveryStatus.SENDING.value,
                )
                .values(status=DeliveryStatus.PENDING.value, lease_until=None)
            ).rowcount

    def unfinished(self, route: str | None = None) -> int:
        """Messages not routed yet plus deliveries pending or being sent (of ``route`` only,
        when given): 0 once everything received so far has been dealt with.

        One statement, so one snapshot: asked one after another, "nothing pending" can be
        read before a message is routed and "nothing unrouted" after, and the pair looks idle
        while the new delivery waits."""
        in_flight = select(func.count()).select_from(deliveries)
        in_flight = in_flight.where(delivery_in(deliveries, *UNFINISHED))
        if route is not None:
            in_flight = in_flight.where(deliveries.c.route == route)
        unrouted = select(func.count()).select_from(messages)
        unrouted = unrouted.where(messages.c.status == MessageStatus.RECEIVED.value)
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(unrouted.scalar_subquery() + in_flight.scalar_subquery())
                ).scalar_one()
            )

    def count_by_status(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(deliveries.c.status, func.count()).group_by(deliveries.c.status)
            )
            return {status: count for status, count in rows}

    # -- browsing and dead letters --------------------------------------------------------
    def find(
        self,
        *,
        status: str | None = None,
        message_id: int | None = None,
        destination: str | None = None,
        limit: int | None = 100,
    ) -> list[DeliveryRecord]:
        query = _matching(select(deliveries, _EARLY_COUNT), status, message_id, destination)
        query = query.order_by(deliveries.c.id)
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [_record(r) for r in conn.execute(query)]

    def count(
        self,
        *,
        status: str | None = None,
        message_id: int | None = None,
        destination: str | None = None,
    ) -> int:
        """How many ``find`` would return without its limit: a list cut at --limit says so."""
        query = _matching(
            select(func.count()).select_from(deliveries), status, message_id, destination
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def delivered_destinations(self, message_id: int) -> set[str]:
        """The destinations that have delivered the message, in any routing run."""
        query = select(deliveries.c.destination).where(
            deliveries.c.message_id == message_id,
            deliveries.c.status == DeliveryStatus.DELIVERED.value,
        )
        with self.engine.connect() as conn:
            return set(conn.execute(query).scalars())

    def discarded_destinations(self, message_id: int) -> set[str]:
        """The destinations where an operator gave up on the message for good (discarded its
        dead letter) and no later run has delivered it."""
        query = select(deliveries.c.destination).where(
            deliveries.c.message_id == message_id,
            delivery_in(deliveries, DeliveryStatus.DISCARDED),
        )
        with self.engine.connect() as conn:
            discarded = set(conn.execute(query).scalars())
        return discarded - self.delivered_destinations(message_id)

    def later_delivered(
        self,
        message_id: int,
        destinations: set[str],
        lines: Mapping[str, str] | None = None,
    ) -> dict[str, int]:
        """For each destination, how many later messages of the same patient (higher ids) it
        has already been delivered, it or the forwards it shares its line with (``lines``:
        destination -> line, as Destination.line): a message sent there now arrives after
        them. The patient is keyed as everywhere in the store (store.scoped_authority): an
        identifier without an authority is its sending facility's, so two hospitals' 55501
        are two patients, and a row stored before such identifiers were scoped (no
        authority) is its sender's."""
        if not destinations:
            return {}
        lines = lines or {}
        line_of = {name: lines.get(name, name) for name in destinations}
        asked = set(line_of.values())
        members = {name for name, line in lines.items() if line in asked} | set(destinations)
        with self.engine.connect() as conn:
            patient = conn.execute(
                select(
                    messages.c.patient_id, messages.c.patient_authority, messages.c.sending_facility
                ).where(messages.c.id == message_id)
            ).first()
            if patient is None or not patient.patient_id:
                return {}
            scope = scoped_authority(patient.patient_authority, patient.sending_facility)
            authority = messages.c.patient_authority
            # Rows stored before scoping hold no authority: read each through scoped_authority.
            same_or_unscoped = [authority == "", authority.is_(None)]
            if scope is not None:
                same_or_unscoped.append(authority == scope)
            query = (
                select(
                    deliveries.c.destination,
                    deliveries.c.line,
                    messages.c.id,
                    messages.c.patient_authority,
                    messages.c.sending_facility,
                )
                .distinct()
                .select_from(deliveries.join(messages, messages.c.id == deliveries.c.message_id))
                .where(
                    or_(
                        deliveries.c.destination.in_(sorted(members)),
                        deliveries.c.line.in_(sorted(asked)),
                    ),
                    deliveries.c.status == DeliveryStatus.DELIVERED.value,
                    messages.c.id > message_id,
                    messages.c.patient_id == patient.patient_id,
                    or_(*same_or_unscoped),
                )
            )
            later: dict[str, set[int]] = {}
            for destination, line, later_id, later_authority, facility in conn.execute(query):
                if scoped_authority(later_authority, facility) != scope:
                    continue
                # The line the routes give its destination now; else the one it went out in.
                went = lines.get(destination) or line or destination
                for name in destinations:
                    if name == destination or line_of[name] == went:
                        later.setdefault(name, set()).add(later_id)
        return {destination: len(ids) for destination, ids in later.items()}

    def get(self, delivery_id: int) -> DeliveryRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(deliveries, _EARLY_COUNT).where(deliveries.c.id == delivery_id)
            ).first()
        return _record(row) if row else None

    def attempts(self, delivery_id: int) -> list[AttemptRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(delivery_attempts)
                .where(delivery_attempts.c.delivery_id == delivery_id)
                .order_by(delivery_attempts.c.id)
            )
            return [
                AttemptRow(r.number, _aware(r.started_at), r.duration_ms, r.outcome, r.detail)
                for r in rows
            ]

    def statuses(self, delivery_ids: list[int]) -> dict[int, str]:
        """The status of each delivery id that exists."""
        query = select(deliveries.c.id, deliveries.c.status).where(
            deliveries.c.id.in_(delivery_ids)
        )
        with self.engine.connect() as conn:
            return {row.id: row.status for row in conn.execute(query)}

    def dead_by_destination(self) -> dict[str, int]:
        """How many dead letters each destination has."""
        query = (
            select(deliveries.c.destination, func.count())
            .where(delivery_in(deliveries, DeliveryStatus.DEAD))
            .group_by(deliveries.c.destination)
        )
        with self.engine.connect() as conn:
            return {destination: count for destination, count in conn.execute(query)}

    def retry_dead(self, delivery_ids: list[int] | None, destination: str | None = None) -> int:
        """Give dead letters a fresh set of attempts: those named, or every one (of one
        destination, when given) when ids is None. Returns how many (see retry_dead_letters)."""
        return self.retry_dead_letters(delivery_ids, destination).count

    def retry_dead_letters(
        self, delivery_ids: list[int] | None, destination: str | None = None
    ) -> LineReport:
        """Give dead letters a fresh set of attempts, as retry_dead; the deliveries held
        behind them follow them in their lines' order, and the report says how many, and how
        many later ones of those lines had already been delivered before them."""
        now = _now()
        chosen = _dead_letters_chosen(delivery_ids, destination)
        with self.engine.begin() as conn:
            dead = self._dead_letters(conn, chosen)
            overtaken = self._overtaken(conn, dead)
            # Run even when nothing matched: a store that refuses writes says so.
            conn.execute(
                update(deliveries)
                .where(*chosen)
                .values(
                    status=DeliveryStatus.PENDING.value,
                    attempts=0,
                    failing_since=None,
                    not_before=now,
                    updated_at=now,
                    lease_until=None,
                    holds_line=None,
                )
            )
            if not dead:
                return LineReport(0, 0, 0)
            lines = {(row.line or row.destination, row.order_key) for row in dead}
            self._lock_lines(conn, lines)  # before settling them: see _lock_lines
            released = self._settle_lines(conn, lines, now)
            detail = "dead letters queued again"
            for message_id in sorted({row.message_id for row in dead}):
                conn.execute(
                    update(messages)
                    .where(messages.c.id == message_id)
                    .values(status=MessageStatus.ROUTED.value, status_at=now, detail=detail)
                )
                conn.execute(
                    insert(message_events),
                    {
                        "message_id": message_id,
                        "at": now,
                        "event": MessageStatus.ROUTED.value,
                        "detail": detail,
                    },
                )
        return LineReport(len(dead), len(lines), released, sum(overtaken.values()), len(overtaken))

    def discard_dead_letters(
        self,
        delivery_ids: list[int] | None,
        destination: str | None = None,
        *,
        by: str,
        reason: str | None = None,
    ) -> LineReport:
        """Give up on dead letters for good: those named, or every one of ``destination``.
        Each stays in the store, status discarded, with an attempt row and a message event
        saying who (``by``) and when; it no longer holds its line, so what waited behind it
        goes on. Never sent again: a discarded delivery is not a dead letter any more."""
        now = _now()
        detail = f"discarded by {by} (carehub dead-letters discard)" + (
            f": {reason}" if reason else ""
        )
        chosen = _dead_letters_chosen(delivery_ids, destination)
        with self.engine.begin() as conn:
            dead = self._dead_letters(conn, chosen)
            conn.execute(  # even when nothing matched: a store that refuses writes says so
                update(deliveries)
                .where(*chosen)
                .values(
                    status=DeliveryStatus.DISCARDED.value,
                    updated_at=now,
                    lease_until=None,
                    holds_line=None,
                )
            )
            if not dead:
                return LineReport(0, 0, 0)
            lines = {(row.line or row.destination, row.order_key) for row in dead}
            self._lock_lines(conn, lines)  # before settling them: see _lock_lines
            conn.execute(
                insert(delivery_attempts),
                [
                    {
                        "delivery_id": row.id,
                        "number": row.attempts,
                        "started_at": now,
                        "duration_ms": 0,
                        "outcome": DeliveryStatus.DISCARDED.value,
                        "detail": detail,
                    }
                    for row in dead
                ],
            )
            by_message: dict[int, list[int]] = {}
            for row in dead:
                by_message.setdefault(row.message_id, []).append(row.id)
            conn.execute(
                insert(message_events),
                [
                    {
                        "message_id": message_id,
                        "at": now,
                        "event": DeliveryStatus.DISCARDED.value,
                        "detail": f"dead letter(s) {', '.join(f'#{i}' for i in ids)} {detail}",
                    }
                    for message_id, ids in sorted(by_message.items())
                ],
            )
            released = self._settle_lines(conn, lines, now)
        return LineReport(len(dead), len(lines), released)

    def discards(self, delivery_ids: list[int]) -> dict[int, Discard]:
        """Who discarded each of these deliveries, when and why, from the attempt row the
        discard wrote; a delivery never discarded is left out."""
        attempts = delivery_attempts.c
        found: dict[int, Discard] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(delivery_ids):
                query = (
                    select(attempts.delivery_id, attempts.started_at, attempts.detail)
                    .where(
                        attempts.delivery_id.in_(chunk),
                        attempts.outcome == DeliveryStatus.DISCARDED.value,
                    )
                    .order_by(attempts.id)
                )
                for row in conn.execute(query):
                    recorded = _DISCARD_DETAIL.fullmatch(row.detail or "")
                    if recorded is None:  # not in discard's words: keep what was written
                        by, reason = None, row.detail
                    else:
                        by, reason = recorded["by"], recorded["reason"]
                    found[row.delivery_id] = Discard(_aware(row.started_at), by, reason)
        return found

    def _dead_letters(self, conn: Any, chosen: list[Any]) -> list[Any]:
        """The dead letters chosen (_dead_letters_chosen): id, message_id, destination,
        line, order_key, attempts; oldest first."""
        query = (
            select(
                deliveries.c.id,
                deliveries.c.message_id,
                deliveries.c.destination,
                deliveries.c.line,
                deliveries.c.order_key,
                deliveries.c.attempts,
            )
            .where(*chosen)
            .order_by(deliveries.c.id)
        )
        return list(conn.execute(query).all())

    def _settle_lines(self, conn: Any, lines: Iterable[tuple[str, str]], now: datetime) -> int:
        """Park what a stalled delivery is before in these lines, make due what nothing stalls
        any more; returns how many were made due."""
        sql = self._sql
        parked, at = sql.time(PARKED), sql.time(now)
        released = 0
        for line, key in sorted(lines):
            conn.exec_driver_sql(sql.park_behind, (parked, line, key, parked))
            released += conn.exec_driver_sql(sql.unpark_line, (at, line, key, parked)).rowcount
        return released

    def _overtaken(self, conn: Any, dead: list[Any]) -> dict[tuple[str, str], int]:
        """For each line of these dead letters, how many later deliveries of it were already
        delivered (sent before lines were held, or with ``continue``). Read through the
        patient's messages (the patient index, then each message's deliveries), as the outbox
        keeps no index of delivered rows by line: the deliveries planned for the dead
        letters' patient, as the store's messages name the patient. A delivery finished
        before lines had their own column is in its destination's line."""
        first: dict[tuple[str, str], Any] = {}
        for row in dead:
            first.setdefault((row.line or row.destination, row.order_key), row)
        patients = {
            row.id: (row.patient_id, row.patient_authority)
            for chunk in _chunks([row.message_id for row in first.values()])
            for row in conn.execute(
                select(messages.c.id, messages.c.patient_id, messages.c.patient_authority).where(
                    messages.c.id.in_(chunk)
                )
            )
        }
        found: dict[tuple[str, str], int] = {}
        for line, row in first.items():
            patient_id, authority = patients.get(row.message_id, (None, None))
            query = (
                select(func.count())
                .select_from(deliveries.join(messages, messages.c.id == deliveries.c.message_id))
                .where(
                    func.coalesce(deliveries.c.line, deliveries.c.destination) == line[0],
                    deliveries.c.order_key == line[1],
                    deliveries.c.id > row.id,
                    deliveries.c.status == DeliveryStatus.DELIVERED.value,
                )
            )
            if patient_id is None:  # a message without a patient is its own line
                query = query.where(messages.c.id == row.message_id)
            else:
                query = query.where(
                    messages.c.patient_id == patient_id,
                    messages.c.patient_authority == authority
                    if authority is not None
                    else messages.c.patient_authority.is_(None),
                )
            count = int(conn.execute(query).scalar_one())
            if count:
                found[line] = count
        return found

    def waiting_behind(self, delivery_ids: list[int]) -> dict[int, int]:
        """For each of these dead letters, how many deliveries of its line wait after it."""
        if not delivery_ids:
            return {}
        dead, waiting = aliased(deliveries), aliased(deliveries)
        found: dict[int, int] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(delivery_ids):
                query = (
                    select(dead.c.id, func.count(waiting.c.id))
                    .select_from(_waiting_behind(dead, waiting))
                    .where(dead.c.id.in_(chunk))
                    .group_by(dead.c.id)
                )
                found.update({delivery_id: count for delivery_id, count in conn.execute(query)})
        return found

    def holding(self, delivery_ids: list[int]) -> dict[int, list[tuple[int, int, str]]]:
        """For each of these deliveries that waits behind dead letters holding its line, those
        dead letters, oldest first, as (delivery id, message id, destination): read as
        waiting_behind and held_counts count it, so what `messages show` says holds it is
        what `dead-letters list` counts it against."""
        dead, waiting = aliased(deliveries), aliased(deliveries)
        found: dict[int, list[tuple[int, int, str]]] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(delivery_ids):
                query = (
                    select(waiting.c.id, dead.c.id, dead.c.message_id, dead.c.destination)
                    .select_from(_waiting_behind(dead, waiting))
                    .where(
                        waiting.c.id.in_(chunk),
                        delivery_in(dead, DeliveryStatus.DEAD),
                        dead.c.holds_line.is_(True),
                    )
                    .order_by(dead.c.id)
                )
                for delivery_id, dead_id, message_id, destination in conn.execute(query):
                    found.setdefault(delivery_id, []).append((dead_id, message_id, destination))
        return found

    def held(self) -> dict[tuple[str, str], int]:
        """Deliveries waiting behind a dead letter that holds their line, by (destination,
        channel); see held_counts."""
        with self.engine.connect() as conn:
            return held_counts(conn)

    def apply_line_policy(
        self,
        holding: Iterable[str],
        going_on: Iterable[str],
        lines: Mapping[str, str] | None = None,
    ) -> int:
        """Put the deliveries still in play of each destination in ``lines`` (destination ->
        its line, RouteTable.lines) in that line (_move_to_lines), and give the dead letters of
        these destinations their setting as the routes have it now
        (``retry.after_dead_letter``), so a changed setting applies to dead letters made
        before it, and those from before lines were held get one; then settle every line
        (tidy_lines). Returns how many dead letters changed."""
        changed = 0
        with self.engine.begin() as conn:
            moved = self._move_to_lines(conn, lines) if lines else 0
            for names, flag in ((sorted(set(holding)), True), (sorted(set(going_on)), False)):
                for chunk in _chunks(names):
                    changed += conn.execute(
                        update(deliveries)
                        .where(
                            delivery_in(deliveries, DeliveryStatus.DEAD),
                            deliveries.c.destination.in_(chunk),
                            deliveries.c.holds_line.is_not(flag),  # NULL too
                        )
                        .values(holds_line=flag)
                    ).rowcount
        if moved:
            log.info(
                "%d delivery(ies) waiting or dead moved into the line the routes give their "
                "destination now (forwards that reach one receiving system share one)",
                moved,
            )
        self.tidy_lines()
        return changed

    def _move_to_lines(self, conn: Any, lines: Mapping[str, str]) -> int:
        """Give the deliveries still in play (waiting, being sent, dead letters) of each
        destination named the line ``lines`` gives it, as the routes loaded now share lines:
        after an upgrade, or routes whose forwards now reach one receiving system, or no
        longer. A line keeps its order by id, the order routing wrote them in, so deliveries
        that join a shared line take their places in it as they were routed, each line's in
        its own order, and a line split in two keeps its order in each. The sweep (here,
        apply_line_policy's tidy_lines) parks what now waits behind a stalled delivery and
        frees what no longer does. Finished deliveries keep the line they went out in.
        Returns how many moved."""
        by_line: dict[str, list[str]] = {}
        for destination, line in lines.items():
            by_line.setdefault(line, []).append(destination)
        moved = 0
        for line, names in sorted(by_line.items()):
            for chunk in _chunks(sorted(names)):
                # One statement per partial index (unfinished, dead), each read through it.
                for statuses in (UNFINISHED, (DeliveryStatus.DEAD,)):
                    moved += conn.execute(
                        update(deliveries)
                        .where(
                            delivery_in(deliveries, *statuses),
                            deliveries.c.destination.in_(chunk),
                            deliveries.c.line.is_distinct_from(line),
                        )
                        .values(line=line)
                    ).rowcount
        return moved

    def apply_retry_limits(self, limits: Mapping[str, tuple[int, int]]) -> int:
        """Give the waiting deliveries (pending or being sent) of each destination in
        ``limits`` (destination -> its ``retry.max_attempts`` and ``retry.give_up_seconds``
        as the routes have them now) those limits, the ones the worker counts their next
        attempts against, so what `messages show` prints of them is what applies. A dead
        letter keeps the limits it reached (a retry starts it again under those in force).
        Returns how many changed."""
        by_limit: dict[tuple[int, int], list[str]] = {}
        for destination, limit in limits.items():
            by_limit.setdefault(limit, []).append(destination)
        changed = 0
        with self.engine.begin() as conn:
            for (max_attempts, give_up_after), names in sorted(by_limit.items()):
                for chunk in _chunks(sorted(names)):
                    changed += conn.execute(
                        update(deliveries)
                        .where(
                            delivery_in(deliveries, *UNFINISHED),
                            deliveries.c.destination.in_(chunk),
                            or_(
                                deliveries.c.max_attempts != max_attempts,
                                func.coalesce(deliveries.c.give_up_after, 0) != give_up_after,
                            ),
                        )
                        .values(max_attempts=max_attempts, give_up_after=give_up_after)
                    ).rowcount
        return changed

    # -- pausing a destination -------------------------------------------------------------
    def pause_destination(
        self, destination: str, channel: str | None, *, by: str, reason: str | None = None
    ) -> PauseReport:
        """Stop sending to ``destination`` on every worker, keep routing to it: its waiting
        deliveries are parked (attempts and retry times stop where they are) and new ones
        are written parked. A destination already paused keeps its first pause's record."""
        sql = self._sql
        now = _now()
        parked = sql.time(PARKED)
        with self.engine.begin() as conn:
            current = self._pause_of(conn, destination)
            if current is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            insert(paused_destinations).values(
                                destination=destination,
                                channel=channel,
                                paused_at=now,
                                paused_by=by,
                                reason=reason,
                            )
                        )
                except IntegrityError:  # another operator paused it a moment ago
                    current = self._pause_of(conn, destination)
            moved = conn.exec_driver_sql(
                sql.park_destination, (parked, destination, parked)
            ).rowcount
            waiting = int(conn.exec_driver_sql(sql.count_waiting, (destination,)).scalar_one())
            pause = current or PausedDestination(destination, channel, now, by, reason)
        return PauseReport(current is None, waiting, moved, pause)

    def resume_destination(self, destination: str) -> PauseReport:
        """Send to a paused destination again: its parked deliveries become due, each line
        in order (a line stalled by a retry or a dead letter stays so)."""
        sql = self._sql
        with self.engine.begin() as conn:
            current = self._pause_of(conn, destination)
            conn.execute(
                paused_destinations.delete().where(paused_destinations.c.destination == destination)
            )
            moved = conn.exec_driver_sql(
                sql.unpark_destination, (sql.time(_now()), destination, sql.time(PARKED))
            ).rowcount
            waiting = int(conn.exec_driver_sql(sql.count_waiting, (destination,)).scalar_one())
        return PauseReport(current is not None, waiting, moved, current)

    def claim_early(
        self, destination: str, limit: int, lease: timedelta, now: datetime | None = None
    ) -> list[DeliveryRecord]:
        """Lease up to ``limit`` of ``destination``'s deliveries waiting out a retry delay,
        before their time: it has just taken a delivery again after failing. Without this, with
        a retry delay of up to ``max_delay`` (15 minutes in the sample routes), each patient's
        line waited that long behind its head after the receiver was back. Their retry times
        are left as they are, so each record says its attempt is early (``not_before`` after
        the send starts: AttemptResult.early), and one that fails again waits for that time
        still. First in their line only, as claim_due; parked ones follow as their heads go."""
        now = now or _now()
        params = {"destination": destination, "now": now, "limit": limit}
        with self.engine.begin() as conn:
            ids = [r[0] for r in conn.execute(_EARLY_CANDIDATES, params)]
            if not ids:
                return []
            taken = {"ids": ids, "_lease_until": now + lease, "_now": now}
            rows = conn.execute(_TAKE, taken).all()
        return sorted((_record(r) for r in rows), key=lambda d: d.id)

    def claim_probe(
        self,
        destination: str,
        lease: timedelta,
        prefer: int | None = None,
        now: datetime | None = None,
    ) -> DeliveryRecord | datetime | None:
        """Lease one due delivery of ``destination`` to try while its worker takes it for down
        (the worker's breaker: its other deliveries are left unclaimed meanwhile): the first
        due and first in its line, or ``prefer`` (a probe whose turn was handed back before it
        was sent) while it is pending and due. Returns the delivery leased; while ``prefer``
        waits out its retry delay, when it is due; else None."""
        now = now or _now()
        with self.engine.begin() as conn:
            params: dict[str, Any] = {"destination": destination, "now": now, "id": prefer}
            ids: list[int] = []
            if prefer is not None:
                due = conn.execute(_PROBE_KEPT, params).scalar_one_or_none()
                if due is not None and _aware(due) > now:
                    return _aware(due)
                if due is not None:
                    ids = [r[0] for r in conn.execute(_PROBE_CANDIDATES[True], params)]
            if not ids:
                ids = [r[0] for r in conn.execute(_PROBE_CANDIDATES[False], params)]
            if not ids:
                return None
            taken = {"ids": ids, "_lease_until": now + lease, "_now": now}
            rows = conn.execute(_TAKE, taken).all()
        return _record(rows[0]) if rows else None

    def waiting_for(self, destination: str) -> int:
        """How many deliveries to ``destination`` are pending or being sent."""
        with self.engine.connect() as conn:
            return int(conn.exec_driver_sql(self._sql.count_waiting, (destination,)).scalar_one())

    def paused(self) -> list[PausedDestination]:
        """Every paused destination, by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(paused_destinations).order_by(paused_destinations.c.destination)
            )
            return [_pause(row) for row in rows]

    def paused_names(self) -> frozenset[str]:
        """The names of the paused destinations (what a worker checks its hand against)."""
        with self.engine.connect() as conn:
            return frozenset(conn.execute(select(paused_destinations.c.destination)).scalars())

    def _pause_of(self, conn: Any, destination: str) -> PausedDestination | None:
        row = conn.execute(
            select(paused_destinations).where(paused_destinations.c.destination == destination)
        ).first()
        return _pause(row) if row is not None else None

    def tidy_lines(self, now: datetime | None = None) -> tuple[int, int]:
        """Park the due deliveries a stalled delivery is before, and make due the parked ones
        nothing stalls any more; returns (parked, made due). Parking as lines stall and move
        is done as it happens (finish, routing, retry, discard): this mends what a race
        between workers on PostgreSQL, a pruned dead letter or a changed setting left."""
        sql = self._sql
        at, parked = sql.time(now or _now()), sql.time(PARKED)
        with self.engine.connect() as conn:
            to_park = [row[0] for row in conn.exec_driver_sql(sql.stalled_due, (at,))]
            to_free = [row[0] for row in conn.exec_driver_sql(sql.stale_parked, (parked,))]
        newly = freed = 0
        if to_park or to_free:
            with self.engine.begin() as conn:
                for chunk in _chunks(to_park):
                    query = sql.set_due(len(chunk), stalled=True)
                    newly += conn.exec_driver_sql(query, (parked, *chunk)).rowcount
                for chunk in _chunks(to_free):
                    query = sql.set_due(len(chunk), stalled=False)
                    freed += conn.exec_driver_sql(query, (at, *chunk)).rowcount
        return newly, freed


def _pause(row: Any) -> PausedDestination:
    return PausedDestination(
        row.destination, row.channel, _aware(row.paused_at), row.paused_by, row.reason
    )


def _waiting_behind(dead: Any, waiting: Any) -> Any:
    """``dead`` joined to the unfinished deliveries after it in its line (same line and
    patient), ``waiting``: what a dead letter keeps back."""
    return dead.join(
        waiting,
        and_(
            waiting.c.line == dead.c.line,
            waiting.c.order_key == dead.c.order_key,
            delivery_in(waiting, *UNFINISHED),
            waiting.c.id > dead.c.id,
        ),
    )


def _held_query() -> Select[Any]:
    """See held_counts; built once (see _LATEST_RUNS for why)."""
    dead, waiting = aliased(deliveries), aliased(deliveries)
    return (
        select(waiting.c.destination, waiting.c.channel, func.count(func.distinct(waiting.c.id)))
        .select_from(_waiting_behind(dead, waiting))
        .where(delivery_in(dead, DeliveryStatus.DEAD), dead.c.holds_line.is_(True))
        .group_by(waiting.c.destination, waiting.c.channel)
    )


_HELD = _held_query()


def held_counts(conn: Any) -> dict[tuple[str, str], int]:
    """Deliveries waiting (pending or being sent) behind a dead letter that holds their line,
    by (destination, channel). Read from the dead letters (their partial index by line), each
    joined to the unfinished deliveries after it in its line: no walk of the outbox."""
    return {(destination, channel): count for destination, channel, count in conn.execute(_HELD)}


def _dead_letters_chosen(delivery_ids: list[int] | None, destination: str | None) -> list[Any]:
    """The conditions for the dead letters named (ids), or every one of ``destination``, or
    every one: read through the dead letters' partial index."""
    chosen = [delivery_in(deliveries, DeliveryStatus.DEAD)]
    if delivery_ids is not None:
        chosen.append(deliveries.c.id.in_(delivery_ids))
    if destination is not None:
        chosen.append(deliveries.c.destination == destination)
    return chosen


def _chunks(values: list[Any], size: int = 500) -> list[list[Any]]:
    """A long IN list in pieces (SQLite's parameter limit, PostgreSQL's plan size)."""
    return [values[start : start + size] for start in range(0, len(values), size)]


def _route_errors(conn: Any, message_ids: list[int]) -> dict[int, list[str]]:
    """ "route: error" for each route that raised in each message's latest routing run."""
    latest = dict(conn.execute(_LATEST_RUNS, {"ids": message_ids}).all())
    rows = conn.execute(_FAILED_STEPS, {"ids": message_ids})
    found: dict[int, list[str]] = {}
    for message_id, run, route, output in rows:
        if run == latest.get(message_id):
            text = json.loads(output) if output else ""
            found.setdefault(message_id, []).append(f"{route}: {text}")
    return found


def _mark_told(result: RoutingResult, told: Mapping[str, int]) -> None:
    """Mark "suppressed" each step decision whose delivery key an earlier run made (``told``:
    key -> that run): the step's output then says what was left out, and by whom told."""
    for step in result.steps:
        output = step.output
        changed = False
        for decision in output if isinstance(output, list) else []:
            if not isinstance(decision, dict) or decision.get("status") != "queued":
                continue
            run = told.get(decision.get("delivery_key") or "")
            if run is not None:
                decision.update(status="suppressed", reason=f"told by run {run}", told_by_run=run)
                changed = True
        if changed:
            step.output_json = None  # encoded again from the marked output


def _told_text(told: Mapping[str, int] | None) -> str:
    """``, 1 suppressed (told by run 1)``; empty when nothing was."""
    if not told:
        return ""
    runs = ", ".join(str(run) for run in sorted(set(told.values())))
    return f", {len(told)} suppressed (told by run {runs})"


def _routing_status(
    result: RoutingResult, told: Mapping[str, int] | None = None
) -> tuple[MessageStatus, str | None]:
    """The status a routing run gives its message: failed for a route error, unrouted when
    no route matched, filtered when routes matched and planned nothing (a filter stopped
    them, or they forward nothing): final, as nothing is left to send; else routed until its
    deliveries are made (settle_messages). A reprocess run that writes no delivery may take
    its status from earlier runs' deliveries instead (Outbox._status_after_reprocess)."""
    if result.errors:
        return MessageStatus.FAILED, "; ".join(result.errors)
    matched = [r.route for r in result.matched]
    if not matched:
        return MessageStatus.UNROUTED, "no route matched"
    if not result.deliveries:
        return (
            MessageStatus.FILTERED,
            f"routes {', '.join(matched)}; nothing to deliver{_told_text(told)}",
        )
    return (
        MessageStatus.ROUTED,
        f"routes {', '.join(matched)}; {len(result.deliveries)} deliveries{_told_text(told)}",
    )


def _settled(statuses: list[str], failures: list[str]) -> tuple[MessageStatus, str | None]:
    """A message's status once its deliveries (``statuses``: the latest to each place) are
    all done: delivered, or failed for a dead letter, a discarded one or a route error of its
    latest run (``failures``, "route: error"), with what the detail tells."""
    dead = statuses.count(DeliveryStatus.DEAD.value)
    discarded = statuses.count(DeliveryStatus.DISCARDED.value)
    skipped = statuses.count(DeliveryStatus.SKIPPED.value)
    told = [
        *([f"{dead} of {len(statuses)} deliveries are dead letters"] if dead else []),
        *([f"{discarded} of {len(statuses)} were discarded"] if discarded else []),
        *([f"{skipped} of {len(statuses)} had nothing to send"] if skipped else []),
    ]
    detail = "; ".join(told) or None
    dead += discarded  # given up on all the same: the message was not delivered
    status = MessageStatus.FAILED if dead or failures else MessageStatus.DELIVERED
    if failures:
        detail = "; ".join([*failures, *([detail] if detail else [])])
    return status, detail


def _line_moves(
    results: list[AttemptResult], parked: Any, now: Any
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Parameters of park_line and unpark_line for the lines these attempts stall or move on:
    a failure (to be retried, or a dead letter that holds the line) parks what waits behind
    it; a delivery that had failed before and is now sent, or a dead letter that lets the line
    go on, makes it due. A first attempt that succeeds has nothing parked behind it."""
    park: list[tuple[Any, ...]] = []
    unpark: list[tuple[Any, ...]] = []
    for r in results:
        line = _result_line(r)
        if not line:  # a result without its line: the sweep mends it
            continue
        status = _final_status(r)
        stalls = status is DeliveryStatus.PENDING or (
            status is DeliveryStatus.DEAD and r.holds_line
        )
        if stalls:
            park.append((parked, line, r.order_key, r.delivery_id))
        elif status is DeliveryStatus.DEAD or r.attempt > 1:
            unpark.append((now, line, r.order_key, parked))
    return park, unpark


def _matching(
    query: Select[Any], status: str | None, message_id: int | None, destination: str | None
) -> Select[Any]:
    """``query`` narrowed to the deliveries ``find`` and ``count`` select."""
    if status:  # written into the SQL, so "dead" is read through its partial index
        query = query.where(
            deliveries.c.status == bindparam("status", status, literal_execute=True)
        )
    if message_id is not None:
        query = query.where(deliveries.c.message_id == message_id)
    if destination is not None:
        query = query.where(deliveries.c.destination == destination)
    return query


def _final_status(result: AttemptResult) -> DeliveryStatus:
    if result.delivered:
        return DeliveryStatus.DELIVERED
    if result.skipped:
        return DeliveryStatus.SKIPPED
    return DeliveryStatus.PENDING if result.retry_at is not None else DeliveryStatus.DEAD


def _outcome(result: AttemptResult) -> str:
    if result.delivered:
        return "delivered"
    if result.skipped:
        return "skipped"
    if result.kept_on_schedule:
        return EARLY_FAILURE
    return "failed" if result.retry_at is not None else "dead"
