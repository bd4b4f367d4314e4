"""`carehub referrals list --patient` follows merges, as `followups list` does: after an A40
retires the identifier a referral was placed under, that identifier (bare or with its
authority, as paperwork carries it) still finds the referral, now filed under the survivor.
The shipped config on a real hub over MLLP; the command line against its store."""

from __future__ import annotations

import json

from tests import test_referral_recipients as recipients
from tests.helpers_http import wait_for
from tests.test_referral_early_updates import _cli
from tests.test_referral_recipients import Loop, _referral
from tests.test_referral_state_records import MERGE, RETIRED, _patient_of

loop = recipients.loop  # the shipped config on a running hub, with its stand-ins


def _listed(loop: Loop, *args: str) -> list[tuple[str, str]]:
    """(referral key, patient key) of each referral `referrals list --json ARGS` shows."""
    out = _cli(loop, "referrals", "list", "--json", *args)
    return [
        (row["referral_key"], row["patient_key"])
        for row in (json.loads(line) for line in out.splitlines() if line.strip())
    ]


def test_a_retired_patient_id_lists_the_referrals_filed_under_its_survivor(loop: Loop) -> None:
    assert loop.send(_referral("T-LM-1", "R-LM-1", replace=RETIRED)) == "AA"
    assert loop.send(_referral("T-LM-2", "R-LM-2")) == "AA"  # another patient's (RG100234)
    wait_for(lambda: _patient_of(loop, "R-LM-1") == "RGH|RG100299", what="the referral stored")
    assert loop.send(MERGE) == "AA"  # A40: RG100299 retired into RG100236
    wait_for(lambda: _patient_of(loop, "R-LM-1") == "RGH|RG100236", what="the merge applied")

    moved = [("RIVERSIDE_GH|R-LM-1", "RGH|RG100236")]
    assert _listed(loop, "--patient", "RG100299") == moved
    assert _listed(loop, "--patient", "RGH|RG100299") == moved
    assert _listed(loop, "--patient", "RG100236") == moved
    assert _listed(loop, "--patient", "RG100234") == [("RIVERSIDE_GH|R-LM-2", "RGH|RG100234")]
    assert _listed(loop, "--patient", "RG100298") == []
    assert "merged ids follow" in " ".join(_cli(loop, "referrals", "list", "--help").split())
