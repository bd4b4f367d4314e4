"""Answers to a referral on the shipped config, over real sockets (MLLP in, an aiosmtpd server,
a FHIR test server, carehub's HTTP API): an answer counts only from an organisation the
referral is with; an answer that overtook its referral is applied when the referral comes; an
answer whose sender carehub does not know names whom the referral is with; a reprocessed
answer does not tell the referrer again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import httpx
from click.testing import CliRunner

from carehub.cli import main
from carehub.referrals.state import (
    ReferralRecord,
    ReferralTimeline,
    list_referrals,
    referral_timeline,
)
from carehub.store.outbox import Outbox
from tests import test_referral_recipients as recipients
from tests.helpers_http import wait_for
from tests.test_referral_recipients import REFERRER, SCFB, Loop, _referral

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FEED_19 = (
    (PROJECT_ROOT / "config" / "feeds" / "19-foodbank-referral-accepted.hl7")
    .read_text()
    .replace("\n", "\r")
)
EASTSIDE = "Eastside Neighbors Pantry"
RT_SCFB = f"|{SCFB}|900 Market St^^Springfield^IL^62703"
RT_LINE = f"PRD|RT^Referred to provider^HL70286{RT_SCFB}\r"
MODIFY = {"REF^I12^REF_I12": "REF^I13^REF_I12"}


loop = recipients.loop  # the shipped config on a running hub, with its stand-ins


def _answer(
    control_id: str,
    referral_id: str,
    *,
    code: str = "A^Accepted",
    replace: dict[str, str] | None = None,
) -> str:
    """Feed 19 (the food bank accepts; PRD RT names it) as the answer to ``referral_id``."""
    text = (
        FEED_19.replace("|SCFB-9001|", f"|{control_id}|")
        .replace("|RGH-R-2026-0042|", f"|{referral_id}|")
        .replace("|A^Accepted^HL70283|", f"|{code}^HL70283|")
    )
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def _record(loop: Loop) -> ReferralRecord:
    (record,) = list_referrals(loop.running.store.engine)
    return record


def _timeline(loop: Loop, count: int) -> ReferralTimeline:
    """The referral's timeline once it has ``count`` rows."""
    engine = loop.running.store.engine

    def rows() -> int:
        made = list_referrals(engine)
        found = referral_timeline(engine, made[0].id or 0) if made else None
        return len(found.events) if found else 0

    wait_for(lambda: rows() >= count, timeout=20, what=f"{count} timeline rows")
    found = referral_timeline(engine, _record(loop).id or 0)
    assert found is not None
    return found


def _referrer_subjects(loop: Loop) -> list[str]:
    return [
        str(d.metadata["subject"])
        for d in Outbox(loop.running.store).find(limit=None)
        if d.metadata.get("to") == REFERRER
    ]


def _moved_to_eastside(loop: Loop, referral_id: str) -> None:
    """A referral sent to the food bank, then moved to Eastside by a modify (I13)."""
    assert loop.send(_referral(f"{referral_id}-1", referral_id)) == "AA"
    loop.settled("sdoh-referrals/notify-referral-email")
    moved = _referral(f"{referral_id}-2", referral_id, replace={**MODIFY, RT_SCFB: f"|{EASTSIDE}|"})
    assert loop.send(moved) == "AA"
    told = loop.settled("referral-changes/notify-referral-email", 2)
    assert sorted(d.metadata["kind"] for d in told) == ["referral_new", "referral_withdrawn"]


def test_a_late_answer_from_the_organisation_a_referral_was_taken_from_is_refused(
    loop: Loop,
) -> None:
    _moved_to_eastside(loop, "R-W1")
    before = _record(loop)
    assert before.status == "requested"

    # The food bank's old acceptance arrives after the referral was taken from it.
    assert loop.send(_answer("SCFB-LATE", "R-W1")) == "AA"
    refused = _timeline(loop, 3).events[-1]
    assert (refused.source, refused.action, refused.accepted) == (
        "RRI^I12",
        "other_organization",
        False,
    )
    assert refused.reason == (
        f"answer from {SCFB}, but the referral was withdrawn from it: it is with {EASTSIDE}"
    )
    after = _record(loop)
    assert after.status == "requested"
    assert after.due_at == before.due_at  # Eastside's clock runs on
    late = datetime.now(UTC) + timedelta(hours=25)
    assert [r.id for r in list_referrals(loop.running.store.engine, overdue_now=late)] == [after.id]
    loop.settled("referral-updates/referral-updates")
    assert loop.deliveries("referral-updates/notify-referral-email") == []
    assert _referrer_subjects(loop) == []

    # An organisation the referral never went to is refused too.
    other = _answer(
        "NS-1",
        "R-W1",
        replace={RT_LINE: "PRD|RT^Referred to provider^HL70286|Northside Shelter|\r"},
    )
    assert loop.send(other) == "AA"
    stranger = _timeline(loop, 4).events[-1]
    assert (stranger.action, stranger.accepted) == ("other_organization", False)
    assert stranger.reason == (
        f"answer from Northside Shelter, but the referral was not sent to it: it is with {EASTSIDE}"
    )

    # An answer that names no organisation is taken, as before: from its sender.
    unnamed = _answer(
        "EP-1",
        "R-W1",
        replace={RT_LINE: "", "|SCFB_REFERRALS|SPRINGFIELD_FOOD_BANK|": "|EASTSIDE_REF|EASTSIDE|"},
    )
    assert loop.send(unnamed) == "AA"
    wait_for(lambda: _record(loop).status == "accepted", what="the unnamed answer applied")
    wait_for(lambda: _referrer_subjects(loop), what="the referrer told")
    assert _referrer_subjects(loop) == ["Referral R-W1 accepted by EASTSIDE"]


def test_a_late_answer_naming_the_withdrawn_sender_only_is_refused(loop: Loop) -> None:
    """No PRD RT, but the sending facility is the name of the organisation it was taken from."""
    _moved_to_eastside(loop, "R-W2")
    answer = _answer(
        "SCFB-LATE-2",
        "R-W2",
        replace={RT_LINE: "", "|SCFB_REFERRALS|SPRINGFIELD_FOOD_BANK|": f"|SCFB_REFERRALS|{SCFB}|"},
    )
    assert loop.send(answer) == "AA"
    refused = _timeline(loop, 3).events[-1]
    assert (refused.action, refused.accepted) == ("other_organization", False)
    assert _record(loop).status == "requested"


def test_an_answer_that_overtook_its_referral_is_applied_when_the_referral_comes(
    loop: Loop,
) -> None:
    # The food bank's answer (echoing RF1-6 without its authority, as feed 19 does) comes
    # first: there is no referral yet, and it is refused as unknown.
    assert loop.send(_answer("SCFB-EARLY", "R-NOPE")) == "AA"
    wait_for(
        lambda: any(m.control_id == "SCFB-EARLY" for m in loop.running.store.find(limit=None)),
        what="the answer stored",
    )
    loop.settled("referral-updates/referral-updates")
    assert list_referrals(loop.running.store.engine) == []

    assert loop.send(_referral("T-EARLY-1", "R-NOPE")) == "AA"
    timeline = _timeline(loop, 3)
    assert [(e.source, e.action, e.to_status, e.accepted) for e in timeline.events] == [
        ("RRI^I12", "unknown_referral", "accepted", False),
        ("REF^I12", "created", "requested", True),
        ("RRI^I12", "status", "accepted", True),
    ]
    assert timeline.events[0].detail["control_id"] == "SCFB-EARLY"
    assert timeline.events[2].detail["control_id"] == "SCFB-EARLY"
    record = _record(loop)
    assert record.status == "accepted"
    # Answered: not reported overdue once its time is up.
    late = datetime.now(UTC) + timedelta(hours=25)
    assert list_referrals(loop.running.store.engine, overdue_now=late) == []

    # The organisation gets the referral, and the referrer hears the answer, with its note.
    loop.settled("sdoh-referrals/notify-referral-email", 2)
    wait_for(lambda: loop.emails_to(REFERRER), what="the referrer's email")
    (told,) = loop.emails_to(REFERRER)
    assert told["Subject"] == f"Referral R-NOPE accepted by {SCFB}"
    assert "Intake appointment booked for Monday 10:00" in told.get_content()


def test_an_answer_over_http_without_its_sender_names_whom_the_referral_is_with(
    loop: Loop,
) -> None:
    _moved_to_eastside(loop, "R-W6")
    key = quote(_record(loop).referral_key, safe="")
    answer = httpx.post(
        f"{loop.running.http_url}/referrals/{key}/status", json={"status": "accepted"}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    assert "sent_to" not in answer.json()  # whom it is with is not the caller's to learn
    loop.running.hub.table.tick(datetime.now(UTC))
    wait_for(lambda: loop.emails_to(REFERRER), what="the referrer's email")
    (told,) = loop.emails_to(REFERRER)
    holder = f"{EASTSIDE} (the organisation the referral is with)"
    assert told["Subject"] == f"Referral R-W6 accepted by {holder}"
    assert f"{holder} has accepted your referral" in told.get_content()


def test_a_reprocessed_answer_does_not_tell_the_referrer_again(loop: Loop, tmp_path: Path) -> None:
    assert loop.send(_referral("T-RP-1", "R-RP")) == "AA"
    loop.settled("sdoh-referrals/notify-referral-email")
    assert loop.send(_answer("SCFB-RP", "R-RP")) == "AA"
    wait_for(lambda: len(loop.emails_to(REFERRER)) == 1, what="the acceptance told")
    key = quote(_record(loop).referral_key, safe="")
    done = httpx.post(
        f"{loop.running.http_url}/referrals/{key}/status", json={"status": "completed"}, timeout=10
    )
    assert done.status_code == 200, done.text
    loop.running.hub.table.tick(datetime.now(UTC))
    wait_for(lambda: len(loop.emails_to(REFERRER)) == 2, what="the completion told")

    (answer,) = [m for m in loop.running.store.find(limit=None) if m.control_id == "SCFB-RP"]
    result = CliRunner().invoke(
        main,
        [
            "messages",
            "reprocess",
            str(answer.id),
            "--config",
            str(tmp_path / "config" / "carehub.yaml"),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert f"message {answer.id} (run 2):" in result.output
    loop.settled("referral-updates/referral-updates", 2)  # the route ran again
    (decision,) = [
        s.output
        for s in Outbox(loop.running.store).steps(answer.id)
        if s.run == 2 and s.step.startswith("notify-referral")
    ]
    assert decision[0]["status"] == "suppressed"
    assert decision[0]["reason"].startswith("told by run 1 of this message")
    assert _record(loop).status == "completed"
    assert len(_referrer_subjects(loop)) == 2  # no outdated "accepted" after the completion
