"""A patient identifier sent without an assigning authority (PID-3.4 empty) is only unique at
the facility that sent it (MSH-4): two hospitals' 55501 are two patients, each with a line of
their own to each destination. A dead letter for one hospital's patient holds that patient's
later deliveries, never the other hospital's. Lines held before identifiers were keyed by
their sender (under the bare ``|55501``) still hold that sender's patient's new deliveries
until an operator retries or discards the dead letter, and hold no one else's.

A real hub forwards to a real HTTP receiver that fails for one hospital's messages; the
operator's side goes through the real CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from carehub.config import load_config
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.store.outbox import Outbox
from carehub.store.schema import MessageStatus, deliveries, messages
from carehub.store.store import MessageStore, NewMessage
from carehub.testing import HubThread, make_adt, mllp_exchange, run_routes
from tests import test_store
from tests.helpers_http import HTTPServer, Received, wait_for
from tests.test_dead_letter_order import QUIET, TWO_TRIES, cli, hub_config

store_url = test_store.store_url
store = test_store.store

MRN = "55501"
GEN = "GEN_HOSP"
OTHER = "OTHER_HOSP"
DESTINATION = "adt/ehr"


def adt(control_id: str, event: str, facility: str) -> str:
    """An ADT for patient 55501 as ``facility`` sends it: no assigning authority."""
    return make_adt(
        control_id, event, patient_id=MRN, authority="", sending_facility=f"{facility}^1.2.3^ISO"
    )


def send(hub: HubThread, *texts: str) -> None:
    answers = mllp_exchange(hub.mllp_address, [t.encode() for t in texts])
    assert all(b"MSA|AA|" in a for a in answers), answers


def fails_for_gen(request: Received) -> int:
    """The receiver refuses GEN_HOSP's messages (their control ids begin GEN-) and takes
    everyone else's."""
    return 503 if str(request.json.get("control_id")).startswith("GEN-") else 200


def arrived(server: HTTPServer, hub: HubThread) -> list[str]:
    """The control ids of the messages the receiver took, in the order it took them."""
    by_key = {d.idempotency_key: d.message_id for d in Outbox(hub.store).find(limit=None)}
    taken = [by_key[r.key] for r in server.ok() if r.key in by_key]
    return [hub.store.get(message_id).control_id for message_id in taken]


def deliveries_by_control_id(hub: HubThread) -> dict[str, Any]:
    found = {}
    for message in hub.store.find(limit=None):
        for delivery in Outbox(hub.store).find(message_id=message.id):
            found[message.control_id] = delivery
    return found


def status_of(hub: HubThread, control_id: str) -> str | None:
    delivery = deliveries_by_control_id(hub).get(control_id)
    return delivery.status if delivery is not None else None


@pytest.fixture
def receiver() -> Iterator[HTTPServer]:
    with HTTPServer(fails_for_gen) as server:
        yield server


def test_a_dead_letter_for_one_hospitals_patient_holds_no_other_hospitals_patient(
    tmp_path: Path, receiver: HTTPServer, store_url: str
) -> None:
    config = hub_config(tmp_path, receiver.url(), TWO_TRIES, store_url)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        published: list[str] = []
        accepted = hub.hub.intake.on_accepted
        assert accepted is not None

        def record(message_id: int, key: str) -> None:
            published.append(key)
            accepted(message_id, key)

        hub.hub.intake.on_accepted = record
        send(hub, adt("GEN-1", "A01", GEN))
        wait_for(lambda: status_of(hub, "GEN-1") == "dead", what="GEN_HOSP's A01 to die")
        send(hub, adt("OTHER-1", "A01", OTHER))
        wait_for(lambda: "OTHER-1" in arrived(receiver, hub), what="OTHER_HOSP's A01 delivered")
        receiver.respond = lambda _: 200  # back for everyone: only GEN_HOSP's line is held
        send(hub, adt("GEN-2", "A03", GEN), adt("OTHER-2", "A03", OTHER))
        wait_for(lambda: "OTHER-2" in arrived(receiver, hub), what="OTHER_HOSP's A03 delivered")
        time.sleep(QUIET)
        assert status_of(hub, "GEN-2") == "pending"  # waits behind GEN_HOSP's dead A01
        assert arrived(receiver, hub) == ["OTHER-1", "OTHER-2"]
        lines = {c: d.order_key for c, d in deliveries_by_control_id(hub).items()}
        assert lines == {
            "GEN-1": f"{GEN}|{MRN}",
            "GEN-2": f"{GEN}|{MRN}",
            "OTHER-1": f"{OTHER}|{MRN}",
            "OTHER-2": f"{OTHER}|{MRN}",
        }
        # Intake queues each message under the key its deliveries are ordered by.
        assert published == [f"{GEN}|{MRN}", f"{OTHER}|{MRN}", f"{GEN}|{MRN}", f"{OTHER}|{MRN}"]

        # The id alone finds both hospitals' patients, each listed with its facility.
        listed = cli(config, data_dir, "messages", "list", "--patient", MRN, "--json")
        assert listed.exit_code == 0, listed.output
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert sorted((r["control_id"], r["patient_authority"]) for r in rows) == [
            ("GEN-1", GEN),
            ("GEN-2", GEN),
            ("OTHER-1", OTHER),
            ("OTHER-2", OTHER),
        ]
        one = cli(config, data_dir, "messages", "list", "--patient", f"{MRN}^{OTHER}", "--json")
        assert sorted(json.loads(line)["control_id"] for line in one.stdout.splitlines()) == [
            "OTHER-1",
            "OTHER-2",
        ]
        table = cli(config, data_dir, "messages", "list", "--patient", MRN)
        assert f"{MRN}^{GEN}" in table.stdout and f"{MRN}^{OTHER}" in table.stdout

        retried = cli(config, data_dir, "dead-letters", "retry", "--destination", DESTINATION)
        assert retried.exit_code == 0, retried.output
        wait_for(lambda: len(receiver.ok()) == 4, what="GEN_HOSP's line to go on")
        assert arrived(receiver, hub) == ["OTHER-1", "OTHER-2", "GEN-1", "GEN-2"]


def _as_before(hub_store: MessageStore) -> None:
    """The store as a release that keyed an identifier without an authority bare left it: no
    authority in the message rows, and the deliveries in the line ``|55501``."""
    with hub_store.engine.begin() as conn:
        conn.execute(update(messages).values(patient_authority=""))
        conn.execute(update(deliveries).values(order_key=f"|{MRN}"))


def test_a_line_held_under_the_bare_key_still_holds_its_senders_patient_and_no_one_else(
    tmp_path: Path, receiver: HTTPServer, store_url: str
) -> None:
    config = hub_config(tmp_path, receiver.url(), TWO_TRIES, store_url)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, adt("GEN-1", "A01", GEN))
        wait_for(lambda: status_of(hub, "GEN-1") == "dead", what="GEN_HOSP's A01 to die")
        _as_before(hub.store)
    receiver.respond = lambda _: 200
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, adt("GEN-2", "A03", GEN), adt("OTHER-1", "A01", OTHER))
        wait_for(lambda: "OTHER-1" in arrived(receiver, hub), what="OTHER_HOSP's A01 delivered")
        time.sleep(QUIET)
        assert status_of(hub, "GEN-2") == "pending"  # joined the line it was in before
        assert deliveries_by_control_id(hub)["GEN-2"].order_key == f"|{MRN}"
        assert deliveries_by_control_id(hub)["OTHER-1"].order_key == f"{OTHER}|{MRN}"

        dead = deliveries_by_control_id(hub)["GEN-1"]
        discarded = cli(
            config, data_dir, "dead-letters", "discard", str(dead.id), "--reason", "phoned in"
        )
        assert discarded.exit_code == 0, discarded.output
        assert "1 delivery(ies) held behind them go on" in discarded.output
        wait_for(lambda: "GEN-2" in arrived(receiver, hub), what="GEN_HOSP's A03 to go on")
        # Once the old line is empty, the patient's deliveries keep to their own.
        send(hub, adt("GEN-3", "A08", GEN))
        wait_for(lambda: "GEN-3" in arrived(receiver, hub), what="GEN_HOSP's A08 delivered")
        assert deliveries_by_control_id(hub)["GEN-3"].order_key == f"{GEN}|{MRN}"
        assert arrived(receiver, hub) == ["OTHER-1", "GEN-2", "GEN-3"]


def _stored(store: MessageStore, control_id: str, facility: str) -> int:
    text = adt(control_id, "A01", facility)
    message = NewMessage(
        text.encode(),
        "mllp",
        "test",
        None,
        MessageStatus.RECEIVED,
        "AA",
        MessageHeader.read(MessageView(text)),
        "utf-8",
        text=text,
    )
    (outcome,) = store.insert_messages([message])
    return outcome.message_id


def test_messages_stored_unrouted_before_go_first_only_for_their_senders_patient(
    store: MessageStore,
) -> None:
    """A message stored before, still waiting to be routed, goes before a later one of its
    sender's patient, and is not taken for another hospital's patient with the same id."""
    gen_before = _stored(store, "GEN-0", GEN)
    other_before = _stored(store, "OTHER-0", OTHER)
    _as_before(store)
    other_now = _stored(store, "OTHER-1", OTHER)
    gen_now = _stored(store, "GEN-1", GEN)
    (later,) = store.get_many([gen_now])
    assert later.patient_authority == GEN
    assert store.unrouted_before([later]) == [gen_before]
    (later_other,) = store.get_many([other_now])
    assert store.unrouted_before([later_other]) == [other_before]


def test_a_dry_run_keys_each_hospitals_patient_as_routing_does(tmp_path: Path) -> None:
    """`routes test` and run_routes give a delivery the line (order key) the hub gives it: the
    identifier without an authority is keyed by its sending facility in both."""
    texts = {"GEN-1": adt("GEN-1", "A01", GEN), "OTHER-1": adt("OTHER-1", "A01", OTHER)}
    with HTTPServer(lambda _: 200) as server:
        config = hub_config(tmp_path, server.url(), TWO_TRIES)
        with HubThread(load_config(config), tmp_path / "data") as hub:
            send(hub, *texts.values())
            wait_for(lambda: len(server.ok()) == 2, what="both hospitals' A01 delivered")
            routed = {c: d.order_key for c, d in deliveries_by_control_id(hub).items()}
    dry = {
        control_id: [d.order_key for d in run_routes(text, config).deliveries]
        for control_id, text in texts.items()
    }
    assert routed == {"GEN-1": f"{GEN}|{MRN}", "OTHER-1": f"{OTHER}|{MRN}"}
    assert dry == {control_id: [key] for control_id, key in routed.items()}


def all_delivered(hub: HubThread, count: int) -> bool:
    """Whether the hub holds ``count`` deliveries, every one of them delivered."""
    found = deliveries_by_control_id(hub)
    return len(found) == count and all(d.status == "delivered" for d in found.values())


def test_reprocess_warns_only_of_later_messages_of_its_senders_patient(
    tmp_path: Path, store_url: str
) -> None:
    """A message sent again after its patient's later ones warns of them: those of the same
    sender's patient, stored before identifiers were keyed by their sender or after, and
    never another hospital's patient with the same id."""
    with HTTPServer(lambda _: 200) as server:
        config = hub_config(tmp_path, server.url(), TWO_TRIES, store_url)
        data_dir = tmp_path / "data"
        with HubThread(load_config(config), data_dir) as hub:
            send(hub, adt("OTHER-1", "A01", OTHER), adt("GEN-1", "A01", GEN))
            wait_for(lambda: all_delivered(hub, 2), what="both hospitals' A01 delivered")
        before = MessageStore(store_url)
        try:
            _as_before(before)
        finally:
            before.close()
        with HubThread(load_config(config), data_dir) as hub:
            send(hub, adt("GEN-2", "A03", GEN), adt("OTHER-2", "A08", OTHER))
            send(hub, adt("OTHER-3", "A03", OTHER))
            wait_for(lambda: all_delivered(hub, 5), what="the later messages delivered")
            ids = {m.control_id: m.id for m in hub.store.find(limit=None)}
            outbox = Outbox(hub.store)
            assert outbox.later_delivered(ids["GEN-1"], {DESTINATION}) == {DESTINATION: 1}
            assert outbox.later_delivered(ids["OTHER-1"], {DESTINATION}) == {DESTINATION: 2}
            assert outbox.later_delivered(ids["OTHER-3"], {DESTINATION}) == {}

            reprocess = ("messages", "reprocess", str(ids["GEN-1"]), "--destination", DESTINATION)
            again = cli(config, data_dir, *reprocess, "--yes")
            assert again.exit_code == 0, again.output
            assert (
                f"warning: message {ids['GEN-1']} reaches {DESTINATION} after 1 later "
                "message(s) of the same patient already delivered there"
            ) in again.stderr
