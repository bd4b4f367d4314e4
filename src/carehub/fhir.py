"""What every FHIR output of carehub shares: R4 JSON checked with fhir.resources, identifier
systems for v2 assigning authorities, dates no more precise than the sender wrote them, names,
addresses, and the reading of a FHIR server's error answer.

**FHIR version.** carehub writes FHIR R4 (4.0.1), the version the US IGs it follows (Gravity
SDOH Clinical Care, Da Vinci Unsolicited Notifications, US Core 3-6) are built on.
fhir.resources 8 ships R5 as its default package and R4B (4.3.0) and STU3 as sub-packages;
there is no R4 proper. The resources carehub writes (Patient, Encounter, Condition, Location,
Practitioner, Organization, MessageHeader, ServiceRequest, Task, Bundle) have the same R4 and
R4B shape, so they are written as R4 JSON and checked with the ``fhir.resources.R4B`` models;
the R5 models would be wrong (R5 renamed ``Encounter.class``, ``reasonCode`` and others).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from pydantic import Field, ValidationError, field_validator

from carehub.builtins.http_channel import http_url
from carehub.components import ComponentOptions
from carehub.events import Address, HumanName, Practitioner, date_as_sent, has_time

if TYPE_CHECKING:
    from carehub.builtins.http_channel import HttpAnswer

FHIR_CONTENT_TYPE = "application/fhir+json"

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD9CM = "http://hl7.org/fhir/sid/icd-9-cm"
NPI = "http://hl7.org/fhir/sid/us-npi"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

#: PID-8 administrative sex (table 0001) -> Patient.gender.
GENDER = {"M": "male", "F": "female", "O": "other", "U": "unknown"}


class FhirServerOptions(ComponentOptions):
    """How a channel reaches a FHIR server; each channel says in its own ``base_url``
    description what it sends where under it."""

    base_url: str = Field(description="http(s) base URL of the FHIR server")
    auth_header: str | None = Field(
        None, description="Authorization header value, e.g. Bearer ${TOKEN}; never stored"
    )
    timeout: float = Field(
        10.0, gt=0, description="seconds to wait for the server to connect or answer"
    )
    verify_tls: bool = Field(True, description="check the server's TLS certificate")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        """A base the channel adds paths to ($process-message, Task/{id}): a query or fragment
        would swallow them, so a token goes in ``auth_header``, not in the URL."""
        url = http_url(value, "base_url")
        if "?" in url or "#" in url:
            raise ValueError(
                "base_url cannot carry a query or fragment (carehub adds paths after it); "
                "put a token in auth_header (e.g. Bearer ${TOKEN}) instead"
            )
        return url.rstrip("/")


@cache
def _model(resource_type: str) -> Any:
    """The R4B model class; imported on first use so loading plugins stays cheap."""
    module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
    return getattr(module, resource_type)


def validate_resource(resource: dict[str, Any]) -> None:
    """Check a FHIR JSON resource against the fhir.resources R4B model of its type; raises
    ValueError naming the resource and the first problems. Done at routing time, so a resource
    carehub would send malformed fails its route step there, visibly, instead of at the
    receiver."""
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type.isalpha():
        raise ValueError(f"not a FHIR resource (resourceType {resource_type!r})")
    try:
        model = _model(resource_type)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"unknown FHIR resource type {resource_type!r}") from err
    try:
        model.model_validate(resource)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:3]
        )
        raise ValueError(f"invalid FHIR {resource_type}: {problems}") from err


#: The base of the identifier systems carehub makes for assigning authorities a site has not
#: mapped to a URI of their own. FHIR leaves a local identifier's system to its issuer, as a
#: URL under a domain the issuer controls (or an OID); carehub controls none, so its default
#: is under ``.invalid`` (RFC 2606: never a real domain), stable and unique to carehub until a
#: site sets a base of its own (the fhir-notification option ``identifier_system_base``).
LOCAL_SYSTEM_BASE = "https://carehub.invalid/id/"
#: The base carehub used before: a URN in a namespace nobody registered (RFC 8141 wants one).
#: What the referral channel still makes, since a referral's Task is found at the server by
#: the identifiers it was sent with.
URN_SYSTEM_BASE = "urn:carehub:id:"


def identifier_system(
    authority: str | None, systems: Mapping[str, str], base: str = URN_SYSTEM_BASE
) -> str:
    """The Identifier.system for a v2 assigning authority (``RGH``), which is no URI: the
    site's mapping, else ``<base><authority>`` (``local`` when none was sent and nothing
    scopes the identifier: callers pass the sending facility for an MRN or a visit number
    sent without an authority)."""
    name = (authority or "").strip() or "local"
    return systems.get(name) or f"{base}{quote(name, safe='')}"


def practitioner_identifier(
    person: Practitioner, systems: Mapping[str, str], base: str = URN_SYSTEM_BASE
) -> dict[str, str] | None:
    """A clinician's id as an Identifier: the NPI system when the sender says it is one (id
    type NPI, or authority NPI or CMS), else the system of its assigning authority."""
    if not person.id:
        return None
    authority = (person.id_authority or "").upper()
    is_npi = (person.id_type or "").upper() == "NPI" or authority in ("NPI", "CMS")
    system = NPI if is_npi else identifier_system(person.id_authority, systems, base)
    return {"system": system, "value": person.id}


def fhir_identifier(system: str, value: str, type_code: str | None = None) -> dict[str, Any]:
    """An Identifier, typed by its v2 identifier type (table 0203: MR, SS, VN ...) when given."""
    found: dict[str, Any] = {"system": system, "value": value}
    if type_code:
        found["type"] = {"coding": [{"system": V2_0203, "code": type_code}]}
    return found


def fhir_human_name(name: HumanName) -> dict[str, Any] | None:
    """A HumanName from the care event's (the middle name is a second given name), or None
    when it holds nothing."""
    found: dict[str, Any] = {}
    if name.family:
        found["family"] = name.family
    given = [g for g in (name.given, name.middle) if g]
    if given:
        found["given"] = given
    if name.prefix:
        found["prefix"] = [name.prefix]
    if name.suffix:
        found["suffix"] = [name.suffix]
    return found or None


def person_name(given: str | None, family: str | None, prefix: str | None = None) -> str | None:
    """ "Dr Jane Doe": a reference's display text."""
    return " ".join(p for p in (prefix, given, family) if p) or None


def fhir_datetime(value: datetime | None) -> str | None:
    """A FHIR dateTime, no more precise than the sender gave it: a year, a month or a date
    without a time stays one (FHIR allows YYYY, YYYY-MM and YYYY-MM-DD). One with a time needs
    a zone; HL7 times without an offset are the sender's local time, which carehub does not
    know, so those keep only their date."""
    if value is None:
        return None
    if value.tzinfo is None or not has_time(value):
        return date_as_sent(value)
    return value.isoformat(timespec="seconds")


def fhir_address(address: Address | None) -> dict[str, Any] | None:
    """An Address from the care event's, or None when it holds nothing."""
    if address is None:
        return None
    out: dict[str, Any] = {}
    lines = [line for line in (address.line1, address.line2) if line]
    if lines:
        out["line"] = lines
    for key, value in (
        ("city", address.city),
        ("state", address.state),
        ("postalCode", address.postal_code),
        ("country", address.country),
    ):
        if value:
            out[key] = value
    return out or None


def stable_urn(seed: str, what: str) -> str:
    """A urn:uuid that is the same each time the same thing is rendered, so a delivery
    rendered twice (a dry run, a reprocess) gives the same bytes."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'carehub:{seed}:{what}')}"


#: How much of a server's OperationOutcome a failed delivery keeps (in its last_error).
OUTCOME_TEXT_LIMIT = 1000
#: The most of one issue kept, so that one long diagnostics leaves room for the others.
ISSUE_TEXT_LIMIT = 300
#: OperationOutcome.issue.severity, the worst first: a server may list a note or a warning
#: before the error that refused the request.
SEVERITY_ORDER = ("fatal", "error", "warning", "information")


def _one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _issue_text(issue: Mapping[str, Any]) -> str | None:
    """One issue as the elements it is about (``expression``, else the older ``location``)
    and its words (``diagnostics``, else ``details``, else ``code``), after its severity
    unless it is an error (fatal or error): ``Patient.name: minimum required = 1``."""
    details = issue.get("details")
    details = details if isinstance(details, dict) else {}
    words = issue.get("diagnostics") or details.get("text")
    codings = details.get("coding")
    for coding in codings if isinstance(codings, list) else []:
        if not words and isinstance(coding, dict):
            words = coding.get("display") or coding.get("code")
    words = words or issue.get("code")
    paths = issue.get("expression") or issue.get("location")
    where = ", ".join(str(p) for p in paths if p) if isinstance(paths, list) else ""
    if not words and not where:
        return None
    severity = issue.get("severity")
    if severity not in ("fatal", "error"):
        label = str(severity or "issue")
        where = f"{label} at {where}" if where else label
    text = ": ".join(str(part) for part in (where, words) if part)
    return _one_line(text, ISSUE_TEXT_LIMIT)


def outcome_summary(outcome: Mapping[str, Any], limit: int = OUTCOME_TEXT_LIMIT) -> str | None:
    """An OperationOutcome's issues on one line within ``limit`` characters, fatal and error
    ones first (each kept to ISSUE_TEXT_LIMIT), counting those left out; None when it tells
    nothing."""
    issues = outcome.get("issue")
    issues = [i for i in issues if isinstance(i, dict)] if isinstance(issues, list) else []
    ranked = sorted(
        issues,
        key=lambda i: (
            SEVERITY_ORDER.index(i.get("severity"))
            if i.get("severity") in SEVERITY_ORDER
            else len(SEVERITY_ORDER)
        ),
    )
    texts = [text for text in map(_issue_text, ranked) if text]
    if not texts:
        return None
    line = "; ".join(texts)
    if len(line) <= limit:
        return line
    room = limit - len(f"; {len(texts)} more issues not shown")
    kept = [texts[0]]
    for text in texts[1:]:
        if len("; ".join([*kept, text])) > room:
            break
        kept.append(text)
    left = len(texts) - len(kept)
    more = f"; {left} more issue{'s' if left > 1 else ''} not shown" if left else ""
    return _one_line("; ".join(kept), max(room, 1)) + more


def outcome_text(response: HttpAnswer, limit: int = OUTCOME_TEXT_LIMIT) -> str:
    """What went wrong: the server's OperationOutcome summarised (outcome_summary) when it
    sent one, else the start of the body."""
    text = response.text
    # A server's answer is not always what FHIR says it should be: whatever its shape, the
    # delivery fails with the words it can show.
    with contextlib.suppress(ValueError, TypeError, AttributeError, RecursionError):
        body = json.loads(text)
        if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
            summary = outcome_summary(body, limit)
            if summary:
                return summary
    return _one_line(text[: 4 * limit], limit)
