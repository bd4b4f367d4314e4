"""The HTTP listener's deadlines and connection limits, against a real hub over real sockets:
a client that sends its request line and headers (or its body) a byte at a time is closed once
listeners.http.header_timeout (body_timeout) has passed, while a normal client is served; a
peer address over max_connections_per_peer, or any peer over max_connections, has its new
connection closed at once while another address (127.0.0.2) is served; the same over HTTPS,
where the limits hold before the handshake and the deadlines after it. Each closing is logged
once a minute per address and counted in /metrics. And a hub that runs out of file
descriptors anyway (limits above `ulimit -n`) says so once a minute, not once per accept."""

from __future__ import annotations

import contextlib
import logging
import re
import resource
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from carehub.config import TLSConfig
from carehub.testing import HubThread, local_config, make_adt
from tests import test_tls
from tests.helpers_http import wait_for
from tests.test_http_tls import TOKEN, address, https_hub
from tests.test_tls import Certs

certs = test_tls.certs

TIMEOUT = 30.0
LOGGER = "carehub.intake.http"
#: How long a test waits for the hub to close a connection it should close: far beyond the
#: deadlines configured here (1 s), and what an old hub, which never closes one, fails on.
CLOSE_WAIT = 15.0
HEAD = b"POST /hl7 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: x-application/hl7-v2+er7\r\n"


def limited_hub(tmp_path: Path, **limits: float) -> HubThread:
    config = local_config()
    for name, value in limits.items():
        setattr(config.listeners.http, name, value)
    return HubThread(config, tmp_path / "data")


def connect(hub: HubThread, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(address(hub), TIMEOUT, source_address=(source, 0))


def closed_by_hub(sock: socket.socket | ssl.SSLSocket, within: float = CLOSE_WAIT) -> bool:
    """Whether the hub closes ``sock`` (end of stream or reset) within ``within`` seconds,
    reading and dropping whatever it sends first."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionError, ssl.SSLError):
            return True
        except TimeoutError:
            return False
    return False


def trickle_until_closed(sock: socket.socket | ssl.SSLSocket, byte: bytes) -> bool:
    """Send ``byte`` every 0.2 s, as a slow client does, until the hub closes the connection
    (True) or CLOSE_WAIT has passed (False)."""
    deadline = time.monotonic() + CLOSE_WAIT
    while time.monotonic() < deadline:
        try:
            sock.sendall(byte)
        except (ConnectionError, ssl.SSLError):
            return True
        if closed_by_hub(sock, within=0.2):
            return True
    return False


def post(hub: HubThread, control_id: str, source: str = "127.0.0.1") -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=TIMEOUT) as http:
        return http.post(f"{hub.http_url}/hl7", content=make_adt(control_id).encode())


def metrics(hub: HubThread, source: str = "127.0.0.2") -> str:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=TIMEOUT) as http:
        return http.get(f"{hub.http_url}/metrics").text


def warnings(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelname == "WARNING" and words in r.getMessage()
    ]


def test_a_client_slow_to_send_its_headers_is_closed_while_others_are_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with limited_hub(tmp_path, header_timeout=1.0) as hub, connect(hub) as slow:
        slow.sendall(HEAD)
        answer = post(hub, "WHILE-SLOW")  # from the same address, meanwhile
        assert answer.status_code == 200 and "MSA|AA|WHILE-SLOW" in answer.text
        assert trickle_until_closed(slow, b"X"), "a header sent a byte at a time kept its line"
        assert post(hub, "AFTER-SLOW").status_code == 200
        assert sorted(m.control_id for m in hub.store.find()) == ["AFTER-SLOW", "WHILE-SLOW"]
        wait_for(lambda: warnings(caplog, "header_timeout"), 10, what="the closing logged")
        [line] = warnings(caplog, "header_timeout")
        assert line.startswith("HTTP listener http: closed the connection from 127.0.0.1:")
        assert "no whole request line and headers within 1 s" in line
        text = metrics(hub)
    assert 'carehub_http_connections_timed_out_total{phase="head"} 1.0' in text


def test_a_body_that_trickles_in_is_cut_off_and_nothing_of_it_is_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    message = make_adt("TRICKLED").encode()
    with limited_hub(tmp_path, header_timeout=1.0, body_timeout=1.0) as hub:
        with connect(hub) as slow:
            slow.sendall(HEAD + f"Content-Length: {len(message)}\r\n\r\n".encode())
            slow.sendall(message[:20])
            assert trickle_until_closed(slow, b"|"), "a body sent a byte at a time was waited for"
        assert post(hub, "AFTER-BODY").status_code == 200
        assert [m.control_id for m in hub.store.find()] == ["AFTER-BODY"]
        wait_for(lambda: warnings(caplog, "body_timeout"), 10, what="the closing logged")
        text = metrics(hub)
    assert 'carehub_http_connections_timed_out_total{phase="body"} 1.0' in text
    # A client cut off mid-body is the end of its request, not an application error.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_kept_alive_connection_serves_one_request_after_another(tmp_path: Path) -> None:
    """The head deadline runs from each answer: requests in a row on one connection are each
    served, and an unused kept-alive connection is closed without a warning."""
    with limited_hub(tmp_path, header_timeout=1.0) as hub, httpx.Client(timeout=TIMEOUT) as http:
        for n in range(3):
            answer = http.post(f"{hub.http_url}/hl7", content=make_adt(f"KA{n}").encode())
            assert answer.status_code == 200
        assert hub.store.count() == 3
        listener = hub.hub.http_listener
        assert listener is not None
        wait_for(lambda: listener.connections.open == 0, 10, what="the unused connection closed")
        assert sum(listener.connections.timed_out.values()) == 0


def test_connections_over_the_per_peer_limit_are_closed_while_another_peer_is_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    limits = {"header_timeout": 120.0, "max_connections_per_peer": 3}
    with limited_hub(tmp_path, **limits) as hub, contextlib.ExitStack() as held:
        for _ in range(3):
            held.enter_context(connect(hub)).sendall(HEAD)
        listener = hub.hub.http_listener
        assert listener is not None
        wait_for(lambda: listener.connections.open == 3, 10, what="three connections held")
        with connect(hub) as over:
            assert closed_by_hub(over), "a fourth connection from 127.0.0.1 was kept"
        with connect(hub) as over:
            assert closed_by_hub(over)
        answer = post(hub, "OTHER-PEER", source="127.0.0.2")
        assert answer.status_code == 200 and "MSA|AA|OTHER-PEER" in answer.text
        text = metrics(hub)
        lines = warnings(caplog, "closed a connection from")
    assert "carehub_http_connections_refused_total 2.0" in text
    assert "carehub_http_connections 4.0" in text  # three held, and the scrape's own
    assert len(lines) == 1, lines  # the second within the minute adds no line
    assert lines[0].startswith("HTTP listener http: closed a connection from 127.0.0.1:")
    assert "holds 3 open connections already (listeners.http.max_connections_per_peer)" in lines[0]


def test_connections_over_the_listener_limit_are_closed_until_one_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    limits = {"header_timeout": 120.0, "max_connections": 3, "max_connections_per_peer": 2}
    with limited_hub(tmp_path, **limits) as hub, contextlib.ExitStack() as held:
        first = held.enter_context(connect(hub))
        held.enter_context(connect(hub))
        held.enter_context(connect(hub, "127.0.0.2"))
        listener = hub.hub.http_listener
        assert listener is not None
        wait_for(lambda: listener.connections.open == 3, 10, what="three connections held")
        with connect(hub, "127.0.0.3") as over:
            assert closed_by_hub(over), "a connection past max_connections was kept"
        first.close()
        wait_for(lambda: listener.connections.open == 2, 10, what="a connection given back")
        assert post(hub, "ROOM-AGAIN", source="127.0.0.3").status_code == 200
        [line] = warnings(caplog, "closed a connection from")
    assert line.startswith("HTTP listener http: closed a connection from 127.0.0.3:")
    assert "listener holds 3 open connections already (listeners.http.max_connections)" in line


@pytest.fixture
def limited_https_hub(tmp_path: Path, certs: Certs) -> Iterator[HubThread]:
    hub = https_hub(tmp_path, TLSConfig(cert=certs.server_cert, key=certs.server_key))
    http = hub.hub.config.listeners.http
    http.header_timeout, http.max_connections_per_peer = 1.0, 2
    with hub:
        yield hub


def test_over_https_the_limits_hold_before_the_handshake_and_the_deadline_after_it(
    limited_https_hub: HubThread, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    hub = limited_https_hub
    context = ssl.create_default_context(cafile=str(certs.ca))
    with connect(hub) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as slow:
        slow.sendall(HEAD)  # the handshake is done; the headers never are
        assert trickle_until_closed(slow, b"X"), "a slow client over TLS kept its connection"
    with contextlib.ExitStack() as held:
        for _ in range(2):  # TCP connections that never start their handshake
            held.enter_context(connect(hub))
        listener = hub.hub.http_listener
        assert listener is not None
        wait_for(lambda: listener.connections.open == 2, 10, what="two connections held")
        with connect(hub) as over:
            assert closed_by_hub(over), "a third connection from 127.0.0.1 was kept"
        transport = httpx.HTTPTransport(local_address="127.0.0.2", verify=context, retries=0)
        with httpx.Client(transport=transport, timeout=TIMEOUT) as http:
            host, port = address(hub)
            answer = http.post(
                f"https://{host}:{port}/hl7",
                content=make_adt("TLS-OTHER").encode(),
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        assert answer.status_code == 200
    # Connections that ended in their handshake give their place back.
    wait_for(lambda: listener.connections.open == 0, 10, what="every connection given back")
    assert warnings(caplog, "header_timeout") and warnings(caplog, "max_connections_per_peer")


HUB_YAML = """listeners:
  mllp: [{name: adt, host: 127.0.0.1, port: 0}]
  http: {host: 127.0.0.1, port: 0, max_connections: 5000, max_connections_per_peer: 5000}
routes: []
"""
FILE_LIMIT = 256


def _file_limit() -> None:  # in the child, before it runs carehub
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, FILE_LIMIT))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_hub_out_of_file_descriptors_says_so_once_a_minute(tmp_path: Path) -> None:
    """Limits set above `ulimit -n`: serve warns at start, and once the connections have
    used up the descriptors, one WARNING a minute per listening socket says accepts fail,
    where asyncio logged an ERROR with a traceback per attempt (hundreds of thousands of
    lines a minute). Once they close, the hub serves again."""
    (tmp_path / "carehub.yaml").write_text(HUB_YAML)
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    command = [sys.executable, "-m", "carehub.cli", "serve", "--config", "carehub.yaml"]
    command += ["--data-dir", "data"]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        serve = subprocess.Popen(
            command, cwd=tmp_path, stdout=stdout, stderr=stderr, preexec_fn=_file_limit
        )
    held: list[socket.socket] = []
    try:
        wait_for(lambda: "carehub ready" in out.read_text(), 60, what="serve to be ready")
        found = re.search(r"HTTP listener 'http' on ([\d.]+):(\d+)", out.read_text())
        assert found, out.read_text()
        port = int(found.group(2))
        for _ in range(FILE_LIMIT + 100):
            sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
            sock.sendall(HEAD)
            held.append(sock)
        wait_for(
            lambda: "cannot accept connections" in err.read_text(), 30, what="the accepts failing"
        )
        time.sleep(3)  # asyncio retries every second: each retry used to log again
        logged = err.read_text()
        for sock in held:
            sock.close()
        held.clear()

        def served() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            return False

        wait_for(served, 30, what="the hub to serve again")
    finally:
        for sock in held:
            sock.close()
        serve.terminate()
        serve.wait(30)
    assert "more than half of this process's open-file limit of 256" in logged
    assert logged.count("cannot accept connections on 127.0.0.1:") == 1, logged[-3000:]
    assert "socket.accept() out of system resource" not in logged
    assert logged.count("Traceback") == 0, logged[-3000:]
