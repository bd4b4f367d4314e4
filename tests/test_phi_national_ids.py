"""Minimum necessary: a national identifier (PID-3 `998877661^^^SSA^SS` in sample feed 01) is
left out of the care event, so out of the webhook's body and the event archive, and out of the
Da Vinci FHIR notification's Patient, unless a route keeps it (`keep_national_ids` on the
translate step and on the fhir-notification forward). The MRN stays. A real hub takes the feed
over MLLP and sends to a real webhook receiver, a real FHIR endpoint and the file system."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from carehub.builtins.event_translator import translate_v2_to_event
from carehub.config import load_config
from carehub.hl7.view import MessageView
from carehub.store.schema import encounters
from carehub.testing import HubThread
from tests.helpers_http import HTTPServer, wait_for
from tests.test_fhir_notifications import NotificationEndpoint, of_type
from tests.test_worker import send, write_config

FEED_01 = (
    Path(__file__).resolve().parents[1] / "config/feeds/01-riverside-ed-visit.hl7"
).read_text(encoding="utf-8")
SSN = "998877661"
MRN = "RG100234"
US_SSN = "http://hl7.org/fhir/sid/us-ssn"
ROUTES = """
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - translate: {translate}
      - forward: {{channel: file, name: archive, directory: {archive}, body: event}}
      - enrich: encounter-state
      - forward: {{channel: webhook, name: platform, url: {webhook}}}
      - forward:
          channel: fhir-notification
          name: care-management
          base_url: {fhir}
          identifier_systems: {{RGH: "urn:oid:2.16.840.1.113883.3.999"}}
          retry: {{max_attempts: 2, initial_delay: 0.05, max_delay: 0.1, jitter: 0}}
{fhir_option}"""
KEEP = "{use: v2-to-event, keep_national_ids: true}"


@pytest.fixture
def receivers() -> Iterator[tuple[HTTPServer, NotificationEndpoint]]:
    with HTTPServer() as webhook, NotificationEndpoint() as fhir:
        yield webhook, fhir


def run_feed_01(
    tmp_path: Path,
    receivers: tuple[HTTPServer, NotificationEndpoint],
    translate: str = "v2-to-event",
    fhir_option: str = "",
) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Feed 01 through a hub: the archived event's text, the webhook's body, and the FHIR
    notification's Patient identifiers."""
    webhook, fhir = receivers
    archive = tmp_path / "archive"
    routes = ROUTES.format(
        translate=translate,
        archive=archive,
        webhook=webhook.url(),
        fhir=fhir.base_url,
        fhir_option=fhir_option,
    )
    config = load_config(write_config(tmp_path, routes))
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, [FEED_01])
        hub.wait_for_deliveries(3)
    wait_for(lambda: webhook.requests and fhir.received, what="the webhook and FHIR receivers")
    assert fhir.problems == []
    [archived] = [path.read_text(encoding="utf-8") for path in archive.rglob("*") if path.is_file()]
    [patient] = of_type(fhir.received[0], "Patient")
    return archived, webhook.requests[0].json, patient["identifier"]


def test_the_ssn_is_left_out_of_the_event_and_the_fhir_notification_by_default(
    tmp_path: Path, receivers: tuple[HTTPServer, NotificationEndpoint]
) -> None:
    archived, body, identifiers = run_feed_01(tmp_path, receivers)

    assert f"{SSN}^^^SSA^SS" in FEED_01  # the feed does carry it
    assert SSN not in archived and SSN not in json.dumps(body)
    assert [i["value"] for i in body["event"]["patient"]["identifiers"]] == [MRN]
    assert body["event"]["patient"]["primary"]["value"] == MRN
    assert MRN in archived
    assert [i["value"] for i in identifiers] == [MRN]
    assert not any(i.get("system") == US_SSN for i in identifiers)


def test_a_route_that_keeps_national_ids_sends_the_ssn_as_us_ssn(
    tmp_path: Path, receivers: tuple[HTTPServer, NotificationEndpoint]
) -> None:
    archived, body, identifiers = run_feed_01(
        tmp_path, receivers, translate=KEEP, fhir_option="          keep_national_ids: true\n"
    )

    assert SSN in archived
    assert {i["value"] for i in body["event"]["patient"]["identifiers"]} == {MRN, SSN}
    assert {"system": US_SSN, "value": SSN} in [
        {"system": i.get("system"), "value": i["value"]} for i in identifiers
    ]


def test_the_fhir_notification_leaves_the_ssn_out_even_of_a_visit_that_holds_it(
    tmp_path: Path, receivers: tuple[HTTPServer, NotificationEndpoint]
) -> None:
    """A visit recorded from events that kept the SSN (another route's choice, or before the
    default changed) still sends none unless the forward itself keeps national ids."""
    _, body, identifiers = run_feed_01(tmp_path, receivers, translate=KEEP)

    assert SSN in json.dumps(body)  # the event kept it, as that route asked
    assert [i["value"] for i in identifiers] == [MRN]


def test_which_identifiers_are_national() -> None:
    """Table 0203's national person identifiers (SS, NI, NN + a country code) and those the
    Social Security Administration assigns, typed or not; a driver's licence or an MRN is not."""
    pid3 = "~".join(
        (
            "M1^^^RGH^MR",
            "S1^^^SSA",
            "S2^^^USSSA^SS",
            "N1^^^GOV^NI",
            "N2^^^NHS^NNGBR",
            "D1^^^IL^DL",
            "NN1^^^X^NN",
        )
    )
    text = FEED_01.replace(f"{MRN}^^^RGH^MR~{SSN}^^^SSA^SS", pid3)
    patient = translate_v2_to_event(MessageView(text)).patient
    assert patient is not None
    assert [i.value for i in patient.identifiers] == ["M1", "D1", "NN1"]
    kept = translate_v2_to_event(MessageView(text), keep_national_ids=True).patient
    assert kept is not None and len(kept.identifiers) == 7


def _with_pid3(pid3: str, trigger: str = "A01", control_id: str = "NAT-1") -> str:
    """Feed 01 with PID-3 replaced and its own trigger and control id."""
    lines = FEED_01.replace("\n", "\r").rstrip("\r").split("\r")
    out = []
    for line in lines:
        fields = line.split("|")
        if fields[0] == "MSH":
            fields[8] = f"ADT^{trigger}^ADT_A01"
            fields[9] = control_id
        elif fields[0] == "PID":
            fields[3] = pid3
        elif fields[0] == "EVN":
            fields[1] = trigger
        out.append("|".join(fields))
    return "\r".join(out) + "\r"


def test_keys_are_made_as_before_national_ids_were_left_out() -> None:
    """An SSN before an untyped MRN keyed the patient by the SSN: it still does (so visits
    open across an upgrade are found), though the event sent names only the MRN."""
    event = translate_v2_to_event(MessageView(_with_pid3(f"{SSN}^^^SSA^SS~{MRN}^^^RGH")))
    kept = translate_v2_to_event(
        MessageView(_with_pid3(f"{SSN}^^^SSA^SS~{MRN}^^^RGH")), keep_national_ids=True
    )
    assert event.patient is not None and kept.patient is not None
    assert event.patient.key == kept.patient.primary  # the key of earlier releases
    assert event.patient.primary is not None and event.patient.primary.value == MRN
    assert SSN not in event.model_dump_json()


def test_a_patient_known_only_by_an_ssn_is_still_tracked_and_the_ssn_not_sent(
    tmp_path: Path, receivers: tuple[HTTPServer, NotificationEndpoint]
) -> None:
    webhook, _ = receivers
    routes = f"""
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - translate: v2-to-event
      - enrich: encounter-state
      - forward: {{channel: webhook, name: platform, url: {webhook.url()}}}
"""
    config = load_config(write_config(tmp_path, routes))
    only_ssn = f"{SSN}^^^SSA^SS"
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, [_with_pid3(only_ssn, "A01", "NAT-A01"), _with_pid3(only_ssn, "A03", "NAT-A03")])
        hub.wait_for_deliveries(2)
        with hub.store.engine.connect() as conn:
            visits = conn.execute(select(encounters.c.patient_key, encounters.c.state)).all()
    wait_for(lambda: len(webhook.requests) == 2, what="both events")
    assert all(SSN not in json.dumps(request.json) for request in webhook.requests)
    # One visit, admitted then discharged: the patient is tracked by the key alone.
    assert [state for _, state in visits] == ["discharged"], visits
