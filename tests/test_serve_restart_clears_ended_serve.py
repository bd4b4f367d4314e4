"""A `carehub serve` killed (kill -9, a power cut) cannot remove its row from the store's list
of processes. On a SQLite store the next serve takes the store's lock, which only one serve
holds and which the kernel lets go of when a process ends: the earlier serves of its host on
that store are then known to be gone, and `carehub status` must not list one as "not
answering" for a week. Processes that lock does not speak for are left as they are: another
host's, a `carehub worker`, and every process on a PostgreSQL store, which many hosts and data
dirs share.

Real `carehub serve` processes, killed with SIGKILL, and `carehub status` as the operator runs
it; the hub in this process for the rows the lock does not cover."""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from carehub.config import load_config
from carehub.hub import open_store
from carehub.store.processes import release_name, running_processes
from carehub.store.schema import hub_processes
from carehub.store.store import MessageStore
from carehub.testing import HubThread
from tests import test_store
from tests.helpers_cli import carehub
from tests.helpers_http import CarehubProcess
from tests.test_dead_letter_order import TWO_TRIES, hub_config

store_url = test_store.store_url

#: Nothing is sent in these tests: the routes only need a destination.
NOWHERE = "http://127.0.0.1:9/hook"


def serves(config: Path, data_dir: Path) -> list[dict[str, Any]]:
    """The serve rows `carehub status --json` lists."""
    result = carehub("status", "--json", "--config", str(config), "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return [p for p in json.loads(result.stdout)["processes"] if p["role"] == "serve"]


def test_the_serve_started_after_a_kill_lists_only_itself(tmp_path: Path) -> None:
    config = hub_config(tmp_path, NOWHERE, TWO_TRIES)
    data_dir = tmp_path / "data"
    args = ["serve", "--config", str(config), "--data-dir", str(data_dir)]
    with CarehubProcess(args, tmp_path / "logs", "first") as first:
        first.wait_ready()
        killed = first.process.pid
        first.kill()  # SIGKILL: its row stays behind
    assert [p["pid"] for p in serves(config, data_dir)] == [killed]

    with CarehubProcess(args, tmp_path / "logs", "second") as second:
        second.wait_ready()
        [only] = serves(config, data_dir)
        assert (only["pid"], only["answering"]) == (second.process.pid, True)
        assert (
            f"serve on this host (pid {killed}), last heard from at " in second.stderr
            and "ended without removing its row" in second.stderr
        ), second.stderr
        assert second.terminate() == 0
    assert serves(config, data_dir) == []


def add_row(store: MessageStore, role: str, host: str, pid: int) -> None:
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        conn.execute(
            insert(hub_processes).values(
                id=f"{role}-{host}-{pid}",
                role=role,
                host=host,
                pid=pid,
                version=release_name(),
                started_at=now,
                last_seen=now,
                routes=None,
                routes_loaded_at=now,
                partitions=None,
            )
        )


def earlier_rows(tmp_path: Path, url: str | None) -> tuple[Path, Path]:
    """A store (SQLite in the data dir, or ``url``) holding the rows of processes that did
    not stop cleanly: a serve and a worker of this host, a serve of another host."""
    config = hub_config(tmp_path, NOWHERE, TWO_TRIES, url)
    data_dir = tmp_path / "data"
    store = open_store(load_config(config), data_dir)
    try:
        add_row(store, "serve", socket.gethostname(), 4_000_001)
        add_row(store, "worker", socket.gethostname(), 4_000_002)
        add_row(store, "serve", "another-host", 4_000_003)
    finally:
        store.close()
    return config, data_dir


def rows(store: MessageStore) -> set[tuple[str, str, int]]:
    with store.engine.connect() as conn:
        return {(p.role, p.host, p.pid) for p in running_processes(conn)}


def test_on_sqlite_only_this_hosts_serves_go(tmp_path: Path) -> None:
    config, data_dir = earlier_rows(tmp_path, None)
    this = socket.gethostname()
    with HubThread(load_config(config), data_dir) as hub:
        assert rows(hub.store) == {
            ("serve", this, os.getpid()),
            ("worker", this, 4_000_002),
            ("serve", "another-host", 4_000_003),
        }


@pytest.mark.parametrize(
    "store_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_on_postgresql_no_row_is_taken_for_gone(tmp_path: Path, store_url: str) -> None:
    """No lock says which serve of a shared database is gone: another data dir's serve on
    this host may be running."""
    config, data_dir = earlier_rows(tmp_path, store_url)
    this = socket.gethostname()
    with HubThread(load_config(config), data_dir) as hub:
        assert rows(hub.store) == {
            ("serve", this, os.getpid()),
            ("serve", this, 4_000_001),
            ("worker", this, 4_000_002),
            ("serve", "another-host", 4_000_003),
        }
