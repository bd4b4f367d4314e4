"""Every store has its own random identity, made with its schema and kept for its life: what a
store sends under its message ids (idempotency keys, FHIR message ids) takes it in, since
message ids start at 1 in every store. A store made before it existed gets one on upgrade."""

from __future__ import annotations

import uuid
from pathlib import Path

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig

from carehub.routing.router import idempotency_key
from carehub.store.store import MIGRATIONS, MessageStore, sqlite_url
from tests import test_store

store_url = test_store.store_url


def test_a_store_keeps_one_identity_of_its_own(store_url: str, tmp_path: Path) -> None:
    store = MessageStore(store_url)
    try:
        store.migrate()
        first = store.instance_id
        assert uuid.UUID(first)
    finally:
        store.close()
    reopened = MessageStore(store_url)
    try:
        reopened.migrate()
        assert reopened.instance_id == first
    finally:
        reopened.close()
    other = MessageStore(sqlite_url(tmp_path / "other"))
    try:
        other.migrate()
        assert other.instance_id != first
    finally:
        other.close()


def test_a_store_from_before_gets_its_identity_on_upgrade(store_url: str) -> None:
    store = MessageStore(store_url)
    try:
        store.migrate()
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            alembic_command.downgrade(cfg, "0014")
        store.migrate()
        assert uuid.UUID(store.instance_id)
    finally:
        store.close()


def test_keys_of_one_message_differ_between_stores() -> None:
    one, two = str(uuid.uuid4()), str(uuid.uuid4())
    assert idempotency_key(1, 1, "care/platform", one) != idempotency_key(
        1, 1, "care/platform", two
    )
    assert idempotency_key(1, 1, "care/platform", one) == idempotency_key(
        1, 1, "care/platform", one
    )
    assert idempotency_key(1, 1, "care/platform", one).startswith("carehub-1-1-")


def test_keys_made_from_row_ids_end_with_the_store(tmp_path: Path) -> None:
    """Overdue alerts, digests and referral answers are keyed by carehub's own row ids (the
    email's Message-ID is made from the key): two hubs must not give two patients' alerts to
    one coordinator under one key."""
    from carehub.components import ComponentContext
    from carehub.routing.router import key_of_this_store

    keys = []
    for name in ("one", "two"):
        store = MessageStore(sqlite_url(tmp_path / name))
        try:
            store.migrate()
            context = ComponentContext(config_dir=tmp_path, data_dir=tmp_path / name, store=store)
            keys.append(key_of_this_store("carehub-overdue-1-cc-lmc-01", context))
            assert keys[-1].endswith("-" + store.instance_id[:8])
        finally:
            store.close()
    assert keys[0] != keys[1]
    dry_run = ComponentContext(config_dir=tmp_path, data_dir=tmp_path)
    assert (
        key_of_this_store("carehub-overdue-1-cc-lmc-01", dry_run) == "carehub-overdue-1-cc-lmc-01"
    )
