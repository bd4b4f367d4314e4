"""Every hook carehub offers plugins is documented in docs/hooks/<hook>.md, and every page
there documents a hook that exists: adding, renaming or removing a hook without its page
fails the suite, so plugin authors never have to read hookspecs.py to find out."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from carehub import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs"
HOOK_DOCS = DOCS / "hooks"
SECTIONS = ("Arguments", "When it is called", "Return value", "Example")


def hook_specs() -> dict[str, Callable[..., Any]]:
    """The functions in carehub.hookspecs named carehub_*, which pluggy takes as hooks."""
    return {
        name: function
        for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("carehub_") and function.__module__ == hookspecs.__name__
    }


HOOKS = sorted(hook_specs())


def sections(text: str) -> dict[str, str]:
    """The page's ``## `` sections by title (fenced code blocks are not searched for titles)."""
    found: dict[str, str] = {}
    title: str | None = None
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            title = line[3:].strip()
            found[title] = ""
        elif title is not None:
            found[title] += line + "\n"
    return found


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_the_hooks_are_found() -> None:
    assert "carehub_register_channels" in HOOKS and "carehub_run_step" in HOOKS
    for name in HOOKS:  # each is a pluggy hook specification, not a helper that slipped in
        assert hasattr(hook_specs()[name], "carehub_spec"), f"{name} is not marked @hookspec"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_page_with_the_four_sections(hook: str) -> None:
    page = HOOK_DOCS / f"{hook}.md"
    assert page.is_file(), f"hook {hook} has no documentation: write {page.relative_to(DOCS)}"
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# {hook}\n"), f"{page.name} must start with '# {hook}'"
    found = sections(text)
    missing = [title for title in SECTIONS if not found.get(title, "").strip()]
    assert not missing, f"{page.name} lacks (or has empty) sections: {missing}"

    arguments = found["Arguments"]
    for parameter in inspect.signature(hook_specs()[hook]).parameters:
        assert f"`{parameter}`" in arguments, f"{page.name}: argument {parameter} not described"

    examples = python_blocks(found["Example"])
    assert examples, f"{page.name}: the Example section needs a ```python block"
    for number, code in enumerate(examples, start=1):
        compile(code, f"{page.name} example {number}", "exec")  # real code, not pseudo-code
    assert any(f"def {hook}(" in code for code in examples), (
        f"{page.name}: the example should implement {hook}"
    )


def test_no_page_documents_a_hook_that_does_not_exist() -> None:
    pages = sorted(path.stem for path in HOOK_DOCS.glob("*.md"))
    stale = [name for name in pages if name not in HOOKS]
    assert not stale, f"docs/hooks/ documents hooks that no longer exist: {stale}"


def test_the_plugin_guide_links_every_hook_page() -> None:
    guide = (DOCS / "plugins.md").read_text(encoding="utf-8")
    unlinked = [hook for hook in HOOKS if f"(hooks/{hook}.md)" not in guide]
    assert not unlinked, f"docs/plugins.md does not link the pages of: {unlinked}"
