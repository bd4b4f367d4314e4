"""Referrals to community organizations as FHIR, the Gravity SDOH Clinical Care way.

The Gravity Project's SDOH Clinical Care IG (``hl7.fhir.us.sdoh-clinicalcare``) models a referral
to a community-based organization (CBO) as a **ServiceRequest** (what is asked for, for whom, why)
plus a **Task** with code ``fulfill`` whose ``focus`` is that ServiceRequest, ``for`` the patient
and ``owner`` the CBO. The CBO moves ``Task.status`` (accepted, rejected, in-progress, on-hold,
failed, completed) and the referrer learns of it by polling the Task or by a subscription. This
module builds both resources from a REF^I12 care event and ships them:

- :func:`build_gravity_referral` -- the ServiceRequest and Task as FHIR JSON, validated;
- :func:`build_referral_bundle` -- a ``transaction`` Bundle that creates them (and the patient,
  by conditional create) in one request, safe to resend;
- :func:`build_referral_update` -- a ``transaction`` Bundle of conditional patches that tells
  the organisation of a modify (REF^I13) or a cancel (REF^I14);
- :class:`FhirReferralChannel` (``fhir-referral``) -- POSTs the Bundle the referral's transition
  calls for to a FHIR server, keeps the created Task id, and polls ``GET /Task/<id>`` from
  ``tick()`` to advance the referral's state through :meth:`ReferralTracker.advance`
  (``source="fhir-task-poll"``).

**FHIR version.** The IG is FHIR R4 (4.0.1); the resources are written as R4 JSON and checked
with fhir.resources' R4B models (see :mod:`carehub.fhir`, which also holds what this module
shares with the ADT notifications).

**Minimum necessary.** The CBO gets what it needs to contact and serve the patient and nothing
else: the patient's identifier, name, birth date, sex, phone and address; the social-need
category and requested service; as ``reasonCode``, only the SDOH Z codes (ICD-10-CM Z55-Z65) of
the need this referral is for -- no other diagnoses, no referral notes (NTEs may hold clinical
detail); the referring clinician by NPI and name. "The need this referral is for" is what the
chosen service serves (its ``needs`` in the community-resources output, each need listing the
codes it was found from); without that step, the Gravity category of the referral's reason
code or first SDOH Z code. A patient's Z codes also record abuse, family conflict,
incarceration or legal trouble (Z62, Z63, Z65): a food bank has no use for them, and a
disclosure of them cannot be taken back. Consent is stated as the IG suggests:
``supportingInfo`` -> a Consent resource when the site names one (``consent_reference``), else a
``note`` (:func:`consent_statement`, which the email to the organisation uses too).

**Recipient.** ServiceRequest.performer and Task.owner are the organisation the referral names
(PRD role RT), else the top-ranked community match:
:func:`carehub.resources.matching.chosen_match`, the same rule the notify-referral email
follows, so both channels always name one organisation. A new referral with no recipient at
all (nothing named, nothing matched) is not sent: an unowned Task on a shared platform would
put the patient's details before whoever sees unassigned work, with nobody responsible.

**Patient reference.** A CBO's server has usually never seen the patient, so a bare conditional
reference (``Patient?identifier=...``) would fail there. The Bundle instead carries the patient
as a *conditional create* (``ifNoneExist: identifier=<system>|<value>``): the server links to its
own Patient with that identifier, or creates it. ServiceRequest.subject and Task.for point at it
(``urn:uuid:`` inside the Bundle) and also carry the identifier, so the reference still means
something when the resources are read on their own.

**One referral, one ServiceRequest and Task.** Both carry the referral's own identifier, the
placer referral number (RF1-6) in the system of its assigning authority, i.e. carehub's
``referral_key``, and are created with ``ifNoneExist`` on it. Whatever the MSH-10, a routing
run again or a lost answer, the server links to what it holds for that referral instead of
making a second one. The channel also sends nothing for an update the referral-state step found
changed nothing (an I12 resent with a new MSH-10, a second cancel).

**Modify and cancel.** Later messages reach the organisation through the same identifier, as
*conditional patches* (``PATCH ServiceRequest?identifier=<system>|<value>``, JSON Patch in a
Binary, both resources in one transaction). Not a conditional update (``PUT``): a PUT replaces
the whole resource, and the Task is shared, its status, ``output`` and ``businessStatus`` being
the organisation's to set (SDOHCC Task for Referral Management: the requester sets requested,
the responder accepted ... completed, either party cancelled), so a PUT from carehub would undo
what the organisation recorded. Nor a PUT to the ids the server returned: the task file forgets
a Task once its referral closes and is not kept with ``poll: false``, and a patch by identifier
needs no stored id. A modify patches what the referral message carries and the referrer owns:
``priority`` (ServiceRequest and Task), the SDOH ``reasonCode`` and ``occurrencePeriod``; a cancel
sets ServiceRequest.status ``revoked`` and Task.status ``cancelled``. A modify's ``reasonCode``
holds the Z codes of the needs served by the organisation the referral is with (read from the
referral as it stands), not those of whichever service ranks first for the modify's own needs:
a modify that names nobody does not move the referral, and what one organisation was told
must not grow into what another was chosen for. One that moves the referral patches the owner
and performer, and the Task's status back to ``requested`` only while the Task is still the
previous owner's: a reprocess, once the new owner has answered, leaves its answer alone.
Conditional patch is FHIR R4 (http.html#patch); a match on no resource is answered 404, taken
as "the referral has not reached the server yet" and retried. A modify or cancel of a referral
the channel never sent to this server (one kept at the referral desk, whose I13 or I14 left out
its clinical RF1-3) is skipped, saying so: retried, it would only end as a dead letter. Never
sent means no Task of it in the task file and no create of it to this base URL among the
deliveries of the messages that made it; a create still waiting or retrying counts as sent, so
the change waits behind it, and so does a referral whose making message retention has deleted
(nothing tells then). A cancel reads the Task first:
one the organisation has closed since the last poll (completed, rejected) is not overwritten,
and its status is recorded as a poll would; an open one is patched by its id with ``ifMatch``
on the version read, so a change the organisation makes in between is answered 412 and the
cancel is read and tried again.

**Task id <-> referral mapping.** The referral tables belong to the referral-state step, the
channel may not add tables, and :class:`ReferralTracker` has no call that stores extra data on a
referral (its snapshot is rebuilt from each REF message). So the mapping lives in the channel's
own JSON file, ``<data_dir>/fhir-referral/<hash of base_url>.json``: Task id -> referral key,
Task reference and the last Task.status seen, with the Task's owner then (the same status from
another owner is another organisation's answer). Writes are atomic (temp file + rename) and
serialised by a lock; a Task leaves the file once its referral is closed: by the poll that
closes it, by the cancel that reaches the server, or, for a referral the organisation closed
through another way in (an RRI, a status call), at the next poll, without reading it. carehub
does not write that answer onto the Task: past ``requested``, Task.status is the
organisation's (carehub sets only ``requested`` and ``cancelled``), and a completion written in
its name could overwrite what it records there. Two forwards to one server share its file,
and it is polled once a cycle, whichever of them ticks first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from carehub.builtins.http_channel import (
    AnswerTooLarge,
    HttpAnswer,
    HttpChannel,
    is_retryable,
    read_answer,
    retry_after,
)
from carehub.components import (
    ComponentContext,
    ComponentOptions,
    DeliveryError,
    NothingToSend,
    Outgoing,
    Work,
)
from carehub.config import without_password
from carehub.events import (
    CareEvent,
    Diagnosis,
    Organization,
    Patient,
    Practitioner,
    Referral,
    date_as_sent,
    facility_code,
)
from carehub.fhir import (
    FHIR_CONTENT_TYPE,
    GENDER,
    ICD10CM,
    SNOMED,
    V2_0203,
    FhirServerOptions,
    fhir_address,
    fhir_datetime,
    fhir_human_name,
    fhir_identifier,
    identifier_system,
    outcome_text,
    person_name,
    practitioner_identifier,
    stable_urn,
    validate_resource,
)
from carehub.referrals.state import (
    CLOSED_STATUSES,
    SENT_AS_NEW_ACTIONS,
    STATUSES,
    ReferralMemory,
    ReferralRecord,
    ReferralStateEnricher,
    ReferralTracker,
    ReferralTransition,
    json_object,
    party_organization,
    placed_referral_key,
)
from carehub.resources.matching import chosen_match, referred_to_name, same_organization
from carehub.store.schema import (
    DeliveryStatus,
    MessageStatus,
    deliveries,
    messages,
    referral_events,
    referrals,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "FHIR_CONTENT_TYPE",
    "GRAVITY_CATEGORIES",
    "SDOHCC_CODES",
    "ConsentStatement",
    "FhirReferralChannel",
    "GravityOptions",
    "ReferralResources",
    "ReferralUpdate",
    "TaskMap",
    "build_gravity_referral",
    "build_referral_bundle",
    "build_referral_resources",
    "build_referral_update",
    "consent_statement",
    "gravity_category_for_code",
    "referral_operation",
    "referral_search",
    "sdoh_z_code",
    "task_id_from_location",
    "validate_resource",
]

log = logging.getLogger(__name__)

SDOHCC_CODES = "http://hl7.org/fhir/us/sdoh-clinicalcare/CodeSystem/SDOHCC-CodeSystemTemporaryCodes"
TASK_CODES = "http://hl7.org/fhir/CodeSystem/task-code"

#: The SDOH categories of the IG's temporary code system (code -> display), the ones the
#: SDOHCC ServiceRequest ``category[SDOHCC]`` slice takes.
GRAVITY_CATEGORIES: dict[str, str] = {
    "sdoh-category-unspecified": "SDOH Category Unspecified",
    "food-insecurity": "Food Insecurity",
    "housing-instability": "Housing Instability",
    "homelessness": "Homelessness",
    "inadequate-housing": "Inadequate Housing",
    "transportation-insecurity": "Transportation Insecurity",
    "financial-insecurity": "Financial Insecurity",
    "material-hardship": "Material Hardship",
    "educational-attainment": "Educational Attainment",
    "employment-status": "Employment Status",
    "veteran-status": "Veteran Status",
    "stress": "Stress",
    "social-connection": "Social Connection",
    "intimate-partner-violence": "Intimate Partner Violence",
    "elder-abuse": "Elder Abuse",
    "personal-health-literacy": "Personal Health Literacy",
    "health-insurance-coverage-status": "Health Insurance Coverage Status",
    "medical-cost-burden": "Medical Cost Burden",
    "digital-literacy": "Digital Literacy",
    "digital-access": "Digital Access",
    "utility-insecurity": "Utility Insecurity",
    "language-access": "Language Status",
    "incarceration-status": "Incarceration Status",
}
UNSPECIFIED = "sdoh-category-unspecified"

#: ICD-10-CM prefixes (no dot) -> Gravity category, longest prefix first. Used only when the
#: community-resources step found no needs (its site crosswalk, with a ``gravity`` per need, is
#: the better source). A starting table from the ICD-10-CM titles; sites should check it.
_Z_CATEGORIES: tuple[tuple[str, str], ...] = tuple(
    sorted(
        {
            "Z594": "food-insecurity",
            "Z590": "homelessness",
            "Z591": "inadequate-housing",
            "Z5981": "housing-instability",
            "Z5982": "transportation-insecurity",
            "Z5986": "financial-insecurity",
            "Z5987": "material-hardship",
            "Z595": "financial-insecurity",
            "Z596": "financial-insecurity",
            "Z55": "educational-attainment",
            "Z556": "personal-health-literacy",
            "Z56": "employment-status",
            "Z602": "social-connection",
            "Z604": "social-connection",
            "Z651": "incarceration-status",
            "Z652": "incarceration-status",
        }.items(),
        key=lambda item: -len(item[0]),
    )
)

_PRIORITY = {"S": "stat", "A": "asap", "R": "routine"}  # RF1-2 (table 0280)
_ICD10_SYSTEMS = frozenset({"", "I10", "I10C", "ICD10", "ICD-10", "ICD10CM", "ICD-10-CM"})
_SDOH_Z = re.compile(r"^Z(5[5-9]|6[0-5])[0-9A-Z]*$")


# -- options ------------------------------------------------------------------------------------


class Coding(BaseModel):
    """One FHIR Coding, for configured ServiceRequest codes."""

    model_config = ConfigDict(extra="forbid")

    system: str = Field(description="code system URI, e.g. http://snomed.info/sct")
    code: str = Field(description="the code in that system")
    display: str | None = Field(
        None, description="display text, also used as ServiceRequest.code.text"
    )


def _default_service_codes() -> dict[str, Coding]:
    # The IG's own example (SDOHCC ServiceRequest, category food-insecurity).
    return {
        "food-insecurity": Coding(
            system=SNOMED,
            code="467771000124109",
            display="Assistance with application for food pantry program",
        )
    }


class GravityOptions(ComponentOptions):
    """How the referral resources are written: identifier systems, consent, service codes.

    Identifier systems must be URIs; v2 assigning authorities (``RGH``) are not, so
    ``identifier_systems`` maps them (``{"RGH": "urn:oid:2.16.840.1.113883.3.1"}``) and an
    unmapped authority becomes ``urn:carehub:id:<authority>``. Two names are carehub's own:
    ``hsds-organization`` (the directory's organization ids, for the performer) and ``local``
    (ids that came without an authority). The referral's identifier system is the one of its
    RF1-6 authority: change a mapping and referrals sent before are no longer found by it."""

    identifier_systems: dict[str, str] = Field(
        default_factory=dict,
        description="v2 assigning authority (e.g. RGH) -> identifier system URI; unmapped "
        "ones become urn:carehub:id:{authority}",
    )
    service_codes: dict[str, Coding] = Field(
        default_factory=_default_service_codes,
        description="Gravity category -> the Coding for ServiceRequest.code; without one the "
        "code is text only",
    )
    consent_reference: str | None = Field(
        None,
        description="a Consent the server already holds (Consent/123), sent as "
        "ServiceRequest.supportingInfo",
    )
    consent_note: str | None = Field(
        None,
        description="without consent_reference, this text goes in ServiceRequest.note "
        "(unset: a note that consent was not stated)",
    )

    @field_validator("service_codes")
    @classmethod
    def _known_categories(cls, value: dict[str, Coding]) -> dict[str, Coding]:
        unknown = sorted(set(value) - set(GRAVITY_CATEGORIES))
        if unknown:
            raise ValueError(f"unknown Gravity categories {unknown}")
        return value


# -- validation ---------------------------------------------------------------------------------


# -- consent ------------------------------------------------------------------------------------

CONSENT_NOT_STATED = (
    "Consent to share this referral with the receiving organization was not stated in the "
    "referral message; confirm it with the referring provider."
)


@dataclass(frozen=True, slots=True)
class ConsentStatement:
    """What is known of the patient's consent to this referral, for every channel."""

    stated: bool
    text: str


def consent_statement(reference: str | None, note: str | None) -> ConsentStatement:
    """The consent line from what the site configured (``consent_reference``, else
    ``consent_note``). A REF message itself carries no consent, so without either nothing is
    known and the text says so: claiming consent nobody recorded would mislead the
    organisation into acting on it."""
    if reference:
        return ConsentStatement(True, f"recorded by the referrer ({reference})")
    if note and note.strip():
        return ConsentStatement(True, note.strip())
    return ConsentStatement(False, CONSENT_NOT_STATED)


# -- small builders -----------------------------------------------------------------------------


def sdoh_z_code(diagnosis: Diagnosis) -> str | None:
    """The ICD-10-CM code with its dot (``Z59.41``) when this is an SDOH Z code (Z55-Z65), else
    None. Only these leave carehub with a referral: a CBO needs the social need, not the
    patient's other diagnoses."""
    system = (diagnosis.system or "").strip().upper()
    code = (diagnosis.code or "").strip().upper().replace(".", "")
    if system not in _ICD10_SYSTEMS or not _SDOH_Z.match(code):
        return None
    return code[:3] + ("." + code[3:] if len(code) > 3 else "")


def gravity_category_for_code(code: str) -> str | None:
    """The Gravity category of an SDOH Z code (longest known prefix), else None."""
    bare = code.strip().upper().replace(".", "")
    return next((cat for prefix, cat in _Z_CATEGORIES if bare.startswith(prefix)), None)


def _category(code: str) -> dict[str, Any]:
    return {
        "coding": [
            {"system": SDOHCC_CODES, "code": code, "display": GRAVITY_CATEGORIES.get(code, code)}
        ]
    }


def _patient_resource(patient: Patient, system: str) -> dict[str, Any]:
    """The minimal Patient a CBO needs to find and contact the person."""
    primary = patient.primary
    assert primary is not None
    identifier = fhir_identifier(system, primary.value, primary.type_code)
    resource: dict[str, Any] = {"resourceType": "Patient", "identifier": [identifier]}
    name = fhir_human_name(patient.name) if patient.name is not None else None
    if name:
        resource["name"] = [name]
    if patient.phone:
        resource["telecom"] = [{"system": "phone", "value": patient.phone}]
    gender = GENDER.get((patient.sex or "").strip().upper())
    if gender:
        resource["gender"] = gender
    if patient.birth_date is not None:
        resource["birthDate"] = date_as_sent(patient.birth_date)
    address = fhir_address(patient.address)
    if address:
        resource["address"] = [address]
    return resource


def _practitioner_ref(person: Practitioner, options: GravityOptions) -> dict[str, Any]:
    """A logical reference (identifier + name): the CBO's server has no record of the
    referring clinician, and the NPI is what it can look them up by."""
    ref: dict[str, Any] = {"type": "Practitioner"}
    identifier = practitioner_identifier(person, options.identifier_systems)
    if identifier:
        ref["identifier"] = identifier
    display = person_name(person.given, person.family, person.prefix)
    if display:
        ref["display"] = display
    return ref


def _organization_ref(
    name: str | None, ident: str | None, system: str | None
) -> dict[str, Any] | None:
    if not name and not ident:
        return None
    ref: dict[str, Any] = {"type": "Organization"}
    if ident and system:
        ref["identifier"] = {"system": system, "value": ident}
    if name:
        ref["display"] = name
    return ref


def _as_dict(value: Any) -> dict[str, Any]:
    """A need or match as a dict: the enricher records JSON, but accept objects too."""
    if isinstance(value, dict):
        return value
    for method in ("to_json", "model_dump", "as_output"):
        dump = getattr(value, method, None)
        if callable(dump):
            result = dump()
            if isinstance(result, dict):
                return result
    return {}


def _found(work: Work) -> dict[str, Any]:
    """The community-resources step's output with its needs and matches as dicts ({} without
    that step), the directory's entry of a named organisation (``named``) kept."""
    found = work.data.get("community_resources")
    if not isinstance(found, dict):
        return {}
    out = dict(found)
    out["needs"] = [n for n in map(_as_dict, found.get("needs") or []) if n]
    out["matches"] = [m for m in map(_as_dict, found.get("matches") or []) if m]
    named = _as_dict(found.get("named")) if found.get("named") is not None else {}
    out["named"] = named or None
    return out


def _ranked(matches: Any) -> list[dict[str, Any]]:
    ranked = [m for m in matches or [] if isinstance(m, dict)]
    return sorted(ranked, key=lambda m: m["rank"] if isinstance(m.get("rank"), int) else 1_000_000)


def referral_record(context: ComponentContext, key: str | None) -> ReferralRecord | None:
    """The referral as it stands now: in the store, or in a dry run in the referral-state
    step's memory (None without either)."""
    if not key:
        return None
    if context.store is not None:
        return ReferralTracker(context.store.engine).referral(key)
    memory = context.shared.get(ReferralStateEnricher.memory_key())
    if isinstance(memory, ReferralMemory):
        return ReferralTracker(memory=memory).referral(key)
    return None


def holder_of(record: ReferralRecord) -> str | None:
    """The organisation the referral is with: the one it names (PRD role RT, kept from the
    message that named it), else the top match it went out with; None when it names a person
    with no organisation, or nobody and matched nothing."""
    if record.referred_to:
        return party_organization(record.referred_to)
    top = _ranked(record.matches)
    return str(top[0].get("organization") or "") or None if top else None


def service_of(
    organization: str | None, work: Work, record: ReferralRecord | None = None
) -> dict[str, Any] | None:
    """The directory entry that stands for ``organization`` in this referral: its best-ranked
    match for this message (or the directory's entry of it when the message names it), else
    the match the referral went out with; None for an organisation outside the directory."""
    if not organization:
        return None
    found = _found(work)
    candidates = [
        *_ranked(found.get("matches")),
        *([found["named"]] if found.get("named") else []),
        *_ranked(record.matches if record is not None else None),
    ]
    return next(
        (
            m
            for m in candidates
            if same_organization(str(m.get("organization") or ""), organization)
        ),
        None,
    )


def _transition_of(work: Work) -> ReferralTransition | None:
    state = work.data.get("referral")
    if isinstance(state, dict):
        return ReferralTransition.from_output(state)
    return state if isinstance(state, ReferralTransition) else None


def chosen_service(work: Work, record: ReferralRecord | None = None) -> dict[str, Any] | None:
    """The directory entry of the organisation this message's referral is for. A new referral
    (or one released from being held) goes where :func:`carehub.resources.matching
    .chosen_match` says, the rule the email follows too. A modify is about the referral where
    it is: the organisation it is with now (``record``), not whichever ranks first for this
    message, since a modify that names nobody does not move it."""
    transition = _transition_of(work)
    if record is not None and transition is not None and transition.action == "modified":
        return service_of(holder_of(record), work, record)
    return chosen_match(work.event, _found(work) or None)


def _community(
    work: Work, record: ReferralRecord | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(needs, the chosen organisation's match) from the community-resources step, tolerating
    its absence (see chosen_service)."""
    return list(_found(work).get("needs") or []), chosen_service(work, record)


def _bare(code: str) -> str:
    return code.strip().upper().replace(".", "")


def _for_the_referral(
    needs: list[dict[str, Any]], chosen: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The needs this referral is for: those the chosen service serves; without a chosen
    service (a named organisation outside the directory), the first need found."""
    if chosen is not None:
        served = [n for n in needs if n.get("category") in (chosen.get("needs") or [])]
        if served:
            return served
    return needs[:1]


def needs_for(
    organization: str | None, work: Work, record: ReferralRecord | None = None
) -> list[dict[str, Any]]:
    """The needs of this message that ``organization`` may hear of: those its service in this
    referral serves (the same rule as the FHIR copy's reasonCode), so an email names no need
    the organisation was not chosen for."""
    return _for_the_referral(
        list(_found(work).get("needs") or []), service_of(organization, work, record)
    )


def _z_code_is_for(code: str, needs: list[dict[str, Any]], main: str) -> bool:
    """Whether an SDOH Z code belongs to a need the referral is for: one of the codes the
    need was found from (community-resources lists them), else, for needs recorded without
    their codes or with no needs at all, a code of the referral's Gravity category."""
    if not needs:
        return gravity_category_for_code(code) == main
    for need in needs:
        if "codes" in need:
            if _bare(code) in {_bare(str(c)) for c in need.get("codes") or []}:
                return True
        elif gravity_category_for_code(code) == need.get("gravity"):
            return True
    return False


def _referral_key_of(work: Work) -> str | None:
    """The referral-state step's key for this referral (``authority|id``), else one built the
    same way from the event's RF1-6/RF1-11."""
    state = work.data.get("referral")
    key = None
    if isinstance(state, ReferralTransition):
        key = state.referral_key
    elif isinstance(state, dict):
        key = state.get("referral_key")
    if key:
        return str(key)
    event = work.event
    if isinstance(event, CareEvent) and event.referral and event.referral.referral_id:
        return placed_referral_key(event.referral.referral_id, event)
    return None


# -- the resources ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReferralResources:
    """The resources of one referral and their ``urn:uuid`` full URLs in the Bundle."""

    referral_key: str
    referral_search: str  # identifier=<system>|<value> of the referral's own identifier
    patient: dict[str, Any]
    patient_url: str
    patient_search: str  # the conditional-create query: identifier=<system>|<value>
    service_request: dict[str, Any]
    service_request_url: str
    task: dict[str, Any]
    task_url: str
    #: What the referral message said that the resources leave out, and why.
    left_out: tuple[str, ...] = ()


#: Why a new referral is held back instead of sent to the FHIR server.
NO_RECIPIENT = (
    "no community organisation chosen: the referral names none and no directory service "
    "matched its needs; held for the referral coordinator to choose one"
)

_NEEDS_REFERRAL_EVENT = (
    "fhir-referral needs a referral care event: put `translate: v2-to-event` (and "
    "`enrich: referral-state`) before it, and route only REF messages to it"
)


def build_referral_resources(
    work: Work,
    idempotency_key: str | None = None,
    options: GravityOptions | None = None,
    *,
    record: ReferralRecord | None = None,
) -> ReferralResources:
    """Patient, ServiceRequest and Task for the referral in ``work`` (a REF care event, plus
    the referral-state and community-resources steps' results when the route ran them), each
    validated; ``record``, the referral as it stands, tells a modify whom the referral is with
    (see chosen_service). Raises ValueError when the event cannot make a referral (no event,
    no referral id, no patient identifier)."""
    options = options or GravityOptions()
    event = work.event
    if not isinstance(event, CareEvent) or event.referral is None:
        raise ValueError(_NEEDS_REFERRAL_EVENT)
    key = _referral_key_of(work)
    if key is None:
        raise ValueError("the referral has no id (RF1-6 or RF1-11)")
    patient = event.patient
    if patient is None or patient.primary is None or not patient.primary.value:
        raise ValueError("the referral has no patient identifier (PID-3)")
    seed = idempotency_key or f"{key}:{work.message.id}"
    ref = event.referral

    # Patient: conditional create, referenced by urn:uuid and by identifier.
    patient_system = identifier_system(
        patient.primary.authority or facility_code(event.sending_facility),
        options.identifier_systems,
    )
    patient_resource = _patient_resource(patient, patient_system)
    patient_url = stable_urn(seed, "Patient")
    patient_ref: dict[str, Any] = {
        "reference": patient_url,
        "type": "Patient",
        "identifier": {"system": patient_system, "value": patient.primary.value},
    }
    patient_name = (
        person_name(patient.name.given, patient.name.family) if patient.name is not None else None
    )
    if patient_name:
        patient_ref["display"] = patient_name

    # The need: what the chosen service serves (community-resources), else the Z codes. Only
    # the Z codes of that need go out (see "Minimum necessary" in the module docstring).
    found_needs, chosen = _community(work, record)
    needs = _for_the_referral(found_needs, chosen)
    sdoh_codes: list[tuple[str, str | None]] = []
    for diagnosis in event.diagnoses:
        code = sdoh_z_code(diagnosis)
        if code and code not in [c for c, _ in sdoh_codes]:
            sdoh_codes.append((code, diagnosis.display))
    if ref.reason_code:
        code = sdoh_z_code(Diagnosis(code=ref.reason_code, system=""))
        if code and code not in [c for c, _ in sdoh_codes]:
            # The reason code first: it is what the referrer said the referral is for.
            sdoh_codes.insert(0, (code, ref.reason))
    categories: list[str] = []
    labels: dict[str, str] = {}
    for need in needs:
        category = need.get("gravity")
        category = category if category in GRAVITY_CATEGORIES else UNSPECIFIED
        if category not in categories:
            categories.append(category)
            labels[category] = str(need.get("label") or GRAVITY_CATEGORIES[category])
    if not categories:
        category = next(
            (found for c, _ in sdoh_codes if (found := gravity_category_for_code(c))), None
        )
        if category:
            categories.append(category)
            labels[category] = GRAVITY_CATEGORIES[category]
    if not categories:
        categories = [UNSPECIFIED]
        labels[UNSPECIFIED] = "Social needs"
    main = categories[0]
    z_codes = [(c, d) for c, d in sdoh_codes if _z_code_is_for(c, needs, main)]
    coding = options.service_codes.get(main)
    code: dict[str, Any] = {"text": f"{labels[main]} assistance"}
    if coding is not None:
        code = {
            "coding": [coding.model_dump(exclude_none=True)],
            "text": coding.display or code["text"],
        }

    # The performer: the organisation the referral names, else the top community match
    # (chosen_match); the email to the organisation names the same one.
    performer = None
    if chosen is not None:
        org_name = chosen.get("organization") or chosen.get("service")
        org_id = chosen.get("organization_id")
        performer = _organization_ref(
            str(org_name) if org_name else None,
            str(org_id) if org_id else None,
            identifier_system("hsds-organization", options.identifier_systems),
        )
    if performer is None and isinstance(ref.referred_to, Organization):
        performer = _organization_ref(
            ref.referred_to.name,
            ref.referred_to.id,
            identifier_system(None, options.identifier_systems),
        )
    elif performer is None and isinstance(ref.referred_to, Practitioner):
        performer = _practitioner_ref(ref.referred_to, options)

    requester = None
    if ref.referring is not None:
        requester = _practitioner_ref(ref.referring, options)
    org = ref.referring_organization
    task_requester = requester
    if org is not None and (org.name or org.id):
        # The IG's Task.requester is a PractitionerRole or an Organization.
        task_requester = _organization_ref(
            org.name, org.id, identifier_system(None, options.identifier_systems)
        )
    if task_requester is None and event.sending_facility:
        task_requester = {"type": "Organization", "display": event.sending_facility}
    if requester is None:
        requester = task_requester

    authored = (
        fhir_datetime(event.occurred_at)
        or fhir_datetime(work.message.received_at)
        or date.today().isoformat()
    )
    priority = _PRIORITY.get((ref.priority or "").strip().upper())
    placer = _placer_identifier(key, options)
    service_request: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "identifier": [placer],
        "status": "active",
        "intent": "order",
        "category": [
            {
                "coding": [
                    {"system": SNOMED, "code": "410606002", "display": "Social service procedure"}
                ]
            },
            *(_category(c) for c in categories),
        ],
        "code": code,
        "subject": patient_ref,
    }
    if priority:
        service_request["priority"] = priority
    period, period_left_out = _occurrence_period(ref)
    if period:
        service_request["occurrencePeriod"] = period
    if authored:
        service_request["authoredOn"] = authored
    if requester:
        service_request["requester"] = requester
    if performer:
        service_request["performer"] = [performer]
    if z_codes:
        service_request["reasonCode"] = [
            {
                "coding": [{"system": ICD10CM, "code": c, **({"display": d} if d else {})}],
                **({"text": d} if d else {}),
            }
            for c, d in z_codes
        ]
    if options.consent_reference:
        service_request["supportingInfo"] = [
            {"reference": options.consent_reference, "type": "Consent"}
        ]
    else:
        service_request["note"] = [{"text": consent_statement(None, options.consent_note).text}]

    service_request_url = stable_urn(seed, "ServiceRequest")
    task: dict[str, Any] = {
        "resourceType": "Task",
        "identifier": [placer],
        "status": "requested",
        "intent": "order",
        "code": {
            "coding": [
                {"system": TASK_CODES, "code": "fulfill", "display": "Fulfill the focal request"}
            ]
        },
        "focus": {"reference": service_request_url, "type": "ServiceRequest"},
        "for": patient_ref,
        "authoredOn": authored,
    }
    if priority:
        task["priority"] = priority
    if task_requester:
        task["requester"] = task_requester
    if performer:
        task["owner"] = performer

    for resource in (patient_resource, service_request, task):
        validate_resource(resource)
    return ReferralResources(
        referral_key=key,
        referral_search=referral_search(key, options),
        patient=patient_resource,
        patient_url=patient_url,
        patient_search=_search("identifier", patient_system, patient.primary.value),
        service_request=service_request,
        service_request_url=service_request_url,
        task=task,
        task_url=stable_urn(seed, "Task"),
        left_out=(period_left_out,) if period_left_out else (),
    )


def _occurrence_period(ref: Referral) -> tuple[dict[str, str] | None, str | None]:
    """ServiceRequest.occurrencePeriod from RF1-7 (effective) and RF1-8 (expiration), each as
    precise as sent, and why it is left out when it is.

    An expiration before the effective date breaks FHIR's rule per-1 (a period's start is not
    after its end, compared at the precision both have): a validating server refuses the whole
    referral for it, and nobody can tell which of the two dates is wrong. So the referral is
    still sent, without dates rather than with one the message contradicts, and the delivery
    says why (its ``left_out``), for the coordinator to have the referrer correct them."""
    start = date_as_sent(ref.effective_date) if ref.effective_date else None
    end = date_as_sent(ref.expiration_date) if ref.expiration_date else None
    if start and end:
        common = min(len(start), len(end))  # ISO dates of one length sort as text
        if start[:common] > end[:common]:
            return None, (
                f"occurrencePeriod left out: the effective date (RF1-7, {start}) is after the "
                f"expiration date (RF1-8, {end})"
            )
    period = {name: value for name, value in (("start", start), ("end", end)) if value}
    return period or None, None


def _split_key(key: str) -> tuple[str, str]:
    """(authority, id) of a ``referral_key`` (``authority|id``, see
    :func:`carehub.referrals.state.referral_key`): the authority ends at the first bar, as the
    referral state reads its keys too. The id may hold a bar itself: RF1-6 ``R\\F\\7`` is
    the id ``R|7``."""
    authority, _, value = key.partition("|")
    return authority, value


def _placer_identifier(key: str, options: GravityOptions) -> dict[str, Any]:
    """The referrer's own referral id (RF1-6 with its authority, as ``referral_key`` has it) as
    the placer identifier: the CBO can quote it back (in an RRI or a phone call), and carehub
    finds the ServiceRequest and Task by it for a resend, a modify or a cancel."""
    authority, value = _split_key(key)
    return {
        "type": {"coding": [{"system": V2_0203, "code": "PLAC", "display": "Placer Identifier"}]},
        "system": identifier_system(authority, options.identifier_systems),
        "value": value,
    }


def referral_search(key: str, options: GravityOptions | None = None) -> str:
    """``identifier=<system>|<value>`` for the referral ``key``: how its ServiceRequest and Task
    are found at the server (conditional create and conditional patch)."""
    authority, value = _split_key(key)
    return _search(
        "identifier",
        identifier_system(authority, (options or GravityOptions()).identifier_systems),
        value,
    )


def _search(param: str, system: str, value: str) -> str:
    """``identifier=system|value``: each part escaped as FHIR search reads a token (a ``|``,
    ``,``, ``$`` or ``\\`` of its own after a backslash, so an id ``R|7`` is not read as a
    system ``R`` and a code ``7``), then for a query string."""
    system, value = _token_escaped(system), _token_escaped(value)
    return f"{param}={quote(system, safe=':/')}|{quote(value, safe='')}"


def _token_escaped(text: str) -> str:
    """FHIR search escaping (search.html#escaping) of one part of a token parameter."""
    return re.sub(r"([\\|,$])", r"\\\1", text)


def build_gravity_referral(
    work: Work, options: GravityOptions | None = None, *, idempotency_key: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SDOHCC ServiceRequest and Task for the referral in ``work``, validated.

    References between them (Task.focus, subject/for) are ``urn:uuid:`` full URLs that
    :func:`build_referral_bundle` gives the entries; subject/for also carry the patient's
    identifier. See the module docstring for what is included and why."""
    built = build_referral_resources(work, idempotency_key, options)
    return built.service_request, built.task


def build_referral_bundle(
    work: Work, idempotency_key: str, options: GravityOptions | None = None
) -> tuple[dict[str, Any], ReferralResources]:
    """A FHIR ``transaction`` Bundle creating the Patient (conditionally, by identifier), the
    ServiceRequest and the Task, each with ``ifNoneExist``: the ServiceRequest and Task on the
    referral's identifier, so the referral exists once at the server whatever message or run
    sent it. Returns the validated Bundle and the resources in it."""
    options = options or GravityOptions()
    built = build_referral_resources(work, idempotency_key, options)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            _entry(built.patient_url, built.patient, built.patient_search),
            _entry(built.service_request_url, built.service_request, built.referral_search),
            _entry(built.task_url, built.task, built.referral_search),
        ],
    }
    validate_resource(bundle)
    return bundle, built


#: What a modify may change at the organisation: the fields a referral message carries that
#: the referrer owns. Category and code came from the community match at creation and are
#: left alone (an update route does not match again).
_MODIFIABLE = {
    "ServiceRequest": ("priority", "reasonCode", "occurrencePeriod"),
    "Task": ("priority",),
}
#: And when the modify names another receiving party (PRD role RT) than before: the referral
#: moves to it, back to requested (the organisation that had it is told by email, see
#: notices.py).
_RECIPIENT = {"ServiceRequest": ("performer",), "Task": ("owner",)}
_JSON_PATCH = "application/json-patch+json"


@dataclass(frozen=True, slots=True)
class ReferralUpdate:
    """A modify or cancel as a transaction Bundle of conditional patches; ``bundle`` is None
    when there is nothing to tell (a modify carrying none of the fields the organisation's
    copy holds)."""

    referral_key: str
    operation: str  # modify | cancel
    bundle: dict[str, Any] | None
    task_entry: int | None  # the Task's entry in the Bundle, for its id in the response
    left_out: tuple[str, ...] = ()  # as ReferralResources.left_out
    #: A modify that moves the referral to another organisation (Task owner and status).
    moves: bool = False


def build_referral_update(
    work: Work,
    operation: str,
    idempotency_key: str,
    options: GravityOptions | None = None,
    *,
    record: ReferralRecord | None = None,
) -> ReferralUpdate:
    """The ``transaction`` Bundle telling the organisation of a modify (the new priority,
    SDOH reasons and dates) or a cancel (ServiceRequest revoked, Task cancelled), as JSON
    Patches on the resources found by the referral's identifier; validated. ``record`` is
    the referral as it stands now: a modify's reasons are those of the organisation it is
    with, and a reprocessed modify that moved it does not move it back from where a later
    one took it. See the module docstring for why patches and not updates."""
    options = options or GravityOptions()
    patches: dict[str, list[dict[str, Any]]] = {}
    left_out: tuple[str, ...] = ()
    moved = False
    if operation == "cancel":
        key = _referral_key_of(work)
        if key is None:
            raise ValueError("the referral has no id (RF1-6 or RF1-11)")
        patches["ServiceRequest"] = [_set("status", "revoked")]
        patches["Task"] = [
            _set("status", "cancelled"),
            _set("statusReason", {"text": "Cancelled by the referring provider"}),
        ]
    elif operation == "modify":
        built = build_referral_resources(work, idempotency_key, options, record=record)
        key, left_out = built.referral_key, built.left_out
        moved = _names_another_recipient(work) and (
            record is None or same_organization(holder_of(record), referred_to_name(work.event))
        )
        for resource in (built.service_request, built.task):
            kind = resource["resourceType"]
            names = _MODIFIABLE[kind] + (_RECIPIENT[kind] if moved else ())
            ops = [_set(name, resource[name]) for name in names if name in resource]
            if moved and kind == "Task":
                # The new owner has not answered yet: the first one's answer is not its own.
                # Sent only while the Task is another's (see _guarded_move): once it is the
                # new owner's, its status is that owner's answer.
                ops.append(_set("status", "requested"))
            if ops:
                patches[kind] = ops
    else:
        raise ValueError(f"unknown referral update {operation!r}")
    if not patches:
        return ReferralUpdate(key, operation, None, None, left_out)
    moves = moved and "Task" in patches
    search = referral_search(key, options)
    entries = [
        _patch_entry(f"{kind}?{search}", ops, stable_urn(f"{key}:{idempotency_key}", kind))
        for kind, ops in patches.items()
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    validate_resource(bundle)
    task_entry = list(patches).index("Task") if "Task" in patches else None
    return ReferralUpdate(key, operation, bundle, task_entry, left_out, moves)


def _names_another_recipient(work: Work) -> bool:
    """The referral-state step found this modify names another receiving party than before."""
    state = work.data.get("referral")
    if isinstance(state, dict):
        return bool(state.get("referred_to_before"))
    return isinstance(state, ReferralTransition) and bool(state.referred_to_before)


def _set(name: str, value: Any) -> dict[str, Any]:
    """A JSON Patch ``add`` of a top-level element: sets it whether or not it was there
    (RFC 6902 4.1), which ``replace`` would refuse for an element the resource lacks."""
    return {"op": "add", "path": f"/{name}", "value": value}


def _patch_entry(url: str, ops: list[dict[str, Any]], full_url: str) -> dict[str, Any]:
    """A conditional PATCH in a transaction: FHIR carries a JSON Patch as a Binary."""
    data = json.dumps(ops, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return {
        "fullUrl": full_url,
        "resource": {
            "resourceType": "Binary",
            "contentType": _JSON_PATCH,
            "data": base64.b64encode(data).decode("ascii"),
        },
        "request": {"method": "PATCH", "url": url},
    }


#: Referral-state actions (and, without that step, message kinds) -> what the server hears.
_OPERATIONS = {
    "created": "create",
    "released": "create",
    "modified": "modify",
    "cancelled": "cancel",
}
_KIND_OPERATIONS = {
    "referral_new": "create",
    "referral_modify": "modify",
    "referral_cancel": "cancel",
}


def _names_only_a_person(event: Any) -> bool:
    """Whether a referral that does not say it is for social needs (RF1-3 SO, or an SDOH Z
    code as its reason or a diagnosis) is made to a person by name with no organisation: a
    specialist, who is not on a community organisations' platform. A social-services
    referral to a named community health worker still goes there."""
    referral = event.referral if isinstance(event, CareEvent) else None
    named = referral.referred_to if referral is not None else None
    if not isinstance(named, Practitioner) or named.organization:
        return False
    if (referral.type or "").strip().upper() == "SO":
        return False
    reason = (referral.reason_code or "").strip().upper().replace(".", "")
    if _SDOH_Z.match(reason):
        return False
    return not any(sdoh_z_code(d) for d in event.diagnoses)


def referral_operation(work: Work) -> tuple[str, str | None]:
    """What the organisation's server must hear of this message: ``create``, ``modify``,
    ``cancel`` or ``none`` (with why). Read from the referral-state step's transition, so a
    resend, a refused update, a second cancel or a new referral that an early answer or
    cancel closed sends nothing; without that step, from the message's kind."""
    state = work.data.get("referral")
    if isinstance(state, dict):
        state = ReferralTransition.from_output(state)
    if isinstance(state, ReferralTransition):
        operation = _OPERATIONS.get(state.action)
        if operation == "create" and not state.sent_as_new:
            return "none", (
                f"{state.action}: the referral is {state.status} already (an answer or cancel "
                "that came before it closed it), so it is not sent"
            )
        if operation == "create" and _names_only_a_person(work.event):
            return "none", (
                f"{state.action}: the referral names a person (PRD role RT) and no "
                "organisation: it is for the referral desk to send on, not a community "
                "organisation's platform"
            )
        if operation in ("modify", "cancel") and state.held:
            return "none", (
                f"{state.action}: the referral was never sent to an organisation (held: "
                "nobody named, nothing matched), so there is nothing there to change"
            )
        if operation is not None:
            return operation, None
        why = state.reason or state.note
        return "none", f"{state.action}{': ' + why if why else ''}"
    event = work.event
    if not isinstance(event, CareEvent) or event.referral is None:
        raise ValueError(_NEEDS_REFERRAL_EVENT)
    operation = _KIND_OPERATIONS.get(event.kind)
    if operation is None:
        return "none", f"{event.kind}: neither a new, a modified nor a cancelled referral"
    return operation, None


def _entry(full_url: str, resource: dict[str, Any], if_none_exist: str) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": if_none_exist,
        },
    }


_LOCATION = re.compile(r"(?:^|/)Task/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")


def task_id_from_location(location: str | None) -> str | None:
    """The Task id in a transaction-response Location (``Task/123/_history/1``, relative or
    absolute), else None."""
    if not location:
        return None
    match = _LOCATION.search(location.strip())
    return match.group(1) if match else None


# -- the Task id <-> referral mapping -----------------------------------------------------------

_FILE_LOCKS: dict[Path, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    with _FILE_LOCKS_GUARD:
        return _FILE_LOCKS.setdefault(path.resolve(), threading.Lock())


class TaskMap:
    """Open referrals sent to one FHIR server: Task id -> {referral_key, task, last_status,
    last_owner, sent_at, polled_at}, in a JSON file (see the module docstring for why a file).

    Every change re-reads the file under a lock (send() and tick() run on different threads,
    and two channels may share a server) and replaces it atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = _lock_for(path)

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("fhir-referral: cannot read %s (%s); starting empty", self.path, err)
            return {}
        tasks = data.get("tasks") if isinstance(data, dict) else None
        return tasks if isinstance(tasks, dict) else {}

    def _write(self, tasks: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        text = json.dumps({"version": 1, "tasks": tasks}, indent=1, sort_keys=True)
        try:
            with temp.open("w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, dict[str, Any]]]:
        with self._lock:
            tasks = self._read()
            before = json.dumps(tasks, sort_keys=True)
            yield tasks
            if json.dumps(tasks, sort_keys=True) != before:
                self._write(tasks)

    def all(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return self._read()

    def add(self, task_id: str, referral_key: str, task: str, sent_at: datetime) -> None:
        with self._editing() as tasks:
            entry = tasks.setdefault(task_id, {"last_status": "requested"})
            entry.update(referral_key=referral_key, task=task, sent_at=sent_at.isoformat())

    def update(self, task_id: str, **values: Any) -> None:
        with self._editing() as tasks:
            if task_id in tasks:
                tasks[task_id].update(values)

    def remove(self, task_id: str) -> None:
        with self._editing() as tasks:
            tasks.pop(task_id, None)

    def remove_referral(self, referral_key: str) -> None:
        """Forget every Task of a referral (one closed by carehub's own message)."""
        with self._editing() as tasks:
            for task_id in [t for t, e in tasks.items() if e.get("referral_key") == referral_key]:
                del tasks[task_id]


# -- the channel --------------------------------------------------------------------------------

#: Where ComponentContext.shared keeps when each task file was last polled (path -> time).
_LAST_POLLS = "fhir-referral:last-polls"
_POLLS_GUARD = threading.Lock()


class FhirReferralChannel(HttpChannel):
    """Sends each referral to a FHIR server as an SDOHCC ServiceRequest + Task (one
    transaction Bundle, ``application/fhir+json``), tells it of the referral's modifies and
    cancels, and follows the Task's status.

    ``render`` (routing time) builds and validates the Bundle the referral-state transition
    calls for (create, patch, or nothing for a resend); ``send`` POSTs it to ``base_url`` and
    answers ``HTTP <code> Task/<id>``, with the id taken from the transaction-response
    Location. Errors map like the webhook channel: 408, 425, 429, 5xx, timeouts and network
    errors are retryable; 3xx, other 4xx, 501 and 505 are not (the server refused this Bundle
    for good, e.g. 400 invalid or 412 ambiguous ``ifNoneExist``), except a 404 to a modify or
    cancel, whose referral may still be on its way to the server; one of a referral never sent
    to it is skipped instead (see the module docstring). What the Bundle leaves out
    of the referral message (dates that contradict each other) is named in the delivery's
    ``left_out`` and after its receipt.

    With ``poll`` on, ``tick()`` GETs ``/Task/<id>`` for every open referral at most every
    ``poll_minutes`` (the IG: poll at least daily, should not poll more often than every 15
    minutes) and hands a changed ``Task.status`` to the referral state machine with source
    ``fhir-task-poll``; a Task whose referral is closed is no longer polled."""

    name = "fhir-referral"
    description = (
        "Send referrals to a FHIR server as Gravity SDOHCC ServiceRequest + Task (transaction "
        "Bundle, one per referral), patch them on a modify or cancel, and poll Task.status "
        "back into the referral state"
    )

    class Options(GravityOptions, FhirServerOptions):
        base_url: str = Field(
            description="http(s) base URL of the FHIR server: the Bundle is POSTed here, Tasks "
            "are read from {base_url}/Task/{id}"
        )
        poll: bool = Field(
            True,
            description="keep each created Task and poll its status into the referral state "
            "(needs the store)",
        )
        poll_minutes: float = Field(
            15.0,
            ge=0,
            description="minutes between polls of the open Tasks (0: each time periodic work runs)",
        )

    options: Options

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        self._poll_client: httpx.Client | None = None
        self._tracker: ReferralTracker | None = None
        digest = hashlib.sha256(self.options.base_url.encode()).hexdigest()[:16]
        self.tasks = TaskMap(context.data_dir / "fhir-referral" / f"{digest}.json")

    # -- lifecycle ------------------------------------------------------------------------
    async def close(self) -> None:
        await super().close()
        poll_client, self._poll_client = self._poll_client, None
        if poll_client is not None:
            poll_client.close()

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": FHIR_CONTENT_TYPE, **(extra or {})}
        if self.options.auth_header:
            headers["Authorization"] = self.options.auth_header
        return headers

    # -- sending ---------------------------------------------------------------------------
    def render(self, work: Work, idempotency_key: str) -> Outgoing:
        """The Bundle this referral message calls for: a create for a new referral, patches
        for a modify or a cancel, and nothing (an empty payload ``send`` does not send) when
        the referral-state step found the message changed nothing."""
        operation, why = referral_operation(work)
        metadata = {"operation": operation, "destination": self.options.base_url}
        bundle: dict[str, Any] | None = None
        left_out: tuple[str, ...] = ()
        if operation == "create":
            bundle, built = build_referral_bundle(work, idempotency_key, self.options)
            left_out = built.left_out
            metadata.update(
                referral_key=built.referral_key,
                task_entry="2",
                task=built.task_url,
                service_request=built.service_request_url,
            )
            if "owner" not in built.task:
                # Nobody would be responsible for it: on a shared platform an unowned Task is
                # visible to whoever sees unassigned work. Held, like the email, until a
                # coordinator chooses an organisation (a new referral naming it).
                bundle, why = None, NO_RECIPIENT
        elif operation in ("modify", "cancel"):
            record = (
                referral_record(self.context, _referral_key_of(work))
                if operation == "modify"
                else None
            )
            update = build_referral_update(
                work, operation, idempotency_key, self.options, record=record
            )
            metadata["referral_key"] = update.referral_key
            bundle, left_out = update.bundle, update.left_out
            if update.task_entry is not None:
                metadata["task_entry"] = str(update.task_entry)
            if update.moves:
                metadata["moves"] = "1"
            why = None if bundle else "the modify changes nothing the organisation's copy holds"
        if left_out:
            metadata["left_out"] = "; ".join(left_out)
        if bundle is None:
            key = _referral_key_of(work)
            metadata.update(operation="none", not_sent=why or "nothing to send")
            if key:
                metadata["referral_key"] = key
            return Outgoing(b"", FHIR_CONTENT_TYPE, idempotency_key, metadata)
        payload = json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return Outgoing(payload, FHIR_CONTENT_TYPE, idempotency_key, metadata)

    async def send(self, outgoing: Outgoing) -> str:
        """The server's answer as the receipt, with what the resources left out of the
        referral message (``left_out``) after it, so the delivery's record says so too."""
        receipt = await self._deliver(outgoing)
        left_out = outgoing.metadata.get("left_out")
        return f"{receipt} ({left_out})" if left_out else receipt

    async def _deliver(self, outgoing: Outgoing) -> str:
        operation = outgoing.metadata.get("operation", "create")
        if operation == "none":
            raise NothingToSend(outgoing.metadata.get("not_sent", "nothing to send"))
        if operation in ("modify", "cancel"):
            never = await asyncio.to_thread(self._never_created_here, outgoing, operation)
            if never:
                raise NothingToSend(never)
        url = self.options.base_url
        headers = self._headers(
            {"Content-Type": outgoing.content_type, "Idempotency-Key": outgoing.idempotency_key}
        )
        payload = outgoing.payload
        if operation == "cancel":
            payload = await self._guarded_cancel(outgoing)
        elif outgoing.metadata.get("moves"):
            payload = await self._guarded_move(outgoing)
        response = await self._call("POST", url, payload, headers)
        status = response.status_code
        if not 200 <= status < 300:
            # The server's words (an OperationOutcome may quote the referral) go in `said`,
            # kept with the attempt and never logged; the log keeps the request and status.
            text = f"POST {without_password(url)}: HTTP {status}"
            wait = retry_after(response.headers)
            if wait is not None:
                text += f" (Retry-After: {wait:.0f} s)"
            retryable = is_retryable(status)
            if status == 412 and operation == "cancel" and payload is not outgoing.payload:
                text += " (the Task changed at the organisation since it was read; retried)"
                retryable = True
            if status == 404 and operation != "create":
                # The conditional patch matched nothing: the referral's creation, sent by
                # another route's forward, may not have reached the server yet.
                text += " (the referral is not at the server yet; retried)"
                retryable = True
            raise DeliveryError(
                text, retryable=retryable, said=outcome_text(response) or None, retry_after=wait
            )
        if operation != "create":
            return await self._updated(outgoing, response, operation)
        task_id = _task_id_from_response(response, int(outgoing.metadata.get("task_entry", "2")))
        key = outgoing.metadata.get("referral_key")
        if task_id is None:
            # The server took the Bundle, so resending would not help; say it is not tracked.
            # By the referral's row id: its key is the referral number, an identifier.
            record = await asyncio.to_thread(self.tracker.referral, key) if key else None
            log.warning(
                "fhir-referral: %s answered %d without a Task Location: referral %s not polled",
                without_password(url),
                status,
                f"#{record.id}" if record is not None else "(not tracked here)",
            )
            return f"HTTP {status} (no Task location: not polled)"
        if key and self.options.poll:
            await asyncio.to_thread(
                self.tasks.add, task_id, key, f"Task/{task_id}", datetime.now(UTC)
            )
        return f"HTTP {status} Task/{task_id}"

    def _never_created_here(self, outgoing: Outgoing, operation: str) -> str | None:
        """Why a modify or cancel has nothing to change at this server (its referral was
        never sent here), else None: a patch of it would be answered 404 at every retry.
        Without the store (nothing recorded) it is sent as before."""
        key = outgoing.metadata.get("referral_key")
        store = self.context.store
        if not key or store is None:
            return None
        if any(e.get("referral_key") == key for e in self.tasks.all().values()):
            return None
        if _created_at(store.engine, key, self.options.base_url, self.name) is not False:
            return None
        server = without_password(self.options.base_url)
        return (
            f"{operation}: the referral was never sent to {server} (it went to the referral "
            "desk only, or elsewhere), so there is nothing there to change"
        )

    async def _call(
        self,
        method: str,
        url: str,
        payload: bytes,
        headers: dict[str, str],
        named: str | None = None,
    ) -> HttpAnswer:
        """One request with its answer read; no answer in time, or none at all, is a
        DeliveryError naming the request (tried again) by ``named`` when given: a search's
        URL without its query, which holds the referral's identifier."""
        try:
            async with self.request(method, url, payload, headers) as response:
                await response.aread()
        except (httpx.TimeoutException, httpx.TransportError) as err:
            raise self.unreached(method, named or url, err) from err
        return response

    async def _guarded_cancel(self, outgoing: Outgoing) -> bytes:
        """The cancel's Bundle with its Task patch made to the Task's id and conditional on the
        version read just now (``ifMatch``); NothingToSend saying why when it is not sent.

        The organisation may have closed the Task (completed the service, rejected it) since
        the last poll; a cancel sent blind would overwrite what it recorded. So the Task is
        read first: one already closed is left as it is and its status is recorded as if
        polled (the referral is cancelled here, so the referrer hears that the organisation
        had already acted); an open one is patched only if nobody changed it meanwhile (HTTP
        412 otherwise, retried: the next try reads it again)."""
        key = outgoing.metadata.get("referral_key")
        if not key:
            return outgoing.payload
        tasks = await self._read_tasks(key, "before cancelling it")
        if len(tasks) > 1:
            return outgoing.payload  # the conditional patch says what is wrong (412)
        task = tasks[0]
        task_id, status = task.get("id"), task.get("status")
        if status in CLOSED_STATUSES or status == "entered-in-error":
            if status in STATUSES and status != "cancelled":
                detail = {
                    "task": f"Task/{task_id}",
                    "server": without_password(self.options.base_url),
                    "note": f"the Task was already {status} when the cancel was to be sent; "
                    "the cancel was not sent",
                }
                await asyncio.to_thread(self.tracker.advance, key, status, "fhir-task-poll", detail)
            await asyncio.to_thread(self.tasks.remove_referral, key)
            raise NothingToSend(
                f"Task/{task_id} is already {status} at the organisation, and a cancel would "
                "overwrite it"
            )
        version = (task.get("meta") or {}).get("versionId")
        if not isinstance(task_id, str) or not version:
            return outgoing.payload  # no version to hold it to: the conditional patch
        bundle = json.loads(outgoing.payload)
        request = bundle["entry"][int(outgoing.metadata.get("task_entry", "1"))]["request"]
        request["url"] = f"Task/{quote(task_id, safe='')}"
        request["ifMatch"] = f'W/"{version}"'
        return json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    async def _read_tasks(self, key: str, why: str) -> list[dict[str, Any]]:
        """The Tasks the server holds for referral ``key`` (searched by its identifier); a
        DeliveryError (retried) when the search fails or finds none yet."""
        # Errors name the search without its query: it is the referral's identifier, and
        # what a DeliveryError says of itself goes to the log.
        searched = f"{self.options.base_url}/Task"
        url = f"{searched}?{referral_search(key, self.options)}"
        response = await self._call("GET", url, b"", self._headers(), named=searched)
        body = await response.aread()
        if response.status_code != 200:
            text = (
                f"GET {without_password(searched)} (the referral's Task, {why}): "
                f"HTTP {response.status_code}"
            )
            raise DeliveryError(
                text,
                retryable=is_retryable(response.status_code),
                said=outcome_text(response) or None,
            )
        tasks = _search_results(body, "Task")
        if not tasks:
            raise DeliveryError(
                f"GET {without_password(searched)}: no Task for the referral (it is not at the "
                "server yet; retried)",
                said=None,
            )
        return tasks

    async def _guarded_move(self, outgoing: Outgoing) -> bytes:
        """The Bundle of a modify that moves the referral, without its Task status reset when
        the Task is the new owner's already.

        Moving a referral sets its Task back to requested, since the status the Task holds is
        the previous organisation's answer. Sent again (a reprocess, a retry after the answer
        was lost) once the new organisation has the Task, the reset would undo its own answer
        (accepted, in progress). So the Task is read first, and the status is left alone when
        its owner is already the one the referral moves to."""
        key = outgoing.metadata.get("referral_key")
        entry_at = outgoing.metadata.get("task_entry")
        if not key or entry_at is None:
            return outgoing.payload
        tasks = await self._read_tasks(key, "before moving it")
        if len(tasks) > 1:
            return outgoing.payload  # the conditional patch says what is wrong (412)
        bundle = json.loads(outgoing.payload)
        entry = bundle["entry"][int(entry_at)]
        ops = json.loads(base64.b64decode(entry["resource"]["data"]))
        owner = next((op["value"] for op in ops if op.get("path") == "/owner"), None)
        if not isinstance(owner, dict) or not _same_owner(tasks[0].get("owner"), owner):
            return outgoing.payload
        kept = [op for op in ops if op.get("path") != "/status"]
        data = json.dumps(kept, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        entry["resource"]["data"] = base64.b64encode(data).decode("ascii")
        return json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    async def _updated(self, outgoing: Outgoing, response: HttpAnswer, operation: str) -> str:
        """The receipt of a modify or cancel. A cancelled referral is closed: its Task leaves
        the task file, so the poll does not read back the status carehub itself set."""
        entry = outgoing.metadata.get("task_entry")
        task_id = _task_id_from_response(response, int(entry)) if entry else None
        key = outgoing.metadata.get("referral_key")
        if operation == "cancel" and key:
            await asyncio.to_thread(self.tasks.remove_referral, key)
        done = "cancelled" if operation == "cancel" else "modified"
        task = f"Task/{task_id} " if task_id else ""
        return f"HTTP {response.status_code} {task}{done}"

    # -- polling ---------------------------------------------------------------------------
    @property
    def tracker(self) -> ReferralTracker:
        """Built on first use and rebuilt if the hub attaches another store."""
        store = self.context.store
        engine: Engine | None = store.engine if store is not None else None
        if self._tracker is None or self._tracker.engine is not engine:
            self._tracker = ReferralTracker(engine)
        return self._tracker

    def tick(self, now: datetime) -> None:
        """Poll open Tasks, at most every ``poll_minutes``. Runs on the worker's thread.

        Forwards to one server (a route that creates referrals, another that changes them)
        share its task file: whichever ticks first polls it for all of them, once a cycle."""
        if not self.options.poll or self.context.store is None:
            return  # without the store there is no referral state to advance
        interval = timedelta(minutes=self.options.poll_minutes)
        with _POLLS_GUARD:
            polled = self.context.shared.setdefault(_LAST_POLLS, {})
            last = polled.get(self.tasks.path)
            if last is not None and (now == last or now - last < interval):
                return
            polled[self.tasks.path] = now
        self.poll(now)

    def poll(self, now: datetime | None = None) -> list[ReferralTransition]:
        """GET every open Task once and advance the referrals whose Task.status changed;
        returns those transitions. A server that is down is logged and tried next time."""
        now = now or datetime.now(UTC)
        if self._poll_client is None:
            self._poll_client = httpx.Client(
                timeout=self.options.timeout,
                verify=self.options.verify_tls,
                follow_redirects=False,
                # Only the codings read_answer unpacks within its bound.
                headers={"User-Agent": "carehub", "Accept-Encoding": "gzip, deflate"},
            )
        transitions = []
        for task_id, entry in sorted(self.tasks.all().items()):
            if self._closed_here(task_id, entry):
                continue
            transition = self._poll_one(task_id, entry, now)
            if transition is not None:
                transitions.append(transition)
        return transitions

    def _closed_here(self, task_id: str, entry: dict[str, Any]) -> bool:
        """Whether the Task's referral was closed other than by this poll (an RRI, a status
        call), so it leaves the task file unread: the organisation has given its last answer
        and the referral cannot move again. Its Task is left as the organisation has it:
        Task.status is the organisation's to set (see the module docstring).

        Not a referral the referrer cancelled while the cancel has not reached the server
        (it takes the Task out of the file when it does): the Task is open there, and an
        organisation working on it is told to the referrer as the poll finds it."""
        record = self.tracker.referral(str(entry.get("referral_key")))
        if record is None or record.status not in CLOSED_STATUSES:
            return False
        if record.status == "cancelled" and self._cancelled_by_referrer(record):
            return False
        self.tasks.remove(task_id)
        return True

    def _cancelled_by_referrer(self, record: ReferralRecord) -> bool:
        return any(
            e.accepted and e.action == "cancelled" and e.source.startswith("REF^")
            for e in self.tracker.events(record.referral_key)
        )

    def _poll_one(
        self, task_id: str, entry: dict[str, Any], now: datetime
    ) -> ReferralTransition | None:
        assert self._poll_client is not None
        url = f"{self.options.base_url}/Task/{quote(task_id, safe='')}"
        shown = without_password(url)  # for the log lines below
        try:
            # Read up to MAX_ANSWER_BYTES decompressed, as every answer from a server is: a
            # huge or endless answer, or a gzip bomb, is refused instead of filling memory.
            with self._poll_client.stream("GET", url, headers=self._headers()) as response:
                status_code = response.status_code
                body = read_answer(response) if status_code == 200 else b""
        except AnswerTooLarge as err:
            log.warning("fhir-referral: GET %s: %s; not read", shown, err)
            return None
        except httpx.HTTPError as err:
            reason = without_password(f"{type(err).__name__}: {err}")
            log.warning("fhir-referral: GET %s: %s", shown, reason)
            return None
        if status_code == 410:
            log.warning("fhir-referral: %s is gone (HTTP 410); no longer polled", shown)
            self.tasks.remove(task_id)
            return None
        if status_code != 200:
            log.warning("fhir-referral: GET %s: HTTP %d", shown, status_code)
            return None
        try:
            task = json.loads(body)
        except ValueError:
            log.warning("fhir-referral: GET %s: the answer is not JSON", shown)
            return None
        status = task.get("status") if isinstance(task, dict) else None
        if not isinstance(status, str) or task.get("resourceType") != "Task":
            log.warning("fhir-referral: GET %s: not a Task with a status", shown)
            return None
        self.tasks.update(task_id, polled_at=now.isoformat())
        owner = task.get("owner") if isinstance(task.get("owner"), dict) else {}
        # Who answered: the Task's owner, whoever the referral first named.
        answered_by = str(owner["display"])[:200] if owner.get("display") else None
        # The same status from another owner is another answer: the one the referral moved to
        # may accept after the one it was taken from was refused for accepting.
        if status == entry.get("last_status") and answered_by == entry.get(
            "last_owner", answered_by
        ):
            return None
        if status not in STATUSES:
            # draft / ready / entered-in-error: not referral states carehub tracks.
            log.warning("fhir-referral: %s has status %r; not applied", shown, status)
            self.tasks.update(task_id, last_status=status)
            return None
        detail: dict[str, Any] = {
            "task": f"Task/{task_id}",
            "server": without_password(self.options.base_url),
        }
        reason = ((task.get("statusReason") or {}).get("text")) or (
            (task.get("businessStatus") or {}).get("text")
        )
        if reason:
            detail["note"] = str(reason)[:500]
        if answered_by:
            detail["answered_by"] = answered_by
        if task.get("lastModified"):
            detail["task_last_modified"] = str(task["lastModified"])
        transition = self.tracker.advance(
            str(entry.get("referral_key")), status, "fhir-task-poll", detail
        )
        if transition.action == "unknown_referral" or transition.status in CLOSED_STATUSES:
            self.tasks.remove(task_id)
        else:
            self.tasks.update(task_id, last_status=status, last_owner=answered_by)
        return transition


#: A create delivery in one of these has reached the server, or may yet (a dead letter can be
#: retried by an operator); skipped and discarded ones never will.
_MAY_HAVE_CREATED = (
    DeliveryStatus.DELIVERED.value,
    DeliveryStatus.PENDING.value,
    DeliveryStatus.SENDING.value,
    DeliveryStatus.DEAD.value,
)


def _created_at(engine: Engine, key: str, base_url: str, channel: str) -> bool | None:
    """Whether referral ``key`` was sent (or is on its way) to the FHIR server at
    ``base_url`` by a ``channel`` forward: True when a create of it to that server was
    delivered or is still waiting, retrying or held as a dead letter; False when every message
    that made the referral (its I12, a release) is in the store, routed, with no such create;
    None when that cannot be told (no referral, a making message retention deleted or not
    routed yet), which the caller takes as "maybe", not as "no"."""
    with engine.connect() as conn:
        referral_id = conn.execute(
            select(referrals.c.id).where(referrals.c.referral_key == key)
        ).scalar()
        if referral_id is None:
            return None
        made_by = {
            row.message_id
            for row in conn.execute(
                select(referral_events.c.message_id).where(
                    referral_events.c.referral_id == referral_id,
                    referral_events.c.accepted.is_(True),
                    referral_events.c.action.in_(SENT_AS_NEW_ACTIONS),
                )
            )
        }
        if not made_by or None in made_by:
            return None
        routed = dict(
            conn.execute(
                select(messages.c.id, messages.c.status).where(messages.c.id.in_(made_by))
            ).all()
        )
        if set(routed) != made_by or MessageStatus.RECEIVED.value in routed.values():
            return None
        rows = conn.execute(
            select(deliveries.c.metadata).where(
                deliveries.c.message_id.in_(made_by),
                deliveries.c.channel == channel,
                deliveries.c.status.in_(_MAY_HAVE_CREATED),
            )
        ).all()
    for (text,) in rows:
        meta = json_object(text)
        if (
            meta.get("operation") == "create"
            and meta.get("referral_key") == key
            and meta.get("destination") == base_url
        ):
            return True
    return False


def _same_owner(held: Any, wanted: dict[str, Any]) -> bool:
    """Whether a Task's owner (a reference) is the organisation ``wanted`` names: the same
    identifier, else the same name (see carehub.resources.matching.same_organization)."""
    if not isinstance(held, dict):
        return False
    mine, theirs = held.get("identifier"), wanted.get("identifier")
    if (
        isinstance(mine, dict)
        and isinstance(theirs, dict)
        and mine.get("value")
        and (mine.get("system"), mine.get("value")) == (theirs.get("system"), theirs.get("value"))
    ):
        return True
    return same_organization(str(held.get("display") or ""), str(wanted.get("display") or ""))


def _search_results(body: bytes, resource_type: str) -> list[dict[str, Any]]:
    """The resources of one type in a searchset Bundle (none if the body is not one)."""
    try:
        bundle = json.loads(body)
    except ValueError:
        return []
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    resources = [e.get("resource") for e in entries or [] if isinstance(e, dict)]
    return [r for r in resources if isinstance(r, dict) and r.get("resourceType") == resource_type]


def _task_id_from_response(response: HttpAnswer, task_entry: int) -> str | None:
    """The Task id from a transaction-response: the Location of the Task's entry (responses
    come in request order), else any entry whose Location names a Task."""
    try:
        body = response.json()
    except ValueError:
        return task_id_from_location(response.headers.get("Location"))
    entries = body.get("entry") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        return None
    locations = [
        ((e.get("response") or {}).get("location") if isinstance(e, dict) else None)
        for e in entries
    ]
    if 0 <= task_entry < len(locations):
        found = task_id_from_location(locations[task_entry])
        if found:
            return found
    return next((t for t in map(task_id_from_location, locations) if t), None)
