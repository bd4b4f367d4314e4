"""split_stream: a file split a piece at a time gives what split_data gives for the whole, and
an item over the limit keeps only its head and its length."""

from __future__ import annotations

import io

import pytest

from carehub.hl7 import batch
from carehub.hl7.batch import SplitData, split_data, split_stream

MSG1 = b"MSH|^~\\&|APP|FAC|||20261125||ADT^A01|C1|P|2.5\rPID|1||P1\r"
MSG2 = b"MSH|^~\\&|APP|FAC|||20261125||ADT^A08|C2|P|2.5\rPID|1||P2\rNTE|1||note\r"
WIDE = "MSH|^~\\&|APP|FAC|||2026||ADT^A01|W1|P|2.5|||||UNICODE UTF-16\rPID|1||P1||Zoë^😀\r"

SAMPLES = {
    "batch": b"FHS|^~\\&|S\r\nBHS|^~\\&|S\r\n"
    + MSG1.replace(b"\r", b"\r\n")
    + MSG2.replace(b"\r", b"\r\n")
    + b"BTS|2\r\nFTS|1\r\n\x1a",
    "stray text": b"Cover note\r\n" + MSG1 + b"printed by job 7\r" + MSG2 + b"BTS|9\r",
    "eof marks": MSG1 + b"NTE|1||end \x1a \t\r\n\r\n" + MSG2.rstrip(b"\r") + b"\x1a",
    "non-segment line inside": MSG1 + b"a typed note\rZPI|1\r" + MSG2,
    "long line": MSG1 + b"OBX|1|TX|||" + b"x" * 300 + b"\r" + b"y" * 200 + b"\r" + MSG2,
    "utf-8 bom": b"\xef\xbb\xbf" + MSG1 + "NTE|1||Zoë\r".encode() + MSG2,
    "utf-16": b"\xff\xfe" + (WIDE + "junk\r" + WIDE).encode("utf-16-le", "surrogatepass"),
    "utf-32": (WIDE + WIDE).encode("utf-32-be"),
    "not whole utf-16": b"\xff\xfe" + WIDE.encode("utf-16-le") + b"\x0d",
}


def as_tuples(split: SplitData) -> tuple[object, ...]:
    return (
        [(m.offset, m.data, m.size) for m in split.messages],
        [(s.offset, s.data, s.text, s.size) for s in split.stray],
        split.wrappers,
        split.codec,
        split.batch_problems,
    )


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize(("chunk", "long_line"), [(1, 1), (3, 5), (7, 64)])
def test_pieces_of_any_size_split_as_the_whole_does(
    name: str, chunk: int, long_line: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = SAMPLES[name]
    whole = as_tuples(split_data(data))
    monkeypatch.setattr(batch, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(batch, "_LONG_LINE", long_line)
    assert as_tuples(split_stream(io.BytesIO(data))) == whole
    for message in split_data(data).messages:  # each a slice of the data
        assert data[message.offset : message.offset + len(message.data)] == message.data


def test_the_samples_split_as_split_data_is_documented() -> None:
    stray = split_data(SAMPLES["stray text"])
    assert [m.data for m in stray.messages] == [MSG1, MSG2]
    assert [s.text for s in stray.stray] == ["Cover note\r\n", "printed by job 7\r"]
    assert stray.batch_problems == ("a BTS trailer has no BHS header before it",)
    eof = split_data(SAMPLES["eof marks"])
    assert [m.data for m in eof.messages] == [MSG1 + b"NTE|1||end ", MSG2.rstrip(b"\r")]
    wide = split_data(SAMPLES["utf-16"])
    assert wide.codec == "utf-16-le" and len(wide.messages) == 2
    assert wide.messages[1].data == WIDE.encode("utf-16-le", "surrogatepass")
    assert split_data(SAMPLES["not whole utf-16"]).codec == "iso-8859-1"


def test_items_over_the_limit_keep_their_head_and_length() -> None:
    big = MSG1 + b"OBX|1|TX|||" + b"x" * 5000 + b"\r"
    junk = b"z" * 3000 + b"\r"
    data = MSG2 + big + junk + MSG1
    split = split_stream(io.BytesIO(data), limit=2048, head=100)
    small, large, last = split.messages
    assert (small.data, small.size, small.length) == (MSG2, None, len(MSG2))
    assert (large.data, large.size, large.offset) == (big[:100], len(big), len(MSG2))
    assert (last.data, last.size) == (MSG1, None)
    [stray] = split.stray
    assert (stray.data, stray.text, stray.size) == (junk[:100], "z" * 100, len(junk))
    assert stray.offset == len(MSG2) + len(big)


def test_a_message_under_the_limit_once_its_eof_tail_is_dropped_is_kept_whole() -> None:
    """What follows the last segment from an EOF mark on is not the message's: it does not
    count towards the limit."""
    message = MSG1 + b"NTE|1||end"
    split = split_stream(io.BytesIO(message + b"\x1a" + b" " * 4000 + b"\r"), limit=1024)
    [kept] = split.messages
    assert (kept.data, kept.size) == (message, None)
