"""HTTP intake (FastAPI on uvicorn, in the hub's event loop).

POST /hl7 with an HL7 v2 message as the body returns the ACK as the body, typed
``x-application/hl7-v2+er7; charset=NAME`` with the IANA name of the character set the ACK is
written in (the message's own). Its status is 200 for every ACK of a message stored, AA, AE
(content refused) or AR (not taken as a message) alike, as HL7 over HTTP says: the exchange
worked, and the ACK says what became of the message; a sender that queues and retries any
status of 400 or more would otherwise send a refused message for ever. The other statuses
are for answers that are not the outcome of a stored message: 503 when the store could not
take it (send it again), 413 over the size limit, 401 without a valid bearer token when tokens
are configured. A listener with ``status_codes: by_ack`` answers 422 for AE and 400 for AR.
A body holding several messages, or an FHS/BHS batch, is split as the file drop splits a file:
each message is stored and answered like one posted alone, text outside the messages is
stored as a rejected row (AR), and the body of the answer holds every ACK in order (wrapped in
FHS/BHS ... BTS/FTS when the request was), with the status of the worst of them.
GET /health answers without a token so load balancers can probe it, with the status alone; the
details (listeners, intake counts, queue) need a token when tokens are configured, as GET
/metrics does. /docs, /redoc and /openapi.json are served only with listeners.http.api_docs.
With listeners.http.tls the listener speaks HTTPS only (mutual TLS with its client_ca).

Every connection has listeners.http.header_timeout to send a request's line and headers and
body_timeout for its body; past either it is closed. The listener holds at most
max_connections, and one peer address at most max_connections_per_peer: one more is closed at
once. A client that opens connections and sends half a request on each cannot then use up the
hub's file descriptors, and with them every other feed's connections and the store's files.
Requests refused for their bearer token are counted and logged per peer address.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hmac
import logging
import os
import resource
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from carehub.components import on_this_machine
from carehub.config import ENV_HTTP_TOKENS, HTTPListenerConfig
from carehub.hl7.ack import AckCode
from carehub.hl7.batch import MessageSlice, SplitData, Stray, answer_envelope, split_data
from carehub.hl7.charsets import LATIN1_AS_WINDOWS_1252
from carehub.hl7.framing import HEAD_BYTES
from carehub.intake.intake import Arrival, Intake, IntakeResult, receive_in_groups
from carehub.intake.tls import (
    HANDSHAKE_TIMEOUT,
    HandshakeFailures,
    PeerReports,
    peer_names,
    report_accept_failures,
)
from carehub.store.store import MessageStore

log = logging.getLogger(__name__)

HL7_MEDIA_TYPE = "x-application/hl7-v2+er7"
#: With listeners.http.status_codes ``by_ack``: the status of each ACK code (by default every
#: ACK of a stored message is 200, as HL7 over HTTP has it).
_STATUS_BY_ACK = {AckCode.ACCEPT: 200, AckCode.ERROR: 422, AckCode.REJECT: 400}
#: Which status of several ACKs answers the request: the one a sender most needs to act on.
#: 503 first (something was not stored: send the body again, resends are recognised).
_SEVERITY = {200: 0, 422: 1, 400: 2, 503: 3}

#: IANA names (RFC 2978) of the Python codecs intake answers in, by codecs.lookup() name, for
#: the charset parameter; ISO-8859-n and windows-125n are named by rule (_iana_charset).
_IANA_CHARSETS = {
    "utf-8": "utf-8",
    "ascii": "US-ASCII",
    LATIN1_AS_WINDOWS_1252: "windows-1252",
    "utf-16-le": "UTF-16LE",
    "utf-16-be": "UTF-16BE",
    "utf-16": "UTF-16",
    "utf-32-le": "UTF-32LE",
    "utf-32-be": "UTF-32BE",
    "utf-32": "UTF-32",
    "iso2022_jp": "ISO-2022-JP",
    "iso2022_jp_2": "ISO-2022-JP-2",
    "gb18030": "GB18030",
    "gbk": "GBK",
    "gb2312": "GB2312",
    "euc_kr": "EUC-KR",
    "euc_jp": "EUC-JP",
    "shift_jis": "Shift_JIS",
    "big5": "Big5",
    "big5hkscs": "Big5-HKSCS",
    "koi8-r": "KOI8-R",
    "koi8-u": "KOI8-U",
    "mac-roman": "macintosh",
    "tis-620": "TIS-620",
    "cp437": "IBM437",
    "cp850": "IBM850",
    "cp866": "IBM866",
}


#: For an answer sent before the whole request body was read: the connection cannot carry
#: another request.
CLOSE = {"Connection": "close"}
#: A body larger than this is split on a worker thread (see _split).
SPLIT_INLINE_BYTES = 64 * 1024

#: The shortest bearer token taken without a warning (a webhook's hmac_secret needs as many).
MIN_TOKEN_LENGTH = 16

#: Set in a request's ASGI scope by an endpoint that refused the bearer token it was given
#: without answering 401 (/health answers its status alone): counted and logged as a 401 is.
AUTH_REFUSED = "carehub.auth_refused"

#: The byte order mark of each UTF-16/32 codec that names its byte order.
_WIDE_BOMS = {
    "utf-16-le": codecs.BOM_UTF16_LE,
    "utf-16-be": codecs.BOM_UTF16_BE,
    "utf-32-le": codecs.BOM_UTF32_LE,
    "utf-32-be": codecs.BOM_UTF32_BE,
}

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


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


def details_allowed(request: Request, tokens: list[str]) -> bool:
    """Whether /health may show its details: bearer_accepted. A token given and refused is
    counted and logged as a 401 is (a probe without one is not)."""
    if bearer_accepted(request, tokens):
        return True
    if request.headers.get("authorization"):
        request.scope[AUTH_REFUSED] = True
    return False


class AuthFailures:
    """Requests refused for their bearer token (none, or not one of the listener's): counted
    by endpoint, and logged as a WARNING naming the peer and the endpoint, at most once a
    minute per peer address. Never the token offered."""

    def __init__(self, listener: str, logger: logging.Logger = log) -> None:
        self.listener = listener
        #: Refusals by endpoint (its route: /hl7, /metrics, /referrals/{referral_key}/status).
        self.counts: Counter[str] = Counter()
        self._log = logger
        self._reports = PeerReports()

    def failed(self, client: object, endpoint: str) -> None:
        self.counts[endpoint] += 1
        host, peer = peer_names(tuple(client) if isinstance(client, list | tuple) else None)
        times = self._reports.due(host)
        if not times:
            return
        self._log.warning(
            "%s: refused a request to %s from %s: missing or invalid bearer token (%d refused "
            "from this address since the last line; logged at most once a minute per address)",
            self.listener,
            endpoint,
            peer,
            times,
        )


def warn_if_tokens_short(
    tokens: list[str], organizations: Mapping[str, str] | None = None, logger: logging.Logger = log
) -> None:
    """A WARNING for each bearer token shorter than MIN_TOKEN_LENGTH, naming where it is set
    (``tokens`` as carehub.config.http_tokens gives them: the config's, then
    $CAREHUB_HTTP_TOKENS'), never the token: a short one can be guessed by whoever reaches
    the port, and failed guesses cost nothing but a log line."""
    from_env = (
        [t.strip() for t in os.environ[ENV_HTTP_TOKENS].split(",")]
        if ENV_HTTP_TOKENS in os.environ
        else []
    )
    in_config = len(tokens) - len(from_env)
    places = [
        f"listeners.http.tokens[{i}]"
        if i < in_config
        else f"entry {i - in_config + 1} of ${ENV_HTTP_TOKENS}"
        for i, token in enumerate(tokens)
        if len(token) < MIN_TOKEN_LENGTH
    ]
    places += [
        f"listeners.http.organization_tokens[{name!r}]"
        for name, token in (organizations or {}).items()
        if len(token) < MIN_TOKEN_LENGTH
    ]
    for place in places:
        logger.warning(
            "%s is a bearer token shorter than %d characters, which can be guessed: use a "
            "random one of %d or more (python -c 'import secrets; "
            "print(secrets.token_urlsafe(24))')",
            place,
            MIN_TOKEN_LENGTH,
            MIN_TOKEN_LENGTH,
        )


def warn_if_open_to_anyone(
    what: str, host: str, tokens: list[str], does: str, logger: logging.Logger = log
) -> None:
    """A WARNING for an HTTP port beyond loopback without bearer tokens: ``what`` on ``host``
    ``does`` anyone who can reach it ("HTTP listener", "takes messages and referral updates
    from"; "worker HTTP", "serves its /health details and /metrics to")."""
    if tokens or on_this_machine(host):
        return
    logger.warning(
        "%s on %s %s anyone who can reach it: set listeners.http.tokens (or %s), or bind it "
        "to 127.0.0.1",
        what,
        host,
        does,
        ENV_HTTP_TOKENS,
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

    warn_if_tokens_short(tokens, config.organization_tokens)

    def authorized(request: Request) -> bool:
        return bearer_accepted(request, tokens)

    # HL7 over HTTP unless the listener asks otherwise (a configuration without the key too).
    by_ack = config.status_codes == "by_ack"

    def status_of(result: IntakeResult) -> int:
        return _status(result, by_ack)

    @app.post("/hl7", summary="Submit one HL7 v2 message; the response body is its ACK")
    async def receive_message(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        peer = f"{request.client.host}:{request.client.port}" if request.client else None
        arrival = Arrival(
            "http",
            "http",
            peer,
            config.default_charset,
            not_stored=AckCode(config.not_stored_ack),
            processing_ids=tuple(config.processing_ids),
        )
        body, size = await read_body(request, config.max_message_bytes)
        if size > config.max_message_bytes:
            reason = (
                f"message of {oversize_text(request, size, config.max_message_bytes)} exceeds "
                f"this listener's limit of {config.max_message_bytes} bytes"
            )
            head = body[:HEAD_BYTES]
            result = await intake.reject_unreadable_frame(head, size, arrival, reason)
            return _hl7_response(result.ack, 413, result.charset, CLOSE)
        contents = None if _single(body) else await _split(body)
        if contents is not None and contents.batch_problems:
            # A batch cut short on the way, or whose trailers count other than it holds: none
            # of it is taken, so that the sender resends it whole.
            reason = (
                f"the batch does not hold together: {'; '.join(contents.batch_problems)}; "
                "none of its messages was stored, send the whole batch again"
            )
            head = body[:HEAD_BYTES]
            result = await intake.reject_unreadable_frame(head, len(body), arrival, reason)
            return _hl7_response(result.ack, status_of(result), result.charset)
        if contents is not None and (len(contents.messages) > 1 or contents.wrappers):
            items = _in_body_order(contents)
            results = await _receive_parts(intake, items, arrival)
            status = max((status_of(r) for r in results), key=_SEVERITY.__getitem__, default=200)
            head, tail = answer_envelope(
                contents.wrappers, len(results), intake.hub_application, intake.hub_facility
            )
            acks = b"".join(r.ack for r in results)
            if head:
                encode = contents.codec
                acks = head.encode(encode, "replace") + acks + tail.encode(encode, "replace")
            # One charset names the whole answer: that of its first ACK (a batch whose messages
            # are in different character sets is one no single name fits).
            codec = results[0].charset if results else contents.codec
            return _hl7_response(acks, status, codec)
        # One message, or none: taken whole, exactly like an MLLP frame.
        result = await intake.receive(body, arrival)
        return _hl7_response(result.ack, status_of(result), result.charset)

    @app.get("/health", summary="Liveness and store reachability; details with a token")
    async def health_check(request: Request) -> JSONResponse:
        report = await asyncio.to_thread(health)
        status_code = 200 if report.get("status") == "ok" else 503
        if not details_allowed(request, tokens):
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


async def _split(body: bytes) -> SplitData:
    """The body split into its messages; on a worker thread once it is large, since splitting
    costs about 0.1 s a MiB and would hold every listener's answers meanwhile."""
    if len(body) <= SPLIT_INLINE_BYTES:
        return split_data(body)
    return await asyncio.to_thread(split_data, body)


def _status(result: IntakeResult, by_ack: bool) -> int:
    """200 for the ACK of a stored message (with ``by_ack``: 422 AE, 400 AR); 503 for one that
    was not stored, which the sender must send again."""
    if result.code is not AckCode.ACCEPT and result.message_id is None:
        return 503  # not stored at all (AE, or AR by not_stored_ack): the sender must retry
    return _STATUS_BY_ACK[result.code] if by_ack else 200


def _hl7_response(
    ack: bytes, status: int, codec: str, headers: Mapping[str, str] | None = None
) -> Response:
    """An answer holding ACKs written in ``codec``, its charset named as HL7 over HTTP asks:
    without it a client reads the body in a default of its own, and garbles every name
    with a letter outside ASCII."""
    media_type = f"{HL7_MEDIA_TYPE}; charset={_iana_charset(codec, ack)}"
    return Response(ack, status_code=status, media_type=media_type, headers=headers)


def _iana_charset(codec: str, body: bytes) -> str:
    """The IANA name of a Python codec, for the charset parameter of ``body`` written in it:
    UTF-16/32 that starts with its byte order mark is named without the order (RFC 2781:
    the mark gives it, and a name with the order says there is none). A codec IANA has no
    name for keeps Python's."""
    try:
        name = codecs.lookup(codec).name
    except LookupError:
        return "utf-8"  # what encode_reply writes for a codec it does not know
    bom = _WIDE_BOMS.get(name)
    if bom is not None and body.startswith(bom):
        return _IANA_CHARSETS[name[: len("utf-16")]]
    if name.startswith("iso8859-"):
        return f"ISO-8859-{name.removeprefix('iso8859-')}"
    if name.startswith("cp125") and name[5:].isdigit():
        return f"windows-{name.removeprefix('cp')}"
    return _IANA_CHARSETS.get(name, name)


def _in_body_order(contents: SplitData) -> list[MessageSlice | Stray]:
    """The messages of a split body and the text outside them, in body order."""
    return sorted([*contents.messages, *contents.stray], key=lambda item: item.offset)


def _taken(item: MessageSlice | Stray) -> bytes:
    """What intake is handed of an item: a message whole, stray text only its head."""
    return item.data if isinstance(item, MessageSlice) else item.data[:HEAD_BYTES]


async def _receive_parts(
    intake: Intake, items: list[MessageSlice | Stray], arrival: Arrival
) -> list[IntakeResult]:
    """Every message of a split body stored as if posted alone, and any text outside them
    stored as a rejected row (as the file drop does), answered in body order."""

    def take(intake: Intake, item: MessageSlice | Stray) -> Awaitable[IntakeResult]:
        if isinstance(item, MessageSlice):
            return intake.receive(item.data, arrival)
        reason = (
            f"text outside any HL7 message at byte {item.offset} of the body "
            "(not blank and not a batch header or trailer segment)"
        )
        return intake.reject_unreadable_frame(_taken(item), len(item.data), arrival, reason)

    # Submitted in body order, a group at a time, so the messages keep their order and other
    # senders are answered while a large batch is stored; none is stored after one was not.
    return [result async for group in receive_in_groups(intake, items, take) for _, result in group]


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the hub owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


#: What a connection is waiting for when its deadline passes: a request's line and headers,
#: its body, or (IDLE) the next request, of which no byte has come since the last answer.
HEAD, BODY, IDLE = "head", "body", "idle"


class Connections:
    """The listener's open connections: at most max_connections, and max_connections_per_peer
    from one address (one more is closed at once, logged at most once a minute per address),
    each found by its peer's address and port (for _Watch) while it is open."""

    def __init__(self, listener: str, config: HTTPListenerConfig, logger: logging.Logger) -> None:
        self.listener = listener
        self.config = config
        self.open = 0
        #: Connections closed at once over max_connections or max_connections_per_peer.
        self.refused = 0
        #: Connections closed for a request head or body that did not come in time.
        self.timed_out: Counter[str] = Counter({HEAD: 0, BODY: 0})
        self._log = logger
        self._by_host: dict[str, int] = {}
        self._live: dict[tuple[str, int], _Guarded] = {}
        self._refusals = PeerReports()
        self._timeouts = PeerReports()

    def admit(self, peername: object) -> str | None:
        """The peer's address, counted as holding one more connection; None when it is over
        a limit (the caller closes the connection)."""
        host, peer = peer_names(peername)
        held = self._by_host.get(host, 0)
        if held < self.config.max_connections_per_peer and self.open < self.config.max_connections:
            self._by_host[host] = held + 1
            self.open += 1
            return host
        self.refused += 1
        times = self._refusals.due(host)
        if times:
            if held >= self.config.max_connections_per_peer:
                why = (
                    f"its address holds {held} open connections already "
                    f"(listeners.http.max_connections_per_peer)"
                )
            else:
                why = (
                    f"the listener holds {self.open} open connections already "
                    f"(listeners.http.max_connections)"
                )
            self._log.warning(
                "%s: closed a connection from %s at once: %s; %d closed from this address "
                "since the last line, logged at most once a minute per address",
                self.listener,
                peer,
                why,
                times,
            )
        return None

    def release(self, host: str) -> None:
        self.open -= 1
        left = self._by_host.get(host, 1) - 1
        if left > 0:
            self._by_host[host] = left
        else:
            self._by_host.pop(host, None)

    def track(self, key: tuple[str, int] | None, connection: _Guarded) -> None:
        if key is not None:
            self._live[key] = connection

    def untrack(self, key: tuple[str, int] | None, connection: _Guarded) -> None:
        if key is not None and self._live.get(key) is connection:
            del self._live[key]

    def find(self, client: object) -> _Guarded | None:
        """The open connection of an ASGI scope's client (host, port)."""
        if isinstance(client, list | tuple) and len(client) >= 2:
            return self._live.get((str(client[0]), int(client[1])))
        return None

    def overdue(self, peername: object, phase: str) -> None:
        self.timed_out[phase] += 1
        host, peer = peer_names(peername)
        times = self._timeouts.due(host)
        if not times:
            return
        if phase == HEAD:
            what = f"no whole request line and headers within {self.config.header_timeout:g} s"
            setting = "header_timeout"
        else:
            what = f"the request body not whole {self.config.body_timeout:g} s after its headers"
            setting = "body_timeout"
        self._log.warning(
            "%s: closed the connection from %s: %s (listeners.http.%s), nothing of the request "
            "stored; %d closed from this address since the last line, logged at most once a "
            "minute per address",
            self.listener,
            peer,
            what,
            setting,
            times,
        )


def _peer_key(peername: object) -> tuple[str, int] | None:
    """How uvicorn names the peer in a request's scope ("client"): its address and port."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        return str(peername[0]), int(peername[1])
    return None


class _Slot:
    """One connection's place among the listener's open connections: taken when it is
    accepted (before any TLS handshake), given back once, whichever wrapper sees it end."""

    __slots__ = ("connections", "host")

    def __init__(self, connections: Connections) -> None:
        self.connections = connections
        self.host: str | None = None

    @property
    def taken(self) -> bool:
        return self.host is not None

    def take(self, peername: object) -> bool:
        self.host = self.connections.admit(peername)
        return self.host is not None

    def give_back(self) -> None:
        if self.host is not None:
            self.connections.release(self.host)
            self.host = None


class _Guarded(asyncio.Protocol):
    """uvicorn's protocol for one connection (after its TLS handshake, with TLS), with the
    deadlines uvicorn lacks: header_timeout for each request's line and headers, from when
    the connection opens or its previous answer was sent, and body_timeout for its body. The
    request's progress comes from _Watch, which sees it reach the application."""

    def __init__(self, http: asyncio.Protocol, connections: Connections, slot: _Slot) -> None:
        self._http = http
        self._connections = connections
        self._slot = slot
        self._transport: asyncio.Transport | None = None
        self._peername: object = None
        self._key: tuple[str, int] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = HEAD
        self._requests = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._peername = transport.get_extra_info("peername")
        if not self._slot.taken and not self._slot.take(self._peername):
            transport.abort()  # over a limit: closed before a byte is read
            return
        self._transport = transport
        self._key = _peer_key(self._peername)
        self._connections.track(self._key, self)
        self._wait_for(HEAD)
        self._http.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            if self._phase == IDLE:
                self._phase = HEAD  # the next request has begun: its deadline runs on
            self._http.data_received(data)

    def eof_received(self) -> bool | None:
        if self._transport is None:
            return None
        return self._http.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._slot.give_back()
        if self._transport is not None:
            self._connections.untrack(self._key, self)
            self._http.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._http.pause_writing()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._http.resume_writing()

    # -- the request's progress, from _Watch ------------------------------------------------
    def request_began(self, has_body: bool) -> int:
        """Its line and headers are in: the body's deadline, if it has one. Returns the
        request's number on this connection, for the calls below."""
        self._requests += 1
        self._cancel_deadline()
        if has_body:
            self._wait_for(BODY)
        return self._requests

    def body_read(self, request: int) -> None:
        if request == self._requests and self._phase == BODY:
            self._cancel_deadline()

    def answered(self, request: int) -> None:
        """Its answer is sent: the next request's head is due (and what is left of a body
        the application answered without reading)."""
        if request == self._requests:
            self._wait_for(IDLE)

    def _wait_for(self, phase: str) -> None:
        self._cancel_deadline()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        config = self._connections.config
        limit = config.body_timeout if phase == BODY else config.header_timeout
        self._phase = phase
        self._deadline = asyncio.get_running_loop().call_later(limit, self._overdue)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _overdue(self) -> None:
        self._deadline = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._phase == IDLE and not transport.get_write_buffer_size():
            transport.close()  # a kept-alive connection unused: closed as uvicorn closes one
            return
        self._connections.overdue(self._peername, BODY if self._phase == BODY else HEAD)
        transport.abort()  # close() would wait to send what a client that never reads holds


def _has_body(scope: Mapping[str, Any]) -> bool:
    """Whether the request's headers announce a body (a Content-Length above 0, or chunked)."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
    return False


def _endpoint(scope: Mapping[str, Any]) -> str:
    """The route a request matched (/referrals/{referral_key}/status, not the key itself)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "an unknown endpoint"


class _Watch:
    """The listener's ASGI application around the app: tells each connection's _Guarded where
    its request is (head in, body read, answer sent), counts and logs requests refused for
    their bearer token (a 401, or AUTH_REFUSED), and takes a client gone before its body was
    whole (or closed for its deadline) as the end of that request, not an application error
    to log with a traceback."""

    def __init__(self, app: ASGIApp, connections: Connections, auth: AuthFailures) -> None:
        self.app = app
        self.connections = connections
        self.auth = auth

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")  # as the socket has it, before any proxy headers
        connection = self.connections.find(client)
        request = connection.request_began(_has_body(scope)) if connection is not None else 0
        status = 0

        async def watched_receive() -> Any:
            message = await receive()
            if (
                connection is not None
                and message.get("type") == "http.request"
                and not message.get("more_body", False)
            ):
                connection.body_read(request)
            return message

        async def watched_send(message: Any) -> None:
            nonlocal status
            if message.get("type") == "http.response.start":
                status = int(message.get("status", 0))
            await send(message)
            if (
                connection is not None
                and message.get("type") == "http.response.body"
                and not message.get("more_body", False)
            ):
                connection.answered(request)

        try:
            await self.app(scope, watched_receive, watched_send)
        except ClientDisconnect:
            pass  # nobody to answer; nothing of the request was stored
        finally:
            if status == 401 or scope.get(AUTH_REFUSED):
                self.auth.failed(client, _endpoint(scope))


class _TLSFirst(asyncio.Protocol):
    """An HTTPS connection until its TLS handshake is done: the handshake is run here
    (loop.start_tls), then the connection is handed to uvicorn's protocol, so that one that
    fails is logged with the peer and the reason. A server given the TLS context itself
    (create_server(ssl=...)) drops a failed handshake without a word: asyncio logs it only in
    debug mode. The connection takes its place among the listener's open connections before
    the handshake, so the limits hold for clients that never finish one.

    What the client sends with the end of its handshake (its first request, often) reaches
    this protocol before it hands over, and is passed on as it does."""

    def __init__(
        self,
        http: asyncio.Protocol,
        context: ssl.SSLContext,
        failures: HandshakeFailures,
        handshakes: set[asyncio.Task[None]],
        slot: _Slot,
    ) -> None:
        self._http = http
        self._context = context
        self._failures = failures
        self._handshakes = handshakes
        self._slot = slot
        self._early: list[bytes] = []
        self._eof = False
        self._lost = False
        self._handed_over = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if not self._slot.take(transport.get_extra_info("peername")):
            transport.abort()  # over a limit: closed before its handshake
            return
        transport.pause_reading()  # the client's hello is for start_tls to read
        task = asyncio.get_running_loop().create_task(self._handshake(transport))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        try:
            await self._secure(transport)
        finally:
            if not self._handed_over:
                self._slot.give_back()

    async def _secure(self, transport: asyncio.Transport) -> None:
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
        else:
            self._slot.give_back()
        self._lost = True


class _ServerSettings(uvicorn.Config):
    """uvicorn's settings with each connection guarded (_Guarded: the listener's connection
    limits and request deadlines; _Watch around the app) and, with TLS, the context carehub
    built (carehub.intake.tls, as the MLLP listener's: TLS 1.2 at least, client certificates
    as tls.client_ca and tls.require_client_cert say), each connection running its own
    handshake (_TLSFirst), in place of the context uvicorn would build from file names and
    hand to the server."""

    def __init__(
        self,
        app: FastAPI,
        listener: HTTPListener,
        ssl_context: ssl.SSLContext | None,
        **settings: Any,
    ) -> None:
        super().__init__(app, **settings)
        self._listener = listener
        self._ssl_context = ssl_context

    def load(self) -> None:
        super().load()
        listener = self._listener
        # Outermost, so it sees the client as the socket has it, before uvicorn's proxy
        # headers middleware rewrites it.
        self.loaded_app = _Watch(self.loaded_app, listener.connections, listener.auth_failures)
        context = self._ssl_context
        http = self.http_protocol_class

        def protocol(**settings: Any) -> asyncio.Protocol:
            slot = _Slot(listener.connections)
            guarded = _Guarded(http(**settings), listener.connections, slot)
            if context is None:
                return guarded
            return _TLSFirst(
                guarded, context, listener.handshake_failures, listener._handshakes, slot
            )

        self.http_protocol_class = protocol  # type: ignore[assignment]


class HTTPListener:
    def __init__(
        self,
        config: HTTPListenerConfig,
        app: FastAPI,
        ssl_context: ssl.SSLContext | None = None,
        *,
        name: str = "http",
        label: str | None = None,
        auth_failures: AuthFailures | None = None,
    ) -> None:
        """``label`` names it in the log (default "HTTP listener NAME")."""
        self.config = config
        self.name = name
        self.address: tuple[str, int] | None = None
        self.tls = ssl_context is not None
        what = label or f"HTTP listener {name}"
        self.label = what
        #: Failed TLS handshakes, logged per peer address (with listeners.http.tls).
        self.handshake_failures = HandshakeFailures(what, log)
        #: Requests refused for their bearer token, logged per peer address.
        self.auth_failures = auth_failures or AuthFailures(what, log)
        #: Open connections, held to the limits.
        self.connections = Connections(what, config, log)
        #: Connections in their TLS handshake (see _TLSFirst), cancelled when the listener stops.
        self._handshakes: set[asyncio.Task[None]] = set()
        self._server = _EmbeddedServer(
            _ServerSettings(
                app,
                self,
                ssl_context,
                host=config.host,
                port=config.port,
                # Connections accepted per turn of the loop, as the MLLP listener's: each holds
                # a file descriptor until its protocol has run and closed one over the limits,
                # so uvicorn's 2048 let a burst use up the process's (1024 by default).
                backlog=256,
                log_level="warning",
                access_log=False,
                lifespan="off",
            )
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> tuple[str, int]:
        report_accept_failures(asyncio.get_running_loop())
        warn_if_over_file_limit(self.config.max_connections, self.label, "listeners.http")
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


def warn_if_over_file_limit(connections: int, what: str, where: str) -> None:
    """A WARNING when ``connections`` (a listener's max_connections) is more than half the
    process's open-file limit: the connections alone could then leave the store, the log and
    the other listeners without file descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or connections <= soft // 2:
        return
    log.warning(
        "%s may hold %d connections (%s.max_connections), more than half of this process's "
        "open-file limit of %d (ulimit -n): lower it, or raise the limit",
        what,
        connections,
        where,
        soft,
    )
