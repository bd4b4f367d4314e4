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


def start_hub(tmp_path: Path, settle_seconds: float = 0, **options: int) -> HubThread:
    config = local_config()
    config.listeners.files = [
        FileDropConfig(
            name="inbox",
            directory=tmp_path / "inbox",
            poll_interval=0.05,
            settle_seconds=settle_seconds,
            **options,
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


def test_file_over_the_size_limit_is_not_read_and_goes_to_error(tmp_path: Path) -> None:
    """A file is read whole, so one over max_file_bytes is refused unread: its head is stored
    as rejected, the reason names the limit, and the next file is taken as usual."""
    inbox = tmp_path / "inbox"
    with start_hub(tmp_path, max_file_bytes=64 * 1024) as hub:
        big = make_adt("BIGFILE", extra_segments=[f"NTE|{i}||{'x' * 1000}" for i in range(80)])
        drop(inbox, "big.hl7", big.encode())
        wait_for(lambda: "big.hl7" in names(inbox / "error"), "big.hl7 in error/")
        reason = (inbox / "error" / "big.hl7.error.txt").read_text(encoding="utf-8")
        size = (inbox / "error" / "big.hl7").stat().st_size
        assert reason == (
            f"big.hl7: file of {size} bytes exceeds this file drop's limit of 65536 bytes "
            "(max_file_bytes)\n"
        )
        [rejected] = hub.store.find()
        assert (rejected.status, rejected.ack_code, rejected.peer) == ("rejected", "AR", "big.hl7")
        assert rejected.control_id == "BIGFILE"  # read from the head that was kept
        assert len(rejected.raw) < size

        drop(inbox, "small.hl7", make_adt("SMALLFILE").encode())
        wait_for(lambda: "small.hl7" in names(inbox / "processed"), "small.hl7 in processed/")
        assert sorted(m.control_id for m in hub.store.find()) == ["BIGFILE", "SMALLFILE"]


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


# -- stored bytes are the file's bytes ---------------------------------------------------------


def test_lf_terminated_messages_are_stored_byte_for_byte(hub: HubThread, inbox: Path) -> None:
    one, two = (make_adt(f"LF{n}", terminator="\n").encode() for n in (1, 2))
    drop(inbox, "lf.hl7", one + b"\n" + two + b"\n\x1a")
    wait_for(lambda: names(inbox / "processed") == ["lf.hl7"], "lf.hl7 in processed/")
    stored = {m.control_id: m.raw for m in hub.store.find()}
    assert stored == {"LF1": one, "LF2": two}


def test_batch_messages_are_stored_as_their_own_slice_of_the_file(
    hub: HubThread, inbox: Path
) -> None:
    bodies = [make_adt(f"CRLF{n}", terminator="\r\n").encode() for n in (1, 2)]
    data = b"FHS|^~\\&|SENDER\r\nBHS|^~\\&|SENDER\r\n" + b"".join(bodies) + b"BTS|2\r\nFTS|1\r\n"
    drop(inbox, "crlf.hl7", data)
    wait_for(lambda: names(inbox / "processed") == ["crlf.hl7"], "crlf.hl7 in processed/")
    stored = {m.control_id: m.raw for m in hub.store.find()}
    assert stored == {"CRLF1": bodies[0], "CRLF2": bodies[1]}
    assert all(raw in data for raw in stored.values())


def test_utf16_file_is_split_and_stored_as_sent(hub: HubThread, inbox: Path) -> None:
    text = "".join(make_adt(f"U{n}", name="Zoë^Núñez", charset="UNICODE UTF-16") for n in (1, 2))
    drop(inbox, "utf16.hl7", b"\xff\xfe" + text.encode("utf-16-le"))
    wait_for(lambda: names(inbox / "processed") == ["utf16.hl7"], "utf16.hl7 in processed/")
    stored = {m.control_id: m for m in hub.store.find()}
    assert set(stored) == {"U1", "U2"}
    assert stored["U1"].raw == make_adt("U1", name="Zoë^Núñez", charset="UNICODE UTF-16").encode(
        "utf-16-le"
    )
    assert stored["U2"].charset == "utf-16-le" and "Zoë^Núñez" in stored["U2"].text


# -- text outside the messages ---------------------------------------------------------------


def test_text_before_the_first_message_is_kept_as_rejected_and_the_file_goes_to_error(
    hub: HubThread, inbox: Path
) -> None:
    note = b"Cover note: two admissions, ward 7\r\n"
    drop(inbox, "note.hl7", note + (make_adt("N1") + make_adt("N2")).encode())
    wait_for(lambda: "note.hl7" in names(inbox / "error"), "note.hl7 in error/")
    assert names(inbox / "processed") == []
    # The messages themselves are fine and stored; the note is on record, not lost.
    assert hub.store.control_id_counts() == {"N1": 1, "N2": 1}
    [rejected] = hub.store.find(status="rejected")
    assert (rejected.raw, rejected.ack_code, rejected.peer) == (note, "AR", "note.hl7")
    assert "byte 0" in (rejected.detail or "")
    reason = (inbox / "error" / "note.hl7.error.txt").read_text(encoding="utf-8")
    assert reason == (
        f"{len(note)} bytes at byte 0 (before message 1) are not HL7 and not a batch header "
        f"or trailer: 'Cover note: two admissions, ward 7'; AR, stored as message {rejected.id}\n"
    )


def test_text_after_a_batch_trailer_is_reported_too(hub: HubThread, inbox: Path) -> None:
    body = make_adt("T1") + make_adt("T2")
    drop(inbox, "tail.hl7", f"BHS|^~\\&|S\r{body}BTS|2\rprinted by batch job 7\r".encode())
    wait_for(lambda: "tail.hl7" in names(inbox / "error"), "tail.hl7 in error/")
    reason = (inbox / "error" / "tail.hl7.error.txt").read_text(encoding="utf-8")
    assert "(after the last message)" in reason and "printed by batch job 7" in reason
    assert hub.store.count("received") == 2 and hub.store.count("rejected") == 1


def test_blank_lines_and_batch_headers_before_the_first_message_are_fine(
    hub: HubThread, inbox: Path
) -> None:
    data = f"\r\n  \r\nFHS|^~\\&|S\rBHS|^~\\&|S\r{make_adt('H1')}BTS|1\rFTS|1\r\n\x1a"
    drop(inbox, "blank.hl7", data.encode())
    wait_for(lambda: names(inbox / "processed") == ["blank.hl7"], "blank.hl7 in processed/")
    assert hub.store.count() == 1 and hub.store.count("received") == 1


def test_a_file_that_cannot_be_moved_is_set_aside_and_the_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """processed/ stops being a folder: the taken file cannot be moved there, so it stays in
    the inbox with one WARNING (not a traceback every poll), a later file still goes through
    (to error/, which works), and once processed/ is back the file is tried again and moved,
    its message stored once."""
    from carehub.intake import filedrop

    monkeypatch.setattr(filedrop, "STUCK_RETRY", 0.5)
    caplog.set_level("WARNING", logger="carehub.intake.filedrop")
    processed = tmp_path / "done"
    config = local_config()
    config.listeners.files = [
        FileDropConfig(
            name="inbox",
            directory=tmp_path / "inbox",
            processed_dir=processed,
            poll_interval=0.05,
            settle_seconds=0,
        )
    ]
    with HubThread(config, tmp_path / "data") as running:
        inbox = tmp_path / "inbox"
        processed.rmdir()
        processed.write_text("not a folder")
        drop(inbox, "stuck.hl7", make_adt("STUCK-1").encode())
        wait_for(lambda: running.store.count() == 1, "the first file's message stored")
        drop(inbox, "bad.hl7", make_adt("").encode())  # no MSH-10: refused, to error/
        wait_for(lambda: "bad.hl7" in names(inbox / "error"), "the later file handled")
        time.sleep(1.5)  # retried a few times meanwhile
        stuck = [r for r in caplog.records if "cannot take stuck.hl7" in r.getMessage()]
        assert len(stuck) == 1
        assert "stuck.hl7" in names(inbox)
        processed.unlink()
        processed.mkdir()
        wait_for(lambda: "stuck.hl7" in names(processed), "the file moved once possible")
        assert [m.control_id for m in running.store.find(limit=None)].count("STUCK-1") == 1
    assert not [r for r in caplog.records if r.exc_info]  # no tracebacks


def serve_inbox(tmp_path: Path, mllp: str = "[]") -> tuple[Path, list[str]]:
    """An inbox (tmp_path/inbox) polled every 0.05 s, a file taken as soon as it is seen, and
    the arguments of a `carehub serve` taking it with MLLP listeners ``mllp``, no HTTP
    listener, nothing routed and no worker: (the inbox, the arguments)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    config = tmp_path / "carehub.yaml"
    config.write_text(
        f"listeners:\n  mllp: {mllp}\n  http: {{enabled: false}}\n  files:\n"
        f"    - {{name: inbox, directory: {inbox}, poll_interval: 0.05, settle_seconds: 0}}\n"
        "routes: []\nworker: {enabled: false}\n"
    )
    return inbox, ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]


def test_a_file_the_hub_may_not_read_goes_to_error_and_the_others_go_on(
    tmp_path: Path,
) -> None:
    """`carehub serve` runs without the right to read any file (as a service user would
    lack it): an unreadable file goes to error/ saying why, and the files after it are
    taken."""
    import shlex
    import shutil
    import sys

    from tests.helpers_http import CarehubProcess

    inbox, args = serve_inbox(tmp_path)
    command = None
    if os.geteuid() == 0:  # root reads any file: drop that right for the hub
        capsh = shutil.which("capsh")
        if capsh is None:
            pytest.skip("running as root without capsh (libcap2-bin) to drop file overrides")
        line = "exec " + shlex.join([sys.executable, "-m", "carehub.cli", *args])
        command = [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", line]
    secret = drop(inbox, "locked.hl7", make_adt("LOCKED-1").encode())
    secret.chmod(0)
    with CarehubProcess(args, tmp_path / "logs", "serve", command) as serve:
        serve.wait_ready()
        wait_for(lambda: "locked.hl7" in names(inbox / "error"), "the unreadable file moved")
        drop(inbox, "open.hl7", make_adt("OPEN-1").encode())
        wait_for(lambda: "open.hl7" in names(inbox / "processed"), "the next file taken")
        reason = (inbox / "error" / "locked.hl7.error.txt").read_text()
        assert "cannot read the file: Permission denied" in reason
        assert serve.terminate() == 0
        assert "Traceback" not in serve.stderr
