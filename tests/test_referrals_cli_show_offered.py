"""`carehub referrals show` says what the patient was offered and why, in its table view as in
--json: the needs found (and from what), and each service kept on the referral with its rank,
score and reasons. A referral sent over MLLP to the shipped config, read back with the CLI."""

from __future__ import annotations

import re

from click.testing import CliRunner

from carehub.cli import main
from carehub.referrals.state import list_referrals
from tests import test_referral_recipients as recipients
from tests.helpers_http import wait_for
from tests.test_referral_recipients import FEED_07, Loop

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


loop = recipients.loop  # the shipped config on a running hub, with its stand-ins


def _show(loop: Loop, referral: str) -> str:
    hub = loop.running.hub
    assert hub.config.source is not None
    runner = CliRunner(env={"COLUMNS": "240"})
    result = runner.invoke(
        main,
        [
            *("referrals", "show", referral),
            *("--config", str(hub.config.source), "--data-dir", str(hub.data_dir)),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.output)


def test_show_lists_the_needs_and_the_ranked_services_with_their_reasons(loop: Loop) -> None:
    assert loop.send(FEED_07) == "AA"
    wait_for(
        lambda: any(r.matches for r in list_referrals(loop.running.store.engine)),
        what="the matches kept on the referral",
    )
    (made,) = list_referrals(loop.running.store.engine)
    text = _show(loop, "RGH-R-2026-0042")

    needs = text[text.index("Needs") : text.index("Offered")]
    assert "Food insecurity: diagnosis Z59.41 Food insecurity" in needs
    assert "diagnosis Z59.811 Housing instability" in needs

    offered = text[text.index("Offered") : text.index("Timeline")]
    assert "rank" in offered and "reasons" in offered
    lines = offered.splitlines()
    for match in made.matches:
        row = next(line for line in lines if line.strip().startswith(str(match["rank"]) + " "))
        assert str(match["score"]) in row
        assert f"{match['organization']} / {match['service']}" in row
        for reason in match["reasons"]:
            assert reason in offered, reason
    assert "organization named in the referral (referred-to)" in offered
    assert "warning" not in text.casefold()
