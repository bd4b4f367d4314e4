"""The scale-out deployment as it runs: `carehub serve --no-worker` and two `carehub worker`
processes on one PostgreSQL schema and one RabbitMQ virtual host, a route forwarding over a
webhook to a receiver the test controls and to a file folder.

What is checked against the real processes: serve and workers starting together on a new
schema; a feed with resends and a reused control ID stored and delivered once per destination,
each patient's messages in order; dead letters holding their patients' lines on both workers
until `dead-letters retry --destination`; a worker killed with SIGKILL and started again; a
route reload (SIGHUP) moving both workers to a new URL without losing a message; and
`carehub status --json` and serve's `/metrics` telling what the receiver saw. Two outbox tests
race two stores, as two workers do, on settling a message and on parking a patient's line.

Skipped, with how to start the service, when RabbitMQ or PostgreSQL is not running on
127.0.0.1 (the fixtures of tests/test_rabbitmq.py)."""

from __future__ import annotations

import functools
import json
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from carehub.cli import main
from carehub.components import Outgoing
from carehub.hl7.ack import read_ack
from carehub.hl7.framing import encode_frame
from carehub.routing.router import PlannedDelivery, RouteResult, RoutingResult
from carehub.store.outbox import AttemptResult, Outbox
from carehub.store.store import MessageStore
from carehub.testing import make_adt, read_frames
from tests import test_rabbitmq
from tests.helpers_http import CarehubProcess, wait_for
from tests.test_rabbitmq import fresh_queue
from tests.test_store import new_message

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

#: A vhost of its own on the broker (deleted afterwards) and a new PostgreSQL schema per test;
#: both skip with how to start the service when it is not running.
amqp_url = test_rabbitmq.amqp_url
pg_url = test_rabbitmq.pg_url

PARTITIONS = 8
HOOK = "care/hook"
ARCHIVE = "care/archive"
#: Four attempts about a second apart in all: a receiver down for a few seconds makes dead
#: letters, one that answers 503 for a moment does not.
RETRY = "{max_attempts: 4, initial_delay: 0.1, multiplier: 2, max_delay: 0.4, jitter: 0}"
HTTP_LINE = re.compile(r"HTTP listener '\S+' on ([\d.]+):(\d+)")


# -- a receiver the test controls ------------------------------------------------------------------
class Receiver:
    """A webhook receiver on a fixed local port: records every request (path, idempotency
    key, control ID, patient, the status it answered) and answers 200, or 503 while
    ``unavailable``, or 400 the first time it sees a control ID in ``refuse_once``. ``down()``
    closes the port (connections refused) and ``up()`` opens it again on the same port."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        self.unavailable = False
        self.refuse_once: set[str] = set()
        self._refused: set[str] = set()
        #: Control ID -> seconds its first request is held before it is answered (a slow
        #: send); ``let_go`` ends every hold at once.
        self.hold_first: dict[str, float] = {}
        self.let_go = threading.Event()
        #: Control ID -> (monotonic time of each request's arrival), answered or not.
        self.arrived: dict[str, list[float]] = {}
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                event = body.get("event") or {}
                control_id = body.get("control_id")
                with receiver._lock:
                    receiver.arrived.setdefault(control_id, []).append(time.monotonic())
                    hold = receiver.hold_first.pop(control_id, 0.0)
                if hold:
                    receiver.let_go.wait(hold)
                with receiver._lock:
                    if receiver.unavailable:
                        status = 503
                    elif control_id in receiver.refuse_once - receiver._refused:
                        receiver._refused.add(control_id)
                        status = 400
                    else:
                        status = 200
                    receiver._requests.append(
                        {
                            "at": time.time(),
                            "path": self.path,
                            "key": self.headers.get("Idempotency-Key"),
                            "control_id": control_id,
                            "message_id": body.get("message_id"),
                            "patient": event["patient"]["primary"]["value"],
                            "status": status,
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        ThreadingHTTPServer.allow_reuse_address = True
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server

    def down(self) -> None:
        self.let_go.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._requests)

    def accepted(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["status"] == 200]

    def keys(self) -> Counter[str]:
        """Each idempotency key answered 200, with how many times."""
        return Counter(r["key"] for r in self.accepted())

    def arrivals(self) -> dict[str, list[str]]:
        """Per patient, the control IDs in the order they were first taken (200)."""
        seen: set[str] = set()
        order: dict[str, list[str]] = {}
        for request in self.accepted():
            if request["key"] not in seen:
                seen.add(request["key"])
                order.setdefault(request["patient"], []).append(request["control_id"])
        return order


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    running.up()
    try:
        yield running
    finally:
        running.down()


# -- the deployment --------------------------------------------------------------------------------
def routes_yaml(url: str, folder: Path | None) -> str:
    """The route: a webhook forward, and a file forward into ``folder`` unless None."""
    archive = (
        f"      - forward: {{channel: file, name: archive, directory: {folder}, body: event}}\n"
        if folder is not None
        else ""
    )
    return f"""routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - translate: v2-to-event
      - forward: {{channel: webhook, name: hook, url: "{url}", timeout: 5, retry: {RETRY}}}
{archive}"""


class Deployment:
    """serve --no-worker and workers on one schema and vhost, as separate processes."""

    def __init__(
        self,
        tmp_path: Path,
        pg_url: str,
        amqp_url: str,
        hook_url: str,
        archive: bool = True,
        worker: str = "poll_interval: 0.1",
    ) -> None:
        fresh_queue(amqp_url, PARTITIONS)  # nothing left from another test's store
        self.tmp_path = tmp_path
        self.pg_url = pg_url
        self.amqp_url = amqp_url
        self.files: Path | None = tmp_path / "files" if archive else None
        self.routes = tmp_path / "routes.yaml"
        self.routes.write_text(routes_yaml(hook_url, self.files))
        self.config = tmp_path / "carehub.yaml"
        self.config.write_text(
            f"""store: {{url: "{pg_url}"}}
queue: {{url: "{amqp_url}", partitions: {PARTITIONS}}}
listeners:
  mllp: [{{name: adt, host: 127.0.0.1, port: 0}}]
  http: {{host: 127.0.0.1, port: 0}}
worker: {{{worker}}}
routes: [routes.yaml]
"""
        )
        self.common = ["--config", str(self.config), "--data-dir", str(tmp_path / "data")]
        self.logs = tmp_path / "logs"
        self.processes: list[CarehubProcess] = []
        self.serve: CarehubProcess | None = None

    def start(self, name: str, *args: str) -> CarehubProcess:
        process = CarehubProcess([*args, *self.common], self.logs, name)
        self.processes.append(process)
        return process

    def start_serve(self) -> CarehubProcess:
        self.serve = self.start("serve", "serve", "--no-worker")
        self.serve.wait_ready()
        return self.serve

    def start_worker(self, name: str) -> CarehubProcess:
        return self.start(name, "worker")

    @property
    def metrics_url(self) -> str:
        assert self.serve is not None
        match = HTTP_LINE.search(self.serve.stdout)
        assert match, self.serve.stdout
        return f"http://{match.group(1)}:{match.group(2)}/metrics"

    def cli(self, *args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(main, [*args, *self.common], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    def status(self) -> dict[str, Any]:
        code, out, err = self.cli("status", "--json")
        assert code == 0, err
        report: dict[str, Any] = json.loads(out)
        return report

    def destination(self, name: str) -> dict[str, Any]:
        """One destination's status; all zero while the outbox has nothing for it yet."""
        found = [d for d in self.status()["destinations"] if d["destination"] == name]
        zero = {"delivered": 0, "waiting": 0, "retrying": 0, "held": 0, "dead": 0}
        return found[0] if found else {"destination": name, **zero}

    def metrics(self) -> dict[str, float]:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=10) as answer:
            text = answer.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def stop_all(self) -> dict[str, int | None]:
        """SIGTERM to every process still running (workers first), their exit codes."""
        codes: dict[str, int | None] = {}
        for process in sorted(self.processes, key=lambda p: p.name == "serve"):
            if process.process.poll() is None:
                try:
                    codes[process.name] = process.terminate(30)
                except Exception:
                    process.kill()
                    codes[process.name] = None
        return codes

    def kill_all(self) -> None:
        for process in self.processes:
            process.kill()


@pytest.fixture
def deploy(
    tmp_path: Path, pg_url: str, amqp_url: str, receiver: Receiver
) -> Iterator[Callable[..., Deployment]]:
    made: list[Deployment] = []

    def make(
        path: str = "/v1/hook", archive: bool = True, worker: str = "poll_interval: 0.1"
    ) -> Deployment:
        deployment = Deployment(tmp_path, pg_url, amqp_url, receiver.url(path), archive, worker)
        made.append(deployment)
        return deployment

    try:
        yield make
    finally:
        for deployment in made:
            deployment.kill_all()


def metric(values: dict[str, float], name: str, destination: str, channel: str) -> float:
    return values[f'{name}{{channel="{channel}",destination="{destination}"}}']


# -- the feed --------------------------------------------------------------------------------------
class Feed:
    """ADT messages over ``patients`` patients, sent on ``connections`` MLLP connections (each
    patient always on the same one, every message waiting for its ACK), with resends and
    control IDs reused with other content. ``order`` is what each patient's receiver line
    must show: the control IDs of the messages stored as new, in the order they were
    ACKed."""

    def __init__(
        self,
        prefix: str,
        count: int,
        patients: int,
        *,
        resend_every: int = 0,
        reuse: tuple[int, ...] = (),
        connections: int = 4,
        patient_prefix: str | None = None,
    ) -> None:
        self.frames: dict[int, list[tuple[str, str, str, str]]] = {}
        self.patients = [f"{patient_prefix or prefix}P{p:02d}" for p in range(patients)]
        events = ["A01", "A08", "A02", "A08", "A03"]
        for i in range(count):
            patient = self.patients[i % patients]
            control_id = f"{prefix}{i:04d}"
            text = make_adt(control_id, events[i % 5], patient_id=patient, visit_number=f"V{i}")
            lane = self.frames.setdefault((i % patients) % connections, [])
            lane.append(("new", control_id, patient, text))
            if resend_every and i % resend_every == 1:
                lane.append(("resend", control_id, patient, text))
                # Another MSH-7 and LF segment ends: a resend all the same.
                other = text.replace("20261125083000|", "20261125090000|", 1).replace("\r", "\n")
                lane.append(("resend", control_id, patient, other))
            if i in reuse:
                earlier = f"{prefix}{i - patients * 2:04d}"  # this patient's, two rounds back
                text = make_adt(earlier, "A03", patient_id=patient, visit_number=f"R{i}")
                lane.append(("reused", earlier, patient, text))
        self.answers: list[tuple[str, str, str]] = []  # kind, control id, ACK code
        self.order: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def send(self, address: tuple[str, int], seconds: float = 0.0) -> None:
        """Send every frame, spread over about ``seconds``; returns when all are answered."""
        threads = [
            threading.Thread(target=self._lane, args=(address, frames, seconds))
            for frames in self.frames.values()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def start(self, address: tuple[str, int], seconds: float) -> threading.Thread:
        thread = threading.Thread(target=self.send, args=(address, seconds))
        thread.start()
        return thread

    def _lane(
        self, address: tuple[str, int], frames: list[tuple[str, str, str, str]], seconds: float
    ) -> None:
        gap = seconds / len(frames)
        began = time.monotonic()
        with socket.create_connection(address, timeout=30) as sock:
            for n, (kind, control_id, patient, text) in enumerate(frames):
                pause = began + n * gap - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                sock.sendall(encode_frame(text.encode()))
                code, _, _ = read_ack(read_frames(sock, 1, 30)[0].decode())
                with self._lock:
                    self.answers.append((kind, control_id, code))
                    if kind != "resend" and code == "AA":
                        self.order.setdefault(patient, []).append(control_id)

    @staticmethod
    def merged(*feeds: Feed) -> Feed:
        """The answers and per-patient order of feeds sent one after another."""
        whole = Feed("", 0, 0)
        for feed in feeds:
            whole.answers += feed.answers
            for patient, control_ids in feed.order.items():
                whole.order.setdefault(patient, []).extend(control_ids)
        return whole

    @property
    def stored_count(self) -> int:
        """How many messages the feed should leave in the store."""
        return sum(1 for kind, _, _ in self.answers if kind != "resend")


def all_delivered(store: MessageStore, count: int) -> bool:
    return store.count("delivered") == count and Outbox(store).unfinished() == 0


def check_delivered_once_in_order(
    store: MessageStore, receiver: Receiver, feed: Feed, files: Path | None
) -> None:
    """Every stored message delivered exactly once to the webhook (idempotency keys distinct
    and the store's own) and to the file folder, each patient's messages in ACK order."""
    outbox = Outbox(store)
    hook_keys = {d.idempotency_key for d in outbox.find(destination=HOOK, limit=None)}
    archive = outbox.find(destination=ARCHIVE, limit=None)
    taken = receiver.keys()
    assert len(hook_keys) == feed.stored_count
    assert set(taken) == hook_keys
    assert [key for key, n in taken.items() if n > 1] == []
    if files is not None:
        written = {p.stem for p in files.iterdir() if not p.name.startswith(".")}
        assert written == {d.idempotency_key for d in archive}
        assert len(written) == feed.stored_count
    assert receiver.arrivals() == feed.order


def status_agrees(deployment: Deployment, receiver: Receiver) -> None:
    """`status --json` and serve's /metrics tell what the receiver and the folder hold."""
    hook = deployment.destination(HOOK)
    taken = len(receiver.keys())
    assert (hook["delivered"], hook["waiting"], hook["dead"], hook["held"]) == (taken, 0, 0, 0)
    files = 0
    if deployment.files is not None:
        files = sum(1 for p in deployment.files.iterdir() if not p.name.startswith("."))
        archive = deployment.destination(ARCHIVE)
        assert (archive["delivered"], archive["waiting"], archive["dead"]) == (files, 0, 0)
    values = deployment.metrics()
    assert values["carehub_store_up"] == 1
    assert values['carehub_deliveries{status="delivered"}'] == taken + files
    for name in ("carehub_destination_waiting", "carehub_destination_dead_letters"):
        assert metric(values, name, HOOK, "webhook") == 0
        if deployment.files is not None:
            assert metric(values, name, ARCHIVE, "file") == 0
    assert values["carehub_routing_backlog"] == 0


def clean_logs(*processes: CarehubProcess) -> None:
    for process in processes:
        problems = [
            line
            for line in process.stderr.splitlines()
            if " ERROR " in line or "Traceback" in line or "exception was never retrieved" in line
        ]
        assert problems == [], f"{process.name}:\n{process.stderr[-3000:]}"


# -- the tests -------------------------------------------------------------------------------------
def test_serve_and_two_workers_start_together_on_a_new_schema(
    deploy: Callable[..., Deployment],
) -> None:
    """Every process migrates the store as it starts: started at the same moment on an empty
    schema, all three come up (one used to exit 2 on a duplicate-key error from the other's
    CREATE TABLE) and the schema is migrated once."""
    deployment = deploy()
    started = [
        deployment.start("serve", "serve", "--no-worker"),
        deployment.start_worker("worker-a"),
        deployment.start_worker("worker-b"),
    ]
    for process in started:
        process.wait_ready()
    store = MessageStore(deployment.pg_url)
    try:
        assert store.schema_revision() is not None
    finally:
        store.close()
    assert deployment.stop_all() == {"worker-a": 0, "worker-b": 0, "serve": 0}


def test_a_worker_says_ready_once_it_consumes_every_partition(
    deploy: Callable[..., Deployment],
) -> None:
    """`carehub ready` is what deployment scripts wait for: by then the worker holds a
    consumer on every partition queue, not merely a connection to the broker."""
    deployment = deploy(archive=False)
    deployment.start_serve()
    worker = deployment.start_worker("worker-a")
    worker.wait_ready()
    consuming = [
        test_rabbitmq.consumers_on(deployment.amqp_url, f"carehub.route.{p}")
        for p in range(PARTITIONS)
    ]
    assert consuming == [1] * PARTITIONS
    assert deployment.stop_all() == {"worker-a": 0, "serve": 0}


def resent_events(store: MessageStore) -> int:
    with store.engine.connect() as conn:
        query = "SELECT count(*) FROM message_events WHERE event = 'resent'"
        return int(conn.exec_driver_sql(query).scalar_one())


def start_two_workers(deployment: Deployment) -> list[CarehubProcess]:
    workers = [deployment.start_worker("worker-a"), deployment.start_worker("worker-b")]
    for worker in workers:
        worker.wait_ready()
    return workers


def wait_delivered(
    store: MessageStore, count: int, timeout: float, *processes: CarehubProcess
) -> None:
    """Wait for ``count`` messages delivered and nothing left to do; on a timeout, fail with
    the errors the processes logged, if any, as they say more than the count."""
    try:
        wait_for(lambda: all_delivered(store, count), timeout, what=f"{count} delivered")
    except AssertionError as timed_out:
        clean_logs(*processes)
        outbox = Outbox(store)
        stuck = [
            (d.id, d.destination, d.order_key, d.status, d.attempts, d.last_error)
            for status in ("dead", "sending", "pending")
            for d in outbox.find(status=status, limit=5)
        ]
        unsettled = [(m.id, m.status) for m in store.find(limit=None) if m.status != "delivered"]
        raise AssertionError(
            f"{timed_out}; messages not delivered (id, status): {unsettled[:10]}; deliveries "
            f"{outbox.count_by_status()}; first unfinished: {stuck}"
        ) from None


def test_two_workers_finishing_one_message_at_the_same_moment_settle_it(pg_url: str) -> None:
    """Each message has two deliveries, and two workers (two stores, as two processes have)
    record one each at the same moment: every message still ends delivered, or failed when
    one of its deliveries died, as it does when one worker records both. Settling a message
    reads its deliveries' statuses; read while the other worker's result is not committed,
    each saw the other delivery still being sent and neither settled it (90 of 100 stayed
    'routed' with both deliveries delivered)."""
    first, second = MessageStore(pg_url), MessageStore(pg_url)
    first.migrate()
    try:
        batch = [new_message(f"S{n}", patient_id=f"SP{n}") for n in range(60)]
        ids = [outcome.message_id for outcome in first.insert_messages(batch)]
        outboxes = (Outbox(first), Outbox(second))
        for message_id in ids:
            planned = [
                PlannedDelivery(
                    "care",
                    name,
                    "webhook",
                    Outgoing(b"{}", "application/json", f"key-{message_id}-{name}"),
                    f"line-{message_id}",
                    3,
                )
                for name in ("care/hook", "care/archive")
            ]
            result = RoutingResult(message_id, 1, [RouteResult("care", True, [], [], planned)])
            outboxes[0].record_routing([result])
        claimed = outboxes[0].claim_due(1000, timedelta(minutes=5))
        assert len(claimed) == 120
        by_message: dict[int, list[Any]] = {}
        for delivery in sorted(claimed, key=lambda d: d.destination):
            by_message.setdefault(delivery.message_id, []).append(delivery)
        dies = set(ids[::2])  # of these, the webhook delivery dies (HTTP 400)

        def result(delivery: Any) -> AttemptResult:
            ok = delivery.destination == "care/archive" or delivery.message_id not in dies
            return AttemptResult(
                delivery.id,
                delivery.message_id,
                1,
                datetime.now(UTC),
                1,
                ok,
                "HTTP 200" if ok else "HTTP 400",
                None,
                destination=delivery.destination,
                order_key=delivery.order_key,
            )

        for message_id in ids:
            pairs = zip(outboxes, by_message[message_id], strict=True)
            at_once(*(functools.partial(outbox.finish, [result(d)]) for outbox, d in pairs))
        assert Outbox(first).unfinished() == 0
        statuses = {m.id: m.status for m in first.find(limit=None)}
        expected = {m: "failed" if m in dies else "delivered" for m in ids}
        wrong = {m: s for m, s in statuses.items() if s != expected[m]}
        assert wrong == {}, f"{len(wrong)} of {len(ids)} messages not settled: {wrong}"
    finally:
        first.close()
        second.close()


def route_into(outbox: Outbox, message_id: int, line: str) -> None:
    """Record the routing of one message to the webhook destination, in ``line``."""
    outgoing = Outgoing(b"{}", "application/json", f"key-{message_id}")
    planned = PlannedDelivery("care", HOOK, "webhook", outgoing, line, 5)
    result = RoutingResult(message_id, 1, [RouteResult("care", True, [], [], [planned])])
    outbox.record_routing([result])


def attempted(delivery: Any, attempt: int, ok: bool) -> AttemptResult:
    """A send of ``delivery``: delivered, or failed and due again at once."""
    return AttemptResult(
        delivery.id,
        delivery.message_id,
        attempt,
        datetime.now(UTC),
        1,
        ok,
        "HTTP 200" if ok else "HTTP 503",
        None if ok else datetime.now(UTC),
        destination=delivery.destination,
        order_key=delivery.order_key,
    )


LEASE = timedelta(minutes=5)


def at_once(*actions: Callable[[], object]) -> None:
    """Run each action on a thread of its own, all released together (two workers at the
    same moment), and raise the first error any of them raised."""
    barrier = threading.Barrier(len(actions))
    errors: list[BaseException] = []

    def run(action: Callable[[], object]) -> None:
        barrier.wait()
        try:
            action()
        except BaseException as err:  # handed to the test's thread, not lost in this one
            errors.append(err)

    threads = [threading.Thread(target=run, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def stall_lines(store: MessageStore, patients: int, tag: str) -> list[int]:
    """On a new schema, ``patients`` lines whose first delivery failed once and is due again
    (each line stalled), each with its patient's next message stored, not routed yet: their
    ids, line by line."""
    store.migrate()
    outbox = Outbox(store)
    earlier = [new_message(f"{tag}{n}", patient_id=f"{tag}P{n}") for n in range(patients)]
    later = [new_message(f"{tag}N{n}", patient_id=f"{tag}P{n}") for n in range(patients)]
    firsts = [o.message_id for o in store.insert_messages(earlier)]
    seconds = [o.message_id for o in store.insert_messages(later)]
    for n, message_id in enumerate(firsts):
        route_into(outbox, message_id, f"line-{n}")
    outbox.finish([attempted(d, 1, False) for d in outbox.claim_due(1000, LEASE)])
    return seconds


def test_a_line_that_moves_on_while_another_worker_routes_into_it_is_not_left_parked(
    pg_url: str,
) -> None:
    """Worker A re-sends a delivery that failed once (its patient's line is stalled meanwhile)
    and records it delivered at the same moment as worker B routes that patient's next
    message: the new delivery must be claimable at once, not left parked behind a line that
    has moved on until the sweep mends it a minute later (99 of 100 lines were)."""
    patients = 40
    first, second = MessageStore(pg_url), MessageStore(pg_url)
    try:
        seconds = stall_lines(first, patients, "A")
        outbox_a, outbox_b = Outbox(first), Outbox(second)
        resent = {d.order_key: d for d in outbox_a.claim_due(1000, LEASE)}
        assert len(resent) == patients  # each line's first delivery, being sent again
        for n in range(patients):
            at_once(
                lambda n=n: outbox_a.finish([attempted(resent[f"line-{n}"], 2, True)]),
                lambda n=n: route_into(outbox_b, seconds[n], f"line-{n}"),
            )
        claimable = outbox_a.claim_due(1000, LEASE)
        assert sorted(d.message_id for d in claimable) == seconds
    finally:
        first.close()
        second.close()


def test_a_line_whose_waiting_head_goes_while_another_worker_routes_into_it_moves_on(
    pg_url: str,
) -> None:
    """Each line's first delivery failed once and waits, due again, so the line is stalled;
    worker A claims it, sends it and records it delivered while worker B routes the
    patient's next message into the line. Without a lock on the line, B read it stalled and
    wrote its delivery parked while A made due what it saw of the line, B's row not committed
    yet (6 of 60 lines). Both hold the line: every new delivery is claimable at once, none left
    parked until the sweep a minute later."""
    patients = 60
    first, second = MessageStore(pg_url), MessageStore(pg_url)
    try:
        seconds = stall_lines(first, patients, "W")
        outbox_a, outbox_b = Outbox(first), Outbox(second)
        for n in range(patients):

            def send(n: int = n) -> None:
                (head,) = outbox_a.claim_due(1, LEASE)  # the oldest due: this line's head
                assert head.order_key == f"line-{n}"
                outbox_a.finish([attempted(head, 2, True)])

            at_once(send, lambda n=n: route_into(outbox_b, seconds[n], f"line-{n}"))
        claimable = outbox_a.claim_due(1000, LEASE)
        assert sorted(d.message_id for d in claimable) == seconds
    finally:
        first.close()
        second.close()


def test_feed_with_resends_and_a_reused_control_id_over_two_workers(
    deploy: Callable[..., Deployment], receiver: Receiver
) -> None:
    """600 ADT over 20 patients on four connections, with 48 resends (half of them with LF
    ends and another MSH-7) and two control IDs reused with other content, and the receiver
    answering 503 for a moment (retried, no dead letter): every frame is answered AA, resends
    are not stored again, the reused ones are new messages whose history says so; each message
    reaches the webhook once (keys distinct) and the folder once, each patient's in order;
    status and /metrics say what the receiver and the folder hold."""
    deployment = deploy()
    serve = deployment.start_serve()
    workers = start_two_workers(deployment)
    feed = Feed("R", 600, 20, resend_every=25, reuse=(333, 555))
    feed_thread = feed.start(serve.mllp_address, 6.0)
    time.sleep(2.0)
    receiver.unavailable = True  # shorter than the retries take: retried, not dead
    time.sleep(0.4)
    receiver.unavailable = False
    feed_thread.join()
    kinds = Counter((kind, code) for kind, _, code in feed.answers)
    assert kinds == {("new", "AA"): 600, ("resend", "AA"): 48, ("reused", "AA"): 2}
    store = MessageStore(deployment.pg_url)
    try:
        wait_delivered(store, 602, 40, serve, *workers)
        assert store.count() == 602
        assert resent_events(store) == 48
        counts = store.control_id_counts()
        assert {cid for cid, n in counts.items() if n > 1} == {"R0293", "R0515"}
        for control_id in ("R0293", "R0515"):
            code, out, _ = deployment.cli("messages", "list", "--control-id", control_id, "--json")
            ids = sorted(json.loads(line)["id"] for line in out.splitlines())
            assert code == 0 and len(ids) == 2
            notes = [change.detail or "" for change in store.history(ids[1])]
            assert any(f"was used before by message {ids[0]}" in note for note in notes), notes
        assert any(r["status"] == 503 for r in receiver.requests)
        check_delivered_once_in_order(store, receiver, feed, deployment.files)
        status_agrees(deployment, receiver)
        intake = deployment.status()["intake"]
        assert [(i["listener"], i["accepted"]) for i in intake] == [("adt", 602)]
        values = deployment.metrics()
        assert values['carehub_intake_messages_total{listener="adt",outcome="duplicate"}'] == 48
    finally:
        store.close()
    assert deployment.stop_all() == {"worker-a": 0, "worker-b": 0, "serve": 0}
    clean_logs(serve, *workers)


def test_dead_letters_hold_lines_on_both_workers_until_retry_by_destination(
    deploy: Callable[..., Deployment], receiver: Receiver
) -> None:
    """The receiver goes down (port closed) mid-feed: each of 12 patients' lines gets one
    dead letter and the rest of it waits, held, whichever worker routed it. status,
    dead-letters list and /metrics give the same counts; once the receiver is back,
    `dead-letters retry --destination` sends each line on in order (a refusal on the way, 400,
    holds its line again until the next retry), and every message arrives once."""
    deployment = deploy()
    serve = deployment.start_serve()
    workers = start_two_workers(deployment)
    first = Feed("D", 120, 12, patient_prefix="L")
    second = Feed("E", 240, 12, patient_prefix="L")
    first.send(serve.mllp_address)
    store = MessageStore(deployment.pg_url)
    try:
        wait_delivered(store, 120, 30, serve, *workers)
        receiver.down()
        second.send(serve.mllp_address, 4.0)

        def settled() -> dict[str, Any] | None:
            hook = deployment.destination(HOOK)
            counts = (hook["dead"], hook["held"], hook["retrying"], hook["waiting"])
            done = counts == (12, 228, 0, 228)
            return hook if done and store.count("received") == 0 else None

        hook = wait_for(settled, 30, what="a dead letter holding each of 12 lines")
        assert hook["waiting"] == 228
        code, out, _ = deployment.cli("dead-letters", "list", "--json", "--destination", HOOK)
        dead = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and len(dead) == 12
        assert all(d["holds_line"] for d in dead)
        assert sum(d["held_behind"] for d in dead) == 228
        values = deployment.metrics()
        assert metric(values, "carehub_destination_dead_letters", HOOK, "webhook") == 12
        assert metric(values, "carehub_destination_held", HOOK, "webhook") == 228
        assert metric(values, "carehub_destination_waiting", HOOK, "webhook") == 228
        assert len(receiver.keys()) == 120  # nothing reached it while it was down

        receiver.refuse_once = {"E0007"}  # line 7's dead letter meets a refusal once
        receiver.up()
        code, out, _ = deployment.cli("dead-letters", "retry", "--destination", HOOK)
        assert code == 0 and "12 dead letter(s) queued again" in out
        # It counts the held deliveries it let go from their parking place: one that a race
        # between the two workers left unparked (waiting all the same) is not among them.
        follow = re.search(r"(\d+) delivery\(ies\) held behind them follow", out)
        assert follow and 0 < int(follow.group(1)) <= 228, out
        wait_for(
            lambda: deployment.destination(HOOK)["dead"] == 1 and store.count("delivered") > 300,
            30,
            what="the lines moving, line 7 held by its 400",
        )
        assert deployment.destination(HOOK)["held"] == 19
        code, out, _ = deployment.cli("dead-letters", "retry", "--destination", HOOK)
        assert code == 0 and "1 dead letter(s) queued again" in out
        wait_delivered(store, 360, 30, serve, *workers)
        check_delivered_once_in_order(store, receiver, Feed.merged(first, second), deployment.files)
        status_agrees(deployment, receiver)
    finally:
        store.close()
    assert deployment.stop_all() == {"worker-a": 0, "worker-b": 0, "serve": 0}
    clean_logs(serve, *workers)


def test_a_worker_killed_mid_feed_and_started_again(
    deploy: Callable[..., Deployment], receiver: Receiver
) -> None:
    """Worker A consumes every partition (B starts once A is consuming, so B is the standby);
    while a feed comes in, with every line held behind a dead letter so that no send is in
    flight, A is killed with SIGKILL: B takes the partitions over and routes the rest, A
    starts again, and after the retry every message has been routed once (one run, one
    delivery) and is delivered once, each patient's in order."""
    deployment = deploy(archive=False)
    serve = deployment.start_serve()
    worker_a = deployment.start_worker("worker-a")
    worker_a.wait_ready()
    wait_for(
        lambda: all(
            test_rabbitmq.consumers_on(deployment.amqp_url, f"carehub.route.{p}") == 1
            for p in range(PARTITIONS)
        ),
        15,
        what="worker A consuming every partition",
    )
    worker_b = deployment.start_worker("worker-b")
    worker_b.wait_ready()
    receiver.unavailable = True  # every line gets a dead letter; later ones wait, unsent
    feed = Feed("K", 400, 10)
    feed_thread = feed.start(serve.mllp_address, 8.0)
    store = MessageStore(deployment.pg_url)
    try:
        wait_for(lambda: deployment.destination(HOOK)["dead"] == 10, 20, what="10 dead letters")
        assert feed_thread.is_alive(), "the feed ended before the kill"
        routed_before = store.count() - store.count("received")
        worker_a.kill()  # SIGKILL
        time.sleep(1.0)
        worker_a = deployment.start_worker("worker-a-again")
        worker_a.wait_ready()
        feed_thread.join()
        assert Counter(code for _, _, code in feed.answers) == {"AA": 400}
        assert routed_before < 400
        wait_for(lambda: store.count("received") == 0, 30, what="every message routed")
        assert deployment.destination(HOOK)["held"] == 390
        receiver.unavailable = False
        code, out, _ = deployment.cli("dead-letters", "retry", "--destination", HOOK)
        assert code == 0 and "10 dead letter(s) queued again" in out
        wait_delivered(store, 400, 40, serve, worker_b, worker_a)
        outbox = Outbox(store)
        assert Counter(d.destination for d in outbox.find(limit=None)) == {HOOK: 400}
        runs = Counter(s.run for m in store.find(limit=None) for s in outbox.steps(m.id))
        assert set(runs) == {1}
        check_delivered_once_in_order(store, receiver, feed, None)
        status_agrees(deployment, receiver)
    finally:
        store.close()
    assert deployment.stop_all() == {"worker-b": 0, "worker-a-again": 0, "serve": 0}
    clean_logs(serve, worker_b, worker_a)


def test_sighup_moves_both_workers_to_the_new_url_and_loses_nothing(
    deploy: Callable[..., Deployment], receiver: Receiver
) -> None:
    """Mid-feed the route's URL path is edited and both workers (and serve) get SIGHUP: each
    logs the reload, nothing is sent to the old path after it, every message is delivered
    once and in order, and the workers go on routing, sending and stopping cleanly."""
    deployment = deploy()
    serve = deployment.start_serve()
    workers = start_two_workers(deployment)
    feed = Feed("H", 400, 16)
    feed_thread = feed.start(serve.mllp_address, 6.0)
    time.sleep(3.0)
    assert deployment.files is not None
    deployment.routes.write_text(routes_yaml(receiver.url("/v2/hook"), deployment.files))
    for process in (*workers, serve):
        process.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: all("routes reloaded" in p.stderr for p in (*workers, serve)),
        15,
        what="the reloads",
    )
    reloaded_at = time.time()
    assert feed_thread.is_alive(), "the feed ended before the reload"
    feed_thread.join()
    store = MessageStore(deployment.pg_url)
    try:
        wait_delivered(store, 400, 30, serve, *workers)
        check_delivered_once_in_order(store, receiver, feed, deployment.files)
        paths = Counter((r["path"], r["at"] > reloaded_at + 0.2) for r in receiver.requests)
        assert paths[("/v1/hook", True)] == 0, paths
        assert paths[("/v2/hook", True)] > 0, paths
        status_agrees(deployment, receiver)
    finally:
        store.close()
    assert deployment.stop_all() == {"worker-a": 0, "worker-b": 0, "serve": 0}
    clean_logs(serve, *workers)


def test_status_lists_serve_and_workers_and_a_worker_left_on_old_routes(
    deploy: Callable[..., Deployment], receiver: Receiver
) -> None:
    """Every process of the deployment is in `status --json` with the same route set; after
    the route file changes and only one worker is sent SIGHUP, status counts two route sets
    at once (the reloaded worker says so without waiting for its next heartbeat), and a
    worker that stops is gone from the list."""
    deployment = deploy(archive=False)
    serve = deployment.start_serve()
    workers = start_two_workers(deployment)
    processes = deployment.status()["processes"]
    assert sorted(p["role"] for p in processes) == ["serve", "worker", "worker"]
    assert {p["pid"] for p in processes} == {p.process.pid for p in (serve, *workers)}
    assert all(p["answering"] for p in processes)
    assert deployment.status()["route_sets"] == 1
    deployment.routes.write_text(routes_yaml(receiver.url("/v2/hook"), None))
    workers[0].process.send_signal(signal.SIGHUP)
    wait_for(lambda: "routes reloaded" in workers[0].stderr, 15, what="the reload")
    wait_for(lambda: deployment.status()["route_sets"] == 2, 5, what="two route sets")
    assert workers[1].terminate(30) == 0
    left = {p["pid"] for p in deployment.status()["processes"]}
    assert left == {serve.process.pid, workers[0].process.pid}
    assert deployment.stop_all() == {"worker-a": 0, "serve": 0}
    clean_logs(serve, *workers)


#: Leases of two seconds, renewed every two thirds of one, so a test sees them run out.
SHORT_LEASE = "poll_interval: 0.1, lease_seconds: 2"


def test_a_send_slower_than_the_lease_is_sent_once(
    deploy: Callable[..., Deployment], receiver: Receiver
) -> None:
    """The receiver holds one message's request for two leases' time while a second worker
    claims all it can: the worker sending it keeps its lease renewed, so the other never takes
    it over and sends it again. Every message is delivered once, the slow one included."""
    deployment = deploy(archive=False, worker=SHORT_LEASE)
    serve = deployment.start_serve()
    workers = start_two_workers(deployment)
    receiver.hold_first["L0005"] = 4.0  # under the webhook timeout of 5 s
    feed = Feed("L", 20, 20)  # a patient each: no line waits behind the slow one
    feed.send(serve.mllp_address)
    assert Counter(code for _, _, code in feed.answers) == {"AA": 20}
    store = MessageStore(deployment.pg_url)
    try:
        wait_for(lambda: "L0005" in receiver.arrived, 20, what="the slow send under way")
        wait_delivered(store, 20, 40, serve, *workers)
        assert len(receiver.arrived["L0005"]) == 1
        check_delivered_once_in_order(store, receiver, feed, None)
    finally:
        store.close()
    assert deployment.stop_all() == {"worker-a": 0, "worker-b": 0, "serve": 0}
    clean_logs(serve, *workers)


def test_a_worker_killed_mid_send_has_its_delivery_taken_over_within_a_lease(
    deploy: Callable[..., Deployment], receiver: Receiver
) -> None:
    """Worker A is alone when a message comes and the receiver holds its request; A is
    killed with SIGKILL mid-send and worker B started. B sends the message again (same
    idempotency key) once A's lease runs out unrenewed: seconds after the kill, where a
    fixed five-minute lease made it wait five minutes or more, and that patient's next
    message with it."""
    deployment = deploy(archive=False, worker=SHORT_LEASE)
    serve = deployment.start_serve()
    worker_a = deployment.start_worker("worker-a")
    worker_a.wait_ready()
    receiver.hold_first["K0000"] = 30.0
    feed = Feed("K", 2, 1)  # one patient: K0001 waits in line behind K0000
    feed.send(serve.mllp_address)
    store = MessageStore(deployment.pg_url)
    try:
        wait_for(lambda: "K0000" in receiver.arrived, 20, what="the send under way")
        worker_a.kill()
        killed = time.monotonic()
        worker_b = deployment.start_worker("worker-b")
        worker_b.wait_ready()
        wait_delivered(store, 2, 30, serve, worker_b)
        again = receiver.arrived["K0000"][1]
        assert again - killed < 10, again - killed
        assert len(receiver.arrived["K0000"]) == 2  # the one A never heard answered, and B's
        delivery = Outbox(store).find(destination=HOOK, limit=None)[0]
        assert (delivery.status, delivery.attempts) == ("delivered", 1)
        check_delivered_once_in_order(store, receiver, feed, None)
    finally:
        store.close()
    receiver.let_go.set()
    assert deployment.stop_all() == {"worker-b": 0, "serve": 0}
    clean_logs(serve, worker_b)
