"""`carehub status` (the terminal view and --json, which monitoring reads) shows of a
destination's last error only what the log shows: the channel's own account of the failure,
never what the destination answered, which can quote the message. The whole text stays in the
views of one message (`messages show`, `dead-letters list`). Driven through a real hub, a real
HTTP destination that quotes the request it refuses, and the real `carehub` commands."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from carehub.cli import main
from carehub.store.schema import deliveries
from carehub.store.store import MessageStore
from carehub.testing import HubThread, make_adt, mllp_exchange
from tests.helpers_http import wait_for
from tests.test_cli import env_without_carehub, plain
from tests.test_routing_e2e import FAST_RETRY, routed_config

PATIENT = "BRIGHTWATER^HOLLIS"
ROUTES = """
routes:
  - name: events
    when: {{type: ADT}}
    steps:
      - translate: v2-to-event
      - forward: {{channel: webhook, name: gateway, url: {refusing}, retry: {once}}}
      - forward: {{channel: webhook, name: flaky, url: {failing}, retry: {slow}}}
"""
#: Retries far apart, so the flaky destination's delivery waits (retrying) while status reads.
SLOW = "{max_attempts: 20, initial_delay: 600, multiplier: 1, max_delay: 600, jitter: 0}"


class QuotingGateway(BaseHTTPRequestHandler):
    """Refuses every POST quoting the request, as some SMS gateways and APIs do: 400 for
    the gateway's path, 503 (tried again) for any other."""

    def do_POST(self) -> None:  # the stdlib handler's name for a POST
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        status = 400 if self.path == "/gateway" else 503
        quoted = {"patient": body["event"]["patient"]["name"], "kind": body["event"]["kind"]}
        answer = f"error processing {json.dumps(quoted)}".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        """Quiet: the test reads what carehub says, not the server's access log."""


@pytest.fixture
def gateway() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), QuotingGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), env=env_without_carehub())
    assert result.exit_code == 0, result.output
    return plain(result.output)


def status_report(data_dir: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(cli("status", "--data-dir", str(data_dir), "--json"))
    return report


def last_errors(data_dir: Path) -> dict[str, str | None]:
    return {d["destination"]: d["last_error"] for d in status_report(data_dir)["destinations"]}


def run_hub(tmp_path: Path, gateway: str) -> tuple[Path, int]:
    """A hub whose one message the gateway refuses for good (a dead letter) and the flaky
    destination fails and waits to retry; returns the data dir and the message's id."""
    routes = ROUTES.format(
        refusing=f"{gateway}/gateway", failing=f"{gateway}/flaky", once=FAST_RETRY % 1, slow=SLOW
    )
    config = routed_config(tmp_path, routes)
    data_dir = tmp_path / "data"
    with HubThread(config, data_dir) as hub:
        mllp_exchange(hub.mllp_address, [make_adt("PHI-1", name=PATIENT).encode()])

        def both_failed() -> bool:
            errors = last_errors(data_dir)
            return all(errors.get(f"events/{name}") for name in ("gateway", "flaky"))

        wait_for(both_failed, what="both destinations failed once")
        [message] = hub.store.find()
    return data_dir, message.id


def test_status_shows_the_channels_account_not_what_the_destination_answered(
    tmp_path: Path, gateway: str
) -> None:
    data_dir, message_id = run_hub(tmp_path, gateway)

    errors = last_errors(data_dir)
    assert errors["events/gateway"] == f"POST {gateway}/gateway: HTTP 400"  # a dead letter
    assert errors["events/flaky"] == f"POST {gateway}/flaky: HTTP 503"  # waiting to retry
    terminal = cli("status", "--data-dir", str(data_dir))
    for output in (json.dumps(status_report(data_dir)), terminal):
        assert "BRIGHTWATER" not in output and "error processing" not in output, output
    assert "HTTP 400" in terminal

    # The operator's views of one message keep the destination's whole answer.
    shown = cli("messages", "show", str(message_id), "--data-dir", str(data_dir))
    dead = cli("dead-letters", "list", "--data-dir", str(data_dir), "--json")
    for output in (shown, dead):
        assert "error processing" in output and "BRIGHTWATER" in output


def test_errors_stored_before_the_loggable_part_was_kept_are_shown_as_the_log_would(
    tmp_path: Path, gateway: str
) -> None:
    data_dir, _ = run_hub(tmp_path, gateway)
    store = MessageStore(f"sqlite:///{data_dir / 'carehub.db'}")
    try:
        with store.engine.begin() as conn:
            conn.execute(update(deliveries).values(last_error_loggable=None))
    finally:
        store.close()

    errors = last_errors(data_dir)
    # The words before the first ': ', as the log takes them from an error that does not
    # say where the destination's answer begins.
    assert errors["events/gateway"] == f"POST {gateway}/gateway"
    assert errors["events/flaky"] == f"POST {gateway}/flaky"
    assert "BRIGHTWATER" not in json.dumps(status_report(data_dir))
