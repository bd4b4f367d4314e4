"""Enhanced-mode acknowledgment on an MLLP listener that honours it (enhanced_acks: true), over
real sockets: a message with MSH-15 or MSH-16 valued gets an accept ACK (CA/CE/CR), sent only
as MSH-15 asks, and the application ACK its MSH-16 asks for after it (see
test_application_acks); a sender that said NE to both, and so reads no ACKs, is never sent
one. Every message is stored either way, and answers that are sent keep their frames' order.
Without the setting every frame gets its original-mode answer."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub.hl7.ack import read_ack
from carehub.hl7.framing import encode_frame
from carehub.testing import HubThread, local_config, make_adt, read_frames

TIMEOUT = 10.0


def asking(control_id: str, accept: str, application: str = "", **kwargs: str) -> bytes:
    """An ADT whose MSH-15 and MSH-16 are ``accept`` and ``application``."""
    text = make_adt(control_id, **kwargs)
    msh, rest = text.split("\r", 1)
    return f"{msh}|||{accept}|{application}\r{rest}".encode()


def without_control_id(control_id: str, accept: str) -> bytes:
    """An ADT asking as ``accept`` whose MSH-10 is empty: refused (CE)."""
    return asking(control_id, accept).replace(f"|{control_id}|".encode(), b"||", 1)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubThread]:
    config = local_config()
    config.listeners.mllp[0].enhanced_acks = True
    with HubThread(config, tmp_path / "data") as running:
        yield running


def send(sock: socket.socket, *payloads: bytes) -> None:
    sock.sendall(b"".join(encode_frame(p) for p in payloads))


def answers(sock: socket.socket, count: int) -> list[tuple[str, str, str]]:
    return [read_ack(frame.decode()) for frame in read_frames(sock, count, TIMEOUT)]


def nothing_more(sock: socket.socket) -> bool:
    sock.settimeout(0.5)
    try:
        return sock.recv(1024) == b""  # closed, with nothing sent first
    except TimeoutError:
        return True


def stored_control_ids(hub: HubThread) -> list[str | None]:
    return [m.control_id for m in reversed(hub.store.find(limit=None))]


def test_msh15_al_gets_a_commit_accept(hub: HubThread) -> None:
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        send(sock, asking("EA-1", "AL", "NE"))
        assert answers(sock, 1) == [("CA", "EA-1", "")]
    assert stored_control_ids(hub) == ["EA-1"]


def test_msh15_ne_is_stored_and_never_answered_and_later_answers_keep_their_order(
    hub: HubThread,
) -> None:
    """Three NE messages, then one in original mode on the same connection: the first bytes
    back are the last one's AA, and all four are stored."""
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        send(sock, *(asking(f"NE-{i}", "NE", "NE") for i in range(3)), make_adt("OM-1").encode())
        assert answers(sock, 1) == [("AA", "OM-1", "")]
        assert nothing_more(sock)
    assert stored_control_ids(hub) == ["NE-0", "NE-1", "NE-2", "OM-1"]


def test_msh15_er_answers_only_an_error(hub: HubThread) -> None:
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        send(sock, asking("ER-1", "ER"), without_control_id("ER-2", "ER"))
        [(code, echoed, text)] = answers(sock, 1)
        assert (code, echoed) == ("CE", "")
        assert "MSH-10" in text
        assert nothing_more(sock)
    assert sorted((m.control_id or "", m.status) for m in hub.store.find(limit=None)) == [
        ("", "refused"),
        ("ER-1", "received"),
    ]


def test_msh15_su_answers_only_a_success(hub: HubThread) -> None:
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        send(sock, without_control_id("SU-1", "SU"), asking("SU-2", "SU"))
        assert answers(sock, 1) == [("CA", "SU-2", "")]
        assert nothing_more(sock)


def test_msh16_alone_asks_for_enhanced_mode_and_is_answered(hub: HubThread) -> None:
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        send(sock, asking("M16-1", "", "AL"))
        assert answers(sock, 2) == [("CA", "M16-1", ""), ("AA", "M16-1", "")]


def test_a_resend_in_enhanced_mode_gets_its_commit_accept_again(hub: HubThread) -> None:
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        send(sock, asking("RS-1", "AL"), asking("RS-1", "AL"))
        assert answers(sock, 2) == [("CA", "RS-1", ""), ("CA", "RS-1", "")]
    assert stored_control_ids(hub) == ["RS-1"]


def test_a_frame_that_is_not_hl7_gets_ar_on_an_enhanced_listener(hub: HubThread) -> None:
    """Without a readable MSH nothing asks for enhanced mode: original mode's AR."""
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        send(sock, b"hello")
        [(code, _, text)] = answers(sock, 1)
        assert code == "AR" and "no MSH segment" in text


def test_without_the_setting_every_frame_gets_its_original_mode_answer(
    tmp_path: Path,
) -> None:
    with (
        HubThread(local_config(), tmp_path / "data") as plain,
        socket.create_connection(plain.mllp_address, timeout=TIMEOUT) as sock,
    ):
        send(sock, asking("PL-1", "NE", "NE"), asking("PL-2", "AL"))
        assert answers(sock, 2) == [("AA", "PL-1", ""), ("AA", "PL-2", "")]
