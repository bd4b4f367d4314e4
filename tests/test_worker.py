"""The routing worker and the routing CLI on a real hub: per-patient order across partitions,
`messages reprocess`, `dead-letters list/retry`, `routes check`, `routes test --json` and
`plugins`. Real sockets and a real uvicorn receiver; the CLI runs in-process (CliRunner)
against the same store the running hub uses."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from carehub import worker as worker_module
from carehub.builtins import channels as channels_module
from carehub.cli import main
from carehub.config import HubConfig, load_config
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.hub import SERVING_LOCK_TIMEOUT
from carehub.store.outbox import Handover, Outbox
from carehub.store.processes import ProcessBeacon
from carehub.store.schema import MessageStatus
from carehub.store.store import MessageStore, NewMessage
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange
from carehub.worker import Worker
from tests.helpers_http import HTTPServer, wait_for
from tests.test_cli import free_port
from tests.test_plugin_authoring import project

FAST_RETRY = "{max_attempts: %d, initial_delay: 0.05, multiplier: 1, max_delay: 0.05, jitter: 0}"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CAREHUB_* settings from the shell; commands run in a scratch folder."""
    for name in list(os.environ):
        if name.startswith("CAREHUB_"):
            monkeypatch.delenv(name)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


@pytest.fixture
def http() -> Iterator[HTTPServer]:
    with HTTPServer() as server:
        yield server


def write_config(
    tmp_path: Path, routes: str, partitions: int = 8, worker: str = "poll_interval: 0.05"
) -> Path:
    """A hub config file in tmp_path (MLLP on a free port, fast worker) and its routes.yaml."""
    (tmp_path / "routes.yaml").write_text(routes, encoding="utf-8")
    path = tmp_path / "carehub.yaml"
    path.write_text(
        f"""
listeners:
  mllp: [{{name: test, host: 127.0.0.1, port: 0}}]
  http: {{enabled: false}}
queue: {{partitions: {partitions}}}
worker: {{{worker}}}
routes: [routes.yaml]
""",
        encoding="utf-8",
    )
    return path


def hook_routes(url: str, max_attempts: int = 3) -> str:
    return f"""
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - translate: v2-to-event
      - forward: {{channel: webhook, name: hook, url: {url}, retry: {FAST_RETRY % max_attempts}}}
"""


def cli(config: Path, data_dir: Path, *args: str) -> Result:
    """Run a carehub command with --config and --data-dir after its own arguments."""
    full = [*args, "--config", str(config), "--data-dir", str(data_dir)]
    return CliRunner().invoke(main, full, catch_exceptions=False)


def plain(text: str) -> str:
    return ANSI.sub("", text)


def send(hub: HubThread, texts: list[str]) -> None:
    answers = mllp_exchange(hub.mllp_address, [t.encode() for t in texts])
    assert all(b"MSA|AA|" in a for a in answers)


def statuses(store: MessageStore) -> dict[str, str]:
    return {m.control_id or "": m.status for m in store.find(limit=None)}


def all_status(store: MessageStore, count: int, status: str) -> bool:
    found = statuses(store)
    return len(found) == count and set(found.values()) == {status}


# -- order per patient ------------------------------------------------------------------------
def test_per_patient_order_across_partitions(tmp_path: Path, http: HTTPServer) -> None:
    rng = random.Random(7)
    # Each request is held 0-15 ms, so sends that were not kept in order would overtake.
    http.delay = lambda _: rng.uniform(0, 0.015)
    config = load_config(write_config(tmp_path, hook_routes(http.url()), partitions=4))
    patients = [f"PT{p:02d}" for p in range(10)]
    sent: dict[str, list[str]] = {p: [] for p in patients}
    texts = []
    for i in range(200):
        patient = patients[i % 10] if i % 3 else rng.choice(patients)
        control_id = f"ORD-{i:03d}"
        sent[patient].append(control_id)
        texts.append(make_adt(control_id, "A08", patient_id=patient))
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, texts)
        wait_for(lambda: all_status(hub.store, 200, "delivered"), 30, what="200 deliveries")
    arrived: dict[str, list[str]] = {p: [] for p in patients}
    for request in http.requests:
        body = request.json
        arrived[body["event"]["patient"]["primary"]["value"]].append(body["control_id"])
    assert len(http.requests) == 200
    for patient in patients:
        assert arrived[patient] == sent[patient], patient
    # The test means something only if patients really were sent side by side.
    assert http.max_in_flight > 1


def test_per_destination_limit_holds_for_a_webhook_not_for_a_local_folder(
    tmp_path: Path, http: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    http.delay = 0.05
    batches: list[int] = []
    write_files = channels_module._write_files

    def recording(directory: Path, files: list[tuple[str, bytes]], fsync: bool) -> Any:
        batches.append(len(files))
        return write_files(directory, files, fsync)

    monkeypatch.setattr(channels_module, "_write_files", recording)
    routes = f"""
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: hook, url: {http.url()}}}
      - forward: {{channel: file, name: folder, directory: {tmp_path / "out"}}}
"""
    path = write_config(tmp_path, routes, worker="poll_interval: 0.05, per_destination: 3")
    config = load_config(path)
    assert config.worker.per_destination == 3
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, [make_adt(f"LIM{i:02d}", patient_id=f"PL{i:02d}") for i in range(30)])
        wait_for(lambda: all_status(hub.store, 30, "delivered"), 30, what="30 deliveries")
    assert len(http.requests) == 30
    assert 1 < http.max_in_flight <= 3
    assert sum(batches) == 30
    assert max(batches) > 3


def test_a_write_lock_held_by_another_process_delays_the_worker_and_loses_nothing(
    tmp_path: Path, http: HTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The embedded worker calls SQLite on the hub's loop with a short lock timeout: while a
    CLI command (here a plain connection) holds the write lock, recording results fails, is
    logged and retried, and every delivery is recorded once the lock is let go."""
    http.delay = 0.3  # sends are in flight when the lock is taken
    config = load_config(write_config(tmp_path, hook_routes(http.url())))
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, [make_adt(f"LOCK{i}", patient_id=f"PK{i}") for i in range(6)])
        wait_for(lambda: len(http.requests) >= 1, 10, what="a send in flight")
        other = sqlite3.connect(tmp_path / "data" / "carehub.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # what a CLI write holds while it runs
        time.sleep(2 * SERVING_LOCK_TIMEOUT + 0.5)
        other.execute("ROLLBACK")
        other.close()
        wait_for(lambda: all_status(hub.store, 6, "delivered"), 30, what="6 deliveries")
        assert hub.hub.worker is not None  # still running
    assert len({r.headers["idempotency-key"] for r in http.requests}) == 6
    # One run of failures, as the worker meets them in every loop: when it began, when over.
    assert "the worker's use of the store failed (OperationalError: database is locked)" in (
        caplog.text
    )
    assert "the worker's use of the store works again after" in caplog.text


# -- reprocess --------------------------------------------------------------------------------
def test_reprocess_creates_run_2_deliveries_that_the_worker_sends(
    tmp_path: Path, http: HTTPServer
) -> None:
    config_path = write_config(tmp_path, hook_routes(http.url()))
    data_dir = tmp_path / "data"
    with HubThread(load_config(config_path), data_dir) as hub:
        send(hub, [make_adt("REP-1", patient_id="P1"), make_adt("REP-2", patient_id="P2")])
        wait_for(lambda: all_status(hub.store, 2, "delivered"), what="first run delivered")
        (message,) = [m for m in hub.store.find(limit=None) if m.control_id == "REP-1"]
        (first,) = Outbox(hub.store).find(message_id=message.id)

        result = cli(config_path, data_dir, "messages", "reprocess", str(message.id))
        assert result.exit_code == 0, result.output
        assert f"message {message.id} (run 2): care; 1 deliveries queued" in result.output

        wait_for(lambda: len(http.ok()) == 3, what="the run 2 delivery to arrive")
        wait_for(lambda: statuses(hub.store)["REP-1"] == "delivered", what="REP-1 delivered")
        deliveries = Outbox(hub.store).find(message_id=message.id)
        assert [(d.run, d.status) for d in deliveries] == [(1, "delivered"), (2, "delivered")]
        second = deliveries[1]
        assert second.idempotency_key != first.idempotency_key
        assert second.idempotency_key.startswith(f"carehub-{message.id}-2-")
        last = http.requests[-1]
        assert last.key == second.idempotency_key
        assert last.json["control_id"] == "REP-1"
        runs = [(s.run, s.step, s.outcome) for s in Outbox(hub.store).steps(message.id)]
        assert runs == [
            (1, "translate v2-to-event", "ok"),
            (1, "forward webhook care/hook", "ok"),
            (2, "translate v2-to-event", "ok"),
            (2, "forward webhook care/hook", "ok"),
        ]
        # Nothing else was sent again.
        assert sorted(r.json["control_id"] for r in http.requests) == ["REP-1", "REP-1", "REP-2"]

        missing = CliRunner().invoke(
            main,
            [
                "messages",
                "reprocess",
                "999999",
                "--config",
                str(config_path),
                "--data-dir",
                str(data_dir),
            ],
        )
        assert missing.exit_code == 2 and "no message with id 999999" in missing.output


# -- dead letters -----------------------------------------------------------------------------
def test_dead_letters_list_and_retry_all(tmp_path: Path, http: HTTPServer) -> None:
    http.respond = lambda _: 400
    config_path = write_config(tmp_path, hook_routes(http.url()))
    data_dir = tmp_path / "data"
    with HubThread(load_config(config_path), data_dir) as hub:
        send(hub, [make_adt("DL-1", patient_id="P1"), make_adt("DL-2", patient_id="P2")])
        wait_for(lambda: all_status(hub.store, 2, "failed"), what="two dead letters")

        listed = cli(config_path, data_dir, "dead-letters", "list", "--json")
        assert listed.exit_code == 0, listed.output
        rows = [json.loads(line) for line in listed.output.splitlines()]
        assert len(rows) == 2
        for row in rows:
            assert row["destination"] == "care/hook" and row["channel"] == "webhook"
            assert row["attempts"] == 1
            assert "HTTP 400" in row["last_error"]
        assert {r["id"] for r in rows} == {d.id for d in Outbox(hub.store).find(status="dead")}
        table = cli(config_path, data_dir, "dead-letters", "list")
        assert table.exit_code == 0 and "care/hook" in plain(table.output)

        unknown = cli(config_path, data_dir, "dead-letters", "retry", "999999")
        assert unknown.exit_code == 1 and "0 dead letter(s) queued again" in unknown.output
        assert "delivery 999999: no such delivery" in unknown.output
        assert cli(config_path, data_dir, "dead-letters", "retry").exit_code == 2  # ids or --all

        http.respond = lambda _: 200
        retried = cli(config_path, data_dir, "dead-letters", "retry", "--all")
        assert retried.exit_code == 0, retried.output
        assert "2 dead letter(s) queued again" in retried.output
        wait_for(lambda: all_status(hub.store, 2, "delivered"), what="retried deliveries")
        assert [r.status for r in http.requests].count(200) == 2
        after = cli(config_path, data_dir, "dead-letters", "list", "--json")
        assert after.exit_code == 0 and after.output.strip() == ""


# -- routes check -----------------------------------------------------------------------------
GOOD_ROUTE = """routes:
  - name: archive
    when: {type: ADT}
    steps:
      - forward: {channel: file, directory: out}
"""

BROKEN_ROUTES = {
    "unknown forward option": (
        GOOD_ROUTE
        + """  - name: typo-forward
    when: {type: ADT}
    steps:
      - translate: v2-to-event
      - forward:
          channel: webhook
          url: http://127.0.0.1:9/hook
          retries: 3
""",
        "retries: 3",
        "typo-forward",
        "steps[1].forward.retries",
    ),
    "unknown translator": (
        GOOD_ROUTE
        + """  - name: bad-translator
    when: {type: ADT}
    steps:
      - forward: {channel: file, name: copy, directory: out}
      - translate: v2-to-fhir
""",
        "translate: v2-to-fhir",
        "bad-translator",
        "no translator named 'v2-to-fhir'",
    ),
    "bad field path in when.fields": (
        GOOD_ROUTE
        + """  - name: bad-path
    when:
      type: ADT
      fields:
        PV1-2: I
        PIDX-3: P1
    steps:
      - forward: {channel: file, name: copy, directory: out}
""",
        "PIDX-3: P1",
        "bad-path",
        "when.fields.PIDX-3",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_ROUTES))
def test_routes_check_names_file_line_route_and_key(tmp_path: Path, case: str) -> None:
    routes, bad_line, route, key = BROKEN_ROUTES[case]
    config_path = write_config(tmp_path, routes)
    line = routes.splitlines().index(next(x for x in routes.splitlines() if bad_line in x)) + 1
    result = cli(config_path, tmp_path / "data", "routes", "check")
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'routes.yaml'}:{line}: route {route!r}: " in result.output
    assert key in result.output
    assert "Traceback" not in result.output


def test_routes_check_accepts_good_routes(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, GOOD_ROUTE)
    result = cli(config_path, tmp_path / "data", "routes", "check")
    assert result.exit_code == 0, result.output
    assert "route archive" in result.output and "forward file archive/file" in result.output
    assert "ok: 1 route(s), 1 destination(s)" in result.output


def test_routes_check_loads_what_serve_loads_at_start(tmp_path: Path) -> None:
    """`routes check` fails where `serve` would: a file a step reads at start (here the care
    team's roster) that does not exist is named, not reported "ok"."""
    config_path = write_config(
        tmp_path,
        """
routes:
  - name: care
    when: {type: ADT}
    steps:
      - translate: v2-to-event
      - enrich: {use: care-team, roster: care/missing-roster.csv}
      - forward: {channel: file, name: copy, directory: out}
""",
    )
    result = cli(config_path, tmp_path / "data", "routes", "check")
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'care' / 'missing-roster.csv'}: cannot read" in result.output
    assert "ok:" not in result.output and "Traceback" not in result.output


def test_routes_check_names_a_routes_file_that_does_not_exist(tmp_path: Path) -> None:
    """A routes file named outright (not a glob) that is not there is an error naming the
    config line: a misspelt name used to drop its routes and report "ok: 0 route(s)"."""
    config_path = write_config(tmp_path, GOOD_ROUTE)
    text = config_path.read_text(encoding="utf-8").replace("[routes.yaml]", "[route.yaml]")
    config_path.write_text(text, encoding="utf-8")
    line = text.splitlines().index("routes: [route.yaml]") + 1
    result = cli(config_path, tmp_path / "data", "routes", "check")
    assert result.exit_code == 2, result.output
    assert f"{config_path}:{line}: routes[0]: no routes file {tmp_path / 'route.yaml'}" in (
        result.output
    )


def hub_config(tmp_path: Path, **sections: str) -> Path:
    """write_config's hub config (GOOD_ROUTE) with its queue: line replaced by ``sections``,
    each a top-level key with its block of YAML (queue, store)."""
    path = write_config(tmp_path, GOOD_ROUTE)
    text = path.read_text(encoding="utf-8").replace("queue: {partitions: 8}\n", "")
    text += "".join(f"{key}:\n{body}" for key, body in sections.items())
    path.write_text(text, encoding="utf-8")
    return path


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_routes_check_names_a_broker_that_cannot_be_reached(tmp_path: Path) -> None:
    """`serve` stops before "ready" when queue.url names a broker nothing answers at, and so
    does `routes check`: exit 2 naming the setting by file and line, the password hidden, and
    no "ok" line. The routes are still listed, and no store is created."""
    url = f"amqp://carehub:s3cret@127.0.0.1:{free_port()}//"
    config_path = hub_config(tmp_path, queue=f"  url: {url}\n")
    result = cli(config_path, tmp_path / "data", "routes", "check")
    assert result.exit_code == 2, result.output
    where = f"{config_path}:{line_of(config_path, 'url: amqp')}: queue.url"
    assert f"error: {where}: cannot reach the broker at amqp://carehub:***@127.0.0.1:" in (
        result.stderr
    )
    assert "route archive" in result.stdout and "ok:" not in result.output
    assert "s3cret" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "data").exists()


def test_routes_check_names_the_store_and_the_broker_in_one_run(tmp_path: Path) -> None:
    """A store.url nothing answers at is named as `serve` names it, and the broker as well:
    one run shows every setting to fix."""
    store_url = f"postgresql+psycopg://carehub:s3cret@127.0.0.1:{free_port()}/test"
    queue_url = f"amqp://carehub:s3cret@127.0.0.1:{free_port()}//"
    config_path = hub_config(tmp_path, store=f"  url: {store_url}\n", queue=f"  url: {queue_url}\n")
    result = cli(config_path, tmp_path / "data", "routes", "check")
    assert result.exit_code == 2, result.output
    store_line, queue_line = line_of(config_path, "postgresql"), line_of(config_path, "amqp")
    assert (
        f"error: {config_path}:{store_line}: store.url: cannot open the store at "
        "postgresql+psycopg://carehub:***@127.0.0.1:"
    ) in result.stderr
    assert f"error: {config_path}:{queue_line}: queue.url: cannot reach the broker" in (
        result.stderr
    )
    assert "s3cret" not in result.output and "ok:" not in result.output

    offline = cli(config_path, tmp_path / "data", "routes", "check", "--offline")
    assert offline.exit_code == 0, offline.output  # a CI job without the database or broker
    assert "ok: 1 route(s)" in offline.stdout
    assert "store:" not in offline.output and "queue:" not in offline.output


def _data_dir_under_a_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path / "a-file" / "data", f"Not a directory: {tmp_path / 'a-file'}"


def _not_a_database(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "carehub.db").write_bytes(b"not a database " * 100)
    return tmp_path / "data", "file is not a database"


def _newer_schema(tmp_path: Path) -> tuple[Path, str]:
    data = tmp_path / "data"
    assert CliRunner().invoke(main, ["store", "upgrade", "--data-dir", str(data)]).exit_code == 0
    with sqlite3.connect(data / "carehub.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    conn.close()
    return data, "its schema is at revision '9999', which this carehub version cannot migrate"


@pytest.mark.parametrize("case", [_data_dir_under_a_file, _not_a_database, _newer_schema])
def test_routes_check_names_a_store_serve_could_not_open(
    tmp_path: Path, case: Callable[[Path], tuple[Path, str]]
) -> None:
    """`routes check` fails, naming the data dir, where `serve` fails to open the store, and
    leaves the files as they were (no -wal or -shm beside a SQLite store, nothing migrated)."""
    data, reason = case(tmp_path)
    config_path = write_config(tmp_path, GOOD_ROUTE)
    before = sorted(p.name for p in data.iterdir()) if data.is_dir() else None
    stored = (data / "carehub.db").read_bytes() if before else None
    result = cli(config_path, data, "routes", "check")
    assert result.exit_code == 2, result.output
    assert f"error: data dir {data}: cannot open the store there: {reason}" in result.stderr
    assert "queue: memory://" in result.stdout and "ok:" not in result.output
    assert (sorted(p.name for p in data.iterdir()) if data.is_dir() else None) == before
    assert ((data / "carehub.db").read_bytes() if before else None) == stored
    served = cli(config_path, data, "serve", "--mllp-port", "0", "--http-port", "0")
    assert served.exit_code == 2 and f"data dir {data}: cannot" in served.stderr


def test_routes_check_reads_the_store_without_creating_or_changing_it(tmp_path: Path) -> None:
    """A store that is not there yet passes (serve creates it) and is not made by the check;
    one that is there shows its schema revision, with nothing left beside it."""
    config_path = write_config(tmp_path, GOOD_ROUTE)
    data = tmp_path / "nested" / "data"
    result = cli(config_path, data, "routes", "check")
    assert result.exit_code == 0, result.output
    assert f"store: {data / 'carehub.db'} (none yet; serve creates it)" in result.stdout
    assert "queue: memory:// (in-process)" in result.stdout
    assert not (tmp_path / "nested").exists()

    upgraded = CliRunner().invoke(main, ["store", "upgrade", "--data-dir", str(data)])
    revision = upgraded.output.split()[-1]
    result = cli(config_path, data, "routes", "check")
    assert result.exit_code == 0, result.output
    assert f"store: {data / 'carehub.db'} (schema {revision})" in result.stdout
    assert [p.name for p in data.iterdir()] == ["carehub.db"]


# -- routes test ------------------------------------------------------------------------------
def test_routes_test_json_shows_matches_steps_and_payloads(tmp_path: Path) -> None:
    config_path = write_config(
        tmp_path,
        """
routes:
  - name: admits
    when: {type: ADT, events: [A01]}
    steps:
      - translate: v2-to-event
      - forward: {channel: webhook, name: hook, url: "http://127.0.0.1:9/hook"}
      - forward: {channel: file, name: archive, directory: out, body: v2}
  - name: discharges
    when: {events: A03}
    steps:
      - forward: {channel: file, name: files, directory: out}
""",
    )
    message = tmp_path / "admit.hl7"
    text = make_adt("DRY-1", "A01", patient_id="P9")
    message.write_bytes(text.encode())
    result = cli(config_path, tmp_path / "data", "routes", "test", str(message), "--json")
    assert result.exit_code == 0, result.output
    (document,) = [json.loads(line) for line in result.output.splitlines() if line.strip()]
    assert document["file"] == str(message)
    assert document["matched"] == ["admits"]
    routes = {r["route"]: r for r in document["routes"]}
    assert routes["discharges"]["matched"] is False
    (check,) = routes["discharges"]["checks"]
    assert check["value"] == "A01" and check["passed"] is False
    admits = routes["admits"]
    assert [(s["step"], s["outcome"]) for s in admits["steps"]] == [
        ("translate v2-to-event", "ok"),
        ("forward webhook admits/hook", "ok"),
        ("forward file admits/archive", "ok"),
    ]
    assert admits["steps"][0]["output"]["kind"] == "admission"
    hook, archive = admits["deliveries"]
    assert hook["destination"] == "admits/hook" and hook["channel"] == "webhook"
    body = json.loads(hook["payload"])
    assert body["event"]["kind"] == "admission"
    assert body["idempotency_key"] == hook["idempotency_key"]
    assert archive["payload"] == text  # the v2 text exactly as the file would hold it
    assert archive["metadata"] == {"filename": f"{archive['idempotency_key']}.hl7"}
    assert admits["error"] is None
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# -- plugins ----------------------------------------------------------------------------------
def test_plugins_lists_the_builtin_channels() -> None:
    result = CliRunner().invoke(main, ["plugins"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("builtin.channels "))
    block = []
    for line in lines[start + 1 :]:
        if not line.startswith("    "):
            break
        block.append(line.strip().partition(":")[0])  # "channel file: description"
    assert {"channel file", "channel mllp", "channel webhook"} <= set(block)
    as_json = CliRunner().invoke(main, ["plugins", "--json"], catch_exceptions=False)
    rows = {row["name"]: row for row in map(json.loads, as_json.output.splitlines())}
    assert "channel webhook" in rows["builtin.channels"]["components"]
    assert rows["builtin.channels"]["source"] == "builtin"


# -- a send() whose receipt is not text --------------------------------------------------------
#: A channel that notes each send in a ledger file and answers with a dict, not a str receipt.
DICT_RECEIPT_PLUGIN = """
from carehub import hookimpl
from carehub.components import Channel, ComponentOptions, Outgoing


class Ledger(Channel):
    name = "ledger"

    class Options(ComponentOptions):
        path: str

    def render(self, work, key):
        return Outgoing(work.view.get("MSH-10").encode(), "text/plain", key)

    async def send(self, outgoing):
        with open(self.context.path(self.options.path), "a", encoding="utf-8") as ledger:
            ledger.write(outgoing.idempotency_key + "\\n")
        return {"ledger_id": 17}


@hookimpl
def carehub_register_channels(register):
    register(Ledger)
"""


def ledger_hub(tmp_path: Path, url: str) -> HubConfig:
    """A hub whose admissions go to the ledger channel and every ADT to a webhook."""
    routes = f"""
        routes:
          - name: ledger
            when: {{type: ADT, events: [A01]}}
            steps:
              - forward: {{channel: ledger, path: ledger.txt}}
          - name: care
            when: {{type: ADT}}
            steps:
              - forward: {{channel: webhook, name: hook, url: {url}, retry: {FAST_RETRY % 3}}}
    """
    config = project(tmp_path / "config", routes, {"ledger": DICT_RECEIPT_PLUGIN})
    hub_config = local_config(worker=True, routes=["routes/*.yaml"], source=config)
    hub_config.plugins_dir = config.parent / "plugins"
    return hub_config


def test_a_receipt_that_is_not_text_is_recorded_delivered_and_holds_up_nobody(
    tmp_path: Path, http: HTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = ledger_hub(tmp_path, http.url())
    ledger = tmp_path / "config" / "ledger.txt"
    caplog.set_level(logging.INFO, logger="carehub.worker")
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, [make_adt("D1", patient_id="PD1"), make_adt("D2", "A04", patient_id="PD2")])
        found = hub.wait_for_deliveries(3, timeout=20)
    by_destination = {d.destination: d for d in found if d.message_id == 1}
    assert [d.status for d in found] == ["delivered"] * 3
    assert by_destination["ledger/ledger"].receipt == "{'ledger_id': 17}"
    assert len(http.requests) == 2  # the other destination's deliveries went out meanwhile

    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.getMessage() == (
        "channel 'ledger' (plugin 'ledger') of ledger/ledger returned a dict from send(), not "
        "a str receipt; recorded as delivered with its text (said once per destination and type)"
    )

    # Recorded as delivered, so a restart sends nothing again.
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, [make_adt("D3", "A04", patient_id="PD3")])
        assert len(hub.wait_for_deliveries(4, timeout=20)) == 4
    assert len(ledger.read_text(encoding="utf-8").splitlines()) == 1


def test_a_result_the_store_cannot_take_does_not_hold_up_the_others(
    tmp_path: Path,
    http: HTTPServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Recording results is robust by itself, whatever reaches it: with the receipt passed on
    as send() returned it, the store refuses that one result, and the rest of its batch is
    recorded one at a time (the refused one as its text)."""
    monkeypatch.setattr(Worker, "_receipt_text", lambda self, receipt, *_: receipt, raising=False)
    config = ledger_hub(tmp_path, http.url())
    with HubThread(config, tmp_path / "data") as hub:
        send(hub, [make_adt(f"R{i}", patient_id=f"PR{i}") for i in range(3)])
        found = hub.wait_for_deliveries(6, timeout=20)
        assert hub.hub.worker is not None and not hub.hub.worker._results
    assert [d.status for d in found] == ["delivered"] * 6
    assert {d.receipt for d in found if d.destination == "ledger/ledger"} == {"{'ledger_id': 17}"}
    assert len(http.requests) == 3
    assert "recording them one at a time" in caplog.text


def test_a_patients_stranded_message_goes_before_the_later_one(
    tmp_path: Path, http: HTTPServer
) -> None:
    """A message stored and ACKed but never queued (the hub was killed between its commit and
    the publish, or a worker could not route it) came back only with the once-a-minute sweep,
    after its patient's later messages had gone out: an A03 after the next A01. The worker
    routing a patient's message routes that patient's earlier waiting ones first."""
    config = load_config(write_config(tmp_path, hook_routes(http.url())))
    with HubThread(config, tmp_path / "data") as hub:
        stranded = make_adt("ST-1", "A03", patient_id="P9")
        header = MessageHeader.read(MessageView(stranded))
        hub.store.insert_messages(
            [
                NewMessage(
                    stranded.encode(), "mllp", "test", None, MessageStatus.RECEIVED, "AA", header
                )
            ]
        )  # in the store, never published to the queue
        send(hub, [make_adt("ST-2", "A01", patient_id="P9"), make_adt("ST-3", patient_id="Q")])
        wait_for(lambda: len(http.ok()) == 3, 20, what="all three sent")
    assert [r.json["control_id"] for r in http.ok() if r.json["control_id"] != "ST-3"] == [
        "ST-1",
        "ST-2",
    ]


def test_a_destination_a_reload_has_not_brought_yet_is_left_to_the_workers_that_have_it(
    tmp_path: Path,
    http: HTTPServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One SIGHUP at a time: while processes run different route sets, a worker whose routes
    lack a destination (added by a reload that has not reached it) leaves its deliveries in
    line, where it made them dead letters "no longer configured" that an operator had to
    retry. Once every process runs the same routes, one still lacking it is dead-lettered."""
    monkeypatch.setattr(worker_module, "ROUTE_SETS_CHECK", 0.1)
    routes = hook_routes(http.url()) + (
        f"      - forward: {{channel: webhook, name: added, url: {http.url('/added')}}}\n"
    )
    config_path = write_config(tmp_path, routes, worker="poll_interval: 0.05, lease_seconds: 1.5")
    with HubThread(load_config(config_path), tmp_path / "data") as hub:
        outbox = Outbox(hub.store)
        outbox.pause_destination("care/added", "webhook", by="test")
        send(hub, [make_adt("RL-1", patient_id="P1")])
        wait_for(lambda: len(http.ok()) == 1, what="care/hook sent")
        write_config(tmp_path, hook_routes(http.url()), worker="poll_interval: 0.05")
        assert hub.call(hub.hub.reload_routes()) is True  # this hub: without care/added
        other = ProcessBeacon(hub.store, "worker", lambda: "0123456789ab")  # not reloaded
        hub.call(other.start(every=3600))
        try:
            outbox.resume_destination("care/added")
            wait_for(
                lambda: "destination care/added is not in this worker's routes" in caplog.text,
                what="the delivery left to the other worker",
            )
            time.sleep(1.0)
            (added,) = outbox.find(destination="care/added")
            assert added.status == "pending" and added.attempts == 0
        finally:
            hub.call(other.stop())
        wait_for(
            lambda: outbox.find(destination="care/added")[0].status == "dead",
            what="a dead letter once every process runs the same routes",
        )
        (dead,) = outbox.find(destination="care/added")
        assert "is no longer configured" in (dead.last_error or "")
    assert [r.path for r in http.requests] == ["/hook"]


@pytest.mark.parametrize("authority", ["HOSP", ""])
def test_a_merge_routes_the_retired_identifiers_waiting_message_first(
    tmp_path: Path, http: HTTPServer, authority: str
) -> None:
    """A duplicate registration's admission (under the identifier an A40 then retires) waits
    in another partition's queue: the merge and the discharge under the surviving identifier
    must not overtake it, or the visit is discharged before it is admitted and the admission
    is never told. The worker routing the merge routes the retired identifier's earlier
    waiting messages first."""
    config = load_config(write_config(tmp_path, hook_routes(http.url())))
    with HubThread(config, tmp_path / "data") as hub:
        admit = make_adt(
            "MG-1", "A01", patient_id="P-DUP", authority=authority, visit_number="V-MG"
        )
        header = MessageHeader.read(MessageView(admit))
        hub.store.insert_messages(
            [NewMessage(admit.encode(), "mllp", "test", None, MessageStatus.RECEIVED, "AA", header)]
        )  # in the store, never published to the queue
        merge = make_adt(
            "MG-2",
            "A40",
            patient_id="P-KEEP",
            authority=authority,
            extra_segments=[f"MRG|P-OTHER~P-DUP^^^{authority}^MR"],
        )
        discharge = make_adt(
            "MG-3", "A03", patient_id="P-KEEP", authority=authority, visit_number="V-MG"
        )
        send(hub, [merge, discharge])
        wait_for(lambda: len(http.ok()) == 3, 20, what="all three sent")
    assert [r.json["control_id"] for r in http.ok()] == ["MG-1", "MG-2", "MG-3"]


def test_a_batch_is_routed_in_arrival_order_whatever_queue_order_it_came_in(
    tmp_path: Path, http: HTTPServer
) -> None:
    """A batch gathers several partitions' queues one after another; the duplicate
    registration's admission and the merge that retires its identifier sit in two of them, the
    merge's first: routed as they came off the queues, the admission was routed after the
    merge had moved the visit on, and nobody heard of it."""
    config = load_config(write_config(tmp_path, hook_routes(http.url()), worker="enabled: false"))
    with HubThread(config, tmp_path / "data") as hub:
        admit = make_adt("BO-1", "A01", patient_id="P-DUP", visit_number="V-BO")
        merge = make_adt("BO-2", "A40", patient_id="P-KEEP", extra_segments=["MRG|P-DUP^^^HOSP^MR"])
        send(hub, [admit, merge])
        ids = sorted(m.id for m in hub.store.find(limit=None))
        worker = Worker(hub.store, hub.hub.table, hub.hub.host, hub.hub.work_queue)
        worker._route_batch(list(reversed(ids)), Handover(room=0, lease=timedelta(seconds=30)))
        routed = [d.message_id for d in Outbox(hub.store).find(limit=None)]
    assert routed == ids
