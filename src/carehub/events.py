"""The canonical care event: one typed, JSON-ready record per inbound message.

Encounter state, notifications, referral tracking and FHIR output all read this model instead of
HL7 field paths, so the HL7 quirks (field positions, versions, escapes, time formats) are handled
once, in the translator, and every later feature sees the same shape. Every model forbids unknown
keys so a typo in code that builds or reloads an event fails loudly instead of silently dropping
data; every field but ``kind`` is optional because real feeds leave almost anything out.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema

__all__ = [
    "EVENT_KINDS",
    "MAX_DIAGNOSES",
    "NATIONAL_ID_AUTHORITIES",
    "NATIONAL_ID_TYPES",
    "Address",
    "CareEvent",
    "Contact",
    "DateAsSent",
    "Diagnosis",
    "Encounter",
    "EventKind",
    "HumanName",
    "Identifier",
    "Location",
    "Merge",
    "Organization",
    "PartialDate",
    "PartialDateTime",
    "Patient",
    "Practitioner",
    "Precision",
    "Referral",
    "date_as_sent",
    "event_kind",
    "facility_code",
    "has_time",
    "identifier_scope",
    "is_national_id",
    "parse_hl7_date",
    "parse_hl7_datetime",
    "scoped_identifier",
]

EventKind = Literal[
    "ed_registration",
    "registration",
    "admission",
    "transfer",
    "discharge",
    "update",
    "demographics",
    "cancel_admission",
    "cancel_transfer",
    "cancel_discharge",
    "merge",
    "referral_new",
    "referral_modify",
    "referral_cancel",
    "referral_status_request",
    "referral_response",
    "other",
]

EVENT_KINDS: tuple[str, ...] = EventKind.__args__  # type: ignore[attr-defined]

# ADT trigger -> kind (A04 is resolved separately: it depends on the patient class).
_ADT_KINDS: dict[str, str] = {
    "A01": "admission",
    "A06": "admission",  # outpatient -> inpatient, e.g. ED patient admitted
    "A02": "transfer",
    "A03": "discharge",
    "A08": "update",
    "A28": "demographics",
    "A31": "demographics",
    "A11": "cancel_admission",
    "A12": "cancel_transfer",
    "A13": "cancel_discharge",
    # Patient-identifier merges (re-key history to the surviving id). Account/visit-only merges
    # (A35, A41, A42) do not change who the patient is, so they stay "other".
    "A30": "merge",
    "A34": "merge",
    "A36": "merge",
    "A39": "merge",
    "A40": "merge",
}

_REF_KINDS: dict[str, str] = {
    "I12": "referral_new",
    "I13": "referral_modify",
    "I14": "referral_cancel",
    "I15": "referral_status_request",
}


def event_kind(message_type: str, trigger_event: str, patient_class: str | None = None) -> str:
    """Classify a message by MSH-9 type and trigger (and PV1-2 for A04, where E means an ED
    arrival: the CMS e-notification rule treats that differently from an outpatient visit)."""
    message_type = message_type.strip().upper()
    trigger_event = trigger_event.strip().upper()
    if message_type == "ADT":
        if trigger_event == "A04":
            return "ed_registration" if (patient_class or "").upper() == "E" else "registration"
        return _ADT_KINDS.get(trigger_event, "other")
    if message_type == "REF":
        return _REF_KINDS.get(trigger_event, "other")
    if message_type == "RRI" and trigger_event in _REF_KINDS:
        return "referral_response"
    return "other"


# -- HL7 time ----------------------------------------------------------------------------------

#: How much of a date or time the sender wrote, coarsest first.
Precision = Literal["year", "month", "day", "hour", "minute", "second"]
_PRECISIONS: tuple[Precision, ...] = Precision.__args__  # type: ignore[attr-defined]
_PRECISION_OF_LENGTH: dict[int, Precision] = dict(
    zip((4, 6, 8, 10, 12, 14), _PRECISIONS, strict=True)
)
_ZONES: dict[str, timezone | None] = {}


class _AsPrecise:
    """What PartialDate and PartialDateTime share: ``precision``, given as they are made (the
    whole value's own by default) and kept through copies and pickles (which date's own
    reduction forgets)."""

    precision: Precision
    _WHOLE: Precision

    def __new__(cls, *args: Any, precision: Precision | None = None, **kwargs: Any) -> Any:
        value = super().__new__(cls, *args, **kwargs)  # type: ignore[misc]
        value.precision = precision or cls._WHOLE
        return value

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        rebuild, args = super().__reduce_ex__(protocol)[:2]  # type: ignore[misc]
        return rebuild, args, {"precision": self.precision}


class PartialDate(_AsPrecise, date):
    """A date no more precise than the sender wrote it: HL7 allows ``1958`` or ``195803`` (a
    birth year is often all anyone knows), and so do FHIR and ISO 8601. It is the first day it
    covers (1958-01-01), so ages, sorting and comparisons work as for any date; ``precision``
    keeps how much was said, so what carehub writes out (FHIR, the event's JSON: see
    :func:`date_as_sent`) does not invent a month or a day."""

    _WHOLE = "day"


class PartialDateTime(_AsPrecise, datetime):
    """A date-time no more precise than the sender wrote it (``2026-0500`` is a year): the
    first moment it covers, with ``precision`` saying how much was said. Where a moment is
    needed (encounter times, ordering, the event's JSON) it is that moment; where the value is
    written for someone else (FHIR ``authoredOn``), :func:`date_as_sent` and :func:`has_time`
    keep it as precise as the sender. Times computed from it (``+ timedelta``, ``replace``)
    are whole moments again."""

    _WHOLE = "second"


def _precision(value: date) -> Precision:
    """How much of ``value`` the sender gave: a partial value's own, else all of it."""
    found = getattr(value, "precision", None)
    if found in _PRECISIONS:
        return found
    return "second" if isinstance(value, datetime) else "day"


def has_time(value: date) -> bool:
    """Whether the sender gave a time of day, not only a year, month or date."""
    return _PRECISIONS.index(_precision(value)) > _PRECISIONS.index("day")


def date_as_sent(value: date) -> str:
    """The calendar date of a date or date-time (as written, no zone shift) in ISO form, no
    more precise than the sender gave it: ``1958``, ``1958-03`` or ``1958-03-12``."""
    precision = _precision(value)
    if precision == "year":
        return f"{value.year:04d}"
    if precision == "month":
        return f"{value.year:04d}-{value.month:02d}"
    return f"{value.year:04d}-{value.month:02d}-{value.day:02d}"


def _zone(offset: str) -> timezone | None:
    """``+HHMM``/``-HHMM`` as a tzinfo (cached: a feed uses one or two offsets); None if bad."""
    zone = _ZONES.get(offset)
    if zone is None and offset not in _ZONES:
        hours, minutes = offset[1:3], offset[3:5]
        if hours.isdigit() and minutes.isdigit() and int(minutes) < 60 and int(hours) < 24:
            delta = timedelta(hours=int(hours), minutes=int(minutes))
            zone = timezone(-delta if offset[0] == "-" else delta)
        if len(_ZONES) < 256:  # junk offsets must not grow the cache without bound
            _ZONES[offset] = zone
    return zone


def parse_hl7_datetime(text: str | None) -> PartialDateTime | None:
    """An HL7 DTM/TS value (``YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]``) as a datetime:
    aware when the value carries an offset (``-0500``), naive otherwise, because guessing a zone
    would invent facts the sender did not give. Missing trailing parts are filled with their
    minimum (``2026`` is 2026-01-01 00:00) and ``precision`` says which parts were given. Junk,
    empty text and impossible dates give None; this never raises, since one bad field must not
    lose the whole event."""
    if not text:
        return None
    # A v2.5 TS may arrive whole (``time^precision``); only the first component is the time.
    body = text.split("^", 1)[0].strip() if "^" in text else text.strip()
    tz = None
    if len(body) > 5 and body[-5] in "+-":
        tz = _zone(body[-5:])
        if tz is None:
            return None
        body = body[:-5]
    fraction = ""
    if "." in body:
        body, fraction = body.split(".", 1)
        if not (fraction.isascii() and fraction.isdigit() and len(fraction) <= 4):
            return None
        if len(body) != 14:
            return None  # fractions of a second need the seconds
    precision = _PRECISION_OF_LENGTH.get(len(body))
    if precision is None or not (body.isascii() and body.isdigit()):
        return None
    try:
        return PartialDateTime(
            int(body[0:4]),
            int(body[4:6] or 1),
            int(body[6:8] or 1),
            int(body[8:10] or 0),
            int(body[10:12] or 0),
            int(body[12:14] or 0),
            int(fraction.ljust(6, "0")) if fraction else 0,
            tzinfo=tz,
            precision=precision,
        )
    except ValueError:
        return None


def parse_hl7_date(text: str | None) -> PartialDate | None:
    """An HL7 DT (or the date part of a DTM) as a date, as written (no zone shift: a birth date
    is a calendar date, not an instant) and as precise as written (``1958`` stays a year).
    Junk gives None; never raises."""
    moment = parse_hl7_datetime(text)
    if moment is None:
        return None
    precision = moment.precision if not has_time(moment) else "day"
    return PartialDate(moment.year, moment.month, moment.day, precision=precision)


_SHORT_ISO_DATE = re.compile(r"(\d{4})(?:-(\d{2}))?")


def _read_date_as_sent(value: Any) -> Any:
    """The event's JSON of a partial date (``1958``, ``1958-03``) back as a PartialDate; any
    other value goes on to pydantic's own date parsing."""
    if isinstance(value, str) and (found := _SHORT_ISO_DATE.fullmatch(value.strip())):
        year, month = found.groups()
        try:
            return PartialDate(
                int(year), int(month or 1), 1, precision="month" if month else "year"
            )
        except ValueError:
            return value  # pydantic names the problem
    return value


#: A date field of the event: a ``date`` in Python, as precise as the sender in JSON (``1958``,
#: ``1958-03`` or ``1958-03-12``), so no reader of the event mistakes an unknown month or day for
#: January or the 1st.
DateAsSent = Annotated[
    date,
    BeforeValidator(_read_date_as_sent),
    PlainSerializer(date_as_sent, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^[0-9]{4}(-[0-9]{2}(-[0-9]{2})?)?$",
            "description": "an ISO 8601 date as precise as the sender gave it: YYYY, YYYY-MM "
            "or YYYY-MM-DD",
        }
    ),
]


# -- building blocks ---------------------------------------------------------------------------


def display_name(name: dict[str, Any] | None, *, with_prefix: bool = False) -> str | None:
    """'Amara Okafor' (or 'Dr Samir Haddad') from a name in a care event's JSON form
    (HumanName, or a Practitioner's given/family/prefix); None when it holds no name."""
    if not name:
        return None
    parts = (name.get("prefix") if with_prefix else None, name.get("given"), name.get("family"))
    return " ".join(p for p in parts if p) or None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Identifier(_Model):
    """An id with who assigned it: identifiers are only unique within an authority (CX.4)."""

    value: str
    authority: str | None = None
    type_code: str | None = None  # HL7 table 0203: MR, SS, MB, VN, AN, NPI ...


def facility_code(hd: str | None, component: str = "^") -> str | None:
    """The code of a facility sent as an HD (MSH-4: namespace id^universal id^type): its
    namespace id, else its universal id; None when it names nothing."""
    if not hd:
        return None
    namespace, _, rest = hd.partition(component)
    universal = rest.partition(component)[0]
    return namespace.strip() or universal.strip() or None


def scoped_identifier(identifier: Identifier, scope: str | None) -> Identifier:
    """``identifier`` with ``scope`` (the sending facility's code) as its authority when the
    sender gave none: an MRN or a visit number without an assigning authority is only unique
    within the facility that sent it, so two hospitals' 55501 stay two patients."""
    if identifier.authority or not scope:
        return identifier
    return identifier.model_copy(update={"authority": scope})


#: HL7 table 0203 identifier types that are a person's national identifier: SS (Social
#: Security number), NI (national unique individual identifier), and NNxxx (national person
#: identifier, xxx an ISO 3166 country code) below.
NATIONAL_ID_TYPES = frozenset({"SS", "NI"})
#: Assigning authorities (CX.4, table 0363) that issue only national identifiers: the US
#: Social Security Administration, as feeds name it with or without the country.
NATIONAL_ID_AUTHORITIES = frozenset({"SSA", "USSSA"})


def is_national_id(identifier: Identifier) -> bool:
    """Whether an identifier is a national one (an SSN, a national person number), which a
    care event leaves out by default: nobody it goes to needs it to know the patient (the MRN
    does that), and it is the identifier most wanted for identity theft."""
    code = (identifier.type_code or "").strip().upper()
    if code in NATIONAL_ID_TYPES or (len(code) == 5 and code[:2] == "NN" and code[2:].isalpha()):
        return True
    return (identifier.authority or "").strip().upper() in NATIONAL_ID_AUTHORITIES


class HumanName(_Model):
    family: str | None = None
    given: str | None = None
    middle: str | None = None
    prefix: str | None = None
    suffix: str | None = None


class Address(_Model):
    line1: str | None = None
    line2: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: str | None = None


class Practitioner(_Model):
    """A clinician (XCN, ROL or PRD). ``id`` is usually the NPI; ``role`` is the HL7 code for why
    they appear (PP primary care, RP referring, RT referred-to, AT attending ...)."""

    id: str | None = None
    id_authority: str | None = None
    id_type: str | None = None
    family: str | None = None
    given: str | None = None
    middle: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    role: str | None = None
    organization: str | None = None
    address: Address | None = None
    phone: str | None = None


class Organization(_Model):
    """A facility, practice or community organisation (e.g. a referred-to food bank)."""

    name: str | None = None
    id: str | None = None
    role: str | None = None
    address: Address | None = None
    phone: str | None = None


class Location(_Model):
    """A PL location. ``facility`` is the treating facility used for CoP notifications."""

    point_of_care: str | None = None
    room: str | None = None
    bed: str | None = None
    facility: str | None = None
    description: str | None = None


#: The most diagnoses a care event keeps, the first in the message's order. A real ADT carries
#: tens at most (a UB-04 claim has room for 25); one of 20,000 DG1s made the event, the visit's
#: snapshot and its FHIR bundle megabytes each, and storing them held the store's write lock
#: for a fifth of a second while every sender's intake waited.
MAX_DIAGNOSES = 100


class Diagnosis(_Model):
    """One DG1: ``type`` is HL7 table 0052 (A admitting, W working, F final)."""

    code: str | None = None
    system: str | None = None
    display: str | None = None
    type: str | None = None


class Contact(_Model):
    """One CTD contact, with the PRD role it follows (RP/RT) when it belongs to a provider."""

    role: str | None = None
    name: HumanName | None = None
    address: Address | None = None
    phone: str | None = None
    provider_role: str | None = None


# -- the event ---------------------------------------------------------------------------------


class Patient(_Model):
    """The patient as the sender knows them. Key on (value, authority, type) of ``primary``,
    never on the bare value: different facilities reuse the same numbers."""

    identifiers: list[Identifier] = Field(default_factory=list)
    primary: Identifier | None = None
    #: The identifier the store keys this patient on (visits, referrals, the roster), chosen
    #: from every PID-3 repetition as ``primary`` is when national identifiers are kept, so a
    #: patient known only by an SSN is still tracked, and keys do not move when national
    #: identifiers are left out of what is sent. One sent without an assigning authority has
    #: the sending facility's code (MSH-4) as its authority (see scoped_identifier). Never
    #: sent: not part of the event's JSON.
    key: Identifier | None = Field(default=None, exclude=True)
    #: ``key`` as sent, when the sending facility gave it its authority: what the store keyed
    #: this patient on before, so visits recorded then are still found. Never sent.
    unscoped_key: Identifier | None = Field(default=None, exclude=True)
    account_number: Identifier | None = None  # PID-18
    name: HumanName | None = None
    birth_date: DateAsSent | None = None
    sex: str | None = None
    address: Address | None = None
    phone: str | None = None
    pcp: Practitioner | None = None  # PD1-4, else ROL PP/PCP, else PRD PP
    #: PID-29 and PID-30: a death the sender reports whatever the visit, so follow-ups owed to
    #: the patient can close; ``deceased`` False is an explicit "N" (a report taken back).
    death_time: datetime | None = None  # PID-29
    deceased: bool | None = None  # PID-30


def identifier_scope(event: CareEvent | None) -> str | None:
    """What scopes the event's identifiers sent without an assigning authority: the sending
    facility's code (MSH-4), as the translator scoped Patient.key."""
    return facility_code(event.sending_facility) if event is not None else None


def patient_key_identifier(patient: Patient | None) -> Identifier | None:
    """The identifier a patient is keyed on in the store: Patient.key, else ``primary`` (an
    event built by hand, or read back from JSON, has no key)."""
    if patient is None:
        return None
    return patient.key or patient.primary


class Encounter(_Model):
    """One visit as PV1/PV2 describe it; PV1-19 is the key that stitches ADTs into a visit."""

    visit_number: Identifier | None = None  # PV1-19
    patient_class: str | None = None  # PV1-2, table 0004 (E, I, O, P, R, B ...)
    location: Location | None = None  # PV1-3
    prior_location: Location | None = None  # PV1-6
    attending: Practitioner | None = None  # PV1-7
    referring: Practitioner | None = None  # PV1-8
    admitting: Practitioner | None = None  # PV1-17
    hospital_service: str | None = None  # PV1-10
    admit_type: str | None = None  # PV1-4
    admit_source: str | None = None  # PV1-14
    admit_reason: str | None = None  # PV2-3
    admit_time: datetime | None = None  # PV1-44
    discharge_time: datetime | None = None  # PV1-45
    discharge_disposition: str | None = None  # PV1-36, table 0112 (03 = SNF ...)
    discharged_to: str | None = None  # PV1-37.1 code
    discharged_to_name: str | None = None  # PV1-37.1 text (see the translator for a quirk)
    facility: str | None = None  # PV1-3.4, else MSH-4


class Referral(_Model):
    """An RF1 referral with its parties. Codes are kept as sent (tables 0280-0284, 0336)."""

    referral_id: Identifier | None = None  # RF1-6, else RF1-11
    external_id: Identifier | None = None  # RF1-11
    status: str | None = None  # RF1-1, table 0283: A accepted, E expired, P pending, R rejected
    priority: str | None = None  # RF1-2
    type: str | None = None  # RF1-3
    disposition: str | None = None  # RF1-4
    category: str | None = None  # RF1-5
    reason_code: str | None = None  # RF1-10.1
    reason: str | None = None  # RF1-10 text, else RF1-14 (v2.7+ reason text)
    effective_date: DateAsSent | None = None  # RF1-7
    expiration_date: DateAsSent | None = None  # RF1-8
    process_date: DateAsSent | None = None  # RF1-9
    referring: Practitioner | None = None  # PRD role RP
    referring_organization: Organization | None = None  # PRD-10 of RP, or an RP that is no person
    referred_to: Practitioner | Organization | None = None  # PRD role RT
    contacts: list[Contact] = Field(default_factory=list)  # CTD
    notes: list[str] = Field(default_factory=list)  # NTE not attached to an OBR/OBX


class Merge(_Model):
    """One PID/MRG pair: the surviving patient and the identifiers it absorbed."""

    surviving: Identifier | None = None
    prior_identifiers: list[Identifier] = Field(default_factory=list)  # MRG-1
    #: Patient.key of the survivor and every MRG-1 identifier, national ones too: what the
    #: store re-keys (never sent, as Patient.key).
    surviving_key: Identifier | None = Field(default=None, exclude=True)
    prior_keys: list[Identifier] = Field(default_factory=list, exclude=True)
    prior_account_number: Identifier | None = None  # MRG-3
    prior_visit_number: Identifier | None = None  # MRG-5


class CareEvent(_Model):
    """One message, classified and read. ``kind`` drives routing and notification; the rest is
    the data a notification, the encounter state or a FHIR bundle needs."""

    kind: EventKind
    message_type: str
    trigger_event: str
    structure: str | None = None
    message_control_id: str | None = None
    occurred_at: datetime | None = None  # EVN-2, else MSH-7
    sending_application: str | None = None  # MSH-3 as the store records it
    sending_facility: str | None = None  # MSH-4 as the store records it
    patient: Patient | None = None
    encounter: Encounter | None = None
    diagnoses: list[Diagnosis] = Field(default_factory=list)
    #: DG1 segments after the first MAX_DIAGNOSES diagnoses, left out unread: the diagnoses
    #: above are not all the message sent. Not given when none were left out.
    diagnoses_left_out: int | None = None
    referral: Referral | None = None
    merged_identifiers: list[Identifier] = Field(default_factory=list)  # MRG-1 of the first PID
    merges: list[Merge] = Field(default_factory=list)  # every PID/MRG pair (A40 may repeat)
    raw_version: str | None = None  # MSH-12
    #: Fields the sender sent as the HL7 explicit null ``""``, meaning "delete the value"
    #: (``patient.phone``, ``encounter.attending`` ...); a field left empty is only not sent.
    cleared: list[str] | None = None
