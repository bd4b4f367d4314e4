"""Hook implementations carehub refuses at load, per plugin: one implementing a hook that does
not exist (a misspelt name) is skipped like any other broken plugin, named with its
distribution, the hook and the closest real one, while every carehub process runs on with the
others; a carehub_run_step that is not a wrapper (its return value would replace every step's
output) is refused the same way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from carehub.plugins import PluginError, PluginHost
from carehub.testing import make_adt, mllp_exchange, run_routes
from tests.helpers_cli import carehub
from tests.helpers_http import CarehubProcess
from tests.test_plugins import TRANSLATOR_PLUGIN

#: An installed package's plugin whose hook name is misspelt (a missing "n").
TYPO_PLUGIN = """
from carehub import hookimpl


@hookimpl
def carehub_register_chanels(register):
    pass
"""

#: A tracer that returns the step's label instead of wrapping the step.
PLAIN_RUN_STEP_PLUGIN = """
from carehub import hookimpl


@hookimpl
def carehub_run_step(work, step, run):
    return step
"""

#: A hook of a newer carehub, implemented as optional: loads, and is never called.
OPTIONAL_NEWER_HOOK_PLUGIN = """
from carehub import hookimpl


@hookimpl(optionalhook=True)
def carehub_message_reticulated(message):
    raise AssertionError("never called")


@hookimpl
def carehub_message_received(message):
    pass
"""


def installed(site: Path, distribution: str, version: str, **modules: str) -> Path:
    """``site`` holding ``modules`` and an installed distribution's metadata declaring one
    ``carehub`` entry point per module (named after it), as pip would leave them."""
    info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n", encoding="utf-8"
    )
    entry_points = "".join(f"{name} = {name}\n" for name in modules)
    (info / "entry_points.txt").write_text(f"[carehub]\n{entry_points}", encoding="utf-8")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source, encoding="utf-8")
    return site


def with_site(site: Path) -> str:
    """PYTHONPATH for a carehub process that sees the packages in ``site`` too."""
    return os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))


def one_route_project(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "routes.yaml").write_text(
        "routes:\n  - name: r\n    steps: [{translate: v2-to-event}]\n", encoding="utf-8"
    )
    config = folder / "carehub.yaml"
    config.write_text(
        "routes: [routes.yaml]\n"
        "listeners:\n"
        "  mllp: [{name: adt, host: 127.0.0.1, port: 0}]\n"
        "  http: {host: 127.0.0.1, port: 0}\n",
        encoding="utf-8",
    )
    return config


TYPO_LINE = (
    "plugin 'b_typo' (entry point of carehub-broken 9.9.9) failed to load and is skipped: plugin "
    "'b_typo': implements a hook that does not exist: carehub_register_chanels; did you mean "
    "carehub_register_channels?"
)


def test_a_misspelt_hook_in_one_installed_package_skips_that_plugin_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = installed(
        tmp_path / "site", "carehub-broken", "9.9.9", b_typo=TYPO_PLUGIN, good=TRANSLATOR_PLUGIN
    )
    monkeypatch.setenv("PYTHONPATH", with_site(site))
    config = one_route_project(tmp_path / "project")

    listed = carehub("plugins")
    assert "good 9.9.9 (entry point)" in listed.stdout, listed.stderr
    assert (
        "b_typo (entry point of carehub-broken 9.9.9): FAILED TO LOAD: plugin 'b_typo': "
        "implements a hook that does not exist: carehub_register_chanels; did you mean "
        "carehub_register_channels?"
    ) in listed.stdout

    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]
    with CarehubProcess(args, tmp_path / "logs", "serve") as hub:
        hub.wait_ready()
        (ack,) = mllp_exchange(hub.mllp_address, [make_adt("TY-1").encode()])
        assert b"MSA|AA|" in ack
        assert hub.terminate() == 0
    output = hub.stdout + hub.stderr
    (line,) = [line for line in output.splitlines() if "b_typo" in line]
    assert TYPO_LINE in line
    assert line.endswith("b_typo.py:5)")  # where the implementation is


def test_strict_loading_still_refuses_a_misspelt_hook(tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "typo.py").write_text(TYPO_PLUGIN, encoding="utf-8")
    with pytest.raises(PluginError, match="carehub_register_chanels; did you mean"):
        PluginHost().load(plugins_dir=folder, strict=True)


def test_an_optional_hook_of_a_newer_carehub_loads(tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "newer.py").write_text(OPTIONAL_NEWER_HOOK_PLUGIN, encoding="utf-8")
    host = PluginHost().load(plugins_dir=folder)
    assert host.failures == []
    assert "carehub_message_received" in host.plugins["newer"].hooks


def test_a_run_step_that_is_not_a_wrapper_is_refused_and_steps_still_run(
    tmp_path: Path,
) -> None:
    config = one_route_project(tmp_path / "project")
    folder = tmp_path / "project" / "plugins"
    folder.mkdir()
    (folder / "tracer.py").write_text(PLAIN_RUN_STEP_PLUGIN, encoding="utf-8")
    with config.open("a", encoding="utf-8") as file:
        file.write("plugins_dir: plugins\n")

    result = run_routes(make_adt("RS-1"), config, tmp_path / "data")
    (step,) = result.routes[0].steps
    assert step.outcome == "ok"
    assert step.output != "translate v2-to-event"  # the step ran: a care event, not a label

    checked = carehub("routes", "check", "--offline", "--config", str(config))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert (
        "plugin 'tracer': carehub_run_step must be @hookimpl(wrapper=True) (a generator that "
        "yields to the step): a plain implementation's return value would replace the output "
        "of every translate and enrich step"
    ) in checked.stdout + checked.stderr
