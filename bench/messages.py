"""The synthetic ADT^A01 v2.5 message the intake benchmark sends.

A realistic admission (~2.6 KB, the size of a typical hospital ADT feed message) rather than a
three-segment toy, so parsing and storage costs look like production. Every name, number and
address in it is invented. Only MSH-10 changes per message: the template is split around it once,
so building a message costs one concatenation and does not skew the client's timing.
"""

from __future__ import annotations

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"

#: Placeholder for MSH-10 in the template below.
CONTROL_ID_SLOT = "{control_id}"

_SEGMENTS = [
    "MSH|^~\\&|SYNTH_ADT|SYNTH_GENERAL|CAREHUB|CAREHUB_FAC|20240115083000||ADT^A01^ADT_A01|"
    + CONTROL_ID_SLOT
    + "|P|2.5|||AL|NE",
    "EVN|A01|20240115083000|||OP4711^Operator^Olivia^^^^^^SYNTH_GENERAL^L^^^EI|20240115082500",
    "PID|1||MRN00123456^^^SYNTH_GENERAL^MR^SYNTH_GENERAL~"
    "ENC99887766^^^SYNTH_GENERAL^AN^SYNTH_GENERAL~"
    "NHI4455667^^^SYNTH_NATION^NI^SYNTH_NATION||"
    "Testpatient^Alexandra^Quinn^^Ms^^L~Testpatient^Alex^^^^^A|Samplemother^Martha^^^^^M|"
    "19800214|F||2106-3^White^HL70005|"
    "42 Example Lane^Apartment 7^Springfield^ST^99999^USA^H^^SPR||"
    "^PRN^PH^^1^555^0100123~^NET^Internet^alexandra.testpatient@example.invalid|"
    "^WPN^PH^^1^555^0100456|en^English^ISO639|M^Married^HL70002|CHR^Christian^HL70006|"
    "ACC10293847^^^SYNTH_GENERAL^AN|||N^Not Hispanic or Latino^HL70189||N|1|||||N",
    "NK1|1|Testpatient^Jordan^^^^^L|SPO^Spouse^HL70063|"
    "42 Example Lane^Apartment 7^Springfield^ST^99999^USA^H|^PRN^PH^^1^555^0100789||"
    "EC^Emergency Contact^HL70131",
    "NK1|2|Testchild^Riley^^^^^L|CHD^Child^HL70063|"
    "15 Sample Street^^Springfield^ST^99999^USA^H|^PRN^PH^^1^555^0100321||"
    "N^Next of Kin^HL70131",
    "PV1|1|I|4W^412^B^SYNTH_GENERAL^^^^4 West Medical||||"
    "1122334455^Attending^Avery^^^Dr^^^NPI^L^^^NPI|"
    "2233445566^Referring^Robin^^^Dr^^^NPI^L^^^NPI|"
    "|MED||||7|A0||"
    "1122334455^Attending^Avery^^^Dr^^^NPI^L^^^NPI|IP|V20240115001^^^SYNTH_GENERAL^VN|"
    "SELF||||||||||||||||||||SYNTH_GENERAL|||||20240115082500",
    "PV2|||R10.9^Abdominal pain, unspecified^I10||||||20240118|3|||||||||||N|||||||||||||N",
    "OBX|1|NM|8867-4^Heart rate^LN||88|/min^per minute^UCUM|60-100|N|||F|||20240115081500",
    "OBX|2|NM|8480-6^Systolic blood pressure^LN||132|mm[Hg]^millimeter of mercury^UCUM|"
    "90-140|N|||F|||20240115081500",
    "OBX|3|NM|8462-4^Diastolic blood pressure^LN||84|mm[Hg]^millimeter of mercury^UCUM|"
    "60-90|N|||F|||20240115081500",
    "OBX|4|NM|8310-5^Body temperature^LN||37.9|Cel^degree Celsius^UCUM|36.1-37.2|H|||F|||"
    "20240115081500",
    "OBX|5|NM|29463-7^Body weight^LN||68.4|kg^kilogram^UCUM||N|||F|||20240115081500",
    "AL1|1|DA|70618^Penicillin^RXNORM|SV|Hives and facial swelling|20050310",
    "AL1|2|FA|256349002^Peanut^SCT|MO|Itching|20100601",
    "DG1|1|I10|R10.31^Right lower quadrant pain^I10|Right lower quadrant pain|20240115082500|A",
    "DG1|2|I10|K35.80^Acute appendicitis, unspecified^I10|Suspected acute appendicitis|"
    "20240115082500|W",
    "IN1|1|PPO123^Synthetic PPO Gold|INSCO42^^^SYNTH_PAYERS^NIIP|Synthetic Insurance Company|"
    "500 Imaginary Plaza^^Capital City^ST^99990^USA||^WPN^PH^^1^555^0199000|GRP778899|"
    "Example Employer Group||Example Employer Inc|20230101|20241231|||"
    "Testpatient^Alexandra^Quinn^^^^L|SEL^Self^HL70063|19800214|"
    "42 Example Lane^Apartment 7^Springfield^ST^99999^USA|Y||1||||||||||||||POL5566778899|"
    "||||||F",
]

TEMPLATE = "\r".join(_SEGMENTS) + "\r"
_HEAD, _TAIL = (part.encode("ascii") for part in TEMPLATE.split(CONTROL_ID_SLOT))
_FRAMED_HEAD = START_BLOCK + _HEAD
_FRAMED_TAIL = _TAIL + END_BLOCK


def adt_a01(control_id: str) -> bytes:
    """The ADT^A01 payload (no MLLP framing) with MSH-10 set to `control_id`."""
    return _HEAD + control_id.encode("ascii") + _TAIL


def adt_a01_frame(control_id: str) -> bytes:
    """The ADT^A01 message wrapped in MLLP framing, ready to write to a socket."""
    return _FRAMED_HEAD + control_id.encode("ascii") + _FRAMED_TAIL


if __name__ == "__main__":
    sample = adt_a01("SAMPLE00000001")
    print(sample.decode("ascii").replace("\r", "\n"))
    segments = sample.count(b"\r")
    print(f"-- {len(sample)} bytes, {segments} segments")
