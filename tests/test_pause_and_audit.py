"""Pausing one destination without stopping the hub, and the trail of operator actions.

A paused destination's deliveries stay pending and unclaimed (parked), new ones are routed
and wait, attempts and retry times stand still, and on resume they go out in each patient's
order; the state is in the store, so every hub and worker on it honours it. Every operator
action (reprocess, dead-letters retry/discard, prune, pause/resume, routes reload) is
recorded with who, when, what it touched and counts, never message content or patient ids.

The outbox SQL runs on SQLite and PostgreSQL; the hub tests run real hubs against a real HTTP
receiver, and the operator's side through the real CLI."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select

from carehub.config import load_config
from carehub.status import read_status, render
from carehub.store.audit import list_actions
from carehub.store.outbox import _CLAIM_CANDIDATES, PARKED, Handover, Outbox
from carehub.store.schema import deliveries, operator_actions
from carehub.store.store import CARE_RECORD_TABLES, MessageStore, sqlite_url
from carehub.testing import HubThread, make_adt
from tests import test_store
from tests.helpers_http import CarehubProcess, HTTPServer, wait_for
from tests.test_dead_letter_order import (
    LEASE,
    QUIET,
    TWO_TRIES,
    _by_key,
    _keys,
    _later,
    _messages,
    _plan,
    _result,
    arrived,
    cli,
    delivery_of,
    statuses,
)
from tests.test_worker import send

store_url = test_store.store_url
store = test_store.store

DESTINATION = "adt/ehr"
PATIENT = "RG300001"


# -- the outbox, on SQLite and PostgreSQL ---------------------------------------------------------
def _due(store: MessageStore, key: str) -> datetime:
    with store.engine.connect() as conn:
        value = conn.execute(
            select(deliveries.c.not_before).where(deliveries.c.idempotency_key == key)
        ).scalar_one()
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def test_a_paused_destination_is_routed_to_but_not_claimed_and_resumes_in_order(
    store: MessageStore,
) -> None:
    outbox = Outbox(store)
    a01, a03, other, a04, later = _messages(store, 5)
    _plan(outbox, a01, "P1")
    _plan(outbox, a03, "P1")
    _plan(outbox, other, "P2", destination="lab")

    report = outbox.pause_destination("ehr", "webhook", by="alice@host", reason="EHR upgrade")
    assert (report.changed, report.waiting, report.moved) == (True, 2, 2)
    assert _due(store, f"key-{a01}-ehr") == PARKED
    _plan(outbox, a04, "P1")  # routed while paused: written parked
    _plan(outbox, later, "P9")
    assert _due(store, f"key-{later}-ehr") == PARKED

    assert _keys(outbox.claim_due(10, LEASE, _later(3600))) == [f"key-{other}-lab"]
    assert outbox.tidy_lines(_later(3600)) == (0, 0)  # the sweep leaves them parked
    assert outbox.claim_due(10, LEASE, _later(3600)) == []

    again = outbox.pause_destination("ehr", "webhook", by="bob@host")
    assert not again.changed and again.pause is not None
    assert (again.pause.paused_by, again.pause.reason) == ("alice@host", "EHR upgrade")
    [paused] = outbox.paused()
    assert (paused.destination, paused.channel, paused.paused_by) == (
        "ehr",
        "webhook",
        "alice@host",
    )

    resumed = outbox.resume_destination("ehr")
    # All due again; the place-in-line check keeps each patient's order.
    assert (resumed.changed, resumed.waiting, resumed.moved) == (True, 4, 4)
    sent: list[str] = []
    while claimed := outbox.claim_due(10, LEASE):
        sent += _keys(claimed)
        outbox.finish([_result(d, delivered=True) for d in claimed])
    assert sent == [
        f"key-{a01}-ehr",
        f"key-{later}-ehr",
        f"key-{a03}-ehr",
        f"key-{a04}-ehr",
    ]
    assert not outbox.resume_destination("ehr").changed  # not paused any more


def test_a_pause_stops_the_retry_clock_and_a_line_moving_on_stays_parked(
    store: MessageStore,
) -> None:
    outbox = Outbox(store)
    a01, a03 = _messages(store, 2)
    _plan(outbox, a01, "P1")
    _plan(outbox, a03, "P1")
    [first] = outbox.claim_due(10, LEASE)
    outbox.finish([_result(first, retry_in=0.01)])  # failed once; a03 parked behind it
    outbox.pause_destination("ehr", "webhook", by="alice@host")
    assert outbox.claim_due(10, LEASE, _later(3600)) == []  # its retry time passes: no attempt
    assert _by_key(outbox, f"key-{a01}-ehr").attempts == 1

    outbox.resume_destination("ehr")
    [again] = outbox.claim_due(10, LEASE)
    assert again.id == first.id and again.attempts == 1  # no attempt burnt while paused
    # A send under way as the pause came: the line moving on must not release the rest.
    outbox.pause_destination("ehr", "webhook", by="alice@host")
    outbox.finish([_result(again, delivered=True, attempt=2)])
    assert _due(store, f"key-{a03}-ehr") == PARKED
    assert outbox.claim_due(10, LEASE, _later(3600)) == []
    outbox.resume_destination("ehr")
    assert _keys(outbox.claim_due(10, LEASE)) == [f"key-{a03}-ehr"]


def test_routing_hands_no_delivery_of_a_paused_destination_to_the_worker(
    store: MessageStore,
) -> None:
    outbox = Outbox(store)
    a01, b01 = _messages(store, 2)
    outbox.pause_destination("ehr", "webhook", by="alice@host")
    handover = Handover(10, LEASE)
    _plan(outbox, a01, "P1", handover=handover)
    assert handover.taken == []
    _plan(outbox, b01, "P2", destination="lab", handover=handover)
    assert _keys(handover.taken) == [f"key-{b01}-lab"]
    # One that slipped through unparked (routed as the pause was made) is still not claimed,
    # and the sweep parks it.
    with store.engine.begin() as conn:
        conn.execute(deliveries.update().values(not_before=datetime.now(UTC)))
    with store.engine.begin() as conn:
        conn.execute(
            deliveries.update().where(deliveries.c.destination == "lab").values(status="delivered")
        )
    assert outbox.claim_due(10, LEASE) == []
    assert outbox.tidy_lines() == (1, 0)
    assert _due(store, f"key-{a01}-ehr") == PARKED


def test_two_hubs_on_one_store_see_the_same_pause(store_url: str) -> None:
    """Two processes' stores on one database (scale-out): a pause made through one holds on
    the other's claims, and a resume through the other lets them go."""
    one, two = MessageStore(store_url), MessageStore(store_url)
    try:
        one.migrate()
        two.migrate()
        first, second = Outbox(one), Outbox(two)
        a01, a03 = _messages(one, 2)
        _plan(first, a01, "P1")
        first.pause_destination("ehr", "webhook", by="alice@host", reason="window")
        _plan(second, a03, "P2")
        assert second.paused_names() == first.paused_names() == frozenset({"ehr"})
        assert second.claim_due(10, LEASE) == [] and first.claim_due(10, LEASE) == []
        second.resume_destination("ehr")
        assert first.paused_names() == frozenset()
        assert sorted(_keys(first.claim_due(10, LEASE))) == sorted(
            [f"key-{a01}-ehr", f"key-{a03}-ehr"]
        )
    finally:
        one.close()
        two.close()


def test_the_claim_reads_the_pause_by_its_key_and_keeps_its_indexes(tmp_path: Path) -> None:
    store = MessageStore(sqlite_url(tmp_path / "data"))
    store.migrate()
    claim = (
        _CLAIM_CANDIDATES[(False, False)]
        .params(now=datetime(2026, 1, 1, tzinfo=UTC), limit=10)
        .compile(store.engine)
    )
    params = tuple(claim.construct_params()[name] for name in claim.positiontup or ())
    outbox = Outbox(store)
    try:
        with store.engine.connect() as conn:
            plan = " | ".join(
                r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {claim}", params)
            )
            assert "USING INDEX ix_deliveries_due" in plan, plan
            assert "sqlite_autoindex_paused_destinations_1" in plan, plan
            for name in ("park_destination", "unpark_destination", "count_waiting"):
                sql = getattr(outbox._sql, name).replace("?", "'x'")
                found = " | ".join(r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
                assert "SCAN deliveries" not in found, (name, found)
    finally:
        store.close()


def test_migration_0011_goes_down_and_up_again(store_url: str) -> None:
    """Downgraded, a paused destination's deliveries are due (the older hub knows no pause)
    and both tables are gone; upgraded again, the schema is whole."""
    from alembic import command as alembic_command
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    from carehub.store.store import MIGRATIONS

    store = MessageStore(store_url)
    try:
        store.migrate()
        outbox = Outbox(store)
        [a01] = _messages(store, 1)
        _plan(outbox, a01, "P1")
        outbox.pause_destination("ehr", "webhook", by="alice@host")
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            alembic_command.downgrade(cfg, "0010")
        with store.engine.connect() as conn:
            tables = set(sa_inspect(conn).get_table_names())
        assert not {"paused_destinations", "operator_actions"} & tables
        assert _due(store, f"key-{a01}-ehr") < PARKED
        store.migrate()
        head = ScriptDirectory.from_config(cfg).get_current_head()
        assert head is not None and head >= "0011"
        assert store.schema_revision() == head
        assert outbox.paused() == [] and list_actions(store) == []
    finally:
        store.close()


# -- real hubs, a real receiver, the real CLI -------------------------------------------------
HUB_ROUTES = """
routes:
  - name: adt
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: ehr, url: {url}, retry: {retry}}}
"""


def hub_config(tmp_path: Path, url: str, store_url: str | None = None) -> Path:
    """carehub.yaml with MLLP and HTTP (for /metrics) on free ports and a fast worker."""
    (tmp_path / "routes.yaml").write_text(HUB_ROUTES.format(url=url, retry=TWO_TRIES), "utf-8")
    path = tmp_path / "carehub.yaml"
    store = f"store: {{url: '{store_url}'}}\n" if store_url else ""
    path.write_text(
        "listeners:\n"
        "  mllp: [{name: test, host: 127.0.0.1, port: 0}]\n"
        "  http: {host: 127.0.0.1, port: 0}\n"
        "worker: {poll_interval: 0.05}\n"
        f"{store}routes: [routes.yaml]\n",
        encoding="utf-8",
    )
    return path


def adt(control_id: str, event: str, patient: str = PATIENT) -> str:
    return make_adt(control_id, event, patient_id=patient)


def paused_gauge(hub: HubThread) -> float:
    response = httpx.get(f"{hub.http_url}/metrics", timeout=30)
    assert response.status_code == 200
    [value] = [
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "carehub_destination_paused"
        and sample.labels == {"destination": DESTINATION, "channel": "webhook"}
    ]
    return value


def test_pause_holds_a_running_hubs_sends_and_resume_delivers_them_in_order(
    tmp_path: Path, store_url: str
) -> None:
    """The maintenance window: paused, the hub still takes in and routes messages but sends
    nothing; resumed, everything goes out, the patient's messages in order. On PostgreSQL two
    hubs share the store (scale-out), the pause made once holds on both."""
    with HTTPServer(lambda _: 200) as receiver:
        config_path = hub_config(tmp_path, receiver.url(), store_url)
        config = load_config(config_path)
        data_dir = tmp_path / "data"
        two = not store_url.startswith("sqlite")
        with HubThread(config, data_dir) as hub:
            second = HubThread(config, tmp_path / "data2") if two else None
            try:
                if second is not None:
                    second.__enter__()
                send(hub, [adt("RGH-P-0001", "A01")])
                wait_for(lambda: len(receiver.ok()) == 1, what="the A01 delivered")
                assert paused_gauge(hub) == 0

                paused = cli(
                    config_path, data_dir, "destinations", "pause", DESTINATION,
                    "--reason", "EHR maintenance 02:00-04:00", "--by", "alice",
                )  # fmt: skip
                assert paused.exit_code == 0, paused.output
                assert f"paused {DESTINATION}: 0 delivery(ies) wait" in paused.output
                send(hub, [adt("RGH-P-0002", "A03"), adt("RGH-P-0003", "A04")])
                other = second or hub
                send(other, [adt("RGH-P-0004", "A01", patient="RG300002")])
                wait_for(lambda: len(statuses(hub.store)) == 4, what="all four routed while paused")
                time.sleep(QUIET)
                assert len(receiver.requests) == 1  # nothing sent while paused
                assert statuses(hub.store)["RGH-P-0003"] == "pending"

                report = read_status(hub.store, timedelta(hours=1))
                [ehr] = report.destinations
                assert (ehr.paused, ehr.paused_by, ehr.waiting) == (True, "alice", 3)
                assert ehr.pause_reason == "EHR maintenance 02:00-04:00"
                assert report.as_json()["destinations"][0]["paused"] is True
                assert paused_gauge(hub) == 1
                if second is not None:
                    assert paused_gauge(second) == 1
                listed = cli(config_path, data_dir, "destinations", "list", "--json")
                [row] = [json.loads(line) for line in listed.output.splitlines()]
                assert (row["state"], row["paused_by"], row["waiting"]) == ("paused", "alice", 3)
                shown = cli(config_path, data_dir, "destinations", "list")
                assert "paused" in shown.output and "EHR maintenance" in shown.output
                text = cli(config_path, data_dir, "status").output
                assert f"{DESTINATION} (paused)" in text and "paused" in text

                resumed = cli(config_path, data_dir, "destinations", "resume", DESTINATION)
                assert resumed.exit_code == 0, resumed.output
                assert "3 delivery(ies) waiting go out" in resumed.output
                wait_for(lambda: len(receiver.ok()) == 4, what="all four delivered")
                order = [c for c in arrived(receiver, hub.store) if c != "RGH-P-0004"]
                assert order == ["RGH-P-0001", "RGH-P-0002", "RGH-P-0003"]
                assert paused_gauge(hub) == 0
                assert delivery_of(hub.store, "RGH-P-0003").attempts == 1
            finally:
                if second is not None:
                    second.__exit__(None, None, None)


def test_a_hub_paused_mid_outage_burns_no_attempts_until_resumed(tmp_path: Path) -> None:
    """The receiver is down, the delivery retrying; paused, no attempt is made however long
    the window; resumed with the receiver back, it goes out on its next attempt."""
    with HTTPServer(lambda _: 503) as receiver:
        config_path = hub_config(tmp_path, receiver.url())
        retry = "{max_attempts: 3, initial_delay: 0.3, multiplier: 1, max_delay: 0.3, jitter: 0}"
        (tmp_path / "routes.yaml").write_text(
            HUB_ROUTES.format(url=receiver.url(), retry=retry), "utf-8"
        )
        data_dir = tmp_path / "data"
        with HubThread(load_config(config_path), data_dir) as hub:
            send(hub, [adt("RGH-R-0001", "A01")])
            wait_for(lambda: len(receiver.requests) == 1, what="the first attempt")
            assert cli(config_path, data_dir, "destinations", "pause", DESTINATION).exit_code == 0
            time.sleep(QUIET * 1.5)  # several retry delays
            assert len(receiver.requests) == 1
            assert delivery_of(hub.store, "RGH-R-0001").attempts == 1
            receiver.respond = lambda _: 200
            assert cli(config_path, data_dir, "destinations", "resume", DESTINATION).exit_code == 0
            wait_for(lambda: len(receiver.ok()) == 1, what="delivered after the resume")
            # The attempt is recorded once the send returned: wait for the store to say so.
            wait_for(
                lambda: delivery_of(hub.store, "RGH-R-0001").status == "delivered",
                what="the delivery recorded",
            )
            assert delivery_of(hub.store, "RGH-R-0001").attempts == 2


def test_an_unknown_destination_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    config_path = hub_config(tmp_path, "http://127.0.0.1:9/")
    data_dir = tmp_path / "data"
    MessageStore(sqlite_url(data_dir)).migrate()
    result = cli(config_path, data_dir, "destinations", "pause", "adt/emr")
    assert result.exit_code == 2
    assert "unknown destination 'adt/emr'; the routes have: adt/ehr" in result.output
    result = cli(config_path, data_dir, "destinations", "resume", "nope")
    assert result.exit_code == 2 and "the routes have: adt/ehr" in result.output
    listed = cli(config_path, data_dir, "destinations", "list", "--json")
    [row] = [json.loads(line) for line in listed.output.splitlines()]
    assert (row["destination"], row["state"], row["waiting"]) == (DESTINATION, "active", 0)


# -- the audit trail ------------------------------------------------------------------------------
def actions(data_dir: Path) -> list[dict[str, Any]]:
    """The audit trail, oldest first."""
    store = MessageStore(sqlite_url(data_dir))
    try:
        return [a.as_json() for a in reversed(list_actions(store))]
    finally:
        store.close()


def trail_text(data_dir: Path) -> str:
    """Every column of every audit row, as text."""
    store = MessageStore(sqlite_url(data_dir))
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(select(operator_actions)).all()
    finally:
        store.close()
    return json.dumps([[str(v) for v in row] for row in rows])


def no_patient_data(data_dir: Path, *values: str) -> None:
    """No audit row holds these values (patient ids, message text)."""
    text = trail_text(data_dir)
    for value in values:
        assert value not in text


def test_each_operator_action_is_recorded_with_who_what_and_counts(tmp_path: Path) -> None:
    with HTTPServer(lambda _: 503) as receiver:
        config_path = hub_config(tmp_path, receiver.url())
        data_dir = tmp_path / "data"
        with HubThread(load_config(config_path), data_dir) as hub:
            send(hub, [adt("RGH-A-0001", "A01"), adt("RGH-A-0002", "A03")])
            wait_for(lambda: statuses(hub.store).get("RGH-A-0001") == "dead", what="dead A01")
            dead = delivery_of(hub.store, "RGH-A-0001")
            first = dead.message_id

            result = cli(config_path, data_dir, "dead-letters", "retry", str(dead.id))
            assert result.exit_code == 0, result.output
            wait_for(lambda: statuses(hub.store).get("RGH-A-0001") == "dead", what="dead again")
            result = cli(
                config_path, data_dir, "dead-letters", "discard", str(dead.id),
                "--reason", "INC-42", "--by", "carol",
            )  # fmt: skip
            assert result.exit_code == 0, result.output
            result = cli(config_path, data_dir, "messages", "reprocess", str(first), "--by", "dan")
            assert result.exit_code == 0, result.output
            result = cli(
                config_path, data_dir, "messages", "reprocess", "--patient", PATIENT,
                "--field", f"PID-3.1={PATIENT}", "--event", "A03", "--yes",
            )  # fmt: skip
            assert result.exit_code == 0, result.output
            cli(config_path, data_dir, "destinations", "pause", DESTINATION, "--by", "erin")
            cli(config_path, data_dir, "destinations", "resume", DESTINATION, "--by", "erin")
            cli(config_path, data_dir, "dead-letters", "retry", "--destination", "adt/none")
        result = cli(config_path, data_dir, "store", "prune", "--older-than", "30", "--by", "ops")
        assert result.exit_code == 0, result.output

    found = actions(data_dir)
    assert [a["command"] for a in found] == [
        "dead-letters retry",
        "dead-letters discard",
        "messages reprocess",
        "messages reprocess",
        "destinations pause",
        "destinations resume",
        "dead-letters retry",
        "store prune",
    ]
    retry, discard, by_id, by_filter, pause, resume, nothing, prune = found
    assert retry["actor"].count("@") == 1  # login@host by default
    assert (retry["target"], retry["counts"], retry["outcome"]) == (
        f"deliveries {dead.id}",
        {"dead_letters": 1, "released": 1},
        "ok",
    )
    assert (discard["actor"], discard["detail"], discard["counts"]["dead_letters"]) == (
        "carol",
        "reason: INC-42",
        1,
    )
    assert (by_id["actor"], by_id["target"], by_id["counts"]) == (
        "dan",
        f"messages {first}",
        {"messages": 1, "deliveries": 1, "skipped": 0, "failed": 0},
    )
    assert by_filter["target"] == (
        "--event A03 --patient (not recorded) --field PID-3.1=(not recorded)"
    )
    second = delivery_of_message_id(data_dir, "RGH-A-0002")
    assert by_filter["detail"] == f"matched messages {second}"
    assert by_filter["counts"]["messages"] == 1
    assert (pause["actor"], pause["target"], pause["outcome"]) == (
        "erin",
        f"destination {DESTINATION}",
        "ok",
    )
    assert resume["outcome"] == "ok" and resume["counts"]["waiting"] >= 0
    assert (nothing["target"], nothing["outcome"]) == ("destination adt/none", "none")
    assert (prune["actor"], prune["target"], prune["counts"]) == (
        "ops",
        "older than 30 day(s)",
        {
            "messages": 0,
            "kept": 0,
            **dict.fromkeys(CARE_RECORD_TABLES, 0),
            "kept_care_records": 0,
            "kept_patient_merges": 0,
        },
    )
    assert prune["outcome"] == "none"
    no_patient_data(data_dir, PATIENT, "RGH-A-0001", "RGH-A-0002", "MSH|")

    listed = cli(config_path, data_dir, "audit", "list", "--json", "--since", "1h")
    newest = json.loads(listed.output.splitlines()[0])
    assert newest["command"] == "store prune"
    text = cli(config_path, data_dir, "audit", "list")
    assert "destinations pause" in text.output and "erin" in text.output
    none = cli(config_path, data_dir, "audit", "list", "--since", "2999-01-01")
    assert "no operator actions recorded since then" in none.output


def delivery_of_message_id(data_dir: Path, control_id: str) -> int:
    store = MessageStore(sqlite_url(data_dir))
    try:
        [message] = [m for m in store.find(limit=None) if m.control_id == control_id]
        return message.id
    finally:
        store.close()


def test_a_reprocess_that_skips_a_rejected_message_is_recorded_as_partial(
    tmp_path: Path,
) -> None:
    config_path = hub_config(tmp_path, "http://127.0.0.1:9/")
    data_dir = tmp_path / "data"
    store = MessageStore(sqlite_url(data_dir))
    store.migrate()
    [bad] = [
        o.message_id
        for o in store.insert_messages(
            [test_store.new_message("X1", status=test_store.MessageStatus.REJECTED)]
        )
    ]
    store.close()
    result = cli(config_path, data_dir, "messages", "reprocess", str(bad))
    assert result.exit_code == 1
    [action] = actions(data_dir)
    assert (action["outcome"], action["counts"]["skipped"]) == ("partial", 1)


def test_routes_reload_is_recorded_with_its_outcome(tmp_path: Path) -> None:
    from tests.test_route_reload import BROKEN, HUB_YAML, write_route

    config = tmp_path / "carehub.yaml"
    config.write_text(HUB_YAML, encoding="utf-8")
    data = tmp_path / "data"
    with HTTPServer() as server:
        write_route(tmp_path, "DSFAC", server.url("/v1"))
        with CarehubProcess(
            ["serve", "--config", str(config), "--data-dir", str(data)], tmp_path / "logs", "serve"
        ) as hub:
            hub.wait_ready()
            ok = cli(config, data, "routes", "reload", "--by", "frank")
            assert ok.exit_code == 0, ok.output
            (tmp_path / "routes" / "feed.yaml").write_text(BROKEN, encoding="utf-8")
            refused = cli(config, data, "routes", "reload")
            assert refused.exit_code == 1, refused.output
            assert hub.terminate() == 0, hub.stderr
    first, second = actions(data)
    assert (first["command"], first["actor"], first["outcome"]) == (
        "routes reload",
        "frank",
        "ok",
    )
    assert first["target"] == f"carehub serve pid {hub.process.pid}"
    assert second["outcome"] == "refused"


def test_status_render_marks_a_paused_destination(tmp_path: Path) -> None:
    store = MessageStore(sqlite_url(tmp_path / "data"))
    store.migrate()
    try:
        Outbox(store).pause_destination(DESTINATION, "webhook", by="alice", reason="window")
        report = read_status(store, timedelta(hours=1))
        [item] = report.destinations
        assert (item.destination, item.channel, item.paused) == (DESTINATION, "webhook", True)
        from carehub.display import new_console

        console = new_console()
        with console.capture() as captured:
            console.print(render(report))
        assert f"{DESTINATION} (paused)" in captured.get()
        assert "paused" in captured.get() and "by alice: window" in captured.get()
    finally:
        store.close()
