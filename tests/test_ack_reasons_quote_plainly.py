"""An ACK's reason quotes what the sender wrote in plain quotes, escaped only by the ACK's own
HL7 escaping, over real sockets: decoded, the quote is exactly the sender's characters (one
backslash stays one), whatever quote marks they hold."""

from __future__ import annotations

from pathlib import Path

from carehub.hl7.view import MessageView
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange

TIMEOUT = 10.0


def answers(tmp_path: Path, *payloads: bytes) -> list[MessageView]:
    with HubThread(local_config(), tmp_path / "data") as hub:
        found = mllp_exchange(hub.mllp_address, payloads, TIMEOUT)
    return [MessageView(answer.decode()) for answer in found]


def test_a_line_that_is_not_a_segment_is_quoted_as_written(tmp_path: Path) -> None:
    delimiters = make_adt("Q-1", version="2.5.1", extra_segments=["note: a|b^c&d~e\\f"])
    quotes = make_adt("Q-2", version="2.5.1", extra_segments=['it\'s "odd"'])
    first, second = answers(tmp_path, delimiters.encode(), quotes.encode())
    assert first.get("MSA-1") == "AE"
    assert "then '|'): it starts 'note: a|b^c&d~e\\f';" in first.get("ERR-8")
    assert "it starts 'it's \"odd\"';" in second.get("ERR-8")


def test_unusable_encoding_characters_are_quoted_as_written(tmp_path: Path) -> None:
    repeated = b"MSH|^^\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20260101||ADT^A01|Q-3|P|2.5\rPID|1\r"
    (answer,) = answers(tmp_path, repeated)
    assert answer.get("MSA-1") == "AR"
    assert answer.get("ERR-8").startswith("MSH-2 (the encoding characters) is '^^\\&': ")
