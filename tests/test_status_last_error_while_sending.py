"""`carehub status` shows a destination's last error while the retry of a delivery that failed
is under way: a hanging destination keeps each retry in flight for its whole timeout, and the
column must not go blank for that time, as if nothing were wrong.

A real hub sends to a real HTTP receiver that refuses the first attempt and holds the next one
open; `carehub status` runs as the operator runs it."""

from __future__ import annotations

import json
from pathlib import Path

from carehub.config import load_config
from carehub.testing import HubThread
from tests.helpers_http import HTTPServer, Received, wait_for
from tests.test_dead_letter_order import DESTINATION, adt, cli, delivery_of, hub_config
from tests.test_worker import send

QUICK = "{max_attempts: 5, initial_delay: 0.1, multiplier: 1, max_delay: 0.1, jitter: 0}"
#: Seconds the receiver holds the second attempt open (the webhook waits for it).
HELD_OPEN = 8.0


def held_after_the_first(request: Received, seen: list[Received]) -> float:
    seen.append(request)
    return 0.0 if len(seen) == 1 else HELD_OPEN


def test_the_last_error_is_shown_while_the_retry_is_in_flight(tmp_path: Path) -> None:
    seen: list[Received] = []
    with HTTPServer(lambda _: 503, delay=lambda r: held_after_the_first(r, seen)) as receiver:
        config = hub_config(tmp_path, receiver.url(), QUICK)
        data_dir = tmp_path / "data"
        with HubThread(load_config(config), data_dir) as hub:
            send(hub, [adt("RGH-S-0001", "A01")])
            wait_for(lambda: receiver.in_flight == 1 and len(seen) == 2, what="the retry held")
            delivery = delivery_of(hub.store, "RGH-S-0001")
            assert (delivery.status, delivery.attempts) == ("sending", 1)

            result = cli(config, data_dir, "status", "--json")
            assert result.exit_code == 0, result.output
            [destination] = json.loads(result.output)["destinations"]
            assert (destination["destination"], destination["waiting"]) == (DESTINATION, 1)
            assert destination["retrying"] == 1
            assert "HTTP 503" in (destination["last_error"] or "")

            table = cli(config, data_dir, "status")
            assert table.exit_code == 0, table.output
            assert "HTTP 503" in table.output
            receiver.delay = 0.0
