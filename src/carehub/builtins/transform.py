"""The ``transform`` step: edits of the v2 message, configured without code.

Interface engineers spend most of their time on small, repetitive fixes (route a facility code,
blank a field a receiver rejects, map one code set to another, drop a Z segment). This step
does those from the route file, in order, on the message text, so everything it does not touch
is forwarded byte for byte:

    - transform:
        tables:
          sex: {M: male, F: female, U: unknown}
        tables_file: tables/codes.yaml        # optional, relative to the config folder
        edits:
          - set: {MSH-5: CARE_PLATFORM, MSH-6: "{MSH-4}"}   # {PATH} inserts a field's value
          - copy: {from: "PID-3[1].1", to: PID-2}          # [ ] inside { }: quote it
          - clear: [PID-19, PID-13]
          - map: {path: PID-8, table: sex, default: U}       # default: keep (default), "", text
          - set: {PID-5: "Doe^Jane"}
            escape: false                                    # write delimiters as structure
          - remove: [ZPI, "NTE[2]"]                          # every ZPI; the second NTE only
          - add: {segment: "ZNT|1|{PV1-19}", after: PV1}     # {PATH} inserts the text as written
          - set: {PV1-3.1: ED}
            when: {patient_class: E}                         # any route condition

Bad paths, a ``{{`` in the wrong place and table names that exist nowhere are configuration
errors naming the edit's index and path. A table loaded from ``tables_file`` is checked when
the step starts (the file is read then, relative to the config folder).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from carehub.components import ComponentContext, ComponentOptions, Translator, Work
from carehub.config import not_text, read_config_text, yaml_reading, yaml_value
from carehub.errors import ConfigError
from carehub.hl7.edit import EditError, MessageEditor, PathError, check_path, check_segment
from carehub.routing.conditions import When

OPS = ("set", "copy", "clear", "map", "remove", "add")
#: Keys an edit may carry beside its op.
MODIFIERS = ("when", "escape")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SEGMENT_TEXT = re.compile(r"[A-Z][A-Z0-9]{2}(?:[^A-Za-z0-9].*)?", re.S)
_NOT_ADDABLE = ("MSH", "FHS", "BHS", "BTS", "FTS")

Op = Literal["set", "copy", "clear", "map", "remove", "add"]


def _written_text(value: Any) -> Any:
    """A value written into the message or a table's code must be text: YAML reads 01 as 1,
    010 as 8 and NO as false, so the edit would write, or the table look up, another code.
    The error leaves the fix to the route file's loader, which has the text as written."""
    if isinstance(value, bool | int | float):
        raise not_text(value)
    return value


#: Text as a route file gives it: a number or boolean YAML made is refused (see _written_text).
WrittenText = Annotated[str, BeforeValidator(_written_text)]


class CopySpec(ComponentOptions):
    """``{from: PATH, to: PATH}``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str = Field(alias="from", description="path to read (escaped text, as written)")
    to: str = Field(description="path to write; its segment must exist")


class MapSpec(ComponentOptions):
    """``{path: PATH, table: NAME, default: ...}``; a missing or ``keep`` default leaves codes
    that are not in the table as they are, ``""`` clears them, any other text replaces them."""

    path: str = Field(description="path whose code is looked up and replaced")
    table: str = Field(description="name of a table from tables or tables_file")
    default: str | None = Field(
        None, description='for codes not in the table: keep (the default), "" clears, text replaces'
    )


class AddSpec(ComponentOptions):
    """``{segment: "ZNT|1|{PV1-19}", after: PV1}``: one segment, in the message's delimiters."""

    segment: str = Field(
        description="the segment's text; {PATH} inserts that field's text as written"
    )
    after: str | None = Field(
        None, description="after the last segment of this name (PV1[1]: after the first)"
    )
    before: str | None = Field(
        None, description="before the first segment of this name (OBX[2]: before the second)"
    )

    @model_validator(mode="after")
    def _one_place(self) -> AddSpec:
        if self.after is not None and self.before is not None:
            raise ValueError("add takes 'after' or 'before', not both")
        return self


class Edit(ComponentOptions):
    """One edit: exactly one of ``set``, ``copy``, ``clear``, ``map``, ``remove`` or ``add``,
    optionally with ``when`` (the edit is made only for messages that meet it)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    set_: dict[str, WrittenText] | None = Field(
        None, alias="set", description="PATH: value; {PATH} in a value inserts that field"
    )
    copy_: CopySpec | None = Field(None, alias="copy", description="{from: PATH, to: PATH}")
    clear: str | list[str] | None = Field(None, description="a path or a list of paths to empty")
    map_: MapSpec | None = Field(
        None, alias="map", description="{path, table, default}: replace a code through a table"
    )
    remove: list[str] | None = Field(
        None,
        description="segments to drop: ZPI (every one), ZPI[2] (one), a list, or {segment: ZPI}",
    )
    add: AddSpec | None = Field(None, description="{segment, after | before}: insert a segment")
    when: When | None = Field(None, description="a route condition on the message as edited so far")
    escape: bool = Field(
        True, description="set only: false writes delimiters in the value as structure"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_op(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"an edit is a mapping with one of: {', '.join(OPS)}")
        unknown = [k for k in value if k not in OPS and k not in MODIFIERS]
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            raise ValueError(
                f"unknown key {names} in an edit; an edit has one of {', '.join(OPS)}, "
                f"optionally with {', '.join(MODIFIERS)}"
            )
        ops = [k for k in OPS if k in value]
        if len(ops) != 1:
            raise ValueError(f"an edit has exactly one of {', '.join(OPS)}; this one has {ops}")
        if "escape" in value and ops[0] != "set":
            raise ValueError("'escape' only goes with 'set'")
        settings = value[ops[0]]
        if ops[0] == "set":
            if not isinstance(settings, dict) or not settings:
                raise ValueError("set takes a mapping of PATH: value, e.g. {MSH-5: CAREHUB}")
            # An empty value (`PV1-36:`) clears; numbers and booleans are refused per path.
            fixed = {path: "" if text is None else text for path, text in settings.items()}
            value = {**value, "set": fixed}
        if ops[0] == "clear" and (settings is None or settings == []):
            raise ValueError("clear takes a path or a list of paths")
        if ops[0] == "remove":
            value = {**value, "remove": _segments_to_remove(settings)}
        if ops[0] == "add" and isinstance(settings, str):
            value = {**value, "add": {"segment": settings}}
        return value

    @property
    def op(self) -> Op:
        if self.set_ is not None:
            return "set"
        if self.copy_ is not None:
            return "copy"
        if self.map_ is not None:
            return "map"
        if self.remove is not None:
            return "remove"
        if self.add is not None:
            return "add"
        return "clear"


def _segments_to_remove(settings: Any) -> list[str]:
    """``ZPI``, ``[ZPI, ZPD]``, ``{segment: ZPI}`` or ``{segment: [ZPI, ZPD]}`` as a list."""
    if isinstance(settings, dict):
        if set(settings) != {"segment"}:
            raise ValueError("remove takes a segment, a list of them, or {segment: NAME}")
        settings = settings["segment"]
    names = [settings] if isinstance(settings, str) else settings
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError("remove takes a segment name (ZPI, ZPI[2]) or a list of them")
    return names


class TransformOptions(ComponentOptions):
    """Options of the transform step: the edits, in order, and the code tables they use."""

    tables: dict[str, dict[WrittenText, WrittenText]] = Field(
        default_factory=dict, description="code tables: {name: {code: value}}"
    )
    tables_file: str | None = Field(
        None,
        description="more tables from a .yaml ({name: {code: value}}) or .csv "
        "(table,code,value) file, relative to the config folder",
    )
    edits: list[Edit] = Field(
        min_length=1, description="edits made in order; the message changes only if all succeed"
    )

    @field_validator("tables_file")
    @classmethod
    def _table_format(cls, value: str | None) -> str | None:
        if value is not None and Path(value).suffix.lower() not in (".yaml", ".yml", ".csv"):
            raise ValueError(f"tables_file {value!r}: expected a .yaml, .yml or .csv file")
        return value

    @field_validator("edits")
    @classmethod
    def _check_edits(cls, edits: list[Edit], info: ValidationInfo) -> list[Edit]:
        tables: dict[str, dict[str, str]] | None = info.data.get("tables")
        from_file = info.data.get("tables_file") is not None
        problems: list[str] = []
        for index, edit in enumerate(edits):
            problems.extend(_edit_problems(index, edit, tables, from_file))
        if problems:
            raise ValueError("; ".join(problems))
        return edits


def _edit_problems(
    index: int, edit: Edit, tables: dict[str, dict[str, str]] | None, from_file: bool
) -> list[str]:
    """Every configuration mistake in one edit, each naming the edit's index and path."""
    where = f"edits[{index}] {edit.op}"
    problems: list[str] = []

    def path_ok(path: str, *, writable: bool) -> None:
        try:
            spec = check_path(path, writable=writable)
        except PathError as err:
            hint = ""
            if writable and edit.op in ("clear", "set"):
                try:
                    check_segment(path)
                    hint = f"; to drop the segment, use remove: {path.strip()}"
                except PathError:
                    pass
            problems.append(f"{where}: {err}{hint}")
            return
        if edit.op == "add" and not spec.field:
            problems.append(f"{where}: {{{path}}} names a whole segment; name a field")

    def segment_ok(path: str, what: str) -> str | None:
        try:
            return check_segment(path)[0]
        except PathError as err:
            problems.append(f"{where}{what}: {err}")
            return None

    def placeholders_ok(path: str, value: str) -> None:
        try:
            for placeholder in Template.parse(value).paths():
                path_ok(placeholder, writable=False)
        except ValueError as err:
            problems.append(f"{where} {path}: {err}")

    if edit.set_ is not None:
        for path, value in edit.set_.items():
            path_ok(path, writable=True)
            placeholders_ok(path, value)
    elif edit.copy_ is not None:
        path_ok(edit.copy_.from_, writable=False)
        path_ok(edit.copy_.to, writable=True)
    elif edit.map_ is not None:
        path_ok(edit.map_.path, writable=True)
        if tables is not None and edit.map_.table not in tables and not from_file:
            known = ", ".join(sorted(tables)) or "none"
            problems.append(
                f"{where} {edit.map_.path}: unknown table {edit.map_.table!r} (tables: {known})"
            )
    elif edit.remove is not None:
        for path in edit.remove:
            if segment_ok(path, "") == "MSH":
                problems.append(f"{where}: MSH cannot be removed: it is the message header")
    elif edit.add is not None:
        text = edit.add.segment
        name = text[:3]
        if "\r" in text or "\n" in text or not _SEGMENT_TEXT.fullmatch(text):
            problems.append(
                f"{where}: segment {text!r} must be one line starting with a segment name and "
                "the field separator, e.g. ZNT|1|note"
            )
        elif name in _NOT_ADDABLE:
            problems.append(
                f"{where}: {name} cannot be added: a message has one MSH and no batch segments"
            )
        placeholders_ok(name, text)
        for key in ("after", "before"):
            anchor = getattr(edit.add, key)
            if anchor is not None:
                segment_ok(anchor, f" {key}")
    else:
        for path in [edit.clear] if isinstance(edit.clear, str) else edit.clear or []:
            path_ok(path, writable=True)
    return problems


@dataclass(slots=True, frozen=True)
class Template:
    """A set value with ``{PATH}`` placeholders; ``{{`` and ``}}`` are literal braces."""

    parts: tuple[tuple[str, bool], ...]  # (text, is_path)

    @classmethod
    def parse(cls, value: str) -> Template:
        parts: list[tuple[str, bool]] = []
        last = 0
        for match in _PLACEHOLDER.finditer(value):
            if match.start() > last:
                parts.append((value[last : match.start()], False))
            token = match.group(0)
            if token in ("{{", "}}"):
                parts.append((token[0], False))
            elif match.group(1) is None:
                raise ValueError(f"lone {token!r} in {value!r}; write {token * 2} for a brace")
            else:
                parts.append((match.group(1).strip(), True))
            last = match.end()
        if last < len(value):
            parts.append((value[last:], False))
        return cls(tuple(parts))

    def paths(self) -> list[str]:
        return [text for text, is_path in self.parts if is_path]

    def render(self, editor: MessageEditor, *, raw: bool) -> str:
        """Fill placeholders from the message as edited so far (unescaped unless ``raw``)."""
        read = editor.raw if raw else editor.get
        return "".join(read(text) if is_path else text for text, is_path in self.parts)


class Transform(Translator):
    """Edits the v2 message as configured, in order, and records each edit as {op, path,
    before, after} (an edit whose ``when`` is not met as {op, edit, skipped}).

    Ops: ``set`` writes values (``{PATH}`` in a value inserts that field's value; with
    ``escape: false`` delimiters in the value are structure), ``copy`` moves a field's text
    as written, ``clear`` empties fields, ``map`` replaces a code through a table, ``remove``
    drops segments (``ZPI``: every one; ``ZPI[2]``: the second) and ``add`` inserts one
    segment (``{segment: "ZNT|1|{PV1-19}", after: PV1}``; ``{PATH}`` inserts the field's text
    as written; at the end without ``after``/``before``). Any edit may carry ``when:``, a
    route condition read from the message as the edits before it left it.

    A field edit on a segment the message lacks fails the step (except ``clear`` and ``map``,
    which have nothing to do); so does ``add`` next to a missing segment. Nothing changes
    unless every edit succeeds, and segments no edit touched are forwarded byte for byte."""

    name = "transform"
    description = (
        "edits of the v2 message: set, copy, clear, map through tables, remove and add "
        "segments, each optionally conditional"
    )
    Options = TransformOptions

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        assert isinstance(options, TransformOptions)
        self.settings = options
        self.tables: dict[str, dict[str, str]] = dict(options.tables)
        self._loaded = options.tables_file is None
        self._templates = {
            (index, path): Template.parse(value)
            for index, edit in enumerate(options.edits)
            for path, value in (edit.set_ or {}).items()
        }
        self._segment_templates = {
            index: Template.parse(edit.add.segment)
            for index, edit in enumerate(options.edits)
            if edit.add is not None
        }

    async def start(self) -> None:
        """Load ``tables_file`` and check every map names a table that now exists."""
        self.tables = dict(self.settings.tables)  # start() may run again after close()
        if self.settings.tables_file is not None:
            path = self.context.path(self.settings.tables_file)
            for name, table in load_tables(path).items():
                if name in self.tables:
                    raise ConfigError(
                        f"{path}: table {name!r} is also defined in the step's 'tables'; "
                        "keep one of them"
                    )
                self.tables[name] = table
            self._loaded = True
        for index, edit in enumerate(self.settings.edits):
            if edit.map_ is not None and edit.map_.table not in self.tables:
                known = ", ".join(sorted(self.tables)) or "none"
                raise ConfigError(
                    f"transform: edits[{index}] map {edit.map_.path}: unknown table "
                    f"{edit.map_.table!r} (tables: {known})"
                )

    def translate(self, work: Work) -> list[dict[str, Any]]:
        """Edit ``work.v2``; nothing changes unless every edit succeeds."""
        if not self._loaded:
            raise RuntimeError("transform: start() has not loaded tables_file yet")
        editor = MessageEditor(work.v2)
        changes: list[dict[str, Any]] = []
        for index, edit in enumerate(self.settings.edits):
            if edit.when is not None and not edit.when.matches(editor.view()):
                failed = [c for c in edit.when.explain(editor.view()) if not c.passed]
                reason = "; ".join(f"{c.what} = {c.value!r}, wanted {c.expected}" for c in failed)
                changes.append({"op": edit.op, "edit": index, "skipped": reason})
                continue
            try:
                self._apply(index, edit, editor, changes)
            except EditError as err:
                raise EditError(f"transform edits[{index}] {edit.op}: {err}") from None
        if any(change.get("before") != change.get("after") for change in changes):
            work.replace_v2(editor.text())
        return changes

    def _apply(
        self, index: int, edit: Edit, editor: MessageEditor, changes: list[dict[str, Any]]
    ) -> None:
        def record(op: str, path: str, before: str, **extra: str) -> None:
            changes.append({"op": op, "path": path, "before": before, "after": editor.raw(path)})
            changes[-1].update(extra)

        if edit.set_ is not None:
            for path in edit.set_:
                before = editor.raw(path)
                value = self._templates[(index, path)].render(editor, raw=not edit.escape)
                editor.set(path, value, escape=edit.escape)
                record("set", path, before)
        elif edit.copy_ is not None:
            source, target = edit.copy_.from_, edit.copy_.to
            before = editor.raw(target)
            editor.copy(source, target)
            record("copy", target, before, source=source)
        elif edit.map_ is not None:
            spec = edit.map_
            if not editor.has_segment(spec.path):
                return  # nothing to map, and a default must not fail on an absent segment
            before = editor.raw(spec.path)
            code = editor.get(spec.path)
            table = self.tables[spec.table]
            if code in table:
                editor.set(spec.path, table[code])
            elif spec.default is not None and spec.default != "keep":
                editor.set(spec.path, spec.default)
            record("map", spec.path, before, table=spec.table)
        elif edit.remove is not None:
            for path in edit.remove:
                removed = editor.remove_segments(path)
                # One CR-joined text per path, so a record reads as the segments it dropped.
                changes.append(
                    {"op": "remove", "path": path, "before": "\r".join(removed), "after": ""}
                )
        elif edit.add is not None:
            spec = edit.add
            text = self._segment_templates[index].render(editor, raw=True)
            editor.add_segment(text, after=spec.after, before=spec.before)
            changes.append({"op": "add", "path": text[:3], "before": "", "after": text})
        else:
            for path in [edit.clear] if isinstance(edit.clear, str) else edit.clear or []:
                before = editor.raw(path)
                editor.clear(path)
                record("clear", path, before)


def load_tables(path: Path) -> dict[str, dict[str, str]]:
    """Code tables from YAML (``{table: {code: value}}``) or CSV (header ``table,code,value``).

    Codes and values must be text: YAML would read 01 as 1 and change the code silently."""
    text = read_config_text(path, "tables_file", encoding="utf-8-sig")
    tables: dict[str, dict[str, str]] = {}
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or {"table", "code", "value"} - set(reader.fieldnames):
            raise ConfigError(f"{path}: a tables CSV needs the header table,code,value")
        for line, row in enumerate(reader, start=2):
            name, code, value = row["table"], row["code"], row["value"]
            if not name or code is None or value is None:
                raise ConfigError(f"{path}:{line}: a row needs table, code and value")
            table = tables.setdefault(name.strip(), {})
            if code in table:
                raise ConfigError(f"{path}:{line}: code {code!r} appears twice in table {name!r}")
            table[code] = value
        return tables
    try:
        tree = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of table name to {{code: value}}")
    for name, table in data.items():
        if not isinstance(name, str) or not isinstance(table, dict):
            raise ConfigError(f"{path}: table {name!r} must be a mapping of code: value")
        for code, value in table.items():
            if not isinstance(code, str) or not isinstance(value, str):
                raise ConfigError(_not_text_in_table(path, tree, name, code, value))
        tables[name] = dict(table)
    return tables


def _not_text_in_table(path: Path, tree: yaml.Node | None, name: str, code: Any, value: Any) -> str:
    """The error for a code or value of table ``name`` that YAML read as no text: told as
    written in the file (010, not the 8 YAML made of it), at its line."""
    general = (
        f"{path}: table {name!r}: code {code!r} -> {value!r}: codes and values must be text; "
        "quote them as written (YAML reads 01 as the number 1, 010 as 8, NO as false)"
    )
    tables = tree.value if isinstance(tree, yaml.MappingNode) else []
    entries = [v for k, v in tables if getattr(k, "value", None) == name]
    if not entries or not isinstance(entries[-1], yaml.MappingNode):
        return general
    # The last entry of that code, as YAML keeps the last of two equal keys.
    found = [
        (key, node)
        for key, node in entries[-1].value
        if isinstance(key, yaml.ScalarNode)
        and type(made := yaml_value(key)) is type(code)
        and made == code
    ]
    if not found:  # pragma: no cover - every key of the mapping was read from a node
        return general
    key, node = found[-1]
    if isinstance(code, str):
        written, what = node, f"the value of code {code!r}"
    else:
        written, what = key, "the code"
    reading = yaml_reading(written)
    if reading is None:
        return general
    return (
        f"{path}:{written.start_mark.line + 1}: table {name!r}: YAML read {what} "
        f"{written.value} as {reading}, not text; quote it as written: '{written.value}'"
    )
