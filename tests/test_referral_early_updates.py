"""Updates that overtake the referral they are about, on the shipped config over real sockets
(MLLP in, an aiosmtpd server, a FHIR test server, the `carehub` command line): an answer is
applied to the referral of its own patient only (two hospitals both number a referral R-310);
the referrer's cancel that came first cancels the referral when it comes, and nothing is sent
to the organisation; nor is a referral an early answer declined; `messages reprocess` applies
a cancel whose referral is on file now; `referrals refused` says which refusals were applied
later; a message that belongs to no referral still reaches the referral desk."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from carehub.cli import main
from carehub.referrals.state import (
    ReferralRecord,
    list_referrals,
    referral_timeline,
    refused_referral_events,
)
from carehub.store.outbox import Outbox
from carehub.store.store import StoredMessage
from tests import test_referral_recipients as recipients
from tests.helpers_http import wait_for
from tests.test_referral_recipients import REFERRER, SCFB, Loop, _referral
from tests.test_referral_state_answers import RT_LINE, _answer

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RIVERSIDE_PATIENT = "RG100234^^^RGH^MR"
LAKEVIEW_PATIENT = "LM448807^^^LMC^MR"
LAKEVIEW = {
    "|RGH_REF|RIVERSIDE_GH|": "|LMC_REF|LAKEVIEW_MC|",
    RIVERSIDE_PATIENT: LAKEVIEW_PATIENT,
    f"|{SCFB}|": "|Capital Rides|",
}
#: Capital Rides answers Lakeview's referral: no PRD naming itself, its patient's PID.
CAPITAL_RIDES = {
    "|SCFB_REFERRALS|SPRINGFIELD_FOOD_BANK|": "|CR_REFERRALS|CAPITAL_RIDES|",
    RT_LINE: "",
    RIVERSIDE_PATIENT: LAKEVIEW_PATIENT,
}
CANCEL = {"REF^I12^REF_I12": "REF^I14^REF_I12"}
SCFB_INTAKE = "@scfb.example.org"


loop = recipients.loop  # the shipped config on a running hub, with its stand-ins


def _message(loop: Loop, control_id: str, settled: bool = True) -> StoredMessage:
    """The stored message with MSH-10 ``control_id``, once routed (and its deliveries done)."""
    done = ("delivered", "failed") if settled else ("routed", "delivered", "failed")

    def found() -> list[StoredMessage]:
        return [
            m
            for m in loop.running.store.find(limit=None)
            if m.control_id == control_id and m.status in done
        ]

    return wait_for(found, what=f"message {control_id} routed")[0]


def _referral_of(loop: Loop, key: str) -> ReferralRecord:
    def found() -> list[ReferralRecord]:
        engine = loop.running.store.engine
        return [r for r in list_referrals(engine, limit=None) if r.referral_key == key]

    return wait_for(found, what=f"referral {key}")[0]


def _timeline(loop: Loop, key: str) -> list[tuple[str, str, str | None, bool]]:
    found = referral_timeline(loop.running.store.engine, key)
    assert found is not None
    return [(e.source, e.action, e.to_status, e.accepted) for e in found.events]


def _unattached(loop: Loop, message_id: int) -> list[Any]:
    engine = loop.running.store.engine
    return [
        e
        for e in refused_referral_events(engine, unattached_only=True, limit=None)
        if e.message_id == message_id
    ]


def _emails_to_the_food_bank(loop: Loop) -> list[Any]:
    return [
        d
        for d in Outbox(loop.running.store).find(limit=None)
        if str(d.metadata.get("to", "")).endswith(SCFB_INTAKE)
    ]


def _cli(loop: Loop, *args: str) -> str:
    """`carehub ARGS` against the running hub's config and data."""
    hub = loop.running.hub
    assert hub.config.source is not None
    result = CliRunner(env={"COLUMNS": "240"}).invoke(
        main,
        [*args, "--config", str(hub.config.source), "--data-dir", str(hub.data_dir)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.output)


def test_an_early_answer_goes_to_the_referral_of_its_own_patient(loop: Loop) -> None:
    # Capital Rides declines Lakeview's R-310 before Lakeview's I12 reaches carehub.
    early = _answer("CR-EARLY", "R-310", code="R^Rejected", replace=CAPITAL_RIDES)
    assert loop.send(early) == "AA"
    answer = _message(loop, "CR-EARLY")
    assert answer.status == "delivered"  # kept for its referral, not failed

    # Riverside's own R-310 (another patient) comes first: the answer is not its.
    assert loop.send(_referral("RGH-310", "R-310")) == "AA"
    riverside = _referral_of(loop, "RIVERSIDE_GH|R-310")
    _message(loop, "RGH-310")
    assert riverside.status == "requested"
    assert _timeline(loop, "RIVERSIDE_GH|R-310") == [("REF^I12", "created", "requested", True)]
    (waiting,) = _unattached(loop, answer.id)  # still waiting for its own referral
    assert waiting.reason == "no referral R-310"
    listed = _cli(loop, "referrals", "refused", "--unattached", "--json").splitlines()
    assert [json.loads(line)["control_id"] for line in listed] == ["CR-EARLY"]

    # Lakeview's R-310 comes: the answer is applied to it, and only the referrer of that
    # referral hears "declined".
    assert loop.send(_referral("LMC-310", "R-310", replace=LAKEVIEW)) == "AA"
    lakeview = _referral_of(loop, "LAKEVIEW_MC|R-310")
    assert lakeview.patient_key == "LMC|LM448807"
    _message(loop, "LMC-310")
    assert _timeline(loop, "LAKEVIEW_MC|R-310") == [
        ("RRI^I12", "unknown_referral", "rejected", False),
        ("REF^I12", "created", "requested", True),
        ("RRI^I12", "status", "rejected", True),
    ]
    assert _referral_of(loop, "LAKEVIEW_MC|R-310").status == "rejected"
    assert _referral_of(loop, "RIVERSIDE_GH|R-310").status == "requested"
    assert _unattached(loop, answer.id) == []
    wait_for(lambda: loop.emails_to(REFERRER), what="the referrer told")
    (told,) = loop.emails_to(REFERRER)
    assert told["Subject"] == "Referral R-310 declined by CAPITAL_RIDES"


def test_an_answer_for_another_patients_referral_waits_for_its_own(loop: Loop) -> None:
    """The same when the other hospital's referral is on file already: an answer echoing the
    bare id is not applied to a referral of another patient."""
    assert loop.send(_referral("RGH-320", "R-320")) == "AA"
    _message(loop, "RGH-320")
    answer_text = _answer("CR-320", "R-320", code="R^Rejected", replace=CAPITAL_RIDES)
    assert loop.send(answer_text) == "AA"
    answer = _message(loop, "CR-320")
    (waiting,) = _unattached(loop, answer.id)
    assert waiting.reason == "no referral R-320 for the patient the answer names (PID-3)"
    assert _referral_of(loop, "RIVERSIDE_GH|R-320").status == "requested"

    assert loop.send(_referral("LMC-320", "R-320", replace=LAKEVIEW)) == "AA"
    _message(loop, "LMC-320")
    assert _referral_of(loop, "LAKEVIEW_MC|R-320").status == "rejected"
    assert _referral_of(loop, "RIVERSIDE_GH|R-320").status == "requested"


def test_a_cancel_that_came_first_cancels_the_referral_and_nothing_is_sent(
    loop: Loop, tmp_path: Path
) -> None:
    assert loop.send(_referral("RGH-600-X", "R-600", replace=CANCEL)) == "AA"
    cancel = _message(loop, "RGH-600-X")
    assert cancel.status == "failed"
    assert cancel.detail is not None and "REF^I14 not tracked" in cancel.detail
    (refused,) = _unattached(loop, cancel.id)

    # Reprocessed before its referral came: the same refusal, not recorded twice.
    again = _reprocess(tmp_path, cancel.id, exit_code=1)
    assert "REF^I14 not tracked" in again
    loop.settled("referral-changes/referral-updates", 2)  # the desk's copy, once a run
    assert loop.running.store.get(cancel.id).status == "failed"
    assert [e.id for e in _unattached(loop, cancel.id)] == [refused.id]

    assert loop.send(_referral("RGH-600", "R-600")) == "AA"
    created = _message(loop, "RGH-600")
    assert _referral_of(loop, "RIVERSIDE_GH|R-600").status == "cancelled"
    assert _timeline(loop, "RIVERSIDE_GH|R-600") == [
        ("REF^I14", "unknown_referral", "cancelled", False),
        ("REF^I12", "created", "requested", True),
        ("REF^I14", "cancelled", "cancelled", True),
    ]
    # Nothing went to the organisation: no "New referral", no FHIR Task to poll.
    (fhir,) = loop.settled("sdoh-referrals/cbo-platform")
    assert fhir.status == "skipped" and "cancelled already" in (fhir.receipt or "")
    assert loop.fhir.posts == []
    assert _emails_to_the_food_bank(loop) == []
    (decision,) = [
        s.output
        for s in Outbox(loop.running.store).steps(created.id)
        if s.step.startswith("notify-referral")
    ]
    assert decision[0]["status"] == "suppressed"
    assert "cancelled already" in decision[0]["reason"]
    assert _unattached(loop, cancel.id) == []

    # Reprocessed now, the cancel finds its referral: the message is no longer failed.
    assert "errors" not in _reprocess(tmp_path, cancel.id)
    wait_for(
        lambda: loop.running.store.get(cancel.id).status == "delivered",
        what="the reprocessed cancel delivered",
    )
    assert _referral_of(loop, "RIVERSIDE_GH|R-600").status == "cancelled"


def test_a_referral_an_early_answer_declined_is_not_sent_and_its_refusal_says_so(
    loop: Loop,
) -> None:
    assert loop.send(_answer("SCFB-400", "R-400", code="R^Rejected")) == "AA"
    _message(loop, "SCFB-400")
    assert loop.send(_referral("RGH-400", "R-400")) == "AA"
    _message(loop, "RGH-400")
    assert _referral_of(loop, "RIVERSIDE_GH|R-400").status == "rejected"

    # The referrer hears it was declined; the food bank, which declined it, is not sent it.
    wait_for(lambda: loop.emails_to(REFERRER), what="the referrer told")
    (told,) = loop.emails_to(REFERRER)
    assert told["Subject"] == f"Referral R-400 declined by {SCFB}"
    assert _emails_to_the_food_bank(loop) == []
    (fhir,) = loop.settled("sdoh-referrals/cbo-platform")
    assert fhir.status == "skipped"
    assert loop.created("Task") == []

    # `referrals refused` says the answer refused for want of its referral was applied later.
    rows = [json.loads(line) for line in _cli(loop, "referrals", "refused", "--json").splitlines()]
    (early,) = [r for r in rows if r["control_id"] == "SCFB-400"]
    assert early["applied_later"] is True
    assert "applied later" in _cli(loop, "referrals", "refused")


def test_an_answer_relayed_by_the_hospitals_engine_is_told_as_the_holders(loop: Loop) -> None:
    assert loop.send(_referral("RGH-800", "R-800")) == "AA"
    loop.settled("sdoh-referrals/notify-referral-email")
    relayed = _answer(
        "RGH-IE-800",
        "R-800",
        replace={RT_LINE: "", "|SCFB_REFERRALS|SPRINGFIELD_FOOD_BANK|": "|RGH_IE|RIVERSIDE_GH|"},
    )
    assert loop.send(relayed) == "AA"
    wait_for(lambda: loop.emails_to(REFERRER), what="the referrer told")
    (told,) = loop.emails_to(REFERRER)
    holder = f"{SCFB} (the organisation the referral is with)"
    assert told["Subject"] == f"Referral R-800 accepted by {holder}"
    assert "RIVERSIDE_GH" not in told.get_content()


def test_a_referral_message_with_no_referral_still_reaches_the_referral_desk(
    loop: Loop, tmp_path: Path
) -> None:
    no_id = _referral("RGH-NOID", "R-700", replace={"|R-700|": "||"})
    assert loop.send(no_id) == "AA"
    message = _message(loop, "RGH-NOID")
    # Failed, with why, for an operator to handle ...
    assert message.status == "failed"
    assert message.detail is not None and "the message has no referral id" in message.detail
    # ... and the desk's copy is written, while nothing goes to an organisation.
    (desk,) = loop.settled("sdoh-referrals/referral-desk")
    assert desk.status == "delivered"
    written = list((tmp_path / "outbox" / "referrals").iterdir())
    assert len(written) == 1 and "RGH-NOID" in written[0].read_text()
    (fhir,) = loop.settled("sdoh-referrals/cbo-platform")
    assert fhir.status == "skipped"
    assert loop.fhir.posts == [] and _emails_to_the_food_bank(loop) == []
    assert list_referrals(loop.running.store.engine) == []


def _reprocess(tmp_path: Path, message_id: int, exit_code: int = 0) -> str:
    """`carehub messages reprocess ID`: it routes the message again and says how it went."""
    result = CliRunner().invoke(
        main,
        [
            *("messages", "reprocess", str(message_id)),
            *("--config", str(tmp_path / "config" / "carehub.yaml")),
            *("--data-dir", str(tmp_path / "data")),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == exit_code, result.output
    return result.output
