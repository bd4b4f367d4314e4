"""What an interface engineer writes in route files and route tests: conditions over every
repetition and with any/all/not, segment removal and insertion and conditional edits in
``transform``, dry runs of files holding several messages, and the generated reference of the
built-in components' options and of the care event."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from carehub.builtins.transform import Transform, TransformOptions, WrittenText
from carehub.cli import main
from carehub.components import ComponentContext, Work
from carehub.config import load_config
from carehub.errors import ConfigError
from carehub.hl7.edit import EditError, MessageEditor
from carehub.hl7.view import MessageView
from carehub.hub import build_routing
from carehub.pytest_plugin import RouteRunner
from carehub.reference import (
    CARE_EVENT_SCHEMA,
    COMPONENTS_PAGE,
    _markdown_prose,
    component_docs,
    generated_files,
    type_text,
)
from carehub.routing.conditions import When
from carehub.routing.config import load_route_files
from carehub.routing.dryrun import preview_message
from carehub.testing import (
    is_message_text,
    make_adt,
    run_routes,
    run_routes_all,
    run_routes_all_async,
)
from tests.helpers_cli import project, routes_check
from tests.test_plugins import hub_config

DOCS = Path(__file__).resolve().parents[1] / "docs"

#: PID-3 with three identifiers: the hospital MRN first, the SSN second.
ADT = (
    "MSH|^~\\&|RGH_ADT|RGH|CAREHUB|CAREHUB|20261206||ADT^A01^ADT_A01|C1|P|2.5\r"
    "EVN|A01|20261206\r"
    "PID|1||RG200001^^^RGH^MR~123456789^^^SSA^SS~E77^^^ENT^PI||DOE^JANE||19700101|F\r"
    "PV1|1|E|ED^1^A\r"
    "OBX|1|ST|GLU^Glucose||5.5\r"
    "OBX|2|ST|K^Potassium||4.1~4.2\r"
    "ZPI||VIP^Very important|secret\r"
    "NTE|1||first\r"
    "ZPI|2|second\r"
)


def when(data: dict[str, Any]) -> When:
    return When.model_validate(data)


def view(text: str = ADT) -> MessageView:
    return MessageView(text)


# -- 13: conditions over repetitions ---------------------------------------------------------
def test_a_plain_path_reads_the_first_repetition_only() -> None:
    assert view().get("PID-3.4") == "RGH"
    assert not when({"fields": {"PID-3.4": "SSA"}}).matches(view())
    assert when({"fields": {"PID-3[2].4": "SSA"}}).matches(view())


@pytest.mark.parametrize(
    ("path", "condition", "expected", "at"),
    [
        ("PID-3[*].4", "SSA", True, "PID-3[2].4"),
        ("PID-3[*].4", ["ENT", "XX"], True, "PID-3[3].4"),
        ("PID-3[*].4", "XX", False, ""),
        ("PID-3[*].1", {"regex": "^E"}, True, "PID-3[3].1"),
        ("PID-3[*]", {"regex": "SSA"}, True, "PID-3[2]"),
        ("OBX[*]-3.1", "K", True, "OBX[2]-3.1"),
        ("OBX[*]-3.1", "GLU", True, "OBX[1]-3.1"),
        ("OBX[*]-5[*]", "4.2", True, "OBX[2]-5[2]"),
        ("OBX[2]-5[*]", "4.2", True, "OBX[2]-5[2]"),
        ("OBX-5[*]", "4.2", False, ""),  # the first OBX only
        ("PID-13[*]", {"present": False}, True, "PID-13[1]"),  # empty field: one empty value
        ("ZZZ[*]-1", {"present": False}, True, "ZZZ[1]-1"),  # absent segment: the same
        ("ZZZ[*]-1", {"present": True}, False, ""),
    ],
)
def test_a_star_path_holds_when_any_repetition_or_segment_does(
    path: str, condition: Any, expected: bool, at: str
) -> None:
    condition_set = when({"fields": {path: condition}})
    assert condition_set.matches(view()) is expected
    (check,) = condition_set.explain(view())
    assert check.passed is expected
    assert check.at == at
    if expected:
        assert f"passed at {at}" in check.expected


def test_a_failed_star_path_shows_every_value_it_read() -> None:
    (check,) = when({"fields": {"PID-3[*].4": "XX"}}).explain(view())
    assert check.value == "RGH~SSA~ENT"
    assert check.expected == "in ['XX'] at any repetition (3 read)"


@pytest.mark.parametrize("path", ["PID-3[*x].4", "PID-*3", "PID-3.4[*]", "PID[*]X-3", "PID-3[*]["])
def test_misplaced_stars_are_refused_naming_the_path(path: str) -> None:
    with pytest.raises(ValidationError, match="bad field path"):
        when({"fields": {path: "x"}})


def test_star_paths_work_in_filter_steps(tmp_path: Path) -> None:
    config = hub_config(
        tmp_path / "config",
        """
        routes:
          - name: ssa
            steps:
              - filter:
                  fields:
                    PID-3[*].4: SSA
              - forward: {channel: file, directory: out}
        """,
    )
    passed = run_routes(ADT, config, tmp_path / "data")
    assert [d.destination for d in passed.deliveries] == ["ssa/file"]
    stopped = run_routes(make_adt(), config, tmp_path / "data")
    assert stopped.deliveries == []
    (step,) = stopped.steps
    assert step.outcome == "filtered"
    assert "PID-3[*].4 = 'HOSP', wanted in ['SSA'] at any repetition (1 read)" in step.output


# -- 13: any / all / not ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"any": [{"events": "A03"}, {"patient_class": "E"}]}, True),
        ({"any": [{"events": "A03"}, {"patient_class": "I"}]}, False),
        ({"all": [{"events": "A01"}, {"patient_class": "E"}]}, True),
        ({"all": [{"events": "A01"}, {"patient_class": "I"}]}, False),
        ({"not": {"events": "A08"}}, True),
        ({"not": {"events": "A01"}}, False),
        ({"not": {"events": "A01", "patient_class": "I"}}, True),  # not (both)
        ({"type": "ADT", "any": [{"events": "A03"}, {"patient_class": "E"}]}, True),
        ({"type": "ORU", "any": [{"events": "A03"}, {"patient_class": "E"}]}, False),
        (
            {
                "any": [
                    {"events": "A03"},
                    {"all": [{"patient_class": "E"}, {"not": {"fields": {"PID-3[*].4": "SSA"}}}]},
                ]
            },
            False,
        ),
        (
            {
                "any": [
                    {"events": "A03"},
                    {"all": [{"patient_class": "E"}, {"fields": {"OBX[*]-3.1": "K"}}]},
                ]
            },
            True,
        ),
    ],
)
def test_any_all_and_not_combine_and_nest(data: dict[str, Any], expected: bool) -> None:
    condition = when(data)
    assert condition.matches(view()) is expected
    # The explanation agrees with the match: it passes exactly when every check passed.
    checks = condition.explain(view())
    assert checks
    assert all(check.passed for check in checks) is expected


def test_explanations_name_the_branch_that_passed() -> None:
    checks = when(
        {
            "any": [
                {"events": "A03"},
                {"all": [{"patient_class": "E"}, {"fields": {"PID-3[*].4": "SSA"}}]},
            ]
        }
    ).explain(view())
    assert [(c.what, c.value, c.passed) for c in checks] == [
        ("any[1] all[0] patient_class (PV1-2.1)", "E", True),
        ("any[1] all[1] PID-3[*].4", "SSA", True),
    ]
    assert checks[1].at == "PID-3[2].4"


def test_a_failed_any_shows_every_branchs_failures() -> None:
    checks = when({"any": [{"events": "A03"}, {"patient_class": ["I", "O"]}]}).explain(view())
    assert [(c.what, c.expected, c.passed) for c in checks] == [
        ("any[0] event (MSH-9.2)", "in ['A03']", False),
        ("any[1] patient_class (PV1-2.1)", "in ['I', 'O']", False),
    ]


def test_not_explains_the_condition_that_held() -> None:
    (check,) = when({"not": {"events": "A01"}}).explain(view())
    assert (check.what, check.value, check.expected, check.passed) == (
        "not: event (MSH-9.2)",
        "A01",
        "not in ['A01']",
        False,
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"any": []}, "at least 1 item"),
        ({"any": [{}]}, r"\[0\] is empty"),
        ({"all": [{"type": "ADT"}, {}]}, r"\[1\] is empty"),
        ({"not": {}}, "is empty, so it would match no message"),
        ({"any": {"type": "ADT"}}, "valid list"),
        ({"or": [{"type": "ADT"}]}, "Extra inputs"),
    ],
)
def test_malformed_groups_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        when(data)


def write_routes(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def test_condition_errors_inside_groups_name_file_line_and_key(tmp_path: Path) -> None:
    path = write_routes(
        tmp_path,
        """
        routes:
          - name: a
            when:
              any:
                - events: [A01]
                - fields:
                    PID-3[*].4: SSA
                    PID-3[x]: A
            steps:
              - filter:
                  all:
                    - not: {}
              - forward: {channel: file, directory: out}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_route_files([path])
    lines = str(caught.value).splitlines()
    assert lines[0] == (
        f"{path}:8: route 'a': when.any[1].fields.PID-3[x]: Value error, bad field path "
        "'PID-3[x]': expected SEG-field[.component[.subcomponent]], e.g. PID-3.4"
    )
    assert lines[1].startswith(f"{path}:12: route 'a': steps[0].filter.all[0].not: ")


#: A step written with nothing after a key (YAML's null), the key path `routes check` names
#: and the start of what it says there.
NULL_STEPS = [
    ("filter:", "steps[0].filter", "needs a condition, e.g. {type: ADT}"),
    ("filter: {}", "steps[0].filter", "is empty, and an empty condition holds for every"),
    ("filter: {type: }", "steps[0].filter.type", "is empty (null)"),
    ("filter: {events: }", "steps[0].filter.events", "is empty (null)"),
    ("filter: {not: }", "steps[0].filter.not", "is empty (null)"),
    ("filter: {any: }", "steps[0].filter.any", "is empty (null)"),
    ("filter: {any: [null]}", "steps[0].filter.any[0]", "is empty (null): give a condition"),
    ("filter: {all: [{type: ADT}, {not: {type: }}]}", "steps[0].filter.all[1].not.type", "is"),
    ("filter: {opted_out: }", "steps[0].filter.opted_out", "is empty (null)"),
    ("filter: {transition: }", "steps[0].filter.transition", "is empty (null)"),
    ("filter: {fields: {PV1-36: }}", "steps[0].filter.fields.PV1-36", "is empty (null)"),
    ("filter: {fields: {PV1-36: {not: }}}", "steps[0].filter.fields.PV1-36", "holds an empty"),
    ("filter: {fields: {PV1-36: {regex: }}}", "steps[0].filter.fields.PV1-36.regex", "is empty"),
    ("filter: {fields: {PV1-36: {present: }}}", "steps[0].filter.fields.PV1-36.present", "is"),
    ("translate:", "steps[0].translate", "names its component"),
    ("enrich:", "steps[0].enrich", "names its component"),
    ("transform:", "steps[0].transform", "needs its edits"),
    ("forward:", "steps[0].forward", "needs its channel"),
    ("notify:", "steps[0].notify", "needs its settings"),
    ("notify-referral:", "steps[0].notify-referral", "needs its settings"),
]


@pytest.mark.parametrize(("step", "key", "message"), NULL_STEPS)
def test_a_step_key_written_with_nothing_after_it_is_an_error_naming_the_key(
    tmp_path: Path, step: str, key: str, message: str
) -> None:
    """Read as left out, such a key would make a step of no kind, or a filter that tests
    nothing and so passes every message."""
    path = write_routes(
        tmp_path,
        f"""
        routes:
          - name: a
            steps:
              - {step}
              - forward: {{channel: file, directory: out}}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_route_files([path])
    assert str(caught.value).startswith(f"{path}:4: route 'a': {key}: Value error, {message}")


@pytest.mark.parametrize(("when", "key"), [("when:", "when"), ("when: {events: }", "when.events")])
def test_a_route_condition_written_with_nothing_after_it_names_the_key(
    tmp_path: Path, when: str, key: str
) -> None:
    path = write_routes(
        tmp_path,
        f"""
        routes:
          - name: a
            {when}
            steps: [{{forward: {{channel: file, directory: out}}}}]
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_route_files([path])
    assert str(caught.value).startswith(f"{path}:3: route 'a': {key}: Value error, is empty (null)")


def test_routes_check_names_a_filter_with_nothing_after_it(tmp_path: Path) -> None:
    config = project(
        tmp_path / "site",
        "routes:\n"
        "  - name: discharges\n"
        "    steps:\n"
        "      - filter:\n"
        "      - forward: {channel: file, directory: out}\n",
    )
    checked = routes_check(config, tmp_path / "data")
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "Traceback" not in checked.stderr
    assert checked.stderr.strip() == (
        f"error: {config.parent / 'routes.yaml'}:4: route 'discharges': steps[0].filter: "
        "Value error, needs a condition, e.g. {type: ADT} or {fields: {PV1-2: I}}"
    )


def test_an_unquoted_bracket_path_in_flow_yaml_gets_a_hint(tmp_path: Path) -> None:
    path = write_routes(
        tmp_path,
        """
        routes:
          - name: a
            when: {fields: {PID-3[*].4: SSA}}
            steps: [{forward: {channel: file, directory: out}}]
        """,
    )
    with pytest.raises(ConfigError, match=r'must be quoted, e\.g\. \{"PID-3\[\*\]\.4": SSA\}'):
        load_route_files([path])


def test_routes_test_says_which_repetition_and_branch_matched(tmp_path: Path) -> None:
    config = hub_config(
        tmp_path / "config",
        """
        routes:
          - name: either
            when:
              any:
                - events: [A03]
                - fields: {"PID-3[*].4": SSA}
            steps:
              - forward: {channel: file, directory: out}
        """,
    )
    message = tmp_path / "ssa.hl7"
    message.write_text(ADT, encoding="utf-8")
    result = CliRunner().invoke(
        main,
        [
            "routes",
            "test",
            "--json",
            "--config",
            str(config),
            "--data-dir",
            str(tmp_path / "d"),
            str(message),
        ],
    )
    assert result.exit_code == 0, result.output
    (route,) = json.loads(result.stdout)["routes"]
    assert route["checks"] == [
        {
            "condition": "any[1] PID-3[*].4",
            "value": "SSA",
            "expected": "in ['SSA'] (passed at PID-3[2].4)",
            "passed": True,
            "at": "PID-3[2].4",
        }
    ]


# -- 6: transform: remove and add segments, conditional edits ---------------------------------
def build(options: dict[str, Any]) -> Transform:
    step = Transform(
        TransformOptions.model_validate(options), ComponentContext(Path("."), Path("."))
    )
    asyncio.run(step.start())
    return step


def work(text: str = ADT) -> Work:
    return Work(message=preview_message(text.encode()), route="r", v2=text)


def edited(edits: list[dict[str, Any]], text: str = ADT) -> tuple[list[str], list[dict[str, Any]]]:
    item = work(text)
    changes = build({"edits": edits}).translate(item)
    return item.v2.split("\r")[:-1], changes


def names(segments: list[str]) -> list[str]:
    return [segment[:3] for segment in segments]


@pytest.mark.parametrize(
    "edit",
    [{"remove": "ZPI"}, {"remove": ["ZPI"]}, {"remove": {"segment": "ZPI"}}, {"remove": "zpi"}],
)
def test_remove_drops_every_segment_of_a_name(edit: dict[str, Any]) -> None:
    segments, changes = edited([edit])
    assert names(segments) == ["MSH", "EVN", "PID", "PV1", "OBX", "OBX", "NTE"]
    assert changes[0]["before"] == "ZPI||VIP^Very important|secret\rZPI|2|second"
    assert changes[0]["after"] == ""


def test_remove_one_occurrence_and_several_names() -> None:
    segments, _ = edited([{"remove": ["ZPI[2]", "OBX[1]", "NTE"]}])
    assert names(segments) == ["MSH", "EVN", "PID", "PV1", "OBX", "ZPI"]
    assert "ZPI||VIP^Very important|secret" in segments
    assert "OBX|2|ST|K^Potassium||4.1~4.2" in segments


def test_removing_what_is_not_there_leaves_the_message_untouched() -> None:
    crlf = ADT.replace("\r", "\r\n")
    item = work(crlf)
    changes = build({"edits": [{"remove": ["ZZZ", "OBX[9]"]}]}).translate(item)
    assert item.v2 == crlf  # byte for byte, terminators included
    assert [c["before"] for c in changes] == ["", ""]


def test_segments_no_edit_touched_keep_their_bytes() -> None:
    messy = ADT.replace("PV1|1|E|ED^1^A", "PV1|1|E|ED^1^A|||\\F\\x^^|")
    segments, _ = edited([{"remove": "ZPI"}, {"add": {"segment": "ZNT|1", "after": "PV1"}}], messy)
    original = messy.split("\r")[:-1]
    assert [s for s in segments if s[:3] != "ZNT"] == [s for s in original if s[:3] != "ZPI"]


@pytest.mark.parametrize(
    ("add", "position"),
    [
        ({"segment": "ZNT|1|note", "after": "PV1"}, 4),
        ({"segment": "ZNT|1|note", "after": "OBX"}, 6),  # after the last OBX
        ({"segment": "ZNT|1|note", "after": "OBX[1]"}, 5),
        ({"segment": "ZNT|1|note", "before": "OBX"}, 4),  # before the first OBX
        ({"segment": "ZNT|1|note", "before": "ZPI[2]"}, 8),
        ({"segment": "ZNT|1|note"}, 9),  # at the end
        ("ZNT|1|note", 9),
    ],
)
def test_add_puts_one_segment_where_asked(add: Any, position: int) -> None:
    segments, changes = edited([{"add": add}])
    assert segments[position] == "ZNT|1|note"
    assert len(segments) == 10
    assert changes == [{"op": "add", "path": "ZNT", "before": "", "after": "ZNT|1|note"}]


def test_add_fills_placeholders_with_the_fields_text_as_written() -> None:
    text = ADT.replace("DOE^JANE", "O\\T\\BRIEN^JANE")
    segments, _ = edited(
        [{"add": {"segment": "ZNT|{PID-5}|{PID-3[2].1}|{{x}}|{PV1-99}", "after": "PID"}}], text
    )
    assert segments[3] == "ZNT|O\\T\\BRIEN^JANE|123456789|{x}|"


def test_add_next_to_a_missing_segment_fails_the_step_and_changes_nothing() -> None:
    item = work()
    step = build({"edits": [{"remove": "ZPI"}, {"add": {"segment": "ZNT|1", "after": "IN1"}}]})
    with pytest.raises(
        EditError, match=r"edits\[1\] add: cannot add ZNT after IN1: the message has no IN1"
    ):
        step.translate(item)
    assert item.v2 == ADT


def test_add_uses_the_messages_own_field_separator() -> None:
    hashes = "MSH#^~\\&#S#F#R#RF#2026##ADT^A01#C1#P#2.5\rPID#1##M1\r"
    step = build({"edits": [{"add": "ZNT|1"}]})
    with pytest.raises(EditError, match="this message's field separator '#'"):
        step.translate(work(hashes))
    item = work(hashes)
    build({"edits": [{"add": "ZNT#1"}]}).translate(item)
    assert item.v2.endswith("PID#1##M1\rZNT#1\r")


def test_field_edits_on_a_missing_segment_keep_their_error() -> None:
    with pytest.raises(
        EditError, match=r"edits\[0\] set: cannot set NK1-2: the message has no NK1"
    ):
        build({"edits": [{"set": {"NK1-2": "X"}}]}).translate(work())


def test_an_edit_with_when_runs_only_for_messages_that_meet_it() -> None:
    edits = [
        {"set": {"PV1-3.1": "EMER"}, "when": {"patient_class": "E"}},
        {"set": {"PV1-3.1": "INPT"}, "when": {"patient_class": "I"}},
        {"remove": "ZPI", "when": {"fields": {"PID-3[*].4": "SSA"}}},
    ]
    segments, changes = edited(edits)
    assert segments[3] == "PV1|1|E|EMER^1^A"
    assert "ZPI" not in names(segments)
    assert changes[1] == {
        "op": "set",
        "edit": 1,
        "skipped": "patient_class (PV1-2.1) = 'E', wanted in ['I']",
    }
    inpatient = ADT.replace("PV1|1|E|", "PV1|1|I|")
    segments, _ = edited(edits, inpatient)
    assert segments[3] == "PV1|1|I|INPT^1^A"


def test_when_reads_the_message_as_the_edits_before_it_left_it() -> None:
    segments, changes = edited(
        [
            {"set": {"PV1-2": "I"}},
            {"set": {"PV1-3.1": "WARD"}, "when": {"patient_class": "I"}},
            {"add": "ZNT|seen", "when": {"not": {"fields": {"ZPI[*]-1": {"present": True}}}}},
            {"remove": "ZPI"},
            {"add": "ZNT|gone", "when": {"not": {"fields": {"ZPI[*]-1": {"present": True}}}}},
        ]
    )
    assert segments[3] == "PV1|1|I|WARD^1^A"
    assert segments[-1] == "ZNT|gone"
    assert "ZNT|seen" not in segments
    assert changes[2]["skipped"] == (
        "not: ZPI[*]-1 = '2', wanted not (present (passed at ZPI[2]-1))"
    )


def test_a_skipped_edit_alone_leaves_the_text_as_received() -> None:
    crlf = ADT.replace("\r", "\r\n")
    item = work(crlf)
    build({"edits": [{"remove": "ZPI", "when": {"events": "A08"}}]}).translate(item)
    assert item.v2 == crlf


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ([{"delete": "ZPI"}], r"unknown key 'delete' in an edit; an edit has one of set, copy"),
        ([{"remove": "ZPI", "iff": {}}], "unknown key 'iff'"),
        (
            [{"clear": "ZPI"}],
            r"edits\[0\] clear: .*whole segment.*; to drop the segment, use remove: ZPI",
        ),
        ([{"remove": "MSH"}], r"edits\[0\] remove: MSH cannot be removed"),
        ([{"remove": "ZP"}], r"edits\[0\] remove: bad segment 'ZP'"),
        ([{"remove": "ZPI-1"}], r"edits\[0\] remove: bad segment 'ZPI-1'"),
        ([{"remove": []}], "remove takes a segment name"),
        (
            [{"remove": {"name": "ZPI"}}],
            r"remove takes a segment, a list of them, or \{segment: NAME\}",
        ),
        ([{"add": {"segment": "MSH|^~\\&|X"}}], r"edits\[0\] add: MSH cannot be added"),
        ([{"add": {"segment": "zn|1"}}], r"edits\[0\] add: segment 'zn\|1' must be one line"),
        ([{"add": {"segment": "ZNT|1\rZNT|2"}}], "must be one line"),
        ([{"add": {"segment": "ZNT|{PID}"}}], r"edits\[0\] add: \{PID\} names a whole segment"),
        ([{"add": {"segment": "ZNT|{PID-x}"}}], r"edits\[0\] add: bad field path 'PID-x'"),
        ([{"add": {"segment": "ZNT|1", "after": "PV1-2"}}], r"edits\[0\] add after: bad segment"),
        ([{"add": {"segment": "ZNT|1", "after": "PV1", "before": "OBX"}}], "not both"),
        ([{"add": {"segment": "ZNT|1"}, "escape": False}], "only goes with 'set'"),
        ([{"set": {"PV1-2": "X"}, "when": {"fields": {"PV1-x": "E"}}}], "bad field path 'PV1-x'"),
        ([{"set": {"PV1-2": "X"}, "when": {"any": []}}], "at least 1 item"),
    ],
)
def test_bad_segment_edits_are_configuration_errors(
    edits: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        TransformOptions.model_validate({"edits": edits})


def test_a_bad_when_on_an_edit_names_its_file_line_and_key(tmp_path: Path) -> None:
    config = hub_config(
        tmp_path / "config",
        """
        routes:
          - name: r
            steps:
              - transform:
                  edits:
                    - remove: ZPI
                    - set: {PV1-2: X}
                      when:
                        fields: {PV1-9x: E}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        build_routing(load_config(config), tmp_path / "data")
    routes = tmp_path / "config" / "routes" / "routes.yaml"
    assert str(caught.value).startswith(
        f"{routes}:10: route 'r': steps[0].transform.edits[1].when.fields.PV1-9x"
    )


def test_editor_segment_operations_directly() -> None:
    editor = MessageEditor(ADT)
    assert editor.remove_segments("OBX[2]") == ["OBX|2|ST|K^Potassium||4.1~4.2"]
    assert editor.remove_segments("OBX[2]") == []
    assert editor.add_segment("ZNT|a", before="PID") == 2
    assert editor.view().get("ZNT-1") == "a"  # the view follows the edits
    editor.set("ZNT-2", "b")
    assert editor.view().get("ZNT-2") == "b"
    with pytest.raises(EditError, match="MSH cannot be removed"):
        editor.remove_segments("MSH")
    with pytest.raises(EditError, match="'after' or 'before', not both"):
        editor.add_segment("ZNT|c", after="PID", before="PV1")


# -- 11: dry runs of files holding several messages ------------------------------------------
ROUTES = """
    routes:
      - name: all
        steps:
          - forward: {channel: file, directory: out}
"""


def batch(*messages: str) -> str:
    return (
        "FHS|^~\\&|RGH_ADT\rBHS|^~\\&|RGH_ADT\r"
        + "".join(messages)
        + f"BTS|{len(messages)}\rFTS|1\r"
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return hub_config(tmp_path / "config", ROUTES)


def control_ids(results: list[Any]) -> list[str]:
    return [r.deliveries[0].outgoing.metadata.get("filename", "") for r in results]


def test_run_routes_all_takes_a_batch_file(tmp_path: Path, config: Path) -> None:
    path = tmp_path / "batch.hl7"
    path.write_text(batch(make_adt("B1"), make_adt("B2", "A03")), encoding="utf-8")
    results = run_routes_all(path, config, tmp_path / "data")
    assert [r.matched[0].route for r in results] == ["all", "all"]
    payloads = [r.deliveries[0].outgoing.payload for r in results]
    assert payloads == [make_adt("B1").encode(), make_adt("B2", "A03").encode()]


def test_run_routes_all_takes_text_bytes_and_a_path_string(
    tmp_path: Path, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = make_adt("T1") + make_adt("T2")
    assert len(run_routes_all(text, config, tmp_path / "data")) == 2
    assert len(run_routes_all(text.encode(), config, tmp_path / "data")) == 2
    (tmp_path / "two.hl7").write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert len(run_routes_all("two.hl7", config, tmp_path / "data")) == 2


def test_run_routes_still_returns_one_result_for_one_message(tmp_path: Path, config: Path) -> None:
    path = tmp_path / "one.hl7"
    path.write_text(batch(make_adt("S1")), encoding="utf-8")  # a batch of one is one message
    result = run_routes(path, config, tmp_path / "data")
    assert result.deliveries[0].outgoing.payload == make_adt("S1").encode()
    one_line = "MSH|^~\\&|A|B|C|D|2026||ADT^A01|L1|P|2.5"  # no terminator: still text
    assert run_routes(one_line, config, tmp_path / "data").matched


def test_run_routes_on_several_messages_points_at_run_routes_all(
    tmp_path: Path, config: Path
) -> None:
    path = tmp_path / "batch.hl7"
    path.write_text(batch(make_adt("B1"), make_adt("B2")), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path} holds 2 messages; .*use run_routes_all"):
        run_routes(path, config, tmp_path / "data")
    with pytest.raises(ValueError, match=r"^the message text holds 2 messages"):
        run_routes(make_adt("1") + make_adt("2"), config, tmp_path / "data")


def test_run_routes_errors_say_how_a_string_was_read(tmp_path: Path, config: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no such file .*segment separator or '\|'"):
        run_routes("tests/messages/missing.hl7", config, tmp_path / "data")
    with pytest.raises(ValueError, match="the message text: no HL7 message"):
        run_routes("PID|1||X\r", config, tmp_path / "data")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("MSH|^~\\&|A", True),
        ("a\rb", True),
        ("a\nb", True),
        ("tests/a.hl7", False),
        ("C:\\x.hl7", False),
    ],
)
def test_what_counts_as_message_text(value: str, text: bool) -> None:
    assert is_message_text(value) is text


def test_run_routes_all_async_runs_on_the_callers_loop(tmp_path: Path, config: Path) -> None:
    async def an_async_test() -> int:
        return len(await run_routes_all_async(batch(make_adt("1"), make_adt("2")), config))

    assert asyncio.run(an_async_test()) == 2


def test_the_fixtures_runner_reads_paths_from_the_rootdir(tmp_path: Path, config: Path) -> None:
    (tmp_path / "messages").mkdir()
    (tmp_path / "messages" / "batch.hl7").write_text(batch(make_adt("1"), make_adt("2")))
    runner = RouteRunner(config, tmp_path, tmp_path / "data")
    assert len(runner.all("messages/batch.hl7")) == 2
    with pytest.raises(ValueError, match=r"holds 2 messages; .*carehub_routes\.all"):
        runner("messages/batch.hl7")
    assert runner(make_adt("3")).matched


def test_the_carehub_routes_fixture_in_a_projects_own_suite(tmp_path: Path) -> None:
    project = tmp_path / "project"
    hub_config(project / "config", ROUTES)
    (project / "tests" / "messages").mkdir(parents=True)
    (project / "tests" / "messages" / "batch.hl7").write_text(
        batch(make_adt("P1"), make_adt("P2")), encoding="utf-8"
    )
    (project / "tests" / "test_routes.py").write_text(
        textwrap.dedent(
            """
            import pytest

            def test_batch(carehub_routes):
                results = carehub_routes.all("tests/messages/batch.hl7")
                assert [r.matched[0].route for r in results] == ["all", "all"]

            def test_text_with_a_leading_batch_header(carehub_routes):
                text = "FHS|^~\\\\&|X\\rMSH|^~\\\\&|A|B|C|D|2026||ADT^A01|1|P|2.5\\rPID|1||P9\\r"
                assert carehub_routes(text).matched[0].route == "all"

            def test_one_call_on_a_batch_says_what_to_use(carehub_routes):
                with pytest.raises(ValueError, match="carehub_routes.all"):
                    carehub_routes("tests/messages/batch.hl7")
            """
        ),
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project / "tests")],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_the_fixture_reads_a_path_from_the_rootdir_wherever_pytest_starts(
    tmp_path: Path,
) -> None:
    """A ``Path`` is read from the rootdir as a string is, when pytest runs from a subfolder;
    a missing one is an error naming where it was looked for."""
    project = tmp_path / "project"
    hub_config(project / "config", ROUTES)
    (project / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")  # the rootdir
    (project / "tests" / "messages").mkdir(parents=True)
    (project / "tests" / "messages" / "one.hl7").write_text(make_adt("R1"), encoding="utf-8")
    (project / "tests" / "test_paths.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path

            import pytest

            def test_a_path_and_a_string_read_the_same_file(carehub_routes):
                assert carehub_routes(Path("tests/messages/one.hl7")).matched
                assert len(carehub_routes.all(Path("tests/messages/one.hl7"))) == 1
                assert carehub_routes("tests/messages/one.hl7").matched

            def test_a_missing_path_names_where_it_was_looked_for(carehub_routes):
                looked_at = {str(project / "tests" / "messages" / "missing.hl7")!r}
                with pytest.raises(FileNotFoundError) as raised:
                    carehub_routes(Path("tests/messages/missing.hl7"))
                assert str(raised.value) == (
                    looked_at + ": no such file (a relative path is read from the rootdir)"
                )
                with pytest.raises(FileNotFoundError, match="a string is read as a file path"):
                    carehub_routes("tests/messages/missing.hl7")
            """
        ),
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_paths.py"],
        cwd=project / "tests",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


# -- 14: the reference of the built-in components -------------------------------------------
@pytest.mark.parametrize("name", [COMPONENTS_PAGE, CARE_EVENT_SCHEMA])
def test_generated_docs_are_current(name: str) -> None:
    expected = generated_files()[name]
    current = (DOCS / name).read_text(encoding="utf-8") if (DOCS / name).exists() else ""
    assert current == expected, (
        f"docs/{name} is out of date with the models: run `python -m carehub.reference`"
    )


def test_every_builtin_option_has_a_description() -> None:
    from carehub.plugins import PluginHost

    missing = [
        f"{doc.kind} {doc.name}: {option.name}"
        for doc in component_docs(PluginHost().load(), builtin_only=True)
        if doc.component is not None and doc.component.__module__.startswith("carehub.builtins.")
        for option in [*doc.options, *(o for m in doc.nested for o in m.options)]
        if not option.description
    ]
    assert missing == []


def test_the_care_event_schema_describes_the_event_model() -> None:
    from carehub.events import CareEvent

    schema = json.loads(generated_files()[CARE_EVENT_SCHEMA])
    assert set(schema["properties"]) == set(CareEvent.model_fields)
    assert schema["required"] == ["kind", "message_type", "trigger_event"]
    assert "admission" in schema["properties"]["kind"]["enum"]
    assert schema["additionalProperties"] is False


def test_the_components_page_documents_options_and_the_webhook_body() -> None:
    page = generated_files()[COMPONENTS_PAGE]
    assert "| `hmac_secret` | text | unset | key for the X-Carehub-Signature" in page
    assert "| `port` | integer (>= 1, <= 65535) | **required** | receiver's MLLP port |" in page
    assert '"idempotency_key": "...",' in page  # the webhook body layout
    assert "`AddSpec`:" in page
    assert "on-call" not in page  # the example plugin is not a built-in


def test_plugins_options_prints_types_defaults_and_descriptions() -> None:
    result = CliRunner().invoke(main, ["plugins", "--options", "webhook"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("channel webhook (builtin.channels): POST each message")
    assert "    url: text, required" in lines
    assert "    timeout: number (> 0), default 10.0" in lines
    assert "        seconds for the whole request" in lines


def test_plugins_options_json_and_every_component() -> None:
    result = CliRunner().invoke(main, ["plugins", "--options", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in map(json.loads, result.output.splitlines())}
    assert {"v2-to-event", "transform", "validate", "file", "mllp", "webhook"} <= set(rows)
    transform = rows["transform"]
    assert [o["name"] for o in transform["nested"]["Edit"]][-4:] == [
        "remove",
        "add",
        "when",
        "escape",
    ]
    assert transform["schema"]["required"] == ["edits"]
    mllp = {o["name"]: o for o in rows["mllp"]["options"]}
    assert mllp["port"] == {
        "name": "port",
        "type": "integer (>= 1, <= 65535)",
        "required": True,
        "description": "receiver's MLLP port",
    }
    assert mllp["timeout"]["default"] == 30.0


def test_plugins_options_for_an_unknown_name() -> None:
    result = CliRunner().invoke(main, ["plugins", "--options", "webhok"])
    assert result.exit_code == 2
    assert "no component named 'webhok' (there are: " in result.output
    assert "webhook" in result.output


@pytest.mark.parametrize(
    ("annotation", "text"),
    [
        (str, "text"),
        (int | None, "integer"),
        (Literal["v2", "event"], '"v2" | "event"'),
        (dict[str, list[str]], "mapping of text to list of text"),
        (str | list[str] | None, "text or list of text"),
        (When, "condition (as in a route's when)"),
        (dict[str, WrittenText], "mapping of text to text"),
    ],
)
def test_type_names_read_as_route_authors_write(annotation: Any, text: str) -> None:
    assert type_text(annotation) == text


def test_docstring_literal_blocks_become_fenced_code() -> None:
    doc = 'Body (``JSON``)::\n\n    {\n      "a": 1\n    }\n\nAfter.'
    assert _markdown_prose(doc) == [
        "Body (`JSON`):",
        "",
        "```text",
        "{",
        '  "a": 1',
        "}",
        "```",
        "",
        "After.",
    ]


# -- filters on the care transition ----------------------------------------------------------
TRACKED_ROUTES = """
    routes:
      - name: platform
        when: {type: ADT}
        steps:
          - translate: v2-to-event
          - enrich: encounter-state
          - filter:
              transition: {not: none}
          - forward: {channel: file, name: platform, directory: out}
      - name: transitions
        when: {type: ADT, events: [A01, A02, A03]}
        steps:
          - translate: v2-to-event
          - enrich: encounter-state
          - forward: {channel: file, name: all, directory: out}
    """


def test_a_filter_tests_the_transition_an_encounter_state_step_found(tmp_path: Path) -> None:
    """A bed move, an A08 echo and an admission sent again under a new MSH-10 are "none" and
    stop at the filter; the admission and the transfer to another facility pass. Two routes that
    track visits see the same visits in a dry run, as they share the store's tables live."""
    config = hub_config(tmp_path / "config", TRACKED_ROUTES)
    feed = [
        make_adt("M1", "A01", location="4W^412^A"),
        make_adt("M2", "A08", location="4W^412^A"),
        make_adt("M3", "A01", location="4W^412^A"),  # the admission again, new MSH-10
        make_adt("M4", "A02", location="4W^414^B"),  # another bed on the same unit
        make_adt("M5", "A02", location="ICU^2^A^NORTH"),  # another facility: a transfer
    ]
    results = run_routes_all("".join(feed), config, tmp_path / "data")
    sent = [[d.destination for d in r.deliveries] for r in results]
    assert sent == [
        ["platform/platform", "transitions/all"],
        [],
        ["transitions/all"],
        ["transitions/all"],
        ["platform/platform", "transitions/all"],
    ]
    stopped = results[3].routes[0].steps[-1]
    assert stopped.outcome == "filtered"
    assert stopped.output == ("transition (encounter-state) = 'none', wanted not in ['none']")


@pytest.mark.parametrize(
    ("routes", "line", "wanted"),
    [
        (
            """
            routes:
              - name: r
                when:
                  transition: admission
                steps:
                  - forward: {channel: file, directory: out}
            """,
            5,
            "route 'r': when: transition is what an encounter-state step finds",
        ),
        (
            """
            routes:
              - name: r
                steps:
                  - translate: v2-to-event
                  - filter:
                      any: [{transition: admission}, {events: A03}]
                  - enrich: encounter-state
                  - forward: {channel: file, directory: out}
            """,
            7,
            "route 'r': steps[1]: filter: transition is what an encounter-state step finds",
        ),
    ],
)
def test_the_transition_is_tested_only_after_an_encounter_state_step(
    tmp_path: Path, routes: str, line: int, wanted: str
) -> None:
    config = hub_config(tmp_path / "config", routes)
    with pytest.raises(ConfigError) as caught:
        build_routing(load_config(config), tmp_path / "data")
    path = tmp_path / "config" / "routes" / "routes.yaml"
    assert str(caught.value).startswith(f"{path}:{line}: {wanted}")


def test_a_misspelt_transition_names_the_ones_there_are(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        textwrap.dedent(
            """
            routes:
              - name: r
                steps:
                  - filter: {transition: [admission, admit]}
                  - forward: {channel: file, directory: out}
            """
        )
    )
    with pytest.raises(ConfigError) as caught:
        load_route_files([path])
    message = str(caught.value)
    assert message.startswith(f"{path}:5: route 'r': steps[0].filter.transition: ")
    assert "'admit' is not a care transition; one of: ed_arrival, admission, transfer" in message


# -- paths that number from 0 ------------------------------------------------------------------
@pytest.mark.parametrize("path", ["NK1[0]-2", "PID-0", "PID-3[0].1", "PID-3.0", "PID-3.1.0"])
def test_a_condition_path_numbered_from_zero_is_refused(tmp_path: Path, path: str) -> None:
    """NK1[0]-2 read the last NK1 (index -1), or raised mid-routing on a message without an
    NK1; PID-0 read the whole segment. `routes check` refuses them as transform edits do."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "routes:\n"
        "  - name: r\n"
        f"    when: {{fields: {{'{path}': {{present: true}}}}}}\n"
        "    steps: [{forward: {channel: file, directory: out}}]\n"
    )
    with pytest.raises(ConfigError, match=r"numbers in a path start at 1"):
        load_route_files([routes])


def test_a_condition_that_fails_fails_its_own_route_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should reading a condition raise, that route records the error (the message is failed
    with a reason) and every other route still runs; before, the error ended the routing of
    the whole batch, and its messages stayed "received" with no word."""
    config = hub_config(
        tmp_path / "config",
        """
        routes:
          - name: broken
            when: {fields: {ZZZ-1: X}}
            steps: [{forward: {channel: file, name: broken, directory: out}}]
          - name: fine
            when: {type: ADT}
            steps: [{forward: {channel: file, name: fine, directory: out}}]
        """,
    )
    original = MessageView.get

    def get(view: MessageView, path: Any) -> str:
        if str(path).startswith("ZZZ"):
            raise IndexError("list index out of range")
        return original(view, path)

    monkeypatch.setattr(MessageView, "get", get)
    result = run_routes(ADT, config, tmp_path / "data")
    assert [d.destination for d in result.deliveries] == ["fine/fine"]
    assert result.errors == ["broken: when: IndexError: list index out of range"]


@pytest.mark.parametrize(
    "condition",
    [
        "{fields: {PV1-36: 01}}",  # YAML: the number 1, never the disposition "01"
        "{fields: {PID-11.6: NO}}",  # YAML 1.1: false, never Norway
        "{fields: {PV1-36: [01, 06]}}",
        "{fields: {PV1-36: {not: [20, 40]}}}",
        "{sending_facility: off}",
    ],
)
def test_a_condition_value_yaml_reads_as_no_text_is_refused(tmp_path: Path, condition: str) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "routes:\n"
        "  - name: r\n"
        f"    when: {condition}\n"
        "    steps: [{forward: {channel: file, directory: out}}]\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_route_files([routes])
    assert str(caught.value).startswith(f"{routes}:3: route 'r': when.")
    assert "quote the value as the message writes it (e.g. '01', 'NO')" in str(caught.value)


def test_a_quoted_code_with_a_leading_zero_matches(tmp_path: Path) -> None:
    config = hub_config(
        tmp_path / "config",
        """
        routes:
          - name: home
            when: {fields: {PV1-36: ["01", "06"], PID-8: {not: ["NO"]}}}
            steps: [{forward: {channel: file, name: home, directory: out}}]
        """,
    )
    fields = make_adt().split("\r")
    pv1 = fields[3].split("|")
    pv1 += [""] * (37 - len(pv1))
    pv1[36] = "01"
    fields[3] = "|".join(pv1)
    result = run_routes("\r".join(fields), config, tmp_path / "data")
    assert [d.destination for d in result.deliveries] == ["home/home"]


def test_each_bad_edit_is_told_at_its_own_line(tmp_path: Path) -> None:
    """The edits' validator names each bad edit (edits[1], edits[3]); each is reported at
    that edit's line, not at the line of `edits:`."""
    config = hub_config(
        tmp_path / "config",
        """
        routes:
          - name: r
            steps:
              - transform:
                  edits:
                    - set: {MSH-5: X}
                    - set: {PID-0: X}
                    - set: {MSH-6: X}
                    - set: {PID-5.1: "{nonsense}"}
              - forward: {channel: file, directory: out}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        build_routing(load_config(config), tmp_path / "data")
    routes = tmp_path / "config" / "routes" / "routes.yaml"
    first, second = str(caught.value).splitlines()
    assert first.startswith(f"{routes}:8: route 'r': steps[0].transform.edits: edits[1] set: ")
    assert "numbers in a path start at 1" in first
    assert second.startswith(f"{routes}:10: route 'r': steps[0].transform.edits: edits[3] set: ")
    assert "bad field path 'nonsense'" in second


# -- conditions that could never hold, and misspelt route keys ----------------------------------
@pytest.mark.parametrize(
    ("condition", "wanted"),
    [
        (
            "events: A01, A03, A04",
            "when.events: Value error, 'A01, A03, A04' would match no message: MSH-9.2 holds one "
            "code, never a comma, space or semicolon; write a list: events: [A01, A03, A04]",
        ),
        ("type: ADT ORU", "write a list: type: [ADT, ORU]"),
        ("patient_class: {not: 'I,E'}", "write a list: patient_class: {not: [I, E]}"),
        ("events: [A01, 'A03 A04']", "'A03 A04' would match no message"),
        (
            "events: []",
            "when.events: Value error, is an empty list, so it would match no message",
        ),
        ("fields: {PV1-2: []}", "when.fields.PV1-2: Value error, is an empty list"),
        ("events: {not: []}", "{not: []} leaves nothing out, so it tests nothing"),
    ],
)
def test_a_condition_that_can_match_no_message_is_refused(
    tmp_path: Path, condition: str, wanted: str
) -> None:
    """`events: A01, A03, A04` (brackets left out) is the one value "A01, A03, A04", and
    `events: []` is no value: either way the route would match nothing, its messages ACKed and
    left unrouted without a word."""
    path = tmp_path / "routes.yaml"
    path.write_text(
        "routes:\n"
        "  - name: adt\n"
        "    when:\n"
        "      sending_facility: RGH\n"
        f"      {condition}\n"
        "    steps: [{forward: {channel: file, directory: out}}]\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_route_files([path])
    assert str(caught.value).startswith(f"{path}:5: route 'adt': "), str(caught.value)
    assert wanted in str(caught.value)


def test_names_that_may_hold_a_space_are_not_taken_for_lists(tmp_path: Path) -> None:
    path = write_routes(
        tmp_path,
        """
        routes:
          - name: adt
            when: {sending_facility: RIVERSIDE GH, events: [A01]}
            steps: [{forward: {channel: file, directory: out}}]
        """,
    )
    (loaded,) = load_route_files([path])
    assert loaded.config.when.sending_facility is not None
    assert loaded.config.when.sending_facility.any_of == ["RIVERSIDE GH"]


def test_a_misspelt_route_key_is_told_at_its_line_with_the_key_it_may_be(tmp_path: Path) -> None:
    path = write_routes(
        tmp_path,
        """
        routes:
          - name: adt
            description: ADT to the platform
            wehn:
              type: ADT
              sending_facilty: RGH
            steps: [{forward: {channel: file, directory: out}}]
          - name: ref
            when:
              sending_facilty: RGH
            steps: [{forward: {channel: file, directory: out}}]
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_route_files([path])
    assert str(caught.value).splitlines() == [
        f"{path}:4: route 'adt': wehn: Extra inputs are not permitted; did you mean `when`?",
        f"{path}:10: route 'ref': when.sending_facilty: Extra inputs are not permitted; "
        "did you mean `sending_facility`?",
    ]


def test_routes_check_refuses_codes_written_without_brackets_and_misspelt_keys(
    tmp_path: Path,
) -> None:
    config = project(
        tmp_path / "site",
        "routes:\n"
        "  - name: adt\n"
        "    when:\n"
        "      events: A01, A03, A04\n"
        "    steps: [{forward: {channel: file, directory: out}}]\n"
        "  - name: ref\n"
        "    wehn:\n"
        "      type: REF\n"
        "    steps: [{forward: {channel: file, directory: out}}]\n",
    )
    checked = routes_check(config, tmp_path / "data")
    assert checked.returncode == 2, checked.stdout + checked.stderr
    routes = config.parent / "routes.yaml"
    assert checked.stderr.strip().splitlines() == [
        f"error: {routes}:4: route 'adt': when.events: Value error, 'A01, A03, A04' would match "
        "no message: MSH-9.2 holds one code, never a comma, space or semicolon; write a list: "
        "events: [A01, A03, A04]",
        f"{routes}:7: route 'ref': wehn: Extra inputs are not permitted; did you mean `when`?",
    ]


def test_routes_check_refuses_a_shell_style_variable(tmp_path: Path) -> None:
    """`directory: $CAREHUB_DATA_DIR/out` would write patient data under a folder of that name;
    `host: $EHR_HOST` would dial a host of that name."""
    config = project(
        tmp_path / "site",
        "routes:\n"
        "  - name: adt\n"
        "    steps:\n"
        "      - forward: {channel: file, name: copy, directory: $CAREHUB_DATA_DIR/out}\n"
        "      - forward: {channel: mllp, name: ehr, host: $EHR_HOST, port: 2575}\n",
    )
    checked = routes_check(config, tmp_path / "data", EHR_HOST="127.0.0.1")
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert checked.stderr.strip() == (
        f"error: {config.parent / 'routes.yaml'}:4: routes[0].steps[0].forward.directory: "
        "$CAREHUB_DATA_DIR is not expanded: carehub expands only ${NAME}, so write "
        "${CAREHUB_DATA_DIR} (a $ before a name meant as text, as in a password, is given "
        "through a variable)"
    )
    assert not (tmp_path / "site" / "$CAREHUB_DATA_DIR").exists()


# -- values YAML reads as numbers or booleans in transform steps --------------------------------
def test_a_set_value_yaml_reads_as_a_number_is_told_as_written(tmp_path: Path) -> None:
    """`set: {PV1-36: 01}` means the disposition 01; the fix offered is '01', never the 1 YAML
    made of it, which would write another code."""
    config = hub_config(
        tmp_path / "config",
        """
        routes:
          - name: r
            steps:
              - transform:
                  edits:
                    - set: {PV1-3.1: ED}
                    - set: {PV1-36: 01, PV1-2: I}
                    - set:
                        PV1-4: NO
                        PV1-5: 2.50
              - forward: {channel: file, directory: out}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        build_routing(load_config(config), tmp_path / "data")
    routes = tmp_path / "config" / "routes" / "routes.yaml"
    where = "route 'r': steps[0].transform.edits"
    assert str(caught.value).splitlines() == [
        f"{routes}:8: {where}[1].set.PV1-36: YAML read 01 as the number 1, not text; quote it "
        "as written: '01'",
        f"{routes}:10: {where}[2].set.PV1-4: YAML read NO as false, not text; quote it as "
        "written: 'NO'",
        f"{routes}:11: {where}[2].set.PV1-5: YAML read 2.50 as the number 2.5, not text; quote "
        "it as written: '2.50'",
    ]


def test_a_table_code_yaml_reads_as_a_number_or_boolean_is_told_as_written(
    tmp_path: Path,
) -> None:
    """010 is octal 8 to YAML, NO is false, 01 is 1: each is named as written, never as the
    [8] or [0] pydantic would show, with the quoted code to write."""
    config = hub_config(
        tmp_path / "config",
        """
        routes:
          - name: r
            steps:
              - transform:
                  edits:
                    - map: {path: PV1-3.1, table: locations}
                  tables:
                    locations:
                      4W: MED4WEST
                      010: TEN
                      NO: NORTH
                      01: MAIN
                      ICU: 01
              - forward: {channel: file, directory: out}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        build_routing(load_config(config), tmp_path / "data")
    routes = tmp_path / "config" / "routes" / "routes.yaml"
    where = f"{routes}:{{}}: route 'r': steps[0].transform.tables.locations"
    assert str(caught.value).splitlines() == [
        f"{where.format(11)}.010: YAML read the key 010 as the number 8, not text; quote it as "
        "written: '010'",
        f"{where.format(12)}.NO: YAML read the key NO as false, not text; quote it as written: "
        "'NO'",
        f"{where.format(13)}.01: YAML read the key 01 as the number 1, not text; quote it as "
        "written: '01'",
        f"{where.format(14)}.ICU: YAML read 01 as the number 1, not text; quote it as written: "
        "'01'",
    ]


def test_routes_check_tells_a_set_value_as_written(tmp_path: Path) -> None:
    config = project(
        tmp_path / "site",
        "routes:\n"
        "  - name: r\n"
        "    steps:\n"
        "      - transform:\n"
        "          edits: [{set: {PV1-36: 01}}, {map: {path: PV1-3.1, table: units}}]\n"
        "          tables: {units: {010: TEN}}\n"
        "      - forward: {channel: file, directory: out}\n",
    )
    checked = routes_check(config, tmp_path / "data")
    assert checked.returncode == 2, checked.stdout + checked.stderr
    routes = config.parent / "routes.yaml"
    assert checked.stderr.strip().splitlines() == [
        f"error: {routes}:6: route 'r': steps[0].transform.tables.units.010: YAML read the key "
        "010 as the number 8, not text; quote it as written: '010'",
        f"{routes}:5: route 'r': steps[0].transform.edits[0].set.PV1-36: YAML read 01 as the "
        "number 1, not text; quote it as written: '01'",
    ]
