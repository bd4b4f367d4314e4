"""Routing results and the delivery outbox, on the same database as the messages.

A message's routing result (step outputs, planned deliveries, new status) commits in one
transaction. Deliveries are then claimed by workers with a lease, sent, and finished with an
attempt row each; a failed attempt sets the next try time, and the last one makes it a dead
letter. Deliveries to one destination for one patient go out in order: a later one is not
claimed while an earlier one is still pending.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from carehub.store.schema import (
    DeliveryStatus,
    MessageStatus,
    deliveries,
    delivery_attempts,
    message_events,
    message_steps,
    messages,
)
from carehub.store.store import MessageStore, _aware

if TYPE_CHECKING:
    from carehub.routing.router import PlannedDelivery, RoutingResult


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
    values.pop("lease_until", None)
    for name in ("not_before", "created_at", "updated_at"):
        values[name] = _aware(values[name])
    if values.get("accepted_at") is not None:
        values["accepted_at"] = _aware(values["accepted_at"])
    values["payload"] = bytes(values["payload"])
    values["metadata"] = json.loads(values["metadata"]) if values["metadata"] else {}
    return DeliveryRecord(**values)


def _pending_row(
    planned: PlannedDelivery, message_id: int, run: int, now: datetime
) -> dict[str, Any]:
    """A new delivery's row, waiting to be sent."""
    return {
        "message_id": message_id,
        "run": run,
        "route": planned.route,
        "destination": planned.destination,
        "channel": planned.channel,
        "idempotency_key": planned.outgoing.idempotency_key,
        "order_key": planned.order_key,
        "payload": planned.outgoing.payload,
        "content_type": planned.outgoing.content_type,
        "metadata": json.dumps(planned.outgoing.metadata),
        "status": DeliveryStatus.PENDING.value,
        "attempts": 0,
        "max_attempts": planned.max_attempts,
        "not_before": now,
        "lease_until": None,
        "last_error": None,
        "receipt": None,
        "created_at": now,
        "updated_at": now,
        "accepted_at": None,
    }


# -- statements the worker runs for every batch, built once -------------------------------------
# Building a statement and computing its cache key cost SQLAlchemy more Python time than the
# database took to run it: under bench/bench_routing.py, 46% of the hub's event loop was in
# SQLAlchemy and 12% in the driver. A statement built once has its cache key computed once.
_ELIGIBLE = select(messages.c.id).where(
    messages.c.id.in_(bindparam("ids", expanding=True)),
    messages.c.status == MessageStatus.RECEIVED.value,
)
_ELIGIBLE_FOR_UPDATE = _ELIGIBLE.with_for_update()  # another worker may hold a copy
_SET_MESSAGE_STATUS = (
    update(messages)
    .where(messages.c.id == bindparam("_id"))
    .values(status=bindparam("_status"), status_at=bindparam("_at"), detail=bindparam("_detail"))
)
_ADD_EVENTS = insert(message_events)
_ADD_STEPS = insert(message_steps)
_ADD_DELIVERIES = insert(deliveries)
_ADD_ATTEMPTS = insert(delivery_attempts)
_RECORD_ATTEMPT = (
    update(deliveries)
    .where(deliveries.c.id == bindparam("_id"))
    .values(
        attempts=bindparam("_attempt"),
        status=bindparam("_status"),
        receipt=bindparam("_receipt"),
        last_error=bindparam("_error"),
        not_before=func.coalesce(bindparam("_retry_at"), deliveries.c.not_before),
        accepted_at=bindparam("_accepted_at"),
        lease_until=None,
        updated_at=bindparam("_now"),
    )
)
_DELIVERY_STATUSES = (
    select(deliveries.c.message_id, deliveries.c.status, messages.c.status)
    .join(messages, messages.c.id == deliveries.c.message_id)
    .where(deliveries.c.message_id.in_(bindparam("ids", expanding=True)))
)
_LATEST_RUNS = (
    select(message_steps.c.message_id, func.max(message_steps.c.run))
    .where(message_steps.c.message_id.in_(bindparam("ids", expanding=True)))
    .group_by(message_steps.c.message_id)
)
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


def _claim_candidates(exclude_destinations: bool, skip_ids: bool) -> Select[Any]:
    """Pending deliveries that are due and first in their line (see Outbox.claim_due)."""
    earlier = aliased(deliveries)
    blocked = (
        select(earlier.c.id)
        .where(
            earlier.c.destination == deliveries.c.destination,
            earlier.c.order_key == deliveries.c.order_key,
            earlier.c.status.in_([DeliveryStatus.PENDING.value, DeliveryStatus.SENDING.value]),
            earlier.c.id < deliveries.c.id,
        )
        .exists()
    )
    query = select(deliveries.c.id).where(
        deliveries.c.status == DeliveryStatus.PENDING.value,
        deliveries.c.not_before <= bindparam("now"),
        ~blocked,
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
# The rows are found by id; the status test only guards against another worker having taken
# one meanwhile. Wrapped in coalesce so no planner reads it as a way in: through the
# (status, not_before, id) index it would visit every pending row.
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

    # -- routing --------------------------------------------------------------------------
    def next_run(self, message_id: int) -> int:
        with self.engine.connect() as conn:
            last = conn.execute(
                select(func.max(message_steps.c.run)).where(
                    message_steps.c.message_id == message_id
                )
            ).scalar()
        return int(last or 0) + 1

    def record_routing(self, results: Iterable[RoutingResult]) -> list[int]:
        """Commit routing results in one transaction; returns the ids of messages recorded.

        A first run only applies to a message still 'received' (so a message queued twice is
        routed once); a reprocess (run > 1) applies whatever the status. Each table gets one
        multi-row statement per batch, not one per message.
        """
        results = list(results)
        if not results:
            return []
        now = _now()
        with self.engine.begin() as conn:
            first_runs = [r.message_id for r in results if r.run == 1]
            eligible: set[int] = set()
            if first_runs:
                query = _ELIGIBLE if self.store.is_sqlite else _ELIGIBLE_FOR_UPDATE
                eligible = {row[0] for row in conn.execute(query, {"ids": first_runs})}
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
            statuses = {mid: _routing_status(r) for mid, r in chosen.items()}
            status_rows = [
                {"_id": mid, "_status": status.value, "_detail": detail, "_at": now}
                for mid, (status, detail) in statuses.items()
            ]
            event_rows = [
                {"message_id": mid, "at": now, "event": status.value, "detail": detail}
                for mid, (status, detail) in statuses.items()
            ]
            step_rows = [
                {
                    "message_id": mid,
                    "run": result.run,
                    "route": s.route,
                    "position": s.position,
                    "step": s.step,
                    "outcome": s.outcome,
                    "output": s.encoded_output(),
                    "at": now,
                }
                for mid, result in chosen.items()
                for s in result.steps
            ]
            delivery_rows = [
                _pending_row(d, mid, result.run, now)
                for mid, result in chosen.items()
                for d in result.deliveries
            ]
            conn.execute(_SET_MESSAGE_STATUS, status_rows)
            conn.execute(_ADD_EVENTS, event_rows)
            if step_rows:
                conn.execute(_ADD_STEPS, step_rows)
            if delivery_rows:
                conn.execute(_ADD_DELIVERIES, delivery_rows)
        return list(chosen)

    def schedule(self, planned: PlannedDelivery, message_id: int, conn: Any = None) -> bool:
        """Put a delivery carehub decided on by itself (a digest, an overdue alert, a notice
        of an answer that came over HTTP) in the outbox, filed under ``message_id``. Its
        idempotency key makes this once-only: False when that key is already there."""
        now = _now()
        row = _pending_row(planned, message_id, 0, now)  # run 0: not from a routing run
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
                conn.execute(insert(deliveries), row)
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
        """Take up to ``limit`` pending deliveries that are due and first in line for their
        destination and patient; they stay ours until the lease runs out.

        The query walks pending rows that are due, oldest due first (index on status,
        not_before, id), and stops at ``limit``, checking each candidate's place in line
        through the (destination, order_key, status) index. Rows waiting for a later retry are
        never read, so a down destination's backlog costs other destinations' claims nothing.
        Order within a patient's line comes from the place-in-line check, not the walk."""
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

    def release_expired_leases(self, now: datetime | None = None) -> int:
        """Deliveries whose worker stopped before finishing them go back in line."""
        now = now or _now()
        with self.engine.begin() as conn:
            return conn.execute(
                update(deliveries)
                .where(
                    deliveries.c.status == DeliveryStatus.SENDING.value,
                    deliveries.c.lease_until < now,
                )
                .values(status=DeliveryStatus.PENDING.value, lease_until=None)
            ).rowcount

    def finish(self, results: list[AttemptResult]) -> list[int]:
        """Record attempts; returns ids of messages whose deliveries are now all finished."""
        if not results:
            return []
        now = _now()
        # Rows are built before the first write, so the write lock is held only while the
        # statements run.
        delivery_rows = [
            {
                "_id": r.delivery_id,
                "_attempt": r.attempt,
                "_status": _final_status(r).value,
                "_receipt": r.detail if r.delivered else None,
                "_error": None if r.delivered else r.detail,
                "_retry_at": r.retry_at,
                "_accepted_at": (
                    r.started_at + timedelta(milliseconds=r.duration_ms) if r.delivered else None
                ),
                "_now": now,
            }
            for r in results
        ]
        attempt_rows = [
            {
                "delivery_id": r.delivery_id,
                "number": r.attempt,
                "started_at": r.started_at,
                "duration_ms": r.duration_ms,
                "outcome": _outcome(r),
                "detail": r.detail,
            }
            for r in results
        ]
        with self.engine.begin() as conn:
            conn.execute(_RECORD_ATTEMPT, delivery_rows)
            conn.execute(_ADD_ATTEMPTS, attempt_rows)
            finished = self._settle_messages(conn, {r.message_id for r in results}, now)
        return finished

    def _settle_messages(self, conn: Any, message_ids: set[int], now: datetime) -> list[int]:
        """Messages whose deliveries are all done become delivered, or failed if any died or
        a route raised in the latest run (the other routes finishing must not hide that)."""
        by_message: dict[int, list[str]] = {}
        routing_failed: set[int] = set()
        rows = conn.execute(_DELIVERY_STATUSES, {"ids": list(message_ids)})
        for message_id, status, message_status in rows:
            by_message.setdefault(message_id, []).append(status)
            if message_status == MessageStatus.FAILED.value:
                routing_failed.add(message_id)
        unfinished = (DeliveryStatus.PENDING.value, DeliveryStatus.SENDING.value)
        done = {
            mid: statuses
            for mid, statuses in by_message.items()
            if not any(s in unfinished for s in statuses)
        }
        if not done:
            return []
        # Only a message already marked failed can have a route that raised (routing marks it
        # so); the others skip the two step queries.
        suspects = [mid for mid in done if mid in routing_failed]
        errors = _route_errors(conn, suspects) if suspects else {}
        changes = []
        for message_id, statuses in sorted(done.items()):
            dead = statuses.count(DeliveryStatus.DEAD.value)
            detail = f"{dead} of {len(statuses)} deliveries are dead letters" if dead else None
            failures = errors.get(message_id, [])
            status = MessageStatus.FAILED if dead or failures else MessageStatus.DELIVERED
            if failures:
                detail = "; ".join([*failures, *([detail] if detail else [])])
            changes.append(
                {"_id": message_id, "_status": status.value, "_detail": detail, "_at": now}
            )
        conn.execute(_SET_MESSAGE_STATUS, changes)
        conn.execute(
            _ADD_EVENTS,
            [
                {"message_id": c["_id"], "at": now, "event": c["_status"], "detail": c["_detail"]}
                for c in changes
            ],
        )
        return [c["_id"] for c in changes]

    def release(self, delivery_ids: list[int]) -> None:
        """Hand claimed deliveries back unsent (the worker took more than it can start)."""
        if not delivery_ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id.in_(delivery_ids))
                .values(status=DeliveryStatus.PENDING.value, lease_until=None)
            )

    def release_leases(self) -> int:
        """Put deliveries claimed by a process that is gone back in line (single-host start)."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(deliveries)
                .where(deliveries.c.status == DeliveryStatus.SENDING.value)
                .values(status=DeliveryStatus.PENDING.value, lease_until=None)
            ).rowcount

    def unfinished(self, route: str | None = None) -> int:
        """Messages not routed yet plus deliveries pending or being sent (of ``route`` only,
        when given): 0 once everything received so far has been dealt with.

        One statement, so one snapshot: asked one after another, "nothing pending" can be
        read before a message is routed and "nothing unrouted" after, and the pair looks idle
        while the new delivery waits."""
        waiting = [DeliveryStatus.PENDING.value, DeliveryStatus.SENDING.value]
        in_flight = select(func.count()).select_from(deliveries)
        in_flight = in_flight.where(deliveries.c.status.in_(waiting))
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
        limit: int | None = 100,
    ) -> list[DeliveryRecord]:
        query = select(deliveries).order_by(deliveries.c.id)
        if status:
            query = query.where(deliveries.c.status == status)
        if message_id is not None:
            query = query.where(deliveries.c.message_id == message_id)
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [_record(r) for r in conn.execute(query)]

    def get(self, delivery_id: int) -> DeliveryRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(deliveries).where(deliveries.c.id == delivery_id)).first()
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

    def retry_dead(self, delivery_ids: list[int] | None) -> int:
        """Give dead letters a fresh set of attempts (all of them when ids is None)."""
        now = _now()
        query = update(deliveries).where(deliveries.c.status == DeliveryStatus.DEAD.value)
        if delivery_ids is not None:
            query = query.where(deliveries.c.id.in_(delivery_ids))
        with self.engine.begin() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    select(deliveries.c.message_id).where(query.whereclause)  # type: ignore[arg-type]
                )
            ]
            count = conn.execute(
                query.values(
                    status=DeliveryStatus.PENDING.value,
                    attempts=0,
                    not_before=now,
                    updated_at=now,
                    lease_until=None,
                )
            ).rowcount
            for message_id in set(ids):
                conn.execute(
                    update(messages)
                    .where(messages.c.id == message_id)
                    .values(
                        status=MessageStatus.ROUTED.value,
                        status_at=now,
                        detail="dead letters queued again",
                    )
                )
                conn.execute(
                    insert(message_events),
                    {
                        "message_id": message_id,
                        "at": now,
                        "event": MessageStatus.ROUTED.value,
                        "detail": "dead letters queued again",
                    },
                )
        return count


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


def _routing_status(result: RoutingResult) -> tuple[MessageStatus, str | None]:
    if result.errors:
        return MessageStatus.FAILED, "; ".join(result.errors)
    matched = [r.route for r in result.matched]
    if not matched:
        return MessageStatus.UNROUTED, "no route matched"
    if not result.deliveries:
        # Matched, but filtered or nothing to forward: routed is where it stays.
        return MessageStatus.ROUTED, f"routes {', '.join(matched)}; nothing to deliver"
    return MessageStatus.ROUTED, f"routes {', '.join(matched)}; {len(result.deliveries)} deliveries"


def _final_status(result: AttemptResult) -> DeliveryStatus:
    if result.delivered:
        return DeliveryStatus.DELIVERED
    return DeliveryStatus.PENDING if result.retry_at is not None else DeliveryStatus.DEAD


def _outcome(result: AttemptResult) -> str:
    if result.delivered:
        return "delivered"
    return "failed" if result.retry_at is not None else "dead"
