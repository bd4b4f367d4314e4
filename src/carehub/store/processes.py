"""Which carehub processes run on this store: each `carehub serve` and `carehub worker` keeps a
row while it runs (ProcessBeacon), and `carehub status` lists them (running_processes).

In a scale-out deployment an operator otherwise has no one place to see that the worker on the
second host died an hour ago, or that after a route reload one worker still runs the old
routes. The row says where the process runs (host, pid, version), since when, when it last
said it was alive (every HEARTBEAT seconds), a digest of the route files it loaded, so
processes running different route sets stand out, and how many partition queues it uses on
the broker, so that a serve and workers with different queue.partitions (patients queued to
partitions no worker consumes) are warned of. A process that stops removes its row; one that
dies leaves it to go stale (`status` says for how long), pruned after PRUNE_AFTER. A serve that
holds a SQLite store's lock removes at start the rows of the earlier serves of its host on that
store: they cannot be running, or it would not have the lock (see ProcessBeacon). Nothing
tells that of a PostgreSQL store's processes, which many hosts and data dirs share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, insert, inspect, select, update

from carehub import __version__
from carehub.store.failure_run import FailureRun
from carehub.store.schema import hub_processes
from carehub.store.store import MessageStore, _aware, schema_head

log = logging.getLogger(__name__)

#: Seconds between a process's "still here" writes.
HEARTBEAT = 15.0
#: A process not heard from for this long is shown as not answering.
STALE_AFTER = timedelta(seconds=3 * HEARTBEAT)
#: Rows of processes not heard from for this long are removed when another process starts.
PRUNE_AFTER = timedelta(days=7)


@dataclass(slots=True, frozen=True)
class HubProcess:
    """One process's row, as `carehub status` shows it."""

    id: str
    role: str
    host: str
    pid: int
    version: str
    started_at: datetime
    last_seen: datetime
    routes: str | None
    routes_loaded_at: datetime | None
    #: Partition queues it uses on the broker (queue.partitions); None with the in-process
    #: queue, which no other process shares.
    partitions: int | None = None

    def stale(self, now: datetime) -> bool:
        """Not heard from for longer than it takes to say it is alive a few times over."""
        return now - self.last_seen > STALE_AFTER

    def as_json(self, now: datetime) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
            "started_at": self.started_at.isoformat(),
            "last_seen": self.last_seen.isoformat(),
            "answering": not self.stale(now),
            "routes": self.routes,
            "routes_loaded_at": self.routes_loaded_at.isoformat()
            if self.routes_loaded_at
            else None,
            "partitions": self.partitions,
        }

    def label(self) -> str:
        """How a log line or `status` names the process: ``worker on host-b (pid 4312)``."""
        return f"{self.role} on {self.host} (pid {self.pid})"


def running_processes(conn: Any) -> list[HubProcess]:
    """Every process row, serve first, then by host and start."""
    rows = conn.execute(select(hub_processes)).all()
    found = [
        HubProcess(
            id=r.id,
            role=r.role,
            host=r.host,
            pid=r.pid,
            version=r.version,
            started_at=_aware(r.started_at),
            last_seen=_aware(r.last_seen),
            routes=r.routes,
            routes_loaded_at=_aware(r.routes_loaded_at) if r.routes_loaded_at else None,
            partitions=r.partitions,
        )
        for r in rows
    ]
    return sorted(found, key=lambda p: (p.role != "serve", p.host, p.started_at))


def partitions_disagree(processes: list[HubProcess], now: datetime) -> str | None:
    """Which answering processes use which partition count, when they use more than one:
    serve publishes a patient's messages to the queue its own count picks, and a worker
    with a smaller count never consumes the queues above it (their messages wait for the
    sweep). None when they agree."""
    by_count: dict[int, list[HubProcess]] = {}
    for process in processes:
        if process.partitions is not None and not process.stale(now):
            by_count.setdefault(process.partitions, []).append(process)
    if len(by_count) < 2:
        return None
    return "; ".join(
        f"{count} partition(s): {', '.join(p.label() for p in users)}"
        for count, users in sorted(by_count.items())
    )


def older_processes_running(conn: Any, now: datetime | None = None) -> str | None:
    """The answering processes of an earlier carehub release on this store, named (host,
    pid, version, when last heard), or None: a migration made under them would leave them
    working on a schema they do not know. Rows not refreshed within STALE_AFTER do not
    count; those of this release or a later one neither."""
    if not inspect(conn).has_table("hub_processes"):
        return None  # a schema from before the process list (revision 0013)
    now = now or datetime.now(UTC)
    table = hub_processes.c
    # The columns every revision of the list has: the store is at an older one.
    rows = conn.execute(
        select(table.role, table.host, table.pid, table.version, table.last_seen)
        .where(table.last_seen >= now - STALE_AFTER)
        .order_by(table.role, table.host, table.pid)
    ).all()
    older = [row for row in rows if _earlier_release(row.version)]
    if not older:
        return None
    return "; ".join(
        f"{row.role} on {row.host} (pid {row.pid}, carehub {row.version}, last heard "
        f"{max(0.0, (now - _aware(row.last_seen)).total_seconds()):.0f} s ago)"
        for row in older
    )


def release_name() -> str:
    """This process's release as its row names it: the version and the newest schema
    revision its code knows, ``0.3.0+0022``. Two builds that share a version string (a build
    from between two releases) are still told apart by what schema they know, which is what
    a migration under them must not outrun."""
    return f"{__version__}+{schema_head()}"


def _earlier_release(version: str) -> bool:
    """Whether ``version`` (a row's release_name) names a release before this one: an older
    schema head, else an older version number. A row without a head is from a release before
    rows named one, so earlier; one that cannot be read counts as earlier too, since nothing
    says it knows this schema."""

    def numbers(text: str) -> tuple[int, ...] | None:
        found = re.match(r"\d+(?:\.\d+)*", text or "")
        return tuple(int(part) for part in found.group().split(".")) if found else None

    number, _, head = (version or "").partition("+")
    if not head:
        return True
    if head != schema_head():
        return head < schema_head()  # revisions are numbered 0001, 0002, ...
    theirs, ours = numbers(number), numbers(__version__)
    if theirs is None or ours is None:
        return number != __version__
    return theirs < ours


class ProcessBeacon:
    """This process's row: written at start, refreshed every HEARTBEAT seconds (with the
    route set it runs now, which a reload may change), removed at stop. A failed write is a
    warning and tried again at the next beat: the store being away must not stop the hub.

    ``partitions``: the partition queues this process uses on a broker (None in-process).
    At start and at each beat the beacon reads the other rows, and warns once when the
    answering processes use different partition counts (again if what differs changes).

    ``store_locked``: this serve holds its SQLite store's lock (carehub.lockfile), which one
    serve at a time holds and which the kernel lets go of when a process ends, however it
    ends. Any other serve row of this host on this store is then of a serve that ended
    without removing it (killed, the machine lost power): removed at start, rather than
    shown as "not answering" until it is pruned."""

    def __init__(
        self,
        store: MessageStore,
        role: str,
        routes: Callable[[], str | None],
        partitions: int | None = None,
        *,
        store_locked: bool = False,
    ) -> None:
        self.store = store
        self.role = role
        self.routes = routes
        self.partitions = partitions
        self.store_locked = store_locked
        self.id = str(uuid.uuid4())
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._routes_sent: str | None = None
        #: The disagreement on partition counts last warned of (see _check_partitions).
        self._partitions_said: str | None = None
        self._beats_failing = FailureRun(
            "telling the store this process is alive",
            "`carehub status` will show it as not answering",
            "heartbeat(s)",
            report_every=300.0,
            logger=log,
            level=logging.WARNING,
            traceback=False,
        )

    async def start(self, every: float = HEARTBEAT) -> None:
        try:
            await asyncio.to_thread(self._register)
        except Exception as err:
            log.warning("could not record this process in the store: %s", _first_line(err))
        await self._check_partitions()
        self._task = asyncio.create_task(self._beat_loop(every), name="process beacon")

    def refresh(self) -> None:
        """Write the row now rather than at the next beat (the routes were just reloaded)."""
        self._wake.set()

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
        try:
            await asyncio.to_thread(self._unregister)
        except Exception as err:
            log.warning("could not remove this process's row from the store: %s", _first_line(err))

    async def _beat_loop(self, every: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), every)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                await asyncio.to_thread(self._beat)
            except Exception as err:
                # One line of the driver's text, once a run and every few minutes: an outage
                # is logged by the loops that use the store, and this is one more of them.
                self._beats_failing.failed(RuntimeError(_first_line(err)))
            else:
                self._beats_failing.succeeded()
            await self._check_partitions()

    async def _check_partitions(self) -> None:
        """Warn when the answering processes on this store use different partition counts;
        once per disagreement, and once more when they agree again."""
        if self.partitions is None:
            return
        try:
            disagreement = await asyncio.to_thread(self._partitions_disagreement)
        except Exception:  # the store is away: said by the beat; checked at the next
            return
        if disagreement == self._partitions_said:
            return
        self._partitions_said = disagreement
        if disagreement is None:
            log.info("every running process now uses %d partition queue(s)", self.partitions)
            return
        log.warning(
            "the running processes use different queue.partitions (%s): serve queues each "
            "patient's messages to the partition its own count picks, and a worker consumes "
            "only the partitions its count names, so some patients' messages wait for the "
            "sweep or are routed out of order; give every serve and worker the same "
            "queue.partitions",
            disagreement,
        )

    def _partitions_disagreement(self) -> str | None:
        with self.store.engine.connect() as conn:
            return partitions_disagree(running_processes(conn), datetime.now(UTC))

    def _register(self) -> None:
        now = datetime.now(UTC)
        routes = self.routes()
        host = socket.gethostname()[:255]
        ended: list[Any] = []
        with self.store.engine.begin() as conn:
            conn.execute(delete(hub_processes).where(hub_processes.c.last_seen < now - PRUNE_AFTER))
            if self.store_locked and self.role == "serve":
                ended = self._remove_ended_serves(conn, host)
            conn.execute(
                insert(hub_processes).values(
                    id=self.id,
                    role=self.role,
                    host=host,
                    pid=os.getpid(),
                    version=release_name(),
                    started_at=now,
                    last_seen=now,
                    routes=routes,
                    routes_loaded_at=now,
                    partitions=self.partitions,
                )
            )
        self._routes_sent = routes
        for row in ended:
            log.info(
                "serve on this host (pid %d), last heard from at %s, ended without removing its "
                "row from the store's processes: removed (this serve holds the store's lock)",
                row.pid,
                _aware(row.last_seen).strftime("%Y-%m-%d %H:%M:%S UTC"),
            )

    def _remove_ended_serves(self, conn: Any, host: str) -> list[Any]:
        """Remove and return the rows of this host's other serves on this store (see
        ``store_locked``)."""
        earlier = and_(
            hub_processes.c.role == "serve",
            hub_processes.c.host == host,
            hub_processes.c.id != self.id,
        )
        columns = (hub_processes.c.pid, hub_processes.c.last_seen)
        rows = conn.execute(select(*columns).where(earlier)).all()
        if rows:
            conn.execute(delete(hub_processes).where(earlier))
        return list(rows)

    def _beat(self) -> None:
        now = datetime.now(UTC)
        routes = self.routes()
        values: dict[str, Any] = {"last_seen": now}
        if routes != self._routes_sent:
            values.update(routes=routes, routes_loaded_at=now)
        with self.store.engine.begin() as conn:
            found = conn.execute(
                update(hub_processes).where(hub_processes.c.id == self.id).values(**values)
            ).rowcount
        if not found:  # pruned while it could not write, or the store was replaced: again
            self._register()
            return
        self._routes_sent = routes

    def _unregister(self) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(delete(hub_processes).where(hub_processes.c.id == self.id))


def _first_line(err: Exception) -> str:
    """The driver's account of a failed write, without the statement and SQLAlchemy's
    "Background on this error" lines that follow it."""
    return (str(err) or type(err).__name__).split("\n", 1)[0]
