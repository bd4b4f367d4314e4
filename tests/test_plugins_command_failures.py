"""`carehub plugins` as a CI check: with --json every line of its output is a JSON object, a
plugin that failed to load included (``"failed": true``), and it exits 1 when one failed, in
either mode; 0 when all loaded."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers_cli import carehub
from tests.test_plugins import TRANSLATOR_PLUGIN, plugins_dir


def test_plugins_json_lists_failures_as_json_and_exits_1(tmp_path: Path) -> None:
    folder = plugins_dir(
        tmp_path / "plugins", lowercase=TRANSLATOR_PLUGIN, broken="import not_installed_sdk\n"
    )

    listed = carehub("plugins", "--json", CAREHUB_PLUGINS_DIR=str(folder))

    assert listed.returncode == 1, listed.stdout + listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert any(row["name"] == "lowercase" and "failed" not in row for row in rows)
    (failed,) = [row for row in rows if row.get("failed")]
    assert failed["name"] == "broken"
    assert failed["source"] == f"file {folder / 'broken.py'}"
    assert failed["error"] == "ModuleNotFoundError: No module named 'not_installed_sdk'"
    assert failed["at"] == f"{folder / 'broken.py'}:1"

    text = carehub("plugins", CAREHUB_PLUGINS_DIR=str(folder))
    assert text.returncode == 1
    assert f"broken (file {folder / 'broken.py'}): FAILED TO LOAD: " in text.stdout


def test_plugins_exits_0_when_every_plugin_loaded(tmp_path: Path) -> None:
    folder = plugins_dir(tmp_path / "plugins", lowercase=TRANSLATOR_PLUGIN)
    listed = carehub("plugins", "--json", CAREHUB_PLUGINS_DIR=str(folder))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert all(json.loads(line) for line in listed.stdout.splitlines())
    shown = " ".join(carehub("plugins", "--help").stdout.split())
    assert "Exits 1 when a plugin failed to load" in shown


def test_plugins_with_a_config_loads_its_plugins_dir(tmp_path: Path) -> None:
    """The folder a hub's config names (plugins_dir) is what serve loads: `carehub plugins
    --config` checks it, and fails on a broken plugin there as serve's log would show."""
    plugins_dir(tmp_path / "plugins", lowercase=TRANSLATOR_PLUGIN, broken="import nope_sdk\n")
    config = tmp_path / "carehub.yaml"
    config.write_text("plugins_dir: plugins\n", encoding="utf-8")

    listed = carehub("plugins", "--json", "--config", str(config))

    assert listed.returncode == 1, listed.stdout + listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert any(row["name"] == "lowercase" and "failed" not in row for row in rows)
    assert [row["name"] for row in rows if row.get("failed")] == ["broken"]
