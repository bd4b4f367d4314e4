"""A FHIR destination's URL may carry a credential (``?access_token=``, ``user:password@``),
and every record of a send names where it went: the delivery error the log and the store keep,
the delivery's metadata (`messages show --json`, `routes test --json`) and the referral
timeline (`referrals show --json`). None of them may show the credential. A real `carehub
serve` process sends to a FHIR notification endpoint that refuses in its response message and
to a FHIR server whose organisation has closed the referral before its cancel comes; a real
`carehub routes test` process shows what it would send."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from carehub.hl7.ack import read_ack
from carehub.store.outbox import Outbox
from carehub.store.store import MessageStore, sqlite_url
from carehub.testing import make_adt, mllp_exchange
from tests.helpers_cli import carehub, project
from tests.helpers_http import CarehubProcess, wait_for
from tests.test_fhir_notifications import response_message, routes
from tests.test_fhir_referrals import FhirServer, Served
from tests.test_referral_early_updates import CANCEL
from tests.test_referral_recipients import _referral

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESOURCES = PROJECT_ROOT / "config" / "resources"

CARE_TOKEN = "CareAccessTok3n"
CBO_TOKEN = "CboAccessTok3n"
CBO_PASSWORD = "CboPassw0rd"
SECRETS = (CARE_TOKEN, CBO_TOKEN, CBO_PASSWORD)

#: After the care-fhir route: a referral, and its changes, to a FHIR server.
REFERRAL_ROUTES = """\
  - name: referrals
    when: {{type: REF, events: [I12]}}
    steps:
      - translate: v2-to-event
      - enrich: {{use: referral-state, response_hours: 24}}
      - enrich:
          use: community-resources
          directory: {resources}/directory.json
          crosswalk: {resources}/crosswalk.yaml
          postal_codes: {resources}/postal_codes.csv
          max_results: 3
      - forward: {{channel: fhir-referral, name: cbo, base_url: "{cbo_url}"}}
  - name: referral-changes
    when: {{type: REF, events: [I13, I14]}}
    steps:
      - translate: v2-to-event
      - enrich: {{use: referral-state, response_hours: 24}}
      - forward: {{channel: fhir-referral, name: cbo, base_url: "{cbo_url}"}}
"""


def fatal(url: str) -> dict[str, Any]:
    """A response message whose MessageHeader says the receiver refused the notification,
    with an OperationOutcome quoting the URL it was sent to, as many servers' errors do."""
    issue = {"severity": "error", "code": "processing", "diagnostics": f"refused {url}"}
    return response_message("fatal-error", {"resourceType": "OperationOutcome", "issue": [issue]})


def leaked(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


class RefusingEndpoint:
    """Takes every POST and answers 200 with a response message saying fatal-error, quoting
    the URL it was sent to with the user and password it was sent with (as some proxies
    and servers echo them)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.authorizations: list[str] = []
        self.endpoints_named: list[str] = []
        app = Starlette(routes=[Route("/{path:path}", self.take, methods=["POST"])])
        self.served = Served(app)

    async def take(self, request: Request) -> Response:
        bundle = json.loads(await request.body())
        authorization = request.headers.get("authorization", "")
        with self.lock:
            self.authorizations.append(authorization)
            self.endpoints_named.append(
                bundle["entry"][0]["resource"]["destination"][0]["endpoint"]
            )
        user = (
            base64.b64decode(authorization.removeprefix("Basic ")).decode() if authorization else ""
        )
        echoed = (
            str(request.url).replace("http://", f"http://{user}@") if user else str(request.url)
        )
        return JSONResponse(fatal(echoed), media_type="application/fhir+json")

    def __enter__(self) -> RefusingEndpoint:
        self.served.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.served.__exit__(*exc)


@pytest.fixture
def care_endpoint() -> Iterator[RefusingEndpoint]:
    with RefusingEndpoint() as endpoint:
        yield endpoint


@pytest.fixture
def cbo_server() -> Iterator[FhirServer]:
    with FhirServer() as server:
        yield server


def hub_project(folder: Path, care_url: str, cbo_url: str) -> Path:
    """Notifications to ``care_url``, referrals to ``cbo_url``: the carehub.yaml."""
    care = routes(f'"{care_url}"', settings={}, retry="{max_attempts: 1}")
    cbo = REFERRAL_ROUTES.format(cbo_url=cbo_url, resources=RESOURCES.as_posix())
    return project(folder, care + cbo, "worker: {poll_interval: 0.05}\n")


def send(serve: CarehubProcess, text: str) -> str:
    answer = mllp_exchange(serve.mllp_address, [text.encode()])[0]
    return read_ack(answer.decode("utf-8", "replace"))[0]


def settled(data_dir: Path, destination: str, count: int = 1) -> list[Any]:
    """The deliveries to ``destination`` once ``count`` of them are no longer waiting."""
    store = MessageStore(sqlite_url(data_dir))
    try:

        def done() -> list[Any]:
            found = [
                d
                for d in Outbox(store).find(limit=None)
                if d.destination == destination and d.status in ("delivered", "skipped", "dead")
            ]
            return found if len(found) >= count else []

        return wait_for(done, 30, 0.05, f"{count} settled deliveries to {destination}")
    finally:
        store.close()


def test_send_errors_metadata_and_timeline_never_show_a_url_credential(
    tmp_path: Path, care_endpoint: RefusingEndpoint, cbo_server: FhirServer
) -> None:
    care_url = care_endpoint.served.url("/fhir").replace("http://", f"http://care:{CARE_TOKEN}@")
    cbo_url = cbo_server.base_url.replace("http://", f"http://cbo:{CBO_PASSWORD}@")
    config = hub_project(tmp_path / "config", care_url, cbo_url)
    data_dir = tmp_path / "data"
    args = ["serve", "--config", str(config), "--data-dir", str(data_dir)]
    with CarehubProcess(args, tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        # A notification the endpoint refuses in its response message: a dead letter.
        assert send(serve, make_adt("SEC-A1", "A01", patient_id="P-SEC1")) == "AA"
        (dead,) = settled(data_dir, "care-fhir/care-management")
        # A referral the organisation completes before the referrer's cancel comes: the
        # cancel is not sent, and the timeline records the Task's status read at the server.
        assert send(serve, _referral("SEC-R1", "R-SEC1")) == "AA"
        settled(data_dir, "referrals/cbo")
        (task,) = [ref for ref in cbo_server.resources if ref.startswith("Task/")]
        cbo_server.act(task, "completed")
        assert send(serve, _referral("SEC-R1C", "R-SEC1", replace=CANCEL)) == "AA"
        (cancel,) = settled(data_dir, "referral-changes/cbo")
        assert serve.terminate() == 0
    # Sent where configured: each password reached its server, and only as credentials:
    # the Bundle names its destination without them.
    expected = "Basic " + base64.b64encode(f"care:{CARE_TOKEN}".encode()).decode()
    assert care_endpoint.authorizations and set(care_endpoint.authorizations) == {expected}
    assert care_endpoint.endpoints_named and leaked(" ".join(care_endpoint.endpoints_named)) == []
    assert any("authorization" in headers for headers in cbo_server.headers)
    assert dead.status == "dead" and cancel.status == "skipped", (dead, cancel)
    # The store keeps the error, the endpoint's words with it, masked.
    assert "refused http://care:***@127.0.0.1" in (dead.last_error or "")
    assert leaked(dead.last_error or "") == [], dead.last_error

    log = serve.stdout + serve.stderr
    assert "care:***@" in log and "response message says fatal-error" in log
    assert leaked(log) == []

    shown = carehub("messages", "show", str(dead.message_id), "--json", "--data-dir", str(data_dir))
    assert shown.returncode == 0, shown.stderr
    assert leaked(shown.stdout) == [], shown.stdout
    (delivery,) = json.loads(shown.stdout)["deliveries"]
    assert "care:***@" in delivery["metadata"]["destination"]
    assert "fatal-error" in delivery["last_error"] and "care:***@" in delivery["last_error"]

    timeline = carehub("referrals", "show", "R-SEC1", "--json", "--data-dir", str(data_dir))
    assert timeline.returncode == 0, timeline.stderr
    assert leaked(timeline.stdout) == [], timeline.stdout
    servers = [
        event["detail"]["server"]
        for event in json.loads(timeline.stdout)["timeline"]
        if "server" in event["detail"]
    ]
    assert servers == [cbo_server.base_url.replace("http://", "http://cbo:***@")]


def test_routes_test_json_never_shows_a_url_credential(tmp_path: Path) -> None:
    care_url = f"https://care:{CARE_TOKEN}@care.example.org/fhir"
    cbo_url = f"https://cbo:{CBO_TOKEN}@cbo.example.org/fhir"
    config = hub_project(tmp_path / "config", care_url, cbo_url)
    messages = tmp_path / "messages.hl7"
    messages.write_text(
        make_adt("SEC-T1", "A01", patient_id="P-SEC2") + _referral("SEC-T2", "R-SEC2"),
        encoding="utf-8",
    )
    where = ["--config", str(config), "--data-dir", str(tmp_path / "data")]
    shown = carehub("routes", "test", "--json", *where, str(messages))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    results = [json.loads(line) for line in shown.stdout.splitlines()]
    deliveries = {
        d["destination"]: d for result in results for r in result["routes"] for d in r["deliveries"]
    }
    assert set(deliveries) == {"care-fhir/care-management", "referrals/cbo"}
    for delivery in deliveries.values():
        assert ":***@" in delivery["metadata"]["destination"]
        assert leaked(json.dumps(delivery["metadata"])) == []
    # The referral's Bundle names its server nowhere: nothing of its output shows the token.
    assert CBO_TOKEN not in shown.stdout
