"""A store restored from a backup numbers its messages on from where the backup ended, so it
gives again the ids it gave after the backup. What it sends under them must not go under the
keys it sent before: a receiver that drops repeats by Idempotency-Key (as carehub tells it to)
would drop a new patient's message. A PostgreSQL dump restored into a database made anew has
a new identity by itself; a restore carehub cannot tell (a SQLite file copied back) takes
`carehub store renew-identity`, which is in the audit trail. The store commands that change
what running processes rely on (downgrade, renew-identity) refuse while one runs.

Real `carehub serve` processes, a real HTTP receiver, pg_dump and pg_restore; the PostgreSQL
tests each work in a database of their own, dropped afterwards."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub.store.store import STORE_FILE
from carehub.testing import make_adt
from tests.helpers_http import CarehubProcess, HTTPServer, wait_for
from tests.test_cli import run
from tests.test_rabbitmq import routes_yaml, send_all
from tests.test_store import PG_HOST, PG_PORT, _pg_start_hint, pg_admin, pg_role


@pytest.fixture
def database() -> Iterator[str]:
    """The name of a new, empty PostgreSQL database (dropped afterwards)."""
    if pg_role() is None:
        pytest.skip(_pg_start_hint())
    name = f"fix_pg_{uuid.uuid4().hex[:12]}"
    with pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with pg_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_url(name: str, port: int = PG_PORT) -> str:
    return f"postgresql+psycopg://{pg_role()}@{PG_HOST}:{port}/{name}"


def pg_tool(*args: str) -> None:
    """Run a PostgreSQL client program (pg_dump, pg_restore) as the test role."""
    subprocess.run(
        [args[0], "-h", PG_HOST, "-p", str(PG_PORT), "-U", str(pg_role()), *args[1:]],
        check=True,
        capture_output=True,
        timeout=120,
    )


def hub_yaml(store_url: str | None) -> str:
    store = f'store: {{url: "{store_url}"}}\n' if store_url else ""
    return (
        store
        + """listeners:
  mllp: [{name: adt, host: 127.0.0.1, port: 0}]
  http: {enabled: false}
worker: {poll_interval: 0.05}
routes: [routes.yaml]
"""
    )


class Site:
    """A hub's config and data dir, and a receiver that keeps the keys of what reaches it."""

    def __init__(self, folder: Path, http: HTTPServer, store_url: str | None) -> None:
        self.folder = folder
        self.http = http
        (folder / "routes.yaml").write_text(routes_yaml(http.url()))
        self.config = folder / "carehub.yaml"
        self.config.write_text(hub_yaml(store_url))
        self.data = folder / "data"
        self.options = ["--config", str(self.config), "--data-dir", str(self.data)]

    def send(self, control_ids: list[str], name: str) -> list[str]:
        """Run `carehub serve`, send one ADT per control ID, and return the Idempotency-Keys
        they reached the receiver with, once all have."""
        before = len(self.http.ok())
        args = ["serve", *self.options, "--mllp-port", "0"]
        with CarehubProcess(args, self.folder / "logs", name) as serve:
            serve.wait_ready()
            texts = [make_adt(c, "A01", patient_id=f"P-{c}") for c in control_ids]
            send_all(serve.mllp_address, texts)
            wait_for(
                lambda: len(self.http.ok()) == before + len(control_ids),
                30,
                what=f"{len(control_ids)} deliveries",
            )
            assert serve.terminate() == 0, serve.stderr
        keys = [request.key for request in self.http.ok()[before:]]
        assert all(keys)
        return [str(key) for key in keys]


def message_ids(keys: list[str]) -> list[str]:
    """carehub-<message id>-<run>-<digest>: the message ids the keys were made from."""
    return sorted(key.split("-")[1] for key in keys)


@pytest.mark.postgres
def test_a_dump_restored_into_a_new_database_sends_new_messages_under_new_keys(
    tmp_path: Path, database: str
) -> None:
    backup = tmp_path / "before.dump"
    with HTTPServer() as http:
        site = Site(tmp_path, http, database_url(database))
        assert run("store", "upgrade", *site.options).exit_code == 0
        pg_tool("pg_dump", "--format=custom", f"--file={backup}", database)

        first = site.send(["RESTORE-1", "RESTORE-2", "RESTORE-3"], "serve-before")

        with pg_admin() as admin:  # dropdb, createdb, pg_restore
            admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{database}"')
        pg_tool("pg_restore", "--no-owner", f"--dbname={database}", str(backup))

        second = site.send(["OTHER-1", "OTHER-2", "OTHER-3"], "serve-after")
    assert message_ids(second) == message_ids(first)  # the restore gave the same ids again
    assert not set(first) & set(second), (first, second)


def test_renew_identity_after_a_sqlite_file_is_copied_back(tmp_path: Path) -> None:
    with HTTPServer() as http:
        site = Site(tmp_path, http, None)
        assert run("store", "upgrade", *site.options).exit_code == 0
        store_file = site.data / STORE_FILE
        backup = tmp_path / "backup.db"
        shutil.copyfile(store_file, backup)

        first = site.send(["COPY-1", "COPY-2", "COPY-3"], "serve-before")

        for leftover in site.data.glob(f"{STORE_FILE}-*"):  # -wal, -shm: none after a stop
            leftover.unlink()
        shutil.copyfile(backup, store_file)
        renewed = run("store", "renew-identity", *site.options, "--by", "restorer")
        assert renewed.exit_code == 0, renewed.output
        assert "new identity" in renewed.output

        second = site.send(["OTHER-1", "OTHER-2", "OTHER-3"], "serve-after")
    assert message_ids(second) == message_ids(first)
    assert not set(first) & set(second), (first, second)
    trail = run("audit", "list", *site.options)
    assert trail.exit_code == 0, trail.output
    [line] = [line for line in trail.output.splitlines() if "store renew-identity" in line]
    assert "restorer" in line


@pytest.mark.postgres
def test_downgrade_and_renew_identity_refuse_while_a_process_runs_on_the_store(
    tmp_path: Path, database: str
) -> None:
    with HTTPServer() as http:
        site = Site(tmp_path, http, database_url(database))
        args = ["serve", *site.options, "--mllp-port", "0"]
        with CarehubProcess(args, tmp_path / "logs", "serve") as serve:
            serve.wait_ready()
            pid = serve.process.pid
            for command in (["downgrade", "0016", "--yes"], ["renew-identity"]):
                refused = run("store", *command, *site.options)
                assert refused.exit_code == 2, refused.output
                assert "carehub processes run on this store: serve on " in refused.stderr
                assert f"(pid {pid}, carehub " in refused.stderr and "last seen" in refused.stderr
                assert "--force" in refused.stderr
            assert serve.terminate() == 0, serve.stderr

        downgraded = run("store", "downgrade", "0016", "--yes", *site.options)
        assert downgraded.exit_code == 0, downgraded.output
        status = run("status", *site.options)
        assert status.exit_code == 2
        assert "once no process of an earlier carehub release runs on the store" in status.stderr
        assert "older release's processes" not in status.stderr
        assert run("store", "upgrade", *site.options).exit_code == 0
