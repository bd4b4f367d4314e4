"""SIGTERM while sends to one MLLP destination queue behind its single connection: the send
under way gets to finish, and the sends still waiting for their turn go back in line at once,
unsent and with no attempt counted, rather than wait out the stop's grace and be "cut off".

`carehub serve` runs as a real process; the receiver is a real MLLP peer that answers each
message after a pause (tests/test_stop_during_slow_deliveries.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_stop_during_slow_deliveries import (
    EXIT_SLACK,
    STOP_GRACE,
    MLLPReceiver,
    deliveries,
    send_and_stop,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ANSWER_DELAY = 3.0  # seconds the receiver takes to answer each message


def test_sigterm_hands_back_at_once_the_sends_waiting_for_the_connection(tmp_path: Path) -> None:
    count = 10
    with MLLPReceiver(delay=ANSWER_DELAY) as receiver:
        took = send_and_stop(tmp_path, receiver, count, timeout=30)
        received = list(receiver.control_ids)

    # Only the send under way was waited for, well inside the grace.
    assert took <= ANSWER_DELAY + EXIT_SLACK < STOP_GRACE, f"the hub took {took:.1f} s to exit"
    log = (tmp_path / "logs" / "first.err").read_text()
    assert "cut off" not in log and "handed back unsent" in log, log

    after_stop = deliveries(tmp_path / "data")
    delivered = [d for d in after_stop if d.status == "delivered"]
    waiting = [d for d in after_stop if d.status == "pending"]
    assert len(delivered) == len(received), (len(delivered), received)
    assert len(waiting) == count - len(received)
    assert all(d.attempts == 0 and d.last_error is None for d in waiting)
