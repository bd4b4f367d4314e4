"""Shared test helpers: a real uvicorn HTTP server that records every request it gets and
answers with a status the test picks, plus a wait-for-condition poller. No mocks."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

T = TypeVar("T")
START_TIMEOUT = 30.0


def wait_for(
    condition: Callable[[], T], timeout: float = 20.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout``
    seconds with ``what`` (a string, or the condition's last value when empty)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what or 'condition'}; last: {value!r}"
            )
        time.sleep(interval)


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the server saw it, and the status it answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() on arrival
    status: int = 0

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def key(self) -> str | None:
        return self.headers.get("idempotency-key")


Responder = Callable[[Received], int]


class HTTPServer:
    """A real uvicorn server on 127.0.0.1 (a free port) on a background thread.

    Every POST to any path is recorded on arrival, then answered with ``respond(request)``
    (200 by default) after ``delay`` seconds. Both may be changed while the server runs, e.g.
    to let a failing destination recover."""

    def __init__(self, respond: Responder | None = None, delay: float = 0.0) -> None:
        self.respond: Responder = respond or (lambda _: 200)
        self.delay = delay
        self._lock = threading.Lock()
        self._requests: list[Received] = []

        async def record(request: Request) -> Response:
            arrived = Received(
                request.url.path, dict(request.headers), await request.body(), time.monotonic()
            )
            status = self.respond(arrived)
            with self._lock:
                self._requests.append(
                    Received(arrived.path, arrived.headers, arrived.body, arrived.at, status)
                )
            if self.delay:
                await asyncio.sleep(self.delay)
            if 200 <= status < 300:
                return Response(status_code=status)
            return PlainTextResponse(f"test server says {status}", status)

        app = Starlette(routes=[Route("/{path:path}", record, methods=["POST"])])
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, lifespan="off")
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def requests(self) -> list[Received]:
        """Every request so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    def answered(self, status: int) -> list[Received]:
        return [r for r in self.requests if r.status == status]

    def ok(self) -> list[Received]:
        """Requests answered 2xx."""
        return [r for r in self.requests if 200 <= r.status < 300]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def __enter__(self) -> HTTPServer:
        self._thread.start()
        wait_for(lambda: self._server.started, START_TIMEOUT, 0.01, "uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
