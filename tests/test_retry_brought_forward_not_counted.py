"""A retry brought forward because its destination seemed back, and failed again (the
destination flaps), is in the delivery's history but costs none of its ``max_attempts`` and none
of its wait: the delivery keeps the retry time it had, and becomes a dead letter only after as
many attempts, at the times, as its retry settings say. The operator's views say so.

A real hub forwards to a real HTTP receiver that fails, takes one delivery, then fails again;
the operator's side goes through the real CLI."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from carehub import worker
from carehub.cli import main
from carehub.components import Outgoing
from carehub.config import load_config
from carehub.routing.router import PlannedDelivery, RouteResult, RoutingResult
from carehub.store.outbox import AttemptResult, DeliveryRecord, Outbox
from carehub.store.schema import deliveries
from carehub.store.store import MessageStore
from carehub.testing import HTTPReceiver, HubThread, make_adt
from tests import test_store
from tests.helpers_http import wait_for
from tests.test_store import new_message
from tests.test_worker import send, write_config

store_url = test_store.store_url
store = test_store.store

#: Two attempts a minute apart: the early one comes long before the second.
TWO_SLOW_TRIES = "{max_attempts: 2, initial_delay: 60, multiplier: 1, max_delay: 60, jitter: 0}"
DESTINATION = "care/hook"


@pytest.fixture(autouse=True)
def _any_outage_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries are brought forward after any outage (30 s in the hub), once a minute at most."""
    monkeypatch.setattr(worker, "RETRY_SOON_AFTER", 0.0)
    monkeypatch.setattr(worker, "RETRY_SOON_EVERY", 60.0)


@pytest.fixture
def receiver() -> Iterator[HTTPReceiver]:
    """The destination, failing (503) but for the answers a test queues."""
    with HTTPReceiver(status=503) as server:
        yield server


def _config(tmp_path: Path, receiver: HTTPReceiver) -> Path:
    routes = f"""
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: hook, url: {receiver.url()}, retry: {TWO_SLOW_TRIES}}}
"""
    return write_config(tmp_path, routes)


def _cli(config: Path, data_dir: Path, *args: str) -> Any:
    result = CliRunner().invoke(main, [*args, "--config", str(config), "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    return result


def _delivery(outbox: Outbox, control_id: str, hub: HubThread) -> DeliveryRecord | None:
    """The message's one delivery; None until it is routed."""
    [message] = [m for m in hub.store.find(limit=None) if m.control_id == control_id]
    found = outbox.find(message_id=message.id)
    return found[0] if found else None


def _status(outbox: Outbox, control_id: str, hub: HubThread) -> tuple[str, int] | None:
    delivery = _delivery(outbox, control_id, hub)
    return None if delivery is None else (delivery.status, delivery.attempts)


def _outcomes(outbox: Outbox, delivery_id: int) -> list[tuple[int, str]]:
    return [(a.number, a.outcome) for a in outbox.attempts(delivery_id)]


def test_a_flapping_destination_does_not_spend_the_attempts_of_retries_brought_forward(
    tmp_path: Path, receiver: HTTPReceiver
) -> None:
    config = _config(tmp_path, receiver)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        outbox = Outbox(hub.store)
        send(hub, [make_adt("FLAP-1", patient_id="P-FLAP-1")])
        wait_for(
            lambda: _status(outbox, "FLAP-1", hub) == ("pending", 1),
            what="the first attempt failed",
        )
        first = _delivery(outbox, "FLAP-1", hub)
        assert first is not None
        scheduled = first.not_before
        assert scheduled > datetime.now(UTC)  # waiting out its minute

        # The destination takes one delivery (another patient's), then fails again: the
        # waiting retry is sent at once, and fails.
        receiver.respond(200)
        send(hub, [make_adt("FLAP-2", patient_id="P-FLAP-2")])
        wait_for(lambda: len(outbox.attempts(first.id)) == 2, what="the retry brought forward")
        wait_for(lambda: _status(outbox, "FLAP-2", hub) == ("delivered", 1))

        after = outbox.get(first.id)
        assert after is not None
        assert _outcomes(outbox, after.id) == [(1, "failed"), (2, "failed early")]
        assert (after.status, after.attempts, after.early_attempts) == ("pending", 1, 1)
        assert after.not_before == scheduled  # the schedule the routes promised holds
        assert len(receiver.requests) == 3  # FLAP-1, FLAP-2, FLAP-1 early

        shown = _cli(config, data_dir, "messages", "show", str(after.message_id)).output
        assert "pending, 1/2 (+1 early) attempts" in shown
        assert "attempt 2 " in shown and "failed early (not counted): POST" in shown

        # Its minute is up (its retry time moved to now rather than waited for): the second
        # attempt, as scheduled, fails, and it is a dead letter after two counted attempts.
        with hub.store.engine.begin() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == after.id)
                .values(not_before=datetime.now(UTC))
            )
        wait_for(lambda: _status(outbox, "FLAP-1", hub) == ("dead", 2), what="a dead letter")
        dead = outbox.get(first.id)
        assert dead is not None
        assert (dead.attempts, dead.early_attempts) == (2, 1)
        assert _outcomes(outbox, dead.id) == [(1, "failed"), (2, "failed early"), (2, "dead")]
        assert len(receiver.requests) == 4

        listed = _cli(config, data_dir, "dead-letters", "list").output
        assert "2/2 (+1 early)" in listed


def _failed(delivery: DeliveryRecord, retry_at: datetime, *, early: bool) -> AttemptResult:
    return AttemptResult(
        delivery.id,
        delivery.message_id,
        delivery.attempts + 1,
        datetime.now(UTC),
        3,
        False,
        "HTTP 503",
        retry_at,
        destination=delivery.destination,
        order_key=delivery.order_key,
        early=early,
    )


def test_the_outbox_takes_retries_early_and_keeps_their_schedule(store: MessageStore) -> None:
    """On SQLite and PostgreSQL: claim_early leases a retry before its time with that time
    untouched; its failure is recorded, not counted, and the time stays."""
    outbox = Outbox(store)
    [stored] = store.insert_messages([new_message("EARLY-1")])
    outgoing = Outgoing(b"{}", "application/json", "key-early-1")
    planned = PlannedDelivery("care", DESTINATION, "webhook", outgoing, "HOSP|P1", 2)
    outbox.record_routing(
        [RoutingResult(stored.message_id, 1, [RouteResult("care", True, [], [], [planned])])]
    )
    lease = timedelta(minutes=5)
    [head] = outbox.claim_due(10, lease)
    scheduled = datetime.now(UTC) + timedelta(minutes=1)
    outbox.finish([_failed(head, scheduled, early=False)])
    assert outbox.claim_due(10, lease) == []  # waiting out its minute
    assert outbox.claim_early("elsewhere", 10, lease) == []

    [early] = outbox.claim_early(DESTINATION, 10, lease)
    assert (early.id, early.attempts, early.not_before) == (head.id, 1, scheduled)
    outbox.finish([_failed(early, early.not_before, early=True)])

    after = outbox.get(head.id)
    assert after is not None
    assert (after.status, after.attempts, after.early_attempts) == ("pending", 1, 1)
    assert after.not_before == scheduled
    assert [(a.number, a.outcome) for a in outbox.attempts(head.id)] == [
        (1, "failed"),
        (2, "failed early"),
    ]
    assert [d.early_attempts for d in outbox.find(destination=DESTINATION)] == [1]
