"""A care event keeps the first MAX_DIAGNOSES diagnoses of a message, in the message's order,
and counts the DG1 segments it left out (``diagnoses_left_out``), so that what is stored for a
message of 20,000 DG1s (its event, its visit's snapshot, the transition, the FHIR bundle of
Conditions) stays kilobytes, not megabytes written under the store's write lock while every
sender's intake waits. No real ADT comes near the cap: the sample corpus has four at most."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from carehub.builtins.event_translator import translate_v2_to_event
from carehub.components import Work
from carehub.config import load_config
from carehub.events import CareEvent
from carehub.hl7.view import MessageView
from carehub.routing.dryrun import preview_message
from carehub.store.schema import encounter_events, encounters, message_steps
from carehub.testing import HTTPReceiver, HubThread, make_adt, mllp_exchange
from tests.test_encounters import Feed, adt, make_enricher
from tests.test_fhir_notifications import routes
from tests.test_worker import write_config

HEAVY = 20_000
#: The diagnoses a care event keeps (carehub.events.MAX_DIAGNOSES, as the README says).
MAX_DIAGNOSES = 100
#: What any one stored record of a capped message may take: 100 diagnoses are a few KiB.
RECORD_BOUND = 64 * 1024
PATIENT = "CAPPED7"


def _dg1s(count: int) -> list[str]:
    return [f"DG1|{i}||I21.{i % 9}^Diagnosis {i}^I10||20261125|A" for i in range(1, count + 1)]


def _first(count: int) -> list[str]:
    return [f"Diagnosis {i}" for i in range(1, count + 1)]


def _event(segments: list[str]) -> CareEvent:
    return translate_v2_to_event(MessageView(make_adt("C-1", extra_segments=segments)))


def _routed(hub: HubThread, control_id: str) -> bool:
    return any(
        m.control_id == control_id and m.status != "received" for m in hub.store.find(limit=None)
    )


def _wait_routed(hub: HubThread, control_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not _routed(hub, control_id):
        assert time.monotonic() < deadline, f"{control_id} was never routed"
        time.sleep(0.05)


def _rows(hub: HubThread, query: Any) -> list[Any]:
    with hub.store.engine.connect() as conn:
        return list(conn.execute(query))


def test_a_message_of_20000_diagnoses_keeps_the_first_100_everywhere_it_is_stored_and_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    heavy = make_adt(
        "HEAVY-DX", "A04", patient_id=PATIENT, patient_class="E", extra_segments=_dg1s(HEAVY)
    )
    update = make_adt("UPDATE-DX", "A08", patient_id=PATIENT, patient_class="E")
    with HTTPReceiver() as fhir, caplog.at_level(logging.INFO):
        route = routes(fhir.url("/fhir"), settings={}, retry="{max_attempts: 1}")
        config = load_config(write_config(tmp_path, route))
        with HubThread(config, tmp_path / "data") as hub:
            (ack,) = mllp_exchange(hub.mllp_address, [heavy.encode()], timeout=120)
            assert b"MSA|AA|HEAVY-DX" in ack
            _wait_routed(hub, "HEAVY-DX")
            (sent,) = fhir.wait_for_requests(1, timeout=120)
            steps = _rows(hub, select(message_steps.c.step, message_steps.c.output))
            events = _rows(hub, select(encounter_events.c.detail))
            mllp_exchange(hub.mllp_address, [update.encode()], timeout=60)
            _wait_routed(hub, "UPDATE-DX")
            (snapshot,) = [row.snapshot for row in _rows(hub, select(encounters.c.snapshot))]

    # The FHIR notification: one Condition for each diagnosis kept, in the message's order.
    conditions = [
        e["resource"]["code"]["text"]
        for e in sent.json()["entry"]
        if e["resource"]["resourceType"] == "Condition"
    ]
    assert conditions == _first(MAX_DIAGNOSES)
    # The care event the route stored, and the transition: the first 100, and the rest counted.
    (translated,) = [json.loads(s.output) for s in steps if s.step.startswith("translate")]
    assert [d["display"] for d in translated["diagnoses"]] == _first(MAX_DIAGNOSES)
    assert translated["diagnoses_left_out"] == HEAVY - MAX_DIAGNOSES
    (detail,) = [json.loads(e.detail) for e in events]
    assert detail["result"]["summary"]["diagnoses_left_out"] == HEAVY - MAX_DIAGNOSES
    assert all(len(s.output or "") < RECORD_BOUND for s in steps)
    assert all(len(e.detail or "") < RECORD_BOUND for e in events)
    # The visit's snapshot, after an A08 without DG1 kept what the A04 said.
    assert len(snapshot) < RECORD_BOUND
    kept = json.loads(snapshot)
    assert [d["display"] for d in kept["diagnoses"]] == _first(MAX_DIAGNOSES)
    assert kept["diagnoses_left_out"] == HEAVY - MAX_DIAGNOSES
    # Said once, at INFO, with no identifier of the patient or the message.
    said = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and "left out" in r.getMessage()
    ]
    assert said == [
        f"ADT^A04: kept the first {MAX_DIAGNOSES} diagnoses, left out "
        f"{HEAVY - MAX_DIAGNOSES} more DG1 segments"
    ]


@pytest.mark.parametrize(
    ("segments", "kept", "left_out"),
    [
        (_dg1s(MAX_DIAGNOSES), MAX_DIAGNOSES, None),
        (_dg1s(MAX_DIAGNOSES + 1), MAX_DIAGNOSES, 1),
        # An empty DG1 is no diagnosis: it takes no place among those kept.
        (["DG1|1"] * 5 + _dg1s(MAX_DIAGNOSES), MAX_DIAGNOSES, None),
        (_dg1s(4), 4, None),
    ],
)
def test_the_cap_counts_diagnoses_and_says_nothing_when_none_are_left_out(
    segments: list[str], kept: int, left_out: int | None
) -> None:
    event = _event(segments)
    assert [d.display for d in event.diagnoses] == _first(kept)
    assert event.diagnoses_left_out == left_out
    dumped = json.loads(event.model_dump_json(exclude_none=True))
    assert ("diagnoses_left_out" in dumped) == (left_out is not None)


def test_a_visit_stored_with_every_diagnosis_keeps_only_the_first_at_its_next_message(
    tmp_path: Path,
) -> None:
    """A snapshot written before the cap (all 20,000) is cut to the first 100 by the next
    message that leaves the diagnoses out, and says how many went, rather than being written
    again whole with every update of the visit."""
    feed = Feed(make_enricher(tmp_path, None), None)
    text = adt("A04", "OLD-1")
    event = translate_v2_to_event(MessageView(text))
    every = [event.diagnoses[0].model_copy(update={"display": d}) for d in _first(HEAVY)]
    work = Work(message=preview_message(text.encode(), 1), route="care", v2=text)
    work.event = event.model_copy(update={"diagnoses": every})
    feed.enricher.enrich(work)
    update = "\r".join(s for s in adt("A08", "NEW-1").split("\r") if not s.startswith("DG1"))
    transition = feed.send(update, message_id=2)
    snapshot = feed.encounter(transition.encounter_id).snapshot
    assert [d["display"] for d in snapshot["diagnoses"]] == _first(MAX_DIAGNOSES)
    assert snapshot["diagnoses_left_out"] == HEAVY - MAX_DIAGNOSES
    assert transition.summary["diagnoses_left_out"] == HEAVY - MAX_DIAGNOSES
