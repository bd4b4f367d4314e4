"""`carehub demo` on any date: moving its clock forward closes stale ED visits, sends the daily
digests and the overdue alerts; with --data-dir the outbox files stay beside the store."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.test_cli import PROJECT_ROOT, env_without_carehub, plain


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, datetime]:
    """One demo run with --data-dir: the data dir, its output, and when it started."""
    data_dir = tmp_path_factory.mktemp("demo") / "kept"
    started = datetime.now(UTC)
    done = subprocess.run(
        [sys.executable, "-m", "carehub.cli", "demo", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_without_carehub(),
        cwd=PROJECT_ROOT,
    )
    assert done.returncode == 0, done.stderr
    return data_dir, plain(done.stdout), started


def test_the_demo_clock_moves_forward_from_today(demo_run: tuple[Path, str, datetime]) -> None:
    _, out, started = demo_run
    moved = re.search(r"Moving the clock to (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", out)
    assert moved, out
    later = datetime.strptime(moved.group(1), "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    assert later >= started + timedelta(hours=24)
    assert (later.hour, later.minute) == (7, 5)


def test_moving_the_clock_shows_the_periodic_work(demo_run: tuple[Path, str, datetime]) -> None:
    _, out, _ = demo_run
    after = out.split("After the clock moved", 1)[1].split("Closed-loop referrals", 1)[0]
    assert "stale_closed" in after  # stale ED visits close
    assert "sent in the daily digest" in after
    assert "followup_overdue" in after
    assert "referral_overdue" in after


def test_the_outbox_stays_beside_a_given_data_dir(demo_run: tuple[Path, str, datetime]) -> None:
    data_dir, out, _ = demo_run
    outbox = data_dir / "outbox"
    assert f"Files written under the outbox {outbox} (kept): care-events/ " in out
    written = [path for path in outbox.rglob("*") if path.is_file()]
    assert {path.relative_to(outbox).parts[0] for path in written} >= {
        "care-events",
        "downstream-ehr",
    }


def test_the_food_bank_answers_with_its_own_token_and_is_named(
    demo_run: tuple[Path, str, datetime],
) -> None:
    _, out, _ = demo_run
    assert "reports back over HTTP with its own token" in out
    assert "completed -> HTTP 200" in out
    assert re.search(r"completed by\s+Springfield\s+Community\s+Food\s+Bank", out), out


def test_the_delivery_table_names_whom_each_notice_was_for(
    demo_run: tuple[Path, str, datetime],
) -> None:
    """ "Delivered to whom": an email notice's row names its recipient, not only the
    destination that carried it."""
    _, out, _ = demo_run
    table = out.split("Delivered to whom", 1)[1].split("The care platform received", 1)[0]
    rows = " ".join(table.split())
    assert re.search(r"Dr Erik Lindqvist via\s.*notify-email", rows), table
    assert "Casey Exampleton RN via" in rows, table
