"""HL7 over HTTP: every ACK of a stored message comes with 200, AE and AR too, over a real hub's
HTTP listener. The exchange worked and the ACK says what became of the message; an HTTP sender
that queues and retries any status of 400 or more (Mirth's HTTP sender does) would otherwise
send a refused message again for ever. A listener with ``status_codes: by_ack`` keeps 422 for
AE and 400 for AR; 503 (not stored: send it again) and 413 are not answers of a stored message
and stay as they are in both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from carehub.hl7.ack import read_ack
from carehub.testing import HubThread, local_config, make_adt

TIMEOUT = 30.0
HL7_TYPE = "x-application/hl7-v2+er7"

BATCH = (
    "FHS|^~\\&|SENDAPP|SENDFAC|CAREHUB|HUB|20261201||||FILE9\r"
    "BHS|^~\\&|SENDAPP|SENDFAC|CAREHUB|HUB|20261201||||BATCH9\r"
    f"{make_adt('OK-1')}{make_adt('')}BTS|2\rFTS|1\r"
)


def post(hub: HubThread, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{hub.http_url}/hl7", content=body, headers={"Content-Type": HL7_TYPE}, timeout=TIMEOUT
    )


def codes(response: httpx.Response) -> list[str]:
    """MSA-1 of every ACK in the answer (a batch answer holds several)."""
    return [line.split("|")[1] for line in response.text.split("\r") if line.startswith("MSA|")]


@pytest.fixture
def by_ack_hub(tmp_path: Path) -> Iterator[HubThread]:
    config = local_config()
    config.listeners.http = config.listeners.http.model_copy(update={"status_codes": "by_ack"})
    with HubThread(config, tmp_path / "data") as running:
        yield running


def test_ae_ar_and_a_batch_holding_an_ae_are_answered_200(hub: HubThread) -> None:
    refused = post(hub, make_adt("").encode())  # no MSH-10: stored, refused (AE)
    assert (refused.status_code, read_ack(refused.text)[0]) == (200, "AE")

    not_hl7 = post(hub, b"hello world")
    assert (not_hl7.status_code, read_ack(not_hl7.text)[0]) == (200, "AR")

    batch = post(hub, BATCH.encode())
    assert (batch.status_code, codes(batch)) == (200, ["AA", "AE"])

    stored = sorted((m.control_id or "", m.status) for m in hub.store.find(limit=None))
    assert stored == [("", "refused"), ("", "refused"), ("", "rejected"), ("OK-1", "received")]


def test_a_listener_set_to_by_ack_keeps_422_for_ae_and_400_for_ar(by_ack_hub: HubThread) -> None:
    assert post(by_ack_hub, make_adt("GOOD-1").encode()).status_code == 200
    assert post(by_ack_hub, make_adt("").encode()).status_code == 422
    assert post(by_ack_hub, b"hello world").status_code == 400
    batch = post(by_ack_hub, BATCH.encode())
    assert (batch.status_code, codes(batch)) == (422, ["AA", "AE"])


def test_over_the_size_limit_is_still_413(tmp_path: Path) -> None:
    config = local_config()
    config.listeners.http.max_message_bytes = 1024
    with HubThread(config, tmp_path / "data") as hub:
        body = make_adt("BIG-1", extra_segments=[f"NTE|1||{'x' * 4000}"]).encode()
        response = post(hub, body)
    assert (response.status_code, read_ack(response.text)[0]) == (413, "AR")
