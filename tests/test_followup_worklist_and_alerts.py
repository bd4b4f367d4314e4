"""The coordinator's side of the follow-up clock on a real hub (shipped config, MLLP in, mail
to aiosmtpd): an overdue alert goes to the coordinators the roster lists now (one the roster
dropped hears nothing more, and the record says so), it says when the patient left, which item
is late and how to close it, with times in the configured zone; `followups done` keeps who did
the work, how, and a note, reads --at in that zone and is in the audit trail; `followups list`
is a worklist with names, hospital, discharge and coordinator, filtered by coordinator."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

from tests.helpers_http import wait_for
from tests.test_encounter_corrections import AMARA, COORDINATOR, Care, care
from tests.test_followup_overdue_nobody_to_alert import (
    CONTACT_LATE,
    contact,
    discharged_home,
)

__all__ = ["care"]

NEW_COORDINATOR = "cc-new@practice-b.example.org"


def test_the_overdue_alert_goes_to_the_coordinator_on_the_roster_now(care: Care) -> None:
    discharged_home(care, patient="RG100234")
    assert care.mailbox.to(COORDINATOR)  # told of the discharge
    roster = care.config_path.parent / "care" / "roster.csv"
    lines = roster.read_text(encoding="utf-8").splitlines(keepends=True)
    moved = [
        line.replace("cc-rgh-01,Casey Exampleton RN", "cc-pb-01,Robin Newhall RN")
        .replace("Riverside Care Management", "Practice B (synthetic)")
        .replace(COORDINATOR, NEW_COORDINATOR)
        if line.startswith("RG100234,") and "cc-rgh-01" in line
        else line
        for line in lines
    ]
    assert moved != lines
    roster.write_text("".join(moved), encoding="utf-8")
    before = len(care.mailbox.to(COORDINATOR))
    time.sleep(6)  # the care-team step looks at the roster file every 5 s

    def alerted() -> list[str]:
        care.tick(CONTACT_LATE)
        return [m.subject for m in care.mailbox.to(NEW_COORDINATOR)]

    (subject,) = wait_for(alerted, timeout=30, what="the alert to the roster's coordinator")
    assert subject.startswith("Follow-up overdue")
    assert len(care.mailbox.to(COORDINATOR)) == before  # dropped: no more details
    dropped = [
        r
        for r in care.notifications()
        if r["recipient"] == "cc-rgh-01" and r["kind"] == "followup_overdue"
    ]
    assert [r["status"] for r in dropped] == ["suppressed"]
    assert "no longer on the patient's care team" in dropped[0]["reason"]
    assert "cc-pb-01" in dropped[0]["reason"]


def test_the_overdue_alert_says_when_which_item_and_how_to_close_it(care: Care) -> None:
    discharged_home(care, patient="RG100234")
    (discharge,) = [m for m in care.mailbox.to(COORDINATOR) if "Discharge" in m.subject]
    # The hospital's 15:30 -0600, in the notify step's zone with its abbreviation.
    assert "on 2026-12-01 15:30 CST" in discharge.body
    care.tick(CONTACT_LATE)
    (alert,) = [m for m in care.mailbox.to(COORDINATOR) if "overdue" in m.subject]
    item = contact(care, AMARA)
    body = " ".join(alert.body.split())
    assert "discharge from Riverside General Hospital on 2026-12-01 15:30 CST" in body
    assert "was due by 2026-12-03" in body
    assert f"Follow-up id: {item['id']}" in body
    assert f"carehub followups done {item['id']}" in body
    assert "Also still open: follow-up visit" in body
    assert "You are receiving this as care coordinator" in body


def test_done_keeps_who_how_and_a_note_and_is_audited(care: Care) -> None:
    discharged_home(care, patient="RG100234")
    item = contact(care, AMARA)
    said = care.text(
        "followups",
        "done",
        str(item["id"]),
        "--at",
        "2026-12-02T09:15",
        "--by",
        "rn.casey",
        "--method",
        "phone",
        "--note",
        "reached daughter",
    )
    # Local input read in the configured zone (Central), not as UTC.
    assert "done at 2026-12-02 09:15 CST via phone, recorded by rn.casey" in said
    done = contact(care, AMARA)
    assert datetime.fromisoformat(done["closed_at"]) == datetime(2026, 12, 2, 15, 15, tzinfo=UTC)
    assert (done["done_by"], done["done_method"], done["done_note"]) == (
        "rn.casey",
        "phone",
        "reached daughter",
    )
    listed = " ".join(care.text("followups", "list", "--all", "--patient", AMARA).split())
    assert "done by rn.casey via phone; reached daughter" in listed
    audit = care.text("audit", "list")
    assert "followups done" in audit and "rn.casey" in audit
    assert "reached daughter" not in audit  # the note may name people: not in the trail


def test_the_worklist_names_the_patient_and_filters_by_coordinator(care: Care) -> None:
    discharged_home(care, patient="RG100234")
    discharged_home(care, patient="RG777001")  # on no roster
    listed = " ".join(care.text("followups", "list").split())
    assert "Amara" in listed and "Okafor" in listed
    assert "RIVERSIDE_GH" in listed
    assert "2026-12-01 15:30 CST" in listed  # the discharge, in the configured zone
    assert "Casey Exampleton RN (Riverside Care Management)" in listed
    assert "times in America/Chicago" in listed
    mine = " ".join(care.text("followups", "list", "--coordinator", "cc-rgh-01").split())
    assert "RG100234" in mine and "RG777001" not in mine
    theirs = care.text("followups", "list", "--practice", "Riverside Care", "--json")
    keys = {json.loads(line)["patient_key"] for line in theirs.splitlines()}
    assert keys == {AMARA}
    first = json.loads(theirs.splitlines()[0])
    assert first["patient_name"] and first["facility"] == "RIVERSIDE_GH"
    assert first["coordinators"][0]["id"] == "cc-rgh-01"
    assert first["due_local"].endswith("CST")
    assert timedelta(0) < datetime.fromisoformat(first["due_at"]) - CONTACT_LATE + timedelta(9)
