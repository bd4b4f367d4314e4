"""HTTP intake (FastAPI on uvicorn, in the hub's event loop).

POST /hl7 with an HL7 v2 message as the body returns the ACK as the body, with a status that
matches it: 200 AA, 422 AE (stored, content refused), 400 AR (not HL7), 413 over the size
limit, 401 without a valid bearer token when tokens are configured, 503 when the store is down.
A body holding several messages, or an FHS/BHS batch, is split as the file drop splits a file:
each message is stored and answered like one posted alone, text outside the messages is
stored as a rejected row (AR), and the body of the answer holds every ACK in order (wrapped in
FHS/BHS ... BTS/FTS when the request was), with the status of the worst of them.
GET /health answers without a token so load balancers can probe it, with the status alone; the
details (listeners, intake counts, queue) need a token when tokens are configured, as GET
/metrics does. /docs, /redoc and /openapi.json are served only with listeners.http.api_docs.
With listeners.http.tls the listener speaks HTTPS only (mutual TLS with its client_ca).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from carehub.config import HTTPListenerConfig
from carehub.hl7.ack import AckCode
from carehub.hl7.batch import MessageSlice, SplitData, Stray, answer_envelope, split_data
from carehub.hl7.framing import HEAD_BYTES
from carehub.intake.intake import Arrival, Intake, IntakeResult
from carehub.intake.tls import HANDSHAKE_TIMEOUT, HandshakeFailures
from carehub.store.store import MessageStore

log = logging.getLogger(__name__)

HL7_MEDIA_TYPE = "x-application/hl7-v2+er7"
_STATUS_FOR_CODE = {AckCode.ACCEPT: 200, AckCode.ERROR: 422, AckCode.REJECT: 400}
#: Which status of several ACKs answers the request: the one a sender most needs to act on.
#: 503 first (something was not stored: send the body again, resends are recognised).
_SEVERITY = {200: 0, 422: 1, 400: 2, 503: 3}


#: For an answer sent before the whole request body was read: the connection cannot carry
#: another request.
CLOSE = {"Connection": "close"}


async def read_body(request: Request, limit: int) -> tuple[bytes, int]:
    """The body and its size, read no further than ``limit`` bytes, so a sender cannot make the
    hub hold a body of any size in memory. A body over the limit comes back cut short, with its
    declared Content-Length, or else the bytes read before reading stopped."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        head = bytearray()
        async for chunk in request.stream():
            head += chunk
            if len(head) >= HEAD_BYTES:
                break
        return bytes(head), int(declared)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        chunks.append(chunk)
        if size > limit:
            break
    return b"".join(chunks), size


def oversize_text(request: Request, size: int, limit: int) -> str:
    """How big a body read_body stopped reading is: its Content-Length when it declared one,
    else (chunked) only that it holds more than ``limit`` bytes, since the bytes read before
    reading stopped are not its size."""
    if request.headers.get("content-length", "").isdigit():
        return f"{size} bytes"
    return f"more than {limit} bytes"


def bearer_accepted(request: Request, tokens: list[str]) -> bool:
    """Whether the request carries one of ``tokens`` as its bearer token (any request does
    when there are none)."""
    if not tokens:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    return any(hmac.compare_digest(presented.encode(), t.encode()) for t in tokens)


def unauthorized() -> JSONResponse:
    """The answer to a request without a valid bearer token."""
    return JSONResponse(
        {"error": "missing or invalid bearer token"},
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer realm="carehub"'},
    )


def build_app(
    config: HTTPListenerConfig,
    intake: Intake,
    tokens: list[str],
    health: Callable[[], dict[str, Any]],
    metrics: Callable[[], bytes] | None = None,
    store: MessageStore | None = None,
) -> FastAPI:
    # The API description is off unless asked for: it maps every endpoint for anyone who asks.
    docs_on = config.api_docs
    app = FastAPI(
        title="carehub",
        summary="HL7 v2 intake over HTTP",
        docs_url="/docs" if docs_on else None,
        redoc_url="/redoc" if docs_on else None,
        openapi_url="/openapi.json" if docs_on else None,
    )
    if store is not None:
        # Status updates from the organisations a referral was sent to (closed-loop referrals).
        from carehub.referrals.api import register_referral_routes

        register_referral_routes(app, store, tokens, organizations=config.organization_tokens)

    def authorized(request: Request) -> bool:
        return bearer_accepted(request, tokens)

    @app.post("/hl7", summary="Submit one HL7 v2 message; the response body is its ACK")
    async def receive_message(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        peer = f"{request.client.host}:{request.client.port}" if request.client else None
        arrival = Arrival("http", "http", peer, config.default_charset)
        body, size = await read_body(request, config.max_message_bytes)
        if size > config.max_message_bytes:
            reason = (
                f"message of {oversize_text(request, size, config.max_message_bytes)} exceeds "
                f"this listener's limit of {config.max_message_bytes} bytes"
            )
            result = await intake.reject_unreadable_frame(body[:HEAD_BYTES], size, arrival, reason)
            return Response(result.ack, status_code=413, media_type=HL7_MEDIA_TYPE, headers=CLOSE)
        contents = None if _single(body) else split_data(body)
        if contents is not None and contents.batch_problems:
            # A batch cut short on the way, or whose trailers count other than it holds: none
            # of it is taken, so that the sender resends it whole.
            reason = (
                f"the batch does not hold together: {'; '.join(contents.batch_problems)}; "
                "none of its messages was stored, send the whole batch again"
            )
            result = await intake.reject_unreadable_frame(
                body[:HEAD_BYTES], len(body), arrival, reason
            )
            return Response(result.ack, status_code=400, media_type=HL7_MEDIA_TYPE)
        if contents is not None and (len(contents.messages) > 1 or contents.wrappers):
            results = await _receive_parts(intake, contents, arrival)
            status = max((_status(r) for r in results), key=_SEVERITY.__getitem__, default=200)
            head, tail = answer_envelope(
                contents.wrappers, len(results), intake.hub_application, intake.hub_facility
            )
            acks = b"".join(r.ack for r in results)
            if head:
                encode = contents.codec
                acks = head.encode(encode, "replace") + acks + tail.encode(encode, "replace")
            return Response(acks, status_code=status, media_type=HL7_MEDIA_TYPE)
        # One message, or none: taken whole, exactly like an MLLP frame.
        result = await intake.receive(body, arrival)
        return Response(result.ack, status_code=_status(result), media_type=HL7_MEDIA_TYPE)

    @app.get("/health", summary="Liveness and store reachability; details with a token")
    async def health_check(request: Request) -> JSONResponse:
        report = await asyncio.to_thread(health)
        status_code = 200 if report.get("status") == "ok" else 503
        if not authorized(request):
            # What a load balancer needs; listener addresses, paths and counts are not for
            # whoever reaches the port.
            report = {"status": report.get("status")}
        return JSONResponse(report, status_code=status_code)

    if metrics is not None:

        @app.get("/metrics", summary="Prometheus metrics (a token when tokens are configured)")
        async def prometheus_metrics(request: Request) -> Response:
            if not authorized(request):
                return unauthorized()
            # Off the event loop: a scrape may wait on the store (carehub.metrics), and
            # intake must not wait with it.
            body = await asyncio.to_thread(metrics)
            return Response(body, media_type="text/plain; version=0.0.4")

    return app


def _single(body: bytes) -> bool:
    """True when the body cannot hold a second message or a batch header or trailer, found
    with a few byte searches: splitting a body costs a hundred microseconds, and nearly every
    body holds one message. UTF-16/32 bodies (NUL bytes in their first characters) are always
    split. A trailer alone (a BTS after one message) is a batch cut short, refused as the
    file drop refuses it, not a segment of the message."""
    if b"\x00" in body[:16]:
        return False
    if body.find(b"MSH", body.find(b"MSH") + 3) >= 0:
        return False
    return not any(wrapper in body for wrapper in (b"FHS", b"BHS", b"BTS", b"FTS"))


def _status(result: IntakeResult) -> int:
    if result.code is AckCode.ERROR and result.message_id is None:
        return 503  # not stored at all: the sender must retry
    return _STATUS_FOR_CODE[result.code]


async def _receive_parts(
    intake: Intake, contents: SplitData, arrival: Arrival
) -> list[IntakeResult]:
    """Every message of a split body stored as if posted alone, and any text outside them
    stored as a rejected row (as the file drop does), answered in body order."""
    items: list[MessageSlice | Stray] = sorted(
        [*contents.messages, *contents.stray], key=lambda item: item.offset
    )

    def take(item: MessageSlice | Stray) -> Any:
        if isinstance(item, MessageSlice):
            return intake.receive(item.data, arrival)
        reason = (
            f"text outside any HL7 message at byte {item.offset} of the body "
            "(not blank and not a batch header or trailer segment)"
        )
        return intake.reject_unreadable_frame(
            item.data[:HEAD_BYTES], len(item.data), arrival, reason
        )

    # Submitted in body order, so the messages share a commit and keep their order.
    return list(await asyncio.gather(*(take(item) for item in items)))


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the hub owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _TLSFirst(asyncio.Protocol):
    """An HTTPS connection until its TLS handshake is done: the handshake is run here
    (loop.start_tls), then the connection is handed to uvicorn's protocol, so that one that
    fails is logged with the peer and the reason. A server given the TLS context itself
    (create_server(ssl=...)) drops a failed handshake without a word: asyncio logs it only in
    debug mode.

    What the client sends with the end of its handshake (its first request, often) reaches
    this protocol before it hands over, and is passed on as it does."""

    def __init__(
        self,
        http: asyncio.Protocol,
        context: ssl.SSLContext,
        failures: HandshakeFailures,
        handshakes: set[asyncio.Task[None]],
    ) -> None:
        self._http = http
        self._context = context
        self._failures = failures
        self._handshakes = handshakes
        self._early: list[bytes] = []
        self._eof = False
        self._lost = False
        self._handed_over = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the client's hello is for start_tls to read
        task = asyncio.get_running_loop().create_task(self._handshake(transport))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        peername = transport.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        if self._lost or transport.is_closing():
            return
        try:
            secured = await asyncio.wait_for(
                loop.start_tls(transport, self, self._context, server_side=True),
                HANDSHAKE_TIMEOUT,
            )
        except Exception as err:  # start_tls has closed the connection
            self._failures.failed(peername, err)
            return
        if secured is None or self._lost:  # gone before it could be handed over
            return
        secured.set_protocol(self._http)
        self._handed_over = True
        self._http.connection_made(secured)
        for data in self._early:
            self._http.data_received(data)
        self._early.clear()
        if self._eof and not self._http.eof_received():
            secured.close()

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> None:
        self._eof = True  # passed on with the connection (over TLS it closes either way)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handed_over:  # the loss was on its way here as the connection was handed over
            self._http.connection_lost(exc)
        self._lost = True


class _ServerSettings(uvicorn.Config):
    """uvicorn's settings with the TLS context carehub built (carehub.intake.tls, as the MLLP
    listener's: TLS 1.2 at least, client certificates as tls.client_ca and
    tls.require_client_cert say), each connection running its own handshake (_TLSFirst), in
    place of the context uvicorn would build from file names and hand to the server."""

    def __init__(
        self,
        app: FastAPI,
        ssl_context: ssl.SSLContext | None,
        failures: HandshakeFailures,
        handshakes: set[asyncio.Task[None]],
        **settings: Any,
    ) -> None:
        super().__init__(app, **settings)
        self._ssl_context = ssl_context
        self._failures = failures
        self._handshakes = handshakes

    def load(self) -> None:
        super().load()
        context = self._ssl_context
        if context is None:
            return
        http = self.http_protocol_class

        def protocol(**settings: Any) -> asyncio.Protocol:
            return _TLSFirst(http(**settings), context, self._failures, self._handshakes)

        self.http_protocol_class = protocol  # type: ignore[assignment]


class HTTPListener:
    def __init__(
        self, config: HTTPListenerConfig, app: FastAPI, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.config = config
        self.name = "http"
        self.address: tuple[str, int] | None = None
        self.tls = ssl_context is not None
        #: Failed TLS handshakes, logged per peer address (with listeners.http.tls).
        self.handshake_failures = HandshakeFailures(f"HTTP listener {self.name}", log)
        #: Connections in their TLS handshake (see _TLSFirst), cancelled when the listener stops.
        self._handshakes: set[asyncio.Task[None]] = set()
        self._server = _EmbeddedServer(
            _ServerSettings(
                app,
                ssl_context,
                self.handshake_failures,
                self._handshakes,
                host=config.host,
                port=config.port,
                log_level="warning",
                access_log=False,
                lifespan="off",
            )
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> tuple[str, int]:
        self._task = asyncio.create_task(self._serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # why it could not start (an OSError when it cannot bind)
                raise OSError(f"HTTP listener could not bind {self.config.host}:{self.config.port}")
            await asyncio.sleep(0.01)
        sock = self._server.servers[0].sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        return self.address

    async def _serve(self) -> None:
        """uvicorn's serve(), with the SystemExit it raises when it cannot bind turned back into
        the OSError behind it: a SystemExit leaving a task would stop the hub's whole loop."""
        try:
            await self._server.serve()
        except SystemExit as exit_:
            cause = exit_.__context__
            if isinstance(cause, OSError):
                raise OSError(cause.errno, cause.strerror or str(cause)) from None
            raise OSError(f"HTTP listener stopped on start (exit code {exit_.code})") from None

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task:
            with contextlib.suppress(Exception, SystemExit):
                await self._task
        for handshake in list(self._handshakes):
            handshake.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)
