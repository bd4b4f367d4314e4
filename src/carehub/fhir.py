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
        return http_url(value, "base_url").rstrip("/")


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


def identifier_system(authority: str | None, systems: Mapping[str, str]) -> str:
    """The Identifier.system for a v2 assigning authority (``RGH``), which is no URI: the
    site's mapping, else ``urn:carehub:id:<authority>`` (``local`` when none was sent)."""
    name = (authority or "").strip() or "local"
    return systems.get(name) or f"urn:carehub:id:{quote(name, safe='')}"


def practitioner_identifier(
    person: Practitioner, systems: Mapping[str, str]
) -> dict[str, str] | None:
    """A clinician's id as an Identifier: the NPI system when the sender says it is one (id
    type NPI, or authority NPI or CMS), else the system of its assigning authority."""
    if not person.id:
        return None
    authority = (person.id_authority or "").upper()
    is_npi = (person.id_type or "").upper() == "NPI" or authority in ("NPI", "CMS")
    system = NPI if is_npi else identifier_system(person.id_authority, systems)
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


def outcome_text(response: HttpAnswer, limit: int = 200) -> str:
    """What went wrong, from an OperationOutcome's diagnostics when the server sent one, else
    the start of the body."""
    text = response.text[:4096]
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        body = json.loads(text)
        if body.get("resourceType") == "OperationOutcome":
            issues = [
                i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code")
                for i in body.get("issue") or []
            ]
            text = "; ".join(str(i) for i in issues if i) or text
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
