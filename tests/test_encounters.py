"""Encounter state from ADT: each rule, through the real store and in memory (dry runs)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import insert, select

from carehub.builtins.event_translator import translate_v2_to_event
from carehub.care.encounters import (
    EncounterRecord,
    EncounterStateEnricher,
    EncounterStateError,
    EncounterTracker,
    encounter_timeline,
    list_encounters,
)
from carehub.care.encounters_cli import encounters as encounters_cli
from carehub.care.model import Transition
from carehub.components import ComponentContext, Work
from carehub.events import CareEvent
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.routing.dryrun import preview_message
from carehub.store.schema import MessageStatus, encounter_events, notifications, patient_merges
from carehub.store.store import MessageStore, NewMessage, sqlite_url
from carehub.testing import make_adt
from tests.test_store import store_url

__all__ = ["store_url"]  # the SQLite / PostgreSQL store fixture, shared with test_store

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# -- messages ----------------------------------------------------------------------------------


def adt(
    event: str,
    control_id: str,
    *,
    patient: str = "P100",
    cls: str = "E",
    visit: str | None = "V1",
    location: str = "ED^1^A^MAIN",
    prior: str = "",
    at: str = "20261125083000",
    admit: str = "",
    discharge: str = "",
    disposition: str = "",
    to: str = "",
    pv1: bool = True,
    extra: tuple[str, ...] = (),
) -> str:
    """An ADT message with the PV1 fields the encounter rules read (PV1-2/3/6/7/19/36/37/44/45)."""
    segments = [
        f"MSH|^~\\&|ADT|MAIN|CAREHUB|CAREHUB|{at}||ADT^{event}^ADT_A01|{control_id}|P|2.5",
        f"EVN|{event}|{at}",
        f"PID|1||{patient}^^^HOSP^MR~999-00-1234^^^SSA^SS||DOE^JANE||19500214|F",
        "PD1||||5555^WELBY^MARCUS",
    ]
    if pv1:
        fields = [""] * 46
        fields[0], fields[1], fields[2], fields[3] = "PV1", "1", cls, location
        fields[6] = prior
        fields[7] = "1234^SMITH^ANNA^^^DR"
        fields[19] = f"{visit}^^^HOSP^VN" if visit else ""
        fields[36], fields[37] = disposition, to
        fields[44], fields[45] = admit, discharge
        segments.append("|".join(fields))
    segments.append("DG1|1||I21.9^Acute myocardial infarction^I10||20261125|A")
    segments += extra
    return "\r".join(segments) + "\r"


def merge_message(control_id: str, surviving: str, retired: str) -> str:
    return "\r".join(
        [
            "MSH|^~\\&|ADT|MAIN|CAREHUB|CAREHUB|20261126090000||ADT^A40^ADT_A39|"
            f"{control_id}|P|2.5",
            "EVN|A40|20261126090000",
            f"PID|1||{surviving}^^^HOSP^MR||DOE^JANE^Q||19500214|F",
            f"MRG|{retired}^^^HOSP^MR",
        ]
    )


def demographics(control_id: str, patient: str = "P100", pcp: str = "7777^HOUSE^GREG") -> str:
    return "\r".join(
        [
            f"MSH|^~\\&|ADT|MAIN|CAREHUB|CAREHUB|20261125100000||ADT^A31^ADT_A05|{control_id}|P|2.5",
            "EVN|A31|20261125100000",
            f"PID|1||{patient}^^^HOSP^MR||DOE^JANET||19500214|F",
            f"PD1||||{pcp}",
        ]
    )


# -- harness -----------------------------------------------------------------------------------


class Feed:
    """Sends messages through the enricher the way the router does (translator first)."""

    def __init__(self, enricher: EncounterStateEnricher, store: MessageStore | None) -> None:
        self.enricher = enricher
        self.store = store
        self.next_id = 1

    def send(self, text: str, message_id: int | None = None) -> Transition:
        if message_id is None:
            message_id, self.next_id = self.next_id, self.next_id + 1
        work = Work(message=preview_message(text.encode(), message_id), route="care", v2=text)
        work.event = translate_v2_to_event(work.view)
        output = self.enricher.enrich(work)
        transition = work.data["encounter"]
        assert isinstance(transition, Transition)
        assert output == transition.as_output()
        json.dumps(output)  # step outputs are stored as JSON
        return transition

    @property
    def tracker(self) -> EncounterTracker:
        return self.enricher.tracker

    def encounter(self, encounter_id: int | None) -> EncounterRecord:
        assert encounter_id is not None
        rec = self.tracker.encounter(encounter_id)
        assert rec is not None
        return rec

    def transitions(self, encounter_id: int | None) -> list[str]:
        assert encounter_id is not None
        return [e.transition for e in self.tracker.events(encounter_id)]


def make_enricher(
    tmp_path: Path, store: MessageStore | None, hours: float = 24
) -> EncounterStateEnricher:
    options = EncounterStateEnricher.Options(stale_ed_hours=hours)
    return EncounterStateEnricher(options, ComponentContext(tmp_path, tmp_path, store))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MessageStore]:
    opened = MessageStore(sqlite_url(tmp_path))
    opened.migrate()
    yield opened
    opened.close()


@pytest.fixture(params=["store", "memory"])
def feed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Feed]:
    """Every rule runs twice: over the store's tables and in memory (store None: dry runs)."""
    if request.param == "memory":
        yield Feed(make_enricher(tmp_path, None), None)
        return
    opened = MessageStore(sqlite_url(tmp_path))
    opened.migrate()
    yield Feed(make_enricher(tmp_path, opened), opened)
    opened.close()


# -- the main path -------------------------------------------------------------------------------


def test_ed_arrival_admission_transfer_noise_and_discharge_to_snf(feed: Feed) -> None:
    arrived = feed.send(adt("A04", "M1", cls="E", admit="20261125080000"))
    assert (arrived.kind, arrived.state) == ("ed_arrival", "ed")
    assert arrived.notifiable and arrived.patient_key == "HOSP|P100"
    encounter_id = arrived.encounter_id

    admitted = feed.send(adt("A06", "M2", cls="I", location="MED^201^1^MAIN", at="20261125120000"))
    assert (admitted.kind, admitted.state, admitted.encounter_id) == (
        "admission",
        "admitted",
        encounter_id,
    )
    assert admitted.summary["previous_state"] == "ed"

    moved = feed.send(
        adt(
            "A02",
            "M3",
            cls="R",
            location="REHAB^5^2^NORTH",
            prior="MED^201^1^MAIN",
            at="20261125130000",
        )
    )
    assert (moved.kind, moved.state, moved.encounter_id) == ("transfer", "admitted", encounter_id)
    assert moved.summary["facility"] == "NORTH" and moved.summary["patient_class"] == "R"

    noise = feed.send(adt("A08", "M4", cls="R", location="REHAB^5^2^NORTH", at="20261125140000"))
    assert (noise.kind, noise.state) == ("none", "admitted")
    early = feed.send(
        adt(
            "A08",
            "M5",
            cls="R",
            location="REHAB^5^2^NORTH",
            discharge="20261130",
            at="20261125150000",
        )
    )
    assert (early.kind, early.state) == ("none", "admitted")  # only an A03 discharges
    assert feed.encounter(encounter_id).discharged_at is None

    gone = feed.send(
        adt(
            "A03",
            "M6",
            cls="R",
            location="REHAB^5^2^NORTH",
            discharge="20261201143000",
            disposition="03",
            to="SNF^Maple Grove Skilled Nursing",
            at="20261201143500",
        )
    )
    assert (gone.kind, gone.state, gone.encounter_id) == ("discharge", "discharged", encounter_id)
    summary = gone.summary
    assert summary["patient_name"] == "JANE DOE"
    assert summary["birth_date"] == "1950-02-14"
    # The SSN (PID-3 type SS) is not in the care event, so not in the visit.
    assert {i["value"] for i in summary["identifiers"]} == {"P100"}
    assert summary["treating_practitioner_name"] == "DR ANNA SMITH"
    assert summary["pcp"]["family"] == "WELBY"
    assert summary["disposition"] == "03"
    assert summary["discharged_to"] == "SNF"
    assert summary["discharged_to_name"] == "Maple Grove Skilled Nursing"
    assert summary["discharge_time"].startswith("2026-12-01T14:30")
    assert summary["admit_time"].startswith("2026-11-25T08:00")
    assert summary["diagnoses"][0]["code"] == "I21.9"
    assert summary["location"] == "REHAB/5/2"

    rec = feed.encounter(encounter_id)
    assert rec.state == "discharged" and rec.disposition == "03"
    assert rec.discharged_at is not None and rec.discharged_at.day == 1
    CareEvent.model_validate(rec.snapshot)  # templates reload it as a care event
    assert feed.transitions(encounter_id) == [
        "ed_arrival",
        "admission",
        "transfer",
        "none",
        "none",
        "discharge",
    ]


def test_make_adt_inpatient_admission_and_echo(feed: Feed) -> None:
    first = feed.send(make_adt("A1", "A01", patient_id="P7", visit_number="V9", patient_class="I"))
    assert (first.kind, first.state) == ("admission", "admitted")
    echo = feed.send(make_adt("A2", "A01", patient_id="P7", visit_number="V9", patient_class="I"))
    assert (echo.kind, echo.encounter_id) == ("none", first.encounter_id)


def test_outpatient_registration(feed: Feed) -> None:
    registered = feed.send(adt("A04", "R1", cls="O", location="CLINIC^^^MAIN"))
    assert (registered.kind, registered.state) == ("registration", "registered")
    assert not registered.notifiable


def test_a08_turning_e_into_i_is_an_admission(feed: Feed) -> None:
    feed.send(adt("A04", "Q1", cls="E"))
    quirk = feed.send(adt("A08", "Q2", cls="I", location="MED^3^1^MAIN"))
    assert (quirk.kind, quirk.state) == ("admission", "admitted")
    again = feed.send(adt("A08", "Q3", cls="I", location="MED^3^1^MAIN"))
    assert again.kind == "none"


def test_bed_move_is_none_but_updates_location(feed: Feed) -> None:
    first = feed.send(adt("A01", "B1", cls="I", location="MED^201^1^MAIN"))
    bed = feed.send(adt("A02", "B2", cls="I", location="MED^202^2^MAIN", prior="MED^201^1^MAIN"))
    assert (bed.kind, bed.state) == ("none", "admitted")
    unit = feed.send(adt("A02", "B3", cls="I", location="ICU^1^1^MAIN", prior="MED^202^2^MAIN"))
    # A unit is not a level of care unless the class changes, but it is news.
    assert (unit.kind, unit.summary["changed"]) == ("updated", ["encounter.location"])
    rec = feed.encounter(first.encounter_id)
    assert rec.location == "ICU/1/1" and rec.facility == "MAIN"
    assert rec.snapshot["encounter"]["location"]["point_of_care"] == "ICU"


def test_cancel_admission_goes_back_to_the_ed(feed: Feed) -> None:
    feed.send(adt("A04", "C1", cls="E", location="ED^4^^MAIN"))
    feed.send(adt("A06", "C2", cls="I", location="MED^201^1^MAIN"))
    cancelled = feed.send(adt("A11", "C3", cls="I", location="MED^201^1^MAIN"))
    assert (cancelled.kind, cancelled.state) == ("cancel_admission", "ed")
    assert cancelled.retracts == "admission"
    rec = feed.encounter(cancelled.encounter_id)
    assert (rec.patient_class, rec.location, rec.admitted_at) == ("E", "ED/4", None)


def test_cancel_of_a_direct_admission_cancels_the_visit(feed: Feed) -> None:
    feed.send(adt("A01", "D1", cls="I", location="MED^201^1^MAIN"))
    cancelled = feed.send(adt("A11", "D2", cls="I", location="MED^201^1^MAIN"))
    assert (cancelled.kind, cancelled.state) == ("cancel_admission", "cancelled")
    readmitted = feed.send(adt("A01", "D3", cls="I", location="MED^201^1^MAIN"))
    assert (readmitted.kind, readmitted.state) == ("admission", "admitted")


def test_cancel_transfer_restores_location_and_level(feed: Feed) -> None:
    feed.send(adt("A01", "T1", cls="I", location="MED^201^1^MAIN"))
    moved = feed.send(adt("A02", "T2", cls="I", location="ICU^1^1^NORTH", prior="MED^201^1^MAIN"))
    assert moved.kind == "transfer"
    undone = feed.send(adt("A12", "T3", cls="I", location="MED^201^1^MAIN"))
    assert (undone.kind, undone.state) == ("cancel_transfer", "admitted")
    assert undone.retracts == "transfer"
    rec = feed.encounter(undone.encounter_id)
    assert (rec.facility, rec.location) == ("MAIN", "MED/201/1")
    # Undoing a bed move takes nothing back.
    feed.send(adt("A02", "T4", cls="I", location="MED^202^1^MAIN", prior="MED^201^1^MAIN"))
    quiet = feed.send(adt("A12", "T5", cls="I", location="MED^201^1^MAIN"))
    assert quiet.kind == "none"
    assert feed.encounter(quiet.encounter_id).location == "MED/201/1"


def test_cancel_discharge_reopens_the_visit(feed: Feed) -> None:
    feed.send(adt("A01", "X1", cls="I", location="MED^201^1^MAIN"))
    feed.send(adt("A03", "X2", cls="I", discharge="20261127100000", disposition="01"))
    reopened = feed.send(adt("A13", "X3", cls="I", location="MED^201^1^MAIN"))
    assert (reopened.kind, reopened.state) == ("cancel_discharge", "admitted")
    assert reopened.retracts == "discharge"
    rec = feed.encounter(reopened.encounter_id)
    assert (rec.discharged_at, rec.disposition) == (None, None)
    assert "discharge_time" not in rec.snapshot["encounter"]
    again = feed.send(adt("A03", "X4", cls="I", discharge="20261128100000", disposition="06"))
    assert (again.kind, again.state) == ("discharge", "discharged")
    assert again.summary["disposition"] == "06"


def test_merge_rekeys_encounters_and_later_messages_follow(feed: Feed) -> None:
    old = feed.send(adt("A04", "G1", patient="OLD1", cls="E"))
    assert old.patient_key == "HOSP|OLD1"
    merged = feed.send(merge_message("G2", surviving="NEW1", retired="OLD1"))
    assert (merged.kind, merged.patient_key) == ("merge", "HOSP|NEW1")
    assert merged.summary["retired_keys"] == ["HOSP|OLD1"]
    assert merged.encounter_id == old.encounter_id
    assert feed.encounter(old.encounter_id).patient_key == "HOSP|NEW1"
    assert feed.tracker.resolve("HOSP|OLD1") == "HOSP|NEW1"
    # A late message still under the retired id lands on the same visit.
    late = feed.send(adt("A06", "G3", patient="OLD1", cls="I", location="MED^1^1^MAIN"))
    assert (late.kind, late.encounter_id, late.patient_key) == (
        "admission",
        old.encounter_id,
        "HOSP|NEW1",
    )
    done = feed.send(adt("A03", "G4", patient="NEW1", cls="I", disposition="01"))
    assert (done.kind, done.encounter_id) == ("discharge", old.encounter_id)
    assert feed.transitions(old.encounter_id) == ["ed_arrival", "merge", "admission", "discharge"]


def test_merge_with_a_visit_under_both_ids_keeps_both(feed: Feed) -> None:
    retired = feed.send(adt("A04", "H1", patient="OLD2", cls="E", visit="V5"))
    survivor = feed.send(adt("A04", "H2", patient="NEW2", cls="E", visit="V5"))
    merged = feed.send(merge_message("H3", surviving="NEW2", retired="OLD2"))
    assert merged.kind == "merge"
    rec = feed.encounter(retired.encounter_id)
    assert rec.patient_key == "HOSP|NEW2"
    assert rec.visit_key == f"HOSP|V5~merged{retired.encounter_id}"
    later = feed.send(adt("A03", "H4", patient="OLD2", cls="E", visit="V5", disposition="01"))
    assert later.encounter_id == survivor.encounter_id


def test_missing_visit_number_joins_the_open_visit_or_uses_a_stand_in(feed: Feed) -> None:
    arrived = feed.send(adt("A04", "N1", cls="E", visit=None, admit="20261125080000"))
    assert arrived.kind == "ed_arrival"
    rec = feed.encounter(arrived.encounter_id)
    assert rec.visit_key == "noVN:MAIN:20261125"
    left = feed.send(adt("A03", "N2", cls="E", visit=None, disposition="01"))
    assert (left.kind, left.encounter_id) == ("discharge", arrived.encounter_id)
    # Same patient, same day, after that visit ended: a new visit, not an echo.
    back = feed.send(adt("A04", "N3", cls="E", visit=None, admit="20261125200000"))
    assert back.kind == "ed_arrival" and back.encounter_id != arrived.encounter_id
    assert feed.encounter(back.encounter_id).visit_key == "noVN:MAIN:20261125#2"


def test_missing_visit_number_joins_a_numbered_open_visit(feed: Feed) -> None:
    admitted = feed.send(adt("A01", "K1", cls="I", visit="V77", location="MED^1^1^MAIN"))
    update = feed.send(adt("A08", "K2", cls="I", visit=None, location="MED^1^1^MAIN"))
    assert (update.kind, update.encounter_id) == ("none", admitted.encounter_id)
    # No PV1-3.4 either (the translator falls back to MSH-4): any open visit of the patient.
    gone = feed.send(adt("A03", "K3", cls="I", visit=None, location="MED^1^1", disposition="01"))
    assert (gone.kind, gone.encounter_id) == ("discharge", admitted.encounter_id)
    assert feed.encounter(admitted.encounter_id).facility == "MAIN"


def test_resend_returns_the_recorded_transition(feed: Feed) -> None:
    text = adt("A04", "S1", cls="E")
    first = feed.send(text, message_id=41)
    again = feed.send(text, message_id=41)
    assert again.as_output() == first.as_output()
    assert feed.transitions(first.encounter_id) == ["ed_arrival"]
    # Even when the state has moved on since (a reprocess of an old message).
    feed.send(adt("A06", "S2", cls="I"), message_id=42)
    assert feed.send(text, message_id=41).as_output() == first.as_output()
    assert feed.transitions(first.encounter_id) == ["ed_arrival", "admission"]
    if feed.store is not None:
        with feed.store.engine.connect() as conn:
            rows = conn.execute(
                select(encounter_events.c.id).where(encounter_events.c.message_id == 41)
            ).all()
        assert len(rows) == 1


def test_dry_runs_tell_messages_apart_by_control_id(tmp_path: Path) -> None:
    """Dry-run messages all have id 0; in memory the control id keeps them apart."""
    feed = Feed(make_enricher(tmp_path, None), None)
    first = feed.send(adt("A04", "Z1", cls="E"), message_id=0)
    second = feed.send(adt("A06", "Z2", cls="I"), message_id=0)
    assert (first.kind, second.kind) == ("ed_arrival", "admission")


def test_discharge_for_an_unknown_visit(feed: Feed) -> None:
    gone = feed.send(adt("A03", "U1", cls="I", visit="V404", discharge="20261125110000"))
    assert (gone.kind, gone.state) == ("discharge", "discharged")
    rec = feed.encounter(gone.encounter_id)
    assert rec.discharged_at is not None


def test_cancels_of_unknown_visits_take_nothing_back(feed: Feed) -> None:
    for control_id, trigger in (("W1", "A11"), ("W2", "A12"), ("W3", "A13")):
        result = feed.send(adt(trigger, control_id, cls="I", visit=f"V{control_id}"))
        assert result.kind == "none", trigger


def test_fresh_admission_number_closes_the_ed_visit(feed: Feed) -> None:
    ed = feed.send(adt("A04", "F1", cls="E", visit="ED1"))
    admitted = feed.send(adt("A01", "F2", cls="I", visit="IP1", location="MED^1^1^MAIN"))
    assert admitted.kind == "admission" and admitted.encounter_id != ed.encounter_id
    assert feed.encounter(ed.encounter_id).state == "closed"
    # The admission message's recorded result is still the admission.
    again = feed.send(adt("A01", "F2", cls="I", visit="IP1", location="MED^1^1^MAIN"), message_id=2)
    assert again.as_output() == admitted.as_output()


def test_a06_with_the_old_visit_in_mrg5_renumbers(feed: Feed) -> None:
    ed = feed.send(adt("A04", "J1", cls="E", visit="ED7"))
    admitted = feed.send(
        adt("A06", "J2", cls="I", visit="IP7", location="MED^1^1^MAIN", extra=("MRG|||||ED7",))
    )
    assert (admitted.kind, admitted.encounter_id) == ("admission", ed.encounter_id)
    assert feed.encounter(ed.encounter_id).visit_key == "HOSP|IP7"


def test_demographics_refresh_open_visits(feed: Feed) -> None:
    visit = feed.send(adt("A01", "P1", cls="I", location="MED^1^1^MAIN"))
    changed = feed.send(demographics("P2"))
    assert (changed.kind, changed.encounter_id) == ("demographics", None)
    assert changed.summary["pcp"]["family"] == "HOUSE"
    rec = feed.encounter(visit.encounter_id)
    assert rec.snapshot["patient"]["name"]["given"] == "JANET"
    assert rec.snapshot["patient"]["pcp"]["id"] == "7777"
    assert feed.transitions(visit.encounter_id) == ["admission", "demographics"]
    # No visit at all: still a demographics transition, nothing recorded.
    lone = feed.send(demographics("P3", patient="P555"))
    assert (lone.kind, lone.patient_key) == ("demographics", "HOSP|P555")


def test_stale_ed_visits_are_closed_by_tick(feed: Feed) -> None:
    ed = feed.send(adt("A04", "E1", cls="E"))
    inpatient = feed.send(adt("A01", "E2", cls="I", patient="P200", visit="V2"))
    now = datetime.now(UTC)
    feed.enricher.tick(now + timedelta(hours=23))
    assert feed.encounter(ed.encounter_id).state == "ed"
    feed.enricher.tick(now + timedelta(hours=25))
    assert feed.encounter(ed.encounter_id).state == "closed"
    assert feed.encounter(inpatient.encounter_id).state == "admitted"
    assert feed.transitions(ed.encounter_id) == ["ed_arrival", "stale_closed"]
    feed.enricher.tick(now + timedelta(hours=50))  # nothing more to close
    assert feed.transitions(ed.encounter_id) == ["ed_arrival", "stale_closed"]
    # A real discharge that finally arrives still discharges (no ED departure notice went out).
    gone = feed.send(adt("A03", "E3", cls="E", disposition="01"))
    assert (gone.kind, gone.encounter_id) == ("discharge", ed.encounter_id)


def test_close_stale_honours_the_option(tmp_path: Path) -> None:
    feed = Feed(make_enricher(tmp_path, None, hours=2), None)
    ed = feed.send(adt("A04", "O1", cls="E"))
    closed = feed.tracker.close_stale(datetime.now(UTC) + timedelta(hours=3))
    assert [(t.kind, t.encounter_id, t.state) for t in closed] == [
        ("stale_closed", ed.encounter_id, "closed")
    ]


def test_other_messages_are_left_alone(feed: Feed) -> None:
    pre = feed.send(adt("A05", "O1", cls="I", visit="V55"))
    assert (pre.kind, pre.encounter_id) == ("none", None)
    referral = adt("A01", "O2").replace("ADT^A01^ADT_A01", "REF^I12^REF_I12")
    assert feed.send(referral).kind == "none"
    admitted = feed.send(adt("A01", "O3", cls="I", visit="V55", location="MED^1^1^MAIN"))
    assert admitted.kind == "admission"
    outpatient = feed.send(adt("A07", "O4", cls="O", visit="V55", location="OBS^1^1^MAIN"))
    assert (outpatient.kind, outpatient.encounter_id) == ("none", admitted.encounter_id)
    assert feed.encounter(admitted.encounter_id).patient_class == "O"
    unnumbered = feed.send(adt("A05", "O5", cls="P", visit=None))
    assert (unnumbered.kind, unnumbered.encounter_id) == ("none", None)
    assert feed.encounter(admitted.encounter_id).patient_class == "O"


def test_enrich_needs_the_care_event(tmp_path: Path) -> None:
    enricher = make_enricher(tmp_path, None)
    text = adt("A04", "E1")
    work = Work(message=preview_message(text.encode(), 1), route="care", v2=text)
    with pytest.raises(EncounterStateError, match="v2-to-event"):
        enricher.enrich(work)


def test_state_survives_a_restart(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    first_store = MessageStore(url)
    first_store.migrate()
    feed = Feed(make_enricher(tmp_path, first_store), first_store)
    arrived = feed.send(adt("A04", "RS1", cls="E"), message_id=1)
    feed.send(adt("A02", "RS2", cls="E", location="ED^9^^MAIN"), message_id=2)
    first_store.close()

    second_store = MessageStore(url)
    second_store.migrate()
    try:
        feed = Feed(make_enricher(tmp_path, second_store), second_store)
        assert feed.send(adt("A04", "RS1", cls="E"), message_id=1).as_output() == (
            arrived.as_output()
        )
        admitted = feed.send(adt("A06", "RS3", cls="I"), message_id=3)
        assert (admitted.kind, admitted.encounter_id) == ("admission", arrived.encounter_id)
        cancelled = feed.send(adt("A11", "RS4", cls="I"), message_id=4)
        assert (cancelled.kind, cancelled.state) == ("cancel_admission", "ed")
        assert feed.encounter(arrived.encounter_id).location == "ED/9"
    finally:
        second_store.close()


def test_store_queries_and_merges_table(tmp_path: Path, store: MessageStore) -> None:
    feed = Feed(make_enricher(tmp_path, store), store)
    feed.send(adt("A04", "L1", patient="OLD9", cls="E"))
    feed.send(adt("A01", "L2", patient="P300", cls="I", visit="V3"))
    feed.send(merge_message("L3", surviving="NEW9", retired="OLD9"))
    with store.engine.connect() as conn:
        rows = conn.execute(select(patient_merges)).all()
    assert [(r.retired_key, r.surviving_key, r.message_id) for r in rows] == [
        ("HOSP|OLD9", "HOSP|NEW9", 3)
    ]
    assert [r.state for r in list_encounters(store.engine, state="ed")] == ["ed"]
    assert [r.patient_key for r in list_encounters(store.engine, patient="OLD9")] == ["HOSP|NEW9"]
    assert [r.patient_key for r in list_encounters(store.engine, patient="HOSP|P300")] == [
        "HOSP|P300"
    ]
    assert len(list_encounters(store.engine)) == 2


# -- the command line -----------------------------------------------------------------------------


def _store_message(store: MessageStore, text: str) -> int:
    new = NewMessage(
        raw=text.encode(),
        transport="mllp",
        listener="test",
        peer=None,
        status=MessageStatus.RECEIVED,
        ack_code="AA",
        header=MessageHeader.read(MessageView(text)),
        charset="utf-8",
    )
    return store.insert_messages([new])[0].message_id


def test_cli_list_and_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CAREHUB_CONFIG", "CAREHUB_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store = MessageStore(sqlite_url(data_dir))
    store.migrate()
    feed = Feed(make_enricher(tmp_path, store), store)
    texts = [
        adt("A04", "CLI1", cls="E"),
        adt("A06", "CLI2", cls="I", location="MED^201^1^MAIN"),
        adt("A03", "CLI3", cls="I", disposition="03", to="SNF^Maple Grove"),
    ]
    ids = [_store_message(store, text) for text in texts]
    results = [feed.send(text, message_id=i) for text, i in zip(texts, ids, strict=True)]
    encounter_id = results[0].encounter_id
    with store.engine.begin() as conn:
        conn.execute(
            insert(notifications).values(
                encounter_id=encounter_id,
                message_id=ids[2],
                patient_key="HOSP|P100",
                recipient="npi:5555",
                role="pcp",
                channel="email",
                address="welby@example.org",
                kind="discharge",
                status="queued",
                created_at=datetime.now(UTC),
            )
        )
    timeline = encounter_timeline(store.engine, encounter_id or 0)
    assert timeline is not None
    assert [e.control_id for e in timeline.entries] == ["CLI1", "CLI2", "CLI3"]
    assert timeline.entries[2].notifications[0]["recipient"] == "npi:5555"
    store.close()

    runner = CliRunner(env={"COLUMNS": "200"})
    base = ["--data-dir", str(data_dir)]
    listed = runner.invoke(encounters_cli, ["list", *base], catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    text = ANSI.sub("", listed.output)
    assert "HOSP|P100" in text and "discharged" in text and "1 encounter(s)" in text

    as_json = runner.invoke(encounters_cli, ["list", *base, "--json", "--state", "discharged"])
    rows = [json.loads(line) for line in as_json.output.splitlines()]
    assert [(r["id"], r["state"], r["disposition"]) for r in rows] == [
        (encounter_id, "discharged", "03")
    ]
    assert runner.invoke(encounters_cli, ["list", *base, "--json", "--state", "ed"]).output == ""

    shown = runner.invoke(encounters_cli, ["show", str(encounter_id), *base])
    assert shown.exit_code == 0, shown.output
    text = ANSI.sub("", shown.output)
    for expected in ("A04", "ed_arrival", "A06", "admission", "A03", "discharge", "npi:5555"):
        assert expected in text
    assert "JANE DOE" in text

    detail = runner.invoke(encounters_cli, ["show", str(encounter_id), *base, "--json"])
    data = json.loads(detail.output)
    assert [e["transition"] for e in data["timeline"]] == ["ed_arrival", "admission", "discharge"]
    assert data["timeline"][2]["notifications"][0]["kind"] == "discharge"

    missing = runner.invoke(encounters_cli, ["show", "999", *base])
    assert missing.exit_code != 0


def test_an_a08_that_brings_a_discharge_time_that_has_come_discharges(feed: Feed) -> None:
    """Some sites discharge by update and never send an A03: the A08 carrying PV1-45 (no later
    than the message) is the discharge, with its disposition, once; a later A03 only corrects
    it. A planned discharge time (after the message) is not."""
    feed.send(adt("A01", "U1", cls="I", location="MED^201^1^MAIN", at="20261201100000"))
    planned = feed.send(
        adt(
            "A08",
            "U2",
            cls="I",
            location="MED^201^1^MAIN",
            at="20261201120000",
            discharge="20261203120000",
        )
    )
    assert (planned.kind, planned.state) == ("none", "admitted")
    gone = feed.send(
        adt(
            "A08",
            "U3",
            cls="I",
            location="MED^201^1^MAIN",
            at="20261202150000",
            discharge="20261202145000",
            disposition="01",
        )
    )
    assert (gone.kind, gone.state) == ("discharge", "discharged")
    record = feed.encounter(gone.encounter_id)
    assert record.disposition == "01"
    assert record.discharged_at is not None and record.discharged_at.hour == 14
    again = feed.send(
        adt(
            "A03",
            "U4",
            cls="I",
            location="MED^201^1^MAIN",
            at="20261202160000",
            discharge="20261202145000",
            disposition="01",
        )
    )
    assert again.kind == "none"  # told once


def test_discharge_by_update_can_be_turned_off(tmp_path: Path) -> None:
    options = EncounterStateEnricher.Options(discharge_on_update=False)
    feed = Feed(EncounterStateEnricher(options, ComponentContext(tmp_path, tmp_path, None)), None)
    feed.send(adt("A01", "W1", cls="I", location="MED^201^1^MAIN", at="20261201100000"))
    update = feed.send(
        adt(
            "A08",
            "W2",
            cls="I",
            location="MED^201^1^MAIN",
            at="20261202150000",
            discharge="20261202145000",
            disposition="01",
        )
    )
    assert (update.kind, update.state) == ("none", "admitted")


# -- values longer than their columns ----------------------------------------------------------


def test_a_disposition_in_words_is_kept_clipped_not_a_failed_step(
    tmp_path: Path, store_url: str
) -> None:
    """PV1-36 sent as words ("Skilled nursing facility", 24 characters) is longer than the
    disposition column: PostgreSQL refused the row, failing the step and the care team's
    notice (SQLite stores any length). The row keeps what fits; the discharge goes on."""
    opened = MessageStore(store_url)
    opened.migrate()
    try:
        feed = Feed(make_enricher(tmp_path, opened), opened)
        admitted = feed.send(adt("A01", "W1", cls="I", location="4W^1^A^MAIN^^^^^" + "X" * 300))
        words = "Skilled nursing facility"
        discharged = feed.send(adt("A03", "W2", cls="I", disposition=words, to="Maple " * 60))
        assert (admitted.kind, discharged.kind) == ("admission", "discharge")
        rec = feed.encounter(discharged.encounter_id)
        assert rec.disposition == words[:16]
        assert rec.discharged_to is not None and len(rec.discharged_to) == 255
        assert rec.state == "discharged"
    finally:
        opened.close()
