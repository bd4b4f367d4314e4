"""A referral's patient whose MRN came without an assigning authority (PID-3.4 empty) is
identified at the FHIR server within the sending facility's code (MSH-4's namespace id), as
carehub keys the patient everywhere else, not within the whole MSH-4 field. The referral's own
placer identifier keeps the system its referrals were sent with: the server finds their Tasks
by it. Sent to the real FHIR test server through the real fhir-referral channel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import test_fhir_referrals as fhir_tests
from tests.test_fhir_referral_dates_and_identifiers import created, deliver
from tests.test_fhir_referrals import FhirServer, ref_i12

store = fhir_tests.store

FACILITY = "RIVERSIDE_GH^2.16.840.1.113883.19.4.6^ISO"


@pytest.fixture
def fhir_server() -> Iterator[FhirServer]:
    with FhirServer() as server:
        yield server


def test_a_patient_sent_without_an_authority_is_identified_within_the_facility_code(
    fhir_server: FhirServer, tmp_path: Path
) -> None:
    text = (
        ref_i12(ref_id="R-9")
        .replace("|RIVERSIDE_GH|", f"|{FACILITY}|", 1)
        .replace("RG100234^^^RGH^MR", "RG100234^^^^MR")
    )
    deliver(fhir_server, tmp_path, text)
    (identifier,) = created(fhir_server, "Patient")["identifier"]
    assert (identifier["system"], identifier["value"]) == (
        "urn:carehub:id:RIVERSIDE_GH",
        "RG100234",
    )
    task = created(fhir_server, "Task")
    assert task["for"]["identifier"] == {
        "system": "urn:carehub:id:RIVERSIDE_GH",
        "value": "RG100234",
    }
    # The referral's placer identifier (RF1-6 without an authority) is as it always was.
    (placer,) = created(fhir_server, "ServiceRequest")["identifier"]
    assert placer["system"] == "urn:carehub:id:RIVERSIDE_GH%5E2.16.840.1.113883.19.4.6%5EISO"
