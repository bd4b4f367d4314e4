"""A PostgreSQL server that goes silent: the connections stay open and nothing comes back (a
proxy or load balancer whose server is gone, a hung server). TCP keepalives cannot tell that
from a slow query, since whatever holds the connections still acknowledges packets. Intake
answers "not stored, please resend" within group_commit.COMMIT_PATIENCE and logs it, /health
says the store is unavailable, `carehub serve` stops when told, and all of it recovers once the
server answers again. A TCP relay between carehub and PostgreSQL makes the silence: frozen,
it keeps every connection open and passes nothing on, either way. `serve` runs as in a
scale-out deployment (--no-worker, RabbitMQ); skipped, with how to start them, without
PostgreSQL or RabbitMQ.

Also here: how a store URL that SQLAlchemy cannot read is answered (postgres://)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from carehub.hl7.ack import read_ack
from carehub.store import group_commit
from carehub.store.group_commit import StoreUnavailable, ThreadedGroupCommit
from carehub.store.store import (
    PG_CONNECTION_BOUNDS,
    PG_SERVER_BOUNDS,
    PROBE_PATIENCE,
    MessageStore,
)
from carehub.testing import make_adt, mllp_exchange
from tests import test_rabbitmq
from tests.helpers_http import CarehubProcess, wait_for
from tests.helpers_relay import Relay
from tests.test_cli import run, write
from tests.test_store import PG_HOST, PG_PORT, new_message
from tests.test_store_restore_identity import database, database_url

amqp_url = test_rabbitmq.amqp_url
__all__ = ["amqp_url", "database"]  # fixtures, used by name

#: What a host running the suite may add to a bound before the answer counts as late.
SLACK = 8.0


@pytest.fixture
def relay() -> Iterator[Relay]:
    """A relay to PostgreSQL, passing bytes until frozen."""
    relayed = Relay((PG_HOST, PG_PORT))
    relayed.start()
    try:
        yield relayed
    finally:
        relayed.frozen.clear()
        relayed.close()


def answer_to(address: tuple[str, int], control_id: str, timeout: float) -> tuple[str, str]:
    """The ACK code and text a hub gives one ADT, over MLLP."""
    [answer] = mllp_exchange(address, [make_adt(control_id).encode()], timeout)
    code, _, detail = read_ack(answer.decode())
    return code, detail


def serve_yaml(store_url: str, queue_url: str) -> str:
    """`carehub serve --no-worker` of a scale-out deployment: workers consume the broker."""
    return f"""
store: {{url: "{store_url}"}}
queue: {{url: "{queue_url}"}}
listeners:
  mllp: [{{name: adt, host: 127.0.0.1, port: 0}}]
  http: {{enabled: true, host: 127.0.0.1, port: 0}}
"""


def http_url(serve: CarehubProcess) -> str:
    [line] = [line for line in serve.stdout.splitlines() if line.startswith("HTTP listener")]
    return "http://" + line.rsplit(" on ", 1)[1]


def health(serve: CarehubProcess) -> httpx.Response:
    return httpx.get(http_url(serve) + "/health", timeout=PROBE_PATIENCE + SLACK)


def serve_through(relay: Relay, tmp_path: Path, database: str, amqp_url: str) -> CarehubProcess:
    """`carehub serve --no-worker` on ``database``, reached through ``relay``."""
    store_url = database_url(database, relay.port)
    config = write(tmp_path, "carehub.yaml", serve_yaml(store_url, amqp_url))
    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data"), "--no-worker"]
    return CarehubProcess(args, tmp_path / "logs", "serve")


@pytest.mark.postgres
def test_serve_answers_not_stored_while_the_database_is_silent_and_recovers(
    tmp_path: Path, database: str, relay: Relay, amqp_url: str
) -> None:
    with serve_through(relay, tmp_path, database, amqp_url) as serve:
        serve.wait_ready()
        assert answer_to(serve.mllp_address, "SILENT-1", 10)[0] == "AA"

        relay.freeze()
        started = time.monotonic()
        idle = health(serve)  # nothing in flight: the health check itself must not hang
        assert idle.status_code == 503, idle.text
        assert time.monotonic() - started < PROBE_PATIENCE + SLACK

        started = time.monotonic()
        code, detail = answer_to(serve.mllp_address, "SILENT-2", 120)
        waited = time.monotonic() - started
        assert (code, "not stored" in detail) == ("AE", True), detail
        assert waited < group_commit.COMMIT_PATIENCE + SLACK, waited
        assert "store write failed (the store has not answered a commit for " in serve.stderr
        assert "SILENT-2" not in serve.stderr
        during = health(serve)
        assert during.status_code == 503, during.text
        # /metrics also reads the store: each read waits up to the connect timeout
        metrics = httpx.get(http_url(serve) + "/metrics", timeout=60).text
        assert "carehub_store_writable 0.0" in metrics

        relay.frozen.clear()  # the server answers again
        wait_for(lambda: health(serve).status_code == 200, 30, what="/health 200 again")
        assert answer_to(serve.mllp_address, "SILENT-2", 30)[0] == "AA"  # the sender resends
        assert answer_to(serve.mllp_address, "SILENT-3", 30)[0] == "AA"
        assert "store write works again after " in serve.stderr
        assert serve.terminate() == 0, serve.stderr

    store = MessageStore(database_url(database))
    try:
        assert store.control_id_counts() == {"SILENT-1": 1, "SILENT-2": 1, "SILENT-3": 1}
    finally:
        store.close()


@pytest.mark.postgres
def test_serve_stops_when_told_while_a_commit_gets_no_answer(
    tmp_path: Path, database: str, relay: Relay, amqp_url: str
) -> None:
    with serve_through(relay, tmp_path, database, amqp_url) as serve:
        serve.wait_ready()
        assert answer_to(serve.mllp_address, "STOP-1", 10)[0] == "AA"
        relay.freeze()
        answers: list[tuple[str, str] | BaseException] = []

        def send() -> None:
            try:
                answers.append(answer_to(serve.mllp_address, "STOP-2", 120))
            except BaseException as err:  # the hub may close the connection unanswered
                answers.append(err)

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(1)  # STOP-2 is in a commit that gets no answer
        started = time.monotonic()
        assert serve.terminate(timeout=60) == 0, serve.stderr
        stopped_in = time.monotonic() - started
        sender.join(30)
    assert stopped_in < group_commit.COMMIT_PATIENCE + 20, stopped_in
    [answer] = answers
    assert not isinstance(answer, tuple) or answer[0] == "AE", answer


@pytest.mark.postgres
def test_a_commit_with_no_answer_is_given_up_on_and_the_writer_recovers(
    database: str, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group-commit writer on its own, with a patience short enough for a quick test."""
    monkeypatch.setattr(group_commit, "COMMIT_PATIENCE", 2.0)
    store = MessageStore(database_url(database, relay.port))
    store.migrate()
    writer = ThreadedGroupCommit(store)

    async def scenario() -> None:
        writer.start()
        try:
            await writer.submit(new_message("GIVEN-1"))
            relay.freeze()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="has not answered a commit for 2 s"):
                await asyncio.wait_for(writer.submit(new_message("GIVEN-2")), 30)
            assert time.monotonic() - started < 2.0 + SLACK
            assert writer.failing
            assert not await asyncio.to_thread(writer.writable)

            relay.frozen.clear()
            outcome = await asyncio.wait_for(writer.submit(new_message("GIVEN-3")), 30)
            assert not outcome.duplicate
            assert not writer.failing and await asyncio.to_thread(writer.writable)
        finally:
            await asyncio.wait_for(writer.close(), 30)

    try:
        asyncio.run(scenario())
        assert store.control_id_counts() == {"GIVEN-1": 1, "GIVEN-3": 1}
    finally:
        store.close()


@pytest.mark.postgres
def test_connecting_to_a_server_that_never_answers_fails_within_the_connect_timeout(
    database: str, relay: Relay
) -> None:
    relay.freeze()  # new connections are taken, and their first bytes never passed on
    store = MessageStore(database_url(database, relay.port))
    outcome: list[BaseException | str | None] = []

    def connect() -> None:
        try:
            outcome.append(store.schema_revision())
        except BaseException as err:
            outcome.append(err)

    started = time.monotonic()
    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(PG_CONNECTION_BOUNDS["connect_timeout"] + SLACK)
    assert outcome, "still connecting"
    assert isinstance(outcome[0], Exception) and "timeout" in str(outcome[0]).lower()
    assert time.monotonic() - started < PG_CONNECTION_BOUNDS["connect_timeout"] + SLACK
    relay.frozen.clear()
    store.close()


@pytest.mark.postgres
def test_the_server_is_asked_to_give_up_on_a_lost_client_as_quickly(database: str) -> None:
    """A transaction whose client is gone must not hold what it wrote for the server's default
    two hours: a resend of its message would wait on it."""
    store = MessageStore(database_url(database))
    try:
        with store.engine.connect() as conn:
            settings = {
                name: conn.exec_driver_sql(f"SHOW {name}").scalar() for name in PG_SERVER_BOUNDS
            }
    finally:
        store.close()
    assert settings == {name: str(value) for name, value in PG_SERVER_BOUNDS.items()}


def test_a_postgres_url_is_answered_with_how_to_write_it(tmp_path: Path) -> None:
    config = write(tmp_path, "hub.yaml", "store:\n  url: postgres://carehub@db/carehub\n")
    result = run("messages", "list", "--config", str(config))
    assert result.exit_code == 2, result.output
    assert "store.url: cannot open the store at postgres://carehub@db/carehub" in result.stderr
    assert "postgresql+psycopg://" in result.stderr
    assert "Traceback" not in result.output
