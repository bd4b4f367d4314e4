"""Failed TLS handshakes on the HTTPS listener are logged as the MLLP listener logs them: a
WARNING naming the listener, the peer and the reason (an expired client certificate, one from
another CA, none where one is required, plain HTTP to the TLS port, a client that never
finishes), at most once a minute per peer address, and counted in
carehub_http_tls_handshakes_failed. Real sockets from several loopback addresses, certificates
made by trustme."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trustme

from carehub.config import TLSConfig
from carehub.intake import http as http_intake
from carehub.intake import tls as tls_intake
from carehub.intake.tls import client_context
from carehub.testing import HubThread
from tests.helpers_http import wait_for
from tests.test_http_tls import TOKEN, address, https_hub

TIMEOUT = 30.0
LOGGER = "carehub.intake.http"
#: Common names of the client certificates: never to be found in the log.
SENDER, EXPIRED, INTRUDER = "sender.hospital.test", "expired.hospital.test", "intruder.test"


@dataclass(frozen=True)
class ClientCerts:
    ca: Path
    server_cert: Path
    server_key: Path
    good: Path  # key and certificate chain in one PEM file
    expired: Path  # signed by the trusted CA, expired yesterday
    foreign: Path  # signed by a CA the hub does not trust


@pytest.fixture(scope="module")
def client_certs(tmp_path_factory: pytest.TempPathFactory) -> ClientCerts:
    folder = tmp_path_factory.mktemp("https-certs")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(folder / "ca.pem")
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(folder / "server.pem")
    server.private_key_pem.write_to_path(folder / "server.key")
    (folder / "server.key").chmod(0o600)
    now = datetime.now(UTC)
    ca.issue_cert(SENDER).private_key_and_cert_chain_pem.write_to_path(folder / "good.pem")
    ca.issue_cert(
        EXPIRED, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    ).private_key_and_cert_chain_pem.write_to_path(folder / "expired.pem")
    other_ca.issue_cert(INTRUDER).private_key_and_cert_chain_pem.write_to_path(
        folder / "foreign.pem"
    )
    return ClientCerts(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "good.pem",
        folder / "expired.pem",
        folder / "foreign.pem",
    )


@pytest.fixture
def mtls_hub(tmp_path: Path, client_certs: ClientCerts) -> Iterator[HubThread]:
    tls = TLSConfig(
        cert=client_certs.server_cert, key=client_certs.server_key, client_ca=client_certs.ca
    )
    with https_hub(tmp_path, tls) as hub:
        yield hub


def https_get(
    hub: HubThread, source: str, context: ssl.SSLContext | None, request: bytes = b""
) -> bytes:
    """GET /health from ``source`` (a loopback address), over TLS with ``context`` or in plain
    text without; what came back (nothing, or a TLS alert, when the hub refused)."""
    request = request or b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    answer = b""
    with socket.create_connection(address(hub), TIMEOUT, source_address=(source, 0)) as raw:
        try:
            if context is None:
                raw.sendall(request)
                while chunk := raw.recv(65536):
                    answer += chunk
                return answer
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(request)
                while chunk := tls.recv(65536):
                    answer += chunk
        except OSError:  # refused in the handshake, or reset after it
            pass
    return answer


def handshake_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelname == "WARNING" and "TLS handshake" in r.getMessage()
    ]


def failed_count(hub: HubThread, context: ssl.SSLContext) -> float:
    """carehub_http_tls_handshakes_failed, scraped over HTTPS with ``context``."""
    host, port = address(hub)
    text = httpx.get(
        f"https://{host}:{port}/metrics",
        headers={"Authorization": f"Bearer {TOKEN}"},
        verify=context,
        timeout=TIMEOUT,
    ).text
    [line] = [x for x in text.splitlines() if x.startswith("carehub_http_tls_handshakes_failed_")]
    return float(line.rsplit(" ", 1)[1])


def test_failed_https_handshakes_are_logged_with_the_peer_and_the_reason(
    mtls_hub: HubThread, client_certs: ClientCerts, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger=LOGGER)
    trusting = client_context(ca=client_certs.ca)
    good = client_context(ca=client_certs.ca, cert=client_certs.good)

    # 127.0.0.2: no certificate, then one from another CA, within the minute: one line.
    assert b"200 OK" not in https_get(mtls_hub, "127.0.0.2", trusting)
    foreign = client_context(ca=client_certs.ca, cert=client_certs.foreign)
    assert b"200 OK" not in https_get(mtls_hub, "127.0.0.2", foreign)
    # 127.0.0.3: a certificate from the right CA that has expired.
    expired = client_context(ca=client_certs.ca, cert=client_certs.expired)
    assert b"200 OK" not in https_get(mtls_hub, "127.0.0.3", expired)
    # 127.0.0.4: plain HTTP to the TLS port.
    assert b"200 OK" not in https_get(mtls_hub, "127.0.0.4", None)

    wait_for(lambda: len(handshake_lines(caplog)) == 3, 10, what="three handshake lines")
    lines = {line.split(" failed ")[0]: line for line in handshake_lines(caplog)}
    by_peer = {key.rsplit(":", 1)[0].rsplit(" ", 1)[1]: line for key, line in lines.items()}
    assert sorted(by_peer) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"], lines
    for line in by_peer.values():
        assert line.startswith("HTTP listener http: TLS handshake with 127.0.0."), line
        assert line.endswith("later failures from this address are logged at most once a minute")
        assert not any(name in line for name in (SENDER, EXPIRED, INTRUDER)), line
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in by_peer["127.0.0.2"], by_peer
    assert "certificate has expired" in by_peer["127.0.0.3"], by_peer
    assert "HTTP_REQUEST" in by_peer["127.0.0.4"], by_peer

    wait_for(lambda: failed_count(mtls_hub, good) == 4, 10, what="four failures counted")
    # A partner with a good certificate is served, and logs nothing.
    assert b"200 OK" in https_get(mtls_hub, "127.0.0.2", good)
    assert len(handshake_lines(caplog)) == 3


def test_a_client_that_never_finishes_its_handshake_is_logged_and_let_go(
    tmp_path: Path,
    client_certs: ClientCerts,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for module in (http_intake, tls_intake):  # the wait, and what the log says of it
        monkeypatch.setattr(module, "HANDSHAKE_TIMEOUT", 0.5, raising=False)
    caplog.set_level("WARNING", logger=LOGGER)
    tls = TLSConfig(cert=client_certs.server_cert, key=client_certs.server_key)
    with https_hub(tmp_path, tls) as hub:
        with socket.create_connection(address(hub), TIMEOUT) as silent:
            assert silent.recv(1) == b""  # closed by the hub, having sent nothing
        wait_for(lambda: handshake_lines(caplog), 10, what="the handshake logged")
        [line] = handshake_lines(caplog)
        assert "failed (no handshake within 0.5 s)" in line, line
        # Served after it, plain TLS without a client certificate.
        answer = https_get(hub, "127.0.0.1", client_context(ca=client_certs.ca))
        assert b"200 OK" in answer


def test_the_listener_stops_with_a_handshake_under_way(
    tmp_path: Path, client_certs: ClientCerts
) -> None:
    tls = TLSConfig(cert=client_certs.server_cert, key=client_certs.server_key)
    with contextlib.ExitStack() as still_open:
        with https_hub(tmp_path, tls) as hub:
            still_open.enter_context(socket.create_connection(address(hub), TIMEOUT))
            listener = hub.hub.http_listener
            assert listener is not None
            wait_for(lambda: listener._handshakes, 10, what="the handshake under way")
        assert not listener._handshakes  # cancelled as the hub stopped, the client still there
