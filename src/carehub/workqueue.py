"""The work queue between intake and the routing workers, on kombu.

Intake publishes the ids of newly stored messages, one queue message per partition for each
commit group; routing workers consume them. Messages are spread over partition queues by
patient, and each partition is consumed in order by one consumer at a time (RabbitMQ's
single-active-consumer), so one patient's messages are routed in arrival order while different
patients' messages go to different partitions in parallel.

The store, not the queue, is the source of truth: a message whose id is lost from the queue
(a broker restart, the in-process transport at a crash) is still 'received' in the store and is
queued again when a worker starts.

- embedded default: ``memory://``, kombu's in-process transport; one process, nothing to run.
  Its queues and exchanges are global to the process, so each WorkQueue on it names its own
  (``carehub.<n>``): two hubs in one process (a test's sender and receiver) never take each
  other's work.
- scale-out: ``amqp://guest:guest@rabbit:5672//``; durable queues, persistent messages.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue as queue_module
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from kombu import Connection, Exchange, Producer, Queue

from carehub.config import without_password

log = logging.getLogger(__name__)

#: The exchange on a broker, shared by every serve and worker of a deployment.
EXCHANGE = Exchange("carehub", type="direct", durable=True)

#: Seconds between tries to reach the broker again once a consumer lost it.
RECONNECT_SECONDS = 2.0

#: Numbers the in-process work queues of this process (see WorkQueue).
_MEMORY_QUEUES = itertools.count(1)


def patient_key(patient_id: str | None, authority: str | None, message_id: int) -> str:
    """The ordering key: one patient's messages are routed and delivered in arrival order.
    A message without a patient identifier is its own key."""
    if patient_id:
        return f"{authority or ''}|{patient_id}"
    return f"message|{message_id}"


def partition_of(patient_key: str, partitions: int) -> int:
    """Stable across processes and restarts (unlike hash())."""
    return zlib.crc32(patient_key.encode()) % partitions


class QueueUnavailable(RuntimeError):
    """The work queue's broker cannot be reached or used."""


#: Seconds a publish waits for the broker (its confirm, a declare), then fails (and the hub
#: holds what it could not queue and tries again).
PUBLISH_CONFIRM_TIMEOUT = 5.0


class WorkQueue:
    """Names the queues and opens connections; publishers and consumers come from here.

    ``namespace`` names the exchange and prefixes the queues (``<namespace>.route.<n>``): by
    default ``carehub`` on a broker, and a name of its own for each in-process queue."""

    def __init__(
        self, url: str = "memory://", partitions: int = 8, namespace: str | None = None
    ) -> None:
        self.url = url
        self.partitions = partitions
        self.is_memory = url.startswith("memory")
        arguments = None if self.is_memory else {"x-single-active-consumer": True}
        if namespace is None:
            # On a broker every process must meet in the same queues. kombu's in-process
            # transport keeps its queues and exchanges in class attributes, one set for the
            # whole process: under a shared name a second hub's worker would consume (and
            # route against its own store) ids the first hub published, and the reverse.
            namespace = f"carehub.{next(_MEMORY_QUEUES)}" if self.is_memory else EXCHANGE.name
        self.namespace = namespace
        self.exchange = (
            EXCHANGE
            if namespace == EXCHANGE.name
            else Exchange(namespace, type="direct", durable=True)
        )
        self.queues = [
            Queue(
                f"{namespace}.route.{p}",
                self.exchange,
                routing_key=f"route.{p}",
                durable=True,
                queue_arguments=arguments,
            )
            for p in range(partitions)
        ]

    def connection(self, *, confirmed: bool = False) -> Connection:
        """A connection to the queue. ``confirmed`` (a publisher's): on a broker, every publish
        waits for the broker to confirm it took the message (publisher confirms), and every
        wait for the broker ends after PUBLISH_CONFIRM_TIMEOUT. Without, a broker that hangs
        with the connection open took each publish into the socket's buffer and nothing said
        the messages never reached a queue; and a declare on it waited for ever."""
        # The in-process transport polls; 10 ms keeps routing prompt without a busy thread.
        options: dict[str, Any] = {"polling_interval": 0.01} if self.is_memory else {}
        if confirmed and not self.is_memory:
            options.update(
                confirm_publish=True,
                read_timeout=PUBLISH_CONFIRM_TIMEOUT,
                write_timeout=PUBLISH_CONFIRM_TIMEOUT,
            )
        return Connection(self.url, transport_options=options)

    def publisher(self) -> Publisher:
        return Publisher(self)

    def check(self, timeout: float = 5.0) -> None:
        """Connect to the broker once, so that one that cannot be reached (or a URL kombu
        cannot use) is reported when the hub or worker starts, as QueueUnavailable, rather
        than by a consumer thread after the process said it was ready."""
        if self.is_memory:
            return
        try:
            with self.connection() as conn:
                conn.ensure_connection(
                    max_retries=2, interval_start=0.5, interval_step=0.5, timeout=timeout
                )
        except Exception as err:  # kombu raises the transport's own errors, and KeyError
            reason = str(err) or type(err).__name__
            raise QueueUnavailable(
                f"cannot reach the broker at {without_password(self.url)}: {reason}"
            ) from err

    def consumer(self, deliver: Callable[[list[int], Callable[[], None]], None]) -> Consumer:
        return Consumer(self, deliver)

    def purge(self) -> None:
        """Empty every partition queue (tests and `carehub queue purge`)."""
        with self.connection() as conn:
            channel = conn.channel()
            for q in self.queues:
                with contextlib.suppress(Exception):
                    q.bind(channel).purge()


class Publisher:
    """Publishes message ids; one publisher per thread (kombu connections are not shared).

    A publish that fails (the broker went away and kombu's retries gave up) drops the
    connection, which kombu leaves half closed, so that the next publish opens a new one:
    once the broker is back, publishing works again without a restart."""

    def __init__(self, work_queue: WorkQueue) -> None:
        self.work_queue = work_queue
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._open()

    def _open(self) -> Producer:
        self._connection = self.work_queue.connection(confirmed=True)
        producer = Producer(self._connection.channel(), exchange=self.work_queue.exchange)
        for q in self.work_queue.queues:
            q.bind(producer.channel).declare()
        self._producer = producer
        return producer

    def _drop(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.release()

    def publish(self, message_id: int, patient_key: str) -> None:
        self.publish_many([(message_id, patient_key)])

    def publish_many(self, items: Iterable[tuple[int, str]]) -> None:
        """Queue (message id, patient key) pairs: one queue message per partition, its ids in
        the order given, so a patient's messages stay in arrival order.

        Intake publishes each commit group this way. A queue message per id cost intake about
        as much as storing the message (kombu's serialization, delivery tag and routing
        for each); per partition it is paid once for the group."""
        partitions: dict[int, list[int]] = {}
        for message_id, patient_key in items:
            partition = partition_of(patient_key, self.work_queue.partitions)
            partitions.setdefault(partition, []).append(message_id)
        try:
            producer = self._producer or self._open()
            for partition, message_ids in partitions.items():
                producer.publish(
                    {"message_ids": message_ids},
                    routing_key=f"route.{partition}",
                    delivery_mode=2,
                    retry=True,
                    retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
                    confirm_timeout=PUBLISH_CONFIRM_TIMEOUT,
                )
        except Exception:
            self._drop()
            raise

    def close(self) -> None:
        self._drop()


class Consumer:
    """Drains the partition queues on its own thread and hands the ids of each queue message
    to ``deliver`` with an ``ack`` callback, to be called once they are all routed. Acks may
    come from any thread: they are queued back to this thread, because a kombu connection must
    only be used by the thread that drains it."""

    def __init__(
        self, work_queue: WorkQueue, deliver: Callable[[list[int], Callable[[], None]], None]
    ) -> None:
        self.work_queue = work_queue
        self.deliver = deliver
        self._acks: queue_module.SimpleQueue[object] = queue_module.SimpleQueue()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-consumer", daemon=True)
        self.error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"work queue consumer did not start: {self.error}")
        if self.error:
            raise RuntimeError(f"work queue consumer failed: {self.error}")

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        """Consume until stopped. A broker connection lost once consuming has begun is logged
        once and opened again (every RECONNECT_SECONDS) until it works: the queue messages
        not acked on the old one are redelivered by the broker, and routing a message twice
        records it once. Only a first connection that fails stops the consumer (start()
        reports it)."""
        lost_since: float | None = None
        try:
            while not self._stopping.is_set():
                try:
                    self._consume(reconnected=lost_since is not None)
                    return
                except Exception as err:
                    if not self._ready.is_set():
                        self.error = err
                        log.error("work queue consumer stopped: %s", err)
                        return
                    if lost_since is None:
                        lost_since = time.monotonic()
                        log.error(
                            "work queue consumer lost the broker: %s; connecting again every %g s",
                            str(err) or type(err).__name__,
                            RECONNECT_SECONDS,
                        )
                self._stopping.wait(RECONNECT_SECONDS)
        finally:
            self._ready.set()

    def _consume(self, reconnected: bool) -> None:
        with self.work_queue.connection() as conn:
            channel = conn.channel()
            channel.basic_qos(0, 200, False)
            consumer = conn.Consumer(
                self.work_queue.queues,
                channel=channel,
                callbacks=[self._on_message],
                accept=["json"],
            )
            with consumer:
                self._ready.set()
                if reconnected:
                    log.warning("work queue consumer connected to the broker again")
                while not self._stopping.is_set():
                    self._flush_acks()
                    with contextlib.suppress(TimeoutError):  # nothing came within the wait
                        conn.drain_events(timeout=0.05)
                self._flush_acks()

    def _on_message(self, body: dict[str, Any], message: object) -> None:
        # "message_id" (one id) is what earlier versions published; a broker may still hold some.
        ids = body["message_ids"] if "message_ids" in body else [body["message_id"]]
        self.deliver([int(i) for i in ids], lambda: self._acks.put(message))

    def _flush_acks(self) -> None:
        while True:
            try:
                message = self._acks.get_nowait()
            except queue_module.Empty:
                return
            with contextlib.suppress(Exception):
                message.ack()  # type: ignore[attr-defined]
