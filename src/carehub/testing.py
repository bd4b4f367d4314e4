"""Test helpers for carehub and for projects that configure or extend it.

``HubThread`` runs a real hub (real sockets, real store) on a background event loop so plain
synchronous tests can talk to it, and waits for its deliveries; ``mllp_exchange`` sends frames
over a real socket; ``make_adt`` builds synthetic messages; ``run_routes`` and
``run_routes_async`` dry-run a message through a config's routes, ``run_routes_all`` (and
``run_routes_all_async``) every message of a file or batch; ``only_plugins`` keeps them to
the named plugins (and the built-ins); ``bind_channel`` gives one
destination's channel, to test its ``send()`` on its own, and ``HTTPReceiver`` is a real
HTTP server to send it to. Without a ``data_dir`` they use a temporary one, removed when it
is no longer needed. The pytest fixture ``carehub_routes`` lives in
``carehub.pytest_plugin``, which does not import this module until a test asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from carehub.config import HubConfig, MLLPListenerConfig, load_config, resolve_paths
from carehub.hl7.framing import Frame, FrameDecoder, encode_frame
from carehub.hub import Hub

if TYPE_CHECKING:
    from carehub.components import Channel
    from carehub.routing.dryrun import DryRunResult
    from carehub.store.outbox import DeliveryRecord

#: Delivery statuses that no longer change by themselves.
SETTLED = frozenset({"delivered", "skipped", "dead", "discarded"})

#: What the helpers take as a config: a loaded HubConfig, or the path of its file (a str
#: too, as tests often write it).
ConfigSource = HubConfig | Path | str


def _hub_config(config: ConfigSource) -> HubConfig:
    """The config itself, or the one its file holds (relative to the working folder)."""
    if isinstance(config, HubConfig):
        return config
    if isinstance(config, str | Path):
        return load_config(Path(config))
    raise TypeError(
        f"config must be a HubConfig or the path of a carehub.yaml, not {type(config).__name__}"
    )


@contextlib.contextmanager
def only_plugins(*names: str) -> Iterator[None]:
    """Inside ``with``, load the built-ins and the plugins ``names`` only (entry points and
    plugins-directory files alike), whatever else is installed: the helpers here, a hub and
    the ``carehub`` processes started meanwhile read CAREHUB_PLUGINS, which this sets and
    then gives back its value. (Under pytest, the ``carehub_plugins`` ini option does the
    same for a whole session.)"""
    from carehub.plugins import ENV_ALLOW

    before = os.environ.get(ENV_ALLOW)
    os.environ[ENV_ALLOW] = ",".join(names)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_ALLOW, None)
        else:
            os.environ[ENV_ALLOW] = before


def local_config(*, worker: bool = False, **overrides: Any) -> HubConfig:
    """A config bound to 127.0.0.1 on free ports, with no routes, for tests. The in-process
    worker is off unless asked for, so intake tests see messages stay 'received'. Given a
    ``source``, relative paths (``plugins_dir``, a data dir, TLS files) start from its
    folder, as they do in a config file. The overrides are validated as a config file's
    settings are: a path may be a str, and a misspelt setting is an error naming it."""
    config = HubConfig(routes=[])
    config.listeners.mllp = [MLLPListenerConfig(name="test", host="127.0.0.1", port=0)]
    config.listeners.http.host = "127.0.0.1"
    config.listeners.http.port = 0
    config.worker.enabled = worker
    if overrides:
        settings = {name: getattr(config, name) for name in HubConfig.model_fields}
        config = HubConfig.model_validate({**settings, **overrides})
    if config.source is not None:
        config.source = config.source.resolve()
        config = resolve_paths(config, config.source.parent)
    return config


class HubThread:
    """A running Hub on its own event loop thread; use as a context manager."""

    def __init__(self, config: HubConfig, data_dir: Path) -> None:
        self.hub = Hub(config, data_dir)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> HubThread:
        self._thread.start()
        try:
            self.call(self.hub.start())
        except BaseException:
            # __exit__ is not called when __enter__ raises: without this, every test of a
            # start that fails would leave a loop thread and an open store behind.
            if self.hub.store is not None:  # Hub.start closes what it opened; in case not
                with contextlib.suppress(Exception):
                    self.call(self.hub.stop())
            self._stop_loop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the hub's loop and wait for its result."""
        return self.submit(coroutine).result(timeout)

    def submit(self, coroutine: Any) -> Future[Any]:
        """Start a coroutine on the hub's loop without waiting (e.g. a stop to watch)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.call(self.hub.stop())
            self._stop_loop()

    def _stop_loop(self) -> None:
        """End the loop thread and the loop's helper threads (asyncio.to_thread's)."""
        with contextlib.suppress(Exception):
            self.call(self._loop.shutdown_default_executor(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def wait_for_deliveries(
        self, count: int = 1, *, destination: str | None = None, timeout: float = 30.0
    ) -> list[DeliveryRecord]:
        """Wait until at least ``count`` deliveries (to ``destination``, ``ROUTE/NAME``, if
        given) are in the store and every one of them is settled, delivered or dead, then
        return them oldest first. Retries count as unsettled, so a delivery that fails, waits
        and is sent again is returned once it is delivered or given up. Raises TimeoutError
        saying what it saw."""
        from carehub.store.outbox import Outbox

        if self.store is None:
            raise RuntimeError("the hub is not running: call wait_for_deliveries inside `with`")
        outbox = Outbox(self.store)
        deadline = time.monotonic() + timeout
        while True:
            found = outbox.find(destination=destination, limit=None)
            if len(found) >= count and all(d.status in SETTLED for d in found):
                return found
            if time.monotonic() >= deadline:
                seen = Counter(d.status for d in found)
                summary = ", ".join(f"{n} {status}" for status, n in sorted(seen.items()))
                raise TimeoutError(
                    f"waited {timeout:g} s for {count} settled deliveries"
                    f"{f' to {destination}' if destination else ''}; the store has "
                    f"{summary or 'none'}"
                )
            time.sleep(0.02)

    @property
    def store(self) -> Any:
        return self.hub.store

    @property
    def mllp_address(self) -> tuple[str, int]:
        address = self.hub.mllp_listeners[0].address
        assert address is not None
        return address

    @property
    def http_url(self) -> str:
        assert self.hub.http_listener and self.hub.http_listener.address
        host, port = self.hub.http_listener.address
        return f"http://{host}:{port}"


def read_frames(sock: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    """Read exactly ``count`` MLLP frames from a socket."""
    sock.settimeout(timeout)
    decoder = FrameDecoder(64 * 1024 * 1024)
    frames: list[bytes] = []
    while len(frames) < count:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed after {len(frames)} of {count} frames")
        frames += [e.payload for e in decoder.feed(data) if isinstance(e, Frame)]
    return frames


def mllp_exchange(
    address: tuple[str, int], payloads: Iterable[bytes], timeout: float = 10.0
) -> list[bytes]:
    """Send each payload framed on one connection, waiting for each answer in turn."""
    answers: list[bytes] = []
    with socket.create_connection(address, timeout=timeout) as sock:
        for payload in payloads:
            sock.sendall(encode_frame(payload))
            answers += read_frames(sock, 1, timeout)
    return answers


def make_adt(
    control_id: str = "MSG00001",
    event: str = "A01",
    *,
    patient_id: str = "P0001",
    authority: str = "HOSP",
    name: str = "TESTPATIENT^ALEX",
    sending_application: str = "ADT_SENDER",
    sending_facility: str = "TEST_HOSPITAL",
    version: str = "2.5",
    charset: str = "",
    patient_class: str = "I",
    location: str = "WARD^101^A",
    visit_number: str = "V0001",
    terminator: str = "\r",
    extra_segments: Iterable[str] = (),
) -> str:
    """A small synthetic ADT message (text; encode it with the charset you want to test).
    ``location`` is PV1-3, the assigned location: point of care (unit), room, bed."""
    msh = [
        "MSH",
        "^~\\&",
        sending_application,
        sending_facility,
        "CAREHUB",
        "CAREHUB",
        "20261125083000",
        "",
        f"ADT^{event}^ADT_A01",
        control_id,
        "P",
        version,
    ]
    if charset:
        msh += ["", "", "", "", "", charset]
    segments = [
        "|".join(msh),
        f"EVN|{event}|20261125083000",
        f"PID|1||{patient_id}^^^{authority}^MR||{name}||19700101|F",
        f"PV1|1|{patient_class}|{location}||||1234567890^DOCTOR^TEST|||MED||||||||"
        f"|{visit_number}^^^{authority}^VN",
        *extra_segments,
    ]
    return terminator.join(segments) + terminator


# -- channels --------------------------------------------------------------------------------
def bind_channel(config: ConfigSource, destination: str, data_dir: Path | None = None) -> Channel:
    """The channel instance of one destination (``ROUTE/NAME``), built from the route exactly
    as the hub builds it (options validated, ``${VAR}`` expanded) but not started: test
    ``send()`` against a real server with ``await channel.start()``, ``await
    channel.send(outgoing)`` (an Outgoing from run_routes' deliveries) and ``await
    channel.close()``. The channel may keep files in the data dir as it sends (a route's
    ``${CAREHUB_DATA_DIR}``, the fhir-referral channel's Task map): without ``data_dir`` it
    gets a temporary one, removed once the channel is no longer referenced."""
    from carehub.hub import build_routing

    hub_config = _hub_config(config)
    scratch = None
    if data_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="carehub-")
        data_dir = Path(scratch.name)
    try:
        _, table = build_routing(hub_config, data_dir)
        found = table.destinations.get(destination)
        if found is None:
            known = ", ".join(sorted(table.destinations)) or "none"
            raise LookupError(f"no destination {destination!r} in the routes (there are: {known})")
    except BaseException:
        if scratch is not None:
            scratch.cleanup()
        raise
    if scratch is not None:
        weakref.finalize(found.channel, scratch.cleanup)
    return found.channel


# -- an HTTP destination ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request an HTTPReceiver took, as it arrived."""

    method: str
    #: The path with its query string, as sent (``/hook?token=x``).
    path: str
    #: Header names in lower case.
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body read as JSON."""
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class CannedResponse:
    """What an HTTPReceiver answers: a status, a body (a str is sent as UTF-8) and headers,
    after ``delay`` seconds (to test a channel's timeout)."""

    status: int = 200
    body: bytes | str = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0


class HTTPReceiver:
    """A real HTTP server on 127.0.0.1 (a free port) on threads of its own, for testing a
    channel's ``send()``: real status codes, headers and refused connections, which the retry
    logic depends on, rather than a mock. It records every request (method, path, headers,
    body) and answers it with the next response ``respond()`` queued, or with the default
    one (the constructor's; 200 and no body unless told). Use as a context manager: the
    server listens inside ``with`` and is closed at its end."""

    def __init__(
        self, status: int = 200, body: bytes | str = b"", headers: Mapping[str, str] | None = None
    ) -> None:
        self.default = CannedResponse(status, body, dict(headers or {}))
        self._queued: deque[CannedResponse] = deque()
        self._requests: list[ReceivedRequest] = []
        self._arrived = threading.Condition()
        self._server: _ReceiverServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HTTPReceiver:
        self._server = _ReceiverServer(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="carehub-http-receiver", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
        self._server = self._thread = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the receiver is not running: use it inside `with`")
        return int(self._server.server_address[1])

    def url(self, path: str = "/") -> str:
        """The address of ``path`` on this receiver, to put in a route."""
        return f"http://127.0.0.1:{self.port}{path}"

    def respond(
        self,
        status: int = 200,
        body: bytes | str = b"",
        headers: Mapping[str, str] | None = None,
        *,
        delay: float = 0.0,
    ) -> None:
        """Queue the answer to one request; queued answers go out in order, then the default."""
        with self._arrived:
            self._queued.append(CannedResponse(status, body, dict(headers or {}), delay))

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request so far, in arrival order (a copy)."""
        with self._arrived:
            return list(self._requests)

    def wait_for_requests(self, count: int = 1, timeout: float = 10.0) -> list[ReceivedRequest]:
        """Wait until at least ``count`` requests have arrived and return them all; raise
        TimeoutError saying how many came."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(
                    f"waited {timeout:g} s for {count} request(s); {len(self._requests)} came"
                )
            return list(self._requests)

    def _took(self, request: ReceivedRequest) -> CannedResponse:
        """Record a request; the answer it gets."""
        with self._arrived:
            self._requests.append(request)
            self._arrived.notify_all()
            return self._queued.popleft() if self._queued else self.default


class _ReceiverHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # 100-continue and chunked bodies; each answer closes
    server: _ReceiverServer

    def _answer(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        request = ReceivedRequest(self.command, self.path, headers, self._body())
        response = self.server.receiver._took(request)
        if response.delay:
            time.sleep(response.delay)
        body = response.body.encode() if isinstance(response.body, str) else response.body
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")  # nothing lingers once the receiver closes
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _answer

    def _body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after each chunk
        while self.rfile.readline().strip():  # trailer fields, up to the empty line
            pass
        return b"".join(chunks)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a test's output is not the place for an access log."""


class _ReceiverServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, receiver: HTTPReceiver) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.receiver = receiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up before its answer (a timeout test) is expected: only other
        errors are printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


# -- dry runs -------------------------------------------------------------------------------
#: What run_routes and the carehub_routes fixture take: message text, bytes, or a file path.
MessageSource = str | bytes | Path


def is_message_text(value: str) -> bool:
    """Whether a string is HL7 text rather than a file path: it holds a segment separator or
    the field separator ``|`` (a path has neither; a one-line message has ``|``)."""
    return "\r" in value or "\n" in value or "|" in value


def read_messages(source: MessageSource, base: Path | None = None) -> list[bytes]:
    """Every message in a source, as ``routes test`` reads a file: one message, several, or
    an FHS/BHS batch, split with ``split_messages``. A string is message text when
    ``is_message_text`` says so, else a path (relative to ``base``, when given)."""
    from carehub.hl7.batch import split_messages

    if isinstance(source, str) and not is_message_text(source):
        source = Path(source)
        if base is not None and not source.is_absolute():
            source = base / source
    if isinstance(source, Path):
        try:
            data = source.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{source}: no such file (a string is read as a file path unless it holds a "
                "segment separator or '|', which makes it message text)"
            ) from None
        what = str(source)
    elif isinstance(source, str):
        data, what = source.encode("utf-8"), "the message text"
    else:
        data, what = source, "the message bytes"
    messages = split_messages(data)
    if not messages:
        raise ValueError(f"{what}: no HL7 message (no MSH segment)")
    return messages


def _one(source: MessageSource, messages: list[bytes]) -> bytes:
    if len(messages) != 1:
        if isinstance(source, Path) or (isinstance(source, str) and not is_message_text(source)):
            what = str(source)
        else:
            what = "the message text" if isinstance(source, str) else "the message bytes"
        raise ValueError(
            f"{what} holds {len(messages)} messages; run_routes takes one: use run_routes_all "
            "(carehub_routes.all in a test) for one result per message"
        )
    return messages[0]


def run_routes(
    message: MessageSource,
    config: ConfigSource,
    data_dir: Path | None = None,
) -> DryRunResult:
    """Dry-run one message (text, bytes or a file path) through the routes of a config:
    which routes matched and why, each step's output, what each forward would send. A
    message the hub's intake would not accept (AE or AR) goes through no route, as on the
    hub: ``result.not_routed`` then says why (else it is None). A file or text holding
    several messages is an error naming run_routes_all. It runs the components on an event
    loop of its own (asyncio.run): from an ``async def`` test, await run_routes_async
    instead."""
    return asyncio.run(run_routes_async(message, config, data_dir))


async def run_routes_async(
    message: MessageSource,
    config: ConfigSource,
    data_dir: Path | None = None,
) -> DryRunResult:
    """run_routes on the running event loop, for async tests (where asyncio.run, and so
    run_routes, cannot be called). The components' start(), steps and close() run on it."""
    (result,) = await _dry_run([_one(message, read_messages(message))], config, data_dir)
    return result


def run_routes_all(
    messages: MessageSource,
    config: ConfigSource,
    data_dir: Path | None = None,
) -> list[DryRunResult]:
    """Dry-run every message in a file, text or bytes (several messages, or an FHS/BHS
    batch, as ``carehub routes test`` reads them): one result per message, in order, with
    the routes' components started once for all of them."""
    return asyncio.run(run_routes_all_async(messages, config, data_dir))


async def run_routes_all_async(
    messages: MessageSource,
    config: ConfigSource,
    data_dir: Path | None = None,
) -> list[DryRunResult]:
    """run_routes_all on the running event loop, for async tests."""
    return await _dry_run(read_messages(messages), config, data_dir)


async def _dry_run(
    payloads: list[bytes], config: ConfigSource, data_dir: Path | None
) -> list[DryRunResult]:
    from carehub.hub import build_routing
    from carehub.routing.dryrun import dry_run_all_async

    hub_config = _hub_config(config)
    with _data_dir_or_scratch(data_dir) as data:
        host, table = build_routing(hub_config, data)
        return await dry_run_all_async(table, host, payloads)


@contextlib.contextmanager
def _data_dir_or_scratch(data_dir: Path | None) -> Iterator[Path]:
    """``data_dir``, or a temporary one removed on leaving: a dry run's components start,
    run and close inside it, and its result refers to nothing in it."""
    if data_dir is not None:
        yield data_dir
        return
    with tempfile.TemporaryDirectory(prefix="carehub-") as scratch:
        yield Path(scratch)
