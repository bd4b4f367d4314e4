"""A visit whose messages carry no PV1-19 takes one timeline event per A08, and some feeds send
hundreds. An A01 or A04 for it asks whether its admission or ED arrival was already told; that
question must cost the same however long the timeline has grown (it read every event of the
visit, so such a patient's messages slowed down message by message). Measured as the work
SQLite does for the message (virtual machine instructions, counted by its progress handler),
which unlike a time does not depend on what else the machine is doing. The encounter-state
step over a real SQLite store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from carehub.builtins.event_translator import translate_v2_to_event
from carehub.care.encounters import EncounterStateEnricher
from carehub.components import ComponentContext, Work
from carehub.routing.dryrun import preview_message
from carehub.store.store import MessageStore
from tests.test_encounter_corrections import adt
from tests.test_store import sqlite_url

#: Updates between the two measured messages: enough that reading each event shows.
UPDATES = 500
#: How many SQLite instructions make one count of the progress handler.
GRAIN = 10


class Visit:
    """The encounter-state step on its own store, counting the SQLite work of each message."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = MessageStore(sqlite_url(tmp_path / "data"))
        self.store.migrate()
        self.step = EncounterStateEnricher(
            EncounterStateEnricher.Options(), ComponentContext(tmp_path, tmp_path, self.store)
        )
        self.ids = iter(range(1, 1_000_000))
        self.work = 0
        event.listen(self.store.engine, "before_cursor_execute", self._count)

    def _count(self, conn: Any, *_: Any) -> None:
        conn.connection.dbapi_connection.set_progress_handler(self._instructions, GRAIN)

    def _instructions(self) -> int:
        self.work += 1
        return 0  # go on

    def send(self, message: bytes) -> tuple[str, int]:
        """The message's transition, and the SQLite work it took."""
        text = message.replace(b"V20261201-0900^^^RGH^VN", b"").decode()  # no PV1-19
        work = Work(message=preview_message(text.encode(), next(self.ids)), route="care", v2=text)
        work.event = translate_v2_to_event(work.view)
        self.work = 0
        self.step.enrich(work)
        return str(work.data["encounter"].kind), self.work


@pytest.fixture
def visit(tmp_path: Path) -> Iterator[Visit]:
    opened = Visit(tmp_path)
    try:
        yield opened
    finally:
        opened.store.close()


@pytest.mark.parametrize(
    ("trigger", "patient_class", "news"), [("A01", "I", "admission"), ("A04", "E", "ed_arrival")]
)
def test_a_repeated_admit_or_arrival_costs_the_same_after_many_updates(
    visit: Visit, trigger: str, patient_class: str, news: str
) -> None:
    first = adt(
        trigger, "F-0", "20261127090000-0600", cls=patient_class, admit="20261127090000-0600"
    )
    assert visit.send(first)[0] == news
    again, early = visit.send(adt(trigger, "F-1", "20261127093000-0600", cls=patient_class))
    assert again == "none"  # told already
    for number in range(UPDATES):
        update = adt("A08", f"U-{number}", "20261127100000-0600", cls=patient_class)
        assert visit.send(update)[0] == "none"
    again, late = visit.send(adt(trigger, "F-2", "20261127110000-0600", cls=patient_class))
    assert again == "none"
    assert late <= 2 * early, f"{late * GRAIN} SQLite instructions, {early * GRAIN} at first"
