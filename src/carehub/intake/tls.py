"""TLS contexts for MLLP: server side (optionally requiring client certificates) and client side."""

from __future__ import annotations

import ssl
from pathlib import Path

from carehub.config import TLSConfig
from carehub.errors import ConfigError


def server_context(tls: TLSConfig, where: str) -> ssl.SSLContext:
    """A server context from the listener's TLS settings; names the file that cannot be read."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"{where}.tls: cannot load cert {tls.cert} / key {tls.key}: {err}"
        ) from err
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(tls.client_ca))
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"{where}.tls.client_ca: cannot load {tls.client_ca}: {err}") from err
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        raise ConfigError(f"{where}.tls.require_client_cert: needs tls.client_ca to check against")
    return context


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
