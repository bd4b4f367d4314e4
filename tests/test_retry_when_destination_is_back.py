"""When a destination takes a delivery again after failing, its other deliveries waiting out a
retry delay go at once, rather than after a delay that grew while it was down (up to max_delay:
15 minutes in the sample routes), with each patient's later messages held behind them."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from carehub import worker
from carehub.config import HubConfig, load_config
from carehub.store.outbox import Outbox
from carehub.testing import HubThread, make_adt
from tests.helpers_http import HTTPServer, wait_for
from tests.test_worker import send, write_config

#: A long first delay: without the change the first patient's message waits all of it.
SLOW_RETRY = "{max_attempts: 5, initial_delay: 60, multiplier: 1, max_delay: 60, jitter: 0}"


def hook_config(tmp_path: Path, receiver: HTTPServer) -> HubConfig:
    """A hub whose one route forwards every ADT to ``receiver``, retrying slowly."""
    routes = f"""
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: hook, url: {receiver.url()}, retry: {SLOW_RETRY}}}
"""
    return load_config(write_config(tmp_path, routes))


@pytest.fixture(autouse=True)
def _short_outages(monkeypatch: pytest.MonkeyPatch) -> None:
    """An outage of half a second counts (30 s in the hub), once a minute at most."""
    monkeypatch.setattr(worker, "RETRY_SOON_AFTER", 0.5)
    monkeypatch.setattr(worker, "RETRY_SOON_EVERY", 60.0)


def test_a_destination_back_up_gets_its_retrying_deliveries_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carehub.worker")
    down = True
    with HTTPServer(lambda _: 503 if down else 200) as receiver:
        config = hook_config(tmp_path, receiver)
        with HubThread(config, tmp_path / "data") as hub:
            send(
                hub,
                [
                    make_adt("BACK-1", patient_id="P-B1"),
                    make_adt("BACK-2", "A03", patient_id="P-B1"),
                ],
            )
            outbox = Outbox(hub.store)
            wait_for(
                lambda: any(d.attempts == 1 for d in outbox.find(destination="care/hook")),
                what="the first attempt failed",
            )
            time.sleep(0.6)  # down long enough to count as an outage
            down = False
            started = time.monotonic()
            # Another patient's message: its first attempt works and tells the worker so.
            send(hub, [make_adt("BACK-3", patient_id="P-B2")])
            wait_for(lambda: len(receiver.ok()) == 3, 30, what="all three delivered")
            took = time.monotonic() - started
    assert took < 20, f"the retrying delivery waited {took:.1f} s"
    bodies = [r.body for r in receiver.ok()]
    first, second = (
        next(i for i, body in enumerate(bodies) if control_id.encode() in body)
        for control_id in ("BACK-1", "BACK-2")
    )
    assert first < second  # the patient's line kept its order
    assert (
        "care/hook takes deliveries again: 1 delivery(ies) waiting out a retry delay are due now"
    ) in caplog.text


def test_a_destination_that_fails_every_other_request_does_not_burn_the_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each success of a flapping destination ends a run of failures; retries are brought
    forward once (the first outage), not at each, so none is spent in seconds."""
    caplog.set_level(logging.INFO, logger="carehub.worker")
    answers = iter([503] * 4 + [503, 200] * 200)
    with HTTPServer(lambda _: next(answers)) as receiver:
        config = hook_config(tmp_path, receiver)
        with HubThread(config, tmp_path / "data") as hub:
            outbox = Outbox(hub.store)
            send(hub, [make_adt(f"FLAP-{n}", patient_id=f"P-F{n}") for n in range(4)])
            wait_for(
                lambda: len([d for d in outbox.find() if d.attempts >= 1]) == 4,
                what="four failed first attempts",
            )
            time.sleep(0.6)
            for n in range(4, 10):  # each new patient's send meets the flapping receiver
                send(hub, [make_adt(f"FLAP-{n}", patient_id=f"P-F{n}")])
                time.sleep(0.3)
            time.sleep(1.0)
            found = outbox.find()
    assert not [d for d in found if d.status == "dead"], [(d.id, d.attempts) for d in found]
    assert max(d.attempts for d in found) <= 2  # the first try, and one brought forward
    assert caplog.text.count("takes deliveries again") <= 1
