"""Routing over a real RabbitMQ work queue: the in-process worker of a hub, and the scale-out
layout (`carehub serve --no-worker` plus a separate `carehub worker` process) sharing a
PostgreSQL store. Skipped, with how to start the service, when RabbitMQ or PostgreSQL is not
running on 127.0.0.1."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner, Result
from kombu import Connection

from carehub.cli import main
from carehub.hl7.ack import read_ack
from carehub.store.outbox import Outbox
from carehub.store.store import MessageStore
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange
from carehub.workqueue import WorkQueue
from tests.helpers_http import CarehubProcess, HTTPServer, wait_for
from tests.test_workqueue import check_grouped_delivery

RABBIT = ("127.0.0.1", 5672)
PG_HOST, PG_PORT, PG_DATABASE = "127.0.0.1", 5432, "test"
RABBIT_SKIP = "RabbitMQ not reachable at 127.0.0.1:5672 (start it with: rabbitmq-server -detached)"
FAST_RETRY = "{max_attempts: 5, initial_delay: 0.05, multiplier: 1, max_delay: 0.05, jitter: 0}"


def reachable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=2):
            return True
    except OSError:
        return False


def _rabbitmqctl(*args: str) -> bool:
    if shutil.which("rabbitmqctl") is None:
        return False
    try:
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    """An AMQP URL with empty carehub queues. Where rabbitmqctl works, a virtual host of its
    own, so a concurrent test run (or a developer's hub) on the same broker cannot consume
    this test's messages; otherwise the default vhost, purged."""
    if not reachable(RABBIT):
        pytest.skip(RABBIT_SKIP)
    vhost = f"carehub-test-{uuid.uuid4().hex[:10]}"
    own = _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl(
        "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"
    )
    url = f"amqp://guest:guest@127.0.0.1:5672/{quote(vhost, safe='') if own else '/'}"
    try:
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as err:
        if own:
            _rabbitmqctl("delete_vhost", vhost)
        pytest.skip(f"{RABBIT_SKIP}: {err}")
    try:
        yield url
    finally:
        if own:
            _rabbitmqctl("delete_vhost", vhost)


def fresh_queue(url: str, partitions: int) -> WorkQueue:
    queue = WorkQueue(url, partitions)
    queue.purge()
    return queue


def consumers_on(url: str, queue: str) -> int:
    with Connection(url) as conn:
        _, _, consumers = conn.default_channel.queue_declare(queue=queue, passive=True)
    return int(consumers)


def routes_yaml(url: str, outbox: str | None = None) -> str:
    file_step = (
        f"      - forward: {{channel: file, name: archive, directory: {outbox}, body: event}}\n"
        if outbox
        else ""
    )
    return f"""
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - translate: v2-to-event
      - forward: {{channel: webhook, name: hook, url: {url}, retry: {FAST_RETRY}}}
{file_step}"""


def send_all(address: tuple[str, int], texts: list[str]) -> None:
    for text, answer in zip(
        texts, mllp_exchange(address, [t.encode() for t in texts]), strict=True
    ):
        code, echoed, detail = read_ack(answer.decode())
        assert (code, echoed) == ("AA", text.split("|")[9]), detail


def interleaved(prefix: str, count: int, patients: int) -> tuple[list[str], dict[str, list[str]]]:
    texts: list[str] = []
    order: dict[str, list[str]] = {}
    for i in range(count):
        patient = f"{prefix}-PT{i % patients}"
        control_id = f"{prefix}-{i:03d}"
        order.setdefault(patient, []).append(control_id)
        texts.append(make_adt(control_id, "A08", patient_id=patient))
    return texts, order


def arrivals(server: HTTPServer) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for request in server.ok():
        body = request.json
        seen.setdefault(body["event"]["patient"]["primary"]["value"], []).append(body["control_id"])
    return seen


def delivered(store: MessageStore, count: int) -> bool:
    return store.count("delivered") == count


def test_ids_are_grouped_by_partition_in_order_on_the_broker(amqp_url: str) -> None:
    check_grouped_delivery(amqp_url)


# -- in-process worker, RabbitMQ queue --------------------------------------------------------
def test_end_to_end_over_rabbitmq(tmp_path: Path, amqp_url: str) -> None:
    partitions = 5
    fresh_queue(amqp_url, partitions)
    with HTTPServer() as http:
        (tmp_path / "routes.yaml").write_text(routes_yaml(http.url(), "outbox"))
        config = local_config(worker=True)
        config.source = tmp_path / "carehub.yaml"
        config.routes = ["routes.yaml"]
        config.worker.poll_interval = 0.05
        config.queue.url = amqp_url
        config.queue.partitions = partitions
        texts, order = interleaved("RMQ", 30, 4)
        with HubThread(config, tmp_path / "data") as hub:
            # The worker really consumes from the broker (single active consumer per partition).
            assert consumers_on(amqp_url, "carehub.route.0") == 1
            send_all(hub.mllp_address, texts)
            wait_for(lambda: delivered(hub.store, 30), 30, what="30 delivered messages")
            outbox = Outbox(hub.store)
            for message in hub.store.find(limit=None):
                deliveries = outbox.find(message_id=message.id)
                assert {d.destination: d.status for d in deliveries} == {
                    "care/hook": "delivered",
                    "care/archive": "delivered",
                }
                assert [s.outcome for s in outbox.steps(message.id)] == ["ok", "ok", "ok"]
        assert arrivals(http) == order
        assert len(http.requests) == 30
        assert len({r.key for r in http.requests}) == 30
        assert len(list((tmp_path / "outbox").iterdir())) == 30


# -- serve --no-worker + carehub worker, PostgreSQL store -------------------------------------
def _pg_start_hint() -> str:
    versions = sorted(p.name for p in Path("/usr/lib/postgresql").glob("*") if p.name.isdigit())
    version = versions[-1] if versions else "<version>"
    return (
        f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} "
        f"(start it with: pg_ctlcluster --skip-systemctl-redirect {version} main start)"
    )


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A SQLAlchemy URL on a new, empty PostgreSQL schema (dropped afterwards)."""
    psycopg = pytest.importorskip("psycopg")
    if not reachable((PG_HOST, PG_PORT)):
        pytest.skip(_pg_start_hint())
    role = None
    for candidate in ("postgres", "root"):
        with contextlib.suppress(psycopg.Error):
            psycopg.connect(
                host=PG_HOST, port=PG_PORT, user=candidate, dbname=PG_DATABASE, connect_timeout=3
            ).close()
            role = candidate
            break
    if role is None:
        pytest.skip(_pg_start_hint() + f"; no role can log in to database {PG_DATABASE!r}")
    schema = f"carehub_test_{uuid.uuid4().hex[:12]}"

    def admin() -> psycopg.Connection:
        return psycopg.connect(
            host=PG_HOST, port=PG_PORT, user=role, dbname=PG_DATABASE, autocommit=True
        )

    with admin() as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield (
            f"postgresql+psycopg://{role}@{PG_HOST}:{PG_PORT}/{PG_DATABASE}"
            f"?options=-csearch_path%3D{schema}"
        )
    finally:
        with admin() as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.mark.postgres
def test_serve_without_worker_and_a_separate_worker_process(
    tmp_path: Path, amqp_url: str, pg_url: str
) -> None:
    partitions = 3
    fresh_queue(amqp_url, partitions)
    with HTTPServer() as http:
        (tmp_path / "routes.yaml").write_text(routes_yaml(http.url()))
        config_path = tmp_path / "carehub.yaml"
        config_path.write_text(
            f"""
store: {{url: "{pg_url}"}}
queue: {{url: "{amqp_url}", partitions: {partitions}}}
listeners:
  mllp: [{{name: adt, host: 127.0.0.1, port: 0}}]
  http: {{enabled: false}}
worker: {{poll_interval: 0.05}}
routes: [routes.yaml]
"""
        )
        common = ["--config", str(config_path), "--data-dir", str(tmp_path / "data")]
        logs = tmp_path / "logs"
        serve_args = ["serve", *common, "--no-worker", "--mllp-port", "0"]
        with CarehubProcess(serve_args, logs, "serve") as serve:
            out = serve.wait_ready()
            assert "worker: off" in out and "postgresql+psycopg" in out
            texts, order = interleaved("SCALE", 12, 3)
            send_all(serve.mllp_address, texts[:6])  # queued in RabbitMQ: no worker yet
            store = MessageStore(pg_url)
            try:
                assert store.count("received") == 6
                with CarehubProcess(["worker", *common], logs, "worker") as worker:
                    worker.wait_ready()
                    send_all(serve.mllp_address, texts[6:])
                    wait_for(lambda: delivered(store, 12), 30, what="12 delivered messages")
                    assert worker.terminate() == 0, worker.stderr
                assert serve.terminate() == 0, serve.stderr
                outbox = Outbox(store)
                keys = {d.idempotency_key for d in outbox.find(limit=None)}
            finally:
                store.close()
    assert arrivals(http) == order
    assert {r.key for r in http.requests} == keys and len(keys) == 12


# -- routes check ----------------------------------------------------------------------------
CHECK_ROUTES = """routes:
  - name: archive
    when: {type: ADT}
    steps:
      - forward: {channel: file, directory: out}
"""


def routes_check(tmp_path: Path, settings: str) -> Result:
    """`carehub routes check` on a hub config of ``settings`` with one file route."""
    (tmp_path / "routes.yaml").write_text(CHECK_ROUTES, encoding="utf-8")
    config_path = tmp_path / "carehub.yaml"
    config_path.write_text(f"{settings}routes: [routes.yaml]\n", encoding="utf-8")
    args = ["routes", "check", "--config", str(config_path), "--data-dir", str(tmp_path / "data")]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_routes_check_passes_with_a_broker_that_answers(tmp_path: Path) -> None:
    """The broker `serve` would publish to answers: `routes check` says so (the password
    hidden) and passes."""
    url = "amqp://guest:guest@127.0.0.1:5672//"
    if not reachable(RABBIT):
        pytest.skip(RABBIT_SKIP)
    result = routes_check(tmp_path, f"queue:\n  url: {url}\n")
    assert result.exit_code == 0, result.output
    assert "queue: amqp://guest:***@127.0.0.1:5672// (answers)" in result.stdout
    assert "ok: 1 route(s), 1 destination(s)" in result.stdout
    assert "guest:guest" not in result.output


@pytest.mark.postgres
def test_routes_check_reads_a_postgresql_store_without_creating_its_tables(
    tmp_path: Path, pg_url: str
) -> None:
    """On an empty PostgreSQL schema `routes check` passes (serve creates the tables) and
    creates none; once migrated, it shows the schema revision."""
    settings = f"store:\n  url: '{pg_url}'\n"
    result = routes_check(tmp_path, settings)
    assert result.exit_code == 0, result.output
    assert "(none yet; serve creates it)" in result.stdout
    store = MessageStore(pg_url)
    try:
        assert store.schema_revision() is None  # nothing was created
        store.migrate()
        revision = store.schema_revision()
    finally:
        store.close()
    result = routes_check(tmp_path, settings)
    assert result.exit_code == 0, result.output
    assert f"(schema {revision})" in result.stdout and "ok: 1 route(s)" in result.stdout
