"""Only regular files in the file drop are read: a symbolic link (to a key, another feed's
message, a folder), a named pipe, or a file swapped for a link while it is taken goes to
error/ as it is, unread, and nothing is written through a link either."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carehub.testing import HubThread, make_adt
from tests.test_filedrop import drop, start_hub, wait_for

#: Synthetic key material standing in for the hub's TLS private key.
KEY = b"-----BEGIN PRIVATE KEY-----\nU1lOVEhFVElDLUtFWS1NQVRFUklBTA==\n-----END PRIVATE KEY-----\n"


def entries(folder: Path) -> list[str]:
    """Every name in the folder, links and pipes included (not followed)."""
    return sorted(os.listdir(folder))


def link_reason(name: str, what: str) -> str:
    return (
        f"{name}: {what}, not a regular file: not read (links are not followed), nothing was "
        "stored. Drop the file itself\n"
    )


@pytest.fixture
def hub(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[HubThread]:
    caplog.set_level("INFO", logger="carehub.intake.filedrop")
    with start_hub(tmp_path) as running:
        yield running


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    return tmp_path / "inbox"


def elsewhere(tmp_path: Path, kind: str) -> Path:
    """What a link in the inbox points at: the hub's key, another feed's message, a folder."""
    if kind == "key":
        target = tmp_path / "certs" / "hub-key.pem"
        target.parent.mkdir()
        target.write_bytes(KEY)
    elif kind == "message":
        target = tmp_path / "other-feed" / "admit.hl7"
        target.parent.mkdir()
        target.write_bytes(make_adt("OTHER-FEED-1").encode())
    else:
        target = tmp_path / "exports"
        target.mkdir()
        (target / "inside.hl7").write_bytes(make_adt("INSIDE-1").encode())
    return target


def contents(target: Path) -> dict[Path, bytes]:
    files = [p for p in target.rglob("*") if p.is_file()] if target.is_dir() else [target]
    return {p: p.read_bytes() for p in files}


@pytest.mark.parametrize("kind", ["key", "message", "folder"])
def test_a_symbolic_link_is_moved_to_error_unread(
    hub: HubThread, inbox: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    target = elsewhere(tmp_path, kind)
    before = contents(target)
    os.symlink(target, inbox / "innocent.hl7")
    wait_for(lambda: "innocent.hl7" in entries(inbox / "error"), "the link in error/")
    assert hub.store.count() == 0  # nothing of what it points at was read
    moved = inbox / "error" / "innocent.hl7"
    assert moved.is_symlink() and os.readlink(moved) == str(target)  # the link itself
    reason = (inbox / "error" / "innocent.hl7.error.txt").read_text(encoding="utf-8")
    assert reason == link_reason("innocent.hl7", "a symbolic link")
    assert contents(target) == before
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "innocent.hl7 is a symbolic link, not a regular file; not read" in warning.message
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "PRIVATE KEY" not in logged and str(target) not in logged
    # The inbox goes on.
    drop(inbox, "real.hl7", make_adt("REAL-1").encode())
    wait_for(lambda: "real.hl7" in entries(inbox / "processed"), "real.hl7 taken")
    assert hub.store.control_id_counts() == {"REAL-1": 1}


def test_a_named_pipe_is_moved_to_error_without_waiting_for_a_writer(
    hub: HubThread, inbox: Path
) -> None:
    os.mkfifo(inbox / "feed.hl7")
    wait_for(lambda: "feed.hl7" in entries(inbox / "error"), "the pipe in error/")
    assert (inbox / "error" / "feed.hl7").is_fifo()
    reason = (inbox / "error" / "feed.hl7.error.txt").read_text(encoding="utf-8")
    assert reason == link_reason("feed.hl7", "a named pipe")
    drop(inbox, "real.hl7", make_adt("REAL-2").encode())
    wait_for(lambda: "real.hl7" in entries(inbox / "processed"), "real.hl7 taken")
    assert hub.store.control_id_counts() == {"REAL-2": 1}


def test_a_file_swapped_for_a_link_after_the_scan_is_not_read_through_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan finds a regular file; before the hub reads it, the sender puts a link to the
    key in its place (an atomic rename). The file is opened without following links, so the
    key is not read: the link goes to error/."""
    inbox = tmp_path / "inbox"
    key = elsewhere(tmp_path, "key")
    swapped = threading.Event()
    real_to_thread = asyncio.to_thread

    async def swap_then_read(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        paths = [a for a in (getattr(func, "__self__", None), *args) if isinstance(a, Path)]
        if not swapped.is_set() and any(p.name == "swap.hl7" for p in paths):
            swapped.set()
            os.symlink(key, inbox / ".swap.link")
            os.replace(inbox / ".swap.link", inbox / "swap.hl7")
        return await real_to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", swap_then_read)
    with start_hub(tmp_path) as hub:
        drop(inbox, "swap.hl7", make_adt("SWAP-1").encode())
        wait_for(lambda: "swap.hl7" in entries(inbox / "error"), "swap.hl7 in error/")
        assert swapped.is_set()
        assert hub.store.count() == 0
        assert (inbox / "error" / "swap.hl7").is_symlink()
        reason = (inbox / "error" / "swap.hl7.error.txt").read_text(encoding="utf-8")
        assert reason == link_reason("swap.hl7", "a symbolic link")


def test_the_reasons_are_not_written_through_a_link_left_in_error(
    hub: HubThread, inbox: Path, tmp_path: Path
) -> None:
    """Whoever may write the inbox may write its error/ folder too: a link there named like the
    reasons of a file about to fail must not make the hub overwrite what it points at."""
    victim = tmp_path / "data-of-the-hub.txt"
    victim.write_text("keep me\n")
    os.symlink(victim, inbox / "error" / "bad.hl7.error.txt")
    drop(inbox, "bad.hl7", b"not a message\r")
    wait_for(
        lambda: any(n.startswith("bad.") and n.endswith(".hl7") for n in entries(inbox / "error")),
        "bad.hl7 in error/",
    )
    assert victim.read_text() == "keep me\n"
    assert os.readlink(inbox / "error" / "bad.hl7.error.txt") == str(victim)
    [moved] = [n for n in entries(inbox / "error") if n.endswith(".hl7")]
    assert moved != "bad.hl7"  # a name of its own, the reasons beside it
    reason = (inbox / "error" / f"{moved}.error.txt").read_text(encoding="utf-8")
    assert reason == "bad.hl7: no HL7 message (no MSH segment) in the file\n"


def test_processed_folder_that_is_a_link_made_by_the_operator_is_used_not_moved(
    tmp_path: Path,
) -> None:
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    inbox.mkdir()
    archive.mkdir()
    os.symlink(archive, inbox / "processed")
    with start_hub(tmp_path) as hub:
        drop(inbox, "one.hl7", make_adt("ONE-1").encode())
        wait_for(lambda: "one.hl7" in entries(archive), "one.hl7 in the archive")
        assert (inbox / "processed").is_symlink() and entries(inbox / "error") == []
        assert hub.store.control_id_counts() == {"ONE-1": 1}
