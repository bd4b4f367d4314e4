"""Retention's rules for care records the sample feeds do not reach: merge chains, a merge
whose retired identifier a kept message still carries, notifications held for a digest and
notifications without a visit; against SQLite and PostgreSQL, through MessageStore.prune."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select

from carehub.store.schema import encounters, notifications, patient_merges
from carehub.store.store import MessageStore
from tests.test_store import new_message, store, store_url

__all__ = ["store", "store_url"]  # the SQLite / PostgreSQL fixtures, shared with test_store

OLD = datetime.now(UTC) - timedelta(days=40)
RECENT = datetime.now(UTC) - timedelta(days=2)
MONTH = timedelta(days=30)


def merge(store: MessageStore, retired: str, surviving: str, at: datetime) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            insert(patient_merges).values(
                retired_key=retired, surviving_key=surviving, merged_at=at
            )
        )


def merged(store: MessageStore) -> list[str]:
    with store.engine.connect() as conn:
        return sorted(conn.execute(select(patient_merges.c.retired_key)).scalars())


def visit(store: MessageStore, patient_key: str, state: str) -> int:
    values = {"patient_key": patient_key, "visit_key": f"V|{patient_key}", "state": state}
    with store.engine.begin() as conn:
        result = conn.execute(insert(encounters).values(**values, created_at=OLD, updated_at=OLD))
        return int(result.inserted_primary_key[0])


def notice(store: MessageStore, encounter_id: int | None, status: str, at: datetime) -> None:
    row: dict[str, Any] = {
        "encounter_id": encounter_id,
        "patient_key": "H|P9",
        "recipient": "pcp-1",
        "kind": "discharge",
        "status": status,
        "created_at": at,
    }
    with store.engine.begin() as conn:
        conn.execute(insert(notifications).values(**row))


def test_a_merge_chain_goes_whole_once_all_of_it_is_old(store: MessageStore) -> None:
    """A -> B -> C, nothing left about any of them: both merges go. Beside it D -> E is old
    but E -> F newer than the cutoff: a message for D must still reach F, so both stay."""
    merge(store, "H|A", "H|B", OLD)
    merge(store, "H|B", "H|C", OLD)
    merge(store, "H|D", "H|E", OLD)
    merge(store, "H|E", "H|F", RECENT)

    plan = store.prune_plan(MONTH)
    assert (plan.care.deleted["patient_merges"], plan.care.merges_in_use) == (2, 1)
    result = store.prune(MONTH)

    assert result.care_deleted["patient_merges"] == 2
    assert merged(store) == ["H|D", "H|E"]


def test_a_merge_stays_while_a_kept_message_carries_its_retired_identifier(
    store: MessageStore,
) -> None:
    """A message under the retired identifier not routed yet is kept, and so is the merge
    that will re-key it; once --include-unfinished deletes the message, the merge goes too."""
    store.insert_messages([new_message("LATE", received_at=OLD, patient_id="P1")])
    merge(store, "HOSP|P1", "HOSP|P2", OLD)

    kept = store.prune(MONTH)
    assert (kept.messages_deleted, kept.care_deleted["patient_merges"]) == (0, 0)
    assert kept.plan is not None and kept.plan.care.merges_in_use == 1
    assert merged(store) == ["HOSP|P1"]

    gone = store.prune(MONTH, include_unfinished=True)
    assert (gone.messages_deleted, gone.care_deleted["patient_merges"]) == (1, 1)
    assert merged(store) == []


def test_notifications_held_for_a_digest_keep_their_visit(store: MessageStore) -> None:
    """A discharged visit with a notification still waiting for the next digest is unfinished
    work: kept, with the notification, unless --include-unfinished. A sent notification whose
    visit is no longer in the store goes once older than the cutoff; a newer one stays."""
    waiting = visit(store, "H|P9", "discharged")
    notice(store, waiting, "digest", OLD)
    notice(store, waiting, "queued", OLD)
    notice(store, None, "queued", OLD)  # a referral's overdue alert: no visit
    notice(store, 999, "queued", OLD)  # its visit is gone
    notice(store, None, "queued", RECENT)

    plan = store.prune_plan(MONTH).care
    assert (plan.encounters_with_digest, plan.kept) == (1, 1)
    result = store.prune(MONTH)
    assert result.care_deleted["encounters"] == 0
    assert result.care_deleted["notifications"] == 2
    with store.engine.connect() as conn:
        left = conn.execute(select(notifications.c.encounter_id, notifications.c.status)).all()
    assert sorted(left, key=str) == sorted(
        [(waiting, "digest"), (waiting, "queued"), (None, "queued")], key=str
    )

    everything = store.prune(MONTH, include_unfinished=True)
    assert (everything.care_deleted["encounters"], everything.care_deleted["notifications"]) == (
        1,
        2,
    )
