"""What a visit's Da Vinci notifications say it is, as its messages built it: the period as
the sender gave it (never a message's time as the start, never a UTC date), a merge that
retired the patient's identifier, data the sender deleted with the HL7 explicit null ``""``,
and text from a feed that declares ISO-8859-1 but writes Windows-1252. A real hub takes each
message over MLLP and POSTs to a real FHIR endpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from carehub.cli import main
from carehub.config import load_config
from carehub.testing import HubThread, mllp_exchange
from tests.test_fhir_notifications import (
    DESTINATION,
    RIVERSIDE,
    NotificationEndpoint,
    encounter,
    endpoint,
    header,
    of_type,
)
from tests.test_fhir_notifications import routes as notification_routes
from tests.test_worker import write_config

__all__ = ["endpoint"]  # a fixture, used by name

MOREAU = "1497758544^Moreau^Celine^^^Dr^^^NPI"


def adt(
    control_id: str,
    event: str,
    when: str,
    *,
    pid3: str = "ZZ500007^^^RGH^MR",
    phone: str = "",
    patient_class: str = "I",
    attending: str = MOREAU,
    admitting: str = "",
    disposition: str = "",
    destination: str = "",
    admitted: str = "",
    discharged: str = "",
    charset: str = "",
    name: str = "Evening^Eve",
    extra: tuple[str, ...] = (),
) -> str:
    """An ADT message from RIVERSIDE_GH: EVN-2 and MSH-7 ``when``, PV1-19 VS-1."""
    msh = (
        f"MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|{when}||ADT^{event}^ADT_A01|"
        f"{control_id}|P|2.5.1"
    )
    if charset:
        msh += f"|||AL|NE|USA|{charset}"
    pv1 = ["PV1", "1", patient_class, "6W^601^A^RIVERSIDE_GH", "", "", "", attending]
    pv1 += [""] * 11 + ["VS-1^^^RGH^VN"] + [""] * 16 + [disposition, destination]
    pv1 += [""] * 6 + [admitted, discharged]
    pv1[17] = admitting
    segments = [
        msh,
        f"EVN|{event}|{when}",
        f"PID|1||{pid3}||{name}||19750707|F|||||{phone}",
        "|".join(pv1),
        *extra,
    ]
    return "\r".join(segments) + "\r"


def routes(base_url: str) -> str:
    """The notification route of test_fhir_notifications, with RGH's identifier system and
    no facility names."""
    return notification_routes(
        base_url, settings={"identifier_systems": RIVERSIDE["identifier_systems"]}
    )


def run(tmp_path: Path, endpoint: NotificationEndpoint, texts: list[str | bytes]) -> None:
    """Each message in turn, as the visit went, until each has its delivery decided."""
    config = load_config(write_config(tmp_path, routes(endpoint.base_url)))
    with HubThread(config, tmp_path / "data") as hub:
        for sent, text in enumerate(texts, start=1):
            payload = text.encode("utf-8") if isinstance(text, str) else text
            (answer,) = mllp_exchange(hub.mllp_address, [payload])
            assert b"MSA|AA|" in answer
            hub.wait_for_deliveries(sent, destination=DESTINATION)
    assert endpoint.problems == []


def period(bundle: dict[str, Any]) -> dict[str, str]:
    return encounter(bundle).get("period") or {}


# -- Encounter.period ----------------------------------------------------------------------


def test_an_ed_visit_without_an_admit_time_never_starts_on_a_utc_date(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    """An evening ED arrival (21:10 at UTC-5, the next day in UTC) with no PV1-44."""
    arrival = adt("S7-1", "A04", "20261201211000-0500", patient_class="E")
    leaves = adt(
        "S7-2", "A03", "20261202030000-0500", patient_class="E", disposition="01",
        discharged="20261202024500-0500",
    )  # fmt: skip
    run(tmp_path, endpoint, [arrival, leaves])
    admit, discharge = endpoint.received
    assert "start" not in period(admit)
    assert period(discharge) == {"end": "2026-12-02T02:45:00-05:00"}


def test_a_discharge_heard_of_first_keeps_its_end_and_invents_no_start(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    """The A03 (sent at 12:00) comes before anything else of the visit; it left at 11:30."""
    leaves = adt(
        "S8-1", "A03", "20261201120000-0500", disposition="01",
        discharged="20261201113000-0500",
    )  # fmt: skip
    run(tmp_path, endpoint, [leaves])
    (discharge,) = endpoint.received
    assert encounter(discharge)["status"] == "finished"
    assert period(discharge) == {"end": "2026-12-01T11:30:00-05:00"}


def test_the_period_is_as_the_sender_wrote_it_in_every_notification(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    """PV1-44 with its offset in each notification; a discharge without PV1-45 ends when the
    A03 says it happened, with its offset, in the correction sent a day later too."""
    admitted = "20261201205500-0500"
    texts: list[str | bytes] = [
        adt("P-1", "A01", "20261201210000-0500", admitted=admitted),
        adt("P-2", "A03", "20261202220000-0500", admitted=admitted, disposition="01"),
        adt("P-3", "A08", "20261203090000-0500", admitted=admitted, disposition="06"),
    ]
    run(tmp_path, endpoint, texts)
    admit, discharge, corrected = endpoint.received
    assert period(admit) == {"start": "2026-12-01T20:55:00-05:00"}
    assert period(discharge) == {
        "start": "2026-12-01T20:55:00-05:00",
        "end": "2026-12-02T22:00:00-05:00",
    }
    assert encounter(corrected)["hospitalization"]["dischargeDisposition"]["coding"][0][
        "code"
    ] == "06"  # fmt: skip
    assert period(corrected) == period(discharge)


# -- merges --------------------------------------------------------------------------------


def test_after_a_merge_the_patient_says_which_record_it_replaces(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    arrival = adt("M-1", "A04", "20261201090000-0500", pid3="ZZ599999^^^RGH^MR", patient_class="E")
    merge = (
        "MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|20261201110000-0500||ADT^A40^ADT_A39|"
        "M-2|P|2.5.1\rEVN|A40|20261201110000-0500\r"
        "PID|1||ZZ500004^^^RGH^MR||Mergetest^Mia||19900404|F\rMRG|ZZ599999^^^RGH^MR\r"
    )
    leaves = adt(
        "M-3", "A03", "20261201150000-0500", pid3="ZZ500004^^^RGH^MR", patient_class="E",
        disposition="01", discharged="20261201143000-0500",
    )  # fmt: skip
    run(tmp_path, endpoint, [arrival, merge, leaves])
    admit, discharge = endpoint.received
    assert header(admit)["focus"] == header(discharge)["focus"]
    (before,) = of_type(admit, "Patient")
    (after,) = of_type(discharge, "Patient")
    system = "urn:oid:2.16.840.1.113883.3.999"
    assert [(i["system"], i["value"], i.get("use")) for i in after["identifier"]] == [
        (system, "ZZ500004", None),
        (system, "ZZ599999", "old"),
    ]
    assert after["link"] == [
        {"other": {"identifier": {"system": system, "value": "ZZ599999"}}, "type": "replaces"}
    ]
    assert [i["value"] for i in before["identifier"]] == ["ZZ599999"]
    assert "link" not in before


# -- the explicit null ---------------------------------------------------------------------


def test_what_the_sender_deletes_with_a_null_is_no_longer_sent(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    """An A08 sends PID-13 and PV1-7 as ``""``: the discharge no longer names the phone or
    the attending. Fields it leaves empty keep what was known (the admitting doctor, PV1-17
    of the admission; the address)."""
    admission = adt(
        "N-1", "A01", "20261201081000-0500", phone="^PRN^PH^^1^217^5550111",
        admitting="1902837465^Ortega^Lucia^^^Dr^^^NPI",
    )  # fmt: skip
    nulled = adt("N-2", "A08", "20261201120000-0500", phone='""', attending='""')
    leaves = adt(
        "N-3", "A03", "20261202100000-0500", attending="", disposition="01",
        discharged="20261202095000-0500",
    )  # fmt: skip
    run(tmp_path, endpoint, [admission, nulled, leaves])
    admit, discharge = endpoint.received
    assert of_type(admit, "Patient")[0]["telecom"][0]["value"] == "+1 217 5550111"
    assert {p["type"][0]["coding"][0]["code"] for p in encounter(admit)["participant"]} == {
        "ATND",
        "ADM",
    }
    assert "telecom" not in of_type(discharge, "Patient")[0]
    roles = [p["type"][0]["coding"][0]["code"] for p in encounter(discharge)["participant"]]
    assert roles == ["ADM"]
    names = [p["name"][0]["family"] for p in of_type(discharge, "Practitioner")]
    assert "Moreau" not in names and "Ortega" in names


def test_a_destination_deleted_with_a_null_corrects_the_discharge(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    leaves = adt(
        "D-1", "A03", "20261202100000-0500", disposition="03",
        destination="MAPLEGROVE_SNF^Maple Grove Skilled Nursing", discharged="20261202095000-0500",
    )  # fmt: skip
    same = adt(
        "D-2", "A08", "20261202110000-0500", disposition="03",
        destination="MAPLEGROVE_SNF^Maple Grove Skilled Nursing",
    )  # fmt: skip
    deleted = adt("D-3", "A08", "20261202120000-0500", disposition="03", destination='""')
    run(tmp_path, endpoint, [leaves, same, deleted])
    discharge, corrected = endpoint.received  # the A08 repeating the destination sends nothing
    assert encounter(discharge)["hospitalization"]["destination"] == {
        "display": "Maple Grove Skilled Nursing"
    }
    assert "destination" not in encounter(corrected)["hospitalization"]


# -- Windows-1252 in a message declared ISO-8859-1 -------------------------------------------


def test_windows_1252_punctuation_goes_out_as_the_character_it_stands_for(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    text = adt("C-1", "A04", "20261201090000-0600", patient_class="E", charset="8859/1")
    raw = text.replace("Evening^Eve", "OBRIEN^Sean").encode("latin-1")
    raw = raw.replace(b"OBRIEN", b"O\x92Brien")
    run(tmp_path, endpoint, [raw])
    (admit,) = endpoint.received
    assert of_type(admit, "Patient")[0]["name"][0]["family"] == "O\u2019Brien"


def test_the_care_event_lists_what_the_sender_deleted(tmp_path: Path) -> None:
    """``carehub routes test`` shows the v2-to-event output: fields sent as ``""`` are in
    ``cleared``; empty ones (PV1-8 here) are not."""
    config = write_config(tmp_path, routes("https://fhir.example.org"))
    message = tmp_path / "a08.hl7"
    message.write_text(
        adt("E-1", "A08", "20261201120000-0500", phone='""', attending='""', destination='""'),
        encoding="utf-8",
    )
    shown = CliRunner().invoke(
        main,
        ["routes", "test", "--json", "--config", str(config), "--data-dir",
         str(tmp_path / "data"), str(message)],
    )  # fmt: skip
    assert shown.exit_code == 0, shown.output
    (result,) = map(json.loads, shown.stdout.splitlines())
    (event,) = [
        step["output"]
        for route in result["routes"]
        for step in route["steps"]
        if step["step"] == "translate v2-to-event"
    ]
    assert event["cleared"] == ["patient.phone", "encounter.attending", "encounter.discharged_to"]
    assert "phone" not in event["patient"] and "attending" not in event["encounter"]
