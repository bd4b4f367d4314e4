"""Which Tasks the fhir-referral channel polls, on the shipped config over real sockets (MLLP
and HTTP in, a FHIR test server, an aiosmtpd server): a Task whose referral an answer closed
another way (an RRI, a status call) is no longer read, and is left as the organisation has
it; one whose referral the referrer cancelled is read until the cancel reaches the server, so
an organisation working on it is told to the referrer; and the one server both sample
forwards send to is polled once a cycle, not once per forward."""

from __future__ import annotations

import gzip
import logging
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import httpx
import pytest
from starlette.responses import Response

from carehub.builtins.http_channel import MAX_ANSWER_BYTES
from tests import test_referral_recipients as recipients
from tests.helpers_http import wait_for
from tests.test_referral_answers_organisations import _channel, _record, _referrer_subjects
from tests.test_referral_early_updates import CANCEL
from tests.test_referral_recipients import SCFB, Loop, _referral
from tests.test_referral_state_answers import _answer

loop = recipients.loop  # the shipped config on a running hub, with its stand-ins


def _task(loop: Loop) -> str:
    """The referral's Task at the server ("Task/<id>"), once created and in the task file."""
    loop.settled("sdoh-referrals/cbo-platform")
    (ref,) = [r for r in loop.fhir.resources if r.startswith("Task/")]
    assert [e["task"] for e in _channel(loop).tasks.all().values()] == [ref]
    return ref


def test_a_task_whose_referral_an_answer_closed_elsewhere_is_no_longer_polled(
    loop: Loop,
) -> None:
    assert loop.send(_referral("TP-1", "R-TP1")) == "AA"
    task = _task(loop)
    # The food bank accepts by RRI, then reports the service completed on carehub's API.
    assert loop.send(_answer("SCFB-TP1", "R-TP1")) == "AA"
    wait_for(lambda: _record(loop).status == "accepted", what="the RRI applied")
    key = _record(loop).referral_key
    answer = httpx.post(
        f"{loop.running.http_url}/referrals/{quote(key, safe='')}/status",
        json={"status": "completed", "note": "box delivered"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert _record(loop).status == "completed"

    channel = _channel(loop)
    assert channel.poll() == []
    assert task not in loop.fhir.gets  # not read: the referral cannot move again
    assert channel.tasks.all() == {}
    channel.poll()
    assert task not in loop.fhir.gets
    # Its status is the organisation's to set: carehub does not write the answer onto it.
    assert loop.fhir.resources[task]["status"] == "requested"
    assert loop.fhir.patched == []


def test_a_cancel_that_has_not_reached_the_server_keeps_its_task_polled(loop: Loop) -> None:
    assert loop.send(_referral("TP-2", "R-TP2")) == "AA"
    task = _task(loop)
    loop.fhir.fail_with = 400  # the server refuses the cancel
    assert loop.send(_referral("TP-2C", "R-TP2", replace=CANCEL)) == "AA"
    loop.running.wait_for_deliveries(destination="referral-changes/cbo-platform")
    assert _record(loop).status == "cancelled"
    assert loop.fhir.resources[task]["status"] == "requested"

    # The food bank, never told at the platform, starts work: the poll still reads the Task.
    loop.fhir.act(task, "in-progress")
    (claim,) = _channel(loop).poll()
    assert (claim.action, claim.acted_on_cancelled) == ("illegal", True)
    wait_for(lambda: _referrer_subjects(loop), what="the referrer told")
    assert _referrer_subjects(loop) == [f"Cancelled referral R-TP2 reported in progress by {SCFB}"]


def test_one_server_two_forwards_send_to_is_polled_once_a_cycle(loop: Loop) -> None:
    forwards = {
        step.destination.name
        for route in loop.running.hub.table.routes
        for step in route.steps
        if step.destination is not None and step.destination.channel.name == "fhir-referral"
    }
    assert forwards == {"sdoh-referrals/cbo-platform", "referral-changes/cbo-platform"}
    assert loop.send(_referral("TP-3", "R-TP3")) == "AA"
    task = _task(loop)

    start = datetime.now(UTC) + timedelta(minutes=16)  # past poll_minutes (15) of any tick so far
    loop.running.hub.table.tick(start)
    assert loop.fhir.gets.count(task) == 1
    loop.running.hub.table.tick(start)  # the same cycle again
    loop.running.hub.table.tick(start + timedelta(minutes=1))  # within poll_minutes
    assert loop.fhir.gets.count(task) == 1
    loop.running.hub.table.tick(start + timedelta(minutes=16))
    assert loop.fhir.gets.count(task) == 2


def test_a_task_answer_that_unpacks_past_the_bound_is_not_read_and_the_task_stays_polled(
    loop: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    """A Task read answered with gzip that unpacks to five times the bound (a broken or hostile
    server): the poll stops at the bound, says so, and reads the Task again next time."""
    assert loop.send(_referral("TP-4", "R-TP4")) == "AA"
    task = _task(loop)
    bomb = gzip.compress(b'{"resourceType": "Task", "note": "' + b" " * (5 * MAX_ANSWER_BYTES))
    loop.fhir.task_answer = Response(
        bomb, media_type="application/fhir+json", headers={"Content-Encoding": "gzip"}
    )
    channel = _channel(loop)
    with caplog.at_level(logging.WARNING, logger="carehub"):
        assert channel.poll() == []
    assert loop.fhir.gets.count(task) == 1
    assert "the answer is larger than 10 MiB, the most carehub reads; not read" in caplog.text
    assert [e["task"] for e in channel.tasks.all().values()] == [task]

    loop.fhir.task_answer = None
    loop.fhir.act(task, "accepted")
    (accepted,) = channel.poll()
    assert accepted.status == "accepted"
