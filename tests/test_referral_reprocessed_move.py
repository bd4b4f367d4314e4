"""`messages reprocess` of a modify (REF^I13) that moved a referral to another organisation,
after that organisation accepted it on the FHIR platform: the platform Task keeps its
"accepted" (the move's status reset is for a Task still the previous owner's), carehub and the
platform go on agreeing, and the organisation is not emailed again about the change that sent
it the referral. The shipped config on a real hub over MLLP, a FHIR test server polled for its
Task, an aiosmtpd server, and the `carehub` command line."""

from __future__ import annotations

from pathlib import Path

from carehub.store.outbox import Outbox
from tests import test_referral_recipients as recipients
from tests.test_referral_answers_organisations import _channel, _record
from tests.test_referral_early_updates import _message
from tests.test_referral_recipients import Loop
from tests.test_referral_state_answers import EASTSIDE, _moved_to_eastside
from tests.test_reprocess_counts_suppressed_referral_notices import _reprocess, _second_run

loop = recipients.loop  # the shipped config on a running hub, with its stand-ins


def _told(loop: Loop, address: str) -> list[str]:
    """The kinds of the organisation notices queued or sent to ``address``, every run."""
    return sorted(
        d.metadata["kind"]
        for d in Outbox(loop.running.store).find(limit=None)
        if d.metadata.get("to") == address and d.status != "discarded"
    )


def test_a_reprocessed_move_keeps_the_new_organisations_accept_and_tells_it_nothing_again(
    loop: Loop, tmp_path: Path
) -> None:
    _moved_to_eastside(loop, "R-RPM")
    loop.settled("referral-changes/cbo-platform")
    (task_ref,) = [ref for ref in loop.fhir.resources if ref.startswith("Task/")]
    task = loop.fhir.resources[task_ref]
    assert (task["owner"]["display"], task["status"]) == (EASTSIDE, "requested")
    (sent,) = [
        d
        for d in loop.settled("referral-changes/notify-referral-email", 2)
        if d.metadata["kind"] == "referral_new"
    ]
    eastside = sent.metadata["to"]

    # Eastside accepts on the platform; the poll brings it to carehub.
    loop.fhir.act(task_ref, "accepted")
    (accepted,) = _channel(loop).poll()
    assert (accepted.action, accepted.status) == ("status", "accepted")

    moved = _message(loop, "R-RPM-2")
    queued, _, line = _reprocess(tmp_path, moved.id)
    run = _second_run(loop, moved.id)
    assert "referral-changes/cbo-platform" in [d.destination for d in run], line

    # The platform Task is still Eastside's and still accepted: nothing for the poll to
    # refuse, and carehub agrees with it.
    task = loop.fhir.resources[task_ref]
    assert (task["owner"]["display"], task["status"]) == (EASTSIDE, "accepted")
    assert _channel(loop).poll() == []
    assert _record(loop).status == "accepted"
    assert loop.fhir.problems == []

    # Eastside was sent the referral by the first run; the second tells it nothing more.
    assert _told(loop, eastside) == ["referral_new"]
    assert "told by run 1 of this message" in line
    assert queued == len(run)


def test_a_reprocessed_move_keeps_an_accept_the_poll_has_not_brought_yet(
    loop: Loop, tmp_path: Path
) -> None:
    """The platform is read before the move is sent again: an accept made there since the
    last poll is the new owner's answer too."""
    _moved_to_eastside(loop, "R-RPN")
    loop.settled("referral-changes/cbo-platform")
    (task_ref,) = [ref for ref in loop.fhir.resources if ref.startswith("Task/")]
    loop.fhir.act(task_ref, "accepted")  # not polled yet: carehub still says requested
    assert _record(loop).status == "requested"

    moved = _message(loop, "R-RPN-2")
    _reprocess(tmp_path, moved.id)
    _second_run(loop, moved.id)
    task = loop.fhir.resources[task_ref]
    assert (task["owner"]["display"], task["status"]) == (EASTSIDE, "accepted")

    (accepted,) = _channel(loop).poll()  # and the poll brings it as Eastside's answer
    assert (accepted.action, accepted.status, accepted.answered_by) == (
        "status",
        "accepted",
        EASTSIDE,
    )
