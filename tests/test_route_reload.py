"""Route reloads while the hub runs: SIGHUP / `carehub routes reload` swap in the edited
routes for new messages without closing a listener or its connections; invalid edits leave
the old routes running; `messages reprocess` warns when the files differ from the hub's."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from carehub.config import load_config
from carehub.hl7.framing import encode_frame
from carehub.hub import route_fingerprint
from carehub.lockfile import LOCK_FILE, read_note
from carehub.testing import HubThread, make_adt, read_frames
from tests.helpers_http import CarehubProcess, HTTPServer, wait_for

ROUTE = """
routes:
  - name: feed
    when: {{type: ADT}}
    steps:
      - transform: {{edits: [{{set: {{MSH-6: {facility}}}}}]}}
      - forward: {{channel: webhook, name: hook, url: "{url}", body: v2}}
"""
BROKEN = """
routes:
  - name: feed
    when: {type: ADT}
    steps:
      - forward: {channel: no-such-channel, name: hook}
"""
HUB_YAML = """
listeners:
  mllp: [{name: adt, host: 127.0.0.1, port: 0}]
  http: {enabled: false}
worker: {poll_interval: 0.05}
routes: [routes/*.yaml]
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("CAREHUB_"):
            monkeypatch.delenv(name)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


def write_route(folder: Path, facility: str, url: str) -> None:
    (folder / "routes").mkdir(parents=True, exist_ok=True)
    text = ROUTE.format(facility=facility, url=url)
    (folder / "routes" / "feed.yaml").write_text(text, encoding="utf-8")


def exchange(sock: socket.socket, text: str) -> bytes:
    """One message on an open MLLP connection; its ACK."""
    sock.sendall(encode_frame(text.encode()))
    (answer,) = read_frames(sock, 1, 10.0)
    return answer


def facility_of(request_json: dict[str, str]) -> str:
    return request_json["v2"].split("|")[5]


def carehub(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """The CLI in this environment, with ``settings`` set in it on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREHUB_")}
    env.update(settings)
    return subprocess.run(
        [sys.executable, "-m", "carehub.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def test_routes_reload_swaps_routes_under_a_running_serve(tmp_path: Path) -> None:
    config = tmp_path / "carehub.yaml"
    config.write_text(HUB_YAML, encoding="utf-8")
    data = tmp_path / "data"
    hub_args = ["--config", str(config), "--data-dir", str(data)]
    with HTTPServer() as server:
        write_route(tmp_path, "DSFAC", server.url("/v1"))
        with CarehubProcess(["serve", *hub_args], tmp_path / "logs", "serve") as hub:
            hub.wait_ready()
            assert read_note(data / LOCK_FILE).routes == route_fingerprint(load_config(config))
            with socket.create_connection(hub.mllp_address, timeout=10) as sock:
                assert b"|AA|" in exchange(sock, make_adt("RL1"))
                first = wait_for(lambda: server.ok(), what="the first delivery")
                assert [r.path for r in first] == ["/v1"]
                assert facility_of(first[0].json) == "DSFAC"

                write_route(tmp_path, "DSFAC2", server.url("/v2"))
                # Before the reload, reprocess routes with other files than the hub: it says so.
                reprocess = carehub("messages", "reprocess", "1", *hub_args)
                assert reprocess.returncode == 0, reprocess.stderr
                assert "differ from those the running hub" in reprocess.stderr
                assert "carehub routes reload" in reprocess.stderr
                wait_for(lambda: len(server.ok()) == 2, what="the reprocessed delivery")

                reload = carehub("routes", "reload", *hub_args)
                assert reload.returncode == 0, reload.stdout + reload.stderr
                assert f"sent SIGHUP to carehub serve (pid {hub.process.pid})" in reload.stdout
                assert "routes reloaded" in reload.stdout
                assert "routes reloaded: 1 route(s), 1 destination(s)" in hub.stderr

                # The connection opened before the reload goes on; the new message takes
                # the new routes.
                assert b"|AA|" in exchange(sock, make_adt("RL2"))
                wait_for(lambda: len(server.ok()) == 3, what="the delivery after the reload")
                latest = server.ok()[-1]
                assert latest.path == "/v2"
                assert facility_of(latest.json) == "DSFAC2"

                # The hub now runs what is on disk: reprocess has nothing to warn about.
                quiet = carehub("messages", "reprocess", "2", *hub_args)
                assert quiet.returncode == 0, quiet.stderr
                assert "differ" not in quiet.stderr
                wait_for(lambda: len(server.ok()) == 4, what="the second reprocessed delivery")

                # A broken edit is refused: the hub keeps the routes it runs, and says why.
                (tmp_path / "routes" / "feed.yaml").write_text(BROKEN, encoding="utf-8")
                refused = carehub("routes", "reload", *hub_args)
                assert refused.returncode == 1, refused.stdout + refused.stderr
                assert "runs on the old ones" in refused.stderr
                errors = [line for line in hub.stderr.splitlines() if " ERROR " in line]
                assert len(errors) == 1, hub.stderr
                assert "routes not reloaded, still running the previous ones" in errors[0]
                assert "feed.yaml:" in errors[0] and "no-such-channel" in errors[0]
                assert b"|AA|" in exchange(sock, make_adt("RL3"))
                wait_for(lambda: len(server.ok()) == 5, what="the delivery after the refusal")
                assert server.ok()[-1].path == "/v2"
                assert facility_of(server.ok()[-1].json) == "DSFAC2"
                # And reprocess warns again: the files are not what the hub runs.
                warned = carehub("messages", "reprocess", "--dry-run", "3", *hub_args)
                assert "differ from those the running hub" in warned.stderr
            assert hub.terminate() == 0, hub.stderr
        assert "RL1" not in hub.stderr and "RL2" not in hub.stderr  # no identifiers logged


def test_reprocess_warns_when_a_variable_the_routes_name_differs_from_the_hubs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same route files with ${SINK_URL} set otherwise send elsewhere: reprocess says
    the hub routes differently, and is quiet when the value is the hub's."""
    config = tmp_path / "carehub.yaml"
    config.write_text(HUB_YAML, encoding="utf-8")
    data = tmp_path / "data"
    hub_args = ["--config", str(config), "--data-dir", str(data)]
    with HTTPServer() as server:
        write_route(tmp_path, "DSFAC", "${SINK_URL}")
        monkeypatch.setenv("SINK_URL", server.url("/hub"))
        with CarehubProcess(["serve", *hub_args], tmp_path / "logs", "serve") as hub:
            hub.wait_ready()
            with socket.create_connection(hub.mllp_address, timeout=10) as sock:
                assert b"|AA|" in exchange(sock, make_adt("ENV1"))
            wait_for(lambda: server.ok(), what="the delivery")
            other = carehub(
                "messages", "reprocess", "--dry-run", "1", *hub_args, SINK_URL=server.url("/cli")
            )
            assert other.returncode == 0, other.stderr
            assert "environment variables they name" in other.stderr
            assert "differ from those the running hub" in other.stderr
            assert server.url("/cli") not in other.stderr  # no values: they may be secrets
            same = carehub("messages", "reprocess", "--dry-run", "1", *hub_args)
            assert same.returncode == 0, same.stderr
            assert "differ" not in same.stderr
            assert hub.terminate() == 0, hub.stderr


def test_routes_reload_says_when_no_hub_serves_there(tmp_path: Path) -> None:
    result = carehub("routes", "reload", "--data-dir", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert "no carehub serve is running from it" in result.stderr


def test_reload_lets_a_send_in_flight_finish_on_the_old_routes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A send under way when the routes are swapped finishes (delivered) on the old channel,
    closed only after it; the next message goes out under the new route."""
    caplog.set_level(logging.INFO, logger="carehub.hub")
    with HTTPServer(delay=lambda r: 1.5 if r.path == "/v1" else 0.0) as server:
        write_route(tmp_path, "DSFAC", server.url("/v1"))
        (tmp_path / "carehub.yaml").write_text(HUB_YAML, encoding="utf-8")
        config = load_config(tmp_path / "carehub.yaml")
        with HubThread(config, tmp_path / "data") as hub:
            with socket.create_connection(hub.mllp_address, timeout=10) as sock:
                assert b"|AA|" in exchange(sock, make_adt("FLY1"))
                wait_for(lambda: server.in_flight == 1, what="the first send to be under way")
                old = hub.hub.table
                write_route(tmp_path, "DSFAC2", server.url("/v2"))
                assert hub.call(hub.hub.reload_routes()) is True
                assert "routes reloaded: 1 route(s), 1 destination(s)" in caplog.text
                assert hub.hub.table is not old and hub.hub.worker is not None
                assert hub.hub.worker.table is hub.hub.table
                assert b"|AA|" in exchange(sock, make_adt("FLY2"))
                done = hub.wait_for_deliveries(2)
            assert [d.status for d in done] == ["delivered", "delivered"]
            assert sorted(r.path for r in server.ok()) == ["/v1", "/v2"]
            by_path = {r.path: facility_of(r.json) for r in server.ok()}
            assert by_path == {"/v1": "DSFAC", "/v2": "DSFAC2"}

            # Listener settings are not reloaded: the log line says they wait for a restart.
            edited = HUB_YAML.replace("port: 0", "port: 0, idle_timeout: 5")
            (tmp_path / "carehub.yaml").write_text(edited, encoding="utf-8")
            caplog.clear()
            assert hub.call(hub.hub.reload_routes()) is True
            assert "take effect at the next restart" in caplog.text

            # A broken edit: False, one ERROR line, the same table goes on.
            current = hub.hub.table
            (tmp_path / "routes" / "feed.yaml").write_text(BROKEN, encoding="utf-8")
            caplog.clear()
            assert hub.call(hub.hub.reload_routes()) is False
            assert hub.hub.table is current
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1
            assert "feed.yaml:" in errors[0].getMessage()


def test_an_emptied_route_file_keeps_the_routes_and_a_removal_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A route file emptied (a truncated save, a bad checkout) would have dropped its routes
    with one INFO line: it is refused, and the routes run on. Routes taken out on purpose
    (`routes: []`) go, with a WARNING naming them and their destinations."""
    caplog.set_level(logging.INFO, logger="carehub.hub")
    write_route(tmp_path, "DSFAC", "http://127.0.0.1:9/hook")
    (tmp_path / "carehub.yaml").write_text(HUB_YAML, encoding="utf-8")
    route_file = tmp_path / "routes" / "feed.yaml"

    route_file.write_text("", encoding="utf-8")
    checked = carehub("routes", "check", "--offline", "--config", str(tmp_path / "carehub.yaml"))
    assert checked.returncode == 2
    assert f"{route_file}: holds no routes (no `routes:` key)" in checked.stderr

    write_route(tmp_path, "DSFAC", "http://127.0.0.1:9/hook")
    with HubThread(load_config(tmp_path / "carehub.yaml"), tmp_path / "data") as hub:
        current = hub.hub.table
        route_file.write_text("\n# being edited\n", encoding="utf-8")
        assert hub.call(hub.hub.reload_routes()) is False
        assert hub.hub.table is current
        assert "holds no routes" in caplog.text

        caplog.clear()
        route_file.write_text("routes: []\n", encoding="utf-8")
        assert hub.call(hub.hub.reload_routes()) is True
        assert hub.hub.table.routes == []
        (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.getMessage() == (
            "the reload removed route(s) feed and destination(s) feed/hook"
        )
