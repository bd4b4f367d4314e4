"""The validate step: hl7apy's checks, with its traps (CRLF, Z segments, MSH-9.3, versions,
first-error-only, no order check) worked around and every problem reported."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from carehub.builtins.validate import (
    Validate,
    ValidateOptions,
    ValidationFailed,
    validate_message,
)
from carehub.components import ComponentContext, Work
from carehub.errors import CarehubError
from carehub.store.store import StoredMessage

FEEDS = Path(__file__).resolve().parents[1] / "config" / "feeds"


def feed(name: str) -> str:
    return (FEEDS / name).read_bytes().decode("utf-8")


ADMIT = feed("02-riverside-admit.hl7")  # ADT^A01^ADT_A01, 2.5.1: MSH EVN PID PD1 PV1 DG1


def segments(text: str) -> list[str]:
    return [s for s in text.split("\r") if s]


def rebuild(parts: list[str]) -> str:
    return "\r".join(parts) + "\r"


def paths(result: dict[str, Any], severity: str = "error") -> list[str]:
    return [p["path"] for p in result["problems"] if p["severity"] == severity]


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
        sending_application="RGH_ADT",
        sending_facility="RIVERSIDE_GH",
        receiving_application="CAREHUB",
        receiving_facility="CAREHUB",
        message_type="ADT",
        trigger_event="A01",
        structure="ADT_A01",
        control_id="RGH-000102",
        version="2.5.1",
        patient_id="RG100234",
        patient_authority="RGH",
        ack_code="AA",
        status="received",
        status_at=now,
        detail=None,
    )


def step(**options: Any) -> Validate:
    here = Path(".")
    return Validate(Validate.Options.model_validate(options), ComponentContext(here, here))


def run(text: str, **options: Any) -> dict[str, Any]:
    work = Work(message=stored(text), route="test", v2=text)
    result = step(**options).translate(work)
    assert work.v2 == text  # validation never edits the message
    return result


# -- valid messages ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["02-riverside-admit.hl7", "03-riverside-update.hl7", "06-lakeview-cancel-admit.hl7"],
)
def test_sample_feeds_are_valid(name: str) -> None:
    result = run(feed(name))
    assert result["valid"] is True
    assert result["problems"] == []


def test_result_names_version_and_structure() -> None:
    result = run(ADMIT)
    assert result == {"valid": True, "version": "2.5.1", "structure": "ADT_A01", "problems": []}


def test_crlf_and_lf_segment_ends_give_the_same_result() -> None:
    broken = ADMIT.replace("RG100234^^^RGH^MR", "")
    expected = run(broken)
    assert run(broken.replace("\r", "\r\n")) == expected
    assert run(broken.replace("\r", "\n")) == expected
    assert expected["valid"] is False


# -- problems ---------------------------------------------------------------------------------
def test_missing_required_field_is_reported_with_its_path() -> None:
    result = run(ADMIT.replace("RG100234^^^RGH^MR", ""))
    assert result["valid"] is False
    assert result["problems"] == [
        {"severity": "error", "path": "PID-3", "message": "required field PID-3 is empty"}
    ]


def test_missing_required_segment_is_reported() -> None:
    result = run(feed("09-lakeview-missing-control-id.hl7"))
    assert result["valid"] is False
    assert paths(result) == ["EVN", "MSH-10"]


def test_every_problem_is_reported_not_just_the_first() -> None:
    parts = segments(ADMIT.replace("RG100234^^^RGH^MR", ""))
    parts = [p for p in parts if not p.startswith("EVN")]
    parts.append("DG1|2||I10^Hypertension^I10||20261124")  # DG1-6 is required
    result = run(rebuild(parts))
    assert paths(result) == ["EVN", "PID-3", "DG1[2]-6"]


def test_wrong_segment_order_is_reported() -> None:
    parts = segments(ADMIT)
    parts[1], parts[2] = parts[2], parts[1]  # PID before EVN: hl7apy itself accepts this
    result = run(rebuild(parts))
    assert result["valid"] is False
    assert result["problems"] == [
        {
            "severity": "error",
            "path": "EVN",
            "message": "segment EVN is out of order for ADT_A01 (after PID)",
        }
    ]


def test_segment_that_does_not_belong_to_the_structure() -> None:
    parts = segments(ADMIT)
    parts.insert(3, "ORC|NW|123")
    result = run(rebuild(parts))
    assert result["problems"] == [
        {"severity": "error", "path": "ORC", "message": "segment ORC is not part of ADT_A01"}
    ]


def test_z_segments_are_allowed_anywhere() -> None:
    parts = segments(ADMIT)
    parts.insert(1, "ZAA|after msh")
    parts.insert(4, "ZPI|1|custom^value")
    parts.append("ZZZ|at the end")
    result = run(rebuild(parts))
    assert result["valid"] is True
    assert result["problems"] == []


def test_unknown_non_z_segment_is_reported_not_dropped() -> None:
    parts = segments(ADMIT)
    parts.insert(3, "XXX|1|abc")
    result = run(rebuild(parts))
    assert result["valid"] is False
    assert paths(result) == ["XXX"]
    assert "unknown segment XXX" in result["problems"][0]["message"]


def test_unsupported_version_is_a_problem_not_a_crash() -> None:
    result = run(ADMIT.replace("|2.5.1|", "|2.9|"))
    assert result["valid"] is False
    assert result["version"] == "2.9"
    assert paths(result) == ["MSH-12"]
    assert "not supported" in result["problems"][0]["message"]


def test_version_option_overrides_msh_12() -> None:
    result = run(ADMIT.replace("|2.5.1|", "|2.9|"), version="2.5")
    assert result["version"] == "2.5"
    assert result["valid"] is True


def test_missing_msh_9_3_is_filled_from_the_trigger_event() -> None:
    # hl7apy alone builds no structure without MSH-9.3 and reports nothing.
    update = feed("03-riverside-update.hl7").replace("ADT^A08^ADT_A01", "ADT^A08")
    assert run(update)["structure"] == "ADT_A01"
    broken = update.replace("EVN|A08|20261124150000-0500\r", "")
    assert paths(run(broken)) == ["EVN"]


def test_a_structure_the_version_lacks_is_replaced_with_a_warning() -> None:
    result = run(ADMIT.replace("ADT^A01^ADT_A01", "ADT^A04^ADT_A04"))
    assert result["structure"] == "ADT_A01"
    assert result["valid"] is True
    assert paths(result, "warning") == ["MSH-9.3"]


def test_no_structure_is_reported_clearly() -> None:
    result = run(ADMIT.replace("ADT^A01^ADT_A01", "ADT^A99"))
    assert result["structure"] is None
    assert result["valid"] is True  # field content was still checked, and is fine
    problem = next(p for p in result["problems"] if p["path"] == "MSH-9.3")
    assert problem["severity"] == "warning"
    assert problem["message"].startswith("no structure: MSH-9.3 is empty")
    assert "ADT^A99" in problem["message"]
    assert run(ADMIT.replace("ADT^A01^ADT_A01", "ADT^A99"), strict=True)["valid"] is False


def test_withdrawn_fields_are_warnings() -> None:
    text = (
        "MSH|^~\\&|A|B|C|D|20261125||ADT^A01^ADT_A01|1|P|2.8\r"
        "EVN||20261125\r"
        "PID|1|OLD^^^X|MRN^^^H^MR|OLD2|DOE^JANE\r"
        "PV1|1|I\r"
    )
    result = run(text)
    assert result["valid"] is True
    assert paths(result, "warning") == ["PID-2", "PID-4"]
    assert "withdrawn" in result["problems"][0]["message"]


def test_strict_checks_datatypes() -> None:
    text = ADMIT.replace("19580312", "notadate")
    assert run(text)["valid"] is True
    result = run(text, strict=True)
    assert result["valid"] is False
    assert paths(result) == ["PID-7"]


def test_a_line_that_is_not_a_segment_is_a_problem() -> None:
    parts = segments(ADMIT)
    parts.insert(2, "this is not a segment")
    result = run(rebuild(parts))
    assert result["valid"] is False
    assert paths(result) == ["segment 3"]


def test_text_that_is_not_hl7_is_a_problem() -> None:
    result = validate_message("hello\r")
    assert result["valid"] is False
    assert paths(result) == ["MSH"]


# -- failing the route ------------------------------------------------------------------------
def test_fail_on_error_raises_with_the_problems() -> None:
    text = ADMIT.replace("RG100234^^^RGH^MR", "")
    with pytest.raises(ValidationFailed) as caught:
        run(text, fail_on_error=True)
    assert isinstance(caught.value, CarehubError)
    assert caught.value.problems == [
        {"severity": "error", "path": "PID-3", "message": "required field PID-3 is empty"}
    ]
    assert caught.value.result["valid"] is False
    assert "PID-3" in str(caught.value)


def test_fail_on_error_lets_valid_messages_and_warnings_through() -> None:
    assert run(ADMIT, fail_on_error=True)["valid"] is True
    result = run(ADMIT.replace("ADT^A01^ADT_A01", "ADT^A04^ADT_A04"), fail_on_error=True)
    assert result["problems"][0]["severity"] == "warning"


# -- options ----------------------------------------------------------------------------------
def test_options_defaults() -> None:
    options = ValidateOptions.model_validate({})
    assert (options.version, options.strict, options.fail_on_error) == (None, False, False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"version": "2.9"}, "cannot check HL7 version '2.9'"),
        ({"version": 2.5}, "quote it"),
        ({"strict": True, "level": "x"}, "extra"),
    ],
)
def test_option_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ValidateOptions.model_validate(options)
