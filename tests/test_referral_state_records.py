"""What the referral state records besides answers, on the shipped config over real sockets:
a patient merge (A40) re-files a referral for good, a referral message that belongs to no
referral fails its route with the reason and is listed, and an overdue referral is logged once
however many routes track referrals."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from carehub.referrals import state
from carehub.referrals.state import list_referrals, referral_timeline
from carehub.store.store import StoredMessage
from tests import test_referral_recipients as recipients
from tests.helpers_http import wait_for
from tests.test_referral_recipients import FEED_07, Loop, _referral
from tests.test_referral_state_answers import FEED_19, MODIFY, _answer

FEEDS = Path(__file__).resolve().parents[1] / "config" / "feeds"
MERGE = (FEEDS / "13-riverside-merge.hl7").read_text().replace("\n", "\r")
RETIRED = {"RG100234^^^RGH^MR": "RG100299^^^RGH^MR"}
RF1_07 = next(line for line in FEED_07.split("\r") if line.startswith("RF1|"))
RF1_19 = next(line for line in FEED_19.split("\r") if line.startswith("RF1|"))


loop = recipients.loop  # the shipped config on a running hub, with its stand-ins


def _patient_of(loop: Loop, referral_id: str) -> str | None:
    found = [
        r
        for r in list_referrals(loop.running.store.engine, limit=None)
        if r.referral_key.endswith(f"|{referral_id}")
    ]
    return found[0].patient_key if found else None


def _message(loop: Loop, control_id: str) -> StoredMessage:
    def found() -> list[StoredMessage]:
        return [m for m in loop.running.store.find(limit=None) if m.control_id == control_id]

    wait_for(lambda: found() and found()[0].status not in ("received",), what=control_id)
    return found()[0]


def test_a_merge_refiles_a_referral_and_the_retired_id_does_not_undo_it(loop: Loop) -> None:
    assert loop.send(_referral("T-D1-1", "R-D1", replace=RETIRED)) == "AA"
    wait_for(lambda: _patient_of(loop, "R-D1") == "RGH|RG100299", what="the referral stored")
    loop.settled("sdoh-referrals/notify-referral-email")

    assert loop.send(MERGE) == "AA"  # A40: RG100299 retired into RG100236
    wait_for(lambda: _patient_of(loop, "R-D1") == "RGH|RG100236", what="the merge applied")
    (made,) = list_referrals(loop.running.store.engine, patient="RG100236")
    timeline = referral_timeline(loop.running.store.engine, made.id or 0)
    assert timeline is not None
    merged = timeline.events[-1]
    assert (merged.source, merged.action, merged.accepted) == (
        "patient-merge",
        "patient_merged",
        True,
    )
    assert (merged.from_status, merged.to_status) == ("requested", "requested")
    assert (
        merged.detail["note"] == "patient RGH|RG100299 merged into RGH|RG100236: filed under it now"
    )
    assert merged.detail["control_id"] == "RGH-000302"

    # The clinic still sends the retired identifier with a modify that changes nothing else.
    again = _referral("T-D1-2", "R-D1", replace={**MODIFY, **RETIRED})
    assert loop.send(again) == "AA"
    loop.settled("referral-changes/referral-updates")
    assert _patient_of(loop, "R-D1") == "RGH|RG100236"
    assert [r.id for r in list_referrals(loop.running.store.engine, patient="RG100236")] == [
        made.id
    ]
    modified = referral_timeline(loop.running.store.engine, made.id or 0)
    assert modified is not None and modified.events[-1].detail["note"] == "nothing changed"
    assert loop.deliveries("referral-changes/notify-referral-email") == []  # nobody told

    # A new referral for the retired identifier is filed under the surviving one.
    assert loop.send(_referral("T-D2-1", "R-D2", replace=RETIRED)) == "AA"
    wait_for(lambda: _patient_of(loop, "R-D2") is not None, what="the second referral")
    assert _patient_of(loop, "R-D2") == "RGH|RG100236"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (
            _referral("T-NO-1", "RGH-R-2026-0042", replace={RF1_07 + "\r": ""}),
            "REF^I12 not tracked: the message has no referral id",
        ),
        (_referral("T-NO-2", ""), "REF^I12 not tracked: the message has no referral id"),
        (FEED_19.replace(RF1_19 + "\r", ""), "RRI^I12 not tracked: the message has no referral id"),
        (
            _referral("T-NO-3", "R-NEVER", replace={"REF^I12^REF_I12": "REF^I14^REF_I12"}),
            "REF^I14 not tracked: no referral with its id (RF1-6) is on file",
        ),
    ],
    ids=["I12-without-RF1", "I12-without-RF1-6", "RRI-without-RF1", "I14-unknown"],
)
def test_a_referral_message_that_belongs_to_no_referral_fails_with_the_reason(
    loop: Loop, text: str, why: str
) -> None:
    started = datetime.now(UTC) - timedelta(minutes=1)
    control_id = text.split("\r", 1)[0].split("|")[9]
    assert loop.send(text) == "AA"  # stored and acknowledged: the sender did nothing wrong
    message = _message(loop, control_id)
    assert message.status == "failed"
    assert message.detail is not None and why in message.detail
    assert list_referrals(loop.running.store.engine) == []
    (refused,) = state.refused_referral_events(
        loop.running.store.engine, started, unattached_only=True
    )
    assert (refused.message_id, refused.accepted, refused.referral_id) == (message.id, False, None)
    assert refused.detail["control_id"] == control_id


def test_an_answer_for_an_unknown_referral_is_kept_and_listed(loop: Loop) -> None:
    """It may have overtaken its referral: not failed, but listed until the referral comes."""
    assert loop.send(_answer("SCFB-NONE", "R-NONE")) == "AA"
    message = _message(loop, "SCFB-NONE")
    loop.settled("referral-updates/referral-updates")
    assert loop.running.store.get(message.id).status == "delivered"
    (refused,) = state.refused_referral_events(loop.running.store.engine, unattached_only=True)
    assert (refused.action, refused.reason) == ("unknown_referral", "no referral R-NONE")


def test_an_overdue_referral_is_logged_once_however_many_routes_track_referrals(
    loop: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    assert loop.send(FEED_07) == "AA"
    wait_for(lambda: list_referrals(loop.running.store.engine), what="the referral stored")
    table = loop.running.hub.table
    tracking = [
        route.name
        for route in table.routes
        if any(step.label.endswith("referral-state") for step in route.steps)
    ]
    assert len(tracking) == 3
    late = datetime.now(UTC) + timedelta(hours=25)
    with caplog.at_level(logging.WARNING, logger="carehub.referrals.state"):
        table.tick(late)
        table.tick(late + timedelta(minutes=1))
    logged = [r for r in caplog.records if "without an answer" in r.getMessage()]
    assert len(logged) == 1
    assert (
        logged[0].getMessage()
        == f"1 referral(s) without an answer: #{list_referrals(loop.running.store.engine)[0].id}"
    )
