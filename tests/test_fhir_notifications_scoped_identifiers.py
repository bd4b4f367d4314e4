"""Identifiers sent without an assigning authority (PID-3.4, PV1-19.4 empty) are only unique
within the facility that sent them: two hospitals' MRN 55501 are two patients, in carehub's
store (`carehub encounters list`), on the care team (`carehub routes test`) and in the Da Vinci
notifications a real hub POSTs to a real FHIR endpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from sqlalchemy import select, update

from carehub.cli import main
from carehub.config import load_config
from carehub.store.schema import encounters, patient_preferences
from carehub.testing import HubThread
from tests.test_fhir_notifications import (
    DESTINATION,
    NotificationEndpoint,
    encounter,
    endpoint,
    header,
    of_type,
)
from tests.test_fhir_notifications import routes as notification_routes
from tests.test_worker import send, write_config

__all__ = ["endpoint"]  # a fixture, used by name


def adt(
    control_id: str,
    event: str,
    facility: str,
    pid3: str,
    name: str,
    pv1_19: str,
    *,
    patient_class: str = "E",
    unit: str = "ED",
    discharged: str = "",
) -> str:
    """An ADT message from ``facility`` (MSH-4) with PID-3 and PV1-19 as given."""
    pv1 = ["PV1", "1", patient_class, f"{unit}^1^1^{facility}", "", "", ""]
    pv1 += ["1902837465^Ortega^Lucia^^^Dr^^^NPI"] + [""] * 11 + [pv1_19]
    if discharged:
        pv1 += [""] * 16 + ["01"] + [""] * 8 + [discharged]
    return (
        "\r".join(
            [
                f"MSH|^~\\&|ADT|{facility}|CAREHUB|CAREHUB|20261201090000-0500||ADT^{event}^ADT_A01|"
                f"{control_id}|P|2.5.1",
                f"EVN|{event}|20261201090000-0500",
                f"PID|1||{pid3}||{name}||19500101|F",
                "|".join(pv1),
            ]
        )
        + "\r"
    )


ALICE = adt("NA-001", "A04", "NORTHSIDE_HOSP", "55501^^^^MR", "Alpha^Alice", "9001^^^^VN")
BOB = adt("NB-001", "A04", "SOUTHSIDE_CLINIC", "55501^^^^MR", "Bravo^Bob", "9002^^^^VN")
CARLA = adt(
    "NA-101", "A01", "NORTHSIDE_HOSP", "NS-1^^^NSH^MR", "Charlie^Carla", "100234",
    patient_class="I", unit="3W",
)  # fmt: skip
DAN = adt(
    "NB-101", "A03", "SOUTHSIDE_CLINIC", "SS-9^^^SSC^MR", "Delta^Dan", "100234",
    patient_class="I", unit="2E", discharged="20261202093000-0500",
)  # fmt: skip


def routes(base_url: str, options: str = "", before: str = "") -> str:
    """The notification route of test_fhir_notifications, without Riverside's settings: these
    hospitals' identifiers are scoped as they come."""
    return notification_routes(base_url, options, before, settings={})


def cli(config: Path, data_dir: Path, *args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(
        main, [*args, "--json", "--config", str(config), "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines() if line.strip()]


def patient(bundle: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    """The Patient's full URL and (system, value) of its identifiers."""
    entry = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    found = [(i["system"], i["value"]) for i in entry["resource"]["identifier"]]
    return entry["fullUrl"], found


def test_two_hospitals_patients_and_visits_with_the_same_numbers_stay_apart(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    config_path = write_config(tmp_path, routes(endpoint.base_url))
    with HubThread(load_config(config_path), tmp_path / "data") as hub:
        for sent, text in enumerate((ALICE, BOB, CARLA, DAN), start=1):
            send(hub, [text])
            hub.wait_for_deliveries(sent, destination=DESTINATION)
    assert endpoint.problems == []
    alice, bob, carla, dan = endpoint.received

    base = "https://carehub.invalid/id/"
    assert patient(alice)[1] == [(f"{base}NORTHSIDE_HOSP", "55501")]
    assert patient(bob)[1] == [(f"{base}SOUTHSIDE_CLINIC", "55501")]
    assert patient(alice)[0] != patient(bob)[0]
    # Dan's discharge is not Carla's stay: another Encounter, in its hospital's system.
    assert header(carla)["focus"] != header(dan)["focus"]
    visit = [(i["system"], i["value"]) for i in encounter(dan)["identifier"]]
    assert visit == [(f"{base}SOUTHSIDE_CLINIC", "100234")]
    assert encounter(carla)["identifier"][0]["system"] == f"{base}NORTHSIDE_HOSP"
    # An authority the sender gave is kept as it is.
    assert patient(carla)[1] == [(f"{base}NSH", "NS-1")]
    assert not any("urn:carehub:" in json.dumps(b) for b in endpoint.received)

    # carehub's own store keys them apart; a bare id lists every patient it names.
    found = cli(config_path, tmp_path / "data", "encounters", "list", "--patient", "55501")
    assert sorted((e["patient_key"], e["visit_key"]) for e in found) == [
        ("NORTHSIDE_HOSP|55501", "NORTHSIDE_HOSP|9001"),
        ("SOUTHSIDE_CLINIC|55501", "SOUTHSIDE_CLINIC|9002"),
    ]
    one = cli(
        config_path, tmp_path / "data", "encounters", "list", "--patient", "NORTHSIDE_HOSP|55501"
    )
    assert [e["visit_key"] for e in one] == ["NORTHSIDE_HOSP|9001"]
    stays = cli(config_path, tmp_path / "data", "encounters", "list", "--patient", "SS-9")
    assert [(e["visit_key"], e["state"]) for e in stays] == [
        ("SOUTHSIDE_CLINIC|100234", "discharged")
    ]
    carla_stay = cli(config_path, tmp_path / "data", "encounters", "list", "--patient", "NS-1")
    assert [e["state"] for e in carla_stay] == ["admitted"]


def test_the_system_base_and_a_mapped_facility_name_the_systems(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    options = """          identifier_system_base: https://example.org/fhir/id
          identifier_systems: {NORTHSIDE_HOSP: "urn:oid:2.16.840.1.113883.3.999.7"}
"""
    config_path = write_config(tmp_path, routes(endpoint.base_url, options))
    with HubThread(load_config(config_path), tmp_path / "data") as hub:
        send(hub, [ALICE, BOB])
        hub.wait_for_deliveries(2, destination=DESTINATION)
    assert endpoint.problems == []
    by_name = {of_type(b, "Patient")[0]["name"][0]["family"]: b for b in endpoint.received}
    assert patient(by_name["Alpha"])[1] == [("urn:oid:2.16.840.1.113883.3.999.7", "55501")]
    assert patient(by_name["Bravo"])[1] == [
        ("https://example.org/fhir/id/SOUTHSIDE_CLINIC", "55501")
    ]
    assert encounter(by_name["Bravo"])["identifier"][0]["system"] == (
        "https://example.org/fhir/id/SOUTHSIDE_CLINIC"
    )


def test_a_system_base_that_is_no_uri_is_refused(tmp_path: Path) -> None:
    config_path = write_config(
        tmp_path, routes("https://fhir.example.org", "          identifier_system_base: ids\n")
    )
    result = CliRunner().invoke(
        main, ["routes", "check", "--offline", "--config", str(config_path)]
    )
    assert result.exit_code != 0
    assert "identifier_system_base" in result.output and "not an absolute URI" in result.output


def test_a_visit_recorded_under_the_bare_numbers_goes_on_under_them(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    """A visit stored before identifiers were scoped (its keys ``|55501``, ``|9001``): the
    next message of that visit continues it rather than opening a second one."""
    config_path = write_config(tmp_path, routes(endpoint.base_url))
    discharge = adt(
        "NA-002", "A03", "NORTHSIDE_HOSP", "55501^^^^MR", "Alpha^Alice", "9001^^^^VN",
        discharged="20261201120000-0500",
    )  # fmt: skip
    with HubThread(load_config(config_path), tmp_path / "data") as hub:
        send(hub, [ALICE])
        hub.wait_for_deliveries(1, destination=DESTINATION)
        with hub.store.engine.begin() as conn:
            conn.execute(update(encounters).values(patient_key="|55501", visit_key="|9001"))
        send(hub, [discharge])
        hub.wait_for_deliveries(2, destination=DESTINATION)
    found = cli(config_path, tmp_path / "data", "encounters", "list")
    assert [(e["patient_key"], e["visit_key"], e["state"]) for e in found] == [
        ("|55501", "|9001", "discharged")
    ]
    assert [code for code, _ in endpoint.events()] == [
        "notification-admit",
        "notification-discharge",
    ]
    # To the receiver it is the same patient and visit, within the hospital that sent them.
    admit, discharge = endpoint.received
    assert patient(admit) == patient(discharge)
    assert header(admit)["focus"] == header(discharge)["focus"]
    assert encounter(discharge)["identifier"][0]["system"].endswith("/NORTHSIDE_HOSP")


def test_a_roster_entry_names_the_sending_facility_and_no_other_hospital(
    tmp_path: Path,
) -> None:
    (tmp_path / "roster.csv").write_text(
        "patient_id,authority,opt_out,opt_out_reason,member_id,name,role,channel,address\n"
        "55501,NORTHSIDE_HOSP,,,cc-north,Casey Sampleton RN,care_coordinator,email,"
        "cc@north.example.org\n",
        encoding="utf-8",
    )
    route = """
routes:
  - name: care
    when: {type: ADT}
    steps:
      - translate: v2-to-event
      - enrich: encounter-state
      - enrich: {use: care-team, roster: roster.csv}
"""
    config_path = write_config(tmp_path, route)
    files = []
    for name, text in (("alice", ALICE), ("bob", BOB)):
        files.append(tmp_path / f"{name}.hl7")
        files[-1].write_text(text, encoding="utf-8")
    shown = CliRunner().invoke(
        main,
        ["routes", "test", "--json", "--config", str(config_path), "--data-dir",
         str(tmp_path / "data"), *map(str, files)],
    )  # fmt: skip
    assert shown.exit_code == 0, shown.output
    teams = [
        [r["id"] for r in step["output"]["recipients"]]
        for result in map(json.loads, shown.stdout.splitlines())
        for route_run in result["routes"]
        for step in route_run["steps"]
        if step["step"] == "enrich care-team"
    ]
    assert teams == [["cc-north"], []]


def test_an_opt_out_stated_under_the_bare_id_still_holds(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    """PD1-12 = Y recorded under ``|55501`` (before ids were scoped): a later message of the
    patient that leaves PD1-12 empty is still kept back, and the choice is now kept under
    the key the patient has (which the hub's own alerts look up)."""
    (tmp_path / "roster.csv").write_text(
        "patient_id,authority,opt_out,opt_out_reason,member_id,name,role,channel,address\n",
        encoding="utf-8",
    )
    care_team = "      - enrich: {use: care-team, roster: roster.csv, opt_out_field: PD1-12}\n"
    config_path = write_config(tmp_path, routes(endpoint.base_url, before=care_team))
    opted_out = ALICE.replace("\rPV1|", "\rPD1" + "|" * 12 + "Y\rPV1|")
    later = ALICE.replace("NA-001", "NA-002").replace("9001^^^^VN", "9003^^^^VN")
    with HubThread(load_config(config_path), tmp_path / "data") as hub:
        send(hub, [opted_out])
        hub.wait_for_deliveries(1, destination=DESTINATION)
        with hub.store.engine.begin() as conn:
            conn.execute(update(patient_preferences).values(patient_key="|55501"))
        send(hub, [later])
        done = hub.wait_for_deliveries(2, destination=DESTINATION)
        with hub.store.engine.connect() as conn:
            keys = dict(conn.execute(select(patient_preferences.c.patient_key,
                                            patient_preferences.c.opted_out)).all())  # fmt: skip
    assert endpoint.received == []
    assert "opted out" in (done[-1].receipt or "")
    assert keys == {"|55501": True, "NORTHSIDE_HOSP|55501": True}
