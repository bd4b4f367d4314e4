"""Credentials in destination and store URLs (a userinfo password, ?token=, ?api_key=, libpq's
?password=) are masked wherever a URL is printed: WARNING logs, delivery errors as `status`,
`dead-letters list` and `messages show` print them, `routes check` and config errors."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import update

from carehub.cli import main
from carehub.components import DeliveryError, Outgoing
from carehub.config import without_password
from carehub.referrals.fhir import FHIR_CONTENT_TYPE
from carehub.store.schema import deliveries
from carehub.store.store import MessageStore, sqlite_url
from carehub.testing import HubThread, make_adt, mllp_exchange
from tests.helpers_http import HTTPServer, wait_for
from tests.test_cli import env_without_carehub, free_port, plain
from tests.test_fhir_referrals import channel_for
from tests.test_fhir_referrals import send as fhir_send
from tests.test_messaging import attempt, notification
from tests.test_routing_e2e import FAST_RETRY, routed_config

#: Every secret the URLs below carry; none may be printed.
SECRETS = ("HookUrlPassw0rd", "UrlQueryTok3n", "SmsUrlPassw0rd", "UrlQueryS3cret", "PgPassw0rd")


def leaked(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:secret@host/x", "https://user:***@host/x"),
        ("https://user:p@ss@host:1/x", "https://user:***@host:1/x"),
        ("http://h/x?TOKEN=abc&keep=1#f", "http://h/x?TOKEN=***&keep=1#f"),
        ("http://h/x?a=1&Api_Key=abc", "http://h/x?a=1&Api_Key=***"),
        (
            "http://h/x?access_token=a&apikey=b&key=c",
            "http://h/x?access_token=***&apikey=***&key=***",
        ),
        (
            "http://h/x?password=a&secret=b&signature=c",
            "http://h/x?password=***&secret=***&signature=***",
        ),
        ("http://h/x?sig=a;code=b", "http://h/x?sig=***;code=***"),
        # "key" anywhere in a name masks it, "code" only as the whole name.
        ("http://h/x?monkey=1&zipcode=2", "http://h/x?monkey=***&zipcode=2"),
        # "pass" anywhere, "pw" only whole: passphrase and pass are hidden, page is not.
        (
            "http://h/x?pass=P4ss&pw=PW1&passphrase=x&page=2",
            "http://h/x?pass=***&pw=***&passphrase=***&page=2",
        ),
        (
            "postgresql+psycopg://postgres@127.0.0.1:5433/test?password=PgPassw0rd",
            "postgresql+psycopg://postgres@127.0.0.1:5433/test?password=***",
        ),
        ("amqp://guest:guest@localhost//", "amqp://guest:***@localhost//"),
        ("got 'ftp://u:pw@h/x?token=t' here", "got 'ftp://u:***@h/x?token=***' here"),
    ],
)
def test_secrets_in_a_url_or_a_text_quoting_one_are_masked(url: str, shown: str) -> None:
    assert without_password(url) == shown


ROUTES = """
routes:
  - name: hooks
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: refusing, url: "{refusing}", retry: {once}}}
      - forward: {{channel: webhook, name: closed, url: "{closed}", retry: {once}}}
"""


@pytest.fixture
def refusing_server() -> Iterator[HTTPServer]:
    with HTTPServer(lambda _: 500) as server:
        yield server


def cli(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args), env=env_without_carehub())
    assert result.exit_code == 0, result.output
    return result


def test_failing_webhooks_with_credentials_in_their_urls_are_logged_and_shown_masked(
    tmp_path: Path, refusing_server: HTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    refusing = (
        f"http://hookuser:HookUrlPassw0rd@127.0.0.1:{refusing_server.port}/hook"
        "?token=UrlQueryTok3n&keep=1"
    )
    closed = f"http://127.0.0.1:{free_port()}/care-events?api_key=UrlQueryS3cret"
    config = routed_config(
        tmp_path, ROUTES.format(refusing=refusing, closed=closed, once=FAST_RETRY % 1)
    )
    data_dir = tmp_path / "data"
    caplog.set_level(logging.WARNING)
    with HubThread(config, data_dir) as hub:
        mllp_exchange(hub.mllp_address, [make_adt("SEC-1").encode()])
        wait_for(
            lambda: (
                len(hub.store.find()) == 1
                and json.loads(cli("status", "--data-dir", str(data_dir), "--json").output)[
                    "dead_letters"
                ]
                == 2
            ),
            what="both deliveries dead",
        )
        [message] = hub.store.find()
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.name == "carehub.worker")
    assert "hookuser:***@127.0.0.1" in warnings and "token=***&keep=1" in warnings
    assert "api_key=***" in warnings
    assert leaked(warnings) == []

    report = cli("status", "--data-dir", str(data_dir), "--json").output
    terminal = plain(cli("status", "--data-dir", str(data_dir)).output)
    dead = plain(cli("dead-letters", "list", "--data-dir", str(data_dir)).output)
    shown = plain(cli("messages", "show", str(message.id), "--data-dir", str(data_dir)).output)
    for output in (report, terminal, dead, shown):
        assert "***" in output
        assert leaked(output) == [], output

    # A dead letter's error stored before such masking (or by a channel outside carehub)
    # is masked when listed as JSON too.
    store = MessageStore(sqlite_url(data_dir))
    try:
        with store.engine.begin() as conn:
            conn.execute(update(deliveries).values(last_error=f"POST {refusing}: HTTP 500"))
    finally:
        store.close()
    listed = cli("dead-letters", "list", "--json", "--data-dir", str(data_dir)).output
    assert "hookuser:***@" in listed and "token=***" in listed
    assert leaked(listed) == [], listed


def test_sms_gateway_errors_mask_the_urls_credentials(tmp_path: Path) -> None:
    from carehub.builtins.messaging import SmsChannel
    from tests.helpers_channels import build

    with HTTPServer(lambda _: 500) as gateway:
        url = f"http://smsuser:SmsUrlPassw0rd@127.0.0.1:{gateway.port}/sms?apikey=UrlQueryS3cret"
        refused = attempt(build(SmsChannel, tmp_path, url=url), notification(to="+15551234567"))
        assert len(gateway.requests) == 1  # sent to the URL as configured
    closed = f"http://smsuser:SmsUrlPassw0rd@127.0.0.1:{free_port()}/sms"
    unreachable = attempt(build(SmsChannel, tmp_path, url=closed), notification(to="+15551234"))
    for error in (refused, unreachable):
        assert isinstance(error, DeliveryError)
        assert "smsuser:***@127.0.0.1" in str(error)
        assert leaked(str(error)) == [], str(error)


def test_fhir_server_errors_mask_the_urls_credentials(tmp_path: Path) -> None:
    # A FHIR base URL takes no query (a token goes in auth_header): only userinfo here.
    base_url = f"http://u:HookUrlPassw0rd@127.0.0.1:{free_port()}/fhir"
    outgoing = Outgoing(b"{}", FHIR_CONTENT_TYPE, "1:fhir", {"operation": "create"})
    [error] = fhir_send(channel_for(base_url, tmp_path), outgoing)
    assert isinstance(error, DeliveryError)
    assert "u:***@127.0.0.1" in str(error)
    assert leaked(str(error)) == [], str(error)


def test_routes_check_masks_a_refused_url_and_a_store_url_password(tmp_path: Path) -> None:
    routes = (
        "routes:\n  - name: hooks\n    steps:\n      - forward: {channel: webhook, name: x, "
        "url: 'ftp://hookuser:HookUrlPassw0rd@127.0.0.1:1/hook?token=UrlQueryTok3n'}\n"
    )
    (tmp_path / "routes.yaml").write_text(routes, encoding="utf-8")
    config = tmp_path / "carehub.yaml"
    config.write_text("routes: [routes.yaml]\n", encoding="utf-8")
    args = ["routes", "check", "--config", str(config), "--data-dir", str(tmp_path / "data")]
    result = CliRunner().invoke(main, args, env=env_without_carehub())
    assert result.exit_code == 2
    assert "ftp://hookuser:***@127.0.0.1:1/hook?token=***" in result.output
    assert leaked(result.output) == []

    store_url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test?password=PgPassw0rd"
    config.write_text(f"routes: []\nstore: {{url: '{store_url}'}}\n", encoding="utf-8")
    result = CliRunner().invoke(main, args, env=env_without_carehub())
    assert result.exit_code == 2, result.output
    assert "?password=***" in result.output
    assert leaked(result.output) == []
