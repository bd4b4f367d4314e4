"""One SQLite writer at a time inside the process, and intake goes first.

SQLite lets one connection write at a time and has no queue: a writer that finds the lock taken
sleeps in its busy handler (1, 2, 5, 10 ms ...) or, for intake, gives up and retries. While the
routing worker's transactions came back to back from several threads, intake's fail-fast
commits kept finding the lock taken (two or three retries per commit).

The gate is a process-wide lock taken around every write transaction (for the worker, from its
first INSERT/UPDATE/DELETE to its commit or rollback; for intake, around its group commit), so
writers inside the process queue on a lock that wakes the next one at once instead of sleeping
in SQLite. Intake has priority: while it has a group waiting, other writers hold back before
taking the gate, so intake waits for at most the one transaction already running. Other
processes (a CLI command, a second hub) are still arbitrated by SQLite's own lock.

Measured with bench/bench_routing.py --quick, two runs each: 117-147 msg/s end to end with the
gate, 108-132 without; ACK p99 202-243 ms against 217-299 ms. Most of what intake still waits
for under routing is the GIL, which every SQLite call hands back and must win again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event

#: A worker writer holds back at most this long for a waiting intake group, so a steady feed
#: can never starve routing altogether.
INTAKE_PRIORITY_LIMIT = 0.05  # seconds
_PATIENCE = 30.0  # the same 30 s SQLite's busy timeout gives: then write without the gate

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")
_HELD = "carehub_write_gate_held"


class WriteGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._intake_waiting = 0
        #: Set while no intake group is waiting: a worker writer holding back waits on it.
        self._intake_clear = threading.Event()
        self._intake_clear.set()
        #: Called once when the gate is next let go (intake's event loop asks to be woken).
        self._on_free: Callable[[], None] | None = None
        #: Makes "try the lock, else leave a wake-up call" one step as seen by leave(), so a
        #: release between the two cannot go unnoticed.
        self._mutex = threading.Lock()
        #: The thread intake's fail-fast writes come from (its event loop's).
        self._intake_thread: int | None = None

    @property
    def intake_waiting(self) -> bool:
        return bool(self._intake_waiting)

    # -- intake -----------------------------------------------------------------------------
    def try_enter_intake(self, on_free: Callable[[], None] | None = None) -> bool:
        """Take the gate if it is free; if not, say intake is waiting, arrange for ``on_free``
        to be called when the gate is let go, and return False.

        Intake's event loop cannot block on the lock, and polling it cost a loop wake-up every
        half millisecond while a worker transaction ran; ``on_free`` wakes it once, at the
        moment the gate is free."""
        self._intake_thread = threading.get_ident()
        with self._mutex:
            if self._lock.acquire(blocking=False):
                return True
            self._intake_waiting = 1
            self._intake_clear.clear()
            if on_free is not None:
                self._on_free = on_free
            return False

    def enter_intake(self) -> bool:
        """Wait for the gate (intake's writer thread); False after 30 s without it."""
        self._intake_waiting = 1
        self._intake_clear.clear()
        try:
            return self._lock.acquire(timeout=_PATIENCE)
        finally:
            self._clear_intake()

    def leave_intake(self) -> None:
        self._clear_intake()
        self._release()

    def _clear_intake(self) -> None:
        self._intake_waiting = 0
        self._intake_clear.set()

    # -- everyone else ----------------------------------------------------------------------
    def enter(self) -> bool:
        """Let a waiting intake group go first (up to a limit), then wait for the gate.

        A writer on intake's own thread (the embedded worker shares intake's event loop) does
        not wait: intake cannot run until that writer gives the loop back."""
        if self._intake_waiting and threading.get_ident() != self._intake_thread:
            self._intake_clear.wait(INTAKE_PRIORITY_LIMIT)
        return self._lock.acquire(timeout=_PATIENCE)

    def leave(self) -> None:
        self._release()

    def _release(self) -> None:
        with self._mutex:
            self._lock.release()
            on_free, self._on_free = self._on_free, None
        if on_free is not None:
            on_free()

    def install(self, engine: Engine) -> None:
        """Take the gate at a connection's first write statement, leave it at commit or
        rollback: the span in which SQLite itself holds the write lock."""

        @event.listens_for(engine, "before_cursor_execute")
        def _before_write(conn: Any, _cursor: Any, statement: str, *_args: Any, **_kw: Any) -> None:
            if conn.info.get(_HELD) or not statement.lstrip()[:7].upper().startswith(_WRITES):
                return
            conn.info[_HELD] = self.enter()  # False: 30 s without it; SQLite decides

        def _end(conn: Any) -> None:
            if conn.info.pop(_HELD, False):
                self.leave()

        event.listen(engine, "commit", _end)
        event.listen(engine, "rollback", _end)
