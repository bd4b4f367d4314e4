"""A SQLite store holds every message, so its database and the -wal, -shm and -journal files
SQLite keeps beside it are the hub's user's only (0600) whichever command makes the store,
under the usual umask 022: `carehub store upgrade` as much as `serve`. A store file found open
to other accounts is made private when a command opens the store, with a WARNING naming it.
Real `carehub` processes, each started under umask 022."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

from carehub.testing import make_adt, mllp_exchange
from tests.helpers_cli import carehub
from tests.helpers_http import CarehubProcess

CONFIG = """\
routes: []
listeners:
  mllp: [{name: adt, host: 127.0.0.1, port: 0}]
  http: {host: 127.0.0.1, port: 0}
"""
#: Runs ``python -m carehub.cli ARGS`` under umask 022, as a login shell usually has it.
UMASK_022 = ["/bin/sh", "-c", 'umask 022; exec "$0" -m carehub.cli "$@"', sys.executable]


def store_modes(data_dir: Path) -> dict[str, int]:
    """carehub.db and the files SQLite keeps beside it -> their permission bits."""
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in data_dir.glob("carehub.db*")}


def hub_args(tmp_path: Path) -> list[str]:
    config = tmp_path / "carehub.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    return ["--config", str(config), "--data-dir", str(tmp_path / "data")]


def test_store_upgrade_makes_a_private_store_and_serve_keeps_it_private(tmp_path: Path) -> None:
    args = hub_args(tmp_path)
    data = tmp_path / "data"
    upgraded = carehub("store", "upgrade", *args, command=UMASK_022)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert "carehub.db" in store_modes(data)
    assert set(store_modes(data).values()) == {0o600}, store_modes(data)

    serve_args = ["serve", *args]
    with CarehubProcess(serve_args, tmp_path / "logs", "serve", [*UMASK_022, *serve_args]) as serve:
        serve.wait_ready()
        mllp_exchange(serve.mllp_address, [make_adt("PRIVATE-1").encode()])
        while_serving = store_modes(data)
        assert serve.terminate() == 0
    # The message is in the WAL while serve runs: every file SQLite keeps is private.
    assert {"carehub.db", "carehub.db-wal", "carehub.db-shm"} <= set(while_serving)
    assert set(while_serving.values()) == {0o600}, while_serving
    assert "open to other accounts" not in serve.stderr


def test_a_store_open_to_other_accounts_is_made_private_at_start_with_a_warning(
    tmp_path: Path,
) -> None:
    args = hub_args(tmp_path)
    data = tmp_path / "data"
    assert carehub("store", "upgrade", *args, command=UMASK_022).returncode == 0
    database = data / "carehub.db"
    database.chmod(0o664)

    serve_args = ["serve", *args]
    with CarehubProcess(serve_args, tmp_path / "logs", "serve", [*UMASK_022, *serve_args]) as serve:
        serve.wait_ready()
        mllp_exchange(serve.mllp_address, [make_adt("PRIVATE-2").encode()])
        while_serving = store_modes(data)
        assert serve.terminate() == 0
    assert set(while_serving.values()) == {0o600}, while_serving
    [warning] = [line for line in serve.stderr.splitlines() if "open to other accounts" in line]
    assert " WARNING carehub.store.store: " in warning
    assert f"store file {database} was open to other accounts (mode 664): made private " in (
        warning
    )


def test_a_command_that_only_reads_the_store_makes_it_private_too(tmp_path: Path) -> None:
    """`carehub status` on a store left readable by everyone (and its WAL, as a copy with
    the wrong mode would be): both are made private, each named in a warning."""
    args = hub_args(tmp_path)
    data = tmp_path / "data"
    assert carehub("store", "upgrade", *args, command=UMASK_022).returncode == 0
    wal = data / "carehub.db-wal"
    wal.write_bytes(b"")  # an empty WAL is one SQLite has nothing to replay from
    for path in (data / "carehub.db", wal):
        path.chmod(0o644)

    status = carehub("status", *args, command=UMASK_022)
    assert status.returncode == 0, status.stdout + status.stderr
    assert set(store_modes(data).values()) == {0o600}, store_modes(data)
    for path in (data / "carehub.db", wal):
        assert f"store file {path} was open to other accounts (mode 644)" in status.stderr
