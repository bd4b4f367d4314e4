"""Bytes an MLLP sender puts outside any frame (a message sent without its start block, noise
between frames) are ignored and not answered, as MLLP has it, but never silently: a WARNING
per peer address a minute says how many and why, without quoting them, and /metrics counts
them."""

from __future__ import annotations

import socket

import httpx
import pytest

from carehub.hl7.ack import read_ack
from carehub.hl7.framing import encode_frame
from carehub.testing import HubThread, make_adt, read_frames
from tests.helpers_http import wait_for

TIMEOUT = 10.0


def outside_frame_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "outside any frame" in r.getMessage()]


def ignored_bytes_metric(hub: HubThread) -> float:
    metrics = httpx.get(hub.http_url + "/metrics", timeout=TIMEOUT).text
    prefix = 'carehub_mllp_bytes_outside_frames_total{listener="test"} '
    [line] = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


def test_a_message_sent_without_its_start_block_is_logged_and_counted_not_answered(
    hub: HubThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="carehub.intake.mllp")
    unframed = make_adt("NOVT-1").encode() + b"\x1c\x0d"
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        sock.sendall(unframed + encode_frame(make_adt("FRAMED-1").encode()))
        [answer] = read_frames(sock, 1, TIMEOUT)
    assert read_ack(answer.decode())[:2] == ("AA", "FRAMED-1")
    assert [m.control_id for m in hub.store.find(limit=None)] == ["FRAMED-1"]
    wait_for(lambda: outside_frame_lines(caplog), 10, what="the ignored bytes logged")
    [line] = outside_frame_lines(caplog)
    assert line.startswith(f"MLLP listener test: ignored {len(unframed)} byte(s) from 127.0.0.1:")
    assert "no start block 0x0B" in line and "ended like a message" in line
    assert "NOVT-1" not in line and "MSH" not in line
    assert ignored_bytes_metric(hub) == len(unframed)

    # Noise from the same address within the minute: counted, not logged again.
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        sock.sendall(b"noise" + encode_frame(make_adt("FRAMED-2").encode()))
        read_frames(sock, 1, TIMEOUT)
    assert ignored_bytes_metric(hub) == len(unframed) + len(b"noise")
    assert len(outside_frame_lines(caplog)) == 1
