"""The plugin system end to end: the out-of-tree carehub-pager package found through its entry
point, single-file plugins from a plugins directory, allow and block lists, load failures,
misspelt hooks and name clashes, and observers and step wrappers on a running hub."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import textwrap
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from carehub import hookimpl
from carehub.cli import main
from carehub.components import ComponentContext, Work
from carehub.config import HubConfig
from carehub.errors import ConfigError
from carehub.plugins import (
    ENV_ALLOW,
    ENV_BLOCK,
    ENV_PLUGINS_DIR,
    LoadFailure,
    PluginError,
    PluginHost,
)
from carehub.routing.config import load_route_files
from carehub.routing.dryrun import dry_run
from carehub.routing.table import bind_routes
from carehub.store.outbox import DeliveryRecord, Outbox
from carehub.store.store import StoredMessage
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange, run_routes

PAGER_INSTALLED = any(
    entry.name == "pager" for entry in importlib.metadata.entry_points(group="carehub")
)
requires_pager = pytest.mark.skipif(
    not PAGER_INSTALLED,
    reason="the carehub-pager example plugin is not installed: run "
    "`.venv/bin/pip install -e plugins/carehub-pager` (make test installs it)",
)

WAIT_SECONDS = 30.0

#: A single-file plugin: a translator that records MSH-10 in lower case.
TRANSLATOR_PLUGIN = """
from carehub import hookimpl
from carehub.components import Translator


class LowerControlId(Translator):
    name = "lower-control-id"

    def translate(self, work):
        work.data["control_id"] = work.view.get("MSH-10").lower()
        return work.data["control_id"]


@hookimpl
def carehub_register_translators(register):
    register(LowerControlId)
"""

#: A single-file plugin whose translator fails on every message.
FAILING_STEP_PLUGIN = """
from carehub import hookimpl
from carehub.components import Translator


class Boom(Translator):
    name = "boom"

    def translate(self, work):
        raise ValueError("boom")


@hookimpl
def carehub_register_translators(register):
    register(Boom)
"""


def channel_plugin(channel_name: str) -> str:
    """A single-file plugin registering a (never used) channel called ``channel_name``."""
    return f"""
from carehub import hookimpl
from carehub.components import Channel


class Sms(Channel):
    name = {channel_name!r}


@hookimpl
def carehub_register_channels(register):
    register(Sms)
"""


def plugins_dir(folder: Path, **files: str) -> Path:
    """A plugins directory holding one ``<name>.py`` per keyword argument."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return folder


def hub_config(folder: Path, routes: str, **files: str) -> Path:
    """A config folder: carehub.yaml, routes/routes.yaml and any other files given."""
    (folder / "routes").mkdir(parents=True, exist_ok=True)
    (folder / "routes" / "routes.yaml").write_text(textwrap.dedent(routes), encoding="utf-8")
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text), encoding="utf-8")
    (folder / "carehub.yaml").write_text("routes: [routes/*.yaml]\n", encoding="utf-8")
    return folder / "carehub.yaml"


def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def clean_plugin_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test chooses its own plugins; a developer's shell settings must not leak in, and
    the CLI's cached plugin commands are rebuilt per test."""
    for name in (ENV_ALLOW, ENV_BLOCK, ENV_PLUGINS_DIR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(main, "_plugin_commands", None)


# -- the entry-point plugin -------------------------------------------------------------------
@requires_pager
def test_pager_is_found_through_its_entry_point_with_its_version() -> None:
    from carehub_pager.plugin import OnCallEnricher, PagerChannel

    host = PluginHost().load()

    info = host.plugins["pager"]
    assert info.source == "entry point"
    assert info.version == importlib.metadata.version("carehub-pager")
    assert info.components == ["enricher on-call", "channel pager"]
    assert {
        "carehub_register_enrichers",
        "carehub_register_channels",
        "carehub_register_commands",
        "carehub_message_failed",
        "carehub_run_step",
    } <= set(info.hooks)
    assert host.enrichers["on-call"] is OnCallEnricher
    assert host.channels["pager"] is PagerChannel
    assert "pager-status" in [command.name for command in host.commands]
    assert host.failures == []


PAGER_ROUTES = """
    routes:
      - name: admissions-page
        when: {type: ADT, events: [A01]}
        steps:
          - translate: v2-to-event
          - enrich: {use: on-call, schedule: on-call.yaml}
          - forward: {channel: pager, url: "http://127.0.0.1:9/page", token: s3cret}
"""
SCHEDULE = """
    WARD: {name: Dr. Robin Okafor, pager: "5550101"}
"""


@requires_pager
def test_route_using_the_pager_components_binds_and_dry_runs(tmp_path: Path) -> None:
    config = hub_config(tmp_path / "config", PAGER_ROUTES, **{"on-call.yaml": SCHEDULE})

    result = run_routes(make_adt("PG1"), config, tmp_path / "data")

    assert result.errors == []
    (route,) = result.matched
    assert [step.step for step in route.steps] == [
        "translate v2-to-event",
        "enrich on-call",
        "forward pager admissions-page/pager",  # a route's only pager forward: named "pager"
    ]
    (delivery,) = result.deliveries
    page = json.loads(delivery.outgoing.payload)
    assert page == {
        "to": "5550101",
        "text": f"carehub: admission - unit WARD - msg {result.message_id}",
    }
    assert b"TESTPATIENT" not in delivery.outgoing.payload
    assert b"s3cret" not in delivery.outgoing.payload


@requires_pager
def test_carehub_plugins_lists_the_pager_and_its_command() -> None:
    version = importlib.metadata.version("carehub-pager")
    runner = CliRunner()

    result = runner.invoke(main, ["plugins"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    at = lines.index(f"pager {version} (entry point)")
    assert lines[at + 1 : at + 3] == [
        "    enricher on-call: look up the on-call clinician and pager for the patient's unit "
        "(PV1-3.1)",
        "    channel pager: page the on-call clinician via an HTTP paging gateway "
        "(no patient details)",
    ]

    rows = [
        json.loads(line) for line in runner.invoke(main, ["plugins", "--json"]).output.splitlines()
    ]
    (row,) = [row for row in rows if row["name"] == "pager"]
    assert row["version"] == version and row["source"] == "entry point"

    assert "pager-status" in runner.invoke(main, ["--help"]).output


@requires_pager
def test_block_list_hides_the_pager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_BLOCK, "pager")

    host = PluginHost().load()
    assert "pager" not in host.plugins
    assert "pager" not in host.channels and "on-call" not in host.enrichers
    assert "pager-status" not in [command.name for command in host.commands]
    assert "builtin.channels" in host.plugins  # blocking one plugin leaves the others

    output = CliRunner().invoke(main, ["plugins"]).output
    assert not any(line.startswith("pager ") for line in output.splitlines())

    config = hub_config(tmp_path / "config", PAGER_ROUTES, **{"on-call.yaml": SCHEDULE})
    with pytest.raises(ConfigError, match="no enricher named 'on-call'"):
        run_routes(make_adt(), config, tmp_path / "data")


@requires_pager
def test_allow_list_chooses_among_plugins_but_keeps_the_builtins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = plugins_dir(tmp_path / "plugins", lowercase=TRANSLATOR_PLUGIN)

    def loaded(allow: str, block: str | None = None) -> set[str]:
        monkeypatch.setenv(ENV_ALLOW, allow)
        if block is None:
            monkeypatch.delenv(ENV_BLOCK, raising=False)
        else:
            monkeypatch.setenv(ENV_BLOCK, block)
        names = set(PluginHost().load(plugins_dir=folder).plugins)
        assert {"builtin.core", "builtin.translators", "builtin.channels"} <= names
        return {name for name in names if not name.startswith("builtin.")}

    assert loaded("pager") == {"pager"}
    assert loaded("lowercase") == {"lowercase"}
    assert loaded(" pager , lowercase ") == {"pager", "lowercase"}
    assert loaded("") == set()  # set but empty: no plugins beyond the built-ins
    assert loaded("pager,lowercase", block="pager") == {"lowercase"}  # the block list wins


# -- single-file plugins ----------------------------------------------------------------------
def test_plugins_dir_file_registers_a_translator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = plugins_dir(tmp_path / "plugins", lowercase=TRANSLATOR_PLUGIN, _helper="raise 1")

    host = PluginHost().load(plugins_dir=folder)
    info = host.plugins["lowercase"]
    assert info.source == f"file {folder / 'lowercase.py'}"
    assert info.components == ["translator lower-control-id"]
    assert "lower-control-id" in host.translators
    assert "_helper" not in host.plugins and host.failures == []  # _files are not plugins

    monkeypatch.setenv(ENV_PLUGINS_DIR, str(folder))
    assert "lower-control-id" in PluginHost().load().translators

    monkeypatch.delenv(ENV_PLUGINS_DIR)
    config = hub_config(
        tmp_path / "config",
        """
        routes:
          - name: lower
            steps:
              - translate: lower-control-id
              - forward: {channel: file, directory: out}
        """,
    )
    hub = HubConfig.model_validate({"routes": [str(config.parent / "routes" / "*.yaml")]})
    hub.plugins_dir = folder
    result = run_routes(make_adt("ABC123"), hub, tmp_path / "data")
    assert result.errors == []
    assert result.steps[0].output == "abc123"


def test_plugin_file_that_raises_on_import_is_reported_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = plugins_dir(
        tmp_path / "plugins",
        broken="raise RuntimeError('roster service unreachable')",
        lowercase=TRANSLATOR_PLUGIN,
    )

    with caplog.at_level(logging.ERROR, logger="carehub.plugins"):
        host = PluginHost().load(plugins_dir=folder)
    assert host.failures == [
        LoadFailure(
            "broken", f"file {folder / 'broken.py'}", "RuntimeError: roster service unreachable"
        )
    ]
    assert "broken" not in host.plugins
    assert "lower-control-id" in host.translators  # the others still load
    assert "'broken'" in caplog.text

    monkeypatch.setenv(ENV_PLUGINS_DIR, str(folder))
    output = CliRunner().invoke(main, ["plugins"]).output
    assert "broken (file " in output and "FAILED TO LOAD: RuntimeError: roster" in output

    with pytest.raises(PluginError, match=r"plugin 'broken' \(file .*broken\.py\) failed to load"):
        PluginHost().load(plugins_dir=folder, strict=True)


def test_misspelt_hook_is_a_plugin_error(tmp_path: Path) -> None:
    folder = plugins_dir(
        tmp_path / "plugins",
        typo="""
        from carehub import hookimpl

        @hookimpl
        def carehub_register_chanels(register):
            pass
        """,
    )
    with pytest.raises(PluginError, match="carehub_register_chanels") as caught:
        PluginHost().load(plugins_dir=folder, strict=True)
    # Named as `carehub plugins` and the allow list name it, not by its module's repr.
    refused = str(caught.value)
    assert refused.startswith(f"plugin 'typo' (file {folder / 'typo.py'}) ")
    assert (
        "implements a hook that does not exist: carehub_register_chanels; did you mean "
        "carehub_register_channels?"
    ) in refused
    # Loaded as the hub loads plugins, it is skipped: the other plugins still load.
    host = PluginHost().load(plugins_dir=folder)
    assert [failure.name for failure in host.failures] == ["typo"]


@pytest.mark.parametrize(
    ("files", "owners"),
    [
        (
            {"alpha": channel_plugin("carrier-pigeon"), "beta": channel_plugin("carrier-pigeon")},
            "'alpha' and 'beta'",
        ),
        ({"gamma": channel_plugin("webhook")}, "'builtin.channels' and 'gamma'"),
    ],
)
def test_of_two_plugins_registering_one_channel_name_the_later_is_skipped(
    tmp_path: Path, files: dict[str, str], owners: str
) -> None:
    """The first to register a name keeps it (built-ins register first); the later plugin is
    skipped with the reason, and the hub goes on with the rest."""
    folder = plugins_dir(tmp_path / "plugins", **files)
    host = PluginHost().load(plugins_dir=folder)
    (failure,) = host.failures
    assert failure.name == list(files)[-1]
    assert f"two plugins register a channel named 'carrier-pigeon': {owners}" in failure.error or (
        f"two plugins register a channel named 'webhook': {owners}" in failure.error
    )
    assert host.owner("channel", "webhook") == "builtin.channels"


# -- observers and step wrappers on a running hub ---------------------------------------------
class RaisingObserver:
    """Raises in every observer hook, as a buggy plugin would."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _raise(self, hook: str) -> None:
        self.calls.append(hook)
        raise RuntimeError(f"observer bug in {hook}")

    @hookimpl
    def carehub_message_received(self, message: StoredMessage) -> None:
        self._raise("received")

    @hookimpl
    def carehub_message_routed(self, message: StoredMessage, routes: list[str]) -> None:
        self._raise("routed")

    @hookimpl
    def carehub_message_delivered(self, delivery: DeliveryRecord) -> None:
        self._raise("delivered")

    @hookimpl
    def carehub_message_failed(self, delivery: DeliveryRecord, error: str, final: bool) -> None:
        self._raise("failed")


class Recorder:
    """Records what observers are told and every step the run_step wrapper sees."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.steps: list[tuple[str, str, str]] = []  # (route, step, outcome)

    @hookimpl
    def carehub_message_routed(self, message: StoredMessage, routes: list[str]) -> None:
        self.events.append(("routed", routes))

    @hookimpl
    def carehub_message_delivered(self, delivery: DeliveryRecord) -> None:
        self.events.append(("delivered", delivery.channel))

    @hookimpl
    def carehub_message_failed(self, delivery: DeliveryRecord, error: str, final: bool) -> None:
        self.events.append(("failed", (delivery.channel, final)))

    @hookimpl(wrapper=True)
    def carehub_run_step(
        self, work: Work, step: str, run: Callable[[], Any]
    ) -> Generator[None, Any, Any]:
        try:
            result = yield
        except Exception as err:
            self.steps.append((work.route, step, f"raised {type(err).__name__}"))
            raise
        self.steps.append((work.route, step, "ok"))
        return result


def wrapped(steps: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The steps carehub runs through carehub_run_step: filters and forwards are not (they
    run no plugin code a tracer could learn from), so they are left out if they ever are."""
    return [s for s in steps if not s[1].startswith(("filter", "forward"))]


LIVE_ROUTES = """
    routes:
      - name: archive
        steps:
          - translate: v2-to-event
          - transform: {edits: [{set: {MSH-5: ARCHIVE}}]}
          - filter: {type: ADT}
          - forward: {channel: file, name: archive, directory: out}
          - forward:
              channel: webhook
              name: nowhere
              url: http://127.0.0.1:9/hook
              retry: {max_attempts: 1}
"""


def test_observer_that_raises_does_not_affect_routing(tmp_path: Path) -> None:
    config_file = hub_config(tmp_path / "config", LIVE_ROUTES)
    config = local_config(worker=True, routes=["routes/*.yaml"], source=config_file)
    hub = HubThread(config, tmp_path / "data")
    raising, recorder = RaisingObserver(), Recorder()
    hub.hub.host.add_plugin(raising, "raising")  # before start: the worker uses this host
    hub.hub.host.add_plugin(recorder, "recorder")

    with hub:
        outbox = Outbox(hub.store)
        answers = mllp_exchange(hub.mllp_address, [make_adt("OBS1").encode()])
        assert b"MSA|AA|OBS1" in answers[0]

        def settled() -> bool:
            return sorted(d.status for d in outbox.find()) == ["dead", "delivered"]

        wait_until(settled, "the archive copy and the dead letter")
        (message,) = hub.store.find()

    assert (tmp_path / "config" / "out").is_dir()
    (written,) = (tmp_path / "config" / "out").iterdir()
    assert b"|ARCHIVE|" in written.read_bytes()
    assert message.status in ("delivered", "failed")  # the routing itself went through
    assert sorted(raising.calls) == ["delivered", "failed", "received", "routed"]
    assert ("routed", ["archive"]) in recorder.events
    assert ("delivered", "file") in recorder.events
    assert ("failed", ("webhook", True)) in recorder.events
    assert wrapped(recorder.steps) == [
        ("archive", "translate v2-to-event", "ok"),
        ("archive", "transform", "ok"),
    ]


def test_run_step_wrapper_sees_every_step_and_its_failure(tmp_path: Path) -> None:
    folder = plugins_dir(tmp_path / "plugins", boom=FAILING_STEP_PLUGIN)
    host = PluginHost().load(plugins_dir=folder)
    recorder = Recorder()
    host.add_plugin(recorder, "recorder")
    config = hub_config(
        tmp_path / "config",
        """
        routes:
          - name: first
            steps:
              - translate: v2-to-event
              - transform: {edits: [{set: {MSH-5: X}}]}
              - validate: {}
              - filter: {type: ADT}
              - forward: {channel: file, directory: out}
          - name: second
            steps:
              - translate: boom
              - translate: v2-to-event
        """,
    )
    table = bind_routes(
        load_route_files([config.parent / "routes" / "routes.yaml"]),
        host,
        ComponentContext(config.parent, tmp_path / "data"),
    )

    result = dry_run(table, host, make_adt("WRAP1").encode())

    assert wrapped(recorder.steps) == [
        ("first", "translate v2-to-event", "ok"),
        ("first", "transform", "ok"),
        ("first", "validate", "ok"),
        ("second", "translate boom", "raised ValueError"),
    ]
    first, second = result.routes
    assert first.error is None and first.steps[0].output is not None  # results pass through
    assert second.error == "step 0 (translate boom): ValueError: boom"
