"""File drop intake: a watched directory where each file holds one message or a batch.

A file is taken once it has stopped changing (size and mtime unchanged for settle_seconds).
That alone cannot tell a finished file from one whose sender paused while writing it, so:

- A sender should write each file under a name the watcher skips and rename it into place
  when it is whole (the rename is atomic). Skipped names: those starting with a dot, and those
  ending in .tmp, .part, .filepart (WinSCP), .swp or .error.txt, in any case.
- An FHS/BHS batch must show it is whole: every header closed by its trailer (BHS by BTS, FHS
  by FTS), and the counts BTS-1 (messages in the batch) and FTS-1 (batches in the file), when
  given, matching what it holds (hl7.batch). A batch that does not is not taken: it stays in
  the inbox while it may still be being written - until it has been unchanged for
  INCOMPLETE_BATCH_SETTLES times settle_seconds - and is looked at again whenever it changes;
  then it goes to error/ with the reason, nothing of it stored or routed.
- A file with no batch wrappers has nothing to show it is whole: the settle rule is all there
  is, hence the rename.

Taken messages are stored like MLLP messages, each as the exact bytes the file holds for it
(its own slice of a batch, terminators as written); then the file moves to processed/, or to
error/ with ``<name>.error.txt`` beside it saying, per message, why. The file moved is what
was read: one that changed while it was being taken goes to error/ saying so. Dropping a
corrected file again is safe: a message already stored (same sender, MSH-10 and content) is
recognised as a resend and not stored twice.

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
inbox is named once in the log. An inbox that cannot be read at all (the process out of file
descriptors, the folder gone or not readable) is one WARNING a minute, without a traceback,
saying how many scans failed meanwhile, and one INFO once a scan works again.

Only regular files are read. A symbolic link is never followed - whoever may write the inbox
could otherwise have the hub store any file it can read, its TLS key say - nor is a named pipe,
device or socket opened: each goes to error/ as it is (the link itself, not what it points
to) with the reason. The file is opened without following a link and checked to be the
regular file found, so one swapped for a link in between is refused too. A hard link cannot
be told from the file it names, and is read like any file.

A file is read and split on a worker thread, a piece at a time (hl7.batch.split_stream), and
its messages are handed to the store a group at a time (intake.receive_in_groups), so a
nightly batch of hundreds of megabytes does not hold up the answers to other senders meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import io
import logging
import os
import resource
import stat as file_mode
import tempfile
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from carehub.config import FileDropConfig
from carehub.hl7.ack import AckCode, read_ack
from carehub.hl7.batch import MessageSlice, SplitData, Stray, split_stream
from carehub.hl7.charsets import decode_message
from carehub.hl7.framing import HEAD_BYTES
from carehub.intake.intake import (
    BATCH_STOPPED,
    Arrival,
    Intake,
    IntakeResult,
    receive_in_groups,
)
from carehub.intake.tls import PeerReports

log = logging.getLogger(__name__)

#: Names a sender writes under before renaming the file into place (compared in lower case);
#: names starting with a dot are skipped too.
SKIPPED_SUFFIXES = (".tmp", ".part", ".filepart", ".swp", ".error.txt")
#: Seconds before a file that could not be taken is tried again (sooner if it changes).
STUCK_RETRY = 60.0
#: How many times settle_seconds a batch that is not whole may stay unchanged in the inbox
#: before it goes to error/. settle_seconds is the pause after which a plain file is taken as
#: finished; a batch missing its trailers says outright that it is not, so its sender gets ten
#: such pauses (5 s for settle_seconds 0.5, 10 s for the default 1 s) - long enough for a
#: writer that stalls between messages, short enough that a cut-off batch is reported within
#: seconds rather than sitting unseen in the inbox.
INCOMPLETE_BATCH_SETTLES = 10
#: How a file is opened: never through a symbolic link (ELOOP instead), and without waiting
#: for a writer should it be a named pipe put there after the scan.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

Signature = tuple[int, int]  # (size, mtime in ns): a file with the same signature is unchanged


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
        self._stuck: dict[str, tuple[Signature, float]] = {}
        #: Batch files that are not whole yet, by name: the signature they had and when they
        #: go to error/ if still unchanged. Skipped till then, or till they change.
        self._held: dict[str, tuple[Signature, float]] = {}
        self._folders_named: set[str] = set()
        #: Failed scans: when to log the next (once a minute), and how many since the last
        #: scan that worked.
        self._scan_reports = PeerReports()
        self._scans_failed = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        #: Seen by the thread reading a file, which gives up when the listener stops.
        self._halt = threading.Event()
        self.files_processed = 0
        self.files_failed = 0

    @property
    def incomplete_batch_wait(self) -> float:
        """Seconds a batch that is not whole may stay unchanged before it goes to error/."""
        return INCOMPLETE_BATCH_SETTLES * self.config.settle_seconds

    async def start(self) -> Path:
        for folder in (self.directory, self.processed_dir, self.error_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._poll())
        return self.directory

    async def stop(self) -> None:
        self._stopping.set()
        self._halt.set()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.scan_once()
            except Exception as err:  # a bad file or folder must not end the watcher
                self._scan_failed(err)
            else:
                self._scan_worked()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.poll_interval)

    def _scan_failed(self, err: Exception) -> None:
        """Log a failed scan at most once a minute: it is tried again every poll_interval,
        and a process out of file descriptors would otherwise write a traceback a second.
        An OSError (the inbox cannot be read) is a WARNING saying why; anything else, a
        fault in carehub, an ERROR with its traceback."""
        self._scans_failed += 1
        times = self._scan_reports.due("scan")
        if not times:
            return
        if not isinstance(err, OSError):
            log.error(
                "file drop %s: scan failed (%d time(s) since the last line); logged at most "
                "once a minute",
                self.name,
                times,
                exc_info=err,
            )
            return
        why = err.strerror or type(err).__name__
        if err.errno in (errno.EMFILE, errno.ENFILE):
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else soft
            why += f" (open-file limit {limit}, ulimit -n)"
        log.warning(
            "file drop %s: cannot read the inbox %s: %s; %d failed scan(s) since the last "
            "line; files wait there until it can be read; logged at most once a minute",
            self.name,
            self.directory,
            why,
            times,
        )

    def _scan_worked(self) -> None:
        if self._scans_failed:
            log.info(
                "file drop %s: the inbox %s is read again, after %d failed scan(s)",
                self.name,
                self.directory,
                self._scans_failed,
            )
            self._scans_failed = 0
            self._scan_reports = PeerReports()  # a later failure is logged at once

    def _ready_files(self) -> list[Path]:
        ready: list[Path] = []
        now = time.time()
        current: dict[str, tuple[int, int, float]] = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name.lower().endswith(SKIPPED_SUFFIXES):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    self._name_folder(entry)
                    continue
                if Path(entry.path) in (self.processed_dir, self.error_dir):
                    continue  # its own folder, made a link to another place by the operator
                # A link, pipe or device is taken too: take_file moves it to error/ unread.
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # taken away since the folder was listed
                signature = _signature(stat)
                first_seen = self._seen.get(entry.name)
                if first_seen is None or first_seen[:2] != signature:
                    first_seen = (*signature, now)
                current[entry.name] = first_seen
                if self._left_for_now(entry.name, signature, now):
                    continue
                if now - _unchanged_since(first_seen[2], stat) >= self.config.settle_seconds:
                    ready.append(Path(entry.path))
        self._seen = current
        self._stuck = {name: stuck for name, stuck in self._stuck.items() if name in current}
        self._held = {name: held for name, held in self._held.items() if name in current}
        return sorted(ready, key=_arrival_order)

    def _left_for_now(self, name: str, signature: Signature, now: float) -> bool:
        """True for a file set aside (it could not be taken) or held (a batch not whole yet)
        whose time has not come, unless it has changed since."""
        for waiting in (self._stuck.get(name), self._held.get(name)):
            if waiting is not None and waiting[0] == signature and now < waiting[1]:
                return True
        return False

    def _name_folder(self, entry: os.DirEntry[str]) -> None:
        """Say once that a folder in the inbox is not taken (its own processed/ and error/
        aside), so a sender that drops one is not left wondering."""
        own = Path(entry.path) in (self.processed_dir, self.error_dir)
        if own or entry.name in self._folders_named:
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
            if path.name not in self._held:  # a held file keeps the time it last changed
                self._seen.pop(path.name, None)
        return len(files)

    def _set_aside(self, path: Path, err: OSError) -> None:
        """Skip a file that cannot be taken for STUCK_RETRY seconds (or until it changes),
        saying so once for as long as the same file keeps failing."""
        try:
            stat = os.lstat(path)
        except OSError:
            return
        signature = _signature(stat)
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

    async def take_file(self, path: Path) -> None:
        """Store the file's messages and move it aside; nothing is taken from a file that
        changes while it is read, or from a batch that is not whole (see the module's
        docstring)."""
        arrival = Arrival(
            "file",
            self.name,
            path.name,
            self.config.default_charset,
            processing_ids=tuple(self.config.processing_ids),
        )
        stat = os.lstat(path)
        signature = _signature(stat)
        seen = self._seen.get(path.name)
        if seen is not None and seen[:2] != signature:
            return  # changed since it was found settled: looked at again once it settles
        what = _not_regular(stat.st_mode)
        if what is not None:
            self._refuse_not_regular(path, what)
            return
        try:
            read = await asyncio.to_thread(self._read, path, stat)
        except _NotRegular as err:
            self._refuse_not_regular(path, err.what)
            return
        except (PermissionError, IsADirectoryError) as err:
            reason = f"{path.name}: cannot read the file: {err.strerror}; nothing was stored"
            self._move(path, self.error_dir, [reason])  # an OSError here: set aside instead
            self.files_failed += 1
            log.warning("file drop %s: %s, moved to %s", self.name, reason, self.error_dir)
            return
        except _Stopped:
            return  # the hub is stopping: the file is taken on the next start
        if read is None or _signature(os.lstat(path)) != signature:
            return  # written to or replaced while being read: looked at again once it settles
        if read.contents is None:
            await self._refuse_large_file(path, read.size, read.head, arrival)
            return
        contents = read.contents
        if contents.batch_problems:
            self._hold_or_refuse_batch(path, stat, contents.batch_problems)
            return
        self._held.pop(path.name, None)
        parts = contents.messages
        if not parts:
            await self.intake.receive(read.head, arrival)
            self._move(
                path, self.error_dir, [f"{path.name}: no HL7 message (no MSH segment) in the file"]
            )
            self.files_failed += 1
            return
        problems = await self._store(contents, arrival)
        refused = len(problems) - len(contents.stray)
        now = os.lstat(path)
        if _signature(now) != signature or not _same_file(now, read.opened):
            # The file moved aside must be the one taken: this one is not, so say so.
            problems.append(
                f"{path.name}: the file changed while it was being taken: the {read.size} "
                f"bytes read then were taken (their {len(parts)} message(s) stored), it now "
                f"holds {now.st_size}. Drop the whole file again once it is written: the "
                "messages already stored are recognised as resends"
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
            refused,
            len(contents.stray),
        )

    def _read(self, path: Path, found: os.stat_result) -> _Read | None:
        """Open the file found by the scan (never through a link) and split it; on a worker
        thread. None when it is no longer the file found, or changed while being read."""
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.EMLINK):  # a link put there after the scan
                raise _NotRegular("a symbolic link") from err
            raise
        with io.FileIO(fd, "rb") as file:
            opened = os.fstat(fd)
            if not _same_file(opened, found):
                return None  # replaced since the scan: looked at again as what it is now
            what = _not_regular(opened.st_mode)
            if what is not None:
                raise _NotRegular(what)
            head = os.pread(fd, HEAD_BYTES, 0)
            if opened.st_size > self.config.max_file_bytes:
                return _Read(None, head, opened.st_size, opened)
            contents = split_stream(_Halting(file, self._halt), limit=self.config.max_message_bytes)
            size = file.tell()
            if size != opened.st_size or _signature(os.fstat(fd)) != _signature(found):
                return None
        return _Read(contents, head, size, opened)

    async def _store(self, contents: SplitData, arrival: Arrival) -> list[str]:
        """Hand the file's messages and stray texts to intake in file order, a group at a time,
        so the stored rows follow the file as a reader of it would; returns the problems for
        the error file, one line each."""
        problems: list[str] = []
        total = len(contents.messages)
        number = 0  # messages so far
        items = heapq.merge(contents.messages, contents.stray, key=_offset)

        def take(intake: Intake, item: MessageSlice | Stray) -> Awaitable[IntakeResult]:
            if isinstance(item, MessageSlice):
                return self._receive(intake, item, arrival)
            return self._reject_stray(intake, item, arrival)

        stopped: list[int] = []  # the numbers of the messages not stored after one was not
        async for group in receive_in_groups(self.intake, items, take):
            for item, result in group:
                if result.reason == BATCH_STOPPED:
                    if isinstance(item, MessageSlice):
                        number += 1
                        stopped.append(number)
                    continue
                if isinstance(item, Stray):
                    problems.append(_stray_problem(item, number, total, result))
                    continue
                number += 1
                if result.code is not AckCode.ACCEPT:
                    # The ACK is in the message's own character set, UTF-16 included.
                    code, control_id, text = read_ack(decode_message(result.ack).text)
                    problems.append(
                        f"message {number} of {total} (MSH-10 {control_id or 'empty'}): "
                        f"{code}: {result.reason or text}"
                    )
        if stopped:
            problems.append(
                f"messages {stopped[0]} to {stopped[-1]} of {total} were not stored, since an "
                "earlier one was not: drop the whole file again once the store takes messages "
                "(the messages already stored are recognised as resends)"
            )
        return problems

    def _refuse_not_regular(self, path: Path, what: str) -> None:
        """Move a link, pipe, device or socket to error/ unread, saying why."""
        reason = (
            f"{path.name}: {what}, not a regular file: not read (links are not followed), "
            "nothing was stored. Drop the file itself"
        )
        self._move(path, self.error_dir, [reason])  # an OSError here: set aside instead
        self.files_failed += 1
        log.warning(
            "file drop %s: %s is %s, not a regular file; not read, moved to %s",
            self.name,
            path.name,
            what,
            self.error_dir,
        )

    def _hold_or_refuse_batch(
        self, path: Path, stat: os.stat_result, problems: tuple[str, ...]
    ) -> None:
        """Leave a batch that is not whole in the inbox while its sender may still be writing
        it; once it has been unchanged for incomplete_batch_wait, move it to error/ with the
        reasons. Either way nothing of it is stored."""
        give_up_at = self._last_change(path.name, stat) + self.incomplete_batch_wait
        if time.time() < give_up_at:
            if path.name not in self._held:
                log.info(
                    "file drop %s: %s is a batch that is not whole yet (%s); it stays in %s "
                    "while it may still be being written, up to %g s unchanged",
                    self.name,
                    path.name,
                    "; ".join(problems),
                    self.directory,
                    self.incomplete_batch_wait,
                )
            self._held[path.name] = (_signature(stat), give_up_at)
            return
        self._held.pop(path.name, None)
        reasons = [f"{path.name}: {problem}" for problem in problems]
        reasons.append(
            f"{path.name}: not taken, nothing of it was stored: a batch must close every header "
            "it opens (BHS with BTS, FHS with FTS) and hold the number of messages and batches "
            f"its trailers give; this one stayed so for {self.incomplete_batch_wait:g} s "
            "unchanged. Drop it again once it is whole"
        )
        self._move(path, self.error_dir, reasons)
        self.files_failed += 1
        log.warning(
            "file drop %s: %s is a batch that is not whole (%s), moved to %s; nothing of it "
            "was stored",
            self.name,
            path.name,
            "; ".join(problems),
            self.error_dir,
        )

    def _last_change(self, name: str, stat: os.stat_result) -> float:
        """When the file last changed, as far as the watcher knows (see _unchanged_since)."""
        seen = self._seen.get(name)
        first_seen = seen[2] if seen is not None and seen[:2] == _signature(stat) else time.time()
        return _unchanged_since(first_seen, stat)

    async def _refuse_large_file(
        self, path: Path, size: int, head: bytes, arrival: Arrival
    ) -> IntakeResult:
        """A file over max_file_bytes is not read whole (that could exhaust memory): its head
        is stored as a rejected row, and the file goes to error/ with the reason."""
        limit = self.config.max_file_bytes
        reason = f"file of {size} bytes exceeds this file drop's limit of {limit} bytes"
        result = await self.intake.reject_unreadable_frame(head, size, arrival, reason)
        self._move(path, self.error_dir, [f"{path.name}: {reason} (max_file_bytes)"])
        self.files_failed += 1
        return result

    async def _reject_stray(self, intake: Intake, stray: Stray, arrival: Arrival) -> IntakeResult:
        """Store text found outside the file's messages as a rejected row (AR), as the MLLP
        listener stores a frame without MSH, so it is on record rather than lost."""
        reason = (
            f"text outside any HL7 message at byte {stray.offset} of the file "
            "(not blank and not a batch header or trailer segment)"
        )
        return await intake.reject_unreadable_frame(
            stray.data[:HEAD_BYTES], stray.length, arrival, reason
        )

    async def _receive(
        self, intake: Intake, message: MessageSlice, arrival: Arrival
    ) -> IntakeResult:
        if message.length > self.config.max_message_bytes:
            reason = (
                f"message of {message.length} bytes exceeds this listener's limit of "
                f"{self.config.max_message_bytes} bytes"
            )
            return await intake.reject_unreadable_frame(
                message.data[:4096], message.length, arrival, reason
            )
        return await intake.receive(message.data, arrival)

    @staticmethod
    def _move(path: Path, folder: Path, problems: list[str] | None) -> Path:
        """Move the file (a link itself, not what it points to) into ``folder``, with
        ``<name>.error.txt`` giving the problems. The reasons are written first, and appear
        whole: whoever finds the file in error/ finds them beside it. Names already in the
        folder are left alone, and nothing is written through a link someone put there."""
        target = folder / path.name
        for _ in range(100):
            reason_file = target.with_name(target.name + ".error.txt")
            taken = os.path.lexists(target)
            if not taken and (problems is None or not os.path.lexists(reason_file)):
                break
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
            target = folder / f"{path.stem}.{stamp}{path.suffix}"
        else:
            raise FileExistsError(errno.EEXIST, "no free name in the folder", str(folder))
        if problems is not None:
            _write_whole(reason_file, "\n".join(problems) + "\n")
        try:
            os.replace(path, target)
        except OSError:
            if problems is not None:
                reason_file.unlink(missing_ok=True)
            raise
        return target


class _Stopped(Exception):
    """The listener is stopping: the file being read is left for the next start."""


class _NotRegular(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


@dataclass(slots=True)
class _Read:
    """A file as read: split (None when over max_file_bytes, so not read), its first bytes,
    its size, and the stat of the file opened."""

    contents: SplitData | None
    head: bytes
    size: int
    opened: os.stat_result


class _Halting:
    """A file whose reading ends (with _Stopped) once the listener stops."""

    def __init__(self, file: io.FileIO, halt: threading.Event) -> None:
        self._file, self._halt = file, halt

    def read(self, size: int = -1) -> bytes:
        if self._halt.is_set():
            raise _Stopped
        return self._file.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


def _not_regular(mode: int) -> str | None:
    """What a file that is not a regular file is, for the log and the error file."""
    if file_mode.S_ISREG(mode):
        return None
    if file_mode.S_ISLNK(mode):
        return "a symbolic link"
    if file_mode.S_ISFIFO(mode):
        return "a named pipe"
    if file_mode.S_ISCHR(mode) or file_mode.S_ISBLK(mode):
        return "a device"
    if file_mode.S_ISSOCK(mode):
        return "a socket"
    if file_mode.S_ISDIR(mode):
        return "a folder"
    return "a special file"


def _same_file(one: os.stat_result, other: os.stat_result) -> bool:
    return (one.st_dev, one.st_ino) == (other.st_dev, other.st_ino)


def _write_whole(path: Path, text: str) -> None:
    """Write the file under a new name of its own (mkstemp: never through a link), then rename
    it into place, so it is never seen half written."""
    fd, temporary = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _signature(stat: os.stat_result) -> Signature:
    return stat.st_size, stat.st_mtime_ns


def _unchanged_since(first_seen: float, stat: os.stat_result) -> float:
    """The file's mtime, or when the watcher first saw it as it is if that is later: a copy
    that keeps its source's old mtime has still only just arrived."""
    return max(first_seen, stat.st_mtime)


def _arrival_order(path: Path) -> tuple[int, str]:
    """Oldest first; a file gone meanwhile sorts first and is found gone when taken."""
    try:
        return os.lstat(path).st_mtime_ns, path.name
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
        f"{stray.length} bytes at byte {stray.offset} ({where}) are not HL7 and not a "
        f"batch header or trailer: {excerpt!r}; {result.code.value}, {stored}"
    )
