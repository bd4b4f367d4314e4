"""HL7 v2 -> CareEvent, read through the lazy MessageView.

A full hl7apy parse costs 20-70 ms a message; routing runs one message at a time, so this reads
only the segments it needs and splits each field once, by hand (tens of microseconds). It never
raises on odd content that the view accepts: a missing or malformed field becomes None.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from carehub.components import ComponentOptions, JSONText, Translator, Work
from carehub.events import (
    MAX_DIAGNOSES,
    Address,
    CareEvent,
    Contact,
    Diagnosis,
    Encounter,
    HumanName,
    Identifier,
    Location,
    Merge,
    Organization,
    Patient,
    Practitioner,
    Referral,
    event_kind,
    facility_code,
    is_national_id,
    parse_hl7_date,
    parse_hl7_datetime,
    scoped_identifier,
)
from carehub.hl7.header import read_cx, read_hd, trigger_event
from carehub.hl7.view import MessageView, unescape

__all__ = ["V2ToEvent", "translate_v2_to_event"]

log = logging.getLogger(__name__)

_NOT_PHONES = frozenset({"INTERNET", "X.400"})
# NTEs after these segments annotate a result or order, not the referral itself.
_OBSERVATION_SEGMENTS = frozenset({"OBR", "OBX", "ORC", "SPM", "TQ1", "TQ2"})


class _Reader:
    """Splitting helpers bound to one message's delimiters. Splits happen before unescaping,
    so an escaped delimiter (``\\S\\``) never splits a value."""

    __slots__ = ("comp", "esc", "rep", "seps", "sub", "view")

    def __init__(self, view: MessageView) -> None:
        self.view = view
        self.seps = view.separators
        self.rep = self.seps.repetition
        self.comp = self.seps.component
        self.sub = self.seps.subcomponent
        self.esc = self.seps.escape

    # -- raw access ----------------------------------------------------------------------
    @staticmethod
    def field(fields: list[str], number: int) -> str:
        return fields[number] if number < len(fields) else ""

    def reps(self, fields: list[str], number: int) -> list[str]:
        value = fields[number] if number < len(fields) else ""
        return value.split(self.rep) if value else []

    def first(self, fields: list[str], number: int) -> list[str]:
        """Components (raw) of the first repetition of a field; [] when empty."""
        value = fields[number] if number < len(fields) else ""
        if not value:
            return []
        if self.rep in value:
            value = value.split(self.rep, 1)[0]
        return value.split(self.comp)

    @staticmethod
    def is_null(fields: list[str], number: int) -> bool:
        """Whether a field is the HL7 explicit null ``""`` ("delete the value"), unlike an
        empty field, which only leaves the value out."""
        return number < len(fields) and fields[number].strip() == '""'

    # -- leaves --------------------------------------------------------------------------
    # leaf() and text() run ~150 times a message, so they are written for speed, not reuse.
    def text(self, raw: str) -> str | None:
        """Unescaped, stripped text; None for empty and for the HL7 explicit null ``""``."""
        if not raw:
            return None
        if self.esc in raw:
            raw = unescape(raw, self.seps)
        raw = raw.strip()
        return raw if raw and raw != '""' else None

    def leaf(self, comps: list[str], number: int) -> str | None:
        """First subcomponent of component ``number`` (1-based)."""
        if number > len(comps):
            return None
        value = comps[number - 1]
        if not value:
            return None
        if self.sub in value:
            value = value.split(self.sub, 1)[0]
        if self.esc in value:
            value = unescape(value, self.seps)
        value = value.strip()
        return value if value and value != '""' else None

    def subs(self, comps: list[str], number: int) -> list[str | None]:
        if number > len(comps) or not comps[number - 1]:
            return []
        return [self.text(part) for part in comps[number - 1].split(self.sub)]

    def joined(self, comps: list[str], number: int) -> str | None:
        """All subcomponents of a component joined by spaces (SAD ``1000&Hospital Lane``)."""
        if number <= len(comps) and self.sub not in comps[number - 1]:
            return self.leaf(comps, number)
        parts = [part for part in self.subs(comps, number) if part]
        return " ".join(parts) if parts else None

    def hd(self, comps: list[str], number: int) -> str | None:
        """An HD (or HD-typed component): namespace id, else universal id (read_hd)."""
        if number > len(comps):
            return None
        return read_hd(comps[number - 1], self.seps) or None

    # -- data types ----------------------------------------------------------------------
    def cx(self, comps: list[str]) -> Identifier | None:
        """A CX read as intake reads PID-3 (carehub.hl7.header.read_cx), so that Patient.key
        and the order key of the message name the patient alike."""
        found = read_cx(comps, self.seps)
        if found is None:
            return None
        return Identifier(
            value=found.value,
            authority=found.authority or None,
            type_code=found.type_code or None,
        )

    def cx_list(self, fields: list[str], number: int, keep_national_ids: bool) -> list[Identifier]:
        """The identifiers of a repeating CX field, national ones only if asked to keep them."""
        found = [
            ident for rep in self.reps(fields, number) if (ident := self.cx(rep.split(self.comp)))
        ]
        return found if keep_national_ids else [i for i in found if not is_national_id(i)]

    def ei(self, comps: list[str]) -> Identifier | None:
        value = self.leaf(comps, 1)
        if value is None:
            return None
        return Identifier(value=value, authority=self.leaf(comps, 2) or self.leaf(comps, 3))

    def xpn(self, comps: list[str]) -> HumanName | None:
        if not comps:
            return None
        name = HumanName(
            family=self.leaf(comps, 1),
            given=self.leaf(comps, 2),
            middle=self.leaf(comps, 3),
            suffix=self.leaf(comps, 4),
            prefix=self.leaf(comps, 5),
        )
        return name if (name.family or name.given) else None

    def xcn(self, comps: list[str], role: str | None = None) -> Practitioner | None:
        ident = self.leaf(comps, 1)
        family = self.leaf(comps, 2)
        given = self.leaf(comps, 3)
        if not (ident or family or given):
            return None
        return Practitioner(
            id=ident,
            id_authority=self.hd(comps, 9),
            id_type=self.leaf(comps, 13),
            family=family,
            given=given,
            middle=self.leaf(comps, 4),
            suffix=self.leaf(comps, 5),
            prefix=self.leaf(comps, 6),
            role=role,
        )

    def xad(self, comps: list[str]) -> Address | None:
        if not comps:
            return None
        address = Address(
            line1=self.joined(comps, 1),
            line2=self.leaf(comps, 2),
            city=self.leaf(comps, 3),
            state=self.leaf(comps, 4),
            postal_code=self.leaf(comps, 5),
            country=self.leaf(comps, 6),
        )
        return address if any((address.line1, address.city, address.postal_code)) else None

    def xtn(self, fields: list[str], number: int) -> str | None:
        """The first telephone number of an XTN list (e-mail and X.400 entries are skipped)."""
        for repetition in self.reps(fields, number):
            comps = repetition.split(self.comp)
            if (self.leaf(comps, 3) or "").upper() in _NOT_PHONES:
                continue
            number_text = self.leaf(comps, 1)
            if number_text:
                return number_text
            local = self.leaf(comps, 7)
            if local:
                country, area, extension = (self.leaf(comps, i) for i in (5, 6, 8))
                parts = [f"+{country}" if country else None, area, local]
                text = " ".join(part for part in parts if part)
                return f"{text} x{extension}" if extension else text
            unformatted = self.leaf(comps, 12)
            if unformatted:
                return unformatted
        return None

    def pl(self, comps: list[str]) -> Location | None:
        if not comps:
            return None
        location = Location(
            point_of_care=self.leaf(comps, 1),
            room=self.leaf(comps, 2),
            bed=self.leaf(comps, 3),
            facility=self.hd(comps, 4),
            description=self.leaf(comps, 9),
        )
        if location.point_of_care or location.room or location.bed or location.facility:
            return location
        return location if location.description else None


# -- segments ----------------------------------------------------------------------------------


def _primary(identifiers: list[Identifier]) -> Identifier | None:
    """The identifier that names the patient: the MRN (type MR), else the first; of PID-3,
    else PID-2, the choice carehub.hl7.header.primary_patient_id makes for intake's key."""
    found = next((i for i in identifiers if (i.type_code or "").upper() == "MR"), None)
    return found or (identifiers[0] if identifiers else None)


def _patient(r: _Reader, fields: list[str], keep_national_ids: bool, scope: str | None) -> Patient:
    every = r.cx_list(fields, 3, keep_national_ids=True)
    if not every:
        # Versions 2.1-2.3 often carry the external id in PID-2 only.
        every = r.cx_list(fields, 2, keep_national_ids=True)
    identifiers = every if keep_national_ids else [i for i in every if not is_national_id(i)]
    names = r.reps(fields, 5)
    legal = next((n for n in names if r.leaf(n.split(r.comp), 7) == "L"), names[0] if names else "")
    # Keyed as before national identifiers were left out, so keys do not move and a patient
    # known only by an SSN is still tracked; one without an assigning authority within the
    # sending facility (Patient.key is never sent).
    as_sent = _primary(every)
    key = scoped_identifier(as_sent, scope) if as_sent is not None else None
    return Patient(
        identifiers=identifiers,
        primary=_primary(identifiers),
        key=key,
        unscoped_key=as_sent if key is not as_sent else None,
        account_number=r.cx(r.first(fields, 18)),
        name=r.xpn(legal.split(r.comp)) if legal else None,
        birth_date=parse_hl7_date(r.leaf(r.first(fields, 7), 1)),
        sex=r.leaf(r.first(fields, 8), 1),
        address=r.xad(r.first(fields, 11)),
        phone=r.xtn(fields, 13),
        death_time=parse_hl7_datetime(r.leaf(r.first(fields, 29), 1)),
        deceased=_yes_no(r.leaf(r.first(fields, 30), 1)),
    )


def _yes_no(value: str | None) -> bool | None:
    """An HL7 ID of table 0136 (PID-30): Y is True, N is False, anything else unknown."""
    flag = (value or "").strip().upper()
    return True if flag == "Y" else False if flag == "N" else None


def _discharged_to(r: _Reader, comps: list[str]) -> tuple[str | None, str | None]:
    """PV1-37 (DLD): code and name. The name is DLD.1's CWE text (v2.7+); some senders put it
    in DLD.2 (the effective date) instead, e.g. ``SNF^Maple Grove Skilled Nursing``, so a DLD.2
    that is not a date is taken as the name."""
    subs = r.subs(comps, 1)
    code = subs[0] if subs else None
    name = subs[1] if len(subs) > 1 else None
    if name is None:
        second = r.leaf(comps, 2)
        if second and parse_hl7_datetime(second) is None:
            name = second
    return code, name


def _cleared(r: _Reader, fields: list[str], parts: dict[int, str]) -> list[str]:
    """The fields of ``parts`` (number -> the event field it fills) sent as ``""``."""
    return [name for number, name in parts.items() if r.is_null(fields, number)]


#: The fields carehub keeps across a visit's messages whose explicit null it honours: PID-11
#: and PID-13 (the patient's address and phone), PV1-7, PV1-8 and PV1-17 (the attending,
#: referring and admitting doctors) and PV1-37 (where the patient was discharged to).
_PID_NULLS = {11: "patient.address", 13: "patient.phone"}
_PV1_NULLS = {
    7: "encounter.attending",
    8: "encounter.referring",
    17: "encounter.admitting",
    37: "encounter.discharged_to",
}


def _encounter(r: _Reader, fields: list[str], sending_facility: str | None) -> Encounter:
    location = r.pl(r.first(fields, 3))
    discharged_to, discharged_to_name = _discharged_to(r, r.first(fields, 37))
    return Encounter(
        visit_number=r.cx(r.first(fields, 19)),
        patient_class=(r.leaf(r.first(fields, 2), 1) or "").upper() or None,
        location=location,
        prior_location=r.pl(r.first(fields, 6)),
        attending=r.xcn(r.first(fields, 7), "AT"),
        referring=r.xcn(r.first(fields, 8), "RP"),
        admitting=r.xcn(r.first(fields, 17), "AD"),
        hospital_service=r.leaf(r.first(fields, 10), 1),
        admit_type=r.leaf(r.first(fields, 4), 1),
        admit_source=r.leaf(r.first(fields, 14), 1),
        admit_time=parse_hl7_datetime(r.leaf(r.first(fields, 44), 1)),
        discharge_time=parse_hl7_datetime(r.leaf(r.first(fields, 45), 1)),
        discharge_disposition=r.leaf(r.first(fields, 36), 1),
        discharged_to=discharged_to,
        discharged_to_name=discharged_to_name,
        # PV1-3.4 names the treating facility (DirectTrust map); MSH-4 may be an HIE or an
        # interface engine, so it is only the fallback.
        facility=(location.facility if location else None) or sending_facility,
    )


def _diagnosis(r: _Reader, fields: list[str]) -> Diagnosis | None:
    code = r.first(fields, 3)
    diagnosis = Diagnosis(
        code=r.leaf(code, 1),
        system=r.leaf(code, 3) or r.leaf(r.first(fields, 2), 1),
        display=r.leaf(code, 2) or r.text(r.field(fields, 4)),
        type=r.leaf(r.first(fields, 6), 1),
    )
    return diagnosis if (diagnosis.code or diagnosis.display) else None


def _diagnoses(r: _Reader, view: MessageView, positions: list[int]) -> tuple[list[Diagnosis], int]:
    """The first MAX_DIAGNOSES diagnoses of the DG1 segments at ``positions``, and how many
    segments after them were left out unread (see MAX_DIAGNOSES for why there is a cap)."""
    diagnoses: list[Diagnosis] = []
    for read, position in enumerate(positions):
        if len(diagnoses) == MAX_DIAGNOSES:
            return diagnoses, len(positions) - read
        if diagnosis := _diagnosis(r, view.fields(position)):
            diagnoses.append(diagnosis)
    return diagnoses, 0


def _pln_type(r: _Reader, comps: list[str]) -> str | None:
    """PLN.2 (table 0338). Some senders put the type after empty components
    (``1184629371^^^^NPI``); take the last non-date text then."""
    kind = r.leaf(comps, 2)
    if kind:
        return kind
    for number in range(len(comps), 2, -1):
        text = r.leaf(comps, number)
        if text and parse_hl7_datetime(text) is None:
            return text
    return None


def _prd_party(
    r: _Reader, fields: list[str], role: str | None
) -> tuple[Practitioner | None, Organization | None]:
    """A PRD as a person and/or an organisation. PRD-2 is an XPN, but community organisations
    are often sent there as a bare name with no given name; PRD-10 (v2.7+) is the organisation."""
    name = r.first(fields, 2)
    family, given = r.leaf(name, 1), r.leaf(name, 2)
    middle, prefix, degree = r.leaf(name, 3), r.leaf(name, 5), r.leaf(name, 6)
    pln = r.first(fields, 7)
    ident, ident_type = r.leaf(pln, 1), _pln_type(r, pln)
    address = r.xad(r.first(fields, 3))
    phone = r.xtn(fields, 5)
    org_comps = r.first(fields, 10)
    org_name = r.leaf(org_comps, 1)
    organization = None
    if org_name:
        organization = Organization(
            name=org_name,
            id=r.leaf(org_comps, 10) or r.leaf(org_comps, 3),
            role=role,
            address=r.xad(r.first(fields, 11)),
            phone=r.xtn(fields, 13),
        )
    if given or middle or prefix or degree:
        person = Practitioner(
            id=ident,
            id_type=ident_type,
            id_authority=r.leaf(pln, 3),
            family=family,
            given=given,
            middle=middle,
            prefix=prefix,
            suffix=r.leaf(name, 4),
            role=role,
            organization=org_name,
            address=address,
            phone=phone,
        )
        return person, organization
    if family:
        return None, Organization(name=family, id=ident, role=role, address=address, phone=phone)
    if ident:
        return Practitioner(id=ident, id_type=ident_type, role=role), organization
    return None, organization


#: PRD-1 roles (HL7 table 0286) the referral reads, in the order one is taken when a PRD
#: gives several: the receiving party first, since that is where the referral goes.
_READ_ROLES = ("RT", "RP", "PP", "PCP")


def _provider_role(r: _Reader, fields: list[str]) -> str | None:
    """PRD-1, which repeats (``CP^Consulting provider~RT^Referred to provider``): the role
    among its repetitions that the referral reads, else the first one given."""
    roles = [role.upper() for rep in r.reps(fields, 1) if (role := r.leaf(rep.split(r.comp), 1))]
    return next((role for role in _READ_ROLES if role in roles), roles[0] if roles else None)


def _referral(
    r: _Reader, rf1: list[str] | None, names: list[str]
) -> tuple[Referral, Practitioner | None]:
    """RF1, PRD, CTD and the referral-level NTEs; also returns a PRD-PP as a PCP candidate."""
    view = r.view
    rf1 = rf1 or []
    referring: Practitioner | None = None
    referring_org: Organization | None = None
    referred_to: Practitioner | Organization | None = None
    pcp: Practitioner | None = None
    contacts: list[Contact] = []
    notes: list[str] = []
    head = ""  # the segment a CTD/NTE belongs to
    head_role: str | None = None
    for position, name in enumerate(names):
        if name == "PRD":
            fields = view.fields(position)
            role = _provider_role(r, fields)
            head, head_role = name, role
            person, org = _prd_party(r, fields, role)
            if role == "RP" and referring is None and referring_org is None:
                referring, referring_org = person, org
            elif role == "RT" and referred_to is None:
                referred_to = person or org
            elif role in ("PP", "PCP") and pcp is None:
                pcp = person
        elif name == "CTD":
            fields = view.fields(position)
            contacts.append(
                Contact(
                    role=r.leaf(r.first(fields, 1), 1),
                    name=r.xpn(r.first(fields, 2)),
                    address=r.xad(r.first(fields, 3)),
                    phone=r.xtn(fields, 5),
                    provider_role=head_role if head == "PRD" else None,
                )
            )
        elif name == "NTE":
            if head not in _OBSERVATION_SEGMENTS:
                fields = view.fields(position)
                lines = [text for rep in r.reps(fields, 3) if (text := r.text(rep))]
                if lines:
                    notes.append("\n".join(lines))
        else:
            head, head_role = name, None

    reason = r.first(rf1, 10)
    referral = Referral(
        referral_id=r.ei(r.first(rf1, 6)) or r.ei(r.first(rf1, 11)),
        external_id=r.ei(r.first(rf1, 11)),
        status=r.leaf(r.first(rf1, 1), 1),
        priority=r.leaf(r.first(rf1, 2), 1),
        type=r.leaf(r.first(rf1, 3), 1),
        disposition=r.leaf(r.first(rf1, 4), 1),
        category=r.leaf(r.first(rf1, 5), 1),
        reason_code=r.leaf(reason, 1),
        reason=r.leaf(reason, 2) or r.text(r.field(rf1, 14)) or r.leaf(reason, 1),
        effective_date=parse_hl7_date(r.leaf(r.first(rf1, 7), 1)),
        expiration_date=parse_hl7_date(r.leaf(r.first(rf1, 8), 1)),
        process_date=parse_hl7_date(r.leaf(r.first(rf1, 9), 1)),
        referring=referring,
        referring_organization=referring_org,
        referred_to=referred_to,
        contacts=contacts,
        notes=notes,
    )
    return referral, pcp


# -- the translation ---------------------------------------------------------------------------


def translate_v2_to_event(view: MessageView, *, keep_national_ids: bool = False) -> CareEvent:
    """Read one message into a CareEvent (see carehub.events for what each field means).

    National identifiers (an SSN: carehub.events.is_national_id) are left out of the
    patient's and the merges' identifiers unless ``keep_national_ids``: minimum necessary,
    since every step and channel after this one sees the event, and the MRN identifies the
    patient. The primary identifier is then chosen among those kept."""
    r = _Reader(view)
    names = view.segment_names()
    msh = view.fields(0)
    msg = r.first(msh, 9)
    message_type = (r.leaf(msg, 1) or "").upper()
    # The trigger event intake stored and route conditions tested: MSH-9.2, else EVN-1.
    trigger = trigger_event(view).upper()

    positions: dict[str, list[int]] = {}
    for position, name in enumerate(names):
        positions.setdefault(name, []).append(position)

    def first(name: str) -> list[str] | None:
        found = positions.get(name)
        return view.fields(found[0]) if found else None

    evn = first("EVN")
    occurred_at = None
    if evn is not None:
        occurred_at = parse_hl7_datetime(r.leaf(r.first(evn, 2), 1))
    if occurred_at is None:
        occurred_at = parse_hl7_datetime(r.leaf(r.first(msh, 7), 1))

    facility_field = r.field(msh, 4)
    facility = r.hd(facility_field.split(r.comp), 1) if facility_field else None
    sending_facility = view.get("MSH-4") or None
    # What scopes an identifier sent without an assigning authority: read from MSH-4 as the
    # event records it, as every later step reads it (carehub.events.identifier_scope).
    scope = facility_code(sending_facility)
    cleared: list[str] = []

    # Patient(s): the first PID is the event's patient; each MRG merges into the PID before it.
    patient: Patient | None = None
    merges: list[Merge] = []
    surviving: Identifier | None = None
    surviving_key: Identifier | None = None
    for position in sorted(positions.get("PID", []) + positions.get("MRG", [])):
        fields = view.fields(position)
        if names[position] == "PID":
            current = _patient(r, fields, keep_national_ids, scope)
            surviving, surviving_key = current.primary, current.key
            if patient is None:
                patient = current
                cleared += _cleared(r, fields, _PID_NULLS)
            continue
        prior_keys = r.cx_list(fields, 1, keep_national_ids=True)
        merges.append(
            Merge(
                surviving=surviving,
                prior_identifiers=[
                    i for i in prior_keys if keep_national_ids or not is_national_id(i)
                ],
                surviving_key=surviving_key,
                prior_keys=prior_keys,
                prior_account_number=r.cx(r.first(fields, 3)),
                prior_visit_number=r.cx(r.first(fields, 5)),
            )
        )

    if patient is not None:
        pd1 = first("PD1")
        pcp = r.xcn(r.first(pd1, 4), "PP") if pd1 is not None else None
        if pcp is None:
            for position in positions.get("ROL", []):
                fields = view.fields(position)
                if (r.leaf(r.first(fields, 3), 1) or "").upper() in ("PP", "PCP"):
                    pcp = r.xcn(r.first(fields, 4), "PP")
                    if pcp is not None:
                        break
        if pcp is not None:
            patient.pcp = pcp

    pv1 = first("PV1")
    encounter = _encounter(r, pv1, facility) if pv1 is not None else None
    if pv1 is not None:
        cleared += _cleared(r, pv1, _PV1_NULLS)
    pv2 = first("PV2")
    if encounter is not None and pv2 is not None:
        admit_reason = r.first(pv2, 3)
        encounter.admit_reason = r.leaf(admit_reason, 2) or r.leaf(admit_reason, 1)

    diagnoses, diagnoses_left_out = _diagnoses(r, view, positions.get("DG1", []))
    if diagnoses_left_out:
        # No identifiers: the count and the message type tell an operator what happened.
        log.info(
            "%s^%s: kept the first %d diagnoses, left out %d more DG1 segments",
            message_type,
            trigger,
            len(diagnoses),
            diagnoses_left_out,
        )

    referral = None
    if message_type in ("REF", "RRI"):
        referral, prd_pcp = _referral(r, first("RF1"), names)
        if patient is not None and patient.pcp is None and prd_pcp is not None:
            patient.pcp = prd_pcp

    return CareEvent(
        kind=event_kind(message_type, trigger, encounter.patient_class if encounter else None),
        message_type=message_type,
        trigger_event=trigger,
        structure=r.leaf(msg, 3),
        message_control_id=r.text(r.field(msh, 10)),
        occurred_at=occurred_at,
        # Whole-field text, exactly as MessageHeader (and so the store) records the sender.
        sending_application=view.get("MSH-3") or None,
        sending_facility=sending_facility,
        patient=patient,
        encounter=encounter,
        diagnoses=diagnoses,
        diagnoses_left_out=diagnoses_left_out or None,
        referral=referral,
        merged_identifiers=merges[0].prior_identifiers if merges else [],
        merges=merges,
        raw_version=r.leaf(r.first(msh, 12), 1),
        cleared=cleared or None,
    )


class V2ToEvent(Translator):
    """Route step that turns the v2 message into the canonical care event (``work.event``)."""

    name = "v2-to-event"
    description = (
        "Read the HL7 v2 message (ADT, REF/RRI, others as 'other') into a typed care event: "
        "kind, patient, encounter, diagnoses, referral and merges."
    )

    class Options(ComponentOptions):
        """The mapping is fixed so every route sees the same event shape; only whether it
        carries national identifiers is chosen."""

        keep_national_ids: bool = Field(
            False,
            description="keep national identifiers (PID-3 or MRG-1 typed SS, NI or NNxxx, or "
            "assigned by SSA/USSSA) in the event; left out by default (minimum necessary: "
            "the MRN identifies the patient)",
        )

    options: Options

    def translate(self, work: Work) -> Any:
        # One message taking several routes is translated once per choice of identifiers; the
        # event is read-only to later steps (they add to work.data), so routes can share it.
        view = work.view
        keep = self.options.keep_national_ids
        memo_key = "care_event:national_ids" if keep else "care_event"
        event = view.memo.get(memo_key)
        if event is None:
            event = view.memo[memo_key] = translate_v2_to_event(view, keep_national_ids=keep)
        work.event = event
        return JSONText(event.model_dump_json(exclude_none=True))
