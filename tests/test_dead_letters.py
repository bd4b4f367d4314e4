"""Dead letters by destination: list one destination's, and retry them once it is back up,
leaving every other destination's dead letters where they are. Real hub, real HTTP servers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from carehub.cli import main
from carehub.config import load_config
from carehub.testing import HubThread, make_adt
from tests.helpers_http import HTTPServer, wait_for
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

        code, out, err = run(config, data_dir, "dead-letters", "list", "--destination", "care/c")
        assert code == 0
        assert "no dead letters for destination 'care/c'" in err
        assert "care/a (2), care/b (2)" in err

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
