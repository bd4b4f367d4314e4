"""The ``validate`` step: an opt-in structure and content check of the v2 message with hl7apy.

hl7apy knows the HL7 message structures, segment definitions and tables, but it costs tens of
milliseconds per message and has traps (performance baseline, section 2), so it is only used
here, off the intake path, and never to produce what is forwarded. This step works around each
trap instead of inheriting it:

- segment ends are normalised to CR (hl7apy silently parses CRLF/LF text into MSH alone);
- an empty MSH-9.3 is filled from the type and trigger event where the structure is known
  (hl7apy builds no structure without it and reports nothing);
- Z segments are left out of the hl7apy tree (it drops them with ``find_groups=True`` anyway)
  and unknown non-Z segments, which it also drops silently, are reported;
- hl7apy does not check segment order, so the order is checked here against its structure;
- ``Validator.validate`` raises only its first error, so its report file is read for all of
  them, and each segment is validated on its own so problems name ``SEG[n]-field`` exactly;
- every hl7apy exception becomes a problem entry; an unsupported version (2.9) is one too.

    - validate: {}                                   # report only; the route goes on
    - validate: {strict: true, fail_on_error: true}  # stop the route on any problem
    - validate: {version: "2.5"}                     # check as 2.5 whatever MSH-12 says

The step's output is ``{"valid": bool, "version", "structure", "problems": [{"severity",
"path", "message"}]}``. Warnings (a value outside an HL7 table, a value over the maximum
length, a structure hl7apy does not know) do not make a message invalid unless ``strict``;
``strict`` also parses each segment with hl7apy's STRICT level (datatype formats, lengths,
fields beyond the segment's definition).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

from hl7apy import SUPPORTED_LIBRARIES, load_library
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import ChildNotFound
from hl7apy.parser import get_message_info, parse_message, parse_segment
from hl7apy.validation import Validator
from pydantic import Field, field_validator

from carehub.components import ComponentOptions, Translator, Work
from carehub.errors import CarehubError
from carehub.hl7.edit import MessageEditor
from carehub.hl7.view import NotHL7Error

Severity = Literal["error", "warning"]
Problem = dict[str, str]

_SEGMENT_NAME = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_REPORT_ENTRY = re.compile(r"^(Error|Warning): ", re.MULTILINE)
_FIELD_NAME = re.compile(r"^([A-Z][A-Z0-9]{2})_(\d+)$")
_COMPONENT_NAME = re.compile(r"^[A-Z][A-Z0-9]*_(\d+)$")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


SUPPORTED_VERSIONS = tuple(sorted(SUPPORTED_LIBRARIES, key=_version_key))

# HL7 table 0354 (message structure per trigger event) for the events hl7apy has no
# TYPE_EVENT structure for. Used only to fill an empty MSH-9.3, and only when hl7apy has the
# structure in the message's version.
_EVENT_STRUCTURES: dict[str, dict[tuple[str, ...], str]] = {
    "ADT": {
        ("A01", "A04", "A08", "A13"): "ADT_A01",
        ("A05", "A14", "A28", "A31"): "ADT_A05",
        ("A06", "A07"): "ADT_A06",
        ("A09", "A10", "A11"): "ADT_A09",
        ("A21", "A22", "A23", "A25", "A26", "A27", "A29", "A32", "A33"): "ADT_A21",
        ("A30", "A34", "A35", "A36", "A46", "A47", "A48", "A49"): "ADT_A30",
        ("A39", "A40", "A41", "A42"): "ADT_A39",
        ("A43", "A44"): "ADT_A43",
        ("A50", "A51"): "ADT_A50",
        ("A52", "A53"): "ADT_A52",
        ("A54", "A55"): "ADT_A54",
        ("A61", "A62"): "ADT_A61",
    },
    "SIU": {tuple(f"S{n}" for n in range(12, 27)): "SIU_S12"},
    "MDM": {
        ("T01", "T03", "T05", "T07", "T09", "T11"): "MDM_T01",
        ("T02", "T04", "T06", "T08", "T10"): "MDM_T02",
    },
    "REF": {("I12", "I13", "I14", "I15"): "REF_I12"},
    "RRI": {("I12", "I13", "I14", "I15"): "RRI_I12"},
    "BAR": {("P01", "P05"): "BAR_P01"},
    "QBP": {("Q11",): "QBP_Q11"},
    "PPR": {("PC1", "PC2", "PC3"): "PPR_PC1"},
}


class ValidationFailed(CarehubError):
    """Raised by a ``fail_on_error`` validate step: the message has problems, the route stops.

    ``problems`` are the error entries; ``result`` is the step's whole output."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result
        self.problems: list[Problem] = [
            p for p in result["problems"] if p.get("severity", "error") == "error"
        ]
        first = self.problems[0] if self.problems else {"path": "?", "message": "invalid"}
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(f"validation failed: {first['path']}: {first['message']}{more}")


class ValidateOptions(ComponentOptions):
    """``version`` overrides MSH-12; ``strict`` counts warnings as errors and parses each
    segment with hl7apy's STRICT level; ``fail_on_error`` stops the route on an error."""

    version: str | None = Field(
        None, description='HL7 version to check against, quoted ("2.5"); default MSH-12'
    )
    strict: bool = Field(
        False, description="count warnings as errors, and parse with hl7apy's STRICT level"
    )
    fail_on_error: bool = Field(False, description="stop the route when the check finds an error")

    @field_validator("version", mode="before")
    @classmethod
    def _known_version(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, str):
            # YAML reads 2.5 as a float and 2.50 as 2.5: insist on quotes.
            raise ValueError(f"version must be text; quote it in YAML ('{value}')")
        if value not in SUPPORTED_LIBRARIES:
            raise ValueError(
                f"hl7apy cannot check HL7 version {value!r}; it knows "
                f"{', '.join(SUPPORTED_VERSIONS)}"
            )
        return value


class Validate(Translator):
    """Checks the message with hl7apy and records every problem found; see the module doc."""

    name = "validate"
    description = "check message structure and field content against the HL7 standard (hl7apy)"
    Options = ValidateOptions

    def translate(self, work: Work) -> dict[str, Any]:
        options = self.options
        assert isinstance(options, ValidateOptions)
        result = validate_message(work.v2, version=options.version, strict=options.strict)
        if options.fail_on_error and not result["valid"]:
            raise ValidationFailed(result)
        return result


def validate_message(
    text: str, *, version: str | None = None, strict: bool = False
) -> dict[str, Any]:
    """Check one message; returns ``{"valid", "version", "structure", "problems"}``.

    Never raises for anything wrong with the message: every problem is an entry."""
    check = _Check(strict)
    structure: str | None = None
    try:
        editor = MessageEditor(text)
    except NotHL7Error as err:
        check.error("MSH", str(err))
        return check.result(version, None)
    declared = editor.get("MSH-12.1").strip()
    version = version or declared
    if not version:
        check.error("MSH-12", "MSH-12 (version) is empty, so there is no standard to check against")
        return check.result(None, None)
    if version not in SUPPORTED_LIBRARIES:
        check.error(
            "MSH-12",
            f"HL7 version {version} is not supported by hl7apy "
            f"({SUPPORTED_VERSIONS[0]} to {SUPPORTED_VERSIONS[-1]}); the message was not checked",
        )
        return check.result(version, None)
    if version != declared:
        editor.set("MSH-12.1", version)  # hl7apy reads the version from MSH-12 only

    structure = _structure(editor, version, check)
    try:
        encoding = get_message_info(editor.text())[0]
    except Exception as err:
        check.error("MSH-2", f"hl7apy cannot read the delimiters: {_describe(err)}")
        return check.result(version, structure)

    segments = _Segments.scan(editor, version, check)
    with _report_file() as report:
        misplaced: set[str] = set()
        if structure is not None:
            misplaced = _check_order(segments, structure, version, check)
            _check_structure(editor, segments, structure, version, misplaced, report, check)
        for item in segments.known:
            try:
                _check_segment(item, version, encoding, strict, report, check)
            except Exception as err:  # an hl7apy table shape we did not expect: go on
                check.error(item.path, f"hl7apy could not check the segment: {_describe(err)}")
    return check.result(version, structure)


# -- result collection ----------------------------------------------------------------------
class _Check:
    """Collects problems, once each, in the order found."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.problems: list[Problem] = []
        self._seen: set[tuple[str, str, str]] = set()

    def add(self, severity: Severity, path: str, message: str, *, promote: bool = True) -> None:
        """Record a problem; under ``strict`` a warning becomes an error unless ``promote``
        is False (values outside hl7apy's tables: many are user-defined tables for which
        hl7apy only has example values)."""
        if self.strict and promote:
            severity = "error"
        key = (severity, path, message)
        if key not in self._seen:
            self._seen.add(key)
            self.problems.append({"severity": severity, "path": path, "message": message})

    def error(self, path: str, message: str) -> None:
        self.add("error", path, message)

    def warning(self, path: str, message: str) -> None:
        self.add("warning", path, message)

    def result(self, version: str | None, structure: str | None) -> dict[str, Any]:
        valid = not any(p["severity"] == "error" for p in self.problems)
        return {
            "valid": valid,
            "version": version,
            "structure": structure,
            "problems": self.problems,
        }


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# -- structure ------------------------------------------------------------------------------
def _structure(editor: MessageEditor, version: str, check: _Check) -> str | None:
    """The message structure hl7apy should use, written into ``editor``'s MSH-9.3.

    An empty MSH-9.3 is filled from the type and event; a structure the version does not
    define (senders often write ADT_A04 for ADT^A04, which HL7 table 0354 maps to ADT_A01)
    is replaced with a warning, so the rest of the message is still checked."""
    messages = load_library(version).MESSAGES
    declared = editor.get("MSH-9.3").strip()
    kind, event = editor.get("MSH-9.1").strip(), editor.get("MSH-9.2").strip()
    if declared in messages:
        return declared
    candidates = [f"{kind}_{event}"] if event else [kind]
    for events, name in _EVENT_STRUCTURES.get(kind, {}).items():
        if event in events:
            candidates.append(name)
    found = next((c for c in candidates if c in messages and c != declared), None)
    label = f"{kind}^{event}" if event else kind or "(empty MSH-9)"
    if found is not None:
        editor.set("MSH-9.3", found)
        if declared:
            check.warning(
                "MSH-9.3",
                f"HL7 {version} has no message structure {declared}; checked as {found}, "
                f"the structure for {label}",
            )
        return found
    if declared:
        reason = f"hl7apy has no message structure {declared} in version {version}"
    else:
        reason = f"MSH-9.3 is empty and hl7apy knows no structure for {label} in {version}"
    check.warning(
        "MSH-9.3",
        f"no structure: {reason}; segment order and required segments were not checked",
    )
    return None


class _Item:
    """One segment of the message: its text, name, path (``NTE[2]``) and position."""

    __slots__ = ("name", "path", "position", "text")

    def __init__(self, text: str, name: str, path: str, position: int) -> None:
        self.text = text
        self.name = name
        self.path = path
        self.position = position


class _Segments:
    """The message's segments sorted into what hl7apy can check and what it cannot."""

    def __init__(self) -> None:
        self.known: list[_Item] = []
        self.field_separator = "|"

    @classmethod
    def scan(cls, editor: MessageEditor, version: str, check: _Check) -> _Segments:
        found = cls()
        fs = editor.separators.field
        found.field_separator = fs
        defined = load_library(version).SEGMENTS
        counts: dict[str, int] = {}
        for position, text in enumerate(editor.segments):
            name = text[:3]
            counts[name] = counts.get(name, 0) + 1
            path = name + (f"[{counts[name]}]" if counts[name] > 1 else "")
            if not _SEGMENT_NAME.match(name) or text[3:4] not in ("", fs):
                check.error(
                    f"segment {position + 1}", f"not a segment: {text[:20]!r} (segment ends?)"
                )
            elif name.startswith("Z"):
                continue  # custom segments have no definition to check against
            elif name not in defined:
                check.error(
                    path,
                    f"unknown segment {name}: HL7 {version} does not define it "
                    "(custom segments must start with Z)",
                )
            else:
                found.known.append(_Item(text, name, path, position))
        return found


def _check_order(segments: _Segments, structure: str, version: str, check: _Check) -> set[str]:
    """Report segments out of the structure's order; return their names.

    hl7apy places segments into groups by name without enforcing order, so a PID before EVN
    passes its validation. Cardinalities are relaxed here (every element optional and
    repeatable) because hl7apy's validator reports missing and surplus segments itself."""
    ref = load_library(version).MESSAGES[structure]
    allowed = _names_in(ref)
    items = list(segments.known)
    misplaced: set[str] = set()
    while items:
        matcher = _OrderMatcher([item.name for item in items])
        if matcher.complete(ref):
            break
        item = items.pop(matcher.farthest)
        misplaced.add(item.name)
        if item.name in allowed:
            after = items[matcher.farthest - 1].name if matcher.farthest else "the start"
            check.error(
                item.path, f"segment {item.name} is out of order for {structure} (after {after})"
            )
        else:
            check.error(item.path, f"segment {item.name} is not part of {structure}")
    return misplaced


def _names_in(ref: Any) -> set[str]:
    names: set[str] = set()
    for name, child_ref, _cardinality, kind in ref[1]:
        if kind == "SEG":
            names.add(name)
        else:
            names |= _names_in(child_ref)
    return names


class _OrderMatcher:
    """Which prefixes of the segment list a structure (with every element optional and
    repeatable) can match; ``farthest`` is the length of the longest one."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.farthest = 0

    def complete(self, ref: Any) -> bool:
        return len(self.tokens) in self._group(ref, {0})

    def _group(self, ref: Any, starts: set[int]) -> set[int]:
        kind, children = ref[0], ref[1]
        if kind == "choice":
            ends: set[int] = set()
            for child in children:
                ends |= self._child(child, starts)
            return ends
        current = starts
        for child in children:
            current = self._repeat(child, current)
        return current

    def _repeat(self, child: Any, starts: set[int]) -> set[int]:
        reached = set(starts)
        frontier = set(starts)
        while frontier:
            new = self._child(child, frontier) - reached
            reached |= new
            frontier = new
        return reached

    def _child(self, child: Any, starts: set[int]) -> set[int]:
        name, ref, _cardinality, kind = child
        if kind != "SEG":
            return self._group(ref, starts)
        tokens = self.tokens
        ends = {
            p + 1
            for p in starts
            if p < len(tokens) and (tokens[p] == name or name == "ANYHL7SEGMENT")
        }
        if ends:
            self.farthest = max(self.farthest, *ends)
        return ends


def _check_structure(
    editor: MessageEditor,
    segments: _Segments,
    structure: str,
    version: str,
    misplaced: set[str],
    report: str,
    check: _Check,
) -> None:
    """Required and surplus segments and groups, by hl7apy's validator.

    hl7apy gets a skeleton: the (fixed-up) MSH and the other known segments' names only, so
    field problems are left to the per-segment check, which can name the occurrence."""
    lines = [editor.segments[0]]
    lines += [item.name for item in segments.known[1:] if item.name not in misplaced]
    try:
        message = parse_message(
            "\r".join(lines) + "\r",
            validation_level=VALIDATION_LEVEL.TOLERANT,
            find_groups=True,
        )
    except Exception as err:
        check.error(structure, f"hl7apy cannot build the {structure} structure: {_describe(err)}")
        return
    containers = {structure} | _group_names(message)
    groups = load_library(version).GROUPS
    choices = {name for name in containers if groups.get(name, ("",))[0] == "choice"}
    for severity, text in _validate(message, report, check, structure):
        if severity != "error":
            continue
        problem = _structure_problem(text, containers, choices, misplaced, structure)
        if problem is not None:
            check.error(*problem)


def _group_names(element: Any) -> set[str]:
    names: set[str] = set()
    for child in element.children:
        if child.classname == "Group":
            names.add(child.name)
            names |= _group_names(child)
    return names


def _structure_problem(
    text: str, containers: set[str], choices: set[str], misplaced: set[str], structure: str
) -> tuple[str, str] | None:
    """(path, message) for a message- or group-level finding; None for anything else."""
    match = re.match(r"(Missing required child|Child limit exceeded) (\w+)\.(\w+)$", text)
    if match:
        what, parent, child = match.groups()
        if parent not in containers:
            return None
        if child in misplaced:
            return None  # present, but out of order: already reported
        if what.startswith("Missing") and parent in choices:
            return None  # hl7apy checks a choice as a sequence (hl7apy #151): any one will do
        noun = "segment" if _SEGMENT_NAME.match(child) else "group"
        where = structure if parent == structure else f"{parent} in {structure}"
        if what.startswith("Missing"):
            return child, f"required {noun} {child} is missing ({where})"
        return child, f"{noun} {child} occurs more often than {where} allows"
    match = re.match(r"Invalid children detected for <(?:Message|Group) (\w+)>", text)
    if match and match.group(1) in containers:
        return match.group(1), text
    return None


# -- segment content ------------------------------------------------------------------------
def _check_segment(
    item: _Item,
    version: str,
    encoding: dict[str, str],
    strict: bool,
    report: str,
    check: _Check,
) -> None:
    """Field content of one segment by hl7apy's validator (and its STRICT parser if strict)."""
    skipped = _check_defined_fields(item, version, encoding["FIELD"], check)
    if strict:
        _strict_parse(item, version, encoding, skipped, check)
    try:
        segment = parse_segment(item.text, version, encoding, VALIDATION_LEVEL.TOLERANT)
    except Exception as err:
        check.error(item.path, f"hl7apy cannot parse the segment: {_describe(err)}")
        return
    for severity, text in _validate(segment, report, check, item.path):
        finding = _field_problem(text, item, version)
        if finding is None or _field_number(finding.path, item) in skipped:
            continue  # dropped, or inside a withdrawn or undefined field (reported above)
        check.add(
            finding.severity or severity, finding.path, finding.message, promote=finding.promote
        )


def _check_defined_fields(item: _Item, version: str, fs: str, check: _Check) -> set[int]:
    """Report filled fields the version withdrew or never defined; return their numbers.

    hl7apy reports these as unnamed children (``[None]``) or as a repetition limit of zero,
    and then flags everything inside them; one clear entry per field is enough."""
    defined: dict[int, bool] = {}  # field number -> withdrawn
    for name, ref, cardinality, _kind in load_library(version).SEGMENTS[item.name][1]:
        match = _FIELD_NAME.match(name)
        if match:
            # Withdrawn fields have the WD datatype or, in some tables, a maximum of 0.
            withdrawn = (len(ref) > 2 and ref[2] == "WD") or cardinality[1] == 0
            defined[int(match.group(2))] = withdrawn
    last = max(defined, default=0)
    skipped: set[int] = set()
    for number, _value in _filled_fields(item, fs):
        path = f"{item.path}-{number}"
        if defined.get(number) is False:
            continue
        skipped.add(number)
        if number > last:
            check.error(
                path, f"{item.name} has {last} fields in HL7 {version}; {path} is beyond them"
            )
        else:
            check.warning(
                path, f"{item.name}-{number} is withdrawn in HL7 {version}; leave it empty"
            )
    return skipped


def _filled_fields(item: _Item, fs: str) -> Iterator[tuple[int, str]]:
    """(HL7 field number, text) of each non-empty field, MSH numbered from MSH-3."""
    fields = item.text.split(fs)
    offset = 1 if item.name == "MSH" else 0
    for index in range(2 if offset else 1, len(fields)):
        if fields[index]:
            yield index + offset, fields[index]


def _field_number(path: str, item: _Item) -> int | None:
    rest = path[len(item.path) :]
    match = re.match(r"-(\d+)", rest)
    return int(match.group(1)) if match else None


def _strict_parse(
    item: _Item, version: str, encoding: dict[str, str], skipped: set[int], check: _Check
) -> None:
    """hl7apy's STRICT parser stops at the first bad value, so a failing segment is parsed
    again one field at a time to report each bad field."""
    try:
        parse_segment(item.text, version, encoding, VALIDATION_LEVEL.STRICT)
        return
    except Exception as whole:
        first = whole
    fs = encoding["FIELD"]
    msh2 = item.text.split(fs)[1] if item.name == "MSH" else ""
    found = False
    for number, value in _filled_fields(item, fs):
        if number in skipped:
            found = True
            continue
        if item.name == "MSH":
            lone = fs.join(["MSH", msh2, *([""] * (number - 3)), value])
        else:
            lone = fs.join([item.name, *([""] * (number - 1)), value])
        try:
            parse_segment(lone, version, encoding, VALIDATION_LEVEL.STRICT)
        except Exception as err:
            found = True
            check.error(f"{item.path}-{number}", f"strict: {_describe(err)}")
    if not found:
        check.error(item.path, f"strict: {_describe(first)}")


class _Finding(NamedTuple):
    """One hl7apy finding in carehub's terms; ``severity`` None keeps hl7apy's."""

    path: str
    message: str
    severity: Severity | None = None
    promote: bool = True


def _field_problem(text: str, item: _Item, version: str) -> _Finding | None:
    """Turn hl7apy's finding into carehub terms, naming elements the way carehub paths do
    (``PID.PID_3`` is PID-3, ``PID_3.CX_1`` is PID-3.1); None to drop it."""
    if text.startswith("Invalid children detected for <Segment "):
        return None  # undefined fields: _check_defined_fields names each one
    match = re.match(r"Invalid children detected for <Field (\w+) .*of type (\w+)>", text)
    if match:
        path = _element_path(item.name, match.group(1), item)
        return _Finding(
            path, f"{path} has more components than its datatype {match.group(2)} defines"
        )
    match = re.match(r"(Missing required child|Child limit exceeded) (\w+)\.(\w+)$", text)
    if match:
        what, parent, child = match.groups()
        path = _element_path(parent, child, item)
        if _withdrawn(child, version):
            return _Finding(
                path, f"{path} is withdrawn in HL7 {version}; leave it empty", "warning"
            )
        if what.startswith("Missing"):
            noun = "component" if "." in path.rpartition("-")[2] else "field"
            return _Finding(path, f"required {noun} {path} is empty")
        return _Finding(path, f"{path} repeats more often than HL7 {version} allows")
    match = re.match(r"Datatype (\w+) is not correct for (\w+)\.(\w+)", text)
    if match:
        if _withdrawn(match.group(3), version):
            return None
        path = _element_path(match.group(2), match.group(3), item)
        return _Finding(path, f"{path} does not fit its datatype (hl7apy: {text})")
    match = re.match(r"Value (.*) not in table (\w+) in element (\w+)\.(\w+)$", text, re.DOTALL)
    if match:
        value, table, parent, child = match.groups()
        if table == "HL70396" and re.fullmatch(r"HL7\d{4}|99[A-Za-z0-9]{3}", value):
            return None  # table 0396 allows any HL7nnnn table and local 99zzz systems by pattern
        path = _element_path(parent, child, item)
        # Not promoted under strict: hl7apy has only example values for user-defined tables.
        return _Finding(path, f"value {value!r} is not in HL7 table {table}", promote=False)
    match = re.match(r"Exceeded max length \((\d+)\) of (\w+)\.(\w+)$", text)
    if match:
        path = _element_path(match.group(2), match.group(3), item)
        return _Finding(path, f"value is longer than the maximum of {match.group(1)} characters")
    found = re.search(r"\b([A-Z][A-Z0-9]{2})_(\d+)\b", text)
    if found and found.group(1) == item.name:
        return _Finding(f"{item.path}-{found.group(2)}", text)
    return _Finding(item.path, text)


def _withdrawn(element: str, version: str) -> bool:
    """Whether a field or component name (PID_2, XCN_7) is withdrawn in this version."""
    lib = load_library(version)
    ref = lib.FIELDS.get(element) or lib.DATATYPES.get(element)
    return bool(ref) and len(ref) > 2 and ref[2] == "WD"


def _element_path(parent: str, child: str, item: _Item) -> str:
    field = _FIELD_NAME.match(child)
    if field and field.group(1) == item.name:
        return f"{item.path}-{field.group(2)}"
    field = _FIELD_NAME.match(parent)
    component = _COMPONENT_NAME.match(child)
    if field and field.group(1) == item.name and component:
        return f"{item.path}-{field.group(2)}.{component.group(1)}"
    return item.path


# -- hl7apy's validator ---------------------------------------------------------------------
@contextmanager
def _report_file() -> Iterator[str]:
    """A scratch file for hl7apy's report, the only place it lists more than one error."""
    handle, name = tempfile.mkstemp(prefix="carehub-validate-", suffix=".txt")
    os.close(handle)
    try:
        yield name
    finally:
        os.unlink(name)


def _validate(element: Any, report: str, check: _Check, path: str) -> list[tuple[str, str]]:
    """Every (severity, text) hl7apy's validator finds in ``element``."""
    try:
        Validator.validate(element, report_file=report)
    except ChildNotFound as err:
        check.error(path, f"hl7apy has no definition to check against: {_describe(err)}")
        return []
    except Exception as err:
        if type(err).__name__ not in ("ValidationError", "ValidationWarning"):
            check.error(path, f"hl7apy failed while validating: {_describe(err)}")
            return []
    with open(report, encoding="utf-8") as handle:
        text = handle.read()
    parts = _REPORT_ENTRY.split(text)
    return [
        ("error" if kind == "Error" else "warning", body.strip())
        for kind, body in zip(parts[1::2], parts[2::2], strict=True)
    ]
