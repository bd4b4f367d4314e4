"""Working a running hub: retention that keeps unfinished work, what a message's deliveries
sent, two hubs in one process, one serving hub per data dir, and per-destination metrics.

Real hubs, real sockets, real stores and `carehub` as a real process where it matters."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

from carehub.cli import main
from carehub.components import Outgoing
from carehub.config import HubConfig, StoreConfig
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.hub import open_store
from carehub.lockfile import LOCK_FILE, StoreInUse
from carehub.routing.router import PlannedDelivery
from carehub.store.outbox import Outbox
from carehub.store.schema import MessageStatus
from carehub.store.store import MessageStore, NewMessage
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange
from tests.helpers_http import CarehubProcess, HTTPServer, wait_for

FAST_RETRY = "{max_attempts: %d, initial_delay: 0.05, multiplier: 1, max_delay: 0.05, jitter: 0}"
SLOW_RETRY = "{max_attempts: 1000, initial_delay: 60, multiplier: 1, max_delay: 60, jitter: 0}"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CAREHUB_* settings from the developer's shell, and a scratch working folder."""
    for name in list(os.environ):
        if name.startswith("CAREHUB_"):
            monkeypatch.delenv(name)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def routed_config(tmp_path: Path, routes: str, *, worker: bool = True) -> HubConfig:
    """local_config with ``routes`` as routes.yaml in tmp_path (relative paths resolve there)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "routes.yaml").write_text(routes, encoding="utf-8")
    config = local_config(worker=worker)
    config.source = tmp_path / "carehub.yaml"
    config.routes = ["routes.yaml"]
    config.worker.poll_interval = 0.05
    return config


def send(address: tuple[str, int], *texts: str) -> None:
    answers = mllp_exchange(address, [t.encode("utf-8") for t in texts])
    assert all(b"|AA|" in answer for answer in answers), answers


def stored(control_id: str, *, at: datetime) -> NewMessage:
    """An accepted message as intake stores it, received ``at``."""
    text = make_adt(control_id)
    return NewMessage(
        raw=text.encode(),
        transport="mllp",
        listener="ops",
        peer="127.0.0.1:5000",
        status=MessageStatus.RECEIVED,
        ack_code="AA",
        header=MessageHeader.read(MessageView(text)),
        charset="utf-8",
        received_at=at,
    )


def add_delivery(store: MessageStore, message_id: int, key: str, status: str) -> None:
    outgoing = Outgoing(b"{}", "application/json", key)
    planned = PlannedDelivery("care", "care/hook", "webhook", outgoing, "HOSP|P1", 3)
    assert Outbox(store).schedule(planned, message_id)
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE deliveries SET status = ? WHERE idempotency_key = ?", (status, key)
        )


# -- 4: store prune keeps unfinished work, dry-runs and asks ---------------------------------
@pytest.fixture
def prune_dir(tmp_path: Path) -> Path:
    """Messages 40 days old: 2 finished (delivered, matched no route), 1 not routed yet, 1 with
    a delivery waiting, 1 with a dead letter; and 1 finished message from an hour ago."""
    folder = tmp_path / "prune"
    old = datetime.now(UTC) - timedelta(days=40)
    store = open_store(HubConfig(), folder)
    try:
        hour_ago = datetime.now(UTC) - timedelta(hours=1)
        outcomes = store.insert_messages(
            [stored(f"OLD{i}", at=old) for i in ("DONE", "NOROUTE", "NEW", "WAIT", "DEAD")]
            + [stored("HOUR", at=hour_ago)]
        )
        done, noroute, _, wait, dead, hour = (o.message_id for o in outcomes)
        store.set_status(done, MessageStatus.DELIVERED)
        store.set_status(noroute, MessageStatus.UNROUTED)
        store.set_status(wait, MessageStatus.ROUTED)
        store.set_status(dead, MessageStatus.FAILED)
        store.set_status(hour, MessageStatus.DELIVERED)
        add_delivery(store, done, "k-done", "delivered")
        add_delivery(store, wait, "k-wait", "pending")
        add_delivery(store, dead, "k-dead", "dead")
    finally:
        store.close()
    return folder


def control_ids(folder: Path) -> list[str]:
    store = open_store(HubConfig(), folder, must_exist=True)
    try:
        return sorted(m.control_id or "" for m in store.find(limit=None))
    finally:
        store.close()


def test_prune_keeps_unfinished_messages_and_says_why(prune_dir: Path) -> None:
    result = run("store", "prune", "--older-than", "30", "--data-dir", str(prune_dir))

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("pruned 2 message(s) older than 30 day(s); store file ")
    assert lines[1] == (
        "kept 3 older message(s) with work left: 1 not routed yet, 1 with deliveries waiting "
        "or being sent, 1 with dead letters (--include-unfinished deletes them too)"
    )
    assert control_ids(prune_dir) == ["HOUR", "OLDDEAD", "OLDNEW", "OLDWAIT"]
    dead = run("dead-letters", "list", "--json", "--data-dir", str(prune_dir))
    assert [json.loads(line)["destination"] for line in dead.stdout.splitlines()] == ["care/hook"]


def test_prune_dry_run_counts_and_changes_nothing(prune_dir: Path) -> None:
    result = run("store", "prune", "--older-than", "30", "--dry-run", "--data-dir", str(prune_dir))

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("5 message(s) received before ")
    assert lines[0].endswith(" UTC (older than 30 day(s))")
    assert lines[1:] == [
        "  would delete 2",
        "  would keep 3 with work left: 1 not routed yet, 1 with deliveries waiting or being "
        "sent, 1 with dead letters (--include-unfinished deletes them too)",
        "care and referral records last changed before then:",
        "  would delete 0 encounter(s), 0 encounter event(s), 0 notification(s), 0 follow-up(s), "
        "0 referral(s), 0 referral event(s), 0 patient merge(s)",
        "  would keep 0 with work left: none",
        "dry run: nothing changed",
    ]
    assert len(control_ids(prune_dir)) == 6

    unfinished = run(
        "store", "prune", "--older-than", "30", "--include-unfinished", "--dry-run",
        "--data-dir", str(prune_dir),
    )  # fmt: skip
    assert unfinished.stdout.splitlines()[1] == (
        "  would delete 5, including 3 with work left: 1 not routed yet, 1 with deliveries "
        "waiting or being sent, 1 with dead letters"
    )
    assert len(control_ids(prune_dir)) == 6


def test_prune_asks_before_deleting_unfinished_work(prune_dir: Path) -> None:
    args = ["store", "prune", "--older-than", "30", "--include-unfinished"]
    refused = run(*args, "--data-dir", str(prune_dir), input="n\n")

    assert refused.exit_code == 1, refused.output
    assert "including 3 with work left" in refused.stdout
    assert "Delete 5 message(s)? [y/N]" in refused.stdout
    assert len(control_ids(prune_dir)) == 6

    confirmed = run(*args, "--yes", "--data-dir", str(prune_dir))
    assert confirmed.exit_code == 0, confirmed.output
    assert confirmed.stdout.startswith("pruned 5 message(s) older than 30 day(s)")
    assert control_ids(prune_dir) == ["HOUR"]


def test_prune_of_everything_up_to_now_asks_first(prune_dir: Path) -> None:
    """--older-than 0 reaches messages that arrived a moment ago: asked, even though what is
    unfinished stays."""
    args = ["store", "prune", "--older-than", "0", "--data-dir", str(prune_dir)]
    refused = run(*args, input="n\n")
    assert refused.exit_code == 1
    assert "  would delete 3" in refused.stdout and "Delete 3 message(s)?" in refused.stdout
    assert len(control_ids(prune_dir)) == 6

    confirmed = run(*args, input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert "pruned 3 message(s) older than 0 day(s)" in confirmed.stdout
    assert control_ids(prune_dir) == ["OLDDEAD", "OLDNEW", "OLDWAIT"]


# -- 8: what a message's deliveries sent -----------------------------------------------------
SHOW_ROUTES = """
routes:
  - name: adt
    when: {type: ADT}
    steps:
      - transform: {edits: [{set: {MSH-6: DSFAC2}}]}
      - translate: v2-to-event
      - forward: {channel: file, name: v2copy, directory: out, body: v2}
      - forward: {channel: file, name: events, directory: out, body: event}
"""
BINARY = bytes(range(256))


@pytest.fixture
def shown(tmp_path: Path) -> tuple[Path, int]:
    """A data dir holding one routed and delivered ADT (transformed on the way), plus two
    deliveries a plugin channel might have rendered: binary bytes, and text with an ESC."""
    config = routed_config(tmp_path, SHOW_ROUTES)
    with HubThread(config, tmp_path / "data") as hub:
        send(hub.mllp_address, make_adt("SHOW1", name="ÅSTRÖM^BJÖRK"))
        hub.wait_for_deliveries(2)
        (message,) = hub.store.find()
    store = open_store(config, tmp_path / "data", must_exist=True)
    try:
        for key, payload, kind in (
            ("bin", BINARY, "application/octet-stream"),
            ("esc", b"alert \x1b[2J cleared\r\nnext line", "text/plain; charset=utf-8"),
        ):
            planned = PlannedDelivery(
                "adt", f"adt/{key}", "plugin", Outgoing(payload, kind, f"k-{key}"), "H|P", 3
            )
            assert Outbox(store).schedule(planned, message.id)
    finally:
        store.close()
    return tmp_path / "data", message.id


def test_show_stays_compact_and_says_how_to_see_more(shown: tuple[Path, int]) -> None:
    data, message_id = shown
    result = run("messages", "show", str(message_id), "--data-dir", str(data))

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "payload" not in out.split("Deliveries")[1].split("(--payload")[0]
    assert "(--payload shows what each one sends)" in out
    assert "(outputs cut short: --full shows them whole)" in out
    assert "adt/v2copy (file) delivered, 1 attempts" in out and "x-application/hl7-v2+er7" in out


def test_show_payload_prints_what_each_delivery_sent_in_full(shown: tuple[Path, int]) -> None:
    data, message_id = shown
    result = run("messages", "show", str(message_id), "--payload", "--data-dir", str(data))

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    # The v2 payload as sent: transformed, a segment a line, each whole, in its charset.
    sent = make_adt("SHOW1", name="ÅSTRÖM^BJÖRK").replace("|CAREHUB|2026", "|DSFAC2|2026", 1)
    start = lines.index("      payload (utf-8):")
    segments = sent.rstrip("\r").split("\r")
    assert [line.strip() for line in lines[start + 1 : start + 1 + len(segments)]] == segments
    # The event JSON whole, not cut short.
    events = Outbox(open_store(HubConfig(), data, must_exist=True)).find(
        destination="adt/events", limit=None
    )
    assert events[0].payload.decode().strip() in [line.strip() for line in lines]
    # Binary as base64, and a control character shown, never sent to the terminal.
    start = lines.index("      payload: binary, 256 bytes, as base64:")
    encoded = "".join(line.strip() for line in lines[start + 1 : start + 6])
    assert base64.b64decode(encoded) == BINARY
    assert "        alert \\x1b[2J cleared" in lines and "        next line" in lines
    assert "\x1b" not in result.stdout


def test_show_full_prints_step_outputs_whole(shown: tuple[Path, int]) -> None:
    data, message_id = shown
    store = open_store(HubConfig(), data, must_exist=True)
    try:
        steps = Outbox(store).steps(message_id)
    finally:
        store.close()
    event = next(s.output for s in steps if s.step.startswith("translate"))
    assert len(json.dumps(event)) > 200

    result = run("messages", "show", str(message_id), "--full", "--data-dir", str(data))

    assert result.exit_code == 0, result.output
    assert "..." not in result.stdout.split("Route steps")[1].split("Deliveries")[0]
    block = result.stdout.split("v2-to-event: ok\n", 1)[1].split("\n  run ", 1)[0]
    assert json.loads(block) == json.loads(json.dumps(event, default=str))


def test_show_json_has_everything_and_payloads_when_asked(shown: tuple[Path, int]) -> None:
    data, message_id = shown
    plain = run("messages", "show", str(message_id), "--json", "--data-dir", str(data))
    assert plain.exit_code == 0, plain.output
    shown_json = json.loads(plain.stdout)
    assert set(shown_json) == {"message", "text", "history", "steps", "deliveries"}
    assert shown_json["message"]["control_id"] == "SHOW1" and "raw" not in shown_json["message"]
    assert [h["event"] for h in shown_json["history"]][:2] == ["received", "routed"]
    assert all("payload" not in d for d in shown_json["deliveries"])
    by_name = {d["destination"]: d for d in shown_json["deliveries"]}
    assert by_name["adt/v2copy"]["status"] == "delivered"
    assert [a["outcome"] for a in by_name["adt/v2copy"]["attempt_log"]] == ["delivered"]
    assert by_name["adt/bin"]["size"] == 256 and by_name["adt/bin"]["attempt_log"] == []

    store = open_store(HubConfig(), data, must_exist=True)
    try:
        outputs = [s.output for s in Outbox(store).steps(message_id)]
        payloads = {d.destination: d.payload for d in Outbox(store).find(limit=None)}
    finally:
        store.close()
    assert [s["output"] for s in shown_json["steps"]] == json.loads(json.dumps(outputs))

    full = run("messages", "show", str(message_id), "--json", "--payload", "--data-dir", str(data))
    deliveries = {d["destination"]: d["payload"] for d in json.loads(full.stdout)["deliveries"]}
    assert deliveries["adt/v2copy"]["text"].encode("utf-8") == payloads["adt/v2copy"]
    assert "|DSFAC2|" in deliveries["adt/v2copy"]["text"]
    assert deliveries["adt/events"]["text"].encode() == payloads["adt/events"]
    assert base64.b64decode(deliveries["adt/bin"]["base64"]) == BINARY


def test_show_raw_goes_alone(shown: tuple[Path, int]) -> None:
    data, message_id = shown
    result = run("messages", "show", str(message_id), "--raw", "--json", "--data-dir", str(data))
    assert result.exit_code == 2 and "--raw prints the message text alone" in result.stderr


# -- 10: two hubs in one process -------------------------------------------------------------
def test_two_hubs_in_one_process_each_route_their_own_messages(tmp_path: Path) -> None:
    """A sender hub forwarding over MLLP to a receiver hub in the same process, both with
    their in-process worker. They used to share kombu's process-wide memory:// queues: one
    hub's worker took the other's message ids, and messages stayed 'received' for good."""
    receiver_config = routed_config(
        tmp_path / "receiver",
        """
routes:
  - name: inbound
    when: {type: ADT}
    steps:
      - forward: {channel: file, name: archive, directory: archive}
""",
    )
    with HubThread(receiver_config, tmp_path / "receiver" / "data") as receiver:
        host, port = receiver.mllp_address
        sender_config = routed_config(
            tmp_path / "sender",
            f"""
routes:
  - name: relay
    when: {{type: ADT}}
    steps:
      - forward: {{channel: mllp, name: downstream, host: "{host}", port: {port}, timeout: 5,
                   retry: {FAST_RETRY % 3}}}
""",
        )
        with HubThread(sender_config, tmp_path / "sender" / "data") as sender:
            texts = [make_adt(f"TWO{i}", patient_id=f"P{i}") for i in range(5)]
            send(sender.mllp_address, *texts)
            sent = sender.wait_for_deliveries(5, timeout=20)
            assert [d.status for d in sent] == ["delivered"] * 5
            archived = receiver.wait_for_deliveries(5, timeout=20)
            assert [d.status for d in archived] == ["delivered"] * 5
            for hub in (sender, receiver):
                statuses = {m.control_id: m.status for m in hub.store.find(limit=None)}
                assert statuses == {f"TWO{i}": "delivered" for i in range(5)}


# -- 15: one serving hub per data dir --------------------------------------------------------
HUB_YAML = """
listeners:
  mllp: [{name: adt, host: 127.0.0.1, port: 0}]
  http: {enabled: true, host: 127.0.0.1, port: 0}
routes: []
"""


@pytest.fixture
def hub_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "carehub.yaml"
    path.write_text(HUB_YAML, encoding="utf-8")
    return path


def serve_args(config: Path, data: Path) -> list[str]:
    ports = ["--mllp-port", "0", "--http-port", "0"]
    return ["serve", "--config", str(config), "--data-dir", str(data), *ports]


def carehub(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREHUB_")}
    return subprocess.run(
        [sys.executable, "-m", "carehub.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
    )


def test_a_second_serve_on_the_same_data_dir_is_refused(tmp_path: Path, hub_yaml: Path) -> None:
    data = tmp_path / "data"
    logs = tmp_path / "logs"
    with CarehubProcess(serve_args(hub_yaml, data), logs, "first") as first:
        first.wait_ready()
        send(first.mllp_address, make_adt("BESIDE1"))

        second = carehub(*serve_args(hub_yaml, data))

        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr.strip().splitlines() == [
            f"error: data dir {data}: another carehub is serving from it "
            f"(pid {first.process.pid}); stop that one first, or give this one its own "
            "--data-dir"
        ]
        assert "carehub ready" not in second.stdout
        assert (data / LOCK_FILE).read_text().splitlines()[0] == str(first.process.pid)

        # Commands that read the store work beside the running hub, and take no lock.
        listed = carehub("messages", "list", "--json", "--data-dir", str(data))
        assert listed.returncode == 0, listed.stderr
        assert [json.loads(line)["control_id"] for line in listed.stdout.splitlines()] == [
            "BESIDE1"
        ]
        status = carehub("status", "--json", "--data-dir", str(data))
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["received"] == 1
        # A prune of everything up to now names the hub that is serving before it asks.
        pruning = run("store", "prune", "--older-than", "0", "--data-dir", str(data), input="n\n")
        assert f"a hub (pid {first.process.pid}) is serving from this store now" in (pruning.stdout)
        assert pruning.exit_code == 1

        assert first.terminate() == 0, first.stderr

    # Stopped cleanly, the data dir is free again.
    with CarehubProcess(serve_args(hub_yaml, data), logs, "after") as after:
        after.wait_ready()
        assert after.terminate() == 0, after.stderr


def test_a_hub_killed_outright_leaves_no_stale_lock(tmp_path: Path, hub_yaml: Path) -> None:
    data = tmp_path / "data"
    logs = tmp_path / "logs"
    with CarehubProcess(serve_args(hub_yaml, data), logs, "killed") as killed:
        killed.wait_ready()
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait(30)
    with CarehubProcess(serve_args(hub_yaml, data), logs, "next") as following:
        following.wait_ready()
        assert (data / LOCK_FILE).read_text().splitlines()[0] == str(following.process.pid)
        assert following.terminate() == 0, following.stderr


def test_hubs_in_one_process_share_no_data_dir(tmp_path: Path) -> None:
    with HubThread(local_config(), tmp_path / "data"):
        second = HubThread(local_config(), tmp_path / "data")
        with pytest.raises(StoreInUse, match=rf"\(pid {os.getpid()}\)"):
            second.__enter__()
        with HubThread(local_config(), tmp_path / "other"):
            pass
    with HubThread(local_config(), tmp_path / "data") as again:  # let go on stop
        assert again.store is not None


def test_a_sqlite_url_is_locked_beside_its_file(tmp_path: Path) -> None:
    """A store.url naming a SQLite file is the same store whatever --data-dir says."""
    database = tmp_path / "shared" / "hub.sqlite"
    config = local_config(store=StoreConfig(url=f"sqlite:///{database}"))
    with HubThread(config, tmp_path / "one"):
        assert (tmp_path / "shared" / "hub.lock").read_text().splitlines()[0] == str(os.getpid())
        with pytest.raises(StoreInUse, match=f"store {database}: another carehub is serving"):
            HubThread(config, tmp_path / "two").__enter__()


# -- 19: per-destination metrics -------------------------------------------------------------
def scrape(hub: HubThread) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics over HTTP: each sample by (name, sorted labels)."""
    response = httpx.get(f"{hub.http_url}/metrics", timeout=30)
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def at(destination: str, channel: str) -> tuple[tuple[str, str], ...]:
    return (("channel", channel), ("destination", destination))


def test_metrics_have_each_destinations_queue_and_dead_letters(tmp_path: Path) -> None:
    with HTTPServer(lambda request: 503 if request.path == "/down" else 400) as http:
        config = routed_config(
            tmp_path,
            f"""
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: down, url: {http.url("/down")}, retry: {SLOW_RETRY}}}
      - forward: {{channel: webhook, name: refuses, url: {http.url("/refuses")},
                   retry: {FAST_RETRY % 3}}}
      - forward: {{channel: file, name: archive, directory: out}}
  - name: labs
    when: {{type: ORU}}
    steps:
      - forward: {{channel: file, name: results, directory: labs}}
""",
        )
        with HubThread(config, tmp_path / "data") as hub:
            send(hub.mllp_address, make_adt("M1", patient_id="P1"), make_adt("M2", patient_id="P2"))

            def settled() -> bool:
                outbox = Outbox(hub.store)
                down = outbox.find(destination="care/down", limit=None)
                dead = outbox.find(destination="care/refuses", status="dead", limit=None)
                return len(dead) == 2 and len(down) == 2 and all(d.attempts for d in down)

            wait_for(settled, 20, what="two retrying and two dead deliveries")
            # P1's next message waits behind its dead letter to care/refuses.
            send(hub.mllp_address, make_adt("M3", patient_id="P1"))
            wait_for(
                lambda: scrape(hub).get(
                    ("carehub_destination_held", at("care/refuses", "webhook"))
                ),
                20,
                what="a delivery held behind a dead letter",
            )
            metrics = scrape(hub)

    down, refuses = at("care/down", "webhook"), at("care/refuses", "webhook")
    archive, results = at("care/archive", "file"), at("labs/results", "file")
    assert metrics["carehub_destination_waiting", down] == 3  # M3 waits its turn behind M1
    assert metrics["carehub_destination_retrying", down] == 2
    assert 0 < metrics["carehub_destination_oldest_waiting_seconds", down] < 120
    assert metrics["carehub_destination_dead_letters", down] == 0
    assert metrics["carehub_destination_dead_letters", refuses] == 2
    assert metrics["carehub_destination_waiting", refuses] == 1
    assert metrics["carehub_destination_held", refuses] == 1
    assert metrics["carehub_destination_held", down] == 0
    for quiet in (archive, results):  # every destination of the routes, 0 when all is well
        for name in ("waiting", "retrying", "dead_letters", "held", "oldest_waiting_seconds"):
            assert metrics[f"carehub_destination_{name}", quiet] == 0
    assert metrics["carehub_routing_backlog", ()] == 0
    assert metrics["carehub_routing_backlog_oldest_seconds", ()] == 0
    assert metrics["carehub_store_up", ()] == 1
    by_status = {k[1][0][1]: v for k, v in metrics.items() if k[0] == "carehub_deliveries"}
    assert by_status == {"pending": 4, "dead": 2, "delivered": 3}


def test_metrics_have_the_routing_backlog_and_its_age(tmp_path: Path) -> None:
    """Messages stored and ACKed but not routed (here no worker runs): how many, and how long
    the oldest has waited."""
    with HubThread(local_config(), tmp_path / "data") as hub:
        send(hub.mllp_address, make_adt("B1"), make_adt("B2"))
        hour_ago = datetime.now(UTC) - timedelta(hours=1)
        hub.store.insert_messages([stored("B0", at=hour_ago)])
        metrics = scrape(hub)
    assert metrics["carehub_routing_backlog", ()] == 3
    assert 3590 < metrics["carehub_routing_backlog_oldest_seconds", ()] < 3700
