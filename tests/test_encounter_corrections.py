"""Visit state on the shipped care-transitions route when messages come in an order the happy
path does not: a visit first heard of in an update or a transfer, a discharge corrected after
the fact, an ED patient made inpatient by an A02, messages that arrive late, and an A13 ahead
of its A03. Each story is sent over MLLP to a hub running a copy of config/, with aiosmtpd for
the care team's email and a real HTTP server for the rest, and checked at the mail server and
through `carehub encounters` / `carehub followups`."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner

from carehub.cli import main
from carehub.config import load_config
from carehub.hl7.ack import read_ack
from carehub.testing import HubThread, mllp_exchange
from tests.helpers_http import HTTPServer, on_this_host
from tests.helpers_smtp import Mailbox, free_port
from tests.test_care_e2e import CONFIG, Setup, point_sample_at

AMARA = "RGH|RG100234"
LINDQVIST = "lindqvist@springfield-fp.example.org"
COORDINATOR = "cc-team@riverside-cm.example.org"
ADMISSION = ("admission", "Admission at Riverside General Hospital")
DISCHARGE = ("discharge", "Discharge from Riverside General Hospital")
ED_VISIT = ("ed_arrival", "ED visit at Riverside General Hospital")


def adt(
    event: str,
    control_id: str,
    at: str,
    *,
    visit: str = "V20261201-0900",
    cls: str = "I",
    location: str = "4W^412^A^RIVERSIDE_GH",
    admit: str = "",
    discharge: str = "",
    disposition: str = "",
    to: str = "",
    patient: str = "RG100234",
    extra: tuple[str, ...] = (),
) -> bytes:
    """An ADT message from Riverside about Amara Okafor (by default), with the PV1 fields the
    visit rules read: class, location, PV1-19, disposition and destination, admit and
    discharge times."""
    pv1 = [""] * 46
    pv1[0], pv1[1], pv1[2], pv1[3] = "PV1", "1", cls, location
    pv1[7] = "1497758544^Moreau^Celine^^^Dr^^^NPI"
    pv1[10] = "MED"
    pv1[19] = f"{visit}^^^RGH^VN"
    pv1[36], pv1[37] = disposition, to
    pv1[44], pv1[45] = admit, discharge
    segments = [
        f"MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|{at}||ADT^{event}^ADT_A01|{control_id}"
        "|P|2.5.1|||AL|NE",
        f"EVN|{event}|{at}",
        f"PID|1||{patient}^^^RGH^MR||Okafor^Amara^N||19580312|F",
        "PD1|||Springfield Family Practice^^^^^^^^^1306849450|1306849450^Lindqvist^Erik^^^Dr",
        "|".join(pv1),
        *extra,
    ]
    return ("\r".join(segments) + "\r").encode()


class Care(Setup):
    """The running hub, with what these stories ask of it."""

    def send(self, *messages: bytes) -> None:
        """Each message on its own, in order, routed and its notices sent before the next."""
        for message in messages:
            (answer,) = mllp_exchange(self.running.mllp_address, [message])
            assert read_ack(answer.decode())[0] == "AA"
            self.settle()

    def text(self, *args: str) -> str:
        """A command's output as a person reads it (no --json)."""
        runner = CliRunner(env={"COLUMNS": "250"})
        result = runner.invoke(
            main,
            [*args, "--config", str(self.config_path), "--data-dir", str(self.data_dir)],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        return result.output

    def encounter(self, visit: str, patient: str = AMARA) -> dict[str, Any]:
        (found,) = [
            e
            for e in self.cli("encounters", "list", "--patient", patient)
            if e["visit_key"] == f"RGH|{visit}"
        ]
        return found

    def show(self, visit: str, patient: str = AMARA) -> dict[str, Any]:
        """`carehub encounters show --json` of the visit."""
        encounter_id = str(self.encounter(visit, patient)["id"])
        shown: dict[str, Any] = json.loads(self.text("encounters", "show", encounter_id, "--json"))
        return shown

    def timeline(self, visit: str, patient: str = AMARA) -> list[tuple[str, str]]:
        """(trigger, transition) of each message the visit took, in order."""
        return [
            (t["trigger_event"], t["transition"]) for t in self.show(visit, patient)["timeline"]
        ]

    def followups(self, patient: str = AMARA) -> list[dict[str, Any]]:
        return self.cli("followups", "list", "--all", "--patient", patient)

    def tick(self, at: datetime) -> None:
        self.running.hub.table.tick(at)
        self.settle()


@pytest.fixture
def care(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Care]:
    """The hub on a copy of the shipped config, pointed at local servers, nothing sent yet."""
    for name in list(os.environ):
        if name.startswith("CAREHUB_"):
            monkeypatch.delenv(name)
    folder = tmp_path / "config"
    shutil.copytree(CONFIG, folder)
    box = Mailbox()
    smtp = Controller(box, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        with HTTPServer(respond=lambda _: 202) as http:
            point_sample_at(monkeypatch, folder, smtp.port, http, tmp_path / "outbox")
            config_path = folder / "carehub.yaml"
            config = on_this_host(load_config(config_path))
            data_dir = tmp_path / "data"
            with HubThread(config, data_dir) as running:
                yield Care(running, box, http, config_path, data_dir)
    finally:
        smtp.stop()


# -- a visit first heard of in an update or a transfer ------------------------------------------


def test_an_admission_after_a_pre_admission_update_is_announced(care: Care) -> None:
    care.send(
        adt("A05", "PA-1", "20261130100000-0600", admit="20261201090000-0600"),
        adt("A08", "PA-2", "20261130110000-0600"),  # pre-admission update: class I already
        adt("A01", "PA-3", "20261201091500-0600", admit="20261201090000-0600"),
        adt("A01", "PA-4", "20261201093000-0600", admit="20261201090000-0600"),  # a repeat
    )
    assert care.timeline("V20261201-0900") == [
        ("A08", "none"),
        ("A01", "admission"),
        ("A01", "none"),
    ]
    assert care.told(AMARA, LINDQVIST) == [ADMISSION]
    visit = care.encounter("V20261201-0900")
    # When the stay began is PV1-44 of the admission, not the date of the update before it.
    assert visit["opened_at"].startswith("2026-12-01T15:00")
    assert visit["admitted_at"].startswith("2026-12-01T15:00")


def test_an_admission_after_a_transfer_of_an_unknown_visit_is_announced(care: Care) -> None:
    care.send(
        adt("A02", "TA-1", "20261201100000-0600", location="5E^501^A^RIVERSIDE_GH"),
        adt("A01", "TA-2", "20261201090000-0600", admit="20261201090000-0600"),
    )
    assert care.timeline("V20261201-0900") == [("A02", "none"), ("A01", "admission")]
    assert care.told(AMARA, LINDQVIST) == [ADMISSION]
    # The A01 is older than the A02: the bed the A02 named stays.
    assert care.encounter("V20261201-0900")["location"] == "5E/501/A"


def test_an_ed_arrival_after_an_update_is_announced(care: Care) -> None:
    ed = "ED^ED12^01^RIVERSIDE_GH"
    care.send(
        adt("A08", "EU-1", "20261201081500-0600", cls="E", location=ed),
        adt("A04", "EU-2", "20261201081600-0600", cls="E", location=ed),
        adt("A04", "EU-3", "20261201082000-0600", cls="E", location=ed),
    )
    assert care.timeline("V20261201-0900") == [
        ("A08", "none"),
        ("A04", "ed_arrival"),
        ("A04", "none"),
    ]
    assert care.told(AMARA, LINDQVIST) == [ED_VISIT]


def test_an_ed_patient_moved_to_an_inpatient_bed_by_an_a02_is_admitted(care: Care) -> None:
    care.send(
        adt("A04", "EA-1", "20261201081500-0600", cls="E", location="ED^ED12^01^RIVERSIDE_GH"),
        adt("A02", "EA-2", "20261201120000-0600", cls="I", location="4W^412^A^RIVERSIDE_GH"),
    )
    assert care.timeline("V20261201-0900") == [("A04", "ed_arrival"), ("A02", "admission")]
    assert care.told(AMARA, LINDQVIST) == [ED_VISIT, ADMISSION]
    visit = care.encounter("V20261201-0900")
    assert (visit["state"], visit["patient_class"]) == ("admitted", "I")


# -- corrected discharges ------------------------------------------------------------------------


def admit_and_discharge(care: Care, disposition: str, to: str = "") -> None:
    care.send(
        adt("A01", "CD-1", "20261127090000-0600", admit="20261127090000-0600"),
        discharge_message("CD-2", "20261201153000-0600", disposition, to),
    )


def discharge_message(
    control_id: str, at: str, disposition: str, to: str = "", event: str = "A03"
) -> bytes:
    """The visit's discharge (Tuesday 15:30 at -0600) as a message sent ``at``: the first
    one, or a correction of it with another disposition or destination."""
    return adt(
        event, control_id, at, discharge="20261201153000-0600", disposition=disposition, to=to
    )


def test_a_discharge_to_a_nursing_facility_corrected_to_home_opens_the_clocks(care: Care) -> None:
    admit_and_discharge(care, "03", "MAPLEGROVE_SNF")
    assert care.followups() == []
    care.send(discharge_message("CD-3", "20261201170000-0600", "01"))
    assert care.timeline("V20261201-0900") == [
        ("A01", "admission"),
        ("A03", "discharge"),
        ("A03", "discharge_corrected"),
    ]
    visit = care.encounter("V20261201-0900")
    assert (visit["disposition"], visit["discharged_to"]) == ("01", None)
    assert "MAPLEGROVE_SNF" not in json.dumps(visit["snapshot"]["encounter"])
    items = care.followups()
    assert sorted((f["kind"], f["status"]) for f in items) == [
        ("contact", "open"),
        ("visit", "open"),
    ]
    # Due from the discharge (Tuesday 1 December, 15:30 at -0600), not from the correction.
    due = {f["kind"]: datetime.fromisoformat(f["due_at"]) for f in items}
    assert due["contact"] == datetime(2026, 12, 4, 5, 59, 59, 999999, tzinfo=UTC)
    assert "MAPLEGROVE_SNF" in care.show("V20261201-0900")["timeline"][-1]["note"]

    # Corrected back to the nursing facility, and home again: fresh clocks each time home.
    for control_id, disposition in (("CD-4", "03"), ("CD-5", "06")):
        care.send(
            discharge_message(
                control_id,
                "20261201180000-0600",
                disposition,
                "MAPLEGROVE_SNF" if disposition == "03" else "",
            )
        )
    assert sorted(f["status"] for f in care.followups()) == [
        "not_home",
        "not_home",
        "open",
        "open",
    ]


@pytest.mark.parametrize("trigger", ["A03", "A08"])
def test_a_death_reported_after_a_discharge_home_stops_the_clocks(care: Care, trigger: str) -> None:
    admit_and_discharge(care, "01")
    assert {f["status"] for f in care.followups()} == {"open"}
    care.send(
        adt(
            trigger,
            "CD-3",
            "20261201200000-0600",
            discharge="20261201153000-0600",
            disposition="20",
        )
    )
    assert care.timeline("V20261201-0900")[-1] == (trigger, "discharge_corrected")
    items = care.followups()
    assert [(f["status"], f["reason"]) for f in items] == [
        ("died", "the corrected discharge says the patient died")
    ] * 2
    care.tick(datetime(2026, 12, 20, 12, 0, tzinfo=UTC))  # both past due
    alerts = [kind for kind, _ in care.told(AMARA, COORDINATOR) if kind == "followup_overdue"]
    assert alerts == []
    assert "died" in care.text("followups", "list", "--all")


# -- late messages -------------------------------------------------------------------------------


def test_late_messages_do_not_put_a_discharged_inpatient_back_in_the_ed(care: Care) -> None:
    care.send(
        adt(
            "A03",
            "LM-1",
            "20261204153000-0600",
            discharge="20261204153000-0600",
            disposition="01",
        ),
        adt("A01", "LM-2", "20261201090000-0600", admit="20261201090000-0600"),
        adt("A04", "LM-3", "20261201080000-0600", cls="E", location="ED^ED12^01^RIVERSIDE_GH"),
    )
    visit = care.encounter("V20261201-0900")
    assert (visit["state"], visit["patient_class"], visit["location"]) == (
        "discharged",
        "I",
        "4W/412/A",
    )
    assert care.told(AMARA, LINDQVIST) == [DISCHARGE]


def test_an_a13_that_comes_before_its_a03_takes_the_discharge_back(care: Care) -> None:
    care.send(
        adt("A01", "EC-1", "20261201090000-0600", admit="20261201090000-0600"),
        adt("A13", "EC-2", "20261204160000-0600"),
        adt(
            "A03",
            "EC-3",
            "20261204153000-0600",
            discharge="20261204153000-0600",
            disposition="01",
        ),
    )
    assert care.timeline("V20261201-0900") == [
        ("A01", "admission"),
        ("A13", "none"),
        ("A03", "none"),
    ]
    assert care.encounter("V20261201-0900")["state"] == "admitted"
    assert care.followups() == []
    assert care.told(AMARA, LINDQVIST) == [ADMISSION]
    # A discharge after the A13 is a new one.
    care.send(
        adt(
            "A03",
            "EC-4",
            "20261205110000-0600",
            discharge="20261205110000-0600",
            disposition="01",
        )
    )
    assert care.told(AMARA, LINDQVIST) == [ADMISSION, DISCHARGE]
    assert len(care.followups()) == 2


# -- times on the command line -------------------------------------------------------------------


def test_every_time_on_the_command_line_says_its_zone(care: Care) -> None:
    admit_and_discharge(care, "01")
    visit_id = str(care.encounter("V20261201-0900")["id"])

    listed = care.text("encounters", "list")
    for column in ("opened (UTC)", "discharged (UTC)", "updated (UTC)"):
        assert column in listed
    assert "2026-12-01 21:30 [01]" in listed  # 15:30 at -0600

    shown = care.text("encounters", "show", visit_id)
    for line in ("opened (UTC)", "admitted (UTC)", "discharged (UTC)", "updated (UTC)"):
        assert line in shown
    assert "event time (UTC)" in shown and "recorded (UTC)" in shown

    # The worklist is in the coordinators' zone, named once under the table.
    followups = care.text("followups", "list")
    assert "times in America/Chicago" in followups
    contact = min(f["id"] for f in care.followups())
    done = care.text("followups", "done", str(contact), "--at", "2026-12-02T14:30:00-06:00")
    assert "done at 2026-12-02 14:30 CST" in done


def test_those_told_of_a_discharge_hear_its_correction(care: Care) -> None:
    """A discharge to a nursing facility corrected to home: the PCP and the coordinator are
    told of the correction, naming what it replaces, and so is the facility, which the care
    team no longer lists but which was told the patient was coming; a second correction is
    told again, not suppressed as a repeat."""
    snf = "admissions@maplegrove-snf.example.com"
    admit_and_discharge(care, "03", "MAPLEGROVE_SNF")
    assert care.told(AMARA, snf) == [DISCHARGE]
    care.send(discharge_message("CD-3", "20261201170000-0600", "01"))
    corrected = ("discharge_corrected", "Corrected discharge from Riverside General Hospital")
    for address in (LINDQVIST, COORDINATOR, snf):
        assert care.told(AMARA, address)[-1] == corrected, address
    (mail,) = [m for m in care.mailbox.mails if m.to == LINDQVIST and "Corrected" in m.subject]
    body = " ".join(mail.body.split())
    assert "discharged 01 (home or self care)" in body
    replaced = "This replaces the earlier notice: 03 (to a skilled nursing facility) to Maple Grove"
    assert replaced in body
    # The facility, off the team now, gets the minimum: that its notice no longer stands.
    (mail,) = [m for m in care.mailbox.mails if m.to == snf and "Corrected" in m.subject]
    body = " ".join(mail.body.split())
    assert "The earlier discharge notice you received no longer stands" in body
    assert "home" not in body
    care.send(discharge_message("CD-4", "20261201180000-0600", "06"))
    assert [k for k, _ in care.told(AMARA, LINDQVIST)].count("discharge_corrected") == 2


RIVERBEND = "intake@riverbend-irf.example.org"
MAPLEGROVE = "admissions@maplegrove-snf.example.com"


def test_a_facility_named_only_by_a_correction_hears_it_corrected_away_and_cancelled(
    care: Care,
) -> None:
    """Home, then corrected to a rehabilitation facility (told), then to a nursing facility:
    the first facility hears it was corrected away; an A13 then reaches both facilities."""
    admit_and_discharge(care, "01")
    care.send(discharge_message("CD-3", "20261201170000-0600", "62", "RIVERBEND_IRF"))
    assert [k for k, _ in care.told(AMARA, RIVERBEND)] == ["discharge_corrected"]
    care.send(discharge_message("CD-4", "20261201180000-0600", "03", "MAPLEGROVE_SNF"))
    assert [k for k, _ in care.told(AMARA, RIVERBEND)] == ["discharge_corrected"] * 2
    assert [k for k, _ in care.told(AMARA, MAPLEGROVE)] == ["discharge_corrected"]
    care.send(adt("A13", "CD-5", "20261201190000-0600"))
    for facility in (RIVERBEND, MAPLEGROVE):
        assert care.told(AMARA, facility)[-1][0] == "retraction", facility


def test_an_a08_correction_naming_a_facility_tells_that_facility(care: Care) -> None:
    admit_and_discharge(care, "01")
    care.send(discharge_message("CD-3", "20261201170000-0600", "03", "MAPLEGROVE_SNF", event="A08"))
    assert [k for k, _ in care.told(AMARA, MAPLEGROVE)] == ["discharge_corrected"]


def test_the_care_platform_hears_a_corrected_discharge_over_fhir(care: Care) -> None:
    admit_and_discharge(care, "03", "MAPLEGROVE_SNF")
    care.send(discharge_message("CD-3", "20261201170000-0600", "01"))

    def discharges() -> list[bytes]:
        return [r.body for r in care.http.requests if b"notification-discharge" in r.body]

    bodies = discharges()
    assert len(bodies) == 2, [r.path for r in care.http.requests]
    assert b'"code": "01"' in bodies[1] or b'"code":"01"' in bodies[1]


def test_a_minimum_detail_reader_hears_of_the_correction_without_its_details(care: Care) -> None:
    """An SMS coordinator on minimum detail: the correction says that the discharge was
    corrected, not where the patient went or went before."""
    patient = "RG100235"
    care.send(
        adt("A01", "MD-1", "20261127090000-0600", patient=patient, admit="20261127090000-0600"),
        adt(
            "A03",
            "MD-2",
            "20261201153000-0600",
            patient=patient,
            discharge="20261201153000-0600",
            disposition="03",
            to="MAPLEGROVE_SNF",
        ),
        adt(
            "A03",
            "MD-3",
            "20261201170000-0600",
            patient=patient,
            discharge="20261201153000-0600",
            disposition="01",
        ),
    )
    texts = [r.body.decode() for r in care.http.requests if r.path == "/messages"]
    corrected = [t for t in texts if "corrected the discharge" in t]
    assert corrected, texts
    assert all("replaces" not in t and "nursing" not in t for t in corrected), corrected
