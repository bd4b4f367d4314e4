"""`carehub status`: intake by listener, the routing backlog and the outbox by destination, read
from the store of a real hub that took real MLLP messages and delivered to real HTTP servers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from carehub.cli import main
from carehub.store.processes import release_name
from carehub.store.store import MessageStore
from carehub.testing import HubThread, make_adt, mllp_exchange
from tests import test_store
from tests.helpers_http import HTTPServer, wait_for
from tests.test_cli import env_without_carehub, plain
from tests.test_routing_e2e import FAST_RETRY, routed_config

store_url = test_store.store_url
store = test_store.store

ROUTES = """
routes:
  - name: events
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: good, url: {good}, retry: {fast_two}}}
      - forward: {{channel: webhook, name: down, url: {down}, retry: {fast_two}}}
      - forward: {{channel: webhook, name: flaky, url: {flaky}, retry: {slow_many}}}
"""
#: Retries far enough apart that the flaky destination is still waiting when status is read.
SLOW_MANY = "{max_attempts: 20, initial_delay: 600, multiplier: 1, max_delay: 600, jitter: 0}"


@pytest.fixture
def servers() -> Iterator[dict[str, HTTPServer]]:
    with (
        HTTPServer() as good,
        HTTPServer(lambda _: 503) as down,
        HTTPServer(lambda _: 502) as flaky,
    ):
        yield {"good": good, "down": down, "flaky": flaky}


def status_json(data_dir: Path, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(
        main, ["status", "--data-dir", str(data_dir), "--json", *args], env=env_without_carehub()
    )
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.output)
    return report


def by_destination(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["destination"]: item for item in report["destinations"]}


def test_status_counts_intake_backlog_and_each_destination(
    tmp_path: Path, servers: dict[str, HTTPServer], store_url: str
) -> None:
    config = routed_config(
        tmp_path,
        ROUTES.format(
            good=servers["good"].url(),
            down=servers["down"].url(),
            flaky=servers["flaky"].url(),
            fast_two=FAST_RETRY % 2,
            slow_many=SLOW_MANY,
        ),
    )
    config.store.url = store_url
    data_dir = tmp_path / "data"
    adts = [make_adt(f"ST-{n}", patient_id=f"P{n}").encode() for n in range(3)]
    no_control_id = make_adt("").encode()  # AE: stored, content refused
    not_hl7 = b"this is not an HL7 message"  # AR
    with HubThread(config, data_dir) as hub:
        mllp_exchange(hub.mllp_address, [*adts, no_control_id, not_hl7, adts[0], adts[1]])
        wait_for(
            lambda: len(servers["down"].requests) == 6 and len(servers["flaky"].requests) == 3,
            what="the down destination tried twice a message and the flaky one once",
        )
        store_config = tmp_path / "status.yaml"
        store_config.write_text(json.dumps({"store": {"url": store_url}}), encoding="utf-8")

        def with_three_dead_letters() -> dict[str, Any] | None:
            report = status_json(data_dir, "--config", str(store_config))
            return report if report["dead_letters"] == 3 else None

        report = wait_for(with_three_dead_letters, what="three dead letters")

    assert report["window_seconds"] == 3600
    (intake,) = report["intake"]
    assert (intake["transport"], intake["listener"]) == ("mllp", "test")
    assert (intake["accepted"], intake["refused"], intake["rejected"]) == (3, 1, 1)
    assert intake["resent"] == 2  # answered AA again, stored once
    assert report["received"] == 5
    # Routed, not finished: the flaky destination still waits to try again.
    assert report["by_status"] == {"routed": 3, "refused": 1, "rejected": 1}
    assert report["routing_backlog"] == 0 and report["oldest_unrouted"] is None

    destinations = by_destination(report)
    assert set(destinations) == {"events/good", "events/down", "events/flaky"}
    good, down, flaky = (destinations[f"events/{name}"] for name in ("good", "down", "flaky"))
    assert (good["delivered"], good["waiting"], good["dead"]) == (3, 0, 0)
    assert (down["delivered"], down["waiting"], down["dead"]) == (0, 0, 3)
    assert "HTTP 503" in down["last_error"]  # nothing retrying: the newest dead letter's error
    assert good["last_error"] is None
    assert (flaky["delivered"], flaky["waiting"], flaky["retrying"]) == (0, 3, 3)
    assert "HTTP 502" in flaky["last_error"]
    assert flaky["oldest_waiting"] is not None
    assert report["dead_letters"] == 3


def test_the_terminal_view_names_what_needs_a_look(
    tmp_path: Path, servers: dict[str, HTTPServer]
) -> None:
    config = routed_config(
        tmp_path,
        ROUTES.format(
            good=servers["good"].url(),
            down=servers["down"].url(),
            flaky=servers["flaky"].url(),
            fast_two=FAST_RETRY % 2,
            slow_many=SLOW_MANY,
        ),
    )
    data_dir = tmp_path / "data"
    with HubThread(config, data_dir) as hub:
        mllp_exchange(hub.mllp_address, [make_adt("TV-1").encode()])
        wait_for(
            lambda: len(servers["down"].requests) == 2 and len(servers["flaky"].requests) == 1,
            what="both failing destinations tried",
        )
        wait_for(lambda: status_json(data_dir)["dead_letters"] == 1, what="one dead letter")
    result = CliRunner().invoke(
        main,
        ["status", "--data-dir", str(data_dir)],
        env=env_without_carehub(),
    )
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    assert "Intake, last 1h" in text
    assert "mllp:test" in text
    assert "Waiting to be routed: none" in text
    assert "events/flaky" in text and "HTTP 502" in text
    assert "1 dead letter(s): see `carehub dead-letters list`" in text
    assert "TV-1" not in text  # counts and names only: no control ids, no message content


def test_the_window_counts_recent_intake_and_the_backlog_counts_every_unrouted_message(
    store: MessageStore, tmp_path: Path
) -> None:
    from carehub.status import read_status

    now = datetime.now(UTC)
    old = test_store.new_message("OLD-1", received_at=now - timedelta(hours=5))
    recent = [test_store.new_message(f"NEW-{n}") for n in range(2)]
    store.insert_messages([old, *recent])

    report = read_status(store, timedelta(hours=1), now=now + timedelta(seconds=1))
    assert [item.total for item in report.intake] == [2]
    assert report.by_status == {"received": 2}
    assert report.routing_backlog == 3  # the old one waits too, whatever the window
    assert report.oldest_unrouted is not None
    assert abs((report.oldest_unrouted - old.received_at).total_seconds()) < 1

    wider = read_status(store, timedelta(hours=6), now=now + timedelta(seconds=1))
    assert [item.total for item in wider.intake] == [3]


def test_bad_options_are_usage_errors_naming_the_option(tmp_path: Path) -> None:
    runner = CliRunner()
    env = env_without_carehub()
    for args, expected in (
        (["--window", "2x"], "use an age such as 90s, 30m, 2h or 7d"),
        (["--window", "0h"], "must be more than nothing"),
        (["--window", "99999999999999999999d"], "at most 36500d"),
        (["--watch", "0"], "--watch"),
    ):
        result = runner.invoke(main, ["status", "--data-dir", str(tmp_path), *args], env=env)
        assert result.exit_code == 2, (args, result.output)
        assert expected in plain(result.output), (args, result.output)
    missing = runner.invoke(main, ["status", "--data-dir", str(tmp_path / "none")], env=env)
    assert missing.exit_code != 0 and "no store there" in missing.output


def test_watch_with_json_prints_a_line_each_time(tmp_path: Path, store: MessageStore) -> None:
    """`status --watch N --json` feeds a monitor a JSON line every N seconds until stopped."""
    store.insert_messages([test_store.new_message("W-1")])
    config = tmp_path / "watched.yaml"
    config.write_text(json.dumps({"store": {"url": store.url}}), encoding="utf-8")
    command = [str(Path(sys.executable).with_name("carehub")), "status", "--config", str(config)]
    process = subprocess.Popen(
        [*command, "--data-dir", str(tmp_path), "--json", "--watch", "0.5"],
        stdout=subprocess.PIPE,
        text=True,
        env=env_without_carehub(),
    )
    try:
        assert process.stdout is not None
        lines = [json.loads(process.stdout.readline()) for _ in range(3)]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)
    assert process.returncode == 0
    assert [line["received"] for line in lines] == [1, 1, 1]
    assert lines[0]["now"] < lines[1]["now"] < lines[2]["now"]


def test_status_lists_the_processes_and_names_a_silent_one_and_mixed_routes(
    tmp_path: Path,
) -> None:
    """The running hub has a row with its route set while it runs and none once stopped; a
    worker that stopped answering (its row left stale, as after a SIGKILL) is marked, and
    answering processes with different route sets are pointed out."""
    from sqlalchemy import insert

    from carehub.hub import route_set_digest
    from carehub.store.schema import hub_processes

    config = routed_config(tmp_path, "routes: []\n")
    data_dir = tmp_path / "data"
    now = datetime.now(UTC)

    def worker_row(pid: int, seen: datetime, routes: str, version: str = "") -> dict[str, Any]:
        return {
            "id": f"worker-{pid}",
            "role": "worker",
            "host": "host-b",
            "pid": pid,
            "version": version or release_name(),
            "started_at": now - timedelta(hours=1),
            "last_seen": seen,
            "routes": routes,
            "routes_loaded_at": now - timedelta(hours=1),
        }

    with HubThread(config, data_dir) as hub:
        (serve,) = status_json(data_dir)["processes"]
        assert (serve["role"], serve["answering"]) == ("serve", True)
        assert serve["routes"] == route_set_digest(config)
        with hub.store.engine.begin() as conn:
            conn.execute(
                insert(hub_processes),
                [
                    worker_row(4001, now - timedelta(minutes=10), serve["routes"]),
                    worker_row(4002, now, "0123456789ab"),
                ],
            )
        report = status_json(data_dir)
        answering = {p["pid"]: p["answering"] for p in report["processes"]}
        assert answering == {serve["pid"]: True, 4001: False, 4002: True}
        assert report["route_sets"] == 2
        result = CliRunner().invoke(
            main, ["status", "--data-dir", str(data_dir)], env=env_without_carehub()
        )
        text = plain(result.output)
        assert "not answering" in text
        assert "the running processes use 2 different route sets" in text
        # During an upgrade the releases may digest the same route files otherwise: the
        # advice is to finish the upgrade, not to reload.
        with hub.store.engine.begin() as conn:
            conn.execute(insert(hub_processes), [worker_row(4003, now, "fedcba987654", "0.1.0")])
        result = CliRunner().invoke(
            main, ["status", "--data-dir", str(data_dir)], env=env_without_carehub()
        )
        text = plain(result.output)
        assert f"run 2 carehub releases (0.1.0, {release_name()}): finish the upgrade" in text
        assert "reload the ones behind" not in text
    left = {p["pid"] for p in status_json(data_dir)["processes"]}
    assert left == {4001, 4002, 4003}  # the hub removed its own row as it stopped
