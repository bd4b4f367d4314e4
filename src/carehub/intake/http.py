"""HTTP intake (FastAPI on uvicorn, in the hub's event loop).

POST /hl7 with an HL7 v2 message as the body returns the ACK as the body, with a status that
matches it: 200 AA, 422 AE (stored, content refused), 400 AR (not HL7), 413 over the size
limit, 401 without a valid bearer token when tokens are configured, 503 when the store is down.
GET /health answers without a token so load balancers can probe it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from carehub.config import HTTPListenerConfig
from carehub.hl7.ack import AckCode
from carehub.hl7.framing import HEAD_BYTES
from carehub.intake.intake import Arrival, Intake
from carehub.store.store import MessageStore

log = logging.getLogger(__name__)

HL7_MEDIA_TYPE = "x-application/hl7-v2+er7"
_STATUS_FOR_CODE = {AckCode.ACCEPT: 200, AckCode.ERROR: 422, AckCode.REJECT: 400}


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


def build_app(
    config: HTTPListenerConfig,
    intake: Intake,
    tokens: list[str],
    health: Callable[[], dict[str, Any]],
    metrics: Callable[[], bytes] | None = None,
    store: MessageStore | None = None,
) -> FastAPI:
    app = FastAPI(title="carehub", summary="HL7 v2 intake over HTTP", docs_url="/docs")
    if store is not None:
        # Status updates from the organisations a referral was sent to (closed-loop referrals).
        from carehub.referrals.api import register_referral_routes

        register_referral_routes(app, store, tokens)

    def authorized(request: Request) -> bool:
        if not tokens:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return False
        return any(hmac.compare_digest(presented.encode(), t.encode()) for t in tokens)

    @app.post("/hl7", summary="Submit one HL7 v2 message; the response body is its ACK")
    async def receive_message(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse(
                {"error": "missing or invalid bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="carehub"'},
            )
        peer = f"{request.client.host}:{request.client.port}" if request.client else None
        arrival = Arrival("http", "http", peer, config.default_charset)
        body, size = await read_body(request, config.max_message_bytes)
        if size > config.max_message_bytes:
            reason = (
                f"message of {size} bytes exceeds this listener's limit of "
                f"{config.max_message_bytes} bytes"
            )
            result = await intake.reject_unreadable_frame(body[:HEAD_BYTES], size, arrival, reason)
            return Response(result.ack, status_code=413, media_type=HL7_MEDIA_TYPE, headers=CLOSE)
        result = await intake.receive(body, arrival)
        status = _STATUS_FOR_CODE[result.code]
        if result.code is AckCode.ERROR and result.message_id is None:
            status = 503  # not stored at all: the sender must retry
        return Response(result.ack, status_code=status, media_type=HL7_MEDIA_TYPE)

    @app.get("/health", summary="Liveness and store reachability")
    async def health_check() -> JSONResponse:
        report = await asyncio.to_thread(health)
        return JSONResponse(report, status_code=200 if report.get("status") == "ok" else 503)

    if metrics is not None:

        @app.get("/metrics", summary="Prometheus metrics")
        async def prometheus_metrics() -> Response:
            return Response(metrics(), media_type="text/plain; version=0.0.4")

    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the hub owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HTTPListener:
    def __init__(self, config: HTTPListenerConfig, app: FastAPI) -> None:
        self.config = config
        self.name = "http"
        self.address: tuple[str, int] | None = None
        self._server = _EmbeddedServer(
            uvicorn.Config(
                app,
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
