"""While another process holds SQLite's write lock longer than intake waits, the messages
answered "not stored, please resend" are logged as a failure run: once when it starts and once
when it ends, as for a full disk."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import carehub.store.group_commit as group_commit
from carehub.testing import HubThread, local_config, make_adt
from tests.test_http import ack_of, post
from tests.test_intake_gaps import hold_sqlite_write_lock


def store_write_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("store write")]


@pytest.mark.parametrize("durability", ["power", "process"])
def test_a_write_lock_held_by_another_process_is_logged_when_it_starts_and_ends(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    durability: str,
) -> None:
    """durability=process waits group_commit.LOCK_PATIENCE (lowered from 30 s to 1 s so the
    test is quick); durability=power waits SQLite's busy timeout. The lock held is real."""
    monkeypatch.setattr(group_commit, "LOCK_PATIENCE", 1.0)
    caplog.set_level("WARNING", logger="carehub.store.group_commit")
    config = local_config()
    config.store.durability = durability
    data_dir = tmp_path / "data"
    body = make_adt("LOCK-LOG-1").encode()
    with HubThread(config, data_dir) as hub:
        holder = hold_sqlite_write_lock(data_dir)
        try:
            response = post(hub, body)
            assert response.status_code == 503, response.text
            assert ack_of(response)[0] == "AE"
        finally:
            holder.rollback()
            holder.close()
        [started] = store_write_lines(caplog)
        assert started.startswith("store write failed (") and "lock" in started
        assert "LOCK-LOG-1" not in started
        assert post(hub, body).status_code == 200
        started_again, ended = store_write_lines(caplog)
        assert started_again == started
        assert ended.startswith("store write works again after ")
        assert "(1 message(s) failed meanwhile)" in ended


def test_health_and_metrics_say_the_store_is_not_storing_while_writes_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A held write lock still answers SELECT 1; /health must not say "ok" while every message
    is refused, and /metrics' carehub_store_writable says it too, until a write works again."""
    monkeypatch.setattr(group_commit, "LOCK_PATIENCE", 1.0)
    data_dir = tmp_path / "data"
    with HubThread(local_config(), data_dir) as hub:
        holder = hold_sqlite_write_lock(data_dir)
        try:
            assert post(hub, make_adt("LOCK-H-1").encode()).status_code == 503
            health = httpx.get(f"{hub.http_url}/health", timeout=10)
            metrics = httpx.get(f"{hub.http_url}/metrics", timeout=10).text
        finally:
            holder.rollback()
            holder.close()
        assert health.status_code == 503
        report = health.json()
        assert report["status"] == "store unavailable"
        assert report["store"].startswith("not storing since ") and "lock" in report["store"]
        assert "carehub_store_writable 0.0" in metrics
        # The lock is let go and no message comes (a balancer took the hub out): /health
        # finds the store writable again by itself.
        again = httpx.get(f"{hub.http_url}/health", timeout=10)
        assert again.status_code == 200 and again.json()["store"] == "ok"
        assert "carehub_store_writable 1.0" in httpx.get(f"{hub.http_url}/metrics").text
        assert post(hub, make_adt("LOCK-H-1").encode()).status_code == 200
