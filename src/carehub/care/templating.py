"""Message templates for notices (Jinja2, plain text): a site's folder first, then the
built-ins. A template is found as ``<kind>.<channel>.txt``, else ``<kind>.txt``; a first line
``Subject: ...`` becomes the subject."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from carehub.components import ComponentContext
from carehub.errors import ConfigError


class MessageTemplates:
    def __init__(
        self, context: ComponentContext, site_folder: str | None, builtin: jinja2.BaseLoader
    ) -> None:
        loaders: list[jinja2.BaseLoader] = []
        if site_folder:
            loaders.append(jinja2.FileSystemLoader(str(_existing_folder(context, site_folder))))
        loaders.append(builtin)
        self.environment = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            autoescape=False,  # plain text for email bodies and SMS, not HTML
            undefined=jinja2.ChainableUndefined,
            trim_blocks=True,
            keep_trailing_newline=False,
        )
        self.environment.filters["sentence_start"] = sentence_start

    @classmethod
    def from_folder(
        cls, context: ComponentContext, site_folder: str | None, builtin: Path
    ) -> MessageTemplates:
        return cls(context, site_folder, jinja2.FileSystemLoader(str(builtin)))

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
