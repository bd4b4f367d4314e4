"""What a search of stored messages asks for, defined once for `messages list`, `reprocess` and
`export` (the options) and for ``MessageStore.search`` (the query).

What intake stored as columns (status, type, sender, MSH-10, listener, time received) is
filtered in SQL. A field anywhere in the message (``--field``) or a piece of its text
(``--contains``) is only in the raw bytes, so it is checked here, in Python, on the rows that
SQL let through. Nothing in this module imports the store, so the CLI can build a filter
without loading SQLAlchemy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime

from carehub.hl7.view import MessageView, NotHL7Error
from carehub.routing.conditions import FieldRef, field_ref


@dataclass(slots=True, frozen=True)
class FieldMatch:
    """``PATH=VALUE``: the unescaped value at PATH must equal VALUE exactly.

    The path reads as a route's ``fields:`` condition reads it (``routing.conditions``): the
    first segment of that name and the first repetition unless the path names others
    (``OBX[2]-5``, ``PID-3[2].1``), and with ``[*]`` every one, any of which may hold the
    value (``PID-3[*].1``, ``OBX[*]-3.1``), so a search finds what a route would have
    matched."""

    ref: FieldRef
    value: str

    @classmethod
    def parse(cls, text: str) -> FieldMatch:
        """Parse ``PID-5.1=DOE``; ValueError says what is wrong with it."""
        path, equals, value = text.partition("=")
        if not equals:
            raise ValueError("expected PATH=VALUE, e.g. PID-5.1=DOE")
        ref = field_ref(path)  # PathError is a ValueError and names the path
        if not ref.spec.field:
            raise ValueError(f"{path.strip()!r} names a segment, not a field: e.g. {ref.spec}-3")
        return cls(ref, value)

    @property
    def path(self) -> str:
        """The path as it was written."""
        return self.ref.text

    def test(self, view: MessageView) -> bool:
        return any(found == self.value for _, found in self.ref.values(view))

    def __str__(self) -> str:
        return f"{self.path}={self.value}"


def parse_sender(text: str) -> tuple[str | None, str | None]:
    """``APP``, ``APP^FACILITY`` or ``^FACILITY`` as (MSH-3, MSH-4); an empty part is not
    filtered on. ValueError when both are empty."""
    application, _, facility = text.partition("^")
    if not application and not facility:
        raise ValueError("expected APP or APP^FACILITY, e.g. LAB^MAIN_HOSPITAL")
    return application or None, facility or None


def parse_message_type(text: str) -> tuple[str | None, str | None]:
    """``TYPE`` or ``TYPE^EVENT``, as `messages list` shows the type, as (MSH-9.1, the trigger
    event: MSH-9.2, else EVN-1); an
    empty part is not filtered on. ValueError when both are empty, or for more components."""
    if "^" not in text:
        return text, None
    message_type, _, event = text.partition("^")
    if "^" in event or not (message_type or event):
        raise ValueError("expected TYPE or TYPE^EVENT, e.g. ADT^A01")
    return message_type or None, event or None


def parse_patient(text: str) -> tuple[str, str | None]:
    """``ID`` or ``ID^AUTHORITY``, as `messages list` shows the patient, as (the identifier,
    its authority: CX.4's namespace ID, else its universal ID, else the sending facility's
    code for an identifier sent without one); an empty authority
    is not filtered on, so ``ID`` alone finds that id at every facility. ValueError without
    an identifier, or for more components (the whole PID-3 of the message is not what was
    stored)."""
    if "^" not in text:
        return text, None
    patient_id, _, authority = text.partition("^")
    if not patient_id or "^" in authority:
        raise ValueError("expected ID or ID^AUTHORITY, e.g. RG100234^RGH")
    return patient_id, authority or None


@dataclass(slots=True, frozen=True)
class MessageFilter:
    """Every condition a stored message must meet; an unset one is not checked.

    ``since`` is inclusive and ``until`` exclusive, so that consecutive windows
    (``--since 2h --until 1h``, then ``--since 1h``) never report a message twice."""

    status: str | None = None
    message_type: str | None = None  # MSH-9.1, compared upper-case
    event: str | None = None  # MSH-9.2, else EVN-1 (header.trigger_event), compared upper-case
    patient: str | None = None  # PID-3.1 as intake stored it
    #: That identifier's authority (CX.4's namespace ID, else its universal ID), else the code
    #: of the facility that sent it (MSH-4), as intake keys the patient (store.patient_columns).
    patient_authority: str | None = None
    listener: str | None = None  # a listener's name, or TRANSPORT:NAME (see listener_forms)
    sending_application: str | None = None  # MSH-3: the whole field or its first component
    sending_facility: str | None = None  # MSH-4: the whole field or its first component
    control_id: str | None = None  # MSH-10
    since: datetime | None = None
    until: datetime | None = None
    fields: tuple[FieldMatch, ...] = ()
    contains: str | None = None  # case-insensitive, in the decoded text

    def is_empty(self) -> bool:
        """No condition at all: every message matches. An empty value sets no condition (as
        in the SQL), so that `reprocess --type ""` is not taken for a filter."""
        return not any(getattr(self, f.name) for f in dataclasses.fields(self))

    def listener_forms(self) -> list[tuple[str | None, str]]:
        """What ``listener`` may name, as (transport or None, listener name): the listener by
        its name, or ``TRANSPORT:NAME`` as `messages list` shows it. A name may hold a colon
        itself, so both readings are tried."""
        if not self.listener:
            return []
        forms: list[tuple[str | None, str]] = [(None, self.listener)]
        transport, colon, name = self.listener.partition(":")
        if colon and transport and name:
            forms.append((transport, name))
        return forms

    def names_listener(self, transport: str, name: str) -> bool:
        """Whether ``listener`` names the listener ``name`` of ``transport``."""
        forms = self.listener_forms()
        return (None, name) in forms or (transport, name) in forms

    @property
    def reads_content(self) -> bool:
        """Whether some condition needs the message itself, not only its stored columns."""
        return bool(self.fields or self.contains)

    def matches_text(self, text: str) -> bool:
        """The content conditions (``fields`` and ``contains``) on a decoded message. Text that
        is not HL7 (a rejected frame) has no fields, so it matches no ``fields`` condition."""
        if self.fields:
            try:
                view = MessageView(text)
            except NotHL7Error:
                return False
            if not all(match.test(view) for match in self.fields):
                return False
        return not self.contains or self.contains.casefold() in text.casefold()
