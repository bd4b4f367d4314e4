"""A `carehub worker --http-port`: its own /health (store and broker) and /metrics (what it
routed and sent), since in a scale-out deployment serve routes and sends nothing. Real
processes on a PostgreSQL schema and a RabbitMQ virtual host of their own (skipped, with how to
start the service, when either is not running)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from carehub.store.store import MessageStore
from carehub.testing import make_adt
from tests import test_rabbitmq
from tests.helpers_http import HTTPServer, wait_for
from tests.test_rabbitmq import delivered, fresh_queue, send_all
from tests.test_worker_misconfigured import Deployment, hub_yaml

amqp_url = test_rabbitmq.amqp_url
pg_url = test_rabbitmq.pg_url

WORKER_HTTP = re.compile(r"worker HTTP on ([\d.]+):(\d+)")


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus text exposition."""
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    assert found, f"{name} not in:\n{text}"
    return float(found.group(1))


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_answers_for_itself_on_health_and_metrics(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    fresh_queue(amqp_url, 1)
    with HTTPServer() as http:
        deployment = Deployment(tmp_path, http.url())
        shared = MessageStore(pg_url)
        try:
            config = hub_yaml(pg_url, amqp_url, 1).replace(
                "http: {enabled: false}", "http: {enabled: false, tokens: [w0rker-t0ken]}"
            )
            serve = deployment.start("serve", config, "serve", "--no-worker")
            serve.wait_ready()
            worker = deployment.start("worker", config, "worker", "--http-port", "0")
            worker.wait_ready()
            found = WORKER_HTTP.search(worker.stdout)
            assert found, worker.stdout
            base = f"http://{found.group(1)}:{found.group(2)}"

            send_all(
                serve.mllp_address, [make_adt(f"WH-{n}", patient_id=f"WH{n}") for n in range(3)]
            )
            wait_for(lambda: delivered(shared, 3), 30, what="three messages delivered")

            health = httpx.get(f"{base}/health", timeout=10)
            assert (health.status_code, health.json()) == (200, {"status": "ok"})
            token = {"Authorization": "Bearer w0rker-t0ken"}
            details = httpx.get(f"{base}/health", headers=token, timeout=10).json()
            assert (details["store"], details["queue"], details["delivered"]) == ("ok", "ok", 3)

            assert httpx.get(f"{base}/metrics", timeout=10).status_code == 401
            text = httpx.get(f"{base}/metrics", headers=token, timeout=10).text
            assert metric(text, "carehub_routed_messages_total") == 3
            assert metric(text, "carehub_deliveries_sent_total") == 3
            assert metric(text, "carehub_worker_broker_connected") == 1
            assert metric(text, "carehub_store_up") == 1
            assert 'carehub_deliveries{status="delivered"} 3.0' in text

            assert worker.terminate() == 0, worker.stderr
            assert serve.terminate() == 0, serve.stderr
        finally:
            shared.close()
            deployment.kill_all()
