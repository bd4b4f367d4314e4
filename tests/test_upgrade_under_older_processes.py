"""A newer release does not migrate the store while processes of an earlier one run on it:
`carehub store upgrade` refuses (naming them; --force migrates anyway), and so do `serve` and
`worker` at start when they would migrate. Processes of this release, and rows not heard from
within the liveness window, do not hold a migration back. The earlier release's process is
its row in the store's process list, as it writes it; the store is taken back to revision
0018 with `carehub store downgrade`, so a migration waits. SQLite, and PostgreSQL (skipped
without it, with how to start it)."""

from __future__ import annotations

import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import DateTime, Integer, String, column, create_engine, table

from carehub import __version__
from carehub.store.processes import release_name
from carehub.store.store import STORE_FILE
from tests import test_rabbitmq
from tests.helpers_cli import CAREHUB, environment

amqp_url, pg_url = test_rabbitmq.amqp_url, test_rabbitmq.pg_url

OLD_REVISION = "0018"

PROCESSES = table(
    "hub_processes",
    column("id", String),
    column("role", String),
    column("host", String),
    column("pid", Integer),
    column("version", String),
    column("started_at", DateTime(timezone=True)),
    column("last_seen", DateTime(timezone=True)),
)


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``carehub ARGS`` to its end; one still running after ``timeout`` (a serve that
    started) is stopped and reported as such."""
    try:
        return subprocess.run(
            [*CAREHUB, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=environment(),
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"carehub {args[0]} kept running: {err.stderr!r}") from None


def project(folder: Path, settings: str = "") -> list[str]:
    """A config with no routes (and ``settings``), as --config/--data-dir arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "routes.yaml").write_text("routes: []\n", encoding="utf-8")
    config = folder / "carehub.yaml"
    config.write_text(
        "routes: [routes.yaml]\n"
        "listeners:\n"
        "  mllp: [{name: adt, host: 127.0.0.1, port: 0}]\n"
        "  http: {enabled: false}\n" + settings,
        encoding="utf-8",
    )
    return ["--config", str(config), "--data-dir", str(folder / "data")]


def store_at_old_revision(where: list[str]) -> None:
    done = run("store", "upgrade", *where)
    assert done.returncode == 0, done.stderr
    done = run("store", "downgrade", OLD_REVISION, "--yes", *where)
    assert done.returncode == 0, done.stderr


def add_process(url: str, version: str, heard: timedelta = timedelta(seconds=3)) -> int:
    """A process row as a running carehub ``version`` writes it; returns its pid."""
    pid = 40000 + uuid.uuid4().int % 20000
    now = datetime.now(UTC)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                PROCESSES.insert().values(
                    id=str(uuid.uuid4()),
                    role="serve",
                    host="host-old",
                    pid=pid,
                    version=version,
                    started_at=now - timedelta(hours=1),
                    last_seen=now - heard,
                )
            )
    finally:
        engine.dispose()
    return pid


def check_refusals(where: list[str], url: str, worker: bool) -> None:
    """The store at OLD_REVISION: only a live earlier-release process holds the migration."""
    # Same release, and an earlier one not heard from for minutes: no refusal.
    add_process(url, release_name())
    add_process(url, "0.1.0", heard=timedelta(minutes=5))
    done = run("store", "upgrade", *where)
    assert done.returncode == 0, done.stderr
    store_back = run("store", "downgrade", OLD_REVISION, "--yes", "--force", *where)
    assert store_back.returncode == 0, store_back.stderr

    pid = add_process(url, "0.1.0")
    refused = run("store", "upgrade", *where)
    assert refused.returncode != 0, refused.stdout
    assert f"serve on host-old (pid {pid}, carehub 0.1.0, last heard" in refused.stderr
    assert "store upgrade --force" in refused.stderr
    assert "store at schema revision" not in refused.stdout

    started = run("serve", *where, timeout=40)
    assert started.returncode != 0
    assert f"(pid {pid}, carehub 0.1.0" in started.stderr
    assert "stop them first" in started.stderr
    if worker:
        started = run("worker", *where, timeout=40)
        assert started.returncode != 0
        assert f"(pid {pid}, carehub 0.1.0" in started.stderr

    # Nothing was migrated: a command that only checks the schema still says it is behind.
    behind = run("messages", "list", *where)
    assert f"revision {OLD_REVISION}" in behind.stderr, behind.stderr

    forced = run("store", "upgrade", "--force", *where)
    assert forced.returncode == 0, forced.stderr
    assert f"revision {OLD_REVISION}" not in forced.stdout


def test_sqlite_store_is_not_migrated_under_an_earlier_release(tmp_path: Path) -> None:
    where = project(tmp_path / "site")
    store_at_old_revision(where)
    check_refusals(where, f"sqlite:///{tmp_path / 'site' / 'data' / STORE_FILE}", worker=False)


@pytest.mark.postgres
def test_postgresql_store_is_not_migrated_under_an_earlier_release(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    where = project(
        tmp_path / "site",
        f'store: {{url: "{pg_url}"}}\nqueue: {{url: "{amqp_url}", partitions: 1}}\n',
    )
    store_at_old_revision(where)
    check_refusals(where, pg_url, worker=True)


def test_a_build_of_this_version_that_knows_an_older_schema_holds_the_migration(
    tmp_path: Path,
) -> None:
    """Two builds can share a version string (one from between two releases); the schema
    each knows tells them apart: one that knows only OLD_REVISION must not be migrated under."""
    where = project(tmp_path / "site")
    store_at_old_revision(where)
    pid = add_process(
        f"sqlite:///{tmp_path / 'site' / 'data' / STORE_FILE}", f"{__version__}+{OLD_REVISION}"
    )
    refused = run("store", "upgrade", *where)
    assert refused.returncode != 0, refused.stdout
    assert f"(pid {pid}, carehub {__version__}+{OLD_REVISION}, last heard" in refused.stderr
