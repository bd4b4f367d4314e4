"""A community organisation's own token for the referral status API: it answers only for the
referrals sent to that organisation, is recorded as that organisation's answer (so the referrer
hears who answered), and opens nothing else (not HL7 intake). On the shipped config, over real
sockets: MLLP and HTTP in, an aiosmtpd server for the referrer's email, a FHIR test server."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from carehub.config import HubConfig, load_config
from carehub.errors import ConfigError
from carehub.referrals.state import list_referrals
from carehub.store.outbox import Outbox
from tests.helpers_http import wait_for
from tests.test_referral_recipients import FEED_07, REFERRER, SCFB, Loop, referral_loop

HOSPITAL = "hospital-intake-token"
FOOD_BANK = "food-bank-token"
PANTRY = "pantry-token"


def _with_tokens(config: HubConfig) -> None:
    config.listeners.http.tokens = [HOSPITAL]
    config.listeners.http.organization_tokens = {
        SCFB: FOOD_BANK,
        "Eastside Neighbors Pantry": PANTRY,
    }


@pytest.fixture
def loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Loop]:
    """The referral loop of test_referral_recipients, with intake and organisation tokens."""
    with referral_loop(tmp_path, monkeypatch, _with_tokens) as running:
        yield running


def _status(loop: Loop, key: str, token: str | None, status: str = "accepted") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(
        f"{loop.running.http_url}/referrals/{quote(key, safe='')}/status",
        json={"status": status, "note": "intake call booked"},
        headers=headers,
        timeout=10,
    )


def _referral_key(loop: Loop) -> str:
    assert loop.send(FEED_07) == "AA"
    found = wait_for(lambda: list_referrals(loop.running.store.engine), what="the referral")
    return str(found[0].referral_key)


def test_the_organisation_answers_its_own_referral_and_the_referrer_hears_its_name(
    loop: Loop,
) -> None:
    key = _referral_key(loop)
    answer = _status(loop, key, FOOD_BANK)
    assert answer.status_code == 200, answer.text
    assert answer.json()["answered_by"] == SCFB
    loop.running.hub.table.tick(datetime.now(UTC))  # answers over HTTP are told on the tick
    wait_for(lambda: loop.emails_to(REFERRER), what="the referrer's email")
    (told,) = loop.emails_to(REFERRER)
    assert told["Subject"] == f"Referral RGH-R-2026-0042 accepted by {SCFB}"
    assert "intake call booked" in told.get_content()


def test_another_organisation_cannot_answer_for_it(loop: Loop) -> None:
    key = _referral_key(loop)
    refused = _status(loop, key, PANTRY, "rejected")
    assert refused.status_code == 404
    assert "RG100234" not in refused.text and "Okafor" not in refused.text
    (referral,) = list_referrals(loop.running.store.engine)
    assert referral.status == "requested"  # unchanged, and nothing claimed on its timeline
    assert _status(loop, key, FOOD_BANK).status_code == 200  # the one it went to may


def test_an_organisation_token_opens_no_hl7_intake(loop: Loop) -> None:
    for token in (FOOD_BANK, PANTRY):
        posted = httpx.post(
            f"{loop.running.http_url}/hl7",
            content=FEED_07.encode(),
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "x-application/hl7-v2+er7",
            },
            timeout=10,
        )
        assert posted.status_code == 401
    assert loop.running.store.get(1) is None


def test_intake_tokens_still_answer_for_any_referral_and_none_is_refused(loop: Loop) -> None:
    key = _referral_key(loop)
    assert _status(loop, key, None).status_code == 401
    assert _status(loop, key, "not-a-token").status_code == 401
    answered = _status(loop, key, HOSPITAL, "received")
    assert answered.status_code == 200
    assert answered.json()["answered_by"] is None  # a system: it does not say who


def _http_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "carehub.yaml"
    path.write_text(f"listeners:\n  http:\n{body}")
    return path


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (
            "    tokens: [same]\n    organization_tokens: {Food Bank: same}\n",
            "is also an intake token",
        ),
        (
            "    organization_tokens: {Food Bank: '', Pantry: b}\n",
            "the token of 'Food Bank' is empty",
        ),
        (
            "    organization_tokens: {Food Bank: t, Pantry: t}\n",
            "'Food Bank' and 'Pantry' have the same token",
        ),
        (
            "    organization_tokens: {Food Bank: a}\n",
            "organisations have tokens but intake has none",
        ),
    ],
)
def test_organisation_tokens_that_would_open_too_much_are_config_errors(
    tmp_path: Path, body: str, said: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(_http_config(tmp_path, body))
    assert said in str(raised.value)
    assert "listeners.http" in str(raised.value)


def test_an_organisation_token_given_to_intake_by_the_environment_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAREHUB_HTTP_TOKENS", "hospital,food")
    body = "    tokens: [other]\n    organization_tokens: {Food Bank: food}\n"
    with pytest.raises(ConfigError) as raised:
        load_config(_http_config(tmp_path, body))
    assert "the token of 'Food Bank' is also an intake token ($CAREHUB_HTTP_TOKENS)" in str(
        raised.value
    )
    assert "carehub.yaml:4: listeners.http.organization_tokens" in str(raised.value)


def test_a_bare_id_two_senders_used_is_refused_not_a_server_error(
    loop: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    """Two hospitals' referrals with the same RF1-6: an organisation asking by the bare id
    learns nothing (404, as for any referral not sent to it); a trusted system is told why
    (409). Refusals are logged once a minute per organisation, not once per call."""
    _referral_key(loop)
    other = FEED_07.replace("RIVERSIDE_GH", "NORTHSIDE_CL").replace("RGH-REF-7001", "NS-1")
    assert loop.send(other) == "AA"
    wait_for(lambda: len(list_referrals(loop.running.store.engine)) == 2, what="two referrals")
    bare = "RGH-R-2026-0042"
    for _ in range(3):
        assert _status(loop, bare, PANTRY).status_code == 404
    assert _status(loop, bare, FOOD_BANK).status_code == 404
    system = _status(loop, bare, HOSPITAL)
    assert system.status_code == 409
    assert "used by 2 senders" in system.json()["error"]
    refusals = [r for r in caplog.records if "referral status call refused" in r.getMessage()]
    assert len(refusals) == 2  # one for each organisation, however often it asks


def test_a_modify_that_ranks_the_directory_again_gives_nobody_else_the_referral(
    loop: Loop,
) -> None:
    """The referral named nobody and went to the top match; a modify (the patient moved) ranks
    the directory again with another organisation on top: that one still cannot answer it."""
    unnamed = (
        FEED_07.replace(
            "PRD|RT^Referred to provider^HL70286|Springfield Community Food Bank"
            "|900 Market St^^Springfield^IL^62703\r",
            "",
        )
        .replace("Food and housing support after discharge", "Food support")
        .replace(
            "\rDG1|2||Z59.811^Housing instability, housed, with risk of homelessness^I10"
            "||20261127|F",
            "",
        )
    )
    assert loop.send(unnamed) == "AA"
    (email,) = loop.settled("sdoh-referrals/notify-referral-email")
    holder = email.metadata["recipient_name"]
    (made,) = list_referrals(loop.running.store.engine)
    moved = (
        unnamed.replace("REF^I12^REF_I12", "REF^I13^REF_I12")
        .replace("RGH-REF-7001", "RGH-REF-7002")
        .replace("418 Birch Lane^^Springfield^IL^62704", "77 New St^^Springfield^IL^62702")
        .replace("R^Routine^HL70280", "A^ASAP^HL70280")
    )
    assert loop.send(moved) == "AA"
    loop.settled("referral-changes/referral-updates")
    modify = max(m.id for m in loop.running.store.find(limit=None))
    outbox = Outbox(loop.running.store)
    (ranked,) = [s.output for s in outbox.steps(modify) if s.step == "enrich community-resources"]
    top = ranked["matches"][0]["organization"]
    assert top != holder  # the modify's own ranking put another organisation first
    tokens = {SCFB: FOOD_BANK, "Eastside Neighbors Pantry": PANTRY}
    assert {holder, top} == set(tokens)
    assert _status(loop, made.referral_key, tokens[top]).status_code == 404
    assert _status(loop, made.referral_key, tokens[holder]).status_code == 200


def test_an_answer_that_does_not_say_who_gave_it_reads_as_a_sentence(loop: Loop) -> None:
    """A trusted system's call names no organisation: the referrer reads whom the referral is
    with, said as that rather than as who answered, as a sentence."""
    key = _referral_key(loop)
    assert _status(loop, key, HOSPITAL).status_code == 200
    loop.running.hub.table.tick(datetime.now(UTC))
    wait_for(lambda: loop.emails_to(REFERRER), what="the referrer's email")
    (told,) = loop.emails_to(REFERRER)
    holder = f"{SCFB} (the organisation the referral is with)"
    assert told["Subject"].endswith(f"accepted by {holder}")
    assert f"{holder} has accepted your referral" in told.get_content()
