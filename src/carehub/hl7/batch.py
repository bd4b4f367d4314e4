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
    #: Why the batch wrappers do not hold together, one sentence each: a header without its
    #: trailer (FHS without FTS, BHS without BTS) or the reverse, or a count that disagrees
    #: with what the data holds (BTS-1: messages in the batch; FTS-1: batches in the file).
    #: Empty when they agree, and for data without wrappers (which cannot show it is whole).
    batch_problems: tuple[str, ...] = ()


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
    outline: list[str] = []  # each wrapper segment, and "MSH" for each message, in data order
    for i, (start, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        if name in _WRAPPERS:
            line_end = _LINE_END.search(text, start, end)
            segment = text[start : line_end.start() if line_end else end]
            outline.append(segment)
            if name in ("FHS", "BHS"):
                wrappers.append(segment)
            outside(line_end.end() if line_end else end, end)
            continue
        outline.append("MSH")
        segments_end = _segments_end(text, start, end)
        trailer = _TRAILER.search(text, start, segments_end)
        cut = trailer.start() if trailer else segments_end
        # Keep the last segment's own terminator; what follows it is blank and no one's.
        if text.startswith("\r\n", cut, segments_end):
            cut += 2
        elif cut < segments_end and text[cut] in "\r\n":
            cut += 1
        first, last = offset(start), offset(cut)  # before outside(): offsets are asked rising
        messages.append(MessageSlice(first, data[first:last]))
        outside(segments_end, end)
    return SplitData(messages, stray, tuple(wrappers), codec, _batch_problems(outline))


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
