"""The 139 public sample messages (shared/corpus): intake answers each, the view reads each."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub.hl7.ack import read_ack
from carehub.hl7.charsets import decode_message
from carehub.hl7.framing import encode_frame
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.testing import HubThread, local_config, read_frames
from tests.conftest import corpus_files, requires_corpus

pytestmark = requires_corpus


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_view_reads_every_field_of_every_segment(path: Path) -> None:
    raw = path.read_bytes()
    view = MessageView(decode_message(raw).text)
    lines = [line for line in re.split(r"\r\n|\n|\r", raw.decode("utf-8-sig")) if line.strip()]
    assert len(view.segments) == len(lines)
    for position, segment in enumerate(view.segments):
        name = segment[:3]
        fields = view.fields(position)
        occurrence = view.segment_names()[: position + 1].count(name)
        for number in range(1, len(fields)):
            whole = view.raw(f"{name}[{occurrence}]-{number}")
            assert whole == fields[number]
            for repetition in range(1, len(view.repetitions(f"{name}[{occurrence}]-{number}")) + 1):
                view.get(f"{name}[{occurrence}]-{number}[{repetition}].1")
    header = MessageHeader.read(view)
    assert header.message_type and header.control_id and header.version


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubThread]:
    """A hub whose MLLP listener takes every processing ID: nine samples are training
    messages (MSH-11 T), which a listener takes only when it says so (see
    test_processing_id_checked for how the default listener answers them)."""
    config = local_config()
    config.listeners.mllp[0].processing_ids = ["P", "T", "D"]
    with HubThread(config, tmp_path / "data") as running:
        yield running


@pytest.mark.skipif(not corpus_files(), reason="sample corpus not found")
def test_intake_answers_every_corpus_message_on_one_connection(hub: HubThread) -> None:
    files = corpus_files()
    with socket.create_connection(hub.mllp_address, timeout=30) as sock:
        for path in files:
            sock.sendall(encode_frame(path.read_bytes()))
            answer = read_frames(sock, 1, timeout=30)[0]
            code, control_id, text = read_ack(answer.decode("utf-8", "replace"))
            expected = MessageView(decode_message(path.read_bytes()).text).get("MSH-10")
            assert (path.name, code, control_id) == (path.name, "AA", expected), text
    stored = hub.store.find(limit=None)
    # Many samples share a sender and control id (45 ADT messages are ADTApp|GHHSFacility|
    # MSG00001) but no two say the same thing: each is a message of its own, and each that
    # reuses a control id says which message used it before.
    assert len(stored) == len(files)
    identities = {(m.sending_application, m.sending_facility, m.control_id) for m in stored}
    reused = [m for m in stored if "was used before by message" in (m.intake_detail or "")]
    assert len(reused) == len(stored) - len(identities) > 40
    assert {m.status for m in stored} == {"received"}
    assert all(m.message_type and m.control_id for m in stored)
    # Sent again, every one of them is a resend.
    with socket.create_connection(hub.mllp_address, timeout=30) as sock:
        for path in files:
            sock.sendall(encode_frame(path.read_bytes()))
            assert (
                read_ack(read_frames(sock, 1, timeout=30)[0].decode("utf-8", "replace"))[0] == "AA"
            )
    assert hub.store.count() == len(files)
