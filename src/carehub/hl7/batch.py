"""Split a file or HTTP body into messages: one message, several, or an FHS/BHS batch.

Each message is the data's own bytes from its MSH up to and including the terminator of its
last segment (CR, LF or CRLF, whichever the sender wrote; none if the data ends without one), so
the stored raw message is byte for byte what the sender wrote. Blank lines and DOS end-of-file
marks (0x1A) between or after messages belong to no message. Batch wrapper segments (FHS, BHS,
BTS, FTS) are dropped. Anything else outside a message - text before the first MSH, or after a
wrapper segment - is returned as ``stray`` so the caller can refuse it visibly instead of losing
it.

UTF-16 and UTF-32 data (a byte order mark, or "MSH" in that encoding at the start) is split on
its characters; each message is still a slice of the data's bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from carehub.hl7.charsets import UTF8_BOM, wide_encoding

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
    for i, (start, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        if name in _WRAPPERS:
            line_end = _LINE_END.search(text, start, end)
            outside(line_end.end() if line_end else end, end)
            continue
        trailer = _TRAILER.search(text, start, end)
        cut = trailer.start() if trailer else end
        # Keep the last segment's own terminator; what follows it is blank and no one's.
        if text.startswith("\r\n", cut, end):
            cut += 2
        elif cut < end and text[cut] in "\r\n":
            cut += 1
        first, last = offset(start), offset(cut)
        messages.append(MessageSlice(first, data[first:last]))
    return SplitData(messages, stray)


def split_messages(data: bytes) -> list[bytes]:
    """Each MSH..(next MSH or batch segment) as its own bytes; wrapper segments are dropped.

    Bytes are kept exactly as received inside each message, its last segment terminator
    included, so the stored raw message is what the sender wrote. Stray text outside the
    messages is left out here; ``split_data`` reports it.
    """
    return [part.data for part in split_data(data).messages]
