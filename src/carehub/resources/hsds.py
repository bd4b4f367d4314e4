"""Open Referral HSDS 3.0 community resource directories: the data model and two sources.

Community directories (211s, CBO networks, city resource guides) publish their services in the
Human Services Data Specification. The matcher only needs a small, typed slice of it: who runs
the service, what it is classified as (taxonomy terms via ``attributes``), where it is delivered
(``service_at_locations`` -> ``location`` with coordinates or an address), which languages are
spoken, who is eligible (``minimum_age``/``maximum_age``) and, when the publisher states it,
current capacity (``capacities``, HSDS 3.1 ``service_capacity``). Real exports carry many more
fields, nulls and numbers-as-strings, so every model ignores unknown keys and treats null or ""
as "not given" instead of failing the whole directory over one sloppy record.

Two sources return the same typed :class:`Service` objects:

- :class:`LocalDirectory` reads a JSON export in the shape the HSDS 3.0 API returns for fully
  nested services: a JSON list of services (``GET /services/{id}`` objects), or a saved page
  ``{"contents": [...], ...}`` from ``GET /services?full=true``. Each service nests its
  ``organization``, ``service_at_locations[].location``, ``attributes[].taxonomy_term``,
  ``languages`` and ``capacities``. The file is re-read when it changes, so a site can drop in a
  fresh export without a restart.
- :class:`ApiDirectory` talks to an HSDS 3.0 API over HTTP: ``GET /services`` (required by the
  spec) and ``GET /service_at_locations`` with ``postcode`` and ``proximity`` (metres) filters
  (optional in the spec), following the ``Page`` schema (``contents``, ``total_pages``,
  ``page_number``, ``last_page``). Answers are kept in memory for ``cache_seconds`` because the
  router calls the directory once per message and directories change daily, not per second.
  An answer is read up to MAX_ANSWER_BYTES once decompressed (the FHIR clients' bound); a
  larger one, or any other failure, keeps the last good answer for another ``cache_seconds``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from carehub.builtins.http_channel import MAX_ANSWER_BYTES, AnswerTooLarge, read_answer
from carehub.config import without_password
from carehub.errors import CarehubError

__all__ = [
    "Address",
    "ApiDirectory",
    "Attribute",
    "Capacity",
    "Directory",
    "DirectoryError",
    "Geocoder",
    "Language",
    "LocalDirectory",
    "Location",
    "Organization",
    "Phone",
    "Schedule",
    "Service",
    "ServiceAtLocation",
    "TaxonomyTerm",
    "Unit",
    "haversine_km",
    "parse_services",
]

log = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0088


class DirectoryError(CarehubError):
    """The directory cannot be read: a bad export file, or an API that fails or answers junk."""


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km: good to well under 1% at city scale, which is all a
    "how far is the pantry" reason needs (road distance would need a routing service)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


class Geocoder(Protocol):
    """Anything that turns a postal code into a centroid (``matching.PostalCodes`` does)."""

    def get(self, postal_code: str | None) -> tuple[float, float] | None: ...


# -- the model ---------------------------------------------------------------------------------


class _HSDS(BaseModel):
    """Base of every HSDS object: unknown keys are ignored (exports carry far more than we
    read), ids may arrive as numbers, and null or "" means "not given" so defaults apply."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_empty(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None and v != ""}
        return data


class TaxonomyTerm(_HSDS):
    """A classification term. HSDS prescribes no taxonomy: ``taxonomy`` says which one
    (211 HSIS, Open Eligibility, a local list) and ``code``/``name`` are what crosswalks use."""

    id: str | None = None
    code: str | None = None
    name: str | None = None
    description: str | None = None
    parent_id: str | None = None
    taxonomy: str | None = None
    taxonomy_id: str | None = None
    term_uri: str | None = None

    def label(self) -> str:
        """``code name`` (either alone when the other is missing), for reasons."""
        return " ".join(p for p in (self.code, self.name) if p) or (self.id or "?")


class Attribute(_HSDS):
    """Links an object to a taxonomy term (HSDS 3.0 replaced service_taxonomy with this)."""

    id: str | None = None
    taxonomy_term_id: str | None = None
    taxonomy_term: TaxonomyTerm | None = None
    link_type: str | None = None
    value: str | None = None
    label: str | None = None


class Language(_HSDS):
    """A language spoken at the service or location (not one offered only via interpreter)."""

    id: str | None = None
    name: str | None = None
    code: str | None = None  # ISO 639-1 or 639-3
    note: str | None = None


class Phone(_HSDS):
    id: str | None = None
    number: str | None = None
    extension: str | None = None
    type: str | None = None
    description: str | None = None


class Address(_HSDS):
    id: str | None = None
    attention: str | None = None
    address_1: str | None = None
    address_2: str | None = None
    city: str | None = None
    region: str | None = None
    state_province: str | None = None
    postal_code: str | None = None
    country: str | None = None
    address_type: str | None = None  # physical | postal | virtual

    def one_line(self) -> str:
        street = ", ".join(p for p in (self.address_1, self.address_2) if p)
        place = " ".join(p for p in (self.state_province, self.postal_code) if p)
        return ", ".join(p for p in (street, self.city, place) if p)


class Schedule(_HSDS):
    """Opening hours. Only the human text and the simplest RRULE parts are kept: the matcher
    shows hours, it does not decide whether a place is open now."""

    id: str | None = None
    description: str | None = None
    freq: str | None = None
    byday: str | None = None
    opens_at: str | None = None
    closes_at: str | None = None

    def text(self) -> str | None:
        if self.description:
            return self.description
        if self.byday or self.opens_at:
            hours = "-".join(p for p in (self.opens_at, self.closes_at) if p)
            return " ".join(p for p in (self.byday, hours) if p) or None
        return None


class Organization(_HSDS):
    id: str | None = None
    name: str | None = None
    alternate_name: str | None = None
    description: str | None = None
    email: str | None = None
    website: str | None = None
    phones: list[Phone] = Field(default_factory=list)


class Location(_HSDS):
    """Where a service is delivered. ``latitude``/``longitude`` are WGS84 degrees; when they are
    missing the address postal code's centroid stands in (see :meth:`coordinates`)."""

    id: str | None = None
    location_type: str = "physical"  # physical | postal | virtual
    name: str | None = None
    description: str | None = None
    url: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    transportation: str | None = None
    addresses: list[Address] = Field(default_factory=list)
    languages: list[Language] = Field(default_factory=list)
    phones: list[Phone] = Field(default_factory=list)
    schedules: list[Schedule] = Field(default_factory=list)

    @property
    def virtual(self) -> bool:
        return self.location_type.lower() == "virtual"

    def address(self) -> Address | None:
        """The physical address if one is marked so, else the first address."""
        for address in self.addresses:
            if (address.address_type or "physical").lower() == "physical":
                return address
        return self.addresses[0] if self.addresses else None

    def postal_code(self) -> str | None:
        address = self.address()
        return address.postal_code if address else None

    def coordinates(self, geocoder: Geocoder | None = None) -> tuple[float, float] | None:
        """Stated coordinates, else the centroid of the address postal code (coarser, but
        many small CBOs never geocode their records)."""
        if self.latitude is not None and self.longitude is not None:
            return (self.latitude, self.longitude)
        if geocoder is not None and not self.virtual:
            return geocoder.get(self.postal_code())
        return None


class ServiceAtLocation(_HSDS):
    """A service at one location; the API's ``/service_at_locations`` nests the service."""

    id: str | None = None
    service_id: str | None = None
    location_id: str | None = None
    description: str | None = None
    location: Location | None = None
    phones: list[Phone] = Field(default_factory=list)
    schedules: list[Schedule] = Field(default_factory=list)


class Unit(_HSDS):
    id: str | None = None
    name: str | None = None
    scheme: str | None = None
    identifier: str | None = None


class Capacity(_HSDS):
    """HSDS ``service_capacity``: how many units (beds, slots, boxes) are free right now."""

    id: str | None = None
    available: float | None = None
    maximum: float | None = None
    unit: Unit | None = None
    description: str | None = None
    updated: str | None = None


class Service(_HSDS):
    """An HSDS service with what matching reads. ``status`` is required by the spec; when an
    export leaves it out we assume ``active`` rather than hide the service."""

    id: str
    name: str
    status: str = "active"
    organization_id: str | None = None
    organization: Organization | None = None
    alternate_name: str | None = None
    description: str | None = None
    url: str | None = None
    email: str | None = None
    interpretation_services: str | None = None
    application_process: str | None = None
    fees_description: str | None = None
    eligibility_description: str | None = None
    minimum_age: float | None = None
    maximum_age: float | None = None
    alert: str | None = None
    languages: list[Language] = Field(default_factory=list)
    attributes: list[Attribute] = Field(default_factory=list)
    service_at_locations: list[ServiceAtLocation] = Field(default_factory=list)
    phones: list[Phone] = Field(default_factory=list)
    schedules: list[Schedule] = Field(default_factory=list)
    capacities: list[Capacity] = Field(default_factory=list)

    def taxonomy_terms(self) -> list[TaxonomyTerm]:
        """Terms from ``attributes`` (a bare ``taxonomy_term_id`` becomes an id-only term)."""
        terms: list[TaxonomyTerm] = []
        for attribute in self.attributes:
            if attribute.taxonomy_term is not None:
                terms.append(attribute.taxonomy_term)
            elif attribute.taxonomy_term_id:
                terms.append(TaxonomyTerm(id=attribute.taxonomy_term_id))
        return terms

    def locations(self) -> list[Location]:
        return [sal.location for sal in self.service_at_locations if sal.location is not None]

    def all_languages(self) -> list[Language]:
        """Languages of the service and of its locations (publishers put them in either)."""
        found = list(self.languages)
        for location in self.locations():
            found.extend(location.languages)
        return found

    def available_capacity(self) -> tuple[float, str] | None:
        """(free units, unit name) summed over stated capacities; None when none is stated,
        which is not the same as zero: most directories never publish capacity."""
        stated = [c for c in self.capacities if c.available is not None]
        if not stated:
            return None
        units = {c.unit.name for c in stated if c.unit is not None and c.unit.name}
        unit = units.pop() if len(units) == 1 else "slots"
        return (sum(c.available or 0 for c in stated), unit)

    def phone(self) -> str | None:
        for phones in (
            self.phones,
            *(sal.phones for sal in self.service_at_locations),
            self.organization.phones if self.organization else [],
        ):
            for phone in phones:
                if phone.number:
                    return phone.number
        return None

    def organization_name(self) -> str | None:
        return self.organization.name if self.organization else None


def parse_services(items: Iterable[Any], source: str) -> list[Service]:
    """Validate raw service objects; every bad record is named (index, id, name) in one error,
    so a site fixing an export sees all the problems at once."""
    services: list[Service] = []
    problems: list[str] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append(f"item {index}: expected a service object, got {type(item).__name__}")
            continue
        try:
            service = Service.model_validate(item)
        except ValidationError as err:
            label = item.get("name") or item.get("id") or "?"
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            problems.append(f"item {index} ({label}): {where}: {first['msg']}")
            continue
        if service.id in seen:
            problems.append(f"item {index} ({service.name}): duplicate service id {service.id}")
            continue
        seen.add(service.id)
        services.append(service)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DirectoryError(f"{source}: " + "; ".join(problems[:5]) + more)
    return services


# -- sources -----------------------------------------------------------------------------------


class Directory(Protocol):
    """What the matcher needs from a directory, local or remote."""

    def services(self) -> list[Service]: ...

    def search(
        self,
        *,
        postcode: str | None = None,
        proximity_m: float | None = None,
        taxonomy_term_id: str | None = None,
    ) -> list[Service]: ...

    def describe(self) -> str: ...


def _has_term(service: Service, term: str) -> bool:
    wanted = term.casefold()
    return any(
        wanted in {(t.id or "").casefold(), (t.code or "").casefold()}
        for t in service.taxonomy_terms()
    )


class LocalDirectory:
    """A directory read from an HSDS JSON export (see the module docstring for the shape).

    ``search`` mirrors the API's ``/service_at_locations`` filters so the enricher treats both
    sources alike: it keeps only the locations inside ``proximity_m`` of the postcode centroid
    (needs a geocoder; without one, locations whose address has that postcode). Virtual
    locations always pass: a phone line serves every postcode."""

    def __init__(self, path: Path, geocoder: Geocoder | None = None) -> None:
        self.path = path
        self.geocoder = geocoder
        self._services: list[Service] = []
        self._by_id: dict[str, Service] = {}
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"file {self.path}"

    def _stat(self) -> tuple[int, int]:
        try:
            st = self.path.stat()
        except OSError as err:
            raise DirectoryError(f"{self.path}: cannot read the directory: {err.strerror}") from err
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> LocalDirectory:
        """Read the file now; raises DirectoryError naming the file and the bad records."""
        with self._lock:
            stamp = self._stat()
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as err:
                raise DirectoryError(f"{self.path}: cannot read the directory: {err}") from err
            except json.JSONDecodeError as err:
                raise DirectoryError(
                    f"{self.path}:{err.lineno}: not valid JSON: {err.msg}"
                ) from err
            if isinstance(data, dict) and isinstance(data.get("contents"), list):
                items = data["contents"]
            elif isinstance(data, list):
                items = data
            else:
                raise DirectoryError(
                    f"{self.path}: expected a JSON list of HSDS services or an HSDS page "
                    '{"contents": [...]}'
                )
            services = parse_services(items, str(self.path))
            self._services = services
            self._by_id = {s.id: s for s in services}
            self._stamp = stamp
        log.info("community directory %s: %d services", self.path, len(services))
        return self

    def refresh(self) -> None:
        """Reload if the file changed; a broken new file keeps the last good data (logged),
        because a half-saved export must not empty the directory mid-shift."""
        if self._stamp is None:
            self.load()
            return
        try:
            if self._stat() != self._stamp:
                self.load()
        except DirectoryError as err:
            log.warning("%s; keeping the %d services loaded before", err, len(self._services))

    def services(self) -> list[Service]:
        self.refresh()
        return list(self._services)

    def service(self, service_id: str) -> Service | None:
        self.refresh()
        return self._by_id.get(service_id)

    def search(
        self,
        *,
        postcode: str | None = None,
        proximity_m: float | None = None,
        taxonomy_term_id: str | None = None,
    ) -> list[Service]:
        found: list[Service] = []
        centre = self.geocoder.get(postcode) if (self.geocoder and postcode) else None
        for service in self.services():
            if taxonomy_term_id and not _has_term(service, taxonomy_term_id):
                continue
            if not postcode:
                found.append(service)
                continue
            kept = [
                sal
                for sal in service.service_at_locations
                if sal.location is not None
                and self._near(sal.location, postcode, centre, proximity_m)
            ]
            if kept:
                found.append(service.model_copy(update={"service_at_locations": kept}))
        return found

    def _near(
        self,
        location: Location,
        postcode: str,
        centre: tuple[float, float] | None,
        proximity_m: float | None,
    ) -> bool:
        if location.virtual:
            return True
        if centre is not None and proximity_m is not None:
            point = location.coordinates(self.geocoder)
            return point is not None and haversine_km(*centre, *point) * 1000 <= proximity_m
        return (location.postal_code() or "").strip()[:5] == postcode.strip()[:5]


class ApiDirectory:
    """An HSDS 3.0 API client with a TTL cache.

    ``services()`` pages through ``GET /services?full=true`` (list entries are otherwise
    "one-to-one fields" only, without the attributes we match on). ``search()`` pages through
    ``GET /service_at_locations?full=true`` with ``postcode``/``proximity``/``taxonomy_term_id``
    and groups the rows back into services; a row whose nested service lacks ``attributes`` is
    completed with ``GET /services/{id}``. Every answer is cached for ``cache_seconds`` (0 turns
    the cache off); when it expires and asking again fails (the server is down, answers junk or
    more than ``max_answer_bytes``), the last good answer is kept, logged, for another
    ``cache_seconds``: a directory outage must not empty the matches mid-shift.

    Sync httpx on purpose: a step that uses it says it may block
    (``CommunityResourcesEnricher.may_block``), so its routes run on a helper thread, one
    message at a time, and a blocking call with a timeout is the simple, correct choice."""

    def __init__(
        self,
        base_url: str,
        *,
        cache_seconds: float = 300.0,
        per_page: int = 100,
        timeout: float = 10.0,
        max_pages: int = 100,
        headers: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_seconds = cache_seconds
        self.per_page = per_page
        self.max_pages = max_pages
        self.max_answer_bytes = max_answer_bytes
        self._clock = clock
        self._client = httpx.Client(
            base_url=self.base_url + "/",
            timeout=timeout,
            # Only the codings read_answer unpacks within its bound (httpx would also offer
            # br and zstd when their packages happen to be installed).
            headers={
                "Accept": "application/json",
                "Accept-Encoding": "gzip, deflate",
                **(headers or {}),
            },
        )
        self._cache: dict[tuple[Any, ...], tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self.requests_made = 0  # HTTP requests sent, for logs and tests

    def describe(self) -> str:
        return f"HSDS API {without_password(self.base_url)}"

    def close(self) -> None:
        self._client.close()

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- cache ---------------------------------------------------------------------------
    def _cached(self, key: tuple[Any, ...], produce: Callable[[], Any]) -> Any:
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        try:
            value = produce()
        except DirectoryError as err:
            if hit is None:
                raise
            # Asked again only after another cache_seconds: a server answering junk (or more
            # than the bound) is not read again for every message.
            log.warning(
                "%s; keeping the last good answer for another %g s", err, self.cache_seconds
            )
            value = hit[1]
        if self.cache_seconds > 0:
            with self._lock:
                self._cache[key] = (now + self.cache_seconds, value)
                if len(self._cache) > 1024:  # many postcodes: drop expired entries
                    self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        return value

    # -- HTTP ----------------------------------------------------------------------------
    def _get(self, path: str, params: dict[str, Any] | None = None) -> tuple[str, int, bytes]:
        """(the address as shown, the status, the body of a 200, else b""). The body is read
        up to ``max_answer_bytes`` decompressed: a huge or endless answer, or a gzip one that
        unpacks to gigabytes, is a DirectoryError instead of the process's memory."""
        url = f"{self.base_url}/{path.lstrip('/')}"
        self.requests_made += 1
        try:
            with self._client.stream("GET", path.lstrip("/"), params=params) as response:
                shown = _shown(response.url)
                if response.status_code != 200:
                    return shown, response.status_code, b""
                return shown, 200, read_answer(response, self.max_answer_bytes)
        except AnswerTooLarge as err:
            raise DirectoryError(f"{_shown(url)}: {err}; not read") from err
        except httpx.HTTPError as err:
            raise DirectoryError(without_password(f"{url}: {type(err).__name__}: {err}")) from err

    def _json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        shown, status, body = self._get(path, params)
        if status != 200:
            raise DirectoryError(f"{shown}: HTTP {status}")
        return _parsed(shown, body)

    def _pages(self, path: str, params: dict[str, Any]) -> list[Any]:
        """Every ``contents`` item of a paged list. Stops at ``total_pages`` when the server
        gives it, else at ``last_page``, an empty or short page, or ``max_pages`` (a guard
        against a server that always says "more")."""
        items: list[Any] = []
        page = 1
        while True:
            body = self._json(path, {**params, "page": page, "per_page": self.per_page})
            if isinstance(body, list):  # not paged at all: tolerate it
                return items + body
            contents = body.get("contents") if isinstance(body, dict) else None
            if not isinstance(contents, list):
                shown = without_password(f"{self.base_url}/{path}")
                raise DirectoryError(f"{shown}: no 'contents' list in the answer")
            items.extend(contents)
            total = body.get("total_pages")
            if isinstance(total, int) and not isinstance(total, bool):
                done = page >= total or not contents
            else:
                done = body.get("last_page") is True or len(contents) < self.per_page
            if done:
                return items
            if page >= self.max_pages:
                shown = without_password(f"{self.base_url}/{path}")
                log.warning("%s: stopped after %d pages", shown, page)
                return items
            page += 1

    # -- the Directory protocol ----------------------------------------------------------
    def services(self) -> list[Service]:
        def fetch() -> list[Service]:
            rows = self._pages("services", {"full": "true"})
            return parse_services(rows, without_password(f"{self.base_url}/services"))

        return list(self._cached(("services",), fetch))

    def service(self, service_id: str) -> Service | None:
        def fetch() -> Service | None:
            shown, status, body = self._get(f"services/{service_id}")
            if status == 404:
                return None
            if status != 200:
                raise DirectoryError(f"{shown}: HTTP {status}")
            return parse_services([_parsed(shown, body)], shown)[0]

        return self._cached(("service", service_id), fetch)

    def search(
        self,
        *,
        postcode: str | None = None,
        proximity_m: float | None = None,
        taxonomy_term_id: str | None = None,
    ) -> list[Service]:
        params: dict[str, Any] = {"full": "true"}
        if postcode:
            params["postcode"] = postcode
        if proximity_m is not None:
            params["proximity"] = str(round(proximity_m))
        if taxonomy_term_id:
            params["taxonomy_term_id"] = taxonomy_term_id
        key = ("search", tuple(sorted(params.items())))
        return list(self._cached(key, lambda: self._search(params)))

    def _search(self, params: dict[str, Any]) -> list[Service]:
        rows = self._pages("service_at_locations", params)
        grouped: dict[str, tuple[Service, list[ServiceAtLocation]]] = {}
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                continue
            try:
                sal = ServiceAtLocation.model_validate(row)
            except ValidationError as err:
                shown = without_password(f"{self.base_url}/service_at_locations")
                raise DirectoryError(f"{shown}: item {index}: {err.errors()[0]['msg']}") from err
            nested = row.get("service")
            service_id = sal.service_id or (nested or {}).get("id")
            if not service_id:
                continue
            if service_id not in grouped:
                if isinstance(nested, dict) and "attributes" in nested:
                    where = without_password(f"{self.base_url}/service_at_locations")
                    service = parse_services([nested], where)[0]
                else:
                    found = self.service(str(service_id))
                    if found is None:
                        log.warning("service %s listed at a location but not found", service_id)
                        continue
                    service = found
                grouped[str(service_id)] = (service, [])
            grouped[str(service_id)][1].append(sal)
        return [
            service.model_copy(update={"service_at_locations": sals})
            for service, sals in grouped.values()
        ]


def _parsed(shown: str, body: bytes) -> Any:
    """An answer's JSON (UTF-8, or the UTF-16/32 that ``json`` recognises)."""
    try:
        return json.loads(body)
    except ValueError as err:
        raise DirectoryError(f"{shown}: the answer is not JSON") from err


def _shown(url: object) -> str:
    """An API address for errors and logs: no password, and no query, which can hold what was
    searched for (a postal code) as well as a key."""
    return without_password(str(url).split("?", 1)[0])
