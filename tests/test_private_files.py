"""What carehub writes holds PHI: `serve`, `demo` and `messages export`, started with the usual
umask 022, make the data dir, the store and its WAL, outbox files and exports readable by
their user only."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from carehub.testing import make_adt, mllp_exchange
from tests.test_cli import PROJECT_ROOT, env_without_carehub

CARE_HUB = [sys.executable, "-m", "carehub.cli"]
ROUTES = """
routes:
  - name: archive
    steps:
      - forward: {channel: file, name: out, directory: outbox}
"""


def usual_umask() -> None:
    """The umask most accounts have, which would make every new file world-readable."""
    os.umask(0o022)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def private(paths: list[Path]) -> dict[str, str]:
    """Each path that others could read or enter, with its mode (empty when none)."""
    return {str(p): oct(mode_of(p)) for p in paths if mode_of(p) & 0o077}


def test_serve_and_export_write_files_only_their_user_can_read(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(ROUTES, encoding="utf-8")
    config = tmp_path / "carehub.yaml"
    config.write_text("routes: [routes.yaml]\nworker: {poll_interval: 0.05}\n", encoding="utf-8")
    data_dir = tmp_path / "data"
    where = ["--config", str(config), "--data-dir", str(data_dir)]
    serving = subprocess.Popen(
        [*CARE_HUB, "serve", *where, "--mllp-port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_without_carehub(),
        cwd=tmp_path,
        preexec_fn=usual_umask,
    )
    try:
        assert serving.stdout is not None
        lines: list[str] = []
        while not lines or lines[-1] != "carehub ready\n":
            line = serving.stdout.readline()
            assert line, (lines, serving.stderr.read() if serving.stderr else "")
            lines.append(line)
        [port] = re.findall(r"MLLP listener '\w+' on [\d.]+:(\d+)", "".join(lines))
        mllp_exchange(("127.0.0.1", int(port)), [make_adt("PRIV-1").encode()])
        outbox = tmp_path / "outbox"
        for _ in range(200):
            if outbox.is_dir() and any(outbox.iterdir()):
                break
            time.sleep(0.05)
        written = [data_dir, *data_dir.iterdir(), outbox, *outbox.iterdir()]
        assert len(written) >= 5, written  # data dir, store, its WAL, the outbox and a file
        assert private(written) == {}
        assert mode_of(data_dir) == 0o700
    finally:
        serving.send_signal(signal.SIGTERM)
        serving.wait(timeout=30)

    exported = tmp_path / "export"
    done = carehub_under_usual_umask(
        ["messages", "export", *where, "--out", str(exported)], cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    files = [exported, *exported.iterdir()]
    assert len(files) == 2 and private(files) == {}


def carehub_under_usual_umask(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """A carehub command run to its end as a user with the usual umask (022) would run it."""
    return subprocess.run(
        [*CARE_HUB, *args],
        capture_output=True,
        text=True,
        env=env_without_carehub(),
        cwd=cwd,
        preexec_fn=usual_umask,
        timeout=120,
    )


def test_demo_keeps_its_store_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    done = carehub_under_usual_umask(["demo", "--data-dir", str(data_dir)], cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    written = [data_dir, *data_dir.rglob("*")]
    assert (data_dir / "carehub.db") in written
    assert private(written) == {}
