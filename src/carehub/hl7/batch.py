"""Split a file or HTTP body into messages: one message, several, or an FHS/BHS batch.

Each message is the data's own bytes from its MSH up to and including the terminator of its
last segment (CR, LF or CRLF, whichever the sender wrote; none if the data ends without one), so
the stored raw message is byte for byte what the sender wrote. Blank lines and DOS end-of-file
marks (0x1A) between or after messages belong to no message. Batch wrapper segments (FHS, BHS,
BTS, FTS) are dropped. Anything else outside a message - text before the first MSH, after a
wrapper segment, or after a message's last segment (a line that is not a segment, and whatever
follows it up to the next MSH or wrapper, when no segment follows in between) - is returned as
``stray`` so the caller can refuse it visibly instead of losing it or passing it on as part of
the message. A line that is not a segment *between* two segments of a message stays in it:
the message is incomplete without what follows, so intake refuses it whole (AE) rather than
store half of it as accepted.

UTF-16 and UTF-32 data (a byte order mark, or "MSH" in that encoding at the start) is split on
its characters; each message is still a slice of the data's bytes.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from carehub.hl7.ack import new_control_id
from carehub.hl7.charsets import UTF8_BOM, wide_encoding
from carehub.hl7.view import is_segment_line

# A segment name at the start of the data or right after a segment terminator.
_SEGMENT_START = re.compile(r"(?:^|(?<=[\r\n]))(MSH|FHS|BHS|BTS|FTS)(?=.)", re.S)
_WRAPPERS = {"FHS", "BHS", "BTS", "FTS"}
# From the first terminator (or 0x1A) after which only blank lines and 0x1A follow. Spaces are
# stripped only there, never from the last segment itself: they may be field data.
_TRAILER = re.compile(r"(?:[\r\n\x1a][\r\n\x1a \t]*)?\Z")
_LINE_END = re.compile(r"\r\n|\r|\n")
#: What may sit outside a message without being worth a word: whitespace and DOS EOF marks.
_BLANK = " \t\r\n\x0b\x0c\x1a\ufeff"


@dataclass(slots=True, frozen=True)
class MessageSlice:
    """One message: its bytes exactly as in the data, and where they start in it."""

    offset: int
    data: bytes


@dataclass(slots=True, frozen=True)
class Stray:
    """Bytes outside every message that are neither blank nor a batch wrapper segment."""

    offset: int
    data: bytes
    #: The bytes as text, for telling a person what they were.
    text: str


@dataclass(slots=True, frozen=True)
class SplitData:
    messages: list[MessageSlice]
    stray: list[Stray]
    #: The batch header segments (FHS, BHS) as text, in order: an answer to a batch is
    #: wrapped in a batch of its own that refers to them.
    wrappers: tuple[str, ...] = ()
    #: How the data was read for splitting: ``iso-8859-1`` for any 8-bit data, or the
    #: UTF-16/32 codec (in its byte order) of wide data.
    codec: str = "iso-8859-1"


class _ByteOffsets:
    """Character index in the decoded text -> byte offset in the data, asked in rising order.

    8-bit data is decoded as ISO-8859-1, one character per byte; UTF-16 needs counting, since a
    character beyond the BMP takes four bytes."""

    def __init__(self, text: str, codec: str, base: int) -> None:
        self.text, self.codec, self.base = text, codec, base
        self.fixed = {"iso-8859-1": 1, "utf-32-le": 4, "utf-32-be": 4}.get(codec)
        self._char, self._byte = 0, base

    def __call__(self, index: int) -> int:
        if self.fixed:
            return self.base + index * self.fixed
        if index < self._char:
            raise ValueError("byte offsets must be asked for in rising order")
        self._byte += len(self.text[self._char : index].encode(self.codec, "surrogatepass"))
        self._char = index
        return self._byte


def _as_text(data: bytes) -> tuple[str, str, int]:
    """(text, codec, bytes skipped at the start) for splitting; never raises."""
    base = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    wide = wide_encoding(data[base:])
    if wide is not None:
        codec, bom = wide
        try:
            # surrogatepass: a lone surrogate still maps back to exactly its own bytes.
            return data[base + len(bom) :].decode(codec, "surrogatepass"), codec, base + len(bom)
        except UnicodeDecodeError:
            pass  # not whole UTF-16/32 after all: read as 8-bit, and intake will say why
    return data[base:].decode("iso-8859-1"), "iso-8859-1", base


def _display(data: bytes, text: str, codec: str) -> str:
    if codec != "iso-8859-1":
        return text
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return text


def split_data(data: bytes) -> SplitData:
    """Every message in the data as its own exact bytes, and whatever else is not blank."""
    text, codec, base = _as_text(data)
    offset = _ByteOffsets(text, codec, base)
    messages: list[MessageSlice] = []
    stray: list[Stray] = []

    def outside(start: int, end: int) -> None:
        chunk = text[start:end]
        if chunk.strip(_BLANK):
            first, last = offset(start), offset(end)
            stray.append(Stray(first, data[first:last], _display(data[first:last], chunk, codec)))

    starts = [(m.start(), m.group(1)) for m in _SEGMENT_START.finditer(text)]
    outside(0, starts[0][0] if starts else len(text))
    wrappers: list[str] = []
    for i, (start, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        if name in _WRAPPERS:
            line_end = _LINE_END.search(text, start, end)
            if name in ("FHS", "BHS"):
                wrappers.append(text[start : line_end.start() if line_end else end])
            outside(line_end.end() if line_end else end, end)
            continue
        segments_end = _segments_end(text, start, end)
        trailer = _TRAILER.search(text, start, segments_end)
        cut = trailer.start() if trailer else segments_end
        # Keep the last segment's own terminator; what follows it is blank and no one's.
        if text.startswith("\r\n", cut, segments_end):
            cut += 2
        elif cut < segments_end and text[cut] in "\r\n":
            cut += 1
        outside(segments_end, end)
        first, last = offset(start), offset(cut)
        messages.append(MessageSlice(first, data[first:last]))
    return SplitData(messages, stray, tuple(wrappers), codec)


def _segments_end(text: str, start: int, end: int) -> int:
    """Where the message that starts at ``start`` ends: after the terminator of its last line
    that is a segment, so that text after it that is not a segment is left out of it."""
    field_sep = text[start + 3]
    position = last = start
    while position < end:
        line_end = _LINE_END.search(text, position, end)
        stop = line_end.start() if line_end else end
        after = line_end.end() if line_end else end
        if is_segment_line(text[position:stop], field_sep):
            last = after
        position = after
    return last


def split_messages(data: bytes) -> list[bytes]:
    """Each MSH..(next MSH or batch segment) as its own bytes; wrapper segments are dropped.

    Bytes are kept exactly as received inside each message, its last segment terminator
    included, so the stored raw message is what the sender wrote. Stray text outside the
    messages is left out here; ``split_data`` reports it.
    """
    return [part.data for part in split_data(data).messages]


def answer_envelope(
    wrappers: tuple[str, ...], count: int, hub_application: str, hub_facility: str
) -> tuple[str, str]:
    """(header, trailer) segments, each ended by CR, to wrap ``count`` ACKs as the answer to
    a batch whose FHS/BHS segments were ``wrappers``: an FHS and a BHS when the request had
    them, naming the hub as the sender and the request's FHS-11/BHS-11 as the reference
    (FHS-12/BHS-12), then BTS with the number of ACKs and FTS."""
    stamp = time.strftime("%Y%m%d%H%M%S%z")
    head: list[str] = []
    names: dict[str, str] = {}  # wrapper -> its field separator
    for name in ("FHS", "BHS"):
        request = next((w for w in wrappers if w.startswith(name)), None)
        if request is None or len(request) < 4:
            continue
        sep = request[3]
        fields = request.split(sep)  # fields[n - 1] is FHS-n / BHS-n, from FHS-2 on

        def field(number: int, fields: list[str] = fields) -> str:
            return fields[number - 1] if number - 1 < len(fields) else ""

        values = [
            name,
            field(2) or "^~\\&",
            field(5) or hub_application,
            field(6) or hub_facility,
            field(3),
            field(4),
            stamp,
            "",
            "",
            "",
            new_control_id(),
            field(11),
        ]
        head.append(sep.join(values))
        names[name] = sep
    tail = []
    if "BHS" in names:
        tail.append(f"BTS{names['BHS']}{count}")
    if "FHS" in names:
        tail.append(f"FTS{names['FHS']}{1 if 'BHS' in names else 0}")
    return "".join(f"{line}\r" for line in head), "".join(f"{line}\r" for line in tail)
