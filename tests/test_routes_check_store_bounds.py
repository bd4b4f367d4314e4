"""`carehub routes check` opens the store as `serve` does: a PostgreSQL server that takes the
connection and never answers fails the check within the connect timeout instead of leaving it
waiting, and a postgres:// URL is answered with how to write it. A TCP relay between carehub
and PostgreSQL makes the silence; skipped, with how to start it, without PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from carehub.store.store import PG_CONNECTION_BOUNDS
from tests.helpers_relay import Relay
from tests.test_cli import env_without_carehub, run, write
from tests.test_postgres_silent_connection import relay
from tests.test_store_restore_identity import database, database_url

__all__ = ["database", "relay"]  # fixtures, used by name

#: Long past the connect timeout: a check still running then is waiting on the silence.
HANG = 60.0


def store_config(folder: Path, url: str) -> Path:
    return write(folder, "carehub.yaml", f'routes: []\nstore: {{url: "{url}"}}\n')


@pytest.mark.postgres
def test_routes_check_on_a_silent_database_fails_within_the_connect_timeout(
    tmp_path: Path, database: str, relay: Relay
) -> None:
    config = store_config(tmp_path, database_url(database, relay.port))
    relay.freeze()  # the connection is taken, and its first bytes never passed on
    command = [sys.executable, "-m", "carehub.cli", "routes", "check", "--config", str(config)]
    try:
        result = subprocess.run(
            [*command, "--data-dir", str(tmp_path / "data")],
            capture_output=True,
            text=True,
            timeout=HANG,
            check=False,
            env=env_without_carehub(),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"routes check still waiting on a silent database after {HANG:g} s "
            f"(its connect timeout is {PG_CONNECTION_BOUNDS['connect_timeout']} s)"
        )
    assert result.returncode == 2, result.stderr
    assert "carehub.yaml:2: store.url: cannot open the store at" in result.stderr
    assert "timeout" in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.postgres
def test_routes_check_passes_on_the_database_through_the_same_bounds(
    tmp_path: Path, database: str, relay: Relay
) -> None:
    config = store_config(tmp_path, database_url(database, relay.port))
    result = run("routes", "check", "--config", str(config), "--data-dir", str(tmp_path / "d"))
    assert result.exit_code == 0, result.output
    assert "store: postgresql+psycopg://" in result.output
    assert "(none yet; serve creates it)" in result.output


def test_routes_check_answers_a_postgres_url_with_how_to_write_it(tmp_path: Path) -> None:
    config = store_config(tmp_path, "postgres://carehub@db/carehub")
    result = run("routes", "check", "--config", str(config), "--data-dir", str(tmp_path / "d"))
    assert result.exit_code == 2, result.output
    assert "store.url: cannot open the store at postgres://carehub@db/carehub" in result.stderr
    assert "a PostgreSQL store URL begins postgresql+psycopg://" in result.stderr
    assert "Traceback" not in result.output
