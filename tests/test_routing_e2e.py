"""Routing end to end on a real hub: MLLP intake, the in-process worker, route files from a
temporary folder, a real uvicorn webhook receiver, a real outbox folder and a second real
carehub as an MLLP destination. Nothing is mocked; every wait polls for a condition."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carehub.config import HubConfig
from carehub.hl7.ack import read_ack
from carehub.store.outbox import DeliveryRecord, Outbox
from carehub.store.store import MessageStore, StoredMessage
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange
from tests.helpers_http import HTTPServer, Received, wait_for

FAST_RETRY = "{max_attempts: %d, initial_delay: 0.05, multiplier: 1, max_delay: 0.05, jitter: 0}"


# -- helpers ----------------------------------------------------------------------------------
def routed_config(tmp_path: Path, routes: str) -> HubConfig:
    """local_config with the in-process worker and ``routes`` as routes.yaml in tmp_path."""
    (tmp_path / "routes.yaml").write_text(routes, encoding="utf-8")
    config = local_config(worker=True)
    config.source = tmp_path / "carehub.yaml"  # relative paths resolve in tmp_path
    config.routes = ["routes.yaml"]
    config.worker.poll_interval = 0.05
    return config


def send(hub: HubThread, *texts: str) -> list[str]:
    """Send each message on one MLLP connection; the ACK codes, checked against MSH-10."""
    answers = mllp_exchange(hub.mllp_address, [t.encode("utf-8") for t in texts])
    codes = []
    for text, answer in zip(texts, answers, strict=True):
        code, echoed, _ = read_ack(answer.decode("utf-8"))
        assert echoed == text.split("\r")[0].split("|")[9]
        codes.append(code)
    return codes


def by_control_id(store: MessageStore, control_id: str) -> StoredMessage:
    (message,) = [m for m in store.find(limit=None) if m.control_id == control_id]
    return message


def statuses(store: MessageStore) -> dict[str, str]:
    return {m.control_id or "": m.status for m in store.find(limit=None)}


def wait_statuses(store: MessageStore, expected: dict[str, str], timeout: float = 20) -> None:
    wait_for(
        lambda: {k: v for k, v in statuses(store).items() if k in expected} == expected,
        timeout,
        what=f"message statuses {expected} (now {statuses(store)})",
    )


def deliveries_of(store: MessageStore, control_id: str) -> dict[str, DeliveryRecord]:
    message = by_control_id(store, control_id)
    return {d.destination: d for d in Outbox(store).find(message_id=message.id, limit=None)}


def attempt_outcomes(store: MessageStore, delivery_id: int) -> list[tuple[int, str]]:
    return [(a.number, a.outcome) for a in Outbox(store).attempts(delivery_id)]


def control_id(request: Received) -> str:
    return str(request.json["control_id"])


@pytest.fixture
def http() -> Iterator[HTTPServer]:
    with HTTPServer() as server:
        yield server


# -- the happy path ---------------------------------------------------------------------------
def test_mllp_to_event_webhook_and_file(tmp_path: Path, http: HTTPServer) -> None:
    config = routed_config(
        tmp_path,
        f"""
routes:
  - name: adt-events
    when: {{type: ADT}}
    steps:
      - translate: v2-to-event
      - forward:
          channel: webhook
          name: platform
          url: {http.url("/events")}
          retry: {FAST_RETRY % 3}
      - forward: {{channel: file, name: archive, directory: outbox, body: event}}
""",
    )
    kinds = {"E2E-1": "admission", "E2E-2": "discharge", "E2E-3": "admission"}
    messages = [
        make_adt("E2E-1", "A01", patient_id="P1"),
        make_adt("E2E-2", "A03", patient_id="P2"),
        make_adt("E2E-3", "A01", patient_id="P3"),
    ]
    with HubThread(config, tmp_path / "data") as hub:
        assert send(hub, *messages) == ["AA", "AA", "AA"]
        wait_statuses(hub.store, dict.fromkeys(kinds, "delivered"))

        received = {control_id(r): r for r in http.ok()}
        assert sorted(received) == sorted(kinds)
        assert len(http.requests) == 3  # each sent once
        for cid, kind in kinds.items():
            request = received[cid]
            assert request.path == "/events"
            body = request.json
            assert body["event"]["kind"] == kind
            assert body["event"]["message_control_id"] == cid
            assert body["route"] == "adt-events"
            sent = deliveries_of(hub.store, cid)
            assert set(sent) == {"adt-events/platform", "adt-events/archive"}
            key = sent["adt-events/platform"].idempotency_key
            assert request.key == body["idempotency_key"] == key
            assert request.headers["content-type"] == "application/json"

        outbox = tmp_path / "outbox"
        files = sorted(p.name for p in outbox.iterdir())
        assert len(files) == 3
        for cid, kind in kinds.items():
            archive = deliveries_of(hub.store, cid)["adt-events/archive"]
            document = json.loads((outbox / f"{archive.idempotency_key}.json").read_text())
            assert document["kind"] == kind
            assert document["message_control_id"] == cid

        for cid in kinds:
            message = by_control_id(hub.store, cid)
            steps = [
                (s.run, s.route, s.position, s.step, s.outcome)
                for s in Outbox(hub.store).steps(message.id)
            ]
            assert steps == [
                (1, "adt-events", 0, "translate v2-to-event", "ok"),
                (1, "adt-events", 1, "forward webhook adt-events/platform", "ok"),
                (1, "adt-events", 2, "forward file adt-events/archive", "ok"),
            ]
            translated = Outbox(hub.store).steps(message.id)[0].output
            assert translated["kind"] == kinds[cid]
            for delivery in deliveries_of(hub.store, cid).values():
                assert delivery.status == "delivered"
                assert delivery.attempts == 1
                assert attempt_outcomes(hub.store, delivery.id) == [(1, "delivered")]
            assert deliveries_of(hub.store, cid)["adt-events/platform"].receipt == "HTTP 200"


# -- which routes run -------------------------------------------------------------------------
def test_unrouted_two_routes_and_a_failing_route(tmp_path: Path, http: HTTPServer) -> None:
    config = routed_config(
        tmp_path,
        f"""
routes:
  - name: admits-hook
    when: {{events: A01}}
    steps:
      - forward: {{channel: webhook, name: hook, url: {http.url()}, retry: {FAST_RETRY % 3}}}
  - name: admits-file
    when: {{events: A01}}
    steps:
      - forward: {{channel: file, name: files, directory: out/admits}}
  - name: discharges-broken
    when: {{events: A03}}
    steps:
      - transform: {{edits: [{{set: {{ZZZ-1: oops}}}}]}}
      - forward: {{channel: file, name: never, directory: out/never}}
  - name: discharges-file
    when: {{events: A03}}
    steps:
      - forward: {{channel: file, name: files, directory: out/discharges}}
""",
    )
    with HubThread(config, tmp_path / "data") as hub:
        assert send(
            hub,
            make_adt("NOROUTE", "A08", patient_id="P1"),
            make_adt("TWO", "A01", patient_id="P2"),
            make_adt("BROKEN", "A03", patient_id="P3"),
        ) == ["AA", "AA", "AA"]
        wait_statuses(hub.store, {"NOROUTE": "unrouted", "TWO": "delivered"})
        store = hub.store
        assert deliveries_of(store, "NOROUTE") == {}
        assert Outbox(store).steps(by_control_id(store, "NOROUTE").id) == []
        assert by_control_id(store, "NOROUTE").detail == "no route matched"

        two = deliveries_of(store, "TWO")
        assert set(two) == {"admits-hook/hook", "admits-file/files"}
        assert {d.status for d in two.values()} == {"delivered"}
        assert [control_id(r) for r in http.ok()] == ["TWO"]
        assert [p.name for p in (tmp_path / "out" / "admits").iterdir()] == [
            f"{two['admits-file/files'].idempotency_key}.hl7"
        ]

        # The broken route is an error; the other route for the same message still delivers,
        # and the message ends up failed with the error in its detail.
        wait_for(
            lambda: {d.status for d in deliveries_of(store, "BROKEN").values()} == {"delivered"},
            what="the discharge file delivery",
        )
        broken = deliveries_of(store, "BROKEN")
        assert set(broken) == {"discharges-file/files"}
        assert not list((tmp_path / "out" / "never").iterdir())
        assert len(list((tmp_path / "out" / "discharges").iterdir())) == 1
        steps = Outbox(store).steps(by_control_id(store, "BROKEN").id)
        assert [(s.route, s.position, s.outcome) for s in steps] == [
            ("discharges-broken", 0, "error"),
            ("discharges-file", 0, "ok"),
        ]
        assert "ZZZ" in steps[0].output
        wait_statuses(store, {"BROKEN": "failed"})
        message = by_control_id(store, "BROKEN")
        assert message.detail is not None
        assert "discharges-broken" in message.detail and "ZZZ" in message.detail


def test_filter_stops_the_route_for_messages_that_fail_it(tmp_path: Path) -> None:
    config = routed_config(
        tmp_path,
        """
routes:
  - name: inpatients
    when: {type: ADT}
    steps:
      - filter: {patient_class: I}
      - forward: {channel: file, name: files, directory: out}
""",
    )
    with HubThread(config, tmp_path / "data") as hub:
        assert send(
            hub,
            make_adt("INPATIENT", patient_class="I", patient_id="P1"),
            make_adt("OUTPATIENT", patient_class="O", patient_id="P2"),
        ) == ["AA", "AA"]
        wait_statuses(hub.store, {"INPATIENT": "delivered", "OUTPATIENT": "filtered"})
        store = hub.store
        kept = Outbox(store).steps(by_control_id(store, "INPATIENT").id)
        assert [(s.step, s.outcome) for s in kept] == [
            ("filter", "ok"),
            ("forward file inpatients/files", "ok"),
        ]
        dropped = Outbox(store).steps(by_control_id(store, "OUTPATIENT").id)
        assert [(s.step, s.outcome) for s in dropped] == [("filter", "filtered")]
        assert "PV1-2.1" in dropped[0].output and "'O'" in dropped[0].output
        assert deliveries_of(store, "OUTPATIENT") == {}
        assert "nothing to deliver" in (by_control_id(store, "OUTPATIENT").detail or "")
        (written,) = (tmp_path / "out").iterdir()
        assert b"INPATIENT" in written.read_bytes()


# -- retries and dead letters -----------------------------------------------------------------
def webhook_route(tmp_path: Path, url: str, max_attempts: int) -> HubConfig:
    return routed_config(
        tmp_path,
        f"""
routes:
  - name: hooked
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: hook, url: {url}, retry: {FAST_RETRY % max_attempts}}}
""",
    )


def test_two_500s_then_200_is_delivered_on_attempt_3(tmp_path: Path, http: HTTPServer) -> None:
    http.respond = lambda _: 500 if len(http.requests) < 2 else 200
    with HubThread(webhook_route(tmp_path, http.url(), 5), tmp_path / "data") as hub:
        assert send(hub, make_adt("RETRY-1")) == ["AA"]
        wait_statuses(hub.store, {"RETRY-1": "delivered"})
        delivery = deliveries_of(hub.store, "RETRY-1")["hooked/hook"]
        assert delivery.status == "delivered" and delivery.attempts == 3
        assert attempt_outcomes(hub.store, delivery.id) == [
            (1, "failed"),
            (2, "failed"),
            (3, "delivered"),
        ]
        attempts = Outbox(hub.store).attempts(delivery.id)
        assert "HTTP 500" in (attempts[0].detail or "")
        assert delivery.last_error is None and delivery.receipt == "HTTP 200"
    assert [r.status for r in http.requests] == [500, 500, 200]
    assert {r.key for r in http.requests} == {delivery.idempotency_key}
    assert len({r.body for r in http.requests}) == 1  # every retry sends the same bytes


def test_a_send_past_worker_send_timeout_is_a_failed_attempt_then_retried(
    tmp_path: Path, http: HTTPServer
) -> None:
    """A receiver that holds the first request far past worker.send_timeout (the webhook's
    own timeout is longer still): that attempt ends as a failure naming the setting, and the
    retry is delivered, rather than the send holding the patient's line for as long as the
    receiver likes."""
    http.delay = lambda _: 20.0 if len(http.requests) == 1 else 0.0
    config = routed_config(
        tmp_path,
        f"""
routes:
  - name: hooked
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: hook, url: {http.url()}, timeout: 60,
                   retry: {FAST_RETRY % 3}}}
""",
    )
    config.worker.send_timeout = 0.5
    with HubThread(config, tmp_path / "data") as hub:
        began = time.monotonic()
        assert send(hub, make_adt("SLOW-1")) == ["AA"]
        wait_statuses(hub.store, {"SLOW-1": "delivered"})
        took = time.monotonic() - began
        delivery = deliveries_of(hub.store, "SLOW-1")["hooked/hook"]
        assert attempt_outcomes(hub.store, delivery.id) == [(1, "failed"), (2, "delivered")]
        first = Outbox(hub.store).attempts(delivery.id)[0]
        assert "within 0.5 s (worker.send_timeout)" in (first.detail or "")
    assert took < 10, took
    assert len(http.requests) == 2


def test_always_500_is_a_dead_letter_until_retried(tmp_path: Path, http: HTTPServer) -> None:
    http.respond = lambda _: 503
    with HubThread(webhook_route(tmp_path, http.url(), 3), tmp_path / "data") as hub:
        assert send(hub, make_adt("DEAD-1")) == ["AA"]
        wait_statuses(hub.store, {"DEAD-1": "failed"})
        delivery = deliveries_of(hub.store, "DEAD-1")["hooked/hook"]
        assert delivery.status == "dead" and delivery.attempts == 3
        assert "HTTP 503" in (delivery.last_error or "")
        assert attempt_outcomes(hub.store, delivery.id) == [
            (1, "failed"),
            (2, "failed"),
            (3, "dead"),
        ]
        assert "dead letter" in (by_control_id(hub.store, "DEAD-1").detail or "")
        assert len(http.requests) == 3
        dead = Outbox(hub.store).find(status="dead")
        assert [d.id for d in dead] == [delivery.id]

        http.respond = lambda _: 200
        assert Outbox(hub.store).retry_dead([delivery.id]) == 1
        wait_statuses(hub.store, {"DEAD-1": "delivered"})
        again = deliveries_of(hub.store, "DEAD-1")["hooked/hook"]
        assert again.status == "delivered" and again.receipt == "HTTP 200"
        assert [r.status for r in http.requests] == [503, 503, 503, 200]
        assert {r.key for r in http.requests} == {delivery.idempotency_key}
        assert Outbox(hub.store).find(status="dead") == []


def test_400_is_dead_after_one_attempt(tmp_path: Path, http: HTTPServer) -> None:
    http.respond = lambda _: 400
    with HubThread(webhook_route(tmp_path, http.url(), 5), tmp_path / "data") as hub:
        assert send(hub, make_adt("BAD-1")) == ["AA"]
        wait_statuses(hub.store, {"BAD-1": "failed"})
        delivery = deliveries_of(hub.store, "BAD-1")["hooked/hook"]
        assert delivery.status == "dead"
        assert attempt_outcomes(hub.store, delivery.id) == [(1, "dead")]
        assert "HTTP 400" in (delivery.last_error or "")
    assert len(http.requests) == 1


# -- isolation: destinations and patients -----------------------------------------------------
def patient_of(request: Received) -> str:
    event: dict[str, Any] = request.json["event"]
    return str(event["patient"]["primary"]["value"])


def test_failing_destination_blocks_neither_other_destinations_nor_other_patients(
    tmp_path: Path, http: HTTPServer
) -> None:
    failing = {"PAT-A"}
    http.respond = lambda r: 500 if patient_of(r) in failing else 200
    config = routed_config(
        tmp_path,
        f"""
routes:
  - name: care
    when: {{type: ADT}}
    steps:
      - translate: v2-to-event
      - forward: {{channel: webhook, name: hook, url: {http.url()}, retry: {FAST_RETRY % 1000}}}
      - forward: {{channel: file, name: files, directory: out}}
""",
    )
    a_ids = [f"A-{i}" for i in range(1, 4)]
    b_ids = [f"B-{i}" for i in range(1, 6)]
    messages = []
    for i in range(5):  # interleaved: A-1, B-1, A-2, B-2, A-3, B-3, B-4, B-5
        if i < 3:
            messages.append(make_adt(a_ids[i], "A08", patient_id="PAT-A"))
        messages.append(make_adt(b_ids[i], "A08", patient_id="PAT-B"))
    with HubThread(config, tmp_path / "data") as hub:
        store = hub.store
        assert send(hub, *messages) == ["AA"] * 8
        # Every B is delivered to both destinations while A's webhook deliveries retry.
        wait_statuses(store, dict.fromkeys(b_ids, "delivered"))
        wait_for(
            lambda: len([r for r in http.requests if control_id(r) == "A-1"]) >= 3,
            what="A-1 to be retried",
        )
        for cid in a_ids:
            sent = deliveries_of(store, cid)
            wait_for(
                lambda s=sent, c=cid: deliveries_of(store, c)["care/files"].status == "delivered"
            )
            assert sent["care/hook"].status in ("pending", "sending")
        assert statuses(store)["A-1"] == "routed"
        # A's later messages wait behind A-1 for this destination: never sent while it fails.
        assert {control_id(r) for r in http.requests if patient_of(r) == "PAT-A"} == {"A-1"}
        assert deliveries_of(store, "A-2")["care/hook"].attempts == 0
        assert [control_id(r) for r in http.ok()] == b_ids  # B in its own order

        failing.clear()  # the receiver recovers for A
        wait_statuses(store, dict.fromkeys(a_ids + b_ids, "delivered"))
        seen_a = [control_id(r) for r in http.requests if patient_of(r) == "PAT-A"]
        delivered_a = [control_id(r) for r in http.ok() if patient_of(r) == "PAT-A"]
        assert delivered_a == a_ids
        assert seen_a == sorted(seen_a)  # A-1 (retries)..., then A-2, then A-3
        assert seen_a.count("A-2") == seen_a.count("A-3") == 1
        assert len(list((tmp_path / "out").iterdir())) == 8


# -- forwarding over MLLP ---------------------------------------------------------------------
def test_forward_over_mllp_to_a_second_carehub(tmp_path: Path) -> None:
    texts = [
        make_adt("MLLP-1", name="ÅSTRÖM^BJÖRK", patient_id="P1"),
        make_adt("MLLP-2", "A03", patient_id="P2"),
    ]
    with HubThread(local_config(), tmp_path / "dest") as dest:
        host, port = dest.mllp_address
        config = routed_config(
            tmp_path,
            f"""
routes:
  - name: relay
    when: {{type: ADT}}
    steps:
      - forward: {{channel: mllp, name: downstream, host: "{host}", port: {port}, timeout: 5,
                   retry: {FAST_RETRY % 3}}}
""",
        )
        with HubThread(config, tmp_path / "source") as hub:
            assert send(hub, *texts) == ["AA", "AA"]
            wait_statuses(hub.store, {"MLLP-1": "delivered", "MLLP-2": "delivered"})
            for cid in ("MLLP-1", "MLLP-2"):
                delivery = deliveries_of(hub.store, cid)["relay/downstream"]
                assert delivery.receipt == "AA"
                assert attempt_outcomes(hub.store, delivery.id) == [(1, "delivered")]
            sources = {m.control_id: m.raw for m in hub.store.find(limit=None)}
        received = {m.control_id: m for m in dest.store.find(limit=None)}
    assert sorted(received) == ["MLLP-1", "MLLP-2"]
    for cid, raw in sources.items():
        assert received[cid].raw == raw  # byte-identical
        assert received[cid].ack_code == "AA"
    assert received["MLLP-1"].raw == texts[0].encode("utf-8")
