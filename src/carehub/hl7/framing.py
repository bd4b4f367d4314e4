"""MLLP framing: <VT> payload <FS><CR>, decoded incrementally from whatever the socket hands us.

The decoder never raises on bad input. Bytes outside a frame are skipped (MLLP has the
receiver ignore them) and counted for the listener to report, and a frame past the size limit
is drained without being buffered so a huge or runaway frame cannot exhaust memory.

A frame ends only where it can end: <FS> followed by <CR> (or by <LF>, or by the <VT> of the next
frame, for senders that leave the <CR> out). An <FS> followed by anything else is a byte of the
message, never its end: taking it as one answered the first part of the message AA and dropped
the rest. Likewise a <VT> inside a frame starts a new frame (the sender lost its place, and the
unfinished one is broken) only when an MSH follows it; otherwise it too is a byte of the
message, and the frame stays one frame with one answer. Intake refuses a message holding
either byte (they cannot be forwarded over MLLP), but it has the whole message.
"""

from __future__ import annotations

from dataclasses import dataclass

START_BLOCK = 0x0B
END_BLOCK = 0x1C
CARRIAGE_RETURN = 0x0D

LINE_FEED = 0x0A

#: Bytes kept from the start of an oversize or broken frame, enough to read its MSH for the ACK.
HEAD_BYTES = 4096
#: What a start block inside a frame must be followed by to begin a new message.
_MESSAGE_STARTS = (b"MSH", b"\xef\xbb\xbfMSH")
_LOOKAHEAD = max(len(s) for s in _MESSAGE_STARTS)
#: Bytes after <FS> that end a frame: <CR>, and <LF> or the next <VT> from careless senders.
_AFTER_END = frozenset({CARRIAGE_RETURN, LINE_FEED, START_BLOCK})
#: How bytes outside a frame end when they are a message sent without its start block.
_UNFRAMED_END = bytes([END_BLOCK, CARRIAGE_RETURN])


@dataclass(slots=True, frozen=True)
class Frame:
    """A complete frame; payload excludes the framing bytes."""

    payload: bytes


@dataclass(slots=True, frozen=True)
class OversizeFrame:
    """A frame larger than the limit: only its head is kept, the rest was discarded."""

    head: bytes
    size: int


@dataclass(slots=True, frozen=True)
class BrokenFrame:
    """A frame cut short by the start block of the next one (the sender lost its place)."""

    head: bytes
    size: int


FrameEvent = Frame | OversizeFrame | BrokenFrame


def encode_frame(payload: bytes) -> bytes:
    """Wrap one payload in MLLP framing bytes."""
    return b"\x0b" + payload + b"\x1c\x0d"


class FrameDecoder:
    """Turns a byte stream into frame events; one decoder per connection."""

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        #: Bytes skipped outside any frame (no start block before them).
        self.stray_bytes = 0
        #: Runs of those bytes that ended like a message (<FS><CR>): a sender leaving out <VT>.
        self.unframed_messages = 0
        self._buf = bytearray()
        self._in_frame = False
        self._scanned = 0  # bytes of _buf already known to hold no END/START block
        self._drained = 0  # bytes of an oversize frame already thrown away
        self._head = b""

    @property
    def mid_frame(self) -> bool:
        """True while part of a frame has been read but not its end."""
        return self._in_frame

    @property
    def pending_bytes(self) -> int:
        return len(self._buf) + self._drained

    @property
    def awaiting_end(self) -> bool:
        """The last byte read is an <FS> that may end the frame once its <CR> comes."""
        buf = self._buf
        last = len(buf) - 1
        return self._in_frame and last >= 0 and buf[last] == END_BLOCK and self._scanned == last

    def end_frame_now(self) -> list[FrameEvent]:
        """Take the <FS> that ends what was read as the frame's end although nothing followed
        it: a sender that leaves out the <CR> and waits for its ACK before sending more would
        otherwise wait forever (the listener calls this after a short quiet)."""
        if not self.awaiting_end:
            return []
        return self.feed(bytes([CARRIAGE_RETURN]))

    def feed(self, data: bytes) -> list[FrameEvent]:
        self._buf += data
        events: list[FrameEvent] = []
        buf = self._buf
        while True:
            if not self._in_frame:
                start = buf.find(START_BLOCK)
                if start < 0:
                    self._skip(len(buf))
                    return events
                if start:
                    self._skip(start)
                del buf[0]
                self._in_frame = True
                self._scanned = 0
                self._drained = 0
                self._head = b""
            end = buf.find(END_BLOCK, self._scanned)
            restart = buf.find(START_BLOCK, self._scanned, end if end >= 0 else len(buf))
            if restart >= 0:
                after = bytes(buf[restart + 1 : restart + 1 + _LOOKAHEAD])
                if after.startswith(_MESSAGE_STARTS):
                    head = self._head or bytes(buf[: min(restart, HEAD_BYTES)])
                    events.append(BrokenFrame(head, self._drained + restart))
                    del buf[:restart]
                    self._in_frame = False
                    continue
                if restart + 1 + len(after) == len(buf) and any(
                    start.startswith(after) for start in _MESSAGE_STARTS
                ):
                    self._scanned = restart  # too few bytes yet to tell: wait for more
                    return events
                self._scanned = restart + 1  # a byte of the message, not a new frame
                continue
            if end < 0:
                self._scanned = len(buf)
                self._drain_if_oversize()
                return events
            if end + 1 >= len(buf):
                # <FS> is the last byte read: wait for the next byte to see whether <CR> follows.
                self._scanned = end
                return events
            following = buf[end + 1]
            if following not in _AFTER_END:
                self._scanned = end + 1  # a byte of the message, not its end
                continue
            size = self._drained + end
            consumed = end + 1 if following == START_BLOCK else end + 2
            if size > self.max_frame_bytes:
                # The head stops at <FS>: the framing bytes and the next frame are not its own.
                head = self._head or bytes(buf[: min(end, HEAD_BYTES)])
                events.append(OversizeFrame(head, size))
            else:
                events.append(Frame(bytes(buf[:end])))
            del buf[:consumed]
            self._in_frame = False

    def _skip(self, count: int) -> None:
        """Drop ``count`` bytes before any start block; only their number and shape are kept."""
        buf = self._buf
        self.stray_bytes += count
        self.unframed_messages += buf.count(_UNFRAMED_END, 0, count)
        del buf[:count]

    def _drain_if_oversize(self) -> None:
        buf = self._buf
        if self._drained + len(buf) <= self.max_frame_bytes:
            return
        if not self._head:
            self._head = bytes(buf[:HEAD_BYTES])
        self._drained += len(buf)
        buf.clear()
        self._scanned = 0
