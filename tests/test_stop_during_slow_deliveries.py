"""SIGTERM while MLLP deliveries wait on a slow receiver: the hub exits within its stop grace,
records every send that ended, and hands the rest back unsent, so the next start sends each
of them once (only a send cut off mid-way may reach the receiver twice).

`carehub serve` runs as a real process; the receiver is a real MLLP peer on a thread of its own
that answers each message after a pause, or never."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from carehub.config import HubConfig
from carehub.hl7.ack import AckCode, build_ack, read_ack
from carehub.hl7.view import MessageView
from carehub.hub import open_store
from carehub.store.outbox import DeliveryRecord, Outbox
from carehub.testing import make_adt, mllp_exchange
from tests.helpers_http import CarehubProcess, wait_for
from tests.test_channels import serve_mllp

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: Seconds the sends under way get to finish once the hub is told to stop.
STOP_GRACE = 10.0
#: What "a few seconds" past the grace allows for: the process's own start of shutdown and
#: the store's close.
EXIT_SLACK = 5.0


class MLLPReceiver:
    """A real MLLP peer (tests.test_channels.serve_mllp) on an event loop thread of its own:
    it records the MSH-10 of every message on arrival, then answers AA after ``delay``
    seconds, or never (``answers=False``)."""

    def __init__(self, delay: float, *, answers: bool = True) -> None:
        self.delay = delay
        self.answers = answers
        self.control_ids: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def _answer(self, payload: bytes) -> bytes | None:
        view = MessageView(payload.decode())
        self.control_ids.append(view.get("MSH-10"))
        return build_ack(AckCode.ACCEPT, view).encode() if self.answers else None

    def __enter__(self) -> MLLPReceiver:
        self._thread.start()
        serving = serve_mllp(self._answer, delay=self.delay)
        self._server = asyncio.run_coroutine_threadsafe(serving, self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def deliveries(data_dir: Path) -> list[DeliveryRecord]:
    store = open_store(HubConfig(), data_dir)
    try:
        return Outbox(store).find(limit=None)
    finally:
        store.close()


def serve_args(tmp_path: Path, port: int, timeout: float) -> list[str]:
    (tmp_path / "routes.yaml").write_text(
        f"""
routes:
  - name: adt
    when: {{type: ADT}}
    steps:
      - forward:
          channel: mllp
          name: ehr
          host: 127.0.0.1
          port: {port}
          timeout: {timeout}
          retry: {{max_attempts: 5, initial_delay: 60}}
"""
    )
    config = tmp_path / "carehub.yaml"
    config.write_text("worker: {poll_interval: 0.05}\nroutes: [routes.yaml]\n")
    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]
    return [*args, "--mllp-port", "0", "--http-port", "0"]


def send_and_stop(tmp_path: Path, receiver: MLLPReceiver, count: int, timeout: float) -> float:
    """Start the hub, send ``count`` messages for as many patients, SIGTERM it once the
    receiver has some of them; returns the seconds from SIGTERM to exit (exit code 0)."""
    args = serve_args(tmp_path, receiver.port, timeout)
    texts = [make_adt(f"STOP-{i:02d}", patient_id=f"P{i:02d}") for i in range(count)]
    with CarehubProcess(args, tmp_path / "logs", "first") as hub:
        hub.wait_ready()
        answers = mllp_exchange(hub.mllp_address, [t.encode() for t in texts])
        assert [read_ack(a.decode())[0] for a in answers] == ["AA"] * count
        wait_for(lambda: len(receiver.control_ids) >= 2, 30, what="the first sends")
        hub.process.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        assert hub.process.wait(120) == 0, hub.stderr
        return time.monotonic() - stopping


def test_sigterm_with_sends_queued_for_a_slow_receiver_exits_in_time_and_sends_each_once(
    tmp_path: Path,
) -> None:
    count = 20
    with MLLPReceiver(delay=1.0) as receiver:
        took = send_and_stop(tmp_path, receiver, count, timeout=30)
        assert took <= STOP_GRACE + EXIT_SLACK, f"the hub took {took:.1f} s to exit"

        after_stop = deliveries(tmp_path / "data")
        assert not [d for d in after_stop if d.status == "sending"]
        delivered = [d for d in after_stop if d.status == "delivered"]
        sent_before = Counter(receiver.control_ids)
        # Every send the receiver answered is recorded; at most one was cut off mid-way.
        assert len(delivered) >= len(sent_before) - 1, (len(delivered), len(sent_before))
        assert all(d.attempts == 0 for d in after_stop if d.status == "pending")

        args = serve_args(tmp_path, receiver.port, timeout=30)
        with CarehubProcess(args, tmp_path / "logs", "second") as hub:
            hub.wait_ready()
            wait_for(
                lambda: all(d.status == "delivered" for d in deliveries(tmp_path / "data")),
                60,
                0.2,
                "every delivery delivered after the restart",
            )
            assert hub.terminate() == 0, hub.stderr

    received = Counter(receiver.control_ids)
    assert set(received) == {f"STOP-{i:02d}" for i in range(count)}
    twice = [control_id for control_id, n in received.items() if n > 1]
    assert len(twice) <= 1, f"received more than once: {twice}"


def test_sigterm_with_sends_queued_for_a_receiver_that_never_answers_records_what_ended(
    tmp_path: Path,
) -> None:
    timeout = 2.0
    with MLLPReceiver(delay=0, answers=False) as receiver:
        took = send_and_stop(tmp_path, receiver, 10, timeout=timeout)
        assert took <= STOP_GRACE + EXIT_SLACK, f"the hub took {took:.1f} s to exit"
        received = len(receiver.control_ids)

    after_stop = deliveries(tmp_path / "data")
    assert not [d for d in after_stop if d.status == "sending"]
    tried = [d for d in after_stop if d.attempts == 1]
    # Each send that timed out is recorded as a failed attempt, to be tried again; only the
    # one cut off at the grace is not, and it goes out again as if never sent. (The sends
    # waiting for the connection when the stop began were handed back without starting.)
    assert len(tried) >= received - 1 >= 1, (len(tried), received)
    assert all(d.status == "pending" and d.last_error for d in tried)
    assert all(d.status == "pending" for d in after_stop)
