"""An overdue referral of a patient with no care coordinator on record is not marked alerted:
its timeline says once (not at every tick) that nobody could be told, and the alert goes as
soon as a coordinator is added to the roster. The shipped config on a real hub over MLLP, with
an aiosmtpd server and a FHIR test server; the roster is edited as a site would. SQLite and
PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from carehub.referrals.state import referral_timeline
from carehub.store.schema import notifications
from tests.helpers_http import wait_for
from tests.test_rabbitmq import pg_url
from tests.test_referral_early_cancel_cleared_step import _cli
from tests.test_referral_early_cancel_message_status import loop, store_setting
from tests.test_referral_early_updates import _message, _referral_of
from tests.test_referral_recipients import Loop, _referral

__all__ = ["loop", "pg_url", "store_setting"]  # fixtures: the hub, on SQLite or PostgreSQL


COORDINATOR = "cc-team@riverside-cm.example.org"
#: A patient the roster does not list (feed 07's is RG100234).
NOBODYS = {"RG100234^^^RGH^MR": "RG777001^^^RGH^MR"}
KEY = "RIVERSIDE_GH|R-NB-1"
ROSTER_LINE = (
    "RG777001,RGH,,,cc-rgh-01,Casey Exampleton RN,care_coordinator,Riverside Care Management,"
    f",email,{COORDINATOR},immediate,full\n"
)


def _overdue_rows(loop: Loop) -> list[tuple[str, str, str | None]]:
    with loop.running.store.engine.connect() as conn:
        rows = conn.execute(
            select(notifications.c.recipient, notifications.c.status, notifications.c.reason)
            .where(
                notifications.c.kind == "referral_overdue",
                notifications.c.patient_key == "RGH|RG777001",
            )
            .order_by(notifications.c.id)
        )
        return [tuple(r) for r in rows]


def _actions(loop: Loop) -> list[str]:
    found = referral_timeline(loop.running.store.engine, KEY)
    assert found is not None
    return [e.action for e in found.events]


def test_an_overdue_referral_nobody_could_be_told_of_is_alerted_once_someone_can_be(
    loop: Loop,
) -> None:
    assert loop.send(_referral("RGH-NB-1", "R-NB-1", replace=NOBODYS)) == "AA"
    _message(loop, "RGH-NB-1")
    late = datetime.now(UTC) + timedelta(hours=25)
    table = loop.running.hub.table
    for minute in range(3):  # three ticks: said once, not at each
        table.tick(late + timedelta(minutes=minute))

    referral = _referral_of(loop, KEY)
    assert referral.alerted_at is None
    assert _actions(loop) == ["created", "overdue_unalerted"]
    found = referral_timeline(loop.running.store.engine, KEY)
    assert found is not None
    assert "nobody to alert: no care coordinator on record for referral R-NB-1" in str(
        found.events[-1].detail["note"]
    )
    assert _overdue_rows(loop) == [
        ("-", "suppressed", "no care coordinator on record for referral R-NB-1")
    ]
    assert loop.emails_to(COORDINATOR) == []
    shown = _cli(loop, "referrals", "show", KEY)
    assert "overdue, nobody to alert yet" in shown
    assert "nobody to alert: no care coordinator on record" in " ".join(shown.split())

    # The site adds a coordinator for the patient: the next ticks alert them, once.
    assert loop.running.hub.config.source is not None
    roster = loop.running.hub.config.source.parent / "care" / "roster.csv"
    with roster.open("a", encoding="utf-8") as out:
        out.write(ROSTER_LINE)

    def alerted() -> list[object]:
        table.tick(late + timedelta(minutes=10))
        return loop.emails_to(COORDINATOR)

    (mail,) = wait_for(alerted, timeout=30, what="the overdue alert to the new coordinator")
    assert mail["Subject"] == "Referral without an answer"
    assert _referral_of(loop, KEY).alerted_at is not None
    assert _actions(loop) == ["created", "overdue_unalerted", "overdue_alert"]
    assert [status for _, status, _ in _overdue_rows(loop)] == ["suppressed", "queued"]
    table.tick(late + timedelta(minutes=11))
    assert len(_overdue_rows(loop)) == 2  # alerted once
