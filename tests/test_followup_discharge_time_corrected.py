"""TCM follow-up clocks when the hospital corrects only when the patient left (PV1-45 of an A08
or a second A03 for a visit already discharged home): the clocks still to be worked are due
again from the corrected time, with the earlier ones kept, closed, saying why; those already
done stay as they were; a time restated unchanged changes nothing; and overdue alerts go by
the corrected dates. Messages go over MLLP to a hub on a copy of config/, mail to aiosmtpd,
and the clocks are read through `carehub followups list`; the same story runs through
`carehub routes test` (clocks in memory) and through the two route steps over SQLite and
PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from carehub.builtins.event_translator import translate_v2_to_event
from carehub.care.encounters import EncounterStateEnricher
from carehub.care.followup import FollowupClock, FollowupEnricher, FollowupError
from carehub.cli import main
from carehub.components import ComponentContext, Work
from carehub.routing.dryrun import preview_message
from carehub.store.store import MessageStore
from tests.test_care_e2e import CONFIG
from tests.test_encounter_corrections import (
    AMARA,
    COORDINATOR,
    Care,
    admit_and_discharge,
    adt,
    care,
)
from tests.test_store import store_url

__all__ = ["care", "store_url"]  # the running hub on the shipped config; SQLite / PostgreSQL

CORRECTED = ("discharge_corrected", "Corrected discharge from Riverside General Hospital")
MOVED_REASON = "the discharge time was corrected: this clock runs again from the corrected time"


def corrected_time(control_id: str, at: str, discharge: str, event: str = "A08") -> bytes:
    """A message about the discharged visit that gives another discharge time (PV1-45) and
    the same disposition (01, home) as the discharge it corrects."""
    return adt(event, control_id, at, discharge=discharge, disposition="01")


def by_status(care: Care) -> dict[str, dict[str, dict[str, object]]]:
    """The patient's follow-ups as {status: {kind: item}} (one item per kind and status)."""
    found: dict[str, dict[str, dict[str, object]]] = {}
    for item in care.followups():
        kind = str(item["kind"])
        assert kind not in found.get(str(item["status"]), {}), care.followups()
        found.setdefault(str(item["status"]), {})[kind] = item
    return found


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


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize("trigger", ["A08", "A03"])
def test_a_later_discharge_time_moves_the_open_clocks(care: Care, trigger: str) -> None:
    """Discharged home on Tuesday 1 December at 15:30 (-0600), then corrected: the patient
    left on Friday 4 December. The contact is due by the end of Tuesday 8 December, not
    Thursday 3, and the visit by the end of Friday 18, not Tuesday 15."""
    admit_and_discharge(care, "01")
    first = by_status(care)["open"]
    care.send(corrected_time("CT-3", "20261205090000-0600", "20261204103000-0600", trigger))

    assert care.timeline("V20261201-0900")[-1] == (trigger, "discharge_corrected")
    note = care.show("V20261201-0900")["timeline"][-1]["note"]
    assert "discharge time corrected: 2026-12-01 21:30 UTC, now 2026-12-04 16:30 UTC" in note

    items = by_status(care)
    # The clocks worked to before are kept, closed, saying why and when they stopped.
    for kind in ("contact", "visit"):
        earlier = items["rescheduled"][kind]
        assert earlier["id"] == first[kind]["id"]
        assert earlier["due_at"] == first[kind]["due_at"]
        assert earlier["reason"] == MOVED_REASON
        assert earlier["closed_at"] is not None
    pending = care.cli("followups", "list", "--patient", AMARA)
    assert [(f["kind"], f["status"]) for f in pending] == [("contact", "open"), ("visit", "open")]
    due = {f["kind"]: utc(f["due_at"]) for f in pending}
    assert due == {
        "contact": datetime(2026, 12, 9, 5, 59, 59, 999999, tzinfo=UTC),
        "visit": datetime(2026, 12, 19, 5, 59, 59, 999999, tzinfo=UTC),
    }
    for item in pending:
        assert item["replaces"] == first[item["kind"]]["id"]
        assert item["was_due_at"] == first[item["kind"]]["due_at"]

    # A coordinator reading the list sees the due date moved, from when, and why.
    listed = care.text("followups", "list", "--patient", AMARA)
    assert "2026-12-08 23:59 CST" in listed and "2026-12-18 23:59 CST" in listed
    assert "moved from 2026-12-03 23:59 CST (discharge time corrected)" in listed
    assert "moved from 2026-12-15 23:59 CST (discharge time corrected)" in listed
    everything = care.text("followups", "list", "--all", "--patient", AMARA)
    assert everything.count("rescheduled") == 2
    assert everything.count("discharge time was corrected") == 2

    # The care team hears of the correction, with the due dates as they now stand.
    (mail,) = [m for m in care.mailbox.mails if m.to == COORDINATOR and "Corrected" in m.subject]
    body = " ".join(mail.body.split())
    assert "Follow-up due: contact by 2026-12-08; visit by 2026-12-18" in body
    # It names the time it replaces, as the hospital's clock read it.
    assert "This replaces the earlier notice: 01 (home or self care) on 2026-12-01 15:30" in body
    assert care.told(AMARA, COORDINATOR)[-1] == CORRECTED

    # Past the first contact deadline, before the corrected one: nothing is overdue.
    care.tick(datetime(2026, 12, 4, 12, 0, tzinfo=UTC))
    assert overdue_alerts(care) == []
    care.tick(datetime(2026, 12, 9, 12, 0, tzinfo=UTC))
    (alert,) = overdue_alerts(care)
    assert "interactive contact" in alert and "was due by 2026-12-08" in alert


def test_an_earlier_discharge_time_makes_a_clock_overdue_at_once(care: Care) -> None:
    """Discharged home on Friday 4 December, corrected to Monday 30 November: the contact was
    due by the end of Wednesday 2 December, so it is overdue as soon as the correction is in,
    and alerted by that date."""
    care.send(
        adt("A01", "CE-1", "20261127090000-0600", admit="20261127090000-0600"),
        corrected_time("CE-2", "20261204160000-0600", "20261204153000-0600", "A03"),
    )
    assert {f["status"] for f in care.followups()} == {"open"}
    care.send(corrected_time("CE-3", "20261205090000-0600", "20261130100000-0600"))

    contact = by_status(care)["open"]["contact"]
    assert utc(str(contact["due_at"])) == datetime(2026, 12, 3, 5, 59, 59, 999999, tzinfo=UTC)
    overdue = care.cli("followups", "list", "--overdue", "--patient", AMARA)
    assert [f["id"] for f in overdue] == [contact["id"]]
    assert "overdue" in care.text("followups", "list", "--overdue", "--patient", AMARA)

    care.tick(datetime(2026, 12, 5, 16, 0, tzinfo=UTC))
    (alert,) = overdue_alerts(care)
    assert "interactive contact" in alert and "was due by 2026-12-02" in alert
    assert by_status(care)["overdue"]["contact"]["id"] == contact["id"]


def test_a_done_clock_keeps_its_history_and_only_the_open_one_moves(care: Care) -> None:
    admit_and_discharge(care, "01")
    first = by_status(care)["open"]
    care.text("followups", "done", str(first["contact"]["id"]), "--at", "2026-12-02T14:30:00-06:00")
    care.send(corrected_time("CD-3", "20261205090000-0600", "20261201080000-0600"))

    items = by_status(care)
    assert items["done"]["contact"]["id"] == first["contact"]["id"]
    assert items["done"]["contact"]["due_at"] == first["contact"]["due_at"]
    assert items["done"]["contact"]["closed_at"] == "2026-12-02T20:30:00+00:00"
    # 08:00 on the same Tuesday: the same due days, so the visit clock is left as it was.
    assert items["open"]["visit"]["id"] == first["visit"]["id"]
    assert "rescheduled" not in items

    care.send(corrected_time("CD-4", "20261206090000-0600", "20261203080000-0600"))
    items = by_status(care)
    assert items["done"]["contact"]["id"] == first["contact"]["id"]
    assert items["rescheduled"]["visit"]["id"] == first["visit"]["id"]
    assert utc(str(items["open"]["visit"]["due_at"])) == datetime(
        2026, 12, 18, 5, 59, 59, 999999, tzinfo=UTC
    )


@pytest.mark.parametrize(
    "same_time",
    ["20261201153000-0600", "20261201213000+0000", "202612011530-0600", "20261201153045-0600"],
)
def test_a_discharge_time_restated_unchanged_leaves_the_clocks_alone(
    care: Care, same_time: str
) -> None:
    """The same moment in another offset or precision, or seconds apart: no correction, no
    notice, the same clocks."""
    admit_and_discharge(care, "01")
    before = care.followups()
    told = care.told(AMARA, COORDINATOR)
    care.send(corrected_time("CS-3", "20261205090000-0600", same_time))
    assert care.timeline("V20261201-0900")[-1] == ("A08", "none")

    def clocks(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The items themselves: the worklist's discharge time is the visit's, as restated."""
        return [{k: v for k, v in item.items() if k != "discharged_at"} for item in items]

    assert clocks(care.followups()) == clocks(before)
    assert care.told(AMARA, COORDINATOR) == told


def test_an_alerted_clock_moved_past_now_runs_again_and_alerts_again(care: Care) -> None:
    """A discharge twenty days ago whose clocks were alerted, corrected to two days ago: both
    are due again from then (not yet past), are not overdue, and alert again once the
    corrected dates pass. Dates are counted from today, since whether a clock is past due
    depends on when the correction comes in."""
    today = datetime.now(UTC).date()

    def hl7(day: date, hour: int) -> str:
        return f"{day:%Y%m%d}{hour:02d}0000-0600"

    first_day, corrected_day = today - timedelta(days=20), today - timedelta(days=2)
    care.send(
        adt("A01", "CA-1", hl7(first_day - timedelta(days=3), 9), visit="V1", admit=""),
        adt(
            "A03",
            "CA-2",
            hl7(first_day, 15),
            visit="V1",
            discharge=hl7(first_day, 14),
            disposition="01",
        ),
    )
    care.tick(datetime.combine(first_day + timedelta(days=16), datetime.min.time(), UTC))
    assert len(overdue_alerts(care)) == 2
    alerted = by_status(care)["overdue"]

    care.send(
        adt(
            "A08",
            "CA-3",
            hl7(today - timedelta(days=1), 9),
            visit="V1",
            discharge=hl7(corrected_day, 10),
            disposition="01",
        )
    )
    items = by_status(care)
    for kind in ("contact", "visit"):
        assert items["rescheduled"][kind]["id"] == alerted[kind]["id"]
        assert items["rescheduled"][kind]["alerted_at"] == alerted[kind]["alerted_at"]
        assert items["open"][kind]["alerted_at"] is None
        assert utc(str(items["open"][kind]["due_at"])) > datetime.now(UTC)
    assert care.cli("followups", "list", "--overdue", "--patient", AMARA) == []

    care.tick(datetime.combine(today + timedelta(days=20), datetime.min.time(), UTC))
    assert len(overdue_alerts(care)) == 4
    assert set(by_status(care)["overdue"]) == {"contact", "visit"}


def test_a_dry_run_moves_the_clocks_as_the_hub_does(tmp_path: Path) -> None:
    """`carehub routes test` keeps its clocks in memory: the same correction reschedules
    them there, and a second one that restates the time moves nothing."""
    messages = {
        "1-admit": adt("A01", "DR-1", "20261127090000-0600", admit="20261127090000-0600"),
        "2-home": corrected_time("DR-2", "20261201153000-0600", "20261201153000-0600", "A03"),
        "3-later": corrected_time("DR-3", "20261205090000-0600", "20261204103000-0600"),
        "4-again": corrected_time("DR-4", "20261205100000-0600", "20261204163000+0000"),
    }
    files = []
    for name, message in messages.items():
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
    assert [c["action"] for c in clocks] == ["none", "opened", "rescheduled", "none"]
    opened, moved = clocks[1], clocks[2]
    assert moved["previous_discharged_at"] == "2026-12-01T21:30:00+00:00"
    assert [(i["kind"], i["status"]) for i in moved["rescheduled"]] == [
        ("contact", "rescheduled"),
        ("visit", "rescheduled"),
    ]
    assert [i["id"] for i in moved["rescheduled"]] == [i["id"] for i in opened["items"]]
    assert [(i["kind"], i["due_at"]) for i in moved["items"]] == [
        ("contact", "2026-12-09T05:59:59.999999+00:00"),
        ("visit", "2026-12-19T05:59:59.999999+00:00"),
    ]
    assert (clocks[3]["transition"], clocks[3]["reason"]) == ("none", "not a discharge")


def test_the_store_keeps_an_alert_and_lets_a_new_discharge_open_clocks(
    tmp_path: Path, store_url: str
) -> None:
    """The encounter-state and follow-up-clock steps over SQLite and PostgreSQL: a contact
    already alerted and still past due once the discharge is corrected to an earlier day is
    overdue and not alerted twice; the rescheduled items can no longer be marked done and
    name their replacement; and after an A13 takes the discharge back, the next discharge
    home opens fresh clocks."""
    store = MessageStore(store_url)
    store.migrate()
    try:
        context = ComponentContext(tmp_path, tmp_path, store)
        state = EncounterStateEnricher(EncounterStateEnricher.Options(), context)
        step = FollowupEnricher(FollowupEnricher.Options(), context)
        ids = iter(range(1, 100))

        def send(message: bytes) -> dict[str, Any]:
            text = message.decode()
            work = Work(message=preview_message(message, next(ids)), route="care", v2=text)
            work.event = translate_v2_to_event(work.view)
            state.enrich(work)
            output: dict[str, Any] = step.enrich(work)
            return output

        clock = FollowupClock(store.engine)
        send(adt("A01", "SR-1", "20261127090000-0600", admit="20261127090000-0600"))
        home = corrected_time("SR-2", "20261201153000-0600", "20261201153000-0600", "A03")
        assert send(home)["action"] == "opened"
        alerted_at = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
        (alerted,) = clock.overdue(alerted_at)  # the contact, due 3 December
        moved = send(corrected_time("SR-3", "20261205130000-0600", "20261130100000-0600"))
        assert moved["action"] == "rescheduled"

        pending = {i.kind: i for i in clock.find()}
        assert pending["contact"].status == "overdue"
        assert pending["contact"].alerted_at == alerted_at
        assert pending["contact"].due_at == datetime(2026, 12, 3, 5, 59, 59, 999999, tzinfo=UTC)
        assert pending["visit"].due_at == datetime(2026, 12, 15, 5, 59, 59, 999999, tzinfo=UTC)
        assert clock.due_alerts(alerted_at) == []
        with pytest.raises(FollowupError, match=f"now follow-up {pending['contact'].id}"):
            clock.complete(alerted.id, alerted_at)

        assert send(adt("A13", "SR-4", "20261205140000-0600"))["action"] == "cancelled"
        again = corrected_time("SR-5", "20261206090000-0600", "20261206080000-0600", "A03")
        assert send(again)["action"] == "opened"
        assert sorted(i.status for i in clock.find(statuses=None)) == [
            "cancelled",
            "cancelled",
            "open",
            "open",
            "rescheduled",
            "rescheduled",
        ]
    finally:
        store.close()
