"""Decoding message bytes by MSH-18, never raising."""

import codecs

import pytest

from carehub.hl7.charsets import (
    codec_for,
    declared_charset,
    decode_message,
    encode_reply,
    wide_encoding,
)
from carehub.hl7.view import MessageView

LATIN1 = "MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5|||||USA|8859/1\rPID|1||X||Peña^José\r"
UNDECLARED = "MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\rPID|1||X||Zoë^Ñuñez\r"


def test_declared_latin1_is_read_as_latin1() -> None:
    decoded = decode_message(LATIN1.encode("latin-1"))
    assert decoded.charset == "whatwg-windows-1252" and "Peña^José" in decoded.text
    assert decoded.warning is None


def test_undeclared_utf8_is_the_default() -> None:
    decoded = decode_message(UNDECLARED.encode("utf-8"))
    assert decoded.charset == "utf-8" and "Zoë^Ñuñez" in decoded.text


def test_undeclared_bytes_that_are_not_utf8_fall_back_to_latin1_with_a_warning() -> None:
    decoded = decode_message(UNDECLARED.encode("latin-1"))
    assert decoded.charset == "iso-8859-1" and "Zoë^Ñuñez" in decoded.text
    assert decoded.warning and "ISO-8859-1" in decoded.warning


def test_declared_utf8_with_bad_bytes_is_replaced_not_raised() -> None:
    raw = UNDECLARED.replace("2.5", "2.5|||||USA|UNICODE UTF-8").encode("latin-1")
    decoded = decode_message(raw)
    assert decoded.charset == "utf-8" and "\ufffd" in decoded.text
    assert decoded.warning and "MSH-18" in decoded.warning


def test_unknown_charset_name_is_reported() -> None:
    raw = UNDECLARED.replace("2.5", "2.5|||||USA|KLINGON").encode("utf-8")
    decoded = decode_message(raw)
    assert decoded.warning and "KLINGON" in decoded.warning


def test_msh_18_first_repetition_and_bom() -> None:
    raw = b"\xef\xbb\xbfMSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5|||||USA|8859/1~UNICODE UTF-8\n"
    assert declared_charset(raw[3:]) == "8859/1"
    assert decode_message(raw).charset == "whatwg-windows-1252"


# -- MSH-18 spellings that are not in table 0211 ---------------------------------------------

NAME = "Zoë^Núñez"


def adt(charset: str, name: str = NAME) -> str:
    return f"MSH|^~\\&|A|B|C|D|1||ADT^A01|C7|P|2.5|||||USA|{charset}\rPID|1||X||{name}\r"


@pytest.mark.parametrize(
    "charset", ["ISO-8859-1", "ISO8859-1", "iso-8859-1", "LATIN1", "Latin-1", "ISO_IR 100"]
)
def test_latin1_under_common_spellings_is_read_as_latin1(charset: str) -> None:
    decoded = decode_message(adt(charset).encode("latin-1"))
    assert (decoded.charset, decoded.warning) == ("whatwg-windows-1252", None)
    assert MessageView(decoded.text).get("PID-5") == NAME


@pytest.mark.parametrize("charset", ["UTF8", "utf-8", "Unicode UTF-8", "utf_8"])
def test_utf8_under_common_spellings_is_read_as_utf8(charset: str) -> None:
    decoded = decode_message(adt(charset).encode("utf-8"))
    assert (decoded.charset, decoded.warning) == ("utf-8", None)
    assert MessageView(decoded.text).get("PID-5") == NAME


@pytest.mark.parametrize("charset", ["WINDOWS-1252", "windows-1252", "CP1252", "Windows 1252"])
def test_windows_1252_spellings(charset: str) -> None:
    name = "O\u2019Brien^Zoë €"  # 0x92 and 0x80 in cp1252; Latin-1 has neither
    decoded = decode_message(adt(charset, name).encode("cp1252"))
    assert (decoded.charset, decoded.warning) == ("cp1252", None)
    assert MessageView(decoded.text).get("PID-5") == name


def test_us_ascii_is_ascii() -> None:
    decoded = decode_message(adt("US-ASCII", "DOE^JO").encode("ascii"))
    assert (decoded.charset, decoded.warning) == ("ascii", None)


def test_codec_names_are_what_outbound_encoding_uses_too() -> None:
    assert codec_for("LATIN1", "utf-8") == codec_for("8859/1", "utf-8") == "whatwg-windows-1252"
    assert codec_for("ISO-8859-15", "utf-8") == codec_for("8859/15", "utf-8") == "iso-8859-15"
    assert codec_for("KOI8-R", "utf-8") == "koi8-r"  # any charset Python knows
    assert codec_for("", "utf-8") == "utf-8"


@pytest.mark.parametrize(
    "charset",
    # The last four are Python codecs that do not write ASCII as ASCII (EBCDIC, UTF-7, HZ):
    # the header would not read as written, and an ACK in them could not be read.
    ["KLINGON", "base64", "rot13", "idna", "unicode_escape", "cp037", "cp1026", "UTF-7", "hz"],
)
def test_unknown_names_and_codecs_that_are_not_charsets_keep_todays_warning(
    charset: str,
) -> None:
    decoded = decode_message(adt(charset).encode("utf-8"))
    assert decoded.charset == "utf-8"
    assert decoded.warning == f"unknown MSH-18 character set {charset!r}; read as utf-8"
    assert codec_for(charset, "utf-8") is None


# -- UTF-16 and UTF-32 -----------------------------------------------------------------------

WIDE = [
    ("utf-16-le", codecs.BOM_UTF16_LE),
    ("utf-16-be", codecs.BOM_UTF16_BE),
    ("utf-32-le", codecs.BOM_UTF32_LE),
    ("utf-32-be", codecs.BOM_UTF32_BE),
]


@pytest.mark.parametrize(("codec", "bom"), WIDE)
@pytest.mark.parametrize("with_bom", [True, False])
def test_utf16_and_utf32_are_recognised_with_or_without_a_byte_order_mark(
    codec: str, bom: bytes, with_bom: bool
) -> None:
    family = "UNICODE UTF-16" if codec.startswith("utf-16") else "UNICODE UTF-32"
    raw = (bom if with_bom else b"") + adt(family).encode(codec)
    assert wide_encoding(raw) == (codec, bom if with_bom else b"")
    assert declared_charset(raw) == family
    decoded = decode_message(raw)
    assert (decoded.charset, decoded.warning) == (codec, None)
    assert not decoded.text.startswith("\ufeff")
    view = MessageView(decoded.text)
    assert (view.get("MSH-9.2"), view.get("MSH-10"), view.get("PID-5")) == ("A01", "C7", NAME)


def test_utf16_after_leading_blank_lines_without_a_mark() -> None:
    raw = ("\r\n" + adt("")).encode("utf-16-be")
    decoded = decode_message(raw)
    assert decoded.charset == "utf-16-be"
    assert MessageView(decoded.text).get("MSH-10") == "C7"


def test_8bit_text_is_never_taken_for_utf16() -> None:
    assert wide_encoding(adt("8859/1").encode("latin-1")) is None
    assert wide_encoding(b"\r\n" + adt("").encode()) is None
    assert wide_encoding(b"") is None


def test_utf16_bytes_win_over_an_msh18_that_says_otherwise() -> None:
    decoded = decode_message(codecs.BOM_UTF16_LE + adt("8859/1").encode("utf-16-le"))
    assert decoded.charset == "utf-16-le"
    assert MessageView(decoded.text).get("PID-5") == NAME
    assert decoded.warning and "utf-16-le" in decoded.warning and "8859/1" in decoded.warning


def test_8bit_bytes_that_claim_utf16_are_read_as_8bit_with_a_warning() -> None:
    decoded = decode_message(adt("UNICODE UTF-16").encode("utf-8"))
    assert decoded.charset == "utf-8"
    assert MessageView(decoded.text).get("PID-5") == NAME
    assert decoded.warning and "'UNICODE UTF-16'" in decoded.warning


@pytest.mark.parametrize(("codec", "bom"), WIDE)
def test_reply_is_written_like_the_message_it_answers(codec: str, bom: bytes) -> None:
    ack = "MSH|^~\\&|B|A|||2026||ACK|X1|P|2.5\rMSA|AA|C7\r"
    assert encode_reply(ack, codec, bom + b"M") == bom + ack.encode(codec)
    assert encode_reply(ack, codec, b"M") == ack.encode(codec)
    assert encode_reply(ack, "iso-8859-1", b"MSH") == ack.encode("latin-1")
    assert encode_reply(ack, "no-such-codec", b"MSH") == ack.encode("utf-8")


@pytest.mark.parametrize("charset", ["utf-8\x00", "x" * 200, "...", "ÿ"])
def test_odd_msh18_values_are_unknown_and_never_raise(charset: str) -> None:
    assert codec_for(charset, "utf-8") is None
    decoded = decode_message(adt(charset).encode("utf-8"))
    assert decoded.charset == "utf-8" and (decoded.warning or "").startswith("unknown MSH-18")
