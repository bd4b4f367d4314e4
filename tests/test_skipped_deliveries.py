"""A channel that finds nothing to send raises NothingToSend: the delivery is settled as
``skipped`` with the reason, never counted as delivered or accepted, never retried, and the
patient's later deliveries go on. Migration 0016 turns the older "not sent: ..." deliveries
into skipped ones, and back on a downgrade."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy import select, update

from carehub.store.outbox import AttemptResult, Outbox
from carehub.store.schema import deliveries, messages
from carehub.store.store import MIGRATIONS, MessageStore
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange
from tests import test_store
from tests.helpers_http import wait_for
from tests.test_dead_letter_order import LEASE, _messages, _plan
from tests.test_plugin_authoring import project

store_url = test_store.store_url

#: Skips every message whose MSH-10 says SKIP, sends the others.
SKIPPING_PLUGIN = """
from carehub import hookimpl
from carehub.components import Channel, NothingToSend, Outgoing


class Skipping(Channel):
    name = "skipping"
    sent = []

    def render(self, work, key):
        return Outgoing(work.v2.encode(), "x-application/hl7-v2+er7", key)

    async def send(self, outgoing):
        if b"SKIP" in outgoing.payload:
            raise NothingToSend("the receiver has this visit already")
        Skipping.sent.append(outgoing.idempotency_key)
        return "AA"


@hookimpl
def carehub_register_channels(register):
    register(Skipping)
"""


def test_a_delivery_with_nothing_to_send_is_skipped_and_the_line_goes_on(tmp_path: Path) -> None:
    routes = """
        routes:
          - name: ehr
            steps:
              - forward: {channel: skipping, name: ehr, retry: {max_attempts: 3}}
    """
    config = project(tmp_path / "config", routes, {"skipping": SKIPPING_PLUGIN})
    hub_config = local_config(
        worker=True, routes=["routes/*.yaml"], source=config, plugins_dir=Path("plugins")
    )
    frames = [
        make_adt(control_id, patient_id="P-SK1").encode()
        for control_id in ("SKIP-1", "SEND-2", "SKIP-3")
    ]
    with HubThread(hub_config, tmp_path / "data") as hub:
        answers = mllp_exchange(hub.mllp_address, frames)
        assert all(b"MSA|AA|" in a for a in answers)
        outbox = Outbox(hub.store)
        settled = wait_for(
            lambda: (
                found
                if len(found := outbox.find(destination="ehr/ehr")) == 3
                and all(d.status in ("delivered", "skipped") for d in found)
                else None
            ),
            what="three settled deliveries",
        )
        listener = hub.hub.http_listener
        assert listener is not None and listener.address is not None
        host, port = listener.address
        metrics = httpx.get(f"http://{host}:{port}/metrics", timeout=10).text
        worker = hub.hub.worker
        assert worker is not None
        counted = (worker.delivered, worker.skipped)
        with hub.store.engine.connect() as conn:
            message_rows = conn.execute(
                select(messages.c.control_id, messages.c.status, messages.c.detail).order_by(
                    messages.c.id
                )
            ).all()
    assert [d.status for d in settled] == ["skipped", "delivered", "skipped"]
    skipped = settled[0]
    assert skipped.receipt == "the receiver has this visit already"
    assert skipped.last_error is None and skipped.accepted_at is None
    assert skipped.attempts == 1  # not retried
    assert settled[1].receipt == "AA" and settled[1].accepted_at is not None
    assert counted == (1, 2)
    assert 'carehub_deliveries{status="skipped"} 2.0' in metrics
    assert 'carehub_deliveries{status="delivered"} 1.0' in metrics
    assert "carehub_deliveries_sent_total 1.0" in metrics
    assert "carehub_deliveries_skipped_total 2.0" in metrics
    by_control_id = {row.control_id: (row.status, row.detail) for row in message_rows}
    assert by_control_id["SKIP-1"] == ("delivered", "1 of 1 had nothing to send")
    assert by_control_id["SEND-2"] == ("delivered", None)


def _alembic(store: MessageStore, revision: str, *, down: bool) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (alembic_command.downgrade if down else alembic_command.upgrade)(cfg, revision)


def test_migration_0016_turns_not_sent_deliveries_into_skipped_ones_and_back(
    store_url: str,
) -> None:
    store = MessageStore(store_url)
    try:
        store.migrate()
        outbox = Outbox(store)
        not_sent, sent = _messages(store, 2)
        _plan(outbox, not_sent, "P1")
        _plan(outbox, sent, "P2")
        claimed = outbox.claim_due(10, LEASE)
        now = datetime.now(UTC)
        outbox.finish(
            [AttemptResult(d.id, d.message_id, 1, now, 2, True, "HTTP 200", None) for d in claimed]
        )
        _alembic(store, "0015", down=True)
        # What the older release wrote for a delivery with nothing to send.
        with store.engine.begin() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.message_id == not_sent)
                .values(receipt="not sent: a resend of the same referral")
            )
        _alembic(store, "head", down=False)  # 0016, and the later ones find() reads
        by_message = {d.message_id: d for d in outbox.find()}
        assert by_message[not_sent].status == "skipped"
        assert by_message[not_sent].receipt == "a resend of the same referral"
        assert by_message[not_sent].accepted_at is None
        assert (by_message[sent].status, by_message[sent].receipt) == ("delivered", "HTTP 200")
        assert [d.message_id for d in outbox.find(status="skipped")] == [not_sent]

        _alembic(store, "0015", down=True)
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(deliveries.c.message_id, deliveries.c.status, deliveries.c.receipt)
            ).all()
        assert {row.message_id: (row.status, row.receipt) for row in rows} == {
            not_sent: ("delivered", "not sent: a resend of the same referral"),
            sent: ("delivered", "HTTP 200"),
        }
        store.migrate()
    finally:
        store.close()
