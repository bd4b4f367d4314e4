"""A full disk under a running `carehub serve`: every frame is still answered, AA only for what
was stored, the hub keeps running and logs the failure as one run, and it takes messages again
the moment there is room.

The disk is made full for the hub process alone with RLIMIT_FSIZE (no file of it may grow past
a limit, so SQLite's writes fail as they do on a full disk), which needs no privileges; the
test lifts the limit again with prlimit, as an operator would free space.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
from pathlib import Path

import pytest

from carehub.hl7.ack import read_ack
from carehub.hl7.framing import encode_frame
from carehub.store.failure_run import FailureRun
from carehub.testing import make_adt, read_frames
from tests.test_durability import ACK_TIMEOUT, HubProcess, hubs, stored_counts

resource = pytest.importorskip("resource", reason="RLIMIT_FSIZE needs a POSIX system")

hubs = hubs  # the fixture, shared with the durability tests
FILE_SIZE_LIMIT = 3 * 1024 * 1024
FILLER = "NTE|1||" + "x" * 20_000  # a 20 KB note: the limit is reached within a few hundred


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="resource.prlimit is Linux only")
def test_full_disk_gets_ae_never_a_false_aa_and_intake_recovers(
    tmp_path: Path, hubs: list[HubProcess]
) -> None:
    data_dir = tmp_path / "data"
    hub = HubProcess(data_dir, tmp_path, "full", file_size_limit=FILE_SIZE_LIMIT)
    hubs.append(hub)

    answers: dict[str, str] = {}
    with socket.create_connection(hub.address, timeout=ACK_TIMEOUT) as sock:

        def send(control_id: str, *segments: str) -> str:
            sock.sendall(encode_frame(make_adt(control_id, extra_segments=segments).encode()))
            (answer,) = read_frames(sock, 1, ACK_TIMEOUT)
            code, echoed, text = read_ack(answer.decode())
            assert echoed == control_id
            if code == "AE":
                assert "not stored" in text and "resend" in text, text
            answers[control_id] = code
            return code

        sent = 0
        while sum(code == "AE" for code in answers.values()) < 50:
            assert sent < 2_000, "the store never filled up"
            send(f"FULL{sent:05d}", FILLER)
            sent += 1
        assert hub.process.poll() is None, hub.stderr  # still running

        # Space is freed: the next messages are stored again, on the same connection.
        resource.prlimit(hub.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        after = [send(f"ROOM{i}") for i in range(5)]
    assert after == ["AA"] * 5

    hub.signal(signal.SIGTERM)
    assert hub.wait() == 0, hub.stderr
    counts = stored_counts(data_dir)
    accepted = {c for c, code in answers.items() if code == "AA"}
    refused = {c for c, code in answers.items() if code == "AE"}
    assert all(counts.get(c) == 1 for c in accepted), "an AA'd message is missing"
    assert not refused & set(counts), "a message answered 'not stored' was stored"

    # Logged as runs of failures, not one line per refused message.
    failure_lines = re.findall(r"store write failed .*", hub.stderr)
    assert 1 <= len(failure_lines) < len(refused) / 5, failure_lines
    assert "store write works again" in hub.stderr


def test_a_failure_run_is_logged_when_it_starts_every_interval_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    run = FailureRun(
        "store write", "answering 'not stored'", "message(s)", report_every=30, clock=lambda: now[0]
    )
    caplog.set_level(logging.WARNING)
    try:
        raise OSError("disk full")
    except OSError as err:
        failure = err

    run.failed(failure, 8)
    for _ in range(100):
        now[0] += 0.1  # ten seconds of failing commits
        run.failed(failure, 8)
    assert [r.getMessage() for r in caplog.records] == [
        "store write failed (disk full): answering 'not stored'"
    ]
    assert caplog.records[0].exc_info is not None  # the first one carries its traceback

    now[0] += 25  # past the interval
    run.failed(failure, 8)
    run.succeeded()
    run.succeeded()  # nothing more: the run has ended
    assert [r.getMessage() for r in caplog.records[1:]] == [
        "store write still failing (disk full): 808 message(s) in the last 35 s",
        "store write works again after 35.0 s (816 message(s) failed meanwhile)",
    ]
