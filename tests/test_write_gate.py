"""The write gate: writers inside one process take turns on a lock, and intake goes first."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert

from carehub.store.schema import MessageStatus, message_events
from carehub.store.store import MessageStore, StoreBusy, sqlite_url
from carehub.store.write_gate import INTAKE_PRIORITY_LIMIT, WriteGate

from .test_store import new_message


def test_a_worker_transaction_holds_the_gate_from_its_first_write_to_commit(
    tmp_path: Path,
) -> None:
    store = MessageStore(sqlite_url(tmp_path))
    store.migrate()
    store.intake_waits_for_lock = False
    try:
        [first] = store.insert_messages([new_message("G1")])
        with store.engine.connect() as conn:
            conn.exec_driver_sql("SELECT count(*) FROM messages").scalar()
            assert store.insert_messages([new_message("G2")])  # a read does not take the gate
            conn.execute(
                insert(message_events),
                {"message_id": first.message_id, "at": datetime.now(UTC), "event": "routed"},
            )
            try:  # intake fails fast (and says it is waiting) while the worker writes
                store.insert_messages([new_message("G3")])
                raise AssertionError("intake wrote while another writer held the gate")
            except StoreBusy:
                assert store.write_gate.intake_waiting  # the gate refused it, not SQLite
            conn.commit()
        assert store.insert_messages([new_message("G3")])[0].duplicate is False
        assert store.history(first.message_id)[-1].event == "routed"
        assert store.find(status=MessageStatus.RECEIVED.value)
    finally:
        store.close()


def test_a_waiting_intake_group_goes_before_the_next_worker_transaction() -> None:
    gate = WriteGate()
    order: list[str] = []
    gate.enter()  # a worker transaction is running
    assert gate.try_enter_intake() is False  # intake finds it taken and is now waiting

    def next_worker_transaction() -> None:
        gate.enter()
        order.append("worker")
        gate.leave()

    worker = threading.Thread(target=next_worker_transaction)
    worker.start()
    time.sleep(0.005)
    gate.leave()  # the running transaction ends; the next worker holds back for intake
    time.sleep(0.001)
    assert gate.try_enter_intake() is True
    order.append("intake")
    gate.leave_intake()
    worker.join(timeout=5)
    assert order == ["intake", "worker"]


def intake_tries_on_its_own_thread(gate: WriteGate) -> bool:
    tried: list[bool] = []
    intake = threading.Thread(target=lambda: tried.append(gate.try_enter_intake()))
    intake.start()
    intake.join(timeout=5)
    return tried[0]


def test_a_worker_is_held_back_for_intake_only_so_long() -> None:
    gate = WriteGate()
    gate.enter()
    assert intake_tries_on_its_own_thread(gate) is False  # waiting, and never comes back
    gate.leave()
    started = time.monotonic()
    assert gate.enter() is True
    waited = time.monotonic() - started
    gate.leave()
    assert INTAKE_PRIORITY_LIMIT * 0.9 <= waited < 2.0


def test_a_writer_on_intakes_own_thread_does_not_wait_for_intake() -> None:
    """The embedded worker shares intake's event loop: waiting for intake there would only
    stall the loop intake needs."""
    gate = WriteGate()
    gate.enter()
    assert gate.try_enter_intake() is False  # intake, on this thread, is now waiting
    gate.leave()
    started = time.monotonic()
    assert gate.enter() is True
    assert time.monotonic() - started < INTAKE_PRIORITY_LIMIT / 2
    gate.leave()


def test_intake_refused_by_the_gate_is_called_back_when_the_holder_lets_go() -> None:
    gate = WriteGate()
    woken: list[str] = []
    gate.enter()  # a worker transaction is running
    assert gate.try_enter_intake(lambda: woken.append("free")) is False
    assert woken == []
    done = threading.Thread(target=gate.leave)
    done.start()
    done.join(timeout=5)
    assert woken == ["free"]  # once, as the gate was let go, with no polling
    assert gate.try_enter_intake() is True
    gate.leave_intake()
    assert woken == ["free"]  # intake's own release calls no one
