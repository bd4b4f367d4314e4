"""The pager channel says nothing of a credential in its gateway URL (``?api_key=``, a
``user:password@``) in the log, in `carehub pager-status`, or in its option errors, and warns
at start when pages go in clear to a port any local account may bind."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from carehub.cli import main
from carehub.testing import HubThread, local_config, mllp_exchange
from click.testing import CliRunner

if TYPE_CHECKING:
    from conftest import PageGateway


def unprivileged_port_start() -> int:
    """The lowest port any account may bind here: Linux's setting, else 1024 as on the BSDs;
    macOS and Windows reserve none."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip())
    except (OSError, ValueError):
        return 0 if sys.platform in ("darwin", "win32") else 1024


HERE = Path(__file__).resolve().parent
CONFIG = HERE / "config" / "carehub.yaml"
ADMIT = HERE / "messages" / "admit-ward.hl7"
SECRETS = ("GwPassw0rd", "PagerApiKey1", "PagerAuthTok2")


def leaked(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def test_a_refused_page_shows_no_credential_from_the_gateway_url(
    tmp_path: Path,
    gateway: PageGateway,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    host, port = gateway.server.server_address[:2]
    url = (
        f"http://pager:GwPassw0rd@{host}:{port}/page?api_key=PagerApiKey1&auth_token=PagerAuthTok2"
    )
    monkeypatch.setenv("PAGER_URL", url)
    gateway.answers = [400]
    config = local_config(worker=True, routes=["routes/*.yaml"], source=CONFIG)
    with (
        caplog.at_level(logging.INFO, logger="carehub"),
        HubThread(config, tmp_path / "data") as hub,
    ):
        mllp_exchange(hub.mllp_address, [ADMIT.read_bytes()])
        (dead,) = hub.wait_for_deliveries(1)
        assert dead.status == "dead"
    assert gateway.received[0].path == "/page?api_key=PagerApiKey1&auth_token=PagerAuthTok2"

    (line,) = [r.getMessage() for r in caplog.records if "dead letter" in r.getMessage()]
    assert line.endswith(
        f"POST http://pager:***@{host}:{port}/page?api_key=***&auth_token=***: HTTP 400"
    )
    assert leaked(caplog.text) == [], caplog.text
    if port >= unprivileged_port_start():
        (warning,) = [r.getMessage() for r in caplog.records if "in clear" in r.getMessage()]
        assert f"sends patient data to http://{host}:{port} in clear" in warning
        assert "any local user who binds port" in warning

    result = CliRunner().invoke(main, ["pager-status", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    assert "api_key=***&auth_token=***: HTTP 400" in result.output
    assert leaked(result.output) == [], result.output


def test_a_bad_gateway_url_is_refused_without_quoting_its_credentials(tmp_path: Path) -> None:
    """`routes check` names the option and shows the URL it refuses, its credentials masked."""
    (tmp_path / "routes").mkdir()
    (tmp_path / "routes" / "page.yaml").write_text(
        "routes:\n"
        "  - name: page\n"
        "    steps:\n"
        "      - forward: {channel: pager, "
        "url: 'ftp://u:GwPassw0rd@pager.example.org/p?auth_token=PagerAuthTok2'}\n",
        encoding="utf-8",
    )
    (tmp_path / "carehub.yaml").write_text("routes: [routes/*.yaml]\n", encoding="utf-8")
    args = ["routes", "check", "--offline", "--config", str(tmp_path / "carehub.yaml")]
    result = CliRunner().invoke(main, [*args, "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 2, result.output
    assert "forward.url: " in result.output
    assert "'ftp://u:***@pager.example.org/p?auth_token=***'" in result.output
    assert leaked(result.output) == [], result.output
