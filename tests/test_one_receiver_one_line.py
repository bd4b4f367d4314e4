"""Forwards that reach the same receiving system share one line per patient, whatever route
they belong to: an interface split by event over two routes (A01/A03 on one, A08 on another,
both over MLLP to one EHR) still hands the EHR each patient's messages in arrival order, and a
dead letter on either route holds the patient's later messages on both until an operator
retries or discards it. `routes check` says which forwards share a line.

A real hub (on SQLite and on PostgreSQL) forwards to a real MLLP receiver whose answers each test
sets; the operator's side runs through the real CLI."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from carehub.cli import main
from carehub.components import Outgoing
from carehub.config import load_config
from carehub.hl7.ack import AckCode, build_ack
from carehub.hl7.view import MessageView
from carehub.routing.router import PlannedDelivery, RouteResult, RoutingResult
from carehub.status import read_status
from carehub.store.outbox import AttemptResult, Outbox
from carehub.store.store import MessageStore
from carehub.testing import HubThread, make_adt
from tests import test_store
from tests.helpers_http import wait_for
from tests.test_channels import serve_mllp
from tests.test_store import new_message
from tests.test_worker import send

store_url = test_store.store_url

PATIENT = "RG400001"
ADMITS, UPDATES = "adt-admits/ehr", "adt-updates/ehr"
#: How long a test watches for a delivery that must not happen: 20 of the worker's polls.
QUIET = 1.0


@dataclass
class Arrival:
    control_id: str
    event: str
    code: str


class Receiver:
    """The downstream EHR: a real MLLP peer on a loop thread of its own. ``decide`` picks the
    ACK code for each message (MSH-10, MSH-9.2, how many times that MSH-10 came before); every
    arrival is recorded with the code it got."""

    def __init__(self) -> None:
        self.decide: Callable[[str, str, int], AckCode] = lambda _cid, _event, _seen: AckCode.ACCEPT
        self.arrivals: list[Arrival] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def _answer(self, payload: bytes) -> bytes:
        view = MessageView(payload.decode())
        control_id, event = view.get("MSH-10"), view.get("MSH-9.2")
        with self._lock:
            seen = sum(1 for a in self.arrivals if a.control_id == control_id)
            code = self.decide(control_id, event, seen)
            self.arrivals.append(Arrival(control_id, event, code.value))
        return build_ack(code, view).encode()

    def accepted(self) -> list[str]:
        """The control ids the receiver took (AA), in the order it took them."""
        with self._lock:
            return [a.control_id for a in self.arrivals if a.code == "AA"]

    def seen(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(a.control_id, a.code) for a in self.arrivals]

    def __enter__(self) -> Receiver:
        self._thread.start()
        serving = serve_mllp(self._answer)
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


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as peer:
        yield peer


#: A retry a second later (so a delivery of the other route that did not wait for it would
#: arrive first), then a dead letter after the third attempt.
RETRY = "{max_attempts: 3, initial_delay: 1, multiplier: 1, max_delay: 1, jitter: 0}"

ROUTES = """
routes:
  - name: adt-admits
    when: {{type: ADT, events: [A01, A03, A04]}}
    steps:
      - forward: {{channel: mllp, name: ehr, host: 127.0.0.1, port: {port}, timeout: 5,
                  allow_cleartext: true, retry: {retry}}}
  - name: adt-updates
    when: {{type: ADT, events: [A08]}}
    steps:
      - forward: {{channel: mllp, name: ehr, host: 127.0.0.1, port: {port}, timeout: 5,
                  allow_cleartext: true, retry: {retry}}}
"""


def hub_config(tmp_path: Path, port: int, store_url: str | None = None) -> Path:
    (tmp_path / "routes.yaml").write_text(ROUTES.format(port=port, retry=RETRY), "utf-8")
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


def cli(config: Path, data_dir: Path, *args: str) -> Any:
    return CliRunner().invoke(main, [*args, "--config", str(config), "--data-dir", str(data_dir)])


def adt(control_id: str, event: str) -> str:
    return make_adt(control_id, event, patient_id=PATIENT)


def statuses(store: MessageStore) -> dict[str, str]:
    """Control id -> its delivery's status."""
    outbox = Outbox(store)
    return {
        message.control_id or "": delivery.status
        for message in store.find(limit=None)
        for delivery in outbox.find(message_id=message.id)
    }


def held_by_destination(store: MessageStore) -> dict[str, int]:
    report = read_status(store, timedelta(hours=1))
    return {item.destination: item.held for item in report.destinations if item.held}


def test_the_a08_of_another_route_waits_for_the_a01_the_receiver_refused_once(
    tmp_path: Path, receiver: Receiver, store_url: str
) -> None:
    """AE to the first A01: its retry comes a second later, and the A08 (route adt-updates)
    and A03 (adt-admits) sent meanwhile reach the EHR after it, in arrival order."""
    receiver.decide = lambda _cid, event, seen: (
        AckCode.ERROR if event == "A01" and seen == 0 else AckCode.ACCEPT
    )
    config = hub_config(tmp_path, receiver.port, store_url)
    with HubThread(load_config(config), tmp_path / "data") as hub:
        send(hub, [adt("Q-001", "A01")])
        wait_for(lambda: ("Q-001", "AE") in receiver.seen(), what="the A01 refused once")
        send(hub, [adt("Q-002", "A08"), adt("Q-003", "A03")])
        wait_for(lambda: len(receiver.accepted()) == 3, timeout=30, what="all three taken")
        assert receiver.accepted() == ["Q-001", "Q-002", "Q-003"]
        # The receiver has answered; the worker records each delivery a moment later.
        delivered = dict.fromkeys(("Q-001", "Q-002", "Q-003"), "delivered")
        wait_for(lambda: statuses(hub.store) == delivered, what="all three recorded delivered")


def test_a_dead_a01_holds_the_a08_of_the_other_route_until_it_is_retried(
    tmp_path: Path, receiver: Receiver, store_url: str
) -> None:
    """AR to the A01: a dead letter at once. The patient's A08, on the other route, waits
    behind it (counted as held), and follows it once an operator retries it."""
    receiver.decide = lambda _cid, event, seen: (
        AckCode.REJECT if event == "A01" and seen == 0 else AckCode.ACCEPT
    )
    config = hub_config(tmp_path, receiver.port, store_url)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [adt("Q-003", "A01")])
        wait_for(lambda: statuses(hub.store).get("Q-003") == "dead", what="the A01 dead")
        send(hub, [adt("Q-004", "A08")])
        wait_for(lambda: "Q-004" in statuses(hub.store), what="the A08 routed")
        time.sleep(QUIET)
        assert receiver.seen() == [("Q-003", "AR")]  # the A08 did not go past the dead A01
        assert statuses(hub.store) == {"Q-003": "dead", "Q-004": "pending"}
        assert held_by_destination(hub.store) == {UPDATES: 1}

        listed = cli(config, data_dir, "dead-letters", "list", "--json")
        assert listed.exit_code == 0, listed.output
        [dead] = [json.loads(line) for line in listed.output.splitlines()]
        assert (dead["destination"], dead["held_behind"]) == (ADMITS, 1)
        # The A08 waits in the line the dead A01 holds, though it goes to another destination.
        [a08] = [m for m in hub.store.find(limit=None) if m.control_id == "Q-004"]
        shown = cli(config, data_dir, "messages", "show", str(a08.id), "--json")
        [waiting] = json.loads(shown.output)["deliveries"]
        assert (waiting["destination"], waiting["line"], dead["line"]) == (UPDATES, ADMITS, ADMITS)

        result = cli(config, data_dir, "dead-letters", "retry", "--destination", ADMITS)
        assert result.exit_code == 0, result.output
        assert "1 delivery(ies) held behind them follow" in result.output
        wait_for(lambda: len(receiver.accepted()) == 2, timeout=30, what="A01 and A08 taken")
        assert receiver.accepted() == ["Q-003", "Q-004"]
        assert held_by_destination(hub.store) == {}


def test_discarding_the_dead_a01_lets_the_other_routes_a08_go_then_the_a03(
    tmp_path: Path, receiver: Receiver, store_url: str
) -> None:
    receiver.decide = lambda _cid, event, _seen: (
        AckCode.REJECT if event == "A01" else AckCode.ACCEPT
    )
    config = hub_config(tmp_path, receiver.port, store_url)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [adt("Q-005", "A01")])
        wait_for(lambda: statuses(hub.store).get("Q-005") == "dead", what="the A01 dead")
        send(hub, [adt("Q-006", "A08"), adt("Q-007", "A03")])
        wait_for(lambda: len(statuses(hub.store)) == 3, what="the A08 and A03 routed")
        time.sleep(QUIET)
        assert receiver.accepted() == []
        assert held_by_destination(hub.store) == {ADMITS: 1, UPDATES: 1}

        result = cli(config, data_dir, "dead-letters", "discard", "--destination", ADMITS, "--yes")
        assert result.exit_code == 0, result.output
        assert "2 delivery(ies) held behind them go on" in result.output
        wait_for(lambda: len(receiver.accepted()) == 2, timeout=30, what="A08 and A03 taken")
        assert receiver.accepted() == ["Q-006", "Q-007"]
        time.sleep(QUIET)
        assert [cid for cid, _ in receiver.seen()] == ["Q-005", "Q-006", "Q-007"]


def test_reprocessing_the_dead_a01_for_its_route_sends_it_before_the_other_routes_a08(
    tmp_path: Path, receiver: Receiver, store_url: str
) -> None:
    """`messages reprocess ID --destination adt-admits/ehr`: the new run's A01 takes the dead
    letter's place in the shared line, so the A08 held behind it follows it."""
    receiver.decide = lambda _cid, event, seen: (
        AckCode.REJECT if event == "A01" and seen == 0 else AckCode.ACCEPT
    )
    config = hub_config(tmp_path, receiver.port, store_url)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [adt("Q-020", "A01")])
        wait_for(lambda: statuses(hub.store).get("Q-020") == "dead", what="the A01 dead")
        send(hub, [adt("Q-021", "A08")])
        wait_for(lambda: "Q-021" in statuses(hub.store), what="the A08 routed")
        time.sleep(QUIET)
        assert receiver.accepted() == []
        [a01] = [m for m in hub.store.find(limit=None) if m.control_id == "Q-020"]
        result = cli(
            config, data_dir, "messages", "reprocess", str(a01.id), "--destination", ADMITS
        )
        assert result.exit_code == 0, result.output
        wait_for(lambda: len(receiver.accepted()) == 2, timeout=30, what="A01 and A08 taken")
        assert receiver.accepted() == ["Q-020", "Q-021"]


def test_routes_check_says_which_forwards_share_a_line(tmp_path: Path) -> None:
    """Same channel and address: one line, however the address is written (case, default
    port, a trailing slash, credentials). Another port, or another path, is another system."""
    (tmp_path / "routes.yaml").write_text(
        """
routes:
  - name: adt-admits
    when: {type: ADT, events: [A01, A03]}
    steps:
      - forward: {channel: mllp, name: ehr, host: 127.0.0.1, port: 22600, allow_cleartext: true}
      - forward: {channel: webhook, name: platform, url: "https://hooks.example.org/adt"}
      - forward: {channel: mllp, name: lab, host: 127.0.0.1, port: 22601, allow_cleartext: true}
  - name: adt-updates
    when: {type: ADT, events: [A08]}
    steps:
      - forward: {channel: mllp, name: ehr, host: 127.0.0.1, port: 22600, allow_cleartext: true}
      - forward: {channel: webhook, name: platform,
                  url: "https://svc:s3cret-long-enough@HOOKS.example.org:443/adt/"}
      - forward: {channel: webhook, name: other, url: "https://hooks.example.org/lab"}
""",
        "utf-8",
    )
    config = tmp_path / "carehub.yaml"
    config.write_text("routes: [routes.yaml]\n", "utf-8")
    result = cli(config, tmp_path / "data", "routes", "check", "--offline")
    assert result.exit_code == 0, result.output
    shared = [line for line in result.output.splitlines() if line.startswith("shared line")]
    assert shared == [
        "shared line adt-admits/ehr: adt-admits/ehr, adt-updates/ehr (mllp 127.0.0.1:22600)",
        "shared line adt-admits/platform: adt-admits/platform, adt-updates/platform "
        "(webhook https://hooks.example.org:443/adt)",
    ], result.output
    assert "s3cret" not in result.output


# -- deliveries stored before lines were shared -------------------------------------------------
def _store_before_shared_lines(store_url: str, payloads: dict[str, str]) -> dict[str, int]:
    """A store as the release before shared lines left it: the patient's A01 a dead letter
    on adt-admits/ehr (holding its line), the A08 after it waiting on adt-updates/ehr. Made
    with the outbox, then the schema taken back to the revision before the current one."""
    from alembic import command as alembic_command
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    from carehub.store.store import MIGRATIONS

    store = MessageStore(store_url)
    try:
        store.migrate()
        ids: dict[str, int] = {}
        for control_id in payloads:
            [stored] = store.insert_messages([new_message(control_id, patient_id=PATIENT)])
            ids[control_id] = stored.message_id
        outbox = Outbox(store)
        for control_id, text in payloads.items():
            route = ADMITS if MessageView(text).get("MSH-9.2") == "A01" else UPDATES
            outgoing = Outgoing(
                text.encode(),
                "x-application/hl7-v2+er7",
                f"old-{control_id}",
                {"control_id": control_id},
            )
            planned = PlannedDelivery(
                route.split("/")[0], route, "mllp", outgoing, f"HOSP|{PATIENT}", 3
            )
            result = RoutingResult(
                ids[control_id], 1, [RouteResult(planned.route, True, [], [], [planned])]
            )
            outbox.record_routing([result])
        [first] = outbox.claim_due(1, timedelta(minutes=5))  # the A01, routed first
        outbox.finish(
            [
                AttemptResult(
                    first.id,
                    first.message_id,
                    1,
                    datetime.now(UTC),
                    3,
                    False,
                    "AR",
                    None,
                    destination=first.destination,
                    order_key=first.order_key,
                )
            ]
        )
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        previous = ScriptDirectory.from_config(cfg).get_revision("head").down_revision
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            alembic_command.downgrade(cfg, str(previous))
        return ids
    finally:
        store.close()


def test_after_the_upgrade_a_dead_a01_holds_the_a08_already_waiting_on_the_other_route(
    tmp_path: Path, receiver: Receiver, store_url: str
) -> None:
    """Deliveries waiting when the hub is upgraded join their shared line in the order they
    were routed: the A08 stored behind nothing on its own route now waits for the A01."""
    messages = {"Q-010": adt("Q-010", "A01"), "Q-011": adt("Q-011", "A08")}
    config = hub_config(tmp_path, receiver.port, store_url)
    data_dir = tmp_path / "data"
    _store_before_shared_lines(store_url, messages)
    with HubThread(load_config(config), data_dir) as hub:
        time.sleep(QUIET)
        assert receiver.seen() == []  # the A08 waits behind the dead A01
        assert held_by_destination(hub.store) == {UPDATES: 1}
        result = cli(config, data_dir, "dead-letters", "retry", "--destination", ADMITS)
        assert result.exit_code == 0, result.output
        assert "1 delivery(ies) held behind them follow" in result.output
        wait_for(lambda: len(receiver.accepted()) == 2, timeout=30, what="A01 and A08 taken")
        assert receiver.accepted() == ["Q-010", "Q-011"]


def test_the_upgrade_keeps_each_waiting_delivery_in_its_destinations_line(store_url: str) -> None:
    """Revision 0021 on its own: the waiting and dead deliveries get their destination as
    their line (what their line was), and the line indexes read by line; taken back, the
    store has a line per destination again."""
    from sqlalchemy import inspect as sa_inspect

    _store_before_shared_lines(store_url, {"Q-030": adt("Q-030", "A01")})
    store = MessageStore(store_url)
    try:
        store.migrate()
        with store.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT destination, status, line FROM deliveries").all()
            indexes = {
                i["name"]: i["column_names"] for i in sa_inspect(conn).get_indexes("deliveries")
            }
        assert [tuple(row) for row in rows] == [(ADMITS, "dead", ADMITS)]
        assert indexes["ix_deliveries_unfinished"] == ["line", "order_key", "id"]
        assert indexes["ix_deliveries_dead_line"] == ["line", "order_key", "id"]
        assert indexes["ix_deliveries_unfinished_destination"] == ["destination"]
    finally:
        store.close()
