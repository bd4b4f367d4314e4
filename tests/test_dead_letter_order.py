"""A dead letter holds its patient's line to its destination: later deliveries of that patient
to that destination wait until an operator retries it (it goes first, they follow in order) or
discards it (kept, never sent, they go on). ``retry.after_dead_letter: continue`` lets a
destination where order does not matter go on; ``max_attempts: 0`` retries until it works.

The outbox SQL runs on SQLite and PostgreSQL; the hub tests run a real hub against a real HTTP
receiver whose answers they switch, and the operator's side through the real CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select, text

from carehub.cli import main
from carehub.components import Outgoing
from carehub.config import load_config
from carehub.routing.config import RetryPolicy
from carehub.routing.router import PlannedDelivery, RouteResult, RoutingResult
from carehub.status import read_status
from carehub.store import outbox as outbox_module
from carehub.store.outbox import (
    _CLAIM_CANDIDATES,
    PARKED,
    AttemptResult,
    DeliveryRecord,
    Handover,
    Outbox,
    held_counts,
)
from carehub.store.schema import deliveries
from carehub.store.store import MessageStore, sqlite_url
from carehub.testing import HubThread, make_adt
from tests import test_store
from tests.helpers_http import HTTPServer, wait_for
from tests.test_store import new_message
from tests.test_worker import send

store_url = test_store.store_url
store = test_store.store

LEASE = timedelta(minutes=5)


# -- the outbox, on SQLite and PostgreSQL ---------------------------------------------------------
def _plan(
    outbox: Outbox,
    message_id: int,
    line: str,
    destination: str = "ehr",
    handover: Handover | None = None,
) -> None:
    """Route one message to one delivery in ``line`` (the patient) of ``destination``."""
    outgoing = Outgoing(b"{}", "application/json", f"key-{message_id}-{destination}")
    planned = PlannedDelivery("adt", destination, "webhook", outgoing, line, 3)
    result = RoutingResult(message_id, 1, [RouteResult("adt", True, [], [], [planned])])
    outbox.record_routing([result], handover)


def _messages(store: MessageStore, count: int, prefix: str = "M") -> list[int]:
    batch = [new_message(f"{prefix}{n}", patient_id=f"{prefix}P{n}") for n in range(count)]
    return [o.message_id for o in store.insert_messages(batch)]


def _result(
    delivery: DeliveryRecord,
    *,
    delivered: bool = False,
    retry_in: float | None = None,
    attempt: int = 1,
    holds: bool = True,
) -> AttemptResult:
    now = datetime.now(UTC)
    return AttemptResult(
        delivery.id,
        delivery.message_id,
        attempt,
        now,
        3,
        delivered,
        "HTTP 200" if delivered else "HTTP 503",
        None if retry_in is None else now + timedelta(seconds=retry_in),
        destination=delivery.destination,
        order_key=delivery.order_key,
        holds_line=holds,
    )


def _keys(claimed: list[DeliveryRecord]) -> list[str]:
    return [d.idempotency_key for d in claimed]


def _by_key(outbox: Outbox, key: str) -> DeliveryRecord:
    [found] = [d for d in outbox.find(limit=None) if d.idempotency_key == key]
    return found


def _later(seconds: float = 1.0) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def test_a_dead_letter_that_holds_its_line_keeps_later_ones_waiting(store: MessageStore) -> None:
    outbox = Outbox(store)
    a01, a03, a04, other = _messages(store, 4)
    for message_id in (a01, a03, a04):
        _plan(outbox, message_id, "HOSP|P1")
    _plan(outbox, other, "HOSP|P2")
    first = outbox.claim_due(10, LEASE)
    assert _keys(first) == [f"key-{a01}-ehr", f"key-{other}-ehr"]
    outbox.finish([_result(first[0]), _result(first[1], delivered=True)])  # A01 dead, holds

    assert outbox.claim_due(10, LEASE, _later()) == []  # A03 and A04 wait behind it
    rows = {d.idempotency_key: d for d in outbox.find(limit=None)}
    assert rows[f"key-{a01}-ehr"].status == "dead" and rows[f"key-{a01}-ehr"].holds_line
    for message_id in (a03, a04):  # parked: claims never read them
        assert rows[f"key-{message_id}-ehr"].status == "pending"
        assert rows[f"key-{message_id}-ehr"].not_before == PARKED
    with store.engine.connect() as conn:
        assert held_counts(conn) == {("ehr", "webhook"): 2}
    assert outbox.waiting_behind([first[0].id]) == {first[0].id: 2}

    # A new message for the patient waits too, and is not handed straight to a worker.
    [a08] = _messages(store, 1, "N")
    handover = Handover(room=10, lease=LEASE)
    _plan(outbox, a08, "HOSP|P1", handover=handover)
    assert handover.taken == []
    assert _by_key(outbox, f"key-{a08}-ehr").not_before == PARKED
    assert sum(outbox.held().values()) == 3


def test_continue_lets_the_line_go_on_as_before(store: MessageStore) -> None:
    outbox = Outbox(store)
    a01, a03 = _messages(store, 2)
    for message_id in (a01, a03):
        _plan(outbox, message_id, "HOSP|P1")
    [head] = outbox.claim_due(10, LEASE)
    outbox.finish([_result(head, retry_in=60)])  # fails once: A03 parked behind the retry
    assert _by_key(outbox, f"key-{a03}-ehr").not_before == PARKED
    outbox.finish([_result(head, attempt=2, holds=False)])  # dead, after_dead_letter: continue
    assert _keys(outbox.claim_due(10, LEASE)) == [f"key-{a03}-ehr"]
    with store.engine.connect() as conn:
        assert held_counts(conn) == {}


def test_retry_sends_the_dead_letter_first_then_the_held_ones_in_order(
    store: MessageStore,
) -> None:
    outbox = Outbox(store)
    a01, a03, a04 = _messages(store, 3)
    for message_id in (a01, a03, a04):
        _plan(outbox, message_id, "HOSP|P1")
    [head] = outbox.claim_due(10, LEASE)
    outbox.finish([_result(head)])

    report = outbox.retry_dead_letters([head.id])
    assert (report.count, report.lines, report.released, report.overtaken) == (1, 1, 2, 0)
    sent = []
    for _ in range(3):  # one at a time: each is first in line only once the one before is sent
        [next_one] = outbox.claim_due(10, LEASE)
        assert outbox.claim_due(10, LEASE) == []
        outbox.finish([_result(next_one, delivered=True)])
        sent.append(next_one.idempotency_key)
    assert sent == [f"key-{a01}-ehr", f"key-{a03}-ehr", f"key-{a04}-ehr"]
    assert store.get(a01).status == "delivered"  # type: ignore[union-attr]


def test_a_retried_dead_letter_behind_another_one_stays_held(store: MessageStore) -> None:
    outbox = Outbox(store)
    a01, a03, a04 = _messages(store, 3)
    for message_id in (a01, a03, a04):
        _plan(outbox, message_id, "HOSP|P1")
    [head] = outbox.claim_due(10, LEASE)
    outbox.finish([_result(head, holds=False)])  # dead, and (continue) let A03 go
    [second] = outbox.claim_due(10, LEASE)
    outbox.finish([_result(second)])  # A03 dead too, holding A04
    with store.engine.begin() as conn:  # the destination is set to hold from now on
        conn.execute(deliveries.update().values(holds_line=True).where(deliveries.c.id == head.id))

    report = outbox.retry_dead_letters([second.id])  # A03 again, but A01 is still dead
    assert report.released == 0
    assert outbox.claim_due(10, LEASE, _later()) == []
    assert outbox.get(second.id).not_before == PARKED
    report = outbox.retry_dead_letters([head.id])
    assert report.released == 2
    assert _keys(outbox.claim_due(10, LEASE)) == [f"key-{a01}-ehr"]


def test_discard_keeps_the_record_and_lets_the_line_go_on(store: MessageStore) -> None:
    outbox = Outbox(store)
    a01, a03 = _messages(store, 2)
    for message_id in (a01, a03):
        _plan(outbox, message_id, "HOSP|P1")
    [head] = outbox.claim_due(10, LEASE)
    outbox.finish([_result(head)])

    report = outbox.discard_dead_letters(None, "ehr", by="alice@host", reason="sent by fax")
    assert (report.count, report.released) == (1, 1)
    discarded = outbox.get(head.id)
    assert discarded is not None and discarded.status == "discarded"
    assert not discarded.holds_line
    assert outbox.find(status="dead") == []
    assert [d.id for d in outbox.find(status="discarded")] == [head.id]
    attempts = outbox.attempts(head.id)
    assert [(a.number, a.outcome) for a in attempts] == [(1, "dead"), (1, "discarded")]
    assert attempts[-1].detail == (
        "discarded by alice@host (carehub dead-letters discard): sent by fax"
    )
    events = [(c.event, c.detail) for c in store.history(a01)]
    assert events[-1][0] == "discarded" and f"#{head.id}" in (events[-1][1] or "")
    assert store.get(a01).status == "failed"  # type: ignore[union-attr]

    assert _keys(outbox.claim_due(10, LEASE)) == [f"key-{a03}-ehr"]
    assert outbox.retry_dead_letters([head.id]).count == 0  # never sent again
    # Settled with a discarded delivery among its own: not delivered.
    assert outbox.discard_dead_letters([head.id], by="bob").count == 0


def test_a_delivery_sent_after_failing_releases_the_line(store: MessageStore) -> None:
    outbox = Outbox(store)
    a01, a03, a04 = _messages(store, 3)
    _plan(outbox, a01, "HOSP|P1")
    [head] = outbox.claim_due(10, LEASE)
    outbox.finish([_result(head, retry_in=0)])  # due again at once
    for message_id in (a03, a04):  # routed while the line is stalled: written parked
        _plan(outbox, message_id, "HOSP|P1")
    assert {d.not_before for d in outbox.find(status="pending") if d.id != head.id} == {PARKED}
    [again] = outbox.claim_due(10, LEASE)
    assert again.id == head.id
    outbox.finish([_result(again, delivered=True, attempt=2)])
    assert _keys(outbox.claim_due(10, LEASE)) == [f"key-{a03}-ehr"]


def test_tidy_lines_mends_what_events_did_not(store: MessageStore) -> None:
    """A parked delivery nothing stalls any more is made due; a due one a stalled delivery is
    before is parked (a race between workers, a dead letter pruned, a setting changed)."""
    outbox = Outbox(store)
    a01, a03, b01, b03 = _messages(store, 4)
    for message_id, line in ((a01, "P1"), (a03, "P1"), (b01, "P2"), (b03, "P2")):
        _plan(outbox, message_id, line)
    first = outbox.claim_due(10, LEASE)
    outbox.finish([_result(first[0], delivered=True), _result(first[1], retry_in=60)])
    with store.engine.begin() as conn:  # undo what finish did: a03 parked, b03 due
        conn.execute(
            deliveries.update()
            .where(deliveries.c.idempotency_key == f"key-{a03}-ehr")
            .values(not_before=PARKED)
        )
        conn.execute(
            deliveries.update()
            .where(deliveries.c.idempotency_key == f"key-{b03}-ehr")
            .values(not_before=datetime.now(UTC))
        )
    assert outbox.tidy_lines() == (1, 1)
    assert _by_key(outbox, f"key-{b03}-ehr").not_before == PARKED
    assert _keys(outbox.claim_due(10, LEASE)) == [f"key-{a03}-ehr"]
    assert outbox.tidy_lines() == (0, 0)


def test_dead_letters_follow_the_destinations_setting_at_start(store: MessageStore) -> None:
    """Dead letters from before lines were held (holds_line NULL) take their destination's
    setting when a worker starts, and a changed setting applies to those already dead."""
    outbox = Outbox(store)
    a01, a03 = _messages(store, 2)
    for message_id in (a01, a03):
        _plan(outbox, message_id, "HOSP|P1")
    [head] = outbox.claim_due(10, LEASE)
    outbox.finish([_result(head, holds=False)])
    [second] = outbox.claim_due(10, LEASE)
    outbox.finish([_result(second, holds=False)])
    with store.engine.begin() as conn:  # as an older carehub left them
        conn.execute(deliveries.update().values(holds_line=None))
    [a04] = _messages(store, 1, "N")
    _plan(outbox, a04, "HOSP|P1")

    assert outbox.apply_line_policy(["ehr"], ["other"]) == 2
    assert outbox.claim_due(10, LEASE, _later()) == []
    assert _by_key(outbox, f"key-{a04}-ehr").not_before == PARKED
    assert outbox.apply_line_policy(["ehr"], []) == 0
    assert outbox.apply_line_policy([], ["ehr"]) == 2  # set to continue: the line goes on
    assert _keys(outbox.claim_due(10, LEASE)) == [f"key-{a04}-ehr"]


def test_retry_counts_later_deliveries_already_delivered(store: MessageStore) -> None:
    outbox = Outbox(store)
    batch = [new_message(f"OV{n}", patient_id="PX") for n in range(3)]
    a01, a03, a04 = [o.message_id for o in store.insert_messages(batch)]
    [lonely] = _messages(store, 1, "L")
    line = "HOSP|PX"
    for message_id in (a01, a03, a04):
        _plan(outbox, message_id, line)
    _plan(outbox, lonely, "HOSP|LP0")
    # A01 and A03 die without holding the line (continue), so A04 goes before them.
    a01_delivery, lonely_delivery = outbox.claim_due(10, LEASE)
    outbox.finish([_result(a01_delivery, holds=False), _result(lonely_delivery)])
    [a03_delivery] = outbox.claim_due(10, LEASE)
    outbox.finish([_result(a03_delivery, holds=False)])
    [a04_delivery] = outbox.claim_due(10, LEASE)
    outbox.finish([_result(a04_delivery, delivered=True)])

    report = outbox.retry_dead_letters(None, "ehr")
    assert (report.count, report.lines, report.overtaken, report.overtaken_lines) == (3, 2, 1, 1)


def test_max_attempts_forever_and_after_dead_letter_are_validated(tmp_path: Path) -> None:
    assert RetryPolicy(max_attempts=0).forever
    assert RetryPolicy.model_validate({"max_attempts": "forever"}).max_attempts == 0
    assert RetryPolicy().holds_line("mllp") and RetryPolicy().holds_line("webhook")
    assert not RetryPolicy().holds_line("email") and not RetryPolicy().holds_line("sms")
    assert RetryPolicy(after_dead_letter="hold").holds_line("sms")
    assert not RetryPolicy(after_dead_letter="continue").holds_line("mllp")
    assert RetryPolicy(multiplier=2).delay(5000) <= 600 * 1.2  # no overflow when retried forever

    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "routes:\n"
        "  - name: ehr\n"
        "    steps:\n"
        "      - forward: {channel: webhook, url: 'http://x', retry: {after_dead_letter: skip}}\n",
        encoding="utf-8",
    )
    config = tmp_path / "carehub.yaml"
    config.write_text("routes: [routes.yaml]\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["routes", "check", "--offline", "--config", str(config)])
    assert result.exit_code != 0
    assert "retry.after_dead_letter" in result.output
    assert "'hold' or 'continue'" in result.output
    routes.write_text(
        "routes:\n"
        "  - name: ehr\n"
        "    steps:\n"
        "      - forward: {channel: webhook, url: 'http://x', retry: {max_attempts: -1}}\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["routes", "check", "--offline", "--config", str(config)])
    assert result.exit_code != 0 and "retry.max_attempts" in result.output


def test_line_queries_read_the_partial_indexes(tmp_path: Path) -> None:
    """The place-in-line check reads dead letters by line through their partial index, the
    held counts start from the dead letters, discarded ones are listed through theirs."""
    store = MessageStore(sqlite_url(tmp_path / "data"))
    store.migrate()
    outbox = Outbox(store)
    claim = (
        _CLAIM_CANDIDATES[(False, False)]
        .params(now=datetime(2026, 1, 1, tzinfo=UTC), limit=10)
        .compile(store.engine)
    )
    claim_params = tuple(claim.construct_params()[name] for name in claim.positiontup or ())

    def plan(sql: str, params: tuple[object, ...] = ()) -> str:
        with store.engine.connect() as conn:
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)
            return " | ".join(r[-1] for r in rows)

    def literal(query: Any) -> str:
        return str(query.compile(store.engine, compile_kwargs={"literal_binds": True}))

    try:
        claim_plan = plan(str(claim), claim_params)
        assert "USING INDEX ix_deliveries_due" in claim_plan
        assert "USING INDEX ix_deliveries_unfinished" in claim_plan
        assert "USING INDEX ix_deliveries_dead_line" in claim_plan
        busy = plan(outbox._sql.busy_lines(1, 1).replace("?", "'x'"))
        assert "ix_deliveries_unfinished" in busy and "ix_deliveries_dead_line" in busy
        for name in ("park_line", "unpark_line", "park_behind", "stale_parked", "stalled_due"):
            found = plan(getattr(outbox._sql, name).replace("?", "'x'"))
            assert "SCAN deliveries" not in found, (name, found)
        # held counts: the dead letters, each joined to the unfinished after it in its line.
        held = plan(literal(outbox_module._HELD))
        assert "USING INDEX ix_deliveries_dead" in held
        assert "USING INDEX ix_deliveries_unfinished" in held
        discarded = (
            select(deliveries.c.id)
            .where(deliveries.c.status == text("'discarded'"))
            .order_by(deliveries.c.id)
        )
        assert "USING INDEX ix_deliveries_discarded" in plan(literal(discarded))
    finally:
        store.close()


@pytest.mark.parametrize(
    "store_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_postgresql_reads_dead_letters_by_line_through_their_index(store: MessageStore) -> None:
    """The claim's check for a dead letter holding the line can use the partial index on
    PostgreSQL too (sequential scans off, so the planner shows what it can use on a table this
    small)."""
    claim = (
        _CLAIM_CANDIDATES[(False, False)]
        .params(now=datetime(2026, 1, 1, tzinfo=UTC), limit=10)
        .compile(store.engine)
    )
    with store.engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")
        rows = conn.exec_driver_sql(f"EXPLAIN {claim}", claim.construct_params())
        plan_text = " ".join(str(row[0]) for row in rows)
    assert "ix_deliveries_dead_line" in plan_text, plan_text
    assert "ix_deliveries_due" in plan_text, plan_text


# -- a real hub: the audit's A01, A03, then A04 for one patient -----------------------------------
HUB_ROUTES = """
routes:
  - name: adt
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: ehr, url: {url}, retry: {retry}}}
"""
#: Two fast attempts, then a dead letter (the sample routes give up after a day; same thing).
TWO_TRIES = "{max_attempts: 2, initial_delay: 0.05, multiplier: 1, max_delay: 0.05, jitter: 0}"
TWO_TRIES_CONTINUE = TWO_TRIES[:-1] + ", after_dead_letter: continue}"
DESTINATION = "adt/ehr"
#: How long a test watches for a delivery that must not happen: 20 of the worker's polls.
QUIET = 1.0


def hub_config(tmp_path: Path, url: str, retry: str, store_url: str | None = None) -> Path:
    """carehub.yaml (MLLP on a free port, a fast worker, the store at ``store_url`` or in the
    data dir) and its routes.yaml, written again for a restart with other settings."""
    (tmp_path / "routes.yaml").write_text(HUB_ROUTES.format(url=url, retry=retry), "utf-8")
    path = tmp_path / "carehub.yaml"
    store = f"store: {{url: '{store_url}'}}\n" if store_url else ""
    path.write_text(
        "listeners:\n"
        "  mllp: [{name: test, host: 127.0.0.1, port: 0}]\n"
        "  http: {enabled: false}\n"
        "worker: {poll_interval: 0.05}\n"
        f"{store}routes: [routes.yaml]\n",
        encoding="utf-8",
    )
    return path


def cli(config: Path, data_dir: Path, *args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(
        main, [*args, "--config", str(config), "--data-dir", str(data_dir)], input=stdin
    )


def adt(control_id: str, event: str) -> str:
    return make_adt(control_id, event, patient_id="RG300001")


def arrived(server: HTTPServer, store: MessageStore) -> list[str]:
    """The control ids of the messages the receiver took (2xx), in the order it took them."""
    by_key = {d.idempotency_key: d.message_id for d in Outbox(store).find(limit=None)}
    taken = [by_key[r.key] for r in server.ok() if r.key in by_key]
    return [store.get(message_id).control_id or "" for message_id in taken]  # type: ignore[union-attr]


def delivery_of(store: MessageStore, control_id: str) -> DeliveryRecord:
    [message] = [m for m in store.find(limit=None) if m.control_id == control_id]
    [delivery] = Outbox(store).find(message_id=message.id)
    return delivery


def statuses(store: MessageStore) -> dict[str, str]:
    """Control id -> its delivery's status."""
    found: dict[str, str] = {}
    for message in store.find(limit=None):
        for delivery in Outbox(store).find(message_id=message.id):
            found[message.control_id or ""] = delivery.status
    return found


@pytest.fixture
def receiver() -> Iterator[HTTPServer]:
    """The downstream EHR, down (503) until a test brings it back."""
    with HTTPServer(lambda _: 503) as server:
        yield server


def outage(hub: HubThread, receiver: HTTPServer) -> None:
    """A01 then A03 sent while the receiver is down: the A01 becomes a dead letter; then the
    receiver comes back."""
    send(hub, [adt("RGH-O-0001", "A01"), adt("RGH-O-0002", "A03")])
    wait_for(lambda: statuses(hub.store).get("RGH-O-0001") == "dead", what="the A01 to die")
    receiver.respond = lambda _: 200


def test_by_default_the_a04_waits_until_the_dead_a01_is_retried_and_all_arrive_in_order(
    tmp_path: Path, receiver: HTTPServer, store_url: str
) -> None:
    config = hub_config(tmp_path, receiver.url(), TWO_TRIES, store_url)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        outage(hub, receiver)
        send(hub, [adt("RGH-O-0003", "A04")])  # the receiver is back: a new message comes
        wait_for(lambda: "RGH-O-0003" in statuses(hub.store), what="the A04 routed")
        time.sleep(QUIET)
        assert receiver.ok() == []  # neither the held A03 nor the A04 overtook the A01
        assert {r.key for r in receiver.requests} == {
            delivery_of(hub.store, "RGH-O-0001").idempotency_key
        }
        assert statuses(hub.store) == {
            "RGH-O-0001": "dead",
            "RGH-O-0002": "pending",
            "RGH-O-0003": "pending",
        }

        report = read_status(hub.store, timedelta(hours=1))
        [ehr] = report.destinations
        assert (ehr.destination, ehr.waiting, ehr.held, ehr.dead) == (DESTINATION, 2, 2, 1)
        listed = cli(config, data_dir, "dead-letters", "list", "--json")
        [dead] = [json.loads(line) for line in listed.output.splitlines()]
        assert (dead["holds_line"], dead["held_behind"]) == (True, 2)

        result = cli(config, data_dir, "dead-letters", "retry", "--destination", DESTINATION)
        assert result.exit_code == 0, result.output
        assert "1 dead letter(s) queued again" in result.output
        assert "2 delivery(ies) held behind them follow, each line in order" in result.output
        assert "already delivered" not in result.output  # nothing overtook anything
        wait_for(lambda: len(receiver.ok()) == 3, what="all three delivered")
        assert arrived(receiver, hub.store) == ["RGH-O-0001", "RGH-O-0002", "RGH-O-0003"]
        assert read_status(hub.store, timedelta(hours=1)).held == 0


def test_dead_letters_from_before_hold_the_line_once_the_hub_starts_with_hold(
    tmp_path: Path, receiver: HTTPServer
) -> None:
    """The audit's case exactly: A01 and A03 both dead (here with continue, as every dead
    letter was before), then the hub restarts with the default and the A04 waits for them."""
    config = hub_config(tmp_path, receiver.url(), TWO_TRIES_CONTINUE)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [adt("RGH-O-0001", "A01"), adt("RGH-O-0002", "A03")])
        wait_for(
            lambda: statuses(hub.store) == {"RGH-O-0001": "dead", "RGH-O-0002": "dead"},
            what="A01 and A03 dead, one after the other",
        )
    receiver.respond = lambda _: 200
    config = hub_config(tmp_path, receiver.url(), TWO_TRIES)
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [adt("RGH-O-0003", "A04")])
        wait_for(lambda: "RGH-O-0003" in statuses(hub.store), what="the A04 routed")
        time.sleep(QUIET)
        assert receiver.ok() == []
        assert read_status(hub.store, timedelta(hours=1)).held == 1
        result = cli(config, data_dir, "dead-letters", "retry", "--all")
        assert result.exit_code == 0, result.output
        assert "2 dead letter(s) queued again" in result.output
        wait_for(lambda: len(receiver.ok()) == 3, what="all three delivered")
        assert arrived(receiver, hub.store) == ["RGH-O-0001", "RGH-O-0002", "RGH-O-0003"]


def test_discarding_the_dead_a01_lets_the_held_ones_go_in_order(
    tmp_path: Path, receiver: HTTPServer
) -> None:
    config = hub_config(tmp_path, receiver.url(), TWO_TRIES)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        outage(hub, receiver)
        send(hub, [adt("RGH-O-0003", "A04")])
        wait_for(lambda: "RGH-O-0003" in statuses(hub.store), what="the A04 routed")
        time.sleep(QUIET)
        assert receiver.ok() == []
        dead = delivery_of(hub.store, "RGH-O-0001")

        result = cli(
            config, data_dir, "dead-letters", "discard", str(dead.id), "--reason", "phoned in"
        )
        assert result.exit_code == 0, result.output
        assert "1 dead letter(s) discarded; they stay in the store" in result.output
        assert "2 delivery(ies) held behind them go on" in result.output
        wait_for(lambda: len(receiver.ok()) == 2, what="A03 and A04 delivered")
        assert arrived(receiver, hub.store) == ["RGH-O-0002", "RGH-O-0003"]
        time.sleep(QUIET)
        assert len(receiver.ok()) == 2  # the discarded A01 is never sent
        assert delivery_of(hub.store, "RGH-O-0001").status == "discarded"


def test_with_continue_the_a04_goes_first_and_retry_says_order_was_broken(
    tmp_path: Path, receiver: HTTPServer
) -> None:
    """``after_dead_letter: continue``: what every destination did before lines were held."""
    config = hub_config(tmp_path, receiver.url(), TWO_TRIES_CONTINUE)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [adt("RGH-O-0001", "A01"), adt("RGH-O-0002", "A03")])
        wait_for(
            lambda: statuses(hub.store) == {"RGH-O-0001": "dead", "RGH-O-0002": "dead"},
            what="A01 and A03 dead, one after the other",
        )
        receiver.respond = lambda _: 200
        send(hub, [adt("RGH-O-0003", "A04")])
        wait_for(lambda: len(receiver.ok()) == 1, what="the A04 delivered at once")
        assert read_status(hub.store, timedelta(hours=1)).held == 0

        result = cli(config, data_dir, "dead-letters", "retry", "--destination", DESTINATION)
        assert result.exit_code == 0, result.output
        assert "2 dead letter(s) queued again" in result.output
        assert (
            "warning: 1 later delivery(ies) in 1 of these patient lines were already "
            "delivered before the dead letters"
        ) in result.stderr
        wait_for(lambda: len(receiver.ok()) == 3, what="the dead ones sent after all")
        assert arrived(receiver, hub.store) == ["RGH-O-0003", "RGH-O-0001", "RGH-O-0002"]


def test_max_attempts_forever_retries_until_the_receiver_is_back(
    tmp_path: Path, receiver: HTTPServer
) -> None:
    forever = "{max_attempts: forever, initial_delay: 0.05, multiplier: 1, max_delay: 0.05}"
    config = hub_config(tmp_path, receiver.url(), forever)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [adt("RGH-O-0001", "A01"), adt("RGH-O-0002", "A03")])
        wait_for(lambda: len(receiver.requests) >= 12, what="a dozen attempts, none final")
        now = statuses(hub.store)
        assert now["RGH-O-0002"] == "pending"  # waiting behind the first
        assert now["RGH-O-0001"] in ("pending", "sending")  # between two tries, or in one
        receiver.respond = lambda _: 200
        wait_for(lambda: len(receiver.ok()) == 2, what="both delivered once it is back")
        assert arrived(receiver, hub.store) == ["RGH-O-0001", "RGH-O-0002"]
        first = delivery_of(hub.store, "RGH-O-0001")
        assert first.attempts >= 12 and first.max_attempts == 0
        assert Outbox(hub.store).find(status="dead") == []


def test_migration_0010_goes_down_and_up_again(store_url: str) -> None:
    """Downgraded, a discarded dead letter is a dead letter again and a parked delivery is
    due (the older claim knows neither); upgraded again, the schema is whole."""
    from alembic import command as alembic_command
    from alembic.config import Config as AlembicConfig

    from carehub.store.store import MIGRATIONS

    store = MessageStore(store_url)
    try:
        store.migrate()
        outbox = Outbox(store)
        a01, a03, b01 = _messages(store, 3)
        _plan(outbox, a01, "P1")
        _plan(outbox, a03, "P1")
        _plan(outbox, b01, "P2")
        first = outbox.claim_due(10, LEASE)
        outbox.finish([_result(d) for d in first])  # both dead; a03 parked behind a01
        outbox.discard_dead_letters([first[1].id], by="test")

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            alembic_command.downgrade(cfg, "0009")
        with store.engine.connect() as conn:
            rows = dict(
                conn.exec_driver_sql("SELECT idempotency_key, status FROM deliveries").all()
            )
            columns = {c["name"] for c in sa_inspect(conn).get_columns("deliveries")}
            due = conn.execute(select(deliveries.c.not_before)).scalars().all()
        assert rows == {
            f"key-{a01}-ehr": "dead",
            f"key-{a03}-ehr": "pending",
            f"key-{b01}-ehr": "dead",
        }
        assert "holds_line" not in columns
        assert all(when.year < PARKED.year for when in due)

        store.migrate()
        assert store.schema_revision() is not None
        assert outbox.find(status="dead")[0].holds_line is None  # until a worker starts
    finally:
        store.close()
