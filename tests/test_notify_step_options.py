"""The notify and notify-referral steps refuse options that would quietly send more patient
detail than configured, or tell nobody: `carehub routes check` and `carehub serve` name the
route file and line, the step and the key, with the valid choices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import env_without_carehub
from tests.test_plugins import hub_config

#: Both commands load and bind every route before doing anything else.
COMMANDS = [["routes", "check", "--offline"], ["serve", "--mllp-port", "0", "--http-port", "0"]]

#: A care route's notify step; each test adds the options it is about (line 11 onwards).
NOTIFY = """\
routes:
  - name: care
    when: {type: ADT}
    steps:
      - translate: v2-to-event
      - notify:
          channels:
            email: {channel: email, host: smtp.example.org, sender: alerts@example.org}
            sms: {channel: sms, url: "http://127.0.0.1:9/"}
          digest_hour: 7
"""

#: A referral route's notify-referral step, the same way (line 9 onwards).
NOTIFY_REFERRAL = """\
routes:
  - name: referrals
    when: {type: REF}
    steps:
      - translate: v2-to-event
      - notify-referral:
          channels:
            email: {channel: email, host: smtp.example.org, sender: referrals@example.org}
"""

PROVIDERS = "providers: {}\nfacilities: {}\n"


def carehub(
    tmp_path: Path, routes: str, command: list[str]
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``command`` in a real process on a config folder holding ``routes`` (a serve that
    wrongly starts is stopped by the timeout); the process and the routes file."""
    config = hub_config(tmp_path / "config", routes, **{"providers.yaml": PROVIDERS})
    where = ["--config", str(config), "--data-dir", str(tmp_path / "data")]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "carehub.cli", *command, *where],
            capture_output=True,
            text=True,
            timeout=30,
            env=env_without_carehub(),
            cwd=tmp_path,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(command)} accepted the routes and kept running: {err.stdout!r}")
    return done, config.parent / "routes" / "routes.yaml"


def refused(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and "carehub ready" not in done.stdout
    return done.stderr


# -- notify ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_a_detail_for_a_channel_the_step_lacks_is_refused(
    tmp_path: Path, command: list[str]
) -> None:
    """`emial: minimum` would leave email at its default, the full text with diagnoses."""
    result, routes = carehub(tmp_path, NOTIFY + "          detail: {emial: minimum}\n", command)

    assert (
        f"{routes}:11: route 'care': steps[1].notify.detail: Value error, 'emial' is not a "
        "channel of this step (one of: email, sms)"
    ) in refused(result)


@pytest.mark.parametrize("command", COMMANDS)
def test_kinds_the_step_cannot_tell_are_refused_each_at_its_line(
    tmp_path: Path, command: list[str]
) -> None:
    routes_text = NOTIFY + "          kinds:\n            - admision\n            - discharge\n"
    routes_text += "            - ed_arival\n"
    result, routes = carehub(tmp_path, routes_text, command)

    errors = refused(result)
    choices = "(one of: ed_arrival, admission, transfer, discharge)"
    assert (
        f"{routes}:12: route 'care': steps[1].notify.kinds: kinds[0] 'admision' is not a kind "
        f"the notify step tells {choices}"
    ) in errors
    assert f"{routes}:14: route 'care': steps[1].notify.kinds: kinds[2] 'ed_arival'" in errors
    assert "'discharge'" not in errors


def test_a_notify_step_that_tells_no_kind_is_refused(tmp_path: Path) -> None:
    result, routes = carehub(tmp_path, NOTIFY + "          kinds: []\n", COMMANDS[0])

    assert (
        f"{routes}:11: route 'care': steps[1].notify.kinds: Value error, name at least one kind "
        "to tell (one of: ed_arrival, admission, transfer, discharge)"
    ) in refused(result)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_coordinator_role_the_roster_cannot_have_is_refused(
    tmp_path: Path, command: list[str]
) -> None:
    """Overdue follow-up alerts go to roster members in these roles: an unknown role is
    nobody."""
    routes_text = NOTIFY + "          coordinator_roles: [care_cordinator]\n"
    result, routes = carehub(tmp_path, routes_text, command)

    assert (
        f"{routes}:11: route 'care': steps[1].notify.coordinator_roles: coordinator_roles[0] "
        "'care_cordinator' is not a roster role (one of: pcp, care_coordinator, case_manager, "
        "behavioral_health, post_acute, specialist, other)"
    ) in refused(result)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_templates_folder_that_does_not_exist_is_refused(
    tmp_path: Path, command: list[str]
) -> None:
    """Else every notice would go out with the built-in texts instead of the site's."""
    result, routes = carehub(tmp_path, NOTIFY + "          templates: my-templatez/\n", command)

    missing = tmp_path / "config" / "my-templatez"
    assert (
        f"{routes}:7: route 'care': steps[1] (notify): templates: the folder {missing} does "
        "not exist"
    ) in refused(result)


def test_the_options_spelt_right_pass(tmp_path: Path) -> None:
    (tmp_path / "config" / "care-templates").mkdir(parents=True)
    routes_text = NOTIFY + (
        "          detail: {email: minimum, sms: minimum}\n"
        "          kinds: [admission, ed_arrival]\n"
        "          templates: care-templates\n"
        "          coordinator_roles: [care_coordinator, case_manager]\n"
    )
    done, _ = carehub(tmp_path, routes_text, COMMANDS[0])

    assert done.returncode == 0, done
    assert "ok: 1 route(s)" in done.stdout


# -- notify-referral ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_a_referral_templates_folder_that_does_not_exist_is_refused(
    tmp_path: Path, command: list[str]
) -> None:
    routes_text = NOTIFY_REFERRAL + (
        "          providers: providers.yaml\n          templates: referral-templatez\n"
    )
    result, routes = carehub(tmp_path, routes_text, command)

    missing = tmp_path / "config" / "referral-templatez"
    assert (
        f"{routes}:7: route 'referrals': steps[1] (notify-referral): templates: the folder "
        f"{missing} does not exist"
    ) in refused(result)


@pytest.mark.parametrize("command", COMMANDS)
def test_telling_organisations_without_an_email_channel_is_refused(
    tmp_path: Path, command: list[str]
) -> None:
    """Organisations are emailed: a misspelt email channel would tell none of them."""
    routes_text = NOTIFY_REFERRAL.replace("            email: {", "            emial: {")
    routes_text += "          providers: providers.yaml\n"
    result, routes = carehub(tmp_path, routes_text, command)

    assert (
        f"{routes}:7: route 'referrals': steps[1].notify-referral.tell: Value error, "
        "organisations are told by email, but the step has no 'email' channel (channels: "
        "emial); add one, or leave 'organization' out of tell"
    ) in refused(result)


def test_telling_referrers_without_a_provider_directory_is_refused(tmp_path: Path) -> None:
    """Referrers are found by NPI in the directory: without one, no referrer is ever told."""
    routes_text = NOTIFY_REFERRAL + "          tell: [referrer, organization]\n"
    result, routes = carehub(tmp_path, routes_text, COMMANDS[0])

    assert (
        f"{routes}:9: route 'referrals': steps[1].notify-referral.tell: Value error, referrers "
        "are found by NPI in the provider directory, but the step has no providers file"
    ) in refused(result)


def test_organisation_addresses_must_be_one_per_organisation_and_email(tmp_path: Path) -> None:
    routes_text = NOTIFY_REFERRAL + (
        "          providers: providers.yaml\n"
        "          organizations:\n"
        "            Springfield Food Bank: intake@foodbank.example.org\n"
        "            springfield food bank: other@foodbank.example.org\n"
        "            scfb: intake.foodbank.example.org\n"
    )
    result, routes = carehub(tmp_path, routes_text, COMMANDS[0])

    errors = refused(result)
    assert f"{routes}:11: route 'referrals': steps[1].notify-referral.organizations: " in errors
    assert "'scfb': 'intake.foodbank.example.org' is not an email address" in errors
    assert (
        "'Springfield Food Bank' and 'springfield food bank' name the same organisation (names "
        "compare case-insensitively) with different addresses"
    ) in errors
