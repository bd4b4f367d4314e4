"""Character sets end to end over a real MLLP socket: MSH-18 spellings outside table 0211, and
UTF-16 messages, which are stored as sent and answered in their own encoding."""

from __future__ import annotations

import codecs

import pytest

from carehub.hl7.charsets import decode_message
from carehub.hl7.view import MessageView
from carehub.testing import HubThread, make_adt, mllp_exchange

TIMEOUT = 30.0
NAME = "Zoë^Núñez"


@pytest.mark.parametrize("charset", ["ISO-8859-1", "LATIN1"])
def test_latin1_spelt_outside_table_0211_is_stored_readable(hub: HubThread, charset: str) -> None:
    payload = make_adt("SPELT", name=NAME, charset=charset).encode("iso-8859-1")
    (answer,) = mllp_exchange(hub.mllp_address, [payload], timeout=TIMEOUT)
    ack = MessageView(answer.decode("iso-8859-1"))
    assert (ack.get("MSA-1"), ack.get("MSA-2"), ack.get("MSH-18")) == ("AA", "SPELT", charset)
    (stored,) = hub.store.find()
    assert stored.raw == payload
    assert (stored.charset, stored.patient_id) == ("whatwg-windows-1252", "P0001")
    assert MessageView(stored.text).get("PID-5") == NAME
    assert hub.store.history(stored.id)[0].detail is None  # no "unknown character set" note


@pytest.mark.parametrize(
    ("codec", "bom"),
    [
        ("utf-16-le", codecs.BOM_UTF16_LE),
        ("utf-16-le", b""),
        ("utf-16-be", codecs.BOM_UTF16_BE),
        ("utf-16-be", b""),
    ],
)
def test_utf16_over_mllp_is_rejected_in_utf16_naming_why(
    hub: HubThread, codec: str, bom: bytes
) -> None:
    """MLLP cannot carry UTF-16 (its bytes can hold the end block): the sender is told so,
    in its own encoding, and the bytes are kept as a rejected item."""
    text = make_adt("WIDE16", name=NAME, charset="UNICODE UTF-16")
    payload = bom + text.encode(codec)
    (answer,) = mllp_exchange(hub.mllp_address, [payload], timeout=TIMEOUT)
    # The answer is in the sender's encoding: same byte order, a mark only if it sent one.
    assert answer.startswith(bom + "MSH|".encode(codec))
    ack = MessageView(answer[len(bom) :].decode(codec))
    assert (ack.get("MSA-1"), ack.get("MSA-2")) == ("AR", "WIDE16")
    assert "cannot be framed by MLLP" in ack.get("ERR-8")
    assert decode_message(answer).charset == codec
    (stored,) = hub.store.find()
    assert stored.raw == payload
    assert (stored.status, stored.charset) == ("rejected", codec)


def test_a_utf16_name_holding_the_end_block_bytes_is_never_answered_aa(hub: HubThread) -> None:
    """U+0D1C (Malayalam JA) is 1C 0D in UTF-16LE: the frame ends inside the name. The part
    read is rejected, never taken as the whole message."""
    text = make_adt("JA-16", name="\u0d1c\u0d2f\u0d7b^Arun", charset="UNICODE UTF-16")
    payload = text.encode("utf-16-le")
    assert b"\x1c\x0d" in payload
    (answer,) = mllp_exchange(hub.mllp_address, [payload, make_adt("AFTER").encode()])[:1]
    ack = MessageView(answer.decode("utf-16-le"))
    assert (ack.get("MSA-1"), ack.get("MSA-2")) == ("AR", "JA-16")
    assert [m.status for m in hub.store.find(limit=None)][-1] == "rejected"


@pytest.mark.parametrize("declared", ["UNICODE UTF-16", "cp037"])
def test_an_ack_never_claims_a_character_set_it_is_not_written_in(
    hub: HubThread, declared: str
) -> None:
    """8-bit bytes that declare UTF-16, or a code that is not ASCII-compatible: the message is
    read (and answered) as the default, so the ACK leaves MSH-18 out instead of echoing it."""
    payload = make_adt("DECL", charset=declared).encode("utf-8")
    (answer,) = mllp_exchange(hub.mllp_address, [payload], timeout=TIMEOUT)
    ack = MessageView(answer.decode("utf-8"))
    assert (ack.get("MSA-1"), ack.get("MSA-2"), ack.get("MSH-18")) == ("AA", "DECL", "")
