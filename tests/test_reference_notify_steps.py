"""The options reference (`carehub plugins --options`, docs/components.md) covers the built-in
notify and notify-referral steps, read from the models that validate them."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from carehub.care.notify import NotifyConfig
from carehub.cli import main
from carehub.reference import COMPONENTS_PAGE, generated_files
from carehub.referrals.notices import ReferralNoticeConfig

STEPS = {"notify": NotifyConfig, "notify-referral": ReferralNoticeConfig}


@pytest.mark.parametrize("name", sorted(STEPS))
def test_plugins_options_prints_a_notify_steps_options(name: str) -> None:
    model: type[BaseModel] = STEPS[name]

    result = CliRunner().invoke(main, ["plugins", "--options", name])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"step {name} (builtin): The {name} step: ")
    assert "    channels: mapping of text to mapping of text to any (at least 1), required" in (
        lines
    )
    written = {line.split(":", 1)[0].strip() for line in lines if line.startswith("    ")}
    assert set(model.model_fields) <= written
    assert "  RetryPolicy:" in lines


def test_plugins_options_json_gives_a_notify_steps_schema() -> None:
    result = CliRunner().invoke(main, ["plugins", "--options", "notify", "--json"])

    assert result.exit_code == 0, result.output
    (row,) = map(json.loads, result.output.splitlines())
    assert (row["kind"], row["name"]) == ("step", "notify")
    assert row["schema"]["required"] == ["channels"]
    options = {o["name"]: o for o in row["options"]}
    assert options["digest_hour"]["default"] == NotifyConfig.model_fields["digest_hour"].default


def test_an_unknown_name_lists_the_notify_steps_among_those_there_are() -> None:
    result = CliRunner().invoke(main, ["plugins", "--options", "notfy"])

    assert result.exit_code == 2
    assert "no component named 'notfy' (there are: " in result.output
    assert "notify, notify-referral" in result.output


def test_the_components_page_documents_the_notify_steps() -> None:
    page = generated_files()[COMPONENTS_PAGE]

    assert "- Notification steps: [`notify`](#step-notify), [`notify-referral`]" in page
    for name, model in STEPS.items():
        section = page.split(f"### `{name}`\n", 1)[1].split("\n### ", 1)[0]
        for option in model.model_fields:
            assert f"| `{option}` |" in section, (name, option)
