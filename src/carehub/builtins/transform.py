"""The ``transform`` step: field-level edits of the v2 message, configured without code.

Interface engineers spend most of their time on small, repetitive fixes (route a facility code,
blank a field a receiver rejects, map one code set to another). This step does those from the
route file, in order, on the message text, so everything it does not touch is forwarded
byte for byte:

    - transform:
        tables:
          sex: {M: male, F: female, U: unknown}
        tables_file: tables/codes.yaml        # optional, relative to the config folder
        edits:
          - set: {MSH-5: CARE_PLATFORM, MSH-6: "{MSH-4}"}   # {PATH} inserts a field's value
          - copy: {from: PID-3[1].1, to: PID-2}
          - clear: [PID-19, PID-13]
          - map: {path: PID-8, table: sex, default: U}       # default: keep (default), "", text
          - set: {PID-5: "Doe^Jane"}
            escape: false                                    # write delimiters as structure

Bad paths, a ``{{`` in the wrong place and table names that exist nowhere are configuration
errors naming the edit's index and path. A table loaded from ``tables_file`` is checked when
the step starts (the file is read then, relative to the config folder).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from carehub.components import ComponentContext, ComponentOptions, Translator, Work
from carehub.config import read_config_text
from carehub.errors import ConfigError
from carehub.hl7.edit import EditError, MessageEditor, PathError, check_path

OPS = ("set", "copy", "clear", "map")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class CopySpec(ComponentOptions):
    """``{from: PATH, to: PATH}``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str = Field(alias="from")
    to: str


class MapSpec(ComponentOptions):
    """``{path: PATH, table: NAME, default: ...}``; a missing or ``keep`` default leaves codes
    that are not in the table as they are, ``""`` clears them, any other text replaces them."""

    path: str
    table: str
    default: str | None = None


class Edit(ComponentOptions):
    """One edit: exactly one of ``set``, ``copy``, ``clear`` or ``map``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    set_: dict[str, str] | None = Field(None, alias="set")
    copy_: CopySpec | None = Field(None, alias="copy")
    clear: str | list[str] | None = None
    map_: MapSpec | None = Field(None, alias="map")
    escape: bool = True

    @model_validator(mode="before")
    @classmethod
    def _one_op(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"an edit is a mapping with one of: {', '.join(OPS)}")
        ops = [k for k in OPS if k in value]
        if len(ops) != 1:
            raise ValueError(f"an edit has exactly one of {', '.join(OPS)}; this one has {ops}")
        if "escape" in value and ops[0] != "set":
            raise ValueError("'escape' only goes with 'set'")
        settings = value[ops[0]]
        if ops[0] == "set":
            if not isinstance(settings, dict) or not settings:
                raise ValueError("set takes a mapping of PATH: value, e.g. {MSH-5: CAREHUB}")
            fixed: dict[Any, Any] = {}
            for path, text in settings.items():
                if text is None:
                    text = ""
                elif not isinstance(text, str):
                    # YAML turns 0012 into 10 and 2.50 into 2.5: insist on quotes.
                    raise ValueError(
                        f"set {path}: the value must be text; quote it in YAML ('{text}')"
                    )
                fixed[path] = text
            value = {**value, "set": fixed}
        if ops[0] == "clear" and (settings is None or settings == []):
            raise ValueError("clear takes a path or a list of paths")
        return value

    @property
    def op(self) -> Literal["set", "copy", "clear", "map"]:
        if self.set_ is not None:
            return "set"
        if self.copy_ is not None:
            return "copy"
        if self.map_ is not None:
            return "map"
        return "clear"


class TransformOptions(ComponentOptions):
    """Options of the transform step; see the module docstring for the syntax."""

    tables: dict[str, dict[str, str]] = Field(default_factory=dict)
    tables_file: str | None = None
    edits: list[Edit] = Field(min_length=1)

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
            check_path(path, writable=writable)
        except PathError as err:
            problems.append(f"{where}: {err}")

    if edit.set_ is not None:
        for path, value in edit.set_.items():
            path_ok(path, writable=True)
            try:
                for placeholder in Template.parse(value).paths():
                    path_ok(placeholder, writable=False)
            except ValueError as err:
                problems.append(f"{where} {path}: {err}")
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
    """Applies the configured edits in order and records each as {op, path, before, after}."""

    name = "transform"
    description = "field-level edits of the v2 message: set, copy, clear, map through tables"
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
            try:
                self._apply(index, edit, editor, changes)
            except EditError as err:
                raise EditError(f"transform edits[{index}] {edit.op}: {err}") from None
        if any(change["before"] != change["after"] for change in changes):
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
                raise ConfigError(
                    f"{path}: table {name!r}: code {code!r} -> {value!r}: codes and values must "
                    "be text; quote them (YAML reads 01 as the number 1)"
                )
        tables[name] = dict(table)
    return tables
