"""carehub.testing as a plugin's test suite uses it: a HubThread whose start fails leaves
nothing running, waiting for deliveries, make_adt's location, dry runs from async code, and a
pytest plugin that costs a test run nothing until its fixture is used."""

from __future__ import annotations

import asyncio
import importlib.metadata
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from carehub.builtins.channels import FileChannel
from carehub.errors import ConfigError
from carehub.hl7.view import MessageView
from carehub.testing import (
    HubThread,
    bind_channel,
    local_config,
    make_adt,
    mllp_exchange,
    run_routes,
    run_routes_async,
)
from tests.helpers_http import HTTPServer
from tests.test_plugins import hub_config, plugins_dir

#: An enricher whose roster file is missing, as a plugin's start() reports it.
MISSING_ROSTER_PLUGIN = """
from carehub import hookimpl
from carehub.components import Enricher
from carehub.errors import ConfigError


class Teams(Enricher):
    name = "on-call-team"

    async def start(self):
        raise ConfigError("nope.csv: cannot read the team roster: No such file or directory")


@hookimpl
def carehub_register_enrichers(register):
    register(Teams)
"""


def threads_left(before: set[threading.Thread], timeout: float = 10.0) -> list[str]:
    """Names of threads started since ``before`` that are still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while left := [t.name for t in set(threading.enumerate()) - before if t.is_alive()]:
        if time.monotonic() >= deadline:
            return left
        time.sleep(0.02)
    return []


def test_a_hub_thread_that_fails_to_start_leaves_nothing_running(tmp_path: Path) -> None:
    config = hub_config(
        tmp_path / "config",
        """
        routes:
          - name: r
            steps:
              - enrich: on-call-team
        """,
    )
    settings = local_config(worker=True, routes=["routes/*.yaml"], source=config)
    settings.plugins_dir = plugins_dir(tmp_path / "plugins", teams=MISSING_ROSTER_PLUGIN)
    before = set(threading.enumerate())

    hub = HubThread(settings, tmp_path / "data")
    with pytest.raises(ConfigError, match="cannot read the team roster"), hub:
        pass

    assert hub.hub.store is None  # closed, with its writer and checkpoint thread
    assert threads_left(before) == []  # the loop thread and its helper threads too


ROUTES = """
    routes:
      - name: r
        steps:
          - forward: {{channel: file, directory: out}}
          - forward:
              channel: webhook
              url: {url}
              retry: {{max_attempts: {attempts}, initial_delay: 0.05, multiplier: 1, jitter: 0}}
"""


def test_wait_for_deliveries_waits_through_retries(tmp_path: Path) -> None:
    answers = iter([503, 503])
    with HTTPServer(respond=lambda _: next(answers, 200)) as server:
        config = hub_config(tmp_path / "config", ROUTES.format(url=server.url(), attempts=5))
        settings = local_config(worker=True, routes=["routes/*.yaml"], source=config)
        with HubThread(settings, tmp_path / "data") as hub:
            mllp_exchange(hub.mllp_address, [make_adt("W1").encode()])
            deliveries = hub.wait_for_deliveries(2)

    assert [(d.destination, d.status, d.attempts) for d in deliveries] == [
        ("r/file", "delivered", 1),
        ("r/webhook", "delivered", 3),
    ]
    assert [r.status for r in server.requests] == [503, 503, 200]


def test_wait_for_deliveries_by_destination_and_its_timeout(tmp_path: Path) -> None:
    routes = ROUTES.format(url="http://127.0.0.1:9/hook", attempts=1000)  # refused, retried
    config = hub_config(tmp_path / "config", routes)
    settings = local_config(worker=True, routes=["routes/*.yaml"], source=config)
    with HubThread(settings, tmp_path / "data") as hub:
        mllp_exchange(hub.mllp_address, [make_adt("W2").encode()])
        (written,) = hub.wait_for_deliveries(destination="r/file")
        assert written.status == "delivered"

        with pytest.raises(TimeoutError) as waited:
            hub.wait_for_deliveries(2, timeout=0.5)
    assert str(waited.value).startswith("waited 0.5 s for 2 settled deliveries; the store has ")
    assert "1 delivered" in str(waited.value)
    assert "1 pending" in str(waited.value) or "1 sending" in str(waited.value)


def test_make_adt_location_is_pv1_3() -> None:
    view = MessageView(make_adt(location="4W^12^B"))
    assert (view.get("PV1-3.1"), view.get("PV1-3.2"), view.get("PV1-3.3")) == ("4W", "12", "B")
    assert MessageView(make_adt()).get("PV1-3") == "WARD^101^A"


def test_run_routes_async_works_inside_a_running_event_loop(tmp_path: Path) -> None:
    config = hub_config(
        tmp_path / "config",
        """
        routes:
          - name: events
            steps:
              - translate: v2-to-event
              - forward: {channel: file, directory: out}
        """,
    )

    async def an_async_test() -> None:
        result = await run_routes_async(make_adt("ASYNC1"), config, tmp_path / "data")
        assert result.errors == []
        assert [d.destination for d in result.deliveries] == ["events/file"]
        assert result.steps[0].output["kind"] == "admission"

    asyncio.run(an_async_test())


def test_the_pytest_plugin_imports_nothing_heavy() -> None:
    (entry,) = [e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "carehub"]
    assert entry.value == "carehub.pytest_plugin"
    heavy = ("carehub.hub", "carehub.testing", "sqlalchemy", "fastapi", "alembic")
    code = textwrap.dedent(f"""
        import sys
        import {entry.value}
        print([name for name in {heavy!r} if name in sys.modules])
    """)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_bind_channel_builds_one_destinations_channel_from_its_route(tmp_path: Path) -> None:
    config = hub_config(tmp_path / "config", ROUTES.format(url="http://127.0.0.1:9/x", attempts=1))
    channel = bind_channel(config, "r/file", tmp_path / "data")
    assert isinstance(channel, FileChannel)
    (delivery, _) = run_routes(make_adt("B1"), config, tmp_path / "data").deliveries

    async def send_once() -> str:
        await channel.start()
        try:
            return await channel.send(delivery.outgoing)
        finally:
            await channel.close()

    receipt = asyncio.run(send_once())
    (written,) = (tmp_path / "config" / "out").iterdir()
    assert receipt == f"wrote {written.name}"
    assert written.read_bytes() == make_adt("B1").encode()

    with pytest.raises(LookupError, match=r"no destination 'r/nope' .*: r/file, r/webhook\)"):
        bind_channel(config, "r/nope", tmp_path / "data")


def test_run_routes_and_bind_channel_take_the_config_path_as_a_str(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = hub_config(tmp_path / "config", ROUTES.format(url="http://127.0.0.1:9/x", attempts=1))
    monkeypatch.chdir(tmp_path)
    relative = str(config.relative_to(tmp_path))  # as a test writes it: "config/carehub.yaml"

    result = run_routes(make_adt("S1"), relative, tmp_path / "data")
    assert [d.destination for d in result.deliveries] == ["r/file", "r/webhook"]
    assert isinstance(bind_channel(str(config), "r/file", tmp_path / "data"), FileChannel)

    with pytest.raises(TypeError, match="config must be a HubConfig or the path of a carehub"):
        run_routes(make_adt("S1"), 42, tmp_path / "data")  # type: ignore[arg-type]


def test_local_config_takes_a_relative_plugins_dir_from_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in a config file, a relative plugins_dir starts from the folder of ``source``, not
    from wherever the tests run; it was read from the working folder and the hub refused to
    start, blaming a line of the config file."""
    (tmp_path / "hub" / "plugins").mkdir(parents=True)
    (tmp_path / "hub" / "plugins" / "shout.py").write_text(
        "from carehub import hookimpl\n"
        "from carehub.components import Translator\n"
        "class Shout(Translator):\n"
        "    name = 'shout'\n"
        "    def translate(self, work):\n"
        "        return work.v2.upper()\n"
        "@hookimpl\n"
        "def carehub_register_translators(register):\n"
        "    register(Shout)\n",
        encoding="utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = local_config(source=tmp_path / "hub" / "carehub.yaml", plugins_dir=Path("plugins"))
    assert config.plugins_dir == tmp_path / "hub" / "plugins"
    with HubThread(config, tmp_path / "data") as hub:
        assert "shout" in hub.hub.host.translators
