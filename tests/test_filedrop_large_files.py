"""A large batch in the file drop, against a real `carehub serve`: other senders' messages are
answered while it is taken, and a hub killed halfway through takes it again without
duplicates."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from carehub.config import HubConfig
from carehub.hl7.ack import read_ack
from carehub.hl7.framing import encode_frame
from carehub.hub import open_store
from carehub.testing import make_adt, read_frames
from tests.helpers_http import CarehubProcess
from tests.test_filedrop import drop, names, serve_inbox, wait_for

#: The batch: about 32 MB of ADT messages with notes, the size of a night's feed from a small
#: hospital. Splitting it on the event loop held every listener for over 6 s on a 2-CPU machine.
NOTES = [f"NTE|{n}||" + "synthetic discharge note text " * 7 for n in range(1, 21)]
MESSAGES = 7_500
#: The longest an MLLP sender may wait between two answers while the file is taken: far above
#: what a hub that keeps its loop free takes (tens of ms), far below what splitting the file on
#: the loop took.
LONGEST_GAP = 2.0
TAKE_TIMEOUT = 240.0


def nightly_batch(count: int) -> tuple[bytes, list[str]]:
    """A BHS/BTS batch of ``count`` synthetic ADT messages, and their control IDs in order."""
    control_ids = [f"NIGHT{n:06d}" for n in range(count)]
    body = b"".join(
        make_adt(cid, patient_id=f"P{n % 3000:05d}", extra_segments=NOTES).encode()
        for n, cid in enumerate(control_ids)
    )
    return b"BHS|^~\\&|NIGHTLY|RIVERSIDE\r" + body + f"BTS|{count}\r".encode(), control_ids


def serve_config(tmp_path: Path) -> list[str]:
    """`carehub serve` on the inbox, with an MLLP listener for the senders."""
    return serve_inbox(tmp_path, "[{name: senders, host: 127.0.0.1, port: 0}]")[1]


class Sender(threading.Thread):
    """An MLLP sender on its own connection: one message at a time, each answer awaited,
    noting when each answer came."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.answered: list[float] = []
        self.control_ids: list[str] = []
        self.failure: BaseException | None = None
        self._stop_sending = threading.Event()

    def run(self) -> None:
        try:
            with socket.create_connection(self.address, timeout=TAKE_TIMEOUT) as sock:
                number = 0
                while not self._stop_sending.is_set():
                    number += 1
                    control_id = f"LIVE{number:05d}"
                    sock.sendall(encode_frame(make_adt(control_id, event="A04").encode()))
                    (answer,) = read_frames(sock, 1, TAKE_TIMEOUT)
                    code, echoed, text = read_ack(answer.decode())
                    assert (code, echoed) == ("AA", control_id), text
                    self.answered.append(time.monotonic())
                    self.control_ids.append(control_id)
                    time.sleep(0.01)
        except BaseException as err:  # reported by finish()
            self.failure = err

    def finish(self) -> None:
        self._stop_sending.set()
        self.join(30)
        if self.failure is not None:
            raise self.failure

    def longest_gap(self, start: float, end: float) -> float:
        """The longest wait between answers from ``start`` to ``end``, counting from the last
        answer before ``start`` and up to the first after ``end``."""
        before = [t for t in self.answered if t < start][-1:]
        after = [t for t in self.answered if t > end][:1]
        times = before + [t for t in self.answered if start <= t <= end] + after
        return max(later - earlier for earlier, later in itertools.pairwise(times))


def stored_rows(data_dir: Path) -> list[Any]:
    """Every message the hub's store holds, in the order it stored them."""
    store = open_store(HubConfig(), data_dir)
    try:
        return sorted(store.find(limit=None), key=lambda m: m.id)
    finally:
        store.close()


def stored_meanwhile(rows: list[Any], batch: list[Any], listener: str) -> list[Any]:
    """The rows from ``listener`` stored between the batch's first and last message."""
    first, last = batch[0].id, batch[-1].id
    return [m for m in rows if m.listener == listener and first < m.id < last]


def test_mllp_senders_are_answered_while_a_large_batch_is_taken(tmp_path: Path) -> None:
    """The batch is read and split off the event loop and stored a group at a time: the MLLP
    sender's answers keep coming, and its messages are stored between the batch's own (the
    commits interleave), while the batch is stored whole, once, in file order."""
    batch, control_ids = nightly_batch(MESSAGES)
    assert len(batch) > 30 * 1024 * 1024
    inbox = tmp_path / "inbox"
    with CarehubProcess(serve_config(tmp_path), tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        sender = Sender(serve.mllp_address)
        sender.start()
        wait_for(lambda: len(sender.answered) >= 5 or sender.failure is not None, "answers")
        start = time.monotonic()
        drop(inbox, "nightly.hl7", batch)
        wait_for(
            lambda: "nightly.hl7" in names(inbox / "processed") or sender.failure is not None,
            "nightly.hl7 in processed/",
            timeout=TAKE_TIMEOUT,
        )
        end = time.monotonic()
        time.sleep(0.2)  # an answer after the file is taken closes the last gap
        sender.finish()
        gap = sender.longest_gap(start, end)
        assert serve.terminate() == 0
    assert gap < LONGEST_GAP, (
        f"an MLLP sender waited {gap:.2f} s for an answer while the batch was taken "
        f"({end - start:.1f} s)"
    )
    rows = stored_rows(tmp_path / "data")
    from_file = [m for m in rows if m.listener == "inbox"]
    assert [m.control_id for m in from_file] == control_ids
    assert {m.status for m in from_file} == {"received"}
    between = stored_meanwhile(rows, from_file, "senders")
    assert len(between) >= 5, (
        f"{len(between)} of the sender's {len(sender.control_ids)} messages were stored while "
        "the batch was"
    )


def test_a_batch_half_taken_when_the_hub_is_killed_is_taken_again_without_duplicates(
    tmp_path: Path,
) -> None:
    """SIGKILL once part of the batch is stored: the file is still in the inbox, and the next
    start takes it whole; what was stored before is recognised as resent."""
    batch, control_ids = nightly_batch(MESSAGES // 4)
    inbox, database = tmp_path / "inbox", tmp_path / "data" / "carehub.db"

    def stored_from_file() -> int:
        if not database.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
                query = "SELECT count(*) FROM messages WHERE listener = 'inbox'"
                return int(db.execute(query).fetchone()[0])
        except sqlite3.OperationalError:
            return 0  # the schema is still being made

    with CarehubProcess(serve_config(tmp_path), tmp_path / "logs", "first") as serve:
        serve.wait_ready()
        drop(inbox, "nightly.hl7", batch)
        wait_for(lambda: stored_from_file() > 0, "part of the batch stored", TAKE_TIMEOUT)
        serve.process.send_signal(signal.SIGKILL)
        serve.process.wait(30)
    stored_before = stored_from_file()
    assert 0 < stored_before < len(control_ids), "the hub was not killed halfway through"
    assert names(inbox) == ["nightly.hl7"]

    with CarehubProcess(serve_config(tmp_path), tmp_path / "logs", "second") as serve:
        serve.wait_ready()
        wait_for(
            lambda: "nightly.hl7" in names(inbox / "processed"), "the batch taken", TAKE_TIMEOUT
        )
        assert serve.terminate() == 0
    assert names(inbox / "error") == []
    store = open_store(HubConfig(), tmp_path / "data")
    try:
        assert store.control_id_counts() == dict.fromkeys(control_ids, 1)
        rows = sorted(store.find(limit=None), key=lambda m: m.id)
        assert [m.control_id for m in rows] == control_ids
        # The first message was stored before the kill, and again on the retake; the last not.
        assert [c.event for c in store.history(rows[0].id)] == ["received", "resent"]
        assert [c.event for c in store.history(rows[-1].id)] == ["received"]
    finally:
        store.close()
    assert os.path.getsize(inbox / "processed" / "nightly.hl7") == len(batch)
