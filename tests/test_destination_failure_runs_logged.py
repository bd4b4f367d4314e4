"""A destination that keeps failing is one run in the log: a WARNING with the reason when it
starts, a summary while it lasts (attempts failed, deliveries waiting), a line when it works
again; each attempt is a DEBUG line naming the message id that `carehub messages show` takes.

A real hub forwards to a real webhook receiver that answers 503 for a while, then 200."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub import worker as worker_module
from carehub.config import load_config
from carehub.testing import HubThread, make_adt
from tests.helpers_http import HTTPServer, wait_for
from tests.test_worker import send, write_config

MESSAGES = 20
SUMMARY_EVERY = 0.5  # seconds, for the test; 30 s in service
FOREVER = "{max_attempts: forever, initial_delay: 0.05, max_delay: 0.05, jitter: 0}"


def webhook_routes(url: str, retry: str = FOREVER) -> str:
    """One route forwarding every ADT to a webhook ``hook`` at ``url``, retrying as given."""
    return f"""
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - forward:
          channel: webhook
          name: hook
          url: {url}
          retry: {retry}
"""


@pytest.fixture
def receiver() -> Iterator[HTTPServer]:
    with HTTPServer(respond=lambda _: 503) as server:
        yield server


def test_a_failing_destination_is_logged_as_one_run(
    tmp_path: Path,
    receiver: HTTPServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "TROUBLE_REPORT_SECONDS", SUMMARY_EVERY, raising=False)
    routes = webhook_routes(receiver.url("/events"))
    caplog.set_level(logging.DEBUG, logger="carehub.worker")
    config = load_config(write_config(tmp_path, routes))
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, [make_adt(f"RUN-{i:02d}", patient_id=f"P{i:02d}") for i in range(MESSAGES)])
        wait_for(lambda: len(receiver.requests) >= 3 * MESSAGES, 30, what="failed attempts")
        time.sleep(3 * SUMMARY_EVERY)
        receiver.respond = lambda _: 200
        hub.wait_for_deliveries(MESSAGES, timeout=30)
        message_ids = {d.message_id for d in hub.wait_for_deliveries(MESSAGES)}
    failed_attempts = len(receiver.answered(503))

    about_hook = [r for r in caplog.records if "care/hook" in r.getMessage()]
    warnings = [r.getMessage() for r in about_hook if r.levelno >= logging.WARNING]
    started = [line for line in warnings if "care/hook failed" in line]
    assert len(started) == 1 and "HTTP 503" in started[0], warnings
    summaries = [line for line in warnings if "still failing" in line]
    assert summaries, warnings
    assert all("delivery(ies) waiting" in line and "attempt(s)" in line for line in summaries)
    assert [line for line in warnings if "works again" in line], warnings
    assert len(warnings) < failed_attempts / 4, warnings  # not a line per attempt

    per_attempt = [r.getMessage() for r in about_hook if r.levelno == logging.DEBUG]
    assert len(per_attempt) >= failed_attempts - MESSAGES  # at DEBUG, every one
    named = {int(line.split()[1]) for line in per_attempt if line.startswith("message ")}
    assert named == message_ids
