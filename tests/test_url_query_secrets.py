"""A credential in a destination URL's query string is masked by its parameter's name, not by a
fixed list: any name holding token, secret, key, password, passwd, pwd, auth, signature, sig,
credential or session (any case, ``_`` and ``-`` ignored). A real `carehub serve` sending to
a closed port and to a server that refuses shows none of them in its WARNING log, `carehub
status`, `dead-letters list` or `messages show`; nor does `routes check` refusing such a URL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub.config import without_password
from carehub.testing import make_adt, mllp_exchange
from tests.helpers_cli import carehub, project, routes_check
from tests.helpers_http import CarehubProcess, HTTPServer, wait_for
from tests.test_cli import free_port, plain

#: The secrets the URLs below carry: none may be shown anywhere.
SECRETS = (
    "SMS-SECRET-TOKEN-42",
    "CS-SECRET-99",
    "WEBHOOK-SECRET-7",
    "VonageKey0001",
    "S3CR3Tvalue",
    "AmzSig0042",
    "SessionValue77",
)


def leaked(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "http://h/messages?auth_token=SMS-SECRET-TOKEN-42&client_secret=CS-SECRET-99",
            "http://h/messages?auth_token=***&client_secret=***",
        ),
        ("http://h/care-events?apiToken=WEBHOOK-SECRET-7", "http://h/care-events?apiToken=***"),
        (
            "https://rest.example.com/sms/json?api_key=VonageKey0001&api_secret=S3CR3Tvalue&to=1",
            "https://rest.example.com/sms/json?api_key=***&api_secret=***&to=1",
        ),
        (
            "https://b.example.com/o?X-Amz-Credential=AK%2F1&X-Amz-Signature=AmzSig0042",
            "https://b.example.com/o?X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("http://h/x;JSESSIONID=SessionValue77", "http://h/x;JSESSIONID=***"),
        (
            "http://h/x?Pwd=a&PASSWD=b&authorization=c",
            "http://h/x?Pwd=***&PASSWD=***&authorization=***",
        ),
        ("http://h/x?api%5Fsecret=S3CR3Tvalue", "http://h/x?api%5Fsecret=***"),
        ("http://h/cb#access_token=a&state=s", "http://h/cb#access_token=***&state=s"),
        ("http://h/x?page=2&to=%2B1555&code=c", "http://h/x?page=2&to=%2B1555&code=***"),
        (
            "POST http://h/m?auth_token=SMS-SECRET-TOKEN-42: ConnectError: refused",
            "POST http://h/m?auth_token=***: ConnectError: refused",
        ),
    ],
)
def test_a_query_parameter_named_like_a_credential_is_masked(url: str, shown: str) -> None:
    assert without_password(url) == shown


ROUTES = """\
routes:
  - name: out
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: closed, url: "{closed}", retry: {once}}}
      - forward: {{channel: webhook, name: refusing, url: "{refusing}", retry: {once}}}
"""
ONCE = "{max_attempts: 1, initial_delay: 0.05, max_delay: 0.05, jitter: 0}"


def cli(*args: str) -> str:
    done = carehub(*args, COLUMNS="250")
    assert done.returncode == 0, done.stdout + done.stderr
    return plain(done.stdout + done.stderr)


@pytest.fixture
def refusing_server() -> Iterator[HTTPServer]:
    with HTTPServer(lambda _: 500) as server:
        yield server


def test_serve_and_the_cli_never_show_a_query_credential(
    tmp_path: Path, refusing_server: HTTPServer
) -> None:
    closed = (
        f"http://127.0.0.1:{free_port()}/messages"
        "?auth_token=SMS-SECRET-TOKEN-42&client_secret=CS-SECRET-99"
    )
    refusing = (
        f"http://127.0.0.1:{refusing_server.port}/care-events?apiToken=WEBHOOK-SECRET-7"
        "&api_key=VonageKey0001&api_secret=S3CR3Tvalue"
    )
    routes = ROUTES.format(closed=closed, refusing=refusing, once=ONCE)
    config = project(tmp_path / "config", routes, "worker: {poll_interval: 0.05}\n")
    hub = ["--config", str(config), "--data-dir", str(tmp_path / "data")]

    with CarehubProcess(["serve", *hub], tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        mllp_exchange(serve.mllp_address, [make_adt("QS-1").encode()])
        wait_for(
            lambda: json.loads(cli("status", "--json", *hub))["dead_letters"] == 2,
            30,
            0.2,
            "both deliveries to be dead letters",
        )
        assert serve.terminate() == 0
    assert len(refusing_server.requests) == 1  # sent to the URL as written

    log = serve.stderr
    assert "sending to out/closed failed" in log and "sending to out/refusing failed" in log
    assert "auth_token=***&client_secret=***" in log
    assert "apiToken=***&api_key=***&api_secret=***" in log
    assert leaked(log) == [], log
    shown = {
        "status": cli("status", *hub),
        "status --json": cli("status", "--json", *hub),
        "dead-letters list": cli("dead-letters", "list", *hub),
        "messages show": cli("messages", "show", "1", *hub),
    }
    for command, output in shown.items():
        assert "***" in output, (command, output)
        assert leaked(output) == [], (command, output)


def test_routes_check_masks_a_refused_url_with_a_query_credential(tmp_path: Path) -> None:
    routes = (
        "routes:\n  - name: out\n    steps:\n      - forward: {channel: webhook, name: x, "
        "url: 'ftp://127.0.0.1:1/hook?client_secret=CS-SECRET-99&apiToken=WEBHOOK-SECRET-7'}\n"
    )
    done = routes_check(project(tmp_path / "config", routes), tmp_path / "data")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "?client_secret=***&apiToken=***" in done.stderr
    assert leaked(done.stdout + done.stderr) == []
