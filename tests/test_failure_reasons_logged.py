"""A failed send's WARNING says why it failed in carehub's own words (no answer in time,
connection refused, the HTTP status), for every built-in channel, and never what the
destination answered (stored with the attempt, as it can quote the message).

A real hub forwards one message to a webhook that answers 503 with a body, a webhook too slow
for its timeout, and a webhook, an MLLP receiver and an SMTP server that nothing listens for."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub.config import load_config
from carehub.testing import HubThread, make_adt
from tests.helpers_smtp import free_port
from tests.test_channels import WebhookServer
from tests.test_worker import send, write_config


@pytest.fixture
def receiver() -> Iterator[WebhookServer]:
    with WebhookServer() as server:
        yield server


def test_each_failure_is_logged_with_its_reason_and_without_the_answer(
    tmp_path: Path, receiver: WebhookServer, caplog: pytest.LogCaptureFixture
) -> None:
    once = "retry: {max_attempts: 1}"
    routes = f"""
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: busy, url: "{receiver.url("/status/503")}", {once}}}
      - forward: {{channel: webhook, name: slow, url: "{receiver.url("/slow")}", timeout: 0.3,
                   {once}}}
      - forward: {{channel: webhook, name: gone, url: "http://127.0.0.1:{free_port()}/hook",
                   {once}}}
      - forward: {{channel: mllp, name: ehr, host: 127.0.0.1, port: {free_port()}, {once}}}
      - forward: {{channel: email, name: mail, host: 127.0.0.1, port: {free_port()},
                   starttls: false, sender: carehub@clinic.test, to: team@clinic.test, {once}}}
"""
    caplog.set_level(logging.INFO, logger="carehub.worker")
    config = load_config(write_config(tmp_path, routes))
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, [make_adt("WHY-1")])
        hub.wait_for_deliveries(5, timeout=30)

    def logged(destination: str) -> str:
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING and f"care/{destination}" in r.getMessage()
        ]
        assert lines, f"nothing logged for care/{destination}"
        return "\n".join(lines)

    assert "HTTP 503" in logged("busy")
    assert "no answer within 0.3 s" in logged("slow")
    assert "ConnectError" in logged("gone")
    assert "ConnectionRefusedError" in logged("ehr")
    assert "SMTP 127.0.0.1" in logged("mail") and "Errno 111" in logged("mail")
    # What the receiver answered (its body) is stored, never logged.
    assert "status 503: xxx" not in caplog.text
