"""`carehub worker --http-host 0.0.0.0 --http-port N` warns as serve does for an HTTP port
beyond loopback: without tokens anyone who reaches it reads /health's details and /metrics,
and with tokens (it has no TLS) they cross the network in clear. Its refused requests are
counted in its own /metrics. Real worker processes on a PostgreSQL schema and a RabbitMQ
virtual host of their own (skipped, with how to start the service, when either is not
running)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests import test_rabbitmq
from tests.test_rabbitmq import fresh_queue
from tests.test_worker_misconfigured import Deployment, hub_yaml

amqp_url = test_rabbitmq.amqp_url
pg_url = test_rabbitmq.pg_url

WORKER_HTTP = re.compile(r"worker HTTP on ([\d.]+):(\d+)")
TOKEN = "worker-scrape-token-0123456789"
OPEN = "serves its /health details and /metrics to anyone who can reach it"


def port_of(stdout: str) -> int:
    found = WORKER_HTTP.search(stdout)
    assert found, stdout
    return int(found.group(2))


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_on_the_network_says_who_can_read_its_http_port(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    fresh_queue(amqp_url, 1)
    deployment = Deployment(tmp_path, "http://127.0.0.1:9/unused")
    wide = ("worker", "--http-host", "0.0.0.0", "--http-port", "0")
    try:
        open_worker = deployment.start("open", hub_yaml(pg_url, amqp_url, 1), *wide)
        open_worker.wait_ready()
        assert f"worker HTTP on 0.0.0.0 {OPEN}" in open_worker.stderr, open_worker.stderr
        assert "set listeners.http.tokens (or CAREHUB_HTTP_TOKENS)" in open_worker.stderr
        port = port_of(open_worker.stdout)
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200

        with_tokens = hub_yaml(pg_url, amqp_url, 1).replace(
            "http: {enabled: false}", f"http: {{enabled: false, tokens: [{TOKEN}]}}"
        )
        guarded = deployment.start("guarded", with_tokens, *wide)
        guarded.wait_ready()
        port = port_of(guarded.stdout)
        wrong = {"Authorization": "Bearer not-the-token-at-all"}
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", headers=wrong).status_code == 401
        token = {"Authorization": f"Bearer {TOKEN}"}
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=token, timeout=10).text
        assert 'carehub_http_auth_failures_total{endpoint="/metrics"} 1.0' in text

        local = deployment.start(
            "local", hub_yaml(pg_url, amqp_url, 1), "worker", "--http-port", "0"
        )
        local.wait_ready()
        for worker in (open_worker, guarded, local):
            assert worker.terminate() == 0, worker.stderr
    finally:
        deployment.kill_all()
    assert OPEN not in guarded.stderr, guarded.stderr
    assert "worker HTTP on 0.0.0.0 has no TLS: its bearer tokens cross" in guarded.stderr
    assert "refused a request to /metrics from 127.0.0.1:" in guarded.stderr
    assert TOKEN not in guarded.stderr
    assert OPEN not in local.stderr and "has no TLS" not in local.stderr, local.stderr
