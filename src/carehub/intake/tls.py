"""TLS contexts: server side for the MLLP and HTTP listeners (requiring client certificates
when given a CA to check them against) and client side."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from carehub.config import TLSConfig
from carehub.errors import ConfigError

log = logging.getLogger(__name__)

#: Permission bits that let the file's group or anyone else read a file.
READABLE_BY_OTHERS = 0o044

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
