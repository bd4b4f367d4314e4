"""The Hub: one object that owns the store, intake and listeners of a running carehub.

Everything a running hub needs hangs off this object (no module-level state), so tests build
a fresh hub per test and several hubs can run in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import queue
import sqlite3
import ssl
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from alembic.util import CommandError as AlembicError
from sqlalchemy import create_engine, inspect, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from carehub import __version__
from carehub.components import ComponentContext, on_this_machine
from carehub.config import (
    HTTPListenerConfig,
    HubConfig,
    MLLPListenerConfig,
    http_tokens,
    load_config,
    referenced_environment,
    resolve_data_dir,
    where_in_config,
    without_password,
)
from carehub.errors import CarehubError
from carehub.intake.filedrop import FileDropListener
from carehub.intake.http import HTTPListener, build_app, warn_if_open_to_anyone
from carehub.intake.intake import Intake
from carehub.intake.mllp import MLLPListener
from carehub.intake.tls import (
    requires_client_certificates,
    server_context,
    warn_if_key_readable,
)
from carehub.lockfile import StoreLock, lock_store
from carehub.metrics import make_registry, render
from carehub.plugins import PluginHost
from carehub.routing.config import configured_route_files, load_route_files, route_files
from carehub.routing.table import RouteTable, bind_routes
from carehub.store.group_commit import GroupCommit, group_commit_for
from carehub.store.processes import ProcessBeacon
from carehub.store.store import (
    LOCK_TIMEOUT,
    MIGRATIONS,
    STORE_FILE,
    MessageStore,
    RecentMessages,
    StoreError,
    server_connect_args,
    sqlite_url,
)
from carehub.worker import Worker, WorkerSettings
from carehub.workqueue import Publisher, QueueMisconfigured, QueueUnavailable, WorkQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BoundListener:
    """A listener that is up, and where: (kind, name, address)."""

    kind: str
    name: str
    address: str


#: Seconds a serving hub's SQLite call waits for a write lock held by another process.
SERVING_LOCK_TIMEOUT = 2.0
#: The umask of the commands that write messages (serve, worker, demo, messages export): the
#: store, its WAL, outbox files and exports hold PHI, readable by the hub's user only.
PRIVATE_UMASK = 0o077
#: A data dir carehub makes: the hub's user only, whatever the umask.
PRIVATE_DIR_MODE = 0o700


def keep_written_files_private() -> None:
    """Make what this process creates from now on readable by its user only: SQLite, outbox
    channels and exports create their files with the umask, and the usual 022 would let every
    local account read the messages."""
    os.umask(PRIVATE_UMASK)


def open_store(
    config: HubConfig,
    data_dir: Path,
    *,
    serving: bool = False,
    must_exist: bool = False,
    migrate: bool | None = None,
    check_schema: bool = True,
    under_older_processes: bool = False,
) -> MessageStore:
    """The store the config names (SQLite under data_dir by default), with the schema this
    release needs.

    ``serving`` moves SQLite WAL checkpoints onto a background thread and shortens how long a
    SQLite call waits for another process's write lock (the worker's calls run on the event
    loop, which must not freeze for the 30 s a CLI command may wait). With ``must_exist`` (the
    commands that read a store), a SQLite store that is not there is an error, not created.

    ``migrate`` (by default, unless ``must_exist``): bring the schema to this release's; what
    runs the hub (`serve`, `worker`) and `store upgrade` do. The other commands only check it:
    one of them, run from a new release during a rolling upgrade, must not migrate the store
    under the old release's processes, which could then not start again. ``check_schema``
    False opens whatever schema is there (`store downgrade`). A migration is refused while
    processes of an earlier release answer on the store, unless ``under_older_processes``
    (`store upgrade --force`)."""
    url = config.store.url or sqlite_url(data_dir)
    if must_exist and not config.store.url and not (data_dir / STORE_FILE).is_file():
        # A command that reads the store was pointed at a folder without one: a mistyped
        # --data-dir would otherwise create an empty store there and report nothing found.
        raise StoreOpenError(
            f"data dir {data_dir}: no store there ({STORE_FILE}); check --data-dir or "
            f"CAREHUB_DATA_DIR, or start `carehub serve` with it first"
        )
    try:
        if not config.store.url:
            data_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        store = MessageStore(
            url,
            durability=config.store.durability,
            background_checkpoint=serving,
            lock_timeout=SERVING_LOCK_TIMEOUT if serving else LOCK_TIMEOUT,
        )
        if migrate if migrate is not None else not must_exist:
            if not under_older_processes:
                _refuse_migrating_under_older_processes(store)
            store.migrate()
        elif check_schema:
            behind = store.schema_behind()
            if behind is not None:
                store.close()
                raise StoreOpenError(_store_open_problem(config, data_dir, StoreError(behind)))
        if serving and store.is_sqlite:
            # A read-only file opens and migrates (when current) without a write: found here,
            # it is a start-up error naming the data dir, not an AE to every message.
            with store.engine.begin() as conn:
                conn.exec_driver_sql("PRAGMA user_version = 0")
    except (SQLAlchemyError, AlembicError, OSError, ImportError, StoreError) as err:
        # ImportError: the URL names a database whose driver is not installed (mysql://...).
        raise StoreOpenError(_store_open_problem(config, data_dir, err)) from err
    return store


class StoreOpenError(CarehubError):
    """The store cannot be opened: the message names the setting to fix."""


def _refuse_migrating_under_older_processes(store: MessageStore) -> None:
    """Raise (closing the store) when the schema waits for a migration and processes of an
    earlier release answer on the store: they could not work with the newer schema, and
    nothing would tell them."""
    from carehub.store.processes import older_processes_running

    try:
        if not store.migration_pending():
            return  # nothing to migrate, or a newer schema, which migrate says it cannot follow
        with store.engine.connect() as conn:
            older = older_processes_running(conn)
    except BaseException:
        store.close()
        raise
    if older is None:
        return
    revision = store.schema_revision() or "none"
    store.close()
    raise StoreOpenError(
        f"the store's schema is at revision {revision} and this carehub {__version__} would "
        f"migrate it, but processes of an earlier carehub release run on it: {older}; stop "
        "them first (they could not work with the newer schema), or run `carehub store "
        "upgrade --force` to migrate under them"
    )


def _store_open_problem(config: HubConfig, data_dir: Path, err: Exception) -> str:
    """Where the store was meant to be (the config key, or the data dir) and why it cannot be
    opened there, without a password from the URL."""
    reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
    if isinstance(err, OSError) and err.strerror:
        reason = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    if not config.store.url:
        return f"data dir {data_dir}: cannot open the store there: {reason}"
    where = where_in_config(config, "store", "url")
    return f"{where}: cannot open the store at {without_password(config.store.url)}: {reason}"


def check_store(config: HubConfig, data_dir: Path) -> str:
    """Raise the StoreOpenError open_store would raise at `serve`, without creating, migrating
    or writing anything, for `routes check`: a database must answer with a schema this version
    can migrate; a SQLite file must be a database, or its folder one that can be made.
    Returns what was checked, to print."""
    url = config.store.url or sqlite_url(data_dir)
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            revision = _sqlite_revision(parsed.database)
        else:
            # serve's bounds: a database that has gone silent fails the check in seconds,
            # and a postgres:// URL is answered with how to write it.
            engine = create_engine(
                url,
                poolclass=NullPool,
                hide_parameters=True,
                connect_args=server_connect_args(url),
            )
            try:
                with engine.connect() as conn:
                    revision = (
                        conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
                        if inspect(conn).has_table("alembic_version")
                        else None
                    )
            finally:
                engine.dispose()
        _check_revision(revision)
    except (SQLAlchemyError, AlembicError, OSError, ImportError, sqlite3.Error, StoreError) as err:
        # ImportError: the URL names a database whose driver is not installed (mysql://...).
        raise StoreOpenError(_store_open_problem(config, data_dir, err)) from err
    where = without_password(config.store.url) if config.store.url else data_dir / STORE_FILE
    return f"{where} ({f'schema {revision}' if revision else 'none yet; serve creates it'})"


def _sqlite_revision(database: str | None) -> str | None:
    """The schema revision of a SQLite store, opened without creating it (mode=rw, which also
    leaves no -wal or -shm file behind); None for one `serve` would create, where it can."""
    if not database or database == ":memory:":
        return None
    path = Path(database).absolute()
    if not path.exists():
        _check_can_create(path.parent)
        return None
    uri = f"{path.as_uri()}?mode=rw"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=LOCK_TIMEOUT)) as conn:
        tables = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
        if conn.execute(tables).fetchone() is None:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return str(row[0]) if row else None


def _check_can_create(folder: Path) -> None:
    """Raise the OSError that making ``folder`` (and a file in it) would meet, making nothing."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(existing))


def _check_revision(revision: str | None) -> None:
    """A store at a revision this version does not have (a newer carehub's, say) stops
    open_store's migration; say so before `serve` finds it."""
    if revision is None:
        return
    alembic_config = AlembicConfig()
    alembic_config.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(alembic_config)
    if revision not in {s.revision for s in script.walk_revisions()}:
        raise AlembicError(
            f"its schema is at revision {revision!r}, which this carehub version cannot "
            f"migrate (it knows up to {script.get_current_head()})"
        )


def check_queue(config: HubConfig) -> str:
    """Raise the CarehubError `serve` and `worker` would when queue.url names a broker that
    does not answer (naming the setting, the password hidden); memory:// is always there.
    Returns what was checked, to print."""
    work_queue = WorkQueue.for_config(config.queue)
    try:
        work_queue.check()
    except QueueUnavailable as err:
        raise CarehubError(f"{where_in_config(config, 'queue', 'url')}: {err}") from err
    label = without_password(config.queue.url)
    return f"{label} (in-process)" if work_queue.is_memory else f"{label} (answers)"


def check_workers_can_consume(config: HubConfig) -> None:
    """For `serve --no-worker`, which leaves routing to `carehub worker`s: they meet it only
    on a shared broker. With the in-process queue (memory://) none could ever consume what it
    queues, and every message would wait 'received' for good."""
    if not WorkQueue.for_config(config.queue).is_memory:
        return
    raise CarehubError(
        f"--no-worker with {where_in_config(config, 'queue', 'url')} "
        f"{without_password(config.queue.url)}: no `carehub worker` can consume the "
        "in-process queue of this serve, so nothing it stores would be routed; set queue.url "
        "to the shared broker (amqp://user:password@host:5672//), or run serve without "
        "--no-worker"
    )


def warn_if_worker_store_is_local(config: HubConfig, store: MessageStore) -> None:
    """A WARNING for a `carehub worker` on a SQLite store: only processes on this host with
    this data dir share that store, while the broker's queues are shared by every host. A
    store.url left empty (its variable unset on one host) gives a worker a store of its own
    that none of the queued messages are in."""
    if not store.is_sqlite or WorkQueue.for_config(config.queue).is_memory:
        return
    log.warning(
        "this worker's store is SQLite (%s) while its queue is a shared broker (%s): only a "
        "serve on this host with this data dir shares that store; a worker on another host "
        "needs the deployment's database (postgresql+psycopg://...) in %s. A worker handed "
        "another store's messages stops",
        without_password(str(store.engine.url)),
        without_password(config.queue.url),
        where_in_config(config, "store", "url"),
    )


def warn_if_exposed(listener: MLLPListenerConfig, where: str) -> None:
    """A WARNING for an MLLP listener others could read or impersonate: one beyond loopback
    without TLS (MLLP has no authentication, and messages cross the network in clear), or
    with TLS that takes clients without a certificate (so anyone who reaches the port can
    send, as over plain TCP), or one whose TLS private key other accounts can read."""
    if listener.tls is not None:
        warn_if_key_readable(listener.tls, where)
        if not on_this_machine(listener.host) and not requires_client_certificates(listener.tls):
            why = "no client_ca" if listener.tls.client_ca is None else "require_client_cert: false"
            log.warning(
                "MLLP listener '%s' on %s does not require client certificates (%s): any "
                "client that reaches the port can send; keep it on a trusted network, require "
                "them with %s.tls.client_ca (the senders' CA, without require_client_cert: "
                "false), or bind it to 127.0.0.1",
                listener.name,
                listener.host,
                why,
                where,
            )
    elif not on_this_machine(listener.host):
        log.warning(
            "MLLP listener '%s' on %s has no TLS: messages cross the network in clear and "
            "anyone who reaches the port can send; keep it on a trusted network or behind a "
            "TLS terminator, set %s.tls, or bind it to 127.0.0.1",
            listener.name,
            listener.host,
            where,
        )


def warn_if_http_exposed(listener: HTTPListenerConfig, tokens: list[str]) -> None:
    """A WARNING for an HTTP listener beyond loopback that anyone who reaches it can post to
    (no tokens), and one for such a listener without TLS: bearer tokens, messages and
    referral updates would cross the network in clear. With TLS, one whose private key other
    accounts can read."""
    if listener.tls is not None:
        warn_if_key_readable(listener.tls, "listeners.http")
    if on_this_machine(listener.host):
        return
    warn_if_open_to_anyone(
        "HTTP listener", listener.host, tokens, "takes messages and referral updates from", log
    )
    if listener.tls is None:
        log.warning(
            "HTTP listener on %s has no TLS: bearer tokens, messages and referral updates "
            "cross the network in clear; keep it on a trusted network or behind a TLS "
            "terminator, set listeners.http.tls, or bind it to 127.0.0.1",
            listener.host,
        )


def http_tls_context(config: HubConfig) -> ssl.SSLContext | None:
    """The HTTP listener's TLS context (None without TLS); a file that cannot be loaded is a
    ConfigError naming the setting, as for the MLLP listeners. `serve` and `routes check`
    both load it."""
    listener = config.listeners.http
    if not listener.enabled or listener.tls is None:
        return None
    setting = partial(where_in_config, config, "listeners", "http", "tls")
    return server_context(listener.tls, setting)


def mllp_tls_contexts(config: HubConfig) -> list[ssl.SSLContext | None]:
    """Each MLLP listener's TLS context (None without TLS); a file that cannot be loaded is a
    ConfigError naming the setting with the config file and line, as other config errors do.
    `serve` and `routes check` both load them."""
    contexts: list[ssl.SSLContext | None] = []
    for index, listener in enumerate(config.listeners.mllp):
        if listener.tls is None:
            contexts.append(None)
            continue
        setting = partial(where_in_config, config, "listeners", "mllp", index, "tls")
        contexts.append(server_context(listener.tls, setting))
    return contexts


def config_dir(config: HubConfig) -> Path:
    """Where relative paths in the config (routes, outboxes, rosters) start."""
    return config.source.parent if config.source else Path.cwd()


def build_routing(
    config: HubConfig,
    data_dir: Path,
    store: MessageStore | None = None,
    *,
    check_only: bool = False,
) -> tuple[PluginHost, RouteTable]:
    """Load plugins and bind every route file: all configuration errors surface here.
    Without a store (dry runs, `routes check`), components keep any state in memory;
    ``check_only`` (`routes check`) starts them without creating anything."""
    host = PluginHost().load(config=config)
    base = config_dir(config)
    loaded = load_route_files(configured_route_files(config, base), data_dir)
    context = ComponentContext(base, data_dir, store, check_only=check_only)
    table = bind_routes(loaded, host, context)
    return host, table


def route_fingerprint(config: HubConfig) -> str:
    """A hash of the config file and every route file it names, as they are on disk now, with
    the environment variables they name: the running hub records the one it loaded, so
    `messages reprocess` can tell when the files (or a ${VAR} in them) differ from the routes
    the hub runs."""
    digest = hashlib.sha256()
    base = config_dir(config)
    named = [config.source] if config.source else []
    for path in [*named, *route_files(base, config.routes)]:
        _digest_file(digest, path, path)
    return digest.hexdigest()


def route_set_digest(config: HubConfig) -> str:
    """The first 12 hex digits of a hash of the route files' names (as the config lists them,
    from its folder), contents and the environment variables they name: the same on every
    host that has the same route files and settings, wherever they are installed, so `carehub
    status` can tell processes running different route sets apart (route_fingerprint also
    covers where the files are and the config)."""
    digest = hashlib.sha256()
    base = config_dir(config)
    for path in route_files(base, config.routes):
        label = path
        with contextlib.suppress(ValueError):
            label = path.relative_to(base)
        _digest_file(digest, base / label, label)
    return digest.hexdigest()[:12]


def _digest_file(digest: Any, path: Path, label: Path) -> None:
    """Add a file's name, bytes and the values of the ${VAR}s it names to ``digest``: a route
    that sends to ${CARE_FHIR_URL} goes elsewhere when the variable does."""
    digest.update(f"{label}\0".encode())
    try:
        content = path.read_bytes()
    except OSError as err:  # loading it says what is wrong; the hash only has to differ
        digest.update(f"unreadable: {err.strerror}".encode())
    else:
        digest.update(content)
        for name, value in referenced_environment(content.decode("utf-8", "replace")):
            digest.update(f"\0{name}=".encode())
            digest.update(b"\1unset" if value is None else value.encode("utf-8", "replace"))
    digest.update(b"\0")


def _restart_settings(config: HubConfig) -> dict[str, Any]:
    """The config settings a route reload does not apply (listeners, store, queue, ...)."""
    return config.model_dump(mode="json", exclude={"routes", "plugins_dir"})


class RouteReloader:
    """Reads the routes again for a running hub or worker (SIGHUP, `carehub routes reload`).

    From the config file only ``routes`` and ``plugins_dir`` are taken again: listeners, the
    store and the queue are open already, so changes to them wait for a restart (the log line
    says so). ``config`` is the running config with the reloaded route settings."""

    def __init__(self, config: HubConfig, data_dir: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        #: Of the route set last loaded; taken before the files are read, so an edit made
        #: while they were being read makes it differ from the files (a warning too many).
        self.fingerprint = route_fingerprint(config)
        #: route_set_digest of the routes loaded (and taken before the files are read, too).
        self.route_set = route_set_digest(config)
        self.reloads = 0
        self.outcome = ""
        self._file_settings = self._restart_settings_on_disk()
        self._lock = asyncio.Lock()

    def _restart_settings_on_disk(self) -> dict[str, Any] | None:
        if self.config.source is None:
            return None
        with contextlib.suppress(CarehubError):
            return _restart_settings(load_config(self.config.source))
        return None

    async def load(self, store: MessageStore | None) -> tuple[PluginHost, RouteTable, str] | None:
        """Bind the routes as the files say now and start their components; returns them
        with a note for the log, or None (after one ERROR line) when they cannot be used, in
        which case the caller keeps the routes it runs."""
        async with self._lock:
            self.reloads += 1
            fingerprint = route_fingerprint(self.config)
            route_set = route_set_digest(self.config)
            note = ""
            try:
                config = self.config
                if config.source is not None:
                    fresh = load_config(config.source)
                    config = config.model_copy(
                        update={"routes": fresh.routes, "plugins_dir": fresh.plugins_dir}
                    )
                    fingerprint = route_fingerprint(config)
                    route_set = route_set_digest(config)
                    settings = _restart_settings(fresh)
                    if self._file_settings is not None and settings != self._file_settings:
                        note = (
                            f"; other changes in {config.source} (listeners, store, queue, "
                            "worker, ...) take effect at the next restart"
                        )
                host, table = build_routing(config, self.data_dir, store)
                await table.start()
            except Exception as err:
                problem = " | ".join(str(err).split("\n")) or type(err).__name__
                if not isinstance(err, CarehubError):
                    problem = f"{type(err).__name__}: {problem}"
                    log.debug("route reload failed", exc_info=True)
                log.error(
                    "routes not reloaded, still running the previous ones: %s",
                    without_password(problem),  # a route file's URL may carry a credential
                )
                self.outcome = "failed"
                return None
            self.config = config
            self.fingerprint = fingerprint
            self.route_set = route_set
            self.outcome = "ok"
            return host, table, note


def log_reloaded(old: RouteTable, table: RouteTable, note: str) -> None:
    """One INFO line with the counts, and a WARNING naming what the reload took away: a route
    or destination gone from the files stops quietly otherwise (its deliveries still waiting
    become dead letters, "no longer configured")."""
    log.info(
        "routes reloaded: %d route(s), %d destination(s)%s",
        len(table.routes),
        len(table.destinations),
        note,
    )
    gone_routes = sorted({r.name for r in old.routes} - {r.name for r in table.routes})
    renamed = set(table.former_names)
    gone_destinations = sorted(set(old.destinations) - set(table.destinations) - renamed)
    if gone_routes or gone_destinations:
        log.warning(
            "the reload removed route(s) %s and destination(s) %s",
            ", ".join(gone_routes) or "none",
            ", ".join(gone_destinations) or "none",
        )


#: Seconds newly stored messages wait to be published together (see Hub._publish).
PUBLISH_GATHER = 0.005
#: While the broker cannot be reached: seconds between tries, and how many ids are held.
QUEUE_RETRY = 5.0
UNQUEUED_HELD = 100_000


@dataclass(slots=True)
class _QueueDown:
    """Since when intake could not queue stored messages for routing, why, and when to try
    again."""

    since: datetime
    reason: str
    retry_at: float = 0.0


#: Seconds `stop` waits for a publish in flight (a silent broker holds one for as long as
#: kombu waits to connect: what it held is stored, and the workers' sweep routes it).
PUBLISH_STOP_WAIT = 3.0


class _PublishThread:
    """The one thread that publishes to a broker, batch after batch, in order.

    A daemon thread rather than an executor's: a broker that stops answering without refusing
    holds a publish for as long as kombu waits to connect (12 s with its defaults here), and
    an executor's thread is joined at interpreter exit, so a stopped hub would wait that long
    to exit even after giving up on it."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_PublishJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="queue-publish", daemon=True)
        self._thread.start()

    def submit(
        self, publisher: Publisher, batch: list[tuple[int, str]]
    ) -> asyncio.Future[Exception | None]:
        """Publish on the thread; the future (on the calling loop) holds the error, or None."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Exception | None] = loop.create_future()
        self._jobs.put(_PublishJob(loop, future, publisher, batch))
        return future

    def stop(self, timeout: float) -> bool:
        """No more publishing; whether the thread ended within ``timeout`` seconds."""
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            error = _publish(job.publisher, job.batch)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                job.loop.call_soon_threadsafe(_settle_publish, job.future, error)


@dataclass(slots=True, frozen=True)
class _PublishJob:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Exception | None]
    publisher: Publisher
    batch: list[tuple[int, str]]


def _settle_publish(future: asyncio.Future[Exception | None], error: Exception | None) -> None:
    if not future.done():
        future.set_result(error)


def _publish(publisher: Publisher, batch: list[tuple[int, str]]) -> Exception | None:
    """Publish a batch; the error instead of raising it (the caller may be another thread)."""
    try:
        publisher.publish_many(batch)
    except Exception as err:
        return err
    return None


def _since(moment: datetime) -> str:
    seconds = (datetime.now(UTC) - moment).total_seconds()
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class Hub:
    def __init__(self, config: HubConfig, data_dir: Path | None = None) -> None:
        self.config = config
        self.data_dir = resolve_data_dir(config, data_dir)
        # Routes are bound (and every config error raised) before anything opens; the
        # components get the store once it is open, in start().
        self.reloader = RouteReloader(config, self.data_dir)
        self.host, self.table = build_routing(config, self.data_dir)
        self.work_queue = WorkQueue.for_config(config.queue)
        self.publisher: Publisher | None = None
        #: Stored messages not yet queued while the broker is away (see _publish_waiting).
        self._unqueued: list[tuple[int, str]] = []
        self._queue_down: _QueueDown | None = None
        #: The broker publisher's own thread (None for the in-process queue), and whether a
        #: publish is under way on it.
        self._publish_thread: _PublishThread | None = None
        self._publishing = False
        #: The next keep-alive of the broker publisher's connection (see _keep_queue_alive).
        self._keep_alive: asyncio.TimerHandle | None = None
        #: The in-process worker (config worker.enabled), on this hub's event loop.
        self.worker: Worker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._worker_stop = asyncio.Event()
        self.store: MessageStore | None = None
        self.writer: GroupCommit
        self.intake: Intake
        self.mllp_listeners: list[MLLPListener] = []
        self.http_listener: HTTPListener | None = None
        self.file_listeners: list[FileDropListener] = []
        self.registry = make_registry(self)
        self.bound: list[BoundListener] = []
        self._to_publish: list[tuple[int, str]] = []
        #: Held while serving from a SQLite store: one hub per store (see carehub.lockfile).
        self.store_lock: StoreLock | None = None
        #: This process's row in the store's list of running processes (store/processes.py).
        self.beacon: ProcessBeacon | None = None
        self._serving = False  # started and not stopping: a route reload may swap tables

    async def start(self) -> list[BoundListener]:
        """Open the store, then the listeners; returns where each listener is bound."""
        try:
            self.data_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        except OSError as err:
            raise CarehubError(
                f"data dir {self.data_dir}: cannot create it: {err.strerror}"
            ) from err
        self.store_lock = lock_store(self.config, self.data_dir)  # before the store opens
        try:
            self.store = await asyncio.to_thread(
                open_store, self.config, self.data_dir, serving=True
            )
        except BaseException:
            self._release_store_lock()
            raise
        self._note_routes()
        self.table.attach_store(self.store)
        self.writer = group_commit_for(self.store, room=room_for_messages(self.config))
        self.writer.start()
        # Everything after the store opens is undone if a later step fails (the broker, a
        # component's start() in the worker, a port): the store, its writer and checkpoint
        # thread must not outlive a hub that did not start.
        try:
            identity = self.config.hub
            worker = self.config.worker
            # With the in-process queue, only an in-process worker can consume: without one,
            # leave messages 'received' in the store for the next worker start to pick up.
            if worker.enabled or not self.work_queue.is_memory:
                self.publisher, outage = await asyncio.to_thread(self._open_publisher)
                if not self.work_queue.is_memory:
                    self._publish_thread = _PublishThread()
                    self._keep_alive = asyncio.get_running_loop().call_later(
                        self._keep_alive_seconds(), self._keep_queue_alive
                    )
                if outage is not None:  # as when the broker goes away later: held, tried again
                    self._published([], outage)
            self.intake = Intake(
                self.writer,
                hub_application=identity.application,
                hub_facility=identity.facility,
                on_accepted=self._publish if self.publisher else None,
            )
            if worker.enabled:
                # Only with the in-process queue is this worker the only one that can hold
                # leases: with a broker, `carehub worker`s elsewhere hold theirs.
                single_host = self.store.is_sqlite and self.work_queue.is_memory
                settings = WorkerSettings.from_config(worker, single_host=single_host)
                if self.work_queue.is_memory:  # every message is then routed by this worker
                    self.store.recent = RecentMessages()  # what intake stores, the worker takes
                self.worker = Worker(self.store, self.table, self.host, self.work_queue, settings)
                await self._start_worker(self.worker)
            listeners = self.config.listeners
            contexts = mllp_tls_contexts(self.config)
            for i, (mllp_config, context) in enumerate(zip(listeners.mllp, contexts, strict=True)):
                warn_if_exposed(mllp_config, f"listeners.mllp[{i}]")
                listener = MLLPListener(mllp_config, self.intake, context)
                host, port = await self._bind(
                    listener.start(),
                    f"MLLP listener '{mllp_config.name}'",
                    mllp_config.host,
                    mllp_config.port,
                    ("listeners", "mllp", i, "port"),
                )
                self.mllp_listeners.append(listener)
                kind = "MLLP+TLS" if context else "MLLP"
                self.bound.append(BoundListener(kind, listener.name, f"{host}:{port}"))
            if listeners.http.enabled:
                tokens = http_tokens(self.config)
                http_context = http_tls_context(self.config)
                warn_if_http_exposed(listeners.http, tokens)
                app = build_app(
                    listeners.http,
                    self.intake,
                    tokens,
                    self.health,
                    lambda: render(self.registry),
                    self.store,
                )
                self.http_listener = HTTPListener(listeners.http, app, http_context)
                host, port = await self._bind(
                    self.http_listener.start(),
                    "HTTP listener",
                    listeners.http.host,
                    listeners.http.port,
                    ("listeners", "http", "port"),
                )
                kind = "HTTPS" if http_context else "HTTP"
                self.bound.append(BoundListener(kind, "http", f"{host}:{port}"))
            for index, drop_config in enumerate(listeners.files):
                drop = FileDropListener(drop_config, self.intake)
                try:
                    folder = await drop.start()
                except OSError as err:
                    where = where_in_config(self.config, "listeners", "files", index, "directory")
                    problem = f"file drop '{drop_config.name}' cannot use its folders: {err}"
                    raise CarehubError(f"{problem} ({where})") from err
                self.file_listeners.append(drop)
                self.bound.append(BoundListener("file drop", drop.name, str(folder)))
        except BaseException:
            await self.stop()
            raise
        self.beacon = ProcessBeacon(
            self.store,
            "serve",
            lambda: self.reloader.route_set,
            partitions=None if self.work_queue.is_memory else self.work_queue.partitions,
            store_locked=self.store_lock is not None,
        )
        await self.beacon.start()
        self._serving = True
        log.info("carehub %s started with %d listener(s)", __version__, len(self.bound))
        return self.bound

    async def _bind(
        self,
        starting: Coroutine[Any, Any, tuple[str, int]],
        what: str,
        host: str,
        port: int,
        key: tuple[str | int, ...],
    ) -> tuple[str, int]:
        """Start a listener; a port that cannot be bound (in use, not allowed) is a CarehubError
        naming the listener, the address and the setting to change."""
        try:
            return await starting
        except OSError as err:
            reason = os.strerror(err.errno) if err.errno else str(err)
            where = where_in_config(self.config, *key)
            raise CarehubError(
                f"{what} cannot listen on {host}:{port}: {reason} ({where})"
            ) from err

    def _open_publisher(self) -> tuple[Publisher, QueueUnavailable | None]:
        """The work queue's publisher, connected, and None; or, when the broker cannot be
        reached now and no worker of this hub needs it to start, the publisher unconnected and
        why (intake stores and answers meanwhile, as through a later outage). A URL the broker
        refuses (its login, its virtual host) or no transport takes, or a broker down while
        the in-process worker needs it, is an error naming queue.url, not one blamed on the
        listeners."""
        assert self.store is not None
        publisher = self.work_queue.publisher(self.store.instance_id)
        try:
            self.work_queue.check()
            publisher.connect()
        except QueueUnavailable as err:
            if self.config.worker.enabled or isinstance(err, QueueMisconfigured):
                where = where_in_config(self.config, "queue", "url")
                raise CarehubError(f"{where}: {err}") from err
            return publisher, err
        return publisher, None

    def _keep_alive_seconds(self) -> float:
        """Seconds between the idle publisher's heartbeat exchanges: four per heartbeat."""
        return max(0.5, self.work_queue.heartbeat / 4)

    def _keep_queue_alive(self) -> None:
        """Between publishes, keep the publisher's broker connection alive (heartbeats both
        ways), through the publish thread as a publish of nothing: a connection that went
        silent is replaced, or, when no new one opens, counted as the broker being down,
        which /health then says, as a failed publish would."""
        self._keep_alive = asyncio.get_running_loop().call_later(
            self._keep_alive_seconds(), self._keep_queue_alive
        )
        if self.publisher is None or self._publish_thread is None:
            return
        if self._publishing or self._to_publish or self._unqueued or self._queue_down:
            return  # a publish, or the retries of one that failed, will find out
        self._publishing = True
        future = self._publish_thread.submit(self.publisher, [])
        future.add_done_callback(
            lambda done: self._published(
                [], RuntimeError("stopped") if done.cancelled() else done.result()
            )
        )

    async def _start_worker(self, worker: Worker) -> None:
        """Run the worker on this loop; return once it consumes, or raise why it could not."""
        ready = asyncio.Event()
        task = asyncio.create_task(worker.run(self._worker_stop, started=ready.set), name="worker")
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("the worker stopped as it started")
        self._worker_task = task
        task.add_done_callback(_report_worker_end)

    def _publish(self, message_id: int, patient_key: str) -> None:
        """Queue a newly stored message for routing, together with others stored meanwhile.

        Intake calls this as each message's commit settles. What settles within
        PUBLISH_GATHER goes as one queue message per partition: while the worker shares the
        loop, commit groups hold two or three messages, and a kombu publish for each took 2.6%
        of the loop under bench/bench_routing.py. Routing gathers longer than that anyway
        (ROUTE_GATHER)."""
        if not self._to_publish:
            asyncio.get_running_loop().call_later(PUBLISH_GATHER, self._publish_waiting)
        self._to_publish.append((message_id, patient_key))

    def _publish_waiting(self) -> None:
        """Publish what intake stored since the last call. On a broker the publish runs on a
        thread of its own, one at a time and in order: a broker that stops answering (no
        refusal, only silence) held the event loop, and every sender's ACK, for as long as
        kombu waited to connect. While the broker cannot be reached, what is stored is held
        (up to UNQUEUED_HELD ids; the workers' sweep finds any beyond) and publishing is
        tried again every QUEUE_RETRY seconds. One ERROR when publishing stops, one WARNING
        when it works again."""
        waiting, self._to_publish = self._to_publish, []
        if self.publisher is None:
            return
        # While the broker is down, tried again even with nothing to queue: a publish of
        # nothing connects, and so finds out that the broker is back.
        if not (waiting or self._unqueued or self._queue_down):
            return
        down = self._queue_down
        if self._publishing or (down is not None and time.monotonic() < down.retry_at):
            self._hold_unqueued(waiting)
            return
        batch, self._unqueued = [*self._unqueued, *waiting], []
        if self._publish_thread is None:  # the in-process queue: nothing to wait for
            self._published(batch, _publish(self.publisher, batch))
            return
        self._publishing = True
        future = self._publish_thread.submit(self.publisher, batch)
        future.add_done_callback(
            lambda done: self._published(
                batch, RuntimeError("stopped") if done.cancelled() else done.result()
            )
        )

    def _published(self, batch: list[tuple[int, str]], error: Exception | None) -> None:
        """A publish is over: hold its batch again if it failed, else say the queue is back
        and publish what waited meanwhile."""
        self._publishing = False
        loop = asyncio.get_running_loop()
        if error is not None:  # stored and ACKed already: held, and the sweep finds them
            self._unqueued = [*batch, *self._unqueued][:UNQUEUED_HELD]
            if self._queue_down is None:
                reason = str(error) or type(error).__name__
                self._queue_down = _QueueDown(datetime.now(UTC), reason)
                log.error(
                    "cannot queue stored messages for routing: %s; holding them and trying "
                    "again every %g s",
                    reason,
                    QUEUE_RETRY,
                )
            self._queue_down.retry_at = time.monotonic() + QUEUE_RETRY
            # Tried again then even if nothing new is stored meanwhile.
            loop.call_later(QUEUE_RETRY, self._publish_waiting)
            return
        if self._queue_down is not None:
            log.warning(
                "queueing for routing again after %s; %d message(s) held meanwhile queued",
                _since(self._queue_down.since),
                len(batch),
            )
            self._queue_down = None
        if self._unqueued or self._to_publish:
            loop.call_soon(self._publish_waiting)

    def _hold_unqueued(self, items: list[tuple[int, str]]) -> None:
        room = UNQUEUED_HELD - len(self._unqueued)
        self._unqueued.extend(items[: max(room, 0)])

    async def stop(self) -> None:
        """Stop accepting, finish what is in flight, commit it, close the store.

        Every listener stops at once: one still draining its connections must not leave the
        others taking new messages meanwhile."""
        self._serving = False
        if self.beacon is not None:
            await self.beacon.stop()
            self.beacon = None
        stopping = [listener.stop() for listener in self.mllp_listeners]
        stopping += [drop.stop() for drop in self.file_listeners]
        if self.http_listener:
            stopping.append(self.http_listener.stop())
        await asyncio.gather(*stopping)
        self._publish_waiting()
        if self._worker_task is not None:
            self._worker_stop.set()
            with contextlib.suppress(Exception):
                await self._worker_task
            self._worker_task = None
            self.worker = None
        if self._keep_alive is not None:
            self._keep_alive.cancel()
            self._keep_alive = None
        publisher_idle = True
        if self._publish_thread is not None:  # the last publish ends before its connection
            publisher_idle = await asyncio.to_thread(self._publish_thread.stop, PUBLISH_STOP_WAIT)
            self._publish_thread = None
            if not publisher_idle:
                log.warning(
                    "stopping without waiting longer for the broker, which has not answered "
                    "for %g s: what was stored and not yet queued is routed by the workers' "
                    "sweep",
                    PUBLISH_STOP_WAIT,
                )
        if self.publisher is not None:
            if publisher_idle:  # else its thread still holds it; the process exit ends both
                self.publisher.close()
            self.publisher = None
        if self.store is not None:
            await self.writer.close()
            await asyncio.to_thread(self.store.close)
            self.store = None
        self._release_store_lock()  # once the store is closed: the next hub may open it
        log.info("carehub stopped")

    async def reload_routes(self) -> bool:
        """Route with the route files as they are now, listeners untouched (SIGHUP).

        The new table is bound and its components started first; only then does it replace
        the old one, for new routing and new sends, while the sends already under way finish
        on the old components, which close after them. Invalid routes leave the hub running
        on the old ones (one ERROR line says why). Returns whether the new routes are in."""
        if not self._serving:
            log.warning("routes not reloaded: the hub is not running (yet)")
            return False
        loaded = await self.reloader.load(self.store)
        if loaded is None:
            self._note_routes()
            return False
        host, table, note = loaded
        if not self._serving:  # stopping since the new routes began to load
            await table.close()
            return False
        self.config = self.reloader.config
        old_table = self.table
        self.host, self.table = host, table
        if self.worker is not None:  # it closes the table it routed with, once done with it
            await self.worker.replace_routing(table, host)
        else:  # without a worker nothing runs on the components: started only to check them
            await table.close()
        self._note_routes()
        if self.beacon is not None:
            self.beacon.refresh()
        log_reloaded(old_table, table, note)
        return True

    def _note_routes(self) -> None:
        """Write the loaded route set and the reloads so far into the lock file."""
        if self.store_lock is not None:
            reloader = self.reloader
            self.store_lock.note(reloader.fingerprint, reloader.reloads, reloader.outcome)

    def _release_store_lock(self) -> None:
        if self.store_lock is not None:
            self.store_lock.release()
            self.store_lock = None

    async def serve_forever(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    def health(self) -> dict[str, Any]:
        """Whether intake can take messages now. The store answering a read is not enough: a
        held write lock or a full disk still answers SELECT 1 while every message is refused
        "not stored, please resend", so a write failure that has not cleared counts too.
        Then whether this hub's worker can use the store: while it cannot, routing and
        delivery stand still behind messages answered AA, and the status says "degraded"."""
        store_ok = self.store is not None and self.store.ping()
        writer: GroupCommit | None = getattr(self, "writer", None)  # set by start()
        if store_ok and writer is not None and not writer.writable():
            writes = writer.failures
            since = writes.failing_since_at
            when = since.isoformat(timespec="seconds") if since else "now"
            store_text = f"not storing since {when}: {writes.last_error}"
            short = writer.short_of_room()
            if short is not None:
                store_text += f" ({short})"
            store_ok = False
        else:
            store_text = "ok" if store_ok else "unavailable"
        worker_text = self._worker_health()
        if not store_ok:
            status = "store unavailable"
        else:
            status = "ok" if worker_text in ("ok", NO_WORKER) else "degraded"
        return {
            "status": status,
            "version": __version__,
            "store": store_text,
            "worker": worker_text,
            # Intake still stores and answers, so the status stays ok; routing waits.
            "queue": self._queue_health(),
            "listeners": [
                {"kind": b.kind, "name": b.name, "address": b.address} for b in self.bound
            ],
            "intake": {f"{k[0]}/{k[1]}": v for k, v in sorted(self.intake.counts.items())},
        }

    def _worker_health(self) -> str:
        """What /health says of this hub's worker: "ok", or since when and why its use of the
        store fails (its failure run: StoreTrouble), or that routing is left to others."""
        worker = self.worker
        if worker is None:
            return NO_WORKER
        run = worker.store_trouble.run
        since = run.failing_since_at
        if since is None:
            return "ok"
        return (
            f"cannot use the store since {since.isoformat(timespec='seconds')}: "
            f"{run.last_error}; routing and delivery wait"
        )

    def _queue_health(self) -> str:
        """What /health says of the queue: "ok", or what keeps stored messages from being
        routed now (intake cannot queue them, or this hub's worker lost its broker)."""
        down = self._queue_down
        if down is not None:
            since = down.since.isoformat(timespec="seconds")
            return f"cannot queue for routing since {since}: {down.reason}"
        lost = self.worker.broker_lost if self.worker is not None else None
        if lost is not None:
            since, reason = lost
            return (
                f"the worker cannot take queued messages since "
                f"{since.isoformat(timespec='seconds')}: {reason}"
            )
        return "ok"


#: /health's "worker" for a hub that routes nothing itself (`serve --no-worker`).
NO_WORKER = "none in this process"


def room_for_messages(config: HubConfig) -> int:
    """Free bytes a SQLite store's filesystem needs before a run of writes refused for lack
    of room ends (GroupCommit.room): twice the largest message any listener takes."""
    listeners = config.listeners
    sizes = [listeners.http.max_message_bytes]
    sizes += [listener.max_message_bytes for listener in [*listeners.mllp, *listeners.files]]
    return 2 * max(sizes)


def _report_worker_end(task: asyncio.Task[None]) -> None:
    """A worker that stops by itself (not through Hub.stop) is an error worth a log line."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the worker stopped with an error", exc_info=task.exception())
