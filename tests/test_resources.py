"""Community resources: the HSDS model and both directory sources (a local export, and an HSDS
3.0 API served by a real uvicorn server with paging and postcode/proximity filters), the need
crosswalk, postal code distances, the ranking rule with its reasons and exclusions, the
community-resources enricher on the sample SDOH referral (feed 07), and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from click.testing import CliRunner
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from carehub.builtins.event_translator import translate_v2_to_event
from carehub.components import ComponentContext, Work
from carehub.errors import ConfigError
from carehub.events import CareEvent, Diagnosis, Referral
from carehub.resources.cli import resources
from carehub.resources.hsds import (
    ApiDirectory,
    DirectoryError,
    LocalDirectory,
    Service,
    haversine_km,
)
from carehub.resources.matching import (
    CommunityResourcesEnricher,
    Crosswalk,
    PostalCodes,
    ResourcesError,
    age_on,
    language_of,
    rank,
)
from carehub.routing.dryrun import preview_message
from tests.helpers_http import wait_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG = PROJECT_ROOT / "config"
SAMPLE = CONFIG / "resources"
FEED_07 = CONFIG / "feeds" / "07-riverside-sdoh-referral.hl7"


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def postal_codes() -> PostalCodes:
    return PostalCodes.load(SAMPLE / "postal_codes.csv")


@pytest.fixture(scope="module")
def crosswalk() -> Crosswalk:
    return Crosswalk.load(SAMPLE / "crosswalk.yaml")


@pytest.fixture(scope="module")
def sample_services() -> list[dict[str, Any]]:
    return json.loads((SAMPLE / "directory.json").read_text(encoding="utf-8"))


def by_name(services: list[Service]) -> dict[str, Service]:
    return {s.name: s for s in services}


def service(
    sid: str,
    terms: list[str],
    *,
    lat: float | None = 39.775,
    lon: float | None = -89.69,
    postal: str | None = None,
    languages: tuple[str, ...] = (),
    min_age: float | None = None,
    max_age: float | None = None,
    capacity: float | None = None,
    status: str = "active",
    organization: str | None = None,
    virtual: bool = False,
    interpretation: str | None = None,
) -> Service:
    """A small HSDS service for ranking tests: one location, the given terms and facts."""
    location: dict[str, Any] = {
        "id": f"loc-{sid}",
        "location_type": "virtual" if virtual else "physical",
        "name": f"Site {sid}",
        "latitude": None if virtual else lat,
        "longitude": None if virtual else lon,
        "addresses": [{"address_1": "1 Test St", "city": "Springfield", "postal_code": postal}],
    }
    return Service.model_validate(
        {
            "id": sid,
            "name": f"Service {sid}",
            "status": status,
            "organization": {"id": f"org-{sid}", "name": organization or f"Org {sid}"},
            "minimum_age": min_age,
            "maximum_age": max_age,
            "interpretation_services": interpretation,
            "languages": [{"code": code} for code in languages],
            "attributes": [{"taxonomy_term": {"code": t, "name": t.title()}} for t in terms],
            "service_at_locations": [{"id": f"sal-{sid}", "location": location}],
            "capacities": [] if capacity is None else [{"available": capacity}],
        }
    )


def work_for(text: str | bytes) -> Work:
    raw = text.encode() if isinstance(text, str) else text
    message = preview_message(raw)
    work = Work(message=message, route="t", v2=message.text)
    work.event = translate_v2_to_event(work.view)
    return work


def feed_07(language: str | None = None) -> bytes:
    """Feed 07 as sent, or with PID-15 (primary language) filled in."""
    raw = FEED_07.read_bytes()
    if language is None:
        return raw
    segments = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")
    for index, segment in enumerate(segments):
        if segment.startswith(b"PID|"):
            fields = segment.split(b"|")
            fields += [b""] * (16 - len(fields))
            fields[15] = language.encode()
            segments[index] = b"|".join(fields)
    return b"\r".join(segments)


def enricher(tmp_path: Path, **options: Any) -> CommunityResourcesEnricher:
    settings = {"directory": "resources/directory.json", **options}
    if "api_url" in options:
        settings.pop("directory")
    built = CommunityResourcesEnricher(
        CommunityResourcesEnricher.Options(**settings),
        ComponentContext(config_dir=CONFIG, data_dir=tmp_path),
    )
    asyncio.run(built.start())
    return built


# -- an HSDS 3.0 API on a real uvicorn server --------------------------------------------------


class HSDSServer:
    """Serves the sample export as an HSDS 3.0 API (``/``, ``/services``, ``/services/{id}``,
    ``/service_at_locations`` with ``postcode``/``proximity``/``taxonomy_term_id``), paged with
    the spec's Page fields, recording every request's path and query."""

    def __init__(self, services: list[dict[str, Any]], postal: PostalCodes) -> None:
        self.services = services
        self.postal = postal
        self.status = 200
        self.nest_attributes = True  # False: nested services carry one-to-one fields only
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        app = Starlette(
            routes=[
                Route("/", self.root),
                Route("/services", self.list_services),
                Route("/services/{id}", self.one_service),
                Route("/service_at_locations", self.list_sals),
            ]
        )
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def seen(self, path: str | None = None) -> list[dict[str, str]]:
        with self._lock:
            return [q for p, q in self.requests if path is None or p == path]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, request: Request) -> Response | None:
        with self._lock:
            self.requests.append((request.url.path, dict(request.query_params)))
        if self.status != 200:
            return JSONResponse({"error": "test says no"}, self.status)
        return None

    @staticmethod
    def _page(items: list[Any], request: Request) -> JSONResponse:
        page = int(request.query_params.get("page", "1"))
        per_page = int(request.query_params.get("per_page", "50"))
        total_pages = max(1, -(-len(items) // per_page))
        contents = items[(page - 1) * per_page : page * per_page]
        return JSONResponse(
            {
                "total_items": len(items),
                "total_pages": total_pages,
                "page_number": page,
                "size": len(contents),
                "first_page": page == 1,
                "last_page": page >= total_pages,
                "empty": not items,
                "contents": contents,
            }
        )

    async def root(self, request: Request) -> Response:
        return self._record(request) or JSONResponse(
            {"version": "3.0", "profile": "https://openreferral.org/"}
        )

    async def list_services(self, request: Request) -> Response:
        return self._record(request) or self._page(self.services, request)

    async def one_service(self, request: Request) -> Response:
        if (refused := self._record(request)) is not None:
            return refused
        for item in self.services:
            if item["id"] == request.path_params["id"]:
                return JSONResponse(item)
        return JSONResponse({"error": "not found"}, 404)

    async def list_sals(self, request: Request) -> Response:
        if (refused := self._record(request)) is not None:
            return refused
        query = request.query_params
        centre = self.postal.get(query.get("postcode"))
        proximity = float(query["proximity"]) if "proximity" in query else None
        rows = []
        for item in self.services:
            terms = {a["taxonomy_term"]["id"] for a in item.get("attributes", [])}
            if "taxonomy_term_id" in query and query["taxonomy_term_id"] not in terms:
                continue
            for sal in item["service_at_locations"]:
                location = sal["location"]
                if "postcode" in query and location["location_type"] != "virtual":
                    if centre is None or proximity is None:
                        postal = (location.get("addresses") or [{}])[0].get("postal_code")
                        if postal != query["postcode"]:
                            continue
                    else:
                        lat, lon = location.get("latitude"), location.get("longitude")
                        if lat is None:
                            point = self.postal.get(location["addresses"][0]["postal_code"])
                            if point is None:
                                continue
                            lat, lon = point
                        if haversine_km(*centre, lat, lon) * 1000 > proximity:
                            continue
                nested = {k: v for k, v in item.items() if k != "service_at_locations"}
                if not self.nest_attributes:
                    nested = {k: v for k, v in nested.items() if not isinstance(v, list | dict)}
                rows.append({**sal, "service": nested})
        return self._page(rows, request)

    def __enter__(self) -> HSDSServer:
        self._thread.start()
        wait_for(lambda: self._server.started, 30, 0.01, "uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


@pytest.fixture
def api(sample_services: list[dict[str, Any]], postal_codes: PostalCodes) -> Iterator[HSDSServer]:
    with HSDSServer(sample_services, postal_codes) as server:
        yield server


# -- the local export --------------------------------------------------------------------------


def test_local_directory_reads_the_sample_export() -> None:
    services = LocalDirectory(SAMPLE / "directory.json").load().services()
    assert len(services) == 26
    named = by_name(services)
    box = named["Senior Grocery Box"]
    assert box.organization_name() == "Springfield Community Food Bank"
    assert [t.code for t in box.taxonomy_terms()] == ["FOOD", "FOOD-PANTRY"]
    assert box.available_capacity() == (12, "boxes")
    assert (box.minimum_age, box.maximum_age) == (60, 120)
    assert [lang.name for lang in named["Community Food Pantry"].all_languages()] == [
        "English",
        "Spanish",
    ]
    assert len(named["Community Food Pantry"].locations()) == 2
    assert named["Benefits Hotline"].locations()[0].virtual
    assert named["Southtown Pantry"].status == "temporarily closed"
    assert named["Rent Assistance"].phone() == "217-555-0115"
    assert all(s.id and s.name for s in services)


def test_local_directory_is_tolerant_of_real_world_exports(tmp_path: Path) -> None:
    """A saved API page, numeric ids, nulls, "" and unknown keys all load."""
    page = {
        "total_pages": 1,
        "contents": [
            {
                "id": 17,
                "name": "Pantry",
                "status": "active",
                "minimum_age": "18",
                "maximum_age": "",
                "languages": None,
                "attributes": [{"id": "a", "taxonomy_term": {"id": 5, "code": "FOOD-PANTRY"}}],
                "service_at_locations": [
                    {"location": {"latitude": "39.8", "longitude": "-89.6", "accessibility": []}}
                ],
                "funding": [{"source": "county"}],
                "x_vendor": {"anything": True},
            }
        ],
    }
    path = tmp_path / "export.json"
    path.write_text(json.dumps(page), encoding="utf-8")
    [loaded] = LocalDirectory(path).services()
    assert loaded.id == "17" and loaded.minimum_age == 18 and loaded.maximum_age is None
    assert loaded.languages == [] and loaded.taxonomy_terms()[0].id == "5"
    assert loaded.locations()[0].coordinates() == (39.8, -89.6)


def test_local_directory_names_every_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "export.json"
    path.write_text(
        json.dumps([{"id": "1", "name": "ok"}, {"id": "2"}, {"id": "1", "name": "dup"}, 7]),
        encoding="utf-8",
    )
    with pytest.raises(DirectoryError) as caught:
        LocalDirectory(path).load()
    text = str(caught.value)
    assert str(path) in text
    assert "item 1 (2): name: Field required" in text
    assert "item 2 (dup): duplicate service id 1" in text
    assert "item 3: expected a service object" in text
    path.write_text('{"organizations": []}', encoding="utf-8")
    with pytest.raises(DirectoryError, match="expected a JSON list of HSDS services"):
        LocalDirectory(path).load()
    path.write_text("[{", encoding="utf-8")
    with pytest.raises(DirectoryError, match=r"export.json:1: not valid JSON"):
        LocalDirectory(path).load()


def test_local_directory_reloads_changes_and_keeps_good_data_on_a_bad_save(
    tmp_path: Path,
) -> None:
    path = tmp_path / "export.json"
    path.write_text(json.dumps([{"id": "1", "name": "First"}]), encoding="utf-8")
    directory = LocalDirectory(path).load()
    assert [s.name for s in directory.services()] == ["First"]
    before = path.stat().st_mtime_ns
    path.write_text(json.dumps([{"id": "1", "name": "Renamed"}]), encoding="utf-8")
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))
    assert [s.name for s in directory.services()] == ["Renamed"]
    path.write_text("[{half saved", encoding="utf-8")
    os.utime(path, ns=(before + 4_000_000_000, before + 4_000_000_000))
    assert [s.name for s in directory.services()] == ["Renamed"]


def test_local_search_filters_locations_by_postcode_and_proximity(
    postal_codes: PostalCodes,
) -> None:
    directory = LocalDirectory(SAMPLE / "directory.json", postal_codes)
    near = by_name(directory.search(postcode="62704", proximity_m=4_000))
    # The food bank's warehouse is 4.8 km away, its mobile stop 3.8 km: only the stop is kept.
    pantry = near["Community Food Pantry"]
    assert [loc.name for loc in pantry.locations()] == ["Westside Mobile Pantry Stop"]
    assert "Senior Grocery Box" not in near
    assert "Benefits Hotline" in near  # virtual: serves every postcode
    assert "Rural Food Pantry" not in near
    exact = by_name(LocalDirectory(SAMPLE / "directory.json").search(postcode="62704"))
    assert set(exact) == {"Home-Delivered Meals", "Eviction Prevention Clinic", "Dental Clinic"} | {
        "Benefits Hotline"
    }
    term = by_name(directory.search(taxonomy_term_id="TRANSIT-PASS"))
    assert list(term) == ["Reduced Fare Bus Passes"]


# -- the HSDS API client -----------------------------------------------------------------------


def test_api_services_pages_through_every_page_then_answers_from_the_cache(
    api: HSDSServer,
) -> None:
    directory = ApiDirectory(api.url, per_page=5, cache_seconds=300)
    try:
        services = directory.services()
        assert len(services) == 26
        assert by_name(services)["Senior Grocery Box"].available_capacity() == (12, "boxes")
        pages = api.seen("/services")
        assert [q["page"] for q in pages] == ["1", "2", "3", "4", "5", "6"]
        assert all(q["per_page"] == "5" and q["full"] == "true" for q in pages)
        api.clear()
        assert len(directory.services()) == 26
        assert api.seen() == []  # second call: no HTTP request
        assert directory.requests_made == 6
    finally:
        directory.close()


def test_api_search_sends_postcode_and_proximity_and_groups_locations(api: HSDSServer) -> None:
    directory = ApiDirectory(api.url, per_page=4)
    try:
        found = by_name(directory.search(postcode="62704", proximity_m=4_000))
        queries = api.seen("/service_at_locations")
        assert len(queries) > 1  # several pages
        assert all(q["postcode"] == "62704" and q["proximity"] == "4000" for q in queries)
        assert [loc.name for loc in found["Community Food Pantry"].locations()] == [
            "Westside Mobile Pantry Stop"
        ]
        assert "Rural Food Pantry" not in found and "Benefits Hotline" in found
        assert found["Eviction Prevention Clinic"].taxonomy_terms()[0].code == "HOUSING-EVICTION"
        # The same search again is cached; a different one is not.
        api.clear()
        directory.search(postcode="62704", proximity_m=4_000)
        assert api.seen() == []
        directory.search(postcode="62704", proximity_m=20_000)
        assert api.seen("/service_at_locations")[0]["proximity"] == "20000"
    finally:
        directory.close()


def test_api_cache_expires_after_cache_seconds_and_zero_turns_it_off(api: HSDSServer) -> None:
    now = [1000.0]
    directory = ApiDirectory(api.url, cache_seconds=60, clock=lambda: now[0])
    uncached = ApiDirectory(api.url, cache_seconds=0)
    try:
        directory.services()
        now[0] += 59
        directory.services()
        assert len(api.seen("/services")) == 1
        now[0] += 2
        directory.services()
        assert len(api.seen("/services")) == 2
        api.clear()
        uncached.services()
        uncached.services()
        assert len(api.seen("/services")) == 2
    finally:
        directory.close()
        uncached.close()


def test_api_completes_services_nested_without_attributes(api: HSDSServer) -> None:
    """Rows whose nested service has only one-to-one fields are completed (and cached) with
    GET /services/{id}, so the matcher still sees the taxonomy terms."""
    api.nest_attributes = False
    directory = ApiDirectory(api.url)
    try:
        found = by_name(directory.search(postcode="62703", proximity_m=1_500))
        assert found["Rent Assistance"].taxonomy_terms()[0].code == "HOUSING-PAY"
        fetched = [p for p, _ in api.requests if p.startswith("/services/")]
        assert len(fetched) == len(set(fetched)) == len(found)
        api.clear()
        directory.search(postcode="62703", proximity_m=2_000)  # new search, same services
        assert [p for p, _ in api.requests] == ["/service_at_locations"]
        assert directory.service("no-such-id") is None
    finally:
        directory.close()


def test_api_failures_are_directory_errors(api: HSDSServer) -> None:
    api.status = 503
    directory = ApiDirectory(api.url)
    try:
        with pytest.raises(DirectoryError, match="HTTP 503"):
            directory.services()
    finally:
        directory.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = ApiDirectory(f"http://127.0.0.1:{port}", timeout=2)
    try:
        with pytest.raises(DirectoryError, match="ConnectError"):
            down.search(postcode="62704")
    finally:
        down.close()


# -- crosswalk, postal codes, languages --------------------------------------------------------


def test_crosswalk_prefixes_cover_child_codes_with_or_without_the_dot(
    crosswalk: Crosswalk,
) -> None:
    assert crosswalk.categories_for_code("Z59.811") == ["housing"]
    assert crosswalk.categories_for_code("Z59.812") == ["housing"]
    assert crosswalk.categories_for_code("z59811") == ["housing"]
    assert crosswalk.categories_for_code("Z59.41") == ["food"]
    assert crosswalk.categories_for_code("Z59.82") == ["transportation"]
    assert crosswalk.categories_for_code("Z59.12") == ["utilities"]
    assert crosswalk.categories_for_code("Z59.86") == ["financial"]
    assert crosswalk.categories_for_code("Z59.8") == []  # a parent does not match its children
    assert crosswalk.categories_for_code("I10") == []


def test_crosswalk_keywords_are_whole_words_with_optional_prefix_star(
    crosswalk: Crosswalk,
) -> None:
    assert crosswalk.categories_for_text("Food and housing support after discharge") == [
        ("food", "food"),
        ("housing", "housing"),
    ]
    assert crosswalk.categories_for_text("facing EVICTION next week") == [("housing", "evict*")]
    assert crosswalk.categories_for_text("current medications reviewed") == []  # not "rent"
    assert crosswalk.categories_for_text("Needs rides to dialysis") == [("transportation", "rides")]


def test_crosswalk_needs_for_an_event_collects_evidence_in_order(crosswalk: Crosswalk) -> None:
    event = CareEvent(
        kind="discharge",
        message_type="ADT",
        trigger_event="A03",
        diagnoses=[
            Diagnosis(code="I50.9", display="Heart failure"),
            Diagnosis(code="Z59.82", display="Transportation insecurity"),
            Diagnosis(code="Z59.811"),
        ],
        referral=Referral(reason_code="Z59.41", reason="Help with the electric bill"),
    )
    needs = crosswalk.needs_for(event)
    assert [n.category for n in needs] == ["transportation", "housing", "food", "utilities"]
    assert needs[0].evidence == ("diagnosis Z59.82 Transportation insecurity",)
    assert needs[2].evidence == ("referral reason code Z59.41",)
    assert "keyword electric" in needs[3].evidence[0]
    assert needs[1].gravity == "housing-instability"
    assert "HOUSING-PAY" in needs[1].terms


def test_crosswalk_resolve_and_load_errors(crosswalk: Crosswalk, tmp_path: Path) -> None:
    assert [n.category for n in crosswalk.resolve(["food", "Z59.811", "bus fare"])] == [
        "food",
        "housing",
        "transportation",
    ]
    assert [n.category for n in crosswalk.resolve(["Utility insecurity"])] == ["utilities"]
    with pytest.raises(ConfigError, match="no need matches 'dental'"):
        crosswalk.resolve(["dental"])
    bad = tmp_path / "crosswalk.yaml"
    bad.write_text("needs:\n  food:\n    cods: [Z59.4]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"crosswalk.yaml: needs.food.cods: Extra inputs"):
        Crosswalk.load(bad)
    bad.write_text("needs: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Crosswalk.load(bad)


def test_postal_codes_and_distance(postal_codes: PostalCodes, tmp_path: Path) -> None:
    assert postal_codes.get("62704") == (39.775, -89.69)
    assert postal_codes.get("62704-1234") == postal_codes.get(" 62704 ")
    assert postal_codes.get("99999") is None and postal_codes.get(None) is None
    assert haversine_km(39.0, -89.0, 40.0, -89.0) == pytest.approx(111.2, abs=0.1)
    assert postal_codes.distance_km("62704", (39.775, -89.69)) == 0
    bad = tmp_path / "zips.csv"
    bad.write_text("postal_code,latitude,longitude\n62704,north,west\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"zips.csv:2: expected postal_code,latitude"):
        PostalCodes.load(bad)


def test_languages_and_age() -> None:
    assert language_of("SPA^Spanish^HL70296") == ("es", "Spanish")
    assert language_of("es") == language_of("Spanish") == language_of("spa") == ("es", "Spanish")
    assert language_of("^Hmong") == ("hmong", "Hmong")
    assert language_of("") is None
    from datetime import date

    assert age_on(date(1958, 3, 12), date(2026, 11, 27)) == 68
    assert age_on(date(1958, 12, 1), date(2026, 11, 27)) == 67
    assert age_on(None, date(2026, 11, 27)) is None


# -- ranking -----------------------------------------------------------------------------------


def test_rank_orders_by_needs_then_distance_language_and_capacity(
    crosswalk: Crosswalk, postal_codes: PostalCodes
) -> None:
    needs = crosswalk.resolve(["food", "housing"])
    services = [
        service("far-food", ["FOOD-PANTRY"], lat=39.85, lon=-89.69),  # ~8.3 km
        service("near-food", ["FOOD-PANTRY"], lat=39.78, lon=-89.69),  # ~0.6 km
        service("both", ["FOOD-PANTRY", "HOUSING-PAY"], lat=39.85, lon=-89.69),
        service("spanish", ["FOOD-PANTRY"], lat=39.85, lon=-89.69, languages=("es",)),
        service("open", ["FOOD-PANTRY"], lat=39.85, lon=-89.69, capacity=12),
        service("dental", ["HEALTH-DENTAL"]),
    ]
    ranking = rank(services, needs, "62704", "Spanish", 68, postal_codes=postal_codes)
    order = [m.service.id for m in ranking.matches]
    # Same need, 7.7 km apart: speaking the language (15) outweighs the extra distance (9.2).
    assert order == ["both", "spanish", "near-food", "open", "far-food"]
    assert "dental" not in order and not ranking.excluded  # not a candidate: not listed
    first = ranking.matches[0]
    assert first.needs == ["food", "housing"]
    assert first.reasons[:2] == [
        "serves need food via taxonomy term FOOD-PANTRY Food-Pantry",
        "serves need housing via taxonomy term HOUSING-PAY Housing-Pay",
    ]
    assert first.reasons[2] == "8.3 km from 62704 (Site both)"
    assert "does not list Spanish (lists English)" not in first.reasons
    assert "languages not stated" in first.reasons
    assert "speaks Spanish" in ranking.matches[1].reasons
    assert "capacity: 12 open slots" in ranking.matches[3].reasons
    assert "no capacity stated" in ranking.matches[4].reasons
    assert "eligible: no age limits stated" in first.reasons
    # The rule, in numbers: 40 per need, up to 30 for distance, 15 language, 5 capacity.
    assert first.score == pytest.approx(80 + 30 * (1 - 8.3 / 25), abs=0.1)
    assert ranking.matches[1].score - ranking.matches[4].score == pytest.approx(15, abs=0.1)
    assert ranking.matches[3].score - ranking.matches[4].score == pytest.approx(5, abs=0.1)
    top_two = rank(services, needs, "62704", max_results=2, postal_codes=postal_codes)
    assert [m.service.id for m in top_two.matches] == ["both", "near-food"]  # no language asked


def test_rank_excludes_with_reasons(crosswalk: Crosswalk, postal_codes: PostalCodes) -> None:
    needs = crosswalk.resolve(["food"])
    services = [
        service("seniors", ["FOOD"], min_age=60, max_age=120, capacity=3),
        service("kids", ["FOOD"], min_age=5, max_age=17),
        service("adults", ["FOOD"], min_age=18),
        service("full", ["FOOD"], capacity=0),
        service("closed", ["FOOD"], status="temporarily closed"),
        service("far", ["FOOD"], lat=39.733, lon=-90.229),
        service("kids-and-full", ["FOOD"], max_age=17, capacity=0),
    ]
    ranking = rank(services, needs, "62704", None, 68, postal_codes=postal_codes)
    assert [m.service.id for m in ranking.matches] == ["seniors", "adults"]
    assert "eligible: age 68 within 60\u2013120" in ranking.matches[0].reasons
    assert "capacity: 3 open slots" in ranking.matches[0].reasons
    assert "eligible: age 68, ages 18 and over" in ranking.matches[1].reasons
    out = {e.service.id: e.reasons for e in ranking.excluded}
    assert out == {
        "kids": ["not eligible: age 68 outside 5\u201317"],
        "full": ["no capacity: 0 open slots"],
        "closed": ["status: temporarily closed"],
        "far": ["46.3 km from 62704, beyond 25 km"],
        "kids-and-full": ["not eligible: age 68 outside up to 17", "no capacity: 0 open slots"],
    }
    json.dumps(ranking.to_json())  # JSON-ready


def test_rank_without_a_usable_distance_or_age(
    crosswalk: Crosswalk, postal_codes: PostalCodes
) -> None:
    needs = crosswalk.resolve(["food"])
    remote = service("hotline", ["FOOD"], virtual=True, interpretation="Phone interpreters")
    by_zip = service("by-zip", ["FOOD"], lat=None, lon=None, postal="62703", min_age=60)
    unknown = rank([remote, by_zip], needs, "99999", "es", None, postal_codes=postal_codes)
    reasons = {m.service.id: m.reasons for m in unknown.matches}
    assert "virtual service (phone or online): no travel needed" in reasons["hotline"]
    assert "interpretation: Phone interpreters" in reasons["hotline"]
    assert "postal code 99999 not in the postal code table" in reasons["by-zip"]
    assert "age limits 60 and over; patient age unknown" in reasons["by-zip"]
    assert unknown.matches[0].service.id == "hotline"  # 15 virtual points vs 0 unknown
    # A location without coordinates falls back to its postal code's centroid.
    known = rank([by_zip], needs, "62704", postal_codes=postal_codes)
    assert known.matches[0].distance_km == pytest.approx(
        haversine_km(39.775, -89.69, 39.769, -89.629), abs=0.05
    )
    assert rank([by_zip], needs).matches[0].reasons[1] == (
        "patient postal code unknown: distance unknown"
    )


# -- the enricher ------------------------------------------------------------------------------


def test_enricher_on_the_sample_sdoh_referral(tmp_path: Path) -> None:
    step = enricher(tmp_path)
    work = work_for(feed_07())
    result = step.enrich(work)
    assert work.data["community_resources"] is result
    json.dumps(result)  # JSON-ready
    assert [n["category"] for n in result["needs"]] == ["food", "housing"]
    assert result["needs"][0]["evidence"][0] == "diagnosis Z59.41 Food insecurity"
    assert result["needs"][1]["evidence"][0].startswith("diagnosis Z59.811 Housing instability")
    assert (result["near_postal_code"], result["age"], result["language"]) == ("62704", 68, None)
    matches = result["matches"]
    assert len(matches) == 5 and [m["rank"] for m in matches] == [1, 2, 3, 4, 5]
    top = matches[0]
    assert top["service"] == "Family Support Navigator" and top["needs"] == ["food", "housing"]
    scores = [m["score"] for m in matches]
    assert scores == sorted(scores, reverse=True)
    grocery = next(m for m in matches if m["service"] == "Senior Grocery Box")
    assert grocery["reasons"] == [
        "serves need food via taxonomy term FOOD Food",
        "organization named in the referral (referred-to)",
        "4.8 km from 62704 (Food Bank Warehouse)",
        "eligible: age 68 within 60\u2013120",
        "capacity: 12 open boxes",
    ]
    assert grocery["location"]["address"] == "900 Market St, Springfield, IL 62703"
    excluded = {e["service"]: e["reasons"] for e in result["excluded"]}
    assert excluded["Kids Weekend Backpacks"] == ["not eligible: age 68 outside 5\u201317"]
    assert excluded["Home-Delivered Meals"] == ["no capacity: 0 open meal routes"]
    assert excluded["Family Shelter"] == ["no capacity: 0 open rooms"]
    assert excluded["Southtown Pantry"] == ["status: temporarily closed"]
    assert excluded["Rural Food Pantry"] == ["46.4 km from 62704, beyond 25 km"]
    assert excluded["Rapid Rehousing"][0].endswith("beyond 25 km")
    assert result["excluded_total"] == len(result["excluded"]) == 6
    names = {m["service"] for m in matches} | set(excluded)
    assert "Dental Clinic" not in names and "Reduced Fare Bus Passes" not in names


def test_enricher_reads_the_language_and_uses_an_api_with_its_cache(
    tmp_path: Path, api: HSDSServer
) -> None:
    step = enricher(tmp_path, api_url=api.url, max_results=3, max_km=10)
    try:
        result = step.enrich(work_for(feed_07("SPA^Spanish^HL70296")))
        assert result["language"] == "Spanish"
        assert result["directory"] == f"HSDS API {api.url}"
        # The whole directory is read (and cached) and ranked here, by the local postal code
        # table: nothing of the patient's address goes to the directory's server.
        assert api.seen("/services")
        assert not any("postcode" in query or "proximity" in query for query in api.seen())
        # Within 10 km: the referred-to pantry 3.8 km away (40 + 10 + 18.6 + 15 = 83.6) just
        # beats a clinic 0.5 km away (40 + 28.5 + 15 = 83.5); both speak Spanish.
        assert [(m["service"], m["score"]) for m in result["matches"]] == [
            ("Family Support Navigator", 107.0),
            ("Community Food Pantry", 83.6),
            ("Eviction Prevention Clinic", 83.5),
        ]
        assert all("speaks Spanish" in m["reasons"] for m in result["matches"])
        excluded = {e["service"]: e["reasons"] for e in result["excluded"]}
        assert excluded["Rural Food Pantry"][0].endswith("beyond 10 km")  # ranked out here
        api.clear()
        again = step.enrich(work_for(feed_07("SPA^Spanish^HL70296")))
        assert api.seen() == [] and again["matches"] == result["matches"]
    finally:
        asyncio.run(step.close())


def test_enricher_records_a_directory_outage_instead_of_failing(
    tmp_path: Path, api: HSDSServer
) -> None:
    api.status = 500
    step = enricher(tmp_path, api_url=api.url)
    try:
        result = step.enrich(work_for(feed_07()))
        assert result["matches"] == [] and "HTTP 500" in result["error"]
        assert [n["category"] for n in result["needs"]] == ["food", "housing"]
    finally:
        asyncio.run(step.close())


def test_enricher_without_needs_does_not_ask_the_directory(tmp_path: Path, api: HSDSServer) -> None:
    step = enricher(tmp_path, api_url=api.url)
    adt = (
        "MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|20261124103000||ADT^A03^ADT_A03|T-1|P|2.5\r"
        "PID|1||RG1^^^RGH^MR||Testperson^Pat||19580312|F|||1 Test St^^Springfield^IL^62704\r"
        "PV1|1|I|4W^412^A^RIVERSIDE_GH\r"
        "DG1|1||I50.9^Heart failure^I10\r"
    )
    try:
        result = step.enrich(work_for(adt))
        assert result["needs"] == [] and result["matches"] == []
        assert api.seen() == []
    finally:
        asyncio.run(step.close())


def test_enricher_options_and_misuse(tmp_path: Path) -> None:
    Options = CommunityResourcesEnricher.Options
    with pytest.raises(ValidationError, match="exactly one of `directory`"):
        Options(directory="a.json", api_url="http://x")
    with pytest.raises(ValidationError, match="exactly one of `directory`"):
        Options()
    with pytest.raises(ValidationError, match="extra_forbidden"):
        Options(directory="a.json", radius=3)
    with pytest.raises(ValidationError, match="bad field path"):
        Options(directory="a.json", language_field="nope nope")
    step = enricher(tmp_path)
    bare = Work(message=preview_message(feed_07()), route="t", v2="")
    with pytest.raises(ResourcesError, match="translate: v2-to-event"):
        step.enrich(bare)
    missing = CommunityResourcesEnricher(
        Options(directory="resources/none.json"),
        ComponentContext(config_dir=CONFIG, data_dir=tmp_path),
    )
    with pytest.raises(DirectoryError, match=r"none\.json: cannot read the directory"):
        asyncio.run(missing.start())


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_search_prints_ranked_services_with_reasons() -> None:
    result = CliRunner().invoke(
        resources,
        [
            *("search", "--need", "food", "--near", "62704", "--language", "es", "--age", "70"),
            *("--config", str(CONFIG / "carehub.yaml")),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("needs: food · near 62704 · language Spanish · age 70 · file ")
    assert lines[1] == "1. Springfield Community Food Bank — Community Food Pantry  [score 80.4]"
    assert lines[2] == "   4400 Sample Rd, Springfield, IL 62711 · 217-555-0101"
    assert "   - speaks Spanish" in lines
    assert "   - eligible: age 70, ages 18 and over" in lines
    assert any(line.startswith("excluded (") for line in lines)
    assert "   - Kids Weekend Backpacks (Prairie Youth Center): not eligible: age 70" in (
        result.output
    )


def test_cli_search_says_when_the_postal_code_is_unknown() -> None:
    """A postal code outside the shipped table is not silently dropped: the search still runs,
    and says distance could not count."""
    result = CliRunner().invoke(
        resources,
        ["search", "--need", "food", "--near", "abc", "--config", str(CONFIG / "carehub.yaml")],
    )
    assert result.exit_code == 0, result.output
    assert "note: postal code ABC is not in " in result.stderr
    assert "distances are unknown" in result.stderr
    assert result.stdout.startswith("needs: food · near ABC")


def test_cli_search_refuses_a_language_it_does_not_know() -> None:
    """A language neither carehub nor the directory knows (a typo, say) used to rank as if no
    language were asked; it is a usage error naming the option, the value and the forms taken."""
    runner = CliRunner()
    args = ["search", "--need", "food", "--near", "62704", "--config", str(CONFIG / "carehub.yaml")]
    for value in ("klingon", "spansih"):
        result = runner.invoke(resources, [*args, "--language", value])
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '--language': {value!r} is not a language" in result.stderr
        assert "ISO 639-1 or 639-2 code or an English name (es, spa or Spanish)" in result.stderr
        assert "the directory lists English, Spanish" in result.stderr
        assert result.stdout == "" and "Traceback" not in result.output
    assert "did you mean 'spanish'?" in result.stderr  # the typo
    for value in ("SPA", "Spanish", "spa^Spanish^HL70296"):
        result = runner.invoke(resources, [*args, "--language", value])
        assert result.exit_code == 0, result.output
        assert "   - speaks Spanish" in result.stdout.splitlines()


def test_cli_search_takes_a_language_only_the_directory_lists(
    tmp_path: Path, sample_services: list[dict[str, Any]]
) -> None:
    """A language outside carehub's table is accepted, by code or by name, when a service in the
    directory lists it, and that service ranks as speaking it."""
    services = json.loads(json.dumps(sample_services))
    pantry = next(s for s in services if s["name"] == "Community Food Pantry")
    pantry["languages"].append({"id": "hmn-1", "code": "hmn", "name": "Hmong"})
    directory = tmp_path / "directory.json"
    directory.write_text(json.dumps(services), encoding="utf-8")
    args = ["search", "--need", "food", "--near", "62704", "--json", "--directory", str(directory)]
    args += ["--config", str(CONFIG / "carehub.yaml")]
    for value in ("Hmong", "HMN", "^Hmong"):
        result = CliRunner().invoke(resources, [*args, "--language", value])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["language"] == "Hmong"
        speaking = [m["service"] for m in data["matches"] if "speaks hmn" in m["reasons"]]
        assert speaking == ["Community Food Pantry"]
    refused = CliRunner().invoke(resources, [*args, "--language", "Hmongg"])
    assert refused.exit_code == 2
    assert "the directory lists English, Hmong, Spanish; did you mean 'hmong'?" in refused.stderr


def test_cli_search_json_defaults_to_config_resources_in_the_current_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(PROJECT_ROOT)
    monkeypatch.delenv("CAREHUB_CONFIG", raising=False)
    result = CliRunner().invoke(
        resources, ["search", "--need", "Z59.811", "--near", "62704", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["needs"][0]["category"] == "housing"
    assert data["directory"] == f"file {SAMPLE / 'directory.json'}"
    # Rent help 4.3 km away with open capacity (40 + 24.8 + 5) edges out a clinic 0.5 km away.
    assert [m["service"] for m in data["matches"][:2]] == [
        "Rent Assistance",
        "Eviction Prevention Clinic",
    ]
    assert all("housing" in m["needs"] for m in data["matches"])


def test_cli_search_against_an_api_and_its_errors(api: HSDSServer) -> None:
    runner = CliRunner()
    args = ["search", "--need", "transportation", "--near", "62704", "--json"]
    files = ["--crosswalk", str(SAMPLE / "crosswalk.yaml")]
    files += ["--postal-codes", str(SAMPLE / "postal_codes.csv")]
    result = runner.invoke(resources, [*args, "--api-url", api.url, *files])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {m["service"] for m in data["matches"]} == {
        "Reduced Fare Bus Passes",
        "Medical Rides",
        "Senior Rides to Appointments",
    }
    assert api.seen("/service_at_locations")[0]["proximity"] == "25000"
    both = runner.invoke(resources, [*args, "--api-url", api.url, "--directory", "x.json"])
    assert both.exit_code == 2 and "not both" in both.output
    unknown = runner.invoke(resources, ["search", "--need", "dental", *files])
    assert isinstance(unknown.exception, ConfigError)
