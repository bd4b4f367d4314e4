"""Admit, discharge and transfer notifications as FHIR messages, the Da Vinci way.

The Da Vinci Unsolicited Notifications IG (``hl7.fhir.us.davinci-alerts`` 1.1.0, FHIR R4) is how
a care-management platform, a payer or an HIE takes encounter notifications over FHIR: a
``message`` Bundle whose first entry is a **MessageHeader** (``eventCoding`` from the IG's
notification-event code system: ``notification-admit``, ``notification-discharge``,
``notification-transfer``) with ``focus`` the **Encounter**, followed by the resources it points
at: the Patient, the facility (Organization), its Location, the attending and admitting
Practitioners and the patient's primary care practitioner, and the encounter diagnoses
(Condition). It is POSTed to ``[base]/$process-message``; no response message is expected.

**What is sent comes from the visit, not from one message.** The channel reads the
encounter-state step's transition (``work.data["encounter"]``): its kind decides whether and as
what the message is sent, and its summary (the visit as all its messages built it) fills the
Encounter. So a discharge whose A03 left out the admission time or the attending still carries
them, and an A08 that repeated what was known, a bed move or a resend under a new MSH-10 (kind
``none``) sends nothing; nor does an A08 that changed only the patient's or the visit's details
(``updated``: a name, an attending, a unit), which the IG has no event for: the visit's next
notification carries them. The trigger rules are the ones the notify step follows: an ED arrival
and an admission are ``notification-admit``, a change of level of care or facility is
``notification-transfer``, a discharge ``notification-discharge``.

**Cancels.** The IG has no cancel event; a cancel is sent as the notification it takes back,
with the Encounter as the cancel left it (v2-to-FHIR's Event[EncounterStatus] map): an A11 that
cancels the visit gives ``cancelled``, an A13 puts the visit back ``in-progress`` without its
end. What it takes back is told by the visit's state before it (an ED visit's A11 takes back the
ED arrival), and it is sent only when that notification went to this endpoint or may still go
(the store's deliveries say; in a dry run, the visit's state). A dead letter may still go: its
cancel waits behind it in the patient's line, and follows it if it is retried. A cancel of an
outpatient registration, of a bed move, of a visit first heard of in the cancel, of a discarded
dead letter, or of an admission the patient's opt-out kept back sends nothing. Every
MessageHeader carries the v2 event in ``reason`` (v2-0003), so a receiver tells an A11 from the
notification it takes back.

**Identity.** The Encounter, Patient, Organization, Location and Practitioners have ``urn:uuid``
full URLs made from what they are (the visit's key, the patient's key, the facility code, an
NPI), so every notification of one visit names the same Encounter, and the receiver can tell
an update from a new visit; the Encounter also carries the visit number (PV1-19, type VN). An
identifier's system is the site's mapping of its assigning authority, else made under
``identifier_system_base``; an MRN or visit number sent without an authority is the sending
facility's (MSH-4), as the store keys it, so two hospitals' numbers never name one Patient or
one Encounter. After an A40 merge during the visit the Patient carries the retired identifiers
(``use: old``) and a ``link`` of type ``replaces`` to the record they named. The Encounter's
period is PV1-44 and PV1-45 as the sender wrote them (with their offsets): a visit whose
messages never gave PV1-44 has no start, rather than a message's time. The
Bundle and MessageHeader ids come from the delivery's idempotency key, which is unique to the
store, the message and the routing run: a retry is the same FHIR message, which a receiver that
has it drops as a repeat (FHIR messaging's rule for a Bundle id it has seen); a ``messages
reprocess`` is a new one, as for every forward.

**Who is told, and what.** A patient who opted out (PD1-12 or the roster, found by the
care-team step when the route runs it before this channel) is not sent. Diagnoses go as
Condition resources unless ``diagnoses: false`` (a receiver not covered for them, e.g. under
42 CFR Part 2). Coverage (IN1) is not sent: the care event does not carry it. The Patient
carries the visit's identifiers but national ones (an SSN), unless ``keep_national_ids``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import deque
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from pydantic import Field, field_validator
from sqlalchemy import select

from carehub import __version__
from carehub.builtins.http_channel import HttpChannel
from carehub.care.model import DISPOSITIONS, NOTIFIABLE, RETRACTS, CareTeam, Transition
from carehub.components import (
    ComponentContext,
    ComponentOptions,
    DeliveryError,
    NothingToSend,
    Outgoing,
    Work,
)
from carehub.events import Address, HumanName, Identifier, Practitioner, is_national_id
from carehub.fhir import (
    FHIR_CONTENT_TYPE,
    GENDER,
    ICD9CM,
    ICD10CM,
    LOCAL_SYSTEM_BASE,
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
from carehub.routing.router import store_id_of
from carehub.store.schema import DeliveryStatus, deliveries, encounter_events

__all__ = ["FhirNotificationChannel", "NotificationOptions", "build_notification_bundle"]

EVENT_CODES = "http://hl7.org/fhir/us/davinci-alerts/CodeSystem/notification-event"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
DIAGNOSIS_ROLE = "http://terminology.hl7.org/CodeSystem/diagnosis-role"
DISCHARGE_DISPOSITION = "https://www.nubc.org/CodeSystem/PatDischargeStatus"  # THO, US Core 7+
PROFILE = "http://hl7.org/fhir/us/davinci-alerts/StructureDefinition/"
V2_EVENTS = "http://terminology.hl7.org/CodeSystem/v2-0003"
V2_PATIENT_CLASS = "http://terminology.hl7.org/CodeSystem/v2-0004"
US_SSN = "http://hl7.org/fhir/sid/us-ssn"
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:.")

#: The v2 trigger events a notification can come from (table 0003), for MessageHeader.reason:
#: how a receiver tells a cancel (A11, A12, A13) from the notification it takes back.
_TRIGGERS = {
    "A01": "Admit/visit notification",
    "A02": "Transfer a patient",
    "A03": "Discharge/end visit",
    "A04": "Register a patient",
    "A06": "Change an outpatient to an inpatient",
    "A08": "Update patient information",
    "A11": "Cancel admit/visit notification",
    "A12": "Cancel transfer",
    "A13": "Cancel discharge/end visit",
}
#: Characters FHIR strings may not hold (below U+0020 but tab, CR and LF); some feeds carry
#: them, raw or as \X..\ escapes.
_CONTROL: dict[int, str | None] = dict.fromkeys(
    c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)
)


def _windows_1252(code: int) -> str | None:
    try:
        return bytes([code]).decode("cp1252")
    except UnicodeDecodeError:
        return None


#: The C1 controls (U+0080-U+009F), which no text means: they come from Windows-1252 bytes in
#: a message declared ISO-8859-1 (0x92 for the apostrophe of O'Brien), as most senders of
#: "8859/1" write it. They go out as the Windows-1252 characters they stand for; the five
#: bytes Windows-1252 leaves undefined are taken out.
_CONTROL.update({c: _windows_1252(c) for c in range(0x80, 0xA0)})

#: Transition kind -> (notification-event code, its display).
_EVENTS: dict[str, tuple[str, str]] = {
    "ed_arrival": ("notification-admit", "Admit Notification"),
    "admission": ("notification-admit", "Admit Notification"),
    "transfer": ("notification-transfer", "Transfer Notification"),
    "discharge": ("notification-discharge", "Discharge Notification"),
}
_MESSAGEHEADER_PROFILES = {
    "notification-admit": "admit-notification-messageheader",
    "notification-discharge": "discharge-notification-messageheader",
    "notification-transfer": "transfer-notification-messageheader",
}
#: The visit's state after the message -> Encounter.status.
_STATUS = {
    "registered": "arrived",
    "ed": "in-progress",
    "admitted": "in-progress",
    "discharged": "finished",
    "closed": "finished",
    "cancelled": "cancelled",
}
#: PV1-2 patient class (table 0004) -> Encounter.class (v3 ActCode), as the v2-to-FHIR IG's
#: PatientClass map gives it; V (observation, as several US sites send it) as Da Vinci maps it.
_CLASSES: dict[str, tuple[str, str]] = {
    "E": ("EMER", "emergency"),
    "I": ("IMP", "inpatient encounter"),
    "O": ("AMB", "ambulatory"),
    "P": ("PRENC", "pre-admission"),
    "V": ("OBSENC", "observation encounter"),
}
#: PV1-2 (table 0004) as Encounter.type: US Core asks for a type, and the class is what v2 says.
_PATIENT_CLASSES = {
    "E": "Emergency",
    "I": "Inpatient",
    "O": "Outpatient",
    "P": "Preadmit",
    "R": "Recurring patient",
    "B": "Obstetrics",
    "C": "Commercial Account",
    "N": "Not Applicable",
    "U": "Unknown",
    "V": "Observation",
}
#: DG1-3's coding system (table 0396) -> the FHIR system URI.
_DIAGNOSIS_SYSTEMS = {
    "I10": ICD10CM,
    "I10C": ICD10CM,
    "ICD10": ICD10CM,
    "ICD10CM": ICD10CM,
    "I9": ICD9CM,
    "I9C": ICD9CM,
    "SCT": SNOMED,
    "SNM": SNOMED,
    "SNOMED": SNOMED,
}
#: DG1-6 diagnosis type (table 0052) -> Encounter.diagnosis.use.
_DIAGNOSIS_ROLES = {"A": ("AD", "Admission diagnosis"), "F": ("DD", "Discharge diagnosis")}
#: The participants an Encounter names, from the transition summary.
_PARTICIPANTS = (("attending", "ATND", "attender"), ("admitting", "ADM", "admitter"))


class NotificationOptions(ComponentOptions):
    """How the notifications are written: which transitions, what they carry, and the names
    and identifier systems they use."""

    kinds: list[Literal["ed_arrival", "admission", "transfer", "discharge"]] = Field(
        default_factory=lambda: list(NOTIFIABLE),
        min_length=1,
        description="the transitions sent (their cancels follow them)",
    )
    diagnoses: bool = Field(
        True, description="send the encounter diagnoses (Condition); false leaves them out"
    )
    keep_national_ids: bool = Field(
        False,
        description="send the patient's national identifiers (an SSN as us-ssn; types SS, NI, "
        "NNxxx, or assigned by SSA/USSSA) if the visit has them; left out by default (minimum "
        "necessary); the v2-to-event step must keep them too",
    )
    identifier_systems: dict[str, str] = Field(
        default_factory=dict,
        description="v2 assigning authority (e.g. RGH) -> identifier system URI; unmapped "
        "ones become {identifier_system_base}{authority}; an MRN or visit number sent without "
        "an authority is taken as the sending facility's (MSH-4); 'facility' names the "
        "facility codes' system",
    )
    identifier_system_base: str = Field(
        LOCAL_SYSTEM_BASE,
        description="where the identifier systems of unmapped authorities are made: a URL "
        "(or URN) your organisation controls, e.g. https://example.org/fhir/id/; the default "
        "is under the reserved domain .invalid",
    )
    facilities: dict[str, str] = Field(
        default_factory=dict,
        description="facility code (PV1-3.4, else MSH-4) -> the Organization's name",
    )
    source_endpoint: str = Field(
        "urn:carehub", description="MessageHeader.source.endpoint: this hub, as receivers know it"
    )
    destination_name: str | None = Field(
        None, description="MessageHeader.destination.name: the receiver, as it calls itself"
    )

    @field_validator("identifier_system_base")
    @classmethod
    def _a_uri(cls, value: str) -> str:
        """An absolute URI; an http(s) one ends with a slash, so the authority is a path."""
        value = value.strip()
        if not _URI_SCHEME.match(value) or any(c.isspace() for c in value):
            raise ValueError(f"{value!r} is not an absolute URI (https://... or urn:...)")
        if value.lower().startswith(("http://", "https://")) and not value.endswith(("/", "#")):
            value += "/"
        return value

    @field_validator("facilities")
    @classmethod
    def _codes_upper(cls, value: dict[str, str]) -> dict[str, str]:
        """Codes compare case-insensitively, as in the notify step."""
        return {str(code).strip().upper(): name.strip() for code, name in value.items()}


# -- the decision ------------------------------------------------------------------------------

_CANCELS = ("A11", "A12", "A13")
#: How many rendered notifications a channel remembers (see FhirNotificationChannel._rendered):
#: far more than a routing batch holds.
RECENTLY_RENDERED = 10_000
_NOTHING_TO_CANCEL = "a cancel of a visit first heard of in the cancel: nobody was told of it"
_NOTHING_TOLD = "the cancel takes back nothing a notification told"
#: (cancel, the visit's state before it) -> the notification it takes back.
_TOLD_BEFORE_CANCEL = {
    ("cancel_admission", "ed"): "ed_arrival",
    ("cancel_admission", "admitted"): "admission",
    ("cancel_transfer", "ed"): "transfer",
    ("cancel_transfer", "admitted"): "transfer",
    ("cancel_discharge", "discharged"): "discharge",
}


def notification_event(transition: Transition, kinds: list[str]) -> tuple[str | None, str]:
    """(the transition kind whose notification this message is, or None; why not when None).
    A cancel is the notification it takes back, told by the state the visit was in before it
    (an ED visit's A11 takes back the ED arrival), and is sent only when that notification was
    one this forward sends: a cancel of a registration, or of a visit first heard of in the
    cancel, takes back nothing the receiver was told."""
    kind = transition.kind
    if kind in RETRACTS:
        before = transition.summary.get("previous_state")
        told = _TOLD_BEFORE_CANCEL.get((kind, before))
        if told is None:
            return None, _NOTHING_TO_CANCEL if before is None else _NOTHING_TOLD
        if told not in kinds:
            return None, f"{told} notifications are not sent on this forward"
        return told, ""
    if kind == "discharge_corrected":
        # The hospital changed the disposition or destination: the discharge notification
        # again, with the Encounter as it stands now (its dischargeDisposition corrected).
        kind = "discharge"
    if kind == "transfer" and transition.summary.get("previous_state") == "registered":
        # An outpatient visit (never notified) that became an inpatient stay: to a receiver
        # that has heard nothing of it, it is an admission.
        kind = "admission"
    if kind in kinds:
        return kind, ""
    if kind in NOTIFIABLE:
        return None, f"{kind} notifications are not sent on this forward"
    if kind == "none" and transition.trigger_event in _CANCELS:
        return None, _NOTHING_TO_CANCEL
    if kind == "none":
        return None, "nothing new for the visit (a resend, an update or a bed move)"
    if kind == "updated":
        # The IG has no event for changed details; the next admit, transfer or discharge
        # notification carries them, as the visit holds them.
        changed = ", ".join(transition.summary.get("changed") or ())
        return None, f"no admission, transfer or discharge: only details changed ({changed})"
    return None, f"no admission, transfer or discharge (transition {kind})"


# -- the bundle --------------------------------------------------------------------------------


class _Bundle:
    """The message's entries, each added once under its stable full URL."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def add(self, full_url: str, resource: dict[str, Any]) -> dict[str, Any]:
        """Add a resource (once) and return a reference to it."""
        if full_url not in self.entries:
            resource["id"] = full_url.removeprefix("urn:uuid:")
            self.entries[full_url] = resource
        ref: dict[str, Any] = {"reference": full_url}
        display = _display(self.entries[full_url])
        if display:
            ref["display"] = display
        return ref


def _display(resource: dict[str, Any]) -> str | None:
    name = resource.get("name")
    if isinstance(name, str):
        return name
    if isinstance(name, list) and name:
        first = name[0]
        given = " ".join(first.get("given") or [])
        return person_name(given or None, first.get("family"), " ".join(first.get("prefix") or []))
    return None


def _when(value: Any, as_sent: datetime | None = None) -> str | None:
    """A summary time (ISO text) as a FHIR dateTime: a time without a zone keeps only its date
    (see carehub.fhir.fhir_datetime). ``as_sent`` is the same time as this message gave it,
    with the precision the sender wrote (a year stays a year), which the summary's JSON loses;
    it is used when it is the summary's time."""
    if not isinstance(value, str) or not value:
        return None
    if as_sent is not None and as_sent.isoformat() == value:
        return fhir_datetime(as_sent)
    if "T" not in value:
        return value  # YYYY, YYYY-MM or YYYY-MM-DD
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return moment.date().isoformat()
    return moment.isoformat(timespec="seconds")


def _not_before(end: str, start: str) -> bool:
    """Whether a period may end at ``end`` having started at ``start``: the times themselves
    when both have one, else as far as the coarser of the two goes (ISO text compares in
    order at equal length)."""
    with contextlib.suppress(ValueError, TypeError):
        if "T" in end and "T" in start:
            return datetime.fromisoformat(end) >= datetime.fromisoformat(start)
    size = min(len(end), len(start), 10)
    return end[:size] >= start[:size]


def _system(authority: str | None, options: NotificationOptions, scope: str | None = None) -> str:
    """The system of an identifier from ``authority``; one sent without an authority is the
    sending facility's (``scope``), as the store keys it."""
    return identifier_system(
        authority or scope, options.identifier_systems, options.identifier_system_base
    )


def _identifier(
    ident: Identifier, options: NotificationOptions, scope: str | None
) -> dict[str, Any]:
    is_ssn = (ident.type_code or "").strip().upper() == "SS"
    system = US_SSN if is_ssn else _system(ident.authority, options, scope)
    return fhir_identifier(system, ident.value, ident.type_code)


def _model_or_none(model: type[Any], value: Any) -> Any:
    """A summary part as its care-event model (the summary holds them as JSON)."""
    return model.model_validate(value) if isinstance(value, dict) and value else None


def _practitioner(
    bundle: _Bundle, person: Practitioner, options: NotificationOptions
) -> dict[str, Any] | None:
    identifier = practitioner_identifier(
        person, options.identifier_systems, options.identifier_system_base
    )
    name = fhir_human_name(
        HumanName(
            family=person.family,
            given=person.given,
            middle=person.middle,
            prefix=person.prefix,
            suffix=person.suffix,
        )
    )
    if identifier is None and name is None:
        return None
    resource: dict[str, Any] = {"resourceType": "Practitioner"}
    if identifier:
        resource["identifier"] = [identifier]
    if name:
        resource["name"] = [name]
    seed = json.dumps(identifier or name, sort_keys=True)
    return bundle.add(stable_urn(seed, "Practitioner"), resource)


def _organization(bundle: _Bundle, code: str, options: NotificationOptions) -> dict[str, Any]:
    """The facility a code names (PV1-3.4 or MSH-4, an HD: namespace^universal id^type), by
    its name where ``facilities`` gives one; an ISO universal id is also an OID identifier."""
    namespace, _, rest = code.partition("^")
    universal, _, id_type = rest.partition("^")
    namespace = namespace.strip() or universal.strip()
    identifiers = [{"system": _system("facility", options), "value": namespace}]
    if universal.strip() and id_type.strip().upper() == "ISO":
        identifiers.append({"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{universal.strip()}"})
    resource = {
        "resourceType": "Organization",
        "identifier": identifiers,
        "active": True,
        "name": options.facilities.get(namespace.upper(), namespace),
    }
    return bundle.add(stable_urn(namespace.upper(), "Organization"), resource)


def _location(
    bundle: _Bundle, detail: dict[str, Any], organization: dict[str, Any] | None
) -> dict[str, Any] | None:
    parts = [
        f"{label}{detail[key]}"
        for key, label in (("point_of_care", ""), ("room", "room "), ("bed", "bed "))
        if detail.get(key)
    ]
    name = detail.get("description") or ", ".join(parts)
    if not name:
        return None
    resource: dict[str, Any] = {"resourceType": "Location", "name": name, "mode": "instance"}
    if organization is not None:
        resource["managingOrganization"] = organization
    seed = json.dumps([str(detail.get("facility") or "").upper(), name])
    return bundle.add(stable_urn(seed, "Location"), resource)


def _patient(
    bundle: _Bundle, summary: dict[str, Any], options: NotificationOptions
) -> dict[str, Any]:
    scope = summary.get("identifier_scope")
    identifiers = [Identifier.model_validate(i) for i in summary.get("identifiers") or []]
    primary = _model_or_none(Identifier, summary.get("primary_identifier"))
    if primary is not None and primary not in identifiers:
        identifiers.insert(0, primary)
    if not options.keep_national_ids:
        # Also of visits recorded while the translate step still kept them.
        identifiers = [i for i in identifiers if not is_national_id(i)]
    if not identifiers:
        raise ValueError(
            "the visit's patient has no identifier (PID-3) but national ones, which are "
            "not sent without keep_national_ids"
            if summary.get("identifiers") or primary is not None
            else "the visit's patient has no identifier (PID-3)"
        )
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [_identifier(i, options, scope) for i in identifiers],
    }
    replaced = _replaced(summary, resource["identifier"], options, scope)
    if replaced:
        # FHIR's patient merge: the survivor carries the retired record's identifiers as
        # old ones, and a link that it replaces that record (named by identifier, the only
        # name a receiver may know it by).
        resource["identifier"] += [{**found, "use": "old"} for found in replaced]
    name = _model_or_none(HumanName, summary.get("name"))
    if name is not None and (found := fhir_human_name(name)):
        resource["name"] = [found]
    if summary.get("phone"):
        resource["telecom"] = [{"system": "phone", "value": summary["phone"]}]
    # US Core asks for a gender: one the sender did not give is "unknown".
    resource["gender"] = GENDER.get(str(summary.get("sex") or "").strip().upper(), "unknown")
    birth = _when(summary.get("birth_date"))
    if birth:
        resource["birthDate"] = birth[:10]
    address = fhir_address(_model_or_none(Address, summary.get("address")))
    if address:
        resource["address"] = [address]
    pcp = _model_or_none(Practitioner, summary.get("pcp"))
    if pcp is not None and (ref := _practitioner(bundle, pcp, options)):
        resource["generalPractitioner"] = [ref]
    if replaced:
        resource["link"] = [
            {
                "other": {"identifier": {k: v for k, v in found.items() if k != "type"}},
                "type": "replaces",
            }
            for found in replaced
        ]
    seed = summary.get("patient_key") or json.dumps(resource["identifier"][0], sort_keys=True)
    if seed.startswith("|") and scope:  # a patient stored under the bare id, as it is now keyed
        seed = f"{scope}{seed}"
    return bundle.add(stable_urn(seed, "Patient"), resource)


def _replaced(
    summary: dict[str, Any],
    current: list[dict[str, Any]],
    options: NotificationOptions,
    scope: str | None,
) -> list[dict[str, Any]]:
    """The identifiers an A40 retired into the visit's patient (the encounter-state step
    keeps them with the visit), as FHIR identifiers, but those the patient still has and
    national ones unless ``keep_national_ids``."""
    found: list[dict[str, Any]] = []
    now = {(i.get("system"), i.get("value")) for i in current}
    for value in summary.get("replaced_identifiers") or []:
        ident = _model_or_none(Identifier, value)
        if ident is None or (is_national_id(ident) and not options.keep_national_ids):
            continue
        fhir = _identifier(ident, options, scope)
        if (fhir["system"], fhir["value"]) not in now:
            now.add((fhir["system"], fhir["value"]))
            found.append(fhir)
    return found


def _visit_identifier(summary: dict[str, Any], options: NotificationOptions) -> dict[str, Any]:
    """PV1-19 in the system of its assigning authority, else of the sending facility (visit
    numbers are only unique within the system that issued them)."""
    visit = _model_or_none(Identifier, summary.get("visit_identifier"))
    number = summary["visit_number"]
    authority = visit.authority if visit is not None and visit.value == number else None
    return {
        "type": {"coding": [{"system": V2_0203, "code": "VN", "display": "Visit number"}]},
        "system": _system(authority, options, summary.get("identifier_scope")),
        "value": number,
    }


def _encounter_type(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Encounter.type (US Core: at least one): the patient class as v2 says it."""
    patient_class = str(summary.get("patient_class") or "").strip().upper()
    label = _PATIENT_CLASSES.get(patient_class)
    if label is None:
        return [{"text": "Unknown"}]
    coding = {"system": V2_PATIENT_CLASS, "code": patient_class, "display": label}
    return [{"coding": [coding], "text": label}]


def _clean(value: Any) -> Any:
    """``value`` with the control characters FHIR strings may not hold taken out."""
    if isinstance(value, str):
        return value.translate(_CONTROL)
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value


def _encounter_class(summary: dict[str, Any], kind: str) -> dict[str, str]:
    patient_class = str(summary.get("patient_class") or "").strip().upper()
    if kind == "ed_arrival":
        patient_class = "E"
    code = _CLASSES.get(patient_class)
    if code is None:
        return {"system": NULL_FLAVOR, "code": "UNK", "display": "unknown"}
    return {"system": ACT_CODE, "code": code[0], "display": code[1]}


def _conditions(
    bundle: _Bundle, summary: dict[str, Any], patient: dict[str, Any], encounter_url: str
) -> list[dict[str, Any]]:
    """Encounter.diagnosis entries, each with its Condition added to the bundle."""
    found: list[dict[str, Any]] = []
    for i, diagnosis in enumerate(summary.get("diagnoses") or []):
        code, display = diagnosis.get("code"), diagnosis.get("display")
        if not code and not display:
            continue
        concept: dict[str, Any] = {}
        system = _DIAGNOSIS_SYSTEMS.get(str(diagnosis.get("system") or "").strip().upper())
        if code and system:
            coding: dict[str, Any] = {"system": system, "code": code}
            if display:
                coding["display"] = display
            concept["coding"] = [coding]
        concept["text"] = display or code
        condition = {
            "resourceType": "Condition",
            "category": [
                {
                    "coding": [
                        {
                            "system": CONDITION_CATEGORY,
                            "code": "encounter-diagnosis",
                            "display": "Encounter Diagnosis",
                        }
                    ]
                }
            ],
            "code": concept,
            "subject": patient,
            "encounter": {"reference": encounter_url},
        }
        ref = bundle.add(
            stable_urn(f"{encounter_url}:{i}:{code}:{display}", "Condition"), condition
        )
        entry: dict[str, Any] = {"condition": ref, "rank": i + 1}
        role = _DIAGNOSIS_ROLES.get(str(diagnosis.get("type") or "").strip().upper())
        if role:
            entry["use"] = {
                "coding": [{"system": DIAGNOSIS_ROLE, "code": role[0], "display": role[1]}]
            }
        found.append(entry)
    return found


def build_notification_bundle(
    work: Work,
    transition: Transition,
    kind: str,
    message_key: str,
    options: NotificationOptions,
    endpoint: str,
    now: datetime | None = None,
    store_id: str = "",
) -> dict[str, Any]:
    """The message Bundle telling of ``kind`` (a NOTIFIABLE kind; for a cancel, the kind it
    takes back) with the visit as ``transition`` left it; every resource validated. The Bundle
    and MessageHeader ids are made from ``message_key``."""
    summary = transition.summary
    code, display = _EVENTS[kind]
    bundle = _Bundle()
    header_url = stable_urn(message_key, "MessageHeader")
    bundle.entries[header_url] = {}  # first, as a message must begin
    visit_key = str(summary.get("visit_key") or "")
    # A visit number names the visit whoever the patient turns out to be (an A40 merge during
    # the stay changes the patient's key, not the Encounter), within the system that issued
    # it: one without an authority (a visit recorded before such numbers were scoped) within
    # the sending facility, as it is now keyed. A visit without one is the store's encounter
    # row, which a merge moves to the surviving patient whole.
    scope = summary.get("identifier_scope")
    if visit_key.startswith("|") and scope:
        visit_key = f"{scope}{visit_key}"
    visit_seed = (
        visit_key
        if visit_key and not visit_key.startswith("noVN:")
        else f"{store_id}:encounter:{transition.encounter_id}"
    )
    encounter_url = stable_urn(visit_seed, "Encounter")
    bundle.entries[encounter_url] = {}  # second: the focus, before what it points at

    facility_code = summary.get("facility") or summary.get("sending_facility")
    facility = _organization(bundle, facility_code, options) if facility_code else None
    patient = _patient(bundle, summary, options)
    state = transition.state
    encounter: dict[str, Any] = {
        "resourceType": "Encounter",
        "meta": {"profile": [PROFILE + "adt-notification-encounter"]},
        "status": _STATUS.get(state, "unknown"),
        "class": _encounter_class(summary, kind),
        "type": _encounter_type(summary),
        "subject": patient,
    }
    if summary.get("visit_number"):
        encounter["identifier"] = [_visit_identifier(summary, options)]
    participants = []
    author = None
    for key, role, role_display in _PARTICIPANTS:
        person = _model_or_none(Practitioner, summary.get(key))
        ref = _practitioner(bundle, person, options) if person is not None else None
        if ref is not None:
            participants.append(
                {
                    "type": [
                        {
                            "coding": [
                                {"system": PARTICIPATION, "code": role, "display": role_display}
                            ]
                        }
                    ],
                    "individual": ref,
                }
            )
            author = author or ref
    if participants:
        encounter["participant"] = participants
    this = work.event.encounter if work.event is not None else None
    period: dict[str, str] = {}
    # The start is PV1-44 as the sender gave it, or none: never when a message came.
    start = _when(summary.get("admit_time"), this.admit_time if this else None)
    if start:
        period["start"] = start
    end = None
    if state in ("discharged", "closed"):
        end = _when(summary.get("discharge_time"), this.discharge_time if this else None)
    if end and (not start or _not_before(end, start)):
        period["end"] = end
    if period:
        encounter["period"] = period
    if options.diagnoses:
        diagnoses = _conditions(bundle, summary, patient, encounter_url)
        if diagnoses:
            encounter["diagnosis"] = diagnoses
    disposition = summary.get("disposition")
    if state == "discharged" and (disposition or summary.get("discharged_to_name")):
        hospitalization: dict[str, Any] = {}
        if disposition:
            text = DISPOSITIONS.get(disposition, disposition)
            concept: dict[str, Any] = {"text": text}
            if len(disposition) == 2 and disposition.isdigit():  # a UB-04 (NUBC) code
                concept["coding"] = [
                    {"system": DISCHARGE_DISPOSITION, "code": disposition, "display": text}
                ]
            hospitalization["dischargeDisposition"] = concept
        if summary.get("discharged_to_name"):
            hospitalization["destination"] = {"display": summary["discharged_to_name"]}
        encounter["hospitalization"] = hospitalization
    location = _location(bundle, summary.get("location_detail") or {}, facility)
    if location is not None:
        encounter["location"] = [
            {
                "location": location,
                "status": "completed" if state in ("discharged", "closed") else "active",
            }
        ]
    if facility is not None:
        encounter["serviceProvider"] = facility
    bundle.entries[encounter_url] = {**encounter, "id": encounter_url.removeprefix("urn:uuid:")}

    header: dict[str, Any] = {
        "resourceType": "MessageHeader",
        "id": header_url.removeprefix("urn:uuid:"),
        "meta": {
            "profile": [
                PROFILE + "notifications-messageheader",
                PROFILE + _MESSAGEHEADER_PROFILES[code],
            ]
        },
        "eventCoding": {"system": EVENT_CODES, "code": code, "display": display},
        "destination": [{"endpoint": _without_userinfo(endpoint)}],
        "source": {
            "name": "carehub",
            "software": "carehub",
            "version": __version__,
            "endpoint": options.source_endpoint,
        },
        "focus": [{"reference": encounter_url}],
    }
    if options.destination_name:
        header["destination"][0]["name"] = options.destination_name
    trigger = transition.trigger_event.strip().upper()
    if trigger:
        said = _TRIGGERS.get(trigger, f"event {trigger}")
        header["reason"] = {
            "coding": [{"system": V2_EVENTS, "code": trigger, "display": said}],
            "text": said,
        }
    sending_code = summary.get("sending_facility") or facility_code
    sender = _organization(bundle, sending_code, options) if sending_code else None
    if sender is not None:  # the hospital that sent it, whichever campus the visit is at
        header["sender"] = sender
        header["responsible"] = sender
    if author is not None:
        header["author"] = author
    bundle.entries[header_url] = header

    message_id = stable_urn(message_key, "Bundle").removeprefix("urn:uuid:")
    result = {
        "resourceType": "Bundle",
        "id": message_id,
        "meta": {"profile": [PROFILE + "notifications-bundle"]},
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{message_id}"},
        "type": "message",
        "timestamp": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
        "entry": [
            {"fullUrl": url, "resource": resource} for url, resource in bundle.entries.items()
        ],
    }
    result = _clean(result)
    for entry in result["entry"]:
        validate_resource(entry["resource"])
    validate_resource(result)
    return result


# -- the channel -------------------------------------------------------------------------------


def _without_userinfo(url: str) -> str:
    """The endpoint as the receiver's Bundle names it: no user name or password, which would
    otherwise be stored in every payload and shown by `messages show --payloads`."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(username=None, password=None)) if parsed.userinfo else url


class FhirNotificationChannel(HttpChannel):
    """Sends ADT care transitions to a FHIR endpoint as Da Vinci Unsolicited Notifications
    (a ``message`` Bundle: MessageHeader, Encounter, Patient, Organization, Location,
    Practitioners, Conditions) POSTed to ``{base_url}/$process-message``.

    ``render`` (routing time) reads the encounter-state step's transition, so put ``translate:
    v2-to-event`` and ``enrich: encounter-state`` before it (``care-team`` too, for opt-outs):
    an ED arrival or admission goes as ``notification-admit``, a transfer of level or facility
    as ``notification-transfer``, a discharge as ``notification-discharge``, a cancel as the
    notification it takes back with the Encounter as the cancel left it (and only where that
    went); anything else (a resend, an A08 that changed nothing, a bed move) is recorded as not
    sent. ``send`` POSTs it: 200, 202 and 204 are delivered (receipt ``HTTP <code> <event>``); a
    response message whose MessageHeader says ``fatal-error`` is refused for good and one that
    says ``transient-error`` is retried; 401, 404 and other 4xx are not retried (the IG: do not
    resend until the error is fixed), 408, 425, 429 (no sooner than its ``Retry-After``), 5xx
    but 501 and 505, timeouts and network errors are. What a FHIR server said (an
    OperationOutcome's diagnostics) is kept with the attempt, never logged."""

    name = "fhir-notification"
    description = (
        "Send admissions, ED arrivals, transfers and discharges (and their cancels) to a FHIR "
        "endpoint as Da Vinci Unsolicited Notifications ($process-message)"
    )

    class Options(NotificationOptions, FhirServerOptions):
        base_url: str = Field(
            description="http(s) base URL of the FHIR endpoint: the Bundle is POSTed to "
            "{base_url}/$process-message"
        )

    options: Options

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        self.endpoint = f"{self.options.base_url}/$process-message"
        #: (encounter id, event) of the latest notifications rendered: the worker stores a
        #: routing batch's deliveries when the batch ends, so a cancel routed in the same
        #: batch as its admission finds the admission here, not yet in the store.
        self._rendered: deque[tuple[int, str]] = deque(maxlen=RECENTLY_RENDERED)

    def render(self, work: Work, idempotency_key: str) -> Outgoing:
        transition = work.data.get("encounter")
        if not isinstance(transition, Transition):
            raise ValueError(
                f"route {work.route!r}: fhir-notification needs the visit's transition; put "
                "'translate: v2-to-event' and 'enrich: encounter-state' before it"
            )
        metadata = {"destination": self.endpoint}
        kind, why = notification_event(transition, list(self.options.kinds))
        team = work.data.get("care_team")
        cancel = transition.kind in RETRACTS
        if kind is not None and cancel and self._delivered_here(transition, kind) is False:
            kind, why = None, f"no {_EVENTS[kind][0]} of this visit went to this endpoint"
        elif kind is not None and not cancel and isinstance(team, CareTeam) and team.opted_out:
            # A cancel still goes: it corrects what the receiver holds, and tells nothing new.
            kind, why = None, "the patient opted out of notifications"
        if kind is None:
            metadata.update(event="none", not_sent=why)
            return Outgoing(b"", FHIR_CONTENT_TYPE, idempotency_key, metadata)
        bundle = build_notification_bundle(
            work,
            transition,
            kind,
            idempotency_key,
            self.options,
            self.endpoint,
            store_id=store_id_of(self.context),
        )
        metadata["event"] = _EVENTS[kind][0]
        metadata["encounter_status"] = bundle["entry"][1]["resource"]["status"]
        if transition.encounter_id is not None:
            self._rendered.append((transition.encounter_id, metadata["event"]))
        payload = json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return Outgoing(payload, FHIR_CONTENT_TYPE, idempotency_key, metadata)

    def _delivered_here(self, transition: Transition, kind: str) -> bool | None:
        """Whether a ``kind`` notification of this visit went to this endpoint (or is on its
        way: a delivery not given up), from the store's deliveries; None without a store (a
        dry run), where the visit's state has to answer. A cancel is sent only then: the
        patient's opt-out, a discarded dead letter, or a forward added later may have kept
        the first from it. A dead letter not discarded counts (a retry sends it, and the
        cancel waits behind it in the patient's line), and so does one rendered moments ago
        whose delivery is not stored yet (the same routing batch)."""
        store = self.context.store
        if store is None or transition.encounter_id is None:
            return None
        event = _EVENTS[kind][0]
        query = (
            select(deliveries.c.metadata, deliveries.c.status)
            .select_from(
                deliveries.join(
                    encounter_events, deliveries.c.message_id == encounter_events.c.message_id
                )
            )
            .where(
                encounter_events.c.encounter_id == transition.encounter_id,
                deliveries.c.channel == self.name,
            )
        )
        with store.engine.connect() as conn:
            found = conn.execute(query).all()
        stored = False
        for text, status in found:
            with contextlib.suppress(ValueError, TypeError):
                metadata = json.loads(text or "{}")
                if metadata.get("destination") == self.endpoint and metadata.get("event") == event:
                    if status != DeliveryStatus.DISCARDED:
                        # A dead letter counts: the operator may retry it, and the cancel,
                        # held behind it in the patient's line, then follows it.
                        return True
                    stored = True  # given up for good: the receiver never had it
        return not stored and (transition.encounter_id, event) in self._rendered

    async def send(self, outgoing: Outgoing) -> str:
        event = outgoing.metadata.get("event", "")
        if not outgoing.payload:
            raise NothingToSend(outgoing.metadata.get("not_sent", "nothing to send"))
        url = self.endpoint
        headers = {
            "Content-Type": outgoing.content_type,
            "Accept": FHIR_CONTENT_TYPE,
            "Idempotency-Key": outgoing.idempotency_key,
        }
        if self.options.auth_header:
            headers["Authorization"] = self.options.auth_header
        try:
            async with self.request("POST", url, outgoing.payload, headers) as response:
                status = response.status_code
                if 200 <= status < 300:
                    await response.aread()
                    return self._accepted(response, status, event)
                await response.aread()
        except (httpx.TimeoutException, httpx.TransportError) as err:
            raise self.unreached("POST", url, err) from err
        raise self.refused("POST", url, response, said=outcome_text(response) or None)

    def _accepted(self, response: Any, status: int, event: str) -> str:
        """The receipt of a 2xx; a response message that reports an error raises."""
        code, said = _response_code(response)
        if code == "fatal-error":
            raise DeliveryError(
                f"POST {self.endpoint}: HTTP {status}, response message says fatal-error",
                retryable=False,
                said=said,
            )
        if code == "transient-error":
            raise DeliveryError(
                f"POST {self.endpoint}: HTTP {status}, response message says transient-error",
                said=said,
            )
        return f"HTTP {status} {event}".rstrip()


def _response_code(response: Any) -> tuple[str | None, str | None]:
    """(MessageHeader.response.code, the OperationOutcome's words) of a response message, or
    (None, None) when the body is no message Bundle (an empty 200, 202 or 204 is usual)."""
    try:
        body = response.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        return None, None
    resources = [e.get("resource") for e in body.get("entry") or [] if isinstance(e, dict)]
    header = next(
        (r for r in resources if isinstance(r, dict) and r.get("resourceType") == "MessageHeader"),
        None,
    )
    response = (header or {}).get("response")
    code = response.get("code") if isinstance(response, dict) else None
    outcome = next(
        (
            r
            for r in resources
            if isinstance(r, dict) and r.get("resourceType") == "OperationOutcome"
        ),
        None,
    )
    said = None
    if isinstance(outcome, dict):
        issues = [i.get("diagnostics") or i.get("code") for i in outcome.get("issue") or []]
        said = "; ".join(str(i) for i in issues if i) or None
    return (code if isinstance(code, str) else None), said
