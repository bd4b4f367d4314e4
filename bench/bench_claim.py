"""How much a claim costs while a down destination has a backlog waiting for its next retry.

A destination that is down keeps its deliveries pending with a retry time in the future. Every
claim the worker makes for the other destinations must not pay for that backlog, or one dead
webhook slows every other destination down. This builds a store with N deliveries waiting at a
down destination plus 200 due at a working one, and times claiming those 200 (best of 3), for
N = 0 and larger backlogs. The ratio to N = 0 is the figure: near 1 means the claim reads only
what is due.

    .venv/bin/python bench/bench_claim.py [--backlogs 0,50000,200000]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from carehub.store.outbox import Outbox
from carehub.store.store import MessageStore, sqlite_url

DUE = 200
LEASE = timedelta(minutes=5)


def _text(value: datetime) -> str:
    return value.replace(tzinfo=None).isoformat(" ")


def build_store(directory: Path, waiting: int) -> MessageStore:
    """One message, ``waiting`` deliveries retrying in an hour, ``DUE`` deliveries due now."""
    store = MessageStore(sqlite_url(directory))
    store.migrate()
    now = datetime.now(UTC)
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(
            "INSERT INTO messages (id, received_at, transport, listener, raw, size, ack_code, "
            "status, status_at) VALUES (1, ?, 'mllp', 'bench', x'00', 1, 'AA', 'routed', ?)",
            (_text(now), _text(now)),
        )
        rows = [
            ("down", f"down-{i}", f"P{i}", 1, _text(now + timedelta(hours=1)))
            for i in range(waiting)
        ] + [("up", f"up-{i}", f"Q{i}", 0, _text(now - timedelta(seconds=1))) for i in range(DUE)]
        cursor.executemany(
            "INSERT INTO deliveries (message_id, run, route, destination, channel, "
            "idempotency_key, order_key, payload, content_type, status, attempts, max_attempts, "
            "not_before, created_at, updated_at) VALUES (1, 1, 'bench', ?, 'webhook', ?, ?, "
            "x'7b7d', 'application/json', 'pending', ?, 10, ?, ?, ?)",
            [(*row, _text(now), _text(now)) for row in rows],
        )
        raw.commit()
    finally:
        raw.close()
    return store


def time_claims(store: MessageStore) -> tuple[float, int]:
    """Best of three claims of everything due, in seconds, and how many each took."""
    outbox = Outbox(store)
    best, claimed = float("inf"), 0
    for _ in range(3):
        started = time.perf_counter()
        claimed = len(outbox.claim_due(2 * DUE, LEASE, None, [], []))
        best = min(best, time.perf_counter() - started)
        with store.engine.begin() as conn:  # back in line for the next round
            conn.exec_driver_sql(
                "UPDATE deliveries SET status = 'pending', lease_until = NULL "
                "WHERE destination = 'up'"
            )
    return best, claimed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", default="0,50000,200000")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    backlogs = [int(n) for n in args.backlogs.split(",")]
    print(f"claim of {DUE} due deliveries beside a down destination's waiting backlog (SQLite)")
    print(f"{'waiting':>9}  {'claim ms':>8}  {'x vs first':>10}  claimed")
    first: float | None = None
    for waiting in backlogs:
        with tempfile.TemporaryDirectory() as tmp:
            store = build_store(Path(tmp), waiting)
            try:
                seconds, claimed = time_claims(store)
            finally:
                store.close()
        first = first or seconds
        print(f"{waiting:>9,}  {seconds * 1e3:>8.1f}  {seconds / first:>10.2f}  {claimed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
