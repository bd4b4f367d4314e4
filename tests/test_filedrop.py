"""File drop intake against a real hub: files are taken once settled, then moved aside."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from carehub.config import FileDropConfig
from carehub.testing import HubThread, local_config, make_adt

WAIT_SECONDS = 10.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def start_hub(tmp_path: Path, settle_seconds: float = 0) -> HubThread:
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


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubThread]:
    with start_hub(tmp_path) as running:
        yield running


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    return tmp_path / "inbox"


def drop(inbox: Path, name: str, data: bytes) -> Path:
    """Write the file whole under a name the watcher ignores, then rename it into place."""
    staging = inbox / f"{name}.tmp"
    staging.write_bytes(data)
    os.replace(staging, inbox / name)
    return inbox / name


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def test_single_message_file_is_stored_and_moved_to_processed(hub: HubThread, inbox: Path) -> None:
    data = make_adt("F1").encode()
    drop(inbox, "one.hl7", data)
    wait_for(lambda: names(inbox / "processed") == ["one.hl7"], "one.hl7 in processed/")
    [stored] = hub.store.find()
    assert (stored.control_id, stored.status, stored.transport) == ("F1", "received", "file")
    assert (stored.listener, stored.peer) == ("inbox", "one.hl7")
    assert stored.raw == data
    assert names(inbox) == [] and names(inbox / "error") == []
    assert (inbox / "processed" / "one.hl7").read_bytes() == data


def test_batch_file_with_wrappers_stores_every_message(hub: HubThread, inbox: Path) -> None:
    body = "".join(make_adt(f"B{n}") for n in (1, 2, 3))
    batch = f"FHS|^~\\&|SENDER\rBHS|^~\\&|SENDER\r{body}BTS|3\rFTS|1\r"
    drop(inbox, "batch.hl7", batch.encode())
    wait_for(lambda: names(inbox / "processed") == ["batch.hl7"], "batch.hl7 in processed/")
    assert hub.store.control_id_counts() == {"B1": 1, "B2": 1, "B3": 1}
    assert hub.store.count("received") == 3


def test_several_lf_terminated_messages_without_wrappers_are_all_stored(
    hub: HubThread, inbox: Path
) -> None:
    data = "\n".join(make_adt(f"L{n}", terminator="\n") for n in range(1, 5)).encode()
    drop(inbox, "lf.txt", data)
    wait_for(lambda: names(inbox / "processed") == ["lf.txt"], "lf.txt in processed/")
    assert hub.store.control_id_counts() == {f"L{n}": 1 for n in range(1, 5)}
    assert {m.patient_id for m in hub.store.find()} == {"P0001"}


def test_file_with_a_bad_message_goes_to_error_with_the_reason(hub: HubThread, inbox: Path) -> None:
    drop(inbox, "mixed.hl7", (make_adt("GOOD1") + make_adt("")).encode())
    wait_for(lambda: "mixed.hl7" in names(inbox / "error"), "mixed.hl7 in error/")
    assert names(inbox / "error") == ["mixed.hl7", "mixed.hl7.error.txt"]
    assert names(inbox / "processed") == []
    reason = (inbox / "error" / "mixed.hl7.error.txt").read_text(encoding="utf-8")
    assert reason.startswith("message 2 of 2 (MSH-10 empty): AE: ")
    assert "MSH-10 (message control ID) is empty" in reason
    assert len(reason.splitlines()) == 1  # message 1 was fine
    assert hub.store.count("received") == 1 and hub.store.count("refused") == 1
    assert hub.store.find(status="received")[0].control_id == "GOOD1"


def test_file_without_hl7_goes_to_error_with_a_reason(hub: HubThread, inbox: Path) -> None:
    drop(inbox, "notes.txt", b"just some notes\r\nnot a message\r\n")
    wait_for(lambda: "notes.txt" in names(inbox / "error"), "notes.txt in error/")
    reason = (inbox / "error" / "notes.txt.error.txt").read_text(encoding="utf-8")
    assert reason == "notes.txt: no HL7 message (no MSH segment) in the file\n"
    [stored] = hub.store.find()
    assert (stored.status, stored.ack_code, stored.peer) == ("rejected", "AR", "notes.txt")


def test_file_still_being_written_is_taken_only_once_settled(tmp_path: Path) -> None:
    # settle 1 s rather than less, so a stalled test thread on a busy machine cannot let the
    # watcher see the half file as settled before the assertion below runs.
    with start_hub(tmp_path, settle_seconds=1.0) as hub:
        inbox = tmp_path / "inbox"
        data = make_adt("SLOW1").encode()
        path = inbox / "slow.hl7"
        with path.open("wb") as sender:
            sender.write(data[:40])
            sender.flush()
            time.sleep(0.3)
            assert path.exists() and hub.store.count() == 0
            sender.write(data[40:])
        wait_for(lambda: names(inbox / "processed") == ["slow.hl7"], "slow.hl7 in processed/")
        [stored] = hub.store.find()
        assert stored.raw == data


def test_dot_files_and_tmp_files_are_ignored(hub: HubThread, inbox: Path) -> None:
    (inbox / ".hidden.hl7").write_bytes(make_adt("HIDDEN").encode())
    (inbox / "upload.tmp").write_bytes(make_adt("TMP").encode())
    drop(inbox, "real.hl7", make_adt("REAL").encode())
    wait_for(lambda: names(inbox / "processed") == ["real.hl7"], "real.hl7 in processed/")
    time.sleep(0.3)  # several more polls
    assert names(inbox) == [".hidden.hl7", "upload.tmp"]
    assert hub.store.control_id_counts() == {"REAL": 1}


def test_name_collision_in_processed_keeps_the_earlier_file(hub: HubThread, inbox: Path) -> None:
    first, second = make_adt("FIRST").encode(), make_adt("SECOND").encode()
    drop(inbox, "same.hl7", first)
    wait_for(lambda: len(names(inbox / "processed")) == 1, "the first file in processed/")
    drop(inbox, "same.hl7", second)
    wait_for(lambda: len(names(inbox / "processed")) == 2, "the second file in processed/")
    processed = inbox / "processed"
    assert (processed / "same.hl7").read_bytes() == first
    [renamed] = [p for p in processed.iterdir() if p.name != "same.hl7"]
    assert renamed.name.startswith("same.") and renamed.suffix == ".hl7"
    assert renamed.read_bytes() == second
    assert hub.store.control_id_counts() == {"FIRST": 1, "SECOND": 1}


def test_dropping_the_same_file_again_is_recognised_as_a_resend(
    hub: HubThread, inbox: Path
) -> None:
    data = (make_adt("R1") + make_adt("R2")).encode()
    drop(inbox, "again.hl7", data)
    wait_for(lambda: len(names(inbox / "processed")) == 1, "the first drop in processed/")
    drop(inbox, "again.hl7", data)
    wait_for(lambda: len(names(inbox / "processed")) == 2, "the second drop in processed/")
    assert hub.store.count() == 2
    assert hub.store.control_id_counts() == {"R1": 1, "R2": 1}
    for stored in hub.store.find():
        assert [c.event for c in hub.store.history(stored.id)] == ["received", "resent"]
