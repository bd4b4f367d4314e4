"""What a plugin author meets when following the plugin guide: an ``async def`` hook and a
hook argument the hook does not pass are refused at load with the plugin's own file and line
on one log line; a failure inside an installed library is pointed at the plugin's line that
called it; an entry point's load error names its distribution; a reload after an upgrade of
an installed plugin says that only a restart runs the new version; deliveries a channel skips
reach the ``carehub_message_skipped`` observers; the dry-run helpers leave no temporary
folder behind; and ``carehub.testing.HTTPReceiver`` is a real HTTP destination for tests."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from carehub import hookimpl, plugins
from carehub.components import Channel
from carehub.plugins import ENV_PLUGINS_DIR, PluginError, PluginHost
from carehub.store.outbox import DeliveryRecord
from carehub.testing import (
    HTTPReceiver,
    HubThread,
    ReceivedRequest,
    bind_channel,
    local_config,
    make_adt,
    mllp_exchange,
    run_routes,
    run_routes_all,
)
from tests.helpers_http import CarehubProcess, wait_for
from tests.test_plugin_authoring import cli, project
from tests.test_plugin_faults_loading import install
from tests.test_plugins import TRANSLATOR_PLUGIN, hub_config, plugins_dir
from tests.test_skipped_deliveries import SKIPPING_PLUGIN

DOCS = Path(__file__).resolve().parents[1] / "docs"

#: An observer and a registration hook written as coroutines, which carehub never awaits.
ASYNC_HOOKS_PLUGIN = """
from carehub import hookimpl


@hookimpl
async def carehub_message_delivered(delivery):
    pass


@hookimpl
async def carehub_register_channels(register):
    pass
"""

#: carehub_message_failed passes delivery, error and final: ``record`` is a mistake.
WRONG_ARGUMENT_PLUGIN = """
from carehub import hookimpl


@hookimpl
def carehub_message_failed(record, final):
    pass
"""

#: A plugin whose import fails inside an installed library (PyYAML) it calls on line 4.
LIBRARY_FAILURE_PLUGIN = """
import yaml

SETTINGS = yaml.safe_load("pager: [unclosed")
"""


@pytest.fixture(autouse=True)
def no_plugins_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (plugins.ENV_ALLOW, plugins.ENV_BLOCK, ENV_PLUGINS_DIR):
        monkeypatch.delenv(name, raising=False)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]


# -- hook implementations that could never work ------------------------------------------------
def test_async_hook_implementations_are_refused_at_load_naming_the_plugin_and_the_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = plugins_dir(
        tmp_path / "plugins", asynchook=ASYNC_HOOKS_PLUGIN, lowercase=TRANSLATOR_PLUGIN
    )
    with caplog.at_level(logging.ERROR, logger="carehub.plugins"):
        host = PluginHost().load(plugins_dir=folder)

    (failure,) = host.failures
    assert failure.name == "asynchook"
    assert failure.error.startswith(
        "plugin 'asynchook': carehub_message_delivered must not be 'async def': carehub calls "
        "hooks without awaiting them, so its body would never run"
    )
    assert failure.at == f"{folder / 'asynchook.py'}:5"
    assert "asynchook" not in host.plugins and "lowercase" in host.plugins
    assert not host.observed("carehub_message_delivered")  # nothing left to never await
    assert any(
        "plugin 'asynchook'" in m and "failed to load and is skipped" in m
        for m in errors_logged(caplog)
    )
    with pytest.raises(PluginError, match=r"carehub_message_delivered must not be 'async def'"):
        PluginHost().load(plugins_dir=folder, strict=True)

    class AsyncObserver:
        @hookimpl
        async def carehub_message_skipped(self, delivery: DeliveryRecord) -> None:
            pass

    embedded = PluginHost().load()
    with pytest.raises(PluginError, match=r"carehub_message_skipped must not be 'async def'"):
        embedded.add_plugin(AsyncObserver(), "recorder")
    assert not embedded.observed("carehub_message_skipped")

    monkeypatch.setenv(ENV_PLUGINS_DIR, str(folder))
    listed = cli("plugins")
    assert listed.exit_code == 1, listed.output  # a plugin failed to load
    assert (
        f"asynchook (file {folder / 'asynchook.py'}): FAILED TO LOAD: plugin 'asynchook': "
        "carehub_message_delivered must not be 'async def'"
    ) in listed.stdout


def test_a_hook_argument_the_hook_does_not_pass_is_one_line_at_the_plugins_own_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = plugins_dir(tmp_path / "plugins", wrongarg=WRONG_ARGUMENT_PLUGIN)
    with caplog.at_level(logging.ERROR, logger="carehub.plugins"):
        host = PluginHost().load(plugins_dir=folder)

    (failure,) = host.failures
    assert failure.at == f"{folder / 'wrongarg.py'}:5"
    assert failure.error == (
        "plugin 'wrongarg': carehub_message_failed(record, final) declares 'record', which the "
        "hook does not pass (its arguments: delivery, error, final)"
    )
    (logged,) = errors_logged(caplog)
    assert "\n" not in logged
    assert logged.endswith(f"(at {folder / 'wrongarg.py'}:5)")
    assert "pluggy" not in logged


def test_a_failure_inside_an_installed_library_points_at_the_plugins_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PyYAML raises from its own files in site-packages; the line to fix is the plugin's."""
    folder = plugins_dir(tmp_path / "plugins", settings=LIBRARY_FAILURE_PLUGIN)
    host = PluginHost().load(plugins_dir=folder)
    (failure,) = host.failures
    assert failure.error.startswith("ParserError: ")
    assert failure.at == f"{folder / 'settings.py'}:4"


def test_an_installed_plugins_own_frames_are_kept_among_the_installed_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry point's package lives among the installed packages whose frames are skipped
    (here its folder is counted as one of them): its own lines still count, and its load
    error names the distribution that provides it."""
    site = tmp_path / "site"
    install(site, monkeypatch, "acme = acme_plugin.settings\n", settings=LIBRARY_FAILURE_PLUGIN)
    monkeypatch.setattr(plugins, "_NOT_THE_PLUGINS", (*plugins._NOT_THE_PLUGINS, str(site)))
    with caplog.at_level(logging.ERROR, logger="carehub.plugins"):
        host = PluginHost().load()

    (failure,) = host.failures
    assert failure.source == "entry point of acme 1.0"
    assert failure.at == f"{site / 'acme_plugin' / 'settings.py'}:4"
    (logged,) = errors_logged(caplog)
    assert logged.startswith(
        "plugin 'acme' (entry point of acme 1.0) failed to load and is skipped: ParserError: "
    )
    assert "\n" not in logged


# -- an installed plugin upgraded under a running hub -------------------------------------------
def write_distribution(site: Path, version: str) -> None:
    """The distribution 'acme' at ``version`` in ``site``, as pip leaves it: one dist-info
    folder (the older one removed) and the package, whose module says its version."""
    for old in site.glob("acme-*.dist-info"):
        for file in old.iterdir():
            file.unlink()
        old.rmdir()
    info = site / f"acme-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: acme\nVersion: {version}\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text("[carehub]\nacme = acme_plugin.observe\n", "utf-8")
    (site / "acme_plugin").mkdir(exist_ok=True)
    (site / "acme_plugin" / "__init__.py").write_text("", encoding="utf-8")
    (site / "acme_plugin" / "observe.py").write_text(
        textwrap.dedent(
            f"""
            from carehub import hookimpl

            VERSION = {version!r}


            @hookimpl
            def carehub_message_routed(message, routes):
                pass
            """
        ),
        encoding="utf-8",
    )


def test_a_reload_after_an_upgrade_says_a_restart_is_needed_to_run_the_new_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    write_distribution(site, "1.0")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    config = hub_config(
        tmp_path / "config",
        "routes:\n  - name: feed\n    steps:\n      - forward: {channel: file, directory: out}\n",
    )
    config.write_text(
        "listeners:\n  mllp: [{name: adt, host: 127.0.0.1, port: 0}]\n  http: {enabled: false}\n"
        "routes: [routes/*.yaml]\n",
        encoding="utf-8",
    )
    hub_args = ["--config", str(config), "--data-dir", str(tmp_path / "data")]
    with CarehubProcess(["serve", *hub_args], tmp_path / "logs", "serve") as hub:
        hub.wait_ready()
        write_distribution(site, "2.0")  # pip install -U, under the running hub
        reload = subprocess.run(
            [sys.executable, "-m", "carehub.cli", "routes", "reload", *hub_args],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert reload.returncode == 0, reload.stdout + reload.stderr
        wait_for(lambda: "routes reloaded" in hub.stderr, what="the reload in the hub's log")
        assert hub.terminate() == 0
    warnings = [line for line in hub.stderr.splitlines() if "version 2.0 is installed" in line]
    assert len(warnings) == 1, hub.stderr
    assert "WARNING" in warnings[0]
    assert warnings[0].endswith(
        "plugin 'acme' (entry point of acme): version 2.0 is installed, but this process still "
        "runs version 1.0, imported when it started (a reload does not import installed "
        "packages again): restart carehub serve / carehub worker to run 2.0"
    )


def test_a_host_loaded_after_an_upgrade_shows_the_version_that_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    site = tmp_path / "site"
    install(site, monkeypatch, "acme = acme_plugin.observe\n", observe=TRANSLATOR_PLUGIN)
    assert PluginHost().load().plugins["acme"].version == "1.0"
    metadata = site / "acme-1.0.dist-info" / "METADATA"
    metadata.write_text(metadata.read_text("utf-8").replace("1.0", "1.1"), encoding="utf-8")
    (site / "acme-1.0.dist-info").rename(site / "acme-1.1.dist-info")

    with caplog.at_level(logging.WARNING, logger="carehub.plugins"):
        again = PluginHost().load()
    assert again.plugins["acme"].version == "1.0"  # the code this process runs
    assert any("version 1.1 is installed" in r.getMessage() for r in caplog.records)


# -- carehub_message_skipped --------------------------------------------------------------------
class DeliveryRecorder:
    """Observers that keep what they were told, by hook."""

    def __init__(self) -> None:
        self.told: list[tuple[str, DeliveryRecord]] = []

    @hookimpl
    def carehub_message_delivered(self, delivery: DeliveryRecord) -> None:
        self.told.append(("delivered", delivery))

    @hookimpl
    def carehub_message_skipped(self, delivery: DeliveryRecord) -> None:
        self.told.append(("skipped", delivery))


def test_a_skipped_delivery_reaches_the_skipped_observers_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = """
        routes:
          - name: ehr
            steps:
              - forward: {channel: skipping, name: ehr}
    """
    config = project(tmp_path / "config", routes, {"skipping": SKIPPING_PLUGIN})
    settings = local_config(
        worker=True, routes=["routes/*.yaml"], source=config, plugins_dir=Path("plugins")
    )
    hub = HubThread(settings, tmp_path / "data")
    recorder = DeliveryRecorder()
    hub.hub.host.add_plugin(recorder, "recorder")
    with hub:
        frames = [make_adt(c, patient_id="P-OBS").encode() for c in ("SKIP-1", "SEND-2")]
        assert all(b"MSA|AA|" in answer for answer in mllp_exchange(hub.mllp_address, frames))
        settled = hub.wait_for_deliveries(2, destination="ehr/ehr")
        wait_for(lambda: len(recorder.told) == 2, what="two observer calls")

    assert [d.status for d in settled] == ["skipped", "delivered"]
    (skipped,) = [d for hook, d in recorder.told if hook == "skipped"]
    (delivered,) = [d for hook, d in recorder.told if hook == "delivered"]
    assert skipped.id == settled[0].id and delivered.id == settled[1].id
    assert skipped.status == "skipped" and skipped.attempts == 1
    assert skipped.receipt == "the receiver has this visit already"
    assert delivered.status == "delivered" and delivered.receipt == "AA"

    watcher = """
        from carehub import hookimpl


        @hookimpl
        def carehub_message_skipped(delivery):
            pass
    """
    monkeypatch.setenv(ENV_PLUGINS_DIR, str(plugins_dir(tmp_path / "more", watcher=watcher)))
    listed = cli("plugins")
    assert listed.exit_code == 0, listed.output
    assert "watcher - (file" in listed.stdout
    assert "    hooks: carehub_message_skipped" in listed.stdout


def test_the_hook_lists_name_the_skipped_observer() -> None:
    guide = (DOCS / "plugins.md").read_text(encoding="utf-8")
    assert "(hooks/carehub_message_skipped.md)" in guide
    assert "_skipped" in (plugins.hookspecs.__doc__ or "")
    assert "carehub_message_skipped" in plugins._hook_names()


# -- the dry-run helpers' temporary data dirs ------------------------------------------------------
FILE_ROUTES = """
routes:
  - name: r
    steps:
      - forward: {channel: file, name: out, directory: "${CAREHUB_DATA_DIR}/out"}
"""


def test_the_helpers_without_a_data_dir_leave_no_temporary_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    config = hub_config(tmp_path / "config", FILE_ROUTES)

    (delivery,) = run_routes(make_adt("T1"), config).deliveries
    assert [len(r.deliveries) for r in run_routes_all(make_adt("T2") + make_adt("T3"), config)] == [
        1,
        1,
    ]
    assert list(temporary.iterdir()) == []

    channel = bind_channel(config, "r/out")
    (data,) = temporary.iterdir()  # the channel's data dir, while the channel is in use

    async def send(channel: Channel) -> str:
        await channel.start()
        try:
            return await channel.send(delivery.outgoing)
        finally:
            await channel.close()

    receipt = asyncio.run(send(channel))
    (written,) = (data / "out").iterdir()
    assert receipt == f"wrote {written.name}"
    del channel
    gc.collect()
    assert list(temporary.iterdir()) == []

    with pytest.raises(LookupError):
        bind_channel(config, "r/nope")
    assert list(temporary.iterdir()) == []


# -- HTTPReceiver ------------------------------------------------------------------------------
def test_the_receiver_records_requests_and_answers_as_scripted() -> None:
    with HTTPReceiver(status=202, body="queued", headers={"X-Gateway": "test"}) as receiver:
        receiver.respond(503, "busy", {"Retry-After": "7"})
        receiver.respond(400, b"bad page")
        with httpx.Client(timeout=10) as client:
            busy = client.post(receiver.url("/page?urgent=1"), json={"to": "4411"})
            bad = client.put(receiver.url("/page"), content=b"raw bytes")
            chunked = client.post(receiver.url("/stream"), content=iter([b"ab", b"cd"]))
            fetched = client.get(receiver.url("/status"))
        got = receiver.wait_for_requests(4)

    assert (busy.status_code, busy.text, busy.headers["retry-after"]) == (503, "busy", "7")
    assert (bad.status_code, bad.text) == (400, "bad page")
    assert (chunked.status_code, chunked.text, chunked.headers["x-gateway"]) == (
        202,
        "queued",
        "test",
    )
    assert fetched.status_code == 202
    assert [(r.method, r.path) for r in got] == [
        ("POST", "/page?urgent=1"),
        ("PUT", "/page"),
        ("POST", "/stream"),
        ("GET", "/status"),
    ]
    assert got[0].json() == {"to": "4411"}
    assert got[0].headers["content-type"] == "application/json"
    assert got[1].body == b"raw bytes" and got[2].body == b"abcd" and got[3].body == b""
    assert all(isinstance(r, ReceivedRequest) for r in got)


def test_the_receiver_delays_times_out_waiting_and_refuses_once_closed() -> None:
    with HTTPReceiver() as receiver:
        receiver.respond(200, delay=2.0)
        url = receiver.url("/slow")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, content=b"x", timeout=0.3)
        with pytest.raises(TimeoutError, match=r"waited 0.2 s for 2 request\(s\); 1 came"):
            receiver.wait_for_requests(2, timeout=0.2)
    port = int(url.split(":")[2].split("/")[0])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(RuntimeError, match="inside `with`"):
        receiver.url()


def test_the_plugin_guides_receiver_example_runs(tmp_path: Path) -> None:
    """The example in docs/plugins.md, run as written against the built-in webhook channel."""
    guide = (DOCS / "plugins.md").read_text(encoding="utf-8")
    section = guide[guide.index("- **An HTTP receiver**") :]
    (code,) = re.findall(r"^  ```python\n(.*?)^  ```", section, flags=re.DOTALL | re.MULTILINE)[:1]
    namespace: dict[str, Any] = {}
    exec(compile(textwrap.dedent(code), "docs/plugins.md", "exec"), namespace)
    started = time.monotonic()
    namespace["test_a_busy_receiver_is_tried_again_no_sooner_than_it_asks"](tmp_path)
    assert time.monotonic() - started < 30
