"""Decoding message bytes by MSH-18, never raising."""

from carehub.hl7.charsets import declared_charset, decode_message

LATIN1 = "MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5|||||USA|8859/1\rPID|1||X||Peña^José\r"
UNDECLARED = "MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\rPID|1||X||Zoë^Ñuñez\r"


def test_declared_latin1_is_read_as_latin1() -> None:
    decoded = decode_message(LATIN1.encode("latin-1"))
    assert decoded.charset == "iso-8859-1" and "Peña^José" in decoded.text
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
    assert decode_message(raw).charset == "iso-8859-1"
