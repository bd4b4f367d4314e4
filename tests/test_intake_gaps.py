"""Intake behaviour that worked but had no test that could catch it breaking: `messages show`
of non-ASCII names, HTTP 503 when the store cannot take a write, a bad frame followed by a good
one on one connection, intake without hl7apy, and the SQLAlchemy schema against what the
migrations build. Real sockets, processes and databases. (Ctrl-C on `carehub serve` is tested
beside SIGTERM in test_durability.py.)"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Index, MetaData, String, inspect

import carehub.store.group_commit as group_commit
from carehub.hl7.ack import read_ack
from carehub.hl7.framing import encode_frame
from carehub.hl7.view import MessageView
from carehub.store.schema import metadata
from carehub.store.store import MessageStore
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange, read_frames
from tests import test_store
from tests.test_cli import env_without_carehub, plain
from tests.test_http import ack_of, post
from tests.test_mllp import TIMEOUT, adt, connect

# A fixture of another module, shared by name (assigned, not imported, so the test parameters
# that use it do not shadow an import): a fresh SQLite file or PostgreSQL schema per test.
store_url = test_store.store_url


# -- `messages show` of UTF-8 and ISO-8859-1 names ----------------------------------------
NAME = "Ñúñez^Zoë"


def show(data_dir: Path, message_id: int, *extra: str, cwd: Path) -> str:
    """`carehub messages show` in a real process, its stdout decoded strictly as UTF-8."""
    env = env_without_carehub()
    env["LANG"] = env["LC_ALL"] = "C.UTF-8"
    command = [sys.executable, "-m", "carehub.cli", "messages", "show", str(message_id)]
    done = subprocess.run(
        [*command, *extra, "--data-dir", str(data_dir)],
        capture_output=True,
        timeout=60,
        env=env,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return plain(done.stdout.decode("utf-8"))


@pytest.mark.parametrize(
    ("charset", "encoding", "stored_as"),
    [
        ("UNICODE UTF-8", "utf-8", "utf-8"),
        ("", "utf-8", "utf-8"),
        ("8859/1", "iso-8859-1", "whatwg-windows-1252"),
    ],
)
def test_messages_show_prints_non_ascii_names_as_sent(
    tmp_path: Path, charset: str, encoding: str, stored_as: str
) -> None:
    """A name with ë, Ñ, ú sent over a real MLLP socket, in UTF-8 (declared or not) or in
    ISO-8859-1 declared by MSH-18 `8859/1`, reads back correctly in `carehub messages show`
    (the named PID-5 line and --raw): no mojibake such as "Ã«", no replacement characters."""
    data_dir = tmp_path / "data"
    payload = make_adt("SHOW-NAME", name=NAME, charset=charset).encode(encoding)
    with HubThread(local_config(), data_dir) as hub:
        (answer,) = mllp_exchange(hub.mllp_address, [payload], timeout=TIMEOUT)
        assert read_ack(answer.decode(encoding))[:2] == ("AA", "SHOW-NAME")
        (stored,) = hub.store.find()
        assert (stored.raw, stored.charset) == (payload, stored_as)

        out = show(data_dir, stored.id, cwd=tmp_path)
        assert re.search(r"PID-5\s+Patient Name\s+Ñúñez\^Zoë", out), out
        assert re.search(rf"size\s+[\d,]+ bytes, {stored_as}", out), out
        raw = show(data_dir, stored.id, "--raw", cwd=tmp_path)
        assert "|Ñúñez^Zoë|" in raw, raw
    for text in (out, raw):
        assert "Ã" not in text and "\ufffd" not in text


# -- HTTP 503 when the store cannot take the write ----------------------------------------
def hold_sqlite_write_lock(data_dir: Path) -> sqlite3.Connection:
    """Another connection (as a CLI command or a second process would) takes SQLite's write
    lock and keeps it until the caller rolls back."""
    holder = sqlite3.connect(data_dir / "carehub.db", isolation_level=None, timeout=5)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def metric_line(hub: HubThread, outcome: str) -> str | None:
    response = httpx.get(f"{hub.http_url}/metrics", timeout=TIMEOUT)
    prefix = f'carehub_intake_messages_total{{listener="http",outcome="{outcome}"}} '
    return next((line for line in response.text.splitlines() if line.startswith(prefix)), None)


def check_503_then_resend_stored(hub: HubThread, body: bytes, control_id: str) -> None:
    """The POST answered 503 with an AE ACK asking for a resend; nothing was stored."""
    response = post(hub, body)
    assert response.status_code == 503, response.text
    code, echoed, text = ack_of(response)
    assert (code, echoed) == ("AE", control_id)
    assert "store is unavailable" in text and "resend" in text
    assert metric_line(hub, "store_error") is not None


@pytest.mark.parametrize("durability", ["power", "process"])
def test_http_answers_503_and_ae_while_another_process_holds_the_sqlite_write_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """While another connection holds SQLite's write lock longer than intake will wait, POST
    /hl7 answers 503 with an AE ACK ("store is unavailable ... resend") and stores nothing; once
    the lock is let go the resend gets 200 AA and is stored once.

    durability=power commits on a writer thread that waits SQLite's busy timeout of a serving
    hub (2 s) and gets "database is locked": nothing is faked. durability=process (the default)
    commits on the event loop and retries for group_commit.LOCK_PATIENCE (30 s); that constant
    is lowered to 1 s here only so the test does not take 30 s; the lock held is still real."""
    if durability == "process":
        monkeypatch.setattr(group_commit, "LOCK_PATIENCE", 1.0)
    config = local_config()
    config.store.durability = durability
    data_dir = tmp_path / "data"
    body = make_adt("LOCKED-1").encode()
    with HubThread(config, data_dir) as hub:
        holder = hold_sqlite_write_lock(data_dir)
        try:
            check_503_then_resend_stored(hub, body, "LOCKED-1")
            assert hub.store.count() == 0
        finally:
            holder.rollback()
            holder.close()
        response = post(hub, body)
        assert response.status_code == 200, response.text
        assert ack_of(response)[:2] == ("AA", "LOCKED-1")
        assert hub.store.control_id_counts() == {"LOCKED-1": 1}


@pytest.mark.parametrize(
    "store_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_http_answers_503_when_postgresql_drops_the_intake_connection(
    tmp_path: Path, store_url: str
) -> None:
    """PostgreSQL ends the hub's connections (a restart or failover does this): the message
    being stored at that moment gets 503 with an AE ACK and is not stored; the resend gets 200
    AA on a new connection. The connections are ended for real with pg_terminate_backend,
    picked by an application_name unique to this test so no other test is touched."""
    application = f"carehub_503_{uuid.uuid4().hex[:12]}"
    config = local_config()
    config.store.url = f"{store_url}&application_name={application}"
    with HubThread(config, tmp_path / "data") as hub:
        first = post(hub, make_adt("PG-BEFORE").encode())
        assert first.status_code == 200, first.text  # intake's connection is open now
        with test_store.pg_admin() as admin:
            ended = admin.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (application,),
            ).fetchone()
        assert ended is not None and ended[0] >= 1
        body = make_adt("PG-DROPPED").encode()
        check_503_then_resend_stored(hub, body, "PG-DROPPED")
        assert hub.store.control_id_counts() == {"PG-BEFORE": 1}
        again = post(hub, body)
        assert again.status_code == 200, again.text
        assert ack_of(again)[:2] == ("AA", "PG-DROPPED")
        assert hub.store.control_id_counts() == {"PG-BEFORE": 1, "PG-DROPPED": 1}


# -- a frame without MSH, then a good one, on one connection ------------------------------
@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "in-one-send"])
def test_frame_without_msh_then_good_frame_on_one_connection(
    hub: HubThread, together: bool
) -> None:
    """On one MLLP connection a frame with no MSH gets AR, and the good frame after it gets AA,
    answered in that order (sent one by one or in one write), and the connection stays open: a
    third message on it is still answered AA."""
    junk, good = b"HELLO WORLD\r", adt("AFTER-JUNK")
    with connect(hub) as sock:
        if together:
            sock.sendall(encode_frame(junk) + encode_frame(good))
            answers = read_frames(sock, 2, TIMEOUT)
        else:
            answers = []
            for payload in (junk, good):
                sock.sendall(encode_frame(payload))
                answers += read_frames(sock, 1, TIMEOUT)
        acks = [MessageView(a.decode()) for a in answers]
        assert [(a.get("MSA-1"), a.get("MSA-2")) for a in acks] == [
            ("AR", ""),
            ("AA", "AFTER-JUNK"),
        ]
        assert "no MSH segment" in acks[0].get("ERR-8")
        sock.sendall(encode_frame(adt("STILL-OPEN")))
        (third,) = read_frames(sock, 1, TIMEOUT)
        assert read_ack(third.decode())[:2] == ("AA", "STILL-OPEN")
    stored = sorted((m.id, m.status, m.control_id) for m in hub.store.find())
    assert [(s, c) for _, s, c in stored] == [
        ("rejected", None),
        ("received", "AFTER-JUNK"),
        ("received", "STILL-OPEN"),
    ]


# -- intake never builds an hl7apy tree ---------------------------------------------------
def forbid_hl7apy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every hl7apy parse function, and building any hl7apy element, raise; returns the
    list each attempt is recorded in. Names that carehub modules imported from hl7apy.parser
    (``from hl7apy.parser import parse_message``) are replaced as well."""
    import hl7apy.core
    import hl7apy.parser

    calls: list[str] = []

    def forbidden(name: str) -> Callable[..., Any]:
        def refuse(*_args: Any, **_kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"intake called hl7apy {name}")

        return refuse

    originals = {
        name: value
        for name, value in vars(hl7apy.parser).items()
        if callable(value) and (name.startswith("parse_") or name == "get_message_info")
    }
    assert {"parse_message", "parse_segment"} <= originals.keys()
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("carehub", "hl7apy")):
            continue
        for name, value in list(vars(module).items()):
            if name in originals and value is originals[name]:
                monkeypatch.setattr(module, name, forbidden(name))
    for cls in (
        hl7apy.core.Element,
        hl7apy.core.Message,
        hl7apy.core.Group,
        hl7apy.core.Segment,
        hl7apy.core.Field,
        hl7apy.core.Component,
        hl7apy.core.SubComponent,
    ):
        monkeypatch.setattr(cls, "__init__", forbidden(f"{cls.__name__}()"))
    return calls


def test_intake_stores_and_acks_without_hl7apy(
    hub: HubThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Intake reads headers through the lazy MessageView only: with hl7apy's parse_message,
    parse_segment (and the rest) and its element classes made to raise, MLLP and HTTP intake
    still store the message and answer AA (AE, AR alike), and nothing called hl7apy. A change
    that put hl7apy on the intake path (tens of ms per message) fails here."""
    calls = forbid_hl7apy(monkeypatch)
    import hl7apy.parser

    with pytest.raises(AssertionError, match="parse_message"):  # the trap is really set
        hl7apy.parser.parse_message(make_adt("TRAP"))
    calls.clear()

    answers = mllp_exchange(
        hub.mllp_address,
        [adt("NO-HL7APY-1"), adt(""), b"NOT HL7\r"],
        timeout=TIMEOUT,
    )
    assert [read_ack(a.decode())[:2] for a in answers] == [
        ("AA", "NO-HL7APY-1"),
        ("AE", ""),
        ("AR", ""),
    ]
    response = post(hub, make_adt("NO-HL7APY-2").encode())
    assert response.status_code == 200 and ack_of(response)[:2] == ("AA", "NO-HL7APY-2")
    assert calls == []
    stored = {m.control_id: m for m in hub.store.find(status="received")}
    assert set(stored) == {"NO-HL7APY-1", "NO-HL7APY-2"}
    assert stored["NO-HL7APY-1"].raw == adt("NO-HL7APY-1")
    assert sorted(m.status for m in hub.store.find()) == [
        "received",
        "received",
        "refused",
        "rejected",
    ]


# -- the SQLAlchemy schema matches what the migrations build ------------------------------
def schema_differences(connection: Any, target: MetaData) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return compare_metadata(context, target)


def predicate(text: str | None) -> tuple[frozenset[str], frozenset[str]] | None:
    """A partial index's WHERE reduced to (columns, quoted literals): SQLite gives back the text
    as written, PostgreSQL its own rendering (``((status)::text = ANY (ARRAY['pending'::...``)."""
    if not text:
        return None
    literals = frozenset(re.findall(r"'([^']*)'", text))
    bare = re.sub(r"'[^']*'|::[\w ]+(\[\])?", " ", text)
    bare = re.sub(r"\b[A-Za-z_]\w*\.(?=[A-Za-z_])", "", bare)  # deliveries.status -> status
    words = set(re.findall(r"[A-Za-z_]\w*", bare))
    columns = frozenset(w for w in words if w.lower() not in {"and", "or", "in", "any", "array"})
    return columns, literals


def index_predicates(connection: Any, dialect: str) -> dict[tuple[str, str], Any]:
    found: dict[tuple[str, str], Any] = {}
    inspector = inspect(connection)
    for table in metadata.tables:
        for index in inspector.get_indexes(table):
            where = index.get("dialect_options", {}).get(f"{dialect}_where")
            found[table, str(index["name"])] = predicate(str(where) if where is not None else None)
    return found


def test_schema_matches_what_the_migrations_build(store_url: str) -> None:
    """A database migrated to head (whatever the newest migration is) and schema.py's
    ``metadata`` describe the same tables, columns, types, nullability, defaults, indexes,
    unique constraints and foreign keys (alembic autogenerate finds nothing to do), on SQLite
    and on PostgreSQL. Partial indexes' WHERE clauses, which autogenerate does not compare,
    are checked separately. A migration forgotten for a schema.py change (or the reverse)
    fails here."""
    store = MessageStore(store_url)
    try:
        store.migrate()
        dialect = store.engine.dialect.name
        with store.engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            assert set(metadata.tables) <= tables, set(metadata.tables) - tables
            assert schema_differences(connection, metadata) == []

            # The comparison is live: a type drift on one column is reported.
            drifted = MetaData()
            for table in metadata.tables.values():
                table.to_metadata(drifted)
            drifted.tables["messages"].c.status.type = String(40)
            assert any(
                diff[0][0] == "modify_type" and diff[0][3] == "status"
                for diff in schema_differences(connection, drifted)
                if isinstance(diff, list)
            )

            reflected = index_predicates(connection, dialect)
        for table in metadata.tables.values():
            for index in table.indexes:
                assert isinstance(index, Index)
                where = index.dialect_options[dialect].get("where")
                expected = predicate(str(where) if where is not None else None)
                assert reflected.get((table.name, str(index.name)), "missing") == expected, (
                    f"{table.name}.{index.name}: WHERE differs between schema.py and migrations"
                )
    finally:
        store.close()
