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
    # The probe is the same delivery each time, as the head of a queue.
    probed = {d for d, count in during.items() if count > before.get(d, 0)}
    assert len(probed) <= 2, probed

    assert all(d.status == "delivered" for d in delivered), {d.status for d in delivered}
    arrived: dict[str, list[str]] = {p: [] for p in sent}
    for request in receiver.answered(200):
        body = request.json
        arrived[body["event"]["patient"]["primary"]["value"]].append(body["control_id"])
    assert arrived == sent

    said = [r.getMessage() for r in caplog.records if "care/hook" in r.getMessage()]
    assert any("taken for down" in line for line in said), said
    assert any("went through after" in line for line in said), said
    assert not any("BRK" in line for line in said)  # no patient identifiers in the log
