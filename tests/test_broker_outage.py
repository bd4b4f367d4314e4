"""A broker that goes away and comes back: the hub's publisher and its worker's consumer both
reach RabbitMQ through a TCP relay the test cuts and restores (the shared broker itself is
never touched). Messages stored during the outage are routed once it is over, without a
restart and without waiting for the once-a-minute sweep; /health says while intake cannot
queue. Skipped, with how to start it, when RabbitMQ is not running on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub.hub import PUBLISH_STOP_WAIT
from carehub.store.store import MessageStore
from carehub.testing import HubThread, local_config, make_adt
from carehub.workqueue import PUBLISH_CONFIRM_TIMEOUT
from tests.helpers_http import HTTPServer, wait_for
from tests.helpers_relay import Relay, relay_to
from tests.test_rabbitmq import amqp_url, delivered, fresh_queue, routes_yaml, send_all

__all__ = ["amqp_url"]  # the module-scoped fixture, shared with test_rabbitmq

#: Well under the workers' sweep (60 s), which would otherwise route what the queue lost.
RECOVERY_SECONDS = 20


@pytest.fixture
def relay(amqp_url: str) -> Iterator[Relay]:
    relayed = relay_to(amqp_url, 5672)
    try:
        yield relayed
    finally:
        relayed.cut()


def health(hub: HubThread) -> dict[str, object]:
    with urllib.request.urlopen(hub.http_url + "/health", timeout=10) as answer:
        return json.loads(answer.read())


def test_messages_stored_while_the_broker_is_away_are_routed_when_it_is_back(
    tmp_path: Path, amqp_url: str, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    relayed_url = relay.url(amqp_url)
    fresh_queue(amqp_url, 2)
    with HTTPServer() as http:
        (tmp_path / "routes.yaml").write_text(routes_yaml(http.url()))
        config = local_config(worker=True)
        config.source = tmp_path / "carehub.yaml"
        config.routes = ["routes.yaml"]
        config.worker.poll_interval = 0.05
        config.queue.url = relayed_url
        config.queue.partitions = 2
        with HubThread(config, tmp_path / "data") as hub:
            send_all(hub.mllp_address, [make_adt("BO-1", patient_id="P1")])
            wait_for(lambda: delivered(hub.store, 1), 30, what="the first message delivered")
            assert health(hub)["queue"] == "ok"

            relay.cut()
            wait_for(
                lambda: "work queue consumer lost the broker" in caplog.text,
                10,
                what="the consumer to notice",
            )
            send_all(hub.mllp_address, [make_adt("BO-2", patient_id="P1")])  # stored, AA
            wait_for(
                lambda: str(health(hub)["queue"]).startswith("cannot queue for routing since"),
                10,
                what="/health to say intake cannot queue",
            )
            assert health(hub)["status"] == "ok"  # intake still stores and answers

            relay.start()
            send_all(hub.mllp_address, [make_adt("BO-3", patient_id="P2")])
            wait_for(
                lambda: delivered(hub.store, 3),
                RECOVERY_SECONDS,
                what="the messages stored during the outage routed and delivered",
            )
            assert health(hub)["queue"] == "ok"
        assert "work queue consumer connected to the broker again" in caplog.text
        assert "queueing for routing again after" in caplog.text
        assert sorted(r.json["control_id"] for r in http.ok()) == ["BO-1", "BO-2", "BO-3"]


def test_intake_answers_at_once_while_the_broker_is_silent(
    tmp_path: Path, amqp_url: str, relay: Relay
) -> None:
    """A broker that stops answering without refusing: publishing waits for kombu to give up
    connecting, on the publisher's own thread, while intake goes on storing and answering.
    (On the event loop, every sender's ACK waited with it, seconds at a time.)"""
    relayed_url = relay.url(amqp_url)
    fresh_queue(amqp_url, 1)
    config = local_config(worker=False)
    config.queue.url = relayed_url
    config.queue.partitions = 1
    with HubThread(config, tmp_path / "data") as hub:
        send_all(hub.mllp_address, [make_adt("SI-0", patient_id="P1")])
        relay.silence()
        waits = []
        for n in range(1, 8):
            started = time.monotonic()
            send_all(hub.mllp_address, [make_adt(f"SI-{n}", patient_id="P1")])
            waits.append(time.monotonic() - started)
            time.sleep(0.3)
        assert hub.store.count("received") == 8  # every one stored and answered AA
        # Whatever kombu's connect timeout, no answer waited for it: a second is ample.
        assert max(waits) < 1.0, waits


def test_the_hub_stops_promptly_while_the_broker_is_silent(
    tmp_path: Path, amqp_url: str, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """A publish held by a silent broker is given up at stop after PUBLISH_STOP_WAIT: what it
    held is stored and the workers' sweep routes it, so SIGTERM need not wait for kombu to stop
    trying (12 s here; the stop waited for all of it)."""
    relayed_url = relay.url(amqp_url)
    fresh_queue(amqp_url, 1)
    config = local_config(worker=False)
    config.queue.url = relayed_url
    config.queue.partitions = 1
    hub = HubThread(config, tmp_path / "data").__enter__()
    try:
        send_all(hub.mllp_address, [make_adt("SS-0", patient_id="P1")])
        relay.silence()
        send_all(hub.mllp_address, [make_adt("SS-1", patient_id="P1")])
        time.sleep(0.2)  # its publish is under way, and held
    finally:
        started = time.monotonic()
        hub.stop()
        took = time.monotonic() - started
    assert took < PUBLISH_STOP_WAIT + 2.0, took
    assert "stopping without waiting longer for the broker" in caplog.text
    store = MessageStore(f"sqlite:///{tmp_path / 'data' / 'carehub.db'}")
    try:
        assert store.count("received") == 2  # stored, for the sweep to route
    finally:
        store.close()


def test_a_broker_that_hangs_with_its_connection_open_is_noticed(
    tmp_path: Path, amqp_url: str, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """Publishes went into the socket buffer of a connection the broker no longer served, and
    nothing said so: /health read "ok" and stored messages waited for the sweep. Each publish
    now waits for the broker's confirm, so the hub holds them, says so, and queues them once
    the broker answers again."""
    relayed_url = relay.url(amqp_url)
    fresh_queue(amqp_url, 1)
    config = local_config(worker=False)
    config.queue.url = relayed_url
    config.queue.partitions = 1
    with HubThread(config, tmp_path / "data") as hub:
        send_all(hub.mllp_address, [make_adt("HG-0", patient_id="P1")])
        assert health(hub)["queue"] == "ok"
        relay.freeze()
        send_all(hub.mllp_address, [make_adt("HG-1", patient_id="P1")])  # stored, AA
        wait_for(
            lambda: str(health(hub)["queue"]).startswith("cannot queue for routing since"),
            # The confirm's wait, then kombu's retries of it on a new connection: ~20 s here.
            8 * PUBLISH_CONFIRM_TIMEOUT,
            what="/health to say intake cannot queue",
        )
        assert "cannot queue stored messages for routing" in caplog.text
        relay.frozen.clear()  # the broker answers again: what was held is queued
        wait_for(lambda: health(hub)["queue"] == "ok", 30, what="queueing again")
