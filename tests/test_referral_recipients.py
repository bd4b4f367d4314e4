"""Who receives a closed-loop referral, and what they get, on the shipped config over real
sockets: a REF^I12 in over MLLP, the FHIR copy at a FHIR test server that validates it, the
organisation's email at an aiosmtpd server, answers back over MLLP, a FHIR Task poll and HTTP.

The organisation the referral names gets both copies (never a higher-ranked other one), at the
address the directory lists; only the Z codes of the need it serves; a consent line that says
what is known; a referral nobody is responsible for is held; the referrer hears who answered."""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from aiosmtpd.controller import Controller

from carehub.config import HubConfig, load_config
from carehub.hl7.ack import read_ack
from carehub.referrals.state import list_referrals
from carehub.store.outbox import Outbox
from carehub.store.store import MessageStore
from carehub.testing import HubThread, mllp_exchange
from tests import test_fhir_referrals as fhir_tests
from tests.helpers_http import HTTPServer, on_this_host, wait_for
from tests.test_fhir_referrals import FhirServer
from tests.test_referral_notices import _Inbox

# Fixtures: a FHIR test server and a migrated SQLite store.
fhir_server, store = fhir_tests.fhir_server, fhir_tests.store

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FEEDS = PROJECT_ROOT / "config" / "feeds"
FEED_07 = (FEEDS / "07-riverside-sdoh-referral.hl7").read_text().replace("\n", "\r")
SCFB = "Springfield Community Food Bank"
SCFB_ID = "ea27667f-de6b-5901-a714-1772c2e2cca2"  # its HSDS organization id (directory.json)
REFERRER = "haddad@riverside-gh.example.org"


@dataclass
class Loop:
    running: HubThread
    fhir: FhirServer
    inbox: _Inbox

    def send(self, text: str) -> str:
        answer = mllp_exchange(self.running.mllp_address, [text.encode()])[0]
        return read_ack(answer.decode("utf-8", "replace"))[0]

    def deliveries(self, destination: str) -> list[Any]:
        """The settled deliveries to ``destination``: sent, or with nothing to send."""
        return [
            d
            for d in Outbox(self.running.store).find(limit=None)
            if d.destination == destination and d.status in ("delivered", "skipped")
        ]

    def settled(self, destination: str, count: int = 1) -> list[Any]:
        wait_for(
            lambda: len(self.deliveries(destination)) >= count,
            timeout=20,
            what=f"{count} deliveries to {destination}",
        )
        return self.deliveries(destination)

    def created(self, kind: str) -> list[dict[str, Any]]:
        return [r for k, r in self.fhir.resources.items() if k.startswith(f"{kind}/")]

    def emails_to(self, address: str) -> list[EmailMessage]:
        return [m for rcpts, m in self.inbox.messages if address in rcpts]


@contextlib.contextmanager
def referral_loop(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    adjust: Callable[[HubConfig], None] | None = None,
) -> Iterator[Loop]:
    """The shipped config running with a FHIR test server, an SMTP server and a sink for the
    other HTTP destinations; ``adjust`` changes the config before the hub starts."""
    for name in ("CAREHUB_CONFIG", "CAREHUB_DATA_DIR", "CAREHUB_STORE_URL", "CAREHUB_HTTP_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "config"
    shutil.copytree(PROJECT_ROOT / "config", folder)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        smtp_port = probe.getsockname()[1]
    inbox = _Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        with FhirServer() as fhir, HTTPServer(respond=lambda _: 202) as elsewhere:
            monkeypatch.setenv("CBO_FHIR_URL", fhir.base_url)
            for name in ("CARE_PLATFORM_URL", "SMS_GATEWAY_URL"):
                monkeypatch.setenv(name, elsewhere.url("/"))
            monkeypatch.setenv("SMTP_PORT", str(smtp_port))
            monkeypatch.setenv("CAREHUB_OUTBOX", str(tmp_path / "outbox"))
            config = load_config(folder / "carehub.yaml")
            on_this_host(config)  # the test moves the clock itself
            if adjust is not None:
                adjust(config)
            with HubThread(config, tmp_path / "data") as running:
                yield Loop(running, fhir, inbox)
    finally:
        controller.stop()


@pytest.fixture
def loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Loop]:
    with referral_loop(tmp_path, monkeypatch) as running:
        yield running


def _referral(
    control_id: str, referral_id: str, *, replace: dict[str, str] | None = None, extra: str = ""
) -> str:
    """Feed 07 (Amara Okafor, food and housing, to the food bank) as a new referral."""
    text = FEED_07.replace("|RGH-REF-7001|", f"|{control_id}|").replace(
        "|RGH-R-2026-0042|", f"|{referral_id}|"
    )
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    return text.rstrip("\r\n") + "\r" + extra


def _owner(loop: Loop) -> tuple[dict[str, Any], dict[str, Any]]:
    (request,) = loop.created("ServiceRequest")
    (task,) = loop.created("Task")
    return request, task


def test_the_named_organisation_gets_both_copies_at_its_directory_address(loop: Loop) -> None:
    assert loop.send(FEED_07) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    request, task = _owner(loop)
    assert loop.fhir.problems == []
    # The FHIR copy goes to the organisation the referral names, not a higher-ranked other one.
    assert task["owner"]["display"] == SCFB
    assert task["owner"]["identifier"]["value"] == SCFB_ID
    assert request["performer"] == [task["owner"]]

    # The email goes to the same organisation, at the address its directory entry lists.
    (email,) = loop.settled("sdoh-referrals/notify-referral-email")
    address = email.metadata["to"]
    assert address.endswith("@scfb.example.org") and address != "intake@scfb.example.org"
    wait_for(lambda: loop.emails_to(address), what="the email at the SMTP server")
    (message,) = loop.emails_to(address)
    assert message["Subject"].startswith("New referral RGH-R-2026-0042")

    # Nothing in the referral states consent, and the FHIR copy says so: so does the email.
    text = message.get_content()
    assert "agreed to this referral" not in text
    assert "Consent: NOT STATED." in text
    assert "not stated" in request["note"][0]["text"]


def test_only_the_z_codes_of_the_need_the_organisation_serves_are_sent(loop: Loop) -> None:
    sensitive = (
        "DG1|3||Z62.810^Personal history of physical and sexual abuse in childhood^I10"
        "||20261127|F\r"
        "DG1|4||Z65.1^Imprisonment and other incarceration^I10||20261127|F\r"
        "DG1|5||Z63.0^Problems in relationship with spouse or partner^I10||20261127|F\r"
        "DG1|6||F32.9^Major depressive disorder, single episode^I10||20261127|F\r"
    )
    assert loop.send(_referral("T-ZC-1", "RGH-ZC-0001", extra=sensitive)) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    request, _ = _owner(loop)
    # A food referral to a food bank: the food need's code, not housing, abuse or prison.
    assert [c["coding"][0]["code"] for c in request["reasonCode"]] == ["Z59.41"]
    sdoh = [c["coding"][0]["code"] for c in request["category"][1:]]
    assert sdoh == ["food-insecurity"]
    sent = str(loop.fhir.posts)
    for code in ("Z59.811", "Z62.810", "Z65.1", "Z63.0", "F32.9"):
        assert code not in sent, code


def test_a_referral_with_no_need_and_no_named_organisation_is_held(loop: Loop) -> None:
    nobody = _referral(
        "T-NO-1",
        "RGH-NO-0001",
        replace={
            "Food and housing support after discharge": "Please help",
            "PRD|RT^Referred to provider^HL70286|Springfield Community Food Bank"
            "|900 Market St^^Springfield^IL^62703\r": "",
            "DG1|1||Z59.41^Food insecurity^I10||20261127|F\r": "",
            "DG1|2||Z59.811^Housing instability, housed, with risk of homelessness^I10"
            "||20261127|F": "",
        },
    )
    assert loop.send(nobody) == "AA"
    (held,) = loop.settled("sdoh-referrals/cbo-platform")
    assert held.status == "skipped"
    assert held.receipt.startswith("no community organisation chosen")
    assert loop.fhir.posts == []  # the patient's details went nowhere
    emails = [
        d
        for d in Outbox(loop.running.store).find(limit=None)
        if d.destination == "sdoh-referrals/notify-referral-email"
    ]
    assert emails == []  # nor by email: nobody to send it to


def test_the_referrer_hears_who_answered_not_whom_the_referral_named(loop: Loop) -> None:
    assert loop.send(FEED_07) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    # Another pantry answers (its own RRI, naming nobody in PRD): it is the one named.
    answer = (
        "MSH|^~\\&|EASTSIDE_REF|EASTSIDE_PANTRY|CAREHUB|CAREHUB|20261128093000-0600||"
        "RRI^I12^RRI_I12|EP-1|P|2.5|||AL|NE\r"
        "MSA|AA|RGH-REF-7001\r"
        "RF1|A^Accepted^HL70283|R^Routine^HL70280|SO^Social services^HL70281|||RGH-R-2026-0042\r"
        "PID|1||RG100234^^^RGH^MR||Okafor^Amara^N||19580312|F\r"
        "NTE|1||Eastside will call the patient\r"
    )
    assert loop.send(answer) == "AA"
    (told,) = loop.settled("referral-updates/notify-referral-email")
    assert told.metadata["to"] == REFERRER
    assert told.metadata["subject"] == "Referral RGH-R-2026-0042 accepted by EASTSIDE_PANTRY"


def test_a_status_call_answers_without_the_patients_identifier(loop: Loop) -> None:
    assert loop.send(FEED_07) == "AA"
    wait_for(lambda: list_referrals(loop.running.store.engine), what="the referral stored")
    (made,) = list_referrals(loop.running.store.engine)
    answer = httpx.post(
        f"{loop.running.http_url}/referrals/{quote(made.referral_key, safe='')}/status",
        json={"status": "received"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert "patient_key" not in answer.json()
    assert "RG100234" not in answer.text and "Okafor" not in answer.text
    refused = httpx.post(
        f"{loop.running.http_url}/referrals/{quote(made.referral_key, safe='')}/status",
        json={"status": "requested"},
        timeout=10,
    )
    assert refused.status_code == 409
    assert "RG100234" not in refused.text


def test_a_polled_answer_names_the_tasks_owner_and_carries_its_note(
    fhir_server: FhirServer, tmp_path: Path, store: MessageStore
) -> None:
    work = fhir_tests.tracked_work(tmp_path, store)
    channel = fhir_tests.channel_for(fhir_server.base_url, tmp_path, store, poll_minutes=0)
    assert fhir_tests.send(channel, channel.render(work, "carehub-1-1-abc")) == [
        "HTTP 200 Task/103"
    ]
    (task,) = [r for k, r in fhir_server.resources.items() if k.startswith("Task/")]
    task["owner"]["display"] = "Eastside Neighbors Pantry"  # the platform reassigned it
    fhir_server.task_statuses = ["rejected"]
    (rejected,) = channel.poll()
    assert rejected.answered_by == "Eastside Neighbors Pantry"
    assert rejected.answer_note == "outside our service area"
