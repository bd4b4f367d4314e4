"""A light, lazy view of an HL7 v2 message: segments split once, fields split on demand.

Intake and routing read a handful of fields per message; building a full tree (hl7apy takes
20-70 ms per ADT) would cap the engine at tens of messages a second. This view costs
microseconds and reads any field by a terse path such as ``PID-3.4`` or ``PID-3[2].1``.
Escapes (``\\F\\`` ``\\S\\`` ``\\T\\`` ``\\R\\`` ``\\E\\`` ``\\Xhh\\``, and ``\\P\\`` when MSH-2
declares a v2.7 truncation character) are decoded on access; the bytes of ``\\Xhh\\`` are
text in the message's own character set, so they are decoded in it.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import repeat
from operator import itemgetter
from typing import Any

from carehub.hl7.charsets import codec_for

_PATH = re.compile(
    r"^(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<occ>\d+)\])?"
    r"(?:-(?P<field>\d+)(?:\[(?P<rep>\d+)\])?(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?)?$"
)


class NotHL7Error(ValueError):
    """The text has no MSH segment, so it is not an HL7 v2 message."""


class PathError(ValueError):
    """A field path that does not follow SEG[-field[.component[.subcomponent]]]."""


@dataclass(slots=True, frozen=True)
class FieldPath:
    """A parsed terse path. Numbers are 1-based as HL7 writes them; 0 means 'not given'
    (a field path without a repetition means the whole field, every repetition)."""

    segment: str
    occurrence: int = 1
    field: int = 0
    repetition: int = 0
    component: int = 0
    subcomponent: int = 0

    def __str__(self) -> str:
        text = self.segment + (f"[{self.occurrence}]" if self.occurrence != 1 else "")
        if self.field:
            text += f"-{self.field}" + (f"[{self.repetition}]" if self.repetition else "")
            if self.component:
                text += f".{self.component}"
                if self.subcomponent:
                    text += f".{self.subcomponent}"
        return text


@lru_cache(maxsize=1024)
def parse_path(path: str) -> FieldPath:
    """Parse ``PID-3[2].4.1``; raises PathError naming the bad path."""
    match = _PATH.match(path.strip().upper())
    if not match:
        raise PathError(
            f"bad field path {path!r}: expected SEG-field[.component[.subcomponent]], e.g. PID-3.4"
        )
    groups = match.groupdict()
    numbers = (groups[name] for name in ("occ", "field", "rep", "comp", "sub"))
    if any(number is not None and int(number) == 0 for number in numbers):
        # NK1[0]-2 would read the last NK1 (index -1) or fail mid-routing on a message without
        # one; PID-0 the whole segment: no path means either, so none is let through.
        raise PathError(f"bad field path {path!r}: numbers in a path start at 1")
    return FieldPath(
        segment=groups["seg"],
        occurrence=int(groups["occ"] or 1),
        field=int(groups["field"] or 0),
        repetition=int(groups["rep"] or 0),
        component=int(groups["comp"] or 0),
        subcomponent=int(groups["sub"] or 0),
    )


@dataclass(slots=True, frozen=True)
class Separators:
    """The delimiters of one message, from MSH-1 and MSH-2.

    ``truncation`` is the fifth encoding character of v2.7 and later (``^~\\&#``), or '' when
    MSH-2 has four. It delimits nothing: a value ending with it was truncated by the sender, and
    in text it is written ``\\P\\``. It is kept so that MSH-2 can be echoed as the sender wrote it.
    """

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""
    #: The Python codec the message's text was decoded with (intake's decode, else MSH-18):
    #: ``\\Xhh\\`` escapes name bytes in it. '' means UTF-8, HL7's default today.
    charset: str = ""

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as written: four characters, or five with the truncation character."""
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation


_DEFAULT_ENCODING = "^~\\&"
_DEFAULT_SEPARATORS = Separators()

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
#: Bytes of a message's content digest (see MessageView.content_digest): 128 bits of SHA-256,
#: which CPUs hash in hardware (three times faster than BLAKE2 here on a 2.6 KB ADT).
DIGEST_SIZE = 16
#: Characters of the digest as text: base64 without its padding, every one above 0x20.
DIGEST_CHARS = 22


@lru_cache(maxsize=16)
def _irregular_line(field_separator: str) -> re.Pattern[str]:
    """Finds, in segments joined by CR, the start of a line that is not a segment or that
    begins another message: one scan in C instead of a Python call per segment."""
    sep = re.escape(field_separator)
    return re.compile(rf"\r(?:MSH|(?![A-Z][A-Z0-9]{{2}}(?:{sep}|\r|\Z)))")


@lru_cache(maxsize=1024)
def is_segment_id(name: str) -> bool:
    """``PID``, ``ZPI``, ``OBX``: an upper-case letter, then two upper-case letters or digits."""
    return _SEGMENT_ID.fullmatch(name) is not None


def is_segment_line(line: str, field_separator: str) -> bool:
    """Whether a line (without its terminator) is a segment: a segment ID followed by the
    field separator, or a segment ID alone. Anything else - a note typed into a file, a
    stray log line - is not part of any message."""
    return (len(line) == 3 or line[3:4] == field_separator) and is_segment_id(line[:3])


@lru_cache(maxsize=256)
def _with_charset(separators: Separators, charset: str) -> Separators:
    return replace(separators, charset=charset)


def _separators(field_sep: str, head: str) -> Separators:
    """Separators from MSH-1 and the (up to five) characters after it, where MSH-2 sits.

    MSH-2 ends at the next field separator or line end; missing characters take the defaults.
    A fifth character is the truncation character only when it differs from every delimiter.
    """
    if head == "^~\\&|" and field_sep == "|":
        return _DEFAULT_SEPARATORS  # nearly every message: skip the scanning below
    encoding = head
    for stop in (field_sep, "\r", "\n"):
        end = encoding.find(stop)
        if end >= 0:
            encoding = encoding[:end]
    encoding = encoding + _DEFAULT_ENCODING[len(encoding) :]
    truncation = encoding[4:5]
    if truncation and (truncation == field_sep or truncation in encoding[:4]):
        truncation = ""
    return Separators(field_sep, encoding[0], encoding[1], encoding[2], encoding[3], truncation)


class MessageView:
    """Read-only access to fields of one message. Construction costs one split into segments.

    ``charset`` is the codec the text was decoded with, when the caller knows it (intake
    does); otherwise MSH-18 says (UTF-8 when it says nothing). It matters only to ``\\Xhh\\``
    escapes, and travels with the separators that ``unescape`` is given."""

    __slots__ = ("_fields", "_index", "_joined", "memo", "segments", "separators")

    def __init__(self, text: str, charset: str | None = None) -> None:
        text = text.lstrip("\ufeff \t\r\n\x0b")
        if not text.startswith("MSH") or len(text) < 8:
            raise NotHL7Error("no MSH segment at the start of the message")
        field_sep = text[3]
        self.separators = _separators(field_sep, text[4:9])
        if "\n" in text:
            text = text.replace("\r\n", "\r").replace("\n", "\r")
        # str.split is four times faster than a regex split here, and this runs per message.
        self.segments: list[str] = [s for s in text.split("\r") if s and not s.isspace()]
        self._fields: dict[int, list[str]] = {}
        self._index: dict[str, list[int]] | None = None
        self._joined: str | None = None
        if charset is None:
            # MSH-18 from the MSH fields, which nearly every reader of a view splits anyway.
            msh = self.fields(0)
            declared = msh[18] if len(msh) > 18 else ""
            if declared:
                declared = declared.split(self.separators.repetition, 1)[0].strip()
                charset = codec_for(declared, "utf-8") if declared else None
        if charset and charset != "utf-8":
            self.separators = _with_charset(self.separators, charset)
        #: What other code derived from exactly this text (e.g. its care event), so the
        #: several routes one message takes compute it once.
        self.memo: dict[str, Any] = {}

    # -- segments ---------------------------------------------------------------------------
    def segment_names(self) -> list[str]:
        return [s[:3] for s in self.segments]

    def _positions(self, name: str) -> list[int]:
        if self._index is None:
            index: dict[str, list[int]] = {}
            for i, segment in enumerate(self.segments):
                index.setdefault(segment[:3], []).append(i)
            self._index = index
        return self._index.get(name, [])

    def first(self, segment: str) -> int | None:
        """Position of the first segment of this name, without building the name index."""
        prefix = segment + self.separators.field
        for position, text in enumerate(self.segments):
            if text.startswith(prefix) or text == segment:
                return position
        return None

    def count(self, segment: str) -> int:
        """How many segments of this name the message holds."""
        return len(self._positions(segment))

    def joined(self) -> str:
        """The segments joined by CR: the message with its terminators normalised and its
        blank lines dropped."""
        if self._joined is None:
            self._joined = "\r".join(self.segments)
        return self._joined

    def first_irregular(self) -> int | None:
        """Position of the first segment after MSH that is not a segment line (see
        ``is_segment_line``) or that starts another message (a second MSH); None when every
        line is a segment of this message. Blank lines are not segments and never count."""
        joined = self.joined()
        found = _irregular_line(self.separators.field).search(joined)
        return None if found is None else joined.count("\r", 0, found.start() + 1)

    def content_digest(self, raw: bytes | None = None) -> str:
        """A hash of what the message says, the part of its identity that tells a resend of a
        message from a different message that reuses its control ID (store.NewMessage).

        Hashed: the segments as the view holds them, joined by CR. So a resend is still
        recognised when the sender (or an engine on the way) wrote other segment terminators
        (CR, LF, CRLF), added or dropped blank lines or a byte order mark, or sent the same
        text in another character set.

        Left out: MSH-7, the time the message was created. Engines that resend from a queue
        or a downtime replay commonly build the header again and stamp MSH-7 with the resend
        time, while every other field, the control ID and the event time (EVN-2) included,
        stays as it was: with MSH-7 in the hash such a resend would be stored and routed a
        second time. Two messages from one sender that carry the same control ID and differ
        in nothing but MSH-7 say the same thing, so taking the second as a resend loses no
        information.

        Trailing delimiters (``DOE^JANE^^^``) are hashed as written: dropping them costs more
        than the rest of the digest, on every message. A resend that differs from the original
        only in those is told apart where it is rare, when its control ID turns out used
        before with other content (``padding_free_digest``, compared by the store).

        ``raw``: the received bytes, given when the text is not an exact decoding of them
        (undecodable bytes were replaced). Those bytes are hashed as received instead, so two
        messages that differ only in bytes the decoder replaced alike never pass for one.
        """
        if raw is not None:
            return raw_digest(raw)
        return _digest(self._without_msh_7(self.joined().encode("utf-8", "surrogatepass")))

    def padding_free_digest(self) -> str:
        """``content_digest`` with delimiters that have nothing after them to the end of their
        field or segment left out (``DOE^JANE^^^`` is ``DOE^JANE``, ``PV1|1|I|||`` is
        ``PV1|1|I``): in HL7 v2 they carry no data, and engines on the way add or drop them
        as they write a message out again. Two messages with the same sender and control ID
        that agree on this are one message resent."""
        data = self.joined().encode("utf-8", "surrogatepass")
        trailing = _trailing_delimiters(self.separators)
        fields = self.fields(0)
        if trailing is not None and len(fields) > 2:
            # From the field separator after MSH-2, whose characters are not delimiters.
            msh_2 = fields[2].encode("utf-8", "surrogatepass")
            data = trailing.drop(self.segments, data, len(msh_2) + 4)
        return _digest(self._without_msh_7(data))

    def _without_msh_7(self, data: bytes) -> bytes:
        """The message (UTF-8) with MSH-7 emptied (see content_digest)."""
        header_end = data.find(b"\r")
        if header_end < 0:
            header_end = len(data)
        sep = self.separators.field.encode("utf-8", "surrogatepass")
        header = data[:header_end].split(sep)  # MSH, MSH-2, MSH-3, ...: MSH-7 at 6
        if len(header) > 6 and header[6]:
            header[6] = b""
            data = sep.join(header) + data[header_end:]
        return data

    def msh(self, number: int) -> str:
        """Raw MSH-n, the cheapest read there is (intake reads a dozen of these per message)."""
        fields = self.fields(0)
        return fields[number] if number < len(fields) else ""

    def fields(self, position: int) -> list[str]:
        """Raw fields of the segment at ``position``; index i is field i (MSH included)."""
        cached = self._fields.get(position)
        if cached is None:
            cached = self.segments[position].split(self.separators.field)
            if cached[0] == "MSH":
                # MSH-1 is the field separator itself, so MSH fields are shifted by one.
                cached.insert(1, self.separators.field)
            self._fields[position] = cached
        return cached

    # -- fields -----------------------------------------------------------------------------
    def raw(self, path: str | FieldPath) -> str:
        """The escaped text at a path; '' when absent. A bare field path returns the whole field
        with every repetition unless a repetition is named."""
        spec = parse_path(path) if isinstance(path, str) else path
        positions = self._positions(spec.segment)
        if len(positions) < spec.occurrence:
            return ""
        fields = self.fields(positions[spec.occurrence - 1])
        if not spec.field:
            return self.segments[positions[spec.occurrence - 1]]
        if spec.field >= len(fields):
            return ""
        value = fields[spec.field]
        if spec.segment == "MSH" and spec.field <= 2:
            return value
        seps = self.separators
        if spec.component or spec.repetition:
            number = spec.repetition or 1
            repetitions = value.split(seps.repetition)
            if len(repetitions) < number:
                return ""
            value = repetitions[number - 1]
        if spec.component:
            components = value.split(seps.component)
            if len(components) < spec.component:
                return ""
            value = components[spec.component - 1]
            if spec.subcomponent:
                subs = value.split(seps.subcomponent)
                value = subs[spec.subcomponent - 1] if len(subs) >= spec.subcomponent else ""
        return value

    def get(self, path: str | FieldPath) -> str:
        """The unescaped value at a path; '' when absent."""
        value = self.raw(path)
        if self.separators.escape in value:
            spec = parse_path(path) if isinstance(path, str) else path
            if not (spec.segment == "MSH" and spec.field == 2):
                return unescape(value, self.separators)
        return value

    def repetitions(self, path: str) -> list[str]:
        """Raw repetitions of a field, e.g. every identifier in PID-3."""
        spec = parse_path(path)
        whole = self.raw(FieldPath(spec.segment, spec.occurrence, spec.field))
        return whole.split(self.separators.repetition) if whole else []

    def components(self, value: str) -> list[str]:
        """Split one raw field repetition into unescaped components."""
        return [unescape(c, self.separators) for c in value.split(self.separators.component)]


_last_character = itemgetter(-1)


class _TrailingDelimiters:
    """Drops delimiters with nothing after them to the end of their field or segment (see
    MessageView.content_digest), from UTF-8 text (where no byte of a multibyte character can
    be taken for an ASCII delimiter).

    Most messages from real feeds have some, so both the look and the rewrite are searches
    in C, with Python work only per padded field: a regex over the message cost ten times
    the whole digest."""

    def __init__(self, separators: Separators) -> None:
        field = separators.field
        lower = separators.component + separators.repetition + separators.subcomponent
        self._delimiters = frozenset(field + lower)
        self._delimiter_bytes = (field + lower).encode()
        self._component = ord(separators.component)
        #: Every delimiter below the field separator, read as the component separator.
        self._as_component = bytes.maketrans(lower.encode(), separators.component.encode() * 3)
        self._lower_before_field = (separators.component + field).encode()

    def drop(self, segments: list[str], data: bytes, start: int) -> bytes:
        """``data`` (``segments`` joined by CR, in UTF-8) without them from ``start`` on, or
        ``data`` itself when it has none."""
        probe = data.translate(self._as_component)
        padded_field = probe.find(self._lower_before_field, start)
        if padded_field >= 0:
            data = self._drop_before_fields(data, probe, start, padded_field)
        # A segment's last character is never one dropped above (a CR follows it, not a field
        # separator), so this look holds for the data as it is now.
        if self._delimiters.isdisjoint(map(_last_character, segments)):
            return data
        segments_after = data[start:].split(b"\r")
        ends = map(bytes.rstrip, segments_after, repeat(self._delimiter_bytes))
        return data[:start] + b"\r".join(ends)

    def _drop_before_fields(self, data: bytes, probe: bytes, start: int, found: int) -> bytes:
        """Drop each run of delimiters below the field separator that ends at one; ``found``
        is where the first run ends (``probe`` shows each of those delimiters as a component
        separator)."""
        kept: list[bytes] = []
        kept_from = 0
        while found >= 0:
            run_start = found
            while run_start > start and probe[run_start - 1] == self._component:
                run_start -= 1
            kept.append(data[kept_from:run_start])
            kept_from = found + 1
            found = probe.find(self._lower_before_field, found + 2)
        kept.append(data[kept_from:])
        return b"".join(kept)


@lru_cache(maxsize=16)
def _trailing_delimiters(separators: Separators) -> _TrailingDelimiters | None:
    """None for delimiters outside ASCII, which no sender seen uses: left as written."""
    delimiters = separators.field + separators.component + separators.repetition
    if not (delimiters + separators.subcomponent).isascii():
        return None
    return _TrailingDelimiters(separators)


def raw_digest(raw: bytes) -> str:
    """The content digest of bytes taken as they are (see MessageView.content_digest)."""
    return _digest(b"raw\x00" + raw)


def _digest(data: bytes) -> str:
    encoded = binascii.b2a_base64(hashlib.sha256(data).digest()[:DIGEST_SIZE], newline=False)
    return encoded[:DIGEST_CHARS].decode("ascii")


_HIGHLIGHT_AND_FORMAT = {"H": "", "N": "", ".br": "\n", ".sp": "\n", ".in": "", ".ti": ""}


def unescape(value: str, seps: Separators) -> str:
    """Decode HL7 escape sequences; an unknown sequence is kept as written."""
    esc = seps.escape
    if esc not in value:
        return value
    out: list[str] = []
    i = 0
    length = len(value)
    while i < length:
        ch = value[i]
        if ch != esc:
            out.append(ch)
            i += 1
            continue
        close = value.find(esc, i + 1)
        if close < 0:
            out.append(value[i:])
            break
        code = value[i + 1 : close]
        replacement = _escape_replacement(code, seps)
        out.append(replacement if replacement is not None else value[i : close + 1])
        i = close + 1
    return "".join(out)


def _escape_replacement(code: str, seps: Separators) -> str | None:
    simple = {
        "F": seps.field,
        "S": seps.component,
        "T": seps.subcomponent,
        "R": seps.repetition,
        "E": seps.escape,
    }
    if code in simple:
        return simple[code]
    if code == "P" and seps.truncation:
        return seps.truncation  # v2.7+: a truncation character that is data, not a marker
    if code.startswith("X") and len(code) > 1:
        try:
            data = bytes.fromhex(code[1:])
        except ValueError:
            return None
        return _decode_hex(data, seps.charset or "utf-8")
    for prefix, replacement in _HIGHLIGHT_AND_FORMAT.items():
        if code.startswith(prefix):
            return replacement
    return None


def _decode_hex(data: bytes, charset: str) -> str:
    """The bytes of a ``\\Xhh\\`` escape as text in the message's character set. Bytes that
    are not valid in it are read as ISO-8859-1, which takes any byte: that is what a sender
    escaping single bytes most often means, and nothing is lost or replaced."""
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return data.decode("iso-8859-1")


def escape(value: str, seps: Separators) -> str:
    """Encode delimiters in free text so it can sit inside one field component."""
    esc = seps.escape
    out = value.replace(esc, f"{esc}E{esc}")
    for char, code in (
        (seps.field, "F"),
        (seps.component, "S"),
        (seps.subcomponent, "T"),
        (seps.repetition, "R"),
        (seps.truncation, "P"),
    ):
        if char:
            out = out.replace(char, f"{esc}{code}{esc}")
    return out.replace("\r", f"{esc}.br{esc}").replace("\n", f"{esc}.br{esc}")
