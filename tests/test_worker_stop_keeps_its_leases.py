"""Two workers on one store, one of them stopped (SIGTERM) while a send to a slow MLLP
receiver takes longer than ``worker.lease_seconds``: the stopping worker keeps renewing the
leases of its sends until they end, so the other worker never takes and sends them again;
and a worker writes about a delivery (renewal, hand-back, result) only while the store still
leases it to that worker, never over the send of the worker that took it after its lease ran
out.

The deployment is `carehub serve --no-worker` and two `carehub worker` processes on a new
PostgreSQL schema and a RabbitMQ virtual host of their own (skipped, with how to start the
service, when either is not running); the outbox test also runs on SQLite."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from carehub.hl7.ack import read_ack
from carehub.store.outbox import AttemptResult, DeliveryRecord, Outbox
from carehub.store.store import MessageStore
from carehub.testing import make_adt, mllp_exchange
from tests import test_rabbitmq
from tests.helpers_http import wait_for
from tests.test_scaleout_today import Deployment, route_into
from tests.test_stop_during_slow_deliveries import MLLPReceiver
from tests.test_store import new_message

amqp_url = test_rabbitmq.amqp_url
pg_url = test_rabbitmq.pg_url

LEASE_SECONDS = 1.0  # the least the config takes: renewed every third of a second
ANSWER_DELAY = 5.0  # seconds the receiver takes to answer: five leases


def mllp_routes(port: int) -> str:
    return f"""routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - forward:
          channel: mllp
          name: ehr
          host: 127.0.0.1
          port: {port}
          timeout: 30
          retry: {{max_attempts: 5, initial_delay: 1}}
"""


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_stopping_worker_keeps_the_leases_of_its_sends_and_nothing_is_sent_twice(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    count = 3
    with MLLPReceiver(delay=ANSWER_DELAY) as receiver:
        deployment = Deployment(
            tmp_path,
            pg_url,
            amqp_url,
            "http://127.0.0.1:9/unused",
            archive=False,
            worker=f"poll_interval: 0.1, lease_seconds: {LEASE_SECONDS}",
        )
        deployment.routes.write_text(mllp_routes(receiver.port))
        try:
            serve = deployment.start_serve()
            first = deployment.start_worker("worker-a")
            first.wait_ready()
            texts = [make_adt(f"LEASE-{n}", patient_id=f"LP{n}") for n in range(count)]
            answers = mllp_exchange(serve.mllp_address, [t.encode() for t in texts])
            assert [read_ack(a.decode())[0] for a in answers] == ["AA"] * count
            # worker-a has every delivery: one being sent, the others waiting for their turn.
            wait_for(lambda: len(receiver.control_ids) >= 1, 30, what="the first send")
            second = deployment.start_worker("worker-b")
            second.wait_ready()
            assert first.terminate(60) == 0, first.stderr

            store = MessageStore(pg_url)
            try:
                wait_for(
                    lambda: all(d.status == "delivered" for d in Outbox(store).find(limit=None)),
                    90,
                    0.2,
                    "every delivery delivered",
                )
                sent = Outbox(store).find(limit=None)
            finally:
                store.close()
            assert deployment.stop_all() == {"worker-b": 0, "serve": 0}
        finally:
            deployment.kill_all()
        received = Counter(receiver.control_ids)

    assert set(received) == {f"LEASE-{n}" for n in range(count)}
    assert [c for c, n in received.items() if n > 1] == [], received
    assert all(d.attempts == 1 for d in sent), [(d.id, d.attempts) for d in sent]
    assert "cut off" not in first.stderr
    assert "stopped renewing their lease" not in second.stderr


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'carehub.db'}"
    else:
        yield request.getfixturevalue("pg_url")


def sent(delivery: DeliveryRecord, lease_until: datetime | None) -> AttemptResult:
    return AttemptResult(
        delivery.id,
        delivery.message_id,
        delivery.attempts + 1,
        datetime.now(UTC),
        5,
        True,
        "AA",
        destination=delivery.destination,
        order_key=delivery.order_key,
        lease_until=lease_until,
    )


def test_a_worker_whose_lease_ran_out_writes_nothing_over_the_worker_that_took_it(
    store_url: str,
) -> None:
    first, second = MessageStore(store_url), MessageStore(store_url)
    try:
        first.migrate()
        [stored] = first.insert_messages([new_message("OWN-1", patient_id="OWN-P1")])
        route_into(Outbox(first), stored.message_id, "line-own")
        worker_a, worker_b = Outbox(first), Outbox(second)

        # worker-a's lease runs out (it stopped renewing it) ...
        [taken_by_a] = worker_a.claim_due(1, timedelta(milliseconds=1))
        a_lease = taken_by_a.lease_until
        time.sleep(0.05)
        assert a_lease is not None and a_lease < datetime.now(UTC)
        # ... so worker-b put the delivery back in line and took it.
        assert worker_b.release_expired_leases() == 1
        [taken_by_b] = worker_b.claim_due(1, timedelta(minutes=5))
        assert taken_by_b.id == taken_by_a.id and taken_by_b.lease_until is not None

        # What worker-a writes now is left out: renewal, hand-back, result.
        assert worker_a.renew_leases({taken_by_a.id: a_lease}, timedelta(minutes=5)) == {}
        assert worker_a.release({taken_by_a.id: a_lease}) == 0
        worker_a.finish([sent(taken_by_a, a_lease)])
        now = worker_b.get(taken_by_b.id)
        assert now is not None and now.status == "sending" and now.attempts == 0
        assert now.lease_until == taken_by_b.lease_until
        assert worker_a.attempts(taken_by_a.id) == []

        # worker-b's own writes go through, renewed lease and all.
        renewed = worker_b.renew_leases({taken_by_b.id: taken_by_b.lease_until}, timedelta(1))
        assert list(renewed) == [taken_by_b.id]
        worker_b.finish([sent(taken_by_b, renewed[taken_by_b.id])])
        done = worker_b.get(taken_by_b.id)
        assert done is not None and done.status == "delivered" and done.attempts == 1
    finally:
        first.close()
        second.close()
