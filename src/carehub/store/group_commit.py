"""Group commit: every message waiting to be stored goes into the next single transaction.

Connections hand messages to ``submit`` and await the result; one writer thread takes all that
are waiting, commits them together, and only then resolves the callers' futures. So an ACK is
never sent before its commit, yet eight busy connections share one fsync instead of eight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from dataclasses import dataclass

from carehub.store.store import InsertOutcome, MessageStore, NewMessage

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    message: NewMessage
    future: asyncio.Future[InsertOutcome]
    loop: asyncio.AbstractEventLoop


_STOP = object()


class GroupCommitWriter:
    """Single writer thread in front of MessageStore.insert_messages."""

    def __init__(self, store: MessageStore, max_batch: int = 500) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self.batches = 0
        self.rows = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Commit whatever is queued, then end the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    async def submit(self, message: NewMessage) -> InsertOutcome:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InsertOutcome] = loop.create_future()
        self._queue.put(_Pending(message, future, loop))
        return await future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch: list[_Pending] = [first]  # type: ignore[list-item]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)  # type: ignore[arg-type]
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            outcomes: list[InsertOutcome] | BaseException = self.store.insert_messages(
                [p.message for p in batch]
            )
            self.batches += 1
            self.rows += len(batch)
        except Exception as err:  # the callers answer with an error ACK; the hub keeps running
            log.error("store write failed for %d message(s): %s", len(batch), err)
            outcomes = err
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[InsertOutcome], object]]]
        by_loop = {}
        for i, pending in enumerate(batch):
            result = outcomes if isinstance(outcomes, BaseException) else outcomes[i]
            by_loop.setdefault(pending.loop, []).append((pending.future, result))
        for loop, results in by_loop.items():
            # RuntimeError: the loop has closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, results)


def _resolve(results: list[tuple[asyncio.Future[InsertOutcome], object]]) -> None:
    for future, result in results:
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(StoreUnavailable(str(result)))
        else:
            future.set_result(result)  # type: ignore[arg-type]


class StoreUnavailable(RuntimeError):
    """The store refused a write; the message was not stored."""
