"""An overdue follow-up of a patient nobody can be alerted about (no care coordinator on the
roster, none told of the discharge) is not marked alerted: the visit's timeline and `carehub
followups list` say once (not at every tick) that nobody could be told and why, and the alert
goes as soon as a coordinator is added to the roster. A patient who opted out is told about to
nobody the same way, and is alerted about once a message says they no longer object. The
shipped config on a real hub over MLLP, mail to aiosmtpd; the roster is edited as a site would.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from carehub.care.followup import OPEN, OVERDUE
from tests.helpers_http import wait_for
from tests.test_encounter_corrections import AMARA, Care, adt, care
from tests.test_encounter_corrections import COORDINATOR as AMARA_COORDINATOR

__all__ = ["care"]  # the running hub on the shipped config

#: A patient of Riverside the shipped roster does not list.
PATIENT = "RG777001"
KEY = f"RGH|{PATIENT}"
VISIT = "V20261201-0900"
COORDINATOR = "cc-new@riverside-cm.example.org"
ROSTER_LINE = (
    f"{PATIENT},RGH,,,cc-rgh-09,Casey Exampleton RN,care_coordinator,Riverside Care Management,"
    f",email,{COORDINATOR},immediate,full\n"
)
#: Past the contact's due date (the end of Thursday 3 December, Chicago), before the visit's.
CONTACT_LATE = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def objecting(message: bytes, flag: str) -> bytes:
    """The message with PD1-12 (the shipped route's opt-out field) set to ``flag``."""
    segments = message.decode().split("\r")
    pd1 = next(i for i, s in enumerate(segments) if s.startswith("PD1|"))
    fields = segments[pd1].split("|") + [""] * 13
    fields[12] = flag
    segments[pd1] = "|".join(fields[:13])
    return "\r".join(segments).encode()


def discharged_home(care: Care, patient: str = PATIENT, opt_out: str = "") -> None:
    """Admitted on 27 November, home on Tuesday 1 December at 15:30 (-0600)."""
    care.send(
        objecting(
            adt("A01", "NB-1", "20261127090000-0600", admit="20261127090000-0600", patient=patient),
            opt_out,
        ),
        objecting(
            adt(
                "A03",
                "NB-2",
                "20261201153000-0600",
                discharge="20261201153000-0600",
                disposition="01",
                patient=patient,
            ),
            opt_out,
        ),
    )


def contact(care: Care, key: str = KEY) -> dict[str, Any]:
    (item,) = [f for f in care.followups(key) if f["kind"] == "contact"]
    return item


def nobody_rows(care: Care, key: str = KEY) -> list[str]:
    """The reasons recorded for the patient's overdue follow-ups that reached nobody."""
    return [
        r["reason"]
        for r in care.notifications()
        if r["patient_key"] == key and r["kind"] == "followup_overdue" and r["recipient"] == "-"
    ]


def alerts_to(care: Care, address: str) -> list[str]:
    return [m.subject for m in care.mailbox.mails if m.to == address]


def add_to_roster(care: Care, line: str) -> None:
    roster = care.config_path.parent / "care" / "roster.csv"
    with roster.open("a", encoding="utf-8") as out:
        out.write(line)


def test_an_overdue_follow_up_nobody_could_be_told_of_is_alerted_once_someone_can_be(
    care: Care,
) -> None:
    discharged_home(care)
    for minute in range(3):  # three ticks: said once, not at each
        care.tick(CONTACT_LATE + timedelta(minutes=minute))

    item = contact(care)
    assert (item["status"], item["alerted_at"]) == (OPEN, None)
    reason = f"no care coordinator on record for follow-up #{item['id']} (contact)"
    assert nobody_rows(care) == [reason]
    # On the visit's timeline, and where a coordinator reads the list: why nobody was told.
    shown = care.show(VISIT, KEY)
    assert [(n["recipient"], n["status"], n["reason"]) for n in shown["other_notifications"]] == [
        ("-", "suppressed", reason)
    ]
    listed = " ".join(care.text("followups", "list", "--patient", KEY).split())
    assert f"nobody to alert yet: {reason}" in listed
    assert alerts_to(care, COORDINATOR) == []

    # The site adds a coordinator for the patient: the next tick alerts them, once.
    add_to_roster(care, ROSTER_LINE)

    def alerted() -> list[str]:
        care.tick(CONTACT_LATE + timedelta(minutes=10))
        return alerts_to(care, COORDINATOR)

    (subject,) = wait_for(alerted, timeout=30, what="the overdue alert to the new coordinator")
    assert subject.startswith("Follow-up overdue")
    item = contact(care)
    assert item["status"] == OVERDUE and item["alerted_at"] is not None
    listed = " ".join(care.text("followups", "list", "--patient", KEY).split())
    assert "nobody to alert yet" not in listed
    care.tick(CONTACT_LATE + timedelta(minutes=11))
    assert alerts_to(care, COORDINATOR) == [subject]  # alerted once
    assert nobody_rows(care) == [reason]


def test_an_opted_out_patient_is_alerted_about_once_no_longer_opted_out(care: Care) -> None:
    """Amara's coordinator (on the shipped roster) is not alerted while she objects (PD1-12 =
    Y); that is recorded once, and a later message with PD1-12 = N lets the alert go."""
    discharged_home(care, patient="RG100234", opt_out="Y")
    care.tick(CONTACT_LATE)
    care.tick(CONTACT_LATE + timedelta(minutes=1))

    item = contact(care, AMARA)
    assert (item["status"], item["alerted_at"]) == (OPEN, None)
    (reason,) = nobody_rows(care, AMARA)
    assert reason.startswith(f"follow-up #{item['id']} (contact): ") and "PD1-12" in reason
    assert alerts_to(care, AMARA_COORDINATOR) == []

    care.send(
        objecting(
            adt(
                "A08",
                "NB-3",
                "20261205070000-0600",
                discharge="20261201153000-0600",
                disposition="01",
            ),
            "N",
        )
    )
    care.tick(CONTACT_LATE + timedelta(minutes=2))
    (subject,) = alerts_to(care, AMARA_COORDINATOR)
    assert subject.startswith("Follow-up overdue")
    assert contact(care, AMARA)["status"] == OVERDUE
    assert len(nobody_rows(care, AMARA)) == 1
