"""The carehub command line: serve, send, browse and prune messages, run the demo."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from carehub import __version__
from carehub.cliparams import (
    AGE,
    DAYS,
    LIMIT,
    MESSAGE_STATUS,
    PORT,
    ROW_ID,
    TIMEOUT,
    moment,
)
from carehub.config import (
    ENV_CONFIG,
    ENV_DATA_DIR,
    HubConfig,
    load_config,
    resolve_data_dir,
    without_password,
)
from carehub.errors import CarehubError
from carehub.search import (
    FieldMatch,
    MessageFilter,
    parse_message_type,
    parse_patient,
    parse_sender,
)

if TYPE_CHECKING:
    from carehub.routing.router import RoutingResult
    from carehub.store.outbox import LineReport, PlaceTaken
    from carehub.store.store import CareRecordsPlan, MessageStore, PrunePlan, StoredMessage

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


def operator_option(func: F) -> F:
    """--by: who runs an action, for the audit trail (`carehub audit list`)."""
    return click.option(
        "--by",
        "operator",
        help="Who, for the audit trail; by default this session's login name and host.",
    )(func)


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
    """Run the hub until SIGTERM or Ctrl-C, then finish in-flight messages and exit 0.
    SIGHUP (or `carehub routes reload`) reloads the routes, listeners left open."""
    from carehub.hub import Hub, keep_written_files_private

    keep_written_files_private()
    _apply_port_overrides(config, mllp_port, http_port)
    if no_worker:
        config.worker.enabled = False
        from carehub.hub import check_workers_can_consume

        check_workers_can_consume(config)
    setup_logging(log_level or config.log_level)
    hub = Hub(config, data_dir)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        on_sighup(hub.reload_routes)
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


def on_sighup(reload: Callable[[], Any]) -> None:
    """Run ``reload()`` (a coroutine function) on each SIGHUP, one at a time; a SIGHUP that
    comes while one runs is not lost, it runs next."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[Any]] = set()

    def reload_safely() -> None:
        task = loop.create_task(reload())
        running.add(task)
        task.add_done_callback(running.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_safely)


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
    """Send HL7 files over MLLP and print each ACK. Exit 1 on AE, AR or no answer.

    A file holding text outside its messages (a note typed after one) is refused before
    anything is sent, naming where: sending the messages without it would pass the text over
    in silence, and whoever wrote it may have meant it for the receiver. So is a batch that
    does not hold together (a trailer missing, BTS-1 or FTS-1 counting other than it holds):
    a cut-off copy would be taken for the whole batch."""
    from carehub.hl7.batch import split_data

    outgoing: list[tuple[str, bytes]] = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CarehubError(f"{path}: cannot read: {err.strerror}") from err
        contents = split_data(data)
        parts = [message.data for message in contents.messages]
        if not parts:
            raise CarehubError(f"{path}: no HL7 message in the file (no MSH segment)")
        if contents.stray:
            raise CarehubError(_stray_text_problem(path, contents.stray))
        if contents.batch_problems:
            raise CarehubError(
                f"{path}: the batch does not hold together: {'; '.join(contents.batch_problems)}"
                "; nothing was sent"
            )
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


def _stray_text_problem(path: Path, stray: list[Any]) -> str:
    """Where a file to send holds text outside its messages (batch.Stray items), by byte
    offset and size as the file drop names it; never the text, which may hold PHI."""
    places = ", ".join(f"{len(item.data)} bytes at byte {item.offset}" for item in stray)
    return (
        f"{path}: text outside any HL7 message ({places}): not HL7 segments, so nothing was "
        "sent; remove it from the file, or make it a segment (NTE) of the message it belongs to"
    )


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
    from carehub.client import MLLPClient, NoAnswer, NoApplicationAck
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
            except NoApplicationAck as err:
                # Committed (CA): the message is the receiver's; only its outcome is unknown.
                answer = err.accept
                click.echo(f"{label}: no application ACK in {timeout:g} s after the CA")
                await client.close()
                connected = False
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


def _field_matches(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[FieldMatch, ...]:
    matches = []
    for value in values:
        try:
            matches.append(FieldMatch.parse(value))
        except ValueError as err:
            raise click.BadParameter(f"{value!r}: {err}", ctx, param) from err
    return tuple(matches)


def _sender(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    try:
        return parse_sender(value)
    except ValueError as err:
        raise click.BadParameter(f"{value!r}: {err}", ctx, param) from err


def _message_type(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    try:
        return parse_message_type(value)
    except ValueError as err:
        raise click.BadParameter(f"{value!r}: {err}", ctx, param) from err


def _patient(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    try:
        return parse_patient(value)
    except ValueError as err:
        raise click.BadParameter(f"{value!r}: {err}", ctx, param) from err


def _some_text(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value == "":
        raise click.BadParameter("give the text to look for", ctx, param)
    return value


_FILTER_OPTIONS = (
    click.option(
        "--status",
        type=MESSAGE_STATUS,
        help="received, refused, rejected, routed (deliveries to make), unrouted, filtered "
        "(routes matched, nothing to deliver), delivered or failed.",
    ),
    click.option(
        "--type",
        "message_type",
        metavar="TYPE[^EVENT]",
        callback=_message_type,
        help="Message type (MSH-9.1), e.g. ADT; or with its event as listed, e.g. ADT^A01.",
    ),
    click.option("--event", help="Trigger event (MSH-9.2, else EVN-1), e.g. A01."),
    click.option(
        "--patient",
        metavar="ID[^AUTHORITY]",
        callback=_patient,
        help="Patient identifier (PID-3.1), at every facility; or with its assigning "
        "authority as listed (CX.4's namespace ID, else its universal ID, else the sending "
        "facility's code), e.g. RG100234^RGH.",
    ),
    click.option(
        "--listener",
        metavar="[TRANSPORT:]NAME",
        help="Listener that received it: its name, or transport:name as listed (mllp:adt).",
    ),
    click.option(
        "--sender",
        metavar="APP[^FACILITY]",
        callback=_sender,
        help="Sending application (MSH-3) and facility (MSH-4), each the whole field or its "
        "first component; ^FACILITY alone for the facility only.",
    ),
    click.option("--control-id", help="Message control ID (MSH-10)."),
    click.option(
        "--since",
        callback=moment,
        help="Received at or after: ISO date/time or an age such as 30m, 2h, 7d.",
    ),
    click.option(
        "--until",
        callback=moment,
        help="Received before: ISO date/time or an age such as 30m, 2h, 7d.",
    ),
    click.option(
        "--field",
        "field_matches",
        metavar="PATH=VALUE",
        multiple=True,
        callback=_field_matches,
        help="The value at a field path, as a route reads it, e.g. PID-5.1=DOE or "
        "PV1-3.4=NORTH (repeatable; every one must hold).",
    ),
    click.option(
        "--contains",
        callback=_some_text,
        help="Text anywhere in the message, in any case.",
    ),
)


def message_filters(func: F) -> F:
    """The search options of `messages list`, `reprocess` and `export`, handed to the command
    as one MessageFilter (``filters``), so that the three commands select alike."""

    @functools.wraps(func)
    def wrapper(
        *args: Any,
        status: str | None,
        message_type: tuple[str | None, str | None],
        event: str | None,
        patient: tuple[str | None, str | None],
        listener: str | None,
        sender: tuple[str | None, str | None],
        control_id: str | None,
        since: datetime | None,
        until: datetime | None,
        field_matches: tuple[FieldMatch, ...],
        contains: str | None,
        **kwargs: Any,
    ) -> Any:
        if since is not None and until is not None and until <= since:
            raise click.BadParameter(
                "must be later than --since", click.get_current_context(), param_hint="'--until'"
            )
        type_name, type_event = message_type
        if type_event and event and type_event.upper() != event.upper():
            raise click.BadParameter(
                f"{event!r}: --type {type_name or ''}^{type_event} names another event",
                click.get_current_context(),
                param_hint="'--event'",
            )
        filters = MessageFilter(
            status=status,
            message_type=type_name,
            event=event or type_event,
            patient=patient[0],
            patient_authority=patient[1],
            listener=listener,
            sending_application=sender[0],
            sending_facility=sender[1],
            control_id=control_id,
            since=since,
            until=until,
            fields=field_matches,
            contains=contains,
        )
        return func(*args, filters=filters, **kwargs)

    for option in reversed(_FILTER_OPTIONS):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


class _ScanCount:
    """How many stored messages a content search (--field, --contains) read, told on stderr
    at the end and, on a terminal, as it goes: such a search reads the messages themselves,
    and on a large store that takes long enough to want to see it move."""

    def __init__(self, filters: MessageFilter) -> None:
        self.shown = filters.reads_content
        self.live = self.shown and sys.stderr.isatty()
        self.scanned = 0

    def __call__(self, scanned: int) -> None:
        self.scanned = scanned
        if self.live:
            click.echo(f"\rscanned {scanned:,} message(s)...", err=True, nl=False)

    def report(self, matched: int) -> None:
        if self.shown:
            erase = "\r\x1b[K" if self.live else ""
            click.echo(f"{erase}scanned {self.scanned:,} message(s), {matched:,} matched", err=True)


def _message_line(message: StoredMessage) -> str:
    """One message on one line, for lists of what a command would do (no patient data)."""
    kind = "^".join(part for part in (message.message_type, message.trigger_event) if part)
    received = message.received_at.strftime("%Y-%m-%d %H:%M:%S")
    return f"{message.id}\t{received}\t{kind or '-'}\t{message.control_id or '-'}\t{message.status}"


@messages.command("list")
@hub_options
@message_filters
@click.option("--limit", type=LIMIT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_messages(
    config: HubConfig, data_dir: Path, filters: MessageFilter, limit: int, as_json: bool
) -> None:
    """List stored messages, newest first.

    --field and --contains read the messages themselves, newest first, until --limit of them
    match; how many were read is told on stderr."""
    from carehub.hub import open_store

    store = open_store(config, data_dir, must_exist=True)
    count = _ScanCount(filters)
    try:
        found = list(store.search(filters, limit=limit, on_page=count))
        if not found:
            _note_unseen_listener(store, filters)
    finally:
        store.close()
    count.report(len(found))
    if as_json:
        for message in found:
            click.echo(json.dumps(message.summary(), ensure_ascii=False))
    else:
        from carehub.display import message_table

        message_table(found)
    if len(found) == limit:
        click.echo(f"(the newest {limit}; there may be more: --limit N shows more)", err=True)


def _note_unseen_listener(store: MessageStore, filters: MessageFilter) -> None:
    """On stderr, when no stored message came in by the --listener given, the listeners that
    messages did come in by: a mistyped name must not read as "nothing came in"."""
    if not filters.listener:
        return
    seen = store.listeners()
    if any(filters.names_listener(transport, name) for transport, name in seen):
        return
    known = ", ".join(f"{transport}:{name}" for transport, name in seen)
    click.echo(
        f"note: no stored message came in by listener {filters.listener!r}; "
        + (f"the store has messages from: {known}" if known else "the store holds no message"),
        err=True,
    )


@messages.command("show")
@hub_options
@click.argument("message_id", type=ROW_ID)
@click.option("--raw", is_flag=True, help="Print the message text only.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object: header, text, history, route steps, deliveries with attempts.",
)
@click.option("--payload", is_flag=True, help="What each delivery sends, in full.")
@click.option("--full", is_flag=True, help="Route step outputs whole, not cut short.")
@operator_option
def show_message(
    config: HubConfig,
    data_dir: Path,
    message_id: int,
    raw: bool,
    as_json: bool,
    payload: bool,
    full: bool,
    operator: str | None,
) -> None:
    """Header fields, status history, route steps, deliveries, and the message segment by
    segment with field names.

    --payload prints what each delivery sends (decoded text, a segment a line; binary as
    base64), --full each route step's output whole; --json has it all, nothing cut short (its
    payloads with --payload). Each use is recorded in the audit trail (`carehub audit list`):
    it prints a patient's message."""
    from carehub.hub import open_store

    if raw and (as_json or payload or full):
        raise click.UsageError("--raw prints the message text alone; leave out the others")
    store = open_store(config, data_dir, must_exist=True)
    try:
        with _audited(store, "messages show", f"message {message_id}", operator) as action:
            # Which parts it printed, never their content.
            shown = ["the message text" if raw or as_json else "the message field by field"]
            shown += ["route step outputs whole"] if (full or as_json) and not raw else []
            shown += ["delivery payloads"] if payload else []
            action.detail = "printed: " + ", ".join(shown)
            message = store.get(message_id)
            if message is None:
                raise CarehubError(
                    f"no message with id {message_id} in {_store_label(config, data_dir)}"
                )
            history = store.history(message_id)
            from carehub.store.outbox import Outbox

            outbox = Outbox(store)
            steps = outbox.steps(message_id)
            sent = [
                (d, outbox.attempts(d.id)) for d in outbox.find(message_id=message_id, limit=None)
            ]
            held = outbox.holding([d.id for d, _ in sent])  # behind which dead letters
    finally:
        store.close()
    if raw:
        click.echo(message.text.replace("\r\n", "\n").replace("\r", "\n"))
        return
    if as_json:
        from carehub.display import message_json

        shown = message_json(message, history, steps, sent, payloads=payload, held=held)
        click.echo(json.dumps(shown, default=str, ensure_ascii=False))
        return
    from carehub.display import show_message as render

    render(message, history, steps, sent, full=full, payloads=payload, held=held)


@messages.command("reprocess")
@hub_options
@click.argument("message_ids", type=ROW_ID, nargs=-1)
@message_filters
@click.option("--limit", type=LIMIT, help="With filters: only the newest N matches.")
@click.option(
    "--undelivered",
    is_flag=True,
    help="Send only to destinations that have not delivered the message yet.",
)
@click.option(
    "--destination",
    "destinations",
    multiple=True,
    metavar="NAME",
    help="Send only to this destination (repeatable); others are left out.",
)
@click.option("--dry-run", is_flag=True, help="List what would be reprocessed; change nothing.")
@click.option("--yes", is_flag=True, help="With filters: do not ask before reprocessing.")
@operator_option
def reprocess_messages(
    config: HubConfig,
    data_dir: Path,
    message_ids: tuple[int, ...],
    filters: MessageFilter,
    limit: int | None,
    undelivered: bool,
    destinations: tuple[str, ...],
    dry_run: bool,
    yes: bool,
    operator: str | None,
) -> None:
    """Run stored messages through the current routes again (new deliveries, new keys).

    Give message ids, or the filters of `messages list` to reprocess every match
    (`--status failed --since 2h`): how many match is shown and confirmed first (--yes
    skips the question), and they are reprocessed oldest first, so that each patient's
    messages reach the destinations in the order they were received.

    Every destination the routes reach gets the message again, under a new key its
    receiver cannot take for a repeat: what a corrected route is for. --undelivered sends
    only where it has not been delivered (after a dead letter, say), --destination only
    where named. Where an earlier run's delivery has not been made yet (a dead letter, or
    one waiting), the new one takes its place, and its place in the patient's line: the
    message is not sent twice, nor after the patient's later messages."""
    from carehub.hub import open_store

    ctx = click.get_current_context()
    if message_ids and not filters.is_empty():
        raise click.UsageError("give message ids or filters, not both", ctx)
    if not message_ids and filters.is_empty():
        raise click.UsageError(
            "give message ids, or filters that select messages (e.g. --status failed --since 2h)",
            ctx,
        )
    if message_ids and limit is not None:
        raise click.UsageError("--limit goes with filters, not with message ids", ctx)
    store = open_store(config, data_dir, must_exist=True)
    try:
        if message_ids:
            chosen = store.get_many(list(message_ids))
            known = {message.id for message in chosen}
            for message_id in message_ids:
                if message_id not in known:
                    raise CarehubError(f"no message with id {message_id}")
            if dry_run:
                for message in chosen:
                    click.echo(_message_line(message))
            ids = list(message_ids)
            turned_away = sum(1 for message in chosen if _turned_away_at_intake(message))
        else:
            # Only the ids (and, for a dry run, a line each) are kept: the messages are read
            # again one at a time as they are routed.
            count = _ScanCount(filters)
            ids: list[int] = []
            lines: list[str] = []
            turned_away = 0
            for message in store.search(filters, limit=limit, on_page=count):
                ids.append(message.id)
                turned_away += bool(_turned_away_at_intake(message))
                if dry_run:
                    lines.append(_message_line(message))
            count.report(len(ids))
            if not ids:
                _note_unseen_listener(store, filters)
            ids.reverse()  # oldest first
            for line in reversed(lines):
                click.echo(line)
            click.echo(f"{len(ids)} message(s) match")
        if ids:
            _warn_if_hub_runs_other_routes(config, data_dir, store)
            if not undelivered:
                _warn_of_deliveries_made(store, ids, destinations)
        if dry_run:
            left = (
                f", {turned_away} left as they are (refused or rejected at intake)"
                if turned_away
                else ""
            )
            click.echo(
                f"dry run: {len(ids) - turned_away} message(s) would be reprocessed{left}; "
                "nothing changed"
            )
            return
        if not ids:
            return
        if not message_ids and not yes:
            click.confirm(f"Reprocess {len(ids)} message(s)?", abort=True)
        target = _ids_text("messages", ids) if message_ids else _filter_text(filters, limit)
        if undelivered or destinations:
            only = [*(["undelivered"] if undelivered else []), *destinations]
            target += f" (only: {', '.join(only)})"
        choice = DestinationChoice(frozenset(destinations), undelivered)
        with _audited(store, "messages reprocess", target, operator) as action:
            if not message_ids:
                action.detail = _ids_text("matched messages", ids)
            by = operator or _operator()
            _reprocess(config, data_dir, store, ids, action.counts, choice, by)
            if action.counts["skipped"] or action.counts["failed"]:
                action.outcome = "partial"
    finally:
        store.close()
    click.echo("deliveries go out when a worker runs (`carehub serve` or `carehub worker`)")
    if action.counts["skipped"] or action.counts["failed"]:
        sys.exit(1)


@dataclass(frozen=True, slots=True)
class DestinationChoice:
    """Which of a reprocess run's deliveries go out: only the named destinations (none named:
    all), and with ``undelivered`` only those that have not delivered the message before."""

    names: frozenset[str] = frozenset()
    undelivered: bool = False

    def keeps(self, destination: str, delivered_before: set[str]) -> bool:
        if self.names and destination not in self.names:
            return False
        return not (self.undelivered and destination in delivered_before)


def _warn_of_deliveries_made(
    store: MessageStore, message_ids: list[int], destinations: tuple[str, ...]
) -> None:
    """Say how many deliveries already made would be made again, under new keys."""
    from carehub.store.outbox import Outbox

    outbox = Outbox(store)
    made = 0
    for message_id in message_ids:
        delivered = outbox.delivered_destinations(message_id)
        made += len(delivered & set(destinations)) if destinations else len(delivered)
    if made:
        click.echo(
            f"note: {made} delivery(ies) of these messages were already made and will be made "
            "again under new keys (a receiver cannot tell them for repeats); --undelivered "
            "leaves those destinations out",
            err=True,
        )


def _note_discarded_left_out(
    message_id: int, result: RoutingResult, choice: DestinationChoice, discarded: set[str]
) -> None:
    """--undelivered leaves out where an operator discarded the message's dead letter: a
    decision not to send it there, which a reprocess by status must not undo unasked."""
    routed = {d.destination for r in result.routes for d in r.deliveries}
    named = routed & discarded
    if choice.names:
        named &= choice.names
    if named:
        click.echo(
            f"message {message_id}: left out {', '.join(sorted(named))}, where its dead "
            "letter was discarded; name the destination with --destination, without "
            "--undelivered, to send it there anyway",
            err=True,
        )


def _warn_of_overtaking(outbox: Any, message_id: int, result: RoutingResult) -> None:
    """Say where the message will arrive after its patient's later messages: what
    `dead-letters retry` warns of too (an A04 after the A03 it preceded)."""
    lines = {d.destination: d.line or d.destination for r in result.routes for d in r.deliveries}
    later = outbox.later_delivered(message_id, set(lines), lines)
    for destination, count in sorted(later.items()):
        click.echo(
            f"warning: message {message_id} reaches {destination} after {count} later "
            "message(s) of the same patient already delivered there: the receiver gets it "
            "out of order",
            err=True,
        )


def _keep_chosen(result: RoutingResult, choice: DestinationChoice, delivered: set[str]) -> int:
    """Take the deliveries ``choice`` leaves out off their routes' results; how many."""
    left_out = 0
    for route in result.routes:
        kept = [d for d in route.deliveries if choice.keeps(d.destination, delivered)]
        left_out += len(route.deliveries) - len(kept)
        route.deliveries = kept
    return left_out


def _deliveries_text(places: list[PlaceTaken]) -> str:
    """``dead letter #108`` / ``deliveries #95 (pending), #108 (dead)``."""
    if len(places) == 1:
        only = places[0]
        return f"{'dead letter' if only.was == 'dead' else 'delivery'} #{only.delivery_id}" + (
            "" if only.was == "dead" else f" ({only.was})"
        )
    return "deliveries " + ", ".join(f"#{p.delivery_id} ({p.was})" for p in places)


def _queued_and_suppressed(
    outbox: Any, result: RoutingResult, carried: list[PlaceTaken], dropped: int
) -> tuple[int, list[str]]:
    """Of a recorded reprocess run: how many deliveries are queued to be sent, and why each
    notice or delivery that is not was suppressed (one reason each, said where it was
    decided). Suppressed: a notice its notify step decided not to make (told by an earlier
    run of the message, a referral closed already); a delivery its channel found nothing to
    send for at routing time (written, and skipped in its turn: the FHIR copy of a referral
    that an early cancel closed); ``dropped``, planned under keys an earlier run used (the
    outbox leaves them out, so nobody is told twice)."""
    reasons: list[str] = []
    for step in result.steps:
        if step.outcome != "ok" or not step.step.startswith("notify"):
            continue
        for decision in step.output if isinstance(step.output, list) else []:
            if isinstance(decision, dict) and decision.get("status") == "suppressed":
                why = decision.get("reason") or "suppressed"
                reasons.append(f"{step.route}/{step.step}: {why}")
                # Left out by the outbox, which marked its decision: said here, not twice.
                dropped -= "told_by_run" in decision
    queued = 0
    sent_as = [(d.destination, d.outgoing.payload, d.outgoing.metadata) for d in result.deliveries]
    for place in carried:
        record = outbox.get(place.delivery_id)
        if record is not None:
            sent_as.append((record.destination, record.payload, record.metadata))
        else:
            queued += 1  # discarded or pruned since: counted as the outbox took it
    for destination, payload, metadata in sent_as:
        not_sent = metadata.get("not_sent")
        if payload or not not_sent:
            queued += 1
        else:
            reasons.append(f"{destination}: {not_sent}")
    reasons.extend(["planned under a key an earlier run used: not made again"] * max(0, dropped))
    return queued, reasons


def _suppressed_text(reasons: list[str]) -> str:
    """``3 suppressed (a: why; b: why (2 of them))``: each reason once."""
    from collections import Counter

    grouped = [f"{r} ({n} of them)" if n > 1 else r for r, n in Counter(reasons).items()]
    return f"{len(reasons)} suppressed ({'; '.join(grouped)})"


def _warn_if_hub_runs_other_routes(config: HubConfig, data_dir: Path, store: MessageStore) -> None:
    """Reprocess routes with the files on disk: say so when a process routing from this
    store loaded other ones, or live messages and reprocessed ones go out differently. The
    SQLite hub's lock file also covers the config; the process registry covers every store,
    a scale-out deployment's workers on other hosts included."""
    from carehub.hub import route_fingerprint, route_set_digest
    from carehub.lockfile import serving_note
    from carehub.store.processes import running_processes

    note = serving_note(config, data_dir)
    if note is not None and note.routes is not None and note.routes != route_fingerprint(config):
        click.echo(
            f"warning: the config or route files, or the environment variables they name "
            f"(such as a ${{VAR}} URL), differ from those the running hub (pid {note.pid}) "
            "loaded: these messages are routed with the files and environment here, new ones "
            "with the hub's; `carehub routes reload` makes the hub take the files too, and "
            "running this command with the hub's environment makes the rest the same",
            err=True,
        )
        return
    now = datetime.now(UTC)
    with store.engine.connect() as conn:
        processes = running_processes(conn)
    mine = route_set_digest(config)
    behind = [
        f"{p.role} {p.host} pid {p.pid}"
        for p in processes
        if p.routes is not None and p.routes != mine and not p.stale(now)
    ]
    if behind:
        click.echo(
            f"warning: {', '.join(behind)} routed with other route files (or other values of "
            "the environment variables they name) than these: these messages are routed with "
            "the files and environment here, new ones with theirs; reload them (SIGHUP to "
            "each) and run this with their environment to make them the same",
            err=True,
        )


def _turned_away_at_intake(message: StoredMessage) -> str | None:
    """Why a message is not for routing, or None: only a message accepted at intake (AA) is
    routed. One refused (AE) was stored as it came and its sender told to correct it: what it
    resends is routed as it arrives, so routing this copy too would send the message twice."""
    from carehub.store.schema import MessageStatus

    if message.status == MessageStatus.REJECTED.value:
        return "rejected at intake (not HL7, too large or cut short), so there is nothing to route"
    if message.status == MessageStatus.REFUSED.value:
        why = message.intake_detail or "no reason recorded"
        return (
            f"refused at intake (ACK AE: {why}), so it is not routed: only a message accepted "
            "(AA) is; the sender's corrected resend is routed as it arrives"
        )
    return None


def _reprocess(
    config: HubConfig,
    data_dir: Path,
    store: MessageStore,
    message_ids: list[int],
    counts: dict[str, int] | None = None,
    choice: DestinationChoice | None = None,
    operator: str = "carehub",
) -> dict[str, int]:
    """Route each message again as a new run, with new deliveries under new keys, to the
    destinations ``choice`` keeps. Deliveries planned under a key an earlier run already
    used (a care-team notice of the same visit event) are left out by the outbox, so nobody
    is told twice; an earlier run's delivery not made yet (dead, or waiting) carries this
    run's in its place (Outbox._take_places). Returns how many messages were routed,
    deliveries queued to be sent, notices and deliveries suppressed (_queued_and_suppressed:
    told before, nothing to send), messages skipped (turned away at intake, or routed by the
    hub meanwhile: nothing recorded) and routed with a route error, in ``counts`` when given
    (so far as it got, should it fail): only what the store recorded is counted."""
    from carehub.hub import build_routing
    from carehub.routing.router import Router
    from carehub.store.outbox import Outbox

    host, table = build_routing(config, data_dir, store)
    choice = choice or DestinationChoice()
    unknown = sorted(choice.names - set(table.destinations))
    if unknown:
        known = ", ".join(sorted(table.destinations)) or "none"
        raise CarehubError(f"no destination {unknown[0]!r} in the routes (there are: {known})")
    outbox = Outbox(store)
    skipped: list[int] = []
    counts = {} if counts is None else counts
    counts.update(messages=0, deliveries=0, skipped=0, failed=0)

    async def run() -> None:
        await table.start()
        try:
            router = Router(table, host)
            for message_id in message_ids:
                message = store.get(message_id)
                if message is None:
                    raise CarehubError(f"no message with id {message_id}")
                turned_away = _turned_away_at_intake(message)
                if turned_away:
                    skipped.append(message_id)
                    click.echo(f"message {message_id}: {turned_away}; left as it is", err=True)
                    continue
                result = router.route(message, run=outbox.next_run(message_id))
                done_with = outbox.delivered_destinations(message_id)
                if choice.undelivered:
                    discarded = outbox.discarded_destinations(message_id)
                    _note_discarded_left_out(message_id, result, choice, discarded)
                    done_with |= discarded
                left_out = _keep_chosen(result, choice, done_with)
                planned = len(result.deliveries)
                places: list[PlaceTaken] = []
                if not outbox.record_routing([result], places_taken=places):
                    # A first run is kept only for a message still waiting for it.
                    skipped.append(message_id)
                    click.echo(
                        f"message {message_id}: the hub routed it while this ran (its first "
                        "routing), so this run was not recorded and nothing was queued; "
                        "reprocess it again to route it once more",
                        err=True,
                    )
                    continue
                carried = [p for p in places if p.carried]
                in_flight = [p for p in places if not p.carried]
                dropped = planned - len(result.deliveries) - len(places)
                queued, suppressed = _queued_and_suppressed(outbox, result, carried, dropped)
                counts["messages"] += 1
                counts["deliveries"] += queued
                if suppressed:  # counted when there are some: most runs suppress nothing
                    counts["suppressed"] = counts.get("suppressed", 0) + len(suppressed)
                counts["failed"] += bool(result.errors)
                matched = ", ".join(r.route for r in result.matched) or "no route"
                click.echo(
                    f"message {message_id} (run {result.run}): {matched}; "
                    f"{queued} deliveries queued"
                    + (f", {left_out + len(in_flight)} left out" if left_out or in_flight else "")
                    + (f", {_suppressed_text(suppressed)}" if suppressed else "")
                    + (
                        f"; in place of earlier {_deliveries_text(carried)}, keeping "
                        "the place in line"
                        if carried
                        else ""
                    )
                    + (
                        f"; {_deliveries_text(in_flight)} being sent now: not sent again"
                        if in_flight
                        else ""
                    )
                    + (f"; errors: {'; '.join(result.errors)}" if result.errors else "")
                )
                _warn_of_overtaking(outbox, message_id, result)
        finally:
            await table.close()

    try:
        asyncio.run(run())
    finally:
        counts["skipped"] = len(skipped)
    return counts


@messages.command("export")
@hub_options
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for the <id>.hl7 files (made when missing).",
)
@message_filters
@click.option("--limit", type=LIMIT, help="Only the newest N matches.")
@click.option("--force", is_flag=True, help="Overwrite files that are already there.")
@operator_option
def export_messages(
    config: HubConfig,
    data_dir: Path,
    out_dir: Path,
    filters: MessageFilter,
    limit: int | None,
    force: bool,
    operator: str | None,
) -> None:
    """Write each matching message to OUT/<id>.hl7, byte for byte as it was received.

    The files replay with `carehub send` and serve as test fixtures. Without --force nothing
    is written when any of the files is already there. Each export is recorded in the audit
    trail (`carehub audit list`) with the filters and the ids written: the files hold
    patients' messages."""
    from carehub.hub import keep_written_files_private, open_store
    from carehub.store.store import SEARCH_PAGE

    keep_written_files_private()
    store = open_store(config, data_dir, must_exist=True)
    try:
        count = _ScanCount(filters)
        ids = [message.id for message in store.search(filters, limit=limit, on_page=count)]
        count.report(len(ids))
        if not ids:
            _note_unseen_listener(store, filters)
        # Recorded as _audited records, but a failure keeps the ids already written: their
        # files hold patients' messages as much as those of an export that went through.
        action = _Action()
        written_ids: list[int] = []
        try:
            if not force:
                taken = [path for path in (out_dir / f"{i}.hl7" for i in ids) if path.exists()]
                if taken:
                    more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
                    raise CarehubError(f"{taken[0]} is already there{more}; --force overwrites")
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise CarehubError(f"--out {out_dir}: cannot make the folder: {err}") from err
            for start in range(0, len(ids), SEARCH_PAGE):
                for message in store.get_many(ids[start : start + SEARCH_PAGE]):
                    path = out_dir / f"{message.id}.hl7"
                    try:
                        with path.open("wb" if force else "xb") as file:
                            file.write(message.raw)
                    except FileExistsError as err:
                        raise CarehubError(f"{path} is already there; --force overwrites") from err
                    except OSError as err:
                        raise CarehubError(f"{path}: cannot write: {err}") from err
                    written_ids.append(message.id)
        except (Exception, KeyboardInterrupt) as err:
            action.outcome = "failed"
            action.detail = str(err)[:300] if isinstance(err, CarehubError) else type(err).__name__
            raise
        finally:
            action.counts = {"messages": len(written_ids)}
            if action.outcome == "ok" and not written_ids:
                action.outcome = "none"
            if written_ids:
                done = f"{_ids_text('messages', written_ids)} written to {out_dir}"
                action.detail = f"{action.detail}; {done}" if action.detail else done
            target = _filter_text(filters, limit) or "all messages"
            _record_action(store, "messages export", target, action, operator)
        written = len(written_ids)
    finally:
        store.close()
    click.echo(f"wrote {written} message(s) to {out_dir}")


# -- routes ----------------------------------------------------------------------------------
@main.group()
def routes() -> None:
    """Check, dry-run and reload the routes."""


#: Seconds `routes reload` waits for the hub to say how the reload went.
RELOAD_WAIT = 30.0


@routes.command("reload")
@hub_options
@click.option(
    "--timeout",
    type=TIMEOUT,
    default=RELOAD_WAIT,
    show_default=True,
    help="Seconds to wait for the hub to report how the reload went.",
)
@operator_option
def routes_reload(config: HubConfig, data_dir: Path, timeout: float, operator: str | None) -> None:
    """Make the `carehub serve` of this data dir reload its routes (it gets a SIGHUP), and
    wait for the outcome. Its listeners stay open; invalid routes leave it on the old ones
    (its log says why, and this exits 1). Listener, store and queue settings need a restart.
    A `carehub worker` reloads on its own SIGHUP."""
    import os
    import time

    from carehub.lockfile import lock_path, serving_note

    if lock_path(config, data_dir) is None:
        raise CarehubError(
            "store.url names a database server, which has no lock file to find the hub by: "
            "send SIGHUP to each `carehub serve` and `carehub worker` process"
        )
    before = serving_note(config, data_dir)
    if before is None or before.pid is None:
        raise CarehubError(f"data dir {data_dir}: no carehub serve is running from it")
    try:
        os.kill(before.pid, signal.SIGHUP)
    except ProcessLookupError:
        raise CarehubError(f"data dir {data_dir}: no carehub serve is running from it") from None
    except PermissionError as err:
        raise CarehubError(
            f"cannot signal carehub serve (pid {before.pid}): {err.strerror}"
        ) from err
    click.echo(f"sent SIGHUP to carehub serve (pid {before.pid}); waiting for it to reload")
    target = f"carehub serve pid {before.pid}"

    def record(outcome: str, detail: str | None = None) -> None:
        from carehub.hub import open_store

        action = _Action()
        action.outcome, action.detail = outcome, detail
        try:
            store = open_store(config, data_dir, must_exist=True)
        except CarehubError as err:
            click.echo(f"warning: not recorded in the audit trail: {err}", err=True)
            return
        try:
            _record_action(store, "routes reload", target, action, operator)
        finally:
            store.close()

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = serving_note(config, data_dir)
        if now is None or now.pid != before.pid:
            record("failed", "the hub stopped meanwhile")
            raise CarehubError(f"carehub serve (pid {before.pid}) stopped meanwhile")
        if now.reloads > before.reloads:
            if now.outcome == "ok":
                record("ok")
                click.echo("routes reloaded; its log has the route and destination counts")
                return
            record("refused", "the new routes were refused; the hub runs on the old ones")
            click.echo(
                "the new routes were refused and the hub runs on the old ones: its log says "
                "why (`carehub routes check` too)",
                err=True,
            )
            sys.exit(1)
        time.sleep(0.05)
    record("failed", f"no answer within {timeout:g} s")
    click.echo(f"no answer within {timeout:g} s: see the hub's log", err=True)
    sys.exit(1)


@routes.command("check")
@hub_options
@click.option(
    "--offline",
    is_flag=True,
    help="Leave out the store and broker checks (routes, plugins and files only).",
)
def routes_check(config: HubConfig, data_dir: Path, offline: bool) -> None:
    """Validate the hub config, every route file and every plugin option, load what the
    steps read at start (rosters, directories, code tables, TLS files) and check that the store
    would open and the queue's broker answers, as `serve` would before it is ready, printing
    the warnings its routes would log (recipients no channel reaches, destinations on other
    machines sent to in clear or without checking the server) and which forwards share a
    line, as they reach one receiving system (each patient's order, and a dead letter's hold,
    span them all); no listener
    starts, nothing is sent, and the store is neither created nor migrated. With --offline
    (a CI job that has the config but not the production database or broker) the store and
    broker are left out."""
    from carehub.hub import (
        build_routing,
        check_queue,
        check_store,
        http_tls_context,
        mllp_tls_contexts,
    )

    host, table = build_routing(config, data_dir, check_only=True)
    mllp_tls_contexts(config)
    http_tls_context(config)

    async def start_and_close() -> None:
        await table.start()
        await table.close()

    logging.getLogger("carehub.routing.table").setLevel(logging.ERROR)  # printed below
    asyncio.run(start_and_close())
    for warning in table.start_warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"plugins: {len(host.plugins)} loaded, {len(host.failures)} failed")
    for failure in host.failures:
        click.echo(f"  failed: {failure.name} ({failure.source}): {failure.error}")
    for route in table.routes:
        steps = ", ".join(step.label for step in route.steps)
        click.echo(f"route {route.name} ({route.source.where()}): {steps}")
    for shared in table.shared_line_text():  # one order per patient at that receiver
        click.echo(shared)
    # Both are checked, so one run names every setting `serve` would stop on.
    problems: list[str] = []
    checks = (
        ("store", lambda: check_store(config, data_dir)),
        ("queue", lambda: check_queue(config)),
    )
    for what, check in () if offline else checks:
        try:
            click.echo(f"{what}: {check()}")
        except CarehubError as err:
            problems.append(str(err))
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(2)  # what `serve` exits with on the same error
    if host.failures:  # "ok:" then exit 1 would read as a pass
        names = ", ".join(failure.name for failure in host.failures)
        click.echo(f"failed: {len(host.failures)} plugin(s) did not load: {names}", err=True)
        sys.exit(1)
    click.echo(f"ok: {len(table.routes)} route(s), {len(table.destinations)} destination(s)")


@routes.command("test")
@hub_options
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--require-match", is_flag=True, help="Exit 1 when a message matches no route.")
def routes_test(
    config: HubConfig, data_dir: Path, files: tuple[Path, ...], as_json: bool, require_match: bool
) -> None:
    """Show what the routes would do with each message in FILES, without sending anything.
    Exits 1 when a route records an error for any message or the hub would not route one
    (its intake would answer AE or AR), so CI can gate on it, and with --require-match also
    when a message matches no route; every result is printed first."""
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
    failed: list[str] = []
    refused: list[str] = []
    unmatched: list[str] = []
    # Each step error is in the output below; the router's log line for it would only print
    # the same failure again, above the results.
    logging.getLogger("carehub.routing.router").setLevel(logging.ERROR)
    for label, result in zip(labels, dry_run_all(table, host, payloads), strict=True):
        if as_json:
            from carehub.display import masked_metadata

            shown = result_as_json(result)
            for route in shown["routes"]:
                for delivery in route["deliveries"]:
                    delivery["metadata"] = masked_metadata(delivery["metadata"])
            click.echo(json.dumps({"file": label, **shown}, default=str))
        else:
            from carehub.display import show_dry_run

            show_dry_run(label, result)
        if result.errors:
            failed.append(label)
        if result.not_routed:
            refused.append(label)
        elif not result.matched:
            unmatched.append(label)
    if failed:
        click.echo(
            f"failed: a route error for {len(failed)} message(s): {', '.join(failed)}", err=True
        )
    if refused:
        click.echo(
            f"failed: the hub would not route {len(refused)} message(s): {', '.join(refused)}",
            err=True,
        )
    if require_match and unmatched:
        click.echo(
            f"failed: {len(unmatched)} message(s) matched no route: {', '.join(unmatched)}",
            err=True,
        )
    if failed or refused or (require_match and unmatched):
        sys.exit(1)


# -- dead letters ----------------------------------------------------------------------------
@main.group("dead-letters")
def dead_letters() -> None:
    """Deliveries that gave up: list them, send them again, or give up on them for good.

    A dead letter holds its patient's line to its destination (unless the destination's
    retry.after_dead_letter is continue): the later deliveries wait until it is retried or
    discarded, so the receiver never gets a newer message before an older one."""


@dead_letters.command("list")
@hub_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--limit", type=LIMIT, default=100, show_default=True)
@click.option("--destination", help="Only this destination's (route/name, as listed).")
@click.option(
    "--discarded", is_flag=True, help="The dead letters given up on (discard), not the live ones."
)
def dead_letters_list(
    config: HubConfig,
    data_dir: Path,
    as_json: bool,
    limit: int,
    destination: str | None,
    discarded: bool,
) -> None:
    """Dead-lettered deliveries with their last error, and how many deliveries of each one's
    line wait behind it; with --discarded, those given up on, with when, by whom and why."""
    from carehub.hub import open_store
    from carehub.store.outbox import Discard, Outbox
    from carehub.store.schema import DeliveryStatus

    status = DeliveryStatus.DISCARDED if discarded else DeliveryStatus.DEAD
    store = open_store(config, data_dir, must_exist=True)
    try:
        outbox = Outbox(store)
        dead = outbox.find(status=status.value, destination=destination, limit=limit)
        total = len(dead)
        if limit and total >= limit:
            total = outbox.count(status=status.value, destination=destination)
        behind = {} if discarded else outbox.waiting_behind([d.id for d in dead if d.holds_line])
        discards: dict[int, Discard] = outbox.discards([d.id for d in dead]) if discarded else {}
        if destination is not None and not dead:
            # A name no delivery ever had is checked against the routes: a mistyped one is an
            # error, as `destinations pause` makes it; one removed from the routes still lists.
            if not outbox.find(destination=destination, limit=1):
                _known_destination(config, data_dir, destination)
            if not discarded:
                _no_dead_letters_for(destination, outbox.dead_by_destination())
    finally:
        store.close()
    if as_json:
        for d in dead:
            shown: dict[str, Any] = {
                "id": d.id,
                "message_id": d.message_id,
                "route": d.route,
                "destination": d.destination,
                "line": d.line or d.destination,
                "channel": d.channel,
                "status": d.status,
                "attempts": d.attempts,
                "early_attempts": d.early_attempts,
                "max_attempts": d.max_attempts,
                "give_up_after": d.give_up_after,
                "last_error": without_password(d.last_error) if d.last_error else d.last_error,
                "updated_at": d.updated_at.isoformat(),
                "holds_line": bool(d.holds_line),
                "held_behind": behind.get(d.id, 0),
            }
            if discarded:
                discard = discards.get(d.id)
                shown["discarded_at"] = discard.at.isoformat() if discard else None
                shown["discarded_by"] = discard.by if discard else None
                shown["discard_reason"] = discard.reason if discard else None
            click.echo(json.dumps(shown))
        if total > len(dead):
            click.echo(f"{len(dead)} of {total} shown (--limit N shows more)", err=True)
        return
    if discarded:
        from carehub.display import discarded_table

        discarded_table(dead, discards, total)
        return
    from carehub.display import delivery_table

    delivery_table(dead, "Dead letters", total)
    holding = [(d.id, behind[d.id]) for d in dead if behind.get(d.id)]
    if holding:
        each = ", ".join(f"#{delivery_id} holds {count}" for delivery_id, count in holding)
        click.echo(
            f"held behind these dead letters (their patient's line to that destination waits): "
            f"{each}; `dead-letters retry` sends the dead letter first and the held ones after "
            "it, `dead-letters discard` gives up on it and lets them go"
        )


def _known_destination(config: HubConfig, data_dir: Path, name: str) -> None:
    """Raise unless the routes have destination ``name``: a name neither they nor any
    delivery has is mistyped, or another site's, and "none" would reassure wrongly."""
    try:
        known = _route_destinations(config, data_dir)
    except CarehubError as err:
        raise CarehubError(
            f"no delivery in the store is for destination {name!r}, and the routes cannot be "
            f"read to tell whether they have it: {err}"
        ) from err
    if name not in known:
        raise _unknown_destination(name, known)


def _no_dead_letters_for(destination: str, dead: dict[str, int]) -> None:
    """Say so on stderr, naming the destinations that have some: a mistyped name must not
    read as "nothing is dead" when something is."""
    others = ", ".join(f"{name} ({count})" for name, count in sorted(dead.items()))
    click.echo(
        f"no dead letters for destination {destination!r}; "
        + (f"dead letters are waiting for: {others}" if others else "there are none at all"),
        err=True,
    )


def _not_dead_letters(delivery_ids: tuple[int, ...], found: dict[int, str]) -> None:
    """On stderr, each named id that is not a dead letter (so was left alone), and why."""
    for delivery_id in dict.fromkeys(delivery_ids):
        status = found.get(delivery_id)
        if status is None:
            click.echo(f"delivery {delivery_id}: no such delivery", err=True)
        elif status != "dead":
            click.echo(
                f"delivery {delivery_id}: {status}, not a dead letter; left as it is", err=True
            )


@dead_letters.command("retry")
@hub_options
@click.argument("delivery_ids", type=ROW_ID, nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Every dead letter.")
@click.option(
    "--destination",
    help="Every dead letter of this destination (route/name), e.g. once it is back up.",
)
@operator_option
def dead_letters_retry(
    config: HubConfig,
    data_dir: Path,
    delivery_ids: tuple[int, ...],
    retry_all: bool,
    destination: str | None,
    operator: str | None,
) -> None:
    """Queue dead letters again with a fresh set of attempts; the deliveries held behind them
    follow them in order. Warns when later deliveries of the same lines were already sent."""
    from carehub.hub import open_store
    from carehub.store.outbox import Outbox

    chosen = sum((bool(delivery_ids), retry_all, destination is not None))
    if chosen != 1:
        raise click.UsageError("name delivery ids, or pass --all, or --destination; only one")
    store = open_store(config, data_dir, must_exist=True)
    try:
        outbox = Outbox(store)
        found = outbox.statuses(list(delivery_ids)) if delivery_ids else {}
        target = _dead_letters_target(delivery_ids, destination)
        with _audited(store, "dead-letters retry", target, operator) as action:
            report = outbox.retry_dead_letters(list(delivery_ids) or None, destination)
            _line_counts(action, report, len(set(delivery_ids)))
        if destination is not None and not report.count:
            _no_dead_letters_for(destination, outbox.dead_by_destination())
    finally:
        store.close()
    _not_dead_letters(delivery_ids, found)
    count = report.count
    click.echo(f"{count} dead letter(s) queued again; a running worker sends them")
    if report.released:
        click.echo(f"{report.released} delivery(ies) held behind them follow, each line in order")
    if report.overtaken:
        click.echo(
            f"warning: {report.overtaken} later delivery(ies) in {report.overtaken_lines} of "
            "these patient lines were already delivered before the dead letters (sent before "
            "dead letters held their line, or with after_dead_letter: continue): the receiver "
            "gets these older messages after newer ones. If it cannot take that, discard them "
            "instead (`carehub dead-letters discard`)",
            err=True,
        )
    if (delivery_ids and count < len(delivery_ids)) or (destination is not None and not count):
        sys.exit(1)


@dead_letters.command("discard")
@hub_options
@click.argument("delivery_ids", type=ROW_ID, nargs=-1)
@click.option("--destination", help="Every dead letter of this destination (route/name).")
@click.option("--reason", help="Why, recorded with each one (a ticket, what was done instead).")
@click.option(
    "--by",
    "operator",
    help="Who, recorded with each one; by default this session's login name and host.",
)
@click.option("--yes", is_flag=True, help="With --destination: do not ask first.")
def dead_letters_discard(
    config: HubConfig,
    data_dir: Path,
    delivery_ids: tuple[int, ...],
    destination: str | None,
    reason: str | None,
    operator: str | None,
    yes: bool,
) -> None:
    """Give up on dead letters for good: each stays in the store with who discarded it and
    when (`list --discarded`, `messages show`), is never sent, and no longer holds its
    patient's line, so the deliveries that waited behind it go on."""
    from carehub.hub import open_store
    from carehub.store.outbox import Outbox

    if bool(delivery_ids) == (destination is not None):
        raise click.UsageError("name delivery ids, or pass --destination; only one")
    store = open_store(config, data_dir, must_exist=True)
    try:
        outbox = Outbox(store)
        found = outbox.statuses(list(delivery_ids)) if delivery_ids else {}
        if destination is not None:
            waiting = outbox.dead_by_destination().get(destination, 0)
            if not waiting:
                _no_dead_letters_for(destination, outbox.dead_by_destination())
                click.echo("0 dead letter(s) discarded")
                sys.exit(1)
            if not yes:
                click.confirm(
                    f"discard {waiting} dead letter(s) of {destination} for good "
                    "(never sent; the deliveries held behind them go on)?",
                    abort=True,
                )
        target = _dead_letters_target(delivery_ids, destination)
        with _audited(store, "dead-letters discard", target, operator) as action:
            report = outbox.discard_dead_letters(
                list(delivery_ids) or None, destination, by=operator or _operator(), reason=reason
            )
            _line_counts(action, report, len(set(delivery_ids)))
            action.detail = f"reason: {reason}" if reason else None
    finally:
        store.close()
    _not_dead_letters(delivery_ids, found)
    click.echo(f"{report.count} dead letter(s) discarded; they stay in the store")
    if report.released:
        click.echo(f"{report.released} delivery(ies) held behind them go on, each line in order")
    if delivery_ids and report.count < len(set(delivery_ids)):
        sys.exit(1)


def _dead_letters_target(delivery_ids: tuple[int, ...], destination: str | None) -> str:
    if delivery_ids:
        return _ids_text("deliveries", delivery_ids)
    return f"destination {destination}" if destination is not None else "all dead letters"


def _line_counts(action: _Action, report: LineReport, named: int) -> None:
    """A retry's or discard's counts and outcome: none when nothing matched, partial when
    some named ids were not dead letters."""
    action.counts = {"dead_letters": report.count, "released": report.released}
    if not report.count:
        action.outcome = "none"
    elif named and report.count < named:
        action.outcome = "partial"


def _operator() -> str:
    """Who runs this command, as far as the host knows: login name and host name."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no login name in the environment or the password database
        user = "unknown user"
    return f"{user}@{socket.gethostname()}"


class _Action:
    """What an audited action did, filled in as it goes (see _audited)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.outcome = "ok"
        self.detail: str | None = None


@contextlib.contextmanager
def _audited(
    store: MessageStore, command: str, target: str | None, operator: str | None
) -> Iterator[_Action]:
    """Record the block's action in the audit trail once it is over, as it went: an error
    is recorded as failed (its kind, or a carehub error's own words, never a store error's
    text, which can quote parameters) and raised on."""
    action = _Action()
    try:
        yield action
    except (Exception, KeyboardInterrupt) as err:
        action.outcome = "failed"
        action.detail = str(err)[:300] if isinstance(err, CarehubError) else type(err).__name__
        _record_action(store, command, target, action, operator)
        raise
    _record_action(store, command, target, action, operator)


def _record_action(
    store: MessageStore, command: str, target: str | None, action: _Action, operator: str | None
) -> None:
    from carehub.store.audit import record_action

    try:
        record_action(
            store,
            actor=operator or _operator(),
            command=command,
            target=target,
            counts=action.counts,
            outcome=action.outcome,
            detail=action.detail,
        )
    except Exception as err:  # the action is done: say so, do not undo it
        click.echo(f"warning: not recorded in the audit trail: {type(err).__name__}", err=True)


#: Ids written out in an audit target; more are counted.
IDS_SHOWN = 50


def _ids_text(noun: str, ids: list[int] | tuple[int, ...]) -> str:
    """'messages 3, 4, 5', the first IDS_SHOWN of a long list and how many in all."""
    unique = list(dict.fromkeys(ids))
    shown = ", ".join(str(i) for i in unique[:IDS_SHOWN])
    more = f", ... ({len(unique)} in all)" if len(unique) > IDS_SHOWN else ""
    return f"{noun} {shown}{more}"


def _filter_text(filters: MessageFilter, limit: int | None) -> str:
    """The filters as options, for the audit trail: patient values, field values and
    searched text are left out (they identify patients), which options were given is kept."""
    parts: list[str] = []
    for option, value in (
        ("--status", filters.status),
        ("--type", filters.message_type),
        ("--event", filters.event),
        ("--listener", filters.listener),
        ("--control-id", filters.control_id),
        ("--since", filters.since.isoformat() if filters.since else None),
        ("--until", filters.until.isoformat() if filters.until else None),
    ):
        if value:
            parts.append(f"{option} {value}")
    if filters.sending_application or filters.sending_facility:
        sender = filters.sending_application or ""
        sender += f"^{filters.sending_facility}" if filters.sending_facility else ""
        parts.append(f"--sender {sender}")
    if filters.patient:
        parts.append("--patient (not recorded)")
    parts += [f"--field {match.path}=(not recorded)" for match in filters.fields]
    if filters.contains:
        parts.append("--contains (not recorded)")
    if limit is not None:
        parts.append(f"--limit {limit}")
    return " ".join(parts)


# -- status ----------------------------------------------------------------------------------
@main.command("status")
@hub_options
@click.option(
    "--window",
    type=AGE,
    default="1h",
    show_default=True,
    help="How far back intake and deliveries are counted: 30m, 2h, 7d.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object (a line a time with --watch)."
)
@click.option(
    "--watch",
    type=click.FloatRange(min=0.5, max=3600),
    metavar="SECONDS",
    help="Show it again every SECONDS until Ctrl-C.",
)
def status_command(
    config: HubConfig, data_dir: Path, window: timedelta, as_json: bool, watch: float | None
) -> None:
    """Intake by listener, the routing backlog, and the outbox by destination, from the store.

    Works the same beside one embedded hub or many workers, and with no hub running."""
    import time

    from carehub.display import new_console
    from carehub.hub import open_store
    from carehub.status import read_status, render

    store = open_store(config, data_dir, must_exist=True)
    try:
        if as_json:  # with --watch, one line each time: a feed for a simple monitor
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a watch: exit 0
                while True:
                    click.echo(json.dumps(read_status(store, window).as_json()))
                    if not watch:
                        return
                    time.sleep(watch)
            return
        console = new_console()
        if not watch:
            console.print(render(read_status(store, window)))
            return
        from rich.live import Live

        first = render(read_status(store, window))
        with contextlib.suppress(KeyboardInterrupt), Live(first, console=console) as live:
            while True:
                time.sleep(watch)
                live.update(render(read_status(store, window)))
    finally:
        store.close()


# -- destinations: pause and resume ---------------------------------------------------------
@main.group()
def destinations() -> None:
    """Pause sending to one destination (its maintenance window) and resume it, while the hub
    keeps taking in and routing messages.

    The state is in the store, so every worker on every host honours it. A paused
    destination's deliveries wait, their attempts and retry times untouched; on resume they go
    out, each patient's in order."""


def _route_destinations(config: HubConfig, data_dir: Path) -> dict[str, str]:
    """Each destination the routes name, with its channel (nothing is started)."""
    from carehub.hub import build_routing

    _, table = build_routing(config, data_dir)
    return {name: d.channel.name for name, d in sorted(table.destinations.items())}


def _unknown_destination(name: str, known: dict[str, str]) -> CarehubError:
    names = ", ".join(known) or "none"
    return CarehubError(f"unknown destination {name!r}; the routes have: {names}")


def _utc_text(value: datetime) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S} UTC"


@destinations.command("list")
@hub_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def destinations_list(config: HubConfig, data_dir: Path, as_json: bool) -> None:
    """Every destination of the routes: active or paused (since when, by whom, why) and how
    many deliveries wait for it."""
    from carehub.hub import open_store
    from carehub.status import read_status

    known = _route_destinations(config, data_dir)
    store = open_store(config, data_dir, must_exist=True)
    try:
        status = read_status(store, timedelta(minutes=1))
    finally:
        store.close()
    rows: dict[str, dict[str, Any]] = {
        name: {"destination": name, "channel": channel, "in_routes": True}
        for name, channel in known.items()
    }
    for item in status.destinations:
        row = rows.setdefault(
            item.destination,
            {"destination": item.destination, "channel": item.channel, "in_routes": False},
        )
        row["waiting"] = row.get("waiting", 0) + item.waiting
        if item.paused:
            row.update(
                paused_at=item.paused_at.isoformat() if item.paused_at else None,
                paused_by=item.paused_by,
                reason=item.pause_reason,
            )
    for row in rows.values():
        row.setdefault("waiting", 0)
        row["state"] = "paused" if "paused_by" in row else "active"
    if as_json:
        for row in rows.values():
            click.echo(json.dumps(row))
        return
    from rich.table import Table
    from rich.text import Text

    from carehub.display import new_console

    table = Table(title="Destinations", title_justify="left", show_edge=False)
    for column in ("destination", "channel", "state", "since", "by", "waiting", "reason"):
        table.add_column(column, justify="right" if column == "waiting" else "left")
    for row in rows.values():
        paused = row["state"] == "paused"
        since = datetime.fromisoformat(row["paused_at"]) if row.get("paused_at") else None
        table.add_row(
            row["destination"] + ("" if row["in_routes"] else " (not in the routes)"),
            row["channel"],
            Text(row["state"], style="yellow" if paused else ""),
            _utc_text(since) if since else "",
            row.get("paused_by") or "",
            str(row["waiting"]),
            row.get("reason") or "",
        )
    new_console().print(table)


@destinations.command("pause")
@hub_options
@click.argument("name")
@click.option("--reason", help="Why (a maintenance window, a ticket), shown by list and status.")
@operator_option
def destinations_pause(
    config: HubConfig, data_dir: Path, name: str, reason: str | None, operator: str | None
) -> None:
    """Stop sending to destination NAME (route/name, as `destinations list` shows it) on
    every worker. Messages are still taken in and routed; its deliveries wait until resumed."""
    from carehub.hub import open_store
    from carehub.store.outbox import Outbox

    known = _route_destinations(config, data_dir)
    if name not in known:
        raise _unknown_destination(name, known)
    store = open_store(config, data_dir, must_exist=True)
    try:
        with _audited(store, "destinations pause", f"destination {name}", operator) as action:
            report = Outbox(store).pause_destination(
                name, known[name], by=operator or _operator(), reason=reason
            )
            action.counts = {"waiting": report.waiting, "parked": report.moved}
            action.detail = f"reason: {reason}" if reason else None
            if not report.changed:
                action.outcome, action.detail = "none", "already paused"
    finally:
        store.close()
    pause = report.pause
    assert pause is not None
    if not report.changed:
        click.echo(
            f"{name} is already paused, since {_utc_text(pause.paused_at)} by {pause.paused_by}"
            + (f": {pause.reason}" if pause.reason else "")
        )
        return
    click.echo(
        f"paused {name}: {report.waiting} delivery(ies) wait; messages are still taken in and "
        "routed, and their deliveries to it wait too"
    )
    click.echo(
        "workers stop starting sends to it within a second (a send under way finishes); "
        f"`carehub destinations resume {name}` sends them, each patient's in order"
    )


@destinations.command("resume")
@hub_options
@click.argument("name")
@operator_option
def destinations_resume(config: HubConfig, data_dir: Path, name: str, operator: str | None) -> None:
    """Send to a paused destination again: what waited goes out, each patient's in order."""
    from carehub.hub import open_store
    from carehub.store.outbox import Outbox

    known = _route_destinations(config, data_dir)
    store = open_store(config, data_dir, must_exist=True)
    try:
        outbox = Outbox(store)
        if name not in known and name not in {p.destination for p in outbox.paused()}:
            raise _unknown_destination(name, known)
        with _audited(store, "destinations resume", f"destination {name}", operator) as action:
            report = outbox.resume_destination(name)
            action.counts = {"waiting": report.waiting, "released": report.moved}
            if not report.changed:
                action.outcome, action.detail = "none", "was not paused"
    finally:
        store.close()
    if not report.changed:
        click.echo(f"{name} is not paused; nothing changed")
        return
    assert report.pause is not None
    click.echo(
        f"resumed {name} (paused since {_utc_text(report.pause.paused_at)} by "
        f"{report.pause.paused_by}): {report.waiting} delivery(ies) waiting go out as a running "
        "worker claims them, each patient's in order"
    )


# -- audit trail -------------------------------------------------------------------------------
@main.group()
def audit() -> None:
    """The trail of operator actions: who reprocessed, retried, discarded, pruned, paused,
    resumed or reloaded, and when. It holds ids and counts, never message content or patient
    identifiers."""


@audit.command("list")
@hub_options
@click.option(
    "--since", callback=moment, help="At or after: ISO date/time or an age such as 30m, 2h, 7d."
)
@click.option("--limit", type=LIMIT, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit_list(
    config: HubConfig, data_dir: Path, since: datetime | None, limit: int, as_json: bool
) -> None:
    """Operator actions, newest first."""
    from carehub.hub import open_store
    from carehub.store.audit import list_actions

    store = open_store(config, data_dir, must_exist=True)
    try:
        actions = list_actions(store, since, limit)
    finally:
        store.close()
    if as_json:
        for item in actions:
            click.echo(json.dumps(item.as_json()))
        return
    from rich.table import Table
    from rich.text import Text

    from carehub.display import new_console

    table = Table(title="Operator actions", title_justify="left", show_edge=False)
    for column in ("at", "by", "command", "target", "counts", "outcome", "detail"):
        table.add_column(column, overflow="fold" if column in ("target", "detail") else None)
    for item in actions:
        counts = ", ".join(f"{key} {value}" for key, value in item.counts.items())
        style = {"failed": "red", "refused": "red", "partial": "yellow"}.get(item.outcome, "")
        table.add_row(
            _utc_text(item.at),
            item.actor,
            item.command,
            item.target or "",
            counts,
            Text(item.outcome, style=style),
            item.detail or "",
        )
    if actions:
        new_console().print(table)
    else:
        click.echo("no operator actions recorded" + (" since then" if since else ""))


# -- plugins and workers ---------------------------------------------------------------------
@main.command("plugins")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object a line: each plugin, then each that failed to load "
    '({"name", "source", "failed": true, "error", "at"}).',
)
@click.option(
    "--options",
    "options_of",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[NAME]",
    help="Print each component's options (type, default, description), or only NAME's.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar=ENV_CONFIG,
    help=f"Hub config YAML (or ${ENV_CONFIG}): its plugins_dir and plugin lists are loaded too.",
)
def plugins_command(as_json: bool, options_of: str | None, config_path: Path | None) -> None:
    """Every plugin loaded, its version, and the components and hooks it provides; with
    --options, the options each component takes in a route step. Exits 1 when a plugin
    failed to load (each is listed), so a check in CI fails with it. With a config, the
    plugins the hub would load: its plugins_dir's too."""
    from carehub.plugins import PluginHost

    config = load_config(config_path) if config_path is not None else None
    host = PluginHost().load(config=config)
    if options_of is not None:
        from carehub.reference import options_output

        click.echo(options_output(host, options_of, as_json=as_json), nl=False)
        return
    rows = [
        {
            "name": p.name,
            "source": p.source,
            # A built-in is carehub's own version; a plugins-directory file has none.
            "version": p.version or (__version__ if p.source == "builtin" else None),
            "components": p.components,
            "hooks": p.hooks,
            "component_details": [
                {
                    "kind": c.kind,
                    "name": c.name,
                    "description": c.description,
                    "options": [
                        {"name": o.name, "required": True}
                        if o.required
                        else {"name": o.name, "required": False, "default": o.default}
                        for o in c.options
                    ],
                }
                for c in p.details
            ],
        }
        for p in host.plugins.values()
    ]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
    else:
        for row in rows:
            click.echo(f"{row['name']} {row['version'] or '-'} ({row['source']})")
            for component in row["component_details"]:
                about = f": {component['description']}" if component["description"] else ""
                click.echo(f"    {component['kind']} {component['name']}{about}")
            click.echo(f"    hooks: {', '.join(row['hooks']) or '-'}")
    for failure in host.failures:
        if as_json:
            failed = {"name": failure.name, "source": failure.source, "failed": True}
            click.echo(json.dumps({**failed, "error": failure.error, "at": failure.at}))
        else:
            click.echo(f"{failure.name} ({failure.source}): FAILED TO LOAD: {failure.error}")
    if host.failures:
        sys.exit(1)


@main.command("worker")
@hub_options
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option(
    "--http-port",
    type=click.IntRange(0, 65535),
    help="Serve this worker's /health and /metrics on this port (0: a free one, printed).",
)
@click.option(
    "--http-host", default="127.0.0.1", show_default=True, help="Address for --http-port."
)
def worker_command(
    config: HubConfig,
    data_dir: Path,
    log_level: str | None,
    http_port: int | None,
    http_host: str,
) -> None:
    """Route and deliver only (scale-out): run as many as needed beside `serve --no-worker`.
    SIGHUP reloads the routes. With --http-port it answers /health (its store and broker) and
    /metrics (what it routed and sent), behind listeners.http.tokens as serve's are."""
    from carehub.hub import (
        RouteReloader,
        build_routing,
        check_queue,
        keep_written_files_private,
        log_reloaded,
        open_store,
        warn_if_worker_store_is_local,
    )
    from carehub.store.processes import ProcessBeacon
    from carehub.worker import Worker, WorkerSettings
    from carehub.workqueue import WorkQueue

    keep_written_files_private()
    setup_logging(log_level or config.log_level)
    if config.queue.url.startswith("memory"):
        raise CarehubError(
            "queue.url: a separate worker needs a shared broker (amqp://...); memory:// only "
            "works inside `carehub serve`"
        )
    check_queue(config)
    work_queue = WorkQueue.for_config(config.queue)
    store = open_store(config, data_dir)
    warn_if_worker_store_is_local(config, store)
    reloader = RouteReloader(config, data_dir)
    host, table = build_routing(config, data_dir, store)
    settings = WorkerSettings.from_config(config.worker, single_host=False)

    worker_log = logging.getLogger("carehub.worker")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stopping() -> None:
            if not stop.is_set():
                worker_log.info("carehub worker stopping: finishing the sends under way")
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping)
        worker = Worker(store, table, host, work_queue, settings)
        consuming = asyncio.Event()

        async def reload_routes() -> None:
            if not consuming.is_set():
                logging.getLogger("carehub.hub").warning(
                    "routes not reloaded: the worker is not running yet"
                )
                return
            loaded = await reloader.load(store)
            if loaded is not None:
                new_host, new_table, note = loaded
                old_table = worker.table
                await worker.replace_routing(new_table, new_host)
                beacon.refresh()
                log_reloaded(old_table, new_table, note)

        def started() -> None:
            """Ready means consuming: a deployment script that waits for the line can then
            count on this worker taking its share of the partitions."""
            consuming.set()
            click.echo("carehub ready")
            sys.stdout.flush()

        on_sighup(reload_routes)
        click.echo(f"carehub worker: {len(table.routes)} route(s), queue {_queue_label(config)}")
        settle_garbage_collector()
        beacon = ProcessBeacon(
            store, "worker", lambda: reloader.route_set, partitions=work_queue.partitions
        )
        await beacon.start()
        http = None
        if http_port is not None:
            from carehub.config import http_tokens
            from carehub.worker_http import start_worker_http

            http, (bound_host, bound_port) = await start_worker_http(
                worker, http_host, http_port, http_tokens(config)
            )
            click.echo(f"worker HTTP on {bound_host}:{bound_port} (/health, /metrics)")
        try:
            await worker.run(stop, started=started)
        finally:
            if http is not None:
                await http.stop()
            await beacon.stop()

    try:
        asyncio.run(run())
    finally:
        store.close()
    worker_log.info("carehub worker stopped")  # a clean stop, told apart from a crash


# -- store maintenance -----------------------------------------------------------------------
@main.group()
def store() -> None:
    """Store maintenance: schema upgrades, retention and the store's identity."""


@store.command("upgrade")
@hub_options
@click.option(
    "--force", is_flag=True, help="Even while processes of an earlier release run on the store."
)
def store_upgrade(config: HubConfig, data_dir: Path, force: bool) -> None:
    """Bring the store's schema to this release's (`serve` and `worker` also do it as they
    start; the other commands only check it, and say when it is older or newer). Stop the
    processes of the earlier release first: it refuses while one runs on the store (and so
    do `serve` and `worker`), unless --force."""
    from carehub.hub import open_store

    opened = open_store(config, data_dir, under_older_processes=force)
    click.echo(f"store at schema revision {opened.schema_revision()}")
    opened.close()


@store.command("downgrade")
@hub_options
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Even while carehub processes run on the store.")
def store_downgrade(
    config: HubConfig, data_dir: Path, revision: str, yes: bool, force: bool
) -> None:
    """Take the store's schema back to REVISION (e.g. 0014), for going back to the release
    that knew it: stop every carehub process first (it refuses while one runs on the store,
    unless --force). What the later revisions added is dropped (their tables, e.g. the
    store's identity); the messages and deliveries stay."""
    from alembic.util import CommandError as AlembicError

    from carehub.hub import open_store
    from carehub.store.store import StoreError

    opened = open_store(config, data_dir, must_exist=True, migrate=False, check_schema=False)
    try:
        current = opened.schema_revision()
        behind = opened.schema_behind()
        if behind is not None and "newer carehub" in behind:
            raise CarehubError(f"{behind}; it takes its own schema back")
        if not force:
            _refuse_while_processes_run(opened, f"store downgrade to {revision}")
        if not yes:
            click.confirm(
                f"Take the store from schema revision {current} back to {revision}?", abort=True
            )
        try:
            opened.downgrade(revision)
        except (StoreError, AlembicError) as err:
            raise CarehubError(f"store downgrade to {revision}: {err}") from None
        click.echo(f"store at schema revision {opened.schema_revision()}")
    finally:
        opened.close()


@store.command("renew-identity")
@hub_options
@click.option("--force", is_flag=True, help="Even while carehub processes run on the store.")
@operator_option
def store_renew_identity(
    config: HubConfig, data_dir: Path, force: bool, operator: str | None
) -> None:
    """Give the store a new identity, after restoring it from a backup in a way carehub
    cannot tell by itself: a SQLite store file copied back, a PostgreSQL cluster restored
    from a file-level backup or snapshot in the same place.

    A restored store numbers messages on from where its backup ended, so it gives again the
    ids it gave after the backup. Idempotency keys take in the store's identity: with a new
    one, what it sends from now on cannot be taken for what it sent before by a receiver
    that drops repeats by key. Deliveries made before keep their keys. A PostgreSQL dump
    restored into a database made anew, or onto another cluster, has a new identity by
    itself. Run it with every carehub process stopped (it refuses while one runs on the
    store, unless --force): a running process keeps the identity it read at its start."""
    from carehub.hub import open_store

    opened = open_store(config, data_dir, must_exist=True)
    try:
        if not force:
            _refuse_while_processes_run(opened, "store renew-identity")
        with _audited(opened, "store renew-identity", "the store's identity", operator):
            opened.renew_identity()
    finally:
        opened.close()
    click.echo(
        "the store has a new identity: deliveries made from now on go under new idempotency "
        "keys; those made before keep theirs"
    )


def _refuse_while_processes_run(store: MessageStore, command: str) -> None:
    """Raise when a carehub process says it runs on this store (its row in the process list
    was refreshed within STALE_AFTER): a command that changes what they rely on must not
    run under them."""
    from sqlalchemy import inspect, select

    from carehub.store.processes import STALE_AFTER
    from carehub.store.schema import hub_processes
    from carehub.store.store import _aware

    now = datetime.now(UTC)
    table = hub_processes.c
    with store.engine.connect() as conn:
        if not inspect(conn).has_table("hub_processes"):
            return  # a schema from before the process list (revision 0013)
        # The columns every revision of the list has: the store may be at an older one.
        rows = conn.execute(
            select(table.role, table.host, table.pid, table.version, table.last_seen)
            .where(table.last_seen >= now - STALE_AFTER)
            .order_by(table.role, table.host, table.pid)
        ).all()
    if not rows:
        return
    names = "; ".join(
        f"{row.role} on {row.host} (pid {row.pid}, carehub {row.version}, last seen "
        f"{(now - _aware(row.last_seen)).total_seconds():.0f} s ago)"
        for row in rows
    )
    raise CarehubError(
        f"{command}: carehub processes run on this store: {names}; stop them first "
        "(--force runs it anyway)"
    )


@store.command("prune")
@hub_options
@click.option("--older-than", "days", type=DAYS, required=True, help="Days.")
@click.option(
    "--full",
    is_flag=True,
    help="PostgreSQL: VACUUM FULL (locks the tables). SQLite: VACUUM even while a hub serves "
    "from the store (it holds the write lock for its whole run: intake answers 'not stored').",
)
@click.option(
    "--include-unfinished",
    is_flag=True,
    help="Also delete older work not finished: messages not routed yet, with deliveries "
    "waiting or dead letters; open encounters and referrals, pending follow-ups.",
)
@click.option("--dry-run", is_flag=True, help="Count what would go and what stays; change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask first.")
@operator_option
def store_prune(
    config: HubConfig,
    data_dir: Path,
    days: int,
    full: bool,
    include_unfinished: bool,
    dry_run: bool,
    yes: bool,
    operator: str | None,
) -> None:
    """Delete messages received more than N days ago, and the care and referral records
    finished before then (encounters, their events, notifications and follow-ups; referrals
    and their events; patient merges nothing refers to any more), and reclaim the space.

    Kept (and counted) unless --include-unfinished: a message not routed yet, with a delivery
    waiting or being sent, or with a dead letter; an encounter still open, with a follow-up
    pending or a notification held for a digest; an open referral. Patients' opt-outs are
    always kept. It asks first when --older-than is 0 (everything up to now, perhaps while a
    hub is taking messages) or when work would be deleted; --yes skips the question.

    Rows go in short batches, so a hub serving from the store keeps answering meanwhile. On
    SQLite, VACUUM gives the freed space back to the disk only when no hub serves from the
    store (or with --full) and the disk has room for a second copy of the store; otherwise
    the freed pages stay in the file for new messages to reuse."""
    from carehub.hub import open_store
    from carehub.lockfile import store_holder

    age = timedelta(days=days)
    opened = open_store(config, data_dir, must_exist=True)
    try:
        plan = opened.prune_plan(age, include_unfinished=include_unfinished)
        if dry_run:
            for line in _prune_plan_lines(plan, days):
                click.echo(line)
            click.echo("dry run: nothing changed")
            return
        unfinished = plan.unfinished + plan.care.unfinished
        if (days < 1 or (include_unfinished and unfinished)) and not yes:
            for line in _prune_plan_lines(plan, days):
                click.echo(line)
            holder = store_holder(config, data_dir)
            if holder is not None:
                click.echo(f"a hub ({holder}) is serving from this store now")
            question = f"Delete {plan.deleted:,} message(s)"
            if plan.care.total:
                question += f" and {plan.care.total:,} care and referral record(s)"
            click.confirm(f"{question}?", abort=True)
        target = f"older than {days} day(s)" + (
            ", including unfinished" if include_unfinished else ""
        )
        # VACUUM holds SQLite's write lock for its whole run: not under a serving hub unless
        # asked for (the freed pages are reused by new rows meanwhile).
        serving = store_holder(config, data_dir) if opened.is_sqlite and not full else None
        with _audited(opened, "store prune", target, operator) as action:
            result = opened.prune(
                age,
                full_vacuum=full,
                include_unfinished=include_unfinished,
                vacuum=full or serving is None,
            )
            action.counts = {"messages": result.messages_deleted, **result.care_deleted}
            if result.plan is not None:
                action.counts["kept"] = result.plan.kept
                action.counts["kept_care_records"] = result.plan.care.kept
                action.counts["kept_patient_merges"] = result.plan.care.merges_in_use
            if not result.messages_deleted and not any(result.care_deleted.values()):
                action.outcome = "none"
    finally:
        opened.close()
    line = f"pruned {result.messages_deleted} message(s) older than {days} day(s)"
    if opened.is_sqlite and not result.vacuumed and result.used_after is not None:
        line += (
            f"; data {result.used_before or 0:,} -> {result.used_after:,} bytes, store file "
            f"{result.bytes_after or 0:,} bytes (the freed pages are reused by new rows)"
        )
    elif result.bytes_before is not None and result.bytes_after is not None:
        what = "store file" if opened.is_sqlite else "pruned tables"
        line += f"; {what} {result.bytes_before:,} -> {result.bytes_after:,} bytes"
        if not opened.is_sqlite and not full:
            # Plain VACUUM keeps the freed pages for the tables' own reuse, and a feed
            # writing meanwhile can grow them: only VACUUM FULL gives the space back.
            line += " (the freed space is kept for reuse by the tables; --full returns it)"
    if result.wal_after:
        line += f"; WAL {result.wal_after:,} bytes (trimmed by the serving hub's next checkpoint)"
    click.echo(line)
    if opened.is_sqlite and not result.vacuumed:
        if serving is not None and not full:
            why = f"a hub ({serving}) serves from this store and VACUUM would stop its intake"
            click.echo(f"not vacuumed: {why}; --full vacuums anyway")
        elif result.not_vacuumed and result.not_vacuumed != "not asked for":
            click.echo(f"not vacuumed: {result.not_vacuumed}", err=True)
    if result.plan is not None and result.plan.kept:
        click.echo(
            f"kept {result.plan.kept:,} older message(s) with work left: "
            f"{_prune_reasons(result.plan)} (--include-unfinished deletes them too)"
        )
    click.echo(f"pruned care and referral records: {_care_record_counts(result.care_deleted)}")
    if result.plan is None:
        return
    care = result.plan.care
    if care.kept:
        click.echo(
            f"kept {care.kept:,} older care and referral record(s) with work left: "
            f"{_care_reasons(care)} (--include-unfinished deletes them too)"
        )
    if care.merges_in_use:
        click.echo(f"kept {_merges_in_use(care)}")


def _prune_reasons(plan: PrunePlan) -> str:
    return (
        f"{plan.unrouted:,} not routed yet, {plan.waiting:,} with deliveries waiting or being "
        f"sent, {plan.dead:,} with dead letters"
    )


#: How prune names the rows of each care and referral table it counts.
_CARE_RECORD_NOUNS = {
    "encounters": "encounter(s)",
    "encounter_events": "encounter event(s)",
    "notifications": "notification(s)",
    "followups": "follow-up(s)",
    "referrals": "referral(s)",
    "referral_events": "referral event(s)",
    "patient_merges": "patient merge(s)",
}


def _care_record_counts(counts: dict[str, int]) -> str:
    return ", ".join(
        f"{counts.get(table, 0):,} {noun}" for table, noun in _CARE_RECORD_NOUNS.items()
    )


def _care_reasons(care: CareRecordsPlan) -> str:
    """The older care and referral records with work left, by reason (those there are)."""
    reasons = [
        (care.open_encounters, "open encounter(s)"),
        (care.encounters_with_followups, "encounter(s) with follow-ups pending"),
        (care.encounters_with_digest, "encounter(s) with notifications held for a digest"),
        (care.open_referrals, "open referral(s)"),
        (care.notices_for_digest, "notification(s) without a visit held for a digest"),
    ]
    return ", ".join(f"{count:,} {what}" for count, what in reasons if count) or "none"


def _merges_in_use(care: CareRecordsPlan) -> str:
    return (
        f"{care.merges_in_use:,} older patient merge(s): their patients still have records "
        "in the store, and a message for a retired identifier must still find them"
    )


def _prune_plan_lines(plan: PrunePlan, days: int) -> list[str]:
    """What a prune would do, for a dry run or before asking: how many go, what is kept and
    why, or what work goes with them; for messages, then for care and referral records."""
    lines = [
        f"{plan.older:,} message(s) received before {plan.cutoff:%Y-%m-%d %H:%M:%S} UTC "
        f"(older than {days} day(s))",
        f"  would delete {plan.deleted:,}",
    ]
    _with_work_left(
        lines, plan.include_unfinished, plan.unfinished, plan.kept, _prune_reasons(plan)
    )
    care = plan.care
    lines += [
        "care and referral records last changed before then:",
        f"  would delete {_care_record_counts(care.deleted)}",
    ]
    _with_work_left(lines, care.include_unfinished, care.unfinished, care.kept, _care_reasons(care))
    if care.merges_in_use:
        lines.append(f"  would keep {_merges_in_use(care)}")
    return lines


def _with_work_left(
    lines: list[str], include_unfinished: bool, unfinished: int, kept: int, reasons: str
) -> None:
    """After a "would delete" line: with --include-unfinished, how many of those still had
    work left; without it, how many are kept for it."""
    if include_unfinished:
        if unfinished:
            lines[-1] += f", including {unfinished:,} with work left: {reasons}"
        return
    lines.append(
        f"  would keep {kept:,} with work left: {reasons}"
        + (" (--include-unfinished deletes them too)" if kept else "")
    )


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
    from carehub.hub import keep_written_files_private

    keep_written_files_private()
    sys.exit(run_demo(config_path, data_dir))


if __name__ == "__main__":
    main()
