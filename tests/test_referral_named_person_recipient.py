"""A referral made to a person by name (PRD role RT a physician or a worker, no organisation)
has gone to that person: it is not "held", its modify and cancel follow it, and the overdue
alert names them. A clinical referral (RF1-3 MED, to a specialist) is tracked but goes to the
referral desk only, never to the community platform. The shipped config on a real hub over
MLLP, with an aiosmtpd server and a FHIR test server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

from carehub.store.outbox import Outbox
from tests import test_referral_recipients as recipients
from tests.helpers_http import wait_for
from tests.test_referral_early_updates import CANCEL, _cli, _message, _referral_of, _timeline
from tests.test_referral_recipients import SCFB, Loop, _referral

loop = recipients.loop  # the shipped config on a running hub, with its stand-ins

COORDINATOR = "cc-team@riverside-cm.example.org"  # RG100234's care coordinator (roster)
RT_FOOD_BANK = f"PRD|RT^Referred to provider^HL70286|{SCFB}|900 Market St^^Springfield^IL^62703"
DG1_LINES = (
    "DG1|1||Z59.41^Food insecurity^I10||20261127|F\r"
    "DG1|2||Z59.811^Housing instability, housed, with risk of homelessness^I10||20261127|F"
)
#: Feed 07 turned into a cardiology referral to Dr Alan Jones (NPI), with no social need.
SPECIALIST = {
    "SO^Social services^HL70281": "MED^Medical^HL70281",
    "Food and housing support after discharge": "Cardiology consult for new heart failure",
    RT_FOOD_BANK: "PRD|RT^Referred to provider^HL70286|Jones^Alan^^^Dr"
    "|77 Heart Way^^Springfield^IL^62701||||1234567893^NPI",
    DG1_LINES: "DG1|1||I50.9^Heart failure, unspecified^I10||20261127|F",
}
#: Feed 07 made a social-services referral (RF1-3 SO) for low literacy (Z55.0, a need the
#: directory has no service for) to a community health worker named as a person, with no
#: organisation: it matches no service, and goes to her by name.
WORKER = {
    "Food and housing support after discharge": "Help reading discharge instructions",
    RT_FOOD_BANK: "PRD|RT^Referred to provider^HL70286|Rivera^Maria^^^Ms"
    "|12 Elm St^^Springfield^IL^62704||||1497758544^NPI",
    DG1_LINES: "DG1|1||Z55.0^Illiteracy and low-level literacy^I10||20261127|F",
}


def _sent(loop: Loop, destination: str) -> list[str]:
    """The status of every delivery to ``destination``, oldest first."""
    return [
        d.status
        for d in Outbox(loop.running.store).find(limit=None)
        if d.destination == destination
    ]


def _coordinator_mail(loop: Loop) -> list[EmailMessage]:
    return loop.emails_to(COORDINATOR)


def test_a_specialist_referral_is_tracked_for_the_desk_and_never_posted_to_the_platform(
    loop: Loop,
) -> None:
    assert loop.send(_referral("RGH-SP-1", "R-SP-1", replace=SPECIALIST)) == "AA"
    assert _message(loop, "RGH-SP-1").status == "delivered"
    referral = _referral_of(loop, "RIVERSIDE_GH|R-SP-1")
    assert referral.status == "requested"
    # The desk's copy is written; nothing goes to the community platform or an organisation.
    assert _sent(loop, "sdoh-referrals/referral-desk") == ["delivered"]
    assert _sent(loop, "sdoh-referrals/cbo-platform") == []
    assert _sent(loop, "sdoh-referrals/notify-referral-email") == []
    assert loop.fhir.posts == []

    # It went to Dr Jones: not held.
    (listed,) = [
        json.loads(line)
        for line in _cli(loop, "referrals", "list", "--json").splitlines()
        if line.strip()
    ]
    assert listed["sent_to"] == ["Dr Alan Jones"]

    # Overdue: the coordinator hears it has had no answer from Dr Jones, not that it was
    # never sent.
    loop.running.hub.table.tick(datetime.now(UTC) + timedelta(hours=25))
    (mail,) = wait_for(lambda: _coordinator_mail(loop), what="the overdue alert")
    assert mail["Subject"] == "Referral without an answer"
    text = mail.get_content()
    assert "to Dr Alan Jones" in text
    assert "has not been sent to any organisation" not in text

    # Its cancel is applied, and goes where the referral went: the desk, not the platform.
    assert loop.send(_referral("RGH-SP-1-X", "R-SP-1", replace={**SPECIALIST, **CANCEL})) == "AA"
    assert _message(loop, "RGH-SP-1-X").status == "delivered"
    assert _referral_of(loop, "RIVERSIDE_GH|R-SP-1").status == "cancelled"
    assert _sent(loop, "referral-changes/referral-updates") == ["delivered"]
    assert _sent(loop, "referral-changes/cbo-platform") == []
    assert loop.fhir.posts == []


def test_the_modify_and_cancel_of_a_referral_to_a_named_person_reach_the_platform(
    loop: Loop,
) -> None:
    assert loop.send(_referral("RGH-CW-1", "R-CW-1", replace=WORKER)) == "AA"
    (created,) = loop.settled("sdoh-referrals/cbo-platform")
    assert created.status == "delivered"
    (task,) = loop.created("Task")
    assert task["owner"]["display"] == "Ms Maria Rivera"
    assert _referral_of(loop, "RIVERSIDE_GH|R-CW-1").matches in (None, [])  # matched nothing

    stat = {**WORKER, "REF^I12^REF_I12": "REF^I13^REF_I12", "R^Routine^HL70280": "S^STAT^HL70280"}
    assert loop.send(_referral("RGH-CW-2", "R-CW-1", replace=stat)) == "AA"
    (modified,) = loop.settled("referral-changes/cbo-platform")
    assert modified.status == "delivered", modified.last_error
    (request,) = loop.created("ServiceRequest")
    assert request["priority"] == "stat"

    assert loop.send(_referral("RGH-CW-3", "R-CW-1", replace={**WORKER, **CANCEL})) == "AA"
    changes = loop.settled("referral-changes/cbo-platform", 2)
    assert [d.status for d in changes] == ["delivered", "delivered"]
    assert changes[-1].receipt is not None and changes[-1].receipt.endswith("cancelled")
    (task,) = loop.created("Task")
    assert task["status"] == "cancelled"
    (request,) = loop.created("ServiceRequest")
    assert request["status"] == "revoked"
    assert [row[1] for row in _timeline(loop, "RIVERSIDE_GH|R-CW-1")] == [
        "created",
        "modified",
        "cancelled",
    ]


#: Feed 07 with no referral type (RF1-3 empty) and no SDOH code, to the food bank by name.
UNTYPED_TO_FOOD_BANK = {
    "SO^Social services^HL70281": "",
    "Food and housing support after discharge": "Food support after discharge",
    DG1_LINES: "DG1|1||I50.9^Heart failure, unspecified^I10||20261127|F",
}
#: The same, to Dr Jones by name: a specialist, whatever the type field leaves unsaid.
UNTYPED_TO_SPECIALIST = {**UNTYPED_TO_FOOD_BANK, RT_FOOD_BANK: SPECIALIST[RT_FOOD_BANK]}


def test_an_untyped_referral_to_a_named_organisation_reaches_it(loop: Loop) -> None:
    """Many feeds leave RF1-3 empty (table 0281 has no social-services code) and send no Z
    code: a referral naming a community organisation still goes to it."""
    assert loop.send(_referral("RGH-UT-1", "R-UT-1", replace=UNTYPED_TO_FOOD_BANK)) == "AA"
    (created,) = loop.settled("sdoh-referrals/cbo-platform")
    assert created.status == "delivered", created.last_error
    (task,) = loop.created("Task")
    assert task["owner"]["display"] == SCFB
    assert _sent(loop, "sdoh-referrals/referral-desk") == ["delivered"]


def test_an_untyped_referral_to_a_named_specialist_is_skipped_by_the_platform(loop: Loop) -> None:
    assert loop.send(_referral("RGH-UT-2", "R-UT-2", replace=UNTYPED_TO_SPECIALIST)) == "AA"
    (skipped,) = loop.settled("sdoh-referrals/cbo-platform")
    assert skipped.status == "skipped"
    assert "names a person (PRD role RT) and no organisation" in (skipped.receipt or "")
    assert loop.fhir.posts == []
    assert _sent(loop, "sdoh-referrals/referral-desk") == ["delivered"]
    # Its cancel has nothing to change at the platform either.
    assert (
        loop.send(_referral("RGH-UT-2-X", "R-UT-2", replace={**UNTYPED_TO_SPECIALIST, **CANCEL}))
        == "AA"
    )
    (cancel,) = loop.settled("referral-changes/cbo-platform")
    assert cancel.status == "skipped"
    assert loop.fhir.posts == []
