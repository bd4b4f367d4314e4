"""Broker connections that go silent, brokers that are down when `serve` starts, and whose
failures are whose: the processes reach RabbitMQ through a TCP proxy the test controls, which
can stop passing bytes on the connections it holds while keeping them open (a firewall or NAT
that dropped their state, a hung broker), refuse connections, or take them and never answer.
The shared broker itself is never touched: each module has a virtual host of its own.

Skipped, with how to start the service, when RabbitMQ or PostgreSQL is not running on
127.0.0.1 (the fixtures of tests/test_rabbitmq.py)."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from carehub.store.store import MessageStore
from carehub.testing import HubThread, local_config, make_adt
from tests import test_rabbitmq
from tests.helpers_http import CarehubProcess, HTTPServer, wait_for
from tests.helpers_relay import Relay, relay_to
from tests.test_rabbitmq import delivered, fresh_queue, interleaved, routes_yaml, send_all

amqp_url = test_rabbitmq.amqp_url
pg_url = test_rabbitmq.pg_url

#: Seconds between heartbeats in these tests (queue.heartbeat): a silent connection is
#: noticed within about twice this, by the process and by RabbitMQ.
HEARTBEAT = 2
HTTP_LINE = re.compile(r"HTTP listener '\S+' on ([\d.]+):(\d+)")


@pytest.fixture
def proxy(amqp_url: str) -> Iterator[Relay]:
    running = relay_to(amqp_url, 5672)
    try:
        yield running
    finally:
        running.close()


def hub_yaml(
    store_url: str | None, queue_url: str, partitions: int, *, heartbeat: bool = True
) -> str:
    """A hub config: ``store_url`` (None: SQLite in the data dir), the queue on line 2."""
    beat = f", heartbeat: {HEARTBEAT}" if heartbeat else ""
    store = f'store: {{url: "{store_url}"}}' if store_url else "log_level: INFO"
    return f"""{store}
queue: {{url: "{queue_url}", partitions: {partitions}{beat}}}
listeners:
  mllp: [{{name: adt, host: 127.0.0.1, port: 0}}]
  http: {{host: 127.0.0.1, port: 0}}
worker: {{poll_interval: 0.05}}
routes: [routes.yaml]
"""


def health_of(base_url: str) -> dict[str, object]:
    with urllib.request.urlopen(base_url + "/health", timeout=10) as answer:
        return json.loads(answer.read())


def http_base(process: CarehubProcess) -> str:
    match = HTTP_LINE.search(process.stdout)
    assert match, process.stdout
    return f"http://{match.group(1)}:{match.group(2)}"


def queued(url: str, queue: str) -> int:
    """How many queue messages wait in ``queue`` on the broker."""
    with Connection(url) as conn:
        _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
    return int(count)


# -- a silent connection -----------------------------------------------------------------------
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_worker_whose_broker_connection_goes_silent_takes_its_messages_again(
    tmp_path: Path, pg_url: str, amqp_url: str, proxy: Relay
) -> None:
    """serve --no-worker reaches the broker directly, the worker through the proxy. Its
    consumer's connection goes silent: the worker notices by the missed heartbeats and
    connects again, RabbitMQ (missing the worker's heartbeats) hands the messages it had
    given the silent consumer to the new one, and all are routed. Without heartbeats they
    stayed unacked to the dead consumer for good, and the sweep re-queued them into it."""
    partitions = 2
    fresh_queue(amqp_url, partitions)
    with HTTPServer() as http:
        (tmp_path / "routes.yaml").write_text(routes_yaml(http.url()))
        serve_config = tmp_path / "serve.yaml"
        serve_config.write_text(hub_yaml(pg_url, amqp_url, partitions))
        worker_config = tmp_path / "worker.yaml"
        worker_config.write_text(hub_yaml(pg_url, proxy.url(amqp_url), partitions))
        data = ["--data-dir", str(tmp_path / "data")]
        logs = tmp_path / "logs"
        serve_args = ["serve", "--config", str(serve_config), *data, "--no-worker"]
        worker_args = ["worker", "--config", str(worker_config), *data]
        with (
            CarehubProcess(serve_args, logs, "serve") as serve,
            CarehubProcess(worker_args, logs, "worker") as worker,
        ):
            serve.wait_ready()
            worker.wait_ready()
            store = MessageStore(pg_url)
            try:
                send_all(serve.mllp_address, [make_adt("SIL-0", patient_id="SIL-P0")])
                wait_for(lambda: delivered(store, 1), 30, what="the first message delivered")

                proxy.blackhole_held()  # the worker's connection: open, and silent
                texts, order = interleaved("SIL", 20, 5)
                send_all(serve.mllp_address, texts)  # stored, AA, queued on the broker
                wait_for(
                    lambda: delivered(store, 21),
                    12 * HEARTBEAT + 10,
                    0.2,
                    "the 20 messages stored while the worker's connection was silent",
                )
            finally:
                store.close()
            assert "work queue consumer lost the broker" in worker.stderr, worker.stderr
            assert worker.terminate() == 0, worker.stderr
            assert serve.terminate() == 0, serve.stderr
    assert {k: v for k, v in test_rabbitmq.arrivals(http).items() if k != "SIL-P0"} == order


def test_health_says_when_the_hubs_broker_goes_silent(
    tmp_path: Path, amqp_url: str, proxy: Relay
) -> None:
    """A hub with its worker, on a broker that goes silent while nothing is being sent:
    /health said "queue": "ok" for as long as it lasted. Now the idle publisher's heartbeats
    and the consumer's find it out, /health says so, and "ok" again once the broker answers
    (the hub routing what it takes in, without a restart)."""
    fresh_queue(amqp_url, 1)
    with HTTPServer() as http:
        (tmp_path / "routes.yaml").write_text(routes_yaml(http.url()))
        config = local_config(worker=True)
        config.source = tmp_path / "carehub.yaml"
        config.routes = ["routes.yaml"]
        config.worker.poll_interval = 0.05
        config.queue.url = proxy.url(amqp_url)
        config.queue.partitions = 1
        config.queue.heartbeat = HEARTBEAT
        with HubThread(config, tmp_path / "data") as hub:
            send_all(hub.mllp_address, [make_adt("HS-0", patient_id="HS-P")])
            wait_for(lambda: delivered(hub.store, 1), 30, what="the first message delivered")
            assert health_of(hub.http_url)["queue"] == "ok"

            proxy.blackhole_all()
            silent = wait_for(
                lambda: (queue := str(health_of(hub.http_url)["queue"])) != "ok" and queue,
                8 * HEARTBEAT + 10,
                0.2,
                "/health to say the broker is not answering",
            )
            assert silent.startswith(
                ("cannot queue for routing since", "the worker cannot take queued messages")
            ), silent
            assert health_of(hub.http_url)["status"] == "ok"  # intake still stores

            proxy.restore()
            wait_for(
                lambda: health_of(hub.http_url)["queue"] == "ok",
                30,
                0.2,
                "/health to say the queue works again",
            )
            send_all(hub.mllp_address, [make_adt("HS-1", patient_id="HS-P")])
            wait_for(lambda: delivered(hub.store, 2), 30, what="a message after the outage")


# -- a broker down as serve starts ---------------------------------------------------------------
def test_serve_without_worker_starts_while_the_broker_is_down_and_queues_once_it_is_back(
    tmp_path: Path, amqp_url: str, proxy: Relay
) -> None:
    """As a running serve rides out a broker outage (stores, answers AA, holds what it could
    not queue), so does one that starts during it: it says ready, /health says intake cannot
    queue, and once the broker answers what it held is queued, without a restart."""
    fresh_queue(amqp_url, 1)
    proxy.close()  # refused: the broker is down
    (tmp_path / "routes.yaml").write_text(routes_yaml("http://127.0.0.1:9/unused"))
    config = tmp_path / "carehub.yaml"
    config.write_text(hub_yaml(None, proxy.url(amqp_url), 1))
    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data"), "--no-worker"]
    with CarehubProcess(args, tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        assert "cannot queue stored messages for routing" in serve.stderr, serve.stderr
        base = http_base(serve)
        assert str(health_of(base)["queue"]).startswith("cannot queue for routing since")
        send_all(serve.mllp_address, [make_adt("DOWN-1", patient_id="DOWN-P")])

        proxy.start()
        wait_for(lambda: health_of(base)["queue"] == "ok", 30, 0.2, "queueing to work again")
        wait_for(
            lambda: queued(amqp_url, "carehub.route.0") == 1,
            10,
            what="the message stored meanwhile queued",
        )
        assert "queueing for routing again after" in serve.stderr
        assert serve.terminate() == 0, serve.stderr


def test_serve_without_worker_refuses_a_broker_login_that_cannot_work(
    tmp_path: Path, amqp_url: str
) -> None:
    """A broker that refuses the login will not take it later either: serve exits 2 naming
    queue.url (the password hidden), rather than waiting for it."""
    wrong = re.sub(r"//guest:guest@", "//guest:not-the-password@", amqp_url)
    (tmp_path / "routes.yaml").write_text(routes_yaml("http://127.0.0.1:9/unused"))
    config = tmp_path / "carehub.yaml"
    config.write_text(hub_yaml(None, wrong, 1))
    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data"), "--no-worker"]
    with CarehubProcess(args, tmp_path / "logs", "serve") as serve:
        assert serve.process.wait(60) == 2, serve.stderr
    assert f"{config}:2: queue.url: the broker at amqp://guest:***@" in serve.stderr
    assert "ACCESS_REFUSED" in serve.stderr
    assert "not-the-password" not in serve.stderr and "carehub ready" not in serve.stdout


# -- whose failure ---------------------------------------------------------------------------------
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_sweep_that_cannot_reach_the_broker_is_logged_as_the_brokers_failure(
    tmp_path: Path, pg_url: str, amqp_url: str, proxy: Relay
) -> None:
    """The workers' sweep re-queues what was stored and not routed; with the broker away its
    publish fails. That was logged as "the worker's use of the store failed
    (ConnectionRefusedError ...)", sending operators to a database that was fine."""
    fresh_queue(amqp_url, 1)
    with HTTPServer() as http:
        (tmp_path / "routes.yaml").write_text(routes_yaml(http.url()))
        serve_config = tmp_path / "serve.yaml"
        serve_config.write_text(hub_yaml(pg_url, amqp_url, 1, heartbeat=False))
        worker_config = tmp_path / "worker.yaml"
        worker_config.write_text(hub_yaml(pg_url, proxy.url(amqp_url), 1, heartbeat=False))
        data = ["--data-dir", str(tmp_path / "data")]
        logs = tmp_path / "logs"
        serve_args = ["serve", "--config", str(serve_config), *data, "--no-worker"]
        worker_args = ["worker", "--config", str(worker_config), *data]
        with (
            CarehubProcess(serve_args, logs, "serve") as serve,
            CarehubProcess(worker_args, logs, "worker") as worker,
        ):
            serve.wait_ready()
            worker.wait_ready()
            proxy.close()  # the worker's broker is away; serve's is not
            wait_for(
                lambda: "work queue consumer lost the broker" in worker.stderr,
                10,
                what="the worker to notice",
            )
            send_all(serve.mllp_address, [make_adt("SW-1", patient_id="SW-P")])
            # The sweep (every 30 s) re-queues what was stored over 20 s before.
            wait_for(
                lambda: "queueing messages not routed yet on the broker failed" in worker.stderr,
                60,
                0.5,
                "the sweep's failure in the log",
            )
            assert "cannot reach the broker" in worker.stderr
            assert "use of the store failed" not in worker.stderr, worker.stderr

            proxy.start()
            store = MessageStore(pg_url)
            try:
                wait_for(lambda: delivered(store, 1), 30, what="the message routed once back")
            finally:
                store.close()
            assert worker.terminate() == 0, worker.stderr
            assert serve.terminate() == 0, serve.stderr
