"""TCM follow-up clocks on the shipped care-transitions route when what ends the episode does
not come on the discharge that opened it: the patient dies on a later ED visit, or the death
comes as PID-29/PID-30 on an update; the readmission is found only by an A40 merge, or its
stay never had an A01 before its A03. And a holidays list that has run out. Messages go over
MLLP to a hub on a copy of config/, alerts to aiosmtpd, as in test_followup_readmission."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from carehub.config import load_config
from carehub.store.outbox import Outbox
from carehub.store.schema import messages
from carehub.testing import HubThread
from tests.helpers_http import HTTPServer, on_this_host
from tests.helpers_smtp import Mailbox, free_port
from tests.test_care_e2e import CONFIG, point_sample_at
from tests.test_encounter_corrections import AMARA, COORDINATOR, Care, adt, care
from tests.test_followup_readmission import AFTER_BOTH_DUE, discharged_home

__all__ = ["care"]  # the running hub on the shipped config, shared with those tests

FIRST_VISIT = "V20261201-0900"  # admitted 27 November, home on 1 December (discharged_home)
ED_VISIT = "V20261203-0100"
ED = "ED^ED12^01^RIVERSIDE_GH"


def with_death(message: bytes, *, died: str = "", flag: str = "Y") -> bytes:
    """``message`` with PID-29 (the death time) and PID-30 (Y or N) filled."""
    pid = b"PID|1||RG100234^^^RGH^MR||Okafor^Amara^N||19580312|F"
    assert pid in message
    filled = pid + b"|" * 21 + died.encode() + b"|" + flag.encode()
    return message.replace(pid, filled)


def overdue_alerts(care: Care, patient: str = AMARA) -> list[str]:
    return [s for kind, s in care.told(patient, COORDINATOR) if kind == "followup_overdue"]


def statuses(care: Care, patient: str = AMARA) -> dict[int, list[str]]:
    """Each encounter id's follow-up statuses, sorted."""
    found: dict[int, list[str]] = {}
    for item in care.followups(patient):
        found.setdefault(item["encounter_id"], []).append(item["status"])
    return {k: sorted(v) for k, v in found.items()}


def notes(care: Care, visit: str, patient: str = AMARA) -> list[str]:
    return [t.get("note") or "" for t in care.show(visit, patient)["timeline"]]


def died_on_a_later_ed_visit(care: Care) -> None:
    care.send(
        adt("A04", "DE-1", "20261203061000-0600", visit=ED_VISIT, cls="E", location=ED),
        with_death(
            adt(
                "A03",
                "DE-2",
                "20261203070000-0600",
                visit=ED_VISIT,
                cls="E",
                location=ED,
                discharge="20261203065500-0600",
                disposition="20",
            ),
            died="20261203065000-0600",
        ),
    )


def test_a_death_on_a_later_ed_visit_closes_the_follow_ups(care: Care) -> None:
    discharged_home(care)
    died_on_a_later_ed_visit(care)
    first = care.encounter(FIRST_VISIT)["id"]
    assert statuses(care) == {first: ["died", "died"]}
    care.tick(AFTER_BOTH_DUE)
    assert overdue_alerts(care) == []  # nobody is told to call a patient who died
    assert any("death was reported (PV1-36) on visit" in n for n in notes(care, FIRST_VISIT))


def test_a13_of_the_death_discharge_lets_the_clocks_run_on(care: Care) -> None:
    discharged_home(care)
    died_on_a_later_ed_visit(care)
    care.send(adt("A13", "DE-3", "20261203080000-0600", visit=ED_VISIT, cls="E", location=ED))
    first = care.encounter(FIRST_VISIT)["id"]
    assert statuses(care) == {first: ["open", "open"]}
    care.tick(AFTER_BOTH_DUE)
    assert len(overdue_alerts(care)) == 2


def test_a_death_told_by_pid_30_on_an_update_and_taken_back(care: Care) -> None:
    discharged_home(care)
    update = adt(
        "A08", "DU-1", "20261206090000-0600", discharge="20261201153000-0600", disposition="01"
    )
    care.send(with_death(update, died="20261206070000-0600"))
    first = care.encounter(FIRST_VISIT)["id"]
    assert statuses(care) == {first: ["died", "died"]}
    care.tick(AFTER_BOTH_DUE)
    assert overdue_alerts(care) == []
    # A routine update with PID-30 empty changes nothing; one with N takes the death back.
    care.send(adt("A08", "DU-2", "20261206100000-0600", disposition="01"))
    assert statuses(care) == {first: ["died", "died"]}
    care.send(with_death(adt("A08", "DU-3", "20261206110000-0600", disposition="01"), flag="N"))
    assert statuses(care) == {first: ["open", "open"]}
    care.tick(datetime(2026, 12, 21, 12, 0, tzinfo=UTC))
    assert len(overdue_alerts(care)) == 2


def test_a_death_told_by_pid_29_alone_on_an_a31(care: Care) -> None:
    discharged_home(care)
    a31 = (
        "\r".join(
            [
                "MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|20261206090000-0600||"
                "ADT^A31^ADT_A05|DA-1|P|2.5.1|||AL|NE",
                "EVN|A31|20261206090000-0600",
                "PID|1||RG100234^^^RGH^MR||Okafor^Amara^N||19580312|F"
                + "|" * 21
                + "20261206070000-0600|",
                "PV1|1|N",
            ]
        )
        + "\r"
    ).encode()
    care.send(a31)
    first = care.encounter(FIRST_VISIT)["id"]
    assert statuses(care) == {first: ["died", "died"]}


# -- readmissions found late ----------------------------------------------------------------
def test_a_merge_that_joins_a_readmission_ends_the_earlier_episode(care: Care) -> None:
    """Amara's 1 December discharge is under RG100234; her 5 December stay was registered
    under a second record, RG100299, and discharged home on 9 December. The A40 shows the
    stay is a readmission."""
    discharged_home(care)
    second = "V20261205-0101"
    other = "RGH|RG100299"

    def as_other(message: bytes) -> bytes:
        return message.replace(b"RG100234^^^RGH^MR", b"RG100299^^^RGH^MR")

    care.send(
        as_other(
            adt("A01", "MR-1", "20261205020000-0600", visit=second, admit="20261205020000-0600")
        ),
        as_other(
            adt(
                "A03",
                "MR-2",
                "20261209150000-0600",
                visit=second,
                admit="20261205020000-0600",
                discharge="20261209145500-0600",
                disposition="01",
            )
        ),
    )
    first = care.encounter(FIRST_VISIT)["id"]
    assert statuses(care) == {first: ["open", "open"]}
    merge = (
        "\r".join(
            [
                "MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|20261210090000-0600||"
                "ADT^A40^ADT_A39|MR-3|P|2.5.1|||AL|NE",
                "EVN|A40|20261210090000-0600",
                "PID|1||RG100299^^^RGH^MR||Okafor^Amara^N||19580312|F",
                "MRG|RG100234^^^RGH^MR",
            ]
        )
        + "\r"
    ).encode()
    care.send(merge)
    readmitted = care.encounter(second, other)["id"]
    assert statuses(care, other) == {
        first: ["readmitted", "readmitted"],
        readmitted: ["open", "open"],
    }
    assert any("readmission: visit" in n for n in notes(care, FIRST_VISIT, other))
    care.tick(datetime(2026, 12, 10, 12, 0, tzinfo=UTC))  # the first contact is past due
    assert overdue_alerts(care, other) == []


@pytest.mark.parametrize("late_a01", [False, True])
def test_a_stay_whose_a03_comes_first_is_a_readmission(care: Care, late_a01: bool) -> None:
    """The 5 December stay is first heard of by its A03 (its A01 comes after it, or never)."""
    discharged_home(care)
    second = "V20261205-0101"
    care.send(
        adt(
            "A03",
            "LA-1",
            "20261209150000-0600",
            visit=second,
            admit="20261205020000-0600",
            discharge="20261209145500-0600",
            disposition="01",
        )
    )
    if late_a01:
        care.send(
            adt("A01", "LA-2", "20261205020000-0600", visit=second, admit="20261205020000-0600")
        )
    first = care.encounter(FIRST_VISIT)["id"]
    readmitted = care.encounter(second)["id"]
    assert statuses(care) == {first: ["readmitted", "readmitted"], readmitted: ["open", "open"]}
    care.tick(datetime(2026, 12, 10, 12, 0, tzinfo=UTC))  # the first contact is past due
    assert overdue_alerts(care) == []


# -- the holidays list ----------------------------------------------------------------------
def step_output(care: Care, control_id: str, step: str) -> dict[str, Any]:
    with care.store.engine.connect() as conn:
        message_id = conn.execute(
            select(messages.c.id).where(messages.c.control_id == control_id)
        ).scalar_one()
    (found,) = [
        s.output for s in Outbox(care.store).steps(message_id) if s.step == f"enrich {step}"
    ]
    assert isinstance(found, dict)
    return found


@pytest.fixture
def old_holidays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Iterator[Care]:
    """The hub on a copy of the shipped config whose holidays file lists 2025 only, as one
    left from last year would; its warnings are captured from the start."""
    for name in list(os.environ):
        if name.startswith("CAREHUB_"):
            monkeypatch.delenv(name)
    folder = tmp_path / "config"
    shutil.copytree(CONFIG, folder)
    (folder / "care" / "holidays.yaml").write_text(
        "holidays:\n  - 2025-11-27\n  - 2025-12-25\n", encoding="utf-8"
    )
    caplog.set_level(logging.WARNING, logger="carehub.care.followup")
    box = Mailbox()
    smtp = Controller(box, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        with HTTPServer(respond=lambda _: 202) as http:
            point_sample_at(monkeypatch, folder, smtp.port, http, tmp_path / "outbox")
            config_path = folder / "carehub.yaml"
            config = on_this_host(load_config(config_path))
            with HubThread(config, tmp_path / "data") as running:
                yield Care(running, box, http, config_path, tmp_path / "data")
    finally:
        smtp.stop()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The holiday warnings logged since the hub started."""
    records = [*caplog.get_records("setup"), *caplog.records]
    return [r.getMessage() for r in records if "lists no holiday" in r.getMessage()]


def test_a_holidays_list_that_ran_out_is_warned_of(
    old_holidays: Care, caplog: pytest.LogCaptureFixture
) -> None:
    care = old_holidays
    today = datetime.now(UTC).date()
    said = f"care/holidays.yaml lists no holiday in {today.year} or {today.year + 1}"
    assert [said in w for w in warnings_of(caplog)] == [True]  # at start
    care.tick(datetime.now(UTC))  # the same day: not again
    assert len(warnings_of(caplog)) == 1
    care.tick(datetime.now(UTC) + timedelta(days=1))  # the next day: again
    assert len(warnings_of(caplog)) == 2
    checked = subprocess.run(
        [
            *(sys.executable, "-m", "carehub.cli", "routes", "check", "--offline"),
            *("--config", str(care.config_path), "--data-dir", str(care.data_dir)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert said in checked.stderr


def test_the_follow_up_says_its_days_ran_past_the_holidays(old_holidays: Care) -> None:
    care = old_holidays
    discharged_home(care)
    output = step_output(care, "RA-2", "follow-up-clock")
    assert output["action"] == "opened"
    assert "business days after 2025-12-31" in output["calendar_note"]
