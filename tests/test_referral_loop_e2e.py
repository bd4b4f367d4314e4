"""The closed referral loop over real sockets, on a copy of the shipped config: a REF^I12 in
over MLLP, matched and sent to a FHIR server that validates it, the organisation's RRI
acceptance back over MLLP, its completion over carehub's HTTP API, and an illegal update
refused with the reason recorded."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from carehub.config import load_config
from carehub.hl7.ack import read_ack
from carehub.referrals.state import list_referrals, referral_timeline
from carehub.store.outbox import Outbox
from carehub.testing import HubThread, mllp_exchange
from tests.helpers_http import HTTPServer, on_this_host, wait_for
from tests.test_fhir_referrals import FhirServer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FEEDS = PROJECT_ROOT / "config" / "feeds"


@pytest.fixture
def loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[HubThread, FhirServer]]:
    for name in ("CAREHUB_CONFIG", "CAREHUB_DATA_DIR", "CAREHUB_STORE_URL", "CAREHUB_HTTP_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "config"
    shutil.copytree(PROJECT_ROOT / "config", folder)
    with FhirServer() as fhir, HTTPServer(respond=lambda _: 202) as elsewhere:
        monkeypatch.setenv("CBO_FHIR_URL", fhir.base_url)
        for name in ("CARE_PLATFORM_URL", "SMS_GATEWAY_URL"):
            monkeypatch.setenv(name, elsewhere.url("/"))
        monkeypatch.setenv("SMTP_PORT", "9")  # nothing here is emailed
        monkeypatch.setenv("CAREHUB_OUTBOX", str(tmp_path / "outbox"))
        config = load_config(folder / "carehub.yaml")
        on_this_host(config)  # the test moves the clock itself
        with HubThread(config, tmp_path / "data") as running:
            yield running, fhir


def send(running: HubThread, name: str) -> str:
    answer = mllp_exchange(running.mllp_address, [(FEEDS / name).read_bytes()])[0]
    return read_ack(answer.decode("utf-8", "replace"))[0]


def referral(running: HubThread, patient: str) -> object:
    found = [
        r for r in list_referrals(running.store.engine, limit=None) if r.patient_key == patient
    ]
    return found[0] if found else None


def test_a_referral_goes_out_is_accepted_and_closes(loop: tuple[HubThread, FhirServer]) -> None:
    running, fhir = loop
    assert send(running, "07-riverside-sdoh-referral.hl7") == "AA"
    wait_for(lambda: fhir.posts, what="the referral at the FHIR server", timeout=20)
    assert fhir.problems == []  # ServiceRequest and Task validated as FHIR R4 (R4B models)
    kinds = {e["resource"]["resourceType"] for e in fhir.posts[0]["entry"]}
    assert {"ServiceRequest", "Task"} <= kinds

    made = referral(running, "RGH|RG100234")
    assert made is not None and made.status == "requested"
    assert {n["category"] for n in made.needs} >= {"food", "housing"}
    assert made.matches and made.matches[0]["reasons"]  # ranked, each with its reasons

    assert send(running, "19-foodbank-referral-accepted.hl7") == "AA"
    wait_for(lambda: referral(running, "RGH|RG100234").status == "accepted", what="RRI applied")

    key = quote(made.referral_key, safe="")
    answer = httpx.post(
        f"{running.http_url}/referrals/{key}/status",
        json={"status": "completed", "note": "enrolled in the weekly food box"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    timeline = referral_timeline(running.store.engine, made.id)
    assert timeline is not None
    steps = [(e.source, e.to_status, e.accepted) for e in timeline.events]
    assert steps == [
        ("REF^I12", "requested", True),
        ("RRI^I12", "accepted", True),
        ("webhook", "completed", True),
    ]
    # The FHIR transaction went through: nothing for the platform is left pending.
    pending = Outbox(running.store).find(status="pending", limit=None)
    assert [d for d in pending if d.destination.endswith("cbo-platform")] == []

    # The referrer hears of each answer once: the RRI through its route, the HTTP update
    # from the periodic work (run twice here: still once).
    def referrer_notices() -> list[str]:
        return sorted(
            d.metadata["subject"]
            for d in Outbox(running.store).find(limit=None)
            if d.metadata.get("to") == "haddad@riverside-gh.example.org"
        )

    wait_for(lambda: len(referrer_notices()) == 1, what="the acceptance told to the referrer")
    running.hub.table.tick(datetime.now(UTC))
    running.hub.table.tick(datetime.now(UTC))
    assert [s.split(" by ")[0] for s in referrer_notices()] == [
        f"Referral {made.referral_key.split('|', 1)[-1]} accepted",  # the id as written
        f"Referral {made.referral_key.split('|', 1)[-1]} completed",
    ]


def test_an_update_after_the_loop_closed_is_refused_with_its_reason(
    loop: tuple[HubThread, FhirServer],
) -> None:
    running, _ = loop
    assert send(running, "20-lakeview-transport-referral.hl7") == "AA"
    wait_for(lambda: referral(running, "LMC|LM-448807") is not None, what="the referral stored")
    made = referral(running, "LMC|LM-448807")
    key = quote(made.referral_key, safe="")
    assert (
        httpx.post(
            f"{running.http_url}/referrals/{key}/status", json={"status": "cancelled"}, timeout=10
        ).status_code
        == 200
    )
    refused = httpx.post(
        f"{running.http_url}/referrals/{key}/status", json={"status": "completed"}, timeout=10
    )
    assert refused.status_code == 409
    assert "cancelled" in refused.text
    last = referral_timeline(running.store.engine, made.id).events[-1]
    assert (last.to_status, last.accepted) == ("completed", False)
    assert last.reason and "cancelled" in last.reason
    unknown = httpx.post(
        f"{running.http_url}/referrals/{quote('LMC|NOPE', safe='')}/status",
        json={"status": "accepted"},
        timeout=10,
    )
    assert unknown.status_code == 404
    # A body far larger than any status update is refused unread, and changes nothing.
    oversized = httpx.post(
        f"{running.http_url}/referrals/{key}/status",
        json={"status": "accepted", "note": "x" * 200_000},
        timeout=10,
    )
    assert oversized.status_code == 413 and "at most 65536 bytes" in oversized.text
    assert referral_timeline(running.store.engine, made.id).events[-1] == last
