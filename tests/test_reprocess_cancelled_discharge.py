"""`messages reprocess` of a discharge an A13 has since taken back, and of that A13 after a new
discharge: the follow-up clocks and the visit stay as they are. The care route of test_notify
on a real hub (MLLP intake, mail server, SMS gateway), the command through CliRunner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from carehub.care.encounters import list_encounters
from carehub.store.schema import messages
from tests.test_dead_letters import run
from tests.test_notify import CareHub, adt, care, gateway, mailbox

__all__ = ["care", "gateway", "mailbox"]  # fixtures shared with test_notify

HUB_CONFIG = """\
listeners:
  mllp: [{name: test, host: 127.0.0.1, port: 0}]
  http: {enabled: false}
routes: ["routes/*.yaml"]
"""


def inpatient(event: str, control_id: str, **fields: str) -> str:
    return adt(event, control_id, cls="I", visit="V5", **fields)


def discharge_home(control_id: str) -> str:
    return inpatient("A03", control_id, disposition="01", discharged_at="20261125140000")


def message_id(hub: CareHub, control_id: str) -> int:
    with hub.store.engine.connect() as conn:
        return int(
            conn.execute(select(messages.c.id).where(messages.c.control_id == control_id)).scalar()
        )


def statuses(hub: CareHub) -> list[tuple[str, str]]:
    return [(f["kind"], f["status"]) for f in hub.followups()]


def reprocess(tmp_path: Path, hub: CareHub, control_id: str) -> None:
    config = tmp_path / "carehub.yaml"
    config.write_text(HUB_CONFIG, encoding="utf-8")
    ident = str(message_id(hub, control_id))
    code, out, err = run(config, tmp_path / "data", "messages", "reprocess", ident, "--yes")
    assert code == 0, out + err
    assert f"message {ident} (run 2): care-transitions" in out
    hub.settle()


def test_reprocessing_a_cancelled_discharge_opens_no_follow_up(
    care: Callable[..., Any], tmp_path: Path
) -> None:
    with care() as hub:
        hub.send(inpatient("A01", "ADM5"), discharge_home("DIS5"))
        hub.settle()
        assert statuses(hub) == [("contact", "open"), ("visit", "open")]
        hub.send(inpatient("A13", "UND5"))
        hub.settle()
        assert statuses(hub) == [("contact", "cancelled"), ("visit", "cancelled")]

        reprocess(tmp_path, hub, "DIS5")
        assert statuses(hub) == [("contact", "cancelled"), ("visit", "cancelled")]
        (visit,) = list_encounters(hub.store.engine)
        assert visit.state == "admitted"


def test_reprocessing_an_a13_leaves_a_later_discharges_follow_ups_open(
    care: Callable[..., Any], tmp_path: Path
) -> None:
    with care() as hub:
        hub.send(inpatient("A01", "ADM5"), discharge_home("DIS5"), inpatient("A13", "UND5"))
        hub.send(discharge_home("DIS5B"))
        hub.settle()
        fresh = [("contact", "open"), ("visit", "open")]
        assert statuses(hub) == [("contact", "cancelled"), ("visit", "cancelled"), *fresh]

        reprocess(tmp_path, hub, "UND5")
        assert statuses(hub)[2:] == fresh
        # The discharge that still stands opens nothing twice either.
        reprocess(tmp_path, hub, "DIS5B")
        assert statuses(hub)[2:] == fresh and len(statuses(hub)) == 4
        assert list_encounters(hub.store.engine)[0].state == "discharged"
