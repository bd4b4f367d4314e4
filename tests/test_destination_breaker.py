"""A destination that is down is probed, one delivery at a time, rather than retried by every
waiting patient's line: the attempt history grows by a probe per retry interval, not by one
row per patient per retry, and when the destination is back every delivery goes, each
patient's in order.

A real hub forwards to a real webhook receiver that answers 503 for a while, then 200."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from carehub import worker as worker_module
from carehub.config import load_config
from carehub.store.schema import delivery_attempts
from carehub.testing import HubThread, make_adt
from tests.helpers_http import HTTPServer, wait_for
from tests.test_worker import send, write_config

PATIENTS = 40
PER_PATIENT = 2
MAX_DELAY = 0.4  # seconds: the longest retry delay, so the longest probe interval
RETRY = f"{{initial_delay: 0.1, multiplier: 2, max_delay: {MAX_DELAY}, jitter: 0}}"
WATCH = 3.0  # seconds the attempts are counted over while the breaker is open


def routes(url: str) -> str:
    return f"""
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - translate: v2-to-event
      - forward: {{channel: webhook, name: hook, url: {url}, retry: {RETRY}}}
"""


@pytest.fixture
def receiver() -> Iterator[HTTPServer]:
    with HTTPServer(respond=lambda _: 503) as server:
        yield server


def attempt_rows(hub: HubThread) -> dict[int, int]:
    """Attempt rows per delivery id."""
    assert hub.store is not None
    with hub.store.engine.connect() as conn:
        rows = conn.execute(
            select(delivery_attempts.c.delivery_id, func.count()).group_by(
                delivery_attempts.c.delivery_id
            )
        )
        return {delivery_id: count for delivery_id, count in rows}


def test_a_down_destination_is_probed_not_retried_by_every_line(
    tmp_path: Path,
    receiver: HTTPServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "BREAKER_SECONDS", 0.5, raising=False)
    caplog.set_level(logging.INFO, logger="carehub.worker")
    config = load_config(write_config(tmp_path, routes(receiver.url("/events"))))
    sent: dict[str, list[str]] = {f"BRK{p:02d}": [] for p in range(PATIENTS)}
    texts = []
    for n in range(PER_PATIENT):
        for patient, ids in sent.items():
            control_id = f"{patient}-{n}"
            ids.append(control_id)
            texts.append(make_adt(control_id, "A08", patient_id=patient))
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, texts)
        wait_for(lambda: receiver.requests, 10, what="a first attempt")
        time.sleep(2.0)  # the breaker has opened by now (after 0.5 s of failures)
        before = attempt_rows(hub)
        time.sleep(WATCH)
        during = attempt_rows(hub)
        receiver.respond = lambda _: 200
        delivered = hub.wait_for_deliveries(PATIENTS * PER_PATIENT, timeout=60)

    made = sum(during.values()) - sum(before.values())
    # A probe per retry interval at most (one more for a send under way as counting began),
    # where every line retrying on its own made one per patient per interval (about 300).
    assert made <= WATCH / MAX_DELAY + 3, made

    assert all(d.status == "delivered" for d in delivered), {d.status for d in delivered}
    arrived: dict[str, list[str]] = {p: [] for p in sent}
    for request in receiver.answered(200):
        body = request.json
        arrived[body["event"]["patient"]["primary"]["value"]].append(body["control_id"])
    assert arrived == sent

    said = [r.getMessage() for r in caplog.records if "care/hook" in r.getMessage()]
    assert any("taken for down" in line for line in said), said
    assert any("answered again after" in line for line in said), said
    assert not any("BRK" in line for line in said)  # no patient identifiers in the log


def test_one_message_the_destination_keeps_refusing_does_not_hold_the_others(
    tmp_path: Path, receiver: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One patient's message refused again and again (503 for it alone) is that message's
    trouble, not the destination's: other patients' messages sent while it keeps failing go
    at once, not after it gives up."""
    monkeypatch.setattr(worker_module, "BREAKER_SECONDS", 0.5, raising=False)
    receiver.respond = lambda request: 503 if b"POISON-0" in request.body else 200
    config = load_config(write_config(tmp_path, routes(receiver.url("/events"))))
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, [make_adt("POISON-0", "A08", patient_id="BRKPOISON")])
        wait_for(lambda: len(receiver.requests) >= 4, 20, what="the message refused 4 times")
        others = [make_adt(f"OK-{n}", "A08", patient_id=f"BRKOK{n}") for n in range(5)]
        send(hub, others)
        wait_for(lambda: len(receiver.answered(200)) == 5, 10, what="the others delivered")


def test_a_give_up_after_past_what_the_store_holds_is_capped() -> None:
    """A number of seconds the store's column cannot hold would stop the hub at start."""
    from carehub.routing.config import MAX_SPAN, RetryPolicy

    assert RetryPolicy(give_up_after=3_000_000_000).give_up_seconds == MAX_SPAN
    assert RetryPolicy.model_validate({"give_up_after": "100000d"}).give_up_seconds == MAX_SPAN


def test_a_probe_refused_for_good_ends_the_outage(
    tmp_path: Path, receiver: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A destination that answers the probe with a refusal for good (HTTP 400: that message
    is bad) is up: the others go at once, not after the next, longer probe interval."""
    monkeypatch.setattr(worker_module, "BREAKER_SECONDS", 0.5, raising=False)
    retry = "{initial_delay: 0.1, multiplier: 2, max_delay: 3, jitter: 0}"
    config = load_config(
        write_config(tmp_path, routes(receiver.url("/events")).replace(RETRY, retry))
    )
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, [make_adt(f"UP-{n}", "A08", patient_id=f"BRKUP{n}") for n in range(10)])
        wait_for(lambda: receiver.requests, 10, what="a first attempt")
        time.sleep(3.5)  # down, its probes now seconds apart
        refused: list[bool] = []

        def answer(_request: object) -> int:
            if not refused:
                refused.append(True)
                return 400
            return 200

        receiver.respond = answer
        wait_for(lambda: len(receiver.answered(200)) == 9, 20, what="the other nine")
    (bad,) = receiver.answered(400)
    last = max(request.at for request in receiver.answered(200))
    assert last - bad.at < 1.2, last - bad.at
