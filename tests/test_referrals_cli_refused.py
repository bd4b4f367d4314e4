"""`carehub referrals refused` lists the referral updates carehub refused (a REF with no
referral id, an answer to a referral it does not know), with when, the message's store id and
MSH-10, and why: ids only, nothing of the patient. Messages sent over MLLP to the shipped
config, read back with the CLI."""

from __future__ import annotations

import json
import re

from click.testing import CliRunner, Result

from carehub.cli import main
from carehub.referrals.state import refused_referral_events
from tests import test_referral_recipients as recipients
from tests.helpers_http import wait_for
from tests.test_referral_recipients import Loop, _referral

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
UNKNOWN_ANSWER = (
    "MSH|^~\\&|SCFB_REFERRALS|SPRINGFIELD_FOOD_BANK|CAREHUB|CAREHUB|20261128093000-0600||"
    "RRI^I12^RRI_I12|SCFB-UNK-1|P|2.5|||AL|NE\r"
    "MSA|AA|RGH-REF-0000\r"
    "RF1|A^Accepted^HL70283|R^Routine^HL70280|SO^Social services^HL70281|||RGH-R-NOBODY\r"
    "PID|1||RG100234^^^RGH^MR||Okafor^Amara^N||19580312|F\r"
)


loop = recipients.loop  # the shipped config on a running hub, with its stand-ins


def _refused(loop: Loop, *args: str) -> Result:
    hub = loop.running.hub
    assert hub.config.source is not None
    runner = CliRunner(env={"COLUMNS": "240"})
    return runner.invoke(
        main,
        [
            *("referrals", "refused", *args),
            *("--config", str(hub.config.source), "--data-dir", str(hub.data_dir)),
        ],
        catch_exceptions=False,
    )


def test_refused_lists_updates_tied_to_no_referral_with_ids_only(loop: Loop) -> None:
    engine = loop.running.store.engine
    loop.send(_referral("T-NOID-1", "RGH-R-2026-0042", replace={"|RGH-R-2026-0042|": "||"}))
    loop.send(UNKNOWN_ANSWER)
    wait_for(lambda: len(refused_referral_events(engine)) >= 2, what="two refused updates")

    table = _refused(loop)
    assert table.exit_code == 0, table.output
    text = ANSI.sub("", table.output)
    assert "T-NOID-1" in text and "SCFB-UNK-1" in text  # each message by its MSH-10
    assert "no referral id" in text  # and why it was refused
    assert "2 refused referral update(s)" in text
    for phi in ("RG100234", "Okafor", "Amara", "19580312", "Birch"):
        assert phi not in text, phi

    rows = [json.loads(line) for line in _refused(loop, "--json").output.splitlines()]
    assert {r["control_id"] for r in rows} == {"T-NOID-1", "SCFB-UNK-1"}
    assert all(r["message_id"] and r["reason"] for r in rows)
    assert rows == sorted(rows, key=lambda r: r["id"], reverse=True)  # newest first
    assert all(r["referral_id"] is None for r in rows)
    for phi in ("RG100234", "Okafor", "19580312"):
        assert phi not in json.dumps(rows), phi

    later = _refused(loop, "--since", "2999-01-01T00:00")
    assert "0 refused referral update(s)" in ANSI.sub("", later.output)
    recent = _refused(loop, "--since", "1h", "--unattached", "--json")
    assert len(recent.output.splitlines()) == 2
    wrong = _refused(loop, "--since", "yesterday")
    assert wrong.exit_code != 0 and "--since" in wrong.output
