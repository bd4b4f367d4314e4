"""Referrals as Gravity SDOHCC FHIR resources, sent to a real local FHIR server that validates
everything it receives with fhir.resources (R4B), and CBO status updates coming back by Task
polling and by the webhook route. No mocks: real uvicorn servers, real SQLite store."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.task import Task
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from carehub.builtins.event_translator import translate_v2_to_event
from carehub.components import ComponentContext, DeliveryError, NothingToSend, Outgoing, Work
from carehub.referrals.api import register_referral_routes
from carehub.referrals.fhir import (
    FHIR_CONTENT_TYPE,
    SDOHCC_CODES,
    FhirReferralChannel,
    build_gravity_referral,
    sdoh_z_code,
    task_id_from_location,
)
from carehub.referrals.state import ReferralStateEnricher, ReferralTracker
from carehub.routing.dryrun import preview_message
from carehub.store.store import MessageStore, sqlite_url
from tests.helpers_http import wait_for

KEY = "RGH|R-1"
TOKEN = "s3cret-token"

# -- messages ----------------------------------------------------------------------------------


def ref_i12(
    control_id: str = "RGH-REF-1", *, ref_id: str = "R-1^RGH", extra_dg1: bool = True
) -> str:
    """A REF^I12 from a hospital to a food bank, with a Z code and (by default) a clinical
    diagnosis that must not leave carehub."""
    segments = [
        "MSH|^~\\&|RGH_REF|RIVERSIDE_GH|CAREHUB|CAREHUB|20261127120000-0500||REF^I12^REF_I12"
        f"|{control_id}|P|2.5",
        f"RF1|P^Pending^HL70283|A^ASAP^HL70280|SO^Social services^HL70281|R^Referral^HL70282||"
        f"{ref_id}|20261127|20261227||Z59.41^Food insecurity",
        "PRD|RP^Referring provider^HL70286|Haddad^Samir^^^Dr|1200 Medical Pkwy^^Springfield^IL"
        "^62701||||1184629371^NPI",
        "PRD|RT^Referred to provider^HL70286|Springfield Community Food Bank"
        "|900 Market St^^Springfield^IL^62703",
        "PID|1||RG100234^^^RGH^MR||Okafor^Amara^N||19580312|F|||418 Birch Lane^^Springfield^IL"
        "^62704||(217)555-0142",
        "DG1|1||Z59.41^Food insecurity^I10||20261127|F",
    ]
    if extra_dg1:
        segments.append(
            "DG1|2||E11.9^Type 2 diabetes mellitus without complications^I10||20261127|F"
        )
    return "\r".join(segments) + "\r"


def work_for(text: str, message_id: int = 1) -> Work:
    work = Work(message=preview_message(text.encode(), message_id), route="refs", v2=text)
    work.event = translate_v2_to_event(work.view)
    return work


COMMUNITY = {
    "needs": [
        {
            "category": "food",
            "label": "Food insecurity",
            "gravity": "food-insecurity",
            "evidence": ["Z59.41"],
        }
    ],
    "matches": [
        {
            "rank": 2,
            "score": 60.0,
            "service_id": "svc-2",
            "service": "Mobile Market",
            "organization": "Fresh Wheels",
            "needs": ["food"],
        },
        {
            "rank": 1,
            "score": 85.0,
            "service_id": "svc-1",
            "service": "Emergency Food Pantry",
            "organization": "Springfield Community Food Bank",
            "organization_id": "org-77",
            "needs": ["food"],
        },
    ],
}


# -- servers -----------------------------------------------------------------------------------


class Served:
    """Any ASGI app on a real uvicorn server on 127.0.0.1 (a free port), on a thread."""

    def __init__(self, app: Any) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, lifespan="off")
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> Served:
        self._thread.start()
        wait_for(lambda: self._server.started, 30, 0.01, "uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def if_none_exist_of(raw: dict[str, Any], kind: str) -> str:
    """The ``ifNoneExist`` of the Bundle entry that creates a ``kind``."""
    return next(
        e["request"]["ifNoneExist"] for e in raw["entry"] if e["resource"]["resourceType"] == kind
    )


def _model_for(kind: str) -> Any:
    return {"ServiceRequest": ServiceRequest, "Task": Task}[kind]


def _coding(concept: Any) -> set[tuple[str | None, str | None]]:
    return {(c.system, c.code) for c in (concept.coding or [])} if concept else set()


class FhirServer:
    """A small FHIR server: ``POST /fhir`` takes transaction Bundles, validating them with
    fhir.resources R4B and checking the SDOHCC referral rules. A transaction either creates
    (``ifNoneExist`` honoured as a search on the resources' identifiers: conditional create)
    or patches (``PATCH Type?identifier=...`` with a JSON Patch in a Binary: conditional
    patch; no match 404, several 412; or ``PATCH Task/<id>`` with ``ifMatch``: 412 when the
    version moved on), all or nothing. ``GET /fhir/Task/{id}`` answers the Task with the next
    status from ``task_statuses`` (the CBO working on it); ``GET /fhir/Task?identifier=`` a
    searchset with each Task's meta.versionId, after which ``on_search`` may change the Task
    (the CBO acting in between). ``fail_with`` makes every POST fail."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.resources: dict[str, dict[str, Any]] = {}  # "Type/id" -> resource
        self.versions: dict[str, int] = {}  # "Type/id" -> version
        self.task_statuses: list[str] = []
        self.fail_with: int | None = None
        self.problems: list[str] = []  # what the validation refused
        self.posts: list[dict[str, Any]] = []
        self.patched: list[str] = []  # "Type/id" of every resource a transaction patched
        self.gets: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.on_search: Callable[[str], None] | None = None
        #: When set, what every Task read is answered with instead of the Task.
        self.task_answer: Response | None = None
        self._next = 100
        app = Starlette(
            routes=[
                Route("/fhir", self.transaction, methods=["POST"]),
                Route("/fhir/Task", self.search_tasks, methods=["GET"]),
                Route("/fhir/Task/{id}", self.read_task, methods=["GET"]),
            ]
        )
        self.served = Served(app)

    @property
    def base_url(self) -> str:
        return self.served.url("/fhir")

    def __enter__(self) -> FhirServer:
        self.served.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.served.__exit__(*exc)

    def count(self, resource_type: str) -> int:
        return sum(1 for ref in self.resources if ref.startswith(resource_type + "/"))

    @staticmethod
    def outcome(status: int, text: str) -> JSONResponse:
        body = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "invalid", "diagnostics": text}],
        }
        return JSONResponse(body, status_code=status, media_type=FHIR_CONTENT_TYPE)

    async def transaction(self, request: Request) -> Response:
        self.headers.append(dict(request.headers))
        if self.fail_with is not None:
            return self.outcome(self.fail_with, f"test server says {self.fail_with}")
        if request.headers.get("content-type") != FHIR_CONTENT_TYPE:
            return self.outcome(415, "expected application/fhir+json")
        raw = json.loads(await request.body())
        self.posts.append(raw)
        try:
            patching = self.check(raw)
            if patching:
                return self.patch(raw)
        except (ValueError, AssertionError) as err:
            self.problems.append(str(err))
            return self.outcome(400, str(err))
        return JSONResponse(self.apply(raw), media_type=FHIR_CONTENT_TYPE)

    def check(self, raw: dict[str, Any]) -> bool:
        """fhir.resources validation of the Bundle and every resource in it (the Bundle
        model dispatches each entry to its resource model), then the SDOHCC referral rules
        for a create, or the conditional-patch shape for an update; True for an update."""
        bundle = Bundle.model_validate(raw)
        assert bundle.type == "transaction", f"Bundle.type {bundle.type}"
        methods = {entry.request.method for entry in bundle.entry or []}
        if methods == {"PATCH"}:
            for entry in bundle.entry or []:
                binary = entry.resource
                assert binary.get_resource_type() == "Binary", "a JSON Patch goes in a Binary"
                assert binary.contentType == "application/json-patch+json", binary.contentType
                kind, _, query = entry.request.url.partition("?")
                if entry.request.ifMatch:  # a patch held to the version read
                    assert re.fullmatch(r"Task/[\w.-]+", entry.request.url), entry.request.url
                else:
                    assert kind in ("ServiceRequest", "Task") and query.startswith("identifier=")
            return True
        by_type: dict[str, Any] = {}
        urls: dict[str, str] = {}
        for entry in bundle.entry or []:
            resource = entry.resource
            kind = resource.get_resource_type()
            assert entry.request.method == "POST" and entry.request.url == kind
            assert entry.request.ifNoneExist, f"{kind} without ifNoneExist"
            assert entry.fullUrl.startswith("urn:uuid:")
            by_type[kind] = resource
            urls[kind] = entry.fullUrl
        assert sorted(by_type) == ["Patient", "ServiceRequest", "Task"], sorted(by_type)
        sr, task, patient = by_type["ServiceRequest"], by_type["Task"], by_type["Patient"]
        assert patient.identifier and patient.identifier[0].system and patient.identifier[0].value
        assert (sr.status, sr.intent) == ("active", "order")
        categories = set().union(*(_coding(c) for c in sr.category or []))
        assert any(system == SDOHCC_CODES for system, _ in categories), "no SDOH category"
        assert sr.code and (sr.code.coding or sr.code.text)
        assert sr.subject.reference == urls["Patient"]
        assert sr.authoredOn is not None
        assert (task.status, task.intent) == ("requested", "order")
        assert ("http://hl7.org/fhir/CodeSystem/task-code", "fulfill") in _coding(task.code)
        assert task.focus.reference == urls["ServiceRequest"]
        assert task.for_fhir.reference == urls["Patient"]
        assert task.authoredOn is not None and task.requester is not None
        for resource in (sr, task):
            condition = urllib.parse.unquote(if_none_exist_of(raw, resource.get_resource_type()))
            assert any(
                f"identifier={i.system}|{i.value}" == condition for i in resource.identifier or []
            ), f"{resource.get_resource_type()} does not carry the identifier it is created on"
        return False

    def search(self, kind: str, query: str) -> list[str]:
        """``identifier=system|value`` over the stored resources of ``kind``."""
        name, _, wanted = urllib.parse.unquote(query).partition("=")
        assert name == "identifier", f"unsupported search {query}"
        system, _, value = wanted.rpartition("|")
        return [
            ref
            for ref, resource in self.resources.items()
            if ref.startswith(kind + "/")
            and any(
                (i.get("system"), i.get("value")) == (system, value)
                for i in resource.get("identifier") or []
            )
        ]

    def apply(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Conditional creates, then the urn:uuid references rewritten to the ids."""
        with self.lock:
            ids: dict[str, str] = {}
            answers = []
            created = []
            for entry in raw["entry"]:
                kind = entry["resource"]["resourceType"]
                found = self.search(kind, entry["request"]["ifNoneExist"])
                if found:
                    ref, status = found[0], "200 OK"
                else:
                    self._next += 1
                    ref, status = f"{kind}/{self._next}", "201 Created"
                    created.append((ref, entry["resource"]))
                    self.resources[ref] = entry["resource"]  # found by later entries
                    self.versions[ref] = 1
                ids[entry["fullUrl"]] = ref
                answers.append(
                    {
                        "response": {
                            "status": status,
                            "location": f"{ref}/_history/{self.versions[ref]}",
                            "etag": f'W/"{self.versions[ref]}"',
                        }
                    }
                )
            for ref, resource in created:
                text = json.dumps(resource)
                for urn, target in ids.items():
                    text = text.replace(urn, target)
                stored = json.loads(text)
                stored["id"] = ref.split("/")[1]
                self.resources[ref] = stored
        response = {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
        Bundle.model_validate(response)
        return response

    def patch(self, raw: dict[str, Any]) -> Response:
        """Conditional patches, all or nothing: each entry's search must find exactly one
        resource, and each patched resource must still be valid FHIR."""
        with self.lock:
            changed: dict[str, dict[str, Any]] = {}
            for entry in raw["entry"]:
                kind, _, query = entry["request"]["url"].partition("?")
                if "ifMatch" in entry["request"]:
                    ref = entry["request"]["url"]
                    kind = ref.split("/")[0]
                    if ref not in self.resources:
                        return self.outcome(404, f"{ref} not found")
                    if entry["request"]["ifMatch"] != f'W/"{self.versions[ref]}"':
                        return self.outcome(412, f"{ref} is at version {self.versions[ref]}")
                    found = [ref]
                else:
                    found = self.search(kind, query)
                if not found:
                    return self.outcome(404, f"no {kind} matches {query}")
                if len(found) > 1:
                    return self.outcome(412, f"{len(found)} {kind} match {query}")
                ref = found[0]
                resource = copy.deepcopy(changed.get(ref, self.resources[ref]))
                for op in json.loads(base64.b64decode(entry["resource"]["data"])):
                    assert op["op"] in ("add", "replace"), f"unsupported op {op['op']}"
                    name = op["path"].removeprefix("/")
                    assert name and "/" not in name, f"unsupported path {op['path']}"
                    if op["op"] == "replace" and name not in resource:
                        return self.outcome(422, f"replace of missing {op['path']}")
                    resource[name] = op["value"]
                _model_for(kind).model_validate(resource)
                changed[ref] = resource
            answers = []
            for ref, resource in changed.items():
                self.resources[ref] = resource
                self.versions[ref] += 1
                location = f"{ref}/_history/{self.versions[ref]}"
                answers.append({"response": {"status": "200 OK", "location": location}})
        self.patched.extend(changed)
        body = {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
        return JSONResponse(body, media_type=FHIR_CONTENT_TYPE)

    def act(self, ref: str, status: str) -> None:
        """The organisation changes one of its Tasks (a new version)."""
        with self.lock:
            self.resources[ref]["status"] = status
            self.versions[ref] += 1

    async def search_tasks(self, request: Request) -> Response:
        query = request.url.query
        self.gets.append(f"Task?{urllib.parse.unquote(query)}")
        with self.lock:
            found = [
                {**self.resources[ref], "meta": {"versionId": str(self.versions[ref])}}
                for ref in self.search("Task", query)
            ]
        body = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(found),
            "entry": [{"resource": task, "search": {"mode": "match"}} for task in found],
        }
        Bundle.model_validate(body)
        if self.on_search is not None:
            self.on_search(query)
        return JSONResponse(body, media_type=FHIR_CONTENT_TYPE)

    async def read_task(self, request: Request) -> Response:
        ref = f"Task/{request.path_params['id']}"
        self.gets.append(ref)
        if self.task_answer is not None:
            return self.task_answer
        with self.lock:
            task = self.resources.get(ref)
            if task is None:
                return self.outcome(404, f"{ref} not found")
            if self.task_statuses:
                task["status"] = self.task_statuses.pop(0)
                if task["status"] == "rejected":
                    task["statusReason"] = {"text": "outside our service area"}
            Task.model_validate(task)
            return JSONResponse(task, media_type=FHIR_CONTENT_TYPE)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def fhir_server() -> Iterator[FhirServer]:
    with FhirServer() as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MessageStore]:
    opened = MessageStore(sqlite_url(tmp_path / "db"))
    opened.migrate()
    try:
        yield opened
    finally:
        opened.close()


def tracked_work(tmp_path: Path, store: MessageStore, message_id: int = 1) -> Work:
    """A REF^I12 through the real referral-state step, so the referral exists in the store."""
    enricher = ReferralStateEnricher(
        ReferralStateEnricher.Options(), ComponentContext(tmp_path, tmp_path, store)
    )
    work = work_for(ref_i12(), message_id)
    enricher.enrich(work)
    assert work.data["referral"].action == "created"
    return work


def channel_for(
    base_url: str, tmp_path: Path, store: MessageStore | None = None, **options: Any
) -> FhirReferralChannel:
    opts = FhirReferralChannel.Options(base_url=base_url, **options)
    return FhirReferralChannel(opts, ComponentContext(tmp_path, tmp_path / "data", store))


#: What one send came to: a receipt, a failure, or nothing to send.
Sent = str | DeliveryError | NothingToSend


def send(channel: FhirReferralChannel, *outgoing: Outgoing) -> list[Sent]:
    """Start the channel, send each delivery (collecting receipts, errors and what it found
    nothing to send for), close it."""

    async def main() -> list[Sent]:
        await channel.start()
        results: list[Sent] = []
        try:
            for item in outgoing:
                try:
                    results.append(await channel.send(item))
                except (DeliveryError, NothingToSend) as err:
                    results.append(err)
        finally:
            await channel.close()
        return results

    return asyncio.run(main())


# -- building the resources --------------------------------------------------------------------


def test_service_request_and_task_follow_the_gravity_pattern() -> None:
    work = work_for(ref_i12())
    work.data["community_resources"] = COMMUNITY
    sr, task = build_gravity_referral(work, idempotency_key="carehub-1-1-abc")

    assert (sr["status"], sr["intent"], sr["priority"]) == ("active", "order", "asap")
    sdoh = [c["coding"][0] for c in sr["category"] if c["coding"][0]["system"] == SDOHCC_CODES]
    assert [c["code"] for c in sdoh] == ["food-insecurity"]
    assert sr["code"]["coding"][0]["code"] == "467771000124109"  # the IG's food example
    assert sr["subject"]["identifier"] == {"system": "urn:carehub:id:RGH", "value": "RG100234"}
    assert sr["requester"]["identifier"] == {
        "system": "http://hl7.org/fhir/sid/us-npi",
        "value": "1184629371",
    }
    assert sr["occurrencePeriod"] == {"start": "2026-11-27", "end": "2026-12-27"}
    assert sr["authoredOn"] == "2026-11-27T12:00:00-05:00"
    # The performer is the top-ranked community match, not the first listed.
    assert sr["performer"] == [
        {
            "type": "Organization",
            "identifier": {"system": "urn:carehub:id:hsds-organization", "value": "org-77"},
            "display": "Springfield Community Food Bank",
        }
    ]
    placer = {"system": "urn:carehub:id:RGH", "value": "R-1"}
    assert [{k: i[k] for k in placer} for i in sr["identifier"]] == [placer]
    assert sr["identifier"][0]["type"]["coding"][0]["code"] == "PLAC"

    assert (task["status"], task["intent"]) == ("requested", "order")
    assert task["code"]["coding"][0]["code"] == "fulfill"
    assert task["focus"]["type"] == "ServiceRequest"
    assert task["for"] == sr["subject"]
    assert task["owner"] == sr["performer"][0]
    assert task["authoredOn"] == sr["authoredOn"]
    assert task["identifier"] == sr["identifier"]  # the referral's id, not the delivery's


def test_only_sdoh_z_codes_leave_carehub() -> None:
    sr, _ = build_gravity_referral(work_for(ref_i12(extra_dg1=True)))
    sent = json.dumps(sr)
    assert [c["coding"][0]["code"] for c in sr["reasonCode"]] == ["Z59.41"]
    assert "E11.9" not in sent and "diabetes" not in sent.lower()
    assert sdoh_z_code(translate_v2_to_event(work_for(ref_i12()).view).diagnoses[1]) is None


def test_consent_goes_to_supporting_info_or_a_note() -> None:
    work = work_for(ref_i12())
    opts = FhirReferralChannel.Options(base_url="http://x", consent_reference="Consent/55")
    sr, _ = build_gravity_referral(work, opts)
    assert sr["supportingInfo"] == [{"reference": "Consent/55", "type": "Consent"}]
    assert "note" not in sr
    sr, _ = build_gravity_referral(work)
    assert "consent" in sr["note"][0]["text"].lower()


def test_without_needs_the_category_comes_from_the_z_codes_or_is_unspecified() -> None:
    sr, _ = build_gravity_referral(work_for(ref_i12()))
    assert "food-insecurity" in json.dumps(sr["category"])
    text = ref_i12().replace("Z59.41^Food insecurity", "R69^Illness unspecified")
    sr, _ = build_gravity_referral(work_for(text))
    assert "sdoh-category-unspecified" in json.dumps(sr["category"])
    assert "reasonCode" not in sr
    assert sr["code"] == {"text": "Social needs assistance"}


def test_a_referral_without_a_patient_identifier_fails_at_routing_time() -> None:
    text = ref_i12().replace("RG100234^^^RGH^MR", "")
    with pytest.raises(ValueError, match="no patient identifier"):
        build_gravity_referral(work_for(text))


def test_render_is_a_validated_transaction_bundle_with_stable_bytes(tmp_path: Path) -> None:
    channel = channel_for("http://fhir.example/base/", tmp_path)
    work = work_for(ref_i12())
    first = channel.render(work, "carehub-1-1-abc")
    again = channel.render(work, "carehub-1-1-abc")
    assert first.payload == again.payload  # a retry sends the same bytes
    assert first.content_type == "application/fhir+json"
    assert first.metadata["referral_key"] == KEY
    bundle = json.loads(first.payload)
    Bundle.model_validate(bundle)
    conditions = [e["request"]["ifNoneExist"] for e in bundle["entry"]]
    assert conditions == [
        "identifier=urn:carehub:id:RGH|RG100234",
        "identifier=urn:carehub:id:RGH|R-1",
        "identifier=urn:carehub:id:RGH|R-1",
    ]
    other = channel.render(work, "carehub-1-2-abc")
    assert json.loads(other.payload)["entry"][2]["fullUrl"] != bundle["entry"][2]["fullUrl"]


def test_task_id_from_location() -> None:
    assert task_id_from_location("Task/123/_history/1") == "123"
    assert task_id_from_location("https://cbo.example/fhir/Task/a-b.9") == "a-b.9"
    assert task_id_from_location("ServiceRequest/5/_history/1") is None
    assert task_id_from_location(None) is None


# -- sending -----------------------------------------------------------------------------------


def test_send_creates_the_referral_and_a_resend_does_not_duplicate(
    fhir_server: FhirServer, tmp_path: Path
) -> None:
    channel = channel_for(fhir_server.base_url, tmp_path, auth_header="Bearer cbo-token")
    outgoing = channel.render(work_for(ref_i12()), "carehub-1-1-abc")
    first, second = send(channel, outgoing, outgoing)

    assert fhir_server.problems == []
    assert first == "HTTP 200 Task/103"
    assert second == "HTTP 200 Task/103"  # ifNoneExist matched: same Task
    assert (fhir_server.count("ServiceRequest"), fhir_server.count("Task")) == (1, 1)
    assert fhir_server.count("Patient") == 1
    headers = fhir_server.headers[0]
    assert headers["authorization"] == "Bearer cbo-token"
    assert headers["idempotency-key"] == "carehub-1-1-abc"
    task = fhir_server.resources["Task/103"]
    assert task["focus"]["reference"] == "ServiceRequest/102"
    assert task["for"]["reference"] == "Patient/101"
    assert channel.tasks.all()["103"]["referral_key"] == KEY
    assert channel.tasks.all()["103"]["last_status"] == "requested"


def test_http_errors_map_like_the_webhook_channel(fhir_server: FhirServer, tmp_path: Path) -> None:
    channel = channel_for(fhir_server.base_url, tmp_path)
    outgoing = channel.render(work_for(ref_i12()), "carehub-1-1-abc")

    fhir_server.fail_with = 400
    (refused,) = send(channel, outgoing)
    assert isinstance(refused, DeliveryError) and not refused.retryable
    assert "HTTP 400: test server says 400" in str(refused)

    fhir_server.fail_with = 503
    (busy,) = send(channel, outgoing)
    assert isinstance(busy, DeliveryError) and busy.retryable

    fhir_server.fail_with = 429
    (throttled,) = send(channel, outgoing)
    assert isinstance(throttled, DeliveryError) and throttled.retryable
    assert channel.tasks.all() == {}  # nothing created, nothing to poll


def test_a_server_that_is_down_is_retryable(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    channel = channel_for(f"http://127.0.0.1:{port}/fhir", tmp_path, timeout=2)
    (error,) = send(channel, channel.render(work_for(ref_i12()), "k1"))
    assert isinstance(error, DeliveryError) and error.retryable


def test_an_invalid_bundle_is_refused_by_the_server_for_good(
    fhir_server: FhirServer, tmp_path: Path
) -> None:
    """The server really validates: a Bundle with an unknown element is a 400, not retried."""
    channel = channel_for(fhir_server.base_url, tmp_path)
    good = channel.render(work_for(ref_i12()), "k1")
    bundle = json.loads(good.payload)
    bundle["entry"][2]["resource"]["bogusElement"] = True
    broken = Outgoing(json.dumps(bundle).encode(), good.content_type, "k1", dict(good.metadata))
    (error,) = send(channel, broken)
    assert isinstance(error, DeliveryError) and not error.retryable
    assert fhir_server.problems and "bogusElement" in fhir_server.problems[0]


# -- polling -----------------------------------------------------------------------------------


def test_task_polling_advances_the_referral_until_it_closes(
    fhir_server: FhirServer, tmp_path: Path, store: MessageStore
) -> None:
    work = tracked_work(tmp_path, store)
    channel = channel_for(fhir_server.base_url, tmp_path, store, poll_minutes=0)
    assert send(channel, channel.render(work, "carehub-1-1-abc")) == ["HTTP 200 Task/103"]
    tracker = ReferralTracker(store.engine)

    fhir_server.task_statuses = ["accepted", "accepted", "completed"]
    (accepted,) = channel.poll()
    assert (accepted.source, accepted.from_status, accepted.status) == (
        "fhir-task-poll",
        "requested",
        "accepted",
    )
    assert accepted.notify_referrer
    assert tracker.referral(KEY).status == "accepted"
    assert channel.poll() == []  # the same status again changes nothing, records nothing
    (completed,) = channel.poll()
    assert completed.status == "completed" and completed.closes_loop
    assert channel.tasks.all() == {}  # closed: no longer polled
    assert channel.poll() == []
    assert fhir_server.gets == ["Task/103"] * 3

    timeline = [(e.source, e.action, e.to_status) for e in tracker.events(KEY)]
    assert timeline[-2:] == [
        ("fhir-task-poll", "status", "accepted"),
        ("fhir-task-poll", "status", "completed"),
    ]
    assert tracker.events(KEY)[-1].detail["task"] == "Task/103"
    asyncio.run(channel.close())


def test_a_rejection_carries_the_status_reason(
    fhir_server: FhirServer, tmp_path: Path, store: MessageStore
) -> None:
    work = tracked_work(tmp_path, store)
    channel = channel_for(fhir_server.base_url, tmp_path, store)
    send(channel, channel.render(work, "carehub-1-1-abc"))
    fhir_server.task_statuses = ["rejected"]
    (rejected,) = channel.poll()
    assert rejected.status == "rejected"
    event = ReferralTracker(store.engine).events(KEY)[-1]
    assert event.detail["note"] == "outside our service area"
    asyncio.run(channel.close())


def test_tick_polls_at_most_every_poll_minutes(
    fhir_server: FhirServer, tmp_path: Path, store: MessageStore
) -> None:
    work = tracked_work(tmp_path, store)
    channel = channel_for(fhir_server.base_url, tmp_path, store)  # default: 15 minutes
    send(channel, channel.render(work, "carehub-1-1-abc"))
    t0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
    fhir_server.task_statuses = ["accepted", "in-progress"]
    channel.tick(t0)
    channel.tick(t0 + timedelta(minutes=5))
    assert fhir_server.gets == ["Task/103"]
    channel.tick(t0 + timedelta(minutes=16))
    assert fhir_server.gets == ["Task/103", "Task/103"]
    assert ReferralTracker(store.engine).referral(KEY).status == "in-progress"

    off = channel_for(fhir_server.base_url, tmp_path / "off", store, poll=False)
    off.tick(t0 + timedelta(days=1))
    assert len(fhir_server.gets) == 2
    asyncio.run(channel.close())


def test_the_task_map_survives_a_restart(
    fhir_server: FhirServer, tmp_path: Path, store: MessageStore
) -> None:
    """The mapping is in the channel's JSON file, so a new channel instance (a restarted hub)
    still polls the referrals sent before."""
    work = tracked_work(tmp_path, store)
    first = channel_for(fhir_server.base_url, tmp_path, store)
    assert send(first, first.render(work, "carehub-1-1-abc")) == ["HTTP 200 Task/103"]
    restarted = channel_for(fhir_server.base_url, tmp_path, store)
    fhir_server.task_statuses = ["accepted"]
    (transition,) = restarted.poll()
    assert transition.status == "accepted"
    asyncio.run(restarted.close())


# -- the webhook status route ------------------------------------------------------------------


@pytest.fixture
def status_api(tmp_path: Path, store: MessageStore) -> Iterator[Served]:
    tracked_work(tmp_path, store)
    app = FastAPI()
    register_referral_routes(app, store, [TOKEN])
    with Served(app) as served:
        yield served


def post_status(served: Served, key: str, body: Any, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(
        served.url(f"/referrals/{key}/status"), json=body, headers=headers, timeout=10
    )


def test_webhook_status_update_advances_the_referral(
    status_api: Served, store: MessageStore
) -> None:
    answer = post_status(status_api, "RGH%7CR-1", {"status": "accepted", "note": "call booked"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["source"], body["from_status"], body["status"], body["changed"]) == (
        "webhook",
        "requested",
        "accepted",
        True,
    )
    assert "summary" not in body  # no patient details handed back
    tracker = ReferralTracker(store.engine)
    assert tracker.referral(KEY).status == "accepted"
    event = tracker.events(KEY)[-1]
    assert (event.source, event.detail["note"]) == ("webhook", "call booked")

    same = post_status(status_api, "RGH%7CR-1", {"status": "accepted"})
    assert same.status_code == 200 and same.json()["changed"] is False
    bare = post_status(status_api, "R-1", {"status": "in-progress"})  # authority left out
    assert bare.status_code == 200 and bare.json()["referral_key"] == KEY


def test_webhook_unknown_referral_is_404(status_api: Served) -> None:
    answer = post_status(status_api, "RGH%7CR-404", {"status": "accepted"})
    assert answer.status_code == 404
    assert answer.json()["error"] == "no referral RGH|R-404"


def test_webhook_illegal_transition_is_409_with_the_reason(
    status_api: Served, store: MessageStore
) -> None:
    assert post_status(status_api, "RGH%7CR-1", {"status": "completed"}).status_code == 200
    answer = post_status(status_api, "RGH%7CR-1", {"status": "accepted"})
    assert answer.status_code == 409
    assert answer.json()["error"] == "illegal transition completed -> accepted"
    assert ReferralTracker(store.engine).referral(KEY).status == "completed"


def test_webhook_needs_the_bearer_token(status_api: Served, store: MessageStore) -> None:
    for token in (None, "wrong"):
        answer = post_status(status_api, "RGH%7CR-1", {"status": "accepted"}, token=token)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"].startswith("Bearer")
    assert ReferralTracker(store.engine).referral(KEY).status == "requested"


def test_webhook_bad_body_is_422(status_api: Served) -> None:
    for body in ({"status": "done"}, {"stauts": "accepted"}, ["accepted"]):
        answer = post_status(status_api, "RGH%7CR-1", body)
        assert answer.status_code == 422, body
        assert answer.json()["error"] == "invalid status update"
