"""The lazy field view: paths, repetitions, escapes, separators, segment terminators."""

import pytest

from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView, NotHL7Error, PathError, Separators, escape, parse_path

ADT = (
    "MSH|^~\\&|SEND|FAC|RECV|RFAC|20261125||ADT^A01^ADT_A01|CTRL1|P|2.5\r"
    "PID|1|OLD1|X9^^^OTHER^PI~MRN7^^^HOSP&1.2.3&ISO^MR||O\\T\\BRIEN^ANN\\S\\MARIE||19700101|F\r"
    "NTE|1||line one\\.br\\line two \\F\\ pipe \\E\\ slash \\X41\\\r"
    "NTE|2||second\r"
    "ZXT|custom|value\r"
)


def test_fields_components_and_repetitions() -> None:
    view = MessageView(ADT)
    assert view.get("MSH-9.2") == "A01"
    assert view.get("MSH-10") == "CTRL1"
    assert view.get("PID-3[2].1") == "MRN7"
    assert view.get("PID-3.4") == "OTHER"
    assert view.get("PID-3[2].4.2") == "1.2.3"
    assert view.get("ZXT-2") == "value"
    assert view.get("NTE[2]-3") == "second"
    assert view.count("NTE") == 2


def test_msh_numbering_counts_the_field_separator_as_msh_1() -> None:
    view = MessageView(ADT)
    assert view.get("MSH-1") == "|"
    assert view.get("MSH-2") == "^~\\&"
    assert view.get("MSH-3") == "SEND"


def test_escapes_are_decoded_on_access_but_raw_keeps_them() -> None:
    view = MessageView(ADT)
    assert view.get("PID-5.1") == "O&BRIEN"
    assert view.get("PID-5.2") == "ANN^MARIE"
    assert view.get("NTE-3") == "line one\nline two | pipe \\ slash A"
    assert view.raw("PID-5.1") == "O\\T\\BRIEN"


def test_absent_things_read_as_empty() -> None:
    view = MessageView(ADT)
    assert view.get("PV1-2") == ""
    assert view.get("PID-99") == ""
    assert view.get("PID-3[5].1") == ""
    assert view.get("PID-5.9") == ""


@pytest.mark.parametrize("terminator", ["\r", "\n", "\r\n"])
def test_any_segment_terminator(terminator: str) -> None:
    view = MessageView(ADT.replace("\r", terminator))
    assert view.segment_names() == ["MSH", "PID", "NTE", "NTE", "ZXT"]
    assert view.get("PID-3[2].1") == "MRN7"


def test_byte_order_mark_and_leading_whitespace_are_ignored() -> None:
    assert MessageView("\ufeff\r\n" + ADT).get("MSH-10") == "CTRL1"


def test_other_delimiters_are_read_from_msh() -> None:
    text = "MSH#$%!*#SEND#FAC#R#RF#2026##ADT$A04#C9#P#2.4\rPID#1##ID1$$$AUTH$MR%ID2##DOE$JO\r"
    view = MessageView(text)
    assert view.separators == Separators("#", "$", "%", "!", "*")
    assert view.get("MSH-9.2") == "A04"
    assert view.get("PID-3[2]") == "ID2"
    assert view.get("PID-5.2") == "JO"


def test_text_without_msh_is_not_hl7() -> None:
    with pytest.raises(NotHL7Error):
        MessageView("PID|1||X\r")
    with pytest.raises(NotHL7Error):
        MessageView("")


def test_bad_path_names_itself() -> None:
    with pytest.raises(PathError, match="PID3"):
        parse_path("PID3")
    assert str(parse_path("pid[2]-3[4].5.6")) == "PID[2]-3[4].5.6"


def test_escape_round_trips_through_the_view() -> None:
    seps = Separators()
    text = "a|b^c&d~e\\f"
    message = f"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\rNTE|1||{escape(text, seps)}\r"
    assert MessageView(message).get("NTE-3") == text


def test_header_prefers_the_medical_record_number() -> None:
    header = MessageHeader.read(MessageView(ADT))
    assert header.patient is not None
    assert (header.patient.value, header.patient.authority) == ("MRN7", "HOSP")
    assert (header.message_type, header.trigger_event, header.structure) == (
        "ADT",
        "A01",
        "ADT_A01",
    )
    assert header.problem() is None


def test_header_falls_back_to_pid_2_for_old_feeds() -> None:
    text = "MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.2\rPID|1|LEGACY9^^^OLDHOSP\r"
    patient = MessageHeader.read(MessageView(text)).patient
    assert patient is not None and (patient.value, patient.authority) == ("LEGACY9", "OLDHOSP")


def test_header_problems_name_the_field() -> None:
    no_id = MessageHeader.read(MessageView("MSH|^~\\&|A|B|C|D|1||ADT^A01||P|2.5\r"))
    assert "MSH-10" in (no_id.problem() or "")
    no_type = MessageHeader.read(MessageView("MSH|^~\\&|A|B|C|D|1||^|X1|P|2.5\r"))
    assert "MSH-9" in (no_type.problem() or "")
