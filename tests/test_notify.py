"""The notify step's rules on a real hub: MLLP intake, the in-process worker, the care-transition
route (v2-to-event -> encounter-state -> care-team -> follow-up-clock -> notify) from route files
in a temporary folder, an aiosmtpd mail server and a uvicorn SMS gateway stand-in. Nothing is
mocked; decisions are read back from the store's ``notifications``, ``deliveries`` and
``followups`` tables, and what was sent from the two servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from carehub.hl7.ack import read_ack
from carehub.store.outbox import Outbox
from carehub.store.schema import DeliveryStatus, deliveries, followups, notifications
from carehub.testing import HubThread, local_config, mllp_exchange
from tests.helpers_http import HTTPServer, wait_for
from tests.helpers_smtp import Mailbox, free_port

DIGEST_HOUR = 7
SENDER = "care-alerts@carehub.test"

PCP = "pcp@clinic.test"
CC_PHONE = "+1-217-555-0101"
BH = "bh@clinic.test"
CM = "cm@plan.test"

ROSTER_HEADER = (
    "patient_id,authority,opt_out,opt_out_reason,member_id,name,role,organization,npi,"
    "channel,address,preference,detail"
)
TEAM = [
    "pcp-a,Dr Ada Primary,pcp,Clinic,,email,pcp@clinic.test,immediate,full",
    "cc-a,Cam Coordinator RN,care_coordinator,Care Mgmt,,sms,+1-217-555-0101,immediate,",
    "bh-a,Bo Behavioral,behavioral_health,BH Clinic,,email,bh@clinic.test,discharge_only,full",
    "cm-a,Cy Manager,case_manager,Health Plan,,email,cm@plan.test,daily_digest,full",
]
ROSTER = "\n".join(
    [
        ROSTER_HEADER,
        *(f"P100,HOSP,false,,{member}" for member in TEAM),
        *(f"P300,HOSP,,,{member}" for member in TEAM),
        "P200,HOSP,true,asked at registration (test),pcp-a,Dr Ada Primary,pcp,Clinic,,email,"
        "pcp@clinic.test,immediate,full",
        "P200,HOSP,,,cc-a,Cam Coordinator RN,care_coordinator,Care Mgmt,,sms,+1-217-555-0101,"
        "immediate,",
        # A member who asked for the minimum by email: no diagnoses even on a full channel.
        "P400,HOSP,false,,pcp-min,Dr Min Detail,pcp,Clinic,,email,min@clinic.test,immediate,"
        "minimum",
    ]
)
PROVIDERS = """\
providers: {}
facilities:
  SNF1: {name: Test Skilled Nursing, kind: snf, channel: email, address: intake@snf.test}
"""
ROUTES = """\
routes:
  - name: care-transitions
    when:
      type: ADT
    steps:
      - translate: v2-to-event
      - enrich:
          use: encounter-state
          stale_ed_hours: 24
      - enrich:
          use: care-team
          roster: care/roster.csv
          providers: care/providers.yaml
          opt_out_field: PD1-12
      - enrich:
          use: follow-up-clock
          contact_business_days: 2
          visit_days: 14
      - notify:
          channels:
            email:
              channel: email
              host: 127.0.0.1
              port: {smtp_port}
              starttls: false
              sender: {sender}
              allow_cleartext: true
            sms:
              channel: sms
              url: {sms_url}
              allow_cleartext: true
          detail: {{email: full, sms: minimum}}
          digest_hour: {digest_hour}
          coordinator_roles: [care_coordinator]
          retry: {{max_attempts: 3, initial_delay: 0.05, max_delay: 0.1}}
"""


# -- outside world ----------------------------------------------------------------------------
@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield box, controller.port
    finally:
        controller.stop()


@pytest.fixture
def gateway() -> Iterator[HTTPServer]:
    with HTTPServer(respond=lambda _: 202) as server:
        yield server


# -- the hub ----------------------------------------------------------------------------------
@dataclass
class CareHub:
    running: HubThread
    mailbox: Mailbox
    gateway: HTTPServer

    @property
    def store(self) -> Any:
        return self.running.store

    def send(self, *texts: str) -> list[str]:
        """Each message over one MLLP connection; the ACK codes (MSA-2 checked)."""
        answers = mllp_exchange(self.running.mllp_address, [t.encode() for t in texts])
        codes = []
        for text, answer in zip(texts, answers, strict=True):
            code, echoed, _ = read_ack(answer.decode())
            assert echoed == text.split("\r")[0].split("|")[9]
            codes.append(code)
        return codes

    def settle(self, timeout: float = 20.0) -> None:
        """Until every message is routed and no delivery is waiting."""
        outbox = Outbox(self.store)

        def idle() -> bool:
            return not outbox.unfinished()

        wait_for(idle, timeout, 0.02, "routing and delivery to finish")

    def tick(self, now: datetime) -> None:
        """The periodic work at ``now`` (digests, overdue follow-ups), then wait for it."""
        self.running.hub.table.tick(now)
        self.settle()

    def rows(self, **where: Any) -> list[dict[str, Any]]:
        query = select(notifications).order_by(notifications.c.id)
        for name, value in where.items():
            query = query.where(getattr(notifications.c, name) == value)
        with self.store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def decisions(self, **where: Any) -> list[tuple[str, str, str]]:
        return [(r["recipient"], r["kind"], r["status"]) for r in self.rows(**where)]

    def deliveries(self) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(deliveries).order_by(deliveries.c.id))
            return [dict(r._mapping) for r in rows]

    def followups(self) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(followups).order_by(followups.c.id))
            return [dict(r._mapping) for r in rows]

    def texts(self) -> list[dict[str, Any]]:
        return [r.json for r in self.gateway.requests]

    def assert_sent_with_receipt_times(self) -> None:
        """Every queued notification has a delivery, accepted, with its receipt time."""
        by_key = {d["idempotency_key"]: d for d in self.deliveries()}
        for row in self.rows():
            if row["status"] not in ("queued", "digested"):
                continue
            delivery = by_key[row["delivery_key"]]
            assert delivery["status"] == DeliveryStatus.DELIVERED.value, delivery
            assert delivery["accepted_at"] is not None, delivery
            accepted = _aware(delivery["accepted_at"])
            assert _aware(delivery["created_at"]) <= accepted <= datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@pytest.fixture
def care(
    tmp_path: Path, mailbox: tuple[Mailbox, int], gateway: HTTPServer
) -> Iterator[Callable[..., Any]]:
    """Start a hub with the care route (roster and providers in tmp_path/care)."""

    @contextmanager
    def start(roster: str = ROSTER) -> Iterator[CareHub]:
        box, smtp_port = mailbox
        (tmp_path / "care").mkdir(exist_ok=True)
        (tmp_path / "care" / "roster.csv").write_text(roster + "\n", encoding="utf-8")
        (tmp_path / "care" / "providers.yaml").write_text(PROVIDERS, encoding="utf-8")
        (tmp_path / "routes").mkdir(exist_ok=True)
        (tmp_path / "routes" / "care.yaml").write_text(
            ROUTES.format(
                smtp_port=smtp_port,
                sender=SENDER,
                sms_url=gateway.url("/messages"),
                digest_hour=DIGEST_HOUR,
            ),
            encoding="utf-8",
        )
        config = local_config(worker=True)
        config.source = tmp_path / "carehub.yaml"
        config.routes = ["routes/*.yaml"]
        config.worker.poll_interval = 0.05
        config.worker.tick_interval = 3600  # the test moves the clock itself
        with HubThread(config, tmp_path / "data") as running:
            yield CareHub(running, box, gateway)

    yield start


# -- messages ---------------------------------------------------------------------------------
def adt(
    event: str,
    control_id: str,
    *,
    patient: str = "P100",
    visit: str = "V1",
    cls: str = "E",
    when: str = "20261125083000",
    facility: str = "GENERAL",
    opt_out: str = "",
    disposition: str = "",
    discharged_to: str = "",
    discharged_at: str = "",
) -> str:
    """A synthetic ADT message with what the care route reads: PD1-12 (opt-out), PV1-2,
    PV1-3 (with the facility), PV1-7, PV1-19, PV1-36/37 and PV1-44/45, and a DG1."""
    pv1 = [""] * 46
    pv1[0], pv1[1], pv1[2] = "PV1", "1", cls
    pv1[3] = f"{'ED^E1^1' if cls == 'E' else '4W^412^A'}^{facility}"
    pv1[7] = "1234567893^Attend^Ann^^^Dr^^^NPI"
    pv1[10] = "MED"
    pv1[19] = f"{visit}^^^HOSP^VN"
    pv1[36], pv1[37] = disposition, discharged_to
    pv1[44], pv1[45] = "20261125080000", discharged_at
    segments = [
        f"MSH|^~\\&|ADT_APP|{facility}|CAREHUB|CAREHUB|{when}||ADT^{event}^ADT_A01|{control_id}"
        "|P|2.5.1",
        f"EVN|{event}|{when}",
        f"PID|1||{patient}^^^HOSP^MR||Tester^Pat||19600101|F",
        "PD1" + "|" * 12 + opt_out,
        "|".join(pv1).rstrip("|"),
        "DG1|1||R07.9^Chest pain, unspecified^I10||20261125|A",
    ]
    return "\r".join(segments) + "\r"


def next_digest_time() -> datetime:
    """Half an hour past the digest hour, the day after today (UTC)."""
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    return datetime(tomorrow.year, tomorrow.month, tomorrow.day, DIGEST_HOUR, 30, tzinfo=UTC)


# -- tests ------------------------------------------------------------------------------------
def test_ed_arrival_tells_each_member_once_by_their_channel(care: Callable[..., Any]) -> None:
    with care() as hub:
        assert hub.send(adt("A04", "ED1")) == ["AA"]
        hub.settle()
        assert hub.decisions() == [
            ("pcp-a", "ed_arrival", "queued"),
            ("cc-a", "ed_arrival", "queued"),
            ("bh-a", "ed_arrival", "suppressed"),
            ("cm-a", "ed_arrival", "digest"),
        ]
        assert hub.rows(recipient="bh-a")[0]["reason"] == "prefers discharge notices only"
        (mail,) = hub.mailbox.to(PCP)
        assert mail.rcpt_tos == [PCP]
        assert mail.subject == "ED visit at GENERAL"
        assert str(mail.message["From"]) == SENDER
        assert "Chest pain" in mail.body  # email: full detail
        assert "Dr Ann Attend" in mail.body
        assert hub.mailbox.to(BH) == [] and hub.mailbox.to(CM) == []
        (text,) = hub.texts()
        assert text["to"] == CC_PHONE
        assert "Pat Tester" in text["text"] and "GENERAL" in text["text"]
        assert "Dr Ann Attend" in text["text"]  # the treating practitioner: part of the minimum
        for detail in ("Chest pain", "R07.9", "Reason", "Diagnos"):
            assert detail not in text["text"]  # SMS: the minimum only
        hub.assert_sent_with_receipt_times()


def test_resend_and_echoes_notify_nobody_again(care: Callable[..., Any]) -> None:
    first = adt("A04", "ED1")
    with care() as hub:
        assert hub.send(first) == ["AA"]
        hub.settle()
        told = hub.decisions()
        # The same MSH-10 again (a resend), an A08 with nothing new and a second A04 for the
        # visit (an echo under a new MSH-10): none of them is a new transition.
        assert hub.send(first, adt("A08", "ED2"), adt("A04", "ED3")) == ["AA", "AA", "AA"]
        hub.settle()
        assert hub.store.count() == 3  # the resend was recognised, not stored again
        assert hub.decisions() == told
        assert len(hub.mailbox.to(PCP)) == 1
        assert len(hub.texts()) == 1
        assert len(hub.deliveries()) == 2
        hub.assert_sent_with_receipt_times()


def test_cancelled_admission_is_retracted_from_exactly_those_told(
    care: Callable[..., Any],
) -> None:
    with care() as hub:
        hub.send(adt("A01", "ADM1", cls="I", visit="V2"))
        hub.settle()
        assert hub.decisions() == [
            ("pcp-a", "admission", "queued"),
            ("cc-a", "admission", "queued"),
            ("bh-a", "admission", "suppressed"),
            ("cm-a", "admission", "digest"),
        ]
        hub.send(adt("A11", "CAN1", cls="I", visit="V2"))
        hub.settle()
        assert hub.decisions() == [
            ("pcp-a", "admission", "retracted"),
            ("cc-a", "admission", "retracted"),
            ("bh-a", "admission", "suppressed"),
            ("cm-a", "admission", "retracted"),  # held for the digest: quietly taken out
            ("pcp-a", "retraction", "queued"),
            ("cc-a", "retraction", "queued"),
        ]
        admission, correction = hub.mailbox.to(PCP)
        assert admission.subject == "Admission at GENERAL"
        assert correction.subject == "Correction from GENERAL: admission cancelled"
        assert "Please disregard" in correction.body
        first, second = hub.texts()
        assert first["to"] == second["to"] == CC_PHONE
        assert "cancelled the admission" in second["text"]
        assert hub.mailbox.to(BH) == []
        # The digest holds nothing any more: the case manager hears nothing of it.
        hub.tick(next_digest_time())
        assert hub.mailbox.to(CM) == []
        assert len(hub.mailbox.mails) == 2
        hub.assert_sent_with_receipt_times()


def test_a_cancel_for_a_visit_never_notified_sends_nothing(care: Callable[..., Any]) -> None:
    with care() as hub:
        hub.send(adt("A11", "CAN9", cls="I", visit="V9"))  # a visit carehub never saw
        hub.send(adt("A11", "CAN8", cls="I", visit="V8", patient="P999"))  # nobody on the roster
        hub.settle()
        assert hub.rows() == []
        assert hub.deliveries() == []
        assert hub.mailbox.mails == [] and hub.texts() == []


def test_a_cancelled_ed_visit_is_retracted_too(care: Callable[..., Any]) -> None:
    """An A11 for an ED registration (no admission) cancels the visit: the ED arrival the care
    team was told of is taken back."""
    with care() as hub:
        hub.send(adt("A04", "ED1"))
        hub.settle()
        hub.send(adt("A11", "CAN1"))
        hub.settle()
        assert [d for d in hub.decisions() if d[1] == "retraction"] == [
            ("pcp-a", "retraction", "queued"),
            ("cc-a", "retraction", "queued"),
        ]
        _, correction = hub.mailbox.to(PCP)
        assert correction.subject == (
            "Correction from GENERAL: emergency department visit cancelled"
        )
        hub.assert_sent_with_receipt_times()


def test_a_cancelled_visit_sends_one_correction_per_member(care: Callable[..., Any]) -> None:
    """A direct admission with a transfer, then an A11: the visit is cancelled, both notices
    are taken back, and each member gets one correction."""
    with care() as hub:
        hub.send(
            adt("A04", "REG1", cls="O"),  # an outpatient registration: nobody is told
            adt("A01", "ADM1", cls="I"),
            adt("A02", "TRF1", cls="I", facility="NORTH"),
        )
        hub.settle()
        assert len(hub.mailbox.to(PCP)) == 2
        hub.send(adt("A11", "CAN1", cls="I", facility="NORTH"))
        hub.settle()
        assert hub.decisions(kind="retraction") == [
            ("pcp-a", "retraction", "queued"),
            ("cc-a", "retraction", "queued"),
        ]
        assert {r["status"] for r in hub.rows(recipient="pcp-a", kind="admission")} == {"retracted"}
        assert {r["status"] for r in hub.rows(recipient="pcp-a", kind="transfer")} == {"retracted"}
        corrections = [m for m in hub.mailbox.to(PCP) if m.subject.startswith("Correction")]
        assert [m.subject for m in corrections] == ["Correction from NORTH: admission cancelled"]
        assert len(hub.texts()) == 3
        hub.assert_sent_with_receipt_times()


def test_each_transfer_is_told_and_a12_takes_back_only_the_last(
    care: Callable[..., Any],
) -> None:
    with care() as hub:
        hub.send(
            adt("A01", "ADM1", cls="I"),
            adt("A02", "TRF1", cls="I", facility="NORTH"),  # to the north campus
            adt("A02", "TRF2", cls="I", facility="NORTH"),  # an echo: no change, no notice
            adt("A02", "TRF3", cls="I", facility="GENERAL"),  # and back: a second transfer
        )
        hub.settle()
        assert [r["status"] for r in hub.rows(recipient="pcp-a", kind="transfer")] == [
            "queued",
            "queued",
        ]
        assert [m.subject for m in hub.mailbox.to(PCP)] == [
            "Admission at GENERAL",
            "Transfer at NORTH",
            "Transfer at GENERAL",
        ]
        hub.send(adt("A12", "CTR1", cls="I", facility="GENERAL"))
        hub.settle()
        first, second = hub.rows(recipient="pcp-a", kind="transfer")
        assert (first["status"], second["status"]) == ("queued", "retracted")
        (retraction,) = hub.rows(recipient="pcp-a", kind="retraction")
        assert retraction["reason"] == f"retracts notification #{second['id']} (transfer)"
        assert hub.mailbox.to(PCP)[-1].subject == "Correction from GENERAL: transfer cancelled"
        assert len(hub.mailbox.to(PCP)) == 4
        hub.assert_sent_with_receipt_times()


@pytest.mark.parametrize(
    ("patient", "opt_out", "reason"),
    [
        ("P200", "", "opted out (roster): asked at registration (test)"),
        ("P100", "Y", "patient asked not to be notified (PD1-12 = 'Y')"),
    ],
    ids=["roster-flag", "pd1-12"],
)
def test_patient_opt_out_suppresses_everything(
    care: Callable[..., Any], patient: str, opt_out: str, reason: str
) -> None:
    with care() as hub:
        hub.send(
            adt("A04", "ED1", patient=patient, opt_out=opt_out),
            adt("A08", "UPD1", patient=patient, opt_out=opt_out, cls="I"),  # E -> I: admission
            adt(
                "A03",
                "DIS1",
                patient=patient,
                opt_out=opt_out,
                cls="I",
                disposition="01",
                discharged_at="20261126100000",
            ),
        )
        hub.settle()
        rows = hub.rows()
        assert {r["kind"] for r in rows} == {"ed_arrival", "admission", "discharge"}
        assert rows and all(r["status"] == "suppressed" for r in rows)
        assert all(r["reason"].startswith("patient opted out: ") for r in rows)
        assert all(reason in r["reason"] for r in rows)
        assert all(r["delivery_key"] is None for r in rows)
        assert hub.deliveries() == []
        assert hub.mailbox.mails == [] and hub.texts() == []


def test_discharge_only_member_hears_only_the_discharge(care: Callable[..., Any]) -> None:
    with care() as hub:
        hub.send(
            adt("A04", "ED1"),
            adt("A01", "ADM1", cls="I"),
            adt("A02", "TRF1", cls="I", facility="NORTH"),  # a facility change: a transfer
            adt(
                "A03",
                "DIS1",
                cls="I",
                facility="NORTH",
                disposition="03",
                discharged_to="SNF1",
                discharged_at="20261127100000",
            ),
        )
        hub.settle()
        mine = hub.rows(recipient="bh-a")
        assert [(r["kind"], r["status"]) for r in mine] == [
            ("ed_arrival", "suppressed"),
            ("admission", "suppressed"),
            ("transfer", "suppressed"),
            ("discharge", "queued"),
        ]
        assert {r["reason"] for r in mine[:3]} == {"prefers discharge notices only"}
        (mail,) = hub.mailbox.to(BH)
        assert mail.subject == "Discharge from NORTH"
        assert [m.subject.split(" ")[0] for m in hub.mailbox.to(PCP)] == [
            "ED",
            "Admission",
            "Transfer",
            "Discharge",
        ]
        (snf,) = hub.mailbox.to("intake@snf.test")  # the post-acute provider, on discharge
        assert snf.subject == "Discharge from NORTH"
        hub.assert_sent_with_receipt_times()


def test_the_post_acute_provider_is_not_sent_the_practices_follow_up_dues(
    care: Callable[..., Any],
) -> None:
    """A discharge home with home health (06) starts the practice's follow-up clocks; the home
    health agency hears of the discharge, not of the practice's deadlines. Full-detail emails
    give the date of birth, so a practice can tell two patients of one name apart."""
    with care() as hub:
        hub.send(
            adt("A01", "ADM1", cls="I"),
            adt(
                "A03",
                "DIS1",
                cls="I",
                disposition="06",
                discharged_to="SNF1",
                discharged_at="20261127100000",
            ),
        )
        hub.settle()
        discharge = hub.mailbox.to(PCP)[-1]
        assert discharge.subject == "Discharge from GENERAL"
        assert "Follow-up due: contact by" in discharge.body
        assert "Date of birth: 1960-01-01." in discharge.body
        (agency,) = hub.mailbox.to("intake@snf.test")
        assert "Follow-up due" not in agency.body and "No follow-up clock" not in agency.body


def test_member_asking_for_the_minimum_gets_no_diagnoses_by_email(
    care: Callable[..., Any],
) -> None:
    with care() as hub:
        hub.send(adt("A04", "ED1", patient="P400"))
        hub.settle()
        (mail,) = hub.mailbox.to("min@clinic.test")
        assert "Pat Tester" in mail.body
        assert "Chest pain" not in mail.body and "Diagnoses" not in mail.body


def test_daily_digest_holds_items_and_sends_one_digest(care: Callable[..., Any]) -> None:
    with care() as hub:
        hub.send(
            adt("A01", "ADM1", cls="I"),
            adt("A04", "ED3", patient="P300", visit="V3"),
            adt(
                "A03",
                "DIS1",
                cls="I",
                disposition="03",
                discharged_at="20261126100000",
            ),
        )
        hub.settle()
        held = hub.rows(recipient="cm-a")
        assert [(r["kind"], r["status"]) for r in held] == [
            ("admission", "digest"),
            ("ed_arrival", "digest"),
            ("discharge", "digest"),
        ]
        assert hub.mailbox.to(CM) == []
        before = len(hub.mailbox.mails)

        later = next_digest_time()
        hub.tick(later - timedelta(hours=1))  # before the digest hour: nothing yet
        assert hub.mailbox.to(CM) == []
        hub.tick(later)
        (digest,) = hub.mailbox.to(CM)
        assert digest.subject == "Daily care-transition digest (3 updates)"
        lines = [line for line in digest.body.splitlines() if line.startswith("- ")]
        assert len(lines) == 3
        # When each happened (PV1-44 admit, PV1-45 discharge), not when carehub heard of it.
        assert "2026-11-25 08:00: admission - Pat Tester at GENERAL" in lines[0]
        assert ": emergency department visit - Pat Tester at GENERAL" in lines[1]
        assert "2026-11-26 10:00: discharge - Pat Tester at GENERAL" in lines[2]
        digested = hub.rows(recipient="cm-a")
        assert {r["status"] for r in digested} == {"digested"}
        assert len({r["delivery_key"] for r in digested}) == 1

        hub.tick(later + timedelta(minutes=30))  # the same day again
        hub.tick(later + timedelta(days=1))  # and the next day: nothing new is held
        assert len(hub.mailbox.to(CM)) == 1
        digests = [m for m in hub.mailbox.mails if m.subject.startswith("Daily care-transition")]
        assert len(digests) == 1
        assert len(hub.mailbox.mails) >= before + 1
        hub.assert_sent_with_receipt_times()


def test_overdue_follow_up_alerts_the_care_coordinator_once(care: Callable[..., Any]) -> None:
    with care() as hub:
        hub.send(
            adt("A01", "ADM1", cls="I"),
            # Discharged home (01) on Monday 23 November 2026, 12:00 UTC.
            adt(
                "A03",
                "DIS1",
                cls="I",
                disposition="01",
                discharged_at="20261123120000+0000",
            ),
        )
        hub.settle()
        opened = hub.followups()
        assert [(f["kind"], f["status"]) for f in opened] == [
            ("contact", "open"),
            ("visit", "open"),
        ]
        contact_due = _aware(opened[0]["due_at"])
        visit_due = _aware(opened[1]["due_at"])
        assert contact_due.date().isoformat() == "2026-11-25"  # 2 business days
        assert visit_due.date().isoformat() == "2026-12-07"  # 14 days
        (discharge,) = [m for m in hub.mailbox.to(PCP) if m.subject.startswith("Discharge")]
        # Full detail (email): the disposition on its own line, and the due dates.
        body = discharge.body.replace("\r\n", "\n")
        assert "Discharged: 01 (home or self care)\n" in body
        assert "discharged from GENERAL on 2026-11-23 12:00 UTC." in body  # PV1-45, not MSH-7
        assert "Follow-up due: contact by 2026-11-25; visit by 2026-12-07" in discharge.body
        texts_before = len(hub.texts())
        mails_to_pcp = len(hub.mailbox.to(PCP))

        hub.tick(contact_due + timedelta(hours=1))
        alerts = hub.rows(kind="followup_overdue")
        assert [(r["recipient"], r["status"]) for r in alerts] == [("cc-a", "queued")]
        new = hub.texts()[texts_before:]
        assert len(new) == 1 and new[0]["to"] == CC_PHONE
        assert new[0]["text"].startswith("The interactive contact after Pat Tester's discharge")
        assert "due by 2026-11-25" in new[0]["text"]
        contact = hub.followups()[0]
        assert contact["status"] == "overdue" and contact["alerted_at"] is not None

        hub.tick(contact_due + timedelta(hours=2))  # a second tick: no second alert
        assert len(hub.rows(kind="followup_overdue")) == 1
        assert len(hub.texts()) == texts_before + 1

        hub.tick(visit_due + timedelta(hours=1))  # the visit is overdue too: one more alert
        hub.tick(visit_due + timedelta(hours=2))
        assert len(hub.rows(kind="followup_overdue")) == 2
        assert len(hub.texts()) == texts_before + 2
        assert "follow-up visit" in hub.texts()[-1]["text"]
        assert len(hub.mailbox.to(PCP)) == mails_to_pcp  # only coordinators are alerted
        hub.assert_sent_with_receipt_times()


def merge(control_id: str, surviving: str, retired: str) -> str:
    """An A40: ``retired`` (MRG-1) merged into ``surviving`` (PID-3)."""
    return (
        "\r".join(
            [
                f"MSH|^~\\&|ADT_APP|GENERAL|CAREHUB|CAREHUB|20261125090000||ADT^A40^ADT_A39|"
                f"{control_id}|P|2.5.1",
                "EVN|A40|20261125090000",
                f"PID|1||{surviving}^^^HOSP^MR||Tester^Pat||19600101|F",
                f"MRG|{retired}^^^HOSP^MR",
            ]
        )
        + "\r"
    )


def test_a_follow_up_moves_with_a_merge_and_alerts_the_survivors_coordinator(
    care: Callable[..., Any],
) -> None:
    """P900, on no roster, is discharged home: nobody is told, but the follow-up clock runs.
    An A40 then merges P900 into P100, whose roster lists coordinator cc-a. The follow-ups
    now belong to P100, and when the contact is overdue cc-a is alerted (the alert used to
    find no coordinator among those told of the visit, and reached nobody)."""
    with care() as hub:
        hub.send(
            adt("A01", "M-ADM", patient="P900", cls="I"),
            adt(
                "A03",
                "M-DIS",
                patient="P900",
                cls="I",
                disposition="01",
                discharged_at="20261123120000+0000",
            ),
        )
        hub.settle()
        assert [r["status"] for r in hub.rows(patient_key="HOSP|P900")] == []
        assert {f["patient_key"] for f in hub.followups()} == {"HOSP|P900"}
        assert hub.send(merge("M-MRG", "P100", "P900")) == ["AA"]
        hub.settle()
        assert {f["patient_key"] for f in hub.followups()} == {"HOSP|P100"}
        texts_before = len(hub.texts())

        contact_due = _aware(hub.followups()[0]["due_at"])
        hub.tick(contact_due + timedelta(hours=1))
        alerts = hub.rows(kind="followup_overdue")
        assert [(r["recipient"], r["status"]) for r in alerts] == [("cc-a", "queued")]
        new = hub.texts()[texts_before:]
        assert len(new) == 1 and new[0]["to"] == CC_PHONE
        hub.assert_sent_with_receipt_times()


def test_an_overdue_follow_up_of_an_opted_out_patient_alerts_nobody_and_says_why(
    care: Callable[..., Any],
) -> None:
    """P200 opted out on the roster: the roster's coordinator is not alerted either."""
    with care() as hub:
        hub.send(
            adt("A01", "O-ADM", patient="P200", cls="I"),
            adt(
                "A03",
                "O-DIS",
                patient="P200",
                cls="I",
                disposition="01",
                discharged_at="20261123120000+0000",
            ),
        )
        hub.settle()
        texts_before = len(hub.texts())
        contact_due = _aware(hub.followups()[0]["due_at"])
        hub.tick(contact_due + timedelta(hours=1))
        (alert,) = hub.rows(kind="followup_overdue")
        assert alert["status"] == "suppressed"
        assert "opted out" in alert["reason"]
        assert len(hub.texts()) == texts_before


def test_a_discharge_sent_as_an_a08_notifies_and_starts_the_follow_up_clock(
    care: Callable[..., Any],
) -> None:
    with care() as hub:
        hub.send(
            adt("A01", "U-ADM", cls="I"),
            adt(
                "A08",
                "U-DIS",
                cls="I",
                when="20261123130000",
                disposition="01",
                discharged_at="20261123120000+0000",
            ),
        )
        hub.settle()
        assert ("pcp-a", "discharge", "queued") in hub.decisions()
        assert [(f["kind"], f["status"]) for f in hub.followups()] == [
            ("contact", "open"),
            ("visit", "open"),
        ]


def test_an_opt_out_stated_at_registration_holds_when_the_discharge_leaves_pd1_12_empty(
    care: Callable[..., Any],
) -> None:
    """PD1-12 = Y on the ED registration, empty on the discharge: nobody is told of either.
    A later message that says N takes the opt-out back."""
    with care() as hub:
        hub.send(adt("A04", "OPT-1", opt_out="Y"), adt("A03", "OPT-2", disposition="01"))
        hub.settle()
        told = [(r, k) for r, k, status in hub.decisions() if status != "suppressed"]
        assert told == []
        reasons = {r["reason"] for r in hub.rows(kind="discharge")}
        assert any("PD1-12 = 'Y' in message" in (reason or "") for reason in reasons), reasons
        hub.send(adt("A04", "OPT-3", visit="V2", opt_out="N"))
        hub.settle()
        assert ("pcp-a", "ed_arrival", "queued") in hub.decisions()


def test_an_opt_out_moves_with_a_merge(care: Callable[..., Any]) -> None:
    with care() as hub:
        hub.send(adt("A04", "MO-1", patient="P900", opt_out="Y"))
        hub.send(merge("MO-2", "P100", "P900"))
        hub.send(adt("A04", "MO-3", visit="V7"))  # P100, PD1-12 empty
        hub.settle()
        ed = [r for r in hub.rows(kind="ed_arrival") if r["patient_key"] == "HOSP|P100"]
        assert ed and all(r["status"] == "suppressed" for r in ed), ed


def test_a_discharge_without_a_disposition_says_no_clock_started(care: Callable[..., Any]) -> None:
    with care() as hub:
        hub.send(adt("A01", "ND-1", cls="I"), adt("A03", "ND-2", cls="I"))
        hub.settle()
        (mail,) = [m for m in hub.mailbox.to(PCP) if m.subject.startswith("Discharge")]
        body = mail.body.replace("\r\n", "\n")
        assert "No follow-up clock started: no discharge disposition (PV1-36)" in body
        assert hub.followups() == []


def test_a_death_is_told_as_a_death(care: Callable[..., Any]) -> None:
    with care() as hub:
        hub.send(adt("A01", "EX-1", cls="I"), adt("A03", "EX-2", cls="I", disposition="20"))
        hub.settle()
        (mail,) = [m for m in hub.mailbox.to(PCP) if not m.subject.startswith("Admission")]
        assert mail.subject == "Death at GENERAL"
        body = mail.body.replace("\r\n", "\n")
        assert "Pat Tester died at GENERAL" in body and "Discharged: 20 (expired)" in body
        assert "No follow-up clock started" not in body and hub.followups() == []


def test_recipients_by_a_channel_the_notify_step_lacks_are_named_at_start(
    care: Callable[..., Any],
) -> None:
    """A roster member reached by fax (no fax channel on notify) would be suppressed on
    every notice; the start says so, naming the file, the channel and the fix."""
    fax = "P500,HOSP,,,fx-a,Fax Person,pcp,Clinic,,fax,+1-217-555-0199,immediate,"
    with care(roster=ROSTER + "\n" + fax) as hub:
        (warning,) = hub.running.hub.table.start_warnings
        assert "roster.csv reaches recipients by 'fax'" in warning
        assert "notify step has no 'fax' channel" in warning


def test_the_sample_routes_reach_every_recipient_they_list(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from carehub.cli import main

    config = Path(__file__).resolve().parents[1] / "config" / "carehub.yaml"
    result = CliRunner().invoke(
        main, ["routes", "check", "--offline", "--config", str(config), "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.output
