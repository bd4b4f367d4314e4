"""An operator discards (or retries) the dead letter that holds a patient's line at the moment
routing writes that patient's next delivery to the same destination: the new delivery is due at
once, never left parked behind a dead letter that is gone until the worker's sweep.

The two store calls are interleaved by hand, on real SQLite and PostgreSQL stores: routing has
read that the line is held, and the operator's command (a second store, as the CLI opens one)
runs before routing writes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from carehub.components import Outgoing
from carehub.routing.router import PlannedDelivery, RouteResult, RoutingResult
from carehub.store.outbox import PARKED, AttemptResult, LineReport, Outbox
from carehub.store.store import MessageStore
from tests import test_store
from tests.helpers_http import wait_for
from tests.test_store import new_message

store_url = test_store.store_url
store = test_store.store

LEASE = timedelta(minutes=5)
LINE = "HOSP|P-RACE-1"


def _result(message_id: int) -> RoutingResult:
    outgoing = Outgoing(b"{}", "application/json", f"key-{message_id}-ehr")
    planned = PlannedDelivery("adt", "ehr", "webhook", outgoing, LINE, 3)
    return RoutingResult(message_id, 1, [RouteResult("adt", True, [], [], [planned])])


def _dead_letter(outbox: Outbox, message_id: int) -> int:
    """Route the message and let its one attempt fail for good: a dead letter holding LINE."""
    outbox.record_routing([_result(message_id)])
    [head] = outbox.claim_due(10, LEASE)
    now = datetime.now(UTC)
    outbox.finish(
        [
            AttemptResult(
                head.id,
                message_id,
                1,
                now,
                3,
                False,
                "HTTP 503",
                None,
                destination="ehr",
                order_key=LINE,
                holds_line=True,
            )
        ]
    )
    assert outbox.statuses([head.id]) == {head.id: "dead"}
    return head.id


def _waiting_for_a_lock(store: MessageStore) -> bool:
    """PostgreSQL: some session waits for a line held by another (see Outbox._lock_lines)."""
    if store.is_sqlite:
        return False
    with store.engine.connect() as conn:
        query = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        return bool(conn.exec_driver_sql(query).scalar_one())


OPERATOR_ACTIONS: dict[str, Callable[[Outbox, int], LineReport]] = {
    "discard": lambda outbox, dead: outbox.discard_dead_letters([dead], by="alice@host"),
    "retry": lambda outbox, dead: outbox.retry_dead_letters([dead]),
}


@pytest.mark.parametrize("action", sorted(OPERATOR_ACTIONS))
def test_a_delivery_routed_as_its_dead_letter_is_let_go_is_due_at_once(
    store: MessageStore, store_url: str, action: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = Outbox(store)
    a01, a04 = (
        o.message_id
        for o in store.insert_messages(
            [new_message("RACE-1", patient_id="P-RACE-1"), new_message("RACE-2", event="A04")]
        )
    )
    dead = _dead_letter(outbox, a01)

    operator_store = MessageStore(store_url)  # the CLI's own
    reports: list[LineReport] = []
    operator = threading.Thread(
        target=lambda: reports.append(OPERATOR_ACTIONS[action](Outbox(operator_store), dead))
    )
    place_in_line = outbox._place_in_line

    def read_then_let_the_operator_in(*args: Any) -> Any:
        placed = place_in_line(*args)  # routing has read that the dead letter holds the line
        operator.start()
        wait_for(
            lambda: not operator.is_alive() or _waiting_for_a_lock(store),
            what="the operator's command done, or waiting for routing's commit",
        )
        return placed

    monkeypatch.setattr(outbox, "_place_in_line", read_then_let_the_operator_in)
    try:
        assert outbox.record_routing([_result(a04)]) == [a04]
        operator.join(timeout=30)
        assert not operator.is_alive()
    finally:
        operator_store.close()
    assert [report.count for report in reports] == [1]

    [routed] = outbox.find(message_id=a04)
    assert routed.not_before < PARKED, "left parked behind a dead letter that is gone"
    # Sent without the sweep (tidy_lines): after the retried A01, or at once.
    if action == "retry":
        [first] = outbox.claim_due(10, LEASE)
        assert first.id == dead
        outbox.finish(
            [
                AttemptResult(
                    first.id,
                    a01,
                    1,
                    datetime.now(UTC),
                    3,
                    True,
                    "HTTP 200",
                    destination="ehr",
                    order_key=LINE,
                )
            ]
        )
    assert [d.id for d in outbox.claim_due(10, LEASE)] == [routed.id]
