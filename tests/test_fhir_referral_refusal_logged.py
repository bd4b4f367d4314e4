"""A referral the FHIR server refuses for good (HTTP 400 with an OperationOutcome) is logged and
shown by `carehub status` as the request and its status, like every HTTP channel's refusals;
what the server said, which can quote the referral, stays with the dead letter only. The
shipped config on a real hub: the REF^I12 in over MLLP, a FHIR test server that refuses it,
the `carehub` command line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from carehub.cli import main
from tests import test_referral_recipients as recipients
from tests.test_cli import env_without_carehub, plain
from tests.test_referral_recipients import Loop, _referral

loop = recipients.loop  # the shipped config on a running hub, with its stand-ins

SAID = "test server says 400"  # the OperationOutcome's diagnostics (FhirServer.outcome)


def test_a_refused_referral_is_logged_with_its_http_status_not_the_servers_words(
    loop: Loop, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="carehub")
    loop.fhir.fail_with = 400
    assert loop.send(_referral("RF-400", "R-RF400")) == "AA"
    (dead,) = loop.running.wait_for_deliveries(destination="sdoh-referrals/cbo-platform")
    assert dead.status == "dead"
    url = loop.fhir.base_url

    # The dead letter keeps what the server said, after carehub's own account of it.
    assert dead.last_error is not None
    assert dead.last_error.startswith(f"POST {url}: HTTP 400: ")
    assert SAID in dead.last_error
    # The log and `carehub status` keep the request and its status, not the server's words.
    assert dead.last_error_loggable == f"POST {url}: HTTP 400"
    logged = [
        r.getMessage() for r in caplog.records if "sdoh-referrals/cbo-platform" in r.getMessage()
    ]
    assert logged and all(f"POST {url}: HTTP 400" in line for line in logged), logged
    assert not any(SAID in r.getMessage() for r in caplog.records)

    shown = CliRunner().invoke(
        main,
        [
            "status",
            *("--config", str(tmp_path / "config" / "carehub.yaml")),
            *("--data-dir", str(tmp_path / "data")),
        ],
        env=env_without_carehub() | {"COLUMNS": "400"},
        catch_exceptions=False,
    )
    assert shown.exit_code == 0, shown.output
    (row,) = [
        line for line in plain(shown.output).splitlines() if "sdoh-referrals/cbo-platform" in line
    ]
    assert f"POST {url}: HTTP 400" in row
    assert SAID not in shown.output
