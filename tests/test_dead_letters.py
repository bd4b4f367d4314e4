"""Dead letters by destination: list one destination's, and retry them once it is back up,
leaving every other destination's dead letters where they are. Real hub, real HTTP servers."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from carehub.cli import main
from carehub.config import load_config
from carehub.store.outbox import Outbox
from carehub.testing import HubThread, make_adt
from tests.helpers_http import HTTPServer, wait_for
from tests.test_cli import plain
from tests.test_worker import FAST_RETRY, all_status, send, write_config

ROUTES = """
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: a, url: {a}, retry: {retry}}}
      - forward: {{channel: webhook, name: b, url: {b}, retry: {retry}}}
"""


@pytest.fixture
def servers() -> Iterator[tuple[HTTPServer, HTTPServer]]:
    with HTTPServer(lambda _: 400) as a, HTTPServer(lambda _: 400) as b:
        yield a, b


def table_cells(out: str) -> list[list[str]]:
    """The cells of a rich table's header and rows, as printed."""
    lines = [line for line in plain(out).splitlines() if "│" in line or "┃" in line]
    return [[cell.strip() for cell in re.split("[│┃]", line)] for line in lines]


def run(config: Path, data_dir: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [*args, "--config", str(config), "--data-dir", str(data_dir)])
    return result.exit_code, result.stdout, result.stderr


def test_retry_one_destinations_dead_letters(
    tmp_path: Path, servers: tuple[HTTPServer, HTTPServer]
) -> None:
    a, b = servers
    routes = ROUTES.format(a=a.url(), b=b.url(), retry=FAST_RETRY % 1)
    config = write_config(tmp_path, routes)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [make_adt("DD-1", patient_id="P1"), make_adt("DD-2", patient_id="P2")])
        wait_for(lambda: all_status(hub.store, 2, "failed"), what="both messages failed")

        code, out, _ = run(config, data_dir, "dead-letters", "list", "--json")
        assert code == 0
        assert sorted(json.loads(line)["destination"] for line in out.splitlines()) == [
            "care/a",
            "care/a",
            "care/b",
            "care/b",
        ]
        code, out, _ = run(
            config, data_dir, "dead-letters", "list", "--json", "--destination", "care/a"
        )
        assert code == 0
        assert [json.loads(line)["destination"] for line in out.splitlines()] == ["care/a"] * 2

        # A list cut at --limit says how many there are in all, in the table and beside JSON.
        code, out, _ = run(config, data_dir, "dead-letters", "list", "--limit", "3")
        assert code == 0 and "3 of 4 delivery(ies) shown (--limit N shows more)" in plain(out)
        code, out, _ = run(config, data_dir, "dead-letters", "list", "--limit", "4")
        assert "4 delivery(ies)" in plain(out) and " of " not in plain(out).splitlines()[-1]
        code, out, err = run(config, data_dir, "dead-letters", "list", "--json", "--limit", "1")
        assert len(out.splitlines()) == 1 and "1 of 4 shown" in err

        code, out, err = run(config, data_dir, "dead-letters", "list", "--destination", "care/c")
        assert code == 2  # a name no route and no delivery has is a mistake, as for pause
        assert "unknown destination 'care/c'; the routes have: care/a, care/b" in err

        a.respond = lambda _: 200
        code, out, _ = run(config, data_dir, "dead-letters", "retry", "--destination", "care/a")
        assert code == 0, out
        assert "2 dead letter(s) queued again" in out
        wait_for(lambda: len(a.ok()) == 2, what="care/a sent both again")
        code, out, _ = run(config, data_dir, "dead-letters", "list", "--json")
        assert [json.loads(line)["destination"] for line in out.splitlines()] == ["care/b"] * 2
        assert len(b.requests) == 2  # b was tried once a message, and not again

        code, out, err = run(config, data_dir, "dead-letters", "retry", "--destination", "care/a")
        assert code == 1
        assert "0 dead letter(s) queued again" in out
        assert "dead letters are waiting for: care/b (2)" in err


@pytest.mark.parametrize(
    "args",
    [
        ["dead-letters", "retry"],
        ["dead-letters", "retry", "5", "--all"],
        ["dead-letters", "retry", "--all", "--destination", "care/a"],
        ["dead-letters", "retry", "5", "--destination", "care/a"],
    ],
)
def test_retry_takes_ids_or_all_or_one_destination(tmp_path: Path, args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "name delivery ids, or pass --all, or --destination; only one" in result.output


def test_discard_gives_up_for_good_and_lets_the_held_ones_go(
    tmp_path: Path, servers: tuple[HTTPServer, HTTPServer]
) -> None:
    """A refusal (HTTP 400) makes a dead letter at once; it holds its patient's line on that
    destination until discarded, which asks first with --destination and records who."""
    a, b = servers
    routes = ROUTES.format(a=a.url(), b=b.url(), retry=FAST_RETRY % 1)
    config = write_config(tmp_path, routes)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [make_adt("DD-1", patient_id="P1"), make_adt("DD-2", patient_id="P2")])
        wait_for(lambda: all_status(hub.store, 2, "failed"), what="both messages failed")
        a.respond = lambda _: 200
        send(hub, [make_adt("DD-3", "A03", patient_id="P1")])  # held on a and on b
        wait_for(lambda: len(hub.store.find(limit=None)) == 3, what="the A03 stored")
        wait_for(
            lambda: sum(Outbox(hub.store).held().values()) == 2, what="the A03 held on a and b"
        )
        assert a.ok() == []

        code, out, _ = run(config, data_dir, "dead-letters", "list", "--destination", "care/a")
        assert code == 0
        p1_dead = [d for d in Outbox(hub.store).find(status="dead") if d.order_key.endswith("P1")]
        held_on_a = next(d for d in p1_dead if d.destination == "care/a")
        assert f"#{held_on_a.id} holds 1" in out
        code, out, _ = run(config, data_dir, "status")
        assert "2 delivery(ies) held behind dead letters" in out

        discard = ["dead-letters", "discard", "--destination", "care/a", "--by", "tester"]
        where = ["--config", str(config), "--data-dir", str(data_dir)]
        result = CliRunner().invoke(main, [*discard, *where], input="n\n")
        assert result.exit_code == 1  # asked, and told no: nothing changed
        assert "discard 2 dead letter(s) of care/a for good" in result.output
        assert len(Outbox(hub.store).find(status="dead")) == 4

        result = CliRunner().invoke(main, [*discard, "--reason", "INC-42", *where], input="y\n")
        assert result.exit_code == 0, result.output
        assert "2 dead letter(s) discarded; they stay in the store" in result.output
        assert "1 delivery(ies) held behind them go on" in result.output
        wait_for(lambda: len(a.ok()) == 1, what="the held A03 sent to care/a")
        assert len(b.requests) == 2  # b keeps its dead letters, and holds P1's A03

        code, out, _ = run(config, data_dir, "dead-letters", "list", "--json", "--discarded")
        listed = [json.loads(line) for line in out.splitlines()]
        assert {(d["destination"], d["status"]) for d in listed} == {("care/a", "discarded")}
        code, out, _ = run(config, data_dir, "dead-letters", "list", "--json")
        assert [json.loads(line)["destination"] for line in out.splitlines()] == ["care/b"] * 2
        code, out, _ = run(config, data_dir, "messages", "show", str(held_on_a.message_id))
        assert "discarded by tester (carehub dead-letters discard): INC-42" in out

        code, out, err = run(config, data_dir, "dead-letters", "discard", str(held_on_a.id))
        assert code == 1
        assert f"delivery {held_on_a.id}: discarded, not a dead letter; left as it is" in err


def test_the_discarded_list_says_when_by_whom_and_why(
    tmp_path: Path, servers: tuple[HTTPServer, HTTPServer]
) -> None:
    """`list --discarded` shows the discard (when, who, the reason given), not only the send
    error the delivery died of; --json has the same."""
    a, b = servers
    routes = ROUTES.format(a=a.url(), b=b.url(), retry=FAST_RETRY % 1)
    config = write_config(tmp_path, routes)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [make_adt("DD-1", patient_id="P1")])
        wait_for(lambda: all_status(hub.store, 1, "failed"), what="the message failed")
        dead = {d.destination: d.id for d in Outbox(hub.store).find(status="dead")}
        assert dead == {"care/a": 1, "care/b": 2}
        before = datetime.now(UTC).replace(microsecond=0)

        by_alice = ["--by", "alice", "--reason", "INC-42"]
        code, out, _ = run(config, data_dir, "dead-letters", "discard", "1", *by_alice)
        assert code == 0, out
        code, out, _ = run(config, data_dir, "dead-letters", "discard", "2", "--by", "bob")
        assert code == 0, out

    code, out, _ = run(config, data_dir, "dead-letters", "list", "--discarded")
    assert code == 0, out
    header, *rows = table_cells(out)
    assert header[5:] == ["discarded (UTC)", "by", "reason", "last send error"]
    shown = {row[2]: dict(zip(header, row, strict=True)) for row in rows}
    assert sorted(shown) == ["care/a", "care/b"]
    assert (shown["care/a"]["by"], shown["care/a"]["reason"]) == ("alice", "INC-42")
    assert (shown["care/b"]["by"], shown["care/b"]["reason"]) == ("bob", "")
    for row in shown.values():
        when = datetime.fromisoformat(row["discarded (UTC)"]).replace(tzinfo=UTC)
        assert before <= when <= datetime.now(UTC)
        assert "HTTP 400" in row["last send error"]  # what it died of, under its own name

    code, out, _ = run(config, data_dir, "dead-letters", "list", "--discarded", "--json")
    assert code == 0, out
    listed = {d["destination"]: d for d in map(json.loads, out.splitlines())}
    assert (listed["care/a"]["discarded_by"], listed["care/a"]["discard_reason"]) == (
        "alice",
        "INC-42",
    )
    assert (listed["care/b"]["discarded_by"], listed["care/b"]["discard_reason"]) == ("bob", None)
    for record in listed.values():
        assert before <= datetime.fromisoformat(record["discarded_at"]) <= datetime.now(UTC)
        assert "HTTP 400" in record["last_error"]


@pytest.mark.parametrize(
    "args",
    [
        ["dead-letters", "discard"],
        ["dead-letters", "discard", "5", "--destination", "care/a"],
    ],
)
def test_discard_takes_ids_or_one_destination(tmp_path: Path, args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "name delivery ids, or pass --destination; only one" in result.output
