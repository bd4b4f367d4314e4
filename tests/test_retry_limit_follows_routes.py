"""A forward's ``retry.max_attempts`` changed by a route reload or a restart applies to the
deliveries already waiting, as its delays do: the on-call who raises it during a long outage
must not see the waiting deliveries die at the old count. What `messages show` and
`dead-letters list` print of them ("N/M attempts") is the limit that applies.

A real hub (SQLite and PostgreSQL stores) sends to a real HTTP receiver that answers 503; the
operator's side is the real CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from carehub.config import load_config
from carehub.store.outbox import Outbox
from carehub.testing import HubThread
from tests import test_store
from tests.helpers_http import HTTPServer, wait_for
from tests.test_dead_letter_order import adt, cli, delivery_of, hub_config, statuses
from tests.test_worker import send

store_url = test_store.store_url

#: A second attempt only after 3 s: time to reload or restart between the first and it.
SLOW_TWO = "{max_attempts: 2, initial_delay: 3, multiplier: 1, max_delay: 3, jitter: 0}"
#: What the on-call changes it to: four attempts, quick ones.
QUICK_FOUR = "{max_attempts: 4, initial_delay: 0.1, multiplier: 1, max_delay: 0.1, jitter: 0}"
QUICK_FOREVER = "{max_attempts: forever, initial_delay: 0.1, multiplier: 1, max_delay: 0.1}"


def shown(config: Path, data_dir: Path, message_id: int) -> dict[str, Any]:
    """The message's only delivery, as `messages show --json` prints it."""
    result = cli(config, data_dir, "messages", "show", str(message_id), "--json")
    assert result.exit_code == 0, result.output
    [delivery] = json.loads(result.output)["deliveries"]
    return delivery  # type: ignore[no-any-return]


def first_attempt_failed(hub: HubThread) -> bool:
    found = Outbox(hub.store).find(limit=None)  # none until the message is routed
    return [(d.attempts, d.status) for d in found] == [(1, "pending")]


def test_a_reload_that_raises_max_attempts_applies_to_the_delivery_waiting(
    tmp_path: Path, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="carehub.worker")
    with HTTPServer(lambda _: 503) as receiver:
        config = hub_config(tmp_path, receiver.url(), SLOW_TWO, store_url)
        data_dir = tmp_path / "data"
        with HubThread(load_config(config), data_dir) as hub:
            send(hub, [adt("RGH-L-0001", "A01")])
            wait_for(lambda: first_attempt_failed(hub), what="the first attempt to fail")
            message_id = delivery_of(hub.store, "RGH-L-0001").message_id

            hub_config(tmp_path, receiver.url(), QUICK_FOUR, store_url)
            assert hub.call(hub.hub.reload_routes()) is True
            waiting = shown(config, data_dir, message_id)

            wait_for(lambda: statuses(hub.store)["RGH-L-0001"] == "dead", what="a dead letter")
            dead = delivery_of(hub.store, "RGH-L-0001")
            assert (dead.attempts, dead.max_attempts) == (4, 4)
            assert len(receiver.requests) == 4
            # What the operator read of it while it waited was the limit that applied.
            assert (waiting["attempts"], waiting["max_attempts"]) == (1, 4)

            listed = cli(config, data_dir, "dead-letters", "list")
            assert listed.exit_code == 0, listed.output
            assert "4/4" in listed.output
    assert f"(delivery {dead.id}) to adt/ehr is a dead letter after attempt 4 of 4" in caplog.text


def test_a_restart_with_max_attempts_forever_keeps_the_waiting_delivery_trying(
    tmp_path: Path,
) -> None:
    with HTTPServer(lambda _: 503) as receiver:
        config = hub_config(tmp_path, receiver.url(), SLOW_TWO)
        data_dir = tmp_path / "data"
        with HubThread(load_config(config), data_dir) as hub:
            send(hub, [adt("RGH-L-0001", "A01")])
            wait_for(lambda: first_attempt_failed(hub), what="the first attempt to fail")
            message_id = delivery_of(hub.store, "RGH-L-0001").message_id

        config = hub_config(tmp_path, receiver.url(), QUICK_FOREVER)
        with HubThread(load_config(config), data_dir) as hub:
            waiting = shown(config, data_dir, message_id)
            wait_for(
                lambda: len(receiver.requests) >= 6 or statuses(hub.store)["RGH-L-0001"] == "dead",
                what="attempts past the old limit",
            )
            delivery = delivery_of(hub.store, "RGH-L-0001")
            assert (delivery.status, delivery.max_attempts) in (("pending", 0), ("sending", 0))
            assert delivery.attempts >= 5
            assert waiting["max_attempts"] == 0  # "forever", from the start
            result = cli(config, data_dir, "messages", "show", str(message_id))
            assert result.exit_code == 0, result.output
            assert "/forever attempts" in result.output

            receiver.respond = lambda _: 200
            wait_for(lambda: receiver.ok(), what="the delivery once the receiver is back")
            wait_for(lambda: statuses(hub.store)["RGH-L-0001"] == "delivered", what="it delivered")
