"""A destination that answers 429 or 503 with Retry-After is tried again no sooner than it
asked (RFC 9110 10.2.3, RFC 6585 4), up to the destination's retry.max_delay: a real hub
forwarding to a real webhook receiver that answers 429 with `Retry-After: 30`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from carehub.builtins.http_channel import retry_after
from carehub.config import load_config
from carehub.store.outbox import DeliveryRecord, Outbox
from carehub.testing import HubThread, make_adt
from tests.test_channels import WebhookServer
from tests.test_destination_failure_runs_logged import webhook_routes
from tests.test_worker import send, write_config


@pytest.fixture
def receiver() -> Iterator[WebhookServer]:
    with WebhookServer() as server:
        yield server


def first_failed_attempt(hub: HubThread) -> DeliveryRecord:
    outbox = Outbox(hub.store)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = outbox.find(limit=None)
        if found and found[0].attempts >= 1:
            return found[0]
        time.sleep(0.02)
    raise AssertionError("no failed attempt recorded")


@pytest.mark.parametrize(("max_delay", "expected"), [(600, 30.0), (5, 5.0)])
def test_next_attempt_waits_for_retry_after_up_to_max_delay(
    tmp_path: Path, receiver: WebhookServer, max_delay: float, expected: float
) -> None:
    retry = f"{{max_attempts: 3, initial_delay: 0.1, max_delay: {max_delay}, jitter: 0}}"
    routes = webhook_routes(receiver.url("/status/429"), retry)
    config = load_config(write_config(tmp_path, routes))
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, [make_adt("RA-1")])
        delivery = first_failed_attempt(hub)
        waited = (delivery.not_before - delivery.updated_at).total_seconds()
        assert expected - 0.5 <= waited <= expected + 0.5, waited
        assert delivery.status == "pending" and "Retry-After: 30 s" in (delivery.last_error or "")
        time.sleep(1.0)  # the backoff alone (0.1 s, 0.2 s) would have spent every attempt
        assert len(receiver.requests) == 1


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert retry_after({"Retry-After": "120"}, now) == 120.0
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert retry_after({"Retry-After": later}, now) == 90.0
    earlier = format_datetime(now - timedelta(seconds=90), usegmt=True)
    assert retry_after({"Retry-After": earlier}, now) == 0.0
    assert retry_after({"Retry-After": "soon"}, now) is None
    assert retry_after({}, now) is None
