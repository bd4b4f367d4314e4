"""File drop intake: a watched directory where each file holds one message or a batch.

A file is taken once it has stopped changing (size and mtime unchanged for settle_seconds), so
a sender still writing it is never read half-way. Its messages are stored like MLLP messages,
each as the exact bytes the file holds for it (its own slice of a batch, terminators as
written); then the file moves to processed/, or to error/ with ``<name>.error.txt`` beside it
saying, per message, why. Dropping a corrected file again is safe: a message already stored
(same sender, MSH-10 and content) is recognised as a resend and not stored twice.

Nothing in a file is dropped silently. Text outside every message that is not blank and not a
batch wrapper segment (FHS, BHS, BTS, FTS) - say a cover note before the first MSH, or lines
that are not segments after a message's last segment (hl7.batch.split_data) - is treated
like an MLLP frame with no MSH: stored as a rejected row (AR) so an operator can see it, and
named in the error file, which sends the file to error/. The file's messages are still stored
(a file with a bad message is handled the same way), so the sender's fix is to drop the file
again without the stray text.

One file that cannot be taken never holds up the others: a file the hub may not read goes to
error/ with the reason; one it cannot move (processed/ not writable) is left where it is, with
one WARNING, and skipped until it changes, while newer files go on. A folder dropped into the
inbox is named once in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from carehub.config import FileDropConfig
from carehub.hl7.ack import AckCode, read_ack
from carehub.hl7.batch import MessageSlice, Stray, split_data
from carehub.hl7.charsets import decode_message
from carehub.hl7.framing import HEAD_BYTES
from carehub.intake.intake import Arrival, Intake, IntakeResult

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = (".tmp", ".part", ".filepart", ".swp", ".error.txt")
#: Seconds before a file that could not be taken is tried again (sooner if it changes).
STUCK_RETRY = 60.0


class FileDropListener:
    def __init__(self, config: FileDropConfig, intake: Intake) -> None:
        self.config = config
        self.intake = intake
        self.name = config.name
        self.directory = config.directory
        self.processed_dir = config.processed_dir or config.directory / "processed"
        self.error_dir = config.error_dir or config.directory / "error"
        self._seen: dict[str, tuple[int, int, float]] = {}
        #: Files that could not be taken, by name: the (size, mtime) they had then and when to
        #: try again. Skipped till then (or till they change), so one file cannot stall the
        #: inbox or write a traceback every poll; an operator's fix is found within a minute.
        self._stuck: dict[str, tuple[tuple[int, int], float]] = {}
        self._folders_named: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.files_processed = 0
        self.files_failed = 0

    async def start(self) -> Path:
        for folder in (self.directory, self.processed_dir, self.error_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._poll())
        return self.directory

    async def stop(self) -> None:
        self._stopping.set()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.scan_once()
            except Exception:  # a bad file or folder must not end the watcher
                log.exception("file drop %s: scan failed", self.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.poll_interval)

    def _ready_files(self) -> list[Path]:
        ready: list[Path] = []
        now = time.time()
        current: dict[str, tuple[int, int, float]] = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name.endswith(_IGNORED_SUFFIXES):
                    continue
                if not entry.is_file():
                    self._name_folder(entry)
                    continue
                stat = entry.stat()
                signature = (stat.st_size, stat.st_mtime_ns)
                stuck = self._stuck.get(entry.name)
                if stuck is not None and stuck[0] == signature and now < stuck[1]:
                    current[entry.name] = (*signature, now)
                    continue
                first_seen = self._seen.get(entry.name, (*signature, now))
                if first_seen[:2] != signature:
                    first_seen = (*signature, now)
                current[entry.name] = first_seen
                settled = now - max(first_seen[2], stat.st_mtime) >= self.config.settle_seconds
                if settled:
                    ready.append(Path(entry.path))
        self._seen = current
        self._stuck = {name: stuck for name, stuck in self._stuck.items() if name in current}
        return sorted(ready, key=_arrival_order)

    def _name_folder(self, entry: os.DirEntry[str]) -> None:
        """Say once that a folder in the inbox is not taken (its own processed/ and error/
        aside), so a sender that drops one is not left wondering."""
        own = Path(entry.path) in (self.processed_dir, self.error_dir)
        if own or not entry.is_dir() or entry.name in self._folders_named:
            return
        self._folders_named.add(entry.name)
        log.warning(
            "file drop %s: %s is a folder; only files dropped into %s are taken",
            self.name,
            entry.name,
            self.directory,
        )

    async def scan_once(self) -> int:
        """Take every settled file once; returns how many files were handled."""
        files = self._ready_files()
        for path in files:
            if self._stopping.is_set():
                break
            try:
                await self.take_file(path)
            except FileNotFoundError:
                pass  # taken away meanwhile (by the sender, or another hub on the folder)
            except OSError as err:
                self._set_aside(path, err)
            self._seen.pop(path.name, None)
        return len(files)

    def _set_aside(self, path: Path, err: OSError) -> None:
        """Skip a file that cannot be taken for STUCK_RETRY seconds (or until it changes),
        saying so once for as long as the same file keeps failing."""
        try:
            stat = path.stat()
        except OSError:
            return
        signature = (stat.st_size, stat.st_mtime_ns)
        known = self._stuck.get(path.name)
        self._stuck[path.name] = (signature, time.time() + STUCK_RETRY)
        if known is not None and known[0] == signature:
            return
        log.warning(
            "file drop %s: cannot take %s (%s); it stays in %s and is tried again every %g s, "
            "and the other files go on",
            self.name,
            path.name,
            err.strerror or type(err).__name__,
            self.directory,
            STUCK_RETRY,
        )

    async def take_file(self, path: Path) -> list[IntakeResult]:
        arrival = Arrival("file", self.name, path.name, self.config.default_charset)
        size = path.stat().st_size
        if size > self.config.max_file_bytes:
            return [await self._refuse_large_file(path, size, arrival)]
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except (PermissionError, IsADirectoryError) as err:
            reason = f"{path.name}: cannot read the file: {err.strerror}; nothing was stored"
            self._move(path, self.error_dir, [reason])  # an OSError here: set aside instead
            self.files_failed += 1
            log.warning("file drop %s: %s, moved to %s", self.name, reason, self.error_dir)
            return []
        contents = split_data(data)
        parts = contents.messages
        if not parts:
            result = await self.intake.receive(data[:HEAD_BYTES], arrival)
            self._move(
                path, self.error_dir, [f"{path.name}: no HL7 message (no MSH segment) in the file"]
            )
            self.files_failed += 1
            return [result]
        # In file order, so the stored rows follow the file as a reader of it would.
        items: list[MessageSlice | Stray] = sorted([*parts, *contents.stray], key=_offset)
        results = await asyncio.gather(
            *(
                self._receive(item.data, arrival)
                if isinstance(item, MessageSlice)
                else self._reject_stray(item, arrival)
                for item in items
            )
        )
        problems = []
        number = 0
        for item, result in zip(items, results, strict=True):
            if isinstance(item, Stray):
                problems.append(_stray_problem(item, number, len(parts), result))
                continue
            number += 1
            if result.code is not AckCode.ACCEPT:
                # The ACK is in the message's own character set, UTF-16 included.
                code, control_id, text = read_ack(decode_message(result.ack).text)
                problems.append(
                    f"message {number} of {len(parts)} (MSH-10 {control_id or 'empty'}): "
                    f"{code}: {text or result.reason}"
                )
        if problems:
            self.files_failed += 1
            self._move(path, self.error_dir, problems)
        else:
            self.files_processed += 1
            self._move(path, self.processed_dir, None)
        log.info(
            "file drop %s: took a file with %d message(s), %d refused, %d stray text(s)",
            self.name,
            len(parts),
            len(problems) - len(contents.stray),
            len(contents.stray),
        )
        return list(results)

    async def _refuse_large_file(self, path: Path, size: int, arrival: Arrival) -> IntakeResult:
        """A file over max_file_bytes is not read whole (that could exhaust memory): its head
        is stored as a rejected row, and the file goes to error/ with the reason."""
        limit = self.config.max_file_bytes
        reason = f"file of {size} bytes exceeds this file drop's limit of {limit} bytes"
        with path.open("rb") as file:
            head = await asyncio.to_thread(file.read, HEAD_BYTES)
        result = await self.intake.reject_unreadable_frame(head, size, arrival, reason)
        self._move(path, self.error_dir, [f"{path.name}: {reason} (max_file_bytes)"])
        self.files_failed += 1
        return result

    async def _reject_stray(self, stray: Stray, arrival: Arrival) -> IntakeResult:
        """Store text found outside the file's messages as a rejected row (AR), as the MLLP
        listener stores a frame without MSH, so it is on record rather than lost."""
        reason = (
            f"text outside any HL7 message at byte {stray.offset} of the file "
            "(not blank and not a batch header or trailer segment)"
        )
        return await self.intake.reject_unreadable_frame(
            stray.data[:HEAD_BYTES], len(stray.data), arrival, reason
        )

    async def _receive(self, payload: bytes, arrival: Arrival) -> IntakeResult:
        if len(payload) > self.config.max_message_bytes:
            reason = (
                f"message of {len(payload)} bytes exceeds this listener's limit of "
                f"{self.config.max_message_bytes} bytes"
            )
            return await self.intake.reject_unreadable_frame(
                payload[:4096], len(payload), arrival, reason
            )
        return await self.intake.receive(payload, arrival)

    @staticmethod
    def _move(path: Path, folder: Path, problems: list[str] | None) -> Path:
        target = folder / path.name
        if target.exists():
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
            target = folder / f"{path.stem}.{stamp}{path.suffix}"
        os.replace(path, target)
        if problems is not None:
            reason_file = target.with_name(target.name + ".error.txt")
            reason_file.write_text("\n".join(problems) + "\n", encoding="utf-8")
        return target


def _arrival_order(path: Path) -> tuple[int, str]:
    """Oldest first; a file gone meanwhile sorts first and is found gone when taken."""
    try:
        return path.stat().st_mtime_ns, path.name
    except OSError:
        return 0, path.name


def _offset(item: MessageSlice | Stray) -> int:
    return item.offset


def _stray_problem(stray: Stray, before: int, messages: int, result: IntakeResult) -> str:
    """One line of the error file for stray text: where it is, how it starts, its AR."""
    where = f"after message {before}" if before else "before message 1"
    if before == messages:
        where = "after the last message"
    excerpt = " ".join(stray.text.split())
    if len(excerpt) > 60:
        excerpt = excerpt[:57] + "..."
    stored = f"stored as message {result.message_id}" if result.message_id else "not stored"
    return (
        f"{len(stray.data)} bytes at byte {stray.offset} ({where}) are not HL7 and not a "
        f"batch header or trailer: {excerpt!r}; {result.code.value}, {stored}"
    )
