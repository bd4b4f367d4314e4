"""Split a file or HTTP body into messages: one message, several, or an FHS/BHS batch."""

from __future__ import annotations

import re

from carehub.hl7.charsets import UTF8_BOM

# A segment name at the start of the data or right after a segment terminator.
_SEGMENT_START = re.compile(rb"(?:^|(?<=[\r\n]))(MSH|FHS|BHS|BTS|FTS)(?=.)", re.S)
_WRAPPERS = {b"FHS", b"BHS", b"BTS", b"FTS"}
# From the first terminator (or 0x1A) after which only blank lines and 0x1A follow. Spaces are
# stripped only there, never from the last segment itself: they may be field data.
_TRAILER = re.compile(rb"(?:[\r\n\x1a][\r\n\x1a \t]*)?\Z")


def split_messages(data: bytes) -> list[bytes]:
    """Each MSH..(next MSH or batch segment) as its own bytes; wrapper segments are dropped.

    Bytes are kept exactly as received inside each message (segment terminators included), so
    the stored raw message is what the sender wrote.
    """
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM) :]
    starts = [(m.start(), m.group(1)) for m in _SEGMENT_START.finditer(data)]
    messages: list[bytes] = []
    for i, (start, name) in enumerate(starts):
        if name in _WRAPPERS:
            continue
        end = starts[i + 1][0] if i + 1 < len(starts) else len(data)
        message = data[start:end]
        trailer = _TRAILER.search(message)
        message = message[: trailer.start()] if trailer else message
        if message:
            messages.append(message + b"\r")
    return messages
