"""Frames a careless or unlucky sender produces, over real sockets: the answer is about the
whole message, one answer per frame, and every frame is answered, whatever the bytes.

- An end block (0x1C) inside the message is a byte of it, not its end: the message is stored
  whole and refused (AE), never answered AA for its first part with the rest dropped.
- A start block (0x0B) inside the message not followed by MSH is a byte of it: one frame, one
  answer, and the answers that follow stay paired with their frames.
- A sender that half-closes after sending (shutdown(SHUT_WR)) still reads every ACK.
- A sender that ends a frame with 0x1C and no CR, and waits, is answered.
- A header whose delimiters cannot be read (MSH-2 missing) is rejected, not answered AA with
  every field shifted; an MSH cut short is named as such."""

from __future__ import annotations

import socket
import time

from carehub.hl7.ack import read_ack
from carehub.hl7.framing import encode_frame
from carehub.testing import HubThread, make_adt, read_frames

TIMEOUT = 10.0


def answers(sock: socket.socket, count: int) -> list[tuple[str, str, str]]:
    return [read_ack(frame.decode()) for frame in read_frames(sock, count, TIMEOUT)]


def test_an_end_block_inside_a_message_is_refused_with_the_message_stored_whole(
    hub: HubThread,
) -> None:
    payload = make_adt("FS-1").replace("|F\r", "|F\x1cTAIL\r").encode()
    assert b"\x1cTAIL" in payload
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        sock.sendall(encode_frame(payload) + encode_frame(make_adt("FS-2").encode()))
        (code, echoed, text), after = answers(sock, 2)
    assert (code, echoed) == ("AE", "FS-1")
    at = payload.index(0x1C)
    assert f"byte {at} " in text and "end block (0x1C)" in text
    assert after[:2] == ("AA", "FS-2")
    stored = {m.control_id: m for m in hub.store.find(limit=None)}
    assert stored["FS-1"].raw == payload and stored["FS-1"].status == "refused"


def test_a_start_block_inside_a_message_gets_one_answer_and_the_next_frame_its_own(
    hub: HubThread,
) -> None:
    payload = make_adt("VT-1").replace("|F\r", "|F\x0bX\r").encode()
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        sock.sendall(encode_frame(payload))
        ((code, echoed, text),) = answers(sock, 1)
        assert (code, echoed) == ("AE", "VT-1") and "start block (0x0B)" in text
        sock.sendall(encode_frame(make_adt("VT-2").encode()))
        assert answers(sock, 1)[0][:2] == ("AA", "VT-2")
    assert len(hub.store.find(limit=None)) == 2


def test_a_sender_that_half_closes_after_sending_reads_every_ack(hub: HubThread) -> None:
    """Several senders, one frame or five each, every one half-closing at once (the frames and
    the end of the stream then arrive together, before the commit)."""
    for count in (1, 5, 1, 5):
        frames = [encode_frame(make_adt(f"HC-{count}-{i}").encode()) for i in range(count)]
        with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
            sock.sendall(b"".join(frames))
            sock.shutdown(socket.SHUT_WR)
            got = answers(sock, count)
            assert sock.recv(1) == b""  # then the hub closes
        expected = [("AA", f"HC-{count}-{i}") for i in range(count)]
        assert [(code, echoed) for code, echoed, _ in got] == expected


def test_a_frame_ended_without_its_carriage_return_is_answered_while_the_sender_waits(
    hub: HubThread,
) -> None:
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        began = time.monotonic()
        sock.sendall(b"\x0b" + make_adt("NOCR-1").encode() + b"\x1c")
        assert answers(sock, 1)[0][:2] == ("AA", "NOCR-1")
        assert time.monotonic() - began < 5
        sock.sendall(encode_frame(make_adt("NOCR-2").encode()))  # the connection goes on
        assert answers(sock, 1)[0][:2] == ("AA", "NOCR-2")


def test_a_header_without_encoding_characters_is_rejected_not_read_shifted(
    hub: HubThread,
) -> None:
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        sock.sendall(encode_frame(b"MSH|A|B|C|D|20260101||ADT^A01|X5|P|2.5\rPID|1\r"))
        sock.sendall(encode_frame(b"MSH^^~\\&^A^B^C^D^20260101^^ADT~A01^X6^P^2.5\r"))
        sock.sendall(encode_frame(b"MSH|\r"))
        first, second, third = answers(sock, 3)
    assert first[0] == "AR" and "MSH-2 (the encoding characters) is 'A'" in first[2]
    assert second[0] == "AR" and "MSH-2 (the encoding characters) is ''" in second[2]
    assert third[0] == "AR" and "the MSH segment is cut short" in third[2]
    assert {m.status for m in hub.store.find(limit=None)} == {"rejected"}
