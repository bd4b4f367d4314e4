"""split_messages: one message, several, or an FHS/BHS batch, each kept byte for byte."""

from __future__ import annotations

import pytest

from carehub.hl7.batch import split_data, split_messages
from carehub.hl7.charsets import decode_message
from carehub.hl7.view import MessageView

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
    # Every byte is kept as written, the last segment's own terminator included.
    assert split_messages(one + two) == [one, two]


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
def test_last_terminator_is_not_rewritten_before_blank_lines_or_wrappers(
    terminator: bytes,
) -> None:
    one, two = (m.replace(b"\r", terminator) for m in (MSG1, MSG2))
    batch = terminator.join([b"FHS|^~\\&", b"BHS|^~\\&", b""]) + one + terminator + two
    batch += terminator.join([b"BTS|2", b"FTS|1", b"", b"\x1a"])
    assert split_messages(batch) == [one, two]
    assert split_messages(one + terminator * 3 + two + terminator + b"\x1a") == [one, two]


def test_internal_crlf_terminators_are_kept() -> None:
    [part] = split_messages(MSG2.replace(b"\r", b"\r\n"))
    assert part.count(b"\r\n") >= 2 and part.startswith(b"MSH|^~\\&|APP|FAC|||20261125||ADT^A08")


def test_trailing_blank_lines_and_dos_eof_are_dropped() -> None:
    data = MSG1 + b"\r\n\r\n" + MSG2 + b"\r\n\n  \r\n\x1a"
    assert split_messages(data) == [MSG1, MSG2]


def test_message_without_a_final_terminator_is_kept_as_written() -> None:
    # The view reads it either way; the store keeps what the sender sent.
    assert split_messages(MSG1.rstrip(b"\r")) == [MSG1.rstrip(b"\r")]
    assert split_messages(MSG1.rstrip(b"\r") + b"\x1a") == [MSG1.rstrip(b"\r")]


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


def test_each_message_is_the_exact_slice_of_the_data_at_its_offset() -> None:
    data = b"FHS|^~\\&\r\nBHS|^~\\&\r\n" + MSG1 + b"\r\n" + MSG2 + b"BTS|2\rFTS|1\r"
    parts = split_data(data).messages
    assert [p.data for p in parts] == [MSG1, MSG2]
    assert all(data[p.offset : p.offset + len(p.data)] == p.data for p in parts)


# -- text outside the messages ---------------------------------------------------------------


def test_text_before_the_first_msh_is_reported_as_stray() -> None:
    note = b"Cover note: two admissions from ward 7\r\n"
    split = split_data(note + MSG1 + MSG2)
    assert [p.data for p in split.messages] == [MSG1, MSG2]
    [stray] = split.stray
    assert (stray.offset, stray.data) == (0, note)
    assert stray.text == note.decode()


def test_stray_text_keeps_its_utf8_for_display() -> None:
    note = "Notiz für Zoë\n".encode()
    [stray] = split_data(note + MSG1).stray
    assert stray.data == note and stray.text == "Notiz für Zoë\n"


def test_text_after_a_wrapper_segment_is_reported_as_stray() -> None:
    data = b"FHS|^~\\&\rBHS|^~\\&\r" + MSG1 + b"BTS|1\rtrailing words\rFTS|1\rlast\r"
    split = split_data(data)
    assert [p.data for p in split.messages] == [MSG1]
    assert [(s.data, data[s.offset : s.offset + len(s.data)]) for s in split.stray] == [
        (b"trailing words\r", b"trailing words\r"),
        (b"last\r", b"last\r"),
    ]


@pytest.mark.parametrize(
    "prefix",
    [b"", b"\r\n\r\n", b" \t\n", b"\xef\xbb\xbf", b"\x1a\n", b"FHS|^~\\&|S\rBHS|^~\\&|S\r"],
)
def test_blank_lines_and_batch_headers_are_not_stray(prefix: bytes) -> None:
    split = split_data(prefix + MSG1 + b"\r\n\x1a")
    assert split.stray == []
    assert [p.data for p in split.messages] == [MSG1]


# -- UTF-16 and UTF-32 -----------------------------------------------------------------------

WIDE_TEXT = (
    "MSH|^~\\&|APP|FAC|||20261125||ADT^A01|W1|P|2.5|||||USA|UNICODE UTF-16\r"
    "PID|1||P1||Zoë^Núñez 𝄞\r"  # a character beyond the BMP takes four bytes in UTF-16
    "MSH|^~\\&|APP|FAC|||20261125||ADT^A08|W2|P|2.5|||||USA|UNICODE UTF-16\r"
    "PID|1||P2\r"
)


WIDE_CODECS = ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"]


@pytest.mark.parametrize("codec", WIDE_CODECS)
@pytest.mark.parametrize("bom", [True, False])
def test_wide_data_is_split_into_slices_of_its_own_bytes(codec: str, bom: bool) -> None:
    data = (("\ufeff" if bom else "") + WIDE_TEXT + "\r\n").encode(codec)
    first, second = split_data(data).messages
    middle = WIDE_TEXT.index("MSH", 1)
    assert first.data == WIDE_TEXT[:middle].encode(codec)
    assert second.data == WIDE_TEXT[middle:].encode(codec)
    assert all(data[p.offset : p.offset + len(p.data)] == p.data for p in (first, second))
    view = MessageView(decode_message(first.data).text)
    assert (view.get("MSH-10"), view.get("PID-5")) == ("W1", "Zoë^Núñez 𝄞")


@pytest.mark.parametrize("codec", WIDE_CODECS)
def test_stray_text_in_wide_data_is_reported(codec: str) -> None:
    data = ("\ufeffCover note 𝄞\r\n" + WIDE_TEXT).encode(codec)
    split = split_data(data)
    [stray] = split.stray
    assert stray.text == "Cover note 𝄞\r\n" and stray.data == stray.text.encode(codec)
    assert [p.data for p in split.messages] == split_messages(WIDE_TEXT.encode(codec))
