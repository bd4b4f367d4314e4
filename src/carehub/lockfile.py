"""One serving hub per SQLite store: an exclusive lock on a file beside the store.

A second `carehub serve` on the same SQLite store would start as if the first were gone: its
worker puts the first hub's in-flight deliveries back in line (Outbox.release_leases) and
queues its unrouted messages again, so both send the same deliveries, and both poll the same
file-drop folders. The hub takes ``fcntl.flock`` on ``carehub.lock`` (beside ``carehub.db``)
for as long as it serves; a second one is refused, naming the first one's pid.

The kernel lets go of the lock when the process ends, however it ends, so a crash never
leaves a stale lock behind (the file itself, holding the last holder's pid, stays). Commands
that only read or queue work in the store (`messages list`, `status`, `reprocess`, ...) take
no lock: they are meant to run beside the hub.

Below the pid, the holder notes which route set it runs (a fingerprint of the config and route
files) and how its last route reload went, so `messages reprocess` can tell when the files on
disk are not what the hub routes with, and `routes reload` can report the outcome.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError

from carehub.config import HubConfig
from carehub.errors import CarehubError

#: The lock file's name in the data dir (the store is carehub.db beside it).
LOCK_FILE = "carehub.lock"

#: Seconds a start keeps trying for the lock: long enough to ride out a probe by another
#: command (data_dir_holder), far shorter than any real hub holds it.
ACQUIRE_PATIENCE = 1.0


class StoreInUse(CarehubError):
    """Another carehub is serving from this SQLite store."""


def lock_path(config: HubConfig, data_dir: Path) -> Path | None:
    """Where the lock of the store the config names lives: ``carehub.lock`` in the data dir
    for the embedded store, beside the file for another SQLite URL; None for a database
    server (PostgreSQL serves many hubs and workers) or an in-memory SQLite."""
    if not config.store.url:
        return data_dir / LOCK_FILE
    try:
        url = make_url(config.store.url)
    except ArgumentError:  # opening the store says what is wrong with it, naming the key
        return None
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database).with_suffix(".lock")


class StoreLock:
    """The exclusive lock a serving hub holds on its SQLite store (see the module docstring)."""

    def __init__(self, path: Path, where: str) -> None:
        self.path = path
        self.where = where  # "data dir X" or "store X", for the error
        self._fd: int | None = None

    def acquire(self, patience: float = ACQUIRE_PATIENCE) -> None:
        """Take the lock and write this process's pid into the file, or raise StoreInUse
        naming the process that holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise CarehubError(
                f"{self.where}: cannot open the lock file {self.path}: {err.strerror or err}"
            ) from err
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(fd)
                raise StoreInUse(
                    f"{self.where}: another carehub is serving from it ({_holder(self.path)}); "
                    "stop that one first, or give this one its own --data-dir"
                ) from None
            except BaseException:
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def note(self, routes: str, reloads: int = 0, outcome: str = "") -> None:
        """Record the route set this holder runs and its reloads so far (``outcome``: "ok" or
        "failed", of the last one). Written in place, then cut to length, so a reader never
        finds the file empty."""
        if self._fd is None:
            return
        text = f"{os.getpid()}\nroutes {routes}\nreloads {reloads} {outcome}\n".encode()
        os.pwrite(self._fd, text, 0)
        os.ftruncate(self._fd, len(text))

    def release(self) -> None:
        """Let go (closing the file lets go of the lock); the file stays."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None


def lock_store(config: HubConfig, data_dir: Path) -> StoreLock | None:
    """Take the serving lock of the store the config names; None where there is none to take
    (a database server)."""
    path = lock_path(config, data_dir)
    if path is None:
        return None
    if config.store.url:  # a SQLite URL: lock_path has parsed it
        where = f"store {make_url(config.store.url).database}"
    else:
        where = f"data dir {data_dir}"
    lock = StoreLock(path, where)
    lock.acquire()
    return lock


def store_holder(config: HubConfig, data_dir: Path) -> str | None:
    """Which process serves from this store now ("pid 1234"), or None when none does. Probes
    with a shared lock, given back at once (a hub starting meanwhile waits ACQUIRE_PATIENCE)."""
    path = lock_path(config, data_dir)
    if path is None or not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


@dataclass(frozen=True, slots=True)
class LockNote:
    """What the serving hub wrote in its lock file (see StoreLock.note)."""

    pid: int | None
    routes: str | None = None  # fingerprint of the route set it runs
    reloads: int = 0
    outcome: str = ""  # of the last reload: "ok" or "failed"


def read_note(path: Path) -> LockNote:
    """The lock file's contents; fields it does not hold (yet) are left empty."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, ValueError):
        return LockNote(None)
    pid = int(lines[0]) if lines and lines[0].strip().isdigit() else None
    fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
    reloads, _, outcome = fields.get("reloads", "0").partition(" ")
    return LockNote(
        pid, fields.get("routes"), int(reloads) if reloads.isdigit() else 0, outcome.strip()
    )


def serving_note(config: HubConfig, data_dir: Path) -> LockNote | None:
    """The note of the hub serving from this store now; None when none does (or the store is
    a database server, which has no lock file)."""
    path = lock_path(config, data_dir)
    if path is None or store_holder(config, data_dir) is None:
        return None
    return read_note(path)


def _holder(path: Path) -> str:
    """The holder as "pid N", read from the lock file (written just after taking the lock)."""
    pid = read_note(path).pid
    return f"pid {pid}" if pid is not None else "pid unknown"
