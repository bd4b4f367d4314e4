"""ERR-2 of an ACK refusing a message for its header names the field as SEGMENT^SEQUENCE^FIELD
(MSH^1^2 is MSH-2 of the first MSH segment), and MSH^2 only where the second MSH segment is
meant: a frame holding two messages."""

from __future__ import annotations

import codecs

from carehub.hl7.view import MessageView
from carehub.testing import HubThread, make_adt, mllp_exchange

TIMEOUT = 10.0


def err_2(hub: HubThread, payload: bytes, codec: str = "utf-8") -> tuple[str, str]:
    (answer,) = mllp_exchange(hub.mllp_address, [payload], timeout=TIMEOUT)
    ack = MessageView(answer.decode(codec).lstrip("\ufeff"))
    return ack.get("MSA-1"), ack.raw("ERR-2")


def test_err_2_names_the_header_field_a_refusal_is_about(hub: HubThread) -> None:
    no_encoding_characters = b"MSH|A|B|C|D|20260101||ADT^A01|LOC1|P|2.5\rPID|1\r"
    assert err_2(hub, no_encoding_characters) == ("AR", "MSH^1^2")
    letter_field_separator = b"MSHA^~\\&ABACADA20260101AAADT^A01ALOC2AP\r"
    assert err_2(hub, letter_field_separator) == ("AR", "MSH^1^1")
    utf16 = codecs.BOM_UTF16_LE + make_adt("LOC3", charset="UNICODE UTF-16").encode("utf-16-le")
    assert err_2(hub, utf16, "utf-16") == ("AR", "MSH^1^18")
    two_messages = (make_adt("LOC4") + make_adt("LOC5")).encode()
    assert err_2(hub, two_messages) == ("AR", "MSH^2")
