"""The shipped care-transition configuration end to end: a copy of config/ (carehub.yaml,
routes/, care/), every sample feed in config/feeds/ sent over MLLP, the in-process worker, and
real servers for everything the routes talk to (aiosmtpd for email, a uvicorn server for the
SMS gateway and the care platform). The stories in config/feeds/README.md are checked at the
mail server, in the store and through `carehub encounters` / `carehub followups` (CliRunner)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner
from sqlalchemy import select

from carehub.cli import main
from carehub.config import load_config
from carehub.hl7.ack import read_ack
from carehub.hl7.batch import split_messages
from carehub.referrals.state import ReferralTracker
from carehub.store.outbox import Outbox
from carehub.store.schema import DeliveryStatus, deliveries, notifications
from carehub.testing import HubThread, mllp_exchange
from tests.helpers_http import HTTPServer, on_this_host, wait_for
from tests.helpers_smtp import Mailbox, free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CARE_ROUTE = "care-transitions"
#: A route option that takes a destination's URL from a variable: ``url: ${SMS_GATEWAY_URL}``.
URL_VARIABLE = re.compile(r"^\s*(?:url|base_url):\s*\$\{([A-Za-z_][A-Za-z0-9_]*)\}", re.M)
#: The path each sample destination is reached at on the HTTP stand-in.
STAND_IN_PATHS = {"CARE_PLATFORM_URL": "/care-events", "SMS_GATEWAY_URL": "/messages"}
CONFIG = PROJECT_ROOT / "config"
FEEDS = sorted((CONFIG / "feeds").glob("*.hl7"))

LINDQVIST = "lindqvist@springfield-fp.example.org"
TESTWELL = "testwell@lakeshore-pc.example.com"
SNF = "admissions@maplegrove-snf.example.com"
SAMPLETON = "sampleton@springfield-fp.example.org"
LAKEVIEW_CC = "care-coord@lakeview-aco.example.com"

AMARA = "RGH|RG100234"
JOSE = "LMC|LM-448812"
MARCUS = "RGH|RG100235"
RENEE = "RGH|RG100236"
OLIVE = "RGH|RG100241"
HOLLIS = "RGH|RG100243"
INES = "LMC|LM-448807"


@dataclass
class Setup:
    running: HubThread
    mailbox: Mailbox
    http: HTTPServer
    config_path: Path
    data_dir: Path

    @property
    def store(self) -> Any:
        return self.running.store

    def settle(self, timeout: float = 30.0) -> None:
        """Until every message is routed and no notification is waiting to be sent (other
        routes' deliveries are not this test's business)."""
        outbox = Outbox(self.store)

        def idle() -> bool:
            return not outbox.unfinished(route=CARE_ROUTE)

        wait_for(idle, timeout, 0.05, "every message routed and every notification sent")

    def notifications(self) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(notifications).order_by(notifications.c.id))
            return [dict(r._mapping) for r in rows]

    def deliveries(self) -> list[dict[str, Any]]:
        """The notify step's deliveries (route care-transitions, but its FHIR forward)."""
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                select(deliveries)
                .where(deliveries.c.route == CARE_ROUTE)
                .where(deliveries.c.channel != "fhir-notification")
                .order_by(deliveries.c.id)
            )
            return [dict(r._mapping) for r in rows]

    def told(self, patient_key: str, address: str) -> list[tuple[str, str]]:
        """(kind, subject) of every email that reached ``address`` about the patient, in
        arrival order, matched to its notification by the delivery key."""
        rows = {r["delivery_key"]: r for r in self.notifications() if r["delivery_key"]}
        return [
            (rows[m.key]["kind"], m.subject)
            for m in self.mailbox.mails
            if m.to == address and m.key in rows and rows[m.key]["patient_key"] == patient_key
        ]

    def cli(self, *args: str) -> list[dict[str, Any]]:
        runner = CliRunner(env={"COLUMNS": "200"})
        result = runner.invoke(
            main,
            [*args, "--json", "--config", str(self.config_path), "--data-dir", str(self.data_dir)],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.output.splitlines() if line.strip()]


def point_sample_at(
    monkeypatch: pytest.MonkeyPatch, folder: Path, smtp_port: int, http: HTTPServer, outbox: Path
) -> None:
    """Point a copy of the shipped config (``folder``) at local stand-ins: its mail at the
    SMTP server on ``smtp_port``, its SMS gateway, care platform and every other HTTP
    destination its routes name at ``http`` (nothing leaves the test), its files at
    ``outbox``."""
    monkeypatch.setenv("SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("SMTP_PORT", str(smtp_port))
    monkeypatch.setenv("SMTP_STARTTLS", "false")
    monkeypatch.setenv("CAREHUB_OUTBOX", str(outbox))
    for route_file in (folder / "routes").glob("*.yaml"):
        for name in URL_VARIABLE.findall(route_file.read_text(encoding="utf-8")):
            monkeypatch.setenv(name, http.url(STAND_IN_PATHS.get(name, "/fhir")))


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    """The hub on a copy of config/, pointed at local servers, with every feed sent."""
    for name in ("CAREHUB_CONFIG", "CAREHUB_DATA_DIR", "CAREHUB_STORE_URL", "CAREHUB_HTTP_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "config"
    shutil.copytree(CONFIG, folder)
    box = Mailbox()
    smtp = Controller(box, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        with HTTPServer(respond=lambda _: 202) as http:
            point_sample_at(monkeypatch, folder, smtp.port, http, tmp_path / "outbox")
            config_path = folder / "carehub.yaml"
            config = load_config(config_path)
            on_this_host(config)  # the test moves the clock itself
            data_dir = tmp_path / "data"
            with HubThread(config, data_dir) as running:
                setup = Setup(running, box, http, config_path, data_dir)
                acks = send_feeds(running)
                assert acks["09-lakeview-missing-control-id.hl7"] == "AE"
                assert {code for name, code in acks.items() if not name.startswith("09")} == {"AA"}
                setup.settle()
                yield setup
    finally:
        smtp.stop()


def send_feeds(running: HubThread) -> dict[str, str]:
    """Every feed file in name order over one MLLP connection; the ACK code per file."""
    payloads: list[tuple[str, bytes]] = []
    for feed in FEEDS:
        payloads += [(feed.name, part) for part in split_messages(feed.read_bytes())]
    answers = mllp_exchange(running.mllp_address, [p for _, p in payloads])
    return {
        name: read_ack(answer.decode("utf-8", "replace"))[0]
        for (name, _), answer in zip(payloads, answers, strict=True)
    }


def test_feeds_tell_each_care_team_once(shipped: Setup) -> None:
    assert len(FEEDS) >= 18
    # Nothing is left undelivered, and no delivery reached the mail server twice.
    states = {d["status"] for d in shipped.deliveries()}
    assert states == {DeliveryStatus.DELIVERED.value}, shipped.deliveries()
    keys = [m.key for m in shipped.mailbox.mails]
    assert len(keys) == len(set(keys))
    email_keys = {d["idempotency_key"] for d in shipped.deliveries() if d["channel"] == "email"}
    # The referral routes email too (the organisation, the referrer); these are the care team's.
    assert email_keys <= set(keys)
    assert {m.key for m in shipped.mailbox.mails if m.key in email_keys} == email_keys

    # Amara Okafor: ED arrival, admission, an A08, a transfer to the north campus ICU, a bed
    # move there, discharge to a nursing facility; 08 resends the admission.
    assert shipped.told(AMARA, LINDQVIST) == [
        ("ed_arrival", "ED visit at Riverside General Hospital"),
        ("admission", "Admission at Riverside General Hospital"),
        ("transfer", "Transfer at Riverside General Hospital North Campus"),
        ("discharge", "Discharge from Riverside General Hospital"),
    ]
    assert shipped.told(AMARA, SNF) == [("discharge", "Discharge from Riverside General Hospital")]
    (snf_mail,) = [m for m in shipped.mailbox.mails if m.to == SNF]
    assert "Maple Grove Skilled Nursing" in snf_mail.body or "MAPLEGROVE_SNF" in snf_mail.body

    # José Peña: an admission, then its cancel: the PCP gets the admission and a correction.
    told_jose = shipped.told(JOSE, TESTWELL)
    assert [kind for kind, _ in told_jose] == ["admission", "retraction"]
    assert told_jose[0][1] == "Admission at Lakeview Medical Center"
    assert told_jose[1][1].startswith("Correction from ")
    assert told_jose[1][1].endswith(": admission cancelled")
    jose = [r for r in shipped.notifications() if r["patient_key"] == JOSE]
    assert {(r["kind"], r["status"]) for r in jose} == {
        ("admission", "retracted"),
        ("retraction", "queued"),
    }

    # Olive Fairweather opted out: every decision is a suppression, nothing went anywhere.
    olive = [r for r in shipped.notifications() if r["patient_key"] == OLIVE]
    assert olive and {r["status"] for r in olive} == {"suppressed"}
    assert all("opted out" in r["reason"] for r in olive)
    assert all(r["delivery_key"] is None for r in olive)

    # Marcus Whitlock's ED visit and same-day discharge home reached his care team once each.
    assert shipped.told(MARCUS, LINDQVIST) == [
        ("ed_arrival", "ED visit at Riverside General Hospital"),
        ("discharge", "Discharge from Riverside General Hospital"),
    ]
    sms = [r.json for r in shipped.http.requests if r.path == "/messages"]
    assert sms and all("Diagnos" not in text["text"] for text in sms)

    # Every sent notification has its receipt time.
    by_key = {d["idempotency_key"]: d for d in shipped.deliveries()}
    for row in shipped.notifications():
        if row["status"] == "queued":
            assert by_key[row["delivery_key"]]["accepted_at"] is not None


def test_reprocessing_a_message_tells_nobody_again(shipped: Setup) -> None:
    """`messages reprocess` of a message the care-transitions route handled: its other routes
    get run-2 deliveries, and the care team is not told a second time (the notify step plans
    the same deliveries, under the keys the first run used; they are left out)."""
    before = shipped.deliveries()
    mails_before = len(shipped.mailbox.mails)
    notified = {d["message_id"] for d in before}
    message_id = min(notified)

    result = CliRunner().invoke(
        main,
        [
            "messages",
            "reprocess",
            str(message_id),
            "--config",
            str(shipped.config_path),
            "--data-dir",
            str(shipped.data_dir),
        ],
        catch_exceptions=False,
    )

    assert result.exit_code == 0, result.output
    assert f"message {message_id} (run 2):" in result.output
    assert "care-transitions" in result.output
    shipped.settle()
    assert shipped.deliveries() == before  # no notification planned twice
    assert len(shipped.mailbox.mails) == mails_before
    with shipped.store.engine.connect() as conn:
        runs = {
            row.run
            for row in conn.execute(
                select(deliveries.c.run).where(deliveries.c.message_id == message_id)
            )
        }
    assert runs == {1, 2}  # the message's other routes did deliver again


def test_commands_show_encounters_and_follow_ups(shipped: Setup) -> None:
    listed = shipped.cli("encounters", "list", "--limit", "100")
    states = {(e["patient_key"], e["visit_key"]): e["state"] for e in listed}
    assert states == {
        (AMARA, "RGH|V20261124-0001"): "discharged",
        (JOSE, "LMC|LV-2026-3301"): "cancelled",
        (MARCUS, "RGH|V20261124-0002"): "discharged",
        (RENEE, "RGH|V20261125-0301"): "registered",  # registered as RG100299, then merged
        (RENEE, "RGH|V20261125-0303"): "admitted",
        (OLIVE, "RGH|V20261125-0401"): "ed",
        (HOLLIS, "RGH|V20261125-0501"): "ed",
        (INES, "LMC|LV-2026-3401"): "discharged",
    }
    (amara,) = [e for e in listed if e["patient_key"] == AMARA]
    assert (amara["disposition"], amara["discharged_to"]) == ("03", "MAPLEGROVE_SNF")
    assert amara["facility"] == "RIVERSIDE_GH"

    # Only Inés Quiñones went home from an inpatient stay: her clocks are the only ones (an
    # ED treat-and-release discharge and a discharge to a nursing facility open none).
    items = shipped.cli("followups", "list")
    assert sorted((f["patient_key"], f["kind"], f["status"]) for f in items) == [
        (INES, "contact", "open"),
        (INES, "visit", "open"),
    ]
    due = {f["kind"]: datetime.fromisoformat(f["due_at"]) for f in items}
    # Discharged Monday 23 Nov 2026 11:50 at -0600: contact by the end of Wednesday there.
    assert due["contact"] == datetime(2026, 11, 26, 5, 59, 59, 999999, tzinfo=UTC)
    assert due["visit"] == datetime(2026, 12, 8, 5, 59, 59, 999999, tzinfo=UTC)

    # The clock moves on: stale ED visits close, the overdue contact alerts the coordinator
    # who was told of the visit (once), and the daily digests go out (at 07:00 in the
    # sample's America/Chicago: 13:00 UTC in winter).
    today = datetime.now(UTC).date()
    later = max(
        datetime(2026, 11, 27, 13, 5, tzinfo=UTC),
        datetime.combine(today + timedelta(days=2), time(13, 5), tzinfo=UTC),
    )
    shipped.running.hub.table.tick(later)
    shipped.settle()
    shipped.running.hub.table.tick(later + timedelta(minutes=5))
    shipped.settle()

    closed = shipped.cli("encounters", "list", "--state", "closed")
    assert {e["patient_key"] for e in closed} == {OLIVE, HOLLIS}
    items = shipped.cli("followups", "list", "--all")
    overdue = [f for f in items if f["status"] == "overdue"]
    expected = sorted(kind for kind, at in due.items() if at < later)
    assert sorted(f["kind"] for f in overdue) == expected
    assert all(f["alerted_at"] is not None for f in overdue)
    alerts = shipped.told(INES, LAKEVIEW_CC)
    assert [kind for kind, _ in alerts].count("followup_overdue") == len(expected)
    assert all(
        subject == "Follow-up overdue after a discharge from Lakeview Medical Center"
        for kind, subject in alerts
        if kind == "followup_overdue"
    )
    digests = [m for m in shipped.mailbox.mails if m.to == SAMPLETON]
    assert len(digests) == 1 and "Renee Delacroix" in digests[0].body
    assert {d["status"] for d in shipped.deliveries()} == {DeliveryStatus.DELIVERED.value}


def test_care_platform_hears_each_visit_change_once(shipped: Setup, tmp_path: Path) -> None:
    """The shipped adt-care-events route tells the care platform what changed a visit, once:
    the A08 that brings a new phone number (03) as ``updated``, naming it, but not the bed
    move inside the ICU (03c), nor an admission sent again under a new MSH-10; the archive
    keeps every event."""
    outbox = Outbox(shipped.store)
    wait_for(
        lambda: not outbox.unfinished(route="adt-care-events"),
        30,
        0.05,
        "every care event delivered",
    )
    platform = [r.json for r in shipped.http.requests if r.path == "/care-events"]
    told = [(event["control_id"], event["event"]["kind"]) for event in platform]
    ids = [control_id for control_id, _ in told]
    assert len(ids) == len(set(ids))  # nothing twice
    assert ("RGH-000101", "ed_registration") in told
    assert ("RGH-000102", "admission") in told
    assert ("RGH-000105", "transfer") in told  # to the ICU at the north campus
    assert ("RGH-000104", "discharge") in told
    (phone,) = [event for event in platform if event["control_id"] == "RGH-000103"]
    assert phone["transition"] == {
        "kind": "updated",
        "state": "admitted",
        "changed": ["patient.phone"],
    }
    assert "RGH-000106" not in ids  # a bed move inside the ICU

    admit = (CONFIG / "feeds" / "02-riverside-admit.hl7").read_bytes()
    again = admit.replace(b"|RGH-000102|", b"|RGH-000102-R|").replace(
        b"|20261124103000-0500||ADT^A01", b"|20261124110000-0500||ADT^A01"
    )
    (answer,) = mllp_exchange(shipped.running.mllp_address, [again])
    assert read_ack(answer.decode())[0] == "AA"

    archive = tmp_path / "outbox" / "care-events"

    def archived() -> bool:
        return any(b"RGH-000102-R" in path.read_bytes() for path in archive.iterdir())

    wait_for(archived, 30, 0.05, "the resend's event archived")
    wait_for(lambda: not outbox.unfinished(route="adt-care-events"), 30, 0.05, "deliveries done")
    platform_after = [r.json for r in shipped.http.requests if r.path == "/care-events"]
    assert len(platform_after) == len(platform)


def test_a_referral_answered_pending_is_told_as_received_not_unanswered(shipped: Setup) -> None:
    """Inés Quiñones's transport referral (feed 20) is answered "P" (received, pending) and
    then nothing more: when its answer is due, her coordinator hears it was received but
    neither accepted nor declined, where the alert said it had had no answer at all."""
    pending = (
        "\r".join(
            [
                "MSH|^~\\&|CAR_RIDES|CAPITAL_AREA_RIDES|CAREHUB|CAREHUB|20261125170000-0600||"
                "RRI^I12^RRI_I12|CAR-5001|P|2.5",
                "MSA|AA|LMC-REF-8801",
                "RF1|P^Pending^HL70283|R^Routine^HL70280|SO^Social services^HL70281|||"
                "LMC-R-2026-0107",
                "PRD|RT^Referred to provider^HL70286|Capital Area Rides (synthetic)",
                "PID|1||LM-448807^^^LMC^MR||Quinones^Ines||19550817|F",
            ]
        )
        + "\r"
    )
    (answer,) = mllp_exchange(shipped.running.mllp_address, [pending.encode()])
    assert read_ack(answer.decode())[0] == "AA"
    tracker = ReferralTracker(shipped.store.engine)
    wait_for(
        lambda: tracker.referral("LAKEVIEW_MC|LMC-R-2026-0107").status == "received",
        30,
        0.05,
        "the referral received",
    )
    shipped.running.hub.table.tick(datetime.now(UTC) + timedelta(days=30))
    shipped.settle()
    alerts = [s for kind, s in shipped.told(INES, LAKEVIEW_CC) if kind == "referral_overdue"]
    assert alerts == ["Referral not yet accepted"]  # the patient's name only in the body
    (mail,) = [m for m in shipped.mailbox.mails if m.subject == alerts[0]]
    assert "has received the referral of Ines Quinones" in mail.body  # as feed 20 wrote it
    assert "no answer" not in mail.body
