"""A hub killed (SIGKILL) while deliveries are in flight delivers everything after a restart,
and every resend carries the idempotency key of the first try, so the receiver can drop it.
`carehub serve` runs as a real process; the webhook receiver is a real, slow HTTP server."""

from __future__ import annotations

import signal
from collections import defaultdict
from pathlib import Path

import pytest

from carehub.config import HubConfig
from carehub.hl7.ack import read_ack
from carehub.hub import open_store
from carehub.testing import make_adt, mllp_exchange
from tests.helpers_http import CarehubProcess, HTTPServer, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MESSAGES = 50
HOLD = 0.3  # seconds the receiver holds each request: deliveries are in flight for a while


def delivered_count(data_dir: Path) -> int:
    store = open_store(HubConfig(), data_dir)
    try:
        return store.count("delivered")
    finally:
        store.close()


def test_sigkill_mid_delivery_then_restart_delivers_all_with_the_same_keys(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    logs = tmp_path / "logs"
    with HTTPServer(delay=HOLD) as http:
        (tmp_path / "routes.yaml").write_text(
            f"""
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - translate: v2-to-event
      - forward:
          channel: webhook
          name: hook
          url: {http.url("/events")}
          retry: {{max_attempts: 5, initial_delay: 0.1, max_delay: 0.5}}
"""
        )
        config = tmp_path / "carehub.yaml"
        config.write_text("worker: {poll_interval: 0.05}\nroutes: [routes.yaml]\n")
        args = ["serve", "--config", str(config), "--data-dir", str(data_dir)]
        args += ["--mllp-port", "0", "--http-port", "0"]

        texts = [make_adt(f"KILL-{i:02d}", patient_id=f"P{i:02d}") for i in range(MESSAGES)]
        with CarehubProcess(args, logs, "first") as first:
            first.wait_ready()
            answers = mllp_exchange(first.mllp_address, [t.encode() for t in texts])
            assert [read_ack(a.decode())[0] for a in answers] == ["AA"] * MESSAGES
            # Kill while the receiver holds several requests the hub has not seen answered.
            wait_for(lambda: http.in_flight >= 4 and len(http.requests) >= 8, 30)
            first.process.send_signal(signal.SIGKILL)
            assert first.process.wait(30) == -signal.SIGKILL
        before_restart = len(http.requests)
        assert before_restart < MESSAGES  # the kill really came mid-delivery

        with CarehubProcess(args, logs, "second") as second:
            second.wait_ready()
            wait_for(
                lambda: delivered_count(data_dir) == MESSAGES, 60, 0.1, "all messages delivered"
            )
            assert second.terminate() == 0, second.stderr
        requests = http.requests

    keys_by_message: dict[int, list[str | None]] = defaultdict(list)
    control_ids: set[str] = set()
    for request in requests:
        body = request.json
        assert request.key == body["idempotency_key"]
        keys_by_message[body["message_id"]].append(request.key)
        control_ids.add(body["event"]["message_control_id"])
    assert control_ids == {f"KILL-{i:02d}" for i in range(MESSAGES)}  # every event arrived
    assert len(keys_by_message) == MESSAGES
    for message_id, keys in keys_by_message.items():
        assert len(set(keys)) == 1, (message_id, keys)  # a re-arrival repeats the first key
    assert len({r.key for r in requests}) == MESSAGES
    assert len(requests) > MESSAGES  # the deliveries cut off by the kill were sent again
