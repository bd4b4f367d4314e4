"""What every channel that speaks HTTP shares: one connection pool per channel instance, URL
option checks, and which answers are worth retrying.

Channels speak httpx (its request and response API, its exceptions), but the connections
underneath are aiohttp's, through httpx-aiohttp's transport. httpx's own async connection pool
costs CPU that grows with the requests in flight (httpx issue #3215): measured here against a
local receiver, 1.7 ms of CPU per POST one at a time and 4.8 ms with 32 in flight, against 0.7
and 0.8 ms over aiohttp. bench/bench_routing.py (a webhook and a file forward) went from 120
to 186 msg/s end to end with this and compact JSON files."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from carehub.components import Channel, ComponentContext, ComponentOptions

USER_AGENT = "carehub"

#: Besides every 5xx: timeout, too early, too many requests. Other 4xx will not get better.
RETRYABLE_STATUS = frozenset({408, 425, 429})


def is_retryable(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def http_url(value: str, option: str = "url") -> str:
    """An options validator: an absolute http(s) URL with a host."""
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as err:
        raise ValueError(f"bad {option} {value!r}: {err}") from err
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{option} must be http:// or https:// with a host, got {value!r}")
    return value


async def read_some(response: httpx.Response, limit: int = 4096) -> str:
    """The start of an error body; a huge error page is not worth reading whole."""
    chunks = bytearray()
    async for chunk in response.aiter_bytes():
        chunks += chunk
        if len(chunks) >= limit:
            break
    return bytes(chunks[:limit]).decode(response.encoding or "utf-8", "replace")


async def finish_reading(response: httpx.Response, limit: int = 64 * 1024) -> None:
    """Read the rest of a short answer so its connection goes back to the pool.

    httpx closes a connection whose streamed response was left unread, so each delivery
    opened a new one: about 300 new TCP connections a second to a webhook under load, with
    thousands left in TIME-WAIT. An answer longer than ``limit`` is abandoned (its connection
    closed) rather than read whole. An empty answer (``Content-Length: 0``, the usual reply
    to a webhook) has nothing to read: setting up the read cost a quarter of the CPU of the
    whole POST (140 against 102-119 µs, 32 in flight)."""
    if response.headers.get("content-length") == "0":
        return
    await read_some(response, limit)


class _Transport(AiohttpTransport):  # type: ignore[misc]
    """httpx-aiohttp's transport with aiohttp's errors named as httpx names them.

    It reports every aiohttp connection error as a connect timeout, so a refused connection
    read "no answer within 10 s"; the operator needs "connection refused"."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response: httpx.Response = await super().handle_async_request(request)
        except httpx.TransportError as err:
            cause = err.__cause__
            if isinstance(cause, aiohttp.ConnectionTimeoutError):
                raise httpx.ConnectTimeout(str(cause), request=request) from cause
            if isinstance(cause, aiohttp.SocketTimeoutError | aiohttp.ServerTimeoutError):
                raise httpx.ReadTimeout(str(cause), request=request) from cause
            if isinstance(cause, aiohttp.ClientConnectorError):
                raise httpx.ConnectError(str(cause), request=request) from cause
            if isinstance(cause, aiohttp.ServerDisconnectedError):
                raise httpx.RemoteProtocolError(str(cause), request=request) from cause
            if isinstance(cause, aiohttp.ClientConnectionError):
                raise httpx.NetworkError(str(cause), request=request) from cause
            raise
        return response


class HttpChannel(Channel):
    """A channel with one connection pool for all its deliveries, opened in start() and
    closed in close(). Options need ``timeout`` and may have ``verify_tls``.

    Requests go through ``request()``, which builds the httpx.Request itself and hands it to
    the transport. httpx's AsyncClient would add per-request cookie, auth and redirect
    handling and URL merging that channels never use (they follow no redirects and keep no
    cookies); measured, 32 POSTs in flight to bench/webhook_sink.py, that doubled the CPU a
    request costs: 202 µs against 105 µs."""

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        self._transport: _Transport | None = None
        self._timeout = httpx.Timeout(getattr(options, "timeout", 10.0)).as_dict()
        self._urls: dict[str, httpx.URL] = {}

    async def start(self) -> None:
        options: Any = self.options
        self._transport = _Transport(
            verify=getattr(options, "verify_tls", True),
            # Keep as many connections alive as the worker may have sends in flight to one
            # destination; a default of 20 made it reconnect under load.
            limits=httpx.Limits(max_connections=128, max_keepalive_connections=128),
        )

    async def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.aclose()

    @contextlib.asynccontextmanager
    async def request(
        self, method: str, url: str, content: bytes, headers: dict[str, str]
    ) -> AsyncIterator[httpx.Response]:
        """Send one request; the response's body is streamed and closed on leaving."""
        if self._transport is None:
            raise RuntimeError(f"{type(self).__name__}.send() before start()")
        target = self._urls.get(url)
        if target is None:
            target = self._urls[url] = httpx.URL(url)
        request = httpx.Request(
            method,
            target,
            content=content,
            headers={"User-Agent": USER_AGENT, **headers},
            extensions={"timeout": self._timeout},
        )
        response = await self._transport.handle_async_request(request)
        try:
            yield response
        finally:
            await response.aclose()
