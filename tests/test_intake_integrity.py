"""Intake never loses or mangles a message: only a true resend is deduplicated (a reused control
ID with other content is a new message), one MLLP frame is one message, a line that is not a
segment never rides along in a routed message, and ``\\Xhh\\`` escapes are read in the
message's own character set. Real sockets, real stores (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import socket
import timeit
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy import insert, select

from carehub.config import FileDropConfig
from carehub.hl7.ack import read_ack
from carehub.hl7.batch import split_data
from carehub.hl7.charsets import decode_message
from carehub.hl7.framing import encode_frame
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.store.outbox import Outbox
from carehub.store.schema import MessageStatus, messages
from carehub.store.store import (
    DIGEST_CHARS,
    MIGRATIONS,
    MessageStore,
    NewMessage,
    message_digest,
)
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange, read_frames
from tests.conftest import corpus_files, requires_corpus
from tests.helpers_http import wait_for
from tests.test_store import store, store_url  # noqa: F401  (fixtures: SQLite and PostgreSQL)

TIMEOUT = 30.0
SENDER = "ADT_SENDER\x1fTEST_HOSPITAL\x1f"


# -- helpers ----------------------------------------------------------------------------------
def ack(answer: bytes) -> tuple[str, str, str]:
    return read_ack(decode_message(answer).text)


def exchange(hub: HubThread, *payloads: bytes) -> list[tuple[str, str, str]]:
    return [ack(a) for a in mllp_exchange(hub.mllp_address, payloads, TIMEOUT)]


def post(hub: HubThread, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{hub.http_url}/hl7",
        content=body,
        headers={"Content-Type": "x-application/hl7-v2+er7"},
        timeout=TIMEOUT,
    )


def acks_in(body: bytes) -> list[tuple[str, str, str]]:
    """Every ACK in an HTTP answer that holds several (read as a batch would be)."""
    return [ack(part.data) for part in split_data(body).messages]


def received(text: str, **fields: Any) -> NewMessage:
    message = NewMessage(
        raw=text.encode(),
        transport="mllp",
        listener="test",
        peer=None,
        status=MessageStatus.RECEIVED,
        ack_code="AA",
        header=MessageHeader.read(MessageView(text)),
        charset="utf-8",
    )
    for name, value in fields.items():
        setattr(message, name, value)
    return message


def with_msh7(text: str, stamp: str) -> str:
    fields = text.split("|")
    fields[6] = stamp
    return "|".join(fields)


@pytest.fixture
def routing_hub(tmp_path: Path) -> Iterator[HubThread]:
    """A hub whose worker routes what intake accepts (no routes: each becomes 'unrouted')."""
    config = local_config(worker=True)
    config.worker.poll_interval = 0.05
    with HubThread(config, tmp_path / "data") as running:
        yield running


def status_of(hub: HubThread, message_id: int) -> str:
    found = hub.store.get(message_id)
    assert found is not None
    return str(found.status)


# == 1. only a true resend is deduplicated ====================================================
def test_content_digest_ignores_terminators_blank_lines_and_msh7_only() -> None:
    text = make_adt("D1")
    digest = MessageView(text).content_digest()
    assert MessageView(text.replace("\r", "\n")).content_digest() == digest
    assert MessageView(text.replace("\r", "\r\n")).content_digest() == digest
    assert MessageView("\ufeff" + text.replace("\r", "\r\r")).content_digest() == digest
    assert MessageView(with_msh7(text, "20270101000000")).content_digest() == digest
    assert MessageView(text.replace("ALEX", "ALEKS")).content_digest() != digest
    assert MessageView(text.replace("|P|2.5", "|T|2.5")).content_digest() != digest  # MSH-11
    assert MessageView(text.replace("20261125083000", "x", 2)).content_digest() != digest  # EVN
    assert len(digest) == DIGEST_CHARS


def test_resend_with_other_terminators_and_a_new_msh7_is_recognised(hub: HubThread) -> None:
    original = make_adt("RS1")
    resend = with_msh7(original, "20261125090000").replace("\r", "\r\n")
    assert exchange(hub, original.encode(), resend.encode()) == [("AA", "RS1", "")] * 2
    (stored,) = hub.store.find()
    assert stored.raw == original.encode()
    assert [c.event for c in hub.store.history(stored.id)] == ["received", "resent"]


def test_reused_control_id_with_other_content_is_stored_routed_and_flagged(
    routing_hub: HubThread,
) -> None:
    admit = make_adt("REUSE1", "A01", patient_id="P1")
    discharge = make_adt("REUSE1", "A03", patient_id="P2")
    assert exchange(routing_hub, admit.encode(), discharge.encode()) == [("AA", "REUSE1", "")] * 2
    first, second = sorted(routing_hub.store.find(), key=lambda m: m.id)
    assert (first.raw, second.raw) == (admit.encode(), discharge.encode())
    # Both are routed (the worker took each: no routes, so each is 'unrouted').
    wait_for(lambda: {status_of(routing_hub, m.id) for m in (first, second)} == {"unrouted"})
    assert first.intake_detail is None
    assert second.intake_detail == (
        f"MSH-10 REUSE1 from ADT_SENDER/TEST_HOSPITAL was used before by message {first.id} "
        "with different content; stored as a new message"
    )
    history = routing_hub.store.history(second.id)
    assert history[0].event == "received" and "used before" in (history[0].detail or "")
    assert "resent" not in [c.event for c in routing_hub.store.history(first.id)]


def test_reused_control_id_over_http_is_a_new_message(hub: HubThread) -> None:
    for patient in ("P1", "P2"):
        response = post(hub, make_adt("HREUSE", patient_id=patient).encode())
        assert (response.status_code, ack(response.content)[0]) == (200, "AA")
    assert hub.store.control_id_counts() == {"HREUSE": 2}


def test_reuse_and_resend_in_one_group_and_across_groups(store: MessageStore) -> None:  # noqa: F811
    a = make_adt("G1", patient_id="P1")
    b = make_adt("G1", patient_id="P2")  # same sender and control id, other content
    first = store.insert_messages([received(a), received(b), received(a.replace("\r", "\n"))])
    assert [(o.duplicate, o.reuses) for o in first] == [
        (False, None),
        (False, first[0].message_id),
        (True, None),
    ]
    assert first[2].message_id == first[0].message_id
    c = make_adt("G1", patient_id="P3")
    second = store.insert_messages(
        [received(b), received(c), received(c), received(make_adt("G2")), received(b)]
    )
    assert second[0] == type(second[0])(first[1].message_id, True, None)
    assert second[1].duplicate is False
    assert second[1].reuses in {first[0].message_id, first[1].message_id}
    assert (second[2].message_id, second[2].duplicate) == (second[1].message_id, True)
    assert (second[3].duplicate, second[3].reuses) == (False, None)
    assert (second[4].message_id, second[4].duplicate) == (first[1].message_id, True)
    detail = store.get(second[1].message_id).intake_detail  # type: ignore[union-attr]
    assert f"used before by message {second[1].reuses} with different content" in detail
    assert store.control_id_counts() == {"G1": 3, "G2": 1}


def test_a_retried_group_notes_a_reuse_once(store: MessageStore) -> None:  # noqa: F811
    """The note is worked out on each try (a busy store retries the group), never added twice."""
    store.insert_messages([received(make_adt("T1", patient_id="P1"))])
    message = received(make_adt("T1", patient_id="P2"), detail="charset note")
    message.reuses = 999  # as a failed earlier try could have left it
    (outcome,) = store.insert_messages([message])
    detail = store.get(outcome.message_id).intake_detail  # type: ignore[union-attr]
    assert detail is not None and detail.count("used before") == 1
    assert "message 999" not in detail and detail.endswith("; charset note")


def test_messages_that_differ_only_in_undecodable_bytes_are_not_resends(
    store: MessageStore,  # noqa: F811
) -> None:
    """Bytes that are not valid in the declared character set are replaced alike in the
    text, so such messages are told apart by their bytes."""
    base = make_adt("BAD8", charset="UNICODE UTF-8", name="M\x00LLER^ANN")
    one, two = (base.encode().replace(b"\x00", bad) for bad in (b"\xfc", b"\xfd"))
    assert decode_message(one).text == decode_message(two).text  # both read as M\ufffdLLER
    outcomes = store.insert_messages(
        [
            NewMessage(one, "mllp", "t", None, MessageStatus.RECEIVED, "AA",
                       MessageHeader.read(MessageView(decode_message(one).text)), "utf-8"),
            NewMessage(two, "mllp", "t", None, MessageStatus.RECEIVED, "AA",
                       MessageHeader.read(MessageView(decode_message(two).text)), "utf-8"),
        ]
    )  # fmt: skip
    assert [o.duplicate for o in outcomes] == [False, False]
    assert message_digest(one, "utf-8") != message_digest(two, "utf-8")


def test_reused_control_id_probe_costs_little(store: MessageStore) -> None:  # noqa: F811
    """The earlier-use probe reads two entries of the unique identity index per message,
    however often a control id was used (a sender that sends one control id all day): a
    fraction of a millisecond per group with thousands stored (measured, printed with -s)."""
    store.insert_messages([received(make_adt(f"BULK{n}")) for n in range(2000)])
    store.insert_messages([received(make_adt("HOT", patient_id=f"P{n}")) for n in range(1000)])
    group = [received(make_adt(f"NEW{n}")).identity() for n in range(6)]
    group += [received(make_adt("HOT", patient_id="PNEW")).identity()]
    group += [received(make_adt("BULK7")).identity()]
    connection = store.engine.raw_connection()
    try:
        cursor = connection.cursor()
        uses = store._probe_uses(cursor, group)
        assert uses.check(group[6])[0] is False and uses.check(group[6])[1] is not None
        assert uses.check(group[7]) == (True, None)
        assert uses.check(group[0]) == (False, None)
        seconds = min(timeit.repeat(lambda: store._probe_uses(cursor, group), number=50, repeat=3))
        print(f"earlier-use probe, a group of 8: {seconds / 50 * 1e6:.0f} us")
        assert seconds / 50 < 0.005
    finally:
        connection.close()


def _alembic(conn: Any) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def test_upgrading_to_0009_rewrites_identities_in_batches(store_url: str) -> None:  # noqa: F811
    """A store written before 0009 (identity = MSH-3, MSH-4, MSH-10) gets the content digest
    on every identity, over more rows than one batch; a resend of a stored message is still
    recognised after the upgrade, and a reused control id is now a new message."""
    old = MessageStore(store_url)
    texts = {f"OLD{n}": make_adt(f"OLD{n}", patient_id=f"P{n}") for n in range(450)}
    try:
        with old.engine.begin() as conn:
            alembic_command.upgrade(_alembic(conn), "0008")
            rows = []
            for control_id, text in texts.items():
                row = {
                    **received(text).stored(0).summary(),
                    "raw": text.encode(),
                    "received_at": received(text).received_at,
                    "status_at": received(text).received_at,
                    "identity": SENDER + control_id,
                }
                for key in ("id", "decoded"):
                    del row[key]
                rows.append(row)
            refused = {**rows[0], "identity": None, "status": "refused", "control_id": "REF"}
            conn.execute(insert(messages), [*rows, refused])
        old.migrate()
        with old.engine.connect() as conn:
            found = {
                row.control_id: (row.id, row.identity)
                for row in conn.execute(
                    select(messages.c.id, messages.c.control_id, messages.c.identity)
                )
            }
            if old.engine.dialect.name == "postgresql":
                collation = conn.exec_driver_sql(
                    "SELECT collation_name FROM information_schema.columns WHERE table_schema = "
                    "current_schema() AND table_name = 'messages' AND column_name = 'identity'"
                ).scalar()
                assert collation == "C"
        for control_id, text in texts.items():
            digest = message_digest(text.encode(), "utf-8")
            assert found[control_id][1] == f"{SENDER}{control_id}\x1f{digest}"
        assert found["REF"][1] is None

        resend, reuse = old.insert_messages(
            [
                received(texts["OLD7"].replace("\r", "\n")),
                received(make_adt("OLD7", patient_id="PX")),
            ]
        )
        assert (resend.duplicate, resend.message_id) == (True, found["OLD7"][0])
        assert (reuse.duplicate, reuse.reuses) == (False, found["OLD7"][0])
    finally:
        old.close()


def test_downgrading_0009_keeps_the_identity_of_the_first_of_a_reused_control_id(
    store: MessageStore,  # noqa: F811
) -> None:
    first, second, other = store.insert_messages(
        [
            received(make_adt("DG1", patient_id="P1")),
            received(make_adt("DG1", patient_id="P2")),
            received(make_adt("DG2")),
        ]
    )
    with store.engine.begin() as conn:
        alembic_command.downgrade(_alembic(conn), "0008")
    with store.engine.connect() as conn:
        found = dict(conn.execute(select(messages.c.id, messages.c.identity)).all())
    assert found == {
        first.message_id: f"{SENDER}DG1",
        second.message_id: None,
        other.message_id: f"{SENDER}DG2",
    }


# == 2. one MLLP frame is one message; an HTTP body may hold several ==========================
def test_two_messages_in_one_mllp_frame_are_rejected_whole_and_never_routed(
    routing_hub: HubThread,
) -> None:
    admit, discharge = make_adt("TWO1", "A01"), make_adt("TWO2", "A03")
    frame = (admit + discharge).encode()
    with socket.create_connection(routing_hub.mllp_address, timeout=TIMEOUT) as sock:
        sock.sendall(encode_frame(frame) + encode_frame(make_adt("AFTER").encode()))
        first, after = (ack(a) for a in read_frames(sock, 2, TIMEOUT))
    code, control_id, text = first
    assert (code, control_id) == ("AR", "TWO1")
    line = admit.count("\r") + 1
    assert (
        f"2 HL7 messages (the second MSH segment starts at line {line}, byte {len(admit)})" in text
    )
    assert after[:2] == ("AA", "AFTER")  # the connection carries on
    rejected = next(m for m in routing_hub.store.find() if m.control_id == "TWO1")
    assert (rejected.status, rejected.ack_code) == ("rejected", "AR")
    assert rejected.raw == frame  # kept whole
    later = next(m for m in routing_hub.store.find() if m.control_id == "AFTER")
    wait_for(lambda: status_of(routing_hub, later.id) == "unrouted")
    assert status_of(routing_hub, rejected.id) == "rejected"
    assert routing_hub.store.count() == 2


def test_a_second_msh_after_a_junk_line_is_still_a_second_message(hub: HubThread) -> None:
    frame = make_adt("TWO3") + "junk\r" + make_adt("TWO4")
    [(code, _, text)] = exchange(hub, frame.encode())
    assert code == "AR" and "2 HL7 messages" in text
    ((stored_ack, err),) = [(m.ack_code, m.detail) for m in hub.store.find()]
    assert stored_ack == "AR" and "one message per frame" in (err or "")


def test_a_batch_in_one_mllp_frame_is_rejected_with_the_reason(hub: HubThread) -> None:
    batch = f"FHS|^~\\&|S\rBHS|^~\\&|S\r{make_adt('BAT1')}BTS|1\rFTS|1\r"
    [(code, _, text)] = exchange(hub, batch.encode())
    assert code == "AR" and "FHS/BHS batch" in text


def test_http_body_with_two_messages_is_split_and_answered_with_both_acks(
    hub: HubThread,
) -> None:
    admit, discharge = make_adt("HTWO1", "A01"), make_adt("HTWO2", "A03", terminator="\n")
    response = post(hub, (admit + discharge).encode())
    assert response.status_code == 200
    assert [a[:2] for a in acks_in(response.content)] == [("AA", "HTWO1"), ("AA", "HTWO2")]
    stored = sorted(hub.store.find(), key=lambda m: m.id)
    assert [(m.control_id, m.status, m.raw) for m in stored] == [
        ("HTWO1", "received", admit.encode()),
        ("HTWO2", "received", discharge.encode()),
    ]


def test_http_batch_is_answered_in_a_batch(hub: HubThread) -> None:
    body = (
        "FHS|^~\\&|SENDAPP|SENDFAC|CAREHUB|HUB|20261201||||FILE77\r"
        "BHS|^~\\&|SENDAPP|SENDFAC|CAREHUB|HUB|20261201||||BATCH42\r"
        f"{make_adt('HB1')}{make_adt('')}BTS|2\rFTS|1\r"
    )
    response = post(hub, body.encode())
    assert response.status_code == 200  # an AE among them is an answer, not a failure
    lines = response.content.decode().split("\r")
    fhs, bhs = lines[0].split("|"), lines[1].split("|")
    assert (fhs[0], fhs[2], fhs[4], fhs[11]) == ("FHS", "CAREHUB", "SENDAPP", "FILE77")
    assert (bhs[0], bhs[4], bhs[5], bhs[11]) == ("BHS", "SENDAPP", "SENDFAC", "BATCH42")
    assert lines[-3:] == ["BTS|2", "FTS|1", ""]
    inner = "\r".join(lines[2:-3]).encode()
    assert [a[:2] for a in acks_in(inner)] == [("AA", "HB1"), ("AE", "")]
    assert sorted((m.control_id or "", m.status) for m in hub.store.find()) == [
        ("", "refused"),
        ("HB1", "received"),
    ]


def test_http_body_with_text_between_messages_stores_it_rejected(hub: HubThread) -> None:
    body = make_adt("HS1") + "a note typed into the feed\r" + make_adt("HS2")
    response = post(hub, body.encode())
    assert response.status_code == 200
    assert [a[0] for a in acks_in(response.content)] == ["AA", "AR", "AA"]
    assert sorted(m.status for m in hub.store.find()) == ["received", "received", "rejected"]


def test_http_body_posted_again_is_recognised_as_resent(hub: HubThread) -> None:
    body = (make_adt("HR1") + make_adt("HR2")).encode()
    assert post(hub, body).status_code == 200
    assert post(hub, body).status_code == 200
    assert hub.store.control_id_counts() == {"HR1": 1, "HR2": 1}


# == 3. a line that is not a segment ==========================================================
def test_junk_line_in_an_mllp_message_is_refused_and_not_routed(routing_hub: HubThread) -> None:
    message = make_adt("JUNK1") + "garbage line here\r"
    [(code, control_id, text)] = exchange(routing_hub, message.encode())
    assert (code, control_id) == ("AE", "JUNK1")
    assert "line 5 is not an HL7 segment" in text and "'garbage line here'" in text
    (stored,) = routing_hub.store.find()
    assert (stored.status, stored.ack_code, stored.raw) == ("refused", "AE", message.encode())
    later = exchange(routing_hub, make_adt("CLEAN1").encode())
    assert later == [("AA", "CLEAN1", "")]
    clean = next(m for m in routing_hub.store.find() if m.control_id == "CLEAN1")
    wait_for(lambda: status_of(routing_hub, clean.id) == "unrouted")
    assert status_of(routing_hub, stored.id) == "refused"


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("pid|1||P1", "'pid|1||P1'"),
        (" PV1|1|I", "' PV1|1|I'"),
        ("PV1 1 I", "'PV1 1 I'"),
        ("OBXX|1", "'OBXX|1'"),
        ("a very long line of free text typed by hand", "'a very long line of ...'"),
    ],
)
def test_lines_that_are_not_segments(hub: HubThread, line: str, shown: str) -> None:
    segments = make_adt("JUNK2").split("\r")
    message = "\r\n".join([*segments[:2], "", line, *segments[2:]])
    [(code, _, text)] = exchange(hub, message.encode())
    assert code == "AE", text
    assert "line 4 is not an HL7 segment" in text and shown in text


def test_blank_lines_and_bare_segment_ids_are_tolerated(hub: HubThread) -> None:
    segments = make_adt("BLANK1").split("\r")
    message = "\r".join([segments[0], "", "   ", "\t", *segments[1:3], "NTE", *segments[3:]])
    assert exchange(hub, message.encode()) == [("AA", "BLANK1", "")]


def test_split_data_ends_a_message_at_trailing_text_but_keeps_text_between_segments() -> None:
    one, two = make_adt("S1").encode(), make_adt("S2").encode()
    trailing = split_data(one + b"this is junk\n" + two)
    assert [m.data for m in trailing.messages] == [one, two]
    assert [(s.offset, s.data) for s in trailing.stray] == [(len(one), b"this is junk\n")]
    inside = one.replace(b"\rPID", b"\rnot a segment\rPID")
    between = split_data(inside + two)
    assert [m.data for m in between.messages] == [inside, two] and between.stray == []


def _file_hub(tmp_path: Path) -> HubThread:
    config = local_config()
    config.listeners.files = [
        FileDropConfig(
            name="inbox", directory=tmp_path / "inbox", poll_interval=0.05, settle_seconds=0
        )
    ]
    return HubThread(config, tmp_path / "data")


def _drop(folder: Path, name: str, data: bytes) -> None:
    (folder / f"{name}.tmp").write_bytes(data)
    os.replace(folder / f"{name}.tmp", folder / name)


def test_file_drop_sends_junk_after_a_message_down_the_stray_text_path(tmp_path: Path) -> None:
    one, two = make_adt("FJ1"), make_adt("FJ2")
    with _file_hub(tmp_path) as hub:
        inbox = tmp_path / "inbox"
        _drop(inbox, "mixed.txt", (one + "this is junk\n" + two).encode())
        reason = inbox / "error" / "mixed.txt.error.txt"
        wait_for(reason.exists, what="mixed.txt in error/")
        text = reason.read_text(encoding="utf-8")
        assert "are not HL7" in text and "'this is junk'" in text and "after message 1" in text
        stored = sorted(hub.store.find(), key=lambda m: m.id)
        assert [(m.control_id, m.status) for m in stored] == [
            ("FJ1", "received"),
            (None, "rejected"),
            ("FJ2", "received"),
        ]
        assert stored[0].raw == one.encode()  # the junk is not part of it
        assert stored[1].raw == b"this is junk\n"


def test_file_drop_refuses_a_message_with_junk_between_its_segments(tmp_path: Path) -> None:
    broken = make_adt("FJ3").replace("\rPID", "\rthis is junk\rPID")
    with _file_hub(tmp_path) as hub:
        inbox = tmp_path / "inbox"
        _drop(inbox, "broken.hl7", broken.encode())
        reason = inbox / "error" / "broken.hl7.error.txt"
        wait_for(reason.exists, what="broken.hl7 in error/")
        assert "AE: line 3 is not an HL7 segment" in reason.read_text(encoding="utf-8")
        (stored,) = hub.store.find()
        assert (stored.status, stored.raw) == ("refused", broken.encode())


@requires_corpus
def test_no_corpus_message_holds_a_line_that_is_not_a_segment() -> None:
    """So every sample keeps the answer it had (AA): see test_corpus for the answers."""
    for path in corpus_files():
        view = MessageView(decode_message(path.read_bytes()).text)
        assert view.first_irregular() is None, path.name
        assert len(split_data(path.read_bytes()).messages) == 1, path.name


# == 4. \Xhh\ escapes in the message's character set ==========================================
SIOBHAN = "O\\S\\Brien^Siobh\\XC3A1\\n"


def test_hex_escapes_are_decoded_in_the_messages_charset() -> None:
    utf8 = make_adt("X1", name=SIOBHAN, charset="UNICODE UTF-8")
    assert MessageView(utf8).get("PID-5.2") == "Siobhán"
    assert MessageView(make_adt("X2", name=SIOBHAN)).get("PID-5.2") == "Siobhán"  # default
    latin1 = make_adt("X3", name="Siobh\\XE1\\n", charset="8859/1")
    assert MessageView(latin1).get("PID-5.1") == "Siobhán"
    # What intake decoded the text with wins over MSH-18.
    assert MessageView(latin1, "iso-8859-1").get("PID-5.1") == "Siobhán"
    assert MessageView(make_adt("X4", name=SIOBHAN), "iso-8859-1").get("PID-5.2") == "SiobhÃ¡n"
    # Bytes that are not UTF-8 are read as ISO-8859-1 rather than replaced.
    assert MessageView(make_adt("X5", name="Siobh\\XE1\\n")).get("PID-5.1") == "Siobhán"
    assert MessageView(make_adt("X6", name="\\XZZ\\")).get("PID-5.1") == "\\XZZ\\"
    utf16 = make_adt("X7", name="\\X00E1\\", charset="UNICODE UTF-16")
    assert MessageView(utf16, "utf-16-be").get("PID-5.1") == "á"


def test_hex_escapes_reach_the_care_event_and_transform_as_the_sender_meant(
    tmp_path: Path,
) -> None:
    (tmp_path / "routes.yaml").write_text(
        """
routes:
  - name: names
    steps:
      - translate: v2-to-event
      - transform:
          edits: [{set: {PID-5.2: "{PID-5.2}"}}]
      - forward: {channel: file, name: events, directory: out/events, body: event}
      - forward: {channel: file, name: v2, directory: out/v2}
""",
        encoding="utf-8",
    )
    config = local_config(worker=True)
    config.source = tmp_path / "carehub.yaml"
    config.routes = ["routes.yaml"]
    config.worker.poll_interval = 0.05
    message = make_adt("XROUTE", name=SIOBHAN, charset="UNICODE UTF-8")
    with HubThread(config, tmp_path / "data") as hub:
        assert exchange(hub, message.encode()) == [("AA", "XROUTE", "")]
        deliveries = {d.destination: d for d in hub.wait_for_deliveries(2)}
        event = json.loads(deliveries["names/events"].payload)
        assert "Siobhán" in json.dumps(event, ensure_ascii=False)
        assert "Ã" not in json.dumps(event, ensure_ascii=False)
        forwarded = deliveries["names/v2"].payload.decode("utf-8")
        assert MessageView(forwarded).get("PID-5.2") == "Siobhán"
        assert "Siobhán" in forwarded and "Ã" not in forwarded
        (stored,) = hub.store.find()
        transform = next(r for r in Outbox(hub.store).steps(stored.id) if r.step == "transform")
        assert "Siobhán" in json.dumps(transform.output, ensure_ascii=False)
        assert "Ã" not in json.dumps(transform.output, ensure_ascii=False)


def test_http_utf16_body_with_two_messages_is_split_and_answered_in_kind(hub: HubThread) -> None:
    one = make_adt("U1", charset="UNICODE UTF-16", name="MÜLLER^ANN")
    two = make_adt("U2", charset="UNICODE UTF-16")
    response = post(hub, (one + two).encode("utf-16-le"))
    assert response.status_code == 200
    answer = response.content.decode("utf-16-le")
    assert [a[:2] for a in acks_in(answer.encode("utf-8"))] == [("AA", "U1"), ("AA", "U2")]
    stored = sorted(hub.store.find(), key=lambda m: m.id)
    assert [(m.control_id, m.raw) for m in stored] == [
        ("U1", one.encode("utf-16-le")),
        ("U2", two.encode("utf-16-le")),
    ]
    assert MessageView(stored[0].text).get("PID-5.1") == "MÜLLER"
