"""`carehub routes test` tells two messages apart as the hub's intake does: a control ID
(MSH-10) reused by the sender with other content is another message, not a resend, so its
referral-state transition and FHIR delivery are its own; a true resend still gives the
transition recorded for the original. On the shipped config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from carehub.cli import main
from carehub.testing import make_adt
from tests.test_referral_recipients import FEED_07, _referral

CONFIG = Path(__file__).resolve().parents[1] / "config" / "carehub.yaml"
CONTROL_ID = "RGH-REF-7001"  # feed 07's MSH-10
REFERRAL = "RGH-R-2026-0042"


def routes_test_json(tmp_path: Path, **messages: str) -> list[dict[str, Any]]:
    files = []
    for name, text in messages.items():
        files.append(tmp_path / f"{name}.hl7")
        files[-1].write_text(text, encoding="utf-8")
    arguments = ["routes", "test", "--json", "--config", str(CONFIG)]
    arguments += ["--data-dir", str(tmp_path / "data"), *map(str, files)]
    shown = CliRunner().invoke(main, arguments)
    assert shown.exit_code == 0, shown.output
    return [json.loads(line) for line in shown.stdout.splitlines()]


def referral_state(result: dict[str, Any]) -> dict[str, Any]:
    (output,) = [
        step["output"]
        for route in result["routes"]
        if route["matched"]
        for step in route["steps"]
        if step["step"] == "enrich referral-state"
    ]
    return output


def fhir_operations(result: dict[str, Any]) -> list[str]:
    return [
        delivery["metadata"]["operation"]
        for route in result["routes"]
        for delivery in route["deliveries"]
        if delivery["channel"] == "fhir-referral"
    ]


def test_a_cancel_reusing_the_referrals_control_id_is_a_cancel(tmp_path: Path) -> None:
    cancel = _referral(CONTROL_ID, REFERRAL, replace={"REF^I12^REF_I12": "REF^I14^REF_I12"})
    new, cancelled = routes_test_json(tmp_path, new=FEED_07, cancel=cancel)

    assert (referral_state(new)["action"], fhir_operations(new)) == ("created", ["create"])
    state = referral_state(cancelled)
    assert (state["action"], state["source"], state["status"]) == (
        "cancelled",
        "REF^I14",
        "cancelled",
    )
    assert fhir_operations(cancelled) == ["cancel"]


def test_a_true_resend_gives_the_transition_recorded_for_the_original(tmp_path: Path) -> None:
    """The same content again, with a new MSH-7 as engines stamp on a resend: the hub takes
    it for the original, and so does the dry run."""
    resend = FEED_07.replace("|20261127120000-0500|", "|20261127121500-0500|")
    first, again = routes_test_json(tmp_path, first=FEED_07, resend=resend)
    assert referral_state(again) == referral_state(first)
    assert referral_state(again)["action"] == "created"


def test_the_encounter_state_tells_reused_control_ids_apart(tmp_path: Path) -> None:
    """The public samples all say MSG00001: an A03 after an A01 under the same MSH-3/4/10 is
    the discharge, not the admission again."""
    admit = make_adt("MSG00001", "A01", visit_number="V-R1")
    discharge = make_adt("MSG00001", "A03", visit_number="V-R1")
    first, second = routes_test_json(tmp_path, admit=admit, discharge=discharge)
    kinds = [
        step["output"]["kind"]
        for result in (first, second)
        for route in result["routes"]
        if route["route"] == "care-transitions"
        for step in route["steps"]
        if step["step"] == "enrich encounter-state"
    ]
    assert kinds == ["admission", "discharge"]
