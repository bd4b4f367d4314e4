"""A worker that loses its database for a while, in the scale-out layout: `carehub serve
--no-worker` on PostgreSQL, a `carehub worker` process that reaches the same database through
a TCP relay the test cuts and restores, RabbitMQ between them. What serve stored meanwhile is
routed once the database is back, without a restart and without waiting for the
once-a-minute sweep, and each patient's messages reach the destination in the order they
came. Skipped, with how to start them, without PostgreSQL or RabbitMQ."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from carehub.store.store import MessageStore
from carehub.testing import make_adt
from tests import test_rabbitmq
from tests.helpers_http import CarehubProcess, HTTPServer, wait_for
from tests.test_broker_outage import Relay
from tests.test_rabbitmq import arrivals, delivered, fresh_queue, routes_yaml, send_all

amqp_url, pg_url = test_rabbitmq.amqp_url, test_rabbitmq.pg_url

#: Well under the sweep's minute, which would otherwise route what the worker gave up on.
RECOVERY_SECONDS = 25


def hub_yaml(store_url: str, queue_url: str) -> str:
    return f"""
store: {{url: "{store_url}"}}
queue: {{url: "{queue_url}", partitions: 1}}
listeners:
  mllp: [{{name: adt, host: 127.0.0.1, port: 0}}]
  http: {{enabled: false}}
worker: {{poll_interval: 0.05}}
routes: [routes.yaml]
"""


@pytest.mark.postgres
def test_what_serve_stored_while_the_worker_lost_the_database_is_routed_in_order(
    tmp_path: Path, amqp_url: str, pg_url: str
) -> None:
    fresh_queue(amqp_url, 1)
    database = urlsplit(pg_url.replace("postgresql+psycopg", "postgresql"))
    relay = Relay((database.hostname or "127.0.0.1", database.port or 5432))
    relay.start()
    relayed_url = pg_url.replace(f":{database.port}/", f":{relay.port}/")
    with HTTPServer() as http:
        (tmp_path / "routes.yaml").write_text(routes_yaml(http.url()))
        serve_config = tmp_path / "serve.yaml"
        serve_config.write_text(hub_yaml(pg_url, amqp_url))
        worker_config = tmp_path / "worker.yaml"
        worker_config.write_text(hub_yaml(relayed_url, amqp_url))
        logs = tmp_path / "logs"
        data = ["--data-dir", str(tmp_path / "data")]
        serve_args = ["serve", "--config", str(serve_config), *data, "--no-worker"]
        store = MessageStore(pg_url)
        try:
            with CarehubProcess([*serve_args, "--mllp-port", "0"], logs, "serve") as serve:
                serve.wait_ready()
                worker_args = ["worker", "--config", str(worker_config), *data]
                with CarehubProcess(worker_args, logs, "worker") as worker:
                    worker.wait_ready()
                    send_all(serve.mllp_address, [make_adt("SO-1", "A01", patient_id="P1")])
                    wait_for(lambda: delivered(store, 1), 30, what="the first delivered")

                    relay.cut()  # the worker's database is gone; serve's is not
                    during = [
                        make_adt("SO-2", "A03", patient_id="P1"),
                        make_adt("SO-3", "A01", patient_id="P2"),
                    ]
                    send_all(serve.mllp_address, during)
                    wait_for(
                        lambda: "the worker's use of the store failed" in worker.stderr,
                        20,
                        what="the worker to meet the outage",
                    )
                    relay.start()
                    send_all(serve.mllp_address, [make_adt("SO-4", "A01", patient_id="P1")])
                    wait_for(
                        lambda: delivered(store, 4),
                        RECOVERY_SECONDS,
                        what="what was stored during the outage routed and delivered",
                    )
                    assert "the worker's use of the store works again" in worker.stderr
                    assert worker.terminate() == 0, worker.stderr
                    # A clean stop says so, so that it is told apart from a crash.
                    said = worker.stderr
                    assert "carehub worker stopping" in said
                    assert said.rstrip().endswith("carehub worker stopped"), said[-500:]
                assert serve.terminate() == 0, serve.stderr
        finally:
            store.close()
            relay.cut()
    assert arrivals(http) == {"P1": ["SO-1", "SO-2", "SO-4"], "P2": ["SO-3"]}
    assert len(http.requests) == 4
