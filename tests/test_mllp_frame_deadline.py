"""A peer cannot hold MLLP connections by sending a byte now and then: a frame must end within
frame_timeout of its start block (past it the connection is closed, that frame unanswered,
the frames before it answered first, logged once a minute per address and counted), and bytes
outside any frame are not activity, so such a connection is closed as idle. A sender whose
frames keep arriving split across reads is never cut off. Real hub, real sockets."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import httpx
import pytest

from carehub.hl7.framing import encode_frame
from carehub.testing import HubThread, local_config, make_adt, read_frames
from tests.helpers_http import wait_for

TIMEOUT = 30.0
LOGGER = "carehub.intake.mllp"
#: How long a test waits for the hub to close a connection it should close: far beyond the
#: limits configured here (1 s), and what an old hub, which never closes one, fails on.
CLOSE_WAIT = 15.0


def timed_hub(tmp_path: Path, **settings: float) -> HubThread:
    config = local_config()
    for name, value in settings.items():
        setattr(config.listeners.mllp[0], name, value)
    return HubThread(config, tmp_path / "data")


def drip_until_closed(sock: socket.socket, byte: bytes) -> tuple[bool, bytes]:
    """Send ``byte`` every 0.2 s until the hub closes the connection or CLOSE_WAIT has
    passed; whether it closed, and what it sent before."""
    received = b""
    deadline = time.monotonic() + CLOSE_WAIT
    while time.monotonic() < deadline:
        try:
            sock.sendall(byte)
            sock.settimeout(0.2)
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def frame_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "frame_timeout" in r.getMessage()]


def test_a_frame_sent_a_byte_at_a_time_is_cut_off_while_others_are_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with timed_hub(tmp_path, frame_timeout=1.0) as hub:
        with socket.create_connection(hub.mllp_address, TIMEOUT) as slow:
            # A whole frame, then the start of another that never ends.
            slow.sendall(encode_frame(make_adt("BEFORE").encode()) + b"\x0bMSH|^~\\&|")
            with socket.create_connection(hub.mllp_address, TIMEOUT) as other:
                other.sendall(encode_frame(make_adt("OTHER").encode()))
                [ack] = read_frames(other, 1)
                assert b"MSA|AA|OTHER" in ack
            closed, received = drip_until_closed(slow, b"A")
            assert closed, "a frame sent a byte at a time held its connection"
        assert received.count(b"\x0b") == 1 and b"MSA|AA|BEFORE" in received
        with socket.create_connection(hub.mllp_address, TIMEOUT) as again:
            again.sendall(encode_frame(make_adt("AFTER").encode()))
            assert b"MSA|AA|AFTER" in read_frames(again, 1)[0]
        assert sorted(m.control_id for m in hub.store.find()) == ["AFTER", "BEFORE", "OTHER"]
        listener = hub.hub.mllp_listeners[0]
        assert listener.frames_timed_out == 1
        metrics = httpx.get(f"{hub.http_url}/metrics", timeout=TIMEOUT).text
    assert 'carehub_mllp_frames_timed_out_total{listener="test"} 1.0' in metrics
    [line] = frame_lines(caplog)
    assert line.startswith("MLLP listener test: closed the connection from 127.0.0.1:")
    assert "a frame started 1 s ago has not ended (frame_timeout)" in line
    assert "MSH" not in line
    # The closing is that one rated line, not another per connection.
    assert not [r for r in caplog.records if "left mid-frame" in r.getMessage()]


def test_frames_split_across_reads_for_longer_than_the_timeout_are_all_answered(
    tmp_path: Path,
) -> None:
    """Every read ends inside a frame for three times frame_timeout, but each frame ends
    soon after it starts: none is late, and the connection stays."""
    frames = b"".join(encode_frame(make_adt(f"SPLIT{n:02}").encode()) for n in range(30))
    piece = len(frames) // 30 + 7  # never a whole number of frames per read
    with (
        timed_hub(tmp_path, frame_timeout=1.0) as hub,
        socket.create_connection(hub.mllp_address, TIMEOUT) as sock,
    ):
        for offset in range(0, len(frames), piece):  # about 31 reads 0.1 s apart
            sock.sendall(frames[offset : offset + piece])
            time.sleep(0.1)
        acks = read_frames(sock, 30)
        assert all(b"MSA|AA|SPLIT" in ack for ack in acks)
        assert hub.hub.mllp_listeners[0].frames_timed_out == 0
        assert hub.store.count() == 30


def test_bytes_outside_any_frame_do_not_keep_a_connection_from_being_idle(
    tmp_path: Path,
) -> None:
    with (
        timed_hub(tmp_path, idle_timeout=1.0) as hub,
        socket.create_connection(hub.mllp_address, TIMEOUT) as sock,
    ):
        closed, received = drip_until_closed(sock, b"x")
        assert closed, "a byte outside any frame now and then kept the connection from idling"
        assert received == b""
        wait_for(lambda: hub.hub.mllp_listeners[0].open_connections == 0, 10, what="closed")
