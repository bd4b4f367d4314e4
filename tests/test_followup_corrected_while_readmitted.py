"""A discharge time corrected while a readmission has the TCM clocks closed: the correction is
kept with the closed clocks, so when an A11 takes the readmission back the clocks run again
from the corrected time (`carehub followups list` saying where each due date moved from), and
overdue alerts go by the corrected dates. Over MLLP to a hub on a copy of config/ with mail to
aiosmtpd; the same story through `carehub routes test` (clocks in memory) and through the
route steps over SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from carehub.builtins.event_translator import translate_v2_to_event
from carehub.care.encounters import EncounterStateEnricher
from carehub.care.followup import FollowupClock, FollowupEnricher
from carehub.cli import main
from carehub.components import ComponentContext, Work
from carehub.routing.dryrun import preview_message
from carehub.store.store import MessageStore
from tests.test_care_e2e import CONFIG
from tests.test_encounter_corrections import AMARA, COORDINATOR, Care, adt, care
from tests.test_store import store_url

__all__ = ["care", "store_url"]  # the running hub on the shipped config; SQLite / PostgreSQL

READMISSION = "V20261205-0101"
#: Due dates from the corrected discharge (Friday 4 December, 10:30 -0600): the contact by the
#: end of Tuesday 8 December and the visit by the end of Friday 18 December, Chicago time.
CONTACT_DUE = "2026-12-09T05:59:59.999999+00:00"
VISIT_DUE = "2026-12-19T05:59:59.999999+00:00"
#: As first discharged (Tuesday 1 December, 15:30 -0600).
WAS_DUE = {
    "contact": "2026-12-04T05:59:59.999999+00:00",
    "visit": "2026-12-16T05:59:59.999999+00:00",
}


def story() -> dict[str, bytes]:
    """Home on 1 December, readmitted on 5 December, the first discharge corrected to 4
    December (an A08 for the first visit), the readmission cancelled."""
    return {
        "1-admit": adt("A01", "CR-1", "20261127090000-0600", admit="20261127090000-0600"),
        "2-home": adt(
            "A03",
            "CR-2",
            "20261201153000-0600",
            discharge="20261201153000-0600",
            disposition="01",
        ),
        "3-readmit": adt(
            "A01", "CR-3", "20261205020000-0600", visit=READMISSION, admit="20261205020000-0600"
        ),
        "4-corrected": adt(
            "A08",
            "CR-4",
            "20261205090000-0600",
            discharge="20261204103000-0600",
            disposition="01",
        ),
        "5-cancel": adt("A11", "CR-5", "20261205100000-0600", visit=READMISSION),
    }


def overdue_alerts(care: Care) -> list[str]:
    """The body of each overdue alert the coordinator got about Amara, in order."""
    rows = {r["delivery_key"]: r for r in care.notifications() if r["delivery_key"]}
    return [
        " ".join(m.body.split())
        for m in care.mailbox.mails
        if m.to == COORDINATOR
        and m.key in rows
        and rows[m.key]["patient_key"] == AMARA
        and rows[m.key]["kind"] == "followup_overdue"
    ]


def test_clocks_reopened_after_a_cancelled_readmission_run_from_the_corrected_time(
    care: Care,
) -> None:
    messages = list(story().values())
    care.send(*messages[:4])
    closed = [f for f in care.followups() if f["status"] == "readmitted"]
    assert sorted(f["kind"] for f in closed) == ["contact", "visit"]
    assert care.cli("followups", "list", "--patient", AMARA) == []  # nothing to do meanwhile

    care.send(messages[4])
    pending = care.cli("followups", "list", "--patient", AMARA)
    assert [(f["kind"], f["status"], f["due_at"]) for f in pending] == [
        ("contact", "open", CONTACT_DUE),
        ("visit", "open", VISIT_DUE),
    ]
    for item in pending:
        assert item["was_due_at"] == WAS_DUE[item["kind"]]
    listed = care.text("followups", "list", "--patient", AMARA)
    assert "moved from 2026-12-03 23:59 CST (discharge time corrected)" in listed
    assert "moved from 2026-12-15 23:59 CST (discharge time corrected)" in listed

    # Past the first contact deadline, before the corrected one: nothing is overdue.
    care.tick(datetime(2026, 12, 5, 18, 0, tzinfo=UTC))
    assert overdue_alerts(care) == []
    care.tick(datetime(2026, 12, 9, 12, 0, tzinfo=UTC))
    (alert,) = overdue_alerts(care)
    assert "interactive contact" in alert and "was due by 2026-12-08" in alert


def test_a_dry_run_reopens_the_clocks_due_from_the_corrected_time(tmp_path: Path) -> None:
    files = []
    for name, message in story().items():
        files.append(tmp_path / f"{name}.hl7")
        files[-1].write_bytes(message)
    arguments = ["routes", "test", "--json", "--config", str(CONFIG / "carehub.yaml")]
    shown = CliRunner().invoke(
        main, [*arguments, "--data-dir", str(tmp_path / "data"), *map(str, files)]
    )
    assert shown.exit_code == 0, shown.output
    clocks = [
        step["output"]
        for result in map(json.loads, shown.stdout.splitlines())
        for route in result["routes"]
        if route["matched"]
        for step in route["steps"]
        if step["step"] == "enrich follow-up-clock"
    ]
    assert [c["action"] for c in clocks] == ["none", "opened", "closed", "rescheduled", "reopened"]
    assert [(i["kind"], i["status"], i["due_at"]) for i in clocks[4]["items"]] == [
        ("contact", "open", CONTACT_DUE),
        ("visit", "open", VISIT_DUE),
    ]


def test_the_store_reopens_the_corrected_clocks(tmp_path: Path, store_url: str) -> None:
    """The encounter-state and follow-up-clock steps over SQLite and PostgreSQL."""
    store = MessageStore(store_url)
    store.migrate()
    try:
        context = ComponentContext(tmp_path, tmp_path, store)
        state = EncounterStateEnricher(EncounterStateEnricher.Options(), context)
        step = FollowupEnricher(FollowupEnricher.Options(), context)
        outputs: list[dict[str, Any]] = []
        for number, message in enumerate(story().values(), start=1):
            work = Work(message=preview_message(message, number), route="care", v2=message.decode())
            work.event = translate_v2_to_event(work.view)
            state.enrich(work)
            outputs.append(step.enrich(work))
        assert outputs[3]["action"] == "rescheduled"
        assert outputs[4]["action"] == "reopened"

        clock = FollowupClock(store.engine)
        pending = clock.find()
        assert [(i.kind, i.status, i.due_at.isoformat()) for i in pending] == [
            ("contact", "open", CONTACT_DUE),
            ("visit", "open", VISIT_DUE),
        ]
        replaces, _ = clock.links(pending)
        assert {i.kind: replaces[i.id].due_at.isoformat() for i in pending} == WAS_DUE
    finally:
        store.close()
