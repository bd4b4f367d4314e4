"""Acknowledgments built as text, in the sender's own dialect: original mode (AA / AE / AR),
or in enhanced mode the accept acknowledgment (CA / CE / CR) for a listener that honours it.

The ACK swaps sending and receiving application/facility, keeps the inbound separators and
version, echoes MSH-10 in MSA-2, and carries an ERR segment with a readable reason on errors.
"""

from __future__ import annotations

import base64
import itertools
import os
import secrets
import threading
import time
from enum import StrEnum
from functools import lru_cache

from carehub.hl7.view import MessageView, Separators, escape


class AckCode(StrEnum):
    ACCEPT = "AA"
    ERROR = "AE"
    REJECT = "AR"


#: The enhanced-mode accept acknowledgment for each outcome: committed to the store (CA), stored
#: but refused or not stored (CE), not taken as a message at all (CR).
COMMIT_CODES = {AckCode.ACCEPT: "CA", AckCode.ERROR: "CE", AckCode.REJECT: "CR"}


def _asked_for(ack_type: str, code: AckCode, when_empty: bool) -> bool:
    """Whether an acknowledgment type (HL7 table 0155) asks for an answer to this outcome: AL
    always, NE never, ER on an error or rejection only, SU on success only; empty:
    ``when_empty``. A value the table lacks: always, as an answer the sender did not want
    costs less than one it waits for in vain."""
    kind = ack_type.strip().upper()
    if not kind:
        return when_empty
    if kind == "NE":
        return False
    if kind == "ER":
        return code is not AckCode.ACCEPT
    if kind == "SU":
        return code is AckCode.ACCEPT
    return True


def accept_ack_wanted(accept_ack_type: str, code: AckCode) -> bool:
    """Whether MSH-15 asks for an accept acknowledgment of this outcome; empty (enhanced mode
    asked for by MSH-16 alone) asks for it always."""
    return _asked_for(accept_ack_type, code, when_empty=True)


def application_ack_wanted(application_ack_type: str, code: AckCode) -> bool:
    """Whether MSH-16 asks for an application acknowledgment of this outcome; empty never
    (an empty MSH-16 beside a valued MSH-15 asks for the accept acknowledgment alone)."""
    return _asked_for(application_ack_type, code, when_empty=False)


class ErrorCode(StrEnum):
    """HL7 table 0357 message error condition codes used by carehub."""

    SEGMENT_SEQUENCE = "100"
    REQUIRED_FIELD_MISSING = "101"
    DATA_TYPE_ERROR = "102"
    UNSUPPORTED_MESSAGE_TYPE = "200"
    UNSUPPORTED_PROCESSING_ID = "202"
    APPLICATION_INTERNAL_ERROR = "207"


_ERROR_TEXT = {
    ErrorCode.SEGMENT_SEQUENCE: "Segment sequence error",
    ErrorCode.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCode.DATA_TYPE_ERROR: "Data type error",
    ErrorCode.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCode.UNSUPPORTED_PROCESSING_ID: "Unsupported processing ID",
    ErrorCode.APPLICATION_INTERNAL_ERROR: "Application internal error",
}

#: MSH-10 is at most 20 characters before v2.7: "CH", the process's prefix, then a counter.
CONTROL_ID_LENGTH = 20
#: Random bytes of the prefix: 40 bits, eight base 32 characters.
_PREFIX_BYTES = 5
#: The counter, in hexadecimal, fills the rest; past it a new prefix is drawn.
_COUNTER_LIMIT = 16 ** (CONTROL_ID_LENGTH - len("CH") - _PREFIX_BYTES * 8 // 5)


def _new_series() -> tuple[str, itertools.count[int]]:
    """A random prefix and a counter for it. Random, not the start time: hubs started in the
    same second (scaled out on one store, or restarted within it) must not issue the same ACK
    control IDs, and neither must a process forked from one."""
    prefix = base64.b32encode(secrets.token_bytes(_PREFIX_BYTES)).decode("ascii")
    return prefix, itertools.count(1)


_series = _new_series()
_series_lock = threading.Lock()


def _new_series_in_child() -> None:
    global _series, _series_lock
    _series, _series_lock = _new_series(), threading.Lock()


os.register_at_fork(after_in_child=_new_series_in_child)


def new_control_id() -> str:
    """A short MSH-10 for ACKs and batch headers, unique across processes: this process's
    random prefix and a counter, 20 characters at most."""
    global _series
    prefix, counter = _series
    number = next(counter)
    if number >= _COUNTER_LIMIT:
        with _series_lock:
            if _series[1] is counter:
                _series = _new_series()
            prefix, counter = _series
            number = next(counter)
    return f"CH{prefix}{number:X}"


_stamp_second = -1
_stamp_text = ""


def _timestamp() -> str:
    """MSH-7 with the local UTC offset, formatted once per second (ACKs are frequent)."""
    global _stamp_second, _stamp_text
    second = int(time.time())
    if second != _stamp_second:
        _stamp_text = time.strftime("%Y%m%d%H%M%S%z", time.localtime(second))
        _stamp_second = second
    return _stamp_text


@lru_cache(maxsize=64)
def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts) or (2, 5)


def _encoding_characters(seps: Separators, written: str) -> str:
    """MSH-2 of the ACK: the sender's own, as it wrote it. ``Separators`` fills in missing
    encoding characters with the defaults to read the message, but a sender that wrote fewer
    than four (``^~``) expects its own back, not ``^~\\&``."""
    if written and len(written) < 4:
        return written
    return seps.encoding_characters


#: MSA-3 (ST) and ERR-1 (ELD) hold at most 80 characters before v2.5: receivers built on those
#: versions keep them in fixed-size fields, and cut or refuse a longer value.
SHORT_TEXT_LIMIT = 80
_ELLIPSIS = "..."
#: Where a shortened text preferably ends: after a clause, else after a word.
_CLAUSE_ENDS = ("; ", ": ", ", ", " (")


def short_text(reason: str, seps: Separators, limit: int) -> str:
    """``reason`` escaped for a field of at most ``limit`` characters, its escape sequences
    counted: whole when it fits, else cut where it still fits, at the end of a clause or else
    of a word when one ends in its second half, followed by "...". The whole reason stays in
    the store (and in ERR-8 from v2.5 on)."""
    whole = escape(reason, seps)
    if len(whole) <= limit:
        return whole
    ellipsis = escape(_ELLIPSIS, seps)
    room = limit - len(ellipsis)
    if room <= 0:
        return ""
    end = min(len(reason), room)
    while end > 0 and len(escape(reason[:end], seps)) > room:
        end -= 1
    clause = max(reason.rfind(mark, 0, end + len(mark)) for mark in _CLAUSE_ENDS)
    blank = reason.rfind(" ", 0, end + 1)
    end = next((at for at in (clause, blank) if at > end // 2), end)
    return escape(reason[:end].rstrip(" ,;:("), seps) + ellipsis


def build_ack(
    code: AckCode,
    original: MessageView | None,
    *,
    reason: str = "",
    error_code: ErrorCode | None = None,
    error_location: str = "",
    hub_application: str = "CAREHUB",
    hub_facility: str = "",
    enhanced: bool = False,
    charset_field: str | None = None,
) -> str:
    """The ACK text (segments ended by CR) for ``original`` (None when it had no readable
    MSH); ``enhanced``: the accept acknowledgment, MSA-1 CA/CE/CR (COMMIT_CODES);
    ``charset_field``: MSH-18 of the ACK instead of the original's ('' leaves it out)."""
    seps = original.separators if original else Separators()
    f, c = seps.field, seps.component

    msh = original.fields(0) if original else []

    def field(number: int) -> str:
        return msh[number] if number < len(msh) else ""

    version = field(12).split(c, 1)[0] or "2.5"
    trigger = field(9).split(seps.repetition, 1)[0].split(c)[1:2]
    trigger = trigger[0] if trigger else ""
    if trigger and _version_tuple(version) >= (2, 3, 1):
        message_type = f"ACK{c}{trigger}{c}ACK"
    elif trigger:
        message_type = f"ACK{c}{trigger}"
    else:
        message_type = "ACK"
    header = [
        "MSH",
        _encoding_characters(seps, field(2)),
        field(5) or hub_application,
        field(6) or hub_facility,
        field(3),
        field(4),
        _timestamp(),
        "",
        message_type,
        new_control_id(),
        field(11) or "P",
        field(12) or version,
    ]
    charset = field(18) if charset_field is None else charset_field
    if charset:
        header += [""] * (17 - len(header)) + [charset]
    segments = [f.join(header)]

    text = escape(reason, seps) if reason else ""
    modern = _version_tuple(version) >= (2, 5)
    msa = ["MSA", COMMIT_CODES[code] if enhanced else code.value, field(10)]
    if text and _version_tuple(version) < (2, 7):
        # MSA-3 was withdrawn in v2.7; ERR-8 carries the whole text from v2.5 on. Before
        # v2.5 the ACK has no room for it: MSA-3 gets a short form.
        msa.append(text if modern else short_text(reason, seps, SHORT_TEXT_LIMIT))
    segments.append(f.join(msa))

    if code is not AckCode.ACCEPT:
        error_code = error_code or ErrorCode.APPLICATION_INTERNAL_ERROR
        location = error_location.replace("-", c) if error_location else ""
        coded = c.join([error_code.value, _ERROR_TEXT[error_code], "HL70357"])
        if modern:
            segments.append(f.join(["ERR", "", location, coded, "E", "", "", "", text]))
        else:
            # ERR-1 (ELD): segment^sequence^field^code, the code a CE holding the text as its
            # second subcomponent; escape() already encodes every delimiter, the subcomponent
            # separator included. The whole field is held to SHORT_TEXT_LIMIT.
            parts = location.split(c) if location else ["", ""]
            parts += [""] * (3 - len(parts))
            before = c.join([*parts[:3], error_code.value]) + seps.subcomponent
            after = seps.subcomponent + "HL70357"
            room = SHORT_TEXT_LIMIT - len(before) - len(after)
            eld_text = short_text(reason, seps, room) if reason else ""
            eld_text = eld_text or _ERROR_TEXT[error_code]
            segments.append(f.join(["ERR", f"{before}{eld_text}{after}"]))
    return "\r".join(segments) + "\r"


def read_ack(text: str) -> tuple[str, str, str]:
    """(code, control id echoed, human text) from an ACK; text comes from MSA-3 or ERR."""
    view = MessageView(text)
    code = view.get("MSA-1")
    control_id = view.get("MSA-2")
    message = view.get("MSA-3")
    if not message and view.count("ERR"):
        message = view.get("ERR-8") or view.get("ERR-1.4.2") or view.get("ERR-3.2")
    return code, control_id, message
