"""From a care event to ranked community services: needs, crosswalk, distance, ranking.

There is no standard crosswalk from social needs to directory taxonomies (Gravity publishes the
need categories and codes, directories use 211 HSIS, Open Eligibility or their own lists), so
the mapping is a site-edited YAML file, :class:`Crosswalk`::

    needs:
      food:                            # the need category carehub reports
        label: Food insecurity
        gravity: food-insecurity       # Gravity SDOHCC category code, for FHIR output
        codes: [Z59.4]                 # ICD-10-CM prefixes: Z59.4 covers Z59.41 and Z59.48
        keywords: [food, hunger, "meal*", pantry]   # whole words; a trailing * is a prefix
        taxonomy_terms: [FOOD-PANTRY, Food Pantry]  # directory term codes, names or ids

Needs come from the event's diagnosis codes (DG1, e.g. Z59.41), the referral reason code and the
referral reason text. Ranking (:func:`rank`) is a transparent points rule so a coordinator can
see why a service is first, and every match and exclusion carries its reasons:

- 40 points per need the service serves (via a crosswalk taxonomy term),
- up to 30 for distance, falling linearly to 0 at ``max_km`` (15 for a virtual service, 0 when
  the distance is unknown),
- 15 when it speaks the patient's language,
- 10 when it belongs to the organization the referral names (PRD RT),
- 5 when it states open capacity.

Ties go to the nearer service, then the name. Services that serve a need but are out of age
range, report zero capacity, are farther than ``max_km`` or are not ``active`` are excluded,
with the reason recorded.

Language comes before points: when the patient's language is known (the language table or a
service lists it), a service whose stated languages leave it out and that states no
interpretation ranks after every service that may serve in it, whatever its points, with the
reason; a referral that names nobody goes to the first rank and must not go where the patient
cannot be understood. An unknown language only adds its reasons.

A referral that names an organisation (PRD role RT) goes there (:func:`chosen_match`): the
patient agreed to that one, and a directory status can lag behind the organisation. When
none of its services is ``active``, the entry that stands for it carries a ``warning`` saying
so, kept on the referral with the ranked matches, for the coordinator to check that it can
take the patient or move the referral to another (REF^I13 naming it).
"""

from __future__ import annotations

import csv
import difflib
import io
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from carehub.components import ComponentContext, ComponentOptions, Enricher, Work
from carehub.config import read_config_text
from carehub.errors import CarehubError, ConfigError
from carehub.hl7.view import parse_path
from carehub.resources.hsds import (
    ApiDirectory,
    Directory,
    DirectoryError,
    LocalDirectory,
    Location,
    Service,
    haversine_km,
)

__all__ = [
    "CommunityResourcesEnricher",
    "Crosswalk",
    "Excluded",
    "Match",
    "Need",
    "PostalCodes",
    "Ranking",
    "age_on",
    "chosen_match",
    "known_language",
    "language_hint",
    "language_of",
    "organization_key",
    "rank",
    "referred_to_name",
    "same_organization",
]

log = logging.getLogger(__name__)

NEED_POINTS = 40.0
DISTANCE_POINTS = 30.0
VIRTUAL_POINTS = 15.0
LANGUAGE_POINTS = 15.0
REFERRED_POINTS = 10.0
CAPACITY_POINTS = 5.0
MAX_EXCLUDED = 25  # recorded per message; the count says how many more there were
#: The reason a service of the organisation the referral names (PRD role RT) gives for it.
NAMED_REASON = "organization named in the referral (referred-to)"

#: Legal-form words a name may end with or leave out: "Eastside Neighbors Pantry, Inc." is
#: the organisation the directory lists as "Eastside Neighbors Pantry".
LEGAL_SUFFIXES = frozenset(
    {"inc", "incorporated", "llc", "ltd", "limited", "corp", "corporation", "co", "company"}
)


def organization_key(name: str | None) -> str:
    """An organisation's name as carehub compares it: letter case, punctuation, repeated
    blanks and a trailing legal form (Inc, LLC, Ltd, Corp, Co) aside. Every comparison of
    organisation names (directory look-ups, whom a referral is with, who answered) uses it,
    so one organisation is never two because a sender spelled it otherwise."""
    words = re.sub(r"[\W_]+", " ", (name or "").casefold()).split()
    while len(words) > 1 and words[-1] in LEGAL_SUFFIXES:
        words.pop()
    return " ".join(words)


def same_organization(one: str | None, other: str | None) -> bool:
    """Whether two names are one organisation's (see organization_key); never for no name."""
    key = organization_key(one)
    return bool(key) and key == organization_key(other)


class ResourcesError(CarehubError):
    """The community-resources step cannot run as configured."""


# -- crosswalk ---------------------------------------------------------------------------------


def _norm_code(code: str) -> str:
    """ICD-10-CM codes are written with and without the dot (Z59.41, Z5941): compare bare."""
    return code.strip().upper().replace(".", "")


class _NeedRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str | None = None
    gravity: str | None = None
    codes: list[str] = Field(default_factory=list)
    keywords: list[str] = Field(default_factory=list)
    taxonomy_terms: list[str] = Field(default_factory=list)

    @field_validator("codes", "keywords", "taxonomy_terms", mode="before")
    @classmethod
    def _text_items(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [str(v) for v in value if v is not None and str(v).strip()]
        return value


class _CrosswalkDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")

    needs: dict[str, _NeedRule]


@dataclass(frozen=True, slots=True)
class Need:
    """One social need found for a patient, with what it was found from (the evidence) and
    the directory terms that serve it."""

    category: str
    label: str
    evidence: tuple[str, ...] = ()
    terms: tuple[str, ...] = ()
    gravity: str | None = None
    #: The ICD-10-CM codes (as sent) this need was found from: what a referral for this need
    #: may pass on, and nothing else.
    codes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "label": self.label,
            "gravity": self.gravity,
            "evidence": list(self.evidence),
            "codes": list(self.codes),
        }


class Crosswalk:
    """Need categories with their ICD-10-CM prefixes, keywords and directory terms."""

    def __init__(self, rules: dict[str, _NeedRule], source: str = "crosswalk") -> None:
        self.source = source
        self._rules = rules
        self._codes = [
            (_norm_code(code), category) for category, rule in rules.items() for code in rule.codes
        ]
        self._keywords: list[tuple[re.Pattern[str], str, str]] = []
        for category, rule in rules.items():
            for keyword in rule.keywords:
                stem = keyword.strip().rstrip("*")
                tail = "" if keyword.strip().endswith("*") else r"\b"
                pattern = re.compile(rf"\b{re.escape(stem)}{tail}", re.IGNORECASE)
                self._keywords.append((pattern, keyword, category))

    @classmethod
    def load(cls, path: Path) -> Crosswalk:
        """Read the YAML file; errors name the file and the offending need."""
        try:
            data = yaml.safe_load(read_config_text(path, "the crosswalk"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = getattr(err, "problem", err)
            raise ConfigError(f"{path}{line}: not valid YAML: {problem}") from err
        try:
            doc = _CrosswalkDoc.model_validate(data)
        except ValidationError as err:
            problems = [
                f"{path}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
            ]
            raise ConfigError("\n".join(problems)) from None
        return cls(doc.needs, str(path))

    @property
    def categories(self) -> list[str]:
        return list(self._rules)

    def need(self, category: str, evidence: Iterable[str] = (), codes: Iterable[str] = ()) -> Need:
        rule = self._rules[category]
        return Need(
            category=category,
            label=rule.label or category,
            evidence=tuple(evidence),
            terms=tuple(rule.taxonomy_terms),
            gravity=rule.gravity,
            codes=tuple(dict.fromkeys(codes)),
        )

    def categories_for_code(self, code: str) -> list[str]:
        """Every category with a prefix of ``code`` (Z59.81 covers Z59.811 and Z59.812)."""
        bare = _norm_code(code)
        found: list[str] = []
        for prefix, category in self._codes:
            if bare.startswith(prefix) and category not in found:
                found.append(category)
        return found

    def categories_for_text(self, text: str) -> list[tuple[str, str]]:
        """(category, keyword) for every keyword found in free text, first hit per category."""
        found: dict[str, str] = {}
        for pattern, keyword, category in self._keywords:
            if category not in found and pattern.search(text):
                found[category] = keyword
        return list(found.items())

    def needs_for(self, event: Any) -> list[Need]:
        """Needs of a care event, in the order their first evidence appears: diagnoses (DG1),
        then the referral reason code and reason text (RF1-10)."""
        evidence: dict[str, list[str]] = {}
        codes: dict[str, list[str]] = {}

        def add(category: str, why: str, code: str | None = None) -> None:
            items = evidence.setdefault(category, [])
            if why not in items:
                items.append(why)
            if code:
                codes.setdefault(category, []).append(code)

        for diagnosis in getattr(event, "diagnoses", None) or []:
            if not diagnosis.code:
                continue
            for category in self.categories_for_code(diagnosis.code):
                text = f" {diagnosis.display}" if diagnosis.display else ""
                add(category, f"diagnosis {diagnosis.code}{text}", diagnosis.code)
        referral = getattr(event, "referral", None)
        if referral is not None:
            if referral.reason_code:
                for category in self.categories_for_code(referral.reason_code):
                    add(
                        category,
                        f"referral reason code {referral.reason_code}",
                        referral.reason_code,
                    )
            if referral.reason:
                for category, keyword in self.categories_for_text(referral.reason):
                    add(category, f'referral reason "{referral.reason}" (keyword {keyword})')
        return [
            self.need(category, why, codes.get(category, ())) for category, why in evidence.items()
        ]

    def resolve(self, values: Iterable[str]) -> list[Need]:
        """Needs named on a command line: a category ("food"), a code ("Z59.41") or text."""
        found: dict[str, list[str]] = {}
        by_label = {(r.label or c).casefold(): c for c, r in self._rules.items()}
        for value in values:
            key = value.strip().casefold()
            if key in self._rules:
                categories = [key]
            elif key in by_label:
                categories = [by_label[key]]
            else:
                looks_coded = re.match(r"^[a-z]\d", key) is not None
                categories = self.categories_for_code(value) if looks_coded else []
                categories = categories or [c for c, _ in self.categories_for_text(value)]
            if not categories:
                raise ConfigError(
                    f"no need matches {value!r}: use one of {', '.join(self.categories)}, "
                    "an ICD-10-CM code or words from the crosswalk keywords"
                )
            for category in categories:
                found.setdefault(category, []).append(f"asked for {value}")
        return [self.need(category, why) for category, why in found.items()]


# -- postal codes ------------------------------------------------------------------------------


class PostalCodes:
    """Postal code -> centroid (lat, lon) from a CSV with ``postal_code,latitude,longitude``
    columns (others ignored). A site ships the few hundred codes it serves, not a national
    gazetteer; unknown codes give None and the distance is reported as unknown."""

    def __init__(self, table: dict[str, tuple[float, float]], source: str = "postal codes") -> None:
        self.table = table
        self.source = source

    @staticmethod
    def normalize(code: str | None) -> str | None:
        """``62704-1234`` -> ``62704``; case and spaces folded (``sw1a 1aa`` -> ``SW1A1AA``)."""
        if not code:
            return None
        text = code.strip().upper()
        if re.fullmatch(r"\d{5}(-?\d{4})?", text):
            return text[:5]
        return text.replace(" ", "") or None

    @classmethod
    def load(cls, path: Path) -> PostalCodes:
        text = read_config_text(path, "the postal codes", encoding="utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        table: dict[str, tuple[float, float]] = {}
        for number, row in enumerate(rows, start=2):
            code = cls.normalize(row.get("postal_code"))
            try:
                lat, lon = float(row.get("latitude") or ""), float(row.get("longitude") or "")
            except ValueError:
                raise ConfigError(
                    f"{path}:{number}: expected postal_code,latitude,longitude with numbers"
                ) from None
            if code is None or not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise ConfigError(f"{path}:{number}: a postal code and valid coordinates needed")
            table[code] = (lat, lon)
        return cls(table, str(path))

    def get(self, postal_code: str | None) -> tuple[float, float] | None:
        code = self.normalize(postal_code)
        return self.table.get(code) if code else None

    def distance_km(self, postal_code: str | None, point: tuple[float, float]) -> float | None:
        centre = self.get(postal_code)
        return haversine_km(*centre, *point) if centre else None


# -- languages and age -------------------------------------------------------------------------

# ISO 639-1 key -> (English name, other spellings: ISO 639-2/3 codes, HL7 0296 habits, names).
_LANGUAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "en": ("English", ("eng", "english")),
    "es": ("Spanish", ("spa", "spanish", "español", "espanol")),
    "fr": ("French", ("fra", "fre", "french")),
    "ar": ("Arabic", ("ara", "arabic")),
    "zh": ("Chinese", ("zho", "chi", "chinese", "mandarin", "cmn", "cantonese", "yue")),
    "vi": ("Vietnamese", ("vie", "vietnamese")),
    "ko": ("Korean", ("kor", "korean")),
    "ru": ("Russian", ("rus", "russian")),
    "pl": ("Polish", ("pol", "polish")),
    "pt": ("Portuguese", ("por", "portuguese")),
    "de": ("German", ("deu", "ger", "german")),
    "tl": ("Tagalog", ("tgl", "tagalog", "fil", "filipino")),
    "hi": ("Hindi", ("hin", "hindi")),
    "ur": ("Urdu", ("urd", "urdu")),
    "so": ("Somali", ("som", "somali")),
    "sw": ("Swahili", ("swa", "swahili")),
    "yo": ("Yoruba", ("yor", "yoruba")),
    "ht": ("Haitian Creole", ("hat", "haitian", "haitian creole", "creole")),
    "ase": ("American Sign Language", ("asl", "sgn", "american sign language")),
}
_LANGUAGE_KEYS = {
    alias: key for key, (name, aliases) in _LANGUAGES.items() for alias in (key, *aliases)
}


def language_of(text: str | None) -> tuple[str, str] | None:
    """(comparison key, display name) of a language code or name: "SPA", "es", "Spanish" and
    "spa^Spanish^HL70296" are all ("es", "Spanish"). Unknown text compares as itself."""
    if not text:
        return None
    for part in text.split("^")[:2]:
        key = _LANGUAGE_KEYS.get(part.strip().casefold())
        if key:
            return key, _LANGUAGES[key][0]
    first = next((p.strip() for p in text.split("^") if p.strip()), "")
    return (first.casefold(), first) if first else None


def known_language(text: str, services: Iterable[Service] = ()) -> tuple[str, str] | None:
    """(what to rank by, display name) of a language someone typed, or None when neither the
    language table nor any of ``services`` knows it: language_of compares unknown text as
    itself, so a typo would match no service and the ranking would ignore it without a word.

    A language outside the table counts when a service lists it by code or name; the value
    returned is then what rank() compares that service's languages by (its code first)."""
    typed = [part.strip().casefold() for part in text.split("^")[:2] if part.strip()]
    for part in typed:
        if key := _LANGUAGE_KEYS.get(part):
            return key, _LANGUAGES[key][0]
    for service in services:
        for item in service.all_languages():
            spellings = {s.strip().casefold() for s in (item.code, item.name) if s}
            listed = item.code or item.name
            if listed and spellings.intersection(typed):
                return listed, item.name or listed
    return None


def language_hint(text: str, services: Iterable[Service] = ()) -> str:
    """Which forms --language takes, the languages the services list and the nearest known
    spelling of ``text``, for the error that refuses it."""
    listed: dict[str, None] = {}
    spellings = list(_LANGUAGE_KEYS)
    for service in services:
        for item in service.all_languages():
            found = language_of(item.code or item.name)
            if found is not None:
                listed[found[1] if found[0] in _LANGUAGES else item.name or found[1]] = None
            spellings += [s.casefold() for s in (item.code, item.name) if s]
    hint = "give an ISO 639-1 or 639-2 code or an English name (es, spa or Spanish)"
    if listed:
        hint += f"; the directory lists {', '.join(sorted(listed))}"
    close = difflib.get_close_matches(text.strip().casefold(), spellings, n=1, cutoff=0.75)
    if close:
        hint += f"; did you mean {close[0]!r}?"
    return hint


def age_on(birth: date | None, on: date) -> int | None:
    """Whole years, as eligibility rules count them."""
    if birth is None:
        return None
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return years if years >= 0 else None


# -- ranking -----------------------------------------------------------------------------------


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


EN_DASH = "\u2013"  # ranges read like "60-120" with an en dash, as people write them


def _age_range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"{_num(low)}{EN_DASH}{_num(high)}"
    if low is not None:
        return f"{_num(low)} and over"
    return f"up to {_num(high or 0)}"


def _eligibility(age: int | None, low: float | None, high: float | None) -> tuple[bool, str]:
    """(eligible, reason) for the HSDS minimum_age/maximum_age rule; unknown ages pass."""
    if low is None and high is None:
        return True, "eligible: no age limits stated"
    limits = _age_range(low, high)
    if age is None:
        return True, f"age limits {limits}; patient age unknown"
    if (low is not None and age < low) or (high is not None and age > high):
        return False, f"not eligible: age {age} outside {limits}"
    if low is not None and high is not None:
        return True, f"eligible: age {age} within {limits}"
    return True, f"eligible: age {age}, ages {limits}"


def _location_json(location: Location | None) -> dict[str, Any] | None:
    if location is None:
        return None
    address = location.address()
    return {
        "name": location.name,
        "address": address.one_line() if address else None,
        "postal_code": location.postal_code(),
        "latitude": location.latitude,
        "longitude": location.longitude,
        "virtual": location.virtual,
    }


@dataclass(slots=True)
class Match:
    """One ranked service, with the location used for distance and every reason."""

    service: Service
    score: float
    needs: list[str]
    reasons: list[str]
    distance_km: float | None = None
    location: Location | None = None
    #: Its stated languages leave out the patient's known one (and it states no
    #: interpretation): ranked after every service that may serve in it.
    lacks_language: bool = False

    def to_json(self, rank: int | None = None) -> dict[str, Any]:
        languages = [lang.name or lang.code for lang in self.service.all_languages()]
        hours = [
            text
            for schedule in (
                *self.service.schedules,
                *(self.location.schedules if self.location else []),
            )
            if (text := schedule.text())
        ]
        return {
            "rank": rank,
            "score": self.score,
            "service_id": self.service.id,
            "service": self.service.name,
            "organization": self.service.organization_name(),
            "organization_id": self.service.organization_id
            or (self.service.organization.id if self.service.organization else None),
            "needs": self.needs,
            "distance_km": self.distance_km,
            "location": _location_json(self.location),
            "phone": self.service.phone(),
            "url": self.service.url,
            # Where the organisation takes referrals by email (notify-referral reads these).
            "email": self.service.email,
            "organization_email": self.service.organization.email
            if self.service.organization
            else None,
            "languages": list(dict.fromkeys(n for n in languages if n)),
            "hours": list(dict.fromkeys(hours)),
            "reasons": self.reasons,
        }


@dataclass(slots=True)
class Excluded:
    """A service that serves a need but was ruled out, and why."""

    service: Service
    needs: list[str]
    reasons: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "service_id": self.service.id,
            "service": self.service.name,
            "organization": self.service.organization_name(),
            "organization_id": self.service.organization_id
            or (self.service.organization.id if self.service.organization else None),
            "needs": self.needs,
            "reasons": self.reasons,
        }


@dataclass(slots=True)
class Ranking:
    matches: list[Match] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "matches": [m.to_json(i) for i, m in enumerate(self.matches, start=1)],
            "excluded": [e.to_json() for e in self.excluded[:MAX_EXCLUDED]],
            "excluded_total": len(self.excluded),
        }


def _served(service: Service, needs: Sequence[Need]) -> tuple[list[str], list[str]]:
    """(categories served, reasons) by comparing the service's taxonomy terms (id, code or
    name, case-insensitive) with each need's crosswalk terms."""
    terms = service.taxonomy_terms()
    served: list[str] = []
    reasons: list[str] = []
    for need in needs:
        wanted = {t.casefold() for t in need.terms}
        for term in terms:
            keys = {(k or "").casefold() for k in (term.id, term.code, term.name)} - {""}
            if keys & wanted:
                served.append(need.category)
                reasons.append(f"serves need {need.category} via taxonomy term {term.label()}")
                break
    return served, reasons


def _nearest(
    service: Service, centre: tuple[float, float] | None, geocoder: PostalCodes | None
) -> tuple[Location | None, float | None]:
    """The location to report: the nearest physical one when distances can be computed."""
    locations = service.locations()
    physical = [loc for loc in locations if not loc.virtual]
    if centre is not None:
        measured = [
            (haversine_km(*centre, *point), loc)
            for loc in physical
            if (point := loc.coordinates(geocoder)) is not None
        ]
        if measured:
            distance, location = min(measured, key=lambda pair: pair[0])
            return location, round(distance, 1)
    if physical:
        return physical[0], None
    return (locations[0] if locations else None), None


def _spoken(service: Service) -> set[tuple[str, str]]:
    """(comparison key, display name) of each language the service lists."""
    return {
        lang
        for item in service.all_languages()
        if (lang := language_of(item.code or item.name)) is not None
    }


def _is_known_language(key: str, services: Sequence[Service]) -> bool:
    """Whether ``key`` (a language_of key) names a language: one the table knows or one a
    service lists. Other text (a code nobody uses) must not rank every service that states
    its languages after those that do not."""
    return key in _LANGUAGES or any(key in {k for k, _ in _spoken(service)} for service in services)


def rank(
    services: Iterable[Service],
    needs: Sequence[Need],
    near_postal: str | None = None,
    language: str | None = None,
    age: int | None = None,
    *,
    postal_codes: PostalCodes | None = None,
    max_km: float = 25.0,
    max_results: int = 5,
    referred_to: str | None = None,
) -> Ranking:
    """Rank the services that serve at least one need (the points rule is in the module
    docstring); the others are not candidates and are not listed."""
    centre = postal_codes.get(near_postal) if (postal_codes and near_postal) else None
    services = list(services)
    wanted_language = language_of(language)
    language_known = wanted_language is not None and _is_known_language(
        wanted_language[0], services
    )
    referred = organization_key(referred_to)
    ranking = Ranking()
    for service in services:
        served, reasons = _served(service, needs)
        if not served:
            continue
        score = NEED_POINTS * len(served)
        out: list[str] = []  # reasons to exclude

        if service.status.strip().lower() != "active":
            out.append(f"status: {service.status}")

        if referred and referred == organization_key(service.organization_name()):
            score += REFERRED_POINTS
            reasons.append(NAMED_REASON)

        location, distance = _nearest(service, centre, postal_codes)
        if distance is not None:
            if distance > max_km:
                out.append(f"{distance:.1f} km from {near_postal}, beyond {_num(max_km)} km")
            else:
                score += DISTANCE_POINTS * (1 - distance / max_km)
                place = f" ({location.name})" if location and location.name else ""
                reasons.append(f"{distance:.1f} km from {near_postal}{place}")
        elif location is not None and location.virtual:
            score += VIRTUAL_POINTS
            reasons.append("virtual service (phone or online): no travel needed")
        elif location is None:
            reasons.append("no location listed: distance unknown")
        elif not near_postal:
            reasons.append("patient postal code unknown: distance unknown")
        elif centre is None:
            reasons.append(f"postal code {near_postal} not in the postal code table")
        else:
            reasons.append("location has no coordinates or known postal code: distance unknown")

        lacks_language = False
        if wanted_language is not None:
            spoken = _spoken(service)
            if wanted_language[0] in {key for key, _ in spoken}:
                score += LANGUAGE_POINTS
                reasons.append(f"speaks {wanted_language[1]}")
            elif spoken:
                listed = ", ".join(sorted(name for _, name in spoken))
                lacks_language = language_known and not service.interpretation_services
                after = (
                    f": ranked after the services that may serve in {wanted_language[1]}"
                    if lacks_language
                    else ""
                )
                reasons.append(f"does not list {wanted_language[1]} (lists {listed}){after}")
            else:
                reasons.append("languages not stated")
            if wanted_language[0] not in {k for k, _ in spoken} and service.interpretation_services:
                reasons.append(f"interpretation: {service.interpretation_services}")

        eligible, why = _eligibility(age, service.minimum_age, service.maximum_age)
        (reasons if eligible else out).append(why)

        capacity = service.available_capacity()
        if capacity is None:
            reasons.append("no capacity stated")
        elif capacity[0] <= 0:
            out.append(f"no capacity: {_num(capacity[0])} open {capacity[1]}")
        else:
            score += CAPACITY_POINTS
            reasons.append(f"capacity: {_num(capacity[0])} open {capacity[1]}")

        if out:
            ranking.excluded.append(Excluded(service, served, out))
        else:
            ranking.matches.append(
                Match(service, round(score, 1), served, reasons, distance, location, lacks_language)
            )
    ranking.matches.sort(
        key=lambda m: (
            m.lacks_language,
            -m.score,
            m.distance_km if m.distance_km is not None else float("inf"),
            m.service.name.casefold(),
            m.service.id,
        )
    )
    del ranking.matches[max_results:]
    return ranking


# -- the enricher ------------------------------------------------------------------------------


def _named_organization(services: Iterable[Service], name: str) -> dict[str, Any] | None:
    """The directory's entry for the organisation a referral names (its first active service,
    as a match without a rank), whether or not it serves a need found in this message: a
    modify that names another organisation often carries no diagnosis, and the organisation
    must still be reached at the address the directory gives it.

    With no active service, its first service stands for it with a ``warning``: the referral
    still goes where it names (see the module docstring), and the coordinator is told why
    that may be a dead end and what to do."""
    found = [s for s in services if same_organization(s.organization_name(), name)]
    if not found:
        return None
    active = [s for s in found if s.status.strip().lower() == "active"]
    if active:
        return Match(active[0], 0.0, [], [NAMED_REASON]).to_json()
    statuses = ", ".join(dict.fromkeys(s.status.strip() or "not stated" for s in found))
    warning = f"not active in the directory (status: {statuses})"
    advice = (
        f"{warning}: the referral goes there because it names it; check that it can take the "
        "patient, or send the referral to another organisation (REF^I13 naming it)"
    )
    return {**Match(found[0], 0.0, [], [NAMED_REASON, advice]).to_json(), "warning": warning}


def referred_to_name(event: Any) -> str | None:
    """The organisation the referral names (PRD role RT): an organisation's name, or the
    organisation a named person works for."""
    referral = getattr(event, "referral", None)
    party = getattr(referral, "referred_to", None) if referral is not None else None
    if party is None:
        return None
    name = getattr(party, "name", None) or getattr(party, "organization", None)
    return name.strip() if isinstance(name, str) and name.strip() else None


def chosen_match(event: Any, found: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ranked service (``to_json`` form, from the community-resources output ``found``)
    that stands for the organisation a referral goes to. The one rule for every channel (the
    email and the FHIR ServiceRequest/Task), so both always name the same recipient:

    - a referral that names a party (PRD role RT) goes there and nowhere else: only a match of
      *that* organisation counts, even when another ranks higher, since the patient agreed to
      be referred there and their details must not go to anyone else (None when the directory
      has no service of it: the named party is then the recipient, outside the directory);
    - only a referral that names nobody goes to the top-ranked match (None without one)."""
    matches = [m for m in (found or {}).get("matches") or [] if isinstance(m, dict)]
    matches.sort(key=lambda m: m["rank"] if isinstance(m.get("rank"), int) else 1_000_000)
    referral = getattr(event, "referral", None)
    if getattr(referral, "referred_to", None) is None:
        return matches[0] if matches else None
    wanted = referred_to_name(event)
    if not wanted:
        return None
    named = (found or {}).get("named")
    return next(
        (m for m in matches if same_organization(str(m.get("organization") or ""), wanted)),
        named if isinstance(named, dict) else None,
    )


class CommunityResourcesEnricher(Enricher):
    """Finds the patient's social needs (Z codes, referral reason) and ranks community
    services from an HSDS directory for them, near the patient's postal code, in their
    language and within age eligibility, with the reasons for every match and exclusion."""

    name = "community-resources"
    description = (
        "Social needs from Z-code diagnoses and the referral reason, matched to HSDS community "
        "services (local export or HSDS API) via a site crosswalk, ranked with reasons."
    )

    class Options(ComponentOptions):
        directory: str | None = Field(
            None,
            description="HSDS JSON export file (a list of services or a saved page), relative "
            "to the config folder; give this or api_url",
        )
        api_url: str | None = Field(
            None, description="HSDS 3.0 API base URL; give this or directory"
        )
        crosswalk: str = Field(
            "resources/crosswalk.yaml",
            description="YAML file mapping need categories to ICD-10-CM codes, keywords and "
            "directory taxonomy terms, relative to the config folder",
        )
        postal_codes: str = Field(
            "resources/postal_codes.csv",
            description="CSV file (postal_code,latitude,longitude) for distances, relative to "
            "the config folder",
        )
        max_results: int = Field(5, ge=1, le=100, description="most matches listed, best first")
        max_km: float = Field(
            25.0,
            gt=0,
            description="km from the patient's postal code beyond which a service is excluded",
        )
        cache_seconds: float = Field(
            300.0, ge=0, description="seconds to keep API answers (api_url only); 0: no cache"
        )
        timeout: float = Field(
            10.0,
            gt=0,
            description="seconds to wait for the API to connect or answer (api_url only)",
        )
        language_field: str | None = Field(
            "PID-15",
            description="field holding the patient's language (HL7 table 0296); null ignores "
            "language",
        )

        @model_validator(mode="after")
        def _one_source(self) -> CommunityResourcesEnricher.Options:
            if (self.directory is None) == (self.api_url is None):
                raise ValueError("give exactly one of `directory` (a file) or `api_url`")
            return self

        @field_validator("language_field")
        @classmethod
        def _valid_path(cls, value: str | None) -> str | None:
            if value is not None:
                parse_path(value)  # PathError is a ValueError: reported as a config error
            return value

    options: Options

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        opts = self.options
        self.postal_codes: PostalCodes | None = None
        self.crosswalk: Crosswalk | None = None
        self.directory: Directory
        if opts.directory is not None:
            self.directory = LocalDirectory(context.path(opts.directory))
        else:
            self.directory = ApiDirectory(
                str(opts.api_url), cache_seconds=opts.cache_seconds, timeout=opts.timeout
            )

    def may_block(self) -> bool:
        """An HSDS API is asked when its cached answers expire, on the message that finds
        them so: that routing must not hold up intake (a local export file never waits)."""
        return self.options.api_url is not None

    def _load(self) -> tuple[Crosswalk, PostalCodes]:
        if self.crosswalk is None or self.postal_codes is None:
            self.crosswalk = Crosswalk.load(self.context.path(self.options.crosswalk))
            self.postal_codes = PostalCodes.load(self.context.path(self.options.postal_codes))
            if isinstance(self.directory, LocalDirectory):
                self.directory.geocoder = self.postal_codes
                self.directory.load()
        return self.crosswalk, self.postal_codes

    async def start(self) -> None:
        """Load the crosswalk, postal codes and a local export up front: a broken file should
        stop the hub at start, not fail messages later."""
        self._load()

    async def close(self) -> None:
        if isinstance(self.directory, ApiDirectory):
            self.directory.close()

    def _language(self, work: Work) -> str | None:
        field_path = self.options.language_field
        if not field_path:
            return None
        found = language_of(work.view.raw(field_path))
        return found[1] if found else None

    def enrich(self, work: Work) -> Any:
        event = work.event
        if event is None:
            raise ResourcesError(
                "the community-resources step needs a care event: put `translate: v2-to-event` "
                "before it in the route"
            )
        crosswalk, postal_codes = self._load()
        needs = crosswalk.needs_for(event)
        patient = event.patient
        near = PostalCodes.normalize(
            patient.address.postal_code if patient and patient.address else None
        )
        on = event.occurred_at.date() if event.occurred_at else date.today()
        age = age_on(patient.birth_date if patient else None, on)
        language = self._language(work)
        result: dict[str, Any] = {
            "needs": [n.to_json() for n in needs],
            "near_postal_code": near,
            "age": age,
            "language": language,
            "directory": self.directory.describe(),
            "matches": [],
            "excluded": [],
            "excluded_total": 0,
        }
        named = referred_to_name(event)
        if needs or named:
            try:
                # The whole directory (an API's is cached), ranked here by distance from the
                # local postal code table: a search by the patient's postal code would send
                # a piece of their address to the directory's server with every referral.
                services = self.directory.services()
            except DirectoryError as err:
                # A directory outage must not hold up the care-team notifications that share
                # the route: record it, rank nothing, let the message go on.
                log.warning("community-resources: %s", err)
                result["error"] = f"directory unavailable: {err}"
            else:
                ranking = rank(
                    services,
                    needs,
                    near,
                    language,
                    age,
                    postal_codes=postal_codes,
                    max_km=self.options.max_km,
                    max_results=self.options.max_results,
                    referred_to=named,
                )
                result.update(ranking.to_json())
                if named:
                    result["named"] = _named_organization(services, named)
                    if (result["named"] or {}).get("warning"):
                        # The message id only: logs carry no names or identifiers.
                        log.warning(
                            "community-resources: message %s names an organisation that is "
                            "%s; recorded on the referral",
                            work.message.id,
                            result["named"]["warning"],
                        )
        work.data["community_resources"] = result
        self._record_on_referral(work, result)
        return result

    def _record_on_referral(self, work: Work, result: dict[str, Any]) -> None:
        """With a referral-state step earlier in the route, the matches a referral was sent by
        are kept on the referral itself (not only in this step's output), and after them,
        without a rank, the named organisation's entry when that is where it goes but it did
        not rank (with its warning, if any). Kept when the referral goes to an organisation:
        a new one, one released from being held, and one a modify moved to another
        organisation (the warning follows the holder: the one it went to now may be closed,
        the one it left may have been). A modify that keeps the organisation keeps what the
        referral went out with (its matches, ranked again from that message alone, would
        replace who has it); a moved one found no needs of its own keeps the needs it had."""
        from carehub.referrals.state import (
            SENT_AS_NEW_ACTIONS,
            ReferralStateEnricher,
            record_matches,
        )

        referral = work.data.get("referral")
        key = getattr(referral, "referral_key", None)
        moved = bool(getattr(referral, "accepted", False)) and bool(
            getattr(referral, "referred_to_before", None)
        )
        if not key or not (moved or getattr(referral, "action", None) in SENT_AS_NEW_ACTIONS):
            return

        store = self.context.store
        # Without a store (a dry run) the referral lives in the referral-state step's memory.
        target = (
            store.engine
            if store is not None
            else self.context.shared.get(ReferralStateEnricher.memory_key())
        )
        if target is not None:
            offered = list(result["matches"])
            chosen = chosen_match(work.event, result)
            if chosen is not None and chosen not in offered:
                offered.append(chosen)
            needs = result["needs"] if result["needs"] or not moved else None
            record_matches(target, key, needs, offered)
