"""`messages show` says why a delivery waits behind a dead letter of its patient's line, and
what lets it go: "held behind dead letter #N (message M): carehub dead-letters retry|discard
N", and in --json each delivery's ``held_behind``. The dead letter it names is the one
`dead-letters list` counts it against.

A real hub sends to a real HTTP receiver that is down while the A01 dies; the operator's side
is the real CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from carehub.config import load_config
from carehub.testing import HubThread
from tests import test_dead_letter_order
from tests.helpers_http import HTTPServer, wait_for
from tests.test_dead_letter_order import (
    DESTINATION,
    TWO_TRIES,
    adt,
    cli,
    delivery_of,
    hub_config,
    outage,
    statuses,
)
from tests.test_worker import send

receiver = test_dead_letter_order.receiver


def show(config: Path, data_dir: Path, message_id: int, *json_flag: str) -> Any:
    result = cli(config, data_dir, "messages", "show", str(message_id), *json_flag)
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if json_flag else result.output


def test_a_held_delivery_names_the_dead_letter_holding_it_and_what_lets_it_go(
    tmp_path: Path, receiver: HTTPServer
) -> None:
    config = hub_config(tmp_path, receiver.url(), TWO_TRIES)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        outage(hub, receiver)  # the A01 is a dead letter; the A03 waits behind it
        dead = delivery_of(hub.store, "RGH-O-0001")
        held = delivery_of(hub.store, "RGH-O-0002")
        assert held.status == "pending"

        text = show(config, data_dir, held.message_id)
        assert (
            f"held behind dead letter #{dead.id} (message {dead.message_id}): "
            f"carehub dead-letters retry|discard {dead.id}"
        ) in " ".join(text.split())
        [shown] = show(config, data_dir, held.message_id, "--json")["deliveries"]
        assert shown["held_behind"] == [
            {"delivery_id": dead.id, "message_id": dead.message_id, "destination": DESTINATION}
        ]
        # The dead letter itself, and a delivery nothing holds, say nothing of the kind.
        assert "held behind" not in show(config, data_dir, dead.message_id)
        [own] = show(config, data_dir, dead.message_id, "--json")["deliveries"]
        assert own["held_behind"] == []
        # `dead-letters list` counts it against the same dead letter.
        listed = cli(config, data_dir, "dead-letters", "list")
        assert f"#{dead.id} holds 1" in listed.output

        result = cli(config, data_dir, "dead-letters", "retry", str(dead.id))
        assert result.exit_code == 0, result.output
        wait_for(
            lambda: statuses(hub.store) == {"RGH-O-0001": "delivered", "RGH-O-0002": "delivered"},
            what="both delivered once the dead letter is retried",
        )
        assert "held behind" not in show(config, data_dir, held.message_id)
        [sent] = show(config, data_dir, held.message_id, "--json")["deliveries"]
        assert sent["held_behind"] == []


def test_a_delivery_waiting_for_its_own_retry_is_not_said_to_be_held(
    tmp_path: Path, receiver: HTTPServer
) -> None:
    """Behind a delivery that waits to be tried again (not a dead letter), the A03 waits for
    its turn: nothing for an operator to retry or discard."""
    slow = "{max_attempts: 5, initial_delay: 30, multiplier: 1, max_delay: 30, jitter: 0}"
    config = hub_config(tmp_path, receiver.url(), slow)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [adt("RGH-O-0001", "A01"), adt("RGH-O-0002", "A03")])
        wait_for(lambda: len(receiver.requests) == 1, what="the A01's first attempt")
        wait_for(lambda: delivery_of(hub.store, "RGH-O-0001").attempts == 1, what="it recorded")
        waiting = delivery_of(hub.store, "RGH-O-0002")
        assert "held behind" not in show(config, data_dir, waiting.message_id)
        [shown] = show(config, data_dir, waiting.message_id, "--json")["deliveries"]
        assert shown["held_behind"] == []
