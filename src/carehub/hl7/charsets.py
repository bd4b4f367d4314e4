"""MSH-18 character set names (HL7 table 0211) mapped to Python codecs.

HL7 text arrives as bytes. In the 8-bit character sets the header is ASCII, so MSH-18 can be
read before decoding the rest; UTF-16 and UTF-32 text is recognised by its byte order mark or by
the byte pattern of "MSH" in that encoding, since its header is not ASCII.

Senders often write MSH-18 in spellings that are not in table 0211 (``8859-1``, ``ISO-8859-1``,
``LATIN1``, ``UTF8``, ``CP1252``); those are accepted as the table's entries or as Python codec
names. A name that is neither is read as undeclared text is (UTF-8, else ISO-8859-1), never with
replacement characters, which would garble every accented name.

Text declared ISO-8859-1 is read as WHATWG's encoding standard reads that label, as
Windows-1252 (``whatwg-windows-1252``): the senders that declare it are Windows programs, and
their bytes 0x80-0x9F are curly quotes, dashes and the euro sign (0x92, the apostrophe of
O'Brien as Word writes it, is U+2019), which ISO-8859-1 would make C1 control characters no
text means. The five bytes Windows-1252 leaves undefined stay the C1 code points they are in
ISO-8859-1, so every byte still reads as one character, and text written back in the same
codec is the bytes received.

MLLP framing is single bytes (0x0B ... 0x1C 0x0D), so a UTF-16/32 message arrives intact only
while none of its code units holds those bytes (U+010B or U+011C would); the MLLP spec leaves
these encodings out for that reason. What does arrive whole is decoded and answered in kind.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from functools import lru_cache

#: The codec text declared ISO-8859-1 is read and written in (see the module doc).
LATIN1_AS_WINDOWS_1252 = "whatwg-windows-1252"

HL7_CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": LATIN1_AS_WINDOWS_1252,
    "ISO IR100": LATIN1_AS_WINDOWS_1252,
    "8859/2": "iso-8859-2",
    "ISO IR101": "iso-8859-2",
    "8859/3": "iso-8859-3",
    "ISO IR109": "iso-8859-3",
    "8859/4": "iso-8859-4",
    "ISO IR110": "iso-8859-4",
    "8859/5": "iso-8859-5",
    "ISO IR144": "iso-8859-5",
    "8859/6": "iso-8859-6",
    "ISO IR127": "iso-8859-6",
    "8859/7": "iso-8859-7",
    "ISO IR126": "iso-8859-7",
    "8859/8": "iso-8859-8",
    "ISO IR138": "iso-8859-8",
    "8859/9": "iso-8859-9",
    "ISO IR148": "iso-8859-9",
    "8859/15": "iso-8859-15",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "ISO IR14": "iso2022_jp",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
    "CNS 11643-1992": "big5",
    "WINDOWS-1252": "cp1252",
}

UTF8_BOM = b"\xef\xbb\xbf"


def _windows_1252(byte: int) -> str:
    """The character WHATWG's windows-1252 reads a byte as: Python's cp1252, and for the five
    bytes it leaves undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D), the C1 code point ISO-8859-1
    gives them."""
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(byte)


_DECODING_TABLE = "".join(_windows_1252(byte) for byte in range(256))
_ENCODING_TABLE = codecs.charmap_build(_DECODING_TABLE)


class _Windows1252Codec(codecs.Codec):
    def encode(self, input: str, errors: str = "strict") -> tuple[bytes, int]:
        return codecs.charmap_encode(input, errors, _ENCODING_TABLE)

    def decode(self, input: bytes, errors: str = "strict") -> tuple[str, int]:
        return codecs.charmap_decode(input, errors, _DECODING_TABLE)


class _Windows1252IncrementalEncoder(codecs.IncrementalEncoder):
    def encode(self, input: str, final: bool = False) -> bytes:
        return codecs.charmap_encode(input, self.errors, _ENCODING_TABLE)[0]


class _Windows1252IncrementalDecoder(codecs.IncrementalDecoder):
    def decode(self, input: bytes, final: bool = False) -> str:
        return codecs.charmap_decode(input, self.errors, _DECODING_TABLE)[0]


class _Windows1252StreamWriter(_Windows1252Codec, codecs.StreamWriter):
    pass


class _Windows1252StreamReader(_Windows1252Codec, codecs.StreamReader):
    pass


_WINDOWS_1252_INFO = codecs.CodecInfo(
    name=LATIN1_AS_WINDOWS_1252,
    encode=_Windows1252Codec().encode,
    decode=_Windows1252Codec().decode,
    incrementalencoder=_Windows1252IncrementalEncoder,
    incrementaldecoder=_Windows1252IncrementalDecoder,
    streamwriter=_Windows1252StreamWriter,
    streamreader=_Windows1252StreamReader,
)


def _find_codec(name: str) -> codecs.CodecInfo | None:
    """codecs.lookup's search for carehub's own codec (it asks with ``-`` as ``_``)."""
    return _WINDOWS_1252_INFO if name == LATIN1_AS_WINDOWS_1252.replace("-", "_") else None


codecs.register(_find_codec)


def _squash(name: str) -> str:
    """A charset name without case, spaces, underscores, hyphens or slashes: ``ISO_IR 100``
    (the DICOM spelling), ``UTF8`` and ``8859-1`` then find their table 0211 entries."""
    for separator in "_-/":
        name = name.replace(separator, " ")
    return "".join(name.upper().split())


_SQUASHED = {_squash(name): codec for name, codec in HL7_CHARSETS.items()}
#: Python's canonical codec name -> the spelling the table uses, so ``LATIN1`` and ``8859/1``
#: are stored as the same charset.
_PREFERRED = {codecs.lookup(codec).name: codec for codec in HL7_CHARSETS.values()}
_PREFERRED[codecs.lookup("iso-8859-1").name] = LATIN1_AS_WINDOWS_1252  # LATIN1, L1, ISO8859-1
#: Codecs Python knows that are not character sets a sender could mean.
_NOT_CHARSETS = frozenset(
    {"charmap", "idna", "punycode", "unicode-escape", "raw-unicode-escape", "undefined"}
)

#: (codec, byte order mark, "MSH" in that encoding, bytes per code unit). UTF-32 comes first:
#: its little-endian mark begins with the UTF-16 one.
_WIDE: tuple[tuple[str, bytes, bytes, int], ...] = tuple(
    (codec, bom, "MSH".encode(codec), unit)
    for codec, bom, unit in (
        ("utf-32-le", codecs.BOM_UTF32_LE, 4),
        ("utf-32-be", codecs.BOM_UTF32_BE, 4),
        ("utf-16-le", codecs.BOM_UTF16_LE, 2),
        ("utf-16-be", codecs.BOM_UTF16_BE, 2),
    )
)
_WIDE_BOMS = {codec: bom for codec, bom, _, _ in _WIDE}
#: How far into the bytes "MSH" is looked for in a wide encoding (leading blank lines only).
_WIDE_SCAN = 256
_LEADING_BLANK = "\ufeff \t\r\n\x0b"


@dataclass(slots=True, frozen=True)
class DecodedText:
    """Text of a message, the codec used, and why the bytes were not read as declared (if so)."""

    text: str
    charset: str
    warning: str | None = None
    #: Offset, in the bytes as received, of the first byte that is not valid in the character
    #: set the message declares; None when the text is an exact reading of the bytes.
    invalid_at: int | None = None

    @property
    def lossy(self) -> bool:
        """Bytes that are not valid in ``charset`` were replaced (U+FFFD): the text is not an
        exact reading of the bytes, so two different messages may read alike."""
        return self.invalid_at is not None


def wide_encoding(raw: bytes) -> tuple[str, bytes] | None:
    """(codec, byte order mark or b"") when the bytes are UTF-16 or UTF-32 text, else None.

    Recognised by a byte order mark, or without one by "MSH" in that encoding at the first
    character that is not blank. The codec names the byte order exactly (``utf-16-le``), so the
    answer can be written back the way the sender wrote.
    """
    if raw.startswith(b"MSH"):
        return None  # the common case, checked first: this runs for every message
    for codec, bom, _, _ in _WIDE:
        if raw.startswith(bom):
            return codec, bom
    if b"\x00" not in raw[:16]:
        return None  # 8-bit text: every UTF-16/32 form of an ASCII "MSH" holds NUL bytes
    head = raw[:_WIDE_SCAN]
    for codec, _, msh, unit in _WIDE:
        at = head.find(msh)
        aligned = at >= 0 and at % unit == 0
        if aligned and not head[:at].decode(codec, "replace").strip(_LEADING_BLANK):
            return codec, b""
    return None


@lru_cache(maxsize=64)
def _unicode_width(codec: str) -> str | None:
    """The family, ``utf-16`` or ``utf-32``, of a codec in either byte order; else None."""
    try:
        name = codecs.lookup(codec).name
    except LookupError:
        return None
    return name[:6] if name.startswith(("utf-16", "utf-32")) else None


@lru_cache(maxsize=64)
def same_charset(one: str, other: str) -> bool:
    """Whether two codec names mean one character set (``utf-16`` and ``utf-16-le`` do)."""
    width = _unicode_width(one)
    if width is not None:
        return width == _unicode_width(other)
    try:
        return codecs.lookup(one).name == codecs.lookup(other).name
    except LookupError:
        return False


def is_wide(codec: str) -> bool:
    """True for the UTF-16 and UTF-32 codecs, whose text holds no ASCII header."""
    return _unicode_width(codec) is not None


def _msh18(text: str) -> str | None:
    """MSH-18 (first repetition) of the MSH segment in ``text``, or None."""
    start = text.find("MSH")
    if start < 0 or len(text) < start + 8:
        return None
    line_end = len(text)
    for terminator in ("\r", "\n"):
        found = text.find(terminator, start)
        if 0 <= found < line_end:
            line_end = found
    fields = text[start:line_end].split(text[start + 3])
    if len(fields) <= 17:
        return None
    encoding_chars, value = fields[1], fields[17]
    if len(encoding_chars) > 1:
        value = value.split(encoding_chars[1])[0]  # first repetition
    return value.strip() or None


def declared_charset(raw: bytes) -> str | None:
    """MSH-18 (first repetition) read straight from the bytes, or None."""
    wide = wide_encoding(raw)
    if wide is not None:
        codec, bom = wide
        return _msh18(raw[len(bom) :].decode(codec, "replace"))
    # 8-bit text: the header is ASCII, so the MSH line alone is decoded (as Latin-1, which
    # takes any byte) before the rest is known; this runs for every message.
    start = raw.find(b"MSH")
    if start < 0:
        return None
    line_end = len(raw)
    for terminator in (b"\r", b"\n"):
        found = raw.find(terminator, start)
        if 0 <= found < line_end:
            line_end = found
    return _msh18(raw[start:line_end].decode("latin-1"))


def codec_for(charset_name: str | None, default: str) -> str | None:
    """Python codec for an MSH-18 value; None when the value is unknown."""
    if not charset_name:
        return default
    return HL7_CHARSETS.get(charset_name.upper()) or _codec_for_name(charset_name)


@lru_cache(maxsize=256)
def _codec_for_name(name: str) -> str | None:
    """A value that is not spelt as table 0211 writes it: the table entry it squashes to, else
    the Python codec of that name (``ISO-8859-1``, ``LATIN1``, ``CP1252``), else None."""
    codec = _SQUASHED.get(_squash(name))
    if codec:
        return codec
    normalised = "_".join(name.replace("_", " ").lower().split())
    if not normalised or len(normalised) > 64 or not normalised.isascii():
        return None
    try:
        info = codecs.lookup(normalised)
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_CHARSETS:
        # bytes-to-bytes codecs (base64, hex, zlib) and transforms (idna, unicode-escape)
        return None
    if not _ascii_compatible(info.name) and _unicode_width(info.name) is None:
        # EBCDIC (cp037), UTF-7, HZ: the header and the delimiters would not read as the
        # ASCII they are, and an ACK written in them could not be read by the sender.
        return None
    return _PREFERRED.get(info.name, info.name)


_ASCII_PROBE = "".join(chr(c) for c in range(0x20, 0x7F)) + "\r\n"


@lru_cache(maxsize=64)
def _ascii_compatible(codec: str) -> bool:
    """Whether the codec writes printable ASCII, CR and LF as ASCII does, byte for byte."""
    try:
        return _ASCII_PROBE.encode(codec) == _ASCII_PROBE.encode("ascii")
    except (UnicodeError, LookupError):
        return False


def encode_reply(text: str, charset: str, received: bytes = b"") -> bytes:
    """``text`` in the character set of the message it answers, never raising.

    A UTF-16 or UTF-32 message is answered in its own byte order, with a byte order mark only
    when the message had one, so a sender that reads no mark still reads the answer.
    """
    try:
        encoded = text.encode(charset, "replace")
    except LookupError:
        return text.encode("utf-8", "replace")
    bom = _WIDE_BOMS.get(charset)
    if bom and received.startswith(bom):
        return bom + encoded
    return encoded


def decode_message(raw: bytes, default: str = "utf-8") -> DecodedText:
    """Decode message bytes by MSH-18, never raising.

    Undeclared text, and text whose MSH-18 names no character set carehub knows, is read as
    ``default``, else as ISO-8859-1 when it is not valid there (what most such senders mean).
    Declared text that does not match its declaration is read with replacement characters and
    ``invalid_at`` set, so intake can refuse it. The stored bytes are always the bytes
    received; only the text view is affected.
    """
    skipped = len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0
    raw = raw[skipped:]
    wide = wide_encoding(raw)
    if wide is not None:
        return _decode_wide(raw, *wide)
    declared = declared_charset(raw)
    codec = codec_for(declared, default)
    note = None
    if codec is None:
        note = f"unknown MSH-18 character set {declared!r}"
        declared, codec = None, default
    elif is_wide(codec):
        # The header read as ASCII, so these bytes are not the UTF-16/32 that was expected.
        expected = f"MSH-18 declares {declared!r}" if declared else f"the default is {codec}"
        note = f"{expected} but the bytes are 8-bit text"
        declared, codec = None, "utf-8"
    try:
        decoded = DecodedText(raw.decode(codec), codec)
    except UnicodeDecodeError as err:
        at = skipped + err.start
        if declared is None:
            decoded = DecodedText(
                raw.decode("iso-8859-1"),
                "iso-8859-1",
                f"bytes are not valid {codec} (offset {at}); read as ISO-8859-1",
            )
        else:
            decoded = DecodedText(
                raw.decode(codec, "replace"),
                codec,
                f"MSH-18 declares {declared!r} but byte {at} (0x{raw[err.start]:02X}) is not "
                f"valid {codec}",
                at,
            )
    if note:
        detail = decoded.warning or f"read as {decoded.charset}"
        return DecodedText(decoded.text, decoded.charset, f"{note}; {detail}", decoded.invalid_at)
    return decoded


def _decode_wide(raw: bytes, codec: str, bom: bytes) -> DecodedText:
    """UTF-16/32 text: the bytes say what they are, so they win over MSH-18 (which is noted)."""
    body = raw[len(bom) :]
    warning = None
    invalid_at = None
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as err:
        text = body.decode(codec, "replace")
        invalid_at = err.start + len(bom)
        warning = f"byte {invalid_at} is not valid {codec}"
    declared = _msh18(text)
    if declared and _unicode_width(codec_for(declared, codec) or "") != _unicode_width(codec):
        note = f"the bytes are {codec} but MSH-18 declares {declared!r}; read as {codec}"
        warning = f"{warning}; {note}" if warning else note
    return DecodedText(text, codec, warning, invalid_at)
