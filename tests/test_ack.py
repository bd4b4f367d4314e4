"""ACKs in the sender's own dialect: swapped routing, its separators and version, ERR reasons."""

from carehub.hl7.ack import AckCode, ErrorCode, build_ack, read_ack
from carehub.hl7.view import MessageView
from carehub.testing import HubThread, make_adt, mllp_exchange


def inbound(version: str = "2.5", extra: str = "") -> MessageView:
    return MessageView(
        f"MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20261125||ADT^A03^ADT_A03|ID42|T|{version}"
        f"{extra}\rPID|1\r"
    )


def test_accept_swaps_routing_and_echoes_the_control_id() -> None:
    ack = MessageView(build_ack(AckCode.ACCEPT, inbound()))
    assert [ack.get(f"MSH-{n}") for n in (3, 4, 5, 6)] == [
        "RECVAPP",
        "RECVFAC",
        "SENDAPP",
        "SENDFAC",
    ]
    assert ack.raw("MSH-9") == "ACK^A03^ACK"
    assert (ack.get("MSH-11"), ack.get("MSH-12")) == ("T", "2.5")
    assert (ack.get("MSA-1"), ack.get("MSA-2")) == ("AA", "ID42")
    assert ack.count("ERR") == 0
    assert ack.get("MSH-10") != "ID42"


def test_error_ack_on_v25_carries_err_3_and_err_8() -> None:
    text = build_ack(
        AckCode.ERROR,
        inbound(),
        reason="MSH-10 is empty | really",
        error_code=ErrorCode.REQUIRED_FIELD_MISSING,
        error_location="MSH-1-10",
    )
    ack = MessageView(text)
    assert ack.get("ERR-3.1") == "101"
    assert ack.get("ERR-3.3") == "HL70357"
    assert ack.get("ERR-2") == "MSH^1^10"
    assert ack.get("ERR-4") == "E"
    assert ack.get("ERR-8") == "MSH-10 is empty | really"
    assert read_ack(text) == ("AE", "ID42", "MSH-10 is empty | really")


def test_error_ack_on_v23_uses_err_1() -> None:
    text = build_ack(AckCode.REJECT, inbound("2.3"), reason="too big")
    ack = MessageView(text)
    assert ack.raw("MSH-9") == "ACK^A03"
    assert ack.get("ERR-1.4.1") == "207"
    assert read_ack(text)[2] == "too big"


def test_v27_drops_msa_3_but_keeps_the_reason_in_err() -> None:
    text = build_ack(AckCode.ERROR, inbound("2.7"), reason="refused")
    ack = MessageView(text)
    assert ack.get("MSA-3") == ""
    assert read_ack(text) == ("AE", "ID42", "refused")


def test_charset_is_echoed() -> None:
    ack = MessageView(build_ack(AckCode.ACCEPT, inbound(extra="|||||USA|8859/1")))
    assert ack.get("MSH-18") == "8859/1"


def test_reject_without_any_header_still_is_a_valid_ack() -> None:
    text = build_ack(AckCode.REJECT, None, reason="no MSH", hub_application="HUB")
    ack = MessageView(text)
    assert ack.get("MSH-3") == "HUB"
    assert read_ack(text) == ("AR", "", "no MSH")


def test_other_separators_are_kept() -> None:
    view = MessageView("MSH#$%!*#S#F#R#RF#2026##ADT$A01#Q1#P#2.5\r")
    text = build_ack(AckCode.ACCEPT, view)
    assert text.startswith("MSH#$%!*#R#RF#S#F#")
    assert "ACK$A01$ACK" in text


# -- v2.7 truncation character ---------------------------------------------------------------

V27 = "MSH|^~\\&#|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20261125||ADT^A01^ADT_A01|ID27|P|2.7\rPID|1\r"


def test_ack_echoes_all_five_encoding_characters() -> None:
    text = build_ack(AckCode.ACCEPT, MessageView(V27))
    assert text.startswith("MSH|^~\\&#|RECVAPP|RECVFAC|SENDAPP|SENDFAC|")
    ack = MessageView(text)
    assert ack.get("MSH-2") == "^~\\&#"
    assert (ack.raw("MSH-9"), ack.get("MSA-1"), ack.get("MSA-2")) == ("ACK^A01^ACK", "AA", "ID27")


def test_error_text_escapes_the_truncation_character() -> None:
    reason = "bed #4 | unknown"
    text = build_ack(AckCode.ERROR, MessageView(V27), reason=reason)
    assert "bed \\P\\4 \\F\\ unknown" in text
    assert read_ack(text) == ("AE", "ID27", reason)


def test_ack_over_mllp_echoes_the_truncation_character(hub: HubThread) -> None:
    payload = make_adt("TRUNC27", version="2.7").replace("MSH|^~\\&|", "MSH|^~\\&#|", 1).encode()
    (answer,) = mllp_exchange(hub.mllp_address, [payload], timeout=30)
    assert answer.startswith(b"MSH|^~\\&#|")
    assert read_ack(answer.decode())[:2] == ("AA", "TRUNC27")
    (stored,) = hub.store.find()
    assert stored.raw == payload and stored.control_id == "TRUNC27"
