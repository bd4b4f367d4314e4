"""A scale-out deployment with one process set up wrong: a worker whose store.url came out
empty on its host (a SQLite store of its own), processes with different queue.partitions, an
empty queue.url, and `serve --no-worker` on the in-process queue. Each is said at once, by
the process that is wrong, instead of messages that wait or vanish unnoticed.

The processes run on a new PostgreSQL schema and a RabbitMQ virtual host of their own
(skipped, with how to start the service, when either is not running)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from kombu import Connection, Producer

from carehub.cli import main
from carehub.store.store import MessageStore, sqlite_url
from carehub.testing import make_adt
from carehub.workqueue import EXCHANGE
from tests import test_rabbitmq
from tests.helpers_http import CarehubProcess, HTTPServer, wait_for
from tests.test_rabbitmq import delivered, fresh_queue, routes_yaml, send_all

amqp_url = test_rabbitmq.amqp_url
pg_url = test_rabbitmq.pg_url


def hub_yaml(store_url: str, queue_url: str, partitions: int) -> str:
    return f"""store: {{url: "{store_url}"}}
queue: {{url: "{queue_url}", partitions: {partitions}}}
listeners:
  mllp: [{{name: adt, host: 127.0.0.1, port: 0}}]
  http: {{enabled: false}}
worker: {{poll_interval: 0.05}}
routes: [routes.yaml]
"""


def queued(url: str, queue: str) -> int:
    """How many queue messages wait in ``queue`` on the broker."""
    with Connection(url) as conn:
        _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
    return int(count)


class Deployment:
    """`serve --no-worker` and workers, each with a config of its own, in ``tmp_path``."""

    def __init__(self, tmp_path: Path, hook_url: str) -> None:
        self.tmp_path = tmp_path
        self.logs = tmp_path / "logs"
        self.processes: list[CarehubProcess] = []
        (tmp_path / "routes.yaml").write_text(routes_yaml(hook_url))

    def start(self, name: str, config_text: str, *args: str) -> CarehubProcess:
        config = self.tmp_path / f"{name}.yaml"
        config.write_text(config_text)
        data = self.tmp_path / f"{name}-data"
        process = CarehubProcess(
            [*args, "--config", str(config), "--data-dir", str(data)], self.logs, name
        )
        self.processes.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.processes:
            process.kill()


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_on_another_store_hands_the_message_back_and_stops(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    """`store: {url: "${CAREHUB_STORE_URL:-}"}` with the variable unset on one host: that
    worker opened a SQLite store of its own, joined the shared broker, took the queued
    messages, found none of them in its store and dropped them without a word. Now it warns
    at start, hands the first one back to the queue and exits 2 naming both stores; a worker
    on the right store then routes every message."""
    fresh_queue(amqp_url, 1)
    with HTTPServer() as http:
        deployment = Deployment(tmp_path, http.url())
        shared = MessageStore(pg_url)
        try:
            serve = deployment.start("serve", hub_yaml(pg_url, amqp_url, 1), "serve", "--no-worker")
            serve.wait_ready()
            lost = deployment.start(
                "lost", hub_yaml("${CAREHUB_STORE_URL:-}", amqp_url, 1), "worker"
            )
            lost.wait_ready()
            assert "this worker's store is SQLite" in lost.stderr, lost.stderr

            texts = [make_adt(f"WS-{n}", patient_id=f"WS-P{n}") for n in range(3)]
            send_all(serve.mllp_address, texts)
            assert lost.process.wait(30) == 2, lost.stderr
            own = MessageStore(sqlite_url(tmp_path / "lost-data"))
            try:
                own_id = own.instance_id
                assert own.count("received") == 0
            finally:
                own.close()
            assert shared.count("received") == 3  # nothing routed by the lost worker
            # Handed back: the queue still holds what the lost worker was given.
            assert queued(amqp_url, "carehub.route.0") >= 1
            assert f"queued by store {shared.instance_id}" in lost.stderr, lost.stderr
            assert f"this worker's store is {own_id}" in lost.stderr
            assert "WS-P" not in lost.stderr  # no patient data in what it says

            right = deployment.start("right", hub_yaml(pg_url, amqp_url, 1), "worker")
            right.wait_ready()
            wait_for(lambda: delivered(shared, 3), 30, what="the three messages delivered")
            assert right.terminate() == 0, right.stderr
            assert serve.terminate() == 0, serve.stderr
        finally:
            shared.close()
            deployment.kill_all()
    assert "not in this worker's store" not in right.stderr


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_serve_on_another_store_does_not_stop_the_workers_on_the_right_one(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    """The other way round: the serve whose store.url came out empty (a SQLite store of its
    own) queues to the shared broker. A worker on the deployment's store, where a serve runs,
    is right: it drops the stray queue messages (their store keeps them), says so, and goes on
    routing the right serve's messages."""
    fresh_queue(amqp_url, 1)
    with HTTPServer() as http:
        deployment = Deployment(tmp_path, http.url())
        shared = MessageStore(pg_url)
        try:
            right = deployment.start("right", hub_yaml(pg_url, amqp_url, 1), "serve", "--no-worker")
            right.wait_ready()
            worker = deployment.start("worker", hub_yaml(pg_url, amqp_url, 1), "worker")
            worker.wait_ready()
            stray = deployment.start(
                "stray", hub_yaml("${CAREHUB_STORE_URL:-}", amqp_url, 1), "serve", "--no-worker"
            )
            stray.wait_ready()

            send_all(stray.mllp_address, [make_adt("SS-0", patient_id="SS-P0")])
            wait_for(
                lambda: "a process queues from another store" in worker.stderr,
                30,
                what="the worker to name the stray store",
            )
            send_all(
                right.mllp_address, [make_adt(f"RS-{n}", patient_id=f"RS-P{n}") for n in range(2)]
            )
            wait_for(lambda: delivered(shared, 2), 30, what="the right serve's messages delivered")
            assert worker.process.poll() is None, worker.stderr  # still running
            assert "SS-P0" not in worker.stderr
            assert worker.terminate() == 0, worker.stderr
        finally:
            shared.close()
            deployment.kill_all()


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_queued_ids_a_worker_does_not_have_are_logged_not_dropped_silently(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    """A queue message from before queue messages named their store (a broker kept through an
    upgrade) with an id this worker's store lacks: nothing to route, and the log says so."""
    fresh_queue(amqp_url, 1)
    deployment = Deployment(tmp_path, "http://127.0.0.1:9/unused")
    try:
        worker = deployment.start("worker", hub_yaml(pg_url, amqp_url, 1), "worker")
        worker.wait_ready()
        with Connection(amqp_url) as conn:
            producer = Producer(conn.channel(), exchange=EXCHANGE)
            producer.publish({"message_ids": [987654]}, routing_key="route.0", serializer="json")
        wait_for(
            lambda: "1 queued message id(s) are not in this worker's store" in worker.stderr,
            20,
            what="the worker to say so",
        )
        assert "987654" in worker.stderr
        assert queued(amqp_url, "carehub.route.0") == 0  # taken, and said
        assert worker.terminate() == 0, worker.stderr
    finally:
        deployment.kill_all()


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_processes_with_different_partition_counts_are_warned_of(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    """serve with queue.partitions 16 and a worker with 8: the queues of partitions 8-15 had no
    consumer and their patients waited for the sweep, with nothing said. The worker warns as
    it starts, naming both, and `carehub status --json` shows each process's count."""
    fresh_queue(amqp_url, 16)
    deployment = Deployment(tmp_path, "http://127.0.0.1:9/unused")
    try:
        serve = deployment.start("serve", hub_yaml(pg_url, amqp_url, 16), "serve", "--no-worker")
        serve.wait_ready()
        worker = deployment.start("worker", hub_yaml(pg_url, amqp_url, 8), "worker")
        worker.wait_ready()
        assert "the running processes use different queue.partitions" in worker.stderr, (
            worker.stderr
        )
        assert "8 partition(s): worker on " in worker.stderr
        assert "16 partition(s): serve on " in worker.stderr

        result = CliRunner().invoke(
            main,
            ["status", "--json", "--config", str(tmp_path / "serve.yaml")],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        counts = {p["role"]: p["partitions"] for p in json.loads(result.stdout)["processes"]}
        assert counts == {"serve": 16, "worker": 8}
        assert worker.terminate() == 0, worker.stderr
        assert serve.terminate() == 0, serve.stderr
    finally:
        deployment.kill_all()


def test_an_empty_queue_url_is_a_config_error_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`${CAREHUB_QUEUE_URL:-}` with the variable unset: kombu took the empty URL for
    amqp://guest:guest@localhost//, another broker than the deployment's."""
    monkeypatch.delenv("CAREHUB_QUEUE_URL", raising=False)
    config = tmp_path / "carehub.yaml"
    config.write_text('routes: []\nqueue:\n  url: "${CAREHUB_QUEUE_URL:-}"\n')
    result = CliRunner().invoke(main, ["routes", "check", "--offline", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert f"{config}:3: queue.url: Value error, empty" in result.stderr


def test_serve_without_worker_on_the_in_process_queue_is_an_error_naming_both(
    tmp_path: Path,
) -> None:
    """No `carehub worker` can consume the in-process queue of a serve: with --no-worker
    nothing it stores would ever be routed."""
    config = tmp_path / "carehub.yaml"
    config.write_text('routes: []\nqueue: {url: "memory://"}\n')
    args = ["serve", "--no-worker", "--config", str(config), "--data-dir", str(tmp_path / "d")]
    args += ["--mllp-port", "0", "--http-port", "0"]
    with CarehubProcess(args, tmp_path / "logs", "serve") as serve:
        assert serve.process.wait(30) == 2, serve.stdout + serve.stderr
    assert "--no-worker" in serve.stderr and f"{config}:2: queue.url" in serve.stderr
    assert "carehub ready" not in serve.stdout
