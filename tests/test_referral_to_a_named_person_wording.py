"""A referral made to a person by name (a specialist, a community health worker) is worded as
one: the notify-referral step says it names that person, not an organisation, rather than
"no community organisation chosen"; the overdue alert asks the coordinator to follow up with
the person, while one to an organisation still says "the organisation". The shipped config on
a real hub over MLLP, with an aiosmtpd server and a FHIR test server."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from carehub.store.outbox import Outbox
from tests import test_referral_recipients as recipients
from tests.helpers_http import wait_for
from tests.test_referral_early_updates import _message
from tests.test_referral_named_person_recipient import COORDINATOR, SPECIALIST, WORKER
from tests.test_referral_recipients import FEED_07, Loop, _referral

loop = recipients.loop  # the shipped config on a running hub, with its stand-ins

ORGANISATION_FOLLOW_UP = "Please follow up with the organisation or choose another service."


def _organisation_decisions(loop: Loop, message_id: int) -> list[dict[str, Any]]:
    """What the notify-referral step decided for the organisation of a message."""
    steps = Outbox(loop.running.store).steps(message_id)
    return [
        decision
        for step in steps
        if step.step.startswith("notify-referral") and isinstance(step.output, list)
        for decision in step.output
        if decision.get("role") == "organization"
    ]


def test_a_referral_to_a_named_worker_says_it_names_her_not_that_nobody_was_chosen(
    loop: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert loop.send(_referral("RGH-NW-1", "R-NW-1", replace=WORKER)) == "AA"
    message = _message(loop, "RGH-NW-1")
    (decision,) = _organisation_decisions(loop, message.id)
    assert decision["status"] == "suppressed"
    assert decision["reason"] == "names Ms Maria Rivera, not an organisation: no address to email"
    # The reason is kept with the step, not logged.
    assert not [r for r in caplog.records if "Rivera" in r.getMessage()]


def test_the_overdue_alert_says_whom_to_follow_up_with(loop: Loop) -> None:
    assert loop.send(_referral("RGH-OV-1", "R-OV-1", replace=SPECIALIST)) == "AA"
    assert loop.send(FEED_07) == "AA"
    for control_id in ("RGH-OV-1", "RGH-REF-7001"):
        _message(loop, control_id)

    loop.running.hub.table.tick(datetime.now(UTC) + timedelta(hours=25))
    wait_for(lambda: len(loop.emails_to(COORDINATOR)) >= 2, what="two overdue alerts")
    mails = loop.emails_to(COORDINATOR)
    texts = {
        referral: text
        for text in (mail.get_content() for mail in mails)
        for referral in ("R-OV-1", "RGH-R-2026-0042")
        if f"Referral: {referral}." in text
    }
    assert sorted(texts) == ["R-OV-1", "RGH-R-2026-0042"]

    specialist = texts["R-OV-1"]
    assert "Please follow up with Dr Alan Jones, or refer the patient to another provider." in (
        specialist
    )
    assert "organisation" not in specialist

    assert ORGANISATION_FOLLOW_UP in texts["RGH-R-2026-0042"]
