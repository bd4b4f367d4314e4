"""Group commit: every message waiting to be stored goes into the next single transaction.

Connections hand messages to ``submit_soon`` with a callback (or await ``submit``); the writer
commits all that are waiting together and only then calls back. So an ACK is never sent before
its commit, yet busy connections share one commit (and one fsync) instead of one each.

Two writers, one contract:

- ``InlineGroupCommit`` commits on the event loop for SQLite with durability=process, once
  the group stops growing from one loop pass to the next (within half a millisecond). A WAL
  commit there is a write into the page cache, and doing it in the loop avoids handing every
  message across threads and the GIL. While a commit blocks the loop, new frames wait in
  socket buffers and join the next, larger group.
- ``ThreadedGroupCommit`` commits on its own thread, one group in flight, for PostgreSQL
  (network round trips) and for durability=power (an fsync per commit): both release the GIL,
  so the loop keeps reading frames while the writer waits, and they form the next group. A
  commit still unanswered after COMMIT_PATIENCE is given up on (see ``_overdue``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from carehub.store.failure_run import FailureRun
from carehub.store.store import GateBusy, InsertOutcome, MessageStore, NewMessage, StoreBusy

log = logging.getLogger(__name__)

MAX_BATCH = 500
LOCK_RETRY = 0.0005  # seconds between tries while another process holds SQLite's lock
GATE_FALLBACK = 0.05  # a safety net only: the write gate wakes intake when it is let go
GATHER_SECONDS = 0.0005  # how long a forming group may wait for more (see _still_forming)
LOCK_PATIENCE = 30.0  # then the waiting messages are answered "not stored"
#: Seconds a commit on the writer thread may go unanswered: then the messages waiting on it,
#: and those behind them, are answered "not stored, please resend" (see ThreadedGroupCommit).
#: Longer than a busy commit ever takes, and than SQLite's lock wait in a serving hub.
COMMIT_PATIENCE = 15.0
#: Why a message was not stored while SQLite's write lock was held by another writer.
LOCK_HELD = "the store's write lock is held by another writer"
#: Free bytes a SQLite store's filesystem needs before a run of writes refused for lack of
#: room ends: twice the largest message a listener takes, with the default limit of 1 MiB
#: (the hub gives the writer its own listeners' figure: Hub.start).
ROOM_FOR_MESSAGES = 2 * 1024 * 1024
#: errno values that say a write found no room (ENOSPC), or a quota or file size limit.
_NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def for_lack_of_room(err: BaseException) -> bool:
    """Whether ``err`` (or what it wraps) says the write found no room: SQLite's "database
    or disk is full", or an OSError for a full disk, a quota or a file size limit."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sqlite3.Error):
            if getattr(current, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL:
                return True
        elif isinstance(current, OSError) and current.errno in _NO_ROOM_ERRNOS:
            return True
        wrapped = getattr(current, "orig", None)  # SQLAlchemy's DBAPIError
        current = wrapped if isinstance(wrapped, BaseException) else current.__cause__
    return False


class StoreUnavailable(RuntimeError):
    """The store refused a write; the message was not stored."""


class GroupCommit:
    """What intake needs of a writer; ``batches`` and ``rows`` feed the metrics."""

    def __init__(
        self, store: MessageStore, max_batch: int = MAX_BATCH, room: int = ROOM_FOR_MESSAGES
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        #: Free bytes a SQLite store's filesystem needs for a run of writes refused for lack
        #: of room to end (see short_of_room).
        self.room = room
        self.batches = 0
        self.rows = 0
        #: A full disk or a lost database fails every commit: logged as one run, not per commit.
        self.failures = FailureRun(
            "store write",
            "answering 'not stored, please resend' until it works",
            "message(s)",
            logger=log,
        )
        #: Whether a write of the run now failing found no room (a full disk).
        self._no_room = False

    @property
    def failing(self) -> bool:
        """Whether intake's writes are failing now (a write lock held past LOCK_PATIENCE, a
        full disk, a commit unanswered past COMMIT_PATIENCE). A run of failures ends with the
        next write that works; with no message to store, ``writable`` tries one of its own.
        A run that met a full disk also needs the room for messages back (short_of_room):
        a full disk still takes a write that fits in the WAL file's pages."""
        return self.failures.failing_since is not None

    def short_of_room(self) -> str | None:
        """While a run of failures that met a full disk lasts: why a message still may not
        fit (the store's filesystem has less than ``room`` bytes free), else None."""
        if not self._no_room or not self.failing:
            return None
        return self.store.short_of_room(self.room)

    @property
    def stuck(self) -> bool:
        """Whether a commit given up on has still not come back (ThreadedGroupCommit)."""
        return False

    def writable(self) -> bool:
        """False while intake's writes fail; while they do, a test write decides, so /health
        stops saying "not storing" once the lock is let go or space is freed, before the
        next message comes (a balancer that took the hub out sends none). While a commit
        given up on has not come back, the store has not answered it: no test write then.
        After a full disk, the store's filesystem must also have ``room`` free: the test
        write commits on a full disk (see MessageStore.can_write)."""
        if not self.failing:
            return True
        if self.stuck or self.short_of_room() is not None or not self.store.can_write():
            return False
        self._run_ended()
        return True

    def _run_ended(self) -> None:
        self.failures.succeeded()
        self._no_room = False

    def start(self) -> None:
        """Begin taking submissions."""

    async def close(self) -> None:
        """Commit whatever is waiting, then stop."""

    def submit_soon(self, message: NewMessage, done: Committed) -> None:
        """Queue a message for the next commit; ``done`` is called on the event loop with its
        outcome, or with StoreUnavailable when it was not stored. The MLLP listener answers
        frames this way, without a task or future per frame."""
        raise NotImplementedError

    async def submit(self, message: NewMessage) -> InsertOutcome:
        """``submit_soon``, awaited: raises StoreUnavailable when the message was not stored."""
        future: asyncio.Future[InsertOutcome | StoreUnavailable] = (
            asyncio.get_running_loop().create_future()
        )
        self.submit_soon(message, future.set_result)
        outcome = await future
        if isinstance(outcome, StoreUnavailable):
            raise outcome
        return outcome

    def _write(self, messages: list[NewMessage], busy_ok: bool = False) -> Outcomes:
        try:
            outcomes = self.store.insert_messages(messages)
        except Exception as err:  # the callers answer with an error ACK; the hub keeps running
            if busy_ok and isinstance(err, StoreBusy):
                raise
            return self._refused(err, messages)
        return self._stored(messages, outcomes)

    def _stored(
        self, messages: list[NewMessage], outcomes: list[InsertOutcome]
    ) -> list[InsertOutcome]:
        # A write that found room in the WAL file's pages does not end a full disk's run:
        # the next message, or the worker's next write, is refused again.
        if self.failing and self.short_of_room() is None:
            self._run_ended()
        self.batches += 1
        self.rows += len(messages)
        return outcomes

    def _refused(self, err: Exception, messages: list[NewMessage]) -> Outcomes:
        """The answers to a group whose commit failed: "not stored", except that on a full
        SQLite disk a resend of a message the store holds is answered as one (AA): only its
        "resent" history row could not be written. Read on a SQLite store only: a read there
        does not wait on a server that may be gone."""
        known: list[int | None] = []
        if for_lack_of_room(err) and self.store.is_sqlite:
            try:
                known = self.store.stored_already(messages)
            except Exception as lookup:  # then all are "not stored", as before
                log.debug("resends could not be looked up: %s", lookup)
        if not any(known):
            return self._not_stored(err, messages)
        unknown = [m for m, was in zip(messages, known, strict=True) if was is None]
        refused = self._not_stored(err, unknown)
        return [
            refused if original is None else InsertOutcome(original, True) for original in known
        ]

    def _not_stored(self, err: Exception, messages: list[NewMessage]) -> StoreUnavailable:
        """Why these messages were not stored, for their answers; every such failure goes
        through ``failures``, which logs the run once when it starts, every 30 s while it
        lasts and when it ends (a lock held for minutes must not be silent)."""
        if isinstance(err, StoreBusy):
            err = StoreUnavailable(LOCK_HELD)
        if for_lack_of_room(err):
            self._no_room = True
        self.failures.failed(err, len(messages))
        return err if isinstance(err, StoreUnavailable) else StoreUnavailable(str(err))

    def _lock_held_too_long(self, messages: list[NewMessage]) -> StoreUnavailable:
        reason = f"write lock held for over {LOCK_PATIENCE:g} s"
        return self._not_stored(StoreUnavailable(reason), messages)


#: Called with a submitted message's outcome, or with why it was not stored.
Committed = Callable[[InsertOutcome | StoreUnavailable], None]
#: A group's answers: one for all ("not stored"), or one for each message.
Outcomes = list[InsertOutcome] | list[InsertOutcome | StoreUnavailable] | StoreUnavailable


def _settle(callbacks: list[Committed], outcome: Outcomes) -> None:
    for i, done in enumerate(callbacks):
        try:
            done(outcome if isinstance(outcome, StoreUnavailable) else outcome[i])
        except asyncio.InvalidStateError:
            pass  # its awaiting caller was cancelled meanwhile
        except Exception:  # one caller's bug must not cost the others their answers
            log.exception("a store commit callback failed")


def group_commit_for(store: MessageStore, room: int = ROOM_FOR_MESSAGES) -> GroupCommit:
    """Inline for SQLite without fsync; a thread wherever a commit waits on the disk (fsync
    with durability=power) or the network (PostgreSQL), since both release the GIL and the
    loop keeps answering other connections meanwhile. Measured with `make bench`, eight
    connections: process 8.2k msg/s inline vs 6.9k threaded; power 3.1k vs 4.1k. ``room``:
    see GroupCommit.room."""
    if store.is_sqlite and store.durability == "process":
        return InlineGroupCommit(store, room=room)
    return ThreadedGroupCommit(store, room=room)


class InlineGroupCommit(GroupCommit):
    """Commits on the event loop once the waiting group stops growing (see _still_forming).

    When another writer (the in-process worker) holds SQLite's write lock, the commit does
    not wait inside SQLite, which would freeze every connection: it gives the loop back, and
    the write gate calls it back the moment that writer lets go, with whatever else arrived
    meanwhile. A writer in another process (a CLI command) is polled for instead."""

    def __init__(
        self, store: MessageStore, max_batch: int = MAX_BATCH, room: int = ROOM_FOR_MESSAGES
    ) -> None:
        super().__init__(store, max_batch, room)
        store.intake_waits_for_lock = False
        store.intake_gate_free = self._gate_free
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[NewMessage, Committed]] = []
        self._scheduled = False
        self._busy_since: float | None = None
        self._fallback: asyncio.TimerHandle | None = None
        #: When the group now forming was first due, and how many it held at the last look.
        self._forming_since: float | None = None
        self._forming_size = 0

    def submit_soon(self, message: NewMessage, done: Committed) -> None:
        self._pending.append((message, done))
        if not self._scheduled:
            loop = self._loop = asyncio.get_running_loop()
            self._scheduled = True
            loop.call_soon(self._flush)

    def _gate_free(self) -> None:
        """Called on the thread that let the write gate go."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        if self._fallback is not None:
            self._fallback.cancel()
            self._fallback = None
        batch = self._pending[: self.max_batch]
        if not batch:  # close() got there first
            self._scheduled = False
            return
        if self._still_forming(loop, len(batch)):
            loop.call_soon(self._flush)
            return
        messages = [m for m, _ in batch]
        try:
            outcome = self._write(messages, busy_ok=True)
        except StoreBusy as busy:
            if self._busy_since is None:
                self._busy_since = loop.time()
            if loop.time() - self._busy_since < LOCK_PATIENCE:
                # The batch stays pending. The gate calls _gate_free when it is let go; the
                # timer is for SQLite's own lock, held by another process, which calls no one.
                delay = GATE_FALLBACK if isinstance(busy, GateBusy) else LOCK_RETRY
                self._fallback = loop.call_later(delay, self._flush)
                return
            outcome = self._lock_held_too_long(messages)
        self._busy_since = None
        self._pending = self._pending[len(batch) :]
        if self._pending:
            loop.call_soon(self._flush)  # let the loop breathe between groups
        else:
            self._scheduled = False
        _settle([done for _, done in batch], outcome)

    def _still_forming(self, loop: asyncio.AbstractEventLoop, size: int) -> bool:
        """Whether to give the group one more loop pass to grow before committing it.

        Frames from busy connections arrive a few at a time, so the group due at the end of a
        loop pass held 2.4 messages on average (eight connections, `make bench-intake`), and a
        commit's fixed cost was paid for each few. One more pass is taken while the last one
        brought new messages, for at most GATHER_SECONDS: 9,595 against 12,363 msg/s (0.18 and
        0.27 of the bare server, same machine and hour), 6.2 messages a commit."""
        now = loop.time()
        if self._forming_since is None:
            self._forming_since, self._forming_size = now, size
            return size < self.max_batch
        growing = self._forming_size < size < self.max_batch
        if growing and now - self._forming_since < GATHER_SECONDS:
            self._forming_size = size
            return True
        self._forming_since = None
        return False

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_PATIENCE
        while self._pending:
            batch = self._pending[: self.max_batch]
            messages = [m for m, _ in batch]
            try:
                outcome = self._write(messages, busy_ok=True)
            except StoreBusy:
                if loop.time() < deadline:
                    await asyncio.sleep(LOCK_RETRY)
                    continue
                outcome = self._lock_held_too_long(messages)
            self._pending = self._pending[len(batch) :]
            _settle([done for _, done in batch], outcome)
        self._scheduled = False


@dataclass(slots=True, eq=False)
class _Flight:
    """A group handed to the writer thread, until its commit comes back."""

    group: list[tuple[NewMessage, Committed]]
    commit: concurrent.futures.Future[list[InsertOutcome] | Exception]
    #: Answered "not stored" once it was overdue (ThreadedGroupCommit._overdue).
    given_up: bool = False
    deadline: asyncio.TimerHandle | None = field(default=None, repr=False)


class ThreadedGroupCommit(GroupCommit):
    """Commits on a writer thread, one group in flight at a time.

    While the thread commits a group, the loop keeps reading frames; everything that arrives
    meanwhile becomes the next group, handed over whole (one hand-off and one wake-up per
    commit, not per message). Measured with `make bench`, power durability: 0.14 of the bare
    server's rate, against 0.097 when each message was queued to the thread on its own.

    A commit unanswered after COMMIT_PATIENCE (a database server or network gone silent) is
    given up on: its messages, and those waiting behind it, are answered "not stored, please
    resend", and so is every message that comes until it is back. Should it have committed
    after all, each resend is recognised as one and answered AA."""

    def __init__(
        self, store: MessageStore, max_batch: int = MAX_BATCH, room: int = ROOM_FOR_MESSAGES
    ) -> None:
        super().__init__(store, max_batch, room)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._waiting: list[tuple[NewMessage, Committed]] = []
        self._flight: _Flight | None = None
        self._dispatch_scheduled = False

    @property
    def stuck(self) -> bool:
        return self._flight is not None and self._flight.given_up

    def start(self) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="store-writer"
            )

    async def close(self) -> None:
        """Commit what is waiting; with a commit given up on and not back, answer it "not
        stored" instead, and stop without waiting for the writer thread."""
        while self._waiting or self._flight is not None:
            if self.stuck:
                self._answer_now(self._take_waiting())
                break
            if self._flight is None:
                self._dispatch()
            await asyncio.sleep(0.001)
        if self._executor is not None:
            self._executor.shutdown(wait=not self.stuck)
            self._executor = None

    def submit_soon(self, message: NewMessage, done: Committed) -> None:
        if self.stuck:
            self._answer_now([(message, done)])
            return
        self._waiting.append((message, done))
        if self._flight is None and not self._dispatch_scheduled:
            # At the end of this loop iteration, so frames read in it share the commit.
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Hand the waiting messages to the writer thread as one group."""
        self._dispatch_scheduled = False
        if self._flight is not None or not self._waiting:
            return
        self.start()
        assert self._executor is not None
        group = self._waiting[: self.max_batch]
        del self._waiting[: len(group)]
        messages = [message for message, _ in group]
        flight = self._flight = _Flight(group, self._executor.submit(self._insert, messages))
        loop = asyncio.get_running_loop()
        flight.deadline = loop.call_later(COMMIT_PATIENCE, self._overdue, flight)
        asyncio.wrap_future(flight.commit).add_done_callback(
            functools.partial(self._committed, flight)
        )

    def _insert(self, messages: list[NewMessage]) -> list[InsertOutcome] | Exception:
        """On the writer thread: the outcome is counted and answered on the loop."""
        try:
            return self.store.insert_messages(messages)
        except Exception as err:
            return err

    def _committed(
        self,
        flight: _Flight,
        done: asyncio.Future[list[InsertOutcome] | Exception],
    ) -> None:
        self._flight = None
        if flight.deadline is not None:
            flight.deadline.cancel()
        messages = [message for message, _ in flight.group]
        callbacks = [done for _, done in flight.group]
        result = StoreUnavailable("the writer stopped") if done.cancelled() else done.result()
        if isinstance(result, Exception):
            if not flight.given_up:  # else answered and counted when it was given up on
                _settle(callbacks, self._refused(result, messages))
        else:
            outcome = self._stored(messages, result)  # committed, even if given up on
            if not flight.given_up:
                _settle(callbacks, outcome)
        if self._waiting:
            self._dispatch()

    def _overdue(self, flight: _Flight) -> None:
        """The commit in flight has had no answer for COMMIT_PATIENCE: answer its messages
        and those waiting behind it "not stored", and hang up on the database server, so
        that the writer thread (and whatever else waits on the server) fails now and the
        next commit connects anew."""
        if self._flight is not flight or flight.commit.done():
            return  # back meanwhile: its outcome is on its way to _committed
        flight.given_up = True
        self._answer_now(flight.group + self._take_waiting())
        if not self.store.is_sqlite:
            self.store.hang_up()

    def _take_waiting(self) -> list[tuple[NewMessage, Committed]]:
        waiting, self._waiting = self._waiting, []
        return waiting

    def _answer_now(self, group: list[tuple[NewMessage, Committed]]) -> None:
        """Answer ``group`` "not stored" while a commit has no answer (on the next loop
        pass: a caller of submit_soon is not called back from inside it)."""
        if not group:
            return
        reason = StoreUnavailable(f"the store has not answered a commit for {COMMIT_PATIENCE:g} s")
        outcome = self._not_stored(reason, [message for message, _ in group])
        asyncio.get_running_loop().call_soon(_settle, [done for _, done in group], outcome)
