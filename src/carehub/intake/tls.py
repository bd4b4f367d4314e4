"""TLS contexts: server side for the MLLP and HTTP listeners (requiring client certificates
when given a CA to check them against) and client side; failed handshakes, logged per peer.

Also what both listeners log about their connections in the same way: per peer address at most
once a minute (PeerReports), and a process out of file descriptors once a minute
(report_accept_failures), so that no peer can turn the log into a flood."""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from carehub.config import TLSConfig
from carehub.errors import ConfigError

log = logging.getLogger(__name__)

#: Permission bits that let the file's group or anyone else read a file.
READABLE_BY_OTHERS = 0o044

#: Seconds a TLS client has to finish its handshake.
HANDSHAKE_TIMEOUT = 30.0
#: Seconds between log lines about one peer address (failed TLS handshakes, connections
#: refused or timed out, failed bearer tokens), and about failed accepts.
REPORT_EVERY = 60.0
#: Peer addresses whose last report is remembered before the ones older than REPORT_EVERY are
#: forgotten (a scan from many addresses must not grow it forever).
REPORTS_KEPT = 1024

#: Names a setting under a listener's ``tls`` for an error, given its key (none for ``tls``
#: itself), as other config errors do: ``carehub.yaml:21: listeners.mllp[0].tls.cert``
#: (carehub.config.where_in_config).
TLSSettingName = Callable[..., str]


def server_context(tls: TLSConfig, where: TLSSettingName) -> ssl.SSLContext:
    """A server context from the listener's TLS settings; a file that cannot be loaded is a
    ConfigError naming its setting (the cert or key that cannot be read, else both)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ssl.SSLError) as err:
        unreadable = [key for key in ("cert", "key") if not _readable(getattr(tls, key))]
        setting = where(*unreadable[:1])  # a cert and key that do not match: tls itself
        raise ConfigError(f"{setting}: cannot load cert {tls.cert} / key {tls.key}: {err}") from err
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(tls.client_ca))
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"{where('client_ca')}: cannot load {tls.client_ca}: {err}") from err
        # Optional only when asked for: a CA given to check senders against means mutual TLS.
        required = requires_client_certificates(tls)
        context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        raise ConfigError(f"{where('require_client_cert')}: needs tls.client_ca to check against")
    return context


def requires_client_certificates(tls: TLSConfig) -> bool:
    """Whether the listener refuses a client without a certificate: with client_ca, unless
    require_client_cert is false. Without, any client that reaches the port can send."""
    return tls.client_ca is not None and tls.require_client_cert is not False


def _readable(path: Path) -> bool:
    try:
        with path.open("rb"):
            return True
    except OSError:
        return False


def warn_if_key_readable(tls: TLSConfig, where: str) -> None:
    """One WARNING when the private key can be read by its group or by anyone: whoever reads
    it can pose as the hub to senders. A key that cannot be read at all is server_context's
    error to report."""
    try:
        mode = tls.key.stat().st_mode
    except OSError:
        return
    if mode & READABLE_BY_OTHERS:
        log.warning(
            "%s.tls.key %s can be read by other accounts (mode %03o): anyone who reads it can "
            "pose as this hub; make it readable by the hub's user only (chmod 600)",
            where,
            tls.key,
            mode & 0o777,
        )


def client_context(
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """A client context; ``ca`` trusts a private CA, ``cert``/``key`` present a client cert."""
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


class PeerReports:
    """When to log something a peer address did: the first time, then at most once every
    REPORT_EVERY seconds per address, saying how many times it happened meanwhile."""

    def __init__(self) -> None:
        #: Per address: when it was last logged, and how often it happened since.
        self._seen: dict[str, list[float]] = {}

    def due(self, host: str) -> int:
        """0 when this time is not to be logged; else how many times it happened from ``host``
        since its last line, this one included."""
        now = time.monotonic()
        entry = self._seen.get(host)
        if entry is not None and now - entry[0] < REPORT_EVERY:
            entry[1] += 1
            return 0
        count = 1 + (int(entry[1]) if entry is not None else 0)
        if entry is None and len(self._seen) >= REPORTS_KEPT:
            self._seen = {h: e for h, e in self._seen.items() if now - e[0] < REPORT_EVERY}
            if len(self._seen) >= REPORTS_KEPT:  # that many addresses within the minute
                self._seen.clear()
        self._seen[host] = [now, 0]
        return count


class HandshakeFailures:
    """Failed TLS handshakes on one listener: counted, and logged as a WARNING naming the
    listener, the peer and why (a certificate from another CA or expired, none where one is
    required, plain text to the TLS port, a timeout), at most once a minute per peer address,
    so that a partner whose connections fail is named without a line per attempt. The reason
    alone: nothing of the certificate itself."""

    def __init__(self, listener: str, logger: logging.Logger = log) -> None:
        self.listener = listener  # "HTTP listener http", "MLLP listener adt"
        self.count = 0
        self._log = logger
        self._reports = PeerReports()

    def failed(self, peername: object, err: BaseException) -> None:
        """One more failure from ``peername`` (the socket's, (host, port, ...) or None)."""
        self.count += 1
        host, peer = peer_names(peername)
        if not self._reports.due(host):
            return
        self._log.warning(
            "%s: TLS handshake with %s failed (%s); later failures from this address are "
            "logged at most once a minute",
            self.listener,
            peer,
            handshake_failure_reason(err),
        )


def handshake_failure_reason(err: BaseException) -> str:
    """Why a handshake failed, in OpenSSL's words where it has them
    (CERTIFICATE_VERIFY_FAILED: certificate has expired; PEER_DID_NOT_RETURN_A_CERTIFICATE;
    HTTP_REQUEST, plain HTTP sent to the TLS port)."""
    if isinstance(err, TimeoutError):
        return f"no handshake within {HANDSHAKE_TIMEOUT:g} s"
    if isinstance(err, ssl.SSLCertVerificationError) and err.reason and err.verify_message:
        return f"{err.reason}: {err.verify_message}"
    reason = getattr(err, "reason", None) or str(err)
    if reason:
        return str(reason)
    if isinstance(err, ConnectionError):
        return "closed during the TLS handshake"
    return type(err).__name__


def peer_names(peername: object) -> tuple[str, str]:
    """The peer's address, and its address and port, as the log names them, from a socket's
    peername ((host, port, ...) or None)."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        return str(peername[0]), f"{peername[0]}:{peername[1]}"
    return "?", "an unknown peer"


#: What asyncio's accept loop says when the process has no file descriptor left for a new
#: connection (EMFILE, ENFILE) or the kernel no memory for it.
_ACCEPT_FAILED = "socket.accept() out of system resource"


def report_accept_failures(loop: asyncio.AbstractEventLoop) -> None:
    """Log failed accepts on ``loop`` as one WARNING a minute instead of asyncio's ERROR with a
    traceback per attempt: its accept loop retries every pending connection each time the
    listening socket is ready, so a process out of file descriptors wrote hundreds of
    thousands of lines a minute. Other exceptions go to the handler that was there."""
    previous = loop.get_exception_handler()
    if isinstance(previous, _AcceptFailures):
        return
    loop.set_exception_handler(_AcceptFailures(previous))


class _AcceptFailures:
    """The loop's exception handler while the listeners run (report_accept_failures)."""

    def __init__(self, previous: Callable[..., object] | None) -> None:
        self._previous = previous
        self._reports = PeerReports()
        self.count = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        err = context.get("exception")
        if context.get("message") != _ACCEPT_FAILED or not isinstance(err, OSError):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.count += 1
        address = _socket_address(context.get("socket"))
        times = self._reports.due(address)
        if not times:
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.warning(
            "cannot accept connections on %s: %s (open-file limit %s, ulimit -n); %d failed "
            "accept(s) since the last line; new connections wait until connections close. "
            "Lower the listeners' connection limits or raise the limit; logged at most once "
            "a minute",
            address,
            err.strerror or err,
            "unlimited" if soft == resource.RLIM_INFINITY else soft,
            times,
        )


def _socket_address(sock: object) -> str:
    try:
        name = sock.getsockname()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return "a listening socket"
    return peer_names(name)[1]
