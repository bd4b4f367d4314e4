"""The care event and the v2 -> event translator: kind mapping, field extraction on the sample
feeds and on hand-written messages, HL7 time parsing, junk tolerance and the public corpus."""

from __future__ import annotations

import json
import random
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from carehub.builtins.event_translator import V2ToEvent, translate_v2_to_event
from carehub.components import ComponentContext, JSONText, Work
from carehub.events import (
    EVENT_KINDS,
    CareEvent,
    Identifier,
    Organization,
    Practitioner,
    event_kind,
    parse_hl7_date,
    parse_hl7_datetime,
)
from carehub.hl7.charsets import decode_message
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView, NotHL7Error
from tests.conftest import PROJECT_ROOT, corpus_files, requires_corpus

FEEDS = PROJECT_ROOT / "config" / "feeds"
EST = timezone(timedelta(hours=-5))
PLUS_0215 = timezone(timedelta(hours=2, minutes=15))


def event_of(text: str) -> CareEvent:
    return translate_v2_to_event(MessageView(text))


def feed(name: str) -> CareEvent:
    return event_of(decode_message((FEEDS / name).read_bytes()).text)


def message(*segments: str) -> str:
    return "\r".join(segments) + "\r"


def adt(trigger: str, patient_class: str = "I", structure: str = "ADT_A01") -> str:
    return message(
        f"MSH|^~\\&|APP|FAC|CAREHUB|CAREHUB|20261124081500||ADT^{trigger}^{structure}|C1|P|2.5",
        f"EVN|{trigger}|20261124081500",
        "PID|1||P1^^^HOSP^MR||DOE^JANE||19800101|F",
        f"PV1|1|{patient_class}|W^1^A^FAC",
    )


# -- kinds -------------------------------------------------------------------------------------

KIND_CASES = [
    ("ADT", "A04", "E", "ed_registration"),
    ("ADT", "A04", "O", "registration"),
    ("ADT", "A04", None, "registration"),
    ("ADT", "A01", "I", "admission"),
    ("ADT", "A01", "E", "admission"),
    ("ADT", "A06", "I", "admission"),
    ("ADT", "A02", "I", "transfer"),
    ("ADT", "A03", "I", "discharge"),
    ("ADT", "A08", "I", "update"),
    ("ADT", "A31", None, "demographics"),
    ("ADT", "A28", None, "demographics"),
    ("ADT", "A11", "I", "cancel_admission"),
    ("ADT", "A12", "I", "cancel_transfer"),
    ("ADT", "A13", "I", "cancel_discharge"),
    ("ADT", "A40", None, "merge"),
    ("ADT", "A34", None, "merge"),
    ("ADT", "A39", None, "merge"),
    ("ADT", "A05", "P", "other"),
    ("ADT", "A07", "O", "other"),
    ("ADT", "A41", None, "other"),
    ("REF", "I12", None, "referral_new"),
    ("REF", "I13", None, "referral_modify"),
    ("REF", "I14", None, "referral_cancel"),
    ("REF", "I15", None, "referral_status_request"),
    ("RRI", "I12", None, "referral_response"),
    ("RRI", "I15", None, "referral_response"),
    ("RRI", "I99", None, "other"),
    ("REF", "I99", None, "other"),
    ("ORU", "R01", None, "other"),
    ("", "", None, "other"),
]


@pytest.mark.parametrize(("message_type", "trigger", "patient_class", "kind"), KIND_CASES)
def test_event_kind_mapping(
    message_type: str, trigger: str, patient_class: str | None, kind: str
) -> None:
    assert event_kind(message_type, trigger, patient_class) == kind
    assert kind in EVENT_KINDS


@pytest.mark.parametrize(
    ("message_type", "trigger", "patient_class", "kind"),
    [case for case in KIND_CASES if case[0] and case[2] is not None],
)
def test_translated_adt_kind_uses_msh9_and_pv1_2(
    message_type: str, trigger: str, patient_class: str, kind: str
) -> None:
    event = event_of(adt(trigger, patient_class))
    assert (event.kind, event.message_type, event.trigger_event) == (kind, "ADT", trigger)
    assert event.encounter is not None and event.encounter.patient_class == patient_class


def test_trigger_falls_back_to_evn1_when_msh9_has_none() -> None:
    text = message(
        "MSH|^~\\&|APP|FAC|||20261124081500||ADT|C1|P|2.3",
        "EVN|A03|20261124081500",
        "PID|1||P1^^^HOSP^MR",
    )
    event = event_of(text)
    assert (event.message_type, event.trigger_event, event.kind) == ("ADT", "A03", "discharge")


def test_msh9_wins_over_a_disagreeing_evn1() -> None:
    text = adt("A03").replace("EVN|A03", "EVN|A01")
    assert event_of(text).kind == "discharge"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("01-riverside-ed-visit.hl7", "ed_registration"),
        ("02-riverside-admit.hl7", "admission"),
        ("03-riverside-update.hl7", "update"),
        ("04-riverside-discharge-to-snf.hl7", "discharge"),
        ("05-lakeview-admit-latin1.hl7", "admission"),
        ("06-lakeview-cancel-admit.hl7", "cancel_admission"),
        ("07-riverside-sdoh-referral.hl7", "referral_new"),
        ("08-riverside-admit-resend.hl7", "admission"),
        ("09-lakeview-missing-control-id.hl7", "ed_registration"),
    ],
)
def test_sample_feed_kinds(name: str, kind: str) -> None:
    assert feed(name).kind == kind


# -- ADT field extraction ----------------------------------------------------------------------


def test_ed_registration_fields_from_the_riverside_feed() -> None:
    event = feed("01-riverside-ed-visit.hl7")
    assert event.kind == "ed_registration"
    assert event.message_control_id == "RGH-000101"
    assert event.sending_application == "RGH_ADT"
    assert event.sending_facility == "RIVERSIDE_GH"
    assert event.raw_version == "2.5.1"
    assert event.structure == "ADT_A01"
    assert event.occurred_at == datetime(2026, 11, 24, 8, 15, tzinfo=EST)

    patient = event.patient
    assert patient is not None
    assert patient.primary == Identifier(value="RG100234", authority="RGH", type_code="MR")
    assert [i.type_code for i in patient.identifiers] == ["MR"]  # the SSN is left out
    text = decode_message((FEEDS / "01-riverside-ed-visit.hl7").read_bytes()).text
    kept = translate_v2_to_event(MessageView(text), keep_national_ids=True).patient
    assert kept is not None and [i.type_code for i in kept.identifiers] == ["MR", "SS"]
    assert patient.account_number == Identifier(value="RG-V-5521")
    assert patient.name is not None
    assert (patient.name.family, patient.name.given, patient.name.middle) == (
        "Okafor",
        "Amara",
        "N",
    )
    assert patient.birth_date == date(1958, 3, 12)
    assert patient.sex == "F"
    assert patient.address is not None
    assert (patient.address.line1, patient.address.city, patient.address.postal_code) == (
        "418 Birch Lane",
        "Springfield",
        "62704",
    )
    assert patient.phone == "+1 217 5550142"

    encounter = event.encounter
    assert encounter is not None
    assert encounter.patient_class == "E"
    assert encounter.visit_number == Identifier(
        value="V20261124-0001", authority="RGH", type_code="VN"
    )
    assert encounter.location is not None
    assert (encounter.location.point_of_care, encounter.location.room) == ("ED", "ED12")
    assert encounter.facility == "RIVERSIDE_GH"
    assert encounter.hospital_service == "EM"
    assert encounter.attending is not None
    assert (encounter.attending.id, encounter.attending.id_authority) == ("1497758544", "NPI")
    assert encounter.admit_time == datetime(2026, 11, 24, 8, 12, tzinfo=EST)


def test_pd1_4_is_the_pcp() -> None:
    pcp = feed("01-riverside-ed-visit.hl7").patient.pcp  # type: ignore[union-attr]
    assert pcp == Practitioner(
        id="1306849450",
        id_authority="NPI",
        family="Lindqvist",
        given="Erik",
        prefix="Dr",
        role="PP",
    )


def test_rol_pp_is_the_pcp_when_pd1_has_none() -> None:
    text = message(
        "MSH|^~\\&|APP|FAC|||20261124081500||ADT^A08^ADT_A01|C1|P|2.5",
        "PID|1||P1^^^HOSP^MR||DOE^JANE",
        "ROL|1|AD|AT^Attending^HL70443|111^Other^Doc",
        "ROL|2|AD|PP^Primary Care Provider^HL70443|1306849450^Lindqvist^Erik^^^Dr^^^NPI",
    )
    pcp = event_of(text).patient.pcp  # type: ignore[union-attr]
    assert pcp is not None
    assert (pcp.id, pcp.family, pcp.role) == ("1306849450", "Lindqvist", "PP")


def test_dg1_diagnoses() -> None:
    event = feed("07-riverside-sdoh-referral.hl7")
    assert [(d.code, d.system, d.type) for d in event.diagnoses] == [
        ("Z59.41", "I10", "F"),
        ("Z59.811", "I10", "F"),
    ]
    assert event.diagnoses[0].display == "Food insecurity"
    # v2.3 style: coding method in DG1-2, description in DG1-4.
    text = adt("A01") + "DG1|1|I9|71596|OSTEOARTHROS NOS-L/LEG||A\r"
    (diagnosis,) = event_of(text).diagnoses
    assert (diagnosis.code, diagnosis.system, diagnosis.display, diagnosis.type) == (
        "71596",
        "I9",
        "OSTEOARTHROS NOS-L/LEG",
        "A",
    )


A01_THEN_A03 = [
    "MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|20261127113000-0500||ADT^{t}^ADT_{t}|{c}|P|2.5.1",
    "EVN|{t}|20261127113000-0500",
    "PID|1||RG100234^^^RGH^MR||Okafor^Amara^N||19580312|F",
    "PV1|1|I|4W^412^A^RIVERSIDE_GH|U|||1497758544^Moreau^Celine^^^Dr^^^NPI||"
    "|MED||||7|||1184629371^Haddad^Samir^^^Dr^^^NPI|IP|V1^^^RGH^VN|||||||||||||||||{disp}|{to}"
    "|||||||20261124081200-0500|{end}",
]


def test_a01_admission_fields() -> None:
    text = message(*A01_THEN_A03).format(t="A01", c="A1", disp="", to="", end="")
    event = event_of(text)
    encounter = event.encounter
    assert event.kind == "admission"
    assert encounter is not None
    assert encounter.admit_type == "U"
    assert encounter.admit_source == "7"
    assert encounter.admitting is not None and encounter.admitting.family == "Haddad"
    assert encounter.admit_time == datetime(2026, 11, 24, 8, 12, tzinfo=EST)
    assert encounter.discharge_time is None
    assert encounter.discharge_disposition is None


def test_a03_discharge_fields() -> None:
    text = message(*A01_THEN_A03).format(
        t="A03",
        c="A3",
        disp="03",
        to="SNF^Maple Grove Skilled Nursing",
        end="20261127112500-0500",
    )
    encounter = event_of(text).encounter
    assert encounter is not None
    assert encounter.discharge_disposition == "03"
    assert encounter.discharged_to == "SNF"
    assert encounter.discharged_to_name == "Maple Grove Skilled Nursing"
    assert encounter.discharge_time == datetime(2026, 11, 27, 11, 25, tzinfo=EST)
    assert encounter.admit_time == datetime(2026, 11, 24, 8, 12, tzinfo=EST)


def test_discharged_to_as_v27_cwe_and_dld_effective_date() -> None:
    text = message(*A01_THEN_A03).format(
        t="A03", c="A3", disp="06", to="HHA&Home health agency^20261127", end="20261127"
    )
    encounter = event_of(text).encounter
    assert encounter is not None
    assert (encounter.discharged_to, encounter.discharged_to_name) == ("HHA", "Home health agency")
    assert encounter.discharge_time == datetime(2026, 11, 27)  # no offset given: naive


def test_a04_patient_class_e_is_an_ed_registration() -> None:
    event = event_of(adt("A04", "E"))
    assert event.kind == "ed_registration"
    assert event.encounter is not None and event.encounter.patient_class == "E"
    assert event_of(adt("A04", "O")).kind == "registration"


def test_a40_merge_prior_identifiers_per_patient() -> None:
    text = message(
        "MSH|^~\\&|APP|FAC|||20190423150137+0215||ADT^A40^ADT_A39|M1|P|2.5",
        "EVN|A40|20190423150137+0215",
        "PID|1||12345^^^BCBS^MR||Test^Test",
        "MRG|56789^^^BCBS^MR~999^^^SSA^SS||ACC9^^^BCBS^AN||V9^^^BCBS^VN",
        "PID|1||145^^^BCBS^MR||Test^Other",
        "MRG|569^^^BCBS^MR",
    )
    event = event_of(text)
    assert event.kind == "merge"
    assert event.patient is not None
    assert event.patient.primary == Identifier(value="12345", authority="BCBS", type_code="MR")
    assert event.merged_identifiers == [Identifier(value="56789", authority="BCBS", type_code="MR")]
    assert translate_v2_to_event(MessageView(text), keep_national_ids=True).merged_identifiers == [
        Identifier(value="56789", authority="BCBS", type_code="MR"),
        Identifier(value="999", authority="SSA", type_code="SS"),
    ]
    assert len(event.merges) == 2
    first, second = event.merges
    assert first.prior_account_number == Identifier(value="ACC9", authority="BCBS", type_code="AN")
    assert first.prior_visit_number == Identifier(value="V9", authority="BCBS", type_code="VN")
    assert second.surviving == Identifier(value="145", authority="BCBS", type_code="MR")
    assert second.prior_identifiers == [Identifier(value="569", authority="BCBS", type_code="MR")]
    assert event.occurred_at is not None
    assert event.occurred_at.utcoffset() == timedelta(hours=2, minutes=15)


def test_escapes_are_decoded_after_splitting() -> None:
    text = adt("A08").replace("DOE^JANE", "O\\T\\BRIEN\\S\\JR^ANNE")
    name = event_of(text).patient.name  # type: ignore[union-attr]
    assert name is not None and (name.family, name.given) == ("O&BRIEN^JR", "ANNE")


def test_explicit_null_and_legacy_pid2() -> None:
    text = message(
        "MSH|^~\\&|APP|FAC|||20050110045504||ADT^A08|C1|P|2.3",
        'PID|1|X77^^^OLD^PI|||DOE^JANE||""|""',
    )
    patient = event_of(text).patient
    assert patient is not None
    assert patient.primary == Identifier(value="X77", authority="OLD", type_code="PI")
    assert patient.birth_date is None and patient.sex is None


# -- referrals ---------------------------------------------------------------------------------

REF_I12 = message(
    "MSH|^~\\&|RGH_REF|RIVERSIDE_GH|CAREHUB|CAREHUB|20261127120000-0500||REF^I12^REF_I12"
    "|RGH-REF-7001|P|2.5",
    "RF1|P^Pending^HL70283|R^Routine^HL70280|SO^Social services^HL70281|R^Referral^HL70282"
    "|O^Outpatient^HL70284|RGH-R-2026-0042^RGH|20261127|20261227|20261127"
    "|SDOH^Food and housing support after discharge^L|EXT-9^CBO",
    "PRD|RP^Referring provider^HL70286|Haddad^Samir^^^Dr|1200 Medical Pkwy^^Springfield^IL^62701"
    "||^WPN^PH^^1^217^5550100||1184629371^NPI",
    "CTD|CP^Contact person^HL70131|Lee^Pat|||^WPN^PH^^1^217^5550111",
    "PRD|RT^Referred to provider^HL70286|Springfield Community Food Bank"
    "|900 Market St^^Springfield^IL^62703",
    "CTD|CP^Contact person^HL70131|Intake^Desk",
    "PRD|PP^Primary care provider^HL70286|Lindqvist^Erik^^^Dr|||||1306849450^NPI",
    "PID|1||RG100234^^^RGH^MR||Okafor^Amara^N||19580312|F",
    "DG1|1||Z59.41^Food insecurity^I10||20261127|F",
    "OBR|1|||88121-9^Hunger Vital Sign^LN",
    "NTE|1||Screening note that belongs to the OBR",
    "OBX|1|ST|88124-3^Food insecurity risk^LN||At risk",
    "NTE|1||Note on the OBX",
    "PV1|1|O",
    "NTE|1||Prefers phone contact in the morning~Speaks Igbo and English",
)


def test_ref_i12_referral_fields() -> None:
    event = event_of(REF_I12)
    assert event.kind == "referral_new"
    referral = event.referral
    assert referral is not None
    assert referral.referral_id == Identifier(value="RGH-R-2026-0042", authority="RGH")
    assert referral.external_id == Identifier(value="EXT-9", authority="CBO")
    assert (referral.status, referral.priority, referral.type) == ("P", "R", "SO")
    assert (referral.disposition, referral.category) == ("R", "O")
    assert referral.reason_code == "SDOH"
    assert referral.reason == "Food and housing support after discharge"
    assert referral.effective_date == date(2026, 11, 27)
    assert referral.expiration_date == date(2026, 12, 27)
    assert referral.process_date == date(2026, 11, 27)


def test_ref_i12_prd_roles_rp_and_rt() -> None:
    referral = event_of(REF_I12).referral
    assert referral is not None
    referring = referral.referring
    assert isinstance(referring, Practitioner)
    assert (referring.id, referring.id_type, referring.family, referring.role) == (
        "1184629371",
        "NPI",
        "Haddad",
        "RP",
    )
    assert referring.phone == "+1 217 5550100"
    assert referring.address is not None and referring.address.postal_code == "62701"
    # A bare name with no given name is an organisation (a community-based organisation).
    referred_to = referral.referred_to
    assert isinstance(referred_to, Organization)
    assert referred_to.name == "Springfield Community Food Bank"
    assert referred_to.role == "RT"
    assert referred_to.address is not None and referred_to.address.line1 == "900 Market St"


def test_ref_i12_contacts_notes_and_prd_pcp() -> None:
    event = event_of(REF_I12)
    referral = event.referral
    assert referral is not None
    assert [(c.provider_role, c.name.family if c.name else None) for c in referral.contacts] == [
        ("RP", "Lee"),
        ("RT", "Intake"),
    ]
    assert referral.contacts[0].phone == "+1 217 5550111"
    # NTEs under OBR/OBX annotate the observation, not the referral.
    assert referral.notes == ["Prefers phone contact in the morning\nSpeaks Igbo and English"]
    assert event.patient is not None and event.patient.pcp is not None
    assert event.patient.pcp.id == "1306849450"


def test_referral_id_falls_back_to_rf1_11_and_reason_to_rf1_14() -> None:
    text = message(
        "MSH|^~\\&|A|F|||20220125||REF^I13^REF_I12|C1|P|2.8",
        "RF1|A||||||||||11001^EXTID|||Check for metastatic disease",
        "PID|1||P1^^^H^MR",
    )
    event = event_of(text)
    assert event.kind == "referral_modify"
    assert event.referral is not None
    assert event.referral.referral_id == Identifier(value="11001", authority="EXTID")
    assert event.referral.reason == "Check for metastatic disease"
    assert event.referral.status == "A"


def test_rri_is_a_referral_response() -> None:
    text = message(
        "MSH|^~\\&|CBO|FB|||20261201||RRI^I12^RRI_I12|R1|P|2.5",
        "MSA|AA|RGH-REF-7001",
        "RF1|A^Accepted^HL70283|||||RGH-R-2026-0042",
        "PID|1||RG100234^^^RGH^MR",
    )
    event = event_of(text)
    assert event.kind == "referral_response"
    assert event.referral is not None and event.referral.status == "A"


def test_adt_carries_no_referral() -> None:
    assert feed("02-riverside-admit.hl7").referral is None


# -- time --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20261124081500-0500", datetime(2026, 11, 24, 8, 15, tzinfo=EST)),
        ("20261124081500+0000", datetime(2026, 11, 24, 8, 15, tzinfo=UTC)),
        ("198908181126+0215", datetime(1989, 8, 18, 11, 26, tzinfo=PLUS_0215)),
        ("20261124081500", datetime(2026, 11, 24, 8, 15)),
        ("20261124081500.1234", datetime(2026, 11, 24, 8, 15, 0, 123400)),
        ("202611240815", datetime(2026, 11, 24, 8, 15)),
        ("2026112408", datetime(2026, 11, 24, 8)),
        ("20261124", datetime(2026, 11, 24)),
        ("202611", datetime(2026, 11, 1)),
        ("2026", datetime(2026, 1, 1)),
        (" 20261124 ", datetime(2026, 11, 24)),
        ("20261124081500-0500^S", datetime(2026, 11, 24, 8, 15, tzinfo=EST)),
    ],
)
def test_parse_hl7_datetime(text: str, expected: datetime) -> None:
    parsed = parse_hl7_datetime(text)
    assert parsed == expected
    assert parsed is not None and (parsed.tzinfo is None) == (expected.tzinfo is None)


JUNK_TIMES = [
    None,
    "",
    "   ",
    '""',
    "abc",
    "2026-11-24",
    "2026-11-24T08:15:00Z",
    "20261324",
    "20260230",
    "20261124250000",
    "2026112",
    "20261124081500.12345",
    "2026112408.5",
    "20261124081500-2500",
    "20261124081500-0560",
    "20261124081500+05",
    "20261124081500-05:00",
    "\uff12\uff10\uff12\uff16\uff11\uff11\uff12\uff14",  # full-width digits
    "9" * 40,
    "-0500",
    "+",
]


@pytest.mark.parametrize("text", JUNK_TIMES)
def test_junk_times_are_none_and_never_raise(text: str | None) -> None:
    assert parse_hl7_datetime(text) is None
    assert parse_hl7_date(text) is None


def test_parse_hl7_date_keeps_the_written_calendar_date() -> None:
    assert parse_hl7_date("19580312") == date(1958, 3, 12)
    assert parse_hl7_date("198808182330-1000") == date(1988, 8, 18)


def test_junk_times_in_a_message_become_none() -> None:
    text = message(
        "MSH|^~\\&|APP|FAC|||not-a-time||ADT^A03^ADT_A03|C1|P|2.5",
        "EVN|A03|2026-11-24",
        "PID|1||P1^^^HOSP^MR||DOE^JANE||19801340",
        "PV1|1|I|||||||||||||||||||||||||||||||||||||||||||99999999999999|yesterday",
    )
    event = event_of(text)
    assert event.occurred_at is None
    assert event.patient is not None and event.patient.birth_date is None
    assert event.encounter is not None
    assert (event.encounter.admit_time, event.encounter.discharge_time) == (None, None)


# -- robustness --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "MSH|^~\\&",
        "MSH|^~\\&|",
        "MSH|^~\\&|||||||||||",
        "MSH|^~\\&|A|B|C|D|E|F|^^^|~~~|&&&|\\\\\\",
        "MSH|^~\\&|A|B|||20261124||ADT^A04|1|P|2.5\rPID\rPV1\rPD1\rROL\rDG1\rMRG\rEVN",
        "MSH|^~\\&|A|B|||20261124||ADT^A04|1|P|2.5\rPID|||~~~^^^&&&||^^^||~|&\rPV1|^|~|&&&",
        "MSH|^~\\&|A|B|||20261124||REF^I12|1|P|2.5\rRF1\rPRD\rCTD\rNTE\rPRD|^\rCTD|^\rNTE|||~",
        "MSH|^~\\&|A|B|||20261124||REF^I12|1|P|2.5\rPRD|RT||||||^^^^^\rPRD|RP|^^^^^^|||||^",
        "MSH|^~\\&|A|B|||20261124||ADT^A40|1|P|2.5\rMRG|~|^\rMRG\rPID|1||\\X41\\^^^\\Xzz\\",
        "MSH|#~\\&|A|B|||20261124||ADT#A04|1|P|2.5\rPID|1||P1###H#MR\rPV1|1|E",
        "MSH|^~\\&|A|B|||20261124||ADT^A01|1|P|2.5\r" + "PID|" + "|" * 300,
    ],
)
def test_junk_messages_never_raise(text: str) -> None:
    event = event_of(text)
    json.dumps(event.model_dump(mode="json"))


def test_custom_separators_are_respected() -> None:
    event = event_of("MSH|#~\\&|A|B|||20261124||ADT#A04|1|P|2.5\rPID|1||P1###H#MR\rPV1|1|E")
    assert event.kind == "ed_registration"
    assert event.patient is not None
    assert event.patient.primary == Identifier(value="P1", authority="H", type_code="MR")


def _mutations(texts: list[str], count: int, seed: int) -> list[str]:
    """Seeded random damage: delimiters and junk inserted, characters dropped, lines cut."""
    rng = random.Random(seed)
    alphabet = "|^~\\&\r\n#.+-0123456789AZaz \"'\x00é"
    out = []
    for _ in range(count):
        text = list(rng.choice(texts))
        for _ in range(rng.randint(1, 12)):
            position = rng.randrange(8, len(text)) if len(text) > 8 else len(text)
            action = rng.random()
            if action < 0.5:
                text.insert(position, rng.choice(alphabet))
            elif action < 0.9 and position < len(text):
                del text[position]
            else:
                text = text[:position]
        out.append("".join(text))
    return out


def test_randomly_damaged_messages_never_raise() -> None:
    seeds = [decode_message(path.read_bytes()).text for path in sorted(FEEDS.glob("*.hl7"))]
    seeds.append(REF_I12)
    for text in _mutations(seeds, 1500, seed=20261124):
        try:
            view = MessageView(text)
        except NotHL7Error:
            continue
        event = translate_v2_to_event(view)
        json.dumps(event.model_dump(mode="json"))


# -- the model ---------------------------------------------------------------------------------


def test_event_round_trips_through_json() -> None:
    for event in (feed("01-riverside-ed-visit.hl7"), event_of(REF_I12)):
        dumped = json.loads(json.dumps(event.model_dump(mode="json")))
        again = CareEvent.model_validate(dumped)
        assert again.model_dump() == event.model_dump()
        # The store's key for the patient never leaves carehub: not in the JSON.
        assert event.patient is not None and event.patient.key is not None
        assert "key" not in dumped["patient"] and again.patient is not None
        assert again.patient.key is None
    assert json.loads(event.model_dump_json())["occurred_at"] == "2026-11-27T12:00:00-05:00"


def test_models_forbid_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        Identifier(value="1", authorty="typo")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        CareEvent(kind="not-a-kind", message_type="ADT", trigger_event="A01")  # type: ignore[arg-type]


# -- the translator component ------------------------------------------------------------------


def test_v2_to_event_translator_sets_work_event(tmp_path: Path) -> None:
    text = decode_message((FEEDS / "04-riverside-discharge-to-snf.hl7").read_bytes()).text
    translator = V2ToEvent(V2ToEvent.Options(), ComponentContext(tmp_path, tmp_path))
    work = Work(message=None, route="test", v2=text)  # type: ignore[arg-type]
    recorded = translator.translate(work)
    assert isinstance(work.event, CareEvent)
    assert work.event.kind == "discharge"
    assert isinstance(recorded, JSONText)  # encoded by pydantic once, stored as it is
    output = json.loads(recorded.text)
    assert output == work.event.model_dump(mode="json", exclude_none=True)
    assert output["kind"] == "discharge"
    assert output["encounter"]["discharge_disposition"] == "03"
    assert "referral" not in output  # exclude_none
    assert V2ToEvent.name == "v2-to-event" and V2ToEvent.description
    with pytest.raises(ValidationError):
        V2ToEvent.Options(unknown=1)  # type: ignore[call-arg]


# -- the public corpus -------------------------------------------------------------------------


@requires_corpus
@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_message_translates(path: Path) -> None:
    view = MessageView(decode_message(path.read_bytes()).text)
    header = MessageHeader.read(view)
    event = translate_v2_to_event(view)
    assert event.message_type == header.message_type.upper()
    assert event.trigger_event == header.trigger_event.upper()
    assert event.message_control_id == header.control_id
    if event.message_type == "ADT":
        assert event.kind == event_kind("ADT", event.trigger_event, _class(event))
        assert event.patient is not None and event.patient.primary is not None
    if event.message_type == "REF":
        assert event.referral is not None and event.kind.startswith("referral_")
    json.dumps(event.model_dump(mode="json"))


def _class(event: CareEvent) -> str | None:
    return event.encounter.patient_class if event.encounter else None


@requires_corpus
def test_corpus_specific_samples() -> None:
    corpus = {path.name: path for path in corpus_files()}

    def load(name: str) -> CareEvent:
        return event_of(decode_message(corpus[name].read_bytes()).text)

    # LF terminators, EVN-1 = A01 while MSH-9 says A03, ROL PP as well as PD1-4.
    discharge = load("ADT-A03-01.hl7")
    assert discharge.kind == "discharge"
    assert discharge.encounter is not None
    assert discharge.encounter.discharge_time == datetime(
        2015, 2, 9, 11, 34, 19, tzinfo=timezone(timedelta(hours=1, minutes=10))
    )
    assert discharge.encounter.discharged_to == "22"
    assert discharge.encounter.facility == "HOMERTON UNIVER"
    assert discharge.patient is not None and discharge.patient.pcp is not None
    assert discharge.patient.pcp.family == "Hippo"
    # A BOM before MSH, version 2.3, A04 with PV1-2 = E.
    ed = load("ADT04-251.hl7")
    assert (ed.kind, ed.raw_version) == ("ed_registration", "2.3")
    merge = load("ADT-A40-02.hl7")
    assert [m.prior_identifiers[0].value for m in merge.merges] == ["56789", "569"]
    referral = load("REF-I12-01.hl7").referral
    assert referral is not None
    assert referral.referral_id == Identifier(value="226839", authority="EPIC")
    assert referral.reason == "Provider Ordered"
    assert isinstance(referral.referring, Practitioner)
    assert referral.referring.family == "POWELL"
    assert isinstance(referral.referred_to, Practitioner)
    assert referral.referred_to.organization == "RADIANT HEALTH HOSPITAL"
    assert load("REF-I14-01.hl7").kind == "referral_cancel"
