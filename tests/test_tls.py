"""MLLP over TLS with trustme certificates: handshake, mutual TLS, plain clients, bad config."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from carehub.client import MLLPClient
from carehub.config import TLSConfig
from carehub.errors import ConfigError
from carehub.hl7.ack import read_ack
from carehub.hl7.framing import encode_frame
from carehub.hub import Hub
from carehub.intake.tls import client_context
from carehub.testing import HubThread, local_config, make_adt
from tests.helpers_http import wait_for

TIMEOUT = 30.0


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client: Path  # key and certificate chain in one PEM file
    foreign_client: Path  # signed by a CA the hub does not trust


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    server.cert_chain_pems[0].write_to_path(folder / "server.pem")
    server.private_key_pem.write_to_path(folder / "server.key")
    (folder / "server.key").chmod(0o600)  # as a key should be: readable by its owner only
    ca.issue_cert("sender@hospital.test").private_key_and_cert_chain_pem.write_to_path(
        folder / "client.pem"
    )
    other_ca.issue_cert("intruder@elsewhere.test").private_key_and_cert_chain_pem.write_to_path(
        folder / "foreign.pem"
    )
    return Certs(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "client.pem",
        folder / "foreign.pem",
    )


def tls_config(certs: Certs, *, require_client_cert: bool) -> TLSConfig:
    return TLSConfig(
        cert=certs.server_cert,
        key=certs.server_key,
        client_ca=certs.ca if require_client_cert else None,
        require_client_cert=require_client_cert,
    )


def start_hub(tmp_path: Path, tls: TLSConfig) -> HubThread:
    config = local_config()
    config.listeners.mllp[0].tls = tls
    return HubThread(config, tmp_path / "data")


@pytest.fixture
def tls_hub(tmp_path: Path, certs: Certs) -> Iterator[HubThread]:
    with start_hub(tmp_path, tls_config(certs, require_client_cert=False)) as hub:
        yield hub


@pytest.fixture
def mtls_hub(tmp_path: Path, certs: Certs) -> Iterator[HubThread]:
    with start_hub(tmp_path, tls_config(certs, require_client_cert=True)) as hub:
        yield hub


def send_over_tls(hub: HubThread, certs: Certs, control_id: str, client: Path | None = None) -> str:
    """Send one ADT over TLS and return the ACK's MSA-1 (raises OSError when refused)."""
    host, port = hub.mllp_address
    context = client_context(ca=certs.ca, cert=client)

    async def run() -> bytes:
        async with MLLPClient(host, port, ssl_context=context, timeout=TIMEOUT) as client_:
            return await client_.send(make_adt(control_id).encode())

    code, echoed, _ = read_ack(asyncio.run(run()).decode())
    assert echoed == control_id
    return code


def test_message_over_tls_is_acked_and_stored(tls_hub: HubThread, certs: Certs) -> None:
    assert send_over_tls(tls_hub, certs, "TLS1") == "AA"
    assert [m.control_id for m in tls_hub.store.find()] == ["TLS1"]


def test_mutual_tls_refuses_a_client_without_a_certificate(
    mtls_hub: HubThread, certs: Certs
) -> None:
    with pytest.raises(OSError):
        send_over_tls(mtls_hub, certs, "NOCERT")
    assert mtls_hub.store.count() == 0


def test_mutual_tls_accepts_a_client_cert_signed_by_the_ca(
    mtls_hub: HubThread, certs: Certs
) -> None:
    assert send_over_tls(mtls_hub, certs, "MTLS1", certs.client) == "AA"
    assert [m.control_id for m in mtls_hub.store.find()] == ["MTLS1"]


def test_mutual_tls_refuses_a_client_cert_from_another_ca(
    mtls_hub: HubThread, certs: Certs
) -> None:
    with pytest.raises(OSError):
        send_over_tls(mtls_hub, certs, "FOREIGN", certs.foreign_client)
    assert mtls_hub.store.count() == 0


def test_plain_tcp_client_on_tls_port_stores_nothing_and_tls_still_works(
    tls_hub: HubThread, certs: Certs
) -> None:
    with socket.create_connection(tls_hub.mllp_address, timeout=TIMEOUT) as sock:
        sock.sendall(encode_frame(make_adt("PLAIN").encode()))
        try:
            while sock.recv(65536):  # a TLS alert at most, then the close
                pass
        except ConnectionResetError:
            pass
    assert tls_hub.store.count() == 0
    assert send_over_tls(tls_hub, certs, "AFTERPLAIN") == "AA"
    assert [m.control_id for m in tls_hub.store.find()] == ["AFTERPLAIN"]


def handshake_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]


def test_failed_handshakes_are_logged_with_the_peer_and_the_reason(
    mtls_hub: HubThread, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """A partner whose certificate is refused, or who speaks plain TCP, is named in one
    WARNING with why (asyncio alone logs nothing), and a second failure from the same address
    within the minute adds no line; a good client is served after them."""
    caplog.set_level("WARNING", logger="carehub.intake.mllp")
    with pytest.raises(OSError):
        send_over_tls(mtls_hub, certs, "FOREIGN", certs.foreign_client)
    with pytest.raises(OSError):
        send_over_tls(mtls_hub, certs, "FOREIGN2", certs.foreign_client)
    listener = mtls_hub.hub.mllp_listeners[0]
    # The client may see its connection closed before the hub's handshake task has logged.
    wait_for(lambda: listener.handshakes_failed == 2, 10, what="both failures counted")
    lines = handshake_lines(caplog)
    assert len(lines) == 1, lines
    assert lines[0].startswith("MLLP listener test: TLS handshake with 127.0.0.1:")
    assert "CERTIFICATE_VERIFY_FAILED" in lines[0] or "certificate" in lines[0].lower()
    metrics = httpx.get(mtls_hub.http_url + "/metrics", timeout=TIMEOUT).text
    assert 'carehub_mllp_tls_handshakes_failed_total{listener="test"} 2.0' in metrics
    assert send_over_tls(mtls_hub, certs, "GOOD", certs.client) == "AA"


def test_plain_tcp_on_the_tls_port_is_logged_as_a_failed_handshake(
    tls_hub: HubThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="carehub.intake.mllp")
    with socket.create_connection(tls_hub.mllp_address, timeout=TIMEOUT) as sock:
        sock.sendall(encode_frame(make_adt("PLAIN").encode()))
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
    wait_for(lambda: handshake_lines(caplog), 10, what="the failed handshake logged")
    lines = handshake_lines(caplog)
    assert len(lines) == 1 and "failed (" in lines[0], lines


@pytest.mark.parametrize("broken", ["cert", "key", "client_ca"])
def test_unreadable_tls_file_is_a_config_error_naming_the_listener(
    tmp_path: Path, certs: Certs, broken: str
) -> None:
    tls = tls_config(certs, require_client_cert=True)
    setattr(tls, broken, tmp_path / "missing.pem")
    config = local_config()
    config.listeners.mllp[0].tls = tls
    with pytest.raises(ConfigError, match=r"listeners\.mllp\[0\]\.tls") as raised:
        asyncio.run(Hub(config, tmp_path / "data").start())
    assert "missing.pem" in str(raised.value)


def test_client_ca_alone_requires_a_client_certificate(tmp_path: Path, certs: Certs) -> None:
    """With client_ca and require_client_cert left out, a sender without a certificate is
    refused and nothing is stored; one with a certificate from the CA is served."""
    tls = TLSConfig(cert=certs.server_cert, key=certs.server_key, client_ca=certs.ca)
    with start_hub(tmp_path, tls) as hub:
        with pytest.raises(OSError):
            send_over_tls(hub, certs, "NOCERT")
        assert hub.store.count() == 0
        assert send_over_tls(hub, certs, "WITHCERT", certs.client) == "AA"


def test_client_certificates_are_optional_only_when_asked_for(tmp_path: Path, certs: Certs) -> None:
    tls = TLSConfig(
        cert=certs.server_cert, key=certs.server_key, client_ca=certs.ca, require_client_cert=False
    )
    with start_hub(tmp_path, tls) as hub:
        assert send_over_tls(hub, certs, "NOCERT", None) == "AA"
        with pytest.raises(OSError):
            send_over_tls(hub, certs, "FOREIGN", certs.foreign_client)  # checked when presented


def key_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if ".tls.key" in r.getMessage()]


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o640, True), (0o600, False)])
def test_a_tls_key_other_accounts_can_read_is_warned_about_at_start(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture, mode: int, warned: bool
) -> None:
    key = tmp_path / "hub-key.pem"
    key.write_bytes(certs.server_key.read_bytes())
    key.chmod(mode)
    caplog.set_level("WARNING")
    with start_hub(tmp_path, TLSConfig(cert=certs.server_cert, key=key)) as hub:
        assert send_over_tls(hub, certs, "KEYMODE") == "AA"
    lines = key_warnings(caplog)
    assert bool(lines) is warned, lines
    if warned:
        [line] = lines
        assert line.startswith(f"listeners.mllp[0].tls.key {key} can be read by other accounts")
        assert f"(mode {mode:03o})" in line


def plain_mllp_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "has no TLS" in r.getMessage()]


@pytest.mark.parametrize(
    ("host", "with_tls", "warned"),
    [("0.0.0.0", False, True), ("127.0.0.1", False, False), ("0.0.0.0", True, False)],
)
def test_plain_mllp_beyond_loopback_is_warned_about_at_start(
    tmp_path: Path,
    certs: Certs,
    caplog: pytest.LogCaptureFixture,
    host: str,
    with_tls: bool,
    warned: bool,
) -> None:
    config = local_config()
    config.listeners.mllp[0].host = host
    if with_tls:
        config.listeners.mllp[0].tls = tls_config(certs, require_client_cert=False)
    caplog.set_level("WARNING", logger="carehub.hub")
    with HubThread(config, tmp_path / "data"):
        pass
    lines = plain_mllp_warnings(caplog)
    assert bool(lines) is warned, lines
    if warned:
        [line] = lines
        assert line.startswith("MLLP listener 'test' on 0.0.0.0 has no TLS: messages cross")
        assert "trusted network" in line and "TLS terminator" in line
