"""Route conditions: match a message on its type, event, sender, patient class or any field.

A value condition is written as:

- ``A01``: equal (case-sensitive, as HL7 codes are);
- ``[A01, A04]``: any of;
- ``{not: A08}`` or ``{not: [A08, A11]}``: none of;
- ``{regex: "^RIV"}``: a regular expression found in the value (``re.search``);
- ``{present: true}``: the field is non-empty (``false``: empty).

Field paths are the view's terse paths. A path with a component (``PID-3.4``) or a
repetition (``PID-3[2]``) reads one repetition, the first unless one is named, of the first
segment of that name unless one is named (``OBX[2]-5``); a bare field (``PID-3``) is the whole
field as written, every repetition with its ``~``. ``[*]`` reads every one instead and the
condition holds when any of them passes: ``PID-3[*].4: SSA`` (any identifier's authority),
``OBX[*]-3.1: GLU`` (any OBX), ``OBX[*]-5[*]`` (any repetition of any OBX).

``events:`` tests the trigger event the hub stores for the message: MSH-9.2, else EVN-1,
where HL7 v2.1 and v2.2 feeds send it (MSH-9 then holds the message type alone).

A filter step placed after an ``encounter-state`` step may also test ``transition``: what that
step found the message did to its visit (``admission``, ``transfer``, ``discharge``, a cancel,
``none`` for an A08 echo, a bed move or a resend under a new MSH-10; see
``carehub.care.model.TransitionKind``). It is not known when routes are matched, so a route's
own ``when`` cannot test it. Likewise a filter step after a ``care-team`` step may test
``opted_out`` (``false``: go on only for a patient who did not opt out of notifications, by the
roster or by the message's opt-out field), so a route that tells another system of a visit
keeps the opt-out the notify and fhir-notification steps keep.

The conditions of one ``when`` must all hold. ``any:`` (a list: at least one holds),
``all:`` (a list: every one holds) and ``not:`` (it does not hold) take whole conditions, so
they combine named conditions and fields and nest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from carehub.hl7.header import trigger_event_at
from carehub.hl7.view import FieldPath, MessageView, PathError, parse_path


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
        if value is None:
            raise ValueError(_NULL_VALUE)
        if isinstance(value, str | int | float):
            return {"any_of": [_text(value)]}
        if isinstance(value, list):
            return {"any_of": [_text(v) for v in value]}
        if isinstance(value, dict) and "not" in value:
            rest = {k: v for k, v in value.items() if k != "not"}
            negated = value["not"]
            rest["none_of"] = (
                [_text(v) for v in negated] if isinstance(negated, list) else [_text(negated)]
            )
            return rest
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        """``regex:`` with nothing after it is YAML's null, which would test nothing."""
        if value is None:
            raise ValueError(_NULL_KEY)
        return value

    @model_validator(mode="after")
    def _lists_name_something(self) -> ValueCondition:
        """``events: []`` matches no message, and ``{not: []}`` excludes none, so tests
        nothing: a route or filter written so was meant otherwise."""
        if self.any_of == []:
            raise ValueError(
                "is an empty list, so it would match no message; name at least one value "
                "([A01, A04]) or remove the key"
            )
        if self.none_of == []:
            raise ValueError(
                "{not: []} leaves nothing out, so it tests nothing; name what to leave out "
                "({not: [A08]}) or remove the key"
            )
        return self

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


#: A condition key written with nothing after it (``type:``) is YAML's null: read as left
#: out, it would test nothing, and a filter of nothing else would pass every message.
_NULL_KEY = "is empty (null): give it a value or remove the key"
_NULL_VALUE = (
    "is empty (null): give a value (A01), a list ([A01, A04]) or a test ({not: ...}, "
    "{regex: ...}, {present: true}); quote '' for an empty field"
)


def _text(value: Any) -> str:
    """A value to compare with a field, which is text. YAML reads ``01`` as the number 1 and
    ``NO`` or ``off`` as booleans, so a condition written that way would never hold for the
    code the message carries ("01", "NO"): it is refused with the fix instead."""
    if isinstance(value, str):
        return value
    if value is None:
        raise ValueError(
            "holds an empty value (null): write the code, or quote '' for an empty field"
        )
    if isinstance(value, bool | int | float):
        raise ValueError(
            f"{value!r} is not text: YAML reads an unquoted 01 as the number 1 and NO or off as "
            "true/false, which no field holds; quote the value as the message writes it "
            "(e.g. '01', 'NO')"
        )
    raise ValueError(f"expected text, got {type(value).__name__} {value!r}")


@dataclass(slots=True, frozen=True)
class StepFacts:
    """What earlier steps of a route found, for its filter steps to test: the care transition
    (an encounter-state step) and whether the patient opted out of notifications (a care-team
    step); None where no such step ran."""

    transition: str | None = None
    opted_out: bool | None = None


@dataclass(frozen=True, slots=True)
class Check:
    """One condition checked against one message, for `routes test` explanations.

    ``what`` names the condition, prefixed with the ``any[i]``/``all[i]``/``not`` branch it
    sits in; ``at`` is the exact place where a ``[*]`` path's condition held (``PID-3[2].4``),
    '' when it held nowhere or the path has no ``[*]``."""

    what: str
    value: str
    expected: str
    passed: bool
    at: str = ""

    def within(self, branch: str) -> Check:
        """This check as seen from inside a branch of ``any``/``all``."""
        return replace(self, what=f"{branch} {self.what}")

    def negated(self) -> Check:
        """This check as seen from inside ``not``: it passes when the inner one fails."""
        return replace(
            self,
            what=f"not: {self.what}",
            expected=_opposite(self.expected),
            passed=not self.passed,
        )


#: A condition's description and the words for its opposite (see Check.negated).
_OPPOSITES = (("not in ", "in "), ("in ", "not in "), ("matches ", "does not match "))


def _opposite(expected: str) -> str:
    """What ``not`` wants, in words: "not in ['A08']" rather than "not (in ['A08'])"; a
    description of several parts, or one saying where a [*] path held, keeps its brackets."""
    if " and " not in expected and "(" not in expected:
        for words, opposite in _OPPOSITES:
            if expected.startswith(words):
                return opposite + expected.removeprefix(words)
        if expected in ("present", "empty"):
            return "empty" if expected == "present" else "present"
    return f"not ({expected})"


# The named conditions and the field each one reads; ``event`` reads MSH-9.2, else EVN-1
# (see TriggerEventRef).
NAMED_FIELDS = {
    "type": "MSH-9.1",
    "event": "MSH-9.2",
    "sending_application": "MSH-3.1",
    "sending_facility": "MSH-4.1",
    "receiving_application": "MSH-5.1",
    "receiving_facility": "MSH-6.1",
    "patient_class": "PV1-2.1",
}

#: Named conditions on an HL7 code (MSH-9.1, MSH-9.2, PV1-2.1): a code holds no comma or
#: space. The sender and receiver names (MSH-3 to MSH-6) may hold spaces, and are not checked.
_CODE_CONDITIONS = ("type", "event", "patient_class")

_ANY = "[*]"
_ANY_REPETITION = re.compile(r"-\d+\[\*\]")


@dataclass(slots=True, frozen=True)
class FieldRef:
    """A condition's field path: one place, or with ``[*]`` every occurrence of the segment
    and/or every repetition of the field."""

    text: str
    spec: FieldPath
    every_occurrence: bool = False
    every_repetition: bool = False

    @property
    def wildcard(self) -> bool:
        return self.every_occurrence or self.every_repetition

    def noun(self) -> str:
        """What ``[*]`` ranges over, for explanations."""
        if self.every_occurrence and self.every_repetition:
            return f"{self.spec.segment} repetition"
        return self.spec.segment if self.every_occurrence else "repetition"

    def values(self, view: MessageView) -> list[tuple[str, str]]:
        """(exact place, unescaped value) for each place the path reads. A ``[*]`` over an
        absent segment or an empty field still reads one empty value, so ``{present: false}``
        holds there."""
        spec = self.spec
        if not self.wildcard:
            return [(self.text, view.get(spec))]
        if self.every_occurrence:
            occurrences = range(1, view.count(spec.segment) + 1) or range(1, 2)
        else:
            occurrences = range(spec.occurrence, spec.occurrence + 1)
        found: list[tuple[str, str]] = []
        for occurrence in occurrences:
            at = replace(spec, occurrence=occurrence)
            if self.every_repetition:
                whole = str(FieldPath(spec.segment, occurrence, spec.field))
                count = max(len(view.repetitions(whole)), 1)
                places = [replace(at, repetition=n) for n in range(1, count + 1)]
            else:
                places = [at]
            for place in places:
                label = str(place)
                if self.every_occurrence and occurrence == 1:
                    label = f"{spec.segment}[1]{label[3:]}"
                found.append((label, view.get(place)))
        return found


@dataclass(slots=True, frozen=True)
class TriggerEventRef:
    """What ``events:`` tests: the trigger event as the header decides it once for the
    whole hub (carehub.hl7.header.trigger_event_at), MSH-9.2, else EVN-1 for HL7 v2.1 and
    v2.2 feeds whose MSH-9 is the message type alone. So a route matches the event that
    intake stored and that the translator records, not only what MSH-9.2 holds."""

    def read(self, view: MessageView) -> tuple[str, str]:
        """(where the event was read, MSH-9.2 or EVN-1 (MSH-9.2 when neither holds one);
        the event)."""
        event, at = trigger_event_at(view)
        return at or "MSH-9.2", event


#: A named condition's reader: a field path, or the trigger event.
ValueRef = FieldRef | TriggerEventRef


@lru_cache(maxsize=1024)
def field_ref(path: str) -> FieldRef:
    """Parse a condition path: a terse path, with ``[*]`` allowed right after the segment name
    and right after the field number. Raises PathError naming the path."""
    text = path.strip()
    plain = text
    every_occurrence = plain[3:6] == _ANY
    if every_occurrence:
        plain = plain[:3] + plain[6:]
    match = _ANY_REPETITION.search(plain)
    every_repetition = match is not None
    if match is not None:
        plain = plain[: match.end() - len(_ANY)] + "[1]" + plain[match.end() :]
    if "*" in plain:
        raise PathError(
            f"bad field path {path!r}: [*] goes right after the segment name (OBX[*]-5) or "
            "the field number (PID-3[*].4)"
        )
    spec = parse_path(plain)
    if every_repetition and not spec.field:  # pragma: no cover - the regex needs a field
        raise PathError(f"bad field path {path!r}: [*] after a field number needs a field")
    return FieldRef(text, spec, every_occurrence, every_repetition)


def _field_path(path: str) -> str:
    try:
        field_ref(path)
    except PathError as err:
        raise ValueError(str(err)) from err
    return path


# Checked per key (not in a validator of the whole mapping) so the error's location, and so
# the line `routes check` reports, is the bad path's own line rather than the first key's.
FieldPathKey = Annotated[str, AfterValidator(_field_path)]


def _test(ref: ValueRef, condition: ValueCondition, view: MessageView) -> bool:
    if isinstance(ref, TriggerEventRef):
        return condition.test(trigger_event_at(view)[0])
    if not ref.wildcard:
        return condition.test(view.get(ref.spec))
    return any(condition.test(value) for _, value in ref.values(view))


def _check(label: str, ref: ValueRef, condition: ValueCondition, view: MessageView) -> Check:
    """The event's label says where it was read: ``event (MSH-9.2)`` or ``event (EVN-1)``."""
    wanted = condition.describe()
    if isinstance(ref, TriggerEventRef):
        at, value = ref.read(view)
        return Check(f"{label} ({at})", value, wanted, condition.test(value))
    if not ref.wildcard:
        value = view.get(ref.spec)
        return Check(label, value, wanted, condition.test(value))
    values = ref.values(view)
    for at, value in values:
        if condition.test(value):
            return Check(label, value, f"{wanted} (passed at {at})", True, at)
    # The values as the field would hold them, so a reader sees every one that was tried.
    shown = "~".join(value for _, value in values)
    return Check(label, shown, f"{wanted} at any {ref.noun()} ({len(values)} read)", False)


class When(BaseModel):
    """All given conditions must hold. ``fields`` maps terse paths (``PV1-2``, ``PID-3.4``,
    ``PID-3[*].4``) to value conditions; ``any``, ``all`` and ``not`` take whole conditions.
    An empty ``when`` matches every message."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: ValueCondition | None = Field(None, description="MSH-9.1, e.g. ADT")
    event: ValueCondition | None = Field(
        None,
        alias="events",
        description="MSH-9.2, else EVN-1 (HL7 v2.1-2.2 feeds send MSH-9 as the type alone), "
        "e.g. A01",
    )
    sending_application: ValueCondition | None = Field(None, description="MSH-3.1")
    sending_facility: ValueCondition | None = Field(None, description="MSH-4.1")
    receiving_application: ValueCondition | None = Field(None, description="MSH-5.1")
    receiving_facility: ValueCondition | None = Field(None, description="MSH-6.1")
    patient_class: ValueCondition | None = Field(None, description="PV1-2.1, e.g. I, E, O")
    transition: ValueCondition | None = Field(
        None,
        description="the care transition an earlier encounter-state step found (admission, "
        "transfer, discharge, none ...); filter steps only",
    )
    opted_out: bool | None = Field(
        None,
        description="whether the patient opted out of notifications, as an earlier care-team "
        "step found (the roster, or the message's opt-out field); filter steps only",
    )
    fields: dict[FieldPathKey, ValueCondition] = Field(
        default_factory=dict, description="terse path -> value condition"
    )
    any_: list[When] | None = Field(
        None, alias="any", min_length=1, description="conditions of which at least one holds"
    )
    all_: list[When] | None = Field(
        None, alias="all", min_length=1, description="conditions that all hold"
    )
    not_: When | None = Field(None, alias="not", description="a condition that does not hold")
    _found: list[tuple[str, ValueRef, ValueCondition]] | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, value: Any) -> Any:
        """``when:`` or a branch with nothing after it is YAML's null, not a condition."""
        if value is None:
            raise ValueError("is empty (null): give a condition, e.g. {type: ADT}")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        """A key written with nothing after it (``not:``, ``type:``) is YAML's null: read as
        left out, it would test nothing."""
        if value is None:
            raise ValueError(_NULL_KEY)
        return value

    @field_validator("any_", "all_")
    @classmethod
    def _no_empty_branch(cls, branches: list[When] | None) -> list[When] | None:
        for index, branch in enumerate(branches or []):
            if branch.is_empty():
                raise ValueError(
                    f"[{index}] is empty, and an empty condition holds for every message; "
                    "give it a condition or remove it"
                )
        return branches

    @field_validator("not_")
    @classmethod
    def _no_empty_not(cls, inner: When | None) -> When | None:
        if inner is not None and inner.is_empty():
            raise ValueError("is empty, so it would match no message; give it a condition")
        return inner

    @field_validator(*_CODE_CONDITIONS)
    @classmethod
    def _one_code_each(
        cls, condition: ValueCondition | None, info: ValidationInfo
    ) -> ValueCondition | None:
        """``events: A01, A03, A04`` (a Mirth filter list, brackets left out) is one value,
        "A01, A03, A04", that no message's MSH-9.2 holds: the route would never match, and
        its messages would be ACKed and left unrouted without a word."""
        if condition is None:
            return None
        for value in (condition.any_of or []) + (condition.none_of or []):
            codes = [code for code in re.split(r"[\s,;]+", value) if code]
            if len(codes) > 1 or (codes and codes[0] != value):
                name = info.field_name or ""
                key = "events" if name == "event" else name
                listed = f"[{', '.join(codes)}]"
                fix = f"{{not: {listed}}}" if value in (condition.none_of or []) else listed
                raise ValueError(
                    f"{value!r} would match no message: {NAMED_FIELDS[name]} holds one code, "
                    f"never a comma, space or semicolon; write a list: {key}: {fix}"
                )
        return condition

    @field_validator("transition")
    @classmethod
    def _known_transitions(cls, condition: ValueCondition | None) -> ValueCondition | None:
        if condition is None:
            return None
        from carehub.care.model import TRANSITION_KINDS

        named = (condition.any_of or []) + (condition.none_of or [])
        unknown = [value for value in named if value not in TRANSITION_KINDS]
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} is not a care transition; one of: {', '.join(TRANSITION_KINDS)}"
            )
        return condition

    def is_empty(self) -> bool:
        return not (
            self._conditions()
            or self.transition
            or self.opted_out is not None
            or self.any_
            or self.all_
            or self.not_
        )

    def _branches(self) -> list[When]:
        return [*(self.any_ or []), *(self.all_ or []), *([self.not_] if self.not_ else [])]

    def uses_transition(self) -> bool:
        """Whether this condition, or any branch of it, tests the care transition."""
        return self.transition is not None or any(b.uses_transition() for b in self._branches())

    def uses_opt_out(self) -> bool:
        """Whether this condition, or any branch of it, tests the patient's opt-out."""
        return self.opted_out is not None or any(b.uses_opt_out() for b in self._branches())

    def _conditions(self) -> list[tuple[str, ValueRef, ValueCondition]]:
        """(label, what it reads, condition) of the named conditions and fields, worked out
        once: live routing asks every route's ``when`` about every message. The event's
        label gets the field it was read from when checked (see _check)."""
        if self._found is None:
            found: list[tuple[str, ValueRef, ValueCondition]] = []
            for name, path in NAMED_FIELDS.items():
                condition = getattr(self, name)
                if condition is None:
                    continue
                if name == "event":
                    found.append((name, _TRIGGER_EVENT, condition))
                else:
                    found.append((f"{name} ({path})", field_ref(path), condition))
            found += [(path, field_ref(path), c) for path, c in self.fields.items()]
            self._found = found
        return self._found

    def matches(self, view: MessageView, facts: StepFacts | None = None) -> bool:
        """``facts``: what earlier steps found, for filter steps."""
        if not all(_test(ref, condition, view) for _, ref, condition in self._conditions()):
            return False
        found = facts or _NO_FACTS
        if self.transition is not None and not self.transition.test(found.transition or ""):
            return False
        if self.opted_out is not None and found.opted_out is not self.opted_out:
            return False
        if self.any_ is not None and not any(b.matches(view, facts) for b in self.any_):
            return False
        if self.all_ is not None and not all(b.matches(view, facts) for b in self.all_):
            return False
        return self.not_ is None or not self.not_.matches(view, facts)

    def explain(self, view: MessageView, facts: StepFacts | None = None) -> list[Check]:
        """Every condition with the value it saw and whether it passed; the route matches
        exactly when every check passed. Branches are named by their place in the list
        (``any[1]``, from 0 as in configuration errors): a passing ``any`` shows the branch
        that passed, a failing one every branch's failures, ``[*]`` paths where they passed."""
        checks = [
            _check(label, ref, condition, view) for label, ref, condition in self._conditions()
        ]
        known = facts or _NO_FACTS
        if self.transition is not None:
            found = known.transition or ""
            checks.append(
                Check(
                    "transition (encounter-state)",
                    found,
                    self.transition.describe(),
                    self.transition.test(found),
                )
            )
        if self.opted_out is not None:
            checks.append(
                Check(
                    "opted_out (care-team)",
                    _yes_no(known.opted_out),
                    _yes_no(self.opted_out),
                    known.opted_out is self.opted_out,
                )
            )
        if self.any_ is not None:
            failures: list[Check] = []
            for index, branch in enumerate(self.any_):
                inner = branch.explain(view, facts)
                if all(check.passed for check in inner):
                    checks += [check.within(f"any[{index}]") for check in inner]
                    break
                failures += [c.within(f"any[{index}]") for c in inner if not c.passed]
            else:
                checks += failures
        for index, branch in enumerate(self.all_ or []):
            checks += [check.within(f"all[{index}]") for check in branch.explain(view, facts)]
        if self.not_ is not None:
            inner = self.not_.explain(view, facts)
            if all(check.passed for check in inner):
                checks += [check.negated() for check in inner]  # every one held: each is why
            else:
                checks += [check.negated() for check in inner if not check.passed]
        return checks


When.model_rebuild()


_NO_FACTS = StepFacts()
_TRIGGER_EVENT = TriggerEventRef()


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")
