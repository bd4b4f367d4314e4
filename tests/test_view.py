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


# -- v2.7 truncation character (fifth character of MSH-2) ------------------------------------

V27 = (
    "MSH|^~\\&#|SEND|FAC|RECV|RFAC|20261125||ADT^A01^ADT_A01|CTRL27|P|2.7\r"
    "PID|1||MRN7^^^HOSP&1.2.3&ISO^MR~X9^^^OTHER^PI||O\\T\\BRIEN^ANN\\S\\MARIE\r"
    "NTE|1||Room \\P\\4, bed \\E\\2\r"
    "NTE|2||a long comment cut short by the sender#\r"
)


def test_fifth_encoding_character_is_the_truncation_character() -> None:
    view = MessageView(V27)
    assert view.separators == Separators("|", "^", "~", "\\", "&", "#")
    assert view.separators.encoding_characters == "^~\\&#"
    assert view.get("MSH-2") == "^~\\&#"
    assert (view.get("MSH-3"), view.get("MSH-9.2"), view.get("MSH-10")) == (
        "SEND",
        "A01",
        "CTRL27",
    )


def test_components_repetitions_and_escapes_read_the_same_with_five_encoding_characters() -> None:
    view = MessageView(V27)
    assert view.get("PID-3[1].4.2") == "1.2.3"
    assert view.get("PID-3[2].1") == "X9"
    assert view.get("PID-5.1") == "O&BRIEN"
    assert view.get("PID-5.2") == "ANN^MARIE"
    assert view.get("NTE-3") == "Room #4, bed \\2"
    # A trailing truncation character marks truncated data; it is kept, not read as an escape.
    assert view.get("NTE[2]-3") == "a long comment cut short by the sender#"


def test_truncation_escape_round_trips() -> None:
    seps = MessageView(V27).separators
    assert escape("Room #4", seps) == "Room \\P\\4"
    message = V27 + f"NTE|3||{escape('a|b #c', seps)}\r"
    assert MessageView(message).get("NTE[3]-3") == "a|b #c"


def test_without_a_truncation_character_hash_is_plain_text() -> None:
    view = MessageView(ADT + "NTE|3||Room #4 \\P\\\r")
    assert view.separators.truncation == ""
    assert view.separators.encoding_characters == "^~\\&"
    assert view.get("NTE[3]-3") == "Room #4 \\P\\"  # an unknown escape is kept as written
    assert escape("Room #4", view.separators) == "Room #4"


def test_truncation_character_with_other_delimiters() -> None:
    view = MessageView("MSH#$%!*@#S#F#R#RF#2026##ADT$A04#C9#P#2.7\rPID#1##ID1$$$AUTH\r")
    assert view.separators == Separators("#", "$", "%", "!", "*", "@")
    assert (view.get("MSH-9.2"), view.get("PID-3.4")) == ("A04", "AUTH")


@pytest.mark.parametrize(
    ("msh", "expected"),
    [
        ("MSH|^~\\&|A\r", "^~\\&"),
        ("MSH|^~|A\r", "^~\\&"),  # missing characters take the defaults
        ("MSH|^~\\&^|A\r", "^~\\&"),  # a fifth character that is a delimiter is not one
        ("MSH|^~\\&\r", "^~\\&"),
    ],
)
def test_msh_2_of_four_or_fewer_characters(msh: str, expected: str) -> None:
    assert MessageView(msh).separators.encoding_characters == expected
