"""Who hears of a patient when the patient opted out or when two patient records were merged:
a do-not-notify stated in a message holds for the hub's own follow-up alerts, the roster
entries of a retired identifier (team and opt-out) follow it into the surviving one, and
those told of a visit hear of its discharge whatever became of the record. A real hub with
the care route, as in test_notify (its fixtures are reused)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import test_notify
from tests.test_notify import (  # noqa: F401  (fixtures: care, mailbox, gateway)
    CC_PHONE,
    PCP,
    ROSTER,
    _aware,
    adt,
    care,
    gateway,
    mailbox,
    merge,
)

#: P600: a second patient record with its own coordinator (by email) and case manager.
CC_B = "cc-b@care.test"
RECORD_B = "\n".join(
    [
        ROSTER,
        "P600,HOSP,false,,cc-b,Bea Coordinator RN,care_coordinator,Care B,,email,cc-b@care.test,"
        "immediate,full",
    ]
)


def discharge_home(control_id: str, **fields: Any) -> str:
    """An A03 home (01) on Monday 23 November 2026, 12:00 UTC: the follow-up clocks start."""
    return adt(
        "A03",
        control_id,
        cls="I",
        disposition="01",
        discharged_at="20261123120000+0000",
        **fields,
    )


def test_an_opt_out_stated_after_the_discharge_stops_the_overdue_alert(
    care: Callable[..., Any],  # noqa: F811
) -> None:
    """The coordinator was told of the discharge; a later message states PD1-12 = Y. The
    overdue follow-ups then reach nobody, and each is recorded as suppressed, saying why, once:
    they stay unalerted (the alert would go if the patient stopped objecting)."""
    with care() as hub:
        hub.send(adt("A01", "SO-1", cls="I"), discharge_home("SO-2"))
        hub.settle()
        assert ("cc-a", "discharge", "queued") in hub.decisions()
        hub.send(adt("A31", "SO-3", cls="I", opt_out="Y"))
        hub.settle()
        texts, mails = len(hub.texts()), len(hub.mailbox.mails)

        visit_due = max(_aware(f["due_at"]) for f in hub.followups())
        hub.tick(visit_due + timedelta(hours=1))
        alerts = hub.rows(kind="followup_overdue")
        assert [(r["recipient"], r["status"]) for r in alerts] == [
            ("-", "suppressed"),
            ("-", "suppressed"),
        ]
        assert all("patient asked not to be notified (PD1-12 = 'Y'" in r["reason"] for r in alerts)
        assert (len(hub.texts()), len(hub.mailbox.mails)) == (texts, mails)
        assert all(f["alerted_at"] is None for f in hub.followups())
        hub.tick(visit_due + timedelta(hours=2))
        assert len(hub.rows(kind="followup_overdue")) == 2


def test_a_roster_opt_out_under_a_retired_identifier_holds_after_the_merge(
    care: Callable[..., Any],  # noqa: F811
) -> None:
    """P200 is opted out on the roster. An A40 retires P200 into P100: P100's visits are no
    longer told to anyone, and the reason names the roster entry."""
    with care() as hub:
        assert hub.send(merge("RO-1", "P100", "P200")) == ["AA"]
        hub.send(adt("A04", "RO-2", visit="V5"))
        hub.settle()
        rows = hub.rows(kind="ed_arrival")
        assert rows and all(r["status"] == "suppressed" for r in rows), rows
        assert all("patient HOSP|P200 opted out (roster)" in r["reason"] for r in rows)
        assert hub.mailbox.mails == [] and hub.texts() == []


def test_the_retired_records_team_is_told_after_a_merge(
    care: Callable[..., Any],  # noqa: F811
) -> None:
    """P600 is retired into P100: an ED visit of P100 reaches P600's coordinator as well as
    P100's team."""
    with care(roster=RECORD_B) as hub:
        hub.send(merge("RT-1", "P100", "P600"), adt("A04", "RT-2", visit="V5"))
        hub.settle()
        assert ("cc-b", "ed_arrival", "queued") in hub.decisions()
        assert ("pcp-a", "ed_arrival", "queued") in hub.decisions()
        (mail,) = hub.mailbox.to(CC_B)
        assert mail.subject == "ED visit at GENERAL"


def test_those_told_of_a_merged_records_admission_hear_of_its_discharge(
    care: Callable[..., Any],  # noqa: F811
) -> None:
    """P600 is admitted (its coordinator cc-b is told), merged into P100, then discharged
    home under P100. cc-b hears of the discharge, and is alerted of the overdue follow-up
    only after having heard of the discharge."""
    with care(roster=RECORD_B) as hub:
        hub.send(
            adt("A01", "MD-1", cls="I", visit="V1"),
            adt("A01", "MD-2", cls="I", visit="V6", patient="P600"),
        )
        hub.settle()
        assert [m.subject for m in hub.mailbox.to(CC_B)] == ["Admission at GENERAL"]
        hub.send(merge("MD-3", "P100", "P600"), discharge_home("MD-4", visit="V6"))
        hub.settle()
        assert [m.subject for m in hub.mailbox.to(CC_B)] == [
            "Admission at GENERAL",
            "Discharge from GENERAL",
        ]
        assert ("pcp-a", "discharge", "queued") in hub.decisions()

        contact_due = min(_aware(f["due_at"]) for f in hub.followups())
        hub.tick(contact_due + timedelta(hours=1))
        alerted = {r["recipient"] for r in hub.rows(kind="followup_overdue")}
        told_of_discharge = {
            r["recipient"] for r in hub.rows(kind="discharge") if r["status"] == "queued"
        }
        assert alerted == {"cc-a", "cc-b"}
        assert alerted <= told_of_discharge
        assert (
            hub.mailbox.to(CC_B)[-1].subject == "Follow-up overdue after a discharge from GENERAL"
        )
        assert hub.texts()[-1]["to"] == CC_PHONE
        hub.assert_sent_with_receipt_times()


def test_those_told_of_a_visit_hear_of_its_discharge_when_the_team_no_longer_lists_them(
    care: Callable[..., Any],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """P600's visit was told to cc-b; then P600 leaves the roster and is merged into P100.
    cc-b still hears of that visit's discharge, with the CMS minimum only (what cc-b asked
    for is no longer on file)."""
    routes = test_notify.ROUTES.replace(
        "          opt_out_field: PD1-12\n",
        "          opt_out_field: PD1-12\n          reload_seconds: 0\n",
    )
    monkeypatch.setattr(test_notify, "ROUTES", routes)
    with care(roster=RECORD_B) as hub:
        hub.send(adt("A01", "NL-1", cls="I", visit="V6", patient="P600"))
        hub.settle()
        roster = tmp_path / "care" / "roster.csv"
        roster.write_text(ROSTER + "\n", encoding="utf-8")
        os.utime(roster, ns=(time.time_ns() + 10**9,) * 2)  # a changed mtime, surely
        hub.send(merge("NL-2", "P100", "P600"), discharge_home("NL-3", visit="V6"))
        hub.settle()
        admission, discharge = hub.mailbox.to(CC_B)
        assert discharge.subject == "Discharge from GENERAL"
        assert "Chest pain" in admission.body and "Chest pain" not in discharge.body
        assert [m.subject for m in hub.mailbox.to(PCP)] == ["Discharge from GENERAL"]
