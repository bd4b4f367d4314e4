"""Shared test helpers: a real uvicorn HTTP server that records every request it gets and
answers with a status the test picks, a wait-for-condition poller, and `carehub` run as a real
subprocess. No mocks."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from carehub.config import HubConfig

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
Delay = float | Callable[[Received], float]


class HTTPServer:
    """A real uvicorn server on 127.0.0.1 (a free port) on a background thread.

    Every POST to any path is recorded on arrival, then answered with ``respond(request)``
    (200 by default) after ``delay`` seconds (a number, or a function of the request). Both may
    be changed while the server runs, e.g. to let a failing destination recover. With ``gzip``
    every answer is gzipped when the request's Accept-Encoding lists gzip, as HAPI FHIR and
    most web servers do."""

    def __init__(
        self, respond: Responder | None = None, delay: Delay = 0.0, *, gzip: bool = False
    ) -> None:
        self.respond: Responder = respond or (lambda _: 200)
        self.delay: Delay = delay
        self._lock = threading.Lock()
        self._requests: list[Received] = []
        self.in_flight = 0  # requests being held right now
        self.max_in_flight = 0

        async def record(request: Request) -> Response:
            arrived = Received(
                request.url.path, dict(request.headers), await request.body(), time.monotonic()
            )
            status = self.respond(arrived)
            with self._lock:
                self._requests.append(
                    Received(arrived.path, arrived.headers, arrived.body, arrived.at, status)
                )
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                delay = self.delay(arrived) if callable(self.delay) else self.delay
                if delay:
                    await asyncio.sleep(delay)
            finally:
                with self._lock:
                    self.in_flight -= 1
            if 200 <= status < 300:
                return Response(status_code=status)
            return PlainTextResponse(f"test server says {status}", status)

        app: ASGIApp = Starlette(routes=[Route("/{path:path}", record, methods=["POST"])])
        if gzip:
            app = GZipMiddleware(app, minimum_size=0)
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


# -- carehub as a real process ----------------------------------------------------------------
LISTENER_LINE = re.compile(r"MLLP listener '(\S+)' on ([\d.]+):(\d+)")


class CarehubProcess:
    """``python -m carehub.cli ARGS`` as a real process (no CAREHUB_* from the shell), its
    output in files under ``logs``. Use ``wait_ready`` before talking to it; ``kill`` in a
    finally block (or ``with``) so no process outlives its test."""

    def __init__(
        self, args: list[str], logs: Path, name: str, command: list[str] | None = None
    ) -> None:
        """``command``, when given, is run instead (a carehub command under a wrapper)."""
        logs.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.stdout_path = logs / f"{name}.out"
        self.stderr_path = logs / f"{name}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAREHUB_")}
        env["PYTHONUNBUFFERED"] = "1"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                command or [sys.executable, "-m", "carehub.cli", *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=logs,
                env=env,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Wait for "carehub ready" on stdout; fail with the output if the process exits."""

        def ready() -> bool:
            if "carehub ready" in self.stdout:
                return True
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode} before it was ready\n"
                    f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
                )
            return False

        wait_for(ready, timeout, 0.05, f"{self.name} to print 'carehub ready'")
        return self.stdout

    @property
    def mllp_address(self) -> tuple[str, int]:
        match = LISTENER_LINE.search(self.stdout)
        assert match, f"no MLLP listener line in:\n{self.stdout}"
        host = "127.0.0.1" if match.group(2) == "0.0.0.0" else match.group(2)
        return host, int(match.group(3))

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def __enter__(self) -> CarehubProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def on_this_host(config: HubConfig) -> HubConfig:
    """The shipped config for a test: listeners on free loopback ports, no file drop, a
    quick worker, and no periodic work (tests that need it move the clock and tick)."""
    for listener in config.listeners.mllp:
        listener.host, listener.port = "127.0.0.1", 0
    config.listeners.http.host, config.listeners.http.port = "127.0.0.1", 0
    config.listeners.files = []
    config.worker.poll_interval = 0.05
    config.worker.tick_interval = 3600
    return config
