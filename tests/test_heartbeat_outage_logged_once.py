"""A process's heartbeat while its PostgreSQL store is away (a real database behind a TCP relay
the test cuts): one WARNING when the beats start failing, with the driver's first line and no
SQLAlchemy boilerplate, none per beat, and one when they work again. Skipped, with how to
start it, without PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import pytest

from carehub.store.processes import ProcessBeacon
from carehub.store.store import MessageStore
from tests import test_rabbitmq
from tests.helpers_relay import Relay

pg_url = test_rabbitmq.pg_url
BEAT = 0.05  # seconds between beats: dozens fail while the relay is cut


@pytest.mark.postgres
def test_a_store_outage_is_one_warning_from_the_heartbeat(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    made = MessageStore(pg_url)
    made.migrate()  # the schema, made through the real database
    made.close()
    database = urlsplit(pg_url.replace("postgresql+psycopg", "postgresql"))
    relay = Relay((database.hostname or "127.0.0.1", database.port or 5432))
    relay.start()
    store = MessageStore(pg_url.replace(f":{database.port}/", f":{relay.port}/"))

    async def outage() -> None:
        beacon = ProcessBeacon(store, "serve", lambda: "routes")
        await beacon.start(every=BEAT)
        await asyncio.sleep(5 * BEAT)
        relay.cut()
        store.hang_up()  # the pool's connections went with the relay
        await asyncio.sleep(40 * BEAT)
        relay.start()
        await asyncio.sleep(20 * BEAT)
        await beacon.stop()

    try:
        with caplog.at_level(logging.WARNING, logger="carehub.store.processes"):
            asyncio.run(outage())
    finally:
        store.close()
        relay.cut()
    said = [r.getMessage() for r in caplog.records if r.name == "carehub.store.processes"]
    failed = [line for line in said if "alive failed" in line]
    assert len(failed) == 1, said
    assert "Background on this error" not in failed[0] and "\n" not in failed[0]
    assert [line for line in said if "alive works again" in line], said
    assert len(said) == 2, said
