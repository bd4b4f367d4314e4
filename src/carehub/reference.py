"""A reference of every component's options, read from the pydantic models themselves.

The same models validate route files, so a reference built from them cannot drift from what
carehub accepts: the components' ``Options``, and the config models of the built-in steps that
are not components (``notify``, ``notify-referral``). ``carehub plugins --options [NAME]``
prints it for whatever is installed,
and ``python -m carehub.reference`` writes docs/components.md (the built-in components) and
docs/care-event.schema.json (the care event webhooks and files carry); the test suite fails
when either is stale.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from carehub.components import Component
from carehub.errors import CarehubError
from carehub.plugins import PluginHost
from carehub.routing.config import ForwardConfig

#: Where the generated files go, relative to the repository.
COMPONENTS_PAGE = "components.md"
CARE_EVENT_SCHEMA = "care-event.schema.json"

_SCALARS: dict[Any, str] = {
    str: "text",
    int: "integer",
    float: "number",
    bool: "true/false",
    Path: "path",
    SecretStr: "secret text",
    Any: "any",
}
_CONSTRAINTS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


@dataclass(slots=True)
class OptionDoc:
    """One option as a route file writes it."""

    name: str
    type: str
    required: bool
    default: Any = None  # as JSON holds it; None when required or unset
    description: str = ""

    def as_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"name": self.name, "type": self.type, "required": self.required}
        if not self.required:
            found["default"] = self.default
        found["description"] = self.description
        return found


@dataclass(slots=True)
class ModelDoc:
    """The options of one model: a component's, or a nested one (a transform edit)."""

    title: str
    options: list[OptionDoc]


@dataclass(slots=True)
class ComponentDoc:
    """One component, or one built-in step that is not a component (kind ``step``): what
    ``carehub plugins --options`` and docs/components.md show."""

    kind: str
    name: str
    plugin: str
    description: str
    details: str
    options: list[OptionDoc]
    #: Models the options refer to (``Edit`` of ``transform``), each documented once.
    nested: list[ModelDoc] = field(default_factory=list)
    component: type[Component] | None = None
    #: The model that validates the options (a component's ``Options``), for the JSON Schema.
    model: type[BaseModel] | None = None

    def as_json(self) -> dict[str, Any]:
        schema: dict[str, Any] | None
        try:
            schema = self.model.model_json_schema(by_alias=True) if self.model else None
        except Exception:  # a plugin type JSON Schema cannot express: the list still helps
            schema = None
        return {
            "kind": self.kind,
            "name": self.name,
            "plugin": self.plugin,
            "description": self.description,
            "options": [option.as_json() for option in self.options],
            "nested": {m.title: [o.as_json() for o in m.options] for m in self.nested},
            "schema": schema,
        }


# -- reading models ---------------------------------------------------------------------------
def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _documented_inline(model: type[BaseModel]) -> bool:
    """Models written out in the reference rather than named: option models (a transform
    edit, a notify step's retry). Route conditions are named as such; the README documents
    them."""
    return not model.__module__.startswith("carehub.routing.conditions")


def type_text(annotation: Any, nested: list[type[BaseModel]] | None = None) -> str:
    """A route author's name for a type: ``text``, ``list of text``, ``"v2" | "event"``.
    Nested option models are named and appended to ``nested`` to be documented too."""
    origin = get_origin(annotation)
    if origin is Annotated:  # a type with a validator of its own is written as its base type
        return type_text(get_args(annotation)[0], nested)
    if origin is Literal:
        return " | ".join(json.dumps(value) for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        parts = [a for a in get_args(annotation) if a is not type(None)]
        return " or ".join(dict.fromkeys(type_text(a, nested) for a in parts))
    if origin in (list, tuple, set, frozenset):
        (item, *_) = get_args(annotation) or (Any,)
        return f"list of {type_text(item, nested)}"
    if origin is dict:
        key, value = get_args(annotation) or (Any, Any)
        return f"mapping of {type_text(key, nested)} to {type_text(value, nested)}"
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if _is_model(annotation):
        if not _documented_inline(annotation):
            return "condition (as in a route's when)"
        if nested is not None and annotation not in nested:
            nested.append(annotation)
        return annotation.__name__
    return getattr(annotation, "__name__", str(annotation))


def _constraints(info: FieldInfo) -> str:
    found = []
    for item in info.metadata:
        for attribute, sign in _CONSTRAINTS:
            value = getattr(item, attribute, None)
            if value is not None:
                found.append(f"{sign} {value}")
        if getattr(item, "min_length", None):
            found.append(f"at least {item.min_length}")
    return f" ({', '.join(found)})" if found else ""


def option_docs(
    model: type[BaseModel], nested: list[type[BaseModel]] | None = None
) -> list[OptionDoc]:
    """Each field of an options model under the name route files use (its alias)."""
    options = []
    for key, info in model.model_fields.items():
        text = type_text(info.annotation, nested) + _constraints(info)
        description = " ".join((info.description or "").split())
        if info.is_required():
            options.append(OptionDoc(info.alias or key, text, True, None, description))
        else:
            default = to_jsonable_python(info.get_default(call_default_factory=True), fallback=str)
            options.append(OptionDoc(info.alias or key, text, False, default, description))
    return options


def _options_and_nested(model: type[BaseModel]) -> tuple[list[OptionDoc], list[ModelDoc]]:
    """A model's options, and those of every option model they refer to."""
    nested: list[type[BaseModel]] = []
    options = option_docs(model, nested)
    models = []
    for each in nested:  # grows while it is read: a nested model may name another
        models.append(ModelDoc(each.__name__, option_docs(each, nested)))
    return options, models


def component_doc(component: type[Component], plugin: str) -> ComponentDoc:
    options, models = _options_and_nested(component.Options)
    return ComponentDoc(
        kind=component.kind,
        name=component.name,
        plugin=plugin,
        description=component.description,
        details=_details(component),
        options=options,
        nested=models,
        component=component,
        model=component.Options,
    )


def _builtin_step_models() -> dict[str, type[BaseModel]]:
    """The built-in route steps that are not components, each written ``NAME: {...}``, and
    the model that validates its options (as the route table does)."""
    from carehub.care.notify import NotifyConfig
    from carehub.referrals.notices import ReferralNoticeConfig

    return {"notify": NotifyConfig, "notify-referral": ReferralNoticeConfig}


def step_docs() -> list[ComponentDoc]:
    """The built-in steps that are not components (``notify``, ``notify-referral``): their
    options from their config models, and what they do from their module's docstring (its
    first line is the description)."""
    docs = []
    for name, model in _builtin_step_models().items():
        about = inspect.getdoc(sys.modules[model.__module__]) or ""
        description, _, details = about.partition("\n")
        options, models = _options_and_nested(model)
        docs.append(
            ComponentDoc(
                kind="step",
                name=name,
                plugin="builtin",
                description=description.strip(),
                details=details.strip("\n"),
                options=options,
                nested=models,
                model=model,
            )
        )
    return docs


def _details(component: type[Component]) -> str:
    doc = inspect.getdoc(component) or ""
    if "module doc" in doc:  # a class that defers to its module's docstring
        module = sys.modules.get(component.__module__)
        doc = inspect.getdoc(module) or doc
    return doc


def component_docs(host: PluginHost, *, builtin_only: bool = False) -> list[ComponentDoc]:
    """Every registered component, by plugin in load order, then as each registered them."""
    registries: dict[str, dict[str, type[Component]]] = {
        "translator": dict(host.translators),
        "enricher": dict(host.enrichers),
        "channel": dict(host.channels),
    }
    docs = []
    for plugin in host.plugins.values():
        if builtin_only and plugin.source != "builtin":
            continue
        for info in plugin.details:
            component = registries.get(info.kind, {}).get(info.name)
            if component is not None:
                docs.append(component_doc(component, plugin.name))
    return docs


# -- text for the terminal --------------------------------------------------------------------
def _default_text(option: OptionDoc) -> str:
    if option.required:
        return "required"
    if option.default is None:
        return "optional"
    return f"default {json.dumps(option.default)}"


def render_text(docs: list[ComponentDoc]) -> str:
    """What ``carehub plugins --options`` prints."""
    lines: list[str] = []
    for doc in docs:
        about = f": {doc.description}" if doc.description else ""
        lines.append(f"{doc.kind} {doc.name} ({doc.plugin}){about}")
        models = [ModelDoc("", doc.options), *doc.nested]
        for model in models:
            if model.title:
                lines.append(f"  {model.title}:")
            if not model.options:
                lines.append("    (no options)")
            for option in model.options:
                lines.append(f"    {option.name}: {option.type}, {_default_text(option)}")
                if option.description:
                    lines.append(f"        {option.description}")
        lines.append("")
    return "\n".join(lines)


def options_output(host: PluginHost, name: str = "", *, as_json: bool = False) -> str:
    """What ``carehub plugins --options [NAME]`` prints: every component's and built-in
    step's options, or those of the ones called NAME; JSON is one object per line, with the
    JSON Schema."""
    every = [*component_docs(host), *step_docs()]
    docs = every
    if name:
        docs = [doc for doc in every if doc.name == name]
        if not docs:
            known = ", ".join(sorted({doc.name for doc in every}))
            raise CarehubError(
                f"no component named {name!r} (there are: {known}){host.missing_note()}"
            )
    if as_json:
        return "".join(json.dumps(doc.as_json(), default=str) + "\n" for doc in docs)
    return render_text(docs)


# -- markdown for docs/components.md ----------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_table(options: list[OptionDoc]) -> list[str]:
    if not options:
        return ["No options.", ""]
    lines = ["| option | type | default | description |", "| --- | --- | --- | --- |"]
    for option in options:
        if option.required:
            default = "**required**"
        elif option.default is None:
            default = "unset"
        else:
            default = f"`{json.dumps(option.default)}`"
        lines.append(
            f"| `{option.name}` | {_cell(option.type)} | {_cell(default)} "
            f"| {_cell(option.description)} |"
        )
    return [*lines, ""]


def _markdown_prose(doc: str) -> list[str]:
    """A docstring as Markdown: ``code`` spans become `code`, and an RST literal block (a
    paragraph ending ``::`` and the indented lines after it) becomes a fenced block."""
    out: list[str] = []
    lines = doc.splitlines()
    index = 0
    while index < len(lines):
        line = re.sub(r"``(.+?)``", r"`\1`", lines[index])
        index += 1
        if not line.rstrip().endswith("::"):
            out.append(line)
            continue
        out += [line.rstrip()[:-1], ""]
        while index < len(lines) and not lines[index].strip():
            index += 1
        block = []
        while index < len(lines) and (not lines[index].strip() or lines[index].startswith(" ")):
            block.append(lines[index])
            index += 1
        while block and not block[-1].strip():
            block.pop()
        indent = min(len(b) - len(b.lstrip()) for b in block if b.strip()) if block else 0
        out += ["```text", *(b[indent:] for b in block), "```", ""]
    return out


def _and(items: Iterable[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    listed = list(items)
    return ", ".join(listed[:-1]) + f" and {listed[-1]}" if len(listed) > 1 else "".join(listed)


#: The keys of a forward step that carehub reads itself (ForwardConfig), beside ``channel``:
#: the same that plugins.RESERVED_OPTION_KEYS keeps channel options from using.
FORWARD_OWN_KEYS = tuple(key for key in ForwardConfig.model_fields if key != "channel")


def _forward_own_options() -> list[str]:
    """The table of a forward's own keys, which every channel takes, and a notify step's
    channels too (where the step gives ``name`` and ``retry``)."""
    options = [o for o in option_docs(ForwardConfig) if o.name in FORWARD_OWN_KEYS]
    return [
        "Every forward also takes these, read by carehub itself; so does each channel of a",
        "notify step, whose `name` and `retry` the step gives (`RetryPolicy` is described",
        "under the notification steps):",
        "",
        *_markdown_table(options),
    ]


_KIND_TITLES = {
    "translator": "Translators",
    "enricher": "Enrichers",
    "channel": "Channels",
    "step": "Notification steps",
}
_KIND_STEPS = {
    "translator": "`translate: NAME` or `translate: {use: NAME, ...options}`",
    "enricher": "`enrich: NAME` or `enrich: {use: NAME, ...options}`",
    "channel": "`forward: {channel: NAME, ...options}` (plus carehub's own "
    f"{_and(f'`{key}`' for key in FORWARD_OWN_KEYS)}, below)",
    "step": "`NAME: {...options}` (`notify: {...}`, `notify-referral: {...}`)",
}


def render_markdown(docs: list[ComponentDoc]) -> str:
    """docs/components.md: every built-in component's options and behaviour."""
    lines = [
        "# Built-in components",
        "",
        "<!-- Generated by `python -m carehub.reference` from the components' options models;",
        "     do not edit by hand. The test suite fails when it is out of date. -->",
        "",
        "Every translator, enricher, channel and notification step carehub ships, with the",
        "options a route step gives it. Options are checked when the routes load (`carehub",
        "routes check`): an unknown key or a wrong type stops the hub with the file, line and",
        "key. The built-in `transform` and `validate` steps are written `transform: {...}` and",
        "`validate: {...}`.",
        "`carehub plugins --options [NAME]` prints the same for whatever is installed,",
        "plugins included. The care event that `v2-to-event` makes, and that the webhook and",
        f"file channels send, is described by [{CARE_EVENT_SCHEMA}]({CARE_EVENT_SCHEMA}).",
        "",
    ]
    for kind, title in _KIND_TITLES.items():
        chosen = [d for d in docs if d.kind == kind]
        if chosen:
            names = ", ".join(f"[`{d.name}`](#{kind}-{d.name})" for d in chosen)
            lines.append(f"- {title}: {names}")
    lines.append("")
    for kind, title in _KIND_TITLES.items():
        chosen = [d for d in docs if d.kind == kind]
        if not chosen:
            continue
        lines += [f"## {title}", "", f"Route step: {_KIND_STEPS[kind]}.", ""]
        if kind == "channel":
            lines += _forward_own_options()
        for doc in chosen:
            lines += [f'<a id="{kind}-{doc.name}"></a>', "", f"### `{doc.name}`", ""]
            if doc.description:
                lines += [doc.description, ""]
            lines += _markdown_table(doc.options)
            for model in doc.nested:
                lines += [f"`{model.title}`:", "", *_markdown_table(model.options)]
            if doc.details:
                lines += [*_markdown_prose(doc.details), ""]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


# -- the care event ---------------------------------------------------------------------------
def care_event_schema() -> dict[str, Any]:
    """The JSON Schema of the care event (``carehub.events.CareEvent``) as webhooks send it."""
    from carehub.events import CareEvent

    schema = CareEvent.model_json_schema(mode="serialization")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Generated by `python -m carehub.reference` from carehub.events.CareEvent.",
        **schema,
    }


def generated_files() -> dict[str, str]:
    """File name (under docs/) -> content, for the built-in components only, so the pages do
    not depend on what else is installed."""
    host = PluginHost().load(plugins_dir=None)
    return {
        COMPONENTS_PAGE: render_markdown([*component_docs(host, builtin_only=True), *step_docs()]),
        CARE_EVENT_SCHEMA: json.dumps(care_event_schema(), indent=2, ensure_ascii=False) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m carehub.reference",
        description="Write docs/components.md and docs/care-event.schema.json.",
    )
    parser.add_argument("docs", nargs="?", type=Path, default=Path("docs"), help="docs folder")
    parser.add_argument(
        "--check", action="store_true", help="exit 1, writing nothing, when a file is stale"
    )
    args = parser.parse_args(argv)
    if not args.docs.is_dir():
        parser.error(f"{args.docs}: no such folder (run from the checkout, or name the folder)")
    stale = []
    for name, content in generated_files().items():
        target = args.docs / name
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == content:
            continue
        stale.append(str(target))
        if not args.check:
            target.write_text(content, encoding="utf-8")
    verb = "out of date" if args.check else "written"
    for name in stale:
        print(f"{name}: {verb}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
