"""What a third-party plugin author meets: a component whose start() fails, options named after
carehub's own step keys, destination names that survive an edited route, tracebacks at DEBUG
only, a misspelt or filtered plugin, exit codes of `routes check` and `routes test`, and what
`carehub plugins` shows. Everything runs through the real CLI, a real hub and real servers."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text

from carehub import __version__, plugins
from carehub.cli import main
from carehub.config import load_config
from carehub.errors import ConfigError
from carehub.hub import Hub, build_routing
from carehub.plugins import (
    ENTRY_POINT_GROUP,
    ENV_ALLOW,
    ENV_BLOCK,
    ENV_PLUGINS_DIR,
    LoadFailure,
    PluginError,
    PluginHost,
)
from carehub.routing.dryrun import dry_run
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange, run_routes
from tests.helpers_http import CarehubProcess, HTTPServer, wait_for
from tests.test_cli import env_without_carehub
from tests.test_plugins import FAILING_STEP_PLUGIN, TRANSLATOR_PLUGIN, plugins_dir

#: An enricher whose start() has a plain bug.
START_BUG_PLUGIN = """
from carehub import hookimpl
from carehub.components import Enricher


class Boom(Enricher):
    name = "boom"

    async def start(self):
        {}["roster"]  # a plain bug in start()

    def enrich(self, work):
        return None


@hookimpl
def carehub_register_enrichers(register):
    register(Boom)
"""

#: An enricher whose start() reports a missing file, as the docs ask.
START_CONFIG_ERROR_PLUGIN = """
from carehub import hookimpl
from carehub.components import Enricher
from carehub.errors import ConfigError


class Roster(Enricher):
    name = "roster"

    async def start(self):
        raise ConfigError("nope.csv: cannot read the team roster: No such file or directory")

    def enrich(self, work):
        return None


@hookimpl
def carehub_register_enrichers(register):
    register(Roster)
"""

#: A channel whose send() has a bug; the patient's name would be in the error's text.
SEND_BUG_PLUGIN = """
from carehub import hookimpl
from carehub.components import Channel, Outgoing


class Buggy(Channel):
    name = "buggy"

    def render(self, work, key):
        return Outgoing(work.view.get("PID-5.1").encode(), "text/plain", key)

    async def send(self, outgoing):
        return {}[outgoing.payload.decode()]


@hookimpl
def carehub_register_channels(register):
    register(Buggy)
"""

#: A translator that fails with the patient's name in its error.
NAMING_STEP_PLUGIN = """
from carehub import hookimpl
from carehub.components import Translator


class Picky(Translator):
    name = "picky"

    def translate(self, work):
        raise ValueError("unexpected name " + work.view.get("PID-5.1"))


@hookimpl
def carehub_register_translators(register):
    register(Picky)
"""

#: Options named after carehub's own step keys: a channel's `name`, an enricher's `use`.
RESERVED_CHANNEL_PLUGIN = """
from carehub import hookimpl
from carehub.components import Channel, ComponentOptions, Translator


class Fine(Translator):
    name = "fine-translator"

    def translate(self, work):
        return None


class Named(Channel):
    name = "named"

    class Options(ComponentOptions):
        name: str
        retry: bool = False


@hookimpl
def carehub_register_translators(register):
    register(Fine)


@hookimpl
def carehub_register_channels(register):
    register(Named)
"""
RESERVED_ENRICHER_PLUGIN = """
from carehub import hookimpl
from carehub.components import ComponentOptions, Enricher


class UseEnricher(Enricher):
    name = "use-enricher"

    class Options(ComponentOptions):
        use: str = "default"


@hookimpl
def carehub_register_enrichers(register):
    register(UseEnricher)
"""


@pytest.fixture(autouse=True)
def clean_plugin_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test chooses its own plugins; the CLI's cached plugin commands are rebuilt."""
    for name in (ENV_ALLOW, ENV_BLOCK, ENV_PLUGINS_DIR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(main, "_plugin_commands", None)


def project(folder: Path, routes: str, plugin_files: dict[str, str] | None = None) -> Path:
    """A config folder with carehub.yaml (plugins_dir: plugins), routes/routes.yaml and the
    given single-file plugins; returns carehub.yaml."""
    (folder / "routes").mkdir(parents=True, exist_ok=True)
    (folder / "routes" / "routes.yaml").write_text(textwrap.dedent(routes), encoding="utf-8")
    plugins_dir(folder / "plugins", **(plugin_files or {}))
    config = folder / "carehub.yaml"
    config.write_text("routes: [routes/*.yaml]\nplugins_dir: plugins\n", encoding="utf-8")
    return config


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def routes_file(config: Path) -> Path:
    return config.parent / "routes" / "routes.yaml"


# -- 1: a component whose start() fails -------------------------------------------------------
BOOM_ROUTES = """
    routes:
      - name: r
        steps:
          - translate: v2-to-event
          - enrich: boom
"""


def test_a_bug_in_start_is_one_error_line_naming_file_route_step_and_plugin(
    tmp_path: Path,
) -> None:
    config = project(tmp_path / "config", BOOM_ROUTES, {"startfail": START_BUG_PLUGIN})
    message = tmp_path / "admit.hl7"
    message.write_text(make_adt(), encoding="utf-8")
    expected = (
        f"error: {routes_file(config)}:6: route 'r': steps[1] (enrich boom, plugin "
        "'startfail') failed to start: KeyError: 'roster'\n"
    )

    for args in (
        ["routes", "check", "--offline"],
        ["routes", "test", message],
    ):
        result = cli(*args, "--config", config, "--data-dir", tmp_path / "data")
        assert result.exit_code == 2, result.output
        assert result.stderr == expected
        assert "Traceback" not in result.output

    with pytest.raises(ConfigError) as raised:
        run_routes(make_adt(), config, tmp_path / "data")
    assert f"{expected[len('error: ') : -1]}" == str(raised.value)
    assert isinstance(raised.value.__cause__, KeyError)  # the original, for debuggers


def test_serve_names_the_failing_start_and_logs_its_traceback_at_debug(tmp_path: Path) -> None:
    config = project(tmp_path / "config", BOOM_ROUTES, {"startfail": START_BUG_PLUGIN})
    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]
    args += ["--mllp-port", "0", "--http-port", "0"]

    with CarehubProcess([*args, "--log-level", "DEBUG"], tmp_path / "logs", "debug") as serve:
        assert serve.process.wait(60) == 2
        stderr = serve.stderr
    assert stderr.splitlines()[-1] == (
        f"error: {routes_file(config)}:6: route 'r': steps[1] (enrich boom, plugin "
        "'startfail') failed to start: KeyError: 'roster'"
    )
    assert "Traceback" in stderr and 'startfail.py", line 10, in start' in stderr
    assert "carehub ready" not in serve.stdout

    with CarehubProcess([*args, "--log-level", "INFO"], tmp_path / "logs", "info") as serve:
        assert serve.process.wait(60) == 2
        assert "Traceback" not in serve.stderr


def test_a_config_error_from_start_keeps_the_plugins_own_words(tmp_path: Path) -> None:
    """After the route file and line, the route and the step, so that with several routes
    using rosters the operator knows which one names the missing file."""
    routes = """
        routes:
          - name: r
            steps:
              - enrich: roster
    """
    config = project(tmp_path / "config", routes, {"teams": START_CONFIG_ERROR_PLUGIN})
    result = cli("routes", "check", "--offline", "--config", config, "--data-dir", tmp_path)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {routes_file(config)}:5: route 'r': steps[0] (enrich roster, plugin 'teams'): "
        "nope.csv: cannot read the team roster: No such file or directory\n"
    )


# -- 2: options named after carehub's own step keys --------------------------------------------
def test_options_named_after_reserved_step_keys_fail_the_plugin_at_registration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = plugins_dir(
        tmp_path / "plugins",
        roomchat=RESERVED_CHANNEL_PLUGIN,
        useopt=RESERVED_ENRICHER_PLUGIN,
        lowercase=TRANSLATOR_PLUGIN,
    )

    host = PluginHost().load(plugins_dir=folder)

    assert host.failures == [
        LoadFailure(
            "useopt",
            f"file {folder / 'useopt.py'}",
            "plugin 'useopt': enricher 'use-enricher' (UseEnricher.Options) declares 'use', "
            "which carehub reads itself from a route's enrich: step; rename the option",
        ),
        LoadFailure(
            "roomchat",
            f"file {folder / 'roomchat.py'}",
            "plugin 'roomchat': channel 'named' (Named.Options) declares 'name', which "
            "carehub reads itself from a route's forward: step; rename the option",
        ),
    ]
    # Failed as a whole: what it registered before the bad component is gone too.
    assert "roomchat" not in host.plugins and "useopt" not in host.plugins
    assert "fine-translator" not in host.translators and "named" not in host.channels
    assert "use-enricher" not in host.enrichers
    assert "lower-control-id" in host.translators  # the others still load

    with pytest.raises(PluginError, match="declares 'use'"):
        PluginHost().load(plugins_dir=folder, strict=True)

    monkeypatch.setenv(ENV_PLUGINS_DIR, str(folder))
    output = cli("plugins").output
    assert (
        f"roomchat (file {folder / 'roomchat.py'}): FAILED TO LOAD: plugin 'roomchat': "
        "channel 'named' (Named.Options) declares 'name'"
    ) in output


# -- 3: destination names -----------------------------------------------------------------------
def test_an_unnamed_forward_is_named_after_its_channel_whatever_its_position(
    tmp_path: Path,
) -> None:
    routes = """
        routes:
          - name: r
            steps:
              {extra}
              - forward: {{channel: file, directory: out}}
              - forward: {{channel: webhook, url: "http://127.0.0.1:9/x"}}
    """
    names = []
    for extra in (
        "- filter: {type: ADT}",
        "- translate: v2-to-event\n              - validate: {}",
    ):
        folder = tmp_path / str(len(names))
        config = project(folder, routes.format(extra=extra))
        names.append(sorted(build_routing(load_config(config), folder / "data")[1].destinations))
    assert names == [["r/file", "r/webhook"], ["r/file", "r/webhook"]]


@pytest.mark.parametrize(
    "second",
    [
        "- forward: {channel: file, directory: b}",
        "- forward: {channel: file, name: b, directory: b}",
    ],
)
def test_several_forwards_to_one_channel_must_each_be_named(tmp_path: Path, second: str) -> None:
    routes = f"""
        routes:
          - name: r
            steps:
              - translate: v2-to-event
              - forward: {{channel: file, directory: a}}
              {second}
    """
    config = project(tmp_path / "config", routes)
    result = cli("routes", "check", "--offline", "--config", config, "--data-dir", tmp_path)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(
        f"error: {routes_file(config)}:6: route 'r': steps[1].forward.name: this route has 2 "
        "forwards to channel 'file'; give each a name (its destination is r/NAME"
    )


def test_pending_retries_keep_their_destination_when_a_step_is_added_before_it(
    tmp_path: Path,
) -> None:
    """Stop the hub while a delivery waits for its retry, add a step before the forward (as
    the docs' examples do), start again: the retry goes out, it is not a dead letter."""
    forward = (
        '- forward: {{channel: webhook, url: "{url}", '
        "retry: {{max_attempts: 5, initial_delay: 2, multiplier: 1, jitter: 0}}}}"
    )
    with HTTPServer(respond=lambda _: 500) as server:
        url = server.url()
        config = project(
            tmp_path / "config",
            f"""
            routes:
              - name: r
                steps:
                  {forward.format(url=url)}
            """,
        )
        hub_config = local_config(worker=True, routes=["routes/*.yaml"], source=config)
        with HubThread(hub_config, tmp_path / "data") as hub:
            mllp_exchange(hub.mllp_address, [make_adt("KEEP1").encode()])
            wait_for(lambda: server.requests, what="the first attempt")

        server.respond = lambda _: 200
        routes_file(config).write_text(
            textwrap.dedent(f"""
            routes:
              - name: r
                steps:
                  - translate: v2-to-event
                  {forward.format(url=url)}
            """),
            encoding="utf-8",
        )
        with HubThread(hub_config, tmp_path / "data") as hub:
            (delivery,) = hub.wait_for_deliveries(1)

    assert (delivery.destination, delivery.status, delivery.attempts) == (
        "r/webhook",
        "delivered",
        2,
    )
    assert [r.status for r in server.requests] == [500, 200]


# -- 6: tracebacks at DEBUG, never message content at INFO or WARNING -------------------------
def test_a_bug_in_send_is_logged_with_its_traceback_at_debug_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    routes = """
        routes:
          - name: r
            steps:
              - forward: {channel: buggy, retry: {max_attempts: 1}}
    """
    config = project(tmp_path / "config", routes, {"buggy": SEND_BUG_PLUGIN})
    hub_config = local_config(worker=True, routes=["routes/*.yaml"], source=config)
    hub_config.plugins_dir = config.parent / "plugins"
    caplog.set_level(logging.DEBUG, logger="carehub.worker")
    with HubThread(hub_config, tmp_path / "data") as hub:
        mllp_exchange(hub.mllp_address, [make_adt("BUG1", name="ZEBEDEE^ALEX").encode()])
        (delivery,) = hub.wait_for_deliveries(1)
    assert delivery.status == "dead" and delivery.last_error == "KeyError: 'ZEBEDEE'"

    records = [r for r in caplog.records if r.name == "carehub.worker"]
    (traced,) = [r for r in records if r.exc_info]
    assert traced.levelno == logging.DEBUG
    assert isinstance(traced.exc_info[1], KeyError)
    assert traced.getMessage() == "message 1 (delivery 1) to r/buggy: KeyError raised"
    shown = [r for r in records if r.levelno >= logging.INFO]
    assert any("KeyError" in r.getMessage() for r in shown)
    assert not any("ZEBEDEE" in r.getMessage() or r.exc_info for r in shown)


def test_a_failing_step_is_logged_with_its_traceback_at_debug_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    routes = """
        routes:
          - name: r
            steps:
              - translate: picky
    """
    config = project(tmp_path / "config", routes, {"picky": NAMING_STEP_PLUGIN})
    caplog.set_level(logging.DEBUG, logger="carehub.routing.router")

    result = run_routes(make_adt(name="ZEBEDEE^ALEX"), config, tmp_path / "data")

    assert result.errors == ["r: step 0 (translate picky): ValueError: unexpected name ZEBEDEE"]
    warning, traced = caplog.records
    assert warning.levelno == logging.WARNING
    assert warning.getMessage() == "route r step 0 (translate picky) failed: ValueError"
    assert not warning.exc_info
    assert traced.levelno == logging.DEBUG and isinstance(traced.exc_info[1], ValueError)


# -- 8: a plugins folder that is not one; plugins the allow or block list left out ------------
def test_a_plugins_dir_that_is_not_a_folder_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = project(tmp_path / "config", "routes: []\n")
    config.write_text("routes: [routes/*.yaml]\nplugins_dir: plugin\n", encoding="utf-8")
    result = cli("routes", "check", "--offline", "--config", config, "--data-dir", tmp_path)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {config}:2: plugins_dir: the plugins folder {config.parent / 'plugin'} "
        "does not exist\n"
    )

    not_a_folder = tmp_path / "plugins.txt"
    not_a_folder.write_text("", encoding="utf-8")
    monkeypatch.setenv(ENV_PLUGINS_DIR, str(not_a_folder))
    result = cli("plugins")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {ENV_PLUGINS_DIR}={not_a_folder}: the plugins folder {not_a_folder} "
        "is not a folder\n"
    )


def test_a_missing_component_error_says_which_plugins_were_left_out_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    routes = """
        routes:
          - name: r
            steps:
              - translate: lower-control-id
    """
    config = project(tmp_path / "config", routes, {"lowercase": TRANSLATOR_PLUGIN})

    monkeypatch.setenv(ENV_ALLOW, "pager,pagr")
    with (
        caplog.at_level(logging.WARNING, logger="carehub.plugins"),
        pytest.raises(ConfigError) as raised,
    ):
        run_routes(make_adt(), config, tmp_path / "data")
    assert str(raised.value).endswith(
        "steps[0]: no translator named 'lower-control-id' (registered: transform, v2-to-event, "
        "validate; left out by CAREHUB_PLUGINS: lowercase)"
    )
    assert caplog.messages == [
        "CAREHUB_PLUGINS names 'pagr', which matches no installed plugin or plugins-directory file"
    ]

    monkeypatch.delenv(ENV_ALLOW)
    monkeypatch.setenv(ENV_BLOCK, "lowercase")
    with pytest.raises(ConfigError, match=r"; left out by CAREHUB_BLOCK_PLUGINS: lowercase\)$"):
        run_routes(make_adt(), config, tmp_path / "data")


# -- 9: builtin.core runs every step ------------------------------------------------------------
def test_builtin_core_cannot_be_blocked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = project(tmp_path / "config", "routes: []\n")
    message = tmp_path / "admit.hl7"
    message.write_text(make_adt(), encoding="utf-8")
    monkeypatch.setenv(ENV_BLOCK, "pager,builtin.core")

    result = cli("routes", "test", message, "--config", config, "--data-dir", tmp_path)
    assert result.exit_code == 2
    assert result.stderr == (
        "error: CAREHUB_BLOCK_PLUGINS names 'builtin.core', which cannot be blocked: it runs "
        "every translate and enrich step\n"
    )


def test_steps_fail_loudly_when_nothing_runs_them(tmp_path: Path) -> None:
    routes = """
        routes:
          - name: r
            steps:
              - translate: v2-to-event
              - forward: {channel: file, directory: out}
    """
    config = project(tmp_path / "config", routes)
    host, table = build_routing(load_config(config), tmp_path / "data")
    host.pm.unregister(name="builtin.core")

    (route,) = dry_run(table, host, make_adt().encode()).routes
    assert route.error == (
        "step 0 (translate v2-to-event): PluginError: no plugin runs route steps "
        "(carehub_run_step): 'builtin.core' is not loaded"
    )
    assert route.deliveries == []


# -- 14: routes check when a plugin failed -----------------------------------------------------
def test_routes_check_does_not_say_ok_when_a_plugin_failed_to_load(tmp_path: Path) -> None:
    routes = """
        routes:
          - name: r
            steps:
              - forward: {channel: file, directory: out}
    """
    config = project(tmp_path / "config", routes, {"broken": "raise RuntimeError('boom')"})
    result = cli("routes", "check", "--offline", "--config", config, "--data-dir", tmp_path)
    assert result.exit_code == 1
    assert not any(line.startswith("ok") for line in result.stdout.splitlines())
    assert "failed: broken (file " in result.stdout  # the failure itself, as before
    assert result.stderr == "failed: 1 plugin(s) did not load: broken\n"


# -- 4: routes test exit codes ------------------------------------------------------------------
def test_routes_test_exits_1_when_a_route_errors_and_prints_the_error_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = """
        routes:
          - name: breaks
            when: {type: ADT, events: [A01]}
            steps:
              - translate: boom
    """
    config = project(tmp_path / "config", routes, {"boom": FAILING_STEP_PLUGIN})
    monkeypatch.chdir(tmp_path)  # short names: the text output wraps at the terminal's width
    admit, discharge = Path("admit.hl7"), Path("discharge.hl7")
    admit.write_text(make_adt("T1"), encoding="utf-8")
    discharge.write_text(make_adt("T2", "A03"), encoding="utf-8")

    def routes_test(*args: str | Path) -> Result:
        return cli("routes", "test", *args, "--config", config, "--data-dir", tmp_path / "d")

    result = routes_test(admit, discharge)
    assert result.exit_code == 1
    assert f"{admit}: matched breaks" in result.stdout
    assert f"{discharge}: matched no route" in result.stdout  # every result is printed
    assert result.stdout.count("ValueError: boom") == 1
    assert result.stderr == f"failed: a route error for 1 message(s): {admit}\n"
    # The same as a process of its own, where no test harness holds the log records.
    args = ["routes", "test", admit, "--config", config, "--data-dir", tmp_path / "d"]
    alone = subprocess.run(
        [str(Path(sys.executable).with_name("carehub")), *map(str, args)],
        capture_output=True,
        text=True,
        env=env_without_carehub(),
        timeout=60,
    )
    assert alone.returncode == 1
    assert alone.stderr == f"failed: a route error for 1 message(s): {admit}\n"

    result = routes_test(admit, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["routes"][0]["error"] == (
        "step 0 (translate boom): ValueError: boom"
    )

    assert routes_test(discharge).exit_code == 0  # matching no route is no failure...
    result = routes_test(discharge, "--require-match")  # ...unless asked
    assert result.exit_code == 1
    assert result.stderr == f"failed: 1 message(s) matched no route: {discharge}\n"


# -- 5 and 15: what `carehub plugins` shows -----------------------------------------------------
def test_carehub_plugins_shows_descriptions_options_and_no_version_for_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = plugins_dir(tmp_path / "plugins", lowercase=TRANSLATOR_PLUGIN)
    monkeypatch.setenv(ENV_PLUGINS_DIR, str(folder))

    lines = cli("plugins").stdout.splitlines()
    at = lines.index(f"lowercase - (file {folder / 'lowercase.py'})")
    assert lines[at + 1] == "    translator lower-control-id"  # no description to show
    at = lines.index(f"builtin.channels {__version__} (builtin)")
    assert lines[at + 1] == (
        "    channel file: write each message to its own file in a folder (atomic, one file "
        "per delivery)"
    )

    rows = {
        row["name"]: row
        for row in map(json.loads, cli("plugins", "--json").stdout.split("\n")[:-1])
    }
    assert rows["lowercase"]["version"] is None
    assert rows["builtin.core"]["version"] == __version__
    (file_channel,) = [
        c for c in rows["builtin.channels"]["component_details"] if c["name"] == "file"
    ]
    assert file_channel["description"].startswith("write each message to its own file")
    options = {o["name"]: o for o in file_channel["options"]}
    assert options["directory"] == {"name": "directory", "required": True}
    assert options["body"] == {"name": "body", "required": False, "default": "v2"}


# -- 17: the suite ignores third-party plugins installed beside it ------------------------------
ROGUE_PLUGIN = """
from carehub import hookimpl
from carehub.components import Channel


class Webhook(Channel):
    name = "webhook"


@hookimpl
def carehub_register_channels(register):
    register(Webhook)
"""


def test_the_suite_ignores_other_installed_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A distribution installed beside carehub that registers `webhook` would break every hub
    in the suite; only the built-ins and the example pager are discovered here."""
    site = tmp_path / "site"
    (site / "rogue-1.0.dist-info").mkdir(parents=True)
    (site / "rogue-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: rogue\nVersion: 1.0\n", encoding="utf-8"
    )
    (site / "rogue-1.0.dist-info" / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nrogue = rogue_plugin\n", encoding="utf-8"
    )
    (site / "rogue_plugin.py").write_text(ROGUE_PLUGIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    installed = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    assert "rogue" in installed.names  # it is really installed...

    host = PluginHost().load()  # ...and ignored
    assert "rogue" not in host.plugins and host.failures == []
    assert host.owner("channel", "webhook") == "builtin.channels"
    assert "pager" in host.plugins or "pager" not in installed.names
    assert "rogue" not in cli("plugins").stdout

    # Discovery itself still finds it (and its clash) when not narrowed down.
    monkeypatch.setattr(
        plugins,
        "installed_entry_points",
        lambda: list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)),
    )
    everything = PluginHost().load()
    assert [f.name for f in everything.failures] == ["rogue"]
    assert "'builtin.channels' and 'rogue'" in everything.failures[0].error
    assert everything.owner("channel", "webhook") == "builtin.channels"


# -- 7 (the hub side): a failed start closes what it opened ------------------------------------
def test_hub_start_closes_the_store_when_a_later_step_fails(tmp_path: Path) -> None:
    config = project(tmp_path / "config", BOOM_ROUTES, {"startfail": START_BUG_PLUGIN})
    hub_config = local_config(worker=True, routes=["routes/*.yaml"], source=config)
    hub_config.plugins_dir = config.parent / "plugins"
    before = set(threading.enumerate())
    hub = Hub(hub_config, tmp_path / "data")

    with pytest.raises(ConfigError, match="failed to start: KeyError"):
        asyncio.run(hub.start())

    assert hub.store is None
    deadline = time.monotonic() + 10
    while left := [t.name for t in set(threading.enumerate()) - before if t.is_alive()]:
        assert time.monotonic() < deadline, f"threads left running: {left}"
        time.sleep(0.02)


def test_a_delivery_stored_under_the_former_position_name_still_goes_out(
    tmp_path: Path,
) -> None:
    """Earlier versions named an unnamed forward ROUTE/CHANNEL-POSITION. A delivery waiting
    for its retry under such a name when carehub is upgraded still goes to that forward."""
    forward = (
        '- forward: {{channel: webhook, url: "{url}", '
        "retry: {{max_attempts: 5, initial_delay: 2, multiplier: 1, jitter: 0}}}}"
    )
    with HTTPServer(respond=lambda _: 500) as server:
        config = project(
            tmp_path / "config",
            f"""
            routes:
              - name: r
                steps:
                  - translate: v2-to-event
                  {forward.format(url=server.url())}
            """,
        )
        hub_config = local_config(worker=True, routes=["routes/*.yaml"], source=config)
        with HubThread(hub_config, tmp_path / "data") as hub:
            mllp_exchange(hub.mllp_address, [make_adt("FORMER1").encode()])
            wait_for(lambda: server.requests, what="the first attempt")
            store_url = hub.hub.store.url
        engine = create_engine(store_url)
        with engine.begin() as conn:  # as an earlier version stored it
            conn.execute(text("UPDATE deliveries SET destination = 'r/webhook-1'"))
        engine.dispose()

        server.respond = lambda _: 200
        with HubThread(hub_config, tmp_path / "data") as hub:
            (delivery,) = hub.wait_for_deliveries(1)

    assert (delivery.destination, delivery.status, delivery.attempts) == (
        "r/webhook-1",
        "delivered",
        2,
    )
    assert [r.status for r in server.requests] == [500, 200]


# -- 18: what render() returns is checked where it is called ------------------------------------
#: Channels whose render() returns an Outgoing the store cannot keep.
BAD_OUTGOING_PLUGIN = """
from datetime import datetime

from carehub import hookimpl
from carehub.components import Channel, Outgoing


class TextPayload(Channel):
    name = "text-payload"

    def render(self, work, key):
        return Outgoing(work.view.get("MSH-10"), "text/plain", key)  # not encoded

    async def send(self, outgoing):
        return "ok"


class DatedMetadata(Channel):
    name = "dated-metadata"

    def render(self, work, key):
        return Outgoing(b"x", "text/plain", key, {"rendered_at": datetime.now()})

    async def send(self, outgoing):
        return "ok"


@hookimpl
def carehub_register_channels(register):
    register(TextPayload)
    register(DatedMetadata)
"""

BAD_OUTGOING_ROUTES = """
    routes:
      - name: text
        when: {type: ADT, events: [A01]}
        steps:
          - forward: {channel: text-payload}
      - name: dated
        when: {type: ADT, events: [A03]}
        steps:
          - forward: {channel: dated-metadata}
      - name: archive
        when: {type: ADT}
        steps:
          - forward: {channel: file, directory: out}
"""
TEXT_PAYLOAD_ERROR = (
    "text: step 0 (forward text-payload text/text-payload): RenderError: channel "
    "'text-payload' (plugin 'bad'): render() returned a str payload; encode it to bytes"
)
DATED_METADATA_ERROR = (
    "dated: step 0 (forward dated-metadata dated/dated-metadata): RenderError: channel "
    "'dated-metadata' (plugin 'bad'): render() returned metadata whose value for "
    "'rendered_at' is a datetime, not a str; turn it into text"
)


def test_an_outgoing_the_store_cannot_keep_fails_its_route_for_that_message_only(
    tmp_path: Path,
) -> None:
    config = project(tmp_path / "config", BAD_OUTGOING_ROUTES, {"bad": BAD_OUTGOING_PLUGIN})
    assert run_routes(make_adt("O1"), config, tmp_path / "dry").errors == [TEXT_PAYLOAD_ERROR]
    assert run_routes(make_adt("O2", "A03"), config, tmp_path / "dry").errors == [
        DATED_METADATA_ERROR
    ]

    hub_config = local_config(worker=True, routes=["routes/*.yaml"], source=config)
    hub_config.plugins_dir = config.parent / "plugins"
    with HubThread(hub_config, tmp_path / "data") as hub:
        messages = [
            make_adt("O1", patient_id="PO1"),
            make_adt("O2", "A03", patient_id="PO2"),
            make_adt("O3", "A04", patient_id="PO3"),
        ]
        mllp_exchange(hub.mllp_address, [m.encode() for m in messages])
        found = hub.wait_for_deliveries(3, timeout=20)
        assert {(d.destination, d.status) for d in found} == {("archive/file", "delivered")}
        wait_for(
            lambda: [m.status for m in hub.store.find(limit=None)].count("received") == 0,
            20,
            what="every message settled",
        )
        settled = {m.control_id: m for m in hub.store.find(limit=None)}
    assert {c: m.status for c, m in settled.items()} == {
        "O1": "failed",
        "O2": "failed",
        "O3": "delivered",
    }
    assert TEXT_PAYLOAD_ERROR.split(": ", 1)[1] in (settled["O1"].detail or "")
    assert DATED_METADATA_ERROR.split(": ", 1)[1] in (settled["O2"].detail or "")


# -- 19: methods carehub awaits, and methods it calls ---------------------------------------------
SYNC_SEND_PLUGIN = """
from carehub import hookimpl
from carehub.components import Channel, Outgoing


class SyncSend(Channel):
    name = "sync-send"

    def render(self, work, key):
        return Outgoing(b"x", "text/plain", key)

    def send(self, outgoing):
        return "HTTP 200"


@hookimpl
def carehub_register_channels(register):
    register(SyncSend)
"""

ASYNC_ENRICH_PLUGIN = """
from carehub import hookimpl
from carehub.components import Enricher, Translator


class Fine(Translator):
    name = "fine-before-async"

    def translate(self, work):
        return None


class AsyncLookup(Enricher):
    name = "async-lookup"

    async def enrich(self, work):
        work.data["looked_up"] = True


@hookimpl
def carehub_register_translators(register):
    register(Fine)


@hookimpl
def carehub_register_enrichers(register):
    register(AsyncLookup)
"""


def test_a_method_of_the_wrong_kind_fails_its_plugin_at_registration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = """
        routes:
          - name: r
            steps:
              - forward: {channel: sync-send}
    """
    config = project(
        tmp_path / "config",
        routes,
        {"syncsend": SYNC_SEND_PLUGIN, "asyncenrich": ASYNC_ENRICH_PLUGIN},
    )
    folder = config.parent / "plugins"

    host = PluginHost().load(plugins_dir=folder)

    assert host.failures == [
        LoadFailure(
            "asyncenrich",
            f"file {folder / 'asyncenrich.py'}",
            "plugin 'asyncenrich': enricher 'async-lookup' (AsyncLookup): enrich() must not be "
            "'async def': carehub calls it and uses what it returns without awaiting it (do "
            "async work in start())",
        ),
        LoadFailure(
            "syncsend",
            f"file {folder / 'syncsend.py'}",
            "plugin 'syncsend': channel 'sync-send' (SyncSend): send() must be 'async def': "
            "carehub awaits it on the worker's event loop (use async I/O in it)",
        ),
    ]
    assert "fine-before-async" not in host.translators  # the whole plugin is left out
    with pytest.raises(PluginError, match=r"enrich\(\) must not be 'async def'"):
        PluginHost().load(plugins_dir=folder, strict=True)

    result = cli("routes", "check", "--offline", "--config", config, "--data-dir", tmp_path)
    assert result.exit_code == 2
    assert "no channel named 'sync-send'" in result.stderr
    assert "failed to load: asyncenrich, syncsend" in result.stderr
    monkeypatch.setenv(ENV_PLUGINS_DIR, str(folder))
    assert "syncsend (file " in cli("plugins").stdout


# -- 20: a registration hook that raises ---------------------------------------------------------
LAZY_IMPORT_PLUGIN = """
from carehub import hookimpl
from carehub.components import Translator


class Early(Translator):
    name = "early"

    def translate(self, work):
        return None


@hookimpl
def carehub_register_translators(register):
    register(Early)


@hookimpl
def carehub_register_channels(register):
    from acme_sdk_not_installed.channel import AcmeSdkChannel  # an optional dependency

    register(AcmeSdkChannel)
"""

BROKEN_COMMANDS_PLUGIN = """
import click

from carehub import hookimpl


@click.command("half-made")
def half_made():
    pass


@hookimpl
def carehub_register_commands(register):
    register(half_made)
    raise RuntimeError("no report template")
"""


def test_a_registration_hook_that_raises_skips_its_plugin_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = """
        routes:
          - name: r
            steps:
              - translate: lower-control-id
              - forward: {channel: file, directory: out}
    """
    config = project(
        tmp_path / "config",
        routes,
        {
            "lazy": LAZY_IMPORT_PLUGIN,
            "reports": BROKEN_COMMANDS_PLUGIN,
            "lowercase": TRANSLATOR_PLUGIN,
        },
    )
    folder = config.parent / "plugins"

    host = PluginHost().load(plugins_dir=folder)

    assert host.failures == [
        LoadFailure(
            "lazy",
            f"file {folder / 'lazy.py'}",
            "carehub_register_channels raised ModuleNotFoundError: No module named "
            "'acme_sdk_not_installed'",
        ),
        LoadFailure(
            "reports",
            f"file {folder / 'reports.py'}",
            "carehub_register_commands raised RuntimeError: no report template",
        ),
    ]
    assert "lazy" not in host.plugins and "early" not in host.translators
    assert "half-made" not in [c.name for c in host.commands]
    assert "lower-control-id" in host.translators  # the others still load
    with pytest.raises(PluginError, match="plugin 'lazy': carehub_register_channels raised"):
        PluginHost().load(plugins_dir=folder, strict=True)

    result = cli("routes", "check", "--offline", "--config", config, "--data-dir", tmp_path)
    assert result.exit_code == 1, result.output
    assert result.stderr == "failed: 2 plugin(s) did not load: lazy, reports\n"
    assert "Traceback" not in result.output

    monkeypatch.setenv(ENV_PLUGINS_DIR, str(folder))
    helped = cli("--help")
    assert helped.exit_code == 0 and "Traceback" not in helped.output
    listed = cli("plugins")
    assert listed.exit_code == 1  # a plugin failed to load
    assert (
        f"lazy (file {folder / 'lazy.py'}): FAILED TO LOAD: carehub_register_channels raised "
        "ModuleNotFoundError"
    ) in listed.stdout


# -- 21: Options that would let a misspelt key through -------------------------------------------
PLAIN_OPTIONS_PLUGIN = """
from pydantic import BaseModel, ConfigDict

from carehub import hookimpl
from carehub.components import ComponentOptions, Enricher


class Tagger(Enricher):
    name = "tagger"

    class Options(BaseModel):
        tag: str = "default"

    def enrich(self, work):
        return self.options.tag


class Lenient(Enricher):
    name = "lenient"

    class Options(ComponentOptions):
        model_config = ConfigDict(extra="ignore")

    def enrich(self, work):
        return None


@hookimpl
def carehub_register_enrichers(register):
    register(Tagger)
"""


def test_options_that_are_not_component_options_fail_the_plugin_at_registration(
    tmp_path: Path,
) -> None:
    lenient = PLAIN_OPTIONS_PLUGIN.replace("register(Tagger)", "register(Lenient)")
    folder = plugins_dir(
        tmp_path / "plugins",
        plainopts=PLAIN_OPTIONS_PLUGIN,
        lenient=lenient,
        lowercase=TRANSLATOR_PLUGIN,
    )

    host = PluginHost().load(plugins_dir=folder)

    assert host.failures == [
        LoadFailure(
            "lenient",
            f"file {folder / 'lenient.py'}",
            "plugin 'lenient': enricher 'lenient' (Lenient.Options) lets unknown keys through "
            "(model_config extra='ignore'), so a misspelt option key in a route would be "
            "ignored; keep ComponentOptions' extra='forbid'",
        ),
        LoadFailure(
            "plainopts",
            f"file {folder / 'plainopts.py'}",
            "plugin 'plainopts': enricher 'tagger' (Tagger.Options) is not a "
            "carehub.components.ComponentOptions subclass, so a misspelt option key in a route "
            "would be ignored; subclass ComponentOptions",
        ),
    ]
    assert "tagger" not in host.enrichers and "lower-control-id" in host.translators


# -- 22: plugin names: built-ins' are reserved, and each is used once ----------------------------
def test_an_entry_point_named_like_a_builtin_or_another_plugin_is_refused_by_the_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    (site / "acme_broken-1.0.dist-info").mkdir(parents=True)
    (site / "acme_broken-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: acme-broken\nVersion: 1.0\n", encoding="utf-8"
    )
    (site / "acme_broken-1.0.dist-info" / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nbuiltin.channels = acme_broken_ok\nlowercase = acme_broken_ok\n",
        encoding="utf-8",
    )
    (site / "acme_broken_ok.py").write_text(TRANSLATOR_PLUGIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(
        plugins,
        "installed_entry_points",
        lambda: [
            e
            for e in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
            if e.dist is not None and e.dist.name == "acme-broken"
        ],
    )
    folder = plugins_dir(tmp_path / "plugins", lowercase=TRANSLATOR_PLUGIN)

    host = PluginHost().load(plugins_dir=folder)

    assert host.failures == [
        LoadFailure(
            "builtin.channels",
            "entry point of acme-broken 1.0",
            "the plugin name 'builtin.channels' is reserved: names starting 'builtin.' belong "
            "to carehub's built-ins; rename the entry point in the distribution acme-broken",
        ),
        LoadFailure(
            "lowercase",
            f"file {folder / 'lowercase.py'}",
            "the plugin name 'lowercase' is already used by the plugin from entry point; "
            f"rename the file {folder / 'lowercase.py'}",
        ),
    ]
    assert host.plugins["builtin.channels"].source == "builtin"  # the built-in is untouched
    assert host.plugins["lowercase"].source == "entry point"
    monkeypatch.setenv(ENV_PLUGINS_DIR, str(folder))
    output = cli("plugins").output
    failed = "builtin.channels (entry point of acme-broken 1.0): FAILED TO LOAD: the plugin name"
    assert failed in output
    assert "Plugin name already registered" not in output
