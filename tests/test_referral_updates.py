"""A referral's later life at the organisation's FHIR server: one ServiceRequest and Task per
referral whatever the MSH-10, a modify (REF^I13) and a cancel (REF^I14) patched onto them, and
the referrer told when the organisation answers a referral carehub knows is cancelled. Real
FHIR test server (conditional create and conditional patch, all validated with fhir.resources),
real SQLite store; the last tests run the shipped config over MLLP and HTTP."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from carehub.components import ComponentContext, DeliveryError, NothingToSend, Work
from carehub.referrals.state import ReferralStateEnricher, ReferralTracker, list_referrals
from carehub.store.outbox import Outbox
from carehub.store.store import MessageStore
from carehub.testing import HubThread
from tests import test_fhir_referrals as fhir_tests
from tests import test_referral_loop_e2e as loop_e2e
from tests.helpers_http import wait_for
from tests.test_fhir_referrals import KEY, FhirServer, Sent, channel_for, ref_i12, send, work_for

# Fixtures: a FHIR test server; a migrated SQLite store; the shipped config on a running hub.
fhir_server, store, loop = fhir_tests.fhir_server, fhir_tests.store, loop_e2e.loop

FEED_REFERRAL = (loop_e2e.FEEDS / "07-riverside-sdoh-referral.hl7").read_text()
REFERRER = "haddad@riverside-gh.example.org"


def ref_message(trigger: str, control_id: str, *, priority: str = "A^ASAP^HL70280") -> str:
    """The test referral R-1^RGH as REF^<trigger>; a modify makes it STAT and adds a
    transportation need (Z59.82)."""
    text = ref_i12(control_id).replace("REF^I12^REF_I12", f"REF^{trigger}^REF_I12")
    text = text.replace("A^ASAP^HL70280", priority)
    if trigger == "I13":
        text += "DG1|3||Z59.82^Transportation insecurity^I10||20261127|F\r"
    return text


class Referrals:
    """REF messages through the real referral-state step (store-backed), then rendered and
    sent by the real fhir-referral channel, as the router and outbox would."""

    def __init__(self, tmp_path: Path, store: MessageStore, server: FhirServer) -> None:
        context = ComponentContext(tmp_path, tmp_path, store)
        self.state = ReferralStateEnricher(ReferralStateEnricher.Options(), context)
        self.channel = channel_for(server.base_url, tmp_path, store, poll_minutes=0)
        self.next_id = 1

    def route(self, text: str) -> Work:
        work = work_for(text, self.next_id)
        self.next_id += 1
        self.state.enrich(work)
        return work

    def deliver(self, text: str) -> Sent:
        work = self.route(text)
        (result,) = send(self.channel, self.channel.render(work, f"carehub-{work.message.id}-1"))
        return result


@pytest.fixture
def referrals(tmp_path: Path, store: MessageStore, fhir_server: FhirServer) -> Referrals:
    return Referrals(tmp_path, store, fhir_server)


# -- finding 8: one referral at the server -----------------------------------------------------


def test_the_same_referral_under_two_delivery_keys_is_one_referral_at_the_server(
    fhir_server: FhirServer,
    tmp_path: Path,
) -> None:
    """A second routing run, or the I12 resent with a new MSH-10 on a route without the
    referral-state step: a new delivery key, still the same ServiceRequest and Task."""
    channel = channel_for(fhir_server.base_url, tmp_path)
    first = channel.render(work_for(ref_i12("RGH-REF-1"), 1), "carehub-1-1-abc")
    again = channel.render(work_for(ref_i12("RGH-REF-1b"), 2), "carehub-2-1-def")
    assert send(channel, first, again) == ["HTTP 200 Task/103", "HTTP 200 Task/103"]
    assert (fhir_server.count("ServiceRequest"), fhir_server.count("Task")) == (1, 1)


def test_an_i12_resent_with_a_new_control_id_sends_nothing(
    referrals: Referrals,
    fhir_server: FhirServer,
) -> None:
    assert referrals.deliver(ref_i12("RGH-REF-1")) == "HTTP 200 Task/103"
    receipt = referrals.deliver(ref_i12("RGH-REF-1-resent"))
    assert isinstance(receipt, NothingToSend) and receipt.reason.startswith("resend")
    assert len(fhir_server.posts) == 1


# -- finding 7: modify and cancel reach the organisation ---------------------------------------


def test_a_modify_patches_priority_and_reasons_and_leaves_the_organisations_status(
    referrals: Referrals,
    fhir_server: FhirServer,
) -> None:
    referrals.deliver(ref_i12("RGH-REF-1"))
    fhir_server.resources["Task/103"]["status"] = "accepted"  # the food bank took it meanwhile
    assert referrals.deliver(ref_message("I13", "RGH-REF-2", priority="S^STAT^HL70280")) == (
        "HTTP 200 Task/103 modified"
    )

    assert (fhir_server.count("ServiceRequest"), fhir_server.count("Task")) == (1, 1)
    request, task = fhir_server.resources["ServiceRequest/102"], fhir_server.resources["Task/103"]
    assert (request["priority"], task["priority"]) == ("stat", "stat")
    codes = [c["coding"][0]["code"] for c in request["reasonCode"]]
    assert codes == ["Z59.41"]  # the food need's code; transport's Z59.82 is not the food bank's
    assert "E11.9" not in str(request)  # still only the SDOH codes leave carehub
    assert (request["status"], task["status"]) == ("active", "accepted")
    assert task["focus"]["reference"] == "ServiceRequest/102"
    assert fhir_server.problems == []


def test_a_cancel_revokes_the_request_and_cancels_the_task(
    referrals: Referrals,
    fhir_server: FhirServer,
    store: MessageStore,
) -> None:
    referrals.deliver(ref_i12("RGH-REF-1"))
    assert referrals.channel.tasks.all()  # polled while open
    assert referrals.deliver(ref_message("I14", "RGH-REF-3")) == "HTTP 200 Task/103 cancelled"

    assert fhir_server.resources["ServiceRequest/102"]["status"] == "revoked"
    assert fhir_server.resources["Task/103"]["status"] == "cancelled"
    assert ReferralTracker(store.engine).referral(KEY).status == "cancelled"
    assert referrals.channel.tasks.all() == {}  # closed: no poll reads back our own cancel
    assert referrals.channel.poll() == []
    assert fhir_server.gets == [f"Task?identifier={SEARCHED}"]  # read once, before the cancel

    again = referrals.deliver(ref_message("I14", "RGH-REF-4"))  # a second cancel
    assert isinstance(again, NothingToSend) and again.reason.startswith("unchanged")
    assert sorted(fhir_server.patched) == ["ServiceRequest/102", "Task/103"]
    asyncio.run(referrals.channel.close())


#: The referral's identifier as the channel searches for its Task.
SEARCHED = "urn:carehub:id:RGH|R-1"


def test_a_cancel_leaves_a_task_the_organisation_closed_meanwhile(
    referrals: Referrals,
    fhir_server: FhirServer,
    store: MessageStore,
) -> None:
    """The food bank completed the Task before carehub polled it; the referrer then cancels.
    The cancel must not overwrite the organisation's record: nothing is patched, the Task
    stays completed, and the completion is recorded (refused, the referral being cancelled
    here) so the referrer hears that the organisation had already acted."""
    referrals.deliver(ref_i12("RGH-REF-1"))
    fhir_server.act("Task/103", "completed")

    receipt = referrals.deliver(ref_message("I14", "RGH-REF-3"))

    assert isinstance(receipt, NothingToSend)
    assert receipt.reason == (
        "Task/103 is already completed at the organisation, and a cancel would overwrite it"
    )
    assert fhir_server.patched == []
    assert fhir_server.resources["Task/103"]["status"] == "completed"
    assert fhir_server.resources["ServiceRequest/102"]["status"] == "active"
    tracker = ReferralTracker(store.engine)
    claimed = tracker.events(KEY)[-1]
    assert (claimed.source, claimed.to_status, claimed.accepted) == (
        "fhir-task-poll",
        "completed",
        False,
    )
    assert claimed.detail["result"]["acted_on_cancelled"] is True
    assert referrals.channel.tasks.all() == {}
    asyncio.run(referrals.channel.close())


def test_a_task_changed_between_the_read_and_the_cancel_is_read_again(
    referrals: Referrals,
    fhir_server: FhirServer,
) -> None:
    """The organisation accepts the Task between carehub's read and its patch: the patch,
    held to the version read, is refused (412) and retried; the retry reads the new version
    and cancels."""
    referrals.deliver(ref_i12("RGH-REF-1"))
    fhir_server.on_search = lambda _query: fhir_server.act("Task/103", "accepted")
    work = referrals.route(ref_message("I14", "RGH-REF-3"))
    cancel = referrals.channel.render(work, f"carehub-{work.message.id}-1")

    (first,) = send(referrals.channel, cancel)
    assert isinstance(first, DeliveryError) and first.retryable
    assert "HTTP 412" in str(first) and "changed at the organisation" in str(first)
    assert fhir_server.resources["Task/103"]["status"] == "accepted"

    fhir_server.on_search = None
    assert send(referrals.channel, cancel) == ["HTTP 200 Task/103 cancelled"]
    assert fhir_server.resources["Task/103"]["status"] == "cancelled"


def test_an_update_that_overtakes_its_referral_is_retried(
    fhir_server: FhirServer,
    tmp_path: Path,
) -> None:
    """The create goes from another route's forward: a patch that finds nothing yet is a
    retry, not a dead letter, and lands once the referral is there."""
    channel = channel_for(fhir_server.base_url, tmp_path)
    cancel = channel.render(work_for(ref_message("I14", "RGH-REF-3"), 2), "carehub-2-1-abc")
    (early,) = send(channel, cancel)
    assert isinstance(early, DeliveryError) and early.retryable
    assert "not at the server yet" in str(early)
    create = channel.render(work_for(ref_i12("RGH-REF-1"), 1), "carehub-1-1-abc")
    assert send(channel, create, cancel) == ["HTTP 200 Task/103", "HTTP 200 Task/103 cancelled"]
    assert fhir_server.resources["Task/103"]["status"] == "cancelled"


# -- the shipped config, end to end -------------------------------------------------------------


def _variant(trigger: str, control_id: str, **fields: str) -> bytes:
    """Feed 07 (referral RGH-R-2026-0042) as another REF/RRI message."""
    text = FEED_REFERRAL.replace("REF^I12^REF_I12|RGH-REF-7001", f"{trigger}|{control_id}")
    for old, new in fields.items():
        text = text.replace(old, new)
    return text.encode()


def _send(running: HubThread, message: bytes) -> str:
    answer = loop_e2e.mllp_exchange(running.mllp_address, [message])[0]
    return loop_e2e.read_ack(answer.decode("utf-8", "replace"))[0]


def _settled(running: HubThread, destination: str, count: int) -> list[Any]:
    """Wait until ``count`` deliveries to ``destination`` are done; return them in order."""

    def done() -> list[Any]:
        found = [
            d
            for d in Outbox(running.store).find(limit=None)
            if d.destination == destination and d.status in ("delivered", "skipped")
        ]
        return found if len(found) >= count else []

    wait_for(lambda: bool(done()), timeout=20, what=f"{count} deliveries to {destination}")
    return done()


def _referrer_subjects(running: HubThread) -> list[str]:
    return [
        d.metadata["subject"]
        for d in Outbox(running.store).find(limit=None)
        if d.metadata.get("to") == REFERRER
    ]


def test_modify_and_cancel_reach_the_organisation_and_late_answers_reach_the_referrer(
    loop: tuple[HubThread, FhirServer],
) -> None:
    running, fhir = loop
    assert _send(running, _variant("REF^I12^REF_I12", "RGH-REF-7001")) == "AA"
    _settled(running, "sdoh-referrals/cbo-platform", 1)
    stat = {"R^Routine^HL70280": "S^STAT^HL70280"}
    assert _send(running, _variant("REF^I13^REF_I12", "RGH-REF-7002", **stat)) == "AA"
    assert _send(running, _variant("REF^I14^REF_I12", "RGH-REF-7003")) == "AA"
    receipts = [d.receipt for d in _settled(running, "referral-changes/cbo-platform", 2)]
    assert [r.split()[-1] for r in receipts] == ["modified", "cancelled"]

    (request,) = [r for k, r in fhir.resources.items() if k.startswith("ServiceRequest/")]
    (task,) = [r for k, r in fhir.resources.items() if k.startswith("Task/")]
    assert (request["status"], request["priority"]) == ("revoked", "stat")
    assert (task["status"], task["priority"]) == ("cancelled", "stat")

    # The food bank accepts anyway: refused, and the referrer hears of it.
    accepted = _variant(
        "RRI^I12^RRI_I12",
        "SCFB-9001",
        **{"RGH_REF|RIVERSIDE_GH": "SCFB|FOODBANK", "RF1|P^Pending": "RF1|A^Accepted"},
    )
    assert _send(running, accepted) == "AA"
    subject = (
        "Cancelled referral RGH-R-2026-0042 reported accepted by Springfield Community Food Bank"
    )
    wait_for(lambda: _referrer_subjects(running) == [subject], what="the referrer told")

    # Over HTTP too (told from the periodic work, once however often it runs) ...
    made = next(r for r in list_referrals(running.store.engine) if r.patient_key == "RGH|RG100234")
    answer = httpx.post(
        f"{running.http_url}/referrals/{quote(made.referral_key, safe='')}/status",
        json={"status": "completed"},
        timeout=10,
    )
    assert answer.status_code == 409
    running.hub.table.tick(datetime.now(UTC))
    running.hub.table.tick(datetime.now(UTC))
    # A webhook call with an intake token does not say who made it: the notice names whom
    # the referral is with, and says it is that rather than who answered.
    by_webhook = (
        "Cancelled referral RGH-R-2026-0042 reported completed by Springfield Community Food "
        "Bank (the organisation the referral is with)"
    )
    assert _referrer_subjects(running)[1:] == [by_webhook]

    # ... but the same claim again tells nobody anything new.
    tracker = ReferralTracker(running.store.engine)
    before = len(tracker.events(made.referral_key))
    assert _send(running, accepted.replace(b"SCFB-9001", b"SCFB-9002")) == "AA"
    wait_for(lambda: len(tracker.events(made.referral_key)) > before, what="the claim recorded")
    assert (
        tracker.events(made.referral_key)[-1].reason == "illegal transition cancelled -> accepted"
    )
    assert len(_referrer_subjects(running)) == 2
    assert fhir.problems == []


def test_an_i12_resent_with_a_new_control_id_posts_nothing_new(
    loop: tuple[HubThread, FhirServer],
) -> None:
    running, fhir = loop
    assert _send(running, _variant("REF^I12^REF_I12", "RGH-REF-7001")) == "AA"
    assert _send(running, _variant("REF^I12^REF_I12", "RGH-REF-7001b")) == "AA"
    first, resent = _settled(running, "sdoh-referrals/cbo-platform", 2)
    assert first.receipt.startswith("HTTP 200 Task/")
    assert resent.status == "skipped"
    assert resent.receipt.startswith("resend")
    assert len(fhir.posts) == 1
    assert (fhir.count("ServiceRequest"), fhir.count("Task")) == (1, 1)
