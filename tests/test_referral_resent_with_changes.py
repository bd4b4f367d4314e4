"""A new referral (REF^I12) sent again under a new MSH-10 with other content (STAT instead of
routine, a new reason, another organisation) is applied as a modify: the referral changes,
the organisations hear it as they would of an I13 (the first is told it is withdrawn, the new
one gets it), the FHIR copy is patched, and the timeline says a second I12 changed it. The
same I12 sent again unchanged is still a resend that sends nothing; one with other content
for a closed referral is refused and listed. The shipped config on a real hub over MLLP, with
an aiosmtpd server and a FHIR test server."""

from __future__ import annotations

from typing import Any

from carehub.referrals.state import referral_timeline, refused_referral_events
from carehub.store.outbox import Outbox
from tests import test_referral_recipients as recipients
from tests.test_referral_early_updates import CANCEL, _message, _referral_of
from tests.test_referral_recipients import SCFB, Loop, _referral

loop = recipients.loop  # the shipped config on a running hub, with its stand-ins

COMUNIDAD = "Comunidad Unida Springfield"
KEY = "RIVERSIDE_GH|R-RS-1"
#: The hospital's second I12 for the same referral: urgent, and to another organisation.
CHANGED = {
    "R^Routine^HL70280": "S^STAT^HL70280",
    "Food and housing support after discharge": "Food support - urgent, no food at home",
    f"|{SCFB}|900 Market St^^Springfield^IL^62703": f"|{COMUNIDAD}|1 Main^^Springfield^IL^62703",
}


def _notices(loop: Loop) -> list[tuple[str, str]]:
    """(kind, organisation) of every email notify-referral planned on the I12 route."""
    return [
        (str(d.metadata.get("kind")), str(d.metadata.get("recipient_name")))
        for d in Outbox(loop.running.store).find(limit=None)
        if d.destination == "sdoh-referrals/notify-referral-email"
    ]


def _owner(loop: Loop) -> tuple[dict[str, Any], dict[str, Any]]:
    (request,) = loop.created("ServiceRequest")
    (task,) = loop.created("Task")
    return request, task


def test_a_second_i12_with_other_content_is_applied_as_a_modify(loop: Loop) -> None:
    assert loop.send(_referral("RGH-RS-1", "R-RS-1")) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    assert _notices(loop) == [("referral_new", SCFB)]

    assert loop.send(_referral("RGH-RS-2", "R-RS-1", replace=CHANGED)) == "AA"
    assert _message(loop, "RGH-RS-2").status == "delivered"
    referral = _referral_of(loop, KEY)
    assert (referral.priority, referral.reason) == ("S", "Food support - urgent, no food at home")
    assert referral.referred_to["organization"]["name"] == COMUNIDAD
    assert referral.status == "requested"

    # The timeline says a second I12 changed it, and what.
    timeline = referral_timeline(loop.running.store.engine, KEY)
    assert timeline is not None
    second = timeline.events[-1]
    assert (second.source, second.action, second.accepted) == ("REF^I12", "modified", True)
    assert second.detail["control_id"] == "RGH-RS-2"
    assert second.detail["note"].startswith(
        "a second REF^I12 with other content, applied as a modify; "
        "changed: priority, reason, referred_to"
    )

    # The platform's copy is patched: STAT, and owned by the organisation named now.
    _, patched = loop.settled("sdoh-referrals/cbo-platform", 2)
    assert patched.status == "delivered", patched.last_error
    assert patched.receipt is not None and patched.receipt.endswith("modified")
    request, task = _owner(loop)
    assert request["priority"] == "stat"
    assert task["owner"]["display"] == COMUNIDAD
    assert request["performer"] == [task["owner"]]

    # The food bank hears it is withdrawn; Comunidad gets it as a new referral.
    loop.settled("sdoh-referrals/notify-referral-email", 3)
    assert sorted(_notices(loop)) == sorted(
        [("referral_new", SCFB), ("referral_withdrawn", SCFB), ("referral_new", COMUNIDAD)]
    )

    # The same I12 once more, unchanged: a resend that sends nothing.
    assert loop.send(_referral("RGH-RS-3", "R-RS-1", replace=CHANGED)) == "AA"
    assert _message(loop, "RGH-RS-3").status == "delivered"
    resent = loop.settled("sdoh-referrals/cbo-platform", 3)[-1]
    assert resent.status == "skipped"
    timeline = referral_timeline(loop.running.store.engine, KEY)
    assert timeline is not None
    assert timeline.events[-1].action == "resend"
    assert len(_notices(loop)) == 3


def test_a_second_i12_with_other_content_for_a_closed_referral_is_refused(loop: Loop) -> None:
    assert loop.send(_referral("RGH-RC-1", "R-RC-1")) == "AA"
    assert loop.send(_referral("RGH-RC-2", "R-RC-1", replace=CANCEL)) == "AA"
    assert _message(loop, "RGH-RC-2").status == "delivered"
    assert _referral_of(loop, "RIVERSIDE_GH|R-RC-1").status == "cancelled"

    assert loop.send(_referral("RGH-RC-3", "R-RC-1", replace=CHANGED)) == "AA"
    message = _message(loop, "RGH-RC-3")
    referral = _referral_of(loop, "RIVERSIDE_GH|R-RC-1")
    assert (referral.status, referral.priority) == ("cancelled", "R")
    refused = [
        e
        for e in refused_referral_events(loop.running.store.engine, limit=None)
        if e.message_id == message.id
    ]
    assert [(e.action, e.reason) for e in refused] == [
        (
            "illegal",
            "referral is cancelled: a second REF^I12 with other content cannot change a "
            "closed referral",
        )
    ]
