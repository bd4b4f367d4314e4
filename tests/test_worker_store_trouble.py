"""The worker's store failure run ends only when what failed works again: under a full disk a
claim that finds nothing due still works while routing's writes fail, and ending the run on it
logged "works again after 0.0 s" every few seconds through the outage."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from carehub.store.failure_run import FailureRun
from carehub.worker import STORE_TROUBLE_QUIET, StoreTrouble


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store_trouble(clock: Clock) -> StoreTrouble:
    return StoreTrouble(
        FailureRun("store use", "tried again", "call(s)", clock=clock, traceback=False),
        clock=clock,
    )


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("store use")]


def test_the_run_ends_when_the_failing_call_works_not_when_another_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    trouble = store_trouble(clock)
    full = sqlite3.OperationalError("database or disk is full")
    trouble.failed("routing", full)
    for _ in range(5):  # claims and lease renewals read and find nothing to write
        clock.now += 5
        trouble.succeeded("claims")
        trouble.succeeded("leases")
        trouble.failed("routing", full)
    assert [line.split(" (")[0] for line in lines(caplog)] == ["store use failed"]
    clock.now += 2
    trouble.succeeded("routing")
    assert lines(caplog)[-1] == "store use works again after 27.0 s (6 call(s) failed meanwhile)"


def test_a_call_that_does_not_come_again_does_not_hold_the_run_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    trouble = store_trouble(clock)
    trouble.failed("sweeps", sqlite3.OperationalError("database is locked"))
    clock.now += 1
    trouble.succeeded("claims")
    assert len(lines(caplog)) == 1  # the sweep may still be failing
    clock.now += STORE_TROUBLE_QUIET
    trouble.succeeded("claims")
    assert lines(caplog)[-1].startswith("store use works again after ")
