"""One patient, one key; one message, one trigger event.

Intake keys a message by its patient (its order key, its work-queue partition, `messages
list --patient`) and the care records key the visit by Patient.key: both read PID-3 through
carehub.hl7.header.read_cx, so an MRN whose assigning authority is an OID alone
(``12345^^^&2.16.840.1.113883.19.5&ISO^MR``, as HIE feeds send it) is one patient whichever
campus sends it, in one delivery line. The trigger event is MSH-9.2, else EVN-1 (HL7 v2.1
and v2.2 send MSH-9 as ``ADT`` alone): what is stored, what ``events:`` tests and what the
translator records.

A real hub over MLLP, a real HTTP receiver and the real CLI; the store revision that re-keys
the rows an older release wrote runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import insert, select, update

from carehub.builtins.event_translator import translate_v2_to_event
from carehub.cli import main
from carehub.config import load_config
from carehub.events import patient_key_identifier
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.search import MessageFilter
from carehub.store.outbox import Outbox
from carehub.store.schema import MessageStatus, deliveries, messages
from carehub.store.store import MIGRATIONS, MessageStore, NewMessage, sqlite_url
from carehub.testing import HubThread, make_adt, mllp_exchange
from carehub.workqueue import partition_of, patient_key
from tests.helpers_cli import carehub
from tests.helpers_http import HTTPServer, Received, wait_for
from tests.test_dead_letter_order import QUIET, TWO_TRIES
from tests.test_store import new_message, store_url

__all__ = ["store_url"]  # the SQLite / PostgreSQL store fixture, shared with test_store

OID = "2.16.840.1.113883.19.5"
MRN = "12345"
EAST, WEST = "EASTCAMPUS", "WESTCAMPUS"
#: The key the care records give the patient, and so every line of theirs.
KEY = f"{OID}|{MRN}"
#: The store revision that keys stored rows as intake keys them now.
REVISION = "0024"


def campus_adt(control_id: str, event: str, campus: str) -> str:
    """An ADT from ``campus`` for MRN 12345, whose assigning authority (and the visit
    number's) is the OID alone."""
    return make_adt(
        control_id,
        event,
        patient_id=MRN,
        authority=f"&{OID}&ISO",
        sending_facility=campus,
        location=f"4W^412^A^{campus}",
        visit_number="V100",
    )


def v22_discharge(control_id: str) -> str:
    """An A03 as an HL7 v2.2 feed sends it: MSH-9 the type alone, the event in EVN-1."""
    return "\r".join(
        [
            f"MSH|^~\\&|ADT|EAST|CARE|HUB|20261202120000||ADT|{control_id}|P|2.2",
            "EVN|A03|20261202120000",
            "PID|1||22001^^^HOSP^MR||DOE^JANE||19700101|F",
            "PV1|1|I|W^1^1^EAST||||||||||||||||V200^^^HOSP",
            "",
        ]
    )


def stored(message: str) -> NewMessage:
    """``message`` as intake hands it to the store."""
    header = MessageHeader.read(MessageView(message))
    return NewMessage(
        message.encode(), "mllp", "t", None, MessageStatus.RECEIVED, "AA", header, "utf-8"
    )


ROUTES = """
routes:
  - name: visits
    when: {{type: ADT}}
    steps:
      - translate: v2-to-event
      - enrich: {{use: encounter-state}}
      - forward: {{channel: webhook, name: ehr, url: "{url}/ehr", retry: {retry}}}
  - name: discharges
    when: {{type: ADT, events: [A03]}}
    steps:
      - forward: {{channel: webhook, name: ehr, url: "{url}/discharges", retry: {retry}}}
"""


def hub_config(folder: Path, receiver: HTTPServer) -> Path:
    """A site whose ``visits`` route records the care transition and forwards every ADT to
    ``/ehr``, and whose ``discharges`` route forwards what ``events: [A03]`` matches to
    ``/discharges``."""
    folder.mkdir(parents=True, exist_ok=True)
    routes = ROUTES.format(url=receiver.url(""), retry=TWO_TRIES)
    (folder / "routes.yaml").write_text(routes, "utf-8")
    config = folder / "carehub.yaml"
    config.write_text(
        "listeners:\n"
        "  mllp: [{name: adt, host: 127.0.0.1, port: 0}]\n"
        "  http: {enabled: false}\n"
        "worker: {poll_interval: 0.05}\n"
        "routes: [routes.yaml]\n",
        encoding="utf-8",
    )
    return config


def send(hub: HubThread, *texts: str) -> None:
    answers = mllp_exchange(hub.mllp_address, [t.encode() for t in texts])
    assert all(b"MSA|AA|" in answer for answer in answers), answers


def run_cli(config: Path, data_dir: Path, *args: str) -> str:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        main, [*args, "--config", str(config), "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 0, result.output
    return result.output


def cli_json(config: Path, data_dir: Path, *args: str) -> list[dict[str, Any]]:
    output = run_cli(config, data_dir, *args, "--json")
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def forwards(hub: HubThread) -> dict[tuple[str | None, str], Any]:
    """(control id, route) -> its delivery."""
    found = {}
    for message in hub.store.find(limit=None):
        for delivery in Outbox(hub.store).find(message_id=message.id):
            found[(message.control_id, delivery.route)] = delivery
    return found


def status_of(hub: HubThread, control_id: str) -> str:
    delivery = forwards(hub).get((control_id, "visits"))
    return delivery.status if delivery is not None else ""


def delivered(server: HTTPServer, hub: HubThread, path: str = "/ehr") -> list[str | None]:
    """The control ids of the messages ``server`` took at ``path``, in the order it did."""
    by_key = {d.idempotency_key: d.message_id for d in Outbox(hub.store).find(limit=None)}
    taken = [by_key[r.key] for r in server.ok() if r.key in by_key and r.path == path]
    return [m.control_id for i in taken if (m := hub.store.get(i)) is not None]


# -- the two keys, on one message -------------------------------------------------------------
@pytest.mark.parametrize(
    ("pid_3", "facility", "key"),
    [
        (f"{MRN}^^^&{OID}&ISO^MR", EAST, KEY),
        (f"{MRN}^^^&{OID}&ISO^MR", WEST, KEY),
        (f"{MRN}^^^HOSP&{OID}&ISO^MR", EAST, f"HOSP|{MRN}"),
        (f"{MRN} ^^^ HOSP ^MR", EAST, f"HOSP|{MRN}"),
        (f"{MRN}&X^^^HOSP^MR", EAST, f"HOSP|{MRN}"),
        (f"{MRN}^^^^MR", EAST, f"{EAST}|{MRN}"),
        (f'""~ ~{MRN}^^^HOSP', EAST, f"HOSP|{MRN}"),
        (f"999^^^SSA^SS~{MRN}^^^HOSP^ MR ", EAST, f"HOSP|{MRN}"),
        (f"{MRN}^^^A\\T\\B^MR", EAST, f"A&B|{MRN}"),
    ],
)
def test_intake_and_the_care_records_key_a_patient_alike(
    pid_3: str, facility: str, key: str
) -> None:
    message = make_adt("K1", patient_id="", authority="", sending_facility=facility)
    message = message.replace("PID|1||^^^^MR|", f"PID|1||{pid_3}|")
    order_key = patient_key(*stored(message).patient(), 1)
    care = patient_key_identifier(translate_v2_to_event(MessageView(message)).patient)
    assert care is not None
    assert (order_key, patient_key(care.value, care.authority, 1)) == (key, key)


def test_pid_2_keys_a_patient_alike_when_pid_3_is_empty() -> None:
    """Versions 2.1-2.3 often carry the external identifier in PID-2: its MR repetition,
    else the first, as in PID-3."""
    message = make_adt("K2", patient_id="", authority="")
    message = message.replace("PID|1||^^^^MR|", f"PID|1|777^^^X~{MRN}^^^&{OID}&ISO^MR||")
    care = patient_key_identifier(translate_v2_to_event(MessageView(message)).patient)
    assert care is not None
    assert patient_key(*stored(message).patient(), 1) == KEY
    assert patient_key(care.value, care.authority, 1) == KEY


# -- a real hub --------------------------------------------------------------------------------
def test_one_patients_admission_and_discharge_from_two_campuses_keep_one_line(
    tmp_path: Path,
) -> None:
    """The A01 from the east campus and the A03 from the west one, for an MRN scoped by an
    OID: one order key, one work-queue partition, one line to the receiver; and the key
    `encounters list` shows finds both messages."""
    with HTTPServer() as receiver:
        config = hub_config(tmp_path / "site", receiver)
        data_dir = tmp_path / "data"
        with HubThread(load_config(config), data_dir) as hub:
            published: list[str] = []
            accepted = hub.hub.intake.on_accepted
            assert accepted is not None

            def record(message_id: int, key: str) -> None:
                published.append(key)
                accepted(message_id, key)

            hub.hub.intake.on_accepted = record
            send(hub, campus_adt("E1", "A01", EAST))
            send(hub, campus_adt("W1", "A03", WEST))
            wait_for(lambda: delivered(receiver, hub) == ["E1", "W1"], what="both forwarded")

            assert published == [KEY, KEY]  # one work-queue partition
            assert partition_of(published[0], 8) == partition_of(published[1], 8)
            lines = {c: d.order_key for (c, route), d in forwards(hub).items() if route == "visits"}
            assert lines == {"E1": KEY, "W1": KEY}

            (visit,) = cli_json(config, data_dir, "encounters", "list")
            assert (visit["patient_key"], visit["state"]) == (KEY, "discharged")
            authority, _, mrn = visit["patient_key"].partition("|")
            found = cli_json(
                config, data_dir, "messages", "list", "--patient", f"{mrn}^{authority}"
            )
            assert sorted(m["control_id"] for m in found) == ["E1", "W1"]
            assert {m["patient_authority"] for m in found} == {OID}


def test_a_v22_discharge_with_its_event_in_evn_1_is_an_a03_everywhere(tmp_path: Path) -> None:
    """MSH-9 ``ADT`` and EVN-1 ``A03``: `routes test` matches ``events: [A03]``, the hub
    forwards it on that route, the care records take it for a discharge, and `messages list
    --event A03` and `--type ADT^A03` find it."""
    sample = tmp_path / "a03.hl7"
    sample.write_text(v22_discharge("D1"), encoding="utf-8")
    with HTTPServer() as receiver:
        config = hub_config(tmp_path / "site", receiver)
        data_dir = tmp_path / "data"
        where = ["--config", str(config), "--data-dir", str(tmp_path / "dry")]
        tried = carehub("routes", "test", *where, str(sample))
        assert "route discharges: matched" in tried.stdout, tried.stdout + tried.stderr

        with HubThread(load_config(config), data_dir) as hub:
            send(hub, v22_discharge("D1"))
            wait_for(
                lambda: delivered(receiver, hub, "/discharges") == ["D1"],
                what="the discharge forwarded on the A03 route",
            )
            (message,) = cli_json(config, data_dir, "messages", "list", "--event", "A03")
            assert message["control_id"] == "D1"
            typed = cli_json(config, data_dir, "messages", "list", "--type", "ADT^A03")
            assert [m["control_id"] for m in typed] == ["D1"]
            (visit,) = cli_json(config, data_dir, "encounters", "list")
            assert visit["state"] == "discharged"


def test_routes_test_says_the_event_was_read_from_evn_1(tmp_path: Path) -> None:
    sample = tmp_path / "a03.hl7"
    sample.write_text(v22_discharge("D2"), encoding="utf-8")
    (tmp_path / "routes.yaml").write_text(
        "routes:\n"
        "  - name: admissions\n"
        "    when: {type: ADT, events: [A01]}\n"
        "    steps: [{translate: v2-to-event}]\n",
        "utf-8",
    )
    config = tmp_path / "carehub.yaml"
    config.write_text("listeners: {http: {enabled: false}}\nroutes: [routes.yaml]\n", "utf-8")
    where = ["--config", str(config), "--data-dir", str(tmp_path / "dry")]
    tried = carehub("routes", "test", *where, str(sample))
    assert "event (EVN-1) = 'A03', wanted in ['A01']" in tried.stdout, tried.stdout


# -- rows an older release wrote ---------------------------------------------------------------
def _alembic() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def before_revision() -> str:
    """The revision before the one that keys stored rows as intake keys them now."""
    before = ScriptDirectory.from_config(_alembic()).get_revision(REVISION).down_revision
    assert isinstance(before, str)
    return before


def as_the_older_release_wrote_it(store: MessageStore) -> None:
    """The schema at the revision before, and message rows as the older release wrote them:
    an MRN scoped by an OID alone keyed by the sending facility's code (what it took for an
    identifier without an authority), with its forwards in that key's line; an MRN with its
    padding; no trigger event where MSH-9.2 is empty."""
    with store.engine.begin() as conn:
        rows = conn.execute(
            select(messages.c.id, messages.c.sending_facility, messages.c.patient_id).where(
                messages.c.patient_authority == OID
            )
        ).all()
        for row_id, facility, patient_id in rows:
            conn.execute(
                update(messages).where(messages.c.id == row_id).values(patient_authority=facility)
            )
            conn.execute(
                update(deliveries)
                .where(deliveries.c.message_id == row_id, deliveries.c.order_key == KEY)
                .values(order_key=f"{facility}|{patient_id}")
            )
        conn.execute(
            update(messages).where(messages.c.control_id == "PAD").values(patient_id=" 55501 ")
        )
        conn.execute(update(messages).where(messages.c.version == "2.2").values(trigger_event=None))
    store.downgrade(before_revision())


def row(store: MessageStore, control_id: str) -> tuple[Any, ...]:
    with store.engine.connect() as conn:
        found = conn.execute(
            select(
                messages.c.patient_id, messages.c.patient_authority, messages.c.trigger_event
            ).where(messages.c.control_id == control_id)
        ).one()
    return tuple(found)


def order_keys(store: MessageStore) -> list[tuple[str, str]]:
    with store.engine.connect() as conn:
        found = conn.execute(
            select(messages.c.control_id, deliveries.c.order_key)
            .select_from(deliveries.join(messages, messages.c.id == deliveries.c.message_id))
            .order_by(deliveries.c.id)
        ).all()
    return [(control_id, key) for control_id, key in found]


def test_the_revision_keys_stored_rows_as_intake_keys_them_now(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = MessageStore(store_url)
    store.migrate()
    try:
        sent = store.insert_messages(
            [
                stored(campus_adt("E1", "A01", EAST)),
                stored(campus_adt("W1", "A03", WEST)),
                stored(make_adt("PAD", patient_id=" 55501 ", authority="HOSP")),
                stored(v22_discharge("D1")),
                new_message("K1", patient_id="55501", sending_facility=EAST),
            ]
        )
        ids = dict(zip(["E1", "W1", "PAD", "D1", "K1"], (o.message_id for o in sent), strict=True))
        at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
        with store.engine.begin() as conn:
            for number, (control_id, status, key) in enumerate(
                [("E1", "dead", KEY), ("W1", "pending", KEY), ("K1", "delivered", "HOSP|55501")]
            ):
                conn.execute(
                    insert(deliveries).values(
                        message_id=ids[control_id],
                        run=1,
                        route="visits",
                        destination="visits/ehr",
                        channel="webhook",
                        idempotency_key=f"key-{number}",
                        order_key=key,
                        payload=b"{}",
                        content_type="application/json",
                        status=status,
                        attempts=0,
                        max_attempts=2,
                        not_before=at,
                        created_at=at,
                        updated_at=at,
                    )
                )
        as_the_older_release_wrote_it(store)
        assert row(store, "E1") == (MRN, EAST, "A01")
        assert row(store, "D1") == ("22001", "HOSP", None)
        old_lines = [("E1", f"{EAST}|{MRN}"), ("W1", f"{WEST}|{MRN}"), ("K1", "HOSP|55501")]
        assert order_keys(store) == old_lines

        with caplog.at_level(logging.INFO, logger="carehub.store.migrations"):
            store.migrate()
        assert row(store, "E1") == (MRN, OID, "A01")
        assert row(store, "W1") == (MRN, OID, "A03")
        assert row(store, "PAD") == ("55501", "HOSP", "A01")
        assert row(store, "D1") == ("22001", "HOSP", "A03")
        assert row(store, "K1") == ("55501", "HOSP", "A01")  # as intake keyed it: untouched
        assert order_keys(store) == [("E1", KEY), ("W1", KEY), ("K1", "HOSP|55501")]
        said = [r.getMessage() for r in caplog.records if r.name == "carehub.store.migrations"]
        assert said == [
            f"store revision {REVISION}: 3 message(s) now name their patient as their care "
            "records do (2 delivery(ies) moved to that patient's line); 1 message(s) now hold "
            "the trigger event route conditions test (MSH-9.2, else EVN-1)"
        ]
        assert not any(value in said[0] for value in (MRN, "55501", "22001", OID, EAST))

        # `messages list --patient 12345^<OID>` finds both campuses' messages; --event A03
        # finds the v2.2 discharge.
        found = store.search(MessageFilter(patient=MRN, patient_authority=OID))
        assert sorted(m.control_id or "" for m in found) == ["E1", "W1"]
        discharges = store.search(MessageFilter(message_type="ADT", event="A03"))
        assert sorted(m.control_id or "" for m in discharges) == ["D1", "W1"]

        # Again, after a downgrade: nothing left to change, nothing said.
        store.downgrade(before_revision())
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="carehub.store.migrations"):
            store.migrate()
        assert [r for r in caplog.records if r.name == "carehub.store.migrations"] == []
        assert order_keys(store) == [("E1", KEY), ("W1", KEY), ("K1", "HOSP|55501")]
        assert row(store, "E1") == (MRN, OID, "A01")
    finally:
        store.close()


def test_after_the_upgrade_a_discharge_waits_behind_the_admission_held_from_before(
    tmp_path: Path,
) -> None:
    """The east campus's A01 became a dead letter holding its patient's line in the older
    release (keyed ``EASTCAMPUS|12345``); after `carehub store upgrade` the west campus's
    A03 for the same patient waits behind it, and follows it once it is retried."""
    refusing = {"E1": True}

    def respond(request: Received) -> int:
        return 503 if refusing.get(str(request.json.get("control_id"))) else 200

    with HTTPServer(respond) as receiver:
        config = hub_config(tmp_path / "site", receiver)
        data_dir = tmp_path / "data"
        with HubThread(load_config(config), data_dir) as hub:
            send(hub, campus_adt("E1", "A01", EAST))
            wait_for(lambda: status_of(hub, "E1") == "dead", what="the A01 a dead letter")
            destination = forwards(hub)[("E1", "visits")].destination
        store = MessageStore(sqlite_url(data_dir))
        try:
            as_the_older_release_wrote_it(store)
        finally:
            store.close()
        where = ["--config", str(config), "--data-dir", str(data_dir)]
        done = carehub("store", "upgrade", *where)
        assert done.returncode == 0, done.stderr
        store = MessageStore(sqlite_url(data_dir))
        try:
            assert order_keys(store) == [("E1", KEY)]  # the dead A01 is in the patient's line
        finally:
            store.close()

        refusing.clear()
        with HubThread(load_config(config), data_dir) as hub:
            send(hub, campus_adt("W1", "A03", WEST))
            wait_for(lambda: status_of(hub, "W1"), what="the A03 routed")
            time.sleep(QUIET)
            assert status_of(hub, "W1") == "pending"  # behind the A01 held from before
            assert forwards(hub)[("W1", "visits")].order_key == KEY
            run_cli(config, data_dir, "dead-letters", "retry", "--destination", destination)
            wait_for(lambda: delivered(receiver, hub) == ["E1", "W1"], what="the A01, then A03")
            found = cli_json(config, data_dir, "messages", "list", "--patient", f"{MRN}^{OID}")
            assert sorted(m["control_id"] for m in found) == ["E1", "W1"]
