"""The worker: routes queued messages, then delivers what the routes planned.

Routing takes message ids from the work queue in arrival order, runs each message through the
route table, and commits the results (step outputs, deliveries, new status) in batches. The
delivery loop claims due deliveries from the store and sends them concurrently, at most
``per_destination`` at a time to any one destination, so a slow or failing destination never
holds up the others; failed attempts are retried with backoff until they become dead letters.
A dead letter holds its patient's line to its destination (``retry.after_dead_letter``) until an
operator retries or discards it; the deliveries behind it wait, parked (see carehub.store.outbox).

In the embedded default the worker runs inside ``carehub serve`` on the hub's own event loop,
beside the listeners; for scale-out, ``carehub worker`` runs it alone, on as many hosts as
needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlalchemy import exc as sql_errors

from carehub.components import (
    DeliveryError,
    NothingToSend,
    Outgoing,
    SendNotStarted,
    worker_stopping,
)
from carehub.config import WorkerConfig, without_password
from carehub.errors import CarehubError
from carehub.plugins import PluginHost
from carehub.routing.router import Router, fits_the_loop, order_key
from carehub.routing.table import Destination, RouteTable
from carehub.store.failure_run import FailureRun
from carehub.store.group_commit import StoreUnavailable
from carehub.store.outbox import AttemptResult, DeliveryRecord, Handover, Outbox
from carehub.store.processes import running_processes
from carehub.store.schema import MessageStatus
from carehub.store.store import MessageStore, StoredMessage, StoreError
from carehub.timespans import span_text
from carehub.workqueue import Consumer, QueueUnavailable, WorkQueue

log = logging.getLogger(__name__)

T = TypeVar("T")

ROUTE_BATCH = 100
#: After the first queue message, routing gathers more for this long (or up to ROUTE_BATCH
#: ids): under a steady feed the ids arrive a commit group at a time, and routing each group
#: alone cost 390 µs a message against 351 µs in batches of 50 (single-threaded, bench route).
ROUTE_GATHER = 0.01
#: With the store called inline (SQLite), routing gives the event loop back after every this
#: many messages, so intake keeps answering while a batch is routed.
ROUTE_CHUNK = 16
RESULT_FLUSH_SECONDS = 0.05
CLAIM_INTERVAL = 0.02  # seconds between claims while sends are in hand or in flight
RESULT_FLUSH_COUNT = 200
#: Seconds between the sweeps of the workers (see _sweep_loop).
SWEEP_SECONDS = 30.0
#: A message stored this many seconds ago and still not routed is taken for one lost from the
#: queue and queued again by the next sweep: so within UNROUTED_AGE + SWEEP_SECONDS of being
#: stored (50 s; README: "within a minute").
UNROUTED_AGE = 20.0
#: Seconds between readings of which route sets the running processes load.
ROUTE_SETS_CHECK = 15.0
#: Seconds before routing a batch the store refused again, doubling up to the most.
ROUTE_RETRY = 0.5
ROUTE_RETRY_MAX = 5.0
STORE_RETRY = 0.5  # seconds before recording results again after the store refused
#: A worker renews the leases of the deliveries it holds this many times a lease.
LEASE_RENEWALS = 3
#: Seconds between reads of which destinations operators paused. Claims skip a paused
#: destination at once (the store says so); this bounds how long deliveries already in hand
#: for it may still start.
PAUSE_CHECK = 1.0
#: A receipt that is not text is recorded as its repr, clipped to this many characters.
RECEIPT_TEXT_LIMIT = 200
#: On stop, seconds the sends under way get to finish. Those still running then are cut off
#: and handed back unsent, so the hub exits well inside a service manager's stop timeout
#: (systemd: 90 s) however many sends wait behind a slow destination.
STOP_GRACE = 10.0
#: Seconds a send cut off at stop gets to end (a channel drops its connection).
CUT_OFF_WAIT = 2.0
#: Seconds between the log's summaries of a destination that keeps failing.
TROUBLE_REPORT_SECONDS = 30.0
#: A destination's retries are brought forward when it works again after failing for at least
#: this many seconds, and at most once in RETRY_SOON_EVERY seconds (Worker._retry_soon). Such an
#: early attempt that fails is not counted against max_attempts, and its delivery keeps the
#: retry time it had (Outbox.claim_early).
RETRY_SOON_AFTER = 30.0
RETRY_SOON_EVERY = 300.0
#: A destination is taken for down (Breaker) after this many failed attempts in a row (to be
#: retried: a refusal for good is about the message), of BREAKER_DELIVERIES deliveries or
#: more, the first at least BREAKER_SECONDS before the last. Three of two deliveries, so one
#: dropped connection, or one message the destination keeps refusing, is not an outage; two
#: seconds, so the sends in flight at one moment failing together (a connection pool reset, a
#: load balancer swap) are ridden out by ordinary retries, while a destination refusing
#: everything for longer costs at most a couple of seconds of attempts (with 400 patients
#: waiting and connections refused, about 175 attempt rows a second). Opening on a blip costs
#: little: the first probe goes at the first retry delay.
BREAKER_FAILURES = 3
BREAKER_DELIVERIES = 2
BREAKER_SECONDS = 2.0
#: Seconds before looking again for a delivery to probe a down destination with, when none
#: was due.
PROBE_RECHECK = 1.0
#: A process queueing from another store is said at most once in this many seconds per store.
WRONG_STORE_LOG_EVERY = 300.0
#: Seconds without a failure after which a kind of store call is taken to work again
#: (StoreTrouble): longer than routing's longest pause between tries (ROUTE_RETRY_MAX).
STORE_TROUBLE_QUIET = 60.0
#: The most of a failure's own words a log line carries.
REASON_LOG_LIMIT = 200


@dataclass(slots=True)
class WorkerSettings:
    delivery_concurrency: int = 128
    per_destination: int = 32
    poll_interval: float = 0.5
    #: No other process can hold a delivery lease (the embedded hub: SQLite and the
    #: in-process queue), so every lease left at start is a crashed run's, released at once.
    single_host: bool = True
    tick_interval: float = 30.0
    lease: float = 60.0  # seconds; see WorkerConfig.lease_seconds
    send_timeout: float = 300.0  # seconds; see WorkerConfig.send_timeout

    @classmethod
    def from_config(cls, config: WorkerConfig, *, single_host: bool) -> WorkerSettings:
        return cls(
            config.delivery_concurrency,
            config.per_destination,
            config.poll_interval,
            single_host=single_host,
            tick_interval=config.tick_interval,
            lease=config.lease_seconds,
            send_timeout=config.send_timeout,
        )


class Worker:
    def __init__(
        self,
        store: MessageStore,
        table: RouteTable,
        host: PluginHost,
        work_queue: WorkQueue,
        settings: WorkerSettings | None = None,
    ) -> None:
        self.store = store
        self.outbox = Outbox(store)
        self.table = table
        self.host = host
        self.work_queue = work_queue
        self.settings = settings or WorkerSettings()
        self.router = Router(table, host)
        #: SQLite: store calls run right on the event loop. A SQLite call is a short local
        #: operation, while a hop to a helper thread, and every GIL hand-back inside SQLite
        #: while other threads want it, cost more than the call (bench/bench_routing.py
        #: --quick, embedded default: 600-700 msg/s end to end with routing and store calls on
        #: helper threads and the worker on a thread of its own; 740-856 inline on the hub's
        #: loop). PostgreSQL calls wait on the network and go to a helper thread.
        self.inline_store = store.is_sqlite
        self._say_where_routing_runs(self.router)
        #: When each foreign store's messages were last reported (see _other_store).
        self._wrong_store_logged: dict[str, float] = {}
        self.routed = 0
        self.delivered = 0
        #: Deliveries whose channel found nothing to send (NothingToSend).
        self.skipped = 0
        self.failed_attempts = 0
        #: Sends that were still waiting for their turn on a channel when the stop began.
        self.handed_back_at_stop = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        #: (message ids, ack) per queue message; None ends the routing loop.
        self._inbox: asyncio.Queue[tuple[list[int], Callable[[], None]] | None] = asyncio.Queue()
        self._wake_delivery = Wakeup()
        self._results: list[AttemptResult] = []
        #: Deliveries leased to this worker (in hand, being sent, or sent with the result not
        #: written yet) -> the lease end it last wrote. The store leaves a write about one
        #: (renewal, result, hand-back) out unless that is still its lease: once a lease ran
        #: out, another worker may have claimed the delivery (Outbox._still_held).
        self._leases: dict[int, datetime] = {}
        #: Held around every write that names leases, so a renewal never changes a lease
        #: between a result's reading of it and the store's check of it.
        self._lease_writes = asyncio.Lock()
        self._inflight: dict[int, str] = {}  # delivery id -> destination
        self._inflight_to: Counter[str] = Counter()  # destination -> sends in flight
        self._claimed: list[DeliveryRecord] = []  # leased, not started yet
        self._stop = asyncio.Event()
        self._sending: set[asyncio.Task[None]] = set()
        self._consumer: Consumer | None = None
        #: id(table) -> routing batches, sends and ticks running on it now, so a table
        #: replaced by a route reload is closed only once they are done with it.
        self._uses: Counter[int] = Counter()
        self._retiring: set[asyncio.Task[None]] = set()
        #: Stopping, and the sends in flight are done (or given up on): leases end with it.
        self._drained = asyncio.Event()
        #: Destinations paused by an operator, as last read (see PAUSE_CHECK).
        self._paused: frozenset[str] = frozenset()
        self._paused_read = float("-inf")
        #: (destination, type name) of receipts that were not text, said once each.
        self._odd_receipts: set[tuple[str, str]] = set()
        #: Destinations left to workers whose routes have them (see _leave_to_others).
        self._foreign: set[str] = set()
        self._route_sets_read = float("-inf")
        self._route_sets_differ = False
        #: The store refusing this worker (locked, down): every loop meets it at once, so it
        #: is logged as one run (start, every 30 s, end) rather than by each loop each try.
        self.store_trouble = StoreTrouble(
            FailureRun(
                "the worker's use of the store",
                "routing, claims, results and leases wait and are tried again",
                "call(s)",
                logger=log,
            )
        )
        #: Destinations whose sends fail, each logged as a run (see DestinationTrouble).
        self._trouble: dict[str, DestinationTrouble] = {}
        #: Each destination's breaker (see Breaker): while open, its deliveries wait unclaimed
        #: but for one probe at a time.
        self._breakers: dict[str, Breaker] = {}
        #: When each destination's retries were last brought forward (see _retry_soon).
        self._brought_forward: dict[str, float] = {}
        #: Destinations whose retries are being taken early (see _claim_early), with how
        #: many so far.
        self._bringing_forward: dict[str, int] = {}
        #: A component's periodic work that keeps failing the same way, logged as a run.
        self.tick_trouble = FailureRun(
            "periodic work", "tried again at the next tick", "tick(s)", logger=log
        )
        #: The sweep's queueing of messages not routed yet, failing because the broker
        #: cannot be reached: the broker's trouble, not the store's.
        self.broker_trouble = FailureRun(
            "queueing messages not routed yet on the broker",
            "tried again at the next sweep",
            "sweep(s)",
            logger=log,
            traceback=False,
        )
        #: Why the worker stopped by itself (see _halt); run() raises it once it has stopped.
        self._halted: CarehubError | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, started: Callable[[], None] | None = None) -> None:
        """Route and deliver until ``stop`` is set; ``started`` is called once the worker is
        consuming. A worker that cannot go on (WrongStore) sets ``stop`` itself, and raises
        why once it has stopped."""
        self._loop = asyncio.get_running_loop()
        self._stop = stop
        await self.table.start()
        if self.settings.single_host:
            await asyncio.to_thread(self.outbox.release_leases)
        await asyncio.to_thread(self._apply_line_policy)
        store_id = await asyncio.to_thread(lambda: self.store.instance_id)
        self._consumer = self.work_queue.consumer(self._queued, store_id, self._other_store)
        await asyncio.to_thread(self._consumer.start)
        await asyncio.to_thread(self._requeue_unrouted)
        # Sends started from here on see the stop: one still waiting for its turn on a
        # channel when it comes gives up (SendNotStarted) instead of waiting out the grace.
        stopping_seen = worker_stopping.set(stop)
        tasks = [
            asyncio.create_task(self._route_loop(), name="route"),
            asyncio.create_task(self._delivery_loop(), name="deliver"),
            asyncio.create_task(self._sweep_loop(), name="sweep"),
            asyncio.create_task(self._tick_loop(), name="tick"),
            asyncio.create_task(self._trouble_loop(), name="trouble"),
        ]
        # Renewals go on through the stop's drain, until the last send under way has ended:
        # a lease left to run out meanwhile let another worker send the same delivery again.
        leases = asyncio.create_task(self._lease_loop(), name="leases")
        if started is not None:
            started()
        try:
            await stop.wait()
        finally:
            # The loops end by themselves when `stop` is set, rather than being cancelled:
            # on Python 3.11 a cancellation that races a completing asyncio.wait_for is lost
            # (CPython gh-86296) and a cancelled loop could then run on forever.
            self._inbox.put_nowait(None)
            self._wake_delivery.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Deliveries in hand but not started are not started now: back in line at once,
            # for the next start (or another worker) to send without waiting for the lease.
            not_started, self._claimed = self._claimed, []
            await self._hand_back([d.id for d in not_started])
            await self._drain_inflight()
            self._drained.set()
            await asyncio.gather(leases, return_exceptions=True)
            worker_stopping.reset(stopping_seen)
            await asyncio.to_thread(self._consumer.stop)
            await asyncio.gather(*self._retiring, return_exceptions=True)
            await self.table.close()
        if self._halted is not None:
            raise self._halted

    @property
    def broker_lost(self) -> tuple[datetime, str] | None:
        """Since when, and why, this worker's consumer has been without its broker."""
        return self._consumer.lost if self._consumer is not None else None

    def _other_store(self, queued_by: str) -> bool:
        """Called on the consumer thread: a queue message came from another store than this
        worker's. Who is wrong? When a `serve` is running on this worker's store, this worker
        is where the hub is, and the message came from a process on another store (a serve
        whose store.url came out wrong): the message is dropped from the queue (its store
        keeps it) and an ERROR says so, at most every WRONG_STORE_LOG_EVERY seconds. Otherwise
        this worker is the one on the wrong store: it hands the message back and stops."""
        assert self._loop is not None
        own = self.store.instance_id
        if self._serve_runs_on_my_store():
            now = time.monotonic()
            last = self._wrong_store_logged.get(queued_by, float("-inf"))
            if now - last >= WRONG_STORE_LOG_EVERY:
                self._wrong_store_logged[queued_by] = now
                log.error(
                    "the work queue holds messages queued by store %s, not this deployment's "
                    "store %s, where a serve is running: a process queues from another store "
                    "(its store.url names another database, or an unset variable in it gave it "
                    "a SQLite store of its own). Its messages are dropped from the queue and "
                    "stay in its store until it is set right; this worker goes on",
                    queued_by,
                    own,
                )
            return False
        where = without_password(str(self.store.engine.url))
        problem = WrongStore(
            f"the work queue holds messages queued by store {queued_by}, but this worker's "
            f"store is {own} ({where}): its store.url names another store than the processes "
            "that queue to this broker (an empty or unset variable in it gives a SQLite store "
            "of its own). The message was handed back to the queue for a worker on the right "
            "store; this worker stops"
        )
        self._loop.call_soon_threadsafe(self._halt, problem)
        return True

    def _serve_runs_on_my_store(self) -> bool:
        """Whether a `serve` other than this process has checked in on this worker's store
        lately (the processes table); a store that cannot be read says no."""
        try:
            with self.store.engine.connect() as conn:
                processes = running_processes(conn)
        except Exception:
            return False
        now = datetime.now(UTC)
        return any(p.role == "serve" and not p.stale(now) for p in processes)

    def _halt(self, problem: CarehubError) -> None:
        """Stop the worker because it cannot go on; run() raises ``problem`` once stopped."""
        if self._halted is None:
            self._halted = problem
        self._stop.set()

    async def replace_routing(self, table: RouteTable, host: PluginHost) -> None:
        """Route and send with ``table`` (started already) from now on: a route reload.
        The old table closes once the routing and sends already under way on it finish;
        deliveries planned for a destination the new table lacks (by its name or a former
        one) become dead letters when sent, "no longer configured", as after a restart."""
        if self._stop.is_set():  # stopping: the old table is closed by run()
            await table.close()
            return
        old = self.table
        self.table, self.host = table, host
        self.router = Router(table, host)
        self._say_where_routing_runs(self.router)
        self._foreign.clear()  # claimed again: sent if the new routes have them
        # A destination the routes no longer have is not probed: its deliveries become dead
        # letters ("no longer configured") as they are claimed.
        for name in [n for n in self._breakers if table.destination(n) is None]:
            del self._breakers[name]
        self._route_sets_read = float("-inf")
        task = asyncio.create_task(self._close_when_unused(old), name="close old routes")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        try:
            # Line holding follows each destination's retry.after_dead_letter as it is now.
            await asyncio.to_thread(self._apply_line_policy)
        except Exception:
            log.exception("applying the reloaded routes' line policies failed")

    async def _close_when_unused(self, table: RouteTable) -> None:
        """Close a replaced table once nothing runs on it (or the worker stops, after its
        sends in flight are drained)."""
        try:
            while self._uses[id(table)] > 0 and not self._drained.is_set():
                await asyncio.sleep(0.05)
        finally:
            self._uses.pop(id(table), None)
            try:
                await table.close()
            except Exception:
                log.exception("closing the replaced routes' components failed")

    @contextlib.contextmanager
    def _using(self, table: RouteTable) -> Iterator[RouteTable]:
        """Count ``table`` as in use for the block (see _close_when_unused)."""
        self._uses[id(table)] += 1
        try:
            yield table
        finally:
            self._uses[id(table)] -= 1

    async def _store_call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a store operation inline (SQLite) or on a helper thread (PostgreSQL)."""
        if self.inline_store:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    async def _pause(self, seconds: float, until: asyncio.Event | None = None) -> bool:
        """Sleep, but wake for stop (or ``until``); True while the worker should go on."""
        end = self._stop if until is None else until
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(end.wait(), seconds)
        return not end.is_set()

    async def _tick_loop(self) -> None:
        """Components' periodic work (stale visits, overdue follow-ups, digests)."""
        while await self._pause(self.settings.tick_interval):
            try:
                with self._using(self.table) as table:
                    await asyncio.to_thread(table.tick, datetime.now(UTC))
            except Exception as err:
                self._failed(err, "ticks", self.tick_trouble)
            else:
                self.tick_trouble.succeeded()
                self.store_trouble.succeeded("ticks")
            self._wake_delivery.set()

    async def _trouble_loop(self) -> None:
        """For each destination whose sends fail (DestinationTrouble), three times a summary
        period: read how many deliveries wait for it, for its next summary, or end its run
        when this worker has seen no failed attempt for a whole period."""
        while await self._pause(TROUBLE_REPORT_SECONDS / 3):
            now = time.monotonic()
            for name, trouble in list(self._trouble.items()):
                trouble.end_if_quiet(now)
                if not trouble.failing:
                    continue
                try:
                    trouble.waiting = await self._store_call(self.outbox.waiting_for, name)
                except Exception as err:  # said by the store's own run; the count stays out
                    trouble.waiting = None
                    self._failed(err, "waiting counts")
                else:
                    self.store_trouble.succeeded("waiting counts")

    async def _sweep_loop(self, every: float = SWEEP_SECONDS) -> None:
        """Re-queue messages lost from the queue and mend parked lines (Outbox.tidy_lines).
        A broker that cannot take the re-queued ids is logged as the broker's trouble, and
        the lines are mended all the same."""
        while await self._pause(every):
            try:
                try:
                    await asyncio.to_thread(self._requeue_unrouted, UNROUTED_AGE)
                except QueueUnavailable as err:
                    self.broker_trouble.failed(err)
                else:
                    self.broker_trouble.succeeded()
                await asyncio.to_thread(self.outbox.tidy_lines)
            except Exception as err:
                if not _store_refused(err):
                    log.exception("re-queueing unrouted messages failed")
                else:
                    self.store_trouble.failed("sweeps", _StoreRefusal(_store_error(err)))
            else:
                self.store_trouble.succeeded("sweeps")

    async def _lease_loop(self) -> None:
        """Keep the leases of the deliveries this worker holds, and put back in line those
        whose worker stopped renewing them (it died mid-send).

        A lease is short and renewed rather than long and fixed: a fixed five-minute lease
        left a killed worker's sends, and each patient's later messages behind them, waiting
        five to six minutes on another worker; and a send slower than the lease (a channel
        timeout set above it, a receiver that answers late) was claimed by a second worker
        and sent twice. Now a held delivery stays held however long its send takes, and a
        dead worker's come back within one lease and one renewal interval. A stopping
        worker renews until its last send has ended (see run)."""
        lease = timedelta(seconds=self.settings.lease)
        while await self._pause(self.settings.lease / LEASE_RENEWALS, until=self._drained):
            stopping = self._stop.is_set()
            if self._foreign and not stopping:
                await self._routes_differ()  # once they agree, this worker claims them again
            try:
                await self._renew_leases(lease)
                # Another worker's deliveries: left to the workers that go on.
                released = (
                    0 if stopping else await self._store_call(self.outbox.release_expired_leases)
                )
            except Exception as err:  # the store is locked or down: try at the next renewal
                self._failed(err, "leases")
                continue
            self.store_trouble.succeeded("leases")
            if released:
                log.warning(
                    "%d delivery(ies) whose worker stopped renewing their lease (it stopped "
                    "mid-send) are back in line",
                    released,
                )
                self._wake_delivery.set()

    async def _renew_leases(self, lease: timedelta) -> None:
        """Renew the leases this worker holds. One the store no longer holds for it (it ran
        out while the store or this process stalled, and another worker took it) is this
        worker's no more: not started if still in hand, its result not recorded if sent."""
        async with self._lease_writes:
            if not self._leases:
                return
            held = dict(self._leases)
            renewed = await self._store_call(self.outbox.renew_leases, held, lease)
            lost = held.keys() - renewed.keys()
            for delivery_id in lost:
                del self._leases[delivery_id]
            self._leases.update(renewed)
        if lost:
            log.warning(
                "%d delivery(ies) this worker held were taken by another worker after their "
                "lease ran out; left to it",
                len(lost),
            )

    def _apply_line_policy(self) -> None:
        """Deliveries waiting and dead letters go in the line the routes give their
        destination now (forwards that reach one receiving system share one), dead letters
        get their destination's ``retry.after_dead_letter`` as the routes say
        now (a setting changed since, or dead letters from before lines were held), and the
        log says how many deliveries wait behind dead letters: after an upgrade or a long
        outage, those lines move only when an operator retries or discards."""
        holding: list[str] = []
        going_on: list[str] = []
        limits: dict[str, tuple[int, int]] = {}  # retry limits, for the deliveries waiting
        names = {name: name for name in self.table.destinations}
        names.update(self.table.former_names)
        for name, current in names.items():
            destination = self.table.destinations.get(current)
            if destination is not None:
                holds = destination.retry.holds_line(destination.channel.name)
                (holding if holds else going_on).append(name)
                limits[name] = (
                    destination.retry.max_attempts,
                    destination.retry.give_up_seconds,
                )
        self.outbox.apply_line_policy(holding, going_on, self.table.lines())
        self.outbox.apply_retry_limits(limits)
        held = sum(self.outbox.held().values())
        if held:
            log.warning(
                "%d delivery(ies) wait behind dead letters that hold their patient's line: "
                "see `carehub dead-letters list`, then retry or discard them",
                held,
            )

    def _requeue_unrouted(self, older_than: float = 0.0) -> None:
        """Anything stored but not routed (lost from an in-process queue at a crash, or
        published to a broker that lost it) is queued again. Routing skips a message that
        is already routed, so queueing one twice is harmless."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
        ids = self.outbox.unrouted_message_ids(received_before=cutoff)
        if not ids:
            return
        messages = self.store.get_many(ids)
        publisher = self.work_queue.publisher(self.store.instance_id)
        try:
            publisher.publish_many((m.id, order_key(m)) for m in messages)
        finally:
            publisher.close()
        log.info("queued %d stored message(s) that were not routed yet", len(ids))

    def _queued(self, message_ids: list[int], ack: Callable[[], None]) -> None:
        """Called on the consumer thread for each queue message (the ids of one partition
        from one commit group)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._inbox.put_nowait, (message_ids, ack))

    # -- routing --------------------------------------------------------------------------
    async def _route_loop(self) -> None:
        """Batches are routed one at a time, so arrival order per patient holds; the event
        loop keeps sending meanwhile (between chunks inline, throughout on a helper thread)."""
        while True:
            taken = [await self._inbox.get()]
            count = len(taken[0][0]) if taken[0] else 0
            if taken[0] is not None and count < ROUTE_BATCH:
                await asyncio.sleep(ROUTE_GATHER)
            while taken[-1] is not None and count < ROUTE_BATCH and not self._inbox.empty():
                item = self._inbox.get_nowait()
                taken.append(item)
                count += len(item[0]) if item else 0
            batch = [item for item in taken if item is not None]
            if batch:
                ids = [message_id for message_ids, _ in batch for message_id in message_ids]
                if not await self._route_until_done(ids):
                    return  # stopping: unacked, the queue gives them to the next worker
                for _, ack in batch:
                    ack()
                self._wake_delivery.set()
            if len(batch) < len(taken):  # the stop marker was among them
                return

    async def _route_until_done(self, ids: list[int]) -> bool:
        """Route one batch, trying the same batch again while the store refuses, before any
        later one: a batch given up on stayed unacked, held a place of the consumer's
        prefetch for good (200 such and the worker got nothing more), and its messages were
        routed a minute later by the sweep, after their patients' later messages. False when
        the worker stops first."""
        pause = ROUTE_RETRY
        while True:
            router = self.router  # a route reload meanwhile applies from the next try
            try:
                with self._using(router.table):
                    await self._route_chunks(ids, router)
            except Exception as err:
                problem = err
                if not _store_refused(err):
                    # Not the store: something about one message no try will mend. Each is
                    # routed alone, and one that fails so is set aside, failed with the reason.
                    try:
                        with self._using(router.table):
                            await self._route_each(ids, router)
                        self.store_trouble.succeeded("routing")
                        return True
                    except Exception as refused:  # the store, meanwhile: as below
                        problem = refused
                self._failed(problem, "routing")
                if not await self._pause(pause):
                    return False
                pause = min(pause * 2, ROUTE_RETRY_MAX)
                continue
            self.store_trouble.succeeded("routing")
            return True

    def _longest_retry_wait(self, destination: str) -> float:
        """The longest a delivery to ``destination`` waits between attempts, by its route's
        retry settings (0 when the routes no longer have it)."""
        found = self.table.destination(destination)
        if found is None:
            return 0.0
        return found.retry.max_delay * (1 + found.retry.jitter)

    def _say_where_routing_runs(self, router: Router) -> None:
        """On SQLite routing runs on the hub's event loop unless a step may wait per message
        (Component.may_block): then on a helper thread, and the log says which steps."""
        if self.inline_store and router.steps_that_may_block:
            log.info(
                "routing runs on a helper thread, so listeners answer while these steps wait: %s",
                "; ".join(router.steps_that_may_block),
            )

    async def _route_chunks(self, ids: list[int], router: Router) -> None:
        if self.inline_store and not router.steps_that_may_block:
            for start in range(0, len(ids), ROUTE_CHUNK):
                messages = self._to_route(ids[start : start + ROUTE_CHUNK])
                handover = self._handover()
                if all(fits_the_loop(m) for m in messages):
                    self._take(self._route_messages(messages, handover, router))
                else:
                    # Routing it can take seconds: on the loop, every listener's ACKs wait.
                    self._take(
                        await asyncio.to_thread(self._route_messages, messages, handover, router)
                    )
                await asyncio.sleep(0)
        else:
            handover = self._handover()
            self._take(await asyncio.to_thread(self._route_batch, ids, handover, router))

    async def _route_each(self, ids: list[int], router: Router) -> None:
        """Route message by message; a store refusal is raised (the batch is tried again)."""
        for message_id in ids:
            try:
                await self._route_chunks([message_id], router)
            except Exception as err:
                if _store_refused(err):
                    raise
                log.error(
                    "message %d cannot be routed (%s); marked failed",
                    message_id,
                    type(err).__name__,
                )
                log.debug("routing message %d failed", message_id, exc_info=True)
                reason = f"routing failed: {type(err).__name__} (see the worker's log)"
                await self._store_call(
                    self.store.set_status, message_id, MessageStatus.FAILED, reason
                )

    def _failed(self, err: BaseException, operation: str, run: FailureRun | None = None) -> None:
        """Count a failure of ``operation`` in its run: a store that refused goes in the
        store's run in the store's own words (never the statement and its parameters, which
        can quote a message); anything else in ``run``, or in the store's run when none."""
        if _store_refused(err):
            self.store_trouble.failed(operation, _StoreRefusal(_store_error(err)))
        elif run is not None:
            run.failed(err)
        else:
            self.store_trouble.failed(operation, err)

    def _route_batch(
        self, message_ids: list[int], handover: Handover, router: Router | None = None
    ) -> Handover:
        """Route and record a batch; ``handover`` comes back with the deliveries it leased
        to this worker."""
        return self._route_messages(self._to_route(message_ids), handover, router or self.router)

    def _to_route(self, message_ids: list[int]) -> list[StoredMessage]:
        """The messages of a batch still to be routed, in arrival order, with any earlier
        message of the same patients still waiting (see MessageStore.unrouted_before)."""
        taken = self.store.take_for_routing(message_ids)
        missing = set(message_ids).difference(m.id for m in taken)
        if missing:
            _say_not_in_store(sorted(missing))
        # In arrival order (ids are given at intake): a batch gathers several partitions'
        # queues one after another, and one patient's messages can sit in two of them (a
        # duplicate registration's id before the A40 that merges it).
        messages = sorted(
            (m for m in taken if m.status == MessageStatus.RECEIVED.value),
            key=lambda m: m.id,
        )
        if not messages:
            return []
        stranded = self.store.unrouted_before(messages)
        if stranded:
            # A patient's earlier message goes first, whichever way it comes back.
            log.info("routing %d earlier message(s) of the same patients first", len(stranded))
            earlier = [
                m for m in self.store.get_many(stranded) if m.status == MessageStatus.RECEIVED.value
            ]
            messages = sorted([*earlier, *messages], key=lambda m: m.id)
        return messages

    def _route_messages(
        self, messages: list[StoredMessage], handover: Handover, router: Router
    ) -> Handover:
        """Route and record messages taken by ``_to_route``."""
        if not messages:
            return handover
        host = router.host
        results = []
        for message in messages:
            host.notify("carehub_message_received", message=message)
            results.append(router.route(message))
        recorded = set(self.outbox.record_routing(results, handover))
        self.routed += len(recorded)
        for message, result in zip(messages, results, strict=True):
            if message.id in recorded:
                routes = [r.route for r in result.matched]
                host.notify("carehub_message_routed", message=message, routes=routes)
        return handover

    def _handover(self) -> Handover:
        """The room this worker has for deliveries routing plans now (see Handover): what a
        claim would take, under the same limits."""
        return Handover(
            max(0, self._room()),
            timedelta(seconds=self.settings.lease),
            frozenset(self._full_destinations()),
        )

    def _room(self) -> int:
        """How many more deliveries this worker takes in hand: two rounds of sends."""
        return 2 * self.settings.delivery_concurrency - len(self._claimed)

    def _take(self, handover: Handover) -> None:
        if handover.taken:
            self._hold(handover.taken)
            self._wake_delivery.set()

    def _hold(self, leased: list[DeliveryRecord]) -> None:
        """Take deliveries just leased to this worker in hand, and keep their leases."""
        for delivery in leased:
            assert delivery.lease_until is not None, "a delivery in hand is leased"
            self._leases[delivery.id] = delivery.lease_until
        self._claimed.extend(leased)

    def _full_destinations(self) -> list[str]:
        """Destinations with plenty in hand get no more, so a slow one cannot fill the hand
        and starve the others."""
        in_hand = Counter(self._inflight.values())
        in_hand.update(d.destination for d in self._claimed)
        limit = 2 * self.settings.per_destination
        full = [d for d, n in in_hand.items() if n >= limit and self._limited(d)]
        # Those left to other workers, and those taken for down (probed one at a time).
        return full + sorted((self._foreign | self.down_destinations()) - set(full))

    def down_destinations(self) -> set[str]:
        """The destinations whose breaker is open: taken for down, probed one at a time."""
        return {name for name, breaker in self._breakers.items() if breaker.is_open}

    def breakers(self) -> dict[str, Breaker]:
        """The open breakers by destination (what /metrics shows)."""
        return {name: b for name, b in self._breakers.items() if b.is_open}

    # -- delivery -------------------------------------------------------------------------
    async def _delivery_loop(self) -> None:
        """Claim deliveries in batches (a claim is one query however many it takes), keep
        them in hand, and start each as its destination has room."""
        settings = self.settings
        lease = timedelta(seconds=settings.lease)
        last_flush = last_claim = time.monotonic()
        while not self._stop.is_set():
            # Attempt results are written in groups, and deliveries claimed in groups: one
            # transaction per send would cost more than the sends themselves (measured
            # single-threaded: 167 µs a message recording results 26 at a time, 84 µs at 100).
            # See inline_store for where the store calls run. An idle worker (nothing in hand,
            # nothing in flight) records and claims at once: the next delivery in a patient's line
            # cannot be claimed until this result is written (one patient's backlog drained at
            # about 12 messages a second waiting for the timer).
            now = time.monotonic()
            idle = not self._claimed and not self._inflight
            due = idle or now - last_flush >= RESULT_FLUSH_SECONDS
            if self._results and (due or len(self._results) >= RESULT_FLUSH_COUNT):
                results, self._results = self._results, []
                kept = await self._record_results(results)
                if kept:  # the store is locked or down: keep them, try again
                    self._results[:0] = kept
                    if not await self._pause(STORE_RETRY):
                        break
                    continue
                last_flush = time.monotonic()
            hand_low = len(self._claimed) < settings.delivery_concurrency
            if hand_low and (idle or now - last_claim >= CLAIM_INTERVAL):
                want = self._room()
                held = [d.id for d in self._claimed] + list(self._inflight)
                full = self._full_destinations()
                try:
                    self._hold(
                        await self._store_call(self.outbox.claim_due, want, lease, None, full, held)
                    )
                except Exception as err:  # the store is locked or down: claim again later
                    self._failed(err, "claims")
                else:
                    self.store_trouble.succeeded("claims")
                if self._bringing_forward:
                    await self._claim_early(lease)
                last_claim = time.monotonic()
            if any(b.is_open for b in self._breakers.values()):
                await self._claim_probes(lease)
                await self._hand_back_behind_breakers()
            if time.monotonic() - self._paused_read >= PAUSE_CHECK:
                await self._read_paused()
            waiting: list[DeliveryRecord] = []
            for delivery in self._claimed:
                if delivery.id not in self._leases:
                    continue  # its lease ran out and another worker has it (_renew_leases)
                room = len(self._inflight) < settings.delivery_concurrency and (
                    self._inflight_to[delivery.destination] < settings.per_destination
                    or not self._limited(delivery.destination)
                )
                if not room:
                    waiting.append(delivery)
                    continue
                self._inflight[delivery.id] = delivery.destination
                self._inflight_to[delivery.destination] += 1
                task = asyncio.create_task(self._send(delivery))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
            self._claimed = waiting
            self._wake_delivery.clear()
            # Busy: come back for the next claim or flush even if no send finishes meanwhile.
            busy = self._results or self._inflight or self._claimed
            wait = CLAIM_INTERVAL if busy else settings.poll_interval
            await self._wake_delivery.wait(wait)

    async def _read_paused(self) -> None:
        """Read which destinations are paused; deliveries in hand for one go back to the
        store unsent (pending: parked by the next sweep, or claimed once it is resumed)."""
        self._paused_read = time.monotonic()
        try:
            paused = await self._store_call(self.outbox.paused_names)
        except Exception as err:  # the store is locked or down: keep the last reading
            self._failed(err, "pause checks")
            return
        self.store_trouble.succeeded("pause checks")
        for name in sorted(paused - self._paused):
            log.info("destination %s is paused: nothing is sent to it until it is resumed", name)
        for name in sorted(self._paused - paused):
            log.info("destination %s is resumed", name)
        self._paused = paused
        back = [d.id for d in self._claimed if d.destination in paused]
        if not back:
            return
        self._claimed = [d for d in self._claimed if d.destination not in paused]
        await self._hand_back(back)

    def _limited(self, destination_name: str) -> bool:
        """Whether ``per_destination`` applies to this destination's channel."""
        destination = self.table.destination(destination_name)
        return destination is None or destination.channel.limit_per_destination

    async def _send(self, delivery: DeliveryRecord) -> None:
        """Send on the table current as the send starts; a reload meanwhile waits for it."""
        with self._using(self.table) as table:
            await self._send_on(table, self.host, delivery)

    async def _send_on(self, table: RouteTable, host: PluginHost, delivery: DeliveryRecord) -> None:
        started = datetime.now(UTC)
        clock = time.perf_counter()
        attempt = delivery.attempts + 1
        # Taken before its retry time (_claim_early): the destination seemed back.
        early = delivery.attempts > 0 and delivery.not_before > started
        if table.destination(delivery.destination) is None and await self._routes_differ():
            await self._leave_to_others(delivery)
            return
        try:
            # Inside the try: whatever goes wrong here is a failed attempt, recorded, never a
            # delivery left 'sending' until its lease runs out.
            destination = table.destination(delivery.destination)
            if destination is None:
                raise DeliveryError(
                    f"destination {delivery.destination!r} is no longer configured",
                    retryable=False,
                )
            outgoing = Outgoing(
                delivery.payload,
                delivery.content_type,
                delivery.idempotency_key,
                delivery.metadata,
            )
            limit = asyncio.timeout(self.settings.send_timeout)
            skipped = False
            try:
                async with limit:
                    receipt = await destination.channel.send(outgoing)
            except NothingToSend as nothing:
                receipt, skipped = nothing.reason or "nothing to send", True
            except TimeoutError as err:
                if not limit.expired():
                    raise  # the channel's own
                # Cancelled like a send at shutdown: the channel drops a connection it was
                # using, so a late answer is never read as the answer to another message.
                raise DeliveryError(
                    f"no answer from the channel within {self.settings.send_timeout:g} s "
                    "(worker.send_timeout)",
                    retryable=True,
                ) from err
            except (SystemExit, KeyboardInterrupt) as err:
                # A vendor library calling sys.exit() inside send(): this attempt failed, the
                # hub goes on (SIGTERM and SIGINT stop it through the event loop, not here).
                channel = destination.channel.name
                raise host.ended_inside(
                    err, f"send() of channel {channel!r}", host.owner("channel", channel)
                ) from err
            if not isinstance(receipt, str):
                receipt = self._receipt_text(receipt, destination)
            result = AttemptResult(
                delivery.id,
                delivery.message_id,
                attempt,
                started,
                _ms(clock),
                not skipped,
                receipt,
                destination=delivery.destination,
                order_key=delivery.order_key,
                line=delivery.line or "",
                skipped=skipped,
                early=early,
                max_attempts=destination.retry.max_attempts,
                give_up_after=destination.retry.give_up_seconds,
            )
            trouble = self._trouble.get(delivery.destination)
            outage = trouble.delivered() if trouble is not None else None
            self._breaker_answered(delivery, went_through=not skipped)
            if outage is not None:  # it answered: the failing is over
                self._retry_soon(delivery.destination, outage)
            if skipped:
                self.skipped += 1
            else:
                self.delivered += 1
            status = "skipped" if skipped else "delivered"
            observer = "carehub_message_skipped" if skipped else "carehub_message_delivered"
            if host.observed(observer):
                done = dataclasses.replace(
                    delivery, status=status, attempts=attempt, receipt=receipt
                )
                host.notify(observer, delivery=done)
        except SendNotStarted:
            # The worker is stopping and the channel never began this send: no attempt.
            self.handed_back_at_stop += 1
            await self._unsent(delivery)
            return
        except (Exception, asyncio.CancelledError) as err:
            if isinstance(err, asyncio.CancelledError) and _cancelled_from_outside():
                raise  # the stop cuts this send off: _drain_inflight hands it back
            # A CancelledError of the channel's own (a library's, or raised by hand) is a
            # failed attempt like any other: retried, then a dead letter, never a delivery
            # left 'sending' holding its patient's line until a restart.
            retryable = err.retryable if isinstance(err, DeliveryError) else True
            detail = str(err) if isinstance(err, DeliveryError) else f"{type(err).__name__}: {err}"
            # The destination's limit as the routes have it now, as the delay below is: a
            # reload or a restart that changes it applies to deliveries already waiting. One
            # no longer configured keeps the limit it was planned with. 0: until it is taken.
            limit = delivery.max_attempts if destination is None else destination.retry.max_attempts
            give_up = (
                delivery.give_up_after if destination is None else destination.retry.give_up_seconds
            )
            # The run of failures begins with the first counted one; an early attempt only
            # ever fails inside a run (it is made to a delivery waiting out a retry delay).
            failing_since = delivery.failing_since or started
            deadline = failing_since + timedelta(seconds=give_up) if give_up else None
            now = datetime.now(UTC)
            # An early attempt is not counted: it never makes a dead letter of its own.
            spent = not early and (
                0 < limit <= attempt or (deadline is not None and now >= deadline)
            )
            final = not retryable or spent or destination is None
            retry_at = None
            if early and not final:
                retry_at = delivery.not_before  # the time it had: the schedule holds
            elif not final:
                assert destination is not None
                delay = _retry_delay(destination, attempt, err)
                retry_at = now + timedelta(seconds=delay)
                if deadline is not None:  # the last attempt is made when the time is up
                    retry_at = min(retry_at, max(deadline, now))
            # A dead letter to a destination no longer configured lets its line go on: the
            # later ones cannot be sent there either, and would wait behind it for nothing.
            holds = destination is not None and destination.retry.holds_line(
                destination.channel.name
            )
            result = AttemptResult(
                delivery.id,
                delivery.message_id,
                attempt,
                started,
                _ms(clock),
                False,
                detail,
                retry_at,
                destination=delivery.destination,
                order_key=delivery.order_key,
                line=delivery.line or "",
                holds_line=holds,
                loggable=_clean_text(_reason(err)),  # what `carehub status` shows of it
                early=early,
                max_attempts=limit,
                give_up_after=give_up,
                failing_since=None if early else failing_since,
            )
            result = self._breaker_failed(delivery, result, destination, retryable=retryable)
            self.failed_attempts += 1
            self._log_failure(
                delivery,
                attempt,
                err,
                final=final,
                holds=holds,
                early=early,
                max_attempts=limit,
                give_up=give_up,
            )
            host.notify("carehub_message_failed", delivery=delivery, error=detail, final=final)
        self._results.append(result)
        if self._inflight.pop(delivery.id, None) is not None:
            self._inflight_to[delivery.destination] -= 1
        self._wake_delivery.set()

    def _log_failure(
        self,
        delivery: DeliveryRecord,
        attempt: int,
        err: BaseException,
        *,
        final: bool,
        holds: bool,
        early: bool = False,
        max_attempts: int | None = None,
        give_up: int | None = None,
    ) -> None:
        """Log a failed attempt. The error's full text, which can quote what the destination
        answered and so the message, goes to the store (attempt rows, dead letters); the log
        gets its reason (see _reason). A destination that fails is one run in the log (see
        DestinationTrouble), each attempt a DEBUG line; a dead letter, which waits for an
        operator, is a WARNING of its own."""
        reason = _reason(err)
        count = delivery.max_attempts if max_attempts is None else max_attempts
        span = delivery.give_up_after if give_up is None else give_up
        limit = (
            " or ".join(
                [
                    *([str(count)] if count else []),
                    *([f"{span_text(span)} of failing"] if span else []),
                ]
            )
            or "unlimited"
        )
        retryable = err.retryable if isinstance(err, DeliveryError) else True
        if retryable:  # a refusal for good is about the message, not the destination
            trouble = self._trouble.get(delivery.destination)
            if trouble is None:
                trouble = self._trouble[delivery.destination] = DestinationTrouble(
                    delivery.destination, self._longest_retry_wait(delivery.destination)
                )
            breaker = self._breakers.get(delivery.destination)
            trouble.down = breaker.describe() if breaker is not None and breaker.is_open else None
            trouble.failed(reason)
        log.debug(
            "message %d (delivery %d) to %s: attempt %d of %s%s failed: %s",
            delivery.message_id,
            delivery.id,
            delivery.destination,
            attempt,
            limit,
            ", made early (not counted; tried again at its retry time)," if early else "",
            reason,
        )
        if final:
            log.warning(
                "message %d (delivery %d) to %s is a dead letter after attempt %d of %s%s: %s",
                delivery.message_id,
                delivery.id,
                delivery.destination,
                attempt,
                limit,
                ", holding its patient's line" if holds else "",
                reason,
            )
        if not isinstance(err, DeliveryError):
            # Not a refusal the channel reported but a bug or an unforeseen failure in
            # send(): its traceback (which may quote the message) at DEBUG only.
            log.debug(
                "message %d (delivery %d) to %s: %s raised",
                delivery.message_id,
                delivery.id,
                delivery.destination,
                type(err).__name__,
                exc_info=err,
            )

    async def _routes_differ(self) -> bool:
        """Whether the processes running now load different route sets (a reload that has
        reached only some, one SIGHUP at a time), read at most every ROUTE_SETS_CHECK
        seconds; when the store cannot say, taken as yes."""
        now = time.monotonic()
        if now - self._route_sets_read >= ROUTE_SETS_CHECK:
            self._route_sets_read = now
            try:
                sets = await self._store_call(self._running_route_sets)
            except Exception:
                self._route_sets_differ = True
            else:
                self._route_sets_differ = len(sets) > 1
                if not self._route_sets_differ:
                    self._foreign.clear()  # every process agrees now: claimed again
        return self._route_sets_differ

    def _running_route_sets(self) -> set[str]:
        moment = datetime.now(UTC)
        with self.store.engine.connect() as conn:
            return {
                p.routes
                for p in running_processes(conn)
                if p.routes is not None and not p.stale(moment)
            }

    async def _leave_to_others(self, delivery: DeliveryRecord) -> None:
        """A destination this worker's routes lack while others run other route sets is
        one added by a reload that has not reached this worker yet, not one removed: its
        deliveries go back unsent for a worker that has it (this one no longer claims them
        until its own routes change), where they became dead letters "no longer
        configured"."""
        name = delivery.destination
        if name not in self._foreign:
            self._foreign.add(name)
            log.warning(
                "destination %s is not in this worker's routes while other processes run "
                "other route sets: left to them (reload this worker with SIGHUP to send to it)",
                name,
            )
        await self._unsent(delivery)

    async def _unsent(self, delivery: DeliveryRecord) -> None:
        """A delivery taken to send and not sent goes back in line at once."""
        if self._inflight.pop(delivery.id, None) is not None:
            self._inflight_to[delivery.destination] -= 1
        await self._hand_back([delivery.id])
        self._wake_delivery.set()

    def _breaker_of(self, destination: str) -> Breaker:
        breaker = self._breakers.get(destination)
        if breaker is None:
            breaker = self._breakers[destination] = Breaker(destination)
        return breaker

    def _breaker_failed(
        self,
        delivery: DeliveryRecord,
        result: AttemptResult,
        destination: Destination | None,
        *,
        retryable: bool,
    ) -> AttemptResult:
        """Count a failed attempt in its destination's breaker: it opens on a run of them
        (Breaker.failed); a failed probe sets when the next goes, the delivery first due
        then. Returns ``result``."""
        breaker = self._breaker_of(delivery.destination)
        probe = breaker.is_open and breaker.probe_id == delivery.id
        if probe and not retryable:
            # Refused for good: about the message, and the destination answered: it is up.
            self._breaker_answered(delivery, went_through=True)
            return result
        if probe:
            breaker.probed(None, self._probe_interval(destination, breaker.probes + 1))
            return result
        if not retryable:  # about the message, not the destination
            return result
        if breaker.failed(time.monotonic(), delivery.id):
            breaker.open(None, self._probe_interval(destination, 1))
            log.warning(
                "sending to %s: %d attempts failed in a row over %.1f s: it is taken for down. "
                "Its deliveries wait unattempted but one at a time, sent as a probe (the one "
                "first due), at growing intervals (at most every %g s, its retry.max_delay); "
                "the first that goes through ends this",
                delivery.destination,
                breaker.failures,
                breaker.run_seconds,
                destination.retry.max_delay if destination else 0.0,
            )
        return result

    @staticmethod
    def _probe_interval(destination: Destination | None, probes: int) -> float:
        """Seconds before the next probe of a destination taken for down, after ``probes``
        failed ones: its retry delays, so they grow up to its ``retry.max_delay``."""
        return destination.retry.delay(probes) if destination is not None else PROBE_RECHECK

    def _breaker_answered(self, delivery: DeliveryRecord, *, went_through: bool) -> None:
        """A send to the destination ended without failing: a run of failures is over, and
        an open breaker closes (its waiting deliveries are claimed again as they are due, at
        most ``per_destination`` sent at a time). A skip (nothing to send) only frees the
        probe's turn: the destination was not asked."""
        breaker = self._breakers.get(delivery.destination)
        if breaker is None:
            return
        if not went_through:
            if breaker.is_open and breaker.probe_id == delivery.id:
                breaker.probed(None, 0.0)
            return
        opened_at, probes, down_for = breaker.opened_at, breaker.probes, breaker.down_for()
        breaker.close()
        if opened_at is None:
            return
        log.warning(
            "sending to %s: it answered again after %.0f s taken for down (%d probe(s) "
            "failed meanwhile); its waiting deliveries are sent again, at most %d at a time",
            delivery.destination,
            down_for,
            probes,
            self.settings.per_destination,
        )
        self._wake_delivery.set()

    async def _claim_probes(self, lease: timedelta) -> None:
        """For each destination taken for down whose probe is due: lease one of its
        deliveries to send (Outbox.claim_probe), the same one as last time while it is
        still waiting."""
        now = time.monotonic()
        for name, breaker in list(self._breakers.items()):
            if (
                not breaker.is_open
                or breaker.probe_id in self._leases  # in hand, being sent, or not recorded
                or now < breaker.next_probe
                or name in self._paused
                or name in self._foreign
            ):
                continue
            try:
                found = await self._store_call(
                    self.outbox.claim_probe, name, lease, breaker.probe_id
                )
            except Exception as err:  # the store is locked or down: look again later
                self._failed(err, "claims")
                breaker.next_probe = now + PROBE_RECHECK
                continue
            self.store_trouble.succeeded("claims")
            if isinstance(found, DeliveryRecord):
                breaker.probe_id = found.id
                self._hold([found])
            elif isinstance(found, datetime):  # the one probed last waits out its delay
                wait = (found - datetime.now(UTC)).total_seconds()
                breaker.next_probe = now + max(0.0, min(wait, PROBE_RECHECK))
            else:
                breaker.next_probe = now + PROBE_RECHECK

    async def _hand_back_behind_breakers(self) -> None:
        """Deliveries in hand for a destination taken for down, but its probe, go back in
        line unsent: they were claimed before its breaker opened."""
        back = [
            d.id
            for d in self._claimed
            if (breaker := self._breakers.get(d.destination)) is not None
            and breaker.is_open
            and breaker.probe_id != d.id
        ]
        if not back:
            return
        gone = set(back)
        self._claimed = [d for d in self._claimed if d.id not in gone]
        await self._hand_back(back)

    def _retry_soon(self, destination: str, outage: float) -> None:
        """The destination takes deliveries again: those of its deliveries waiting out a
        retry delay go now (_claim_early), rather than after a delay grown while it was down.
        Only after an outage of RETRY_SOON_AFTER or more, and at most once per
        RETRY_SOON_EVERY: a destination that fails every other request ends a run of failures
        with each success. An early attempt that fails costs its delivery none of its
        attempts and none of its wait, so a flapping destination cannot make dead letters of
        them sooner than their retry settings say."""
        now = time.monotonic()
        last = self._brought_forward.get(destination)
        if outage < RETRY_SOON_AFTER or (last is not None and now - last < RETRY_SOON_EVERY):
            return
        self._brought_forward[destination] = now
        self._bringing_forward.setdefault(destination, 0)
        self._wake_delivery.set()

    async def _claim_early(self, lease: timedelta) -> None:
        """Take in hand the deliveries waiting out a retry delay of the destinations that
        work again, as the hand has room for them (Outbox.claim_early; their retry times stay
        as they are). A destination is done when none is left, or when it fails again or is
        paused: the rest then go at their own times."""
        for destination in list(self._bringing_forward):
            trouble = self._trouble.get(destination)
            if (trouble is not None and trouble.failing) or destination in self._paused:
                self._brought(destination, again=True)
                continue
            room = self._room()
            if self._limited(destination):
                in_hand = self._inflight_to[destination] + sum(
                    1 for d in self._claimed if d.destination == destination
                )
                room = min(room, 2 * self.settings.per_destination - in_hand)
            if room <= 0:
                continue  # the next claim, once sends have made room
            try:
                taken = await self._store_call(self.outbox.claim_early, destination, room, lease)
            except Exception as err:  # they go at their own time, as before
                self._failed(err, "retries brought forward")
                self._brought(destination)
                continue
            self.store_trouble.succeeded("retries brought forward")
            self._hold(taken)
            self._bringing_forward[destination] += len(taken)
            if len(taken) < room:
                self._brought(destination)

    def _brought(self, destination: str, *, again: bool = False) -> None:
        """The end of bringing ``destination``'s retries forward, said when there were any."""
        moved = self._bringing_forward.pop(destination, 0)
        if moved and again:
            log.info(
                "%s takes deliveries again: %d delivery(ies) waiting out a retry delay were "
                "sent early; it failed again (or was paused), so the others keep their retry "
                "times",
                destination,
                moved,
            )
        elif moved:
            log.info(
                "%s takes deliveries again: %d delivery(ies) waiting out a retry delay are due now",
                destination,
                moved,
            )

    def _receipt_text(self, receipt: object, destination: Destination) -> str:
        """A send() that returned something other than text still delivered (the destination
        took it), so it is recorded as delivered with the receipt's repr, clipped; the store
        cannot hold any other value, and a result it refuses would be sent again later. The
        log names the channel's plugin and the type (never the value, which may quote the
        message), once per destination and type."""
        try:
            text = repr(receipt)
        except Exception:  # a repr that raises must not turn a delivery into a failure
            text = f"<{type(receipt).__name__}>"
        kind = type(receipt).__name__
        if (destination.name, kind) not in self._odd_receipts:
            self._odd_receipts.add((destination.name, kind))
            log.warning(
                "channel %r (plugin %r) of %s returned a %s from send(), not a str receipt; "
                "recorded as delivered with its text (said once per destination and type)",
                destination.channel.name,
                destination.plugin or "?",
                destination.name,
                kind,
            )
        return _clip(text.replace("\x00", ""), RECEIPT_TEXT_LIMIT)

    async def _record_results(self, results: list[AttemptResult]) -> list[AttemptResult]:
        """Record attempt results, each under the lease its delivery is held by now; returns
        those to record again later. A result whose lease this worker lost is left out."""
        async with self._lease_writes:
            held = [
                dataclasses.replace(r, lease_until=self._leases[r.delivery_id])
                for r in results
                if r.delivery_id in self._leases
            ]
            if len(held) < len(results):
                log.warning(
                    "%d attempt result(s) are not recorded: another worker took those "
                    "deliveries after their lease ran out",
                    len(results) - len(held),
                )
            kept = await self._record_held(held)
            for delivery_id in {r.delivery_id for r in held} - {r.delivery_id for r in kept}:
                del self._leases[delivery_id]
        return kept

    async def _record_held(self, results: list[AttemptResult]) -> list[AttemptResult]:
        """Record attempt results; returns those to record again later.

        When the store refuses (locked, down) every result is kept and tried again. When it
        takes the batch but cannot take some value in it, the batch is recorded one result at
        a time, so one bad result never holds up the others (nor, since the delivery loop
        waits for this, every destination's sends): a result refused on its own is recorded
        again with its text cleaned, and one refused even then is left out, logged; its lease
        then runs out and it goes back in line."""
        try:
            await self._store_call(self.outbox.finish, results)
            self.store_trouble.succeeded("results")
            return []
        except Exception as err:
            if _store_refused(err):
                self.store_trouble.failed("results", _StoreRefusal(_store_error(err)), len(results))
                return results
            log.warning(
                "recording %d delivery result(s) failed (%s); recording them one at a time",
                len(results),
                type(err).__name__,
            )
            log.debug("recording delivery results failed", exc_info=True)
        for index, result in enumerate(results):
            cleaned = dataclasses.replace(result, detail=_clean_text(result.detail))
            failure: Exception | None = None
            tries = (result,) if cleaned.detail == result.detail else (result, cleaned)
            for attempt in tries:
                try:
                    await self._store_call(self.outbox.finish, [attempt])
                except Exception as err:
                    if _store_refused(err):
                        return results[index:]
                    failure = err
                    continue
                if attempt is cleaned:
                    log.warning(
                        "message %d (delivery %d) to %s: its result was recorded with its "
                        "text cleaned (the store refused it as it was: %s)",
                        result.message_id,
                        result.delivery_id,
                        result.destination,
                        type(failure).__name__,
                    )
                failure = None
                break
            if failure is not None:
                log.error(
                    "message %d (delivery %d) to %s: its attempt %d cannot be recorded (%s) "
                    "and is left out; the delivery goes back in line when its lease runs out",
                    result.message_id,
                    result.delivery_id,
                    result.destination,
                    result.attempt,
                    type(failure).__name__,
                )
        return []

    async def _drain_inflight(self, grace: float = STOP_GRACE) -> None:
        """On stop, let the sends under way finish for up to ``grace`` seconds, then cut off
        those still running (each channel drops the connection it was using) and hand their
        deliveries back unsent, to be sent again at the next start: at least once, for a send
        cut off mid-way. A send still waiting for its turn on a channel is handed back at
        once (SendNotStarted). Each send's result is recorded as it ends, under a lease still
        renewed: once more after a pause if the store refuses, then their leases put them
        back in line."""
        deadline = time.monotonic() + grace
        while self._sending and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(
                set(self._sending), timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            if self._results:
                results, self._results = self._results, []
                self._results[:0] = await self._record_results(results)
        if self.handed_back_at_stop:
            log.info(
                "%d send(s) waiting for their turn on a channel were handed back unsent at the "
                "stop",
                self.handed_back_at_stop,
            )
        if self._sending:
            running = set(self._sending)
            for task in running:
                task.cancel()
            await asyncio.wait(running, timeout=CUT_OFF_WAIT)
            cut_off = list(self._inflight)
            self._inflight.clear()
            self._inflight_to.clear()
            log.warning(
                "%d send(s) still under way %g s after the stop began are cut off; their "
                "deliveries go back in line, %s",
                len(cut_off),
                grace,
                "to be sent at the next start"
                if self.settings.single_host
                else "for another worker to send now (or this one at its next start)",
            )
            await self._hand_back(cut_off)
        for last in (False, True):
            if not self._results:
                return
            results, self._results = self._results, []
            kept = await self._record_results(results)
            if not kept:
                return
            if last:
                log.warning(
                    "%d delivery result(s) are not recorded at stop; those deliveries go back "
                    "in line when their leases run out",
                    len(kept),
                )
                return
            self._results = kept
            await asyncio.sleep(STORE_RETRY)

    async def _hand_back(self, delivery_ids: list[int]) -> None:
        """Put deliveries this worker holds back in line unsent, their leases released (those
        another worker took meanwhile stay its own: see Outbox.release)."""
        async with self._lease_writes:
            held = {i: self._leases.pop(i) for i in delivery_ids if i in self._leases}
            if not held:
                return
            try:
                await self._store_call(self.outbox.release, held)
            except Exception as err:  # their leases run out and put them back in line
                self._failed(err, "releases")
            else:
                self.store_trouble.succeeded("releases")


class StoreTrouble:
    """The store refusing this worker, logged as one run (FailureRun) that ends only when
    every kind of call that failed in it has worked again. Under a full disk a claim that
    finds nothing due, or a lease renewal, still works while routing's writes fail: ending
    the run then logged "works again" every few seconds through an outage."""

    def __init__(self, run: FailureRun, clock: Callable[[], float] = time.monotonic) -> None:
        self.run = run
        self._clock = clock
        #: The kinds of call (routing, claims, results, ...) failing now, with when each last
        #: failed.
        self.failing: dict[str, float] = {}

    def failed(self, operation: str, err: BaseException, count: int = 1) -> None:
        self.failing[operation] = self._clock()
        self.run.failed(err, count)

    def succeeded(self, operation: str) -> None:
        self.failing.pop(operation, None)
        # A call made only now and then (a sweep, a count for a failing destination's log)
        # may not come again: one that has not failed for STORE_TROUBLE_QUIET while others
        # work is taken as working too, so the run can end.
        quiet_since = self._clock() - STORE_TROUBLE_QUIET
        for name, when in list(self.failing.items()):
            if when < quiet_since:
                del self.failing[name]
        if not self.failing:
            self.run.succeeded()


class Breaker:
    """A destination's circuit breaker on this worker. After BREAKER_FAILURES failed attempts
    in a row, of BREAKER_DELIVERIES deliveries or more, over BREAKER_SECONDS or more, it
    opens: the destination is taken for down, its deliveries are not claimed (and get no
    attempts), but for one probe at a time, a real delivery sent as usual, counted and
    recorded. Each probe is the delivery first due then, so a message the destination keeps
    refusing is not the only one tried: another patient's that goes through closes the
    breaker. Probes go at the destination's retry delays, growing with each failed probe up
    to ``retry.max_delay``. Without it, every waiting patient's line retried on its own: a
    day's outage with 40,000 patients waiting wrote about 5.8 million attempt rows.

    Per worker process: with N workers, N probes go out per retry interval."""

    def __init__(self, destination: str) -> None:
        self.destination = destination
        self.failures = 0  # failed attempts in a row, while closed
        self._failed_deliveries: set[int] = set()  # of how many deliveries (up to a few)
        self._first_failed = 0.0  # time.monotonic() of the first of them
        self._last_failed = 0.0
        self.opened: float | None = None  # time.monotonic() when it opened
        self.opened_at: datetime | None = None  # the same, by the wall clock
        #: The delivery probed (or to probe next). It is being probed while this worker
        #: holds its lease (Worker._leases): a probe handed back, or whose lease was lost,
        #: leaves the turn to the next.
        self.probe_id: int | None = None
        self.next_probe = 0.0  # time.monotonic() from which the next probe may be claimed
        self.interval = 0.0  # seconds from the latest failed probe to the next
        self.probes = 0  # probes failed since it opened

    @property
    def is_open(self) -> bool:
        return self.opened is not None

    @property
    def run_seconds(self) -> float:
        return self._last_failed - self._first_failed

    def failed(self, now: float, delivery_id: int) -> bool:
        """A failed attempt while closed; True when it opens the breaker."""
        if self.is_open:
            return False
        if self.failures == 0:
            self._first_failed = now
            self._failed_deliveries.clear()
        self.failures += 1
        self._last_failed = now
        if len(self._failed_deliveries) < BREAKER_DELIVERIES:
            self._failed_deliveries.add(delivery_id)
        return (
            self.failures >= BREAKER_FAILURES
            and len(self._failed_deliveries) >= BREAKER_DELIVERIES
            and self.run_seconds >= BREAKER_SECONDS
        )

    def open(self, probe_id: int | None, wait: float) -> None:
        self.opened = time.monotonic()
        self.opened_at = datetime.now(UTC)
        self.probe_id = probe_id
        self.probes = 0
        self.interval = wait
        self.next_probe = self.opened + wait

    def probed(self, probe_id: int | None, wait: float) -> None:
        """The probe ended without going through: the next one (``probe_id``: the same
        delivery, None: another) goes in ``wait`` seconds."""
        self.probes += 1
        self.probe_id = probe_id
        self.interval = wait
        self.next_probe = time.monotonic() + wait

    def close(self) -> None:
        self.failures = 0
        self._failed_deliveries.clear()
        self.opened = self.opened_at = self.probe_id = None
        self.probes = 0

    def down_for(self) -> float:
        return 0.0 if self.opened is None else time.monotonic() - self.opened

    def describe(self) -> str:
        """What the log says of it while open."""
        since = self.opened_at.strftime("%H:%M:%S UTC") if self.opened_at else "?"
        return f"down since {since}: probing every {self.interval:.0f} s"


class DestinationTrouble:
    """A destination's failed attempts on this worker, logged as one run (FailureRun): a
    WARNING with the reason when sends to it start failing, a summary every
    TROUBLE_REPORT_SECONDS while they go on failing, with the deliveries waiting for it as the
    store counts them (every worker's), and a line when it is over; each attempt is logged at
    DEBUG only. A line per failed attempt buried everything else in the log (883 in 30 s for
    one destination that was down with 200 messages waiting).

    The run is over when a send of this worker's works, or when this worker has seen no
    failed attempt for longer than the destination's longest retry wait and a summary period
    more: with several workers, the send that works after an outage may be another worker's,
    while a shorter quiet is only the deliveries waiting out their retry delays."""

    def __init__(self, destination: str, longest_retry_wait: float = 0.0) -> None:
        self.destination = destination
        #: Seconds a delivery to it can wait between two attempts (RetryPolicy.max_delay
        #: with its jitter): no failure for that long is no sign the destination is back.
        self.longest_retry_wait = longest_retry_wait
        self.run = self._new_run()
        #: Deliveries to the destination pending or being sent, as last read (Worker.
        #: _trouble_loop); None until read in this run.
        self.waiting: int | None = None
        self._last_failed = 0.0  # time.monotonic() of this worker's latest failed attempt
        self._failed_in_run = 0
        #: While the destination's breaker is open, what the log says of it (Breaker.describe).
        self.down: str | None = None

    def _new_run(self) -> FailureRun:
        return FailureRun(
            f"sending to {self.destination}",
            "each delivery is tried again as its retry settings allow",
            "attempt(s)",
            report_every=TROUBLE_REPORT_SECONDS,
            logger=log,
            level=logging.WARNING,
            traceback=False,
        )

    @property
    def failing(self) -> bool:
        return self.run.failing_since is not None

    def failed(self, reason: str) -> None:
        self._last_failed = time.monotonic()
        self._failed_in_run += 1
        if self.down is not None:
            reason = f"{reason}; {self.down}"
        if self.waiting is not None:
            reason = f"{reason}; {self.waiting} delivery(ies) waiting for it"
        self.run.failed(_Reason(reason))

    def delivered(self) -> float | None:
        """A send worked; when it ends a run of failures (the destination is back), how many
        seconds the run lasted, else None."""
        since = self.run.failing_since
        self.run.succeeded()
        self._end()
        return None if since is None else time.monotonic() - since

    def end_if_quiet(self, now: float) -> None:
        """End the run if no attempt of this worker's failed for longer than any retry of the
        destination waits, and a summary period more (another worker's send may have worked)."""
        quiet = now - self._last_failed
        if not self.failing or quiet < self.longest_retry_wait + TROUBLE_REPORT_SECONDS:
            return
        assert self.run.failing_since is not None
        log.warning(
            "sending to %s: no failed attempts for %.0f s, longer than its retries wait; this "
            "run of failures is closed (the destination may be back, or its deliveries all dead "
            "letters; %d attempt(s) failed in the %.1f s before)",
            self.destination,
            quiet,
            self._failed_in_run,
            max(0.0, self._last_failed - self.run.failing_since),
        )
        self.run = self._new_run()
        self._end()

    def _end(self) -> None:
        self.waiting = None
        self._failed_in_run = 0


class _Reason(Exception):
    """A failure retold in words the log may carry."""


class Wakeup:
    """Like asyncio.Event for a single waiter, with a timeout that costs no task.

    The delivery loop waits for the next finished send or claim time hundreds of times a
    second, and asyncio.wait_for would wrap every one of those waits in a new task."""

    def __init__(self) -> None:
        self._is_set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._is_set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._is_set = False

    def is_set(self) -> bool:
        return self._is_set

    async def wait(self, timeout: float) -> None:
        """Until set() is called or ``timeout`` seconds have passed."""
        if self._is_set:
            return
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class WrongStore(CarehubError):
    """The work queue holds another store's messages: this worker's store is not the one the
    processes queueing to its broker use."""


#: The most ids a log line about queued ids not in the store lists.
MISSING_IDS_LISTED = 20


def _say_not_in_store(missing: list[int]) -> None:
    """Queued ids this worker's store does not have: nothing to route for them, but said, as
    they are messages stored somewhere (another store, a queue message older than a restore)
    that this worker cannot route."""
    listed = ", ".join(str(i) for i in missing[:MISSING_IDS_LISTED])
    more = (
        f" and {len(missing) - MISSING_IDS_LISTED} more"
        if len(missing) > MISSING_IDS_LISTED
        else ""
    )
    log.warning(
        "%d queued message id(s) are not in this worker's store, so not routed here: %s%s; "
        "check that every serve and worker on this broker has the same store.url",
        len(missing),
        listed,
        more,
    )


class _StoreRefusal(Exception):
    """A store error retold in the store's own words, for the log (see _store_error)."""


def _store_refused(err: BaseException) -> bool:
    """Whether the store as a whole refused (locked, full, unreachable): worth trying the
    same results again later, unlike a value it cannot take."""
    if isinstance(err, sql_errors.DBAPIError) and err.connection_invalidated:
        return True
    return isinstance(
        err,
        (
            sql_errors.OperationalError,
            sql_errors.InterfaceError,
            sql_errors.TimeoutError,
            StoreError,
            StoreUnavailable,
            OSError,
        ),
    )


def _store_error(err: BaseException) -> str:
    """The store's own words for a refusal, without the statement and its parameters (which
    quote receipts and errors, and so may quote the message)."""
    orig = getattr(err, "orig", None)
    return f"{type(orig).__name__}: {orig}" if orig is not None else f"{type(err).__name__}: {err}"


def _clean_text(value: object) -> str:
    """Text any store can hold: a str without NUL characters (PostgreSQL refuses them)."""
    text = value if isinstance(value, str) else repr(value)
    return text.replace("\x00", "")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(err: BaseException) -> str:
    """What of a failed send the log may say: a DeliveryError's own account (see
    DeliveryError.loggable), never what the destination said; of any other exception, its
    type only (its text may quote the message)."""
    if isinstance(err, DeliveryError):
        return _clip(err.loggable, REASON_LOG_LIMIT)
    return type(err).__name__


def _cancelled_from_outside() -> bool:
    """Whether the running task was cancelled (Task.cancel(): the stop cutting a send off),
    rather than the code it awaits raising CancelledError on its own."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _retry_delay(destination: Destination, attempt: int, err: BaseException) -> float:
    """Seconds before the next attempt: the destination's backoff, or longer when the
    destination asked for it (HTTP Retry-After), up to its ``retry.max_delay``."""
    delay = destination.retry.delay(attempt)
    asked = err.retry_after if isinstance(err, DeliveryError) else None
    if asked is not None:
        delay = max(delay, min(asked, destination.retry.max_delay))
    return delay


def _ms(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)
