"""The exact v2 editor and the transform step built on it: set, copy, clear, map, tables."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from carehub.builtins.transform import Transform, TransformOptions
from carehub.components import ComponentContext, Work
from carehub.errors import ConfigError
from carehub.hl7.edit import EditError, MessageEditor, PathError, check_path
from carehub.hl7.view import MessageView, NotHL7Error
from carehub.store.store import StoredMessage

ADT = (
    "MSH|^~\\&|SEND|FAC|RECV|RFAC|20261125||ADT^A01^ADT_A01|CTRL1|P|2.5\r"
    "EVN|A01|20261125\r"
    "PID|1|OLD1|X9^^^OTHER^PI~MRN7^^^HOSP&1.2.3&ISO^MR||O\\T\\BRIEN^ANN\\S\\MARIE||19700101|F\r"
    "NTE|1||line one\\.br\\line two \\F\\ pipe\r"
    "NTE|2||second\r"
    "ZXT|custom|value|||\r"
)


def segments(text: str) -> list[str]:
    return text.split("\r")


# -- MessageEditor: reading and byte identity -------------------------------------------------
def test_unedited_message_comes_back_identical() -> None:
    assert MessageEditor(ADT).text() == ADT


def test_only_segment_ends_are_normalised() -> None:
    crlf = ADT.replace("\r", "\r\n")
    assert MessageEditor(crlf).text() == ADT
    assert MessageEditor(ADT.replace("\r", "\n")).text() == ADT
    assert MessageEditor(ADT.rstrip("\r")).text() == ADT  # a missing last terminator is added


def test_an_edit_leaves_every_other_byte_alone() -> None:
    edit = MessageEditor(ADT)
    edit.set("PID-8", "M")
    before, after = segments(ADT), segments(edit.text())
    assert after[2] == before[2][:-1] + "M"
    assert [s for i, s in enumerate(after) if i != 2] == [s for i, s in enumerate(before) if i != 2]
    # escapes elsewhere in the edited segment are not decoded or re-encoded
    assert "O\\T\\BRIEN^ANN\\S\\MARIE" in after[2]
    # trailing delimiters the sender wrote in an untouched segment stay
    assert after[5] == "ZXT|custom|value|||"


def test_get_reads_like_the_view() -> None:
    edit = MessageEditor(ADT)
    view = MessageView(ADT)
    for path in ("MSH-1", "MSH-2", "MSH-9.2", "PID-3[2].4.2", "PID-5.1", "NTE-3", "NTE[2]-3"):
        assert edit.get(path) == view.get(path), path
    assert edit.raw("PID-5.1") == "O\\T\\BRIEN"
    assert edit.get("PID-5.1") == "O&BRIEN"
    assert edit.get("PV1-2") == ""
    assert edit.raw("NTE[2]") == "NTE|2||second"


def test_explicit_first_repetition_is_the_first_repetition_only() -> None:
    edit = MessageEditor(ADT)
    assert edit.raw("PID-3") == "X9^^^OTHER^PI~MRN7^^^HOSP&1.2.3&ISO^MR"
    assert edit.raw("PID-3[1]") == "X9^^^OTHER^PI"
    edit.set("PID-3[1]", "NEW", escape=False)
    assert edit.raw("PID-3") == "NEW~MRN7^^^HOSP&1.2.3&ISO^MR"
    edit.set("PID-3", "ONLY")
    assert edit.raw("PID-3") == "ONLY"


# -- MessageEditor: padding -------------------------------------------------------------------
def test_set_pads_missing_fields() -> None:
    edit = MessageEditor(ADT)
    edit.set("EVN-6", "20261126")
    assert edit.raw("EVN") == "EVN|A01|20261125||||20261126"


def test_set_pads_repetitions_components_and_subcomponents() -> None:
    edit = MessageEditor(ADT)
    edit.set("PID-3[4].5", "SS")
    assert edit.raw("PID-3") == "X9^^^OTHER^PI~MRN7^^^HOSP&1.2.3&ISO^MR~~^^^^SS"
    edit.set("PID-11.3.2", "sub")
    assert edit.raw("PID-11") == "^^&sub"
    edit.set("PID-3[2].4.3", "DNS")
    assert edit.raw("PID-3[2].4") == "HOSP&1.2.3&DNS"


def test_set_pads_msh_fields_with_msh_numbering() -> None:
    edit = MessageEditor(ADT)
    edit.set("MSH-15", "AL")
    assert edit.raw("MSH").endswith("|2.5|||AL")
    assert MessageView(edit.text()).get("MSH-15") == "AL"
    edit.set("MSH-5", "CARE")
    assert MessageView(edit.text()).get("MSH-5") == "CARE"


def test_setting_an_empty_value_where_nothing_is_does_not_pad() -> None:
    edit = MessageEditor(ADT)
    edit.set("EVN-9", "")
    edit.clear("PID-3[5].2")
    assert edit.text() == ADT


# -- MessageEditor: escapes and delimiters ----------------------------------------------------
def test_set_escapes_delimiters_by_default() -> None:
    edit = MessageEditor(ADT)
    edit.set("NTE[2]-3", "a|b^c~d&e\\f")
    assert edit.raw("NTE[2]-3") == "a\\F\\b\\S\\c\\R\\d\\T\\e\\E\\f"
    assert edit.get("NTE[2]-3") == "a|b^c~d&e\\f"


def test_raw_set_writes_structure_but_not_out_of_place_delimiters() -> None:
    edit = MessageEditor(ADT)
    edit.set("PID-5", "DOE^JANE~ROE^J", escape=False)
    assert edit.get("PID-5[2].1") == "ROE"
    with pytest.raises(EditError, match=r"PID-5\.1"):
        edit.set("PID-5.1", "A^B", escape=False)
    with pytest.raises(EditError, match="delimiter"):
        edit.set("PID-5", "A|B", escape=False)
    with pytest.raises(EditError):
        edit.set("PID-3[1]", "A~B", escape=False)
    edit.set("PID-3[1].4", "HOSP&1.2", escape=False)
    assert edit.get("PID-3[1].4.2") == "1.2"


def test_the_messages_own_delimiters_are_used() -> None:
    odd = "MSH#*@%$#SEND#FAC#RECV#RFAC#20261125##ADT*A01*ADT_A01#C1#P#2.5\rPID#1##A1*x*y$z@B2\r"
    edit = MessageEditor(odd)
    assert edit.get("MSH-9.2") == "A01"
    assert edit.get("PID-3[2].1") == "B2"
    assert edit.get("PID-3.3.2") == "z"
    edit.set("PID-5.2", "has # * @ $ %")
    assert edit.raw("PID-5") == "*has %F% %S% %R% %T% %E%"
    edit.set("PID-3[2].2", "q")
    assert edit.text() == (
        "MSH#*@%$#SEND#FAC#RECV#RFAC#20261125##ADT*A01*ADT_A01#C1#P#2.5\r"
        "PID#1##A1*x*y$z@B2*q##*has %F% %S% %R% %T% %E%\r"
    )
    assert MessageView(edit.text()).get("PID-5.2") == "has # * @ $ %"


# -- MessageEditor: clear and copy ------------------------------------------------------------
def test_clear_drops_only_the_delimiters_it_leaves_trailing() -> None:
    edit = MessageEditor(ADT)
    edit.clear("PID-8")
    assert edit.raw("PID").endswith("||19700101")
    edit.clear("PID-3[2]")
    assert edit.raw("PID-3") == "X9^^^OTHER^PI"
    edit.clear("PID-3.4")  # not last: the place stays
    assert edit.raw("PID-3") == "X9^^^^PI"
    edit.clear("PID-2")  # fields after it stay where they are
    assert edit.raw("PID").startswith("PID|1||X9")


def test_clear_of_a_missing_segment_is_not_an_error() -> None:
    edit = MessageEditor(ADT)
    edit.clear("PV1-19")
    edit.clear("NTE[3]-3")
    assert edit.text() == ADT


def test_copy_moves_escaped_text_as_written() -> None:
    edit = MessageEditor(ADT)
    edit.copy("PID-5.1", "NTE[2]-3")
    assert edit.raw("NTE[2]-3") == "O\\T\\BRIEN"
    edit.copy("PID-3[2].4", "PID-2")
    assert edit.raw("PID-2") == "HOSP&1.2.3&ISO"
    edit.copy("PV1-19", "PID-2")  # an absent source clears the target
    assert edit.raw("PID-2") == ""


def test_copy_refuses_a_value_that_does_not_fit_the_target() -> None:
    edit = MessageEditor(ADT)
    with pytest.raises(EditError, match=r"cannot copy PID-3 to PID-2\.1"):
        edit.copy("PID-3", "PID-2.1")


# -- MessageEditor: errors --------------------------------------------------------------------
def test_setting_a_field_of_a_missing_segment_names_the_path() -> None:
    edit = MessageEditor(ADT)
    with pytest.raises(EditError, match=r"PV1-19.*no PV1 segment"):
        edit.set("PV1-19", "V1")
    with pytest.raises(EditError, match=r"NTE\[3\]-3.*no NTE\[3\] segment"):
        edit.set("NTE[3]-3", "x")
    with pytest.raises(EditError, match="no PV1 segment"):
        edit.copy("PID-3", "PV1-19")


@pytest.mark.parametrize("path", ["MSH-1", "MSH-2", "MSH-2.1"])
def test_delimiter_fields_cannot_be_edited(path: str) -> None:
    edit = MessageEditor(ADT)
    with pytest.raises(EditError, match="delimiters"):
        edit.set(path, "x")
    with pytest.raises(EditError, match="delimiters"):
        edit.clear(path)


@pytest.mark.parametrize("path", ["PID", "PID-x", "pid3", "PID-0", "PID-3[0]", "NTE[0]-3"])
def test_bad_paths_are_rejected(path: str) -> None:
    with pytest.raises((EditError, PathError)):
        MessageEditor(ADT).set(path, "x")


def test_check_path() -> None:
    assert check_path("pid-3[2].4.1").subcomponent == 1
    assert check_path("PID").field == 0
    with pytest.raises(PathError, match="whole segment"):
        check_path("PID", writable=True)


def test_text_that_is_not_hl7_is_refused() -> None:
    with pytest.raises(NotHL7Error):
        MessageEditor("PID|1\r")


# -- the transform step -----------------------------------------------------------------------
def stored(text: str) -> StoredMessage:
    raw = text.encode()
    now = datetime.now(UTC)
    return StoredMessage(
        id=1,
        received_at=now,
        transport="mllp",
        listener="test",
        peer=None,
        raw=raw,
        size=len(raw),
        charset="utf-8",
        sending_application="SEND",
        sending_facility="FAC",
        receiving_application="RECV",
        receiving_facility="RFAC",
        message_type="ADT",
        trigger_event="A01",
        structure="ADT_A01",
        control_id="CTRL1",
        version="2.5",
        patient_id="MRN7",
        patient_authority="HOSP",
        ack_code="AA",
        status="received",
        status_at=now,
        detail=None,
    )


def work(text: str = ADT) -> Work:
    return Work(message=stored(text), route="test", v2=text)


def build(options: dict[str, Any], config_dir: Path | None = None) -> Transform:
    validated = Transform.Options.model_validate(options)
    folder = config_dir or Path(".")
    step = Transform(validated, ComponentContext(config_dir=folder, data_dir=folder))
    asyncio.run(step.start())
    return step


def test_transform_set_copy_clear_and_record() -> None:
    step = build(
        {
            "edits": [
                {"set": {"MSH-5": "CARE", "PID-19": "{MSH-4}-{PID-3[2].1}"}},
                {"copy": {"from": "PID-3[2].1", "to": "PID-2"}},
                {"clear": ["NTE[2]-3", "PV1-19"]},
                {"clear": "PID-8"},
            ]
        }
    )
    item = work()
    changes = step.translate(item)
    view = MessageView(item.v2)
    assert view.get("MSH-5") == "CARE"
    assert view.get("PID-19") == "FAC-MRN7"
    assert view.get("PID-2") == "MRN7"
    assert view.get("PID-8") == ""
    assert view.raw("NTE[2]") == "NTE|2"
    assert changes == [
        {"op": "set", "path": "MSH-5", "before": "RECV", "after": "CARE"},
        {"op": "set", "path": "PID-19", "before": "", "after": "FAC-MRN7"},
        {"op": "copy", "path": "PID-2", "before": "OLD1", "after": "MRN7", "source": "PID-3[2].1"},
        {"op": "clear", "path": "NTE[2]-3", "before": "second", "after": ""},
        {"op": "clear", "path": "PV1-19", "before": "", "after": ""},
        {"op": "clear", "path": "PID-8", "before": "F", "after": ""},
    ]
    # untouched segments are byte-identical
    assert segments(item.v2)[1] == segments(ADT)[1]
    assert segments(item.v2)[3] == segments(ADT)[3]
    assert segments(item.v2)[5] == segments(ADT)[5]


def test_transform_placeholders_and_raw_set() -> None:
    step = build(
        {
            "edits": [
                {"set": {"NTE-3": "{{literal}} {PID-5.1}"}},
                {"set": {"PID-6": "{PID-5.1}^MAIDEN"}, "escape": False},
            ]
        }
    )
    item = work()
    step.translate(item)
    assert MessageView(item.v2).get("NTE-3") == "{literal} O&BRIEN"
    assert MessageView(item.v2).raw("PID-6") == "O\\T\\BRIEN^MAIDEN"


def test_transform_map_with_defaults() -> None:
    tables = {"sex": {"F": "female", "M": "male"}, "class": {"I": "IN"}}
    item = work()
    changes = build(
        {"tables": tables, "edits": [{"map": {"path": "PID-8", "table": "sex"}}]}
    ).translate(item)
    assert MessageView(item.v2).get("PID-8") == "female"
    assert changes == [
        {"op": "map", "path": "PID-8", "before": "F", "after": "female", "table": "sex"}
    ]

    for default, expected in ((None, "A01"), ("keep", "A01"), ("", ""), ("UNK", "UNK")):
        item = work()
        spec: dict[str, Any] = {"path": "EVN-1", "table": "class"}
        if default is not None:
            spec["default"] = default
        build({"tables": tables, "edits": [{"map": spec}]}).translate(item)
        assert MessageView(item.v2).get("EVN-1") == expected, default


def test_transform_map_skips_a_missing_segment() -> None:
    step = build(
        {
            "tables": {"class": {"I": "IN"}},
            "edits": [{"map": {"path": "PV1-2", "table": "class", "default": "X"}}],
        }
    )
    item = work()
    assert step.translate(item) == []
    assert item.v2 == ADT


def test_transform_tables_file_yaml_and_csv(tmp_path: Path) -> None:
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "codes.yaml").write_text('sex:\n  F: "2"\n  M: "1"\n')
    (tmp_path / "codes.csv").write_text("table,code,value\nsex,F,woman\nsex,M,man\n")
    item = work()
    build(
        {"tables_file": "tables/codes.yaml", "edits": [{"map": {"path": "PID-8", "table": "sex"}}]},
        tmp_path,
    ).translate(item)
    assert MessageView(item.v2).get("PID-8") == "2"
    item = work()
    build(
        {"tables_file": "codes.csv", "edits": [{"map": {"path": "PID-8", "table": "sex"}}]},
        tmp_path,
    ).translate(item)
    assert MessageView(item.v2).get("PID-8") == "woman"


def test_transform_tables_file_problems_are_config_errors(tmp_path: Path) -> None:
    edits = [{"map": {"path": "PID-8", "table": "sex"}}]
    (tmp_path / "other.yaml").write_text("race:\n  W: white\n")
    with pytest.raises(ConfigError, match=r"edits\[0\] map PID-8: unknown table 'sex'"):
        build({"tables_file": "other.yaml", "edits": edits}, tmp_path)
    (tmp_path / "numbers.yaml").write_text("sex:\n  01: female\n")
    with pytest.raises(ConfigError, match=r"numbers.yaml:2: .*code 01 as the number 1, not text"):
        build({"tables_file": "numbers.yaml", "edits": edits}, tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        build({"tables_file": "missing.yaml", "edits": edits}, tmp_path)
    (tmp_path / "dup.yaml").write_text("sex:\n  F: f\n")
    with pytest.raises(ConfigError, match="also defined"):
        build({"tables_file": "dup.yaml", "tables": {"sex": {}}, "edits": edits}, tmp_path)


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ([{"set": {"PID-x": "1"}}], r"edits\[0\] set: bad field path 'PID-x'"),
        ([{"clear": "PID"}, {"clear": ["PID-3", "MSH-2"]}], r"edits\[1\] clear: path 'MSH-2'"),
        (
            [{"clear": "PID-3"}, {"map": {"path": "PID-8", "table": "sex"}}],
            r"edits\[1\] map PID-8: unknown table 'sex'",
        ),
        ([{"copy": {"from": "PID-3", "to": "PID-0"}}], r"edits\[0\] copy: .*'PID-0'"),
        ([{"set": {"PID-8": "{PID-}"}}], r"edits\[0\] set: bad field path 'PID-'"),
        ([{"set": {"PID-8": "a}b"}}], r"edits\[0\] set PID-8: lone '\}'"),
        ([{"set": {"PV1-2": 1}}], "quote it"),
        ([{"set": {"PV1-2": "I"}, "clear": "PID-8"}], "exactly one of"),
        ([{"clear": "PID-8", "escape": False}], "only goes with 'set'"),
        ([{"rename": "PID-8"}], "unknown key 'rename' in an edit"),
        ([], "at least 1"),
    ],
)
def test_transform_config_errors_name_the_edit_and_path(
    edits: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        TransformOptions.model_validate({"edits": edits})


def test_transform_config_errors_point_at_the_edits_key() -> None:
    with pytest.raises(ValidationError) as caught:
        TransformOptions.model_validate({"edits": [{"set": {"PID-x": "1"}}]})
    assert caught.value.errors()[0]["loc"] == ("edits",)


def test_transform_unknown_option_is_an_error() -> None:
    with pytest.raises(ValidationError, match="extra"):
        TransformOptions.model_validate({"edits": [{"clear": "PID-8"}], "edit": []})


def test_a_failing_edit_changes_nothing_and_names_the_edit() -> None:
    step = build({"edits": [{"set": {"PID-8": "M"}}, {"set": {"PV1-2": "I"}}]})
    item = work()
    with pytest.raises(EditError, match=r"edits\[1\] set: cannot set PV1-2"):
        step.translate(item)
    assert item.v2 == ADT


def test_a_transform_that_changes_nothing_keeps_the_original_text() -> None:
    crlf = ADT.replace("\r", "\r\n")
    item = work(crlf)
    build({"edits": [{"clear": "PV1-3"}]}).translate(item)
    assert item.v2 == crlf


def test_a_value_yaml_made_a_number_is_never_offered_back_as_the_fix() -> None:
    """`set: {PV1-36: 01}` reaches the step as the number 1: quoting '1' would write another
    code, so the error names the value's own path and asks for the text as written."""
    with pytest.raises(ValidationError) as caught:
        TransformOptions.model_validate(
            {"edits": [{"set": {"PV1-36": 1}}], "tables": {"units": {"ICU": False}}}
        )
    errors = {error["loc"]: error["msg"] for error in caught.value.errors()}
    assert set(errors) == {("tables", "units", "ICU"), ("edits", 0, "set", "PV1-36")}
    for message in errors.values():
        assert "'1'" not in message and "'False'" not in message, message
        assert "quote it as the message writes it, e.g. '01'" in message
    assert "YAML read it as the number 1" in errors[("edits", 0, "set", "PV1-36")]
    assert "YAML read it as true/false" in errors[("tables", "units", "ICU")]


def test_a_tables_file_code_yaml_made_no_text_is_told_as_written(tmp_path: Path) -> None:
    edits = [{"map": {"path": "PV1-3.1", "table": "units"}}]
    (tmp_path / "octal.yaml").write_text("units:\n  4W: MED4WEST\n  010: TEN\n")
    with pytest.raises(ConfigError) as caught:
        build({"tables_file": "octal.yaml", "edits": edits}, tmp_path)
    assert str(caught.value) == (
        f"{tmp_path / 'octal.yaml'}:3: table 'units': YAML read the code 010 as the number 8, "
        "not text; quote it as written: '010'"
    )
    (tmp_path / "north.yaml").write_text("units:\n  NO: NORTH\n  EA: off\n")
    with pytest.raises(ConfigError, match=r"north.yaml:2: table 'units': YAML read the code NO as"):
        build({"tables_file": "north.yaml", "edits": edits}, tmp_path)
    (tmp_path / "east.yaml").write_text("units:\n  EA: off\n")
    with pytest.raises(ConfigError) as caught:
        build({"tables_file": "east.yaml", "edits": edits}, tmp_path)
    assert "east.yaml:2: table 'units': YAML read the value of code 'EA' off as false" in str(
        caught.value
    )
