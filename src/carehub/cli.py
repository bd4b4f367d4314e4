"""The carehub command line: serve, send, browse and prune messages, run the demo."""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import re
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from carehub import __version__
from carehub.cliparams import DAYS, LIMIT, MESSAGE_STATUS, PORT, ROW_ID, TIMEOUT
from carehub.config import (
    ENV_CONFIG,
    ENV_DATA_DIR,
    HubConfig,
    load_config,
    resolve_data_dir,
    without_password,
)
from carehub.errors import CarehubError

F = TypeVar("F", bound=Callable[..., Any])


def hub_options(func: F) -> F:
    """--config and --data-dir, shared by every command that touches the store."""

    @click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar=ENV_CONFIG,
        help=f"Hub config YAML (or ${ENV_CONFIG}).",
    )
    @click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help=f"Where the store lives (or ${ENV_DATA_DIR}; default ./data).",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, config_path: Path | None, data_dir: Path | None, **kwargs: Any) -> Any:
        config = load_config(config_path)
        return func(*args, config=config, data_dir=resolve_data_dir(config, data_dir), **kwargs)

    return wrapper  # type: ignore[return-value]


class CarehubGroup(click.Group):
    """Turns CarehubError into a one-line message and exit code 2, without a traceback, and
    adds the commands plugins register (carehub_register_commands)."""

    _plugin_commands: dict[str, click.Command] | None = None

    def _plugins(self) -> dict[str, click.Command]:
        if self._plugin_commands is None:
            from carehub.plugins import PluginHost

            try:
                host = PluginHost().load()
                self._plugin_commands = {c.name: c for c in host.commands if c.name}
            except CarehubError as err:
                click.echo(f"warning: plugin commands unavailable: {err}", err=True)
                self._plugin_commands = {}
        return self._plugin_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or self._plugins().get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return super().invoke(ctx)
        except CarehubError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except SQLAlchemyError as err:
            # The store refused the command's reads or writes (read-only, locked by another
            # process for longer than the busy timeout, gone): say so in a line, exit 1.
            reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
            click.echo(f"error: the store refused the command: {reason}", err=True)
            sys.exit(1)


@click.group(cls=CarehubGroup)
@click.version_option(__version__, prog_name="carehub")
def main() -> None:
    """carehub: HL7 v2 intake, routing and care-team notification."""


def setup_logging(level: str) -> None:
    """What `carehub serve` and `carehub worker` log, to stderr: carehub at ``level``, and the
    libraries that would log identifiers at INFO kept to their warnings."""
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO, URL included: noise per delivery, and a URL may
    # carry identifiers. Their warnings and errors still show.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, getattr(logging, level)))


# -- serve -----------------------------------------------------------------------------------
@main.command()
@hub_options
@click.option("--mllp-port", type=PORT, help="Port of the first MLLP listener (0 picks one).")
@click.option("--no-worker", is_flag=True, help="Listeners only; routing runs in `carehub worker`.")
@click.option("--http-port", type=PORT, help="Port of the HTTP listener (0 picks one).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def serve(
    config: HubConfig,
    data_dir: Path,
    mllp_port: int | None,
    http_port: int | None,
    no_worker: bool,
    log_level: str | None,
) -> None:
    """Run the hub until SIGTERM or Ctrl-C, then finish in-flight messages and exit 0."""
    from carehub.hub import Hub

    _apply_port_overrides(config, mllp_port, http_port)
    if no_worker:
        config.worker.enabled = False
    setup_logging(log_level or config.log_level)
    hub = Hub(config, data_dir)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        bound = await hub.start()
        click.echo(f"carehub {__version__}: store {_store_label(config, data_dir)}")
        for listener in bound:
            click.echo(f"{listener.kind} listener '{listener.name}' on {listener.address}")
        routes = ", ".join(r.name for r in hub.table.routes) or "none"
        worker = "in-process" if config.worker.enabled else "off (run `carehub worker`)"
        click.echo(f"routes: {routes}; worker: {worker}; queue: {_queue_label(config)}")
        settle_garbage_collector()
        click.echo("carehub ready")
        sys.stdout.flush()
        try:
            await stop.wait()
        finally:
            click.echo("carehub stopping: finishing in-flight messages")
            await hub.stop()

    try:
        asyncio.run(run())
    except OSError as err:
        raise CarehubError(f"cannot start a listener: {err}") from err


def settle_garbage_collector() -> None:
    """Tune Python's cyclic garbage collector for a long-running hub, once it has started.

    What start-up built (plugins, routes, parsed config, imported modules) lives as long as the
    process: ``gc.freeze`` takes it out of every later collection. Each message allocates
    thousands of short-lived objects, so the default youngest-generation threshold (700) ran a
    collection every few messages; 20,000 runs one every few hundred. Measured with
    bench/bench_routing.py --quick, two runs each: 419 and 388 msg/s end to end with the
    defaults, 448 and 420 with these settings.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 1_000)


def _apply_port_overrides(config: HubConfig, mllp_port: int | None, http_port: int | None) -> None:
    if mllp_port is not None:
        if not config.listeners.mllp:
            from carehub.config import MLLPListenerConfig

            config.listeners.mllp.append(MLLPListenerConfig())
        config.listeners.mllp[0].port = mllp_port
        config.overridden["listeners", "mllp", 0, "port"] = "--mllp-port"
    if http_port is not None:
        config.listeners.http.port = http_port
        config.listeners.http.enabled = True
        config.overridden["listeners", "http", "port"] = "--http-port"


def _queue_label(config: HubConfig) -> str:
    return without_password(config.queue.url)


def _store_label(config: HubConfig, data_dir: Path) -> str:
    from carehub.store.store import STORE_FILE

    if config.store.url:
        return without_password(config.store.url)
    return f"{data_dir / STORE_FILE} (SQLite, durability={config.store.durability})"


# -- send ------------------------------------------------------------------------------------
@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=PORT, default=2575, show_default=True)
@click.option("--tls", is_flag=True, help="Connect with TLS.")
@click.option("--ca", type=click.Path(path_type=Path, dir_okay=False), help="CA to trust.")
@click.option("--cert", type=click.Path(path_type=Path, dir_okay=False), help="Client certificate.")
@click.option("--key", type=click.Path(path_type=Path, dir_okay=False), help="Client key.")
@click.option("--insecure", is_flag=True, help="With --tls, do not verify the server.")
@click.option("--timeout", type=TIMEOUT, default=30.0, show_default=True)
def send(
    files: tuple[Path, ...],
    host: str,
    port: int,
    tls: bool,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    insecure: bool,
    timeout: float,
) -> None:
    """Send HL7 files over MLLP and print each ACK. Exit 1 on AE, AR or no answer."""
    from carehub.hl7.batch import split_messages

    outgoing: list[tuple[str, bytes]] = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CarehubError(f"{path}: cannot read: {err.strerror}") from err
        parts = split_messages(data)
        if not parts:
            raise CarehubError(f"{path}: no HL7 message in the file (no MSH segment)")
        for number, part in enumerate(parts, start=1):
            label = str(path) if len(parts) == 1 else f"{path} #{number}"
            outgoing.append((label, part))
    if key and not cert:
        raise click.UsageError("--key is the key of a client certificate: give --cert too")
    if insecure and not (tls or ca or cert):
        raise click.UsageError("--insecure only applies to a TLS connection: add --tls")
    context = _client_tls(ca, cert, key, insecure) if tls or ca or cert else None
    failures = asyncio.run(_send_all(outgoing, host, port, context, timeout))
    sys.exit(1 if failures else 0)


def _client_tls(ca: Path | None, cert: Path | None, key: Path | None, insecure: bool) -> Any:
    """The TLS context for `send`; a file that cannot be read or used is named, as a message
    file that cannot be read is."""
    import ssl

    from carehub.intake.tls import client_context

    given = [(option, path) for option, path in (("--ca", ca), ("--cert", cert), ("--key", key))]
    for option, path in given:
        if path is None:
            continue
        try:
            path.read_bytes()
        except OSError as err:
            raise CarehubError(f"{path}: cannot read ({option}): {err.strerror}") from err
    try:
        return client_context(ca, cert, key, verify=not insecure)
    except ssl.SSLError as err:
        files = ", ".join(f"{option} {path}" for option, path in given if path is not None)
        raise CarehubError(f"cannot use the TLS files ({files}): {err.reason or err}") from err


async def _send_all(
    outgoing: list[tuple[str, bytes]], host: str, port: int, context: Any, timeout: float
) -> int:
    from carehub.client import MLLPClient, NoAnswer
    from carehub.hl7.ack import read_ack
    from carehub.hl7.view import NotHL7Error

    failures = 0
    client = MLLPClient(host, port, ssl_context=context, timeout=timeout)
    try:
        await client.connect()
    except (OSError, TimeoutError) as err:
        # No answer at all is a failed send (exit 1, as documented), not a usage error (exit 2).
        click.echo(f"error: cannot connect to {host}:{port}: {err}", err=True)
        return len(outgoing)
    connected = True
    try:
        for index, (label, payload) in enumerate(outgoing):
            if not connected:  # the last one went unanswered: a fresh connection for this one
                try:
                    await client.connect()
                    connected = True
                except (OSError, TimeoutError) as err:
                    for unsent, _ in outgoing[index:]:
                        click.echo(f"{unsent}: not sent: cannot reconnect to {host}:{port}: {err}")
                    failures += len(outgoing) - index
                    break
            try:
                answer = await client.send(payload)
            except (NoAnswer, OSError) as err:
                click.echo(f"{label}: no answer: {err}")
                failures += 1
                await client.close()
                connected = False
                continue
            try:
                code, control_id, text = read_ack(answer.decode("utf-8", "replace"))
            except NotHL7Error:
                click.echo(f"{label}: answer is not an HL7 ACK")
                failures += 1
                continue
            suffix = f": {text}" if text else ""
            click.echo(f"{label}: {code} (MSH-10 {control_id or '-'}){suffix}")
            if code not in ("AA", "CA"):
                failures += 1
    finally:
        await client.close()
    return failures


# -- messages --------------------------------------------------------------------------------
@main.group()
def messages() -> None:
    """Browse stored messages."""


def _parse_since(value: str | None) -> datetime | None:
    if not value:
        return None
    match = re.fullmatch(r"(\d+)([smhd])", value)
    try:
        if match:
            seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
            return datetime.now(UTC) - timedelta(seconds=int(match.group(1)) * seconds)
        parsed = datetime.fromisoformat(value)
        # In UTC now, as the store compares: a time at the calendar's edge fails here, by name.
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except ValueError as err:
        raise click.BadParameter(
            f"{value!r}: use an ISO date/time (2026-11-25T08:00) or an age (30m, 2h, 7d)",
            param_hint="'--since'",
        ) from err
    except OverflowError as err:
        raise click.BadParameter(
            f"{value!r} reaches past the calendar's range", param_hint="'--since'"
        ) from err


@messages.command("list")
@hub_options
@click.option(
    "--status",
    type=MESSAGE_STATUS,
    help="received, refused, rejected, routed, unrouted, delivered or failed.",
)
@click.option("--type", "message_type", help="Message type (MSH-9.1), e.g. ADT.")
@click.option("--event", help="Trigger event (MSH-9.2), e.g. A01.")
@click.option("--patient", help="Patient identifier (PID-3.1).")
@click.option(
    "--since",
    callback=lambda _ctx, _param, value: _parse_since(value),
    help="ISO date/time or an age such as 30m, 2h, 7d.",
)
@click.option("--limit", type=LIMIT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_messages(
    config: HubConfig,
    data_dir: Path,
    status: str | None,
    message_type: str | None,
    event: str | None,
    patient: str | None,
    since: datetime | None,
    limit: int,
    as_json: bool,
) -> None:
    """List stored messages, newest first."""
    from carehub.hub import open_store

    store = open_store(config, data_dir, must_exist=True)
    try:
        found = store.find(
            status=status,
            message_type=message_type,
            event=event,
            patient=patient,
            since=since,
            limit=limit,
        )
    finally:
        store.close()
    if as_json:
        for message in found:
            click.echo(json.dumps(message.summary(), ensure_ascii=False))
        return
    from carehub.display import message_table

    message_table(found)


@messages.command("show")
@hub_options
@click.argument("message_id", type=ROW_ID)
@click.option("--raw", is_flag=True, help="Print the message text only.")
def show_message(config: HubConfig, data_dir: Path, message_id: int, raw: bool) -> None:
    """Header fields, status history, and the message segment by segment with field names."""
    from carehub.hub import open_store

    store = open_store(config, data_dir, must_exist=True)
    try:
        message = store.get(message_id)
        if message is None:
            raise CarehubError(
                f"no message with id {message_id} in {_store_label(config, data_dir)}"
            )
        history = store.history(message_id)
        from carehub.store.outbox import Outbox

        outbox = Outbox(store)
        steps = outbox.steps(message_id)
        sent = [(d, outbox.attempts(d.id)) for d in outbox.find(message_id=message_id, limit=None)]
    finally:
        store.close()
    if raw:
        click.echo(message.text.replace("\r\n", "\n").replace("\r", "\n"))
        return
    from carehub.display import show_message as render

    render(message, history, steps, sent)


@messages.command("reprocess")
@hub_options
@click.argument("message_ids", type=ROW_ID, nargs=-1, required=True)
def reprocess_messages(config: HubConfig, data_dir: Path, message_ids: tuple[int, ...]) -> None:
    """Run stored messages through the current routes again (new deliveries, new keys)."""
    from carehub.hub import build_routing, open_store
    from carehub.routing.router import Router
    from carehub.store.outbox import Outbox

    store = open_store(config, data_dir, must_exist=True)
    host, table = build_routing(config, data_dir, store)
    try:
        outbox = Outbox(store)

        async def run() -> None:
            await table.start()
            try:
                router = Router(table, host)
                for message_id in message_ids:
                    message = store.get(message_id)
                    if message is None:
                        raise CarehubError(f"no message with id {message_id}")
                    result = router.route(message, run=outbox.next_run(message_id))
                    outbox.record_routing([result])
                    matched = ", ".join(r.route for r in result.matched) or "no route"
                    click.echo(
                        f"message {message_id} (run {result.run}): {matched}; "
                        f"{len(result.deliveries)} deliveries queued"
                        + (f"; errors: {'; '.join(result.errors)}" if result.errors else "")
                    )
            finally:
                await table.close()

        asyncio.run(run())
    finally:
        store.close()
    click.echo("deliveries go out when a worker runs (`carehub serve` or `carehub worker`)")


# -- routes ----------------------------------------------------------------------------------
@main.group()
def routes() -> None:
    """Check and dry-run the routes."""


@routes.command("check")
@hub_options
def routes_check(config: HubConfig, data_dir: Path) -> None:
    """Validate the hub config, every route file and every plugin option, and load what the
    steps read at start (rosters, directories, code tables, TLS files) as `serve` would; no
    listener starts and nothing is sent."""
    from carehub.hub import build_routing, mllp_tls_contexts

    host, table = build_routing(config, data_dir)
    mllp_tls_contexts(config)

    async def start_and_close() -> None:
        await table.start()
        await table.close()

    asyncio.run(start_and_close())
    click.echo(f"plugins: {len(host.plugins)} loaded, {len(host.failures)} failed")
    for failure in host.failures:
        click.echo(f"  failed: {failure.name} ({failure.source}): {failure.error}")
    for route in table.routes:
        steps = ", ".join(step.label for step in route.steps)
        click.echo(f"route {route.name} ({route.source.where()}): {steps}")
    click.echo(f"ok: {len(table.routes)} route(s), {len(table.destinations)} destination(s)")
    if host.failures:
        sys.exit(1)


@routes.command("test")
@hub_options
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def routes_test(config: HubConfig, data_dir: Path, files: tuple[Path, ...], as_json: bool) -> None:
    """Show what the routes would do with each message in FILES, without sending anything."""
    from carehub.hl7.batch import split_messages
    from carehub.hub import build_routing
    from carehub.routing.dryrun import dry_run_all, result_as_json

    host, table = build_routing(config, data_dir)
    labels: list[str] = []
    payloads: list[bytes] = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CarehubError(f"{path}: cannot read: {err.strerror}") from err
        parts = split_messages(data)
        if not parts:
            raise CarehubError(f"{path}: no HL7 message in the file (no MSH segment)")
        for number, payload in enumerate(parts, start=1):
            labels.append(str(path) if len(parts) == 1 else f"{path} #{number}")
            payloads.append(payload)
    for label, result in zip(labels, dry_run_all(table, host, payloads), strict=True):
        if as_json:
            click.echo(json.dumps({"file": label, **result_as_json(result)}, default=str))
        else:
            from carehub.display import show_dry_run

            show_dry_run(label, result)


# -- dead letters ----------------------------------------------------------------------------
@main.group("dead-letters")
def dead_letters() -> None:
    """Deliveries that gave up: list them, send them again."""


@dead_letters.command("list")
@hub_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--limit", type=LIMIT, default=100, show_default=True)
def dead_letters_list(config: HubConfig, data_dir: Path, as_json: bool, limit: int) -> None:
    """Dead-lettered deliveries with their last error."""
    from carehub.hub import open_store
    from carehub.store.outbox import Outbox
    from carehub.store.schema import DeliveryStatus

    store = open_store(config, data_dir, must_exist=True)
    try:
        dead = Outbox(store).find(status=DeliveryStatus.DEAD.value, limit=limit)
    finally:
        store.close()
    if as_json:
        for d in dead:
            click.echo(
                json.dumps(
                    {
                        "id": d.id,
                        "message_id": d.message_id,
                        "route": d.route,
                        "destination": d.destination,
                        "channel": d.channel,
                        "attempts": d.attempts,
                        "last_error": d.last_error,
                        "updated_at": d.updated_at.isoformat(),
                    }
                )
            )
        return
    from carehub.display import delivery_table

    delivery_table(dead, "Dead letters")


@dead_letters.command("retry")
@hub_options
@click.argument("delivery_ids", type=ROW_ID, nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Every dead letter.")
def dead_letters_retry(
    config: HubConfig, data_dir: Path, delivery_ids: tuple[int, ...], retry_all: bool
) -> None:
    """Queue dead letters again with a fresh set of attempts."""
    from carehub.hub import open_store
    from carehub.store.outbox import Outbox
    from carehub.store.schema import DeliveryStatus

    if not delivery_ids and not retry_all:
        raise click.UsageError("name delivery ids, or pass --all")
    store = open_store(config, data_dir, must_exist=True)
    try:
        outbox = Outbox(store)
        found = outbox.statuses(list(delivery_ids)) if delivery_ids else {}
        count = outbox.retry_dead(None if retry_all else list(delivery_ids))
    finally:
        store.close()
    for delivery_id in dict.fromkeys(delivery_ids):  # each named id that was not retried
        status = found.get(delivery_id)
        if status is None:
            click.echo(f"delivery {delivery_id}: no such delivery", err=True)
        elif status != DeliveryStatus.DEAD.value:
            click.echo(
                f"delivery {delivery_id}: {status}, not a dead letter; left as it is", err=True
            )
    click.echo(f"{count} dead letter(s) queued again; a running worker sends them")
    if delivery_ids and count < len(delivery_ids):
        sys.exit(1)


# -- plugins and workers ---------------------------------------------------------------------
@main.command("plugins")
@click.option("--json", "as_json", is_flag=True)
def plugins_command(as_json: bool) -> None:
    """Every plugin loaded, its version, and the components and hooks it provides."""
    from carehub.plugins import PluginHost

    host = PluginHost().load()
    rows = [
        {
            "name": p.name,
            "source": p.source,
            "version": p.version or __version__,
            "components": p.components,
            "hooks": p.hooks,
        }
        for p in host.plugins.values()
    ]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
    else:
        for row in rows:
            click.echo(f"{row['name']} {row['version']} ({row['source']})")
            for component in row["components"]:
                click.echo(f"    {component}")
            click.echo(f"    hooks: {', '.join(row['hooks']) or '-'}")
    for failure in host.failures:
        click.echo(f"{failure.name} ({failure.source}): FAILED TO LOAD: {failure.error}")


@main.command("worker")
@hub_options
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def worker_command(config: HubConfig, data_dir: Path, log_level: str | None) -> None:
    """Route and deliver only (scale-out): run as many as needed beside `serve --no-worker`."""
    from carehub.hub import build_routing, open_store
    from carehub.worker import Worker, WorkerSettings
    from carehub.workqueue import WorkQueue

    setup_logging(log_level or config.log_level)
    if config.queue.url.startswith("memory"):
        raise CarehubError(
            "queue.url: a separate worker needs a shared broker (amqp://...); memory:// only "
            "works inside `carehub serve`"
        )
    from carehub.config import where_in_config
    from carehub.workqueue import QueueUnavailable

    work_queue = WorkQueue(config.queue.url, config.queue.partition_count())
    try:
        work_queue.check()
    except QueueUnavailable as err:
        raise CarehubError(f"{where_in_config(config, 'queue', 'url')}: {err}") from err
    store = open_store(config, data_dir)
    host, table = build_routing(config, data_dir, store)
    settings = WorkerSettings(
        config.worker.delivery_concurrency,
        config.worker.per_destination,
        config.worker.poll_interval,
        single_host=False,
        tick_interval=config.worker.tick_interval,
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker = Worker(store, table, host, work_queue, settings)
        click.echo(f"carehub worker: {len(table.routes)} route(s), queue {_queue_label(config)}")
        settle_garbage_collector()
        click.echo("carehub ready")
        sys.stdout.flush()
        await worker.run(stop)

    try:
        asyncio.run(run())
    finally:
        store.close()


# -- store maintenance -----------------------------------------------------------------------
@main.group()
def store() -> None:
    """Store maintenance: schema upgrades and retention."""


@store.command("upgrade")
@hub_options
def store_upgrade(config: HubConfig, data_dir: Path) -> None:
    """Apply schema migrations (also done on every start)."""
    from carehub.hub import open_store

    opened = open_store(config, data_dir)
    click.echo(f"store at schema revision {opened.schema_revision()}")
    opened.close()


@store.command("prune")
@hub_options
@click.option("--older-than", "days", type=DAYS, required=True, help="Days.")
@click.option("--full", is_flag=True, help="PostgreSQL: VACUUM FULL (locks the tables).")
def store_prune(config: HubConfig, data_dir: Path, days: int, full: bool) -> None:
    """Delete messages received more than N days ago and reclaim the space."""
    from carehub.hub import open_store

    opened = open_store(config, data_dir, must_exist=True)
    try:
        result = opened.prune(timedelta(days=days), full_vacuum=full)
    finally:
        opened.close()
    line = f"pruned {result.messages_deleted} message(s) older than {days} day(s)"
    if result.bytes_before is not None and result.bytes_after is not None:
        what = "store file" if opened.is_sqlite else "message tables"
        line += f"; {what} {result.bytes_before:,} -> {result.bytes_after:,} bytes"
    click.echo(line)


# -- demo ------------------------------------------------------------------------------------
@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Hub config (default: config/carehub.yaml of this checkout).",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Keep the demo store here (default: a fresh temporary folder).",
)
def demo(config_path: Path | None, data_dir: Path | None) -> None:
    """Run the hub on the sample config and feeds, and show what it received and answered."""
    from carehub.demo import run_demo

    sys.exit(run_demo(config_path, data_dir))


if __name__ == "__main__":
    main()
