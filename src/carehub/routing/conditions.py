"""Route conditions: match a message on its type, event, sender, patient class or any field.

A value condition is written as:

- ``A01``: equal (case-sensitive, as HL7 codes are);
- ``[A01, A04]``: any of;
- ``{not: A08}`` or ``{not: [A08, A11]}``: none of;
- ``{regex: "^RIV"}``: a regular expression found in the value (``re.search``);
- ``{present: true}``: the field is non-empty (``false``: empty).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from carehub.hl7.view import MessageView, PathError, parse_path


class ValueCondition(BaseModel):
    """One test on one value; see the module docstring for the YAML forms."""

    model_config = ConfigDict(extra="forbid")

    any_of: list[str] | None = None
    none_of: list[str] | None = None
    regex: str | None = None
    present: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str | int | float):
            return {"any_of": [str(value)]}
        if isinstance(value, list):
            return {"any_of": [str(v) for v in value]}
        if isinstance(value, dict) and "not" in value:
            rest = {k: v for k, v in value.items() if k != "not"}
            negated = value["not"]
            rest["none_of"] = (
                [str(v) for v in negated] if isinstance(negated, list) else [str(negated)]
            )
            return rest
        return value

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"bad regular expression {value!r}: {err}") from err
        return value

    def test(self, value: str) -> bool:
        if self.any_of is not None and value not in self.any_of:
            return False
        if self.none_of is not None and value in self.none_of:
            return False
        if self.regex is not None and not re.search(self.regex, value):
            return False
        return self.present is None or bool(value) == self.present

    def describe(self) -> str:
        parts = []
        if self.any_of is not None:
            parts.append(f"in {self.any_of}")
        if self.none_of is not None:
            parts.append(f"not in {self.none_of}")
        if self.regex is not None:
            parts.append(f"matches /{self.regex}/")
        if self.present is not None:
            parts.append("present" if self.present else "empty")
        return " and ".join(parts) or "anything"


@dataclass(slots=True, frozen=True)
class Check:
    """One condition checked against one message, for `routes test` explanations."""

    what: str
    value: str
    expected: str
    passed: bool


# The named conditions and the field each one reads.
NAMED_FIELDS = {
    "type": "MSH-9.1",
    "event": "MSH-9.2",
    "sending_application": "MSH-3.1",
    "sending_facility": "MSH-4.1",
    "receiving_application": "MSH-5.1",
    "receiving_facility": "MSH-6.1",
    "patient_class": "PV1-2.1",
}


def _field_path(path: str) -> str:
    try:
        parse_path(path)
    except PathError as err:
        raise ValueError(str(err)) from err
    return path


# Checked per key (not in a validator of the whole mapping) so the error's location, and so
# the line `routes check` reports, is the bad path's own line rather than the first key's.
FieldPathKey = Annotated[str, AfterValidator(_field_path)]


class When(BaseModel):
    """All given conditions must hold. ``fields`` maps terse paths (``PV1-2``, ``PID-3.4``) to
    value conditions. An empty ``when`` matches every message."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: ValueCondition | None = None
    event: ValueCondition | None = Field(None, alias="events")
    sending_application: ValueCondition | None = None
    sending_facility: ValueCondition | None = None
    receiving_application: ValueCondition | None = None
    receiving_facility: ValueCondition | None = None
    patient_class: ValueCondition | None = None
    fields: dict[FieldPathKey, ValueCondition] = Field(default_factory=dict)

    def _conditions(self) -> list[tuple[str, str, ValueCondition]]:
        found = []
        for name, path in NAMED_FIELDS.items():
            condition = getattr(self, name)
            if condition is not None:
                found.append((name, path, condition))
        found += [(path, path, condition) for path, condition in self.fields.items()]
        return found

    def matches(self, view: MessageView) -> bool:
        return all(condition.test(view.get(path)) for _, path, condition in self._conditions())

    def explain(self, view: MessageView) -> list[Check]:
        """Every condition with the value it saw and whether it passed."""
        checks = []
        for name, path, condition in self._conditions():
            value = view.get(path)
            label = name if name == path else f"{name} ({path})"
            checks.append(Check(label, value, condition.describe(), condition.test(value)))
        return checks
