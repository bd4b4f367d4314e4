"""A dry run of a referral that names no organisation (it went to the top directory match) and
then its cancel: the cancel must reach the organisation the referral went to, as it does in the
running hub, not read as a referral held for want of one."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from carehub.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "config"


def test_the_cancel_of_an_unnamed_referral_goes_to_its_match(tmp_path: Path) -> None:
    sample = (CONFIG / "feeds" / "07-riverside-sdoh-referral.hl7").read_text(encoding="utf-8")
    segments = [s for s in sample.replace("\n", "\r").split("\r") if s]
    unnamed = [s for s in segments if not s.startswith("PRD|RT")]  # nobody named
    assert len(unnamed) == len(segments) - 1
    header = unnamed[0].split("|")
    header[8], header[9] = "REF^I14^REF_I12", header[9] + "-CANCEL"
    new = tmp_path / "i12.hl7"
    new.write_text("\r".join(unnamed) + "\r", encoding="utf-8")
    cancel = tmp_path / "i14.hl7"
    cancel.write_text("\r".join(["|".join(header), *unnamed[1:]]) + "\r", encoding="utf-8")

    where = ["--config", str(CONFIG / "carehub.yaml"), "--data-dir", str(tmp_path / "data")]
    result = CliRunner().invoke(
        main, ["routes", "test", "--json", *where, str(new), str(cancel)], catch_exceptions=False
    )

    assert result.exit_code == 0, result.output
    created, cancelled = (json.loads(line) for line in result.output.splitlines() if line)
    sent = {
        step["step"]: step["output"]
        for route in cancelled["routes"]
        for step in route.get("steps", [])
        if step["step"].startswith("forward fhir-referral")
    }
    (forward,) = sent.values()
    assert forward["bytes"] > 0, forward  # a cancel for the organisation's Task, not "held"
    told = [
        decision
        for route in cancelled["routes"]
        for step in route.get("steps", [])
        if step["step"] == "notify-referral"
        for decision in step["output"]
    ]
    assert [d["kind"] for d in told if d["role"] == "organization"] == ["referral_cancelled"]
    assert created["ack"] == cancelled["ack"] == "AA"
