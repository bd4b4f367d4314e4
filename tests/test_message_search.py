"""Searching stored messages, and reprocessing and exporting what a search finds: `messages
list`, `messages reprocess` and `messages export` with their shared filters, through the real
CLI against real SQLite stores."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import event

from carehub.cli import main
from carehub.config import HubConfig, load_config
from carehub.hl7.charsets import decode_message
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.hub import open_store
from carehub.search import FieldMatch, MessageFilter
from carehub.store.outbox import Outbox
from carehub.store.schema import MessageStatus
from carehub.store.store import SEARCH_PAGE, MessageStore, NewMessage, StoredMessage
from carehub.testing import HubThread, make_adt, mllp_exchange
from tests import test_store
from tests.test_cli import control_ids, listed, plain, run

store_url = test_store.store_url


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CAREHUB_* settings from the shell; commands run in a scratch folder."""
    for name in list(os.environ):
        if name.startswith("CAREHUB_"):
            monkeypatch.delenv(name)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


def stored(
    raw: bytes,
    *,
    at: datetime,
    listener: str = "adt-in",
    status: MessageStatus = MessageStatus.RECEIVED,
) -> NewMessage:
    """A message as intake hands it to the store: the bytes as received, the header read from
    the text decoded as intake decodes it."""
    decoded = decode_message(raw)
    return NewMessage(
        raw=raw,
        transport="mllp",
        listener=listener,
        peer="127.0.0.1:5000",
        status=status,
        ack_code="AA" if status is MessageStatus.RECEIVED else "AE",
        header=MessageHeader.read(MessageView(decoded.text)),
        charset=decoded.charset,
        received_at=at,
    )


def adt(
    control_id: str,
    *,
    at: datetime,
    listener: str = "adt-in",
    sender: tuple[str, str] = ("ADT_SENDER", "TEST_HOSPITAL"),
    event: str = "A01",
    message_type: str = "ADT",
    patient_id: str = "P1",
    name: str = "DOE^JANE",
    unit: str = "NORTH",
    note: str = "",
    status: MessageStatus = MessageStatus.RECEIVED,
) -> NewMessage:
    text = make_adt(
        control_id,
        event,
        patient_id=patient_id,
        name=name,
        sending_application=sender[0],
        sending_facility=sender[1],
        extra_segments=[f"NTE|1||{note}"] if note else [],
    ).replace("WARD^101^A", f"WARD^101^A^{unit}")  # PV1-3.4: the facility
    if message_type != "ADT":
        text = text.replace(f"ADT^{event}^ADT_A01", f"{message_type}^{event}")
    return stored(text.encode(), at=at, listener=listener, status=status)


def insert(folder: Path, batch: list[NewMessage], config: HubConfig | None = None) -> list[int]:
    store = open_store(config or HubConfig(), folder)
    try:
        return [outcome.message_id for outcome in store.insert_messages(batch)]
    finally:
        store.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Five messages from two listeners and four senders, with different fields and ages."""
    folder = tmp_path / "store"
    now = datetime.now(UTC)
    insert(
        folder,
        [
            adt(
                "OLD",
                at=now - timedelta(days=3),
                listener="lab-in",
                sender=("LAB^2.16.840.1.113883^ISO", "NORTH"),
            ),
            adt("ADMIT", at=now - timedelta(hours=4)),
            adt(
                "UPDATE",
                at=now - timedelta(minutes=30),
                sender=("ADT_SENDER", "SOUTH_CLINIC"),
                event="A08",
                patient_id="P2",
                name="SMITH\\T\\JONES^RICHARD",  # PID-5.1 is SMITH&JONES, escaped
                unit="SOUTH",
                note="Allergy to PENICILLIN",
            ),
            adt(
                "LAB",
                at=now - timedelta(minutes=10),
                listener="lab-in",
                sender=("LAB", "NORTH"),
                event="R01",
                message_type="ORU",
                patient_id="P3",
                name="DOE^JOHN",
            ),
            adt(
                "BAD",
                at=now,
                sender=("LABX", "NORTH"),
                patient_id="P3",
                name="DOE^JOHN",
                status=MessageStatus.REFUSED,
            ),
        ],
    )
    return folder


def search(data_dir: Path, *args: str) -> list[object]:
    """Control ids `messages list --json` prints for ``args``."""
    return control_ids(listed("--data-dir", str(data_dir), *args))


def list_result(data_dir: Path, *args: str) -> Result:
    result = run("messages", "list", "--json", "--data-dir", str(data_dir), *args)
    assert result.exit_code == 0, result.output
    return result


# -- list: filters in SQL ---------------------------------------------------------------------
def test_listener_sender_and_control_id(data_dir: Path) -> None:
    assert search(data_dir, "--listener", "lab-in") == ["LAB", "OLD"]
    assert search(data_dir, "--listener", "adt-in") == ["BAD", "UPDATE", "ADMIT"]
    assert search(data_dir, "--listener", "lab") == []
    # MSH-3 matches as a whole or by its first component (LAB^2.16.840.1.113883^ISO), never
    # as a prefix of another name (LABX).
    assert search(data_dir, "--sender", "LAB") == ["LAB", "OLD"]
    assert search(data_dir, "--sender", "LA") == []
    assert search(data_dir, "--sender", "LAB^2.16.840.1.113883^ISO") == []  # ^ starts MSH-4
    assert search(data_dir, "--sender", "LAB^NORTH") == ["LAB", "OLD"]
    assert search(data_dir, "--sender", "ADT_SENDER^SOUTH_CLINIC") == ["UPDATE"]
    assert search(data_dir, "--sender", "ADT_SENDER") == ["UPDATE", "ADMIT"]
    assert search(data_dir, "--sender", "^NORTH") == ["BAD", "LAB", "OLD"]
    assert search(data_dir, "--control-id", "UPDATE") == ["UPDATE"]
    assert search(data_dir, "--control-id", "UPD") == []
    assert search(data_dir, "--sender", "LAB", "--status", "received", "--type", "ADT") == ["OLD"]
    # Filters that read only columns read no message: nothing is told on stderr.
    assert "scanned" not in list_result(data_dir, "--listener", "lab-in").stderr


def test_until_by_age_and_by_date_and_with_since(data_dir: Path) -> None:
    assert search(data_dir, "--until", "1h") == ["ADMIT", "OLD"]
    assert search(data_dir, "--until", "1d") == ["OLD"]
    assert search(data_dir, "--since", "1h", "--until", "20m") == ["UPDATE"]
    assert search(data_dir, "--since", "5h", "--until", "5m", "--type", "ADT") == [
        "UPDATE",
        "ADMIT",
    ]
    assert search(data_dir, "--until", "5d") == []
    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    naive_utc = two_hours_ago.replace(tzinfo=None).isoformat(timespec="seconds")
    assert search(data_dir, "--until", naive_utc) == ["ADMIT", "OLD"]
    with_offset = two_hours_ago.astimezone(timezone(timedelta(hours=-5))).isoformat()
    assert search(data_dir, "--until", with_offset) == ["ADMIT", "OLD"]


def test_time_filters_hold_when_ids_and_times_disagree(tmp_path: Path) -> None:
    """A message stored late with an older time (a backfill through a file drop) sits between
    ids of other times: the window is still the time window."""
    now = datetime.now(UTC)
    folder = tmp_path / "store"
    insert(
        folder,
        [
            adt("EARLY", at=now - timedelta(hours=3)),
            adt("RECENT", at=now - timedelta(minutes=1)),
            adt("BACKFILL", at=now - timedelta(hours=2)),
            adt("LAST", at=now),
        ],
    )
    assert search(folder, "--until", "1h") == ["BACKFILL", "EARLY"]
    assert search(folder, "--since", "90m") == ["LAST", "RECENT"]
    assert search(folder, "--since", "150m", "--until", "30m") == ["BACKFILL"]
    assert search(folder, "--since", "150m", "--until", "30m", "--contains", "adt") == ["BACKFILL"]


def test_filters_take_the_values_the_list_shows(data_dir: Path, tmp_path: Path) -> None:
    """What the table shows in its via, type and patient columns, given back as a filter,
    finds that row (and its like), in `list`, `reprocess` and `export` alike."""
    table = plain(run("messages", "list", "--data-dir", str(data_dir)).stdout)
    header, *rows = (
        [cell.strip() for cell in line.split("│" if "│" in line else "┃")]
        for line in table.splitlines()
        if "│" in line or "┃" in line
    )
    update = dict(zip(header, next(row for row in rows if "UPDATE" in row), strict=True))
    shown = (update["via"], update["type"], update["patient"])
    assert shown == ("mllp:adt-in", "ADT^A08", "P2^HOSP")
    assert search(data_dir, "--listener", update["via"]) == ["BAD", "UPDATE", "ADMIT"]
    assert search(data_dir, "--type", update["type"]) == ["UPDATE"]
    assert search(data_dir, "--patient", update["patient"]) == ["UPDATE"]

    assert search(data_dir, "--patient", "P3^HOSP") == search(data_dir, "--patient", "P3")
    assert search(data_dir, "--patient", "P3^HOSP") == ["BAD", "LAB"]
    assert search(data_dir, "--patient", "P3^OTHER") == []
    assert search(data_dir, "--patient", "P3^") == ["BAD", "LAB"]  # no authority: any
    assert search(data_dir, "--type", "oru^r01") == ["LAB"]
    assert search(data_dir, "--type", "ADT^A01", "--event", "a01") == ["BAD", "ADMIT", "OLD"]
    assert search(data_dir, "--type", "ADT^") == ["BAD", "UPDATE", "ADMIT", "OLD"]
    assert search(data_dir, "--type", "^R01") == ["LAB"]
    assert search(data_dir, "--listener", "mllp:lab-in") == ["LAB", "OLD"]
    assert search(data_dir, "--listener", "lab-in") == ["LAB", "OLD"]
    assert search(data_dir, "--listener", "http:lab-in") == []  # the transport counts too

    as_listed = ["--listener", "mllp:lab-in", "--type", "ORU^R01", "--patient", "P3^HOSP"]
    dry_run = run("messages", "reprocess", "--dry-run", "--data-dir", str(data_dir), *as_listed)
    assert dry_run.exit_code == 0, dry_run.output
    assert "1 message(s) match" in dry_run.stdout and "ORU^R01\tLAB\t" in dry_run.stdout
    exported = export(data_dir, tmp_path / "out", "--patient", "P3^HOSP", "--type", "ORU^R01")
    assert exported.exit_code == 0, exported.output
    assert exported.stdout.startswith("wrote 1 message(s)")


def test_a_listener_no_message_came_by_is_told_with_those_that_did(
    data_dir: Path, tmp_path: Path
) -> None:
    """An unknown --listener finds nothing, as before, and says so on stderr with the
    listeners the store has messages from; a known one that finds nothing says nothing."""
    seen = "the store has messages from: mllp:adt-in, mllp:lab-in"
    for listener in ("nope", "http:lab-in", "lab"):
        result = list_result(data_dir, "--listener", listener)
        assert result.stdout == ""
        assert result.stderr == (
            f"note: no stored message came in by listener {listener!r}; {seen}\n"
        )
    exported = export(data_dir, tmp_path / "out", "--listener", "nope")
    assert exported.exit_code == 0, exported.output
    assert exported.stdout.startswith("wrote 0 message(s)")
    assert f"listener 'nope'; {seen}" in exported.stderr

    for listener in ("lab-in", "mllp:lab-in"):
        known = list_result(data_dir, "--listener", listener, "--status", "refused")
        assert (known.stdout, known.stderr) == ("", "")
    insert(tmp_path / "empty", [])
    empty = run("messages", "list", "--data-dir", str(tmp_path / "empty"), "--listener", "adt")
    assert empty.exit_code == 0, empty.output
    assert "listener 'adt'; the store holds no message" in empty.stderr


@pytest.mark.parametrize(
    "filters",
    [
        MessageFilter(patient="P1", patient_authority="HOSP"),
        MessageFilter(listener="mllp:adt-in"),
    ],
)
def test_no_page_of_a_search_by_a_listed_form_sorts_the_store(
    data_dir: Path, filters: MessageFilter
) -> None:
    test_no_page_of_a_search_sorts_the_store(data_dir, filters)


# -- list: filters on the message itself -----------------------------------------------------
def test_field_reads_the_message_through_the_view(data_dir: Path) -> None:
    assert search(data_dir, "--field", "PID-5.1=DOE") == ["BAD", "LAB", "ADMIT", "OLD"]
    assert search(data_dir, "--field", "PID-5.1=DOE", "--field", "PID-5.2=JOHN") == ["BAD", "LAB"]
    assert search(data_dir, "--field", "pv1-3.4=SOUTH") == ["UPDATE"]
    assert search(data_dir, "--field", "PID-5.1=SMITH&JONES") == ["UPDATE"]  # unescaped
    assert search(data_dir, "--field", "PID-5.1=doe") == []  # values compare exactly
    assert search(data_dir, "--field", "PID-5=DOE^JOHN") == ["BAD", "LAB"]
    assert search(data_dir, "--field", "PID-5.1=") == []
    assert len(search(data_dir, "--field", "PID-30=")) == 5  # an absent field is empty
    assert search(data_dir, "--field", "PID-5.1=DOE", "--status", "received", "--until", "1h") == [
        "ADMIT",
        "OLD",
    ]
    result = list_result(data_dir, "--field", "PID-5.1=DOE", "--listener", "adt-in")
    assert control_ids([json.loads(line) for line in result.stdout.splitlines()]) == [
        "BAD",
        "ADMIT",
    ]
    assert result.stderr.strip() == "scanned 3 message(s), 2 matched"


def test_contains_is_any_case_and_logs_nothing(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert search(data_dir, "--contains", "penicillin") == ["UPDATE"]
    assert search(data_dir, "--contains", "ALLERGY to pen") == ["UPDATE"]
    assert search(data_dir, "--contains", "penicillin", "--type", "ORU") == []
    assert search(data_dir, "--contains", "doe^j", "--field", "PID-3.1=P3") == ["BAD", "LAB"]
    assert search(data_dir, "--contains", "aspirin") == []
    result = list_result(data_dir, "--contains", "Penicillin")
    assert result.stderr.strip() == "scanned 5 message(s), 1 matched"
    table = run("messages", "list", "--data-dir", str(data_dir), "--contains", "penicillin")
    assert "UPDATE" in plain(table.stdout) and "1 message(s)" in plain(table.stdout)
    assert "PENICILLIN" not in caplog.text.upper() and "DOE" not in caplog.text


def test_contains_reads_text_decoded_from_its_character_set(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    latin = make_adt("LATIN", name="MÜLLER^JÖRG", charset="8859/1").encode("iso-8859-1")
    undeclared = make_adt("UNDECLARED", name="MÜLLER^ANNA").encode("iso-8859-1")
    utf8 = make_adt("UTF8", name="Müller^Hans").encode()
    other = make_adt("OTHER", name="MULLER^JO").encode()
    folder = tmp_path / "store"
    insert(folder, [stored(raw, at=now) for raw in (latin, undeclared, utf8, other)])
    assert search(folder, "--contains", "müller") == ["UTF8", "UNDECLARED", "LATIN"]
    assert search(folder, "--contains", "MÜLLER^J") == ["LATIN"]
    assert search(folder, "--field", "PID-5.2=JÖRG") == ["LATIN"]


def test_content_search_reads_page_after_page_and_stops_at_the_limit(tmp_path: Path) -> None:
    """1,200 messages, three with the word looked for: the newest at 1,100 (the first page of
    500, newest first), then 650 (the second) and 100 (the third)."""
    now = datetime.now(UTC)
    count = 1_200
    assert count > 2 * SEARCH_PAGE
    needles = {100, 650, 1_100}
    folder = tmp_path / "store"
    insert(
        folder,
        [
            adt(
                f"N{i:04d}",
                at=now - timedelta(seconds=count - i),
                patient_id=f"P{i}",
                note="a NEEDLE here" if i in needles else "hay",
            )
            for i in range(count)
        ],
    )
    one = list_result(folder, "--contains", "needle", "--limit", "1")
    assert one.stderr.splitlines()[0] == "scanned 500 message(s), 1 matched"
    two = list_result(folder, "--contains", "needle", "--limit", "2")
    assert two.stderr.splitlines()[0] == "scanned 1,000 message(s), 2 matched"
    assert search(folder, "--contains", "needle", "--limit", "2") == ["N1100", "N0650"]
    every = list_result(folder, "--contains", "needle")
    assert every.stderr.strip() == "scanned 1,200 message(s), 3 matched"
    assert search(folder, "--contains", "needle") == ["N1100", "N0650", "N0100"]
    assert search(folder, "--field", "MSH-10=N0003") == ["N0003"]
    # Without content filters the limit goes into the SQL, past one page too.
    assert len(search(folder, "--limit", "700")) == 700


def test_store_search_reads_pages_of_the_size_asked_for(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    folder = tmp_path / "store"
    ids = insert(
        folder,
        [
            adt(f"S{i:02d}", at=now - timedelta(minutes=60 - i), note="x" if i % 10 == 3 else "y")
            for i in range(60)
        ],
    )
    store = open_store(HubConfig(), folder)
    try:
        pages: list[int] = []
        everything = list(store.search(MessageFilter(), page_size=7, on_page=pages.append))
        assert [m.id for m in everything] == ids[::-1]
        assert pages == [*range(7, 57, 7), 60]  # 7 rows a read, the last read 4
        pages.clear()
        content = MessageFilter(fields=(FieldMatch.parse("NTE-3=x"),))
        found = list(store.search(content, limit=4, page_size=7, on_page=pages.append))
        assert [m.control_id for m in found] == ["S53", "S43", "S33", "S23"]
        assert pages == [7, 14, 21, 28, 35, 42]  # S23 is the 37th newest: no read after it
        pages.clear()
        windowed = MessageFilter(
            since=now - timedelta(minutes=30), until=now - timedelta(minutes=20)
        )
        found = list(store.search(windowed, page_size=7, on_page=pages.append))
        assert [m.control_id for m in found] == [f"S{i}" for i in range(39, 29, -1)]
        assert pages == [7, 10]  # only the ids of the window are read
        assert store.find(limit=3) == everything[:3]
    finally:
        store.close()


@pytest.mark.parametrize(
    "filters",
    [
        MessageFilter(),
        MessageFilter(message_type="ADT"),
        MessageFilter(message_type="ADT", event="A01"),
        MessageFilter(status="failed", contains="x"),
        MessageFilter(since=datetime(2026, 1, 1, tzinfo=UTC), until=datetime.now(UTC)),
        MessageFilter(listener="adt-in", sending_application="LAB", control_id="X"),
    ],
)
def test_no_page_of_a_search_sorts_the_store(data_dir: Path, filters: MessageFilter) -> None:
    """Each page must come out of an index in id order. A page SQLite has to sort costs a sort
    of every candidate row, once per page: on a store of a million ADTs, minutes per search."""
    store = open_store(HubConfig(), data_dir)
    statements: list[tuple[str, object]] = []

    def remember(_conn: object, _cursor: object, sql: str, params: object, *_: object) -> None:
        if "ORDER BY" in sql:
            statements.append((sql, params))

    event.listen(store.engine, "before_cursor_execute", remember)
    try:
        list(store.search(filters, page_size=2))
        event.remove(store.engine, "before_cursor_execute", remember)
        assert statements
        with store.engine.connect() as conn:
            for sql, params in statements:
                plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params).all()  # type: ignore[arg-type]
                assert not any("TEMP B-TREE" in row[-1] for row in plan), (sql, plan)
                if filters.since is not None:  # and the ids are bounded below, by the window
                    assert any("rowid>?" in row[-1] for row in plan), (sql, plan)
    finally:
        store.close()


# -- usage errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["list"], ["reprocess"], ["export", "--out", "x"]])
@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--field", "PID5=DOE"], ["'--field'", "'PID5=DOE'", "bad field path"]),
        (["--field", "PID-5.1"], ["'--field'", "'PID-5.1'", "PATH=VALUE"]),
        (["--field", "PID=DOE"], ["'--field'", "'PID=DOE'", "names a segment"]),
        (["--field", "PID-5.1=A", "--field", "X-1=B"], ["'--field'", "'X-1=B'"]),
        (["--sender", "^"], ["'--sender'", "APP^FACILITY"]),
        (["--contains", ""], ["'--contains'"]),
        (["--until", "yesterday"], ["'--until'", "30m, 2h, 7d"]),
        (["--until", "99999999d"], ["'--until'", "calendar"]),
        (["--since", "1h", "--until", "2h"], ["'--until'", "later than --since"]),
        (["--status", "lost"], ["'--status'"]),
        # The forms the list shows (TYPE^EVENT, ID^AUTHORITY), written so they cannot fit.
        (["--type", "ADT^A01", "--event", "A08"], ["'--event'", "'A08'", "ADT^A01"]),
        (["--type", "ADT^A01^ADT_A01"], ["'--type'", "TYPE^EVENT"]),
        (["--type", "^"], ["'--type'", "TYPE^EVENT"]),
        (["--patient", "^HOSP"], ["'--patient'", "ID^AUTHORITY"]),
        (["--patient", "P1^^^HOSP^MR"], ["'--patient'", "ID^AUTHORITY"]),
    ],
)
def test_bad_filters_are_usage_errors_naming_the_option_and_value(
    data_dir: Path, command: list[str], args: list[str], named: list[str]
) -> None:
    result = run("messages", *command, "--data-dir", str(data_dir), *args)
    assert result.exit_code == 2, result.output
    for text in named:
        assert text in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not Path("x").exists()


# -- reprocess ------------------------------------------------------------------------------------
@dataclass
class Routed:
    config: Path
    data_dir: Path
    ids: dict[str, int]

    def cli(self, *args: str, stdin: str | None = None) -> Result:
        full = [*args, "--config", str(self.config), "--data-dir", str(self.data_dir)]
        return CliRunner().invoke(main, full, input=stdin, catch_exceptions=False)

    def runs(self) -> dict[str, int]:
        """The last routing run of each message (0: never routed)."""
        store = open_store(load_config(self.config), self.data_dir, must_exist=True)
        try:
            outbox = Outbox(store)
            return {name: outbox.next_run(i) - 1 for name, i in self.ids.items()}
        finally:
            store.close()

    def statuses(self) -> dict[str, str]:
        store = open_store(load_config(self.config), self.data_dir, must_exist=True)
        try:
            return {m.control_id or "": m.status for m in store.find(limit=None)}
        finally:
            store.close()


@pytest.fixture
def routed(tmp_path: Path) -> Iterator[Routed]:
    """Five messages routed once to a folder: three of them failed since, two delivered."""
    (tmp_path / "routes.yaml").write_text(
        f"""
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - forward: {{channel: file, name: folder, directory: {tmp_path / "out"}}}
""",
        encoding="utf-8",
    )
    config_path = tmp_path / "carehub.yaml"
    config_path.write_text(
        "listeners: {mllp: [], http: {enabled: false}}\nroutes: [routes.yaml]\n", encoding="utf-8"
    )
    data_dir = tmp_path / "data"
    now = datetime.now(UTC)
    names = {"DONE_OLD": 300, "FAILED_OLD": 180, "FAILED_1": 50, "DONE": 40, "FAILED_2": 20}
    batch = [
        adt(name, at=now - timedelta(minutes=age), patient_id=f"P{i}")
        for i, (name, age) in enumerate(names.items())
    ]
    ids = dict(zip(names, insert(data_dir, batch, load_config(config_path)), strict=True))
    setup = Routed(config_path, data_dir, ids)
    first = setup.cli("messages", "reprocess", *map(str, ids.values()))
    assert first.exit_code == 0, first.output
    store = open_store(load_config(config_path), data_dir, must_exist=True)
    try:
        for name, message_id in ids.items():
            status = MessageStatus.FAILED if "FAILED" in name else MessageStatus.DELIVERED
            store.set_status(message_id, status, "test")
    finally:
        store.close()
    assert setup.runs() == dict.fromkeys(names, 1)
    yield setup


def test_reprocess_by_filter_with_yes_routes_the_matches_oldest_first(routed: Routed) -> None:
    result = routed.cli("messages", "reprocess", "--status", "failed", "--since", "2h", "--yes")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    first, second = routed.ids["FAILED_1"], routed.ids["FAILED_2"]
    # Nothing was sent (no worker runs): each new delivery takes the waiting one's place.
    assert lines[0] == "2 message(s) match"
    assert lines[1].startswith(f"message {first} (run 2): care; 1 deliveries queued; in place of")
    assert lines[2].startswith(f"message {second} (run 2): care; 1 deliveries queued; in place")
    assert routed.runs() == {
        "DONE_OLD": 1,
        "FAILED_OLD": 1,
        "FAILED_1": 2,
        "DONE": 1,
        "FAILED_2": 2,
    }
    assert routed.statuses()["FAILED_1"] == "routed"
    assert routed.statuses()["FAILED_OLD"] == "failed"

    by_content = routed.cli("messages", "reprocess", "--field", "PID-3.1=P1", "--yes")
    assert by_content.exit_code == 0, by_content.output
    assert by_content.stderr.strip() == "scanned 5 message(s), 1 matched"
    assert routed.runs()["FAILED_OLD"] == 2

    newest = routed.cli("messages", "reprocess", "--type", "ADT", "--limit", "1", "--yes")
    assert newest.exit_code == 0, newest.output
    assert routed.runs()["FAILED_2"] == 3 and routed.runs()["DONE"] == 1


def test_reprocess_dry_run_lists_and_changes_nothing(routed: Routed) -> None:
    result = routed.cli("messages", "reprocess", "--status", "failed", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    expected = [routed.ids[n] for n in ("FAILED_OLD", "FAILED_1", "FAILED_2")]
    assert [int(line.split("\t")[0]) for line in lines[:3]] == expected  # oldest first
    assert [line.split("\t")[2:] for line in lines[:3]] == [
        ["ADT^A01", name, "failed"] for name in ("FAILED_OLD", "FAILED_1", "FAILED_2")
    ]
    assert lines[3:] == [
        "3 message(s) match",
        "dry run: 3 message(s) would be reprocessed; nothing changed",
    ]
    by_id = routed.cli("messages", "reprocess", str(routed.ids["DONE"]), "--dry-run")
    assert by_id.exit_code == 0, by_id.output
    assert by_id.stdout.splitlines()[0].startswith(f"{routed.ids['DONE']}\t")
    assert routed.runs() == dict.fromkeys(routed.ids, 1)
    assert set(routed.statuses().values()) == {"failed", "delivered"}


def test_reprocess_by_filter_asks_first(routed: Routed) -> None:
    declined = routed.cli("messages", "reprocess", "--status", "failed", stdin="n\n")
    assert declined.exit_code == 1
    assert "3 message(s) match" in declined.stdout
    assert "Reprocess 3 message(s)? [y/N]" in declined.stdout
    assert "Aborted" in declined.output
    assert routed.runs() == dict.fromkeys(routed.ids, 1)

    accepted = routed.cli("messages", "reprocess", "--status", "failed", stdin="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert routed.runs() == {
        "DONE_OLD": 1,
        "FAILED_OLD": 2,
        "FAILED_1": 2,
        "DONE": 1,
        "FAILED_2": 2,
    }

    nothing = routed.cli("messages", "reprocess", "--status", "refused")
    assert nothing.exit_code == 0, nothing.output
    assert nothing.stdout == "0 message(s) match\n"  # no question when there is nothing to do


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["1", "--status", "failed"], "give message ids or filters, not both"),
        (["1", "--contains", "x"], "give message ids or filters, not both"),
        ([], "give message ids, or filters"),
        (["--yes", "--dry-run"], "give message ids, or filters"),
        (["--limit", "3"], "give message ids, or filters"),
        (["--type", ""], "give message ids, or filters"),  # an empty value selects nothing
        (["1", "--limit", "3"], "--limit goes with filters"),
    ],
)
def test_reprocess_needs_ids_or_filters_but_not_both(
    routed: Routed, args: list[str], said: str
) -> None:
    result = routed.cli("messages", "reprocess", *args)
    assert result.exit_code == 2, result.output
    assert said in result.stderr
    assert routed.runs() == dict.fromkeys(routed.ids, 1)


def test_reprocess_by_id_checks_every_id_before_changing_anything(routed: Routed) -> None:
    done = routed.ids["DONE"]
    missing = routed.cli("messages", "reprocess", str(done), "999999")
    assert missing.exit_code == 2
    assert "no message with id 999999" in missing.stderr
    assert routed.runs()["DONE"] == 1
    again = routed.cli("messages", "reprocess", str(done))
    assert again.exit_code == 0, again.output
    assert f"message {done} (run 2): care; 1 deliveries queued" in again.stdout
    assert "match" not in again.stdout  # no count, no question: the ids say what to do


# -- export ---------------------------------------------------------------------------------------
ODD_BYTES = {
    # CR LF between segments, as some senders write them.
    "CRLF": make_adt("CRLF", terminator="\r\n").encode(),
    # ISO-8859-1 declared in MSH-18, and not valid UTF-8.
    "LATIN": make_adt("LATIN", name="MÜLLER^JÖRG", charset="8859/1").encode("iso-8859-1"),
    # ISO-8859-1 nobody declared, LF line ends, and a trailing blank line.
    "UNDECLARED": (make_adt("UNDECLARED", name="GARÇON^RENÉ", terminator="\n") + "\n").encode(
        "iso-8859-1"
    ),
    # Text after the last segment terminator.
    "PLAIN": make_adt("PLAIN").encode() + b"\x1a",
}


@pytest.fixture
def odd_store(tmp_path: Path) -> tuple[Path, dict[int, bytes]]:
    now = datetime.now(UTC)
    folder = tmp_path / "store"
    batch = [
        stored(raw, at=now - timedelta(minutes=9 - i)) for i, raw in enumerate(ODD_BYTES.values())
    ]
    ids = insert(folder, batch)
    return folder, dict(zip(ids, ODD_BYTES.values(), strict=True))


def export(folder: Path, out: Path, *args: str) -> Result:
    return run("messages", "export", "--out", str(out), "--data-dir", str(folder), *args)


def test_export_writes_the_bytes_as_stored(tmp_path: Path, odd_store: tuple[Path, dict]) -> None:
    folder, raws = odd_store
    out = tmp_path / "exported" / "all"  # made, parents too
    result = export(folder, out)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote 4 message(s) to {out}\n"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.hl7" for i in raws)
    for message_id, raw in raws.items():
        assert (out / f"{message_id}.hl7").read_bytes() == raw

    some = tmp_path / "some"
    chosen = export(folder, some, "--contains", "müller")
    assert chosen.exit_code == 0, chosen.output
    assert chosen.stderr.strip() == "scanned 4 message(s), 1 matched"
    (latin_id,) = [i for i, raw in raws.items() if raw == ODD_BYTES["LATIN"]]
    assert [p.name for p in some.iterdir()] == [f"{latin_id}.hl7"]
    assert (some / f"{latin_id}.hl7").read_bytes() == ODD_BYTES["LATIN"]

    newest = export(folder, tmp_path / "newest", "--limit", "1", "--field", "MSH-9.1=ADT")
    assert newest.exit_code == 0 and newest.stdout.startswith("wrote 1 message(s)")
    assert [p.name for p in (tmp_path / "newest").iterdir()] == [f"{max(raws)}.hl7"]

    none = export(folder, tmp_path / "none", "--control-id", "NOT-THERE")
    assert none.exit_code == 0 and none.stdout.startswith("wrote 0 message(s)")


def test_export_refuses_to_overwrite_unless_forced(
    tmp_path: Path, odd_store: tuple[Path, dict]
) -> None:
    folder, raws = odd_store
    out = tmp_path / "out"
    assert export(folder, out).exit_code == 0
    edited = out / f"{min(raws)}.hl7"
    edited.write_bytes(b"edited by hand")
    (newer,) = insert(folder, [stored(make_adt("NEWER").encode(), at=datetime.now(UTC))])

    refused = export(folder, out)
    assert refused.exit_code == 2
    assert "is already there (and 3 more); --force overwrites" in refused.stderr
    assert f"{out}{os.sep}" in refused.stderr and ".hl7" in refused.stderr
    assert edited.read_bytes() == b"edited by hand"
    assert not (out / f"{newer}.hl7").exists()  # nothing at all was written

    only_new = export(folder, out, "--control-id", "NEWER")
    assert only_new.exit_code == 0, only_new.output
    assert (out / f"{newer}.hl7").read_bytes() == make_adt("NEWER").encode()

    forced = export(folder, out, "--force")
    assert forced.exit_code == 0, forced.output
    assert forced.stdout.startswith("wrote 5 message(s)")
    assert edited.read_bytes() == raws[min(raws)]


def test_export_never_overwrites_a_file_that_appears_while_it_runs(
    tmp_path: Path, odd_store: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process writes one of the files after the check for files already there."""
    folder, raws = odd_store
    out = tmp_path / "out"
    theirs = out / f"{max(raws)}.hl7"
    get_many = MessageStore.get_many

    def racing(self: MessageStore, message_ids: list[int]) -> list[StoredMessage]:
        out.mkdir(exist_ok=True)
        theirs.write_bytes(b"theirs")
        return get_many(self, message_ids)

    monkeypatch.setattr(MessageStore, "get_many", racing)
    result = export(folder, out)
    assert result.exit_code == 2
    assert f"{theirs} is already there; --force overwrites" in result.stderr
    assert theirs.read_bytes() == b"theirs"


def test_an_export_replays_with_send(hub: HubThread, tmp_path: Path) -> None:
    """Received over MLLP, exported, and sent again: the file holds what the sender sent."""
    raw = ODD_BYTES["LATIN"].replace(b"\r", b"\r\n")
    (answer,) = mllp_exchange(hub.mllp_address, [raw])
    assert b"MSA|AA|" in answer
    out = tmp_path / "replay"
    result = export(tmp_path / "data", out)
    assert result.exit_code == 0, result.output
    (exported,) = out.iterdir()
    assert exported.read_bytes() == raw
    host, port = hub.mllp_address
    sent = run("send", "--host", host, "--port", str(port), "--timeout", "20", str(exported))
    assert sent.exit_code == 0, sent.output
    assert sent.stdout.strip() == f"{exported}: AA (MSH-10 LATIN)"


# -- the same search on PostgreSQL ------------------------------------------------------------
@pytest.mark.parametrize(
    "store_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_the_search_reads_the_same_on_postgresql(store_url: str) -> None:
    """Every SQL filter (sender by first component, time window, type without event) and a
    content filter, on the database a scale-out deployment uses."""
    now = datetime.now(UTC)
    store = MessageStore(store_url)
    store.migrate()
    try:
        store.insert_messages(
            [
                adt("OLD", at=now - timedelta(days=3), sender=("LAB^2.16.840.1^ISO", "NORTH")),
                adt("ADMIT", at=now - timedelta(hours=4), unit="SOUTH"),
                adt(
                    "LAB",
                    at=now - timedelta(minutes=10),
                    sender=("LAB", "NORTH"),
                    event="R01",
                    message_type="ORU",
                ),
                adt("BAD", at=now, sender=("LABX", "NORTH"), status=MessageStatus.REFUSED),
            ]
        )

        def ids(**filters: object) -> list[str | None]:
            found = store.search(MessageFilter(**filters), limit=None)  # type: ignore[arg-type]
            return [message.control_id for message in found]

        assert ids(sending_application="LAB") == ["LAB", "OLD"]
        assert ids(sending_facility="NORTH", status="refused") == ["BAD"]
        assert ids(message_type="adt") == ["BAD", "ADMIT", "OLD"]
        assert ids(since=now - timedelta(hours=5), until=now - timedelta(minutes=15)) == ["ADMIT"]
        assert ids(control_id="LAB") == ["LAB"]
        assert ids(control_id="BAD") == ["BAD"]  # refused: no identity, found all the same
        assert ids(fields=(FieldMatch.parse("PV1-3.4=SOUTH"),)) == ["ADMIT"]
        assert ids(contains="labx") == ["BAD"]
    finally:
        store.close()


def test_reprocess_leaves_a_rejected_item_alone_and_says_why(routed: Routed) -> None:
    """A frame rejected at intake (not HL7) has nothing a route could read."""
    rejected = NewMessage(
        raw=b"GET / HTTP/1.1",
        transport="mllp",
        listener="adt-in",
        peer="127.0.0.1:5000",
        status=MessageStatus.REJECTED,
        ack_code="AR",
        detail="not an HL7 v2 message",
    )
    (rejected_id,) = insert(routed.data_dir, [rejected], load_config(routed.config))
    result = routed.cli("messages", "reprocess", str(rejected_id), str(routed.ids["DONE"]))
    assert result.exit_code == 1, result.output
    assert f"message {rejected_id}: rejected at intake" in result.stderr
    assert f"message {routed.ids['DONE']} (run 2)" in result.stdout  # the other one still runs


def test_a_listing_cut_by_its_limit_says_there_may_be_more(data_dir: Path) -> None:
    cut = list_result(data_dir, "--limit", "2")
    assert "(the newest 2; there may be more" in cut.stderr
    whole = list_result(data_dir, "--limit", "50")
    assert "there may be more" not in whole.stderr


def test_control_id_is_found_for_every_sender_that_used_it(store_url: str) -> None:
    """One MSH-10 from four senders (one of them an empty facility, one a name that sorts
    between the others' keys), reused by one with other content, and once in a refused
    message: the search by control ID alone finds each, and nothing with a control ID that
    merely begins the same way or belongs to a neighbouring sender."""
    now = datetime.now(UTC)
    store = MessageStore(store_url)
    store.migrate()
    senders = [("ADT", "EAST"), ("ADT", ""), ("ADT", "EAST2"), ("ADTX", "EAST"), ("LAB", "NORTH")]
    try:
        store.insert_messages(
            [
                adt("MSG1", at=now, sender=sender, patient_id=f"P{n}")
                for n, sender in enumerate(senders)
            ]
            + [
                adt("MSG1", at=now, sender=("ADT", "EAST"), patient_id="P9"),  # reused
                adt("MSG10", at=now, sender=("ADT", "EAST")),
                adt("MSG", at=now, sender=("ADT", "EAST")),
                adt("MSG1", at=now, sender=("ZZZ", "Z"), status=MessageStatus.REFUSED),
            ]
        )
        found = list(store.search(MessageFilter(control_id="MSG1"), limit=None))
        assert sorted((m.sending_application, m.sending_facility, m.patient_id) for m in found) == [
            ("ADT", "", "P1"),
            ("ADT", "EAST", "P0"),
            ("ADT", "EAST", "P9"),
            ("ADT", "EAST2", "P2"),
            ("ADTX", "EAST", "P3"),
            ("LAB", "NORTH", "P4"),
            ("ZZZ", "Z", "P1"),
        ]
        assert [m.id for m in found] == sorted((m.id for m in found), reverse=True)
        assert list(store.search(MessageFilter(control_id="MSG2"), limit=None)) == []
    finally:
        store.close()
