"""Dry runs (`carehub routes test`, carehub.testing.run_routes) answer a message as the hub's
intake does: only a message the hub accepts (AA) is routed; one it refuses (AE) or rejects
(AR) is shown as not routed, with the hub's reason, and `routes test` exits 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from carehub.cli import main
from carehub.hl7.view import MessageView
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange, run_routes
from tests.test_plugins import hub_config

ROUTES = """
routes:
  - name: every-adt
    when: {type: ADT}
    steps:
      - forward: {channel: file, directory: out}
"""

NOT_A_SEGMENT = (
    "MSH|^~\\&|A|B|C|D|20260101||ADT^A01|X1|P|2.5\rPID|1||123^^^H\rPIDX garbage\rPV1|1|I\r"
)
NO_CONTROL_ID = "MSH|^~\\&|A|B|C|D|20260101||ADT^A04^ADT_A01||P|2.5\rPID|1||123^^^H\rPV1|1|E\r"
#: MSH-2 repeats a delimiter: no field can be read, so the hub rejects it (AR).
BAD_DELIMITERS = "MSH|^^\\&|A|B|C|D|20260101||ADT^A01|X2|P|2.5\rPID|1||123^^^H\rPV1|1|I\r"

REFUSED = {
    "not-a-segment": (NOT_A_SEGMENT, "AE", "line 3 is not an HL7 segment"),
    "no-control-id": (NO_CONTROL_ID, "AE", "MSH-10 (message control ID) is empty"),
    "bad-delimiters": (BAD_DELIMITERS, "AR", "MSH-2 (the encoding characters)"),
}


def routes_test(config: Path, data_dir: Path, *files: Path, as_json: bool = False) -> Result:
    arguments = ["routes", "test", "--config", str(config), "--data-dir", str(data_dir)]
    if as_json:
        arguments.append("--json")
    return CliRunner().invoke(main, [*arguments, *map(str, files)])


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_run_routes_gives_the_live_hubs_answer_and_routes_nothing(
    tmp_path: Path, case: str
) -> None:
    text, code, reason = REFUSED[case]
    config = hub_config(tmp_path / "config", ROUTES)
    settings = local_config(routes=["routes/*.yaml"], source=config)
    with HubThread(settings, tmp_path / "hub") as hub:
        (ack,) = mllp_exchange(hub.mllp_address, [text.encode()])
    hub_answer = MessageView(ack.decode()).get("MSA-1")

    result = run_routes(text, config, tmp_path / "data")

    assert hub_answer == code
    assert result.ack_code == code
    assert result.routes == [] and result.deliveries == []
    assert result.not_routed is not None
    assert result.not_routed.startswith(f"not routed: the hub would answer {code}: {reason}")


def test_run_routes_routes_an_accepted_message(tmp_path: Path) -> None:
    config = hub_config(tmp_path / "config", ROUTES)

    result = run_routes(make_adt("OK1"), config, tmp_path / "data")

    assert (result.ack_code, result.not_routed) == ("AA", None)
    assert [r.route for r in result.matched] == ["every-adt"]
    assert len(result.deliveries) == 1


def test_routes_test_shows_refused_messages_as_not_routed_and_exits_1(tmp_path: Path) -> None:
    config = hub_config(tmp_path / "config", ROUTES)
    files = []
    for name, text in [("good", make_adt("OK2")), ("garbage", NOT_A_SEGMENT)]:
        files.append(tmp_path / f"{name}.hl7")
        files[-1].write_text(text, encoding="utf-8")
    missing_id = Path(__file__).parents[1] / "config/feeds/09-lakeview-missing-control-id.hl7"

    shown = routes_test(config, tmp_path / "data", *files, missing_id)

    assert shown.exit_code == 1, shown.output
    assert f"{files[0]}: matched every-adt" in shown.stdout
    assert (
        f"{files[1]}: not routed: the hub would answer AE: line 3 is not an HL7 segment"
        in shown.stdout
    )
    assert (
        f"{missing_id}: not routed: the hub would answer AE: MSH-10 (message control ID) is empty"
        in shown.stdout
    )
    assert shown.stdout.count("would send") == 1
    assert f"failed: the hub would not route 2 message(s): {files[1]}, {missing_id}" in (
        shown.stderr
    )


def test_routes_test_json_gives_the_hubs_answer(tmp_path: Path) -> None:
    config = hub_config(tmp_path / "config", ROUTES)
    message = tmp_path / "garbage.hl7"
    message.write_text(NOT_A_SEGMENT, encoding="utf-8")

    shown = routes_test(config, tmp_path / "data", message, as_json=True)

    assert shown.exit_code == 1, shown.output
    found = json.loads(shown.stdout)
    assert (found["ack"], found["matched"], found["routes"]) == ("AE", [], [])
    assert found["not_routed"].startswith("not routed: the hub would answer AE: line 3 ")
