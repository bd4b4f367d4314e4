"""Plugins that go wrong as they load or observe: a component named like a built-in's (or
another plugin's) or with no name skips only its own plugin, and the hub starts; an import
failure names the file and line that raised, with the traceback at DEBUG; a module with no
hook implementations is said to add nothing; an observer that raises is logged by its type
only, at most once a minute per plugin and hook. Plus: the docs' lists of carehub's own
channels are the ones `carehub plugins` shows."""

from __future__ import annotations

import importlib.metadata
import logging
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from carehub import hookimpl, plugins
from carehub.cli import main
from carehub.plugins import (
    ENTRY_POINT_GROUP,
    ENV_ALLOW,
    ENV_BLOCK,
    ENV_PLUGINS_DIR,
    PluginError,
    PluginHost,
)
from carehub.store.store import StoredMessage
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange
from tests.helpers_http import CarehubProcess
from tests.test_plugins import TRANSLATOR_PLUGIN, plugins_dir

DOCS = Path(__file__).resolve().parents[1] / "docs"

#: A plugin registering a translator and then a channel named like a built-in one.
CLASHING_PLUGIN = """
from carehub import hookimpl
from carehub.components import Channel, Translator


class Stamp(Translator):
    name = "stamp"

    def translate(self, work):
        return None


class Webhook(Channel):
    name = "webhook"


@hookimpl
def carehub_register_translators(register):
    register(Stamp)


@hookimpl
def carehub_register_channels(register):
    register(Webhook)
"""

#: A plugin whose enricher has no name.
NAMELESS_PLUGIN = """
from carehub import hookimpl
from carehub.components import Enricher


class Nameless(Enricher):
    def enrich(self, work):
        return None


@hookimpl
def carehub_register_enrichers(register):
    register(Nameless)
"""

WEBHOOK_ROUTES = """\
routes:
  - name: r
    steps:
      - translate: lower-control-id
      - forward: {channel: webhook, url: "http://127.0.0.1:9/hook"}
"""


@pytest.fixture(autouse=True)
def clean_plugin_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_ALLOW, ENV_BLOCK, ENV_PLUGINS_DIR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(main, "_plugin_commands", None)


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def project(folder: Path, **plugin_files: str) -> Path:
    """carehub.yaml (plugins_dir: plugins) with WEBHOOK_ROUTES and the given plugin files."""
    (folder / "routes").mkdir(parents=True)
    (folder / "routes" / "routes.yaml").write_text(WEBHOOK_ROUTES, encoding="utf-8")
    plugins_dir(folder / "plugins", lowercase=TRANSLATOR_PLUGIN, **plugin_files)
    config = folder / "carehub.yaml"
    config.write_text("routes: [routes/*.yaml]\nplugins_dir: plugins\n", encoding="utf-8")
    return config


def install(site: Path, monkeypatch: pytest.MonkeyPatch, entry_points: str, **modules: str) -> None:
    """A distribution 'acme' in ``site`` with the given ``carehub`` entry points and package
    modules (acme_plugin/NAME.py), discovered as installed ones are."""
    info = site / "acme-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme\nVersion: 1.0\n", "utf-8")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_points}", "utf-8")
    package = site / "acme_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    for name, source in modules.items():
        (package / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    for module in [m for m in sys.modules if m.partition(".")[0] == "acme_plugin"]:
        monkeypatch.delitem(sys.modules, module)  # an earlier test's
    monkeypatch.syspath_prepend(str(site))
    ours = {line.split("=")[0].strip() for line in entry_points.splitlines() if "=" in line}
    monkeypatch.setattr(
        plugins,
        "installed_entry_points",
        lambda: [
            e for e in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if e.name in ours
        ],
    )


# -- a component name that is taken, or missing -------------------------------------------------
def test_a_plugin_naming_a_channel_like_a_builtin_is_skipped_and_the_builtin_keeps_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = plugins_dir(
        tmp_path / "plugins",
        gamma=CLASHING_PLUGIN,
        anon=NAMELESS_PLUGIN,
        lowercase=TRANSLATOR_PLUGIN,
    )
    with caplog.at_level(logging.ERROR, logger="carehub.plugins"):
        host = PluginHost().load(plugins_dir=folder)

    reasons = {failure.name: failure.error for failure in host.failures}
    assert reasons == {
        "anon": "plugin 'anon': enricher Nameless has no name (set the class attribute `name`, "
        "the word routes use)",
        "gamma": "two plugins register a channel named 'webhook': 'builtin.channels' and "
        "'gamma'; 'builtin.channels' keeps it: rename the one in 'gamma'",
    }
    assert host.owner("channel", "webhook") == "builtin.channels"
    assert "stamp" not in host.translators  # what gamma registered before is taken out
    assert "lower-control-id" in host.translators and "gamma" not in host.plugins
    logged = [r.getMessage() for r in caplog.records]
    assert any("'gamma'" in m and "failed to load and is skipped" in m for m in logged)

    (folder / "anon.py").unlink()
    with pytest.raises(PluginError, match=r"'builtin\.channels' and 'gamma'"):
        PluginHost().load(plugins_dir=folder, strict=True)


def test_of_two_plugins_registering_one_name_the_first_keeps_it(tmp_path: Path) -> None:
    second = CLASHING_PLUGIN.replace('"webhook"', '"carrier-pigeon"').replace("stamp", "stamp2")
    first = second.replace("stamp2", "stamp1")
    folder = plugins_dir(tmp_path / "plugins", alpha=first, beta=second)
    host = PluginHost().load(plugins_dir=folder)
    assert host.owner("channel", "carrier-pigeon") == "alpha"
    assert [f.name for f in host.failures] == ["beta"]
    assert "'alpha' and 'beta'; 'alpha' keeps it" in host.failures[0].error


def test_the_cli_and_the_hub_go_on_without_the_clashing_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = project(tmp_path / "config", gamma=CLASHING_PLUGIN)

    monkeypatch.setenv(ENV_PLUGINS_DIR, str(config.parent / "plugins"))
    listed = cli("plugins")
    assert listed.exit_code == 1, listed.output  # gamma failed to load
    assert "    channel webhook: POST each message as JSON" in listed.stdout
    assert (
        f"gamma (file {config.parent / 'plugins' / 'gamma.py'}): FAILED TO LOAD: two plugins "
        "register a channel named 'webhook': 'builtin.channels' and 'gamma'"
    ) in listed.stdout
    monkeypatch.delenv(ENV_PLUGINS_DIR)

    checked = cli("routes", "check", "--offline", "--config", config, "--data-dir", tmp_path / "d")
    assert checked.exit_code == 1, checked.output  # a plugin failed to load: not "ok"
    assert "failed: 1 plugin(s) did not load: gamma" in checked.stderr

    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]
    with CarehubProcess([*args, "--mllp-port", "0", "--http-port", "0"], tmp_path, "serve") as s:
        s.wait_ready()
        assert s.terminate() == 0
        assert "plugin 'gamma'" in s.stderr and "failed to load and is skipped" in s.stderr


# -- import failures --------------------------------------------------------------------------
def test_an_import_failure_names_the_file_and_line_and_logs_the_traceback_at_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install(
        tmp_path / "site",
        monkeypatch,
        "acme = acme_plugin.plugin\nmissing = acme_plugin.plugn\n",
        plugin="""
            from carehub import hookimpl
            from acme_plugin import settings
        """,
        settings="""
            SETTINGS = {}
            URL = SETTINGS["url"]
        """,
    )
    folder = plugins_dir(tmp_path / "plugins", typo="import os\n\ndef broken(:\n    pass\n")
    caplog.set_level(logging.DEBUG, logger="carehub.plugins")
    host = PluginHost().load(plugins_dir=folder)

    at = {failure.name: failure.at for failure in host.failures}
    assert at == {
        "acme": f"{tmp_path / 'site' / 'acme_plugin' / 'settings.py'}:3",
        "missing": None,  # no code of the plugin's ran: nothing to point at
        "typo": f"{folder / 'typo.py'}:3",
    }
    summaries = [r for r in caplog.records if r.levelno == logging.ERROR]
    (acme,) = [r.getMessage() for r in summaries if "'acme'" in r.getMessage()]
    assert acme == (
        "plugin 'acme' (entry point of acme 1.0) failed to load and is skipped: "
        f"KeyError: 'url' (at {at['acme']})"
    )
    assert not any(r.exc_info for r in summaries)
    traced = {r.getMessage().split()[1]: r for r in caplog.records if r.exc_info}
    assert set(traced) == {"'acme'", "'missing'", "'typo'"}
    assert all(r.levelno == logging.DEBUG for r in traced.values())
    assert isinstance(traced["'acme'"].exc_info[1], KeyError)


# -- a module that implements no hook ----------------------------------------------------------
def test_a_plugin_with_no_hook_implementations_is_said_to_add_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install(
        tmp_path / "site",
        monkeypatch,
        "acme = acme_plugin.helpers\n",
        helpers="from carehub import hookimpl\n\nSETTINGS = {}\n",
    )
    folder = plugins_dir(
        tmp_path / "plugins",
        unmarked="def carehub_register_translators(register):\n    pass\n",
    )
    monkeypatch.setenv(ENV_PLUGINS_DIR, str(folder))
    caplog.set_level(logging.WARNING, logger="carehub.plugins")

    listed = cli("plugins")
    assert listed.exit_code == 0, listed.output
    assert "acme 1.0 (entry point)\n    hooks: -" in listed.stdout
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "plugin 'acme' (entry point) implements no carehub hook (no "
        "@hookimpl function), so it adds nothing; does the entry point name the module that "
        "holds them?",
        f"plugin 'unmarked' (file {folder / 'unmarked.py'}) implements no carehub hook (no "
        "@hookimpl function), so it adds nothing",
    ]
    host = PluginHost().load()
    warned = sorted(name for name, info in host.plugins.items() if info.warning)
    assert warned == ["acme", "unmarked"]


# -- observers --------------------------------------------------------------------------------
class NameQuotingObserver:
    """Raises with the patient's name in the error, as a careless observer does."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def carehub_message_received(self, message: StoredMessage) -> None:
        self.calls += 1
        raise KeyError(message.text.split("\r")[2])


def test_an_observer_that_raises_is_logged_by_type_at_most_once_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(plugins, "OBSERVER_REPORT_SECONDS", 1.5, raising=False)  # a minute
    caplog.set_level(logging.DEBUG, logger="carehub")
    observer = NameQuotingObserver()
    hub = HubThread(local_config(worker=True), tmp_path / "data")
    hub.hub.host.add_plugin(observer, "careless")
    with hub:
        started = time.monotonic()
        for number in range(3):
            mllp_exchange(hub.mllp_address, [make_adt(f"O{number}", name="ZEBEDEE^ALEX").encode()])
        while observer.calls < 3:
            time.sleep(0.01)
        assert time.monotonic() - started < 1.5, "too slow to test the once-a-minute rule"
        time.sleep(1.6)
        mllp_exchange(hub.mllp_address, [make_adt("O3", name="ZEBEDEE^ALEX").encode()])
        while observer.calls < 4:
            time.sleep(0.01)

    told = [r for r in caplog.records if r.levelno >= logging.INFO and "careless" in r.getMessage()]
    assert [r.levelno for r in told] == [logging.ERROR, logging.ERROR]
    assert told[0].getMessage() == (
        "carehub_message_received of plugin 'careless' failed (KeyError): ignored; the "
        "message goes on and the other observers are still called"
    )
    assert re.fullmatch(
        r"carehub_message_received of plugin 'careless' still failing \(KeyError\): "
        r"3 call\(s\) in the last \d s",
        told[1].getMessage(),
    )
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert not any("ZEBEDEE" in r.getMessage() or r.exc_info for r in shown)
    traced = [r for r in caplog.records if r.exc_info and "careless" in r.getMessage()]
    assert len(traced) == 4 and all(r.levelno == logging.DEBUG for r in traced)


# -- the docs' lists of carehub's own channels -------------------------------------------------
def builtin_channels() -> dict[str, list[str]]:
    host = PluginHost().load()
    owned: dict[str, list[str]] = {}
    for name in sorted(host.channels):
        owner = host.owner("channel", name)
        if owner is not None and owner.startswith("builtin."):
            owned.setdefault(owner, []).append(name)
    return owned


def test_the_docs_list_every_builtin_channel_and_its_plugin() -> None:
    owned = builtin_channels()
    page = " ".join((DOCS / "hooks" / "carehub_register_channels.md").read_text().split())
    listed = re.search(
        r"already registered, by another plugin or by carehub itself \((.*?)\)", page
    )
    assert listed, "carehub_register_channels.md no longer lists carehub's own channels"
    channels: list[str] = []
    for name in re.findall(r"`([^`]+)`", listed.group(1).split(";")[0]):
        if name.startswith("builtin."):  # `a`, `b` and `c` belong to `builtin.x`, ...
            assert sorted(channels) == owned.pop(name, None), f"{name}: {channels}"
            channels = []
        else:
            channels.append(name)
    assert owned == {}, f"channels the page does not list: {owned}"

    guide = " ".join((DOCS / "plugins.md").read_text().split())
    own = re.search(r"carehub's own channels \(([^)]*)\)", guide)
    assert own, "plugins.md no longer lists carehub's own channels"
    every = sorted(name for names in builtin_channels().values() for name in names)
    assert sorted(re.findall(r"`([^`]+)`", own.group(1))) == every
    registered = re.search(r"no channel named 'pager' \(registered: ([^;]*);", guide)
    assert registered, "plugins.md no longer quotes the missing-channel error"
    assert registered.group(1).split(", ") == every
