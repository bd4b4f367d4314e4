"""The header facts intake stores and acknowledges with, read through the lazy view."""

from __future__ import annotations

from dataclasses import dataclass

from carehub.hl7.view import MessageView, unescape


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

        message_type, trigger_event, structure = first_components(9, 3)
        return cls(
            sending_application=text(3),
            sending_facility=text(4),
            receiving_application=text(5),
            receiving_facility=text(6),
            message_type=message_type,
            trigger_event=trigger_event,
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


def primary_patient_id(view: MessageView) -> PatientId | None:
    """The PID-3 repetition typed MR (medical record number), else the first one."""
    position = view.first("PID")
    if position is None:
        return None
    seps = view.separators
    fields = view.fields(position)
    candidates: list[PatientId] = []
    for repetition in (fields[3] if len(fields) > 3 else "").split(seps.repetition):
        parts = repetition.split(seps.component)
        if not parts[0]:
            continue
        parts += [""] * (5 - len(parts))
        if seps.escape in repetition:
            parts = [unescape(part, seps) for part in parts]
        authority = parts[3].split(seps.subcomponent, 1)[0]
        candidate = PatientId(parts[0], authority, parts[4])
        if candidate.type_code.upper() == "MR":
            return candidate
        candidates.append(candidate)
    if candidates:
        return candidates[0]
    # Older feeds (2.1-2.3) put the external identifier in PID-2.
    legacy = view.get("PID-2.1")
    return PatientId(legacy, view.get("PID-2.4.1")) if legacy else None
