"""File drop intake: a watched directory where each file holds one message or a batch.

A file is taken once it has stopped changing (size and mtime unchanged for settle_seconds), so
a sender still writing it is never read half-way. Its messages are stored like MLLP messages;
then the file moves to processed/, or to error/ with ``<name>.error.txt`` beside it saying, per
message, why. Dropping a corrected file again is safe: resends are recognised by MSH-10.
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
from carehub.hl7.batch import split_messages
from carehub.intake.intake import Arrival, Intake, IntakeResult

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = (".tmp", ".part", ".filepart", ".swp", ".error.txt")


class FileDropListener:
    def __init__(self, config: FileDropConfig, intake: Intake) -> None:
        self.config = config
        self.intake = intake
        self.name = config.name
        self.directory = config.directory
        self.processed_dir = config.processed_dir or config.directory / "processed"
        self.error_dir = config.error_dir or config.directory / "error"
        self._seen: dict[str, tuple[int, int, float]] = {}
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
                if not entry.is_file() or entry.name.startswith("."):
                    continue
                if entry.name.endswith(_IGNORED_SUFFIXES):
                    continue
                stat = entry.stat()
                signature = (stat.st_size, stat.st_mtime_ns)
                first_seen = self._seen.get(entry.name, (*signature, now))
                if first_seen[:2] != signature:
                    first_seen = (*signature, now)
                current[entry.name] = first_seen
                settled = now - max(first_seen[2], stat.st_mtime) >= self.config.settle_seconds
                if settled:
                    ready.append(Path(entry.path))
        self._seen = current
        return sorted(ready, key=lambda p: (p.stat().st_mtime_ns, p.name))

    async def scan_once(self) -> int:
        """Take every settled file once; returns how many files were handled."""
        files = self._ready_files()
        for path in files:
            if self._stopping.is_set():
                break
            await self.take_file(path)
            self._seen.pop(path.name, None)
        return len(files)

    async def take_file(self, path: Path) -> list[IntakeResult]:
        data = await asyncio.to_thread(path.read_bytes)
        arrival = Arrival("file", self.name, path.name, self.config.default_charset)
        parts = split_messages(data)
        if not parts:
            result = await self.intake.receive(data[:4096], arrival)
            self._move(
                path, self.error_dir, [f"{path.name}: no HL7 message (no MSH segment) in the file"]
            )
            self.files_failed += 1
            return [result]
        results = await asyncio.gather(*(self._receive(p, arrival) for p in parts))
        problems = []
        for number, result in enumerate(results, start=1):
            if result.code is not AckCode.ACCEPT:
                code, control_id, text = read_ack(result.ack.decode("utf-8", "replace"))
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
            "file drop %s: took a file with %d message(s), %d refused",
            self.name,
            len(parts),
            len(problems),
        )
        return list(results)

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
