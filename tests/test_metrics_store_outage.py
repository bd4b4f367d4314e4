"""/metrics while the PostgreSQL store has gone silent: serve's scrape and a worker's answer
within Prometheus' own scrape timeout, with carehub_store_up 0 and the store's gauges left
out, and the outage is logged once as it starts (a WARNING, no traceback) and once as it ends
(INFO), however many scrapes come meanwhile. A TCP relay between carehub and PostgreSQL makes
the silence: frozen, it keeps every connection open and passes nothing on. Skipped, with how
to start them, without PostgreSQL (and RabbitMQ, for the worker)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from carehub.hl7.ack import read_ack
from carehub.testing import make_adt, mllp_exchange
from tests import test_rabbitmq
from tests.helpers_http import CarehubProcess, wait_for
from tests.helpers_relay import Relay
from tests.test_cli import write
from tests.test_postgres_silent_connection import relay
from tests.test_rabbitmq import fresh_queue
from tests.test_store_restore_identity import database, database_url

amqp_url = test_rabbitmq.amqp_url
__all__ = ["amqp_url", "database", "relay"]  # fixtures, used by name

#: Prometheus' default scrape_timeout: a scrape not answered by then counts as the target down.
PROMETHEUS_TIMEOUT = 10.0
#: What the scrapes wait for the store to answer again, and a hub for its first message's ACK.
RECOVERY = 60.0

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([A-Z]+) (\S+): ", re.MULTILINE)
WORKER_HTTP = re.compile(r"worker HTTP on ([\d.]+):(\d+)")


@dataclass(frozen=True, slots=True)
class Record:
    level: str
    logger: str
    text: str  # with the lines that follow it (a traceback)


def records(stderr: str, logger: str) -> list[Record]:
    """The log records of ``logger`` in a process's stderr."""
    starts = list(LOG_LINE.finditer(stderr))
    found = []
    for here, after in zip(starts, [*starts[1:], None], strict=True):
        end = after.start() if after else len(stderr)
        if here.group(2) == logger:
            found.append(Record(here.group(1), logger, stderr[here.end() : end].strip()))
    return found


def scrape(base: str) -> str:
    """One scrape, given up on as Prometheus gives up on one."""
    response = httpx.get(f"{base}/metrics", timeout=PROMETHEUS_TIMEOUT)
    assert response.status_code == 200, response.text
    return response.text


def store_up(base: str) -> bool:
    return "carehub_store_up 1.0" in scrape(base)


def assert_answered_without_the_store(text: str) -> None:
    assert "carehub_store_up 0.0" in text
    assert "carehub_routing_backlog" not in text
    assert "carehub_deliveries{" not in text


def assert_outage_logged_once(stderr: str, *, ended: bool) -> None:
    lines = records(stderr, "carehub.metrics")
    expected = [("WARNING", "reading the store for /metrics failed (")]
    if ended:
        expected.append(("INFO", "reading the store for /metrics works again after "))
    assert len(lines) == len(expected), lines
    for record, (level, start) in zip(lines, expected, strict=True):
        assert (record.level, record.text.startswith(start)) == (level, True), record
    assert "Traceback" not in lines[0].text, lines[0].text


def serve_yaml(store_url: str) -> str:
    """serve on PostgreSQL with nothing to route (no worker): only intake and /metrics."""
    return f"""
store: {{url: "{store_url}"}}
listeners:
  mllp: [{{name: adt, host: 127.0.0.1, port: 0}}]
  http: {{enabled: true, host: 127.0.0.1, port: 0}}
worker: {{enabled: false}}
"""


def http_base(serve: CarehubProcess) -> str:
    [line] = [line for line in serve.stdout.splitlines() if line.startswith("HTTP listener")]
    return "http://" + line.rsplit(" on ", 1)[1]


@pytest.mark.postgres
@pytest.mark.slow
def test_serve_metrics_answer_without_the_store_while_it_is_silent(
    tmp_path: Path, database: str, relay: Relay
) -> None:
    config = write(tmp_path, "carehub.yaml", serve_yaml(database_url(database, relay.port)))
    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]
    with CarehubProcess(args, tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        base = http_base(serve)
        healthy = scrape(base)
        assert "carehub_store_up 1.0" in healthy and "carehub_routing_backlog 0.0" in healthy

        relay.freeze()  # the pooled connections stay open, and nothing comes back on them
        for _ in range(3):
            text = scrape(base)
            assert_answered_without_the_store(text)
            assert "carehub_store_writable 1.0" in text  # intake has not failed a write
            assert "carehub_store_commits_total" in text  # the hub's own counters are there
        assert_outage_logged_once(serve.stderr, ended=False)

        # Intake gives up on a commit: writable is decided by a test write, which gets no
        # answer either.
        [answer] = mllp_exchange(serve.mllp_address, [make_adt("QUIET-1").encode()], RECOVERY)
        code, _, detail = read_ack(answer.decode())
        assert (code, "not stored" in detail) == ("AE", True), detail
        text = scrape(base)
        assert_answered_without_the_store(text)
        assert "carehub_store_writable 0.0" in text

        relay.frozen.clear()
        wait_for(lambda: store_up(base), RECOVERY, what="carehub_store_up 1 again")
        assert_outage_logged_once(serve.stderr, ended=True)
        assert serve.terminate() == 0, serve.stderr


@pytest.mark.postgres
@pytest.mark.slow
def test_a_worker_metrics_answer_without_the_store_while_it_is_silent(
    tmp_path: Path, database: str, relay: Relay, amqp_url: str
) -> None:
    fresh_queue(amqp_url, 1)
    config = write(
        tmp_path,
        "worker.yaml",
        f'store: {{url: "{database_url(database, relay.port)}"}}\n'
        f'queue: {{url: "{amqp_url}", partitions: 1}}\n',
    )
    args = ["worker", "--config", str(config), "--data-dir", str(tmp_path / "data")]
    with CarehubProcess([*args, "--http-port", "0"], tmp_path / "logs", "worker") as worker:
        worker.wait_ready()
        found = WORKER_HTTP.search(worker.stdout)
        assert found, worker.stdout
        base = f"http://{found.group(1)}:{found.group(2)}"
        assert store_up(base)

        relay.freeze()
        for _ in range(3):
            text = scrape(base)
            assert_answered_without_the_store(text)
            assert "carehub_worker_broker_connected 1.0" in text
        assert_outage_logged_once(worker.stderr, ended=False)

        relay.frozen.clear()
        wait_for(lambda: store_up(base), RECOVERY, what="carehub_store_up 1 again")
        assert_outage_logged_once(worker.stderr, ended=True)
        assert worker.terminate() == 0, worker.stderr
