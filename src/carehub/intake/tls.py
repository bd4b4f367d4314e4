"""TLS contexts: server side for the MLLP and HTTP listeners (requiring client certificates
when given a CA to check them against) and client side; failed handshakes, logged per peer."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from carehub.config import TLSConfig
from carehub.errors import ConfigError

log = logging.getLogger(__name__)

#: Permission bits that let the file's group or anyone else read a file.
READABLE_BY_OTHERS = 0o044

#: Seconds a TLS client has to finish its handshake.
HANDSHAKE_TIMEOUT = 30.0
#: Seconds between log lines about failed TLS handshakes from one peer address.
HANDSHAKE_REPORT_EVERY = 60.0
#: Peer addresses whose last report is remembered before the ones older than
#: HANDSHAKE_REPORT_EVERY are forgotten (a scan from many addresses must not grow it forever).
HANDSHAKE_REPORTS_KEPT = 1024

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


class HandshakeFailures:
    """Failed TLS handshakes on one listener: counted, and logged as a WARNING naming the
    listener, the peer and why (a certificate from another CA or expired, none where one is
    required, plain text to the TLS port, a timeout), at most once a minute per peer address,
    so that a partner whose connections fail is named without a line per attempt. The reason
    alone: nothing of the certificate itself."""

    def __init__(self, listener: str, logger: logging.Logger = log) -> None:
        self.listener = listener  # "HTTP listener http"
        self.count = 0
        self._log = logger
        self._reported: dict[str, float] = {}

    def failed(self, peername: object, err: BaseException) -> None:
        """One more failure from ``peername`` (the socket's, (host, port, ...) or None)."""
        self.count += 1
        host, peer = _peer(peername)
        now = time.monotonic()
        last = self._reported.get(host)
        if last is not None and now - last < HANDSHAKE_REPORT_EVERY:
            return
        if len(self._reported) >= HANDSHAKE_REPORTS_KEPT:
            self._reported = {
                h: t for h, t in self._reported.items() if now - t < HANDSHAKE_REPORT_EVERY
            }
        self._reported[host] = now
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


def _peer(peername: object) -> tuple[str, str]:
    """The peer's address, and its address and port, as the log names them."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        return str(peername[0]), f"{peername[0]}:{peername[1]}"
    return "?", "an unknown peer"
