"""What a failed FHIR delivery keeps of the server's OperationOutcome: every error with the
element it is about, errors before warnings and notes (which some validators list first),
within a bounded length that counts what it leaves out; kept with the delivery, never logged.
A real hub sends to a real FHIR notification endpoint that refuses what it is told to."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from carehub.testing import make_adt
from tests import test_fhir_notifications as notification_tests
from tests.test_fhir_notifications import NotificationEndpoint, routes, run

endpoint = notification_tests.endpoint  # the fixture: an endpoint on a real server

PROFILE_NOTE = (
    "Validated against profile http://hl7.org/fhir/us/davinci-alerts/StructureDefinition/"
    "notifications-bundle version 1.1.0 using terminology server tx.example.org"
)


def _refused_with(tmp_path: Path, server: NotificationEndpoint, outcome: dict[str, Any]) -> str:
    """The last_error of one admission the endpoint answers 422 with ``outcome``."""
    server.answers = [(422, outcome, {})]
    (delivery,) = run(tmp_path, routes(server.base_url), [make_adt("OO-1", "A01")])
    assert (delivery.status, delivery.attempts) == ("dead", 1), delivery.last_error
    return delivery.last_error or ""


def test_every_error_is_kept_with_its_element_and_before_the_notes(
    tmp_path: Path, endpoint: NotificationEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "information", "code": "informational", "diagnostics": PROFILE_NOTE},
            {
                "severity": "error",
                "code": "required",
                "diagnostics": "minimum required = 1, but only found 0",
                "expression": ["Bundle.entry[3].resource.ofType(Patient).name"],
            },
            {
                "severity": "error",
                "code": "code-invalid",
                "details": {"text": "The code provided is not in the value set"},
                "location": ["Bundle.entry[1].resource.ofType(Encounter).class"],
            },
        ],
    }
    caplog.set_level(logging.INFO)
    said = _refused_with(tmp_path, endpoint, outcome)

    assert "HTTP 422" in said
    patient, encounter = (
        "Bundle.entry[3].resource.ofType(Patient).name",
        "Bundle.entry[1].resource.ofType(Encounter).class",
    )
    assert patient in said and encounter in said, said
    first = said.index(patient)
    assert said.index("minimum required = 1, but only found 0") > first
    second = said.index(encounter)
    assert said.index("The code provided is not in the value set") > second
    assert PROFILE_NOTE not in said[:second]  # the note, if kept, comes after the errors
    assert "dead letter" in caplog.text  # the failure is logged, without the server's words
    for words in ("minimum required", "not in the value set", "Validated against"):
        assert words not in caplog.text


def test_a_long_outcome_keeps_the_errors_it_has_room_for_and_counts_the_rest(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    notes = [{"severity": "warning", "code": "informational", "diagnostics": PROFILE_NOTE}] * 3
    errors = [
        {
            "severity": "error",
            "code": "value",
            "diagnostics": f"value {n} is not allowed here",
            "expression": [f"Bundle.entry[{n}].resource"],
        }
        for n in range(60)
    ]
    said = _refused_with(
        tmp_path, endpoint, {"resourceType": "OperationOutcome", "issue": notes + errors}
    )

    summary = said.split(": HTTP 422: ", 1)[1]
    *kept, rest = summary.split("; ")
    left = re.fullmatch(r"(\d+) more issues not shown", rest)
    assert left, rest
    assert kept and len(kept) + int(left.group(1)) == len(notes) + len(errors)
    assert kept == [
        f"Bundle.entry[{n}].resource: value {n} is not allowed here" for n in range(len(kept))
    ]
    from carehub.fhir import OUTCOME_TEXT_LIMIT

    assert len(summary) <= OUTCOME_TEXT_LIMIT
