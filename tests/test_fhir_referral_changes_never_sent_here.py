"""A modify or cancel reaches the community FHIR platform only for a referral sent there.

A referral to a specialist stays at the referral desk; its I13 or I14 that leaves out RF1-3
passes the change route's filter, and the platform has nothing to patch: the fhir-referral
delivery is skipped, saying why, and the platform hears nothing (no 404s retried into a dead
letter). A referral the platform was sent gets its changes whatever recorded it (the task
file, or with ``poll: false`` only the outbox), and one whose create is still retrying keeps
its cancel waiting behind it (both forwards reach the platform, so they share each
patient's line). The shipped config on a running hub over MLLP, with a FHIR test
server and an SMTP server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carehub.config import HubConfig
from carehub.store.outbox import DeliveryRecord, Outbox
from tests.helpers_http import wait_for
from tests.test_rabbitmq import pg_url
from tests.test_referral_early_cancel_message_status import loop, store_setting
from tests.test_referral_early_updates import CANCEL, _message, _referral_of, _timeline
from tests.test_referral_named_person_recipient import SPECIALIST
from tests.test_referral_recipients import Loop, _referral, referral_loop

__all__ = ["loop", "pg_url", "store_setting"]  # fixtures: the hub, on SQLite or PostgreSQL

CHANGES = "referral-changes/cbo-platform"
CREATES = "sdoh-referrals/cbo-platform"
#: The specialist referral's later messages without RF1-3: they pass the change route's filter.
UNTYPED = {**SPECIALIST, "SO^Social services^HL70281": ""}
STAT = {"REF^I12^REF_I12": "REF^I13^REF_I12", "R^Routine^HL70280": "S^STAT^HL70280"}
SHIPPED_RETRY = "retry: {give_up_after: 24h, initial_delay: 5, max_delay: 900}"
FAST_RETRY = "retry: {max_attempts: forever, initial_delay: 0.2, multiplier: 1, max_delay: 0.2}"


def _routes(config: HubConfig, old: str, new: str) -> None:
    """Edit the copied shipped referral routes before the hub reads them."""
    assert config.source is not None
    path = config.source.parent / "routes" / "referrals.yaml"
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 2, old  # the two fhir-referral forwards
    path.write_text(text.replace(old, new), encoding="utf-8")


def _to(loop: Loop, destination: str) -> list[DeliveryRecord]:
    return [d for d in Outbox(loop.running.store).find(limit=None) if d.destination == destination]


def _tried(loop: Loop, destination: str, count: int = 1) -> list[DeliveryRecord]:
    """The deliveries to ``destination`` once ``count`` of them have been sent at least once
    (settled, or failed and waiting for a retry)."""

    def tried() -> list[DeliveryRecord]:
        found = _to(loop, destination)
        done = [d for d in found if d.status not in ("pending", "sending") or d.last_error]
        return found if len(done) >= count else []

    return wait_for(tried, what=f"{count} deliveries to {destination} tried")


def test_changes_to_a_referral_kept_at_the_desk_are_skipped_at_the_platform(loop: Loop) -> None:
    assert loop.send(_referral("RGH-SPX-1", "R-SPX-1", replace=SPECIALIST)) == "AA"
    assert _message(loop, "RGH-SPX-1").status == "delivered"
    assert _to(loop, CREATES) == []  # the desk's only

    assert loop.send(_referral("RGH-SPX-2", "R-SPX-1", replace={**UNTYPED, **STAT})) == "AA"
    (modify,) = _tried(loop, CHANGES)
    assert modify.status == "skipped", (modify.status, modify.last_error)
    assert modify.receipt is not None
    assert modify.receipt.startswith("modify: the referral was never sent to ")
    assert loop.fhir.base_url in modify.receipt
    assert "R-SPX-1" not in modify.receipt  # says where, not which referral
    assert _message(loop, "RGH-SPX-2").status == "delivered"

    assert loop.send(_referral("RGH-SPX-3", "R-SPX-1", replace={**UNTYPED, **CANCEL})) == "AA"
    cancel = _tried(loop, CHANGES, 2)[-1]
    assert cancel.status == "skipped", (cancel.status, cancel.last_error)
    assert cancel.receipt is not None and cancel.receipt.startswith("cancel: ")
    assert _message(loop, "RGH-SPX-3").status == "delivered"

    # The referral is tracked all the same; the platform heard nothing of it.
    assert _referral_of(loop, "RIVERSIDE_GH|R-SPX-1").status == "cancelled"
    assert [row[1] for row in _timeline(loop, "RIVERSIDE_GH|R-SPX-1")] == [
        "created",
        "modified",
        "cancelled",
    ]
    assert loop.fhir.posts == []
    assert loop.fhir.gets == []


def test_a_referral_sent_without_polling_still_gets_its_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``poll: false`` the task file keeps nothing: the outbox's create says it was sent."""

    def no_polling(config: HubConfig) -> None:
        _routes(config, SHIPPED_RETRY, SHIPPED_RETRY + "\n          poll: false")

    with referral_loop(tmp_path, monkeypatch, no_polling) as loop:
        assert loop.send(_referral("RGH-NP-1", "R-NP-1")) == "AA"
        (created,) = loop.settled(CREATES)
        assert created.status == "delivered", created.last_error
        tasks = list((loop.running.hub.data_dir / "fhir-referral").glob("*.json"))
        assert all(json.loads(t.read_text())["tasks"] == {} for t in tasks)

        assert loop.send(_referral("RGH-NP-2", "R-NP-1", replace=STAT)) == "AA"
        (modified,) = loop.settled(CHANGES)
        assert modified.status == "delivered", (modified.receipt, modified.last_error)
        assert loop.send(_referral("RGH-NP-3", "R-NP-1", replace=CANCEL)) == "AA"
        changes = loop.settled(CHANGES, 2)
        assert [d.status for d in changes] == ["delivered", "delivered"], changes[-1].receipt
        (task,) = loop.created("Task")
        assert task["status"] == "cancelled"
        (request,) = loop.created("ServiceRequest")
        assert request["priority"] == "stat"


def test_a_cancel_waits_behind_its_referrals_create_while_that_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fast_retries(config: HubConfig) -> None:
        _routes(config, SHIPPED_RETRY, FAST_RETRY)

    with referral_loop(tmp_path, monkeypatch, fast_retries) as loop:
        loop.fhir.fail_with = 503  # the platform is down
        assert loop.send(_referral("RGH-RT-1", "R-RT-1")) == "AA"
        (create,) = _tried(loop, CREATES)
        assert create.status in ("pending", "sending"), create.status  # retried

        assert loop.send(_referral("RGH-RT-2", "R-RT-1", replace=CANCEL)) == "AA"

        # Both forwards reach the platform, so they share the patient's line: the cancel is
        # not tried while the create before it is retried.
        wait_for(lambda: _to(loop, CHANGES), what="the cancel routed")
        wait_for(
            lambda: [d for d in _to(loop, CREATES) if d.attempts >= 3],
            what="the create retried while the cancel waits",
        )
        (cancel,) = _to(loop, CHANGES)
        assert (cancel.status, cancel.attempts, cancel.last_error) == ("pending", 0, None)

        loop.fhir.fail_with = None  # back: the create goes, then the cancel finds its Task
        (sent,) = loop.settled(CHANGES)
        assert sent.status == "delivered", sent.receipt
        assert [d.status for d in _to(loop, CREATES)] == ["delivered"]
        (task,) = loop.created("Task")
        assert task["status"] == "cancelled"
