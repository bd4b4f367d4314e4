"""What every channel that speaks HTTP shares: one connection pool per channel instance, URL
option checks, and which answers are worth retrying; and how a destination on this machine
sent to in clear is told at start (the MLLP and email channels' too).

The connections are aiohttp's (see HttpChannel for why not httpx's); URLs are checked with
httpx, and connection errors are raised as httpx's exception classes, which the channels
catch and report."""

from __future__ import annotations

import codecs
import contextlib
import json
import math
import sys
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from carehub.components import (
    Channel,
    ComponentContext,
    ComponentOptions,
    DeliveryError,
    on_this_machine,
)
from carehub.config import without_password

USER_AGENT = "carehub"

#: The most of an answer's body, once decompressed, that carehub reads (HttpAnswer.aread, and
#: read_answer for the sync clients). The answers it reads whole (a FHIR transaction-response,
#: a Task search, an OperationOutcome) are a few KiB, a community directory's page of 100
#: services a few hundred; a gzip answer of 10 KiB can unpack to 10 MiB, one of 10 MiB to 10 GiB.
MAX_ANSWER_BYTES = 10 * 1024 * 1024

#: Besides the 5xx: timeout, too early, too many requests. Other 4xx will not get better.
RETRYABLE_STATUS = frozenset({408, 425, 429})
#: The 5xx that say the server cannot do what was asked, rather than that it cannot do it now:
#: 501 Not Implemented (the method or request), 505 HTTP Version Not Supported.
PERMANENT_SERVER_STATUS = frozenset({501, 505})


def is_retryable(status: int) -> bool:
    """Whether an HTTP answer may be different if the same request is sent again: a retry of
    one that cannot be only delays the dead letter that tells someone to act."""
    if status in PERMANENT_SERVER_STATUS:
        return False
    return status in RETRYABLE_STATUS or status >= 500


def retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds an answer's ``Retry-After`` asks to wait before the next request (RFC 9110
    10.2.3: a number of seconds or an HTTP-date), 0 for a date already past; None when the
    header is absent or unreadable."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def http_url(value: str, option: str = "url") -> str:
    """An options validator: an absolute http(s) URL with a host. The error quotes the value
    with its credentials masked: config and reload errors are printed and logged."""
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as err:
        raise ValueError(without_password(f"bad {option} {value!r}: {err}")) from err
    if url.scheme not in ("http", "https") or not url.host:
        shown = without_password(repr(value))
        raise ValueError(f"{option} must be http:// or https:// with a host, got {shown}")
    return value


class AnswerTooLarge(ValueError):
    """An answer whose body, decompressed, is longer than the most carehub reads of one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"the answer is larger than {size_text(limit)}, the most carehub reads")


def size_text(size: int) -> str:
    """A byte count for messages: ``10 MiB`` when it is whole mebibytes, else bytes."""
    mib = 1024 * 1024
    return f"{size // mib} MiB" if size >= mib and size % mib == 0 else f"{size} bytes"


def read_answer(response: httpx.Response, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """The body of a streamed httpx answer (``Client.stream``), decompressed, for the sync
    clients; AnswerTooLarge once it passes ``limit``, with no more than that read or unpacked.

    httpx unpacks each chunk it reads whole, and a chunk of 64 KiB of gzip can unpack to
    64 MiB, so the raw bytes are unpacked here ``limit`` at most (zlib's ``max_length``). Only
    the codings httpx asks for (gzip, deflate) are accepted; any other is a DecodingError."""
    length = response.headers.get("Content-Length", "")
    coding = response.headers.get("Content-Encoding", "").strip().lower()
    if coding in ("", "identity"):
        if length.isdigit() and int(length) > limit:
            raise AnswerTooLarge(limit)
        return _gather(response.iter_raw(), limit)
    if coding in ("gzip", "x-gzip"):
        return _gather(_inflate(response.iter_raw(), zlib.MAX_WBITS | 16, limit), limit)
    if coding == "deflate":  # zlib-wrapped, as RFC 9110 says (a gzip header is taken too)
        return _gather(_inflate(response.iter_raw(), zlib.MAX_WBITS | 32, limit), limit)
    raise httpx.DecodingError(f"Content-Encoding {coding!r} was not asked for")


def _gather(chunks: Iterator[bytes], limit: int) -> bytes:
    body = bytearray()
    for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(limit)
    return bytes(body)


def _inflate(raw: Iterator[bytes], wbits: int, limit: int) -> Iterator[bytes]:
    """Unpack ``raw`` no further than one byte past ``limit`` in all; anything after the end
    of the compressed stream is ignored."""
    inflater = zlib.decompressobj(wbits)
    budget = limit + 1
    try:
        for chunk in raw:
            data = chunk
            while data and budget > 0 and not inflater.eof:
                piece = inflater.decompress(data, budget)
                budget -= len(piece)
                yield piece
                data = inflater.unconsumed_tail
            if budget <= 0 or inflater.eof:
                return
        if not inflater.eof:
            raise httpx.DecodingError("the compressed answer is cut short")
    except zlib.error as err:
        raise httpx.DecodingError(f"the answer cannot be decompressed: {err}") from err


async def read_some(response: HttpAnswer, limit: int = 4096) -> str:
    """The start of an error body; a huge error page is not worth reading whole."""
    chunks = bytearray()
    async for chunk in response.aiter_bytes():
        chunks += chunk
        if len(chunks) >= limit:
            break
    return bytes(chunks[:limit]).decode(response.encoding, "replace")


async def finish_reading(response: HttpAnswer, limit: int = 64 * 1024) -> None:
    """Read the rest of a short answer so its connection goes back to the pool.

    A connection whose answer was left unread is closed rather than reused, so each delivery
    opened a new one: about 300 new TCP connections a second to a webhook under load, with
    thousands left in TIME-WAIT. An answer longer than ``limit`` is abandoned (its connection
    closed) rather than read whole. An empty answer (``Content-Length: 0``, the usual reply
    to a webhook) has nothing to read: setting up the read cost a quarter of the CPU of the
    whole POST (140 against 102-119 µs, 32 in flight)."""
    if response.headers.get("Content-Length") == "0":
        return
    await read_some(response, limit)


def _as_httpx_error(err: Exception) -> httpx.TransportError:
    """aiohttp's connection errors under the httpx names channels catch and report: a refused
    connection must read "connection refused", not a timeout."""
    text = str(err) or type(err).__name__
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(text)
    if isinstance(err, aiohttp.ClientConnectorError):
        return httpx.ConnectError(text)
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(text)
    if isinstance(err, aiohttp.ClientPayloadError):
        return httpx.ReadError(text)
    if isinstance(err, TimeoutError):  # aiohttp's read timeouts are TimeoutErrors too
        return httpx.ReadTimeout(text)
    if isinstance(err, aiohttp.ClientConnectionError):
        return httpx.NetworkError(text)
    return httpx.TransportError(text)


class HttpAnswer:
    """A destination's answer, read through the names httpx.Response gives them
    (``status_code``, ``headers``, ``aread``, ``aiter_bytes``, ``text``, ``json``)."""

    __slots__ = ("_body", "_response", "headers", "status_code")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._body: bytes | None = None
        self.status_code = response.status
        self.headers = response.headers  # case-insensitive, like httpx's

    @property
    def encoding(self) -> str:
        """The charset the answer's Content-Type names when Python knows it, else UTF-8."""
        charset = self._response.charset
        if charset:
            with contextlib.suppress(LookupError):
                return codecs.lookup(charset).name
        return "utf-8"

    async def aread(self) -> bytes:
        """The body, decompressed, up to MAX_ANSWER_BYTES; the rest is left unread (and its
        connection closed), so an answer that unpacks to gigabytes costs no more memory."""
        if self._body is None:
            body = bytearray()
            async for chunk in self.aiter_bytes():
                body += chunk
                if len(body) >= MAX_ANSWER_BYTES:
                    break
            self._body = bytes(body[:MAX_ANSWER_BYTES])
        return self._body

    async def aiter_bytes(self, chunk_size: int = 16 * 1024) -> AsyncIterator[bytes]:
        if self._body is not None:
            yield self._body
            return
        try:
            async for chunk in self._response.content.iter_chunked(chunk_size):
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as err:
            raise _as_httpx_error(err) from err

    @property
    def text(self) -> str:
        """The body read by ``aread``, decoded by its charset."""
        return (self._body or b"").decode(self.encoding, "replace")

    def json(self) -> Any:
        return json.loads(self._body or b"")


#: Linux's setting for the lowest port any account may bind (1024 unless lowered, as
#: containers often do); ports below it need root or CAP_NET_BIND_SERVICE.
UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


def unprivileged_port_start() -> int:
    """The lowest port any local account may bind: Linux's setting, else 1024 as on the BSDs;
    macOS and Windows reserve no ports."""
    try:
        return int(UNPRIVILEGED_PORT_START.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return 0 if sys.platform in ("darwin", "win32") else 1024


class LocalCleartext(str):
    """An unprotected_transport() answer for a destination on this machine sent to in clear
    on a port any local account may bind. Loopback never leaves the machine, but whoever
    binds the port while its receiver is not listening (not started yet, restarting, taken
    down) receives what is sent. A destination's ``allow_cleartext: true`` accepts it (a
    relay or TLS sidecar the site runs there); one on another machine is never accepted so."""


def cleartext_on_this_machine(what: str, port: int, fix: str) -> LocalCleartext | None:
    """Channel.unprotected_transport for a destination on this machine at ``port``, sent to
    in clear: the words to warn with (``what`` names the destination and how it is sent in
    clear, ``fix`` how to protect it), or None when only a privileged account could take
    the port."""
    if port < unprivileged_port_start():
        return None
    return LocalCleartext(
        f"sends patient data to {what} on this machine: any local user who binds port {port} "
        f"while its receiver is not listening receives what it sends; {fix}, or set "
        "allow_cleartext: true on this destination if its port is always the receiver's"
    )


def unprotected_http(url: str, verify_tls: bool = True) -> str | None:
    """Channel.unprotected_transport for a destination at ``url``: plain http:// (to another
    machine, or to a port of this one any local account may bind), or https:// with
    ``verify_tls: false`` (on this machine, to such a port). Only the scheme, host and port
    are named: a URL's path or query may hold a secret."""
    parsed = httpx.URL(url)
    where = f"{parsed.scheme}://{parsed.netloc.decode('ascii', 'replace')}"  # no userinfo
    if on_this_machine(parsed.host):
        if parsed.scheme == "http":
            return cleartext_on_this_machine(
                f"{where} in clear (http://, no TLS)", parsed.port or 80, "use https://"
            )
        if not verify_tls:  # any certificate passes, so whoever takes the port is believed
            return cleartext_on_this_machine(
                f"{where} with verify_tls: false", parsed.port or 443, "remove verify_tls: false"
            )
        return None
    if parsed.scheme == "http":
        return (
            f"sends patient data to {where} in clear (http://, no TLS): anyone on the network "
            "between can read it; use https://"
        )
    if not verify_tls:
        return (
            f"sends patient data to {where} with verify_tls: false: the server's certificate "
            "is not checked, so anyone on the network between can pose as the server and read "
            "it; remove verify_tls: false"
        )
    return None


class HttpChannel(Channel):
    """A channel with one connection pool for all its deliveries, opened in start() and
    closed in close(). Options need ``timeout``, name the destination in ``url`` (a FHIR
    server's in ``base_url``) and may have ``verify_tls``.

    Requests go through ``request()`` straight to an aiohttp session; the answer is read as an
    HttpAnswer and connection errors are raised as httpx's. httpx's own async pool costs CPU
    that grows with the requests in flight (httpx issue #3215: measured here 1.7 ms of CPU per
    POST one at a time and 4.8 ms with 32 in flight, against 0.7 and 0.8 ms over aiohttp), and
    building an httpx.Request and Response around each aiohttp call took a third of a
    webhook POST's CPU under bench/bench_routing.py. No cookies are kept and no redirects
    followed: a destination is one fixed URL."""

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        self._session: aiohttp.ClientSession | None = None
        timeout = httpx.Timeout(getattr(options, "timeout", 10.0))
        self._timeout = aiohttp.ClientTimeout(
            sock_connect=timeout.connect, sock_read=timeout.read, connect=timeout.pool
        )

    async def start(self) -> None:
        options: Any = self.options
        connector = aiohttp.TCPConnector(
            ssl=httpx.create_ssl_context(verify=getattr(options, "verify_tls", True)),
            # Keep as many connections alive as the worker may have sends in flight to one
            # destination; a smaller pool made it reconnect under load.
            limit=128,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=self._timeout,
            # aiohttp asks for what it can decode (gzip and deflate; br and zstd when their
            # packages are installed), and servers such as HAPI FHIR compress whenever asked:
            # answers are decoded as they are read, and read up to MAX_ANSWER_BYTES.
            auto_decompress=True,
            headers={"User-Agent": USER_AGENT},
        )

    def unprotected_transport(self) -> str | None:
        options: Any = self.options
        url = getattr(options, "url", None) or getattr(options, "base_url", None)
        return unprotected_http(url, getattr(options, "verify_tls", True)) if url else None

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def refused(
        self, method: str, url: str, response: HttpAnswer, said: str | None
    ) -> DeliveryError:
        """The DeliveryError for a request answered with a status that is not 2xx: tried again
        for 408, 425, 429 and 5xx, no sooner than the answer's ``Retry-After`` says. Its text
        names the request (any secret in the URL masked) and the status; the answer's body
        goes in ``said`` only, since it can echo what was sent."""
        status = response.status_code
        wait = retry_after(response.headers)
        text = f"{method} {without_password(url)}: HTTP {status}"
        if wait is not None:
            text += f" (Retry-After: {wait:.0f} s)"
        return DeliveryError(text, retryable=is_retryable(status), said=said, retry_after=wait)

    def unreached(self, method: str, url: str, err: httpx.HTTPError) -> DeliveryError:
        """The DeliveryError (tried again) for a request that got no answer: none in time,
        or none at all; its text names the request, with any secret in the URL masked."""
        if isinstance(err, httpx.TimeoutException):
            what = f"no answer within {self.options.timeout:g} s ({type(err).__name__})"
        else:
            what = f"{type(err).__name__}: {err}"
        # The words are carehub's and the HTTP client's: the destination said nothing.
        return DeliveryError(without_password(f"{method} {url}: {what}"), said=None)

    @contextlib.asynccontextmanager
    async def request(
        self, method: str, url: str, content: bytes, headers: dict[str, str]
    ) -> AsyncIterator[HttpAnswer]:
        """Send one request; the answer's body is read on demand and released on leaving."""
        if self._session is None:
            raise RuntimeError(f"{type(self).__name__}.send() before start()")
        try:
            response = await self._session.request(
                method, url, data=content, headers=headers, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError) as err:
            raise _as_httpx_error(err) from err
        try:
            yield HttpAnswer(response)
        finally:
            response.release()
