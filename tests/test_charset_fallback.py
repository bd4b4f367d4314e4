"""MSH-18 spellings, names carehub does not know, and bytes that contradict MSH-18, end to end:
a hospital sends over MLLP to a hub that translates, edits and forwards to a file and over MLLP
to a second hub, which stores what it was sent. Accented names reach the care event as the
hospital wrote them; a message no step edited reaches the receiver byte for byte, and an edited
one in its own character set; a message that cannot be read without replacing letters is
answered AE and never routed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from carehub.hl7.charsets import decode_message
from carehub.hl7.view import MessageView
from carehub.store.outbox import DeliveryRecord
from carehub.store.store import StoredMessage
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange

TIMEOUT = 30.0
NAME = "MÜLLER^RENÉ"
#: Deliveries of each accepted message: three from the route that forwards it as received,
#: one from the route that edits it first.
DELIVERIES_EACH = 4

ROUTES = """
routes:
  - name: kept
    steps:
      - translate: v2-to-event
      - forward: {{channel: file, name: events, directory: out/events, body: event}}
      - forward: {{channel: file, name: v2, directory: out/v2}}
      - forward: {{channel: mllp, name: downstream, host: 127.0.0.1, port: {port}}}
  - name: edited
    steps:
      - transform:
          edits: [{{set: {{PV1-3.1: EAST}}}}]
      - forward: {{channel: file, name: v2, directory: out/edited}}
"""


def message(control_id: str, charset: str, encoding: str = "iso-8859-1") -> bytes:
    return make_adt(control_id, name=NAME, charset=charset).encode(encoding)


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[tuple[HubThread, HubThread]]:
    """(the hub the hospital sends to, the receiver it forwards to over MLLP)."""
    with HubThread(local_config(), tmp_path / "receiver") as receiver:
        (tmp_path / "routes.yaml").write_text(
            ROUTES.format(port=receiver.mllp_address[1]), encoding="utf-8"
        )
        config = local_config(worker=True)
        config.source = tmp_path / "carehub.yaml"
        config.routes = ["routes.yaml"]
        config.worker.poll_interval = 0.05
        with HubThread(config, tmp_path / "data") as hub:
            yield hub, receiver


def send(hub: HubThread, payload: bytes) -> MessageView:
    (answer,) = mllp_exchange(hub.mllp_address, [payload], TIMEOUT)
    return MessageView(decode_message(answer).text)


def stored_as(hub: HubThread, control_id: str) -> StoredMessage:
    (found,) = [m for m in hub.store.find(limit=None) if m.control_id == control_id]
    return found


def by_destination(deliveries: list[DeliveryRecord], message_id: int) -> dict[str, bytes]:
    return {d.destination: d.payload for d in deliveries if d.message_id == message_id}


@pytest.mark.parametrize(
    ("control_id", "charset", "encoding", "warning"),
    [
        # Windows-1252 letters that ISO-8859-1 holds alike, under spellings of 8859/1.
        ("DASH", "8859-1", "cp1252", None),
        ("SPACE", "8859 1", "cp1252", None),
        # No MSH-18: not UTF-8, so read as ISO-8859-1.
        ("NONE", "", "iso-8859-1", "read as ISO-8859-1"),
        # A name carehub does not know: read as if MSH-18 were empty, and said so.
        ("KLING", "KLINGON", "iso-8859-1", "unknown MSH-18 character set 'KLINGON'"),
    ],
)
def test_accented_names_arrive_whole_and_unedited_messages_are_forwarded_byte_for_byte(
    hubs: tuple[HubThread, HubThread],
    control_id: str,
    charset: str,
    encoding: str,
    warning: str | None,
) -> None:
    hub, receiver = hubs
    payload = message(control_id, charset, encoding)
    ack = send(hub, payload)
    assert (ack.get("MSA-1"), ack.get("MSA-2")) == ("AA", control_id)
    # The ACK claims only a character set it is written in: the one declared, when known.
    assert ack.get("MSH-18") == ("" if charset == "KLINGON" else charset)

    stored = stored_as(hub, control_id)
    assert (stored.raw, stored.charset) == (
        payload,
        "iso-8859-1" if charset in ("", "KLINGON") else "whatwg-windows-1252",
    )
    note = hub.store.history(stored.id)[0].detail
    assert (warning in note) if warning else note is None

    sent = by_destination(hub.wait_for_deliveries(DELIVERIES_EACH), stored.id)
    name = json.loads(sent["kept/events"])["patient"]["name"]
    assert (name["family"], name["given"]) == ("MÜLLER", "RENÉ")
    # Not edited: the file and the receiver hold exactly the bytes the hospital sent.
    assert sent["kept/v2"] == payload
    assert stored_as(receiver, control_id).raw == payload
    # Edited: written in the message's own character set, the one MSH-18 (if any) names.
    edited = make_adt(control_id, name=NAME, charset=charset, location="EAST^101^A")
    assert sent["edited/v2"] == edited.encode("iso-8859-1")


def test_bytes_that_contradict_msh18_are_answered_ae_and_never_routed(
    hubs: tuple[HubThread, HubThread],
) -> None:
    """Windows-1252 bytes under MSH-18 UNICODE UTF-8: reading them would put U+FFFD where the
    patient's letters were, so the sender is told which byte, and nothing is forwarded."""
    hub, receiver = hubs
    payload = message("CONTRA", "UNICODE UTF-8", "cp1252")
    offset = payload.index("Ü".encode("cp1252"))
    ack = send(hub, payload)
    assert (ack.get("MSA-1"), ack.get("MSA-2"), ack.get("MSH-18")) == (
        "AE",
        "CONTRA",
        "UNICODE UTF-8",
    )
    reason = ack.get("ERR-8")
    assert "MSH-18 declares 'UNICODE UTF-8'" in reason
    assert f"byte {offset} (0xDC) is not valid utf-8" in reason
    assert ack.get("ERR-2") == "MSH^1^18"

    refused = stored_as(hub, "CONTRA")
    assert (refused.status, refused.ack_code, refused.raw) == ("refused", "AE", payload)
    assert f"byte {offset}" in (refused.detail or "")

    # A good message after it is routed; the refused one never is.
    assert send(hub, message("AFTER", "8859/1")).get("MSA-1") == "AA"
    deliveries = hub.wait_for_deliveries(DELIVERIES_EACH)
    assert {d.message_id for d in deliveries} == {stored_as(hub, "AFTER").id}
    assert [m.control_id for m in receiver.store.find(limit=None)] == ["AFTER"]


def test_a_utf8_byte_order_mark_is_not_forwarded(hubs: tuple[HubThread, HubThread]) -> None:
    """A sender that puts a BOM in the frame: receivers read MSH at the first byte (hl7apy
    refuses the message, others read MSH-10 one place off), so what goes out starts with MSH."""
    hub, receiver = hubs
    payload = b"\xef\xbb\xbf" + message("BOM", "UNICODE UTF-8", "utf-8")
    assert send(hub, payload).get("MSA-1") == "AA"
    stored = stored_as(hub, "BOM")
    assert stored.raw == payload  # kept as received
    sent = by_destination(hub.wait_for_deliveries(DELIVERIES_EACH), stored.id)
    assert sent["kept/v2"] == payload[3:]
    assert stored_as(receiver, "BOM").raw == payload[3:]


def test_undeclared_utf16_goes_out_as_utf8(hubs: tuple[HubThread, HubThread]) -> None:
    """UTF-16 without MSH-18, posted over HTTP (MLLP cannot frame it): forwarded in UTF-8, which
    a receiver reads without a declaration and MLLP frames, not as UTF-16 without its mark."""
    hub, receiver = hubs
    payload = b"\xff\xfe" + make_adt("WIDE", name=NAME).encode("utf-16-le")
    response = httpx.post(
        f"{hub.http_url}/hl7",
        content=payload,
        headers={"Content-Type": "x-application/hl7-v2+er7"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    stored = stored_as(hub, "WIDE")
    sent = by_destination(hub.wait_for_deliveries(DELIVERIES_EACH), stored.id)
    assert sent["kept/v2"] == make_adt("WIDE", name=NAME).encode("utf-8")
    assert stored_as(receiver, "WIDE").raw == make_adt("WIDE", name=NAME).encode("utf-8")
