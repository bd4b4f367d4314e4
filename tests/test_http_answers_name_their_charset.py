"""An HTTP answer names the character set its ACK is written in
(``x-application/hl7-v2+er7; charset=NAME``, HL7 over HTTP), over a real hub's HTTP listener:
the message's own, so a client that decodes by the header reads the sender's names back as
they were sent, batch answers included. Without it a client decodes with a default of its own
(httpx: UTF-8), and a Latin-1 É comes back as a replacement character."""

from __future__ import annotations

import codecs
from pathlib import Path

import httpx
import pytest

from carehub.testing import HubThread, local_config, make_adt

TIMEOUT = 30.0
HL7_TYPE = "x-application/hl7-v2+er7"


def post(hub: HubThread, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{hub.http_url}/hl7", content=body, headers={"Content-Type": HL7_TYPE}, timeout=TIMEOUT
    )


def charset(response: httpx.Response) -> str:
    media_type, _, parameter = response.headers["content-type"].partition(";")
    assert media_type == HL7_TYPE
    name, _, value = parameter.strip().partition("=")
    assert name == "charset", response.headers["content-type"]
    return value


def sent_by(application: str, control_id: str, charset_field: str = "") -> str:
    return make_adt(control_id, sending_application=application, charset=charset_field)


@pytest.mark.parametrize(
    ("charset_field", "encoding", "named"),
    [
        ("", "utf-8", "utf-8"),
        ("UNICODE UTF-8", "utf-8", "utf-8"),
        ("8859/1", "cp1252", "windows-1252"),  # read as WHATWG does: 0x80-0x9F as Windows-1252
        ("8859/2", "iso-8859-2", "ISO-8859-2"),
        ("WINDOWS-1252", "cp1252", "windows-1252"),
    ],
)
def test_the_answer_names_the_messages_character_set(
    hub: HubThread, charset_field: str, encoding: str, named: str
) -> None:
    response = post(hub, sent_by("ÉPIC", "CS-1", charset_field).encode(encoding))
    assert response.status_code == 200
    assert charset(response) == named
    assert codecs.lookup(named).name == codecs.lookup(encoding).name
    assert "|ÉPIC|" in response.text.split("\r")[0]  # MSH-5 echoes MSH-3, read by the header
    assert "MSA|AA|CS-1" in response.text


def test_undeclared_latin1_is_answered_and_named_iso_8859_1(hub: HubThread) -> None:
    response = post(hub, sent_by("ÉPIC", "CS-2").encode("latin-1"))  # not valid UTF-8
    assert (response.status_code, charset(response)) == (200, "ISO-8859-1")
    assert "|ÉPIC|" in response.text and "MSA|AA|CS-2" in response.text


@pytest.mark.parametrize(
    ("bom", "codec", "named"),
    [
        (b"", "utf-16-le", "UTF-16LE"),
        (b"", "utf-16-be", "UTF-16BE"),
        (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),  # the mark gives the order (RFC 2781)
    ],
)
def test_utf16_answers_name_the_byte_order_unless_a_mark_gives_it(
    hub: HubThread, bom: bytes, codec: str, named: str
) -> None:
    response = post(hub, bom + sent_by("ÉPIC", "CS-3").encode(codec))
    assert (response.status_code, charset(response)) == (200, named)
    assert response.content.startswith(bom + "MSH|".encode(codec))
    assert "|ÉPIC|" in response.text and "MSA|AA|CS-3" in response.text


def test_a_batch_answer_names_the_character_set_of_its_acks(hub: HubThread) -> None:
    body = (
        "FHS|^~\\&|ÉPIC|RIV|CAREHUB|HUB|20261201||||FILE1\r"
        "BHS|^~\\&|ÉPIC|RIV|CAREHUB|HUB|20261201||||BATCH1\r"
        f"{sent_by('ÉPIC', 'CSB-1', '8859/1')}{sent_by('ÉPIC', '', '8859/1')}BTS|2\rFTS|1\r"
    )
    response = post(hub, body.encode("cp1252"))
    assert (response.status_code, charset(response)) == (200, "windows-1252")
    lines = response.text.split("\r")
    assert lines[0].startswith("FHS|^~\\&|CAREHUB|HUB|ÉPIC|RIV|")
    assert "MSA|AA|CSB-1" in lines and sum(line.startswith("MSA|AE|") for line in lines) == 1


def test_refusals_name_their_character_set_too(tmp_path: Path) -> None:
    config = local_config()
    config.listeners.http.max_message_bytes = 1024
    with HubThread(config, tmp_path / "data") as hub:
        too_big = post(hub, sent_by("ÉPIC", "BIG-1", "8859/1").encode("cp1252") + b"x" * 2000)
        not_hl7 = post(hub, b"hello world")
    assert (too_big.status_code, charset(too_big)) == (413, "windows-1252")
    assert "|ÉPIC|" in too_big.text
    assert (not_hl7.status_code, charset(not_hl7)) == (200, "utf-8")
