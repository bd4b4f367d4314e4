"""Routing results and the delivery outbox, on the same database as the messages.

A message's routing result (step outputs, planned deliveries, new status) commits in one
transaction. Deliveries are then claimed by workers with a lease, sent, and finished with an
attempt row each; a failed attempt sets the next try time, and the last one makes it a dead
letter. Deliveries to one destination for one patient go out in order: a later one is not
claimed while an earlier one is still pending.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, insert, or_, select, update
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
    from carehub.routing.router import RoutingResult


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


@dataclass(slots=True, frozen=True)
class AttemptResult:
    """The outcome of one send, as the delivery worker reports it."""

    delivery_id: int
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
    values["payload"] = bytes(values["payload"])
    values["metadata"] = json.loads(values["metadata"]) if values["metadata"] else {}
    return DeliveryRecord(**values)


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
        routed once); a reprocess (run > 1) applies whatever the status.
        """
        now = _now()
        recorded: list[int] = []
        with self.engine.begin() as conn:
            for result in results:
                status, detail = _routing_status(result)
                query = update(messages).where(messages.c.id == result.message_id)
                if result.run == 1:
                    query = query.where(messages.c.status == MessageStatus.RECEIVED.value)
                changed = conn.execute(
                    query.values(status=status.value, status_at=now, detail=detail)
                ).rowcount
                if not changed:
                    continue
                recorded.append(result.message_id)
                conn.execute(
                    insert(message_events),
                    {
                        "message_id": result.message_id,
                        "at": now,
                        "event": status.value,
                        "detail": detail,
                    },
                )
                steps = [
                    {
                        "message_id": result.message_id,
                        "run": result.run,
                        "route": s.route,
                        "position": s.position,
                        "step": s.step,
                        "outcome": s.outcome,
                        "output": json.dumps(s.output, default=str),
                        "at": now,
                    }
                    for s in result.steps
                ]
                if steps:
                    conn.execute(insert(message_steps), steps)
                planned = [
                    {
                        "message_id": result.message_id,
                        "run": result.run,
                        "route": d.route,
                        "destination": d.destination,
                        "channel": d.channel,
                        "idempotency_key": d.outgoing.idempotency_key,
                        "order_key": d.order_key,
                        "payload": d.outgoing.payload,
                        "content_type": d.outgoing.content_type,
                        "metadata": json.dumps(d.outgoing.metadata),
                        "status": DeliveryStatus.PENDING.value,
                        "attempts": 0,
                        "max_attempts": d.max_attempts,
                        "not_before": now,
                        "lease_until": None,
                        "last_error": None,
                        "receipt": None,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for d in result.deliveries
                ]
                if planned:
                    conn.execute(insert(deliveries), planned)
        return recorded

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
    ) -> list[DeliveryRecord]:
        """Take up to ``limit`` deliveries that are due and first in line for their
        destination and patient; they stay ours until the lease runs out."""
        now = now or _now()
        earlier = aliased(deliveries)
        due = or_(
            and_(
                deliveries.c.status == DeliveryStatus.PENDING.value, deliveries.c.not_before <= now
            ),
            and_(
                deliveries.c.status == DeliveryStatus.SENDING.value, deliveries.c.lease_until < now
            ),
        )
        blocked = (
            select(earlier.c.id)
            .where(
                earlier.c.destination == deliveries.c.destination,
                earlier.c.order_key == deliveries.c.order_key,
                earlier.c.id < deliveries.c.id,
                earlier.c.status.in_([DeliveryStatus.PENDING.value, DeliveryStatus.SENDING.value]),
            )
            .exists()
        )
        candidates = select(deliveries.c.id).where(due, ~blocked)
        if exclude_destinations:
            candidates = candidates.where(deliveries.c.destination.notin_(exclude_destinations))
        candidates = candidates.order_by(deliveries.c.id).limit(limit)
        with self.engine.begin() as conn:
            ids = [r[0] for r in conn.execute(candidates)]
            if not ids:
                return []
            rows = conn.execute(
                update(deliveries)
                .where(deliveries.c.id.in_(ids), due)
                .values(
                    status=DeliveryStatus.SENDING.value, lease_until=now + lease, updated_at=now
                )
                .returning(*deliveries.c)
            ).all()
        return sorted((_record(r) for r in rows), key=lambda d: d.id)

    def finish(self, results: list[AttemptResult]) -> list[int]:
        """Record attempts; returns ids of messages whose deliveries are now all finished."""
        if not results:
            return []
        now = _now()
        touched: set[int] = set()
        with self.engine.begin() as conn:
            for result in results:
                row = conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id == result.delivery_id)
                    .values(
                        attempts=deliveries.c.attempts + 1,
                        updated_at=now,
                        lease_until=None,
                        **_finish_values(result),
                    )
                    .returning(deliveries.c.attempts, deliveries.c.message_id)
                ).first()
                if row is None:
                    continue
                touched.add(row.message_id)
                conn.execute(
                    insert(delivery_attempts),
                    {
                        "delivery_id": result.delivery_id,
                        "number": row.attempts,
                        "started_at": result.started_at,
                        "duration_ms": result.duration_ms,
                        "outcome": _outcome(result),
                        "detail": result.detail,
                    },
                )
            finished = self._settle_messages(conn, touched, now)
        return finished

    def _settle_messages(self, conn: Any, message_ids: set[int], now: datetime) -> list[int]:
        """Messages whose deliveries are all done become delivered (or failed if any died)."""
        settled: list[int] = []
        for message_id in sorted(message_ids):
            statuses = [
                r[0]
                for r in conn.execute(
                    select(deliveries.c.status).where(deliveries.c.message_id == message_id)
                )
            ]
            if any(
                s in (DeliveryStatus.PENDING.value, DeliveryStatus.SENDING.value) for s in statuses
            ):
                continue
            dead = statuses.count(DeliveryStatus.DEAD.value)
            status = MessageStatus.FAILED if dead else MessageStatus.DELIVERED
            detail = f"{dead} of {len(statuses)} deliveries are dead letters" if dead else None
            conn.execute(
                update(messages)
                .where(messages.c.id == message_id)
                .values(status=status.value, status_at=now, detail=detail)
            )
            conn.execute(
                insert(message_events),
                {"message_id": message_id, "at": now, "event": status.value, "detail": detail},
            )
            settled.append(message_id)
        return settled

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

    def next_due_at(self) -> datetime | None:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(func.min(deliveries.c.not_before)).where(
                    deliveries.c.status == DeliveryStatus.PENDING.value
                )
            ).scalar()
        return _aware(value) if value else None

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


def _finish_values(result: AttemptResult) -> dict[str, Any]:
    if result.delivered:
        return {
            "status": DeliveryStatus.DELIVERED.value,
            "receipt": result.detail,
            "last_error": None,
        }
    if result.retry_at is None:
        return {"status": DeliveryStatus.DEAD.value, "last_error": result.detail}
    return {
        "status": DeliveryStatus.PENDING.value,
        "last_error": result.detail,
        "not_before": result.retry_at,
    }


def _outcome(result: AttemptResult) -> str:
    if result.delivered:
        return "delivered"
    return "failed" if result.retry_at is not None else "dead"
