"""ADT care transitions as Da Vinci Unsolicited Notifications: a real hub takes the sample
feeds over MLLP and its fhir-notification forward POSTs message Bundles to a real FHIR endpoint
(uvicorn), which checks each with fhir.resources R4B and the IG's message rules."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fhir.resources.R4B.bundle import Bundle
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from carehub.cli import main
from carehub.config import load_config
from carehub.fhir import validate_resource
from carehub.store.outbox import DeliveryRecord
from carehub.testing import HubThread, make_adt, run_routes_all
from tests.conftest import corpus_files, requires_corpus
from tests.test_fhir_referrals import Served
from tests.test_worker import send, write_config

FEEDS = Path(__file__).resolve().parents[1] / "config" / "feeds"
EVENT_SYSTEM = "http://hl7.org/fhir/us/davinci-alerts/CodeSystem/notification-event"
DESTINATION = "care-fhir/care-management"


class NotificationEndpoint:
    """``POST /fhir/$process-message``: checks the Bundle is a FHIR R4 message as the IG
    wants it (type message, MessageHeader first with an eventCoding from the IG's code system,
    its focus an Encounter in the Bundle, every reference resolvable inside the Bundle) and
    records it. ``answers`` queues (status, body, headers) to answer the next POSTs with."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[dict[str, Any]] = []
        self.problems: list[str] = []
        #: Answers for the next POSTs, in turn; None takes that POST as usual.
        self.answers: list[tuple[int, dict[str, Any] | None, dict[str, str]] | None] = []
        self.calls = 0
        app = Starlette(routes=[Route("/fhir/$process-message", self.take, methods=["POST"])])
        self.served = Served(app)

    @property
    def base_url(self) -> str:
        return self.served.url("/fhir")

    def __enter__(self) -> NotificationEndpoint:
        self.served.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.served.__exit__(*exc)

    async def take(self, request: Request) -> Response:
        body = await request.body()
        with self.lock:
            self.calls += 1
            answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            status, content, headers = answer
            return JSONResponse(content, status_code=status, headers=headers)
        bundle = json.loads(body)
        problems = message_problems(bundle)
        if request.headers.get("content-type") != "application/fhir+json":
            problems.append(f"content type {request.headers.get('content-type')}")
        with self.lock:
            self.problems += problems
            self.received.append(bundle)
        return Response(status_code=200 if not problems else 400)

    def events(self) -> list[tuple[str, str]]:
        """(eventCoding code, Encounter.status) of each Bundle received."""
        return [(header(b)["eventCoding"]["code"], encounter(b)["status"]) for b in self.received]


def message_problems(bundle: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    try:
        Bundle.model_validate(bundle)
        for entry in bundle["entry"]:
            validate_resource(entry["resource"])
    except (ValueError, KeyError) as err:
        return [str(err)]
    if bundle["type"] != "message" or not bundle.get("id") or not bundle.get("timestamp"):
        problems.append("not a message Bundle with id and timestamp")
    first = bundle["entry"][0]["resource"]
    if first["resourceType"] != "MessageHeader":
        problems.append("the first entry is no MessageHeader")
    elif first["eventCoding"]["system"] != EVENT_SYSTEM:
        problems.append(f"eventCoding system {first['eventCoding']['system']}")
    urls = {entry["fullUrl"] for entry in bundle["entry"]}
    for ref in references(bundle):
        if ref not in urls:
            problems.append(f"reference {ref} is not in the Bundle")
    focus = first.get("focus") or [{}]
    if (
        focus[0].get("reference") not in urls
        or resource(bundle, focus[0]["reference"])["resourceType"] != "Encounter"
    ):
        problems.append("the focus is no Encounter of the Bundle")
    return problems


def references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                yield item
            else:
                yield from references(item)
    elif isinstance(value, list):
        for item in value:
            yield from references(item)


def resource(bundle: dict[str, Any], url: str) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"] if e["fullUrl"] == url)


def header(bundle: dict[str, Any]) -> dict[str, Any]:
    return bundle["entry"][0]["resource"]


def encounter(bundle: dict[str, Any]) -> dict[str, Any]:
    return resource(bundle, header(bundle)["focus"][0]["reference"])


def of_type(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


#: Riverside's name for its Organization, and the system of its RGH identifiers.
RIVERSIDE = {
    "facilities": "{RIVERSIDE_GH: Riverside General Hospital}",
    "identifier_systems": '{RGH: "urn:oid:2.16.840.1.113883.3.999"}',
}
#: Three attempts, quickly: a test sees a passing failure retried without waiting.
QUICK_RETRY = "{max_attempts: 3, initial_delay: 0.05, max_delay: 0.2, jitter: 0}"


def routes(
    base_url: str,
    options: str = "",
    before: str = "",
    *,
    settings: Mapping[str, str] = RIVERSIDE,
    retry: str = QUICK_RETRY,
) -> str:
    """A route sending every ADT's care transition to ``base_url`` as Da Vinci notifications
    (DESTINATION): the forward takes ``settings`` (key -> YAML value), ``retry``, then
    ``options`` (more of its lines, indented), after the steps ``before``. Other routes may
    be appended."""
    told = "".join(f"          {key}: {value}\n" for key, value in settings.items())
    return f"""
routes:
  - name: care-fhir
    when: {{type: ADT}}
    steps:
      - translate: v2-to-event
      - enrich: encounter-state
{before}      - forward:
          channel: fhir-notification
          name: care-management
          base_url: {base_url}
{told}          retry: {retry}
{options}"""


def response_message(code: str, *resources: dict[str, Any]) -> dict[str, Any]:
    """A receiver's response message: its MessageHeader answers with ``code`` (fatal-error,
    transient-error), ``resources`` (OperationOutcomes) after it."""
    answer = {
        "resourceType": "MessageHeader",
        "eventCoding": {"code": "notification-admit"},
        "source": {"endpoint": "urn:receiver"},
        "response": {"identifier": "x", "code": code},
    }
    entries = [{"resource": resource} for resource in (answer, *resources)]
    return {"resourceType": "Bundle", "type": "message", "entry": entries}


def care_team_step(config_dir: Path) -> str:
    """A care-team step reading PD1-12 for opt-outs, with an empty roster in ``config_dir``."""
    (config_dir / "roster.csv").write_text(
        "patient_id,authority,opt_out,opt_out_reason,member_id,name,role,organization,npi,"
        "channel,address,preference,detail\n",
        encoding="utf-8",
    )
    return """      - enrich:
          use: care-team
          roster: roster.csv
          opt_out_field: PD1-12
"""


@pytest.fixture
def endpoint() -> Iterator[NotificationEndpoint]:
    with NotificationEndpoint() as server:
        yield server


def run(
    tmp_path: Path, route_text: str, texts: list[str], settled: int | None = None
) -> list[DeliveryRecord]:
    config = load_config(write_config(tmp_path, route_text))
    with HubThread(config, tmp_path / "data") as hub:
        for sent, text in enumerate(texts, start=1):  # one at a time, as the visit went
            send(hub, [text])
            hub.wait_for_deliveries(sent, destination=DESTINATION)
        return hub.wait_for_deliveries(settled or len(texts), destination=DESTINATION)


def feed(name: str) -> str:
    return next(FEEDS.glob(f"{name}-*.hl7")).read_text(encoding="utf-8")


def test_a_stay_is_told_as_admit_transfer_discharge_and_nothing_else(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    # ED arrival, admission, an A08 with a new phone number, transfer to ICU at another
    # campus, a bed move inside the ICU, the discharge to a nursing facility, and the
    # admission sent again under a new control ID.
    texts = [feed(n) for n in ("01", "02", "03", "03b", "03c", "04")]
    texts.append(feed("02").replace("|RGH-000102|", "|RGH-000102-AGAIN|"))
    deliveries = run(tmp_path, routes(endpoint.base_url), texts)

    assert endpoint.problems == []
    assert endpoint.events() == [
        ("notification-admit", "in-progress"),
        ("notification-admit", "in-progress"),
        ("notification-transfer", "in-progress"),
        ("notification-discharge", "finished"),
    ]
    receipts = [d.receipt or "" for d in deliveries]
    assert [d.status for d in deliveries] == [
        "delivered", "delivered", "skipped", "delivered", "skipped", "delivered", "skipped"
    ]  # fmt: skip
    assert "only details changed (patient.phone)" in receipts[2]

    ed, admit, transfer, discharge = endpoint.received
    # One visit: the same Encounter in every notification, with its visit number.
    assert len({header(b)["focus"][0]["reference"] for b in endpoint.received}) == 1
    assert encounter(ed)["class"]["code"] == "EMER"
    assert encounter(admit)["class"]["code"] == "IMP"
    assert encounter(admit)["identifier"][0]["value"] == "V20261124-0001"
    assert encounter(admit)["identifier"][0]["system"] == "urn:oid:2.16.840.1.113883.3.999"
    # The transfer names the new campus's unit; the discharge the disposition and its end.
    assert of_type(transfer, "Location")[0]["name"].startswith("ICU, room I03")
    ended = encounter(discharge)
    assert ended["period"]["end"].startswith("2026-11-27")
    assert ended["period"]["start"].startswith("2026-11-24")
    assert ended["hospitalization"]["dischargeDisposition"]["coding"][0]["code"] == "03"
    assert ended["location"][0]["status"] == "completed"
    # Who: the patient by MRN in the mapped system, the attending as author, the PCP.
    patient = of_type(discharge, "Patient")[0]
    assert {"system": "urn:oid:2.16.840.1.113883.3.999", "value": "RG100234"}.items() <= (
        patient["identifier"][0].items()
    )
    assert patient["birthDate"] == "1958-03-12" and patient["gender"] == "female"
    assert "generalPractitioner" in patient
    author = resource(discharge, header(discharge)["author"]["reference"])
    assert author["identifier"][0] == {
        "system": "http://hl7.org/fhir/sid/us-npi",
        "value": "1497758544",
    }
    sender = resource(discharge, header(discharge)["sender"]["reference"])
    assert sender["name"] == "Riverside General Hospital"
    assert header(discharge)["destination"][0]["endpoint"] == (
        endpoint.base_url + "/$process-message"
    )
    conditions = of_type(admit, "Condition")
    assert conditions and conditions[0]["code"]["coding"][0]["system"] == (
        "http://hl7.org/fhir/sid/icd-10-cm"
    )
    assert encounter(admit)["diagnosis"][0]["condition"]["reference"]
    # Each message its own Bundle id; a retry of one keeps it (from the delivery's key).
    assert len({b["id"] for b in endpoint.received}) == 4


def test_cancels_are_told_as_what_they_take_back(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    admit = make_adt("C-1", "A01", visit_number="V-C1")
    discharge = make_adt("C-2", "A03", visit_number="V-C1")
    cancel_discharge = make_adt("C-3", "A13", visit_number="V-C1")
    cancel_admit = make_adt("C-4", "A11", visit_number="V-C1")
    run(tmp_path, routes(endpoint.base_url), [admit, discharge, cancel_discharge, cancel_admit])

    assert endpoint.problems == []
    assert endpoint.events() == [
        ("notification-admit", "in-progress"),
        ("notification-discharge", "finished"),
        ("notification-discharge", "in-progress"),  # the A13: the stay goes on
        ("notification-admit", "cancelled"),  # the A11: it never was
    ]
    reopened = encounter(endpoint.received[2])
    assert "end" not in reopened.get("period", {})
    assert "hospitalization" not in reopened


def test_a_cancel_of_a_visit_nobody_was_told_of_sends_nothing(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    # The A11 comes before its A01; the A01 dated earlier then keeps the visit cancelled.
    cancel = make_adt("E-1", "A11", visit_number="V-E1")
    deliveries = run(tmp_path, routes(endpoint.base_url), [cancel])
    assert endpoint.received == []
    assert "nobody was told of it" in (deliveries[0].receipt or "")


def test_cancels_of_what_nobody_was_told_send_nothing(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    """An outpatient registration is no notification, so its A11 takes nothing back; nor does
    the A12 of a bed move; nor an A11 of an admission when the forward sends ED arrivals only."""
    texts = [
        make_adt("N-1", "A04", patient_class="O", visit_number="V-N1"),
        make_adt("N-2", "A11", patient_class="O", visit_number="V-N1"),
        make_adt("N-3", "A01", patient_id="P-N2", visit_number="V-N2", location="4W^401^A"),
        make_adt("N-4", "A02", patient_id="P-N2", visit_number="V-N2", location="4W^402^B"),
        make_adt("N-5", "A12", patient_id="P-N2", visit_number="V-N2", location="4W^401^A"),
    ]
    deliveries = run(tmp_path, routes(endpoint.base_url), texts)
    assert endpoint.events() == [("notification-admit", "in-progress")]  # N-3 only
    receipts = [d.receipt or "" for d in deliveries]
    assert "the cancel takes back nothing a notification told" in receipts[1]
    assert [d.status for d in deliveries] == [
        "skipped", "skipped", "delivered", "skipped", "skipped"
    ]  # fmt: skip


def test_a_cancel_is_sent_only_where_its_notification_was(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    texts = [
        make_adt("K-1", "A01", visit_number="V-K1"),
        make_adt("K-2", "A11", visit_number="V-K1"),
    ]
    deliveries = run(tmp_path, routes(endpoint.base_url, "          kinds: [ed_arrival]\n"), texts)
    assert endpoint.received == []
    assert "admission notifications are not sent on this forward" in (deliveries[1].receipt or "")


def test_opted_out_patients_and_left_out_diagnoses(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    care_team = care_team_step(tmp_path)
    dg1 = "DG1|1||I21.4^Non-ST elevation myocardial infarction^I10||20261125|A"
    opted_out = make_adt("O-1", "A01", patient_id="P-OUT", extra_segments=["PD1" + "|" * 12 + "Y"])
    told = make_adt("O-2", "A01", patient_id="P-IN", visit_number="V2", extra_segments=[dg1])
    deliveries = run(
        tmp_path,
        routes(endpoint.base_url, "          diagnoses: false\n", care_team),
        [opted_out, told],
    )
    assert "opted out" in (deliveries[0].receipt or "")
    assert len(endpoint.received) == 1
    bundle = endpoint.received[0]
    assert of_type(bundle, "Condition") == [] and "diagnosis" not in encounter(bundle)


def test_refusals_are_dead_letters_and_passing_trouble_is_retried(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "not-found", "diagnostics": "no such endpoint"}],
    }
    fatal = response_message("fatal-error")
    transient = response_message("transient-error")
    endpoint.answers = [
        (404, outcome, {}),  # the first message: refused for good
        (503, None, {"Retry-After": "0"}),  # the second: retried ...
        None,  # ... and taken
        (200, transient, {}),  # the third: retried ...
        None,  # ... and taken
        (200, fatal, {}),  # the fourth: refused for good
    ]
    texts = [make_adt(f"R-{i}", "A01", patient_id=f"P-R{i}") for i in range(4)]
    deliveries = run(tmp_path, routes(endpoint.base_url), texts)
    by_control = {d.idempotency_key: d for d in deliveries}
    assert len(by_control) == 4
    statuses = [d.status for d in deliveries]
    assert statuses == ["dead", "delivered", "delivered", "dead"], [
        (d.status, d.last_error) for d in deliveries
    ]
    assert deliveries[0].attempts == 1 and "HTTP 404" in (deliveries[0].last_error or "")
    assert "no such endpoint" in (deliveries[0].last_error or "")
    assert deliveries[1].attempts == 2 and deliveries[2].attempts == 2
    assert "fatal-error" in (deliveries[3].last_error or "") and deliveries[3].attempts == 1
    assert len(endpoint.received) == 2 and endpoint.problems == []


def routes_check(tmp_path: Path, route_text: str) -> subprocess.CompletedProcess[str]:
    """`carehub routes check --offline` in a real process, on a config holding the routes."""
    config = write_config(tmp_path, route_text)
    command = ["routes", "check", "--offline", "--config", str(config)]
    return subprocess.run(
        [sys.executable, "-m", "carehub.cli", *command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    ("option", "named"),
    [
        (
            "          kinds: [admission, discharged]\n",
            ["routes.yaml:15", "kinds[1]", "'discharge'"],
        ),
        ("          kinds: []\n", ["kinds"]),
        ("          diagnosis: false\n", ["diagnosis", "xtra"]),
    ],
)
def test_option_errors_name_the_file_line_and_key(
    tmp_path: Path, option: str, named: list[str]
) -> None:
    done = routes_check(tmp_path, routes("http://127.0.0.1:9/fhir", option))
    assert done.returncode == 2, done
    assert "routes.yaml:" in done.stderr and "Traceback" not in done.stderr
    for word in named:
        assert word in done.stderr, done.stderr


def test_a_base_url_that_is_no_http_url_is_refused(tmp_path: Path) -> None:
    done = routes_check(tmp_path, routes("ftp://example.org/fhir"))
    assert done.returncode == 2 and "base_url" in done.stderr, done


def test_notifications_of_two_hubs_never_share_an_id(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    """Each store numbers its messages from 1: two hubs sending to one receiver must still give
    different patients' notifications different Bundle ids and Idempotency-Keys, or a
    receiver that drops repeats drops a real admission. A reprocess is a new message too."""
    keys: list[str] = []
    for hub_name, patient in (("one", "P-ONE"), ("two", "P-TWO")):
        folder = tmp_path / hub_name
        folder.mkdir()
        config_path = write_config(folder, routes(endpoint.base_url))
        with HubThread(load_config(config_path), folder / "data") as hub:
            send(hub, [make_adt(f"{hub_name}-1", "A01", patient_id=patient)])
            (delivery,) = hub.wait_for_deliveries(1, destination=DESTINATION)
            keys.append(delivery.idempotency_key)
            if hub_name == "one":
                where = ["--config", str(config_path), "--data-dir", str(folder / "data")]
                result = CliRunner().invoke(
                    main,
                    ["messages", "reprocess", str(delivery.message_id), *where],
                    catch_exceptions=False,
                )
                assert result.exit_code == 0, result.output
                again = hub.wait_for_deliveries(2, destination=DESTINATION)
                assert [d.run for d in again] == [1, 2]
                keys.append(again[1].idempotency_key)
    assert len(set(keys)) == 3, keys
    assert endpoint.problems == [] and len(endpoint.received) == 3
    assert len({b["id"] for b in endpoint.received}) == 3
    assert len({header(b)["id"] for b in endpoint.received}) == 3


def test_a_merge_during_the_stay_keeps_the_encounter(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    admit = make_adt("M-1", "A01", patient_id="P-OLD", visit_number="V-M1")
    merge = make_adt("M-2", "A40", patient_id="P-NEW", extra_segments=["MRG|P-OLD^^^HOSP^MR"])
    discharge = make_adt("M-3", "A03", patient_id="P-NEW", visit_number="V-M1")
    run(tmp_path, routes(endpoint.base_url), [admit, merge, discharge], settled=3)
    assert endpoint.events() == [
        ("notification-admit", "in-progress"),
        ("notification-discharge", "finished"),
    ]
    first, last = endpoint.received
    assert header(first)["focus"] == header(last)["focus"]  # the same Encounter
    assert of_type(last, "Patient")[0]["identifier"][0]["value"] == "P-NEW"


def test_a_cancel_says_it_is_one(tmp_path: Path, endpoint: NotificationEndpoint) -> None:
    """An ED visit admitted and the admission cancelled: the A11 brings back the ED visit, and
    its MessageHeader.reason (the v2 event) tells it from the ED arrival it resembles."""
    texts = [
        make_adt("X-1", "A04", patient_class="E", visit_number="V-X1"),
        make_adt("X-2", "A01", patient_class="I", visit_number="V-X1"),
        make_adt("X-3", "A11", patient_class="I", visit_number="V-X1"),
    ]
    run(tmp_path, routes(endpoint.base_url), texts)
    reasons = [header(b)["reason"]["coding"][0]["code"] for b in endpoint.received]
    assert reasons == ["A04", "A01", "A11"]
    assert header(endpoint.received[2])["reason"]["text"] == "Cancel admit/visit notification"


def test_cancels_follow_what_this_endpoint_was_sent(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    """Opted out at admission and not any more at the cancel: nothing to take back. Told of
    the admission and opted out later: the cancel still corrects what the receiver holds."""
    care_team = care_team_step(tmp_path)
    out, back = "PD1" + "|" * 12 + "Y", "PD1" + "|" * 12 + "N"
    texts = [
        make_adt("F-1", "A01", patient_id="P-F1", visit_number="V-F1", extra_segments=[out]),
        make_adt("F-2", "A08", patient_id="P-F1", visit_number="V-F1", extra_segments=[back]),
        make_adt("F-3", "A11", patient_id="P-F1", visit_number="V-F1", extra_segments=[back]),
        make_adt("G-1", "A01", patient_id="P-G1", visit_number="V-G1"),
        make_adt("G-2", "A08", patient_id="P-G1", visit_number="V-G1", extra_segments=[out]),
        make_adt("G-3", "A11", patient_id="P-G1", visit_number="V-G1", extra_segments=[out]),
    ]
    deliveries = run(tmp_path, routes(endpoint.base_url, before=care_team), texts)
    assert "went to this endpoint" in (deliveries[2].receipt or "")
    told = [(of_type(b, "Patient")[0]["identifier"][0]["value"], *e) for b, e in
            zip(endpoint.received, endpoint.events(), strict=True)]  # fmt: skip
    assert told == [
        ("P-G1", "notification-admit", "in-progress"),
        ("P-G1", "notification-admit", "cancelled"),
    ]


def test_an_outpatient_visit_becoming_a_stay_is_an_admission_to_the_receiver(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    texts = [
        make_adt("T-1", "A04", patient_class="O", visit_number="V-T1"),
        make_adt("T-2", "A02", patient_class="I", visit_number="V-T1", location="4W^401^A"),
    ]
    run(tmp_path, routes(endpoint.base_url), texts)
    assert endpoint.events() == [("notification-admit", "in-progress")]


def test_what_feeds_send_is_made_fit_for_fhir(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    """An HD in MSH-4, a disposition in words, an SSN, a control character in a name, a
    year-only admission time, a discharge before the admission on the same day, no sex: the
    Bundle says each as FHIR and US Core want it, and what it cannot know it leaves out."""
    admit = make_adt(
        "H-1",
        "A01",
        sending_facility="GHHSFacility^2.16.840.1.122848.1.30^ISO",
        name="SMITH\x07^PAT",
        visit_number="V-H1",
        location="4W^401^A^",
    ).replace("^^^HOSP^MR||", "^^^HOSP^MR~123-45-6789^^^SSA^SS||")
    admit = admit.replace("||19700101|F", "||19700101|")
    admit = admit.replace("|V-H1^^^HOSP^VN", "|V-H1^^^HOSP^VN" + "|" * 25 + "2026")
    discharge = make_adt("H-2", "A03", visit_number="V-H1", location="4W^401^A^")
    fields = discharge.split("\r")
    pv1 = fields[3].split("|")
    pv1 += [""] * (46 - len(pv1))
    pv1[36], pv1[44], pv1[45] = "HOME", "202611251000-0500", "202611250900-0500"
    fields[3] = "|".join(pv1)
    # The SSN goes only where a route keeps national identifiers, in the event and the Bundle.
    kept = routes(endpoint.base_url, options="          keep_national_ids: true\n").replace(
        "translate: v2-to-event", "translate: {use: v2-to-event, keep_national_ids: true}"
    )
    run(tmp_path, kept, [admit, "\r".join(fields)])

    assert endpoint.problems == []
    first, second = endpoint.received
    sender = resource(first, header(first)["sender"]["reference"])
    assert sender["name"] == "GHHSFacility" and sender["active"] is True
    assert sender["identifier"][0]["value"] == "GHHSFacility"
    patient = of_type(first, "Patient")[0]
    assert patient["name"][0]["family"] == "SMITH" and patient["gender"] == "unknown"
    assert any(i["system"] == "http://hl7.org/fhir/sid/us-ssn" for i in patient["identifier"])
    assert encounter(first)["period"]["start"] == "2026"
    assert encounter(first)["type"][0]["coding"][0]["code"] == "I"
    ended = encounter(second)
    assert "end" not in ended["period"]  # 09:00 is before the 10:00 admission
    assert ended["hospitalization"]["dischargeDisposition"] == {"text": "HOME"}


def test_a_response_message_that_is_not_well_formed_is_taken_as_accepted(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    odd = {"resourceType": "Bundle", "type": "message", "entry": [{"resource": {
        "resourceType": "MessageHeader", "response": "fatal-error"}}]}  # fmt: skip
    endpoint.answers = [(200, odd, {})]
    (delivery,) = run(tmp_path, routes(endpoint.base_url), [make_adt("W-1", "A01")])
    assert delivery.status == "delivered" and delivery.attempts == 1, delivery.last_error


@requires_corpus
def test_every_sample_adt_that_makes_a_notification_makes_a_valid_one(tmp_path: Path) -> None:
    """The public ADT samples, each dry-run on its own through the forward: every Bundle made
    is a FHIR R4 message as the IG wants it; a facility sent as an HD with an ISO OID is an
    Organization named by its namespace, with the OID as an identifier."""
    config = write_config(tmp_path, routes("http://127.0.0.1:9/fhir"))
    made = 0
    for path in corpus_files():
        if not path.name.startswith("ADT"):
            continue
        for result in run_routes_all(as_production(path.read_bytes()), config):
            for route in result.routes:
                for delivery in route.deliveries:
                    if not delivery.outgoing.payload:
                        continue
                    made += 1
                    bundle = json.loads(delivery.outgoing.payload)
                    assert message_problems(bundle) == [], path.name
                    for organization in of_type(bundle, "Organization"):
                        assert "^" not in organization["name"], path.name
    assert made >= 10, made  # the admissions, transfers and discharges among them
    (sample,) = [p for p in corpus_files() if p.name == "ADT-A01-01.hl7"]
    (result,) = run_routes_all(sample, config)
    bundle = json.loads(result.routes[0].deliveries[0].outgoing.payload)
    sender = resource(bundle, header(bundle)["sender"]["reference"])
    assert sender["name"] == "GHHSFacility"
    assert {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.16.840.1.122848.1.30"} in (
        sender["identifier"]
    )


def as_production(raw: bytes) -> bytes:
    """A sample with MSH-11 P: a dry run answers as a listener that takes production messages
    only, and two ADT samples are training messages (MSH-11 T) whose routing is to be
    checked too."""
    end = min((at for at in (raw.find(b"\r"), raw.find(b"\n")) if at >= 0), default=len(raw))
    fields = raw[:end].split(b"|")
    if len(fields) > 10:
        fields[10] = b"P"
    return b"|".join(fields) + raw[end:]


def test_a_dry_run_says_why_nothing_would_be_sent(tmp_path: Path) -> None:
    config = write_config(tmp_path, routes("http://127.0.0.1:9/fhir"))
    update = tmp_path / "update.hl7"
    update.write_text(make_adt("D-1", "A01") + make_adt("D-2", "A08"), encoding="utf-8")
    where = ["--config", str(config), "--data-dir", str(tmp_path / "data")]
    shown = CliRunner().invoke(main, ["routes", "test", *where, str(update)])
    assert shown.exit_code == 0, shown.output
    assert (
        "would not send to care-fhir/care-management via fhir-notification: nothing new for "
        "the visit"
    ) in " ".join(shown.output.split())


def test_a_cancel_routed_with_its_admission_is_sent(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    """The admission and its cancel arrive together and are routed in one batch, before the
    admission's delivery is stored: the cancel still knows the admission went out."""
    admit = make_adt("Y-1", "A01", visit_number="V-Y1")
    cancel = make_adt("Y-2", "A11", visit_number="V-Y1")
    config = load_config(write_config(tmp_path, routes(endpoint.base_url)))
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, [admit, cancel])
        deliveries = hub.wait_for_deliveries(2, destination=DESTINATION)
    assert [d.receipt for d in deliveries] == [
        "HTTP 200 notification-admit",
        "HTTP 200 notification-admit",
    ]
    assert endpoint.events() == [
        ("notification-admit", "in-progress"),
        ("notification-admit", "cancelled"),
    ]


def test_a_dead_lettered_admission_keeps_its_cancel_behind_it(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    """The admission was refused (a dead letter) and its visit cancelled meanwhile: the cancel
    waits behind it in the patient's line, so retrying the admission sends it and then its
    cancel, never an admission left standing. A dead letter discarded before the cancel
    comes takes nothing the receiver had: that cancel is not sent."""
    refused = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "x"}]}
    endpoint.answers = [(400, refused, {}), (400, refused, {})]
    config_path = write_config(tmp_path, routes(endpoint.base_url))
    where = ["--config", str(config_path), "--data-dir", str(tmp_path / "data")]

    def operator(*command: str) -> None:
        result = CliRunner().invoke(main, [*command, *where], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    with HubThread(load_config(config_path), tmp_path / "data") as hub:
        send(hub, [make_adt("Z-1", "A01", patient_id="P-Z1", visit_number="V-Z1")])
        (retried,) = hub.wait_for_deliveries(1, destination=DESTINATION)
        send(hub, [make_adt("Z-2", "A01", patient_id="P-Z2", visit_number="V-Z2")])
        _, discarded = hub.wait_for_deliveries(2, destination=DESTINATION)
        assert (retried.status, discarded.status) == ("dead", "dead")
        operator("dead-letters", "discard", str(discarded.id), "--yes")
        send(hub, [make_adt("Z-3", "A11", patient_id="P-Z1", visit_number="V-Z1")])
        send(hub, [make_adt("Z-4", "A11", patient_id="P-Z2", visit_number="V-Z2")])
        operator("dead-letters", "retry", str(retried.id))
        found = hub.wait_for_deliveries(4, destination=DESTINATION)
    assert endpoint.events() == [
        ("notification-admit", "in-progress"),
        ("notification-admit", "cancelled"),
    ]
    assert {of_type(b, "Patient")[0]["identifier"][0]["value"] for b in endpoint.received} == {
        "P-Z1"
    }
    assert "no notification-admit of this visit went to this endpoint" in (found[3].receipt or "")


def test_a_visit_without_a_visit_number_keeps_its_encounter_through_a_merge(
    tmp_path: Path, endpoint: NotificationEndpoint
) -> None:
    def no_visit_number(text: str) -> str:  # PV1-19 left empty
        return text.replace("|^^^HOSP^VN", "|")

    admit = no_visit_number(
        make_adt("N-1", "A04", patient_id="P-OLD2", patient_class="E", visit_number="")
    )
    merge = make_adt("N-2", "A40", patient_id="P-NEW2", extra_segments=["MRG|P-OLD2^^^HOSP^MR"])
    discharge = no_visit_number(
        make_adt("N-3", "A03", patient_id="P-NEW2", patient_class="E", visit_number="")
    )
    assert "^VN" not in admit + discharge
    run(tmp_path, routes(endpoint.base_url), [admit, merge, discharge], settled=3)
    assert endpoint.events() == [
        ("notification-admit", "in-progress"),
        ("notification-discharge", "finished"),
    ]
    first, last = endpoint.received
    assert header(first)["focus"] == header(last)["focus"]
