"""The organisation a referral was sent to hears of the referrer's later messages, whichever
channel it was sent on: a cancel (REF^I14) and a change (REF^I13) by email as well as on the
FHIR copy, and a change that names another organisation takes the referral from the first
(told it is withdrawn; its FHIR Task moves) and gives it to the second. On the shipped config,
over real sockets (MLLP in, an aiosmtpd server, a FHIR test server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

from click.testing import CliRunner

from carehub.cli import main
from carehub.referrals.state import list_referrals
from carehub.routing.router import PlannedDelivery, RoutingResult
from carehub.testing import run_routes_all
from tests.helpers_http import wait_for
from tests.test_referral_recipients import FEED_07, SCFB, Loop, _referral, loop

__all__ = ["loop"]  # the fixture, used by name

REFERRAL = "RGH-R-2026-0042"
NEW = "REF^I12^REF_I12"
EASTSIDE = "Eastside Neighbors Pantry"
CONFIG = Path(__file__).resolve().parents[1] / "config" / "carehub.yaml"


def _later(control_id: str, trigger: str, replace: dict[str, str] | None = None) -> str:
    """Feed 07's referral again, as the referrer's modify (I13) or cancel (I14)."""
    changes = {NEW: f"REF^{trigger}^REF_I12", **(replace or {})}
    return _referral(control_id, REFERRAL, replace=changes)


def _sent_new(loop: Loop) -> str:
    """Send the referral; the address its organisation's email went to."""
    assert loop.send(FEED_07) == "AA"
    (email,) = loop.settled("sdoh-referrals/notify-referral-email")
    return str(email.metadata["to"])


def _mail(loop: Loop, address: str, count: int) -> list[EmailMessage]:
    wait_for(lambda: len(loop.emails_to(address)) >= count, timeout=20, what=f"{count} emails")
    return loop.emails_to(address)


def test_a_cancel_reaches_the_organisation_the_referral_was_emailed_to(loop: Loop) -> None:
    address = _sent_new(loop)
    assert loop.send(_later("T-CX-1", "I14")) == "AA"
    (told,) = loop.settled("referral-changes/notify-referral-email")
    assert told.metadata["to"] == address
    _, cancelled = _mail(loop, address, 2)
    assert cancelled["Subject"] == f"Referral {REFERRAL} cancelled by Dr Samir Haddad"
    text = cancelled.get_content()
    assert "has cancelled referral" in text and "Okafor" in text
    assert "Z59" not in text  # no codes, as in every notice to an organisation
    # The FHIR copy follows too: the Task is cancelled.
    wait_for(
        lambda: [t["status"] for t in loop.created("Task")] == ["cancelled"],
        timeout=20,
        what="the Task cancelled",
    )
    # A second cancel changes nothing and tells nobody again.
    assert loop.send(_later("T-CX-2", "I14")) == "AA"
    wait_for(lambda: loop.running.store.get(3) is not None, what="the resend stored")
    assert len(loop.deliveries("referral-changes/notify-referral-email")) == 1


def test_a_change_of_priority_reaches_the_organisation(loop: Loop) -> None:
    address = _sent_new(loop)
    urgent = _later("T-MD-1", "I13", {"R^Routine^HL70280": "S^STAT^HL70280"})
    assert loop.send(urgent) == "AA"
    (told,) = loop.settled("referral-changes/notify-referral-email")
    assert told.metadata["to"] == address
    _, changed = _mail(loop, address, 2)
    assert changed["Subject"] == f"Referral {REFERRAL} updated by Dr Samir Haddad"
    lines = changed.get_content().splitlines()
    assert "Changed: priority" in lines and "Priority: STAT" in lines  # each on its own line
    assert any("still stands with you" in line for line in lines)


def test_a_modify_that_changes_nothing_tells_the_organisation_nothing(loop: Loop) -> None:
    _sent_new(loop)
    assert loop.send(_later("T-MD-2", "I13")) == "AA"
    loop.settled("referral-changes/cbo-platform")
    assert loop.deliveries("referral-changes/notify-referral-email") == []


def test_a_modify_naming_another_organisation_moves_the_referral_to_it(loop: Loop) -> None:
    first = _sent_new(loop)
    loop.settled("sdoh-referrals/cbo-platform")
    moved = _later(
        "T-MV-1",
        "I13",
        {f"|{SCFB}|900 Market St^^Springfield^IL^62703": f"|{EASTSIDE}|"},
    )
    assert loop.send(moved) == "AA"
    told = loop.settled("referral-changes/notify-referral-email", 2)
    kinds = {d.metadata["to"]: d.metadata["kind"] for d in told}
    assert kinds[first] == "referral_withdrawn"
    (second,) = [a for a in kinds if a != first]
    assert second.endswith("@eastside.example.org")
    assert kinds[second] == "referral_new"
    _, withdrawn = _mail(loop, first, 2)
    assert withdrawn["Subject"] == f"Referral {REFERRAL} withdrawn by Dr Samir Haddad"
    assert EASTSIDE not in withdrawn.get_content()  # the first needs not know who has it now
    (new,) = _mail(loop, second, 1)
    assert new["Subject"].startswith(f"New referral {REFERRAL}")
    # The FHIR copy moves too: the Task and ServiceRequest name the new organisation.
    wait_for(
        lambda: [t["owner"]["display"] for t in loop.created("Task")] == [EASTSIDE],
        timeout=20,
        what="the Task's owner changed",
    )
    (request,) = loop.created("ServiceRequest")
    assert request["performer"][0]["display"] == EASTSIDE
    assert loop.fhir.problems == []
    # A cancel now reaches the organisation that has it, not the one it was taken from.
    assert (
        loop.send(
            _later(
                "T-MV-2", "I14", {f"|{SCFB}|900 Market St^^Springfield^IL^62703": f"|{EASTSIDE}|"}
            )
        )
        == "AA"
    )
    (cancelled,) = _mail(loop, second, 2)[1:]
    assert cancelled["Subject"].startswith(f"Referral {REFERRAL} cancelled")
    assert len(loop.emails_to(first)) == 2


def test_a_dry_run_tells_the_organisation_of_a_cancel_too(tmp_path: Path) -> None:
    """`carehub routes test` and run_routes_all have no outbox: what was sent to whom is
    remembered across the messages of the run."""
    messages = FEED_07 + "\r" + _later("T-DR-1", "I14")
    first, cancel = run_routes_all(messages.encode(), CONFIG, tmp_path / "data")
    (sent,) = _emails(first, "sdoh-referrals")
    (cancelled,) = _emails(cancel, "referral-changes")
    assert sent.outgoing.metadata["kind"] == "referral_new"
    assert cancelled.outgoing.metadata["kind"] == "referral_cancelled"
    assert cancelled.outgoing.metadata["to"] == sent.outgoing.metadata["to"]


def _emails(result: RoutingResult, route: str) -> list[PlannedDelivery]:
    (found,) = [r for r in result.routes if r.route == route]
    return [d for d in found.deliveries if d.destination.endswith("notify-referral-email")]


TO_SCFB = f"|{SCFB}|900 Market St^^Springfield^IL^62703"
DIAGNOSES = (
    "DG1|1||Z59.41^Food insecurity^I10||20261127|F\r",
    "DG1|2||Z59.811^Housing instability, housed, with risk of homelessness^I10||20261127|F",
)


def test_a_redirect_without_diagnoses_still_reaches_the_new_organisation(loop: Loop) -> None:
    """A modify that names another organisation often carries no DG1: the new organisation
    is still found in the directory and emailed there."""
    first = _sent_new(loop)
    bare = dict.fromkeys(DIAGNOSES, "")
    assert loop.send(_later("T-MV-3", "I13", {TO_SCFB: f"|{EASTSIDE}|", **bare})) == "AA"
    told = loop.settled("referral-changes/notify-referral-email", 2)
    kinds = {d.metadata["to"]: d.metadata["kind"] for d in told}
    assert kinds[first] == "referral_withdrawn"
    (second,) = [a for a in kinds if a != first]
    assert second.endswith("@eastside.example.org") and kinds[second] == "referral_new"


def test_the_same_organisation_written_otherwise_has_not_changed(loop: Loop) -> None:
    address = _sent_new(loop)
    loop.settled("sdoh-referrals/cbo-platform")
    shouted = _later(
        "T-MV-4",
        "I13",
        {TO_SCFB: f"|{SCFB.upper()}|", "R^Routine^HL70280": "A^ASAP^HL70280"},
    )
    assert loop.send(shouted) == "AA"
    (told,) = loop.settled("referral-changes/notify-referral-email")
    assert told.metadata["to"] == address and told.metadata["kind"] == "referral_changed"
    _, changed = _mail(loop, address, 2)
    lines = changed.get_content().splitlines()
    assert "Changed: priority" in lines  # not "receiving organisation"
    assert "Priority: ASAP" in lines
    loop.settled("referral-changes/cbo-platform")
    (task,) = loop.created("Task")
    assert task["owner"]["display"] == SCFB  # not patched to the other spelling


def test_the_organisation_a_referral_moves_to_answers_afresh(loop: Loop) -> None:
    """The first organisation accepted; the referral then moved: the second one has not
    answered yet, so the referral is requested again, with a new deadline, and its Task too."""
    _sent_new(loop)
    loop.settled("sdoh-referrals/cbo-platform")
    rri = (
        "MSH|^~\\&|SCFB_REF|SCFB|CAREHUB|CAREHUB|20261128093000-0600||RRI^I12^RRI_I12|SC-1|P|2.5\r"
        "MSA|AA|RGH-REF-7001\r"
        f"RF1|A^Accepted^HL70283|R^Routine^HL70280|SO^Social services^HL70281|||{REFERRAL}\r"
        "PID|1||RG100234^^^RGH^MR||Okafor^Amara^N||19580312|F\r"
    )
    assert loop.send(rri) == "AA"
    wait_for(
        lambda: list_referrals(loop.running.store.engine)[0].status == "accepted",
        what="accepted by the food bank",
    )
    assert loop.send(_later("T-MV-5", "I13", {TO_SCFB: f"|{EASTSIDE}|"})) == "AA"
    wait_for(
        lambda: list_referrals(loop.running.store.engine)[0].status == "requested",
        what="requested again",
    )
    (referral,) = list_referrals(loop.running.store.engine)
    assert referral.due_at is not None and referral.due_at > referral.created_at
    loop.settled("referral-changes/cbo-platform")
    (task,) = loop.created("Task")
    assert (task["owner"]["display"], task["status"]) == (EASTSIDE, "requested")


NO_RECIPIENT = {TO_SCFB.replace("|", "PRD|RT^Referred to provider^HL70286|", 1) + "\r": ""}
HELD = {
    **NO_RECIPIENT,
    "Food and housing support after discharge": "Please help",
    **dict.fromkeys(DIAGNOSES, ""),
}


def test_naming_an_organisation_moves_a_referral_that_went_to_a_directory_match(
    loop: Loop,
) -> None:
    """The I12 named nobody and went to the top match; the I13 names another organisation."""
    assert loop.send(_referral("T-UN-1", REFERRAL, replace=NO_RECIPIENT)) == "AA"
    (email,) = loop.settled("sdoh-referrals/notify-referral-email")
    first = str(email.metadata["to"])
    loop.settled("sdoh-referrals/cbo-platform")
    moved = _later("T-UN-2", "I13", NO_RECIPIENT).rstrip("\r") + (
        f"\rPRD|RT^Referred to provider^HL70286|{EASTSIDE}|\r"
    )
    assert loop.send(moved) == "AA"
    told = loop.settled("referral-changes/notify-referral-email", 2)
    kinds = {d.metadata["to"]: d.metadata["kind"] for d in told}
    assert kinds[first] == "referral_withdrawn"
    assert any(
        k == "referral_new" and a.endswith("@eastside.example.org") for a, k in kinds.items()
    )
    wait_for(
        lambda: [t["owner"]["display"] for t in loop.created("Task")] == [EASTSIDE],
        timeout=20,
        what="the Task moved to the organisation named",
    )


def test_a_held_referral_goes_out_when_a_modify_names_an_organisation(loop: Loop) -> None:
    assert loop.send(_referral("T-HD-1", REFERRAL, replace=HELD)) == "AA"
    (held,) = loop.settled("sdoh-referrals/cbo-platform")
    assert held.status == "skipped"
    assert held.receipt.startswith("no community organisation chosen")
    named = _later("T-HD-2", "I13", HELD).rstrip("\r") + (
        f"\rPRD|RT^Referred to provider^HL70286|{EASTSIDE}|\r"
    )
    assert loop.send(named) == "AA"
    (sent,) = loop.settled("referral-changes/cbo-platform")
    assert sent.status == "delivered", sent.receipt
    (task,) = loop.created("Task")
    assert task["owner"]["display"] == EASTSIDE and task["status"] == "requested"
    (email,) = loop.settled("referral-changes/notify-referral-email")
    assert email.metadata["kind"] == "referral_new"
    assert str(email.metadata["to"]).endswith("@eastside.example.org")


def test_cancelling_a_held_referral_sends_nothing_and_holds_nobodys_line(loop: Loop) -> None:
    assert loop.send(_referral("T-HD-3", REFERRAL, replace=HELD)) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    assert loop.send(_later("T-HD-4", "I14", HELD)) == "AA"
    (cancel,) = loop.settled("referral-changes/cbo-platform")
    assert "never sent to an organisation" in cancel.receipt
    assert loop.fhir.posts == [] and loop.deliveries("referral-changes/notify-referral-email") == []


def test_a_held_referral_is_shown_and_alerted_as_not_sent(loop: Loop) -> None:
    """Nobody failed to answer a referral that went nowhere: the list says it is held, and the
    coordinator's alert says it was not sent and what to do, not that nobody answered."""
    assert loop.send(_referral("T-HD-5", REFERRAL, replace=HELD)) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    loop.running.hub.table.tick(datetime.now(UTC) + timedelta(days=2))
    coordinator = "cc-team@riverside-cm.example.org"
    (alert,) = _mail(loop, coordinator, 1)
    assert alert["Subject"] == "Referral not sent"  # the name only in the body
    assert "Amara Okafor" in alert.get_content()
    assert "has not been sent to any organisation" in alert.get_content()
    assert "no answer" not in alert.get_content()
    config = str(loop.running.hub.config.source)
    listed = CliRunner().invoke(
        main,
        ["referrals", "list", "--config", config, "--data-dir", str(loop.running.hub.data_dir)],
    )
    assert "held: nobody named, nothing" in listed.output, listed.output


def test_a_referral_sent_to_its_directory_match_shows_whom(loop: Loop) -> None:
    assert loop.send(_referral("T-UN-3", REFERRAL, replace=NO_RECIPIENT)) == "AA"
    (email,) = loop.settled("sdoh-referrals/notify-referral-email")
    config = str(loop.running.hub.config.source)
    shown = CliRunner().invoke(
        main,
        [
            "referrals",
            "show",
            REFERRAL,
            "--config",
            config,
            "--data-dir",
            str(loop.running.hub.data_dir),
        ],
    )
    assert shown.exit_code == 0, shown.output
    assert email.metadata["recipient_name"] in shown.output
