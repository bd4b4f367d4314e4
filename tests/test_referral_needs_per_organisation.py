"""An organisation hears only of the needs its service in a referral serves, in every channel
and every update: the intake email, the FHIR copy, and what a modify (REF^I13) sends them,
whichever organisation ranks first for the modify's own needs. The shipped config on a real
hub: REF messages in over MLLP, the FHIR copy at a FHIR test server that validates it, the
emails at an aiosmtpd server."""

from __future__ import annotations

from email.message import EmailMessage

from tests import test_referral_recipients as recipients
from tests.helpers_http import wait_for
from tests.test_referral_recipients import SCFB, Loop, _owner, _referral
from tests.test_referral_state_answers import MODIFY, RT_LINE

loop = recipients.loop  # the shipped config on a running hub, with its stand-ins

#: Feed 07's patient has both: the food bank it names serves food only.
FOOD, HOUSING = "Food insecurity", "Housing instability"


def _needs_line(message: EmailMessage) -> str:
    (line,) = [x for x in message.get_content().splitlines() if x.startswith("Needs:")]
    return line


def _email(loop: Loop, destination: str, kind: str) -> EmailMessage:
    """The one email of ``kind`` sent by ``destination``, as the SMTP server got it."""
    (sent,) = [d for d in loop.settled(destination) if d.metadata["kind"] == kind]
    address, subject = sent.metadata["to"], sent.metadata["subject"]

    def arrived() -> list[EmailMessage]:
        return [m for m in loop.emails_to(address) if m["Subject"] == subject]

    (message,) = wait_for(arrived, what=f"the {kind} email at the SMTP server")
    return message


def test_a_food_bank_never_hears_of_the_housing_need_nor_after_a_modify(loop: Loop) -> None:
    assert loop.send(_referral("NPO-1", "R-NPO1")) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    request, task = _owner(loop)
    assert task["owner"]["display"] == SCFB
    assert [c["coding"][0]["code"] for c in request["reasonCode"]] == ["Z59.41"]

    # The intake email names the food need, as the FHIR copy does: not the housing one.
    new = _email(loop, "sdoh-referrals/notify-referral-email", "referral_new")
    assert new["Subject"].startswith("New referral R-NPO1")
    assert _needs_line(new) == f"Needs: {FOOD}"
    assert HOUSING not in new.get_content()

    # A modify that only makes it STAT and names nobody (PRD RT left out): the referral stays
    # with the food bank, even though another organisation, serving food and housing, ranks
    # first for the modify's needs.
    stat = _referral(
        "NPO-2",
        "R-NPO1",
        replace={**MODIFY, RT_LINE: "", "R^Routine^HL70280": "S^STAT^HL70280"},
    )
    assert loop.send(stat) == "AA"
    (patched,) = loop.settled("referral-changes/cbo-platform")
    assert patched.receipt.endswith("modified")
    assert loop.fhir.problems == []
    request, task = _owner(loop)
    assert (request["priority"], task["priority"]) == ("stat", "stat")
    assert task["owner"]["display"] == SCFB
    assert [c["coding"][0]["code"] for c in request["reasonCode"]] == ["Z59.41"]

    updated = _email(loop, "referral-changes/notify-referral-email", "referral_changed")
    assert updated["Subject"].startswith("Referral R-NPO1 updated")
    assert updated["To"] == new["To"]
    assert "Changed: priority" in updated.get_content()
    assert _needs_line(updated) == f"Needs: {FOOD}"
    assert HOUSING not in updated.get_content()
