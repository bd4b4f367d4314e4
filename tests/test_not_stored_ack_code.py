"""The code a message the store could not take is answered with, against a real `carehub
serve`: AE by default, AR on a listener whose senders resend on AR (`not_stored_ack`), over
MLLP and HTTP; in enhanced mode the commit codes follow (CE, CR). The store refuses for real:
a trigger in its SQLite database fails the commit, as a full disk does."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import httpx

from carehub.hl7.ack import read_ack
from carehub.hl7.framing import encode_frame
from carehub.testing import make_adt, read_frames
from tests.helpers_http import CarehubProcess
from tests.test_batch_stops_at_not_stored import HTTP_LINE, refuse

MLLP_LINE = re.compile(r"MLLP listener '(\S+)' on [\d.]+:(\d+)")


def serve_args(tmp_path: Path) -> list[str]:
    config = tmp_path / "carehub.yaml"
    config.write_text(
        "listeners:\n"
        "  mllp:\n"
        "    - {name: plain, host: 127.0.0.1, port: 0}\n"
        "    - {name: resends-on-ar, host: 127.0.0.1, port: 0, not_stored_ack: AR,"
        " enhanced_acks: true}\n"
        "  http: {host: 127.0.0.1, port: 0, not_stored_ack: AR}\n"
        "routes: []\nworker: {enabled: false}\n"
    )
    return ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]


def mllp_answer(port: int, message: str) -> tuple[str | None, str | None, str | None]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(encode_frame(message.encode()))
        (answer,) = read_frames(sock, 1, 30)
    return read_ack(answer.decode())


def test_a_message_not_stored_is_answered_with_the_listeners_code(tmp_path: Path) -> None:
    with CarehubProcess(serve_args(tmp_path), tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        ports = {name: int(port) for name, port in MLLP_LINE.findall(serve.stdout)}
        http = HTTP_LINE.search(serve.stdout)
        assert http, serve.stdout
        refuse(tmp_path / "data" / "carehub.db", "REFUSED")

        code, echoed, text = mllp_answer(ports["plain"], make_adt("REFUSED"))
        assert (code, echoed) == ("AE", "REFUSED")
        assert "not stored" in (text or "")
        assert mllp_answer(ports["resends-on-ar"], make_adt("REFUSED"))[:2] == ("AR", "REFUSED")
        enhanced = make_adt("REFUSED").replace("|P|2.5", "|P|2.5|||AL|NE", 1)
        assert mllp_answer(ports["resends-on-ar"], enhanced)[:2] == ("CR", "REFUSED")

        answer = httpx.post(f"http://127.0.0.1:{http.group(2)}/hl7", content=make_adt("REFUSED"))
        assert answer.status_code == 503
        assert read_ack(answer.text)[:2] == ("AR", "REFUSED")

        refuse(tmp_path / "data" / "carehub.db", None)  # room again: the resend is taken
        assert mllp_answer(ports["resends-on-ar"], make_adt("REFUSED"))[:2] == ("AA", "REFUSED")
        assert serve.terminate() == 0
