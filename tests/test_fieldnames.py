"""Field names for `carehub messages show`: from hl7apy's tables, per version, never raising."""

from __future__ import annotations

import pytest

from carehub.hl7.fieldnames import component_names, field_name, humanize, resolve_version

# fmt: off
ALL_VERSIONS = [
    "2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.8.1", "2.8.2",
]
# fmt: on


@pytest.mark.parametrize(
    ("segment", "field", "expected"),
    [
        ("PID", 5, "Patient Name"),
        ("PID", 3, "Patient Identifier List"),
        ("PID", 1, "Set ID - PID"),
        ("PID", 7, "Date/Time of Birth"),
        ("PID", 6, "Mother's Maiden Name"),
        ("PV1", 2, "Patient Class"),
        ("PV1", 19, "Visit Number"),
        ("MSH", 1, "Field Separator"),
        ("MSH", 2, "Encoding Characters"),
        ("MSH", 9, "Message Type"),
        ("MSH", 10, "Message Control ID"),
        ("EVN", 1, "Event Type Code"),
        ("RF1", 1, "Referral Status"),
        ("NK1", 1, "Set ID - NK1"),
    ],
)
def test_known_field_names_default_version(segment: str, field: int, expected: str) -> None:
    assert field_name(segment, field) == expected
    assert field_name(segment, field, "2.5") == expected


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_core_names_in_every_version(version: str) -> None:
    assert field_name("PID", 5, version) == "Patient Name"
    assert field_name("MSH", 1, version) == "Field Separator"
    assert field_name("MSH", 2, version) == "Encoding Characters"
    assert field_name("MSH", 9, version) == "Message Type"
    assert field_name("MSH", 10, version) == "Message Control ID"
    assert field_name("PV1", 2, version) == "Patient Class"
    assert field_name("PV1", 19, version) == "Visit Number"


def test_names_follow_the_version() -> None:
    # PID-3 was renamed in 2.3.1; RF1 does not exist before 2.3.
    assert field_name("PID", 3, "2.3") == "Patient ID Internal ID"
    assert field_name("PID", 3, "2.3.1") == "Patient Identifier List"
    assert field_name("PID", 3, "2.8.2") == "Patient Identifier List"
    assert field_name("RF1", 1, "2.2") is None
    assert field_name("RF1", 1, "2.3") == "Referral Status"
    assert field_name("RF1", 1, "2.7") == "Referral Status"


def test_withdrawn_fields_do_not_shift_later_names() -> None:
    # hl7apy 2.6 leaves DG1-7..14 out of the table; DG1-15 must still be DG1-15.
    assert field_name("DG1", 7, "2.6") is None
    assert field_name("DG1", 15, "2.6") == field_name("DG1", 15, "2.5") == "Diagnosis Priority"


def test_pid3_components() -> None:
    names = component_names("PID", 3)
    assert names[:6] == [
        "ID Number",
        "Check Digit",
        "Check Digit Scheme",
        "Assigning Authority",
        "Identifier Type Code",
        "Assigning Facility",
    ]
    assert len(names) == 10  # CX has 10 components in 2.5


def test_pid5_components() -> None:
    names = component_names("PID", 5)
    assert names[:3] == [
        "Family Name",
        "Given Name",
        "Second and Further Given Names or Initials Thereof",
    ]
    assert names[3] == "Suffix (e.g. JR or III)"
    assert names[6] == "Name Type Code"
    assert len(component_names("PID", 5, "2.3")) < len(names)  # XPN grew after 2.3


def test_msh9_components() -> None:
    assert component_names("MSH", 9) == ["Message Code", "Trigger Event", "Message Structure"]


def test_component_gap_keeps_positions() -> None:
    # 2.6 XTN has no XTN-1 in hl7apy; component 2 must stay at index 1.
    names = component_names("PID", 13, "2.6")
    assert names[0] == ""
    assert names[1] == "Telecommunication Use Code"


def test_components_are_a_fresh_list() -> None:
    names = component_names("PID", 3)
    names.clear()
    assert component_names("PID", 3)[0] == "ID Number"


@pytest.mark.parametrize(
    ("segment", "field"),
    [
        ("PID", 1),  # leaf
        ("MSH", 1),
        ("MSH", 10),
        ("PID", 99),
        ("ZPI", 1),
        ("XYZ", 1),
    ],
)
def test_leaf_or_unknown_components_are_empty(segment: str, field: int) -> None:
    assert component_names(segment, field) == []


@pytest.mark.parametrize("segment", ["ZPI", "ZXX", "ZL7", "Z01"])
def test_z_segments_have_no_names(segment: str) -> None:
    for version in ("2.5", "2.8.2"):
        assert field_name(segment, 1, version) is None
        assert component_names(segment, 1, version) == []


@pytest.mark.parametrize(
    ("segment", "field"),
    [
        ("PID", 0),
        ("PID", -1),
        ("PID", 40),
        ("PID", 10**30),
        ("MSH", 0),
        ("XYZ", 1),
        ("", 1),
        ("P", 1),
        ("PIDX", 1),
        ("ANYHL7SEGMENT", 1),
    ],
)
def test_unknown_fields_are_none(segment: str, field: int) -> None:
    assert field_name(segment, field) is None


@pytest.mark.parametrize(
    ("segment", "field", "version"),
    [
        ("PID", "5", "2.5"),
        ("PID", 5.0, "2.5"),
        ("PID", None, "2.5"),
        (None, 5, "2.5"),
        (5, 5, "2.5"),
        (["PID"], 5, "2.5"),
        ("PID", [5], "2.5"),
        ("PID", 5, ["2.5"]),
        ("PID", 5, None),
        ("PID", 5, 2.5),
        ("PID", 5, "9" * 10_000),
        ("PI\x00", 1, "2.5"),
        ("QRD", 1, "2.7"),  # hl7apy 2.7 ships QRD as ('sequence',) with no fields
        ("ORO", 1, "2.1"),  # hl7apy 2.1 ships ORO without the 'sequence' tag
        ("TQ1", 1, "2.7"),  # hl7apy 2.7 TQ1-1 is a sequence with no children
    ],
)
def test_never_raises(segment: object, field: object, version: object) -> None:
    name = field_name(segment, field, version)  # type: ignore[arg-type]
    components = component_names(segment, field, version)  # type: ignore[arg-type]
    assert name is None or isinstance(name, str)
    assert isinstance(components, list)


def test_odd_hl7apy_shapes_still_give_names() -> None:
    assert field_name("ORO", 1, "2.1") == "Order Item ID"
    assert field_name("QRD", 1, "2.7") is None
    assert field_name("TQ1", 1, "2.7") == "Set ID - TQ1"
    assert component_names("TQ1", 1, "2.7") == []


def test_lowercase_and_padded_segment_ids() -> None:
    assert field_name("pid", 5) == "Patient Name"
    assert field_name(" PV1 ", 19) == "Visit Number"
    assert component_names("pid", 3)[0] == "ID Number"


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("2.5", "2.5"),
        ("2.5.1", "2.5.1"),
        ("2.3.1", "2.3.1"),
        ("2.8.2", "2.8.2"),
        (" 2.4 ", "2.4"),
        ("2.5.1^USA", "2.5.1"),  # MSH-12 as a VID composite
        ("2.9", "2.8.2"),
        ("2.10", "2.8.2"),
        ("2.7.1", "2.7"),
        ("2.6.9", "2.6"),
        ("2.0", "2.1"),
        ("3.0", "2.5"),
        ("", "2.5"),
        ("garbage", "2.5"),
        (None, "2.5"),
        ("9" * 10_000, "2.5"),
    ],
)
def test_resolve_version(version: object, expected: str) -> None:
    assert resolve_version(version) == expected


def test_unsupported_version_falls_back() -> None:
    assert field_name("PID", 5, "2.9") == "Patient Name"
    assert field_name("PID", 5, "") == "Patient Name"
    assert field_name("PID", 5, "garbage") == "Patient Name"
    assert field_name("PV1", 19, "2.7.1") == "Visit Number"
    # 2.9 reads the newest table (2.8.2), where RF1-1 is a CWE with more components than CE.
    assert component_names("RF1", 1, "2.9") == component_names("RF1", 1, "2.8.2")
    assert len(component_names("RF1", 1, "2.9")) > len(component_names("RF1", 1, "2.5"))


@pytest.mark.parametrize(
    ("long_name", "segment", "expected"),
    [
        ("PATIENT_NAME", "PID", "Patient Name"),
        ("SET_ID_PID", "PID", "Set ID - PID"),
        ("SET_ID___CER", "CER", "Set ID - CER"),
        ("DATE_TIME_OF_BIRTH", "PID", "Date/Time of Birth"),
        ("MOTHER_S_MAIDEN_NAME", "PID", "Mother's Maiden Name"),
        ("ADDRESS_OF_OUTSIDE_SITE_S", "OM1", "Address of Outside Site(s)"),
        ("AUTOPSY_PERFORMED_BY", "PDA", "Autopsy Performed By"),
        ("PREFIX_E_G_DR", None, "Prefix (e.g. DR)"),
        ("INACTIVATIO   N_DATE", None, "Inactivation Date"),
        ("HL7_ERROR_CODE", None, "HL7 Error Code"),
        ("SSN_NUMBER_PATIENT", "PID", "SSN Number Patient"),
        ("COMPONENT_DRUG_IDS", "RXC", "Component Drug IDs"),
        ("PRACTITIONER_ORG_UNIT_IDENTIFIER", "STF", "Practitioner Org Unit Identifier"),
    ],
)
def test_humanize(long_name: str, segment: str | None, expected: str) -> None:
    assert humanize(long_name, segment, frozenset({"ORG", "PID", "CER"})) == expected
