"""A destination's failure run in the worker's log counts what the store says waits for it
(every delivery of its patients' lines, not only those this worker saw fail), and ends once
this worker has seen no failed attempt for a whole summary period, even when none of its own
sends worked since (another worker's did, or an operator paused the destination).

A real hub forwards to a real webhook receiver that answers 503."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub import worker as worker_module
from carehub.config import load_config
from carehub.store.outbox import Outbox
from carehub.testing import HubThread, make_adt
from tests.helpers_http import HTTPServer, wait_for
from tests.test_destination_failure_runs_logged import webhook_routes
from tests.test_worker import send, write_config

PATIENTS = 4
PER_PATIENT = 3
SUMMARY_EVERY = 0.5  # seconds, for the test; 30 s in service
WAITING = re.compile(r"(\d+) delivery\(ies\) waiting for it")


@pytest.fixture
def receiver() -> Iterator[HTTPServer]:
    with HTTPServer(respond=lambda _: 503) as server:
        yield server


def test_summaries_count_the_stores_waiting_deliveries_and_a_quiet_run_ends(
    tmp_path: Path,
    receiver: HTTPServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "TROUBLE_REPORT_SECONDS", SUMMARY_EVERY)
    routes = webhook_routes(receiver.url("/events"))
    caplog.set_level(logging.INFO, logger="carehub.worker")
    config = load_config(write_config(tmp_path, routes))
    texts = [
        make_adt(f"TRB-{p}-{n}", patient_id=f"P{p:02d}")
        for n in range(PER_PATIENT)
        for p in range(PATIENTS)
    ]
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, texts)
        # Only each patient's first delivery is tried; the rest of each line waits behind it.
        wait_for(lambda: len(receiver.requests) >= 4 * PATIENTS, 30, what="failed attempts")
        time.sleep(4 * SUMMARY_EVERY)
        unfinished = [
            d for d in Outbox(hub.store).find(limit=None) if d.status in ("pending", "sending")
        ]
        assert len(unfinished) == PATIENTS * PER_PATIENT

        Outbox(hub.store).pause_destination("care/hook", "webhook", by="care-ops")
        wait_for(
            lambda: any("no failed attempts" in r.getMessage() for r in caplog.records),
            10,
            what="the run's end once nothing failed for a summary period",
        )

    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "care/hook" in r.getMessage()
    ]
    summaries = [line for line in warnings if "still failing" in line]
    counts = [WAITING.search(line) for line in summaries]
    assert summaries and all(counts), summaries
    assert {int(m.group(1)) for m in counts if m} == {PATIENTS * PER_PATIENT}, summaries
    ended = [line for line in warnings if "no failed attempts" in line]
    assert len(ended) == 1 and "attempt(s) failed" in ended[0], warnings
    assert not [line for line in warnings if "works again" in line], warnings
