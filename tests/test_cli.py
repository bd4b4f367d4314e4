"""The carehub command line against real hubs, real sockets and real stores."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from click.testing import CliRunner, Result

from carehub.cli import main
from carehub.config import HubConfig
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.hub import open_store
from carehub.store.schema import MessageStatus
from carehub.store.store import MIGRATIONS, MessageStore, NewMessage, sqlite_url
from carehub.testing import HubThread, make_adt
from tests import test_rabbitmq
from tests.test_store import new_message

# A new, empty PostgreSQL schema's URL (skipped, with how to start it, without PostgreSQL).
pg_url = test_rabbitmq.pg_url

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CAREHUB_* settings from the developer's shell, and a scratch working folder (a
    command that falls back to ./data must never write into the checkout)."""
    for name in list(os.environ):
        if name.startswith("CAREHUB_"):
            monkeypatch.delenv(name)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def plain(text: str) -> str:
    """Output without terminal colour codes (rich adds them when pytest runs in a terminal)."""
    return ANSI.sub("", text)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_bytes(text.encode())
    return path


def head_revision() -> str:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None and re.fullmatch(r"\d{4}", head)
    return head


def env_without_carehub() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREHUB_")}
    env["COLUMNS"] = "200"
    return env


# -- send --------------------------------------------------------------------------------------
def send_args(hub: HubThread, *files: Path) -> list[str]:
    host, port = hub.mllp_address
    return ["send", "--host", host, "--port", str(port), "--timeout", "20", *map(str, files)]


def test_send_prints_each_ack_and_exits_0(hub: HubThread, tmp_path: Path) -> None:
    first = write(tmp_path, "a.hl7", make_adt("SEND-1"))
    second = write(tmp_path, "b.hl7", make_adt("SEND-2", terminator="\n"))
    result = run(*send_args(hub, first, second))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"{first}: AA (MSH-10 SEND-1)",
        f"{second}: AA (MSH-10 SEND-2)",
    ]
    assert hub.store.control_id_counts() == {"SEND-1": 1, "SEND-2": 1}


def test_send_resend_is_acked_but_stored_once(hub: HubThread, tmp_path: Path) -> None:
    path = write(tmp_path, "a.hl7", make_adt("AGAIN"))
    assert run(*send_args(hub, path)).exit_code == 0
    result = run(*send_args(hub, path))
    assert result.exit_code == 0
    assert result.stdout.strip() == f"{path}: AA (MSH-10 AGAIN)"
    assert hub.store.control_id_counts() == {"AGAIN": 1}


def test_send_exits_1_when_a_message_is_refused(hub: HubThread, tmp_path: Path) -> None:
    good = write(tmp_path, "good.hl7", make_adt("GOOD-1"))
    no_id = write(tmp_path, "no-id.hl7", make_adt(""))
    result = run(*send_args(hub, no_id, good))
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"{no_id}: AE (MSH-10 -): MSH-10 (message control ID) is empty"
    assert lines[1] == f"{good}: AA (MSH-10 GOOD-1)"  # the rest is still sent
    assert sorted(m.status for m in hub.store.find()) == ["received", "refused"]


def test_send_batch_file_prints_one_line_per_message(hub: HubThread, tmp_path: Path) -> None:
    body = "".join(make_adt(f"BATCH-{i}") for i in (1, 2, 3))
    batch = write(tmp_path, "batch.hl7", f"FHS|^~\\&|X\rBHS|^~\\&|X\r{body}BTS|3\rFTS|1\r")
    result = run(*send_args(hub, batch))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"{batch} #{i}: AA (MSH-10 BATCH-{i})" for i in (1, 2, 3)]
    assert hub.store.control_id_counts() == {f"BATCH-{i}": 1 for i in (1, 2, 3)}


def test_send_refuses_a_batch_that_does_not_hold_together(hub: HubThread, tmp_path: Path) -> None:
    """A batch cut off (its BTS-1 counts three, two are there) is not sent in part: the file
    is named with why, and nothing reaches the hub."""
    body = "".join(make_adt(f"CUT-{i}") for i in (1, 2))
    batch = write(tmp_path, "cut.hl7", f"FHS|^~\\&|X\rBHS|^~\\&|X\r{body}BTS|3\rFTS|1\r")
    result = run(*send_args(hub, batch))
    assert result.exit_code != 0
    assert f"{batch}: the batch does not hold together: BTS-1" in result.stderr
    assert "nothing was sent" in result.stderr
    assert hub.store.count() == 0


def test_send_with_nothing_listening_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    path = write(tmp_path, "a.hl7", make_adt("NOBODY"))
    port = free_port()
    result = run("send", "--port", str(port), "--timeout", "5", str(path))
    assert result.exit_code == 1, result.output
    assert f"cannot connect to 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.output


def test_send_missing_file_names_the_file(hub: HubThread, tmp_path: Path) -> None:
    missing = tmp_path / "not-there.hl7"
    result = run(*send_args(hub, missing))
    assert result.exit_code != 0
    assert f"{missing}: cannot read" in result.stderr
    assert "Traceback" not in result.output


def test_send_file_without_msh_names_the_file_and_sends_nothing(
    hub: HubThread, tmp_path: Path
) -> None:
    good = write(tmp_path, "good.hl7", make_adt("NOT-SENT"))
    junk = write(tmp_path, "notes.txt", "PID|1||P1\nthis is not HL7\n")
    result = run(*send_args(hub, good, junk))
    assert result.exit_code != 0
    assert f"{junk}: no HL7 message in the file (no MSH segment)" in result.stderr
    assert hub.store.count() == 0  # every file is checked before anything is sent


# -- messages list / show -------------------------------------------------------------------
def _new(
    control_id: str,
    *,
    at: datetime,
    event: str = "A01",
    patient_id: str = "P1",
    status: MessageStatus = MessageStatus.RECEIVED,
    message_type: str = "ADT",
    filler: int = 0,
) -> NewMessage:
    text = make_adt(
        control_id,
        event,
        patient_id=patient_id,
        extra_segments=[f"NTE|{i}||{'n' * 2000}" for i in range(filler)],
    )
    if message_type != "ADT":
        text = text.replace(f"ADT^{event}^ADT_A01", f"{message_type}^{event}")
    return NewMessage(
        raw=text.encode(),
        transport="mllp",
        listener="cli-test",
        peer="127.0.0.1:5000",
        status=status,
        ack_code="AA" if status is MessageStatus.RECEIVED else "AE",
        header=MessageHeader.read(MessageView(text)),
        charset="utf-8",
        received_at=at,
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A store with five messages of different ages, types, events, patients and statuses."""
    folder = tmp_path / "store"
    now = datetime.now(UTC)
    store = open_store(HubConfig(), folder)
    try:
        outcomes = store.insert_messages(
            [
                _new("OLD", at=now - timedelta(days=3)),
                _new("ADMIT", at=now - timedelta(hours=4)),
                _new("UPDATE", at=now - timedelta(minutes=30), event="A08", patient_id="P2"),
                _new("LAB", at=now - timedelta(minutes=10), event="R01", message_type="ORU"),
                _new("BAD", at=now, patient_id="P3", status=MessageStatus.REFUSED),
            ]
        )
        store.set_status(outcomes[1].message_id, MessageStatus.ROUTED, "to the care team")
    finally:
        store.close()
    return folder


def listed(*args: str, env: dict[str, str] | None = None) -> list[dict[str, object]]:
    result = run("messages", "list", "--json", *args, env=env)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def control_ids(rows: list[dict[str, object]]) -> list[object]:
    return [row["control_id"] for row in rows]


def test_list_json_is_one_object_per_line_without_the_body(data_dir: Path) -> None:
    rows = listed("--data-dir", str(data_dir))
    assert control_ids(rows) == ["BAD", "LAB", "UPDATE", "ADMIT", "OLD"]
    for row in rows:
        assert "raw" not in row and "identity" not in row
        datetime.fromisoformat(str(row["received_at"]))
    admit = rows[3]
    assert admit["status"] == "routed" and admit["patient_id"] == "P1"
    assert admit["message_type"] == "ADT" and admit["trigger_event"] == "A01"
    assert isinstance(admit["id"], int)


def test_list_filters(data_dir: Path) -> None:
    d = ("--data-dir", str(data_dir))
    assert control_ids(listed(*d, "--status", "refused")) == ["BAD"]
    assert control_ids(listed(*d, "--status", "routed")) == ["ADMIT"]
    assert control_ids(listed(*d, "--type", "oru")) == ["LAB"]
    assert control_ids(listed(*d, "--type", "ADT", "--event", "A08")) == ["UPDATE"]
    assert control_ids(listed(*d, "--patient", "P1")) == ["LAB", "ADMIT", "OLD"]
    assert control_ids(listed(*d, "--patient", "P1", "--event", "A01")) == ["ADMIT", "OLD"]
    assert control_ids(listed(*d, "--limit", "2")) == ["BAD", "LAB"]
    assert listed(*d, "--patient", "NOBODY") == []


def test_list_since_age_and_iso(data_dir: Path) -> None:
    d = ("--data-dir", str(data_dir))
    recent = ["BAD", "LAB", "UPDATE"]
    assert control_ids(listed(*d, "--since", "2h")) == recent
    assert control_ids(listed(*d, "--since", "120m")) == recent
    assert control_ids(listed(*d, "--since", "1d")) == [*recent, "ADMIT"]
    assert control_ids(listed(*d, "--since", "20m")) == ["BAD", "LAB"]
    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    naive_utc = two_hours_ago.replace(tzinfo=None).isoformat(timespec="seconds")
    assert control_ids(listed(*d, "--since", naive_utc)) == recent
    with_offset = two_hours_ago.astimezone(timezone(timedelta(hours=-5))).isoformat()
    assert control_ids(listed(*d, "--since", with_offset)) == recent
    day_before = (datetime.now(UTC) - timedelta(days=2)).date().isoformat()
    assert "OLD" not in control_ids(listed(*d, "--since", day_before))


def test_list_since_rejects_nonsense(data_dir: Path) -> None:
    result = run("messages", "list", "--data-dir", str(data_dir), "--since", "yesterday")
    assert result.exit_code == 2
    assert "30m, 2h, 7d" in result.stderr


def test_list_table(data_dir: Path) -> None:
    result = run("messages", "list", "--data-dir", str(data_dir))
    assert result.exit_code == 0
    out = plain(result.stdout)
    for control_id in ("OLD", "ADMIT", "UPDATE", "LAB", "BAD"):
        assert control_id in out
    assert "5 message(s)" in out


def test_list_reads_carehub_data_dir(data_dir: Path) -> None:
    rows = listed(env={"CAREHUB_DATA_DIR": str(data_dir)})
    assert len(rows) == 5
    assert not (Path.cwd() / "data").exists()  # did not fall back to ./data


def test_show_prints_header_history_and_named_fields(data_dir: Path) -> None:
    (admit,) = [r for r in listed("--data-dir", str(data_dir)) if r["control_id"] == "ADMIT"]
    result = run("messages", "show", str(admit["id"]), "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    assert re.search(r"control id\s+ADMIT", out)
    assert re.search(r"type\s+ADT\^A01 ADT_A01", out)
    assert re.search(r"patient\s+P1 \(authority HOSP\)", out)
    assert re.search(r"status\s+routed", out)
    assert re.search(r"History\n\s+\S+ \S+\s+received\n\s+\S+ \S+\s+routed\s+to the care team", out)
    assert re.search(r"PID-5\s+Patient Name\s+TESTPATIENT\^ALEX", out)
    assert re.search(r"MSH-10\s+Message Control ID\s+ADMIT", out)
    assert re.search(r"PV1-2\s+Patient Class\s+I", out)


def test_show_raw_prints_the_message_text(data_dir: Path) -> None:
    (lab,) = [r for r in listed("--data-dir", str(data_dir)) if r["control_id"] == "LAB"]
    result = run("messages", "show", str(lab["id"]), "--raw", "--data-dir", str(data_dir))
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("MSH|^~\\&|") and "|ORU^R01|LAB|" in lines[0]
    assert [line[:3] for line in lines if line] == ["MSH", "EVN", "PID", "PV1"]


def test_show_unknown_id_fails_with_a_message(data_dir: Path) -> None:
    result = run("messages", "show", "9999", "--data-dir", str(data_dir))
    assert result.exit_code != 0
    assert "no message with id 9999" in result.stderr
    assert "Traceback" not in result.output


# -- store maintenance ------------------------------------------------------------------------
def test_store_upgrade_prints_the_revision(tmp_path: Path) -> None:
    folder = tmp_path / "fresh"
    for _ in range(2):  # creating, then a no-op
        result = run("store", "upgrade", "--data-dir", str(folder))
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == f"store at schema revision {head_revision()}"
    assert (folder / "carehub.db").is_file()


def test_store_prune_deletes_old_rows_and_shrinks_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "prune"
    now = datetime.now(UTC)
    store = open_store(HubConfig(), folder)
    try:
        old = store.insert_messages(
            [_new(f"OLD{i}", at=now - timedelta(days=45), filler=4) for i in range(120)]
        )
        for outcome in old:  # no route took them: nothing left to do, so retention may go
            store.set_status(outcome.message_id, MessageStatus.UNROUTED)
        store.insert_messages([_new(f"NEW{i}", at=now - timedelta(days=1)) for i in range(3)])
    finally:
        store.close()

    result = run("store", "prune", "--older-than", "30", "--data-dir", str(folder))
    assert result.exit_code == 0, result.output
    first, care = result.stdout.strip().splitlines()
    match = re.fullmatch(
        r"pruned 120 message\(s\) older than 30 day\(s\); store file ([\d,]+) -> ([\d,]+) bytes",
        first,
    )
    assert match, result.stdout
    assert care == (
        "pruned care and referral records: 0 encounter(s), 0 encounter event(s), "
        "0 notification(s), 0 follow-up(s), 0 referral(s), 0 referral event(s), "
        "0 patient merge(s)"
    )
    before, after = (int(group.replace(",", "")) for group in match.groups())
    assert after < before / 2
    assert control_ids(listed("--data-dir", str(folder))) == ["NEW2", "NEW1", "NEW0"]

    again = run("store", "prune", "--older-than", "30", "--data-dir", str(folder))
    assert again.stdout.startswith("pruned 0 message(s) older than 30 day(s)")


@pytest.mark.postgres
@pytest.mark.parametrize("full", [False, True])
def test_store_prune_on_postgresql_says_where_the_space_went(
    tmp_path: Path, pg_url: str, full: bool
) -> None:
    """Plain VACUUM keeps the freed pages for the tables' reuse, so the size may not fall (a
    feed writing meanwhile grows it): the line says so rather than let it read as reclaimed."""
    now = datetime.now(UTC)
    store = MessageStore(pg_url)
    store.migrate()
    try:
        old = store.insert_messages(
            [_new(f"OLD{i}", at=now - timedelta(days=45), filler=4) for i in range(60)]
        )
        for outcome in old:
            store.set_status(outcome.message_id, MessageStatus.UNROUTED)
    finally:
        store.close()
    config = tmp_path / "carehub.yaml"
    config.write_text(f"store: {{url: '{pg_url}'}}\n", encoding="utf-8")
    args = ["store", "prune", "--older-than", "30", "--yes", "--config", str(config)]
    result = run(*args, *(["--full"] if full else []))
    assert result.exit_code == 0, result.output
    line = result.stdout.strip().splitlines()[0]
    kept = r" \(the freed space is kept for reuse by the tables; --full returns it\)"
    assert re.fullmatch(
        r"pruned 60 message\(s\) older than 30 day\(s\); pruned tables [\d,]+ -> [\d,]+ bytes"
        + ("" if full else kept),
        line,
    ), line


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["messages", "show", "99999999999999999999"], "'MESSAGE_ID'"),
        (["messages", "reprocess", "0"], "'[MESSAGE_IDS]...'"),
        (["messages", "list", "--limit", "0"], "'--limit'"),
        (["messages", "list", "--limit", "-1"], "'--limit'"),
        (["messages", "list", "--since", "99999999d"], "'--since'"),
        (["messages", "list", "--since", "9999-12-31T23:59:59-05:00"], "'--since'"),
        (["messages", "list", "--since", "yesterday"], "'--since'"),
        (["store", "prune", "--older-than", "99999999999"], "'--older-than'"),
        (["dead-letters", "retry", "99999999999999999999"], "'[DELIVERY_IDS]...'"),
        (["encounters", "show", "99999999999999999999"], "'ENCOUNTER_ID'"),
        (["encounters", "list", "--limit", "0"], "'--limit'"),
        (["followups", "done", "99999999999999999999"], "'ITEM_ID'"),
        (["referrals", "list", "--limit", "0"], "'--limit'"),
        (["serve", "--mllp-port", "70000"], "'--mllp-port'"),
        (["serve", "--http-port", "-1"], "'--http-port'"),
        (["send", "--port", "70000", "x.hl7"], "'--port'"),
        (["send", "--timeout", "0", "x.hl7"], "'--timeout'"),
    ],
)
def test_values_out_of_range_are_usage_errors_naming_the_option(
    tmp_path: Path, args: list[str], named: str
) -> None:
    """Ids past what the store holds, limits below one, ports past 65535, dates past the
    calendar: exit 2 with the option named, never an OverflowError from inside SQLite or a
    socket call."""
    (tmp_path / "x.hl7").write_bytes(make_adt("RANGE").encode())
    data = [] if args[0] == "send" else ["--data-dir", str(tmp_path / "data")]
    result = run(*args, *data) if args[0] != "send" else run(*args[:-1], str(tmp_path / "x.hl7"))
    assert result.exit_code == 2, result.output
    assert named in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_store_prune_needs_a_non_negative_age(tmp_path: Path) -> None:
    result = run("store", "prune", "--older-than", "-1", "--data-dir", str(tmp_path))
    assert result.exit_code == 2


# -- config errors ----------------------------------------------------------------------------
def test_bad_config_exits_2_naming_file_line_and_key(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "hub.yaml",
        "listeners:\n  mllp:\n    - name: adt\n      port: 70000\n",
    )
    result = run("messages", "list", "--config", str(config), "--data-dir", str(tmp_path))
    assert result.exit_code == 2
    assert f"{config}:4: listeners.mllp[0].port:" in result.stderr
    assert "Traceback" not in result.output


def test_store_url_that_names_no_database_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = write(tmp_path, "hub.yaml", "hub:\n  application: X\nstore:\n  url: notadb://x\n")
    result = run("messages", "list", "--config", str(config))
    assert result.exit_code == 2
    assert f"{config}:4: store.url: cannot open the store at notadb://x" in result.stderr
    assert "Traceback" not in result.output


def test_unreachable_store_exits_2_without_showing_the_password(tmp_path: Path) -> None:
    url = f"postgresql://carehub:s3cret@127.0.0.1:{free_port()}/test"
    config = write(tmp_path, "hub.yaml", f"store:\n  url: {url}\n")
    result = run("messages", "list", "--config", str(config))
    assert result.exit_code == 2
    assert f"{config}:2: store.url: cannot open the store at postgresql://carehub:***@" in (
        result.stderr
    )
    assert "s3cret" not in result.output and "Traceback" not in result.output


def test_data_dir_that_cannot_hold_a_store_exits_2_naming_it(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    for command in (["messages", "list"], ["serve", "--mllp-port", "0", "--http-port", "0"]):
        result = run(*command, "--data-dir", str(blocked / "data"))
        assert result.exit_code == 2, result.output
        # serve cannot create it; messages list finds no store there
        assert f"data dir {blocked / 'data'}: " in result.stderr
        assert "Traceback" not in result.output


@pytest.mark.parametrize("listener", ["mllp", "http"])
def test_a_port_in_use_exits_2_naming_the_listener_and_the_setting(
    tmp_path: Path, listener: str
) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    other = free_port()
    mllp, http = (port, other) if listener == "mllp" else (other, port)
    config = write(
        tmp_path,
        "hub.yaml",
        "listeners:\n"
        "  mllp:\n"
        f"    - {{name: adt, host: 127.0.0.1, port: {mllp}}}\n"
        f"  http: {{host: 127.0.0.1, port: {http}}}\n",
    )
    with taken:
        result = run("serve", "--config", str(config), "--data-dir", str(tmp_path / "data"))
    assert result.exit_code == 2
    what, key = (
        (f"MLLP listener 'adt' cannot listen on 127.0.0.1:{port}", "listeners.mllp[0].port")
        if listener == "mllp"
        else (f"HTTP listener cannot listen on 127.0.0.1:{port}", "listeners.http.port")
    )
    assert what in result.stderr and f"({config}:" in result.stderr, result.stderr
    assert key in result.stderr and "Traceback" not in result.output


def test_files_that_are_not_utf8_are_named_with_their_line(tmp_path: Path) -> None:
    """A config or routes file saved in another encoding is a config error naming the file and
    the line of the first byte that is not UTF-8, not a UnicodeDecodeError traceback."""
    config = tmp_path / "hub.yaml"
    config.write_bytes(b"hub:\n  application: CAREHUB\n  facility: H\xf4PITAL\n")
    result = run("routes", "check", "--config", str(config))
    assert result.exit_code == 2
    assert f"{config}:3: the config file is not UTF-8 text (byte 0xf4" in result.stderr

    routes = tmp_path / "latin.yaml"
    routes.write_bytes(b"routes:\n  - name: caf\xe9\n")
    config.write_text('routes: ["latin.yaml"]\n', encoding="utf-8")
    result = run("routes", "check", "--config", str(config))
    assert result.exit_code == 2
    assert f"{routes}:2: the routes file is not UTF-8 text (byte 0xe9" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["worker"], ["serve", "--mllp-port", "0", "--http-port", "0"]])
def test_a_broker_that_cannot_be_reached_is_named_before_anything_says_ready(
    tmp_path: Path, command: list[str]
) -> None:
    """A queue.url nothing answers at: exit 2 naming the setting and the broker (its password
    hidden), before "carehub ready"; not a consumer thread failing once the worker is up, nor an
    error blamed on the listeners."""
    url = f"amqp://carehub:s3cret@127.0.0.1:{free_port()}//"
    config = write(tmp_path, "hub.yaml", f"queue:\n  url: {url}\n")
    result = run(*command, "--config", str(config), "--data-dir", str(tmp_path / "data"))
    assert result.exit_code == 2, result.output
    assert f"{config}:2: queue.url: cannot reach the broker at amqp://carehub:***@" in (
        result.stderr
    )
    assert "s3cret" not in result.output and "carehub ready" not in result.output
    assert "Traceback" not in result.output


def test_a_store_that_refuses_writes_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A write command on a store the system will not let it write (here an immutable file) is
    a one-line error and exit 1; commands that only read still work."""
    data = tmp_path / "data"
    assert run("store", "upgrade", "--data-dir", str(data)).exit_code == 0
    store = MessageStore(sqlite_url(data))
    try:
        (stored,) = store.insert_messages([new_message("RO-1")])
    finally:
        store.close()
    database = data / "carehub.db"
    locked = subprocess.run(["chattr", "+i", str(database)], capture_output=True, check=False)
    if locked.returncode != 0:
        pytest.skip("making the store file immutable needs chattr and root (CAP_LINUX_IMMUTABLE)")
    try:  # routing it again writes its new run
        result = run("messages", "reprocess", str(stored.message_id), "--data-dir", str(data))
        listed = run("messages", "list", "--data-dir", str(data))
    finally:
        subprocess.run(["chattr", "-i", str(database)], check=True)
    assert result.exit_code == 1, result.output
    assert "error: the store refused the command: attempt to write a readonly database" in (
        result.stderr
    )
    assert "Traceback" not in result.output
    assert listed.exit_code == 0


def test_serve_on_a_store_it_may_not_write_exits_2_naming_the_data_dir(tmp_path: Path) -> None:
    """Caught at start, naming where the store is, rather than a hub that answers every
    message "not stored"."""
    data = tmp_path / "data"
    assert run("store", "upgrade", "--data-dir", str(data)).exit_code == 0
    database = data / "carehub.db"
    locked = subprocess.run(["chattr", "+i", str(database)], capture_output=True, check=False)
    if locked.returncode != 0:
        pytest.skip("making the store file immutable needs chattr and root (CAP_LINUX_IMMUTABLE)")
    try:
        result = run("serve", "--data-dir", str(data), "--mllp-port", "0", "--http-port", "0")
    finally:
        subprocess.run(["chattr", "-i", str(database)], check=True)
    assert result.exit_code == 2, result.output
    assert f"data dir {data}: cannot open the store there: attempt to write a readonly" in (
        result.stderr
    )
    assert "carehub ready" not in result.output


def test_a_store_url_whose_driver_is_not_installed_names_the_key(tmp_path: Path) -> None:
    config = write(tmp_path, "hub.yaml", "store:\n  url: mysql://u:pw@127.0.0.1:1/db\n")
    result = run("messages", "list", "--config", str(config))
    assert result.exit_code == 2
    assert f"{config}:2: store.url: cannot open the store at mysql://u:***@" in result.stderr
    assert "No module named" in result.stderr and "Traceback" not in result.output


def test_commands_that_read_the_store_do_not_create_one_at_a_mistyped_path(
    tmp_path: Path,
) -> None:
    """`messages list --data-dir <typo>` used to create an empty store there and report no
    messages; it names the folder instead, and leaves nothing behind."""
    typo = tmp_path / "dta"
    for command in (["messages", "list"], ["store", "prune", "--older-than", "30"]):
        result = run(*command, "--data-dir", str(typo))
        assert result.exit_code == 2, result.output
        assert f"data dir {typo}: no store there (carehub.db)" in result.stderr
    assert not typo.exists()


def test_demo_with_a_config_that_is_not_there_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    result = run("demo", "--config", str(missing))
    assert result.exit_code == 2
    assert f"{missing}: cannot read the config file" in result.stderr


def test_a_busy_port_given_on_the_command_line_names_the_option(tmp_path: Path) -> None:
    config = write(
        tmp_path, "hub.yaml", "listeners:\n  mllp:\n    - {name: adt, host: 127.0.0.1}\n"
    )
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run(
            "serve", "--config", str(config), "--data-dir", str(tmp_path / "data"),
            "--mllp-port", str(port), "--http-port", "0",
        )  # fmt: skip
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "(--mllp-port, in place of listeners.mllp[0].port)" in result.stderr


def test_a_file_drop_folder_that_cannot_be_made_names_the_listener_and_key(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = write(
        tmp_path,
        "hub.yaml",
        f"listeners:\n  mllp: []\n  http: {{enabled: false}}\n"
        f"  files:\n    - {{name: inbox, directory: {blocker / 'inbox'}}}\n",
    )
    result = run("serve", "--config", str(config), "--data-dir", str(tmp_path / "data"))
    assert result.exit_code == 2, result.output
    assert "file drop 'inbox' cannot use its folders" in result.stderr
    assert f"({config}:5: listeners.files[0].directory)" in result.stderr


def test_bad_config_from_carehub_config_env(tmp_path: Path) -> None:
    config = write(tmp_path, "hub.yaml", "store:\n  durability: sometimes\n")
    result = run("store", "upgrade", env={"CAREHUB_CONFIG": str(config)})
    assert result.exit_code == 2
    assert f"{config}:2: store.durability:" in result.stderr


def test_serve_with_bad_config_exits_2_in_a_real_process(tmp_path: Path) -> None:
    config = write(tmp_path, "hub.yaml", "hub:\n  application: X\nlisteners:\n  bogus: 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "carehub.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_without_carehub(),
        cwd=tmp_path,
    )
    assert done.returncode == 2, done
    assert f"{config}:4: listeners.bogus:" in done.stderr
    assert "Traceback" not in done.stderr
    assert "carehub ready" not in done.stdout


# -- demo -------------------------------------------------------------------------------------
def test_demo_runs_and_shows_every_kind_of_answer(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "carehub.cli", "demo", "--data-dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_without_carehub(),
        cwd=PROJECT_ROOT,
    )
    assert done.returncode == 0, done.stderr
    out = plain(done.stdout)
    codes = {code: re.findall(rf"\b{code}\b", out) for code in ("AA", "AE", "AR")}
    assert len(codes["AA"]) >= 8, out
    assert codes["AE"] and codes["AR"], out
    assert "resend" in out
    assert "RGH-000102" in out  # the resent admission
    assert (tmp_path / "demo" / "carehub.db").is_file()


@pytest.fixture
def sample_hub(tmp_path: Path) -> Iterator[HubThread]:
    from carehub.testing import local_config

    with HubThread(local_config(), tmp_path / "sample") as running:
        yield running


def test_send_the_sample_feeds(sample_hub: HubThread) -> None:
    feeds = sorted((PROJECT_ROOT / "config" / "feeds").glob("*.hl7"))
    assert len(feeds) >= 9
    result = run(*send_args(sample_hub, *feeds))
    assert result.exit_code == 1  # one sample is deliberately missing MSH-10
    lines = result.stdout.splitlines()
    assert len(lines) == len(feeds)
    assert sum(": AA (" in line for line in lines) == len(feeds) - 1
    (refused,) = [line for line in lines if ": AE (" in line]
    assert "missing-control-id" in refused and "MSH-10" in refused


def test_serve_without_worker_on_the_default_queue_names_no_line_the_file_lacks(
    tmp_path: Path,
) -> None:
    """The queue is not written in the file (the default, memory://): the error says so
    rather than pointing at the file's first key, which holds no queue setting."""
    config = tmp_path / "carehub.yaml"
    config.write_text("# a hub\n\nhub:\n  application: CAREHUB\nroutes: []\n")
    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data"), "--no-worker"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert f"{config}: queue.url (not set there: the default)" in result.output, result.output
    assert f"{config}:3:" not in result.output
