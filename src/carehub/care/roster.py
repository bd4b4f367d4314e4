"""Who is on a patient's care team: the attribution roster, the provider directory, and the
``care-team`` enricher that joins them with what the message says.

The CMS e-notification rule asks hospitals (or an intermediary such as carehub) to tell the
patient's PCP or practice, a clinician the patient named, and post-acute providers, each by
the delivery method they prefer, and to respect the patient's privacy preferences. Encounter
notification services do this with a subscriber *roster* (who follows which patient, and how),
a *provider directory* (how to reach an NPI or a facility that a message names) and a
do-not-notify flag whose suppressions are recorded for audit. This module is those three.

Roster CSV: one row per care-team member; ``#`` lines and blank lines are skipped. The header
(one line in the file, wrapped here) and a row::

    patient_id,authority,opt_out,opt_out_reason,member_id,name,role,organization,npi,
        channel,address,preference,detail
    RG100234,RGH,false,,cc-rgh-01,Casey Sampleton RN,care_coordinator,Riverside CM,,
        email,cc@example.org,immediate,full

- ``patient_id`` + ``authority`` (PID-3.1 + PID-3.4) name the patient; ids are only unique
  within an authority, so both are required. A hospital that sends its MRNs without an
  assigning authority has them taken as the sending facility's: give its code (MSH-4, the
  namespace id) as the authority. An entry never matches another hospital's patient with
  the same number.
- ``opt_out`` (true/false/yes/no/1/0, empty = false) and ``opt_out_reason`` are patient-level:
  repeat them on each of the patient's rows, or set them on one. If any row says true the
  patient is opted out (the privacy-safe reading of a contradiction).
- A row with an empty ``member_id`` (and no other member columns) records only the patient
  flags, e.g. an opted-out patient with no care team.
- ``role``: pcp, care_coordinator, case_manager, behavioral_health, post_acute, specialist,
  other. ``channel``: email, sms, webhook, ... ``preference``: immediate (default),
  daily_digest, discharge_only. ``detail``: minimum or full (empty: the channel decides).
  ``npi`` (optional, 10 digits) lets the PCP named in a message be matched to this member.
  ``organization``, ``npi``, ``address``, ``preference`` and ``detail`` may be left out of the
  header; unknown columns are errors.

Roster YAML (the same keys)::

    patients:
      - patient_id: RG100234
        authority: RGH
        opt_out: false            # optional
        opt_out_reason: ""        # optional
        members:
          - {member_id: cc-rgh-01, name: Casey Sampleton RN, role: care_coordinator,
             channel: email, address: cc@example.org, preference: immediate, detail: full}

Provider directory YAML (NPIs of clinicians and practices; facility or location codes as sent
in PV1-37 or PV1-3.4)::

    providers:
      "1306849450":
        name: Dr Erik Lindqvist
        organization: Springfield Family Practice
        kind: practitioner        # free text: practitioner, practice, ...
        channel: email
        address: lindqvist@springfield-fp.example.org
        preference: immediate
        detail: full              # optional
      "1417950293":
        name: Dr Noor Placeholder
        practice: "1588667701"    # no channel/address of its own: use that practice's inbox
    facilities:
      MAPLEGROVE_SNF: {name: Maple Grove SNF, kind: snf, channel: email,
                       address: admissions@maplegrove.example.com}

Provider directory CSV: ``npi,code,name,organization,kind,channel,address,preference,detail,
practice`` with exactly one of ``npi`` (a provider) or ``code`` (a facility) per row.

The ``care-team`` enricher lists roster members (id = ``member_id``), the PCP the message names
(PD1-4 / ROL PP, id ``npi:<NPI>``, skipped when a roster member has that NPI or address) and,
on discharge, the PV1-37 destination (id ``facility:<CODE>``). A directory miss, a recipient
without an address and a patient opt-out (roster flag or ``opt_out_field``) become
Suppressions; recipients stay listed so the notify step decides and records per recipient.

Both files are re-read without a restart: on use, at most every ``reload_seconds``, the file's
mtime, size and inode are compared with the loaded copy. A file that is broken when carehub
starts is a ConfigError naming the file and line; a file that breaks later is logged and the
last good copy stays in use, because routing must never stop over an edited spreadsheet.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy import insert, select, update

from carehub.care.model import CareTeam, Detail, Preference, Recipient, Suppression
from carehub.components import ComponentContext, ComponentOptions, Enricher, Work
from carehub.errors import ConfigError
from carehub.events import identifier_scope, patient_key_identifier, scoped_identifier
from carehub.hl7.view import parse_path
from carehub.store.schema import patient_merges, patient_preferences
from carehub.workqueue import patient_key as make_patient_key

__all__ = [
    "ROLES",
    "CareTeamEnricher",
    "DirectoryEntry",
    "MergedKeys",
    "ProviderDirectory",
    "Role",
    "Roster",
    "RosterMember",
    "RosterPatient",
]

log = logging.getLogger(__name__)

Role = Literal[
    "pcp",
    "care_coordinator",
    "case_manager",
    "behavioral_health",
    "post_acute",
    "specialist",
    "other",
]
ROLES: tuple[str, ...] = Role.__args__  # type: ignore[attr-defined]

_MAX_ERRORS = 20  # a wholly wrong file should not print thousands of lines
_MERGE_HOPS = 32  # a chain of merges longer than this is a loop in bad data
_NPI = re.compile(r"^\d{10}$")
_CHANNEL = re.compile(r"^[a-z][a-z0-9_.-]*$")
_PHONE = re.compile(r"^\+?[0-9 ().-]{7,20}$")
_FORMATS = (".csv", ".yaml", ".yml")
_LINE = re.compile(r":(\d+): ")


# -- records -----------------------------------------------------------------------------------


class _Record(BaseModel):
    """Rows are typed by hand in spreadsheets: strip, coerce ``100234`` to text, and reject
    unknown keys so a misspelt column fails at load instead of silently dropping data."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, str_strip_whitespace=True, coerce_numbers_to_str=True
    )

    @field_validator("channel", "preference", "detail", "role", mode="before", check_fields=False)
    @classmethod
    def _code(cls, value: Any, info: ValidationInfo) -> Any:
        """Codes compare lower-case; an empty preference or detail cell means the default."""
        if isinstance(value, str):
            value = value.strip().lower()
        if value in ("", None) and info.field_name == "preference":
            return "immediate"
        if value == "" and info.field_name == "detail":
            return None
        return value

    @field_validator("npi", "practice", mode="before", check_fields=False)
    @classmethod
    def _npi(cls, value: Any) -> Any:
        if isinstance(value, int):
            value = str(value)
        if isinstance(value, str):
            value = value.strip()
            if not value:
                return None
            if not _NPI.match(value):
                raise ValueError(f"an NPI is 10 digits, not {value!r}")
        return value

    @model_validator(mode="after")
    def _address_fits_channel(self) -> _Record:
        # Catches swapped columns (a phone number in an email row) when the file is loaded
        # rather than when a notification bounces days later.
        channel = getattr(self, "channel", "")
        address = getattr(self, "address", "")
        if channel and not _CHANNEL.match(channel):
            raise ValueError(f"channel {channel!r} is not a channel name (email, sms, webhook...)")
        if address and channel == "email" and "@" not in address:
            raise ValueError(f"address {address!r} is not an email address")
        if address and channel == "sms" and not _PHONE.match(address):
            raise ValueError(f"address {address!r} is not a phone number")
        return self


class RosterMember(_Record):
    """One person or team who follows a patient, and how they want to hear."""

    member_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    role: Role
    organization: str = ""
    npi: str | None = None
    channel: str = Field(min_length=1)
    address: str = ""  # empty: listed, but suppressed at routing time (nowhere to send)
    preference: Preference = "immediate"
    detail: Detail | None = None

    def recipient(self) -> Recipient:
        return Recipient(
            id=self.member_id,
            name=self.name,
            role=self.role,
            channel=self.channel,
            address=self.address,
            organization=self.organization,
            preference=self.preference,
            detail=self.detail,
        )


class _PatientFlags(_Record):
    patient_id: str = Field(min_length=1)
    authority: str = Field(min_length=1)
    opt_out: bool = False
    opt_out_reason: str = ""

    @field_validator("opt_out", mode="before")
    @classmethod
    def _empty_is_false(cls, value: Any) -> Any:
        return False if value in ("", None) else value


class _PatientDoc(_PatientFlags):
    members: list[RosterMember] = Field(default_factory=list)


class _RosterDoc(_Record):
    patients: list[_PatientDoc]


@dataclass(slots=True, frozen=True)
class RosterPatient:
    """One patient on the roster: the flags and members gathered from all their rows."""

    patient_id: str
    authority: str
    opt_out: bool
    opt_out_reason: str
    members: tuple[RosterMember, ...]

    @property
    def key(self) -> str:
        """``AUTHORITY|ID``, the shape of carehub.workqueue.patient_key."""
        return f"{self.authority}|{self.patient_id}"


class DirectoryEntry(_Record):
    """How to reach a clinician, practice or facility that a message names."""

    name: str = Field(min_length=1)
    organization: str = ""
    kind: str = ""  # free text: practitioner, practice, snf, home_health, irf ...
    channel: str = ""  # empty (with no practice): listed, but there is nowhere to send
    address: str = ""
    preference: Preference = "immediate"
    detail: Detail | None = None
    #: NPI of a practice entry whose channel and address this clinician uses (many PCPs want
    #: notices in the practice inbox; the CoP accepts the practice as the recipient).
    practice: str | None = None

    def recipient(self, recipient_id: str, role: str) -> Recipient:
        return Recipient(
            id=recipient_id,
            name=self.name,
            role=role,
            channel=self.channel,
            address=self.address,
            organization=self.organization,
            preference=self.preference,
            detail=self.detail,
        )


class _DirectoryDoc(_Record):
    providers: dict[str, DirectoryEntry] = Field(default_factory=dict)
    facilities: dict[str, DirectoryEntry] = Field(default_factory=dict)

    @field_validator("providers", "facilities", mode="before")
    @classmethod
    def _text_keys(cls, value: Any) -> Any:
        """An unquoted NPI or numeric code is an int to YAML; keys are text here."""
        if isinstance(value, dict):
            value = {str(k).strip(): v for k, v in value.items()}
        return value


@dataclass(slots=True, frozen=True)
class _Directory:
    providers: dict[str, DirectoryEntry]
    facilities: dict[str, DirectoryEntry]  # keys upper-cased


# -- error reporting ---------------------------------------------------------------------------


def _loc_text(loc: Iterable[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _yaml_line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at ``loc``, or of the nearest parent that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            if match is None:
                break
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _raise(path: Path, problems: list[str]) -> None:
    """One ConfigError listing the problems in file order (at most _MAX_ERRORS of them)."""
    if problems:
        shown = sorted(problems, key=_line_number)[:_MAX_ERRORS]
        if len(problems) > _MAX_ERRORS:
            shown.append(f"{path}: ... and {len(problems) - _MAX_ERRORS} more problems")
        raise ConfigError("\n".join(shown))


def _line_number(problem: str) -> int:
    match = _LINE.search(problem)
    return int(match.group(1)) if match else 0


def _validation_problems(
    err: ValidationError, where: Callable[[tuple[Any, ...]], str]
) -> list[str]:
    problems = []
    for error in err.errors():
        loc = tuple(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        label = _loc_text(loc)
        problems.append(
            f"{where(loc)}: {label}: {message}" if label else f"{where(loc)}: {message}"
        )
    return problems


M = TypeVar("M", bound=BaseModel)


def _validate_yaml(model: type[M], data: Any, tree: yaml.Node | None, path: Path) -> M:
    """Validate a YAML document; every problem is reported at its own line."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = _validation_problems(err, lambda loc: f"{path}:{_yaml_line(tree, loc)}")
    _raise(path, problems)
    raise AssertionError("unreachable: a ValidationError always lists a problem")


def _load_yaml(text: str, path: Path) -> tuple[Any, yaml.Node | None]:
    try:
        tree = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(err, 'problem', err)}") from err
    return data, tree


def _check_keys(node: yaml.Node | None, path: Path, section: str, npi: bool) -> list[str]:
    """Problems with the keys of one mapping section, at the key's own line: YAML keeps the
    last of two equal keys silently, and two entries for one NPI is a mistake."""
    if not isinstance(node, yaml.MappingNode):
        return []
    section_node = next((v for k, v in node.value if getattr(k, "value", None) == section), None)
    if not isinstance(section_node, yaml.MappingNode):
        return []
    seen: set[str] = set()
    problems = []
    for key, _ in section_node.value:
        value = str(getattr(key, "value", "")).strip()
        where = f"{path}:{key.start_mark.line + 1}: {section}.{value}"
        if npi and not _NPI.match(value):
            problems.append(f"{where}: provider keys are 10-digit NPIs")
        if value.upper() in seen:
            problems.append(f"{where}: listed twice")
        seen.add(value.upper())
    return problems


@dataclass(slots=True)
class _CsvTable:
    header: list[str]
    header_line: int
    rows: list[tuple[int, dict[str, str]]]  # (line number, cells by column)
    problems: list[str]  # returned, not raised, so one report lists every bad row


def _csv_rows(text: str, path: Path) -> _CsvTable:
    """Header and rows (with their line numbers) of a CSV file; ``#`` lines are comments and
    are blanked rather than dropped so line numbers stay those an editor shows."""
    lines = ["\n" if line.lstrip().startswith("#") else line for line in text.splitlines(True)]
    reader = csv.reader(lines)
    table: _CsvTable | None = None
    try:
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            if table is None:
                header = [cell.strip().lower() for cell in cells]
                table = _CsvTable(header, reader.line_num, [], [])
                continue
            if len(cells) > len(table.header):
                table.problems.append(
                    f"{path}:{reader.line_num}: {len(cells)} cells but the header has "
                    f"{len(table.header)} columns (quote values that contain commas)"
                )
                continue
            cells_by_column = dict(zip(table.header, (c.strip() for c in cells), strict=False))
            table.rows.append((reader.line_num, cells_by_column))
    except csv.Error as err:
        raise ConfigError(f"{path}:{reader.line_num}: not valid CSV: {err}") from None
    if table is None:
        raise ConfigError(f"{path}: no header row (the file is empty)")
    return table


def _check_header(
    table: _CsvTable, path: Path, required: Iterable[str], known: Iterable[str]
) -> None:
    known = tuple(known)
    header = table.header
    where = f"{path}:{table.header_line}"
    missing = [c for c in required if c not in header]
    unknown = [c for c in header if c not in known]
    problems = []
    if missing:
        problems.append(f"{where}: header lacks column(s) {', '.join(missing)}")
    if unknown:
        problems.append(
            f"{where}: unknown column(s) {', '.join(unknown)} (known: {', '.join(known)})"
        )
    if len(set(header)) != len(header):
        problems.append(f"{where}: a column name appears twice")
    _raise(path, problems)


# -- roster parsing ----------------------------------------------------------------------------

ROSTER_COLUMNS = (
    "patient_id",
    "authority",
    "opt_out",
    "opt_out_reason",
    "member_id",
    "name",
    "role",
    "organization",
    "npi",
    "channel",
    "address",
    "preference",
    "detail",
)
_ROSTER_REQUIRED = ("patient_id", "authority", "member_id", "name", "role", "channel", "address")
_FLAG_COLUMNS = ("patient_id", "authority", "opt_out", "opt_out_reason")
_MEMBER_COLUMNS = tuple(c for c in ROSTER_COLUMNS if c not in _FLAG_COLUMNS)

_PatientKey = tuple[str, str]  # (AUTHORITY upper-cased, patient id)


class _PatientBuilder:
    """Gathers one patient's rows; the roster keeps the frozen RosterPatient."""

    def __init__(self, flags: _PatientFlags) -> None:
        self.patient_id = flags.patient_id
        self.authority = flags.authority
        self.opt_out = flags.opt_out
        self.reason = flags.opt_out_reason
        self.members: dict[str, RosterMember] = {}

    def merge_flags(self, flags: _PatientFlags) -> None:
        self.opt_out = self.opt_out or flags.opt_out
        self.reason = self.reason or flags.opt_out_reason

    def build(self) -> RosterPatient:
        return RosterPatient(
            self.patient_id,
            self.authority,
            self.opt_out,
            self.reason,
            tuple(self.members.values()),
        )


def _parse_roster_csv(text: str, path: Path) -> dict[_PatientKey, RosterPatient]:
    table = _csv_rows(text, path)
    _check_header(table, path, _ROSTER_REQUIRED, ROSTER_COLUMNS)
    rows, problems = table.rows, table.problems
    patients: dict[_PatientKey, _PatientBuilder] = {}
    for line, row in rows:
        where = f"{path}:{line}"
        try:
            flags = _PatientFlags.model_validate({c: row[c] for c in _FLAG_COLUMNS if c in row})
        except ValidationError as err:
            problems += _validation_problems(err, lambda _loc, w=where: w)
            continue
        key = (flags.authority.upper(), flags.patient_id)
        builder = patients.get(key)
        if builder is None:
            builder = patients[key] = _PatientBuilder(flags)
        else:
            builder.merge_flags(flags)
        member_cells = {c: row[c] for c in _MEMBER_COLUMNS if c in row}
        if not member_cells.get("member_id"):
            if any(member_cells.values()):
                problems.append(f"{where}: member_id: required when member columns are filled")
            continue
        try:
            member = RosterMember.model_validate(member_cells)
        except ValidationError as err:
            problems += _validation_problems(err, lambda _loc, w=where: w)
            continue
        if member.member_id in builder.members:
            problems.append(
                f"{where}: member_id: {member.member_id!r} is listed twice for patient "
                f"{flags.authority}|{flags.patient_id}"
            )
            continue
        builder.members[member.member_id] = member
    _raise(path, problems)
    return {key: builder.build() for key, builder in patients.items()}


def _parse_roster_yaml(text: str, path: Path) -> dict[_PatientKey, RosterPatient]:
    data, tree = _load_yaml(text, path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with a 'patients' list")
    doc = _validate_yaml(_RosterDoc, data, tree, path)
    patients: dict[_PatientKey, RosterPatient] = {}
    problems = []
    for index, entry in enumerate(doc.patients):
        where = f"{path}:{_yaml_line(tree, ('patients', index))}"
        key = (entry.authority.upper(), entry.patient_id)
        if key in patients:
            problems.append(
                f"{where}: patients[{index}]: {entry.authority}|{entry.patient_id} "
                "is listed twice (give one entry all its members)"
            )
            continue
        ids = [m.member_id for m in entry.members]
        duplicate = next((i for i in ids if ids.count(i) > 1), None)
        if duplicate is not None:
            problems.append(f"{where}: patients[{index}]: member_id {duplicate!r} is listed twice")
            continue
        patients[key] = RosterPatient(
            entry.patient_id,
            entry.authority,
            entry.opt_out,
            entry.opt_out_reason,
            tuple(entry.members),
        )
    _raise(path, problems)
    return patients


# -- directory parsing -------------------------------------------------------------------------

DIRECTORY_COLUMNS = (
    "npi",
    "code",
    "name",
    "organization",
    "kind",
    "channel",
    "address",
    "preference",
    "detail",
    "practice",
)


def _parse_directory_csv(text: str, path: Path) -> _Directory:
    table = _csv_rows(text, path)
    _check_header(table, path, ("name", "channel", "address"), DIRECTORY_COLUMNS)
    if "npi" not in table.header and "code" not in table.header:
        raise ConfigError(f"{path}:{table.header_line}: header needs an npi or a code column")
    rows, problems = table.rows, table.problems
    providers: dict[str, DirectoryEntry] = {}
    facilities: dict[str, DirectoryEntry] = {}
    for line, row in rows:
        where = f"{path}:{line}"
        npi, code = row.pop("npi", ""), row.pop("code", "")
        if bool(npi) == bool(code):
            problems.append(f"{where}: give exactly one of npi (a provider) or code (a facility)")
            continue
        if npi and not _NPI.match(npi):
            problems.append(f"{where}: npi: an NPI is 10 digits, not {npi!r}")
            continue
        try:
            entry = DirectoryEntry.model_validate({k: v for k, v in row.items() if v != ""})
        except ValidationError as err:
            problems += _validation_problems(err, lambda _loc, w=where: w)
            continue
        table, key = (providers, npi) if npi else (facilities, code.upper())
        if key in table:
            problems.append(f"{where}: {'npi' if npi else 'code'} {key} is listed twice")
            continue
        table[key] = entry
    _raise(path, problems)
    return _resolve_practices(providers, facilities, path)


def _parse_directory_yaml(text: str, path: Path) -> _Directory:
    data, tree = _load_yaml(text, path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with 'providers'/'facilities'")
    problems = _check_keys(tree, path, "providers", npi=True)
    problems += _check_keys(tree, path, "facilities", npi=False)
    _raise(path, problems)
    doc = _validate_yaml(_DirectoryDoc, data, tree, path)
    facilities = {code.upper(): entry for code, entry in doc.facilities.items()}
    return _resolve_practices(doc.providers, facilities, path)


def _resolve_practices(
    providers: dict[str, DirectoryEntry], facilities: dict[str, DirectoryEntry], path: Path
) -> _Directory:
    """Fill a clinician's missing channel and address from the practice it names, once, at
    load, so a lookup is a dict read and a dangling practice reference fails at load."""
    problems = []
    resolved = dict(providers)
    for npi, entry in providers.items():
        if entry.practice is None:
            continue
        practice = providers.get(entry.practice)
        if practice is None:
            problems.append(f"{path}: providers.{npi}.practice: {entry.practice} is not listed")
            continue
        inherited: dict[str, Any] = {}
        if not entry.channel and not entry.address:
            inherited = {"channel": practice.channel, "address": practice.address}
        for name in ("preference", "detail"):
            if name not in entry.model_fields_set:
                inherited[name] = getattr(practice, name)
        if not entry.organization:
            inherited["organization"] = practice.organization or practice.name
        resolved[npi] = entry.model_copy(update=inherited)
    _raise(path, problems)
    return _Directory(resolved, facilities)


# -- reloading ---------------------------------------------------------------------------------

T = TypeVar("T")
_Signature = tuple[int, int, int]


class _WatchedFile(Generic[T]):
    """A file parsed into memory and re-read when it changes, checked at most every
    ``reload_seconds`` so a busy route costs one ``stat`` per interval, not per message."""

    what: ClassVar[str] = "file"

    def __init__(
        self,
        path: str | Path,
        reload_seconds: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.reload_seconds = reload_seconds
        self._clock = clock
        self._data: T | None = None
        self._signature: _Signature | None = None
        self._failed: _Signature | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        if self.path.suffix.lower() not in _FORMATS:
            raise ConfigError(f"{self.path}: a {self.what} is a .csv, .yaml or .yml file")

    def _parse(self, text: str) -> T:
        raise NotImplementedError

    def _stat(self) -> _Signature:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> tuple[_Signature, T]:
        # The signature is taken before reading: if the file changes while we read it, the
        # next check sees a different signature and reads it again.
        try:
            signature = self._stat()
            raw = self.path.read_bytes()
        except OSError as err:
            raise ConfigError(f"{self.path}: cannot read the {self.what}: {err.strerror}") from err
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise ConfigError(f"{self.path}:{line}: not UTF-8 text") from None
        return signature, self._parse(text)

    def load(self) -> None:
        """Read the file now; a broken or missing file is a ConfigError (at start-up)."""
        signature, data = self._read()
        with self._lock:
            self._data, self._signature, self._failed = data, signature, None
            self._checked_at = self._clock()

    @property
    def loaded(self) -> bool:
        return self._data is not None

    def refresh(self) -> bool:
        """Reload if the interval has passed and the file changed; True if it was reloaded.
        Never raises: a broken file is logged once and the last good copy stays in use."""
        now = self._clock()
        if self._data is not None and now - self._checked_at < self.reload_seconds:
            return False
        if not self._lock.acquire(blocking=False):
            return False  # another thread is checking; use what is loaded
        try:
            self._checked_at = now
            try:
                signature = self._stat()
            except OSError as err:
                if self._failed != (0, 0, 0):
                    log.error(
                        "%s: cannot read the %s (%s); keeping the last good copy",
                        self.path,
                        self.what,
                        err.strerror,
                    )
                self._failed = (0, 0, 0)
                return False
            if signature in (self._signature, self._failed):
                return False
            try:
                signature, data = self._read()
            except ConfigError as err:
                self._failed = signature
                log.error(
                    "%s changed but cannot be used; keeping the last good copy:\n%s", self.what, err
                )
                return False
            self._data, self._signature, self._failed = data, signature, None
            log.info("%s: reloaded the %s", self.path, self.what)
            return True
        finally:
            self._lock.release()

    @property
    def data(self) -> T:
        if self._data is None:
            self.load()
        assert self._data is not None
        return self._data


class Roster(_WatchedFile[dict[_PatientKey, RosterPatient]]):
    """The attribution roster: which care-team members follow which patient."""

    what = "care-team roster"

    def _parse(self, text: str) -> dict[_PatientKey, RosterPatient]:
        if self.path.suffix.lower() == ".csv":
            return _parse_roster_csv(text, self.path)
        return _parse_roster_yaml(text, self.path)

    def find(self, patient_id: str, authority: str | None) -> RosterPatient | None:
        """The roster entry for an identifier; both parts must match (ids repeat across
        authorities). An identifier without an authority never matches."""
        if not patient_id or not authority:
            return None
        return self.data.get((authority.strip().upper(), patient_id.strip()))

    def find_key(self, patient_key: str) -> RosterPatient | None:
        """The entry for an ``AUTHORITY|ID`` key (a Transition's patient_key)."""
        authority, sep, patient_id = patient_key.partition("|")
        return self.find(patient_id, authority) if sep else None

    def count(self) -> int:
        return len(self.data)

    def patients(self) -> list[RosterPatient]:
        return list(self.data.values())


class ProviderDirectory(_WatchedFile[_Directory]):
    """How to reach the PCP (by NPI) or post-acute destination (by code) a message names."""

    what = "provider directory"

    def _parse(self, text: str) -> _Directory:
        if self.path.suffix.lower() == ".csv":
            return _parse_directory_csv(text, self.path)
        return _parse_directory_yaml(text, self.path)

    def by_npi(self, npi: str | None) -> DirectoryEntry | None:
        return self.data.providers.get(npi.strip()) if npi else None

    def by_code(self, code: str | None) -> DirectoryEntry | None:
        return self.data.facilities.get(code.strip().upper()) if code else None


# -- the enricher ------------------------------------------------------------------------------


class CareTeamError(RuntimeError):
    """The step cannot run as configured (e.g. no care event before it in the route)."""


class _TeamBuilder:
    """A CareTeam with de-duplication: one notice per id and per address, first one wins
    (the roster comes first, because it records what the subscriber asked for)."""

    def __init__(self) -> None:
        self.team = CareTeam()
        self.ids: set[str] = set()
        self.npis: set[str] = set()
        self.addresses: set[tuple[str, str]] = set()

    def suppress(self, reason: str, recipient_id: str | None = None) -> None:
        suppression = Suppression(reason=reason, recipient_id=recipient_id)
        if suppression not in self.team.suppressed:
            self.team.suppressed.append(suppression)

    def covers(self, npi: str | None = None, recipient: Recipient | None = None) -> bool:
        if npi and npi in self.npis:
            return True
        if recipient is not None:
            return recipient.id in self.ids or _address_key(recipient) in self.addresses
        return False

    def add(self, recipient: Recipient, npi: str | None = None) -> None:
        """List a recipient unless someone listed already covers them. One without an address
        is listed *and* suppressed, so the notify step records the suppression against them;
        it covers nobody, so a directory entry for the same NPI can still reach the PCP."""
        if recipient.id in self.ids:
            return
        if not recipient.address:
            self.team.recipients.append(recipient)
            self.ids.add(recipient.id)
            self.suppress(
                f"{recipient.role} {recipient.name} has no {recipient.channel or 'delivery'} "
                "address",
                recipient.id,
            )
            return
        if self.covers(npi, recipient):
            return
        self.team.recipients.append(recipient)
        self.ids.add(recipient.id)
        self.addresses.add(_address_key(recipient))
        if npi:
            self.npis.add(npi)


def _address_key(recipient: Recipient) -> tuple[str, str]:
    return (recipient.channel, recipient.address.strip().lower())


@dataclass(slots=True, frozen=True)
class StatedChoice:
    """What a message last said about the patient's do-not-notify field."""

    opted_out: bool
    value: str
    message_id: int | None


class StatedOptOuts:
    """Each patient's do-not-notify choice as the last message that filled the field stated
    it (table ``patient_preferences``; in memory for dry runs). A message with the field
    empty says nothing, so it does not take an opt-out back: only a message that fills the
    field with another value does. Written only when the choice changes."""

    def __init__(self, context: ComponentContext) -> None:
        self.context = context  # its store is attached once the hub has opened it
        self._memory: dict[str, StatedChoice] = {}

    def get(self, patient_key: str) -> StatedChoice | None:
        store = self.context.store
        if store is None:
            return self._memory.get(patient_key)
        with store.engine.connect() as conn:
            row = conn.execute(
                select(patient_preferences).where(patient_preferences.c.patient_key == patient_key)
            ).first()
        return StatedChoice(row.opted_out, row.value or "", row.message_id) if row else None

    def record(self, patient_key: str, choice: StatedChoice) -> None:
        known = self.get(patient_key)
        if known is not None and known.opted_out == choice.opted_out:
            return
        store = self.context.store
        if store is None:
            self._memory[patient_key] = choice
            return
        values = {
            "opted_out": choice.opted_out,
            "value": choice.value[:255],
            "message_id": choice.message_id,
            "updated_at": datetime.now(UTC),
        }
        table = patient_preferences
        with store.engine.begin() as conn:
            found = conn.execute(
                update(table).where(table.c.patient_key == patient_key).values(**values)
            ).rowcount
            if not found:
                conn.execute(insert(table).values(patient_key=patient_key, **values))


class MergedKeys:
    """Which patient keys were merged into which (table ``patient_merges``, written by the
    encounter-state enricher on an A40): the roster may still list a patient under a retired
    identifier. Without a store (dry runs) a key stands for itself only."""

    def __init__(self, context: ComponentContext) -> None:
        self.context = context  # its store is attached once the hub has opened it

    def keys_of(self, patient_key: str) -> list[str]:
        """``patient_key`` and every key retired into it, directly or through a chain of
        merges (at most _MERGE_HOPS deep, so a loop in bad data ends)."""
        keys = [patient_key]
        store = self.context.store
        if store is None:
            return keys
        frontier = [patient_key]
        with store.engine.connect() as conn:
            for _ in range(_MERGE_HOPS):
                if not frontier:
                    break
                retired = conn.execute(
                    select(patient_merges.c.retired_key).where(
                        patient_merges.c.surviving_key.in_(frontier)
                    )
                ).scalars()
                frontier = [key for key in retired if key not in keys]
                keys += frontier
        return keys


def _roster_opt_out_reason(patient: RosterPatient) -> str:
    reason = f"patient {patient.key} opted out (roster)"
    return f"{reason}: {patient.opt_out_reason}" if patient.opt_out_reason else reason


def _transition_field(encounter: Any, name: str) -> Any:
    if encounter is None:
        return None
    if isinstance(encounter, dict):
        return encounter.get(name)
    return getattr(encounter, name, None)


class CareTeamEnricher(Enricher):
    """Resolves who should hear about this message: roster members, the PCP the message
    names, and the post-acute provider on discharge, with every suppression recorded."""

    name = "care-team"
    description = (
        "Care team from the attribution roster, the message's PCP and the discharge "
        "destination (via the provider directory), with opt-outs and suppressions recorded."
    )

    class Options(ComponentOptions):
        roster: str = Field(
            description="attribution roster, a .csv, .yaml or .yml file relative to the config "
            "folder: who follows which patient, and patient opt-outs"
        )
        providers: str | None = Field(
            None,
            description="provider directory (.csv, .yaml or .yml, relative to the config "
            "folder) for PCP NPIs and discharge destinations; unset: those are suppressed",
        )
        reload_seconds: float = Field(
            5.0,
            ge=0,
            description="seconds between checks of both files for changes (0: on every message)",
        )
        opt_out_field: str | None = Field(
            None,
            description='field whose value marks the patient do-not-notify, e.g. "PD1-12"; '
            "unset: only the roster's opt_out",
        )
        opt_out_values: list[str] = Field(
            default_factory=lambda: ["Y"],
            description="opt_out_field values (or first components) that mean opted out, in "
            "any case",
        )
        include_pcp_from_message: bool = Field(
            True,
            description="add the PCP the message names (PD1-4, or ROL/PRD role PP) by NPI from "
            "the provider directory",
        )
        include_post_acute: bool = Field(
            True,
            description="on discharge, add the PV1-37 destination facility from the provider "
            "directory",
        )

        @field_validator("roster", "providers")
        @classmethod
        def _known_format(cls, value: str | None) -> str | None:
            if value is not None and Path(value).suffix.lower() not in _FORMATS:
                raise ValueError(f"{value!r}: expected a .csv, .yaml or .yml file")
            return value

        @field_validator("opt_out_field")
        @classmethod
        def _valid_path(cls, value: str | None) -> str | None:
            if value is not None:
                parse_path(value)  # PathError is a ValueError: reported as a config error
            return value

    options: Options

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        opts = self.options
        self.roster = Roster(context.path(opts.roster), opts.reload_seconds)
        self.directory = (
            ProviderDirectory(context.path(opts.providers), opts.reload_seconds)
            if opts.providers
            else None
        )
        self._opt_out_values = {v.strip().upper() for v in opts.opt_out_values}
        self.stated = StatedOptOuts(context)
        self.merged = MergedKeys(context)

    async def start(self) -> None:
        self.roster.load()
        if self.directory is not None:
            self.directory.load()

    def enrich(self, work: Work) -> Any:
        event = work.event
        if event is None:
            raise CareTeamError(
                "the care-team step needs a care event: put `translate: v2-to-event` before "
                "it in the route"
            )
        self.roster.refresh()
        if self.directory is not None:
            self.directory.refresh()
        encounter = work.data.get("encounter")
        builder = _TeamBuilder()

        for patient in self._roster_patients(work, encounter):
            if patient.opt_out:
                builder.suppress(_roster_opt_out_reason(patient))
            for member in patient.members:
                builder.add(member.recipient(), npi=member.npi)
        self._message_opt_out(work, encounter, builder)
        if self.options.include_pcp_from_message:
            self._add_pcp(event, builder)
        if self.options.include_post_acute:
            self._add_post_acute(event, encounter, builder)

        work.data["care_team"] = builder.team
        return builder.team.as_output()

    def channels_in_use(self) -> dict[str, Path]:
        """Each channel a roster member or a directory entry is reached by, with the file
        that names it (first found): the notify step must have a channel of each name, or
        those recipients are never told (RouteTable.start says so)."""
        found: dict[str, Path] = {}
        for patient in self.roster.patients():
            for member in patient.members:
                found.setdefault(member.channel, self.roster.path)
        if self.directory is not None:
            data = self.directory.data
            for entry in [*data.providers.values(), *data.facilities.values()]:
                if entry.channel:
                    found.setdefault(entry.channel, self.directory.path)
        return found

    def roster_team(
        self, patient_key: str, roles: Collection[str]
    ) -> tuple[list[Recipient], str | None]:
        """The roster's members in ``roles`` for a patient key (authority|id) and every key
        merged into it, and why the patient must not be contacted about, when the roster or a
        message says so: for the hub's own alerts (an overdue follow-up or referral), which
        have no message to read a team from."""
        opted_out = self.opt_out(patient_key)
        if opted_out is not None:
            return [], opted_out
        members = {
            member.member_id: member.recipient()
            for entry in self._roster_entries(patient_key)
            for member in entry.members
            if member.role in roles
        }
        return list(members.values()), None

    def opt_out(self, patient_key: str) -> str | None:
        """Why nobody may be told anything about this patient (a roster flag on the key or a
        key merged into it, or a do-not-notify a message stated), or None. For the hub's own
        alerts; a message's notices read the same facts in ``enrich``."""
        self.roster.refresh()
        for entry in self._roster_entries(patient_key):
            if entry.opt_out:
                return _roster_opt_out_reason(entry)
        stated = self.stated.get(patient_key)
        if stated is not None and stated.opted_out:
            field = self.options.opt_out_field or "a message"
            return (
                f"patient asked not to be notified ({field} = {stated.value!r} in message "
                f"{stated.message_id})"
            )
        return None

    def _roster_entries(self, patient_key: str) -> list[RosterPatient]:
        """The roster entries of a patient key and of every key merged into it."""
        entries = (self.roster.find_key(key) for key in self.merged.keys_of(patient_key))
        return [entry for entry in entries if entry is not None]

    # -- pieces ---------------------------------------------------------------------------
    def _roster_patients(self, work: Work, encounter: Any) -> list[RosterPatient]:
        """Every roster entry for this patient: by any identifier in PID-3, by the encounter's
        patient key (which follows merges) and by every key an A40 merged into it, so the
        retired record's team and opt-out still apply. A patient attributed under two
        identifiers (two programs, or a merge) gets the union of both teams."""
        found: dict[str, RosterPatient] = {}
        patient = work.event.patient if work.event else None
        if patient is not None:
            keyed = [i for i in (patient.key, patient.primary) if i is not None]
            identifiers = keyed + patient.identifiers
            scope = identifier_scope(work.event)
            for identifier in identifiers:
                # One sent without an authority is the sending facility's, as it is keyed.
                identifier = scoped_identifier(identifier, scope)
                entry = self.roster.find(identifier.value, identifier.authority)
                if entry is not None:
                    found.setdefault(entry.key, entry)
        key = _transition_field(encounter, "patient_key")
        if isinstance(key, str) and key:
            for entry in self._roster_entries(key):
                found.setdefault(entry.key, entry)
        return list(found.values())

    def _message_opt_out(self, work: Work, encounter: Any, builder: _TeamBuilder) -> None:
        """The opt_out_field of this message, or, when it is empty, what an earlier message
        of the patient's stated there: an opt-out given at registration holds for the
        discharge whose PD1-12 the sender left empty."""
        field = self.options.opt_out_field
        if not field:
            return
        value = work.view.get(field).strip()
        key = self._patient_key(work, encounter)
        if value:
            first = value.split(work.view.separators.component, 1)[0].strip()
            opted_out = value.upper() in self._opt_out_values or (
                first.upper() in self._opt_out_values
            )
            if key is not None:
                self.stated.record(key, StatedChoice(opted_out, value, work.message.id))
            if opted_out:
                builder.suppress(f"patient asked not to be notified ({field} = {value!r})")
            return
        stated = self.stated.get(key) if key is not None else None
        if stated is None and key is not None:
            stated = self._stated_unscoped(work, key)
        if stated is not None and stated.opted_out:
            builder.suppress(
                f"patient asked not to be notified ({field} = {stated.value!r} in message "
                f"{stated.message_id}; this message leaves it empty)"
            )

    def _stated_unscoped(self, work: Work, key: str) -> StatedChoice | None:
        """A choice stated under the patient's id as sent, when it came without an assigning
        authority and is now keyed within the sending facility: one stated before ids were
        scoped still holds, and is kept under the key now used (so the hub's own alerts,
        which have only that key, honour it too)."""
        patient = work.event.patient if work.event else None
        unscoped = patient.unscoped_key if patient is not None else None
        if unscoped is None:
            return None
        bare = make_patient_key(unscoped.value, None, 0)
        stated = self.stated.get(bare) if bare != key else None
        if stated is not None:
            self.stated.record(key, stated)
        return stated

    @staticmethod
    def _patient_key(work: Work, encounter: Any) -> str | None:
        """The encounter's patient key (it follows merges), else PID-3's primary id."""
        key = _transition_field(encounter, "patient_key")
        if isinstance(key, str) and key:
            return key
        key = patient_key_identifier(work.event.patient if work.event else None)
        if key is None or not key.value:
            return None
        return make_patient_key(key.value, key.authority, 0)

    def _add_pcp(self, event: Any, builder: _TeamBuilder) -> None:
        pcp = event.patient.pcp if event.patient else None
        if pcp is None:
            return
        npi = (pcp.id or "").strip()
        if not npi:
            name = " ".join(p for p in (pcp.prefix, pcp.given, pcp.family) if p) or "unnamed"
            builder.suppress(f"PCP {name} in the message has no NPI", "pcp:unknown")
            return
        if builder.covers(npi=npi):
            return  # a roster member with this NPI already covers the PCP
        entry = self.directory.by_npi(npi) if self.directory is not None else None
        if entry is None:
            builder.suppress(f"PCP NPI {npi} not in the provider directory", f"npi:{npi}")
            return
        builder.add(entry.recipient(f"npi:{npi}", "pcp"), npi=npi)

    def _add_post_acute(self, event: Any, encounter: Any, builder: _TeamBuilder) -> None:
        discharge = event.kind == "discharge" or _transition_field(encounter, "kind") in (
            "discharge",
            "discharge_corrected",
        )
        code = event.encounter.discharged_to if event.encounter else None
        if not discharge or not code:
            return
        code = code.strip().upper()
        entry = self.directory.by_code(code) if self.directory is not None else None
        if entry is None:
            builder.suppress(
                f"post-acute destination {code} not in the provider directory", f"facility:{code}"
            )
            return
        builder.add(entry.recipient(f"facility:{code}", "post_acute"))
