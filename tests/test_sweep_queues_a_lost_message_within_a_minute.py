"""A message stored and ACKed but never queued (the hub was killed between its commit and the
publish, or a broker lost it), with no later message of its patient to bring it along, is
queued again by the workers' sweep within a minute of being stored (README), wherever it
falls between two sweeps.

A real hub forwards to a real webhook receiver; the message is written to the store the hub
uses, as intake writes it, and never published."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub.config import load_config
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.store.schema import MessageStatus
from carehub.store.store import NewMessage
from carehub.testing import HubThread, make_adt
from tests.helpers_http import HTTPServer, wait_for
from tests.test_worker import hook_routes, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PROMISED = 60.0  # seconds: "within a minute"


@pytest.fixture
def http() -> Iterator[HTTPServer]:
    with HTTPServer() as server:
        yield server


def test_a_message_never_queued_is_sent_within_a_minute(tmp_path: Path, http: HTTPServer) -> None:
    config = load_config(write_config(tmp_path, hook_routes(http.url())))
    with HubThread(config, tmp_path / "data") as hub:
        # Just after the worker started (and queued what it found unrouted): the first sweep
        # finds this message younger than the sweeps before found the ones they queued.
        time.sleep(1.0)
        lost = make_adt("LOST-1", patient_id="P-LOST")
        header = MessageHeader.read(MessageView(lost))
        hub.store.insert_messages(
            [NewMessage(lost.encode(), "mllp", "test", None, MessageStatus.RECEIVED, "AA", header)]
        )
        stored = time.monotonic()
        wait_for(lambda: len(http.ok()) == 1, PROMISED + 5, 0.2, "the lost message sent")
        took = time.monotonic() - stored
    assert took <= PROMISED, f"sent {took:.0f} s after it was stored"
