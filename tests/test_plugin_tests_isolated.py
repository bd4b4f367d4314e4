"""A plugin's own test suite is kept to that plugin: with ``carehub_plugins`` in its pytest
settings (or ``--carehub-plugins``), another vendor's package installed in the same
environment (here one registering a translator of the same name) is not loaded by the
``carehub_routes`` fixture, nor by ``carehub`` processes the tests start; ``only_plugins`` does
the same outside pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from carehub.testing import make_adt, run_routes
from tests.helpers_cli import environment
from tests.test_plugin_load_refusals import installed

#: A translator named "summary", in my plugin and (answering differently) in another's.
SUMMARY = """
from carehub import hookimpl
from carehub.components import Translator


class Summary(Translator):
    name = "summary"

    def translate(self, work):
        return "{answer}"


@hookimpl
def carehub_register_translators(register):
    register(Summary)
"""

MY_TESTS = """
import subprocess
import sys


def test_my_summary(carehub_routes):
    result = carehub_routes("MSH|^~\\\\&|A|B|C|D|20240101||ADT^A01|M1|P|2.5\\rPID|||1\\r")
    assert result.matched[0].steps[0].output == "mine"


def test_carehub_processes_load_mine_only():
    listed = subprocess.run(
        [sys.executable, "-m", "carehub.cli", "plugins"], capture_output=True, text=True
    )
    assert "other_vendor" not in listed.stdout
"""


def plugin_project(folder: Path, settings: str) -> Path:
    """A plugin author's checkout: the plugin as a file, a config using it, its tests."""
    (folder / "plugins").mkdir(parents=True)
    (folder / "plugins" / "mine.py").write_text(SUMMARY.format(answer="mine"), "utf-8")
    (folder / "tests").mkdir()
    (folder / "tests" / "test_mine.py").write_text(MY_TESTS, "utf-8")
    (folder / "routes.yaml").write_text(
        "routes:\n  - name: r\n    steps: [{translate: summary}]\n", "utf-8"
    )
    (folder / "carehub.yaml").write_text("routes: [routes.yaml]\nplugins_dir: plugins\n", "utf-8")
    (folder / "pyproject.toml").write_text(
        f'[tool.pytest.ini_options]\ncarehub_config = "carehub.yaml"\n{settings}', "utf-8"
    )
    return folder


def run_pytest(folder: Path, site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "tests"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(PYTHONPATH=path),
    )


@pytest.fixture
def other_vendor(tmp_path: Path) -> Path:
    """Another vendor's package, installed: its "summary" translator loads before a
    plugins-directory file's, so without isolation it takes the name."""
    return installed(
        tmp_path / "site", "carehub-other", "1.0", other_vendor=SUMMARY.format(answer="theirs")
    )


def test_the_carehub_plugins_setting_keeps_a_plugins_tests_to_it(
    tmp_path: Path, other_vendor: Path
) -> None:
    folder = plugin_project(tmp_path / "mine", 'carehub_plugins = "mine"\n')
    ran = run_pytest(folder, other_vendor)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "2 passed" in ran.stdout


def test_the_command_line_option_does_the_same(tmp_path: Path, other_vendor: Path) -> None:
    folder = plugin_project(tmp_path / "mine", "")
    ran = run_pytest(folder, other_vendor, "--carehub-plugins", "mine")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    without = run_pytest(folder, other_vendor)  # the other vendor's translator answers
    assert without.returncode == 1, without.stdout + without.stderr


def test_only_plugins_outside_pytest_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carehub.testing import only_plugins

    folder = plugin_project(tmp_path / "mine", "")
    (folder / "plugins" / "theirs.py").write_text(SUMMARY.format(answer="theirs"), "utf-8")
    monkeypatch.delenv("CAREHUB_PLUGINS", raising=False)
    with only_plugins("theirs"):
        (route,) = run_routes(make_adt("OP-1"), folder / "carehub.yaml").routes
    assert route.steps[0].output == "theirs"
    assert "CAREHUB_PLUGINS" not in os.environ
