"""Message templates for notices (Jinja2, plain text): a site's folder first, then the
built-ins. A template is found as ``<kind>.<channel>.txt``, else ``<kind>.txt``; a first line
``Subject: ...`` becomes the subject.

A site's folder is read when the step starts, and what would otherwise fail quietly is a config
error naming the file: a ``.txt`` whose name no notice looks for (``dicharge.txt``, or a channel
the step does not have), which would leave the built-in text in use, possibly saying more than
the site's; and a template Jinja cannot read, which would fail each notice as it is sent."""

from __future__ import annotations

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
        )
        self.environment.filters["sentence_start"] = sentence_start
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
