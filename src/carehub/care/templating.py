"""Message templates for notices (Jinja2, plain text): a site's folder first, then the
built-ins. A template is found as ``<kind>.<channel>.txt``, else ``<kind>.txt``; a first line
``Subject: ...`` becomes the subject.

A site's folder is read when the step starts, and what would otherwise fail quietly is a config
error naming the file: a ``.txt`` whose name no notice looks for (``dicharge.txt``, or a channel
the step does not have), which would leave the built-in text in use, possibly saying more than
the site's; and a template Jinja cannot read, which would fail each notice as it is sent.

Every value a template prints is one line: its line breaks and other control characters (an
HL7 ``\\.br\\`` or ``\\X0D0A\\`` decodes to one) become spaces, so a name or a facility
from a message can neither cut a subject short nor start a line of the body that passes for a
header or for the template's own text. Where a template means a value's lines to be kept (a
note), it says so with ``{{ note | multiline }}``: the lines are kept, each one after the first
indented, so they still read as part of that value."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2

from carehub.components import ComponentContext
from carehub.errors import ConfigError


class MessageTemplates:
    def __init__(
        self,
        context: ComponentContext,
        site_folder: str | None,
        builtin: jinja2.BaseLoader,
        channels: Iterable[str] = (),
    ) -> None:
        loaders: list[jinja2.BaseLoader] = []
        folder = _existing_folder(context, site_folder) if site_folder else None
        if folder is not None:
            loaders.append(jinja2.FileSystemLoader(str(folder)))
        loaders.append(builtin)
        self.environment = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            autoescape=False,  # plain text for email bodies and SMS, not HTML
            undefined=jinja2.ChainableUndefined,
            trim_blocks=True,
            keep_trailing_newline=False,
            finalize=one_line,
        )
        self.environment.filters["sentence_start"] = sentence_start
        self.environment.filters["multiline"] = multiline
        if folder is not None:
            self._check_site_templates(folder, builtin, set(channels))

    @classmethod
    def from_folder(
        cls,
        context: ComponentContext,
        site_folder: str | None,
        builtin: Path,
        channels: Iterable[str] = (),
    ) -> MessageTemplates:
        return cls(context, site_folder, jinja2.FileSystemLoader(str(builtin)), channels)

    def _check_site_templates(
        self, folder: Path, builtin: jinja2.BaseLoader, channels: set[str]
    ) -> None:
        """Every ``.txt`` in the site's folder must be a name a notice looks for, and must
        compile; a ConfigError names the first file that is not or does not."""
        kinds = sorted({name.split(".", 1)[0] for name in builtin.list_templates()})
        for path in sorted(folder.glob("*.txt")):
            kind, _, channel = path.name.removesuffix(".txt").partition(".")
            if kind not in kinds:
                raise ConfigError(
                    f"templates: {path}: no notice is called {kind!r}, so this file would "
                    f"never be used (notices: {', '.join(kinds)})"
                )
            if channel and channel not in channels:
                known = ", ".join(sorted(channels)) or "none"
                raise ConfigError(
                    f"templates: {path}: this step has no channel {channel!r}, so this file "
                    f"would never be used (its channels: {known})"
                )
            try:
                self.environment.get_template(path.name)
            except jinja2.TemplateSyntaxError as err:
                raise ConfigError(f"templates: {path}:{err.lineno}: {err.message}") from err

    def render(self, kind: str, channel: str, variables: dict[str, Any]) -> tuple[str, str]:
        """(subject, body) for one notice."""
        template = self.environment.select_template([f"{kind}.{channel}.txt", f"{kind}.txt"])
        text = template.render(**variables).strip()
        subject = ""
        if text.startswith("Subject:"):
            first, _, text = text.partition("\n")
            subject = first.removeprefix("Subject:").strip()
        return subject, text.strip() + "\n"


def _existing_folder(context: ComponentContext, site_folder: str) -> Path:
    """The site's templates folder, which must exist: a misspelt one would otherwise send
    every notice with the built-in texts, which may say more than the site's do."""
    folder = context.path(site_folder)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(f"templates: the folder {folder} {problem}")
    return folder


def sentence_start(text: Any) -> str:
    """``text`` with its first letter a capital, the rest as written (jinja's ``capitalize``
    lowers the rest, and a name such as "Springfield Community Food Bank" must keep its
    capitals): for a value that may open a sentence, like "the receiving organisation"."""
    value = str(text)
    return value[:1].upper() + value[1:]


#: Line breaks and other control characters: C0 and C1, DEL, and the Unicode line and
#: paragraph separators (str.splitlines breaks at every one of them).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
#: A line break as a template may keep it (``multiline``): CRLF, CR, LF and the others.
_LINE_BREAK = re.compile(r"\r\n|[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
#: What each line of a multi-line value after the first begins with.
CONTINUATION = "  "


class MultiLine(str):
    """A value whose lines a template keeps (``multiline``): printed as it is."""

    __slots__ = ()


def one_line(value: Any) -> Any:
    """Every printed value (Jinja's ``finalize``): text with each run of control characters
    a single space. None, numbers, undefined values and ``multiline``'s output print as
    Jinja prints them."""
    if isinstance(value, MultiLine) or value is None or isinstance(value, int | float):
        return value
    if isinstance(value, jinja2.Undefined):
        return value
    text = value if isinstance(value, str) else str(value)
    return _CONTROL.sub(" ", text)


def multiline(value: Any) -> MultiLine:
    """``value`` with its lines kept, for a template that means them (a note): each line one
    line (other control characters spaces), and every line after the first indented by
    CONTINUATION, so none starts at the margin where it could pass for a header or for the
    template's own next line."""
    if value is None or isinstance(value, jinja2.Undefined):
        return MultiLine("")
    lines = [_CONTROL.sub(" ", line).rstrip() for line in _LINE_BREAK.split(str(value))]
    return MultiLine(("\n" + CONTINUATION).join(lines).strip())
