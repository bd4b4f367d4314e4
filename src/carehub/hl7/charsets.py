"""MSH-18 character set names (HL7 table 0211) mapped to Python codecs.

HL7 text arrives as bytes; the header is ASCII, so MSH-18 can be read before decoding the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

HL7_CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "iso-8859-1",
    "ISO IR100": "iso-8859-1",
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


@dataclass(slots=True, frozen=True)
class DecodedText:
    """Text of a message, the codec used, and why the bytes were not read as declared (if so)."""

    text: str
    charset: str
    warning: str | None = None


def declared_charset(raw: bytes) -> str | None:
    """MSH-18 (first repetition) read straight from the bytes, or None."""
    start = raw.find(b"MSH")
    if start < 0 or len(raw) < start + 8:
        return None
    line_end = len(raw)
    for terminator in (b"\r", b"\n"):
        found = raw.find(terminator, start)
        if 0 <= found < line_end:
            line_end = found
    separator = raw[start + 3 : start + 4]
    fields = raw[start:line_end].split(separator)
    if len(fields) <= 17:
        return None
    encoding_chars = fields[1]
    value = fields[17]
    if len(encoding_chars) > 1:
        value = value.split(encoding_chars[1:2])[0]  # first repetition
    name = value.decode("ascii", "replace").strip()
    return name or None


def codec_for(charset_name: str | None, default: str) -> str | None:
    """Python codec for an MSH-18 value; None when the value is unknown."""
    if not charset_name:
        return default
    return HL7_CHARSETS.get(charset_name.upper())


def decode_message(raw: bytes, default: str = "utf-8") -> DecodedText:
    """Decode message bytes by MSH-18, never raising.

    Undeclared text that is not valid UTF-8 is read as ISO-8859-1 (what most such senders mean);
    declared text that does not match its declaration is read with replacement characters. The
    stored bytes are always the bytes received; only the text view is affected.
    """
    if raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM) :]
    declared = declared_charset(raw)
    codec = codec_for(declared, default)
    if codec is None:
        text = raw.decode(default, "replace")
        return DecodedText(
            text, default, f"unknown MSH-18 character set {declared!r}; read as {default}"
        )
    try:
        return DecodedText(raw.decode(codec), codec)
    except UnicodeDecodeError as err:
        if declared is None:
            return DecodedText(
                raw.decode("iso-8859-1"),
                "iso-8859-1",
                f"bytes are not valid {codec} (offset {err.start}); read as ISO-8859-1",
            )
        return DecodedText(
            raw.decode(codec, "replace"),
            codec,
            f"bytes are not valid {codec} as MSH-18 declares (offset {err.start}); "
            "undecodable bytes replaced in the text view",
        )
