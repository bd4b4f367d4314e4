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

from carehub.hl7.view import FieldPath, MessageView, NotHL7Error, parse_path


@dataclass(slots=True, frozen=True)
class FieldMatch:
    """``PATH=VALUE``: the unescaped value at PATH must equal VALUE exactly.

    The path reads as a route's ``fields:`` condition reads it (``MessageView.get``): the first
    segment of that name and the first repetition unless the path names others
    (``OBX[2]-5``, ``PID-3[2].1``), so a search finds what a route would have matched."""

    path: FieldPath
    value: str

    @classmethod
    def parse(cls, text: str) -> FieldMatch:
        """Parse ``PID-5.1=DOE``; ValueError says what is wrong with it."""
        path, equals, value = text.partition("=")
        if not equals:
            raise ValueError("expected PATH=VALUE, e.g. PID-5.1=DOE")
        spec = parse_path(path)  # PathError is a ValueError and names the path
        if not spec.field:
            raise ValueError(f"{path.strip()!r} names a segment, not a field: e.g. {spec}-3")
        return cls(spec, value)

    def test(self, view: MessageView) -> bool:
        return view.get(self.path) == self.value

    def __str__(self) -> str:
        return f"{self.path}={self.value}"


def parse_sender(text: str) -> tuple[str | None, str | None]:
    """``APP``, ``APP^FACILITY`` or ``^FACILITY`` as (MSH-3, MSH-4); an empty part is not
    filtered on. ValueError when both are empty."""
    application, _, facility = text.partition("^")
    if not application and not facility:
        raise ValueError("expected APP or APP^FACILITY, e.g. LAB^MAIN_HOSPITAL")
    return application or None, facility or None


@dataclass(slots=True, frozen=True)
class MessageFilter:
    """Every condition a stored message must meet; an unset one is not checked.

    ``since`` is inclusive and ``until`` exclusive, so that consecutive windows
    (``--since 2h --until 1h``, then ``--since 1h``) never report a message twice."""

    status: str | None = None
    message_type: str | None = None  # MSH-9.1, compared upper-case
    event: str | None = None  # MSH-9.2, compared upper-case
    patient: str | None = None  # PID-3.1 as intake stored it
    listener: str | None = None
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
