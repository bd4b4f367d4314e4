"""Which organisation a new referral goes to, on the shipped config over real sockets (a REF^I12
in over MLLP, the FHIR copy at a FHIR test server, the email at an SMTP server), and what
`carehub referrals show` and `list` then say about it.

- A referral that names an organisation whose directory services are none of them active goes
  there (the patient agreed to that one), with a warning on the referral saying so.
- A referral that names nobody never goes to a service that does not speak the patient's
  known language when one that speaks it matched; an unknown language changes nothing."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from click.testing import CliRunner

from carehub.cli import main
from carehub.referrals.state import list_referrals
from tests import test_referral_recipients as recipients
from tests.helpers_http import wait_for
from tests.test_referral_recipients import Loop, _owner, _referral

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FOOD_BANK_PRD = (
    "PRD|RT^Referred to provider^HL70286|Springfield Community Food Bank"
    "|900 Market St^^Springfield^IL^62703\r"
)
SOUTHTOWN_PRD = "PRD|RT^Referred to provider^HL70286|Southtown Pantry|1 Sample Rd^^Springfield^IL\r"
ADDRESS = "418 Birch Lane^^Springfield^IL^62704^USA"


loop = recipients.loop  # the shipped config on a running hub, with its stand-ins


def _cli(loop: Loop, *args: str) -> str:
    """`carehub ARGS` against the running hub's config and store."""
    hub = loop.running.hub
    assert hub.config.source is not None
    runner = CliRunner(env={"COLUMNS": "240"})
    result = runner.invoke(
        main,
        [
            *args,
            "--config",
            str(hub.config.source),
            *(("--data-dir", str(hub.data_dir)) if args[0] == "referrals" else ()),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.output)


def _recorded(loop: Loop) -> Any:
    wait_for(
        lambda: any(r.matches for r in list_referrals(loop.running.store.engine)),
        what="the matches kept on the referral",
    )
    (made,) = list_referrals(loop.running.store.engine)
    return made


def test_a_referral_naming_an_organisation_with_no_active_service_carries_a_warning(
    loop: Loop,
) -> None:
    text = _referral("T-ST-1", "RGH-ST-0001", replace={FOOD_BANK_PRD: SOUTHTOWN_PRD})
    assert loop.send(text) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    # It goes to the organisation the referral names, as any named referral does ...
    _, task = _owner(loop)
    assert task["owner"]["display"] == "Southtown Pantry"

    # ... and the referral says that the directory lists it as not taking anyone now.
    made = _recorded(loop)
    (named,) = [m for m in made.matches if m.get("rank") is None]
    assert named["organization"] == "Southtown Pantry"
    assert "temporarily closed" in named["warning"]
    assert any("temporarily closed" in reason for reason in named["reasons"])

    shown = _cli(loop, "referrals", "show", "RGH-ST-0001")
    assert "warning" in shown and "temporarily closed" in shown
    listed = _cli(loop, "referrals", "list")
    assert "Southtown Pantry" in listed and "not active in the directory" in listed
    as_json = json.loads(_cli(loop, "referrals", "show", "RGH-ST-0001", "--json"))
    assert any(m.get("warning") for m in as_json["referral"]["matches"])

    # The care coordinator hears at the next tick, not after response_hours (24 h here).
    loop.running.hub.table.tick(datetime.now(UTC) + timedelta(minutes=1))
    coordinator = "cc-team@riverside-cm.example.org"
    wait_for(lambda: loop.emails_to(coordinator), what="the coordinator's alert")
    (alert,) = loop.emails_to(coordinator)
    assert alert["Subject"] == "Referral sent to an inactive service"
    body = alert.get_content()
    assert "Southtown Pantry" in body and "temporarily closed" in body
    assert "no answer since" not in body


def test_a_referral_naming_an_active_organisation_has_no_warning(loop: Loop) -> None:
    assert loop.send(_referral("T-SC-1", "RGH-SC-0001")) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    made = _recorded(loop)
    assert not [m for m in made.matches if m.get("warning")]
    assert "not active in the directory" not in _cli(loop, "referrals", "list")


def _unnamed(control_id: str, referral_id: str, language: str) -> str:
    """Food and housing needs, nobody named, the patient at 62703 speaking ``language``."""
    return _referral(
        control_id,
        referral_id,
        replace={
            FOOD_BANK_PRD: "",
            ADDRESS: f"418 Birch Lane^^Springfield^IL^62703^USA||||{language}",
        },
    )


def test_nobody_named_goes_to_a_service_that_speaks_the_patients_language(loop: Loop) -> None:
    assert loop.send(_unnamed("T-EN-1", "RGH-EN-0001", "ENG^English^HL70296")) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    _, task = _owner(loop)
    # Family Support Navigator (Spanish only) serves both needs (109 points) but the patient
    # speaks English: the referral goes to the best service that does.
    assert task["owner"]["display"] != "Comunidad Unida Springfield"
    made = _recorded(loop)
    ranked = sorted(made.matches, key=lambda m: m["rank"])
    assert "speaks English" in ranked[0]["reasons"]
    assert task["owner"]["display"] == ranked[0]["organization"]
    (email,) = loop.settled("sdoh-referrals/notify-referral-email")
    assert email.metadata["recipient_name"] == ranked[0]["organization"]

    # Ranked after every service that may serve in English, with the reason, not dropped.
    search = _cli(
        loop,
        "resources",
        "search",
        "--need",
        "food",
        "--need",
        "housing",
        "--near",
        "62703",
        "--language",
        "English",
        "--max-results",
        "30",
        "--json",
    )
    matches = json.loads(search)["matches"]
    navigator = next(m for m in matches if m["service"] == "Family Support Navigator")
    assert navigator["rank"] == len(matches)
    assert navigator["score"] > matches[0]["score"]
    assert any("does not list English (lists Spanish)" in r for r in navigator["reasons"])
    assert any("ranked after" in r for r in navigator["reasons"])


def test_an_unknown_patient_language_changes_nothing(loop: Loop) -> None:
    assert loop.send(_unnamed("T-XX-1", "RGH-XX-0001", "TLH^Klingon^HL70296")) == "AA"
    loop.settled("sdoh-referrals/cbo-platform")
    _, task = _owner(loop)
    # The points decide, as when no language is known: the service serving both needs.
    assert task["owner"]["display"] == "Comunidad Unida Springfield"
    ranked = sorted(_recorded(loop).matches, key=lambda m: m["rank"])
    assert ranked[0]["service"] == "Family Support Navigator"
    assert not any("ranked after" in r for m in ranked for r in m["reasons"])
