"""Enhanced mode's application acknowledgment (MSH-16), over real sockets: on a listener with
enhanced_acks, a message whose MSH-16 asks for an application ACK of its outcome (AL always,
ER on AE/AR, SU on AA, NE or empty never) gets one, an ordinary ACK with MSA-1 AA/AE/AR and an
MSH-10 of its own, on the same connection right after the accept ACK, or alone when MSH-15
asks for no accept ACK. `carehub send`, run as a process, reads a CA followed by its AA, and a
lone AA, as the answer to the message that asked for them."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub.hl7.framing import encode_frame
from carehub.hl7.view import MessageView
from carehub.testing import HubThread, local_config, make_adt, read_frames
from tests.conftest import CORPUS, requires_corpus
from tests.helpers_cli import carehub

TIMEOUT = 10.0


def asking(control_id: str, accept: str, application: str, *, refused: bool = False) -> bytes:
    """An ADT whose MSH-15 and MSH-16 are ``accept`` and ``application``; ``refused``: with a
    line that is not a segment after PID, so intake refuses it (AE)."""
    text = make_adt(control_id)
    msh, rest = text.split("\r", 1)
    if refused:
        rest = rest.replace("\rPV1|", "\rnote typed here\rPV1|", 1)
    return f"{msh}|||{accept}|{application}\r{rest}".encode()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubThread]:
    config = local_config()
    config.listeners.mllp[0].enhanced_acks = True
    with HubThread(config, tmp_path / "data") as running:
        yield running


def exchange(hub: HubThread, payload: bytes, count: int) -> list[MessageView]:
    """Send one frame; read ``count`` answer frames, and make sure no more come."""
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        sock.sendall(encode_frame(payload))
        frames = read_frames(sock, count, TIMEOUT) if count else []
        sock.settimeout(0.5)
        try:
            extra = sock.recv(1024)
        except TimeoutError:
            extra = b""
        assert extra == b"", f"more than {count} answer(s): {extra!r}"
    return [MessageView(frame.decode()) for frame in frames]


def codes(answers: list[MessageView]) -> list[tuple[str, str]]:
    return [(a.get("MSA-1"), a.get("MSA-2")) for a in answers]


@pytest.mark.parametrize(
    ("accept", "application", "refused", "expected"),
    [
        ("NE", "AL", False, ["AA"]),
        ("NE", "AL", True, ["AE"]),
        ("ER", "AL", False, ["AA"]),
        ("ER", "AL", True, ["CE"]),  # refused at commit: no application to answer
        ("AL", "AL", False, ["CA", "AA"]),
        ("AL", "AL", True, ["CE"]),
        ("AL", "ER", False, ["CA"]),
        ("AL", "ER", True, ["CE"]),
        ("AL", "SU", False, ["CA", "AA"]),
        ("AL", "SU", True, ["CE"]),
        ("NE", "SU", True, []),
        ("AL", "NE", False, ["CA"]),
        ("SU", "", False, ["CA"]),
        ("NE", "NE", False, []),
    ],
)
def test_msh15_by_msh16(
    hub: HubThread, accept: str, application: str, refused: bool, expected: list[str]
) -> None:
    control_id = f"G-{accept}-{application}-{'E' if refused else 'A'}"
    answers = exchange(hub, asking(control_id, accept, application, refused=refused), len(expected))
    assert codes(answers) == [(code, control_id) for code in expected]


def test_the_application_ack_is_an_ack_of_its_own(hub: HubThread) -> None:
    accept, application = exchange(hub, asking("OWN-1", "AL", "AL"), 2)
    assert accept.get("MSH-10") != application.get("MSH-10")
    assert application.raw("MSH-9") == "ACK^A01^ACK"
    assert [application.get(f"MSH-{n}") for n in (3, 5)] == ["CAREHUB", "ADT_SENDER"]
    assert (application.get("MSH-15"), application.get("MSH-16")) == ("", "")  # not answered


def test_an_application_error_is_told_when_the_accept_ack_was_not_wanted(
    hub: HubThread,
) -> None:
    """MSH-15 NE, MSH-16 AL: no accept ACK, so the outcome comes as the application ACK."""
    (application,) = exchange(hub, asking("OWN-2", "NE", "AL", refused=True), 1)
    assert application.get("MSA-1") == "AE"
    assert "line 4 is not an HL7 segment" in application.get("ERR-8")


def test_a_message_rejected_at_commit_gets_the_commit_reject_alone(hub: HubThread) -> None:
    """HL7: a message refused at commit (CR, CE) reaches no application, so no application
    ACK follows; the next message on the connection gets its own answers."""
    training = asking("REJ-1", "AL", "AL").replace(b"|P|2.5", b"|T|2.5", 1)
    frames = [training, asking("REJ-2", "AL", "AL")]
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        sock.sendall(b"".join(encode_frame(f) for f in frames))
        answers = [MessageView(f.decode()) for f in read_frames(sock, 3, TIMEOUT)]
    assert codes(answers) == [("CR", "REJ-1"), ("CA", "REJ-2"), ("AA", "REJ-2")]


def test_answers_keep_their_frames_order_on_one_connection(hub: HubThread) -> None:
    frames = [
        asking("ORD-1", "NE", "NE"),  # nothing
        asking("ORD-2", "AL", "AL"),  # CA, AA
        make_adt("ORD-3").encode(),  # original mode: AA
        asking("ORD-4", "NE", "AL"),  # AA
    ]
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        sock.sendall(b"".join(encode_frame(f) for f in frames))
        answers = [MessageView(f.decode()) for f in read_frames(sock, 4, TIMEOUT)]
    assert codes(answers) == [("CA", "ORD-2"), ("AA", "ORD-2"), ("AA", "ORD-3"), ("AA", "ORD-4")]
    stored = sorted((m.control_id, m.ack_code) for m in hub.store.find(limit=None))
    assert stored == [("ORD-1", "AA"), ("ORD-2", "AA"), ("ORD-3", "AA"), ("ORD-4", "AA")]


@requires_corpus
def test_a_corpus_sender_that_waits_for_application_acks_gets_them(hub: HubThread) -> None:
    """OUL-R22-02 says MSH-15 NE, MSH-16 AL: it reads no accept ACK and waits for an AA."""
    sample = (CORPUS / "OUL-R22-02.hl7").read_bytes()
    assert codes(exchange(hub, sample, 1)) == [("AA", "1932")]


def send_command(hub: HubThread, *files: Path) -> subprocess.CompletedProcess[str]:
    host, port = hub.mllp_address
    return carehub("send", "--host", host, "--port", str(port), "--timeout", "5", *map(str, files))


def test_carehub_send_reads_a_commit_accept_then_its_application_ack(
    hub: HubThread, tmp_path: Path
) -> None:
    """Two messages asking AL/AL, then one NE/AL, on one connection: each line names its own
    message, so no answer is read as the next message's."""
    feed = tmp_path / "feed.hl7"
    feed.write_bytes(
        asking("SEND-1", "AL", "AL") + asking("SEND-2", "AL", "AL") + asking("SEND-3", "NE", "AL")
    )
    done = send_command(hub, feed)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"{feed} #1: AA (MSH-10 SEND-1)",
        f"{feed} #2: AA (MSH-10 SEND-2)",
        f"{feed} #3: AA (MSH-10 SEND-3)",
    ]


def test_carehub_send_reports_a_commit_error_and_goes_on(hub: HubThread, tmp_path: Path) -> None:
    feed = tmp_path / "feed.hl7"
    feed.write_bytes(asking("SEND-E", "AL", "AL", refused=True) + asking("SEND-F", "AL", "AL"))
    done = send_command(hub, feed)
    assert done.returncode == 1, done.stdout + done.stderr
    first, second = done.stdout.splitlines()
    assert first.startswith(f"{feed} #1: CE (MSH-10 SEND-E): line 4 is not an HL7 segment")
    assert second == f"{feed} #2: AA (MSH-10 SEND-F)"


@requires_corpus
def test_carehub_send_of_a_corpus_file_asking_ne_al(hub: HubThread) -> None:
    done = send_command(hub, CORPUS / "OUL-R22-02.hl7")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("OUL-R22-02.hl7: AA (MSH-10 1932)")


def test_carehub_send_to_an_original_mode_listener_takes_its_one_answer(
    tmp_path: Path,
) -> None:
    """Without enhanced_acks the listener answers AA once: nothing more is waited for."""
    feed = tmp_path / "feed.hl7"
    feed.write_bytes(asking("ORIG-1", "AL", "AL") + asking("ORIG-2", "AL", "AL"))
    with HubThread(local_config(), tmp_path / "data") as plain:
        done = send_command(plain, feed)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"{feed} #1: AA (MSH-10 ORIG-1)",
        f"{feed} #2: AA (MSH-10 ORIG-2)",
    ]
