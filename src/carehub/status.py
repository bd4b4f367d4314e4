"""`carehub status`: what the hub has taken in and sent out lately, read from the store.

The store is the one place every listener and every worker writes to, so this works the same
for the embedded hub and for a scale-out deployment with many workers, and it needs no running
hub. Each figure is one indexed query (received_at, status, and the outbox's partial indexes),
so a status stays quick on a store of millions of messages; nothing scans a whole table.

Message bodies and identifiers are never shown: counts, listener and destination names, times,
and of a destination's last error what the log says of it (the channel's own account: where it
sent and what went wrong), never what the destination answered, which can quote the message.
The whole error is for the views of one message (`messages show`, `dead-letters list`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from sqlalchemy import and_, case, func, literal_column, select

from carehub.components import DeliveryError
from carehub.config import without_password
from carehub.store.outbox import held_counts
from carehub.store.processes import HubProcess, partitions_disagree, running_processes
from carehub.store.schema import (
    UNFINISHED,
    DeliveryStatus,
    MessageStatus,
    deliveries,
    delivery_in,
    message_events,
    messages,
    paused_destinations,
)
from carehub.store.store import RESENT, MessageStore, first_id_since

#: How many of the newest failed-and-waiting deliveries are read to find each destination's
#: last error; enough to cover every destination without reading a long retry queue whole.
LAST_ERRORS_READ = 500


@dataclass(slots=True)
class ListenerIntake:
    """One listener's messages in the window, by the ACK they were answered with."""

    transport: str
    listener: str
    accepted: int = 0  # AA
    resent: int = 0  # answered AA again and not stored again: the sender did not hear the first
    refused: int = 0  # AE: stored, content refused
    rejected: int = 0  # AR: not HL7, too large, cut short
    last_received: datetime | None = None

    @property
    def total(self) -> int:
        return self.accepted + self.refused + self.rejected


@dataclass(slots=True)
class DestinationState:
    """One destination's outbox: what waits now, what gave up, and how many of the window's
    messages it has been sent."""

    destination: str
    channel: str
    waiting: int = 0  # pending or being sent now
    retrying: int = 0  # of those, tried at least once and failed
    oldest_waiting: datetime | None = None  # when the longest-waiting one was planned
    delivered: int = 0  # of the messages received in the window
    dead: int = 0  # dead letters, however old, until retried
    #: Of those waiting, the ones held behind a dead letter of their patient's line: they go
    #: when it is retried or discarded (`carehub dead-letters`).
    held: int = 0
    #: Of the newest delivery that failed and waits to retry (or is being tried again), else
    #: of the newest dead letter: what the log says of it (see _loggable_error).
    last_error: str | None = None
    #: Paused by an operator (`carehub destinations pause`): since when, by whom, why.
    paused: bool = False
    paused_at: datetime | None = None
    paused_by: str | None = None
    pause_reason: str | None = None


@dataclass(slots=True)
class HubStatus:
    """Everything `carehub status` shows, as of ``now`` over the window since ``since``."""

    now: datetime
    since: datetime
    intake: list[ListenerIntake] = field(default_factory=list)
    #: Messages received in the window, by the status they have now.
    by_status: dict[str, int] = field(default_factory=dict)
    #: Messages stored and ACKed but not routed yet, whenever they came.
    routing_backlog: int = 0
    oldest_unrouted: datetime | None = None
    destinations: list[DestinationState] = field(default_factory=list)
    #: The serve and worker processes on this store (store/processes.py).
    processes: list[HubProcess] = field(default_factory=list)

    @property
    def received(self) -> int:
        return sum(item.total for item in self.intake)

    @property
    def dead_letters(self) -> int:
        return sum(item.dead for item in self.destinations)

    @property
    def waiting(self) -> int:
        return sum(item.waiting for item in self.destinations)

    @property
    def held(self) -> int:
        return sum(item.held for item in self.destinations)

    @property
    def route_sets(self) -> set[str]:
        """The route sets the answering processes run: more than one after a reload that
        did not reach every process, or with route files that differ between hosts."""
        return {p.routes or "?" for p in self.processes if not p.stale(self.now)}

    @property
    def versions(self) -> set[str]:
        """The carehub releases the answering processes run: more than one during an
        upgrade, when their route-set digests cannot be compared (a release may digest the
        same files otherwise)."""
        return {p.version for p in self.processes if not p.stale(self.now)}

    @property
    def paused(self) -> list[DestinationState]:
        return [item for item in self.destinations if item.paused]

    def as_json(self) -> dict[str, Any]:
        """Plain JSON types: times as ISO 8601 in UTC."""

        def plain(value: Any) -> Any:
            if isinstance(value, datetime):
                return value.isoformat()
            if isinstance(value, dict):
                return {key: plain(item) for key, item in value.items()}
            if isinstance(value, list):
                return [plain(item) for item in value]
            return value

        report = plain(asdict(self))
        report["processes"] = [p.as_json(self.now) for p in self.processes]
        report["route_sets"] = len(self.route_sets)
        report["window_seconds"] = round((self.now - self.since).total_seconds())
        report["received"] = self.received
        report["dead_letters"] = self.dead_letters
        report["held"] = self.held
        return report  # type: ignore[no-any-return]


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; the store writes them in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def read_status(store: MessageStore, window: timedelta, now: datetime | None = None) -> HubStatus:
    """The hub's status over the last ``window``, from the store alone."""
    now = now or datetime.now(UTC)
    status = HubStatus(now=now, since=now - window)
    since = status.since
    with store.engine.connect() as conn:
        if not store.is_sqlite:
            # One snapshot for every figure, so that held never reads above waiting while
            # workers route between two of the queries.
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        listeners: dict[tuple[str, str], ListenerIntake] = {}
        intake_rows = conn.execute(
            select(
                messages.c.transport,
                messages.c.listener,
                messages.c.ack_code,
                messages.c.status,
                func.count(),
                func.max(messages.c.received_at),
            )
            .where(messages.c.received_at >= since)
            .group_by(
                messages.c.transport, messages.c.listener, messages.c.ack_code, messages.c.status
            )
        )
        for transport, listener, ack_code, message_status, count, last in intake_rows:
            item = listeners.setdefault((transport, listener), ListenerIntake(transport, listener))
            if ack_code == "AA":
                item.accepted += count
            elif ack_code == "AE":
                item.refused += count
            else:
                item.rejected += count
            last = _aware(last)
            if last is not None and (item.last_received is None or last > item.last_received):
                item.last_received = last
            status.by_status[message_status] = status.by_status.get(message_status, 0) + count
        resent_rows = message_events.join(messages, messages.c.id == message_events.c.message_id)
        resends = conn.execute(
            select(messages.c.transport, messages.c.listener, func.count())
            .select_from(resent_rows)
            .where(
                message_events.c.event == literal_column(f"'{RESENT}'"),  # the partial index
                message_events.c.at >= since,
            )
            .group_by(messages.c.transport, messages.c.listener)
        )
        for transport, listener, count in resends:
            item = listeners.setdefault((transport, listener), ListenerIntake(transport, listener))
            item.resent = count
        status.intake = sorted(listeners.values(), key=lambda item: (item.transport, item.listener))

        backlog, oldest = conn.execute(
            select(func.count(), func.min(messages.c.received_at)).where(
                messages.c.status == MessageStatus.RECEIVED.value
            )
        ).one()
        status.routing_backlog, status.oldest_unrouted = backlog, _aware(oldest)

        status.destinations = _destinations(conn, since)
        status.processes = running_processes(conn)
    return status


def _loggable_error(loggable: str | None, last_error: str | None) -> str | None:
    """What status shows of a delivery's last error: the part the log showed, as the worker
    stored it; of an error stored before it did, the part the log would show of an error that
    does not say where the destination's answer begins (DeliveryError.loggable)."""
    if not last_error:
        return None
    shown = loggable if loggable is not None else DeliveryError(last_error).loggable
    return without_password(shown)  # stored before URLs were masked


def _destinations(conn: Any, since: datetime) -> list[DestinationState]:
    """The outbox by destination: waiting now (with retries and their last error), dead
    letters, and deliveries made for the window's messages."""
    found: dict[tuple[str, str], DestinationState] = {}

    def state(destination: str, channel: str) -> DestinationState:
        return found.setdefault((destination, channel), DestinationState(destination, channel))

    waiting_rows = conn.execute(
        select(
            deliveries.c.destination,
            deliveries.c.channel,
            func.count(),
            func.sum(case((deliveries.c.attempts > 0, 1), else_=0)),
            func.min(deliveries.c.created_at),
        )
        .where(delivery_in(deliveries, *UNFINISHED))
        .group_by(deliveries.c.destination, deliveries.c.channel)
    )
    for destination, channel, count, retrying, oldest in waiting_rows:
        item = state(destination, channel)
        item.waiting, item.retrying, item.oldest_waiting = count, retrying or 0, _aware(oldest)

    dead_rows = conn.execute(
        select(deliveries.c.destination, deliveries.c.channel, func.count())
        .where(delivery_in(deliveries, DeliveryStatus.DEAD))
        .group_by(deliveries.c.destination, deliveries.c.channel)
    )
    for destination, channel, count in dead_rows:
        state(destination, channel).dead = count
    for (destination, channel), count in held_counts(conn).items():
        state(destination, channel).held = count

    # Of the messages received in the window, the deliveries made: read by the deliveries'
    # message_id index from the window's first message, not by a scan of the whole outbox.
    first_id = first_id_since(conn, since)
    if first_id is not None:
        delivered_rows = conn.execute(
            select(deliveries.c.destination, deliveries.c.channel, func.count())
            .where(
                and_(
                    deliveries.c.message_id >= first_id,
                    deliveries.c.status == DeliveryStatus.DELIVERED.value,
                )
            )
            .group_by(deliveries.c.destination, deliveries.c.channel)
        )
        for destination, channel, count in delivered_rows:
            state(destination, channel).delivered = count

    error_columns = (
        deliveries.c.destination,
        deliveries.c.channel,
        deliveries.c.last_error_loggable,
        deliveries.c.last_error,
    )
    error_rows = conn.execute(
        select(*error_columns)
        # Being sent again counts: a retry in flight (one a hanging destination keeps for
        # its whole timeout) has not cleared the error it retries.
        .where(and_(delivery_in(deliveries, *UNFINISHED), deliveries.c.attempts > 0))
        .order_by(deliveries.c.updated_at.desc())
        .limit(LAST_ERRORS_READ)
    )
    for destination, channel, loggable, last_error in error_rows:
        item = state(destination, channel)
        if item.last_error is None:
            item.last_error = _loggable_error(loggable, last_error)
    # Paused destinations, with or without work waiting (a few rows, read whole).
    for row in conn.execute(select(paused_destinations)):
        marked = [item for (name, _), item in found.items() if name == row.destination]
        for item in marked or [state(row.destination, row.channel or "")]:
            item.paused, item.paused_at = True, _aware(row.paused_at)
            item.paused_by, item.pause_reason = row.paused_by, row.reason

    # A destination with nothing retrying but dead letters: the newest dead letter's error.
    dead_errors = conn.execute(
        select(*error_columns)
        .where(delivery_in(deliveries, DeliveryStatus.DEAD))
        .order_by(deliveries.c.id.desc())
        .limit(LAST_ERRORS_READ)
    )
    for destination, channel, loggable, last_error in dead_errors:
        item = state(destination, channel)
        if item.last_error is None:
            item.last_error = _loggable_error(loggable, last_error)
    return sorted(found.values(), key=lambda item: (item.destination, item.channel))


# -- on the terminal ---------------------------------------------------------------------------
def _age(then: datetime | None, now: datetime) -> str:
    """How long ago, in the largest unit that reads well: 45 s, 12 min, 3.5 h, 2 d."""
    if then is None:
        return "-"
    seconds = max(0.0, (now - then).total_seconds())
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def _window(status: HubStatus) -> str:
    """The window as an age is written on the command line: 30m, 1h, 7d."""
    seconds = round((status.now - status.since).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def render(status: HubStatus) -> RenderableType:
    """The status as rich tables: intake by listener, routing backlog, outbox by destination."""
    now, window = status.now, _window(status)
    minutes = max((status.now - status.since).total_seconds() / 60, 1 / 60)
    parts: list[RenderableType] = [
        Text(
            f"carehub status at {now:%Y-%m-%d %H:%M:%S} UTC, last {window} "
            f"(since {status.since:%Y-%m-%d %H:%M} UTC)",
            style="bold",
        )
    ]

    intake = Table(title=f"Intake, last {window}", title_justify="left", show_edge=False)
    columns = ("listener", "accepted (AA)", "resent", "refused (AE)", "rejected (AR)", "per minute")
    for column in columns:
        intake.add_column(column, justify="left" if column == "listener" else "right")
    intake.add_column("last received")
    for item in status.intake:
        intake.add_row(
            f"{item.transport}:{item.listener}",
            str(item.accepted),
            _warn(item.resent),
            _warn(item.refused),
            _warn(item.rejected),
            f"{item.total / minutes:.1f}",
            f"{_age(item.last_received, now)} ago",
        )
    parts.append(intake if status.intake else Text(f"Intake, last {window}: nothing received"))

    if status.by_status:
        counts = ", ".join(
            f"{name} {count}" for name, count in sorted(status.by_status.items(), key=_by_life)
        )
        parts.append(Text(f"Messages received in the last {window}, by status now: {counts}"))
    if status.routing_backlog:
        parts.append(
            Text(
                f"Waiting to be routed: {status.routing_backlog} "
                f"(the oldest for {_age(status.oldest_unrouted, now)})",
                style="yellow",
            )
        )
    else:
        parts.append(Text("Waiting to be routed: none"))

    if status.destinations:
        outbox = Table(title="Deliveries", title_justify="left", show_edge=False)
        outbox.add_column("destination")
        outbox.add_column("channel")
        columns = (f"delivered ({window})", "waiting", "retrying", "held", "oldest waiting", "dead")
        for column in columns:
            outbox.add_column(column, justify="right")
        outbox.add_column("last error", overflow="fold")
        for item in status.destinations:
            outbox.add_row(
                Text.assemble(item.destination, (" (paused)", "yellow") if item.paused else ""),
                item.channel,
                str(item.delivered),
                str(item.waiting),
                _warn(item.retrying),
                _warn(item.held, "red"),
                _age(item.oldest_waiting, now) if item.waiting else "-",
                _warn(item.dead, "red"),
                _one_line(item.last_error),
            )
        parts.append(outbox)
    else:
        parts.append(Text("Deliveries: none"))
    parts.append(_processes(status))
    if len(status.versions) > 1:
        parts.append(
            Text(
                f"the running processes run {len(status.versions)} carehub releases "
                f"({', '.join(sorted(status.versions))}): finish the upgrade; their route sets "
                "are compared once they run one release",
                style="yellow",
            )
        )
    elif len(status.route_sets) > 1:
        parts.append(
            Text(
                f"the running processes use {len(status.route_sets)} different route sets: "
                "reload the ones behind (SIGHUP to each; `carehub routes reload` does it for "
                "a serve on a SQLite store) or check that every host has the same route files",
                style="yellow",
            )
        )
    disagreeing = partitions_disagree(status.processes, status.now)
    if disagreeing:
        parts.append(
            Text(
                f"the running processes use different queue.partitions ({disagreeing}): a "
                "worker never consumes the queues above its own count, and their messages wait "
                "for the sweep; give every process the same queue.partitions",
                style="yellow",
            )
        )
    if status.dead_letters:
        parts.append(
            Text(
                f"{status.dead_letters} dead letter(s): see `carehub dead-letters list`",
                style="red",
            )
        )
    for item in status.paused:
        why = f": {_one_line(item.pause_reason)}" if item.pause_reason else ""
        parts.append(
            Text(
                f"{item.destination} paused {_age(item.paused_at, now)} ago by {item.paused_by}"
                f"{why}; its deliveries wait (`carehub destinations resume {item.destination}`)",
                style="yellow",
            )
        )
    if status.held:
        parts.append(
            Text(
                f"{status.held} delivery(ies) held behind dead letters of their patient's line: "
                "they go once those are retried or discarded (`carehub dead-letters`)",
                style="red",
            )
        )
    return Group(*parts)


#: Characters of a destination's last error shown in the table; `dead-letters list` and
#: `messages show` have it whole.
ERROR_SHOWN = 100


def _processes(status: HubStatus) -> RenderableType:
    """The serve and worker processes: where, since when, last heard from, which routes."""
    now = status.now
    if not status.processes:
        return Text("Processes: none running on this store")
    table = Table(title="Processes", title_justify="left", show_edge=False)
    for column in ("role", "host", "pid", "version", "up", "last heard", "routes"):
        table.add_column(column, justify="right" if column == "pid" else "left")
    for item in status.processes:
        heard = f"{_age(item.last_seen, now)} ago"
        table.add_row(
            item.role,
            item.host,
            str(item.pid),
            item.version,
            _age(item.started_at, now),
            Text(f"{heard}: not answering", style="red") if item.stale(now) else heard,
            item.routes or "-",
        )
    return table


def _one_line(error: str | None) -> str:
    if not error:
        return ""
    text = " ".join(error.split())
    return text if len(text) <= ERROR_SHOWN else text[: ERROR_SHOWN - 1] + "…"


def _warn(count: int, style: str = "yellow") -> Text:
    return Text(str(count), style=style if count else "")


_LIFE_ORDER = [status.value for status in MessageStatus]


def _by_life(item: tuple[str, int]) -> int:
    """Statuses in the order a message goes through them."""
    name = item[0]
    return _LIFE_ORDER.index(name) if name in _LIFE_ORDER else len(_LIFE_ORDER)
