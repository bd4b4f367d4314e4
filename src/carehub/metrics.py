"""Prometheus metrics, collected from the hub's own counters when scraped.

A custom collector (rather than Counter.inc on every message) keeps the per-message path free
of metrics work, and a registry per hub keeps tests independent of each other.

The per-destination gauges and the routing backlog are read from the store at scrape time,
by the queries `carehub status` runs (carehub.status.read_status): they cover every worker
writing to the store, not only this hub's, so in a scale-out deployment every `serve` reports
the same values (aggregate them with max, not sum). Every destination of the hub's routes is
exported, at 0 when nothing waits, so that an alert on it never sees the series vanish.

A scrape waits for the store at most STORE_PATIENCE: a database that has gone silent takes
its connect timeout or longer to fail a read, and Prometheus gives up on a scrape after 10 s
by default, so the hub would look down when only its store is. Past it, the scrape answers
with carehub_store_up 0 and the store's gauges left out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from carehub.status import DestinationState, HubStatus, read_status
from carehub.store.schema import UNFINISHED, DeliveryStatus, deliveries, delivery_in

if TYPE_CHECKING:
    from carehub.hub import Hub
    from carehub.intake.http import AuthFailures, HTTPListener
    from carehub.routing.table import RouteTable
    from carehub.store.store import MessageStore
    from carehub.worker import Worker

log = logging.getLogger(__name__)

#: The window read_status counts intake over. No gauge here uses those counts, so the
#: shortest window keeps that part of a scrape to the last minute's rows.
STATUS_WINDOW = timedelta(minutes=1)

#: Seconds a scrape waits for the store (its gauges, and the test write that decides
#: carehub_store_writable while intake's writes fail) before it answers without it. A read
#: takes milliseconds (see _deliveries_by_status); Prometheus' own timeout is 10 s.
STORE_PATIENCE = 2.0

_DESTINATION = ["destination", "channel"]

T = TypeVar("T")


class _Run(Generic[T]):
    """One call of ``read`` on a thread of its own, whose result a scrape waits for."""

    def __init__(self, read: Callable[[], T], name: str) -> None:
        self.finished = threading.Event()
        self._value: T | None = None
        self._error: Exception | None = None
        threading.Thread(target=self._run, args=(read,), name=name, daemon=True).start()

    def _run(self, read: Callable[[], T]) -> None:
        try:
            self._value = read()
        except Exception as err:
            self._error = err
        finally:
            self.finished.set()

    def result(self, deadline: float) -> T:
        """What ``read`` returned, waited for until ``deadline`` (time.monotonic()); raises
        what it raised, or TimeoutError when it is still running then."""
        if not self.finished.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"no answer within {STORE_PATIENCE:g} s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class _OneAtATime(Generic[T]):
    """Store reads for scrapes, one at a time: a read that outlives its scrape (a database
    that has gone silent) is waited on by the next scrape rather than started again, so an
    outage holds one thread, not one more per scrape."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._running: _Run[T] | None = None

    def start(self, read: Callable[[], T]) -> _Run[T]:
        with self._lock:
            if self._running is None or self._running.finished.is_set():
                self._running = _Run(read, self._name)
            return self._running


class _ReadOutage:
    """Scrapes that could not read the store, logged as one run: a WARNING naming why when
    the first fails, an INFO when the store answers again. Prometheus scrapes every 15 s or
    so, and what writes to the store logs the outage itself: a line (or a traceback) per
    scrape would only bury that."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None
        self._scrapes = 0

    def failed(self, err: Exception) -> None:
        with self._lock:
            self._scrapes += 1
            if self._since is not None:
                return
            self._since = time.monotonic()
        log.warning(
            "reading the store for /metrics failed (%s): scrapes answer carehub_store_up 0, "
            "without the store's gauges, until it answers",
            _reason(err),
        )

    def succeeded(self) -> None:
        with self._lock:
            if self._since is None:
                return
            lasted, scrapes = time.monotonic() - self._since, self._scrapes
            self._since, self._scrapes = None, 0
        log.info(
            "reading the store for /metrics works again after %.1f s (%d scrape(s) answered "
            "without it)",
            lasted,
            scrapes,
        )


def _reason(err: Exception) -> str:
    """The first line of what the driver said (SQLAlchemy's own wrapping left out)."""
    text = str(getattr(err, "orig", None) or err) or type(err).__name__
    return text.strip().split("\n", 1)[0][:200]


class StoreGauges:
    """The gauges read from the store at scrape time (deliveries by status, each
    destination's queue, the routing backlog), for serve's /metrics and a worker's."""

    def __init__(self, table: Callable[[], RouteTable]) -> None:
        #: The routes now (a reload replaces them): every destination they name is exported.
        self.table = table
        self._reads: _OneAtATime[tuple[dict[str, int], HubStatus]] = _OneAtATime(
            "metrics-store-read"
        )
        self._outage = _ReadOutage()

    def start(self, store: MessageStore) -> _Run[tuple[dict[str, int], HubStatus]]:
        """Begin this scrape's read of the store (``collect`` waits for it), so that the
        scrape's other waits on the store run meanwhile."""
        return self._reads.start(
            lambda: (_deliveries_by_status(store), read_status(store, STATUS_WINDOW))
        )

    def collect(
        self, reading: _Run[tuple[dict[str, int], HubStatus]], deadline: float
    ) -> Iterator[GaugeMetricFamily]:
        """What the store says now: deliveries by status, each destination's queue, the
        routing backlog. A store that cannot be read by ``deadline`` leaves them out (the rest
        of the scrape still answers) and sets carehub_store_up to 0."""
        up = GaugeMetricFamily("carehub_store_up", "1 when the store answered this scrape")
        try:
            by_status, status = reading.result(deadline)
        except Exception as err:
            self._outage.failed(err)
            up.add_metric([], 0)
            yield up
            return
        self._outage.succeeded()
        up.add_metric([], 1)
        yield up
        deliveries = GaugeMetricFamily(
            "carehub_deliveries", "Deliveries in the store by status", labels=["status"]
        )
        for name, count in by_status.items():
            deliveries.add_metric([name], count)
        yield deliveries
        yield from _destination_gauges(status, self._destinations(status))
        backlog = GaugeMetricFamily(
            "carehub_routing_backlog", "Messages stored and ACKed, not routed yet"
        )
        backlog.add_metric([], status.routing_backlog)
        yield backlog
        oldest = GaugeMetricFamily(
            "carehub_routing_backlog_oldest_seconds",
            "Seconds the oldest message not routed yet has waited (0 when none waits)",
        )
        oldest.add_metric([], _seconds_since(status, status.oldest_unrouted))
        yield oldest

    def _destinations(self, status: HubStatus) -> list[DestinationState]:
        """The destinations the store has work for, and every one the routes name."""
        found = {(item.destination, item.channel): item for item in status.destinations}
        for name, destination in self.table().destinations.items():
            channel = destination.channel.name
            found.setdefault((name, channel), DestinationState(name, channel))
        return [found[key] for key in sorted(found)]


class HubCollector(Collector):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.store_gauges = StoreGauges(lambda: hub.table)
        self._write_checks: _OneAtATime[bool] = _OneAtATime("metrics-write-check")

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        deadline = time.monotonic() + STORE_PATIENCE
        store = self.hub.store
        reading = self.store_gauges.start(store) if store is not None else None
        messages = CounterMetricFamily(
            "carehub_intake_messages",
            "Frames answered by intake, by listener and outcome",
            labels=["listener", "outcome"],
        )
        for (listener, outcome), count in sorted(self.hub.intake.counts.items()):
            messages.add_metric([listener, outcome], count)
        yield messages
        commits = CounterMetricFamily(
            "carehub_store_commits", "Group commits made by the store writer"
        )
        commits.add_metric([], self.hub.writer.batches)
        yield commits
        rows = CounterMetricFamily("carehub_store_rows", "Messages written by the store writer")
        rows.add_metric([], self.hub.writer.rows)
        yield rows
        writable = GaugeMetricFamily(
            "carehub_store_writable",
            "0 while intake's writes fail (write lock held, disk full) and every message is "
            "answered 'not stored, please resend'; 1 otherwise",
        )
        writable.add_metric([], 1 if self._writable(deadline) else 0)
        yield writable
        if self.hub.worker is not None:
            yield from worker_counters(self.hub.worker)
        if reading is not None:
            yield from self.store_gauges.collect(reading, deadline)
        connections = GaugeMetricFamily(
            "carehub_mllp_connections", "Open MLLP connections", labels=["listener"]
        )
        shed = CounterMetricFamily(
            "carehub_mllp_connections_shed",
            "MLLP connections closed because their peer went over max_connections_per_peer",
            labels=["listener"],
        )
        handshakes = CounterMetricFamily(
            "carehub_mllp_tls_handshakes_failed",
            "TLS handshakes that failed on an MLLP listener (refused certificate, plain TCP, "
            "timeout); the log names the peer and the reason",
            labels=["listener"],
        )
        outside_frames = CounterMetricFamily(
            "carehub_mllp_bytes_outside_frames",
            "Bytes an MLLP listener ignored, unanswered, because no start block (0x0B) came "
            "before them (a message sent unframed, noise between frames); the log names the peer",
            labels=["listener"],
        )
        frames_timed_out = CounterMetricFamily(
            "carehub_mllp_frames_timed_out",
            "MLLP connections closed because a frame under way did not end within "
            "frame_timeout (left unanswered); the log names the peer",
            labels=["listener"],
        )
        for listener in self.hub.mllp_listeners:
            connections.add_metric([listener.name], listener.open_connections)
            shed.add_metric([listener.name], listener.connections_shed)
            handshakes.add_metric([listener.name], listener.handshakes_failed)
            outside_frames.add_metric([listener.name], listener.bytes_outside_frames)
            frames_timed_out.add_metric([listener.name], listener.frames_timed_out)
        yield connections
        yield shed
        yield handshakes
        yield outside_frames
        yield frames_timed_out
        if self.hub.http_listener is not None:
            yield from http_listener_metrics(self.hub.http_listener)

    def _writable(self, deadline: float) -> bool:
        """The writer's answer, which makes a test write while intake's writes fail: taken as
        0 when that write has not answered by ``deadline``."""
        writer = self.hub.writer
        if not writer.failing:
            return True
        try:
            return self._write_checks.start(writer.writable).result(deadline)
        except Exception:
            return False


def http_listener_metrics(
    listener: HTTPListener,
) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """The HTTP listener's connections, the ones it closed (over its limits, or for a request
    that did not come in time), the requests it refused for their bearer token, and with
    TLS its failed handshakes."""
    connections = listener.connections
    open_ = GaugeMetricFamily("carehub_http_connections", "Open HTTP connections")
    open_.add_metric([], connections.open)
    yield open_
    refused = CounterMetricFamily(
        "carehub_http_connections_refused",
        "HTTP connections closed at once because the listener or their peer address was at "
        "max_connections or max_connections_per_peer; the log names the peer",
    )
    refused.add_metric([], connections.refused)
    yield refused
    yield counter_by(
        "carehub_http_connections_timed_out",
        "HTTP connections closed because a request's line and headers (phase head, "
        "header_timeout) or its body (phase body, body_timeout) did not come in time",
        "phase",
        connections.timed_out,
    )
    yield auth_failure_counter(listener.auth_failures)
    if listener.tls:
        https_handshakes = CounterMetricFamily(
            "carehub_http_tls_handshakes_failed",
            "TLS handshakes that failed on the HTTPS listener (refused certificate, plain "
            "HTTP, timeout); the log names the peer and the reason",
        )
        https_handshakes.add_metric([], listener.handshake_failures.count)
        yield https_handshakes


def auth_failure_counter(failures: AuthFailures) -> CounterMetricFamily:
    return counter_by(
        "carehub_http_auth_failures",
        "HTTP requests refused for their bearer token (none, or not a configured one), by "
        "endpoint; the log names the peer",
        "endpoint",
        failures.counts,
    )


def counter_by(
    name: str, documentation: str, label: str, counts: Mapping[str, int]
) -> CounterMetricFamily:
    """A counter with one sample per value of ``label`` counted so far, in order."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


def worker_counters(worker: Worker) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """What a worker counted since it started: messages routed, deliveries sent or skipped,
    attempts failed (serve's in-process worker, or a `carehub worker` of its own); and the
    destinations it takes for down (its breakers), which only it knows."""
    for name, help_text, value in (
        ("carehub_routed_messages", "Messages routed by this worker", worker.routed),
        (
            "carehub_deliveries_sent",
            "Deliveries accepted by their destination",
            worker.delivered,
        ),
        (
            "carehub_deliveries_skipped",
            "Deliveries whose channel found nothing to send (a resend, a cancel of "
            "a notification never sent)",
            worker.skipped,
        ),
        (
            "carehub_delivery_failures",
            "Delivery attempts that failed",
            worker.failed_attempts,
        ),
    ):
        family = CounterMetricFamily(name, help_text)
        family.add_metric([], value)
        yield family
    down = GaugeMetricFamily(
        "carehub_destination_down_seconds",
        "Seconds since this worker took the destination for down (its breaker opened: one "
        "probe at a time, the other deliveries wait unattempted); listed only while it is",
        labels=["destination"],
    )
    for name, breaker in sorted(worker.breakers().items()):
        down.add_metric([name], breaker.down_for())
    yield down


def _deliveries_by_status(store: MessageStore) -> dict[str, int]:
    """Deliveries by status, reading only the rows still in play.

    A GROUP BY status reads every delivery row, payloads and all: 61 ms for 200,000 rows,
    spent on the hub's event loop at each scrape and growing with the store. Every status but
    delivered is counted through its partial index, and delivered is the rest of the total,
    which SQLite counts from the narrowest index (0.5 ms for the same rows). One read, so
    the counts agree with each other."""
    others = [s for s in DeliveryStatus if s not in (*UNFINISHED, DeliveryStatus.DELIVERED)]
    with store.engine.connect() as conn:
        counts: dict[str, int] = {
            name: count
            for name, count in conn.execute(
                select(deliveries.c.status, func.count())
                .where(delivery_in(deliveries, *UNFINISHED))
                .group_by(deliveries.c.status)
            )
        }
        for status in others:
            query = select(func.count()).select_from(deliveries)
            counts[status.value] = conn.execute(
                query.where(delivery_in(deliveries, status))
            ).scalar_one()
        total = conn.execute(select(func.count()).select_from(deliveries)).scalar_one()
    counts[DeliveryStatus.DELIVERED.value] = max(0, total - sum(counts.values()))
    return {name: count for name, count in counts.items() if count}


def _seconds_since(status: HubStatus, then: datetime | None) -> float:
    if then is None:
        return 0.0
    return round(max(0.0, (status.now - then).total_seconds()), 3)


def _destination_gauges(
    status: HubStatus, destinations: list[DestinationState]
) -> Iterator[GaugeMetricFamily]:
    families = {
        "waiting": GaugeMetricFamily(
            "carehub_destination_waiting",
            "Deliveries pending or being sent, by destination",
            labels=_DESTINATION,
        ),
        "retrying": GaugeMetricFamily(
            "carehub_destination_retrying",
            "Of the deliveries waiting, those that failed at least once",
            labels=_DESTINATION,
        ),
        "dead": GaugeMetricFamily(
            "carehub_destination_dead_letters",
            "Deliveries that gave up (dead letters), until retried",
            labels=_DESTINATION,
        ),
        "held": GaugeMetricFamily(
            "carehub_destination_held",
            "Of the deliveries waiting, those held behind a dead letter of their patient's line",
            labels=_DESTINATION,
        ),
        "oldest": GaugeMetricFamily(
            "carehub_destination_oldest_waiting_seconds",
            "Seconds the longest-waiting delivery has waited since it was planned (0: none)",
            labels=_DESTINATION,
        ),
        "paused": GaugeMetricFamily(
            "carehub_destination_paused",
            "1 while an operator has paused the destination (nothing is sent to it), else 0",
            labels=_DESTINATION,
        ),
    }
    for item in destinations:
        labels = [item.destination, item.channel]
        families["waiting"].add_metric(labels, item.waiting)
        families["retrying"].add_metric(labels, item.retrying)
        families["dead"].add_metric(labels, item.dead)
        families["held"].add_metric(labels, item.held)
        oldest = item.oldest_waiting if item.waiting else None
        families["oldest"].add_metric(labels, _seconds_since(status, oldest))
        families["paused"].add_metric(labels, 1 if item.paused else 0)
    yield from families.values()


def make_registry(hub: Hub) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class WorkerCollector(Collector):
    """A `carehub worker`'s /metrics: in a scale-out deployment serve routes nothing, so the
    routing and delivery counters are each worker's to export (sum them across workers; the
    store gauges are the same on every process, so take their max)."""

    def __init__(self, worker: Worker, auth_failures: AuthFailures | None = None) -> None:
        self.worker = worker
        self.store_gauges = StoreGauges(lambda: worker.table)
        self.auth_failures = auth_failures

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        deadline = time.monotonic() + STORE_PATIENCE
        reading = self.store_gauges.start(self.worker.store)
        yield from worker_counters(self.worker)
        connected = GaugeMetricFamily(
            "carehub_worker_broker_connected",
            "1 while this worker's consumer has its broker connection, 0 while it is lost",
        )
        connected.add_metric([], 0 if self.worker.broker_lost is not None else 1)
        yield connected
        if self.auth_failures is not None:
            yield auth_failure_counter(self.auth_failures)
        yield from self.store_gauges.collect(reading, deadline)


def make_worker_registry(
    worker: Worker, auth_failures: AuthFailures | None = None
) -> CollectorRegistry:
    """The worker's registry; ``auth_failures``: its HTTP port's refused requests."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(worker, auth_failures))
    return registry
