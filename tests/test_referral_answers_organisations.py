"""Whose answer counts, and whom a referral is with, on the shipped config over real sockets
(MLLP and HTTP in, a FHIR test server polled for its Task, an aiosmtpd server, the `carehub`
command line): a polled Task's owner is held to the same rule as an RRI's organisation; a name
written with punctuation or a legal form is the same organisation; a modify that moves the
referral moves the directory's warning (and the deadline it brings) with it; a PRD whose
PRD-1 repeats still names the organisation."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from click.testing import CliRunner

from carehub.cli import main
from carehub.config import HubConfig
from carehub.referrals.fhir import FhirReferralChannel
from carehub.referrals.state import ReferralRecord, list_referrals
from tests import test_referral_recipients as recipients
from tests.helpers_http import wait_for
from tests.test_referral_recipients import REFERRER, SCFB, Loop, _owner, _referral, referral_loop
from tests.test_referral_state_answers import (
    EASTSIDE,
    MODIFY,
    RT_LINE,
    RT_SCFB,
    _answer,
    _moved_to_eastside,
)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SOUTHTOWN = "Southtown Pantry"
EASTSIDE_INC = f"{EASTSIDE}, Inc."
COORDINATOR = "cc-team@riverside-cm.example.org"
INACTIVE = "not active in the directory"


loop = recipients.loop  # the shipped config on a running hub, with its stand-ins


def _record(loop: Loop) -> ReferralRecord:
    (record,) = list_referrals(loop.running.store.engine)
    return record


def _channel(loop: Loop) -> FhirReferralChannel:
    """The running hub's fhir-referral channel (its Task poll)."""
    for route in loop.running.hub.table.routes:
        for step in route.steps:
            destination = step.destination
            if destination is not None and isinstance(destination.channel, FhirReferralChannel):
                return destination.channel
    raise AssertionError("no fhir-referral forward on the shipped config")


def _referrer_subjects(loop: Loop) -> list[str]:
    loop.running.hub.table.tick(datetime.now(UTC))  # answers without a message are told here
    return [str(m["Subject"]) for m in loop.emails_to(REFERRER)]


def _list(loop: Loop) -> str:
    hub = loop.running.hub
    result = CliRunner(env={"COLUMNS": "240"}).invoke(
        main,
        [
            *("referrals", "list"),
            *("--config", str(hub.config.source), "--data-dir", str(hub.data_dir)),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.output)


def test_a_polled_task_answered_by_the_organisation_it_was_taken_from_is_refused(
    loop: Loop,
) -> None:
    _moved_to_eastside(loop, "R-P1")
    loop.settled("referral-changes/cbo-platform")
    (task,) = loop.created("Task")
    assert task["owner"]["display"] == EASTSIDE

    # The food bank, which the referral was taken from, marks the Task accepted.
    task["owner"]["display"] = SCFB
    loop.fhir.task_statuses = ["accepted"]
    channel = _channel(loop)
    (refused,) = channel.poll()
    assert (refused.action, refused.accepted) == ("other_organization", False)
    assert refused.reason == (
        f"answer from {SCFB}, but the referral was withdrawn from it: it is with {EASTSIDE}"
    )
    assert _record(loop).status == "requested"
    assert _referrer_subjects(loop) == []

    # Eastside, which has it now, accepts: the same status, from its owner, is applied.
    task["owner"]["display"] = EASTSIDE
    loop.fhir.task_statuses = ["accepted"]
    (accepted,) = channel.poll()
    assert (accepted.action, accepted.status) == ("status", "accepted")
    assert _record(loop).status == "accepted"
    wait_for(lambda: _referrer_subjects(loop), what="the referrer told")
    assert _referrer_subjects(loop) == [f"Referral R-P1 accepted by {EASTSIDE}"]


def test_the_organisation_written_with_a_legal_form_is_the_one_it_was_sent_to(
    loop: Loop,
) -> None:
    _moved_to_eastside(loop, "R-P2")
    answer = _answer(
        "ENP-1",
        "R-P2",
        replace={
            RT_LINE: f"PRD|RT^Referred to provider^HL70286|{EASTSIDE_INC}|\r",
            "|SCFB_REFERRALS|SPRINGFIELD_FOOD_BANK|": "|ENP|ENP|",
        },
    )
    assert loop.send(answer) == "AA"
    wait_for(lambda: _record(loop).status == "accepted", what="Eastside's answer applied")
    wait_for(lambda: loop.emails_to(REFERRER), what="the referrer told")
    assert [m["Subject"] for m in loop.emails_to(REFERRER)] == [
        f"Referral R-P2 accepted by {EASTSIDE_INC}"
    ]


PUNCTUATED_TOKEN = "eastside-inc-token"


def _punctuated_token(config: HubConfig) -> None:
    config.listeners.http.tokens = ["hospital-token"]
    config.listeners.http.organization_tokens = {
        "EASTSIDE NEIGHBORS PANTRY, INC.": PUNCTUATED_TOKEN
    }


@pytest.fixture
def with_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Loop]:
    with referral_loop(tmp_path, monkeypatch, _punctuated_token) as running:
        yield running


def test_an_organisation_token_named_otherwise_answers_for_its_referral(
    with_token: Loop,
) -> None:
    loop = with_token
    _moved_to_eastside(loop, "R-P3")
    key = quote(_record(loop).referral_key, safe="")
    answered = httpx.post(
        f"{loop.running.http_url}/referrals/{key}/status",
        json={"status": "accepted"},
        headers={"Authorization": f"Bearer {PUNCTUATED_TOKEN}"},
        timeout=10,
    )
    assert answered.status_code == 200, answered.text
    assert _record(loop).status == "accepted"


def test_a_modify_to_a_closed_organisation_warns_and_is_due_at_once(loop: Loop) -> None:
    assert loop.send(_referral("T-CL-1", "R-910")) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    wait_for(lambda: _record(loop).matches, what="the matches kept")
    assert INACTIVE not in _list(loop)

    moved = _referral("T-CL-2", "R-910", replace={**MODIFY, RT_SCFB: f"|{SOUTHTOWN}|"})
    started = datetime.now(UTC)
    assert loop.send(moved) == "AA"
    loop.settled("referral-changes/notify-referral-email", 2)
    wait_for(lambda: _warned(_record(loop)), what="the warning kept on the referral")
    record = _record(loop)
    assert record.due_at is not None and record.due_at <= datetime.now(UTC)
    assert record.due_at >= started
    listed = _list(loop)
    assert SOUTHTOWN in listed and INACTIVE in listed

    loop.running.hub.table.tick(datetime.now(UTC) + timedelta(minutes=1))
    wait_for(lambda: loop.emails_to(COORDINATOR), what="the coordinator's alert")
    (alert,) = loop.emails_to(COORDINATOR)
    assert alert["Subject"] == "Referral sent to an inactive service"
    assert SOUTHTOWN in alert.get_content()


def test_a_modify_away_from_a_closed_organisation_drops_its_warning(loop: Loop) -> None:
    to_southtown = {RT_SCFB: f"|{SOUTHTOWN}|"}
    assert loop.send(_referral("T-CL-3", "R-900", replace=to_southtown)) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    wait_for(lambda: _warned(_record(loop)), what="the warning kept on the referral")
    assert INACTIVE in _list(loop)

    moved = _referral("T-CL-4", "R-900", replace={**MODIFY, RT_SCFB: f"|{EASTSIDE}|"})
    assert loop.send(moved) == "AA"
    loop.settled("referral-changes/notify-referral-email", 2)
    wait_for(lambda: not _warned(_record(loop)), what="the warning gone")
    record = _record(loop)
    assert record.due_at is not None
    assert record.due_at > datetime.now(UTC) + timedelta(hours=23)  # Eastside's own time
    listed = _list(loop)
    assert EASTSIDE in listed and INACTIVE not in listed
    assert record.needs  # what the patient needs is kept: the modify carried it too


def test_a_prd_with_several_roles_still_names_the_organisation(loop: Loop) -> None:
    roles = "CP^Consulting provider^HL70286~RT^Referred to provider^HL70286"
    text = _referral(
        "T-ROLES-1",
        "R-ROLES",
        replace={f"PRD|RT^Referred to provider^HL70286{RT_SCFB}": f"PRD|{roles}|{EASTSIDE}|"},
    )
    assert loop.send(text) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    _, task = _owner(loop)
    assert task["owner"]["display"] == EASTSIDE
    (email,) = loop.settled("sdoh-referrals/notify-referral-email")
    assert str(email.metadata["to"]).endswith("@eastside.example.org")
    assert _record(loop).referred_to["organization"]["name"] == EASTSIDE


def _warned(record: ReferralRecord) -> list[Any]:
    return [m for m in record.matches or [] if isinstance(m, dict) and m.get("warning")]
