"""HTTPS on the HTTP listener (listeners.http.tls) with trustme certificates and a real httpx
client: HTTPS is served, plain HTTP to the TLS port gets nothing, mutual TLS refuses a client
without a certificate, a file that cannot be loaded is an error naming the setting, and `serve`
warns at start about an HTTP listener beyond loopback without TLS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from carehub.config import TLSConfig
from carehub.errors import ConfigError
from carehub.hub import Hub
from carehub.intake.tls import client_context
from carehub.testing import HubThread, local_config, make_adt
from tests import test_tls
from tests.test_tls import Certs

certs = test_tls.certs  # the trustme CA, server and client certificates

TIMEOUT = 30.0
TOKEN = "intake-token-for-the-https-tests"


def https_hub(tmp_path: Path, tls: TLSConfig, host: str = "127.0.0.1") -> HubThread:
    config = local_config()
    config.listeners.http.host = host
    config.listeners.http.tokens = [TOKEN]
    config.listeners.http.tls = tls
    return HubThread(config, tmp_path / "data")


def address(hub: HubThread) -> tuple[str, int]:
    assert hub.hub.http_listener and hub.hub.http_listener.address
    host, port = hub.hub.http_listener.address
    return ("127.0.0.1" if host == "0.0.0.0" else host), port


def client(certs: Certs, cert: Path | None = None) -> httpx.Client:
    """A client that trusts the test CA, presenting ``cert`` when given."""
    return httpx.Client(verify=client_context(ca=certs.ca, cert=cert), timeout=TIMEOUT)


def post_adt(http: httpx.Client, url: str, control_id: str) -> httpx.Response:
    return http.post(
        f"{url}/hl7",
        content=make_adt(control_id).encode(),
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


@pytest.fixture
def tls_hub(tmp_path: Path, certs: Certs) -> Iterator[HubThread]:
    with https_hub(tmp_path, TLSConfig(cert=certs.server_cert, key=certs.server_key)) as hub:
        yield hub


@pytest.fixture
def mtls_hub(tmp_path: Path, certs: Certs) -> Iterator[HubThread]:
    tls = TLSConfig(cert=certs.server_cert, key=certs.server_key, client_ca=certs.ca)
    with https_hub(tmp_path, tls) as hub:
        yield hub


def test_https_serves_health_and_intake(tls_hub: HubThread, certs: Certs) -> None:
    host, port = address(tls_hub)
    with client(certs) as http:
        assert http.get(f"https://{host}:{port}/health").json() == {"status": "ok"}
        answer = post_adt(http, f"https://{host}:{port}", "HTTPS1")
    assert answer.status_code == 200 and "MSA|AA|HTTPS1" in answer.text
    assert [m.control_id for m in tls_hub.store.find()] == ["HTTPS1"]
    assert [b.kind for b in tls_hub.hub.bound] == ["MLLP", "HTTPS"]


def test_plain_http_to_the_tls_port_gets_no_answer(tls_hub: HubThread, certs: Certs) -> None:
    host, port = address(tls_hub)
    with httpx.Client(timeout=TIMEOUT) as plain, pytest.raises(httpx.TransportError):
        post_adt(plain, f"http://{host}:{port}", "PLAIN1")
    assert tls_hub.store.count() == 0
    with client(certs) as http:  # and HTTPS still works after it
        assert post_adt(http, f"https://{host}:{port}", "AFTERPLAIN").status_code == 200


def test_mutual_tls_refuses_a_client_without_a_certificate(
    mtls_hub: HubThread, certs: Certs
) -> None:
    host, port = address(mtls_hub)
    url = f"https://{host}:{port}"
    with client(certs) as http, pytest.raises(httpx.TransportError):
        post_adt(http, url, "NOCERT")
    with client(certs, certs.foreign_client) as http, pytest.raises(httpx.TransportError):
        post_adt(http, url, "FOREIGN")
    assert mtls_hub.store.count() == 0
    with client(certs, certs.client) as http:
        assert post_adt(http, url, "WITHCERT").status_code == 200
    assert [m.control_id for m in mtls_hub.store.find()] == ["WITHCERT"]


@pytest.mark.parametrize("broken", ["cert", "key", "client_ca"])
def test_an_unreadable_https_file_is_a_config_error_naming_the_setting(
    tmp_path: Path, certs: Certs, broken: str
) -> None:
    tls = TLSConfig(cert=certs.server_cert, key=certs.server_key, client_ca=certs.ca)
    setattr(tls, broken, tmp_path / "missing.pem")
    config = local_config()
    config.listeners.http.tls = tls
    with pytest.raises(ConfigError, match=r"listeners\.http\.tls") as raised:
        asyncio.run(Hub(config, tmp_path / "data").start())
    assert "missing.pem" in str(raised.value)


def write_config(folder: Path, tls: str) -> Path:
    """A config file whose HTTP listener has ``tls`` (relative paths, from its folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "carehub.yaml"
    text = f"routes: []\nlisteners:\n  http:\n    host: 127.0.0.1\n    port: 0\n    tls: {tls}\n"
    path.write_text(text, encoding="utf-8")
    return path


ROUTES_CHECK = [sys.executable, "-m", "carehub.cli", "routes", "check", "--offline"]


def routes_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ROUTES_CHECK, "--config", str(config), "--data-dir", str(config.parent / "data")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_routes_check_loads_the_https_files_from_the_config_folder(
    tmp_path: Path, certs: Certs
) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    for name in ("server.pem", "server.key", "ca.pem"):
        (folder / name).write_bytes((certs.server_cert.parent / name).read_bytes())
    good = routes_check(
        write_config(folder, "{cert: server.pem, key: server.key, client_ca: ca.pem}")
    )
    assert good.returncode == 0, good.stderr
    assert "ok: 0 route(s)" in good.stdout
    bad = routes_check(write_config(folder, "{cert: server.pem, key: nowhere.key}"))
    assert bad.returncode != 0
    assert "carehub.yaml:6: listeners.http.tls.key: cannot load" in bad.stderr, bad.stderr


def tls_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("HTTP listener") and "TLS" in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("host", "with_tls", "warned"),
    [("0.0.0.0", False, True), ("127.0.0.1", False, False), ("0.0.0.0", True, False)],
)
def test_http_beyond_loopback_without_tls_is_warned_about_at_start(
    tmp_path: Path,
    certs: Certs,
    caplog: pytest.LogCaptureFixture,
    host: str,
    with_tls: bool,
    warned: bool,
) -> None:
    """Tokens and organisation tokens do not make up for it: the tokens themselves cross the
    network in clear."""
    config = local_config()
    config.listeners.http.host = host
    config.listeners.http.tokens = [TOKEN]
    config.listeners.http.organization_tokens = {"Food Bank": "food-bank-token-0123456789"}
    if with_tls:
        config.listeners.http.tls = TLSConfig(cert=certs.server_cert, key=certs.server_key)
    caplog.set_level("WARNING", logger="carehub.hub")
    with HubThread(config, tmp_path / "data"):
        pass
    lines = tls_warnings(caplog)
    assert bool(lines) is warned, lines
    if warned:
        [line] = lines
        assert line.startswith(
            "HTTP listener on 0.0.0.0 has no TLS: bearer tokens, messages and referral "
            "updates cross the network in clear"
        )
        assert "TLS terminator" in line and "listeners.http.tls" in line


def test_an_https_key_other_accounts_can_read_is_warned_about(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "hub-key.pem"
    key.write_bytes(certs.server_key.read_bytes())
    key.chmod(0o644)
    caplog.set_level("WARNING", logger="carehub.intake.tls")
    with https_hub(tmp_path, TLSConfig(cert=certs.server_cert, key=key)):
        pass
    lines = [r.getMessage() for r in caplog.records if ".tls.key" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"listeners.http.tls.key {key} can be read")
