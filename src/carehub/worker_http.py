"""A `carehub worker`'s own /health and /metrics (`--http-port`).

In a scale-out deployment serve routes and sends nothing, so its /metrics has no routing or
delivery counters and its /health says nothing of the workers: each worker answers for
itself, whether it has its store and its broker, and what it routed and sent. The same
bearer tokens as serve's HTTP listener guard the details and /metrics, and the same limits
hold its connections (listeners.http's defaults) and log refused tokens."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from carehub.components import on_this_machine
from carehub.config import HTTPListenerConfig
from carehub.intake.http import (
    AuthFailures,
    HTTPListener,
    bearer_accepted,
    details_allowed,
    unauthorized,
    warn_if_open_to_anyone,
    warn_if_tokens_short,
)
from carehub.metrics import make_worker_registry, render
from carehub.worker import Worker

log = logging.getLogger(__name__)

#: How the worker's HTTP port is named in the log.
WHAT = "worker HTTP"


def worker_health(worker: Worker) -> dict[str, Any]:
    """ok when the worker reads its store and holds its broker connection; what is wrong
    otherwise (a load balancer or orchestrator restarts or alerts on the 503)."""
    problems: dict[str, str] = {}
    store = "ok" if worker.store.ping() else "cannot reach the store"
    if store != "ok":
        problems["store"] = store
    lost = worker.broker_lost
    queue = "ok"
    if lost is not None:
        since, why = lost
        queue = f"lost the broker since {since.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({why})"
        problems["queue"] = queue
    return {
        "status": "ok" if not problems else "trouble",
        "store": store,
        "queue": queue,
        "routed": worker.routed,
        "delivered": worker.delivered,
        "failed_attempts": worker.failed_attempts,
    }


def worker_app(
    worker: Worker, tokens: list[str], auth_failures: AuthFailures | None = None
) -> FastAPI:
    """/health and /metrics; ``auth_failures``: the port's refused requests, for /metrics."""
    app = FastAPI(title="carehub worker", docs_url=None, redoc_url=None, openapi_url=None)
    registry = make_worker_registry(worker, auth_failures)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        report = await asyncio.to_thread(worker_health, worker)
        status_code = 200 if report["status"] == "ok" else 503
        if not details_allowed(request, tokens):
            report = {"status": report["status"]}
        return JSONResponse(report, status_code=status_code)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not bearer_accepted(request, tokens):
            return unauthorized()
        body = await asyncio.to_thread(render, registry)
        return Response(body, media_type="text/plain; version=0.0.4")

    return app


async def start_worker_http(
    worker: Worker, host: str, port: int, tokens: list[str]
) -> tuple[HTTPListener, tuple[str, int]]:
    """Serve the worker's /health and /metrics on ``host:port`` (0: a free port), warning as
    serve does when that is beyond loopback: without tokens anyone who reaches it reads them,
    and (there is no TLS here) with tokens they cross the network in clear."""
    warn_if_open_to_anyone(
        WHAT, host, tokens, "serves its /health details and /metrics to", logger=log
    )
    if tokens and not on_this_machine(host):
        log.warning(
            "%s on %s has no TLS: its bearer tokens cross the network in clear; keep it on a "
            "trusted network or behind a TLS terminator, or bind it to 127.0.0.1 (--http-host)",
            WHAT,
            host,
        )
    warn_if_tokens_short(tokens, logger=log)
    failures = AuthFailures(WHAT, log)
    listener = HTTPListener(
        HTTPListenerConfig(host=host, port=port),
        worker_app(worker, tokens, failures),
        name="worker",
        label=WHAT,
        auth_failures=failures,
    )
    address = await listener.start()
    return listener, address
