"""split_messages: one message, several, or an FHS/BHS batch, each kept byte for byte."""

from __future__ import annotations

import pytest

from carehub.hl7.batch import split_messages

MSG1 = b"MSH|^~\\&|APP|FAC|||20261125||ADT^A01|C1|P|2.5\rPID|1||P1\r"
MSG2 = b"MSH|^~\\&|APP|FAC|||20261125||ADT^A08|C2|P|2.5\rPID|1||P2\rNTE|1||note\r"


def test_single_message_is_returned_unchanged() -> None:
    assert split_messages(MSG1) == [MSG1]


def test_utf8_bom_is_dropped() -> None:
    assert split_messages(b"\xef\xbb\xbf" + MSG1 + MSG2) == [MSG1, MSG2]


def test_batch_wrappers_are_dropped() -> None:
    data = b"FHS|^~\\&|APP\rBHS|^~\\&|APP\r" + MSG1 + MSG2 + b"BTS|2\rFTS|1\r"
    assert split_messages(data) == [MSG1, MSG2]


def test_nested_batches_in_one_file_yield_every_message() -> None:
    data = b"FHS|^~\\&\rBHS|^~\\&\r" + MSG1 + b"BTS|1\rBHS|^~\\&\r" + MSG2 + b"BTS|1\rFTS|2\r"
    assert split_messages(data) == [MSG1, MSG2]


@pytest.mark.parametrize("terminator", [b"\r", b"\n", b"\r\n"])
def test_messages_split_with_any_segment_terminator(terminator: bytes) -> None:
    one, two = (m.replace(b"\r", terminator) for m in (MSG1, MSG2))
    parts = split_messages(one + two)
    assert len(parts) == 2
    # Everything up to the last segment's terminator is kept exactly as written.
    assert parts[0].startswith(one.removesuffix(terminator))
    assert parts[1].startswith(two.removesuffix(terminator))
    assert all(p.endswith((b"\r", b"\n")) for p in parts)


def test_internal_crlf_terminators_are_kept() -> None:
    [part] = split_messages(MSG2.replace(b"\r", b"\r\n"))
    assert part.count(b"\r\n") >= 2 and part.startswith(b"MSH|^~\\&|APP|FAC|||20261125||ADT^A08")


def test_trailing_blank_lines_and_dos_eof_are_dropped() -> None:
    data = MSG1 + b"\r\n\r\n" + MSG2 + b"\r\n\n  \r\n\x1a"
    assert split_messages(data) == [MSG1, MSG2]


def test_message_without_a_final_terminator_gets_one() -> None:
    assert split_messages(MSG1.rstrip(b"\r")) == [MSG1]


def test_trailing_spaces_in_the_last_field_are_kept() -> None:
    message = MSG1 + b"NTE|1||indented text   \r"
    assert split_messages(message + MSG2) == [message, MSG2]
    assert split_messages(message + b"\r\n\x1a") == [message]


def test_bytes_inside_each_message_are_kept_exactly() -> None:
    latin1 = b"MSH|^~\\&|A|B|||2026||ADT^A01|L1|P|2.5|||||8859/1\rPID|1||P9||M\xfcller\\T\\X\r"
    assert split_messages(latin1 + MSG1) == [latin1, MSG1]


def test_segment_names_inside_fields_do_not_split() -> None:
    message = MSG1 + b"NTE|1||MSH and BHS are only segments at a line start\r"
    assert split_messages(message) == [message]


@pytest.mark.parametrize("data", [b"", b"\r\n", b"not hl7 at all\r\n", b"\xef\xbb\xbf\x1a"])
def test_data_without_msh_yields_nothing(data: bytes) -> None:
    assert split_messages(data) == []


def test_batch_without_messages_yields_nothing() -> None:
    assert split_messages(b"FHS|^~\\&\rBHS|^~\\&\rBTS|0\rFTS|1\r") == []
