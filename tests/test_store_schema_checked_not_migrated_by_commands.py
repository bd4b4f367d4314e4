"""During a rolling upgrade the new release's commands (`status`, `messages list` ...) must
not migrate the store under the old release's processes, which could then not start again:
they check the schema and say what to do. `store upgrade`, `serve` and `worker` migrate. A
store a newer release has migrated is refused in words, not with Alembic's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig

from carehub.store.store import MIGRATIONS, MessageStore, sqlite_url
from tests.test_cli import env_without_carehub


def carehub(tmp_path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carehub.cli", *command, "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_without_carehub(),
        cwd=tmp_path,
    )


def store_at(tmp_path: Path, revision: str) -> MessageStore:
    store = MessageStore(sqlite_url(tmp_path / "data"))
    store.migrate()
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        alembic_command.downgrade(cfg, revision)
    return store


def test_commands_leave_an_older_schema_alone_and_say_how_to_upgrade(tmp_path: Path) -> None:
    store = store_at(tmp_path, "0014")
    try:
        for command in (["status"], ["messages", "list"], ["dead-letters", "list"]):
            done = carehub(tmp_path, *command)
            assert done.returncode == 2, (command, done)
            assert "schema is at revision 0014" in done.stderr
            assert "run `carehub store upgrade`" in done.stderr
            assert "Traceback" not in done.stderr
        assert store.schema_revision() == "0014"  # nobody migrated it

        upgraded = carehub(tmp_path, "store", "upgrade")
        assert upgraded.returncode == 0, upgraded
        assert store.schema_revision() != "0014"
        assert carehub(tmp_path, "messages", "list").returncode == 0
    finally:
        store.close()


def test_a_store_a_newer_release_migrated_is_refused_in_words(tmp_path: Path) -> None:
    store = MessageStore(sqlite_url(tmp_path / "data"))
    try:
        store.migrate()
        with store.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
        for command in (["messages", "list"], ["store", "upgrade"]):
            done = carehub(tmp_path, *command)
            assert done.returncode == 2, (command, done)
            assert "upgraded by a newer carehub (schema revision 0099" in done.stderr
            assert "Can't locate revision" not in done.stderr
        assert store.schema_revision() == "0099"
    finally:
        store.close()


def test_store_downgrade_goes_back_for_the_older_release(tmp_path: Path) -> None:
    store = MessageStore(sqlite_url(tmp_path / "data"))
    try:
        store.migrate()
        head = store.schema_revision()
        done = carehub(tmp_path, "store", "downgrade", "0014", "--yes")
        assert done.returncode == 0, done
        assert "store at schema revision 0014" in done.stdout
        assert store.schema_revision() == "0014"
        unknown = carehub(tmp_path, "store", "downgrade", "0999", "--yes")
        assert unknown.returncode == 2 and "no schema revision '0999'" in unknown.stderr
        assert carehub(tmp_path, "store", "upgrade").returncode == 0
        assert store.schema_revision() == head
    finally:
        store.close()


def test_store_downgrade_refuses_in_words(tmp_path: Path) -> None:
    """Not later than the store already is, or a store a newer release migrated (which takes
    its own schema back): a one-line error, not Alembic's traceback."""
    store = MessageStore(sqlite_url(tmp_path / "data"))
    try:
        store.migrate()
        head = store.schema_revision()
        assert head is not None
        same = carehub(tmp_path, "store", "downgrade", head, "--yes")
        assert same.returncode == 2, same
        assert f"the store is at revision {head}, not later than {head}" in same.stderr
        with store.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
        newer = carehub(tmp_path, "store", "downgrade", "0014", "--yes")
        assert newer.returncode == 2, newer
        assert "upgraded by a newer carehub" in newer.stderr
        for done in (same, newer):
            assert "Traceback" not in done.stderr
    finally:
        store.close()
