"""The MLLP listener over real sockets: framing quirks, ACK codes and headers, resends,
character sets, idle and graceful shutdown. Every ACK is checked by code and MSA-2."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from carehub.hl7.ack import read_ack
from carehub.hl7.framing import encode_frame
from carehub.hl7.view import MessageView
from carehub.hub import open_store
from carehub.intake.mllp import MAX_UNANSWERED
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange, read_frames

TIMEOUT = 30.0


@contextmanager
def connect(hub: HubThread, *, nodelay: bool = False) -> Iterator[socket.socket]:
    with socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock:
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        yield sock


def exchange(hub: HubThread, *payloads: bytes) -> list[tuple[str, str, str]]:
    """Send each payload on one connection and read its ACK as (code, MSA-2, text)."""
    answers = mllp_exchange(hub.mllp_address, payloads, timeout=TIMEOUT)
    return [read_ack(a.decode("latin-1")) for a in answers]


def adt(control_id: str, **kwargs: str) -> bytes:
    return make_adt(control_id, **kwargs).encode()


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def closed_by_peer(sock: socket.socket, timeout: float = TIMEOUT) -> bool:
    """True when the peer closes the connection (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def custom_hub(tmp_path: Path, **listener: object) -> HubThread:
    config = local_config()
    for key, value in listener.items():
        setattr(config.listeners.mllp[0], key, value)
    return HubThread(config, tmp_path / "data")


def padded_adt(control_id: str, size: int) -> bytes:
    """An ADT of exactly ``size`` bytes, padded with NTE segments."""
    base = adt(control_id)
    segments, remaining = [], size - len(base)
    while remaining > 0:
        chunk = min(remaining, 4000)
        assert chunk >= 9, "size leaves too little room for an NTE segment"
        segments.append(b"NTE|1||" + b"X" * (chunk - 8) + b"\r")
        remaining -= chunk
    payload = base + b"".join(segments)
    assert len(payload) == size
    return payload


# -- framing ----------------------------------------------------------------------------------


def test_frame_sent_one_byte_at_a_time_is_answered_once(hub: HubThread) -> None:
    data = encode_frame(adt("BYTES"))
    with connect(hub, nodelay=True) as sock:
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])
            time.sleep(0.002)
        (answer,) = read_frames(sock, 1, TIMEOUT)
    assert read_ack(answer.decode())[:2] == ("AA", "BYTES")
    assert [m.raw for m in hub.store.find()] == [adt("BYTES")]


def test_several_frames_in_one_send_are_answered_in_order(hub: HubThread) -> None:
    ids = [f"ORDER{i}" for i in range(8)]
    with connect(hub) as sock:
        sock.sendall(b"".join(encode_frame(adt(i)) for i in ids))
        answers = read_frames(sock, len(ids), TIMEOUT)
    assert [read_ack(a.decode())[:2] for a in answers] == [("AA", i) for i in ids]
    assert hub.store.count() == len(ids)


def test_stray_bytes_and_line_breaks_between_frames_are_ignored(hub: HubThread) -> None:
    data = b"junk" + encode_frame(adt("S1")) + b"\r\n\n" + encode_frame(adt("S2")) + b"\r"
    with connect(hub) as sock:
        sock.sendall(data)
        answers = read_frames(sock, 2, TIMEOUT)
    assert [read_ack(a.decode())[:2] for a in answers] == [("AA", "S1"), ("AA", "S2")]
    assert hub.store.count() == 2
    assert hub.store.count("rejected") == 0


def test_peer_leaving_mid_frame_stores_nothing_and_others_are_served(hub: HubThread) -> None:
    with connect(hub) as sock:
        sock.sendall(b"\x0b" + adt("HALF")[:120])
    assert exchange(hub, adt("GOOD")) == [("AA", "GOOD", "")]
    wait_for(lambda: hub.hub.mllp_listeners[0].open_connections == 0)
    assert [m.control_id for m in hub.store.find()] == ["GOOD"]


def test_end_block_and_carriage_return_in_separate_sends(hub: HubThread) -> None:
    with connect(hub, nodelay=True) as sock:
        sock.sendall(b"\x0b" + adt("SPLIT1") + b"\x1c")
        time.sleep(0.3)
        sock.sendall(b"\r")
        first = read_frames(sock, 1, TIMEOUT)
        sock.sendall(b"\x0b" + adt("SPLIT2") + b"\x1c")
        time.sleep(0.3)
        sock.sendall(b"\r" + encode_frame(adt("SPLIT3")))
        rest = read_frames(sock, 2, TIMEOUT)
    codes = [read_ack(a.decode())[:2] for a in first + rest]
    assert codes == [("AA", "SPLIT1"), ("AA", "SPLIT2"), ("AA", "SPLIT3")]
    assert sorted(m.raw for m in hub.store.find()) == sorted(
        adt(i) for i in ("SPLIT1", "SPLIT2", "SPLIT3")
    )


def test_start_block_inside_a_frame_rejects_it_and_accepts_the_next(hub: HubThread) -> None:
    broken = adt("BROKEN")[:150]
    with connect(hub) as sock:
        sock.sendall(b"\x0b" + broken + encode_frame(adt("NEXT")))
        answers = read_frames(sock, 2, TIMEOUT)
    (code, control_id, text), second = (read_ack(a.decode()) for a in answers)
    assert (code, control_id) == ("AR", "BROKEN")
    assert "start block" in text
    assert second[:2] == ("AA", "NEXT")
    (rejected,) = hub.store.find(status="rejected")
    assert rejected.raw == broken
    assert [m.control_id for m in hub.store.find(status="received")] == ["NEXT"]


def test_a_sender_that_reads_no_acks_for_a_while_gets_every_one_in_order(
    hub: HubThread,
) -> None:
    """More frames than the listener keeps unanswered (it stops reading meanwhile), sent
    before reading a single ACK: all are answered, in order, once the sender reads."""
    count = MAX_UNANSWERED * 4
    frames = b"".join(encode_frame(adt(f"FLOOD{n}")) for n in range(count))
    with connect(hub) as sock:
        sender = threading.Thread(target=sock.sendall, args=(frames,), daemon=True)
        sender.start()
        time.sleep(0.5)  # the listener reads until it holds MAX_UNANSWERED, then waits
        answers = read_frames(sock, count, TIMEOUT)
        sender.join(TIMEOUT)
    assert [read_ack(a.decode())[:2] for a in answers] == [
        ("AA", f"FLOOD{n}") for n in range(count)
    ]
    assert len(hub.store.control_id_counts()) == count


def test_many_concurrent_connections_are_all_acked_and_stored_once(hub: HubThread) -> None:
    connections, per_connection = 60, 5
    barrier = threading.Barrier(connections, timeout=TIMEOUT)

    def client(n: int) -> list[tuple[str, str]]:
        with connect(hub) as sock:
            barrier.wait()
            codes = []
            for m in range(per_connection):
                sock.sendall(encode_frame(adt(f"C{n}-{m}")))
                codes.append(read_ack(read_frames(sock, 1, TIMEOUT)[0].decode())[:2])
            return codes

    with ThreadPoolExecutor(max_workers=connections) as pool:
        results = list(pool.map(client, range(connections)))
    for n, codes in enumerate(results):
        assert codes == [("AA", f"C{n}-{m}") for m in range(per_connection)]
    counts = hub.store.control_id_counts()
    assert len(counts) == connections * per_connection
    assert set(counts.values()) == {1}


def test_idle_connection_is_closed_while_an_active_one_stays_open(tmp_path: Path) -> None:
    with custom_hub(tmp_path, idle_timeout=1) as hub, connect(hub) as idle, connect(hub) as busy:
        opened = time.monotonic()
        closed_at: list[float] = []

        def watch_idle() -> None:
            if closed_by_peer(idle):
                closed_at.append(time.monotonic())

        watcher = threading.Thread(target=watch_idle, daemon=True)
        watcher.start()
        sent = 0
        # Keep the active connection busy well past two idle timeouts, and until the idle closes.
        while not closed_at or time.monotonic() - opened < 2.5:
            assert time.monotonic() - opened < TIMEOUT, "idle connection was never closed"
            busy.sendall(encode_frame(adt(f"ACTIVE{sent}")))
            assert read_ack(read_frames(busy, 1, TIMEOUT)[0].decode())[:2] == (
                "AA",
                f"ACTIVE{sent}",
            )
            sent += 1
            time.sleep(0.1)
        assert closed_at[0] - opened >= 0.9  # not before its idle timeout
        assert hub.store.count() == sent


def test_a_peer_over_its_connection_limit_loses_its_longest_idle_connection(
    tmp_path: Path,
) -> None:
    """A sender that opens a connection per message and never closes one: past
    max_connections_per_peer the hub closes that peer's longest idle connection, so the sender
    keeps working and cannot use up the hub's file descriptors."""
    with custom_hub(tmp_path, max_connections_per_peer=3) as hub:
        first, second, third = (
            socket.create_connection(hub.mllp_address, timeout=TIMEOUT) for _ in range(3)
        )
        try:
            for number, sock in enumerate((first, second, third)):
                sock.sendall(encode_frame(adt(f"LEAK{number}")))
                assert read_ack(read_frames(sock, 1)[0].decode())[0] == "AA"
                time.sleep(0.05)  # so "longest idle" is well defined
            second.sendall(encode_frame(adt("LEAK1B")))  # second is now the most recent
            assert read_ack(read_frames(second, 1)[0].decode())[0] == "AA"

            with connect(hub) as fourth:
                assert closed_by_peer(first, timeout=5)  # the longest idle one
                fourth.sendall(encode_frame(adt("LEAK3")))
                assert read_ack(read_frames(fourth, 1)[0].decode())[:2] == ("AA", "LEAK3")
                for sock, control_id in ((second, "LEAK1C"), (third, "LEAK2B")):
                    sock.sendall(encode_frame(adt(control_id)))
                    assert read_ack(read_frames(sock, 1)[0].decode())[:2] == ("AA", control_id)
            metrics = httpx.get(f"{hub.http_url}/metrics", timeout=TIMEOUT).text
            assert 'carehub_mllp_connections_shed_total{listener="test"} 1.0' in metrics
        finally:
            for sock in (first, second, third):
                sock.close()


def test_a_peer_at_its_limit_with_every_connection_waiting_for_an_ack_gets_no_more(
    tmp_path: Path,
) -> None:
    """A connection with a frame in flight is never cut to make room: when all of the peer's
    connections wait for their ACK (here: another process holds SQLite's write lock), the new
    connection is the one closed, and the waiting frames are still answered AA."""
    with custom_hub(tmp_path, max_connections_per_peer=2) as hub:
        blocker = sqlite3.connect(tmp_path / "data" / "carehub.db", timeout=5)
        waiting = [socket.create_connection(hub.mllp_address, timeout=TIMEOUT) for _ in range(2)]
        try:
            blocker.execute("BEGIN IMMEDIATE")
            for number, sock in enumerate(waiting):
                sock.sendall(encode_frame(adt(f"HELD{number}")))
            time.sleep(0.3)  # both frames read, waiting for the lock
            with connect(hub) as extra:
                assert closed_by_peer(extra, timeout=5)
            blocker.rollback()
            for number, sock in enumerate(waiting):
                assert read_ack(read_frames(sock, 1)[0].decode())[:2] == ("AA", f"HELD{number}")
            assert hub.hub.mllp_listeners[0].connections_shed == 1
        finally:
            blocker.close()
            for sock in waiting:
                sock.close()


# -- segment terminators and BOM ---------------------------------------------------------------


@pytest.mark.parametrize("terminator", ["\r", "\n", "\r\n"], ids=["CR", "LF", "CRLF"])
def test_segment_terminators_are_all_accepted(hub: HubThread, terminator: str) -> None:
    payload = make_adt("TERM", terminator=terminator, patient_id="P77").encode()
    assert exchange(hub, payload) == [("AA", "TERM", "")]
    (stored,) = hub.store.find()
    assert stored.raw == payload
    assert (stored.patient_id, stored.trigger_event) == ("P77", "A01")


def test_utf8_bom_before_msh_is_ignored(hub: HubThread) -> None:
    payload = b"\xef\xbb\xbf" + adt("BOM")
    assert exchange(hub, payload) == [("AA", "BOM", "")]
    (stored,) = hub.store.find()
    assert stored.raw == payload
    assert (stored.sending_application, stored.control_id) == ("ADT_SENDER", "BOM")


# -- ACK codes --------------------------------------------------------------------------------


def test_good_message_gets_aa_and_is_stored_received(hub: HubThread) -> None:
    assert exchange(hub, adt("OK1")) == [("AA", "OK1", "")]
    (stored,) = hub.store.find()
    assert (stored.status, stored.ack_code, stored.control_id) == ("received", "AA", "OK1")


def test_frame_without_msh_gets_ar_with_reason(hub: HubThread) -> None:
    (answer,) = mllp_exchange(hub.mllp_address, [b"HELLO WORLD\r"], timeout=TIMEOUT)
    ack = MessageView(answer.decode())
    assert (ack.get("MSA-1"), ack.get("MSA-2")) == ("AR", "")
    assert "no MSH segment" in ack.get("ERR-8")
    assert ack.get("ERR-3.1") == "100"
    (stored,) = hub.store.find()
    assert (stored.status, stored.ack_code, stored.raw) == ("rejected", "AR", b"HELLO WORLD\r")


def test_missing_control_id_gets_ae_naming_msh10_and_is_stored_refused(hub: HubThread) -> None:
    payload = adt("")
    assert b"|ADT^A01^ADT_A01||P|" in payload
    (answer,) = mllp_exchange(hub.mllp_address, [payload], timeout=TIMEOUT)
    ack = MessageView(answer.decode())
    assert (ack.get("MSA-1"), ack.get("MSA-2")) == ("AE", "")
    assert "MSH-10" in ack.get("ERR-8")
    assert (ack.get("ERR-2"), ack.get("ERR-3.1")) == ("MSH^1^10", "101")
    (stored,) = hub.store.find()
    assert (stored.status, stored.ack_code, stored.raw) == ("refused", "AE", payload)
    assert "MSH-10" in (hub.store.history(stored.id)[0].detail or "")


def test_empty_message_type_gets_ae_naming_msh9(hub: HubThread) -> None:
    payload = adt("NOTYPE").replace(b"|ADT^A01^ADT_A01|", b"||")
    code, control_id, text = exchange(hub, payload)[0]
    assert (code, control_id) == ("AE", "NOTYPE")
    assert "MSH-9" in text
    assert hub.store.find()[0].status == "refused"


@pytest.mark.parametrize("size", [3000, 300_000])
def test_oversize_message_gets_ar_naming_the_limit_then_connection_works(
    tmp_path: Path, size: int
) -> None:
    big = padded_adt("BIG", size)
    with custom_hub(tmp_path, max_message_bytes=2048) as hub, connect(hub) as sock:
        sock.sendall(encode_frame(big))
        (answer,) = read_frames(sock, 1, TIMEOUT)
        sock.sendall(encode_frame(adt("SMALL")))
        (after,) = read_frames(sock, 1, TIMEOUT)
        code, control_id, text = read_ack(answer.decode())
        assert (code, control_id) == ("AR", "BIG")
        assert "limit of 2048 bytes" in text and f"{size} bytes" in text
        assert read_ack(after.decode())[:2] == ("AA", "SMALL")
        (rejected,) = hub.store.find(status="rejected")
        assert big.startswith(rejected.raw)
        assert [m.control_id for m in hub.store.find(status="received")] == ["SMALL"]


def test_oversize_frame_keeps_none_of_the_next_frame_in_its_stored_head(tmp_path: Path) -> None:
    big = padded_adt("BIG", 3000)
    with custom_hub(tmp_path, max_message_bytes=2048) as hub, connect(hub) as sock:
        sock.sendall(encode_frame(big) + encode_frame(adt("SMALL")))
        answers = read_frames(sock, 2, TIMEOUT)
        assert [read_ack(a.decode())[:2] for a in answers] == [("AR", "BIG"), ("AA", "SMALL")]
        (rejected,) = hub.store.find(status="rejected")
        assert big.startswith(rejected.raw)


def test_message_of_exactly_the_default_limit_is_accepted_and_one_byte_more_is_rejected(
    hub: HubThread,
) -> None:
    """The default size limit is inclusive: a message of exactly DEFAULT_MAX_MESSAGE_BYTES gets
    AA and is stored byte for byte; one byte more gets AR naming the limit; and the same
    connection then still answers a good message AA (an off-by-one in the frame decoder, or a
    connection left stuck after draining the oversize frame, fails here)."""
    from carehub.config import DEFAULT_MAX_MESSAGE_BYTES as LIMIT

    exact = padded_adt("EXACT", LIMIT)
    over = padded_adt("OVER", LIMIT + 1)
    answers = exchange(hub, exact, over, adt("AFTER"))
    assert answers[0] == ("AA", "EXACT", "")
    code, control_id, text = answers[1]
    assert (code, control_id) == ("AR", "OVER")
    assert f"limit of {LIMIT} bytes" in text and f"{LIMIT + 1} bytes" in text
    assert answers[2] == ("AA", "AFTER", "")
    stored = {m.control_id: m for m in hub.store.find()}
    assert (stored["EXACT"].status, stored["EXACT"].size) == ("received", LIMIT)
    assert stored["EXACT"].raw == exact
    assert stored["OVER"].status == "rejected"
    assert over.startswith(stored["OVER"].raw) and len(stored["OVER"].raw) < LIMIT
    assert stored["AFTER"].status == "received"


# -- ACK header -------------------------------------------------------------------------------


def test_ack_header_swaps_routing_and_echoes_version_and_control_id(hub: HubThread) -> None:
    payload = adt("HDR1").replace(b"|CAREHUB|CAREHUB|", b"|RCV_APP|RCV_FAC|", 1)
    (answer,) = mllp_exchange(hub.mllp_address, [payload], timeout=TIMEOUT)
    ack = MessageView(answer.decode())
    routing = [ack.get(f"MSH-{n}") for n in (3, 4, 5, 6)]
    assert routing == ["RCV_APP", "RCV_FAC", "ADT_SENDER", "TEST_HOSPITAL"]
    assert (ack.raw("MSH-9"), ack.get("MSH-11"), ack.get("MSH-12")) == ("ACK^A01^ACK", "P", "2.5")
    assert (ack.get("MSA-1"), ack.get("MSA-2")) == ("AA", "HDR1")
    assert ack.get("MSH-10") not in ("", "HDR1")


@pytest.mark.parametrize(
    ("version", "message_type"),
    [("2.3", "ACK^A01"), ("2.3.1", "ACK^A01^ACK"), ("2.6", "ACK^A01^ACK")],
)
def test_ack_echoes_the_version_and_its_message_type_form(
    hub: HubThread, version: str, message_type: str
) -> None:
    (answer,) = mllp_exchange(hub.mllp_address, [adt("V1", version=version)], timeout=TIMEOUT)
    ack = MessageView(answer.decode())
    assert (ack.get("MSH-12"), ack.raw("MSH-9"), ack.get("MSA-2")) == (version, message_type, "V1")


def test_ack_uses_the_senders_own_separators(hub: HubThread) -> None:
    payload = (
        b"MSH#$%!&#APP#FAC#HUB#HUBFAC#20261125083000##ADT$A04$ADT_A01#SEP1#P#2.5\r"
        b"PID#1##P9$$$HOSP$MR##DOE$JANE\r"
    )
    (answer,) = mllp_exchange(hub.mllp_address, [payload], timeout=TIMEOUT)
    assert answer.startswith(b"MSH#$%!&#HUB#HUBFAC#APP#FAC#")
    ack = MessageView(answer.decode())
    assert ack.raw("MSH-9") == "ACK$A04$ACK"
    assert (ack.get("MSA-1"), ack.get("MSA-2")) == ("AA", "SEP1")
    (stored,) = hub.store.find()
    assert (stored.patient_id, stored.patient_authority) == ("P9", "HOSP")


# -- duplicates -------------------------------------------------------------------------------


def test_resend_on_the_same_connection_is_acked_and_stored_once(hub: HubThread) -> None:
    assert exchange(hub, adt("DUP1"), adt("DUP1")) == [("AA", "DUP1", "")] * 2
    (stored,) = hub.store.find()
    assert [e.event for e in hub.store.history(stored.id)] == ["received", "resent"]


def test_resend_in_the_same_send_is_acked_twice_and_stored_once(hub: HubThread) -> None:
    with connect(hub) as sock:
        sock.sendall(encode_frame(adt("DUP2")) * 2)
        answers = read_frames(sock, 2, TIMEOUT)
    assert [read_ack(a.decode())[:2] for a in answers] == [("AA", "DUP2")] * 2
    (stored,) = hub.store.find()
    assert [e.event for e in hub.store.history(stored.id)] == ["received", "resent"]


def test_resend_on_another_connection_is_acked_and_stored_once(hub: HubThread) -> None:
    assert exchange(hub, adt("DUP3")) == [("AA", "DUP3", "")]
    assert exchange(hub, adt("DUP3")) == [("AA", "DUP3", "")]
    (stored,) = hub.store.find()
    history = hub.store.history(stored.id)
    assert [e.event for e in history] == ["received", "resent"]
    assert "mllp:test" in (history[1].detail or "")


def test_same_control_id_from_another_facility_is_a_different_message(hub: HubThread) -> None:
    assert (
        exchange(hub, adt("SAME"), adt("SAME", sending_facility="OTHER_HOSPITAL"))
        == [("AA", "SAME", "")] * 2
    )
    assert sorted(m.sending_facility for m in hub.store.find()) == [
        "OTHER_HOSPITAL",
        "TEST_HOSPITAL",
    ]


# -- character sets ---------------------------------------------------------------------------

NAME = "Zoë^Ñuñez"


@pytest.mark.parametrize("charset", ["", "UNICODE UTF-8"])
def test_utf8_name_is_stored_raw_and_read_back(hub: HubThread, charset: str) -> None:
    payload = make_adt("UTF8", name=NAME, charset=charset).encode("utf-8")
    assert exchange(hub, payload) == [("AA", "UTF8", "")]
    (stored,) = hub.store.find()
    assert stored.raw == payload
    assert stored.charset == "utf-8"
    assert MessageView(stored.text).get("PID-5") == NAME


def test_declared_latin1_name_is_stored_raw_and_read_back(hub: HubThread) -> None:
    payload = make_adt("LAT1", name=NAME, charset="8859/1").encode("iso-8859-1")
    (answer,) = mllp_exchange(hub.mllp_address, [payload], timeout=TIMEOUT)
    ack = MessageView(answer.decode("iso-8859-1"))
    assert (ack.get("MSA-1"), ack.get("MSA-2"), ack.get("MSH-18")) == ("AA", "LAT1", "8859/1")
    (stored,) = hub.store.find()
    assert stored.raw == payload
    assert stored.charset == "whatwg-windows-1252"
    assert MessageView(stored.text).get("PID-5") == NAME


def test_undeclared_latin1_bytes_are_read_as_latin1_with_a_warning(hub: HubThread) -> None:
    payload = make_adt("LAT2", name=NAME).encode("iso-8859-1")
    assert exchange(hub, payload) == [("AA", "LAT2", "")]
    (stored,) = hub.store.find()
    assert stored.raw == payload
    assert stored.charset == "iso-8859-1"
    assert MessageView(stored.text).get("PID-5") == NAME
    detail = hub.store.history(stored.id)[0].detail or ""
    assert "not valid utf-8" in detail and "ISO-8859-1" in detail


def test_invalid_bytes_under_declared_utf8_are_refused_and_connection_continues(
    hub: HubThread,
) -> None:
    """Bytes that contradict MSH-18 would reach receivers with replacement characters in a
    clinical message: AE naming the byte, stored as received, and the next frame is AA."""
    bad = make_adt("BADUTF", name=NAME, charset="UNICODE UTF-8").encode("iso-8859-1")
    (code, control_id, reason), after = exchange(hub, bad, adt("AFTERBAD"))
    assert (code, control_id) == ("AE", "BADUTF")
    assert "MSH-18" in reason and "byte" in reason
    assert after == ("AA", "AFTERBAD", "")
    stored = {m.control_id: m for m in hub.store.find()}
    assert stored["BADUTF"].raw == bad
    assert stored["BADUTF"].status == "refused"


# -- graceful stop ----------------------------------------------------------------------------


def test_stopping_the_hub_closes_an_idle_connection(hub: HubThread) -> None:
    with connect(hub) as sock:
        sock.sendall(encode_frame(adt("BEFORESTOP")))
        assert read_ack(read_frames(sock, 1, TIMEOUT)[0].decode())[0] == "AA"
        hub.stop()
        assert closed_by_peer(sock)


def test_every_acked_message_is_in_the_store_after_stop(tmp_path: Path) -> None:
    config = local_config()
    hub = HubThread(config, tmp_path / "data")
    acked: list[str] = []
    started = threading.Event()

    def sender(n: int) -> None:
        try:
            with connect(hub) as sock:
                for m in range(10_000):
                    sock.sendall(encode_frame(adt(f"S{n}-{m}")))
                    code, control_id, _ = read_ack(read_frames(sock, 1, TIMEOUT)[0].decode())
                    if code == "AA":
                        acked.append(control_id)
                    if len(acked) >= 30:
                        started.set()
        except (ConnectionError, OSError):
            return

    with hub:
        threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        assert started.wait(TIMEOUT)
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "stop left an active connection open"
    store = open_store(config, tmp_path / "data")
    try:
        assert set(acked) <= set(store.control_id_counts())
        assert store.count() >= len(acked) >= 30
    finally:
        store.close()
