"""Daily digests and the texts of notices as their readers get them: a digest reader whose
address changed during the day gets the whole day at the new address; a notice held after the
day's digest went out waits for the next one, never marked as sent; a digest or notice too
long for one SMS goes as several numbered texts and names every patient; digest lines give
each event's own time and say a death is a death, as the immediate notices do; the digest
goes out at ``digest_hour`` in the step's ``timezone``; a discharge names where the patient
went as the provider directory names it; the shipped SMS template promises no reply handling.

A real hub with the care route of test_notify (its fixtures and messages reused), an aiosmtpd
mail server and an HTTP SMS gateway stand-in; the route file is written per test."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from carehub.store.schema import DeliveryStatus
from carehub.testing import HubThread, local_config
from tests import test_notify
from tests.conftest import PROJECT_ROOT
from tests.helpers_http import HTTPServer
from tests.helpers_smtp import Mailbox
from tests.test_cli import env_without_carehub
from tests.test_notify import (  # noqa: F401  (fixtures: mailbox, gateway)
    CC_PHONE,
    CM,
    PCP,
    ROSTER,
    ROSTER_HEADER,
    CareHub,
    adt,
    gateway,
    mailbox,
    next_digest_time,
)
from tests.test_plugins import hub_config

CM_NEW = "cy.manager@plan-new.test"
TEXTER_PHONE = "+1-217-555-0177"
TEXTER = "cs-t,Cas Texter,case_manager,Health Plan,,sms,+1-217-555-0177,daily_digest,"
#: Patients whose case manager reads a daily digest by SMS: more than one text holds.
SURNAMES = [
    "Ashworth",
    "Brightwater",
    "Castellanos",
    "Delacroix",
    "Everhart",
    "Fairweather",
    "Goldsworthy",
    "Hollingsworth",
]
SHIPPED_TEMPLATES = PROJECT_ROOT / "config" / "care" / "templates"


@pytest.fixture
def care_route(
    tmp_path: Path,
    mailbox: tuple[Mailbox, int],  # noqa: F811
    gateway: HTTPServer,  # noqa: F811
) -> Iterator[Callable[..., Any]]:
    """Start a hub with test_notify's care route, the roster re-read on every message, and
    the notify step's options given as YAML lines (``notify_options``)."""

    @contextmanager
    def start(
        roster: str = ROSTER, notify_options: str = "", sms_max_length: int = 320
    ) -> Iterator[CareHub]:
        box, smtp_port = mailbox
        (tmp_path / "care").mkdir(exist_ok=True)
        write_roster(tmp_path, roster)
        (tmp_path / "care" / "providers.yaml").write_text(test_notify.PROVIDERS, "utf-8")
        sms_url = gateway.url("/messages")
        routes = test_notify.ROUTES.format(
            smtp_port=smtp_port,
            sender=test_notify.SENDER,
            sms_url=sms_url,
            digest_hour=test_notify.DIGEST_HOUR,
        )
        routes = routes.replace(
            "opt_out_field: PD1-12\n", "opt_out_field: PD1-12\n          reload_seconds: 0\n"
        ).replace(
            f"url: {sms_url}\n", f"url: {sms_url}\n              max_length: {sms_max_length}\n"
        )
        (tmp_path / "routes").mkdir(exist_ok=True)
        (tmp_path / "routes" / "care.yaml").write_text(routes + notify_options, "utf-8")
        config = local_config(worker=True)
        config.source = tmp_path / "carehub.yaml"
        config.routes = ["routes/*.yaml"]
        config.worker.poll_interval = 0.05
        config.worker.tick_interval = 3600  # the test moves the clock itself
        with HubThread(config, tmp_path / "data") as running:
            yield CareHub(running, box, gateway)

    yield start


def write_roster(folder: Path, roster: str) -> None:
    (folder / "care" / "roster.csv").write_text(roster + "\n", encoding="utf-8")


def digest_lines(mail: Any) -> list[str]:
    return [line for line in mail.body.splitlines() if line.startswith("- ")]


def named(message: str, surname: str) -> str:
    """``message`` (from test_notify.adt) about a patient called ``surname``."""
    return message.replace("Tester^Pat", f"{surname}^Pat")


def delivered_keys(hub: CareHub) -> set[str]:
    return {
        d["idempotency_key"]
        for d in hub.deliveries()
        if d["status"] == DeliveryStatus.DELIVERED.value
    }


# -- one digest per reader and day, at the address on file --------------------------------------
def test_a_digest_readers_day_goes_to_their_new_address_when_it_changed_during_the_day(
    care_route: Callable[..., Any], tmp_path: Path
) -> None:
    """The case manager's address changes between the ED visit and the admission: one digest,
    at the new address, holds both; nothing goes to the old one, and no notice is marked as
    sent in a digest that was never sent."""
    with care_route() as hub:
        hub.send(adt("A04", "AC-1"))
        hub.settle()
        write_roster(tmp_path, ROSTER.replace(CM, CM_NEW))
        hub.send(adt("A01", "AC-2", cls="I"))
        hub.settle()
        held = hub.rows(recipient="cm-a")
        assert [(r["kind"], r["address"]) for r in held] == [
            ("ed_arrival", CM),
            ("admission", CM_NEW),
        ]

        hub.tick(next_digest_time())

        assert hub.mailbox.to(CM) == []
        (digest,) = hub.mailbox.to(CM_NEW)
        lines = digest_lines(digest)
        assert len(lines) == 2
        assert ": emergency department visit - Pat Tester at GENERAL" in lines[0]
        assert ": admission - Pat Tester at GENERAL" in lines[1]
        digested = hub.rows(recipient="cm-a")
        assert {r["status"] for r in digested} == {"digested"}
        assert {r["delivery_key"] for r in digested} == {digest.key}
        assert digest.key in delivered_keys(hub)


def test_a_notice_held_after_the_days_digest_went_out_waits_for_the_next_one(
    care_route: Callable[..., Any],
) -> None:
    """The day's digest has gone out when another notice from before the digest hour turns
    up (here: the clock was moved ahead of it). The day's digest cannot hold it any more; it
    stays held, and the next day's digest tells it."""
    with care_route() as hub:
        hub.send(adt("A04", "LT-1"))
        hub.settle()
        first_day = next_digest_time()
        hub.tick(first_day)
        (first,) = hub.mailbox.to(CM)

        hub.send(adt("A04", "LT-2", patient="P300", visit="V3"))
        hub.settle()
        hub.tick(first_day + timedelta(minutes=15))  # the same day: its digest went out
        assert hub.mailbox.to(CM) == [first]
        assert [r["status"] for r in hub.rows(recipient="cm-a")] == ["digested", "digest"]

        hub.tick(first_day + timedelta(days=1))
        _, second = hub.mailbox.to(CM)
        (line,) = digest_lines(second)
        assert ": emergency department visit - Pat Tester at GENERAL" in line
        rows = hub.rows(recipient="cm-a")
        assert [r["delivery_key"] for r in rows] == [first.key, second.key]
        assert {first.key, second.key} <= delivered_keys(hub)


# -- SMS: nothing is cut off ----------------------------------------------------------------------
def test_an_sms_digest_too_long_for_one_text_goes_as_numbered_texts_naming_every_patient(
    care_route: Callable[..., Any],
) -> None:
    roster = "\n".join(
        [ROSTER_HEADER, *(f"Q{n},HOSP,false,,{TEXTER}" for n in range(len(SURNAMES)))]
    )
    with care_route(roster=roster) as hub:
        for n, surname in enumerate(SURNAMES):
            hub.send(named(adt("A04", f"SD-{n}", patient=f"Q{n}", visit=f"QV{n}"), surname))
        hub.settle()
        assert hub.texts() == []  # held for the digest

        hub.tick(next_digest_time())

        texts = [t["text"] for t in hub.texts()]
        assert len(texts) >= 2
        for number, text in enumerate(texts, start=1):
            assert text.startswith(f"({number}/{len(texts)}) "), text
            assert len(text) <= 320 and not text.endswith("…"), text
        assert {t["to"] for t in hub.texts()} == {TEXTER_PHONE}
        assert "8 updates" in texts[0]
        whole = "\n".join(texts)
        for surname in SURNAMES:
            assert f"Pat {surname} at GENERAL" in whole, surname
        # Each text is a delivery of its own, every one delivered.
        keys = [t["reference"] for t in hub.texts()]
        assert len(set(keys)) == len(texts) and set(keys) <= delivered_keys(hub)
        rows = hub.rows(recipient="cs-t")
        assert {r["status"] for r in rows} == {"digested"}
        assert {r["delivery_key"] for r in rows} == {keys[0]}

        hub.tick(next_digest_time() + timedelta(minutes=30))  # the same day: nothing again
        assert len(hub.texts()) == len(texts)


def test_a_notice_too_long_for_one_text_goes_as_numbered_texts(
    care_route: Callable[..., Any],
) -> None:
    """The care coordinator's ED notice by SMS, with texts of at most 100 characters."""
    with care_route(sms_max_length=100) as hub:
        hub.send(adt("A04", "LN-1"))
        hub.settle()

        texts = [t["text"] for t in hub.texts() if t["to"] == CC_PHONE]
        assert len(texts) >= 2
        for number, text in enumerate(texts, start=1):
            assert text.startswith(f"({number}/{len(texts)}) "), text
            assert len(text) <= 100 and "…" not in text, text
        whole = " ".join(re.sub(r"^\(\d+/\d+\) ", "", text) for text in texts)
        whole = " ".join(whole.split())
        assert "Pat Tester registered in the emergency department at GENERAL" in whole
        assert "Treating practitioner: Dr Ann Attend." in whole
        assert whole.endswith("You are receiving this as care coordinator for this patient.")
        (row,) = hub.rows(recipient="cc-a")
        keys = [t["reference"] for t in hub.texts() if t["to"] == CC_PHONE]
        assert keys[0] == row["delivery_key"] and set(keys) <= delivered_keys(hub)


# -- what a digest line says ----------------------------------------------------------------------
def test_a_death_reads_as_a_death_in_the_digest(care_route: Callable[..., Any]) -> None:
    with care_route() as hub:
        hub.send(
            adt("A01", "DD-1", cls="I"),
            adt("A03", "DD-2", cls="I", disposition="20", discharged_at="20261126100000"),
        )
        hub.settle()
        (notice,) = [m for m in hub.mailbox.to(PCP) if m.subject.startswith("Death")]

        hub.tick(next_digest_time())

        (digest,) = hub.mailbox.to(CM)
        lines = digest_lines(digest)
        assert lines[1] == "- 2026-11-26 10:00: death - Pat Tester died at GENERAL"
        assert "discharge" not in digest.body
        assert "Pat Tester died at GENERAL on 2026-11-26 10:00." in notice.body


def test_each_digest_line_gives_its_events_own_time_as_the_notice_did(
    care_route: Callable[..., Any],
) -> None:
    """The transfer line gives the A02's time (EVN-2), not when carehub heard of it; every
    line gives the time and the institution its immediate notice gave."""
    with care_route() as hub:
        hub.send(
            adt("A01", "TT-1", cls="I"),
            adt("A02", "TT-2", cls="I", facility="NORTH", when="20261125143000"),
            adt(
                "A03",
                "TT-3",
                cls="I",
                facility="NORTH",
                disposition="01",
                discharged_at="20261127100000",
            ),
        )
        hub.settle()
        notices = {m.subject.split(" ")[0]: m.body for m in hub.mailbox.to(PCP)}

        hub.tick(next_digest_time())

        (digest,) = hub.mailbox.to(CM)
        assert digest_lines(digest) == [
            "- 2026-11-25 08:00: admission - Pat Tester at GENERAL",
            "- 2026-11-25 14:30: transfer - Pat Tester at NORTH",
            "- 2026-11-27 10:00: discharge - Pat Tester at NORTH",
        ]
        assert "UTC" not in digest.body
        assert "on 2026-11-25 08:00." in notices["Admission"]
        assert "on 2026-11-25 14:30" in notices["Transfer"]
        assert "on 2026-11-27 10:00." in notices["Discharge"]


# -- when the digest goes out ---------------------------------------------------------------------
def test_the_digest_goes_out_at_digest_hour_in_the_steps_timezone(
    care_route: Callable[..., Any],
) -> None:
    chicago = ZoneInfo("America/Chicago")
    tomorrow = datetime.now(chicago).date() + timedelta(days=1)
    seven_thirty = datetime.combine(tomorrow, time(7, 30), tzinfo=chicago)
    with care_route(notify_options="          timezone: America/Chicago\n") as hub:
        hub.send(adt("A04", "TZ-1"))
        hub.settle()

        hub.tick((seven_thirty - timedelta(hours=1)).astimezone(UTC))  # 06:30 in Chicago
        assert hub.mailbox.to(CM) == []
        hub.tick(seven_thirty.astimezone(UTC))
        (digest,) = hub.mailbox.to(CM)
        assert tomorrow.isoformat() in digest.key  # the reader's day, not UTC's


@pytest.mark.parametrize(
    ("zone", "problem"),
    [
        ("America/Chicgo", "unknown time zone 'America/Chicgo'"),
        ("-06:00", "unknown time zone '-06:00'"),
    ],
)
def test_a_timezone_that_is_not_an_iana_name_is_refused_naming_the_key(
    tmp_path: Path, zone: str, problem: str
) -> None:
    routes = test_notify.ROUTES.format(
        smtp_port=25, sender="a@example.org", sms_url="http://127.0.0.1:9/", digest_hour=7
    )
    (tmp_path / "config" / "care").mkdir(parents=True)
    config = hub_config(
        tmp_path / "config",
        routes + f"          timezone: {zone!r}\n",
        **{"care/roster.csv": ROSTER + "\n", "care/providers.yaml": test_notify.PROVIDERS},
    )
    done = subprocess.run(
        [
            *(sys.executable, "-m", "carehub.cli", "routes", "check", "--offline"),
            *("--config", str(config), "--data-dir", str(tmp_path / "data")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_without_carehub(),
        cwd=tmp_path,
    )
    assert done.returncode == 2, done
    assert "steps[4].notify.timezone: " in done.stderr, done.stderr
    assert problem in done.stderr and "IANA" in done.stderr, done.stderr


# -- what a discharge notice says -----------------------------------------------------------------
def test_a_discharge_names_where_the_patient_went_as_the_directory_names_it(
    care_route: Callable[..., Any],
) -> None:
    with care_route() as hub:
        hub.send(
            adt("A01", "SN-1", cls="I"),
            adt("A03", "SN-2", cls="I", disposition="03", discharged_to="SNF1"),
        )
        hub.settle()
        (notice,) = [m for m in hub.mailbox.to(PCP) if m.subject.startswith("Discharge")]
        body = notice.body.replace("\r\n", "\n")
        assert "Discharged: 03 (to a skilled nursing facility)\n" in body
        assert "Discharged to: Test Skilled Nursing (SNF1)\n" in body


def test_the_shipped_sms_discharge_text_promises_no_replies_and_says_how_to_stop(
    care_route: Callable[..., Any], tmp_path: Path
) -> None:
    """carehub reads no texts: a "Reply STOP" would be a promise nobody keeps."""
    shutil.copytree(SHIPPED_TEMPLATES, tmp_path / "templates")
    with care_route(notify_options="          templates: templates\n") as hub:
        hub.send(
            adt("A01", "ST-1", cls="I"),
            adt("A03", "ST-2", cls="I", disposition="01", discharged_at="20261126100000"),
        )
        hub.settle()
        (text,) = [t["text"] for t in hub.texts() if "discharged" in t["text"]]
        assert text.startswith("Pat Tester was discharged from GENERAL 2026-11-26 10:00.")
        assert "reply" not in text.lower() and "STOP" not in text
        assert "roster" in text
