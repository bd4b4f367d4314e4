"""Stopping the hub: every listener stops taking messages at once, in-flight ones still finish."""

from __future__ import annotations

import socket
import sqlite3
import time
from pathlib import Path

import pytest

from carehub.hl7.framing import encode_frame
from carehub.testing import HubThread, local_config, make_adt, read_frames


def _refuses(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
    except OSError:
        return True
    return False


def test_http_stops_accepting_while_mllp_drains(tmp_path: Path) -> None:
    """While an MLLP connection still waits for its commit, the HTTP port is already closed: a
    listener draining its connections must not leave the others taking new messages."""
    running = HubThread(local_config(), tmp_path / "data")
    with running:
        assert running.hub.http_listener and running.hub.http_listener.address
        http_address = ("127.0.0.1", running.hub.http_listener.address[1])
        blocker = sqlite3.connect(tmp_path / "data" / "carehub.db", timeout=5)
        blocker.execute("BEGIN IMMEDIATE")  # another process's writer holds SQLite's lock
        sender = socket.create_connection(running.mllp_address, timeout=10)
        try:
            sender.sendall(encode_frame(make_adt("DRAIN1").encode()))
            time.sleep(0.3)  # read, and waiting for the lock
            stopping = running.submit(running.hub.stop())
            deadline = time.monotonic() + 5
            while not _refuses(http_address):
                if time.monotonic() > deadline:
                    pytest.fail("the HTTP listener still accepts while MLLP drains")
                time.sleep(0.05)
            assert not stopping.done(), "stop() finished with an MLLP frame unanswered"
            blocker.rollback()  # the lock goes; the waiting frame commits and is answered
            (ack,) = read_frames(sender, 1)
            assert b"MSA|AA|DRAIN1" in ack
            stopping.result(timeout=15)
        finally:
            sender.close()
            blocker.close()
