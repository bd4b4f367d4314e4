"""A reprocess run whose notify step plans deliveries under the keys the first run used (the
care team is told of a visit event once): the outbox leaves them out, and the run's record
says so. The message's history counts only what was queued, with the rest suppressed and by
which run told, and the notify step's output marks those decisions suppressed, not queued.
The shipped sample on a real hub; `carehub messages reprocess` and `messages show` as
processes."""

from __future__ import annotations

import json
import re

from tests.helpers_cli import carehub
from tests.test_care_e2e import Setup, shipped

__all__ = ["shipped"]  # the fixture, shared with test_care_e2e


def test_reprocess_history_and_steps_say_what_was_suppressed(shipped: Setup) -> None:
    where = ["--config", str(shipped.config_path), "--data-dir", str(shipped.data_dir)]
    message_id = min(d["message_id"] for d in shipped.deliveries())

    done = carehub("messages", "reprocess", str(message_id), "--yes", *where)
    assert done.returncode == 0, done.stderr
    said = re.search(r"(\d+) deliveries queued, (\d+) suppressed", done.stdout)
    assert said, done.stdout
    queued, suppressed = int(said[1]), int(said[2])
    shipped.settle()

    shown = carehub("messages", "show", str(message_id), "--json", *where)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    run2 = [d for d in record["deliveries"] if d["run"] == 2]
    assert len(run2) == queued
    routed = [h for h in record["history"] if h["event"] == "routed"][-1]
    assert f"; {queued} deliveries, {suppressed} suppressed (told by run 1)" in routed["detail"]

    keys = {d["idempotency_key"]: d["run"] for d in record["deliveries"]}
    decisions = [
        decision
        for step in record["steps"]
        if step["run"] == 2 and step["step"].startswith("notify")
        for decision in step["output"]
    ]
    assert decisions
    for decision in decisions:
        if decision["delivery_key"] in keys and keys[decision["delivery_key"]] == 1:
            assert decision["status"] == "suppressed", decision
            assert decision["reason"] == "told by run 1"
    assert sum(d["status"] == "suppressed" for d in decisions) >= 1
