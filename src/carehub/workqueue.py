"""The work queue between intake and the routing workers, on kombu.

Intake publishes the ids of newly stored messages, one queue message per partition for each
commit group; routing workers consume them. Messages are spread over partition queues by
patient, and each partition is consumed in order by one consumer at a time (RabbitMQ's
single-active-consumer), so one patient's messages are routed in arrival order while different
patients' messages go to different partitions in parallel.

The store, not the queue, is the source of truth: a message whose id is lost from the queue
(a broker restart, the in-process transport at a crash) is still 'received' in the store and is
queued again when a worker starts. Each queue message names the store that queued it (its
MessageStore.instance_id), so a worker pointed at another store hands it back rather than
looking its ids up where they are not.

Broker connections exchange heartbeats (``queue.heartbeat``): a connection that goes silent
without closing (a firewall or proxy dropping it, a hung broker) is noticed within about twice
that, and opened again; RabbitMQ, missing the heartbeats too, gives the messages it had handed
to the silent consumer to the next one.

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
from datetime import UTC, datetime
from typing import Any

from amqp.exceptions import AccessRefused, NotAllowed
from kombu import Connection, Exchange, Producer, Queue

from carehub.config import QUEUE_HEARTBEAT_SECONDS, QueueConfig, without_password

log = logging.getLogger(__name__)

#: The exchange on a broker, shared by every serve and worker of a deployment.
EXCHANGE = Exchange("carehub", type="direct", durable=True)

#: Seconds between tries to reach the broker again once a consumer lost it.
RECONNECT_SECONDS = 2.0
#: A publisher looks at its connection's heartbeats before a publish at most this often: the
#: look waits a moment for anything to read, and under a steady feed the publishes themselves
#: are the traffic that keeps the connection alive.
LIVENESS_CHECK_SECONDS = 1.0

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


class QueueMisconfigured(QueueUnavailable):
    """The broker refuses this URL (its login, its virtual host), or no transport takes it:
    trying again will not help, the setting has to change."""


#: Seconds a publish waits for the broker (its confirm, a declare), then fails (and the hub
#: holds what it could not queue and tries again). Every other wait on a broker connection
#: (a handshake, a consumer's cancel, a close) ends after it too.
PUBLISH_CONFIRM_TIMEOUT = 5.0

#: What a broker answers when it will never take this URL: the login refused (403), the
#: virtual host unknown or not open to the user (530). KeyError: no transport has the URL's
#: scheme; ImportError: the transport's library is not installed.
_REFUSED_FOR_GOOD = (AccessRefused, NotAllowed, KeyError, ImportError)


def broker_failure(err: BaseException, url: str) -> QueueUnavailable:
    """What kombu or its transport raised, as QueueUnavailable naming the broker (the password
    hidden); QueueMisconfigured when only a changed setting can help."""
    if isinstance(err, QueueUnavailable):
        return err
    reason = str(err) or type(err).__name__
    where = without_password(url)
    if isinstance(err, _REFUSED_FOR_GOOD):
        return QueueMisconfigured(f"the broker at {where} refuses it: {reason}")
    return QueueUnavailable(f"cannot reach the broker at {where}: {reason}")


class WorkQueue:
    """Names the queues and opens connections; publishers and consumers come from here.

    ``namespace`` names the exchange and prefixes the queues (``<namespace>.route.<n>``): by
    default ``carehub`` on a broker, and a name of its own for each in-process queue.
    ``heartbeat``: seconds between heartbeats on broker connections (see the module's)."""

    def __init__(
        self,
        url: str = "memory://",
        partitions: int = 8,
        namespace: str | None = None,
        heartbeat: int = QUEUE_HEARTBEAT_SECONDS,
    ) -> None:
        self.url = url
        self.partitions = partitions
        self.heartbeat = heartbeat
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

    @classmethod
    def for_config(cls, config: QueueConfig) -> WorkQueue:
        """The work queue the ``queue`` section of the config describes."""
        return cls(config.url, config.partition_count(), heartbeat=config.heartbeat)

    def check_heartbeats(self, connection: Connection) -> None:
        """Send this side's heartbeat when due; QueueUnavailable once the broker has sent
        nothing for two heartbeats (a connection dropped without a close, a hung broker).
        Only what was read from the connection counts as heard."""
        try:
            connection.heartbeat_check()
        except Exception as err:
            raise QueueUnavailable(
                f"the broker at {without_password(self.url)} stopped answering (nothing heard "
                f"for {2 * self.heartbeat} s: {str(err) or type(err).__name__})"
            ) from err

    def connection(self, *, confirmed: bool = False) -> Connection:
        """A connection to the queue. On a broker it exchanges heartbeats (whoever holds it
        calls check_heartbeats() every few seconds, or the broker closes it), and every
        wait for the broker ends after PUBLISH_CONFIRM_TIMEOUT: without, a broker that hangs
        with the connection open held a declare, a cancel or a close for ever.
        ``confirmed`` (a publisher's): every publish waits for the broker to confirm it took
        the message (publisher confirms); without, publishes went into the socket's buffer
        and nothing said the messages never reached a queue."""
        if self.is_memory:
            # The in-process transport polls; 10 ms keeps routing prompt without a busy thread.
            return Connection(self.url, transport_options={"polling_interval": 0.01})
        options: dict[str, Any] = {
            "read_timeout": PUBLISH_CONFIRM_TIMEOUT,
            "write_timeout": PUBLISH_CONFIRM_TIMEOUT,
        }
        if confirmed:
            options["confirm_publish"] = True
        return Connection(
            self.url,
            heartbeat=self.heartbeat,
            connect_timeout=PUBLISH_CONFIRM_TIMEOUT,
            transport_options=options,
        )

    def publisher(self, store_id: str | None = None) -> Publisher:
        """A publisher of the ids of ``store_id``'s messages (see Publisher)."""
        return Publisher(self, store_id)

    def check(self, timeout: float = 5.0) -> None:
        """Connect to the broker once, so that one that cannot be reached (or a URL kombu
        cannot use) is reported when the hub or worker starts, as QueueUnavailable (or
        QueueMisconfigured), rather than by a consumer thread after the process said it was
        ready."""
        if self.is_memory:
            return
        try:
            with self.connection() as conn:
                conn.ensure_connection(
                    max_retries=2, interval_start=0.5, interval_step=0.5, timeout=timeout
                )
        except Exception as err:  # kombu raises the transport's own errors, and KeyError
            raise broker_failure(err, self.url) from err

    def consumer(
        self,
        deliver: Callable[[list[int], Callable[[], None]], None],
        store_id: str | None = None,
        on_other_store: Callable[[str], bool] | None = None,
    ) -> Consumer:
        return Consumer(self, deliver, store_id, on_other_store)

    def purge(self) -> None:
        """Empty every partition queue (tests and `carehub queue purge`)."""
        with self.connection() as conn:
            channel = conn.channel()
            for q in self.queues:
                with contextlib.suppress(Exception):
                    q.bind(channel).purge()


class Publisher:
    """Publishes message ids; one publisher per thread (kombu connections are not shared).

    ``store_id`` (MessageStore.instance_id) goes with every queue message: a worker whose
    store is another hands it back (see Consumer). The connection opens at the first publish
    (or connect()). A publish that fails (the broker went away and kombu's retries gave up)
    drops the connection, which kombu leaves half closed, so that the next publish opens a
    new one: once the broker is back, publishing works again without a restart.

    Each publish first takes the broker's heartbeats and sends this side's, so a connection
    that went silent while idle is replaced rather than waited on. Between publishes, whoever
    holds an idle publisher publishes nothing every few seconds (a quarter of the heartbeat)
    to the same end: without, the broker closes the connection for missed heartbeats."""

    def __init__(self, work_queue: WorkQueue, store_id: str | None = None) -> None:
        self.work_queue = work_queue
        self.store_id = store_id
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._checked_at = float("-inf")

    def connect(self) -> None:
        """Open the connection now rather than at the first publish; QueueUnavailable (or
        QueueMisconfigured) when the broker cannot be used."""
        try:
            self._current_producer()
        except Exception as err:
            self._drop()
            raise broker_failure(err, self.work_queue.url) from err

    def _current_producer(self) -> Producer:
        """The producer on a connection that is still answering, opened anew if need be."""
        if self._producer is not None and not self._still_answering():
            self._drop()
        return self._producer or self._open()

    def _still_answering(self) -> bool:
        """Read what the broker sent (its heartbeats), send ours when due; False once the
        broker has been silent for two heartbeats, or the connection failed."""
        connection = self._connection
        now = time.monotonic()
        if connection is None or self.work_queue.is_memory:
            return True
        if now - self._checked_at < LIVENESS_CHECK_SECONDS:
            return True
        self._checked_at = now
        try:
            with contextlib.suppress(TimeoutError):  # nothing waiting to be read
                connection.drain_events(timeout=0.001)
            self.work_queue.check_heartbeats(connection)
        except Exception as err:
            log.warning(
                "publishing on a new connection: %s", broker_failure(err, self.work_queue.url)
            )
            return False
        return True

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
            # No close handshake: the broker may be the one not answering. Closing the
            # socket is enough for it to drop its side.
            with contextlib.suppress(Exception):
                connection.collect()

    def publish(self, message_id: int, patient_key: str) -> None:
        self.publish_many([(message_id, patient_key)])

    def publish_many(self, items: Iterable[tuple[int, str]]) -> None:
        """Queue (message id, patient key) pairs: one queue message per partition, its ids in
        the order given, so a patient's messages stay in arrival order. QueueUnavailable when
        the broker cannot take them.

        Intake publishes each commit group this way. A queue message per id cost intake about
        as much as storing the message (kombu's serialization, delivery tag and routing
        for each); per partition it is paid once for the group."""
        partitions: dict[int, list[int]] = {}
        for message_id, patient_key in items:
            partition = partition_of(patient_key, self.work_queue.partitions)
            partitions.setdefault(partition, []).append(message_id)
        try:
            producer = self._current_producer()
            for partition, message_ids in partitions.items():
                body: dict[str, Any] = {"message_ids": message_ids}
                if self.store_id is not None:
                    body["store"] = self.store_id
                producer.publish(
                    body,
                    routing_key=f"route.{partition}",
                    delivery_mode=2,
                    retry=True,
                    retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
                    confirm_timeout=PUBLISH_CONFIRM_TIMEOUT,
                )
        except Exception as err:
            self._drop()
            raise broker_failure(err, self.work_queue.url) from err

    def close(self) -> None:
        """Close the connection, with the broker's handshake (which waits at most
        PUBLISH_CONFIRM_TIMEOUT)."""
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.release()


class Consumer:
    """Drains the partition queues on its own thread and hands the ids of each queue message
    to ``deliver`` with an ``ack`` callback, to be called once they are all routed. Acks may
    come from any thread: they are queued back to this thread, because a kombu connection must
    only be used by the thread that drains it.

    With ``store_id``, a queue message that another store queued (see Publisher) means other
    messages here, or none. ``on_other_store`` is called with that store's id and says who is
    wrong: True, this consumer (its message is handed back to the queue untouched, for a
    consumer on the right store, and this one takes no more); False, the process that queued
    it (the message is dropped from the queue: its own store keeps it, and that process's
    sweep queues it again, so nothing is lost while it is set right)."""

    def __init__(
        self,
        work_queue: WorkQueue,
        deliver: Callable[[list[int], Callable[[], None]], None],
        store_id: str | None = None,
        on_other_store: Callable[[str], bool] | None = None,
    ) -> None:
        self.work_queue = work_queue
        self.deliver = deliver
        self.store_id = store_id
        self.on_other_store = on_other_store
        #: The store whose queue message this consumer handed back and stopped at.
        self.other_store: str | None = None
        self._acks: queue_module.SimpleQueue[object] = queue_module.SimpleQueue()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-consumer", daemon=True)
        self.error: BaseException | None = None
        #: Since when, and why, the consumer has been without its broker (None: connected).
        self.lost: tuple[datetime, str] | None = None

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
        """Consume until stopped. A broker connection lost once consuming has begun (closed,
        or silent for two heartbeats) is logged once and opened again (every
        RECONNECT_SECONDS) until it works: the queue messages not acked on the old one are
        redelivered by the broker, and routing a message twice records it once. Only a first
        connection that fails stops the consumer (start() reports it)."""
        try:
            while not self._stopping.is_set():
                try:
                    self._consume()
                    return
                except Exception as err:
                    if self._stopping.is_set():
                        return  # a broker that fails as the consumer stops: nothing to do
                    if not self._ready.is_set():
                        self.error = err
                        log.error("work queue consumer stopped: %s", err)
                        return
                    if self.lost is None:
                        reason = str(err) or type(err).__name__
                        self.lost = (datetime.now(UTC), reason)
                        log.error(
                            "work queue consumer lost the broker: %s; connecting again every %g s",
                            reason,
                            RECONNECT_SECONDS,
                        )
                self._stopping.wait(RECONNECT_SECONDS)
        finally:
            self._ready.set()

    def _consume(self) -> None:
        conn = self.work_queue.connection()
        try:
            channel = conn.channel()
            channel.basic_qos(0, 200, False)
            consumer = conn.Consumer(
                self.work_queue.queues,
                channel=channel,
                callbacks=[self._on_message],
                accept=["json"],
            )
            consumer.consume()
            self._ready.set()
            if self.lost is not None:
                self.lost = None
                log.warning("work queue consumer connected to the broker again")
            while not self._stopping.is_set() and self.other_store is None:
                self._flush_acks()
                self.work_queue.check_heartbeats(conn)
                with contextlib.suppress(TimeoutError):  # nothing came within the wait
                    conn.drain_events(timeout=0.05)
            self._flush_acks()
            consumer.cancel()
        except BaseException:
            # No close handshake on a connection that failed: the broker may be the one not
            # answering. Closing the socket is enough for it to drop its side.
            with contextlib.suppress(Exception):
                conn.collect()
            raise
        conn.release()

    def _on_message(self, body: dict[str, Any], message: Any) -> None:
        queued_by = body.get("store")
        if self.store_id is not None and queued_by is not None and queued_by != self.store_id:
            this_one_is_wrong = (
                self.on_other_store(str(queued_by)) if self.on_other_store is not None else True
            )
            if this_one_is_wrong:
                message.requeue()
                self.other_store = str(queued_by)
            else:
                message.reject()
            return
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
                message.ack()
