"""File drop: a batch file that is not whole is never taken in part.

A batch shows whether it is whole: every header closed by its trailer (BHS by BTS, FHS by FTS)
and the counts BTS-1 (messages in the batch) and FTS-1 (batches in the file) matching what it
holds. One that is not whole stays in the inbox while its sender may still be writing it
(ten times settle_seconds unchanged), then goes to error/ with the reason, nothing of it
stored. A file moved aside is the file that was read.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from carehub.config import FileDropConfig
from carehub.hub import open_store
from carehub.intake.intake import Arrival, Intake, IntakeResult
from carehub.store.store import StoredMessage
from carehub.testing import HubThread, local_config, make_adt
from tests.helpers_http import CarehubProcess

WAIT_SECONDS = 15.0
FHS = "FHS|^~\\&|SENDER|HOSP|CAREHUB|HUB|20261125083000||||FILE1\r"
BHS = "BHS|^~\\&|SENDER|HOSP|CAREHUB|HUB|20261125083000||||BATCH1\r"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.exists() else []


def slow_batch() -> tuple[bytes, bytes]:
    """The three-message batch as (what the sender writes first, the rest): the first part
    ends inside S2's PID-3, so S2 looks like a whole message for patient SLO."""
    body = "".join(make_adt(control_id, patient_id="SLOW") for control_id in ("S1", "S2", "S3"))
    data = f"{FHS}{BHS}{body}BTS|3\rFTS|1\r".encode()
    cut = data.index(b"PID|1||SLO", data.index(b"|S2|")) + len(b"PID|1||SLO")
    return data[:cut], data[cut:]


def start_hub(tmp_path: Path, settle_seconds: float) -> HubThread:
    config = local_config()
    config.listeners.files = [
        FileDropConfig(
            name="inbox",
            directory=tmp_path / "inbox",
            poll_interval=0.05,
            settle_seconds=settle_seconds,
        )
    ]
    return HubThread(config, tmp_path / "data")


def drop(inbox: Path, name: str, data: bytes) -> None:
    """Write the file whole under a skipped name, then rename it into place."""
    staging = inbox / f".{name}"
    staging.write_bytes(data)
    os.replace(staging, inbox / name)


# -- the sender pauses in the middle of a batch ------------------------------------------------


def test_a_batch_written_with_a_pause_is_taken_whole_by_carehub_serve(tmp_path: Path) -> None:
    """`carehub serve`, settle_seconds 0.5: the sender writes up to ``PID|1||SLO`` inside S2,
    waits 3 s, then writes the rest through the same handle. Meanwhile nothing is stored and
    the file stays in the inbox; then all three messages are stored, each for patient SLOW,
    and routed, and processed/ holds the whole file."""
    inbox, outbox, data_dir = tmp_path / "inbox", tmp_path / "out", tmp_path / "data"
    (tmp_path / "routes.yaml").write_text(
        "routes:\n  - name: copy\n    when: {type: ADT}\n    steps:\n"
        f"      - forward: {{channel: file, name: copy, directory: {outbox}, body: v2}}\n"
    )
    config = tmp_path / "carehub.yaml"
    config.write_text(
        "listeners:\n  mllp: []\n  http: {enabled: false}\n  files:\n"
        f"    - {{name: inbox, directory: {inbox}, poll_interval: 0.1, settle_seconds: 0.5}}\n"
        "routes: [routes.yaml]\nworker: {poll_interval: 0.05}\n"
    )

    def stored() -> list[StoredMessage]:
        """What the store holds, read beside the running hub as `carehub messages` reads it."""
        store = open_store(local_config(), data_dir, must_exist=True)
        try:
            return store.find()
        finally:
            store.close()

    first, rest = slow_batch()
    args = ["serve", "--config", str(config), "--data-dir", str(data_dir)]
    with CarehubProcess(args, tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        with (inbox / "slow_batch.hl7").open("wb") as sender:
            sender.write(first)
            sender.flush()
            paused = time.monotonic()
            time.sleep(2.5)  # settle_seconds five times over
            assert stored() == []
            assert names(inbox) == ["slow_batch.hl7"]
            assert names(inbox / "processed") == [] and names(inbox / "error") == []
            time.sleep(max(0.0, paused + 3 - time.monotonic()))
            sender.write(rest)
        wait_for(lambda: names(inbox / "processed") == ["slow_batch.hl7"], "the file taken")
        assert (inbox / "processed" / "slow_batch.hl7").read_bytes() == first + rest
        assert names(inbox / "error") == []
        messages = sorted(stored(), key=lambda m: m.control_id or "")
        assert [(m.control_id, m.ack_code, m.patient_id) for m in messages] == [
            ("S1", "AA", "SLOW"),
            ("S2", "AA", "SLOW"),
            ("S3", "AA", "SLOW"),
        ]
        wait_for(lambda: len(names(outbox)) == 3, "three messages routed")
        for copy in outbox.iterdir():
            assert b"PID|1||SLOW^^^HOSP^MR|" in copy.read_bytes()
        assert serve.terminate() == 0
    assert "Traceback" not in serve.stderr


def test_a_batch_never_finished_goes_to_error_whole_once_the_wait_is_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """settle_seconds 0.2: a batch cut off inside S2 stays in the inbox, nothing stored, for
    2 s unchanged; then it goes to error/ as written, saying which trailers are missing, and
    still nothing of it is stored. The log names the file, not the patient."""
    caplog.set_level(logging.INFO, logger="carehub.intake.filedrop")
    inbox = tmp_path / "inbox"
    first, _ = slow_batch()
    with start_hub(tmp_path, settle_seconds=0.2) as hub:
        (inbox / "cut.hl7").write_bytes(first)
        written = time.monotonic()
        time.sleep(1.0)
        assert names(inbox) == ["cut.hl7"] and hub.store.count() == 0
        wait_for(lambda: "cut.hl7.error.txt" in names(inbox / "error"), "cut.hl7 in error/")
        assert time.monotonic() - written >= 1.9
        assert names(inbox / "error") == ["cut.hl7", "cut.hl7.error.txt"]
        assert (inbox / "error" / "cut.hl7").read_bytes() == first
        reason = (inbox / "error" / "cut.hl7.error.txt").read_text(encoding="utf-8")
        lines = reason.splitlines()
        assert lines[:2] == [
            "cut.hl7: batch 1 (BHS) has no BTS trailer",
            "cut.hl7: the file (FHS) has no FTS trailer",
        ]
        assert "nothing of it was stored" in lines[2] and "2 s unchanged" in lines[2]
        time.sleep(0.3)
        assert hub.store.count() == 0 and names(inbox / "processed") == []
    said = [r.getMessage() for r in caplog.records if "cut.hl7" in r.getMessage()]
    assert len(said) == 2  # once when held, once when moved
    assert not any("SLO" in line for line in said)


# -- counts and trailers that do not match what the batch holds ---------------------------------

ONE = make_adt("C1")
TWO = make_adt("C2")


@pytest.mark.parametrize(
    ("batch", "problem"),
    [
        (
            f"{FHS}{BHS}{ONE}BTS|5\rFTS|1\r",
            "BTS-1 of batch 1, the number of messages in the batch, is 5, but the batch holds 1",
        ),
        (
            f"{BHS}{ONE}{TWO}BTS|1\r",
            "BTS-1 of batch 1, the number of messages in the batch, is 1, but the batch holds 2",
        ),
        (
            f"{FHS}{BHS}{ONE}BTS|1\rFTS|2\r",
            "FTS-1, the number of batches in the file, is 2, but the file holds 1",
        ),
        (f"{FHS}{BHS}{ONE}BTS|1\r", "the file (FHS) has no FTS trailer"),
        (f"{FHS}{BHS}{ONE}FTS|1\r", "batch 1 (BHS) has no BTS trailer before the FTS"),
        (f"{ONE}BTS|1\r", "a BTS trailer has no BHS header before it"),
        (
            f"{BHS}{ONE}BTS|one\r",
            "BTS-1 of batch 1, the number of messages in the batch, is 'one', not a number",
        ),
    ],
)
def test_a_batch_whose_trailers_do_not_match_is_not_taken(
    tmp_path: Path, batch: str, problem: str
) -> None:
    """settle_seconds 0 (files arrive by rename, so there is nothing to wait for): the file
    goes straight to error/ with the reason, and none of its messages is stored."""
    inbox = tmp_path / "inbox"
    with start_hub(tmp_path, settle_seconds=0) as hub:
        drop(inbox, "batch.hl7", batch.encode())
        wait_for(lambda: "batch.hl7" in names(inbox / "error"), "batch.hl7 in error/")
        reason = (inbox / "error" / "batch.hl7.error.txt").read_text(encoding="utf-8")
        assert reason.splitlines()[0] == f"batch.hl7: {problem}"
        assert (inbox / "error" / "batch.hl7").read_bytes() == batch.encode()
        drop(inbox, "next.hl7", make_adt("NEXT").encode())
        wait_for(lambda: "next.hl7" in names(inbox / "processed"), "the next file taken")
        assert hub.store.control_id_counts() == {"NEXT": 1}


@pytest.mark.parametrize(
    "batch",
    [
        f"{FHS}{BHS}{ONE}{TWO}BTS|2\rFTS|1\r",
        f"{FHS}{BHS}{ONE}BTS|1\r{BHS}{TWO}BTS|1\rFTS|2\r",
        f"{FHS}{BHS}{ONE}{TWO}BTS|\rFTS|\r",  # counts are optional
        f"{FHS}{ONE}{TWO}FTS|1\r",  # no BHS: one batch without a header of its own
        f"{FHS}{ONE}{TWO}FTS|0\r",  # ... which the hub's own answers count as 0
        f"{BHS}{ONE}{TWO}BTS|2\r",
    ],
)
def test_a_whole_batch_is_taken(tmp_path: Path, batch: str) -> None:
    inbox = tmp_path / "inbox"
    with start_hub(tmp_path, settle_seconds=0) as hub:
        drop(inbox, "batch.hl7", batch.encode())
        wait_for(lambda: names(inbox / "processed") == ["batch.hl7"], "batch.hl7 in processed/")
        assert hub.store.control_id_counts() == {"C1": 1, "C2": 1}


# -- the file moved aside is the file that was read ---------------------------------------------


def test_a_file_written_to_while_it_is_taken_goes_to_error_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender that appends to a plain file (no wrappers to show it is unfinished) after it
    has settled, while its message is being stored: the file does not go to processed/ as if
    all of it had been taken, but to error/ with the byte counts; dropping it again whole
    stores only what was not stored yet."""
    inbox = tmp_path / "inbox"
    first, more = make_adt("W1").encode(), make_adt("W2").encode()
    receive = Intake.receive

    async def receive_while_the_sender_writes(
        intake: Intake, payload: bytes, arrival: Arrival
    ) -> IntakeResult:
        path = inbox / "grow.hl7"
        if arrival.transport == "file" and path.exists() and path.stat().st_size == len(first):
            with path.open("ab") as sender:
                sender.write(more)
        return await receive(intake, payload, arrival)

    monkeypatch.setattr(Intake, "receive", receive_while_the_sender_writes)
    with start_hub(tmp_path, settle_seconds=0) as hub:
        drop(inbox, "grow.hl7", first)
        wait_for(lambda: "grow.hl7" in names(inbox / "error"), "grow.hl7 in error/")
        assert names(inbox / "processed") == []
        reason = (inbox / "error" / "grow.hl7.error.txt").read_text(encoding="utf-8")
        assert reason.startswith(
            f"grow.hl7: the file changed while it was being taken: the {len(first)} bytes read "
            f"then were taken (their 1 message(s) stored), it now holds {len(first + more)}."
        )
        assert hub.store.control_id_counts() == {"W1": 1}
        drop(inbox, "grow.hl7", (inbox / "error" / "grow.hl7").read_bytes())
        wait_for(lambda: "grow.hl7" in names(inbox / "processed"), "the whole file taken")
        assert hub.store.control_id_counts() == {"W1": 1, "W2": 1}


# -- names the watcher skips, and wide text ------------------------------------------------------


def test_skipped_names_are_skipped_whatever_their_case(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    with start_hub(tmp_path, settle_seconds=0) as hub:
        for name in ("UPLOAD.TMP", "feed.hl7.Part", "feed2.hl7.FILEPART", ".feed3.hl7"):
            (inbox / name).write_bytes(make_adt("STAGED").encode())
        drop(inbox, "real.hl7", make_adt("REAL").encode())
        wait_for(lambda: "real.hl7" in names(inbox / "processed"), "real.hl7 taken")
        time.sleep(0.3)  # several more polls
        assert hub.store.control_id_counts() == {"REAL": 1}
        assert len(names(inbox)) == 4


def test_a_utf16_file_with_text_after_a_message_goes_to_error_and_the_next_is_taken(
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    text = make_adt("U1") + "printed by job 7\r" + make_adt("U2")
    with start_hub(tmp_path, settle_seconds=0) as hub:
        drop(inbox, "wide.hl7", b"\xff\xfe" + text.encode("utf-16-le"))
        wait_for(lambda: "wide.hl7" in names(inbox / "error"), "wide.hl7 in error/")
        reason = (inbox / "error" / "wide.hl7.error.txt").read_text(encoding="utf-8")
        assert "(after message 1)" in reason and "printed by job 7" in reason
        drop(inbox, "next.hl7", make_adt("NEXT").encode())
        wait_for(lambda: "next.hl7" in names(inbox / "processed"), "the next file taken")
        assert hub.store.control_id_counts() == {"U1": 1, "U2": 1, "NEXT": 1}
