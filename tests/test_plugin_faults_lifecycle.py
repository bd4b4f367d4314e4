"""A plugin component whose __init__, tick() or close() raises: each is told as one line naming
the route file and line, the route, the step and the plugin, with the exception's type only
(its text can quote a message) and the traceback at DEBUG; every other component still ticks
and closes, carehub's own included. Run through the real CLI, a real `carehub serve` and a
running hub."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from carehub.cli import main
from carehub.errors import ConfigError
from carehub.plugins import ENV_ALLOW, ENV_BLOCK, ENV_PLUGINS_DIR
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange, run_routes
from tests.helpers_http import CarehubProcess, wait_for
from tests.test_plugins import plugins_dir

#: A component with a configurable bug, and a channel that notes its own ticks and close in a
#: file. The bugs' texts quote a patient's name, as a real one's could.
VENDOR_PLUGIN = """
from pathlib import Path

from carehub import hookimpl
from carehub.components import Channel, ComponentOptions, Enricher, Outgoing


class Faulty(Enricher):
    name = "faulty"

    class Options(ComponentOptions):
        fail: str = ""

    def __init__(self, options, context):
        super().__init__(options, context)
        if self.options.fail == "init":
            {}["roster"]

    def tick(self, now):
        if self.options.fail == "tick":
            raise RuntimeError("no clinic for ZEBEDEE^ALEX")

    async def close(self):
        if self.options.fail == "close":
            raise RuntimeError("cannot flush ZEBEDEE^ALEX")

    def enrich(self, work):
        return None


class Journal(Channel):
    name = "journal"

    class Options(ComponentOptions):
        notes: str
        fail: str = ""

    def __init__(self, options, context):
        super().__init__(options, context)
        if self.options.fail == "init":
            {}["gateway"]
        self.notes = context.path(self.options.notes)

    def _note(self, what):
        with self.notes.open("a", encoding="utf-8") as file:
            file.write(what + "\\n")

    def tick(self, now):
        self._note("tick")

    async def close(self):
        self._note("close")

    def render(self, work, key):
        return Outgoing(b"x", "text/plain", key)

    async def send(self, outgoing):
        return "ok"


@hookimpl
def carehub_register_enrichers(register):
    register(Faulty)


@hookimpl
def carehub_register_channels(register):
    register(Journal)
"""

#: The faulty step first: every component after it must still tick and close.
ROUTES = """\
routes:
  - name: vendor
    steps:
      - enrich: {{use: faulty, fail: {enricher}}}
      - forward: {{channel: journal, notes: journal.log, fail: {channel}}}
  - name: archive
    steps:
      - forward: {{channel: file, directory: out}}
"""


@pytest.fixture(autouse=True)
def clean_plugin_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_ALLOW, ENV_BLOCK, ENV_PLUGINS_DIR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(main, "_plugin_commands", None)


def project(folder: Path, enricher: str = "''", channel: str = "''") -> Path:
    """carehub.yaml with the vendor plugin and ROUTES (``fail`` set as given); returns it."""
    (folder / "routes").mkdir(parents=True)
    (folder / "routes" / "routes.yaml").write_text(
        ROUTES.format(enricher=enricher, channel=channel), encoding="utf-8"
    )
    plugins_dir(folder / "plugins", vendor=VENDOR_PLUGIN)
    config = folder / "carehub.yaml"
    config.write_text("routes: [routes/*.yaml]\nplugins_dir: plugins\n", encoding="utf-8")
    return config


def routes_file(config: Path) -> Path:
    return config.parent / "routes" / "routes.yaml"


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def notes(config: Path) -> list[str]:
    path = config.parent / "journal.log"
    return path.read_text(encoding="utf-8").split() if path.exists() else []


def hub_for(config: Path, tick_interval: float = 30.0) -> HubThread:
    settings = local_config(
        worker=True, routes=["routes/*.yaml"], source=config, plugins_dir="plugins"
    )
    settings.worker.tick_interval = tick_interval
    return HubThread(settings, config.parent / "data")


def debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Capture carehub's DEBUG lines; `routes check` (run in-process by other tests) sets the
    route table's own logger to ERROR, so it is set here too."""
    for logger in ("carehub", "carehub.routing.table"):
        caplog.set_level(logging.DEBUG, logger=logger)


def shown(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.INFO]


# -- tick() -----------------------------------------------------------------------------------
def test_a_tick_that_raises_is_named_and_every_other_component_still_ticks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = project(tmp_path / "config", enricher="tick")
    debug_logs(caplog)

    with hub_for(config, tick_interval=0.05):
        wait_for(lambda: notes(config).count("tick") >= 5, 20, 0.02, "the journal's ticks")

    where = f"{routes_file(config)}:4: route 'vendor': steps[0] (enrich faulty, plugin 'vendor')"
    failures = [r for r in shown(caplog) if "tick()" in r.getMessage()]
    # Once, however many ticks failed: a run of failures, told again at most once a minute.
    assert [(r.levelno, r.getMessage()) for r in failures] == [
        (logging.ERROR, f"{where}: tick() failed (RuntimeError): tried again at the next tick")
    ]
    assert not any("ZEBEDEE" in r.getMessage() or r.exc_info for r in shown(caplog))
    traced = [r for r in caplog.records if r.exc_info and "tick() raised" in r.getMessage()]
    assert traced and all(r.levelno == logging.DEBUG for r in traced)
    assert isinstance(traced[0].exc_info[1], RuntimeError)


def test_serve_keeps_ticking_past_a_failing_tick(tmp_path: Path) -> None:
    config = project(tmp_path / "config", enricher="tick")
    config.write_text(config.read_text() + "worker: {tick_interval: 0.1}\n", encoding="utf-8")
    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]
    with CarehubProcess([*args, "--mllp-port", "0", "--http-port", "0"], tmp_path, "serve") as s:
        s.wait_ready()
        wait_for(lambda: notes(config).count("tick") >= 3, 30, 0.05, "the journal's ticks")
        assert s.terminate() == 0
        stderr = s.stderr
    assert "steps[0] (enrich faulty, plugin 'vendor'): tick() failed (RuntimeError)" in stderr
    assert "ZEBEDEE" not in stderr and "Traceback" not in stderr
    assert notes(config)[-1] == "close"


# -- close() ----------------------------------------------------------------------------------
def test_a_close_that_raises_is_named_and_every_other_component_still_closes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = project(tmp_path / "config", enricher="close")
    debug_logs(caplog)
    with hub_for(config) as hub:
        mllp_exchange(hub.mllp_address, [make_adt("CLOSE1").encode()])
        hub.wait_for_deliveries(2)

    assert notes(config) == ["close"]  # the journal after the faulty step closed all the same
    where = f"{routes_file(config)}:4: route 'vendor': steps[0] (enrich faulty, plugin 'vendor')"
    errors = [r.getMessage() for r in shown(caplog) if r.levelno >= logging.ERROR]
    assert errors == [f"{where}: close() failed (RuntimeError)"]
    assert not any("ZEBEDEE" in r.getMessage() or r.exc_info for r in shown(caplog))
    (traced,) = [r for r in caplog.records if r.exc_info]
    assert traced.levelno == logging.DEBUG and isinstance(traced.exc_info[1], RuntimeError)


def test_routes_check_survives_a_close_that_raises(tmp_path: Path) -> None:
    config = project(tmp_path / "config", enricher="close")
    args = ["routes", "check", "--offline", "--config", str(config)]
    with CarehubProcess([*args, "--data-dir", str(tmp_path / "data")], tmp_path, "check") as run:
        assert run.process.wait(60) == 0
        stdout, stderr = run.stdout, run.stderr
    assert "Traceback" not in stderr and "ZEBEDEE" not in stderr
    assert "steps[0] (enrich faulty, plugin 'vendor'): close() failed (RuntimeError)" in stderr
    assert stdout.splitlines()[-1] == "ok: 2 route(s), 2 destination(s)"
    assert notes(config) == ["close"]


# -- __init__ ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("enricher", "channel", "line", "step", "error"),
    [
        ("init", "''", 4, "steps[0] (enrich faulty, plugin 'vendor')", "KeyError: 'roster'"),
        (
            "''",
            "init",
            5,
            "steps[1] (forward journal vendor/journal, plugin 'vendor')",
            "KeyError: 'gateway'",
        ),
    ],
)
def test_a_bug_in_init_is_one_error_line_naming_file_route_step_and_plugin(
    tmp_path: Path, enricher: str, channel: str, line: int, step: str, error: str
) -> None:
    config = project(tmp_path / "config", enricher=enricher, channel=channel)
    message = tmp_path / "admit.hl7"
    message.write_text(make_adt(), encoding="utf-8")
    expected = f"{routes_file(config)}:{line}: route 'vendor': {step} failed in __init__: {error}"

    for args in (["routes", "check", "--offline"], ["routes", "test", message]):
        result = cli(*args, "--config", config, "--data-dir", tmp_path / "data")
        assert result.exit_code == 2, result.output
        assert result.stderr == f"error: {expected}\n"
        assert "Traceback" not in result.output

    with pytest.raises(ConfigError) as raised:
        run_routes(make_adt(), config, tmp_path / "data")
    assert str(raised.value) == expected
    assert isinstance(raised.value.__cause__, KeyError)  # the original, for debuggers


def test_serve_names_a_failing_init_and_logs_its_traceback_at_debug(tmp_path: Path) -> None:
    config = project(tmp_path / "config", enricher="init")
    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]
    args += ["--mllp-port", "0", "--http-port", "0"]

    with CarehubProcess([*args, "--log-level", "DEBUG"], tmp_path / "logs", "debug") as serve:
        assert serve.process.wait(60) == 2
        stderr = serve.stderr
    assert stderr.splitlines()[-1] == (
        f"error: {routes_file(config)}:4: route 'vendor': steps[0] (enrich faulty, plugin "
        "'vendor') failed in __init__: KeyError: 'roster'"
    )
    assert re.search(r'vendor\.py", line \d+, in __init__', stderr)

    with CarehubProcess([*args, "--log-level", "INFO"], tmp_path / "logs", "info") as serve:
        assert serve.process.wait(60) == 2
        assert "Traceback" not in serve.stderr
