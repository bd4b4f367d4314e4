"""The header facts intake stores and acknowledges with, read through the lazy view."""

from __future__ import annotations

from dataclasses import dataclass

from carehub.hl7.view import MessageView


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
    accept_ack_type: str
    patient: PatientId | None

    @classmethod
    def read(cls, view: MessageView) -> MessageHeader:
        return cls(
            sending_application=view.get("MSH-3"),
            sending_facility=view.get("MSH-4"),
            receiving_application=view.get("MSH-5"),
            receiving_facility=view.get("MSH-6"),
            message_type=view.get("MSH-9.1").strip(),
            trigger_event=view.get("MSH-9.2").strip(),
            structure=view.get("MSH-9.3").strip(),
            control_id=view.get("MSH-10").strip(),
            processing_id=view.get("MSH-11.1").strip(),
            version=view.get("MSH-12.1").strip(),
            accept_ack_type=view.get("MSH-15").strip(),
            patient=primary_patient_id(view),
        )

    def problem(self) -> str | None:
        """Why the content must be refused (AE), or None when the header is usable."""
        if not self.message_type:
            return "MSH-9 (message type) is empty or unreadable"
        if not self.control_id:
            return "MSH-10 (message control ID) is empty"
        return None


def primary_patient_id(view: MessageView) -> PatientId | None:
    """The PID-3 repetition typed MR (medical record number), else the first one."""
    if not view.count("PID"):
        return None
    candidates: list[PatientId] = []
    for repetition in view.repetitions("PID-3"):
        parts = view.components(repetition)
        parts += [""] * (5 - len(parts))
        if not parts[0]:
            continue
        authority = parts[3].split(view.separators.subcomponent)[0]
        candidates.append(PatientId(parts[0], authority, parts[4]))
    if not candidates:
        # Older feeds (2.1-2.3) put the external identifier in PID-2.
        legacy = view.get("PID-2.1")
        return PatientId(legacy, view.get("PID-2.4.1")) if legacy else None
    for candidate in candidates:
        if candidate.type_code.upper() == "MR":
            return candidate
    return candidates[0]
