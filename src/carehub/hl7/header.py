"""The header facts intake stores and acknowledges with, read through the lazy view.

A patient is named here once for the whole hub: ``primary_patient_id`` is what intake keys a
message by (its order key, its work-queue partition, ``messages list --patient``), and the
event translator reads PID-3 through the same ``read_cx``, so the care records' Patient.key
names the patient as the order key does. Likewise ``trigger_event`` is the one trigger event
that is stored, that route conditions test and that the translator records.
"""

from __future__ import annotations

from dataclasses import dataclass

from carehub.hl7.view import MessageView, Separators, unescape


@dataclass(slots=True, frozen=True)
class PatientId:
    """One PID-3 identifier with the authority that assigned it."""

    value: str
    authority: str = ""
    type_code: str = ""


@dataclass(slots=True, frozen=True)
class MessageHeader:
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    message_type: str
    trigger_event: str
    structure: str
    control_id: str
    processing_id: str
    version: str
    accept_ack_type: str  # MSH-15
    application_ack_type: str  # MSH-16
    patient: PatientId | None

    @classmethod
    def read(cls, view: MessageView) -> MessageHeader:
        seps = view.separators
        msh = view.fields(0)
        count = len(msh)

        def text(number: int) -> str:
            value = msh[number] if number < count else ""
            return unescape(value, seps) if seps.escape in value else value

        def first_components(number: int, wanted: int) -> list[str]:
            value = msh[number] if number < count else ""
            value = value.split(seps.repetition, 1)[0]
            parts = [unescape(p, seps).strip() for p in value.split(seps.component)[:wanted]]
            return parts + [""] * (wanted - len(parts))

        message_type, _, structure = first_components(9, 3)
        return cls(
            sending_application=text(3),
            sending_facility=text(4),
            receiving_application=text(5),
            receiving_facility=text(6),
            message_type=message_type,
            trigger_event=trigger_event(view),
            structure=structure,
            control_id=text(10).strip(),
            processing_id=first_components(11, 1)[0],
            version=first_components(12, 1)[0],
            accept_ack_type=text(15).strip(),
            application_ack_type=text(16).strip(),
            patient=primary_patient_id(view),
        )

    @property
    def asks_enhanced_mode(self) -> bool:
        """MSH-15 or MSH-16 valued: the sender asks for enhanced-mode acknowledgment (HL7
        v2 ch. 2); both empty is original mode."""
        return bool(self.accept_ack_type or self.application_ack_type)

    def problem(self) -> str | None:
        """Why the content must be refused (AE), or None when the header is usable."""
        if not self.message_type:
            return "MSH-9 (message type) is empty or unreadable"
        if not self.control_id:
            return "MSH-10 (message control ID) is empty"
        return None


# -- values read alike everywhere -------------------------------------------------------------
def read_leaf(raw: str, seps: Separators) -> str:
    """A component's value: its first subcomponent, unescaped (after the split, so an escaped
    delimiter never splits it) and stripped; '' when empty or the explicit null ``""``."""
    if not raw:
        return ""
    if seps.subcomponent in raw:
        raw = raw.split(seps.subcomponent, 1)[0]
    if seps.escape in raw:
        raw = unescape(raw, seps)
    raw = raw.strip()
    return "" if raw == '""' else raw


def read_hd(raw: str, seps: Separators) -> str:
    """An HD component (``namespace ID&universal ID&universal ID type``) as the code that
    names the organisation: the namespace ID, else the universal ID. Feeds from an HIE often
    name an assigning authority by its OID alone (``&2.16.840.1.113883.19.5&ISO``): that OID
    is the authority, as much as a namespace would be."""
    if seps.subcomponent not in raw:
        return read_leaf(raw, seps)
    namespace, universal = [*raw.split(seps.subcomponent, 2), ""][:2]
    return read_leaf(namespace, seps) or read_leaf(universal, seps)


def read_cx(components: list[str], seps: Separators) -> PatientId | None:
    """One CX (a PID-3, PID-2 or MRG-1 repetition, split into its raw components) as
    (CX.1, CX.4 as ``read_hd`` reads it, CX.5); None when CX.1 holds no value. Everything
    that keys a patient reads identifiers through this, so two places cannot name one
    patient two ways."""
    value = read_leaf(components[0], seps) if components else ""
    if not value:
        return None
    count = len(components)
    authority = read_hd(components[3], seps) if count > 3 else ""
    type_code = read_leaf(components[4], seps) if count > 4 else ""
    return PatientId(value, authority, type_code)


def primary_patient_id(view: MessageView) -> PatientId | None:
    """The first PID's identifier that names the patient: the PID-3 repetition typed MR
    (medical record number), else the first one; without any, the same of PID-2, where
    versions 2.1-2.3 often carry the external identifier. Patient.key is this identifier
    (carehub.builtins.event_translator), and intake's order key is made of it."""
    position = view.first("PID")
    if position is None:
        return None
    seps = view.separators
    fields = view.fields(position)
    for number in (3, 2):
        field = fields[number] if number < len(fields) else ""
        if not field:
            continue
        first: PatientId | None = None
        for repetition in field.split(seps.repetition):
            found = read_cx(repetition.split(seps.component, 5), seps)
            if found is None:
                continue
            if found.type_code.upper() == "MR":
                return found
            if first is None:
                first = found
        if first is not None:
            return first
    return None


def trigger_event(view: MessageView) -> str:
    """The message's trigger event, as intake stores it, route conditions (``events:``) test
    it and the translator records it (see ``trigger_event_at``)."""
    return trigger_event_at(view)[0]


def trigger_event_at(view: MessageView) -> tuple[str, str]:
    """(the trigger event, the field it was read from): MSH-9.2, else EVN-1, since HL7 v2.1
    and v2.2 feeds send MSH-9 as the message type alone (``ADT``) and the event in EVN-1;
    ('', '') when neither holds one. The EVN segment is looked for only when MSH-9.2 is
    empty, so the header of every other message costs what it did."""
    seps = view.separators
    msh_9 = view.msh(9)
    if seps.repetition in msh_9:
        msh_9 = msh_9.split(seps.repetition, 1)[0]
    components = msh_9.split(seps.component, 2)
    event = read_leaf(components[1], seps) if len(components) > 1 else ""
    if event:
        return event, "MSH-9.2"
    position = view.first("EVN")
    if position is None:
        return "", ""
    fields = view.fields(position)
    evn_1 = fields[1] if len(fields) > 1 else ""
    if seps.repetition in evn_1:
        evn_1 = evn_1.split(seps.repetition, 1)[0]
    event = read_leaf(evn_1.split(seps.component, 1)[0], seps)
    return (event, "EVN-1") if event else ("", "")
