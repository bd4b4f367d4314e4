"""`messages reprocess` of referral messages counts as queued only what will be sent: a notice
the referral's state suppresses (the referrer was told by the first run, the referral is
cancelled already) and a FHIR copy with nothing to send are said apart, with why, in the
printed line and in the audit row's counts. The shipped config on a real hub over MLLP, an
aiosmtpd server and a FHIR test server, the `carehub` command line through CliRunner."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from carehub.cli import main
from carehub.store.outbox import DeliveryRecord, Outbox
from tests import test_referral_recipients as recipients
from tests.helpers_http import wait_for
from tests.test_referral_early_updates import CANCEL, _message, _referral_of
from tests.test_referral_recipients import REFERRER, Loop, _referral
from tests.test_referral_state_answers import _answer

loop = recipients.loop  # the shipped config on a running hub, with its stand-ins

LINE = re.compile(r"message (\d+) \(run 2\): [^;]+; (\d+) deliveries queued(?:, (\d+) suppressed)?")


def _reprocess(tmp_path: Path, message_id: int) -> tuple[int, int, str]:
    """`carehub messages reprocess ID`: the queued and suppressed counts it prints, and its
    line."""
    result = CliRunner(env={"COLUMNS": "400"}).invoke(
        main,
        [
            *("messages", "reprocess", str(message_id), "--by", "tester"),
            *("--config", str(tmp_path / "config" / "carehub.yaml")),
            *("--data-dir", str(tmp_path / "data")),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    (line,) = [text for text in result.stdout.splitlines() if LINE.match(text)]
    found = LINE.match(line)
    assert found is not None and int(found[1]) == message_id
    return int(found[2]), int(found[3] or 0), line


def _audited_counts(tmp_path: Path) -> dict[str, int]:
    """The counts of the newest `carehub audit list --json` row."""
    result = CliRunner().invoke(
        main,
        [
            *("audit", "list", "--json", "--limit", "1"),
            *("--config", str(tmp_path / "config" / "carehub.yaml")),
            *("--data-dir", str(tmp_path / "data")),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.output.splitlines()]
    assert row["command"] == "messages reprocess"
    return row["counts"]


def _second_run(loop: Loop, message_id: int) -> list[DeliveryRecord]:
    """The reprocess run's deliveries, once each was sent or found nothing to send."""

    def settled() -> list[DeliveryRecord]:
        found = [d for d in Outbox(loop.running.store).find(message_id=message_id) if d.run == 2]
        return found if all(d.status in ("delivered", "skipped") for d in found) else []

    return wait_for(settled, what=f"message {message_id}'s second run settled")


def test_a_referral_an_early_cancel_closed_counts_only_the_desk_copy(
    loop: Loop, tmp_path: Path
) -> None:
    assert loop.send(_referral("RGH-630-X", "R-630", replace=CANCEL)) == "AA"
    _message(loop, "RGH-630-X")
    assert loop.send(_referral("RGH-630", "R-630")) == "AA"
    created = _message(loop, "RGH-630")
    assert _referral_of(loop, "RIVERSIDE_GH|R-630").status == "cancelled"

    queued, suppressed, line = _reprocess(tmp_path, created.id)
    run = _second_run(loop, created.id)
    sent = [d.destination for d in run if d.status == "delivered"]
    assert sent == ["sdoh-referrals/referral-desk"]
    assert queued == len(sent)
    # Neither the organisation's email nor its FHIR copy: the referral is cancelled already.
    assert suppressed == 2
    assert "sdoh-referrals/notify-referral: the referral is cancelled already" in line
    assert "sdoh-referrals/cbo-platform: created: the referral is cancelled already" in line
    assert _audited_counts(tmp_path) == {
        "messages": 1,
        "deliveries": 1,
        "suppressed": 2,
        "skipped": 0,
        "failed": 0,
    }


def test_an_answer_the_referrer_was_told_of_is_not_counted_again(
    loop: Loop, tmp_path: Path
) -> None:
    assert loop.send(_referral("RGH-640", "R-640")) == "AA"
    _message(loop, "RGH-640")
    assert loop.send(_answer("SCFB-640", "R-640")) == "AA"
    answer = _message(loop, "SCFB-640")
    wait_for(lambda: loop.emails_to(REFERRER), what="the referrer told")

    queued, suppressed, line = _reprocess(tmp_path, answer.id)
    run = _second_run(loop, answer.id)
    assert [d.destination for d in run] == ["referral-updates/referral-updates"]
    assert queued == len(run)
    assert suppressed == 1
    assert "referral-updates/notify-referral: told by run 1 of this message" in line
    assert _audited_counts(tmp_path) == {
        "messages": 1,
        "deliveries": 1,
        "suppressed": 1,
        "skipped": 0,
        "failed": 0,
    }
    assert len(loop.emails_to(REFERRER)) == 1  # told once
