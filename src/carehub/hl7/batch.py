"""Split a file or HTTP body into messages: one message, several, or an FHS/BHS batch.

Each message is the data's own bytes from its MSH up to and including the terminator of its
last segment (CR, LF or CRLF, whichever the sender wrote; none if the data ends without one), so
the stored raw message is byte for byte what the sender wrote. Blank lines and DOS end-of-file
marks (0x1A) between or after messages belong to no message. Batch wrapper segments (FHS, BHS,
BTS, FTS) are part of no message; they are checked against what they wrap
(``SplitData.batch_problems``), since a batch cut short - a file read while its sender is still
writing it, a body truncated on the way - still splits into messages that each look whole.
Anything else outside a message - text before the first MSH, after a wrapper segment, or
after a message's last segment (a line that is not a segment, and whatever follows it up to the
next MSH or wrapper, when no segment follows in between) - is returned as ``stray`` so the
caller can refuse it visibly instead of losing it or passing it on as part of the message. A
line that is not a segment *between* two segments of a message stays in it: the message is
incomplete without what follows, so intake refuses it whole (AE) rather than store half of it
as accepted.

UTF-16 and UTF-32 data (a byte order mark, or "MSH" in that encoding at the start) is split on
its characters; each message is still a slice of the data's bytes.

``split_stream`` does the same from a file, a piece at a time (see there), for a file drop.
"""

from __future__ import annotations

import codecs
import io
import re
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, overload

from carehub.hl7.ack import new_control_id
from carehub.hl7.charsets import UTF8_BOM, wide_encoding
from carehub.hl7.view import is_segment_line

#: Segment names that start a message (MSH) or are batch wrappers, at the start of a line.
_REGION_NAMES = frozenset({"MSH", "FHS", "BHS", "BTS", "FTS"})
_LINE_END = re.compile(r"\r\n|\r|\n")
#: What may sit outside a message without being worth a word: whitespace and DOS EOF marks.
_BLANK = " \t\r\n\x0b\x0c\x1a\ufeff"
#: What a message's last segment may end in, from an EOF mark on, that is not its own.
_TAIL_BLANK = " \t\x1a"
#: Bytes read at a time by split_stream: each step of splitting takes about a millisecond.
CHUNK_BYTES = 1 << 20
#: Bytes read first at least, enough to tell UTF-16/32 data by its start (wide_encoding).
_FIRST_BYTES = 4096
#: A line longer than this is taken in pieces as it is read, not gathered whole first.
_LONG_LINE = 1 << 16
#: Characters kept of an item over split_stream's limit: enough to read an MSH for the ACK.
HEAD = 4096


class Readable(Protocol):
    """What split_stream reads from: a binary file, or anything that reads like one."""

    def read(self, size: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


@dataclass(slots=True, frozen=True)
class MessageSlice:
    """One message: its bytes exactly as in the data, and where they start in it."""

    offset: int
    data: bytes
    #: The message's length in bytes when ``data`` is only its head (split_stream's limit).
    size: int | None = None

    @property
    def length(self) -> int:
        return len(self.data) if self.size is None else self.size


@dataclass(slots=True, frozen=True)
class Stray:
    """Bytes outside every message that are neither blank nor a batch wrapper segment."""

    offset: int
    data: bytes
    #: The bytes as text, for telling a person what they were.
    text: str
    #: The length in bytes when ``data`` and ``text`` are only the head (split_stream's limit).
    size: int | None = None

    @property
    def length(self) -> int:
        return len(self.data) if self.size is None else self.size


class MessageSlices(Sequence[MessageSlice]):
    """The messages split from the data, in order, held as their bytes and offsets only: a
    file of 200,000 messages then adds no 200,000 objects for the garbage collector to walk
    through again and again (its full passes held every thread for 0.2 s). Each
    MessageSlice is made when it is asked for."""

    __slots__ = ("_data", "_offsets", "_sizes")

    def __init__(self, messages: Iterable[MessageSlice] = ()) -> None:
        self._data: list[bytes] = []
        self._offsets = array("q")
        self._sizes: dict[int, int] = {}  # index -> length, for messages kept as a head only
        for message in messages:
            self.append(message)

    def append(self, message: MessageSlice) -> None:
        if message.size is not None:
            self._sizes[len(self._data)] = message.size
        self._data.append(message.data)
        self._offsets.append(message.offset)

    def __len__(self) -> int:
        return len(self._data)

    @overload
    def __getitem__(self, index: int) -> MessageSlice: ...

    @overload
    def __getitem__(self, index: slice) -> list[MessageSlice]: ...

    def __getitem__(self, index: int | slice) -> MessageSlice | list[MessageSlice]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("message index out of range")
        return MessageSlice(self._offsets[index], self._data[index], self._sizes.get(index))

    def __iter__(self) -> Iterator[MessageSlice]:
        sizes = self._sizes
        for index, (offset, data) in enumerate(zip(self._offsets, self._data, strict=True)):
            yield MessageSlice(offset, data, sizes.get(index))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"MessageSlices({list(self)!r})"


@dataclass(slots=True, frozen=True)
class SplitData:
    messages: MessageSlices
    stray: list[Stray]
    #: The batch header segments (FHS, BHS) as text, in order: an answer to a batch is
    #: wrapped in a batch of its own that refers to them.
    wrappers: tuple[str, ...] = ()
    #: How the data was read for splitting: ``iso-8859-1`` for any 8-bit data, or the
    #: UTF-16/32 codec (in its byte order) of wide data.
    codec: str = "iso-8859-1"
    #: Why the batch wrappers do not hold together, one sentence each: a header without its
    #: trailer (FHS without FTS, BHS without BTS) or the reverse, or a count that disagrees
    #: with what the data holds (BTS-1: messages in the batch; FTS-1: batches in the file).
    #: Empty when they agree, and for data without wrappers (which cannot show it is whole).
    batch_problems: tuple[str, ...] = ()


def split_data(data: bytes) -> SplitData:
    """Every message in the data as its own exact bytes, and whatever else is not blank."""
    return split_stream(io.BytesIO(data))


def split_stream(stream: Readable, *, limit: int | None = None, head: int = HEAD) -> SplitData:
    """``split_data`` for a file too large to hold twice, read CHUNK_BYTES at a time: each
    step works on a piece of bounded size, so a thread splitting a large file never keeps
    the interpreter from other threads for long.

    Given ``limit``, an item (message, stray text, batch wrapper segment) of more bytes than
    that keeps only its first ``head`` characters, its length in ``size``: a file of many
    messages costs about its own size in memory, and one oversize message no more than
    ``limit``. The stream is read from where it is to its end, and read again from there for
    data that starts like UTF-16/32 but is not (then it is split as 8-bit, as split_data
    does)."""
    start = stream.tell()
    first = _read_at_least(stream, max(CHUNK_BYTES, _FIRST_BYTES))
    base = len(UTF8_BOM) if first.startswith(UTF8_BOM) else 0
    wide = wide_encoding(first[base:])
    if wide is not None:
        codec, bom = wide
        try:
            return _Splitter(codec, base + len(bom), limit, head).run(first, stream)
        except UnicodeDecodeError:
            stream.seek(start)  # not whole UTF-16/32 after all: read as 8-bit
            first = _read_at_least(stream, max(CHUNK_BYTES, _FIRST_BYTES))
    return _Splitter("iso-8859-1", base, limit, head).run(first, stream)


def _read_at_least(stream: Readable, size: int) -> bytes:
    """``size`` bytes, or fewer at the end of the stream (a pipe may return less per read)."""
    pieces: list[bytes] = []
    got = 0
    while got < size:
        piece = stream.read(size - got)
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return b"".join(pieces)


class _Text:
    """The text of one item, gathered in pieces: whole while it is within the limit, then
    only its first ``head`` characters and its length in bytes."""

    __slots__ = ("inked", "nbytes", "parts", "whole")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.nbytes = 0
        self.whole = True
        #: Holds something other than blanks (see _BLANK): worth a word if outside a message.
        self.inked = False

    def __bool__(self) -> bool:
        return self.nbytes > 0


_OUTSIDE, _SEGMENT, _PENDING, _WRAPPER = range(4)  # where the current line's text goes


class _Splitter:
    """The rules of split_data applied line by line (lines end at CR, LF or CRLF).

    A line starting with MSH, FHS, BHS, BTS or FTS and followed by anything (its terminator
    counts) starts a region that runs to the next one. An MSH region is a message through its
    last line that is a segment, less what follows that segment's last character when that
    starts with a DOS EOF mark and holds nothing but blanks and EOF marks; lines after the last
    segment are outside any message. A wrapper region is its first line, without terminator;
    the lines after it are outside. Text before the first region is outside too."""

    def __init__(self, codec: str, skip: int, limit: int | None, head: int) -> None:
        self.codec, self.skip, self.head = codec, skip, head
        self.limit = limit if limit is not None else -1
        self.wide = codec != "iso-8859-1"
        self.unit = {"utf-32-le": 4, "utf-32-be": 4}.get(codec, 1)
        self.messages = MessageSlices()
        self.stray: list[Stray] = []
        self.wrappers: list[str] = []
        self.outline: list[str] = []  # each wrapper segment, and "MSH" for each message
        self.at = skip  # byte offset of the next character
        self.rest = ""  # the start of a line whose end has not been read yet
        self.begun = False  # that line is already under way (a long line, taken in pieces)
        self.kind = _OUTSIDE  # where the current line goes
        self.region = ""  # "", "MSH" or the wrapper segment's name
        self.region_at = skip
        self.field_separator = "|"
        self.message = _Text()
        #: The last segment's tail from its first EOF mark on, when nothing but blanks and
        #: EOF marks follow it: dropped if that segment stays the message's last.
        self.held: _Text | None = None
        self.tentative: _Text | None = None  # the same, for the segment line under way
        self.pending = _Text()  # lines after the message's last segment so far
        self.pending_at = skip
        self.outside = _Text()
        self.outside_at = skip
        self.wrapper = _Text()

    # -- reading --------------------------------------------------------------------------

    def run(self, first: bytes, stream: Readable) -> SplitData:
        decode = self._decoder()
        data = first[self.skip :]
        for start in range(0, len(data), CHUNK_BYTES):
            self._feed(decode(data[start : start + CHUNK_BYTES], False), False)
        while data := stream.read(CHUNK_BYTES):
            self._feed(decode(data, False), False)
        self._feed(decode(b"", True), True)
        return SplitData(
            self.messages,
            self.stray,
            tuple(self.wrappers),
            self.codec,
            _batch_problems(self.outline),
        )

    def _decoder(self) -> Callable[[bytes, bool], str]:
        if not self.wide:
            return lambda data, final: data.decode("iso-8859-1")
        # surrogatepass: a lone surrogate still maps back to exactly its own bytes.
        return codecs.getincrementaldecoder(self.codec)("surrogatepass").decode

    def _feed(self, text: str, final: bool) -> None:
        buf = self.rest + text if self.rest else text
        self.rest = ""
        # A CR at the end may be the first half of a CRLF: wait for what follows it.
        stop = len(buf) - 1 if not final and buf.endswith("\r") else len(buf)
        position = 0
        for line_end in _LINE_END.finditer(buf, 0, stop):
            self._line(buf[position : line_end.start()], line_end.group())
            position = line_end.end()
        tail = buf[position:] if position else buf
        if final:
            if tail or self.begun:
                self._line(tail, "")
            self._end_region()
        elif not tail:
            return
        elif self.begun or len(tail) > max(_LONG_LINE, 4):
            # A line this long is taken in pieces, not gathered whole first (its first piece
            # holds the four characters that say where it goes).
            piece = tail[:-1] if tail.endswith("\r") else tail
            self.rest = tail[len(piece) :]
            if piece:
                self._piece(piece)
        else:
            self.rest = tail

    # -- lines ----------------------------------------------------------------------------

    def _line(self, content: str, terminator: str) -> None:
        """A whole line (or the last piece of a long one) and its terminator."""
        if content or not self.begun:
            self._piece(content, terminator)
        kind = self.kind
        if kind == _SEGMENT:
            if self.tentative is not None:
                self._add(self.tentative, terminator)
                self.held, self.tentative = self.tentative, None
            else:
                self._add(self.message, terminator)
            self.at += self._width(terminator)
            self.pending_at = self.at
        elif kind == _WRAPPER:
            text = self._text(self.wrapper)
            self.outline.append(text)
            if self.region in ("FHS", "BHS"):
                self.wrappers.append(text)
            self.at += self._width(terminator)
            self.outside, self.outside_at = _Text(), self.at
            self.kind = _OUTSIDE
        else:
            self._add(self.outside if kind == _OUTSIDE else self.pending, terminator)
            self.at += self._width(terminator)
        self.begun = False

    def _piece(self, content: str, terminator: str | None = None) -> None:
        """Content of the current line: the whole of it, or (``terminator`` None, at least
        four characters when it begins the line) a piece of a long line."""
        if not self.begun:
            self.begun = True
            self._begin(content, terminator)
        kind = self.kind
        if kind == _SEGMENT:
            self._segment_content(content)
        elif kind == _WRAPPER:
            self._add(self.wrapper, content)
        else:
            target = self.outside if kind == _OUTSIDE else self.pending
            self._add(target, content)
            if not target.inked and content.strip(_BLANK):
                target.inked = True
        self.at += self._width(content)

    def _begin(self, content: str, terminator: str | None) -> None:
        """Decide where a line goes from its start (and, for a three-character line, whether
        anything follows it)."""
        name = content[:3]
        if name in _REGION_NAMES and (len(content) > 3 or terminator):
            self._end_region()
            self.region, self.region_at = name, self.at
            if name == "MSH":
                self.field_separator = content[3] if len(content) > 3 else str(terminator)[0]
                self.message, self.held, self.tentative = _Text(), None, None
                self.pending, self.pending_at = _Text(), self.at
                self.outline.append("MSH")
                self.kind = _SEGMENT
            else:
                self.wrapper = _Text()
                self.kind = _WRAPPER
        elif self.region != "MSH":
            self.kind = _OUTSIDE
        elif is_segment_line(content[:4], self.field_separator):
            # What came between this segment and the one before it is the message's own.
            if self.held is not None:
                self._extend(self.message, self.held)
                self.held = None
            if self.pending:
                self._extend(self.message, self.pending)
                self.pending = _Text()
            self.kind = _SEGMENT
        else:
            self.kind = _PENDING

    def _segment_content(self, content: str) -> None:
        """Content of a segment line into the message, except a trailing stretch from an EOF
        mark on that holds only blanks and EOF marks (``tentative``, see ``held``)."""
        if content[-1:] not in _TAIL_BLANK:
            if self.tentative is not None:
                self._extend(self.message, self.tentative)
                self.tentative = None
            self._add(self.message, content)
            return
        kept = content.rstrip(_TAIL_BLANK)
        if kept:
            if self.tentative is not None:
                self._extend(self.message, self.tentative)
                self.tentative = None
            self._add(self.message, kept)
        run = content[len(kept) :]
        if self.tentative is not None:
            self._add(self.tentative, run)
            return
        mark = run.find("\x1a")
        if mark < 0:
            self._add(self.message, run)
            return
        self._add(self.message, run[:mark])
        self.tentative = _Text()
        self._add(self.tentative, run[mark:])

    def _end_region(self) -> None:
        if self.region == "MSH":
            data = self._bytes(self.message)
            self.messages.append(MessageSlice(self.region_at, data, _size(self.message)))
            self._outside(self.pending, self.pending_at)
        else:
            self._outside(self.outside, self.outside_at)
        self.region = ""
        self.outside, self.outside_at = _Text(), self.at
        self.kind = _OUTSIDE

    def _outside(self, text: _Text, at: int) -> None:
        if not text.inked:
            return
        data = self._bytes(text)
        shown = self._text(text) if self.wide else _display_8bit(data, text.whole)
        self.stray.append(Stray(at, data, shown, _size(text)))

    # -- text -----------------------------------------------------------------------------

    def _width(self, text: str) -> int:
        """Bytes the text takes in the data."""
        if not self.wide:
            return len(text)
        if self.unit == 4:
            return 4 * len(text)
        return len(text.encode(self.codec, "surrogatepass"))

    def _add(self, target: _Text, text: str) -> None:
        if not text:
            return
        target.nbytes += self._width(text)
        if target.whole:
            target.parts.append(text)
            if 0 <= self.limit < target.nbytes:
                target.parts = ["".join(target.parts)[: self.head]]
                target.whole = False
        elif len(target.parts[0]) < self.head:
            target.parts[0] += text[: self.head - len(target.parts[0])]

    def _extend(self, target: _Text, other: _Text) -> None:
        """Append what ``other`` holds (only its head, if that is all it kept)."""
        if other.whole:
            for part in other.parts:
                self._add(target, part)
            return
        if target.whole:
            target.parts, target.whole = ["".join(target.parts)[: self.head]], False
        if len(target.parts[0]) < self.head:
            target.parts[0] += other.parts[0][: self.head - len(target.parts[0])]
        target.nbytes += other.nbytes

    def _text(self, text: _Text) -> str:
        return "".join(text.parts)

    def _bytes(self, text: _Text) -> bytes:
        data = "".join(text.parts).encode(self.codec, "surrogatepass" if self.wide else "strict")
        return data if text.whole else data[: self.head]


def _size(text: _Text) -> int | None:
    """The item's length in bytes when only its head is kept."""
    return None if text.whole else text.nbytes


def _display_8bit(data: bytes, whole: bool) -> str:
    """8-bit text as a person would read it: UTF-8 when it is, else ISO-8859-1. The head of a
    longer text may end inside a UTF-8 character."""
    try:
        if whole:
            return data.decode("utf-8")
        return codecs.getincrementaldecoder("utf-8")().decode(data, False)
    except UnicodeDecodeError:
        return data.decode("iso-8859-1")


def _batch_problems(outline: list[str]) -> tuple[str, ...]:
    """Check the wrappers against HL7 v2's batch rules (chapter 2): a file is
    ``[FHS] {[BHS] {MSH ...} [BTS]} [FTS]``, each header closed by its trailer, BTS-1 the
    number of messages in its batch and FTS-1 the number of batches in its file (both
    optional). ``outline`` holds each wrapper segment's text and "MSH" for each message."""
    problems: list[str] = []
    in_file = in_batch = False
    batch_number = 0  # batches in the data so far, to name them
    batches_in_file = messages_in_batch = 0
    for segment in outline:
        name = segment[:3]
        if name in ("FHS", "BHS", "FTS") and in_batch:
            problems.append(f"batch {batch_number} (BHS) has no BTS trailer before the {name}")
            in_batch = False
        if name == "MSH":
            messages_in_batch += 1
        elif name == "FHS":
            if in_file:
                problems.append("the file (FHS) has no FTS trailer before the next FHS")
            in_file, batches_in_file = True, 0
        elif name == "BHS":
            batch_number += 1
            batches_in_file += 1
            in_batch, messages_in_batch = True, 0
        elif name == "BTS":
            if not in_batch:
                problems.append("a BTS trailer has no BHS header before it")
            else:
                field = f"BTS-1 of batch {batch_number}"
                problems += _count_problems(
                    segment, messages_in_batch, field, "messages", "the batch"
                )
            in_batch = False
        elif name == "FTS":
            if not in_file:
                problems.append("an FTS trailer has no FHS header before it")
            elif batches_in_file == 0:
                # Messages right inside FHS/FTS: one batch without a header of its own, which
                # senders count as 1 and the hub's own answers as 0.
                problems += _count_problems(segment, 1, "FTS-1", "batches", "the file", also=0)
            else:
                problems += _count_problems(
                    segment, batches_in_file, "FTS-1", "batches", "the file"
                )
            in_file = False
    if in_batch:
        problems.append(f"batch {batch_number} (BHS) has no BTS trailer")
    if in_file:
        problems.append("the file (FHS) has no FTS trailer")
    return tuple(problems)


def _count_problems(
    trailer: str, held: int, field: str, counted: str, container: str, *, also: int = -1
) -> list[str]:
    """The trailer's count (its first field) against the number ``held`` (or ``also``) found
    in ``container``: why they disagree, if they do. An empty field gives no count."""
    fields = trailer.split(trailer[3]) if len(trailer) > 3 else [trailer]
    stated = fields[1].strip() if len(fields) > 1 else ""
    if not stated:
        return []
    what = f"{field}, the number of {counted} in {container},"
    if not stated.isdigit():
        return [f"{what} is {stated[:20]!r}, not a number"]
    if int(stated) in (held, also):
        return []
    return [f"{what} is {int(stated)}, but {container} holds {held}"]


def split_messages(data: bytes) -> list[bytes]:
    """Each MSH..(next MSH or batch segment) as its own bytes; wrapper segments are left out,
    and so is their check (``split_data`` gives ``batch_problems``).

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
