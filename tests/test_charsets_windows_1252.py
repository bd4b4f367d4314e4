"""Text declared ISO-8859-1 (MSH-18 ``8859/1`` and its spellings) is read as Windows-1252, as
WHATWG's encoding standard reads that label: senders that declare it write curly quotes, dashes
and the euro sign in bytes 0x80-0x9F, which ISO-8859-1 would make C1 control characters. A
hospital sends ``O\\x92BRIEN`` over MLLP to a real hub that writes the message to files as
received and edited, and to one that emails the patient's care team through a real SMTP
server: `messages show` and the email say O'Brien with its apostrophe, the unedited file holds
the bytes received, and the edited one the same bytes for the same characters (the five bytes
Windows-1252 leaves undefined included)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from carehub.config import HubConfig
from carehub.hl7.charsets import codec_for, decode_message
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.hub import open_store
from carehub.store.schema import MessageStatus
from carehub.store.store import NewMessage, StoredMessage
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange
from tests.test_intake_gaps import show
from tests.test_notify import (  # noqa: F401  (fixtures: care, mailbox, gateway)
    PCP,
    adt,
    care,
    gateway,
    mailbox,
)

TIMEOUT = 30.0
#: PID-5 as the hospital's Windows program writes it: 0x92 is its apostrophe, 0x96 a dash.
NAME = b"O\x92BRIEN\x96SMYTH^SIOBH\xc1N"
#: How it reads: U+2019 and U+2013, and Á, as Windows-1252 has them.
READ = "O\u2019BRIEN\u2013SMYTH^SIOBHÁN"
#: A byte Windows-1252 leaves undefined, in a note: kept as the C1 code point it is in Latin-1.
UNDEFINED = b"\x81"
#: One file per route.
DELIVERIES = 2

ROUTES = """
routes:
  - name: kept
    steps:
      - forward: {channel: file, name: v2, directory: out/kept}
  - name: edited
    steps:
      - transform:
          edits: [{set: {PV1-3.1: EAST}}]
      - forward: {channel: file, name: v2, directory: out/edited}
"""


def payload(control_id: str, charset: str = "8859/1", location: str = "WARD^101^A") -> bytes:
    """An ADT declaring ``charset`` whose PID-5 and NTE hold Windows-1252 bytes."""
    text = make_adt(
        control_id,
        name="@NAME@",
        charset=charset,
        location=location,
        extra_segments=["NTE|1||note @UNDEFINED@ kept"],
    )
    raw = text.encode("ascii")
    return raw.replace(b"@NAME@", NAME).replace(b"@UNDEFINED@", UNDEFINED)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubThread]:
    (tmp_path / "routes.yaml").write_text(ROUTES, encoding="utf-8")
    config = local_config(worker=True)
    config.source = tmp_path / "carehub.yaml"
    config.routes = ["routes.yaml"]
    config.worker.poll_interval = 0.05
    with HubThread(config, tmp_path / "data") as running:
        yield running


def stored_as(hub: HubThread, control_id: str) -> StoredMessage:
    (found,) = [m for m in hub.store.find(limit=None) if m.control_id == control_id]
    return found


@pytest.mark.parametrize("charset", ["8859/1", "ISO-8859-1", "LATIN1"])
def test_windows_1252_bytes_declared_latin1_read_as_their_characters_and_go_out_as_received(
    tmp_path: Path, hub: HubThread, charset: str
) -> None:
    sent = payload("QUOTE", charset)
    (answer,) = mllp_exchange(hub.mllp_address, [sent], TIMEOUT)
    assert b"MSA|AA|QUOTE" in answer
    stored = stored_as(hub, "QUOTE")
    assert stored.raw == sent
    view = MessageView(stored.text)
    assert view.get("PID-5") == READ
    assert view.get("NTE-3") == "note \x81 kept"
    hub.wait_for_deliveries(DELIVERIES)

    out = tmp_path / "out"
    (kept,) = (out / "kept").iterdir()
    assert kept.read_bytes() == sent  # unedited: the bytes the hospital sent
    (edited,) = (out / "edited").iterdir()
    # Edited: written again in the codec it was read in, each character the byte it came as.
    assert edited.read_bytes() == payload("QUOTE", charset, location="EAST^101^A")

    shown = show(tmp_path / "data", stored.id, cwd=tmp_path)
    assert re.search(r"PID-5\s+Patient Name\s+O\u2019BRIEN\u2013SMYTH\^SIOBHÁN", shown), shown
    assert "\x92" not in shown and "\x96" not in shown


def test_the_care_teams_email_names_the_patient_as_the_hospital_wrote_it(
    care: Callable[..., Any],  # noqa: F811
) -> None:
    text = adt("A04", "ED-QUOTE").replace("Tester^Pat", "O@Brien^Pat")
    header, rest = text.split("\r", 1)
    sent = f"{header}||||||8859/1\r{rest}".encode("ascii").replace(b"@", b"\x92")
    with care() as running:
        (answer,) = mllp_exchange(running.running.mllp_address, [sent], TIMEOUT)
        assert b"MSA|AA|ED-QUOTE" in answer
        running.settle()
        (mail,) = running.mailbox.to(PCP)
        (sms,) = running.texts()
    assert mail.body.startswith("Pat O\u2019Brien registered in the emergency department"), (
        mail.body
    )
    assert "Pat O\u2019Brien" in sms["text"], sms
    for said in (mail.subject, mail.body, sms["text"]):
        assert not re.search("[\x80-\x9f]", said), said


def test_a_resend_of_a_message_stored_when_it_read_as_latin1_is_still_a_resend(
    tmp_path: Path,
) -> None:
    """A message stored before (its identity hashed from its text read as ISO-8859-1, with C1
    controls) and sent again after a lost ACK is recognised as the resend it is: stored and
    routed once."""
    data_dir = tmp_path / "data"
    sent = payload("BEFORE")
    as_latin1 = sent.decode("iso-8859-1")
    assert "\x92" in as_latin1  # what it was read as then
    view = MessageView(as_latin1, "iso-8859-1")
    before = NewMessage(
        sent,
        "mllp",
        "test",
        None,
        MessageStatus.RECEIVED,
        "AA",
        MessageHeader.read(view),
        "iso-8859-1",
        text=as_latin1,
        digest=view.content_digest(),
    )
    store = open_store(HubConfig(), data_dir)
    try:
        store.insert_messages([before])
    finally:
        store.close()
    with HubThread(local_config(), data_dir) as hub:
        (answer,) = mllp_exchange(hub.mllp_address, [sent], TIMEOUT)
        assert b"MSA|AA|BEFORE" in answer
        assert hub.store.count() == 1
        # Read now, the stored one says what the hospital wrote.
        assert MessageView(hub.store.find()[0].text).get("PID-5") == READ


def test_the_codec_round_trips_every_byte() -> None:
    codec = codec_for("8859/1", "utf-8")
    assert codec is not None
    every = bytes(range(256))
    text = decode_message(b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5||||||8859/1\r" + every).text
    assert text.encode(codec).endswith(every)
    assert bytes([0x80, 0x92, 0x96]).decode(codec) == "€\u2019\u2013"
    assert [every[b : b + 1].decode(codec) for b in (0x81, 0x8D, 0x8F, 0x90, 0x9D)] == [
        chr(b) for b in (0x81, 0x8D, 0x8F, 0x90, 0x9D)
    ]
