"""The discharge disposition (PV1-36, a UB-04 patient discharge status) as FHIR codes it: in
the code system HL7's terminology (THO) and US Core name for the NUBC codes. A real hub sends
a stay's admission and discharge to a real FHIR notification endpoint."""

from __future__ import annotations

from pathlib import Path

from tests import test_fhir_notifications as notification_tests
from tests.test_fhir_notifications import NotificationEndpoint, encounter, feed, routes, run

endpoint = notification_tests.endpoint  # the fixture: an endpoint on a real server

#: AHA NUBC Patient Discharge Status, as THO and US Core 7 and later name it.
NUBC_DISCHARGE_STATUS = "https://www.nubc.org/CodeSystem/PatDischargeStatus"


def test_a_nubc_disposition_is_coded_in_the_tho_code_system(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    run(tmp_path, routes(endpoint.base_url), [feed("02"), feed("04")])
    discharge = endpoint.received[-1]
    disposition = encounter(discharge)["hospitalization"]["dischargeDisposition"]
    assert [(c["system"], c["code"]) for c in disposition["coding"]] == [
        (NUBC_DISCHARGE_STATUS, "03")
    ]
    assert endpoint.problems == []
