"""The care-team roster, the provider directory and the care-team enricher: file formats,
reloading without a restart (and surviving a broken edit), PCP and post-acute resolution with
de-duplication, opt-outs and per-member suppressions, and the shipped sample config."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from carehub.builtins.event_translator import translate_v2_to_event
from carehub.care.model import CareTeam, Suppression, Transition
from carehub.care.roster import (
    CareTeamEnricher,
    CareTeamError,
    ProviderDirectory,
    Roster,
)
from carehub.components import ComponentContext, Work
from carehub.errors import ConfigError
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.routing.dryrun import preview_message
from carehub.store.schema import MessageStatus
from carehub.store.store import MessageStore, NewMessage, sqlite_url
from tests.conftest import PROJECT_ROOT

CONFIG = PROJECT_ROOT / "config"
FEEDS = CONFIG / "feeds"
LINDQVIST = "1306849450"

HEADER = "patient_id,authority,opt_out,opt_out_reason,member_id,name,role,channel,address,npi"
ROSTER_CSV = f"""\
# test roster
{HEADER}
RG100234,RGH,false,,cc-1,Casey Exampleton RN,care_coordinator,email,cc@example.org,
RG100234,RGH,,,bh-1,Quinn Mock PsyD,behavioral_health,sms,+1-217-555-0155,
LM-448812,LMC,,,pcp-t,Dr Alex Testwell,pcp,email,testwell@example.com,1356478921
"""

ROSTER_YAML = """\
patients:
  - patient_id: RG100234
    authority: RGH
    members:
      - member_id: cc-1
        name: Casey Exampleton RN
        role: care_coordinator
        channel: email
        address: cc@example.org
      - {member_id: bh-1, name: Quinn Mock PsyD, role: behavioral_health,
         channel: sms, address: "+1-217-555-0155"}
  - patient_id: LM-448812
    authority: LMC
    members:
      - {member_id: pcp-t, name: Dr Alex Testwell, role: pcp, channel: email,
         address: testwell@example.com, npi: "1356478921"}
"""

PROVIDERS_YAML = f"""\
providers:
  "{LINDQVIST}":
    name: Dr Erik Lindqvist
    organization: Springfield Family Practice
    channel: email
    address: lindqvist@example.org
    preference: daily_digest
  "1588667701":
    name: Springfield Family Practice
    kind: practice
    channel: email
    address: transitions@example.org
    detail: full
  "1245319599":
    name: Dr Sam Sampleton
    practice: "1588667701"
facilities:
  MAPLEGROVE_SNF:
    name: Maple Grove SNF
    channel: email
    address: admissions@example.com
  OAKHAVEN_LTC:
    name: Oakhaven LTC
"""

PD1 = f"PD1|||Springfield Family Practice^^^^^^^^^{LINDQVIST}|{LINDQVIST}^Lindqvist^Erik^^^Dr^^^NPI"


def adt(
    trigger: str = "A01",
    patient: str = "RG100234^^^RGH^MR",
    pd1: str | None = PD1,
    discharged_to: str = "",
) -> str:
    """An ADT message; PV1-36/37 are filled when ``discharged_to`` is given."""
    pv1 = ["PV1", "1", "I", "4W^412^A^RIVERSIDE_GH"] + [""] * 15 + ["V1^^^RGH^VN"]
    if discharged_to:
        pv1 += [""] * 16 + ["03", discharged_to]
    segments = [
        f"MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|20261124103000||ADT^{trigger}^ADT_A01|"
        f"T-{trigger}|P|2.5.1",
        f"EVN|{trigger}|20261124103000",
        f"PID|1||{patient}||Testperson^Pat||19580312|F",
        *([pd1] if pd1 else []),
        "|".join(pv1),
    ]
    return "\r".join(segments) + "\r"


def work_of(text: str | bytes, data: dict[str, Any] | None = None) -> Work:
    raw = text.encode() if isinstance(text, str) else text
    message = preview_message(raw)
    work = Work(message=message, route="care", v2=message.text, data=dict(data or {}))
    work.event = translate_v2_to_event(work.view)
    return work


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def bump(path: Path, text: str) -> None:
    """Rewrite a file and move its mtime forward, as an editor saving it later would."""
    before = path.stat().st_mtime_ns
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


def enricher(tmp_path: Path, roster: str = ROSTER_CSV, **options: Any) -> CareTeamEnricher:
    write(tmp_path / "care" / "roster.csv", roster)
    write(tmp_path / "care" / "providers.yaml", PROVIDERS_YAML)
    settings: dict[str, Any] = {
        "roster": "care/roster.csv",
        "providers": "care/providers.yaml",
        **options,
    }
    component = CareTeamEnricher(
        CareTeamEnricher.Options.model_validate(settings),
        ComponentContext(config_dir=tmp_path, data_dir=tmp_path / "data"),
    )
    asyncio.run(component.start())
    return component


def ids(team: dict[str, Any]) -> list[str]:
    return [r["id"] for r in team["recipients"]]


# -- roster files ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), [("r.csv", ROSTER_CSV), ("r.yaml", ROSTER_YAML)])
def test_roster_formats_load_the_same_patients(tmp_path: Path, name: str, text: str) -> None:
    roster = Roster(write(tmp_path / name, text))
    roster.load()
    assert roster.count() == 2
    patient = roster.find("RG100234", "rgh")  # authorities compare case-insensitively
    assert patient is not None and not patient.opt_out
    assert [m.member_id for m in patient.members] == ["cc-1", "bh-1"]
    assert patient.members[0].preference == "immediate" and patient.members[0].detail is None
    assert patient.members[1].channel == "sms"
    assert roster.find("RG100234", "LMC") is None  # ids repeat across authorities
    assert roster.find("RG100234", None) is None
    assert roster.find_key("LMC|LM-448812").members[0].npi == "1356478921"  # type: ignore[union-attr]


def test_roster_csv_merges_patient_flags_and_allows_flag_only_rows(tmp_path: Path) -> None:
    text = (
        f"{HEADER}\n"
        "RG1,RGH,,,cc-1,Casey,care_coordinator,email,cc@example.org,\n"
        "RG1,RGH,yes,asked at registration,bh-1,Quinn,behavioral_health,email,q@example.org,\n"
        "RG2,RGH,true,no notices,,,,,,\n"
    )
    roster = Roster(write(tmp_path / "r.csv", text))
    roster.load()
    first = roster.find("RG1", "RGH")
    assert first is not None and first.opt_out and first.opt_out_reason == "asked at registration"
    assert len(first.members) == 2
    second = roster.find("RG2", "RGH")
    assert second is not None and second.opt_out and second.members == ()


def test_broken_csv_at_start_names_the_file_and_every_bad_row(tmp_path: Path) -> None:
    text = (
        f"{HEADER}\n"
        "RG1,RGH,,,cc-1,Casey,care_coordinator,email,cc@example.org,\n"
        "RG2,RGH,,,cc-2,Casey,nurse,email,cc@example.org,\n"
        "RG3,RGH,maybe,,cc-3,Casey,care_coordinator,email,cc@example.org,\n"
        "RG4,RGH,,,cc-4,Casey, RN,care_coordinator,email,cc@example.org,\n"
        "RG5,RGH,,,cc-5,Casey,care_coordinator,sms,cc@example.org,\n"
    )
    path = write(tmp_path / "roster.csv", text)
    with pytest.raises(ConfigError) as caught:
        Roster(path).load()
    message = str(caught.value)
    assert f"{path}:3: role:" in message
    assert f"{path}:4: opt_out:" in message
    assert f"{path}:5: 11 cells but the header has 10 columns" in message
    assert f"{path}:6: address 'cc@example.org' is not a phone number" in message
    assert ":2:" not in message


def test_roster_csv_header_errors(tmp_path: Path) -> None:
    text = "# exported nightly\npatient_id,authority,member_id,name,role,chanel\n"
    path = write(tmp_path / "roster.csv", text)
    with pytest.raises(ConfigError, match=r"roster\.csv:2: header lacks column\(s\) channel"):
        Roster(path).load()
    with pytest.raises(ConfigError, match="no header row"):
        Roster(write(tmp_path / "empty.csv", "# nothing yet\n")).load()


def test_broken_yaml_at_start_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "roster.yaml", ROSTER_YAML.replace("role: care_coordinator", "role: x"))
    with pytest.raises(ConfigError, match=r"roster\.yaml:7: patients\[0\]\.members\[0\]\.role"):
        Roster(path).load()
    path = write(tmp_path / "bad.yaml", "patients:\n  - patient_id: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:3: not valid YAML"):
        Roster(path).load()
    with pytest.raises(ConfigError, match=r"\.csv, \.yaml or \.yml"):
        Roster(tmp_path / "roster.txt")


def test_missing_roster_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the care-team roster"):
        Roster(tmp_path / "absent.csv").load()


# -- reloading ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_roster_reloads_when_the_file_changes_at_most_every_interval(tmp_path: Path) -> None:
    clock = Clock()
    path = write(tmp_path / "roster.csv", ROSTER_CSV)
    roster = Roster(path, reload_seconds=5, clock=clock)
    roster.load()
    bump(path, ROSTER_CSV + "RG100299,RGH,,,cc-9,New Member,other,email,new@example.org,\n")

    clock.now += 4  # inside the interval: not even a stat
    assert roster.refresh() is False and roster.find("RG100299", "RGH") is None
    clock.now += 2
    assert roster.refresh() is True
    assert roster.find("RG100299", "RGH") is not None
    clock.now += 10
    assert roster.refresh() is False  # unchanged since the reload


def test_enricher_sees_a_roster_edit_without_a_restart(tmp_path: Path) -> None:
    component = enricher(tmp_path, reload_seconds=0)
    work = work_of(adt())
    assert "cc-9" not in ids(component.enrich(work))
    bump(
        tmp_path / "care" / "roster.csv",
        ROSTER_CSV + "RG100234,RGH,,,cc-9,New Member,other,email,new@example.org,\n",
    )
    assert "cc-9" in ids(component.enrich(work_of(adt())))


def test_broken_reload_keeps_the_last_good_roster(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "roster.csv", ROSTER_CSV)
    roster = Roster(path, reload_seconds=0)
    roster.load()
    bump(path, f"{HEADER}\nRG100234,RGH,,,cc-1,Casey,nobody,email,cc@example.org,\n")
    with caplog.at_level(logging.ERROR, logger="carehub.care.roster"):
        assert roster.refresh() is False
        assert roster.refresh() is False  # the same broken file is reported once
    assert roster.count() == 2 and roster.find("LM-448812", "LMC") is not None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"{path}:2: role:" in errors[0].getMessage()

    path.unlink()  # a deleted file keeps the last good copy too
    assert roster.refresh() is False and roster.count() == 2

    write(path, ROSTER_CSV.replace("Casey Exampleton RN", "Casey Renamed RN"))
    assert roster.refresh() is True
    assert roster.find("RG100234", "RGH").members[0].name == "Casey Renamed RN"  # type: ignore[union-attr]


def test_broken_reload_never_breaks_routing(tmp_path: Path) -> None:
    component = enricher(tmp_path, reload_seconds=0)
    bump(tmp_path / "care" / "roster.csv", "patient_id\n\x00garbage")
    bump(tmp_path / "care" / "providers.yaml", "providers: [")
    team = component.enrich(work_of(adt()))
    assert ids(team) == ["cc-1", "bh-1", f"npi:{LINDQVIST}"]


# -- provider directory ------------------------------------------------------------------------


def test_directory_yaml_lookups_and_practice_inbox(tmp_path: Path) -> None:
    directory = ProviderDirectory(write(tmp_path / "providers.yaml", PROVIDERS_YAML))
    directory.load()
    assert directory.by_npi(LINDQVIST).address == "lindqvist@example.org"  # type: ignore[union-attr]
    via_practice = directory.by_npi("1245319599")
    assert via_practice is not None
    assert via_practice.address == "transitions@example.org"  # the practice's inbox
    assert via_practice.organization == "Springfield Family Practice"
    assert via_practice.detail == "full"
    assert directory.by_code("maplegrove_snf").name == "Maple Grove SNF"  # type: ignore[union-attr]
    assert directory.by_npi("1999999999") is None and directory.by_code(None) is None


def test_directory_csv(tmp_path: Path) -> None:
    text = (
        "npi,code,name,organization,channel,address,preference,detail,practice\n"
        f"{LINDQVIST},,Dr Erik Lindqvist,Springfield FP,email,l@example.org,immediate,full,\n"
        ",MAPLEGROVE_SNF,Maple Grove SNF,,email,snf@example.com,,,\n"
    )
    directory = ProviderDirectory(write(tmp_path / "providers.csv", text))
    directory.load()
    assert directory.by_npi(LINDQVIST).detail == "full"  # type: ignore[union-attr]
    assert directory.by_code("MAPLEGROVE_SNF").preference == "immediate"  # type: ignore[union-attr]
    bad = write(tmp_path / "bad.csv", text + f"{LINDQVIST},X,Both,,email,b@example.org,,,\n")
    with pytest.raises(ConfigError, match=r"bad\.csv:4: give exactly one of npi"):
        ProviderDirectory(bad).load()


def test_directory_errors_name_the_line(tmp_path: Path) -> None:
    text = PROVIDERS_YAML.replace('"1245319599":', '"12345":')
    with pytest.raises(ConfigError, match=r"p\.yaml:14: providers\.12345: .*10-digit NPIs"):
        ProviderDirectory(write(tmp_path / "p.yaml", text)).load()
    text = PROVIDERS_YAML + "  maplegrove_snf:\n    name: Again\n"
    with pytest.raises(ConfigError, match=r"q\.yaml:24: facilities\.maplegrove_snf: listed twice"):
        ProviderDirectory(write(tmp_path / "q.yaml", text)).load()
    text = PROVIDERS_YAML.replace('practice: "1588667701"', 'practice: "1111111111"')
    with pytest.raises(ConfigError, match=r"providers\.1245319599\.practice: 1111111111"):
        ProviderDirectory(write(tmp_path / "r.yaml", text)).load()


# -- the enricher ------------------------------------------------------------------------------


def test_care_team_from_roster_and_message_pcp(tmp_path: Path) -> None:
    component = enricher(tmp_path)
    work = work_of(adt())
    output = component.enrich(work)
    assert isinstance(work.data["care_team"], CareTeam)
    assert output == work.data["care_team"].as_output()
    assert ids(output) == ["cc-1", "bh-1", f"npi:{LINDQVIST}"]
    pcp = output["recipients"][2]
    assert pcp["role"] == "pcp" and pcp["address"] == "lindqvist@example.org"
    assert pcp["preference"] == "daily_digest" and pcp["organization"] == (
        "Springfield Family Practice"
    )
    assert output["suppressed"] == []


def test_message_pcp_is_deduplicated_against_the_roster_by_npi_and_by_address(
    tmp_path: Path,
) -> None:
    by_npi = ROSTER_CSV + (
        f"RG100234,RGH,,,my-pcp,Dr E Lindqvist,pcp,sms,+1-217-555-0101,{LINDQVIST}\n"
    )
    team = enricher(tmp_path, roster=by_npi).enrich(work_of(adt()))
    assert ids(team) == ["cc-1", "bh-1", "my-pcp"]  # the roster's own choice of channel wins

    by_address = ROSTER_CSV + "RG100234,RGH,,,pcp-2,Dr Lindqvist,pcp,email,Lindqvist@Example.org,\n"
    team = enricher(tmp_path, roster=by_address).enrich(work_of(adt()))
    assert ids(team) == ["cc-1", "bh-1", "pcp-2"]

    # A roster PCP with nowhere to send covers nobody: the directory still reaches the PCP.
    no_address = ROSTER_CSV + f"RG100234,RGH,,,my-pcp,Dr E Lindqvist,pcp,email,,{LINDQVIST}\n"
    team = enricher(tmp_path, roster=no_address).enrich(work_of(adt()))
    assert ids(team) == ["cc-1", "bh-1", "my-pcp", f"npi:{LINDQVIST}"]
    assert [s["recipient_id"] for s in team["suppressed"]] == ["my-pcp"]


def test_pcp_not_in_the_directory_is_a_recorded_suppression(tmp_path: Path) -> None:
    component = enricher(tmp_path)
    pd1 = "PD1||||1234567893^Nobody^Known^^^Dr^^^NPI"
    work = work_of(adt(pd1=pd1))
    output = component.enrich(work)
    assert ids(output) == ["cc-1", "bh-1"]
    assert output["suppressed"] == [
        {
            "reason": "PCP NPI 1234567893 not in the provider directory",
            "recipient_id": "npi:1234567893",
        }
    ]
    assert not work.data["care_team"].opted_out

    without_directory = CareTeamEnricher(
        CareTeamEnricher.Options(roster="care/roster.csv"),
        ComponentContext(config_dir=tmp_path, data_dir=tmp_path),
    )
    asyncio.run(without_directory.start())
    reasons = [s["reason"] for s in without_directory.enrich(work_of(adt()))["suppressed"]]
    assert reasons == [f"PCP NPI {LINDQVIST} not in the provider directory"]

    off = enricher(tmp_path, include_pcp_from_message=False)
    assert off.enrich(work_of(adt(pd1=pd1)))["suppressed"] == []


def test_post_acute_provider_only_on_discharge(tmp_path: Path) -> None:
    component = enricher(tmp_path)
    discharge = component.enrich(work_of(adt("A03", discharged_to="MAPLEGROVE_SNF")))
    assert ids(discharge)[-1] == "facility:MAPLEGROVE_SNF"
    assert discharge["recipients"][-1]["role"] == "post_acute"

    admit = component.enrich(work_of(adt("A01", discharged_to="MAPLEGROVE_SNF")))
    assert "facility:MAPLEGROVE_SNF" not in ids(admit)

    unknown = component.enrich(work_of(adt("A03", discharged_to="NOWHERE_SNF")))
    assert Suppression(
        "post-acute destination NOWHERE_SNF not in the provider directory", "facility:NOWHERE_SNF"
    ) in [Suppression(**s) for s in unknown["suppressed"]]

    fax_only = component.enrich(work_of(adt("A03", discharged_to="OAKHAVEN_LTC")))
    assert ids(fax_only)[-1] == "facility:OAKHAVEN_LTC"
    assert fax_only["suppressed"] == [
        {
            "reason": "post_acute Oakhaven LTC has no delivery address",
            "recipient_id": ("facility:OAKHAVEN_LTC"),
        }
    ]

    off = enricher(tmp_path, include_post_acute=False)
    assert "facility:MAPLEGROVE_SNF" not in ids(
        off.enrich(work_of(adt("A03", discharged_to="MAPLEGROVE_SNF")))
    )


def test_roster_opt_out_is_a_patient_level_suppression(tmp_path: Path) -> None:
    roster = ROSTER_CSV.replace(
        "RG100234,RGH,false,,", "RG100234,RGH,true,declined at registration,"
    )
    work = work_of(adt())
    output = enricher(tmp_path, roster=roster).enrich(work)
    assert output["suppressed"] == [
        {
            "reason": "patient RGH|RG100234 opted out (roster): declined at registration",
            "recipient_id": None,
        }
    ]
    assert work.data["care_team"].opted_out
    assert ids(output) == ["cc-1", "bh-1", f"npi:{LINDQVIST}"]  # the notify step decides


def test_message_field_opt_out(tmp_path: Path) -> None:
    component = enricher(tmp_path, opt_out_field="PD1-12")
    flagged = work_of(adt(pd1=PD1 + "||||||||Y"))
    output = component.enrich(flagged)
    assert output["suppressed"] == [
        {"reason": "patient asked not to be notified (PD1-12 = 'Y')", "recipient_id": None}
    ]
    assert flagged.data["care_team"].opted_out and len(output["recipients"]) == 3
    assert component.enrich(work_of(adt(pd1=PD1 + "||||||||N")))["suppressed"] == []

    custom = enricher(tmp_path, opt_out_field="PD1-12", opt_out_values=["yes", "1"])
    assert custom.enrich(work_of(adt(pd1=PD1 + "||||||||YES")))["suppressed"]
    assert not custom.enrich(work_of(adt(pd1=PD1 + "||||||||Y")))["suppressed"]


def test_member_without_address_is_suppressed(tmp_path: Path) -> None:
    roster = ROSTER_CSV + "RG100234,RGH,,,cm-1,Pat Unlisted,case_manager,email,,\n"
    output = enricher(tmp_path, roster=roster).enrich(work_of(adt()))
    # Listed and suppressed: the notify step records the suppression against the member.
    assert ids(output) == ["cc-1", "bh-1", "cm-1", f"npi:{LINDQVIST}"]
    assert output["suppressed"] == [
        {"reason": "case_manager Pat Unlisted has no email address", "recipient_id": "cm-1"}
    ]


def test_patient_found_by_transition_key_and_by_any_identifier(tmp_path: Path) -> None:
    component = enricher(tmp_path, include_pcp_from_message=False)
    # A merged-away identifier in the message, but the encounter state knows the survivor.
    transition = Transition(kind="admission", encounter_id=1, patient_key="RGH|RG100234")
    work = work_of(adt(patient="OLD1^^^RGH^MR", pd1=None), {"encounter": transition})
    assert ids(component.enrich(work)) == ["cc-1", "bh-1"]
    # A second PID-3 repetition is enough.
    work = work_of(adt(patient="X9^^^SSA^SS~LM-448812^^^LMC^MR", pd1=None))
    assert ids(component.enrich(work)) == ["pcp-t"]
    assert component.enrich(work_of(adt(patient="NOPE^^^RGH^MR", pd1=None))) == {
        "recipients": [],
        "suppressed": [],
    }


def test_work_without_a_care_event_is_a_clear_error(tmp_path: Path) -> None:
    component = enricher(tmp_path)
    work = work_of(adt())
    work.event = None
    with pytest.raises(CareTeamError, match="translate: v2-to-event"):
        component.enrich(work)


def test_options_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="bad field path"):
        CareTeamEnricher.Options(roster="r.csv", opt_out_field="PD1.12")
    with pytest.raises(ValidationError, match=r"expected a \.csv, \.yaml or \.yml file"):
        CareTeamEnricher.Options(roster="roster.xlsx")
    with pytest.raises(ValidationError, match="Extra inputs"):
        CareTeamEnricher.Options.model_validate({"roster": "r.csv", "rooster": "x"})
    broken = write(tmp_path / "care" / "roster.csv", "patient_id\n")
    component = CareTeamEnricher(
        CareTeamEnricher.Options(roster=str(broken)),
        ComponentContext(config_dir=tmp_path, data_dir=tmp_path),
    )
    with pytest.raises(ConfigError, match=r"roster\.csv:1: header lacks"):
        asyncio.run(component.start())


# -- the shipped sample config -----------------------------------------------------------------


def test_shipped_care_files_load() -> None:
    roster = Roster(CONFIG / "care" / "roster.csv")
    roster.load()
    patients = roster.patients()
    assert len(patients) >= 24
    assert {p.authority for p in patients} == {"RGH", "LMC"}
    assert sorted(p.key for p in patients if p.opt_out) == ["LMC|LM-448815", "RGH|RG100241"]
    assert all(1 <= len(p.members) <= 3 for p in patients if not p.opt_out)
    members = [m for p in patients for m in p.members]
    assert {m.channel for m in members} >= {"email", "sms"}
    assert {m.preference for m in members} == {"immediate", "daily_digest", "discharge_only"}
    for member in members:  # synthetic contact data only
        assert (
            member.address == ""
            or member.address.split("@")[-1].endswith(
                (".example.org", ".example.com", "example.org", "example.com")
            )
            or member.address.startswith("+1-217-555-01")
        )

    directory = ProviderDirectory(CONFIG / "care" / "providers.yaml")
    directory.load()
    for npi in {m.npi for m in members if m.npi}:
        assert directory.by_npi(npi) is not None, npi
    for code in ("MAPLEGROVE_SNF", "PRAIRIE_HHA", "RIVERBEND_IRF"):
        assert directory.by_code(code) is not None


def shipped_enricher() -> CareTeamEnricher:
    component = CareTeamEnricher(
        CareTeamEnricher.Options(roster="care/roster.csv", providers="care/providers.yaml"),
        ComponentContext(config_dir=CONFIG, data_dir=CONFIG.parent / "data"),
    )
    asyncio.run(component.start())
    return component


def test_shipped_config_resolves_the_sample_feed_patients(tmp_path: Path) -> None:
    component = shipped_enricher()
    # Through the store, as the hub would hand the message over.
    store = MessageStore(sqlite_url(tmp_path))
    store.migrate()
    try:
        raw = (FEEDS / "04-riverside-discharge-to-snf.hl7").read_bytes()
        new = NewMessage(
            raw=raw,
            transport="mllp",
            listener="test",
            peer=None,
            status=MessageStatus.RECEIVED,
            ack_code="AA",
            header=MessageHeader.read(MessageView(raw.decode())),
            charset="utf-8",
        )
        [outcome] = store.insert_messages([new])
        stored = store.get(outcome.message_id)
    finally:
        store.close()
    assert stored is not None
    work = Work(message=stored, route="care", v2=stored.text)
    work.event = translate_v2_to_event(work.view)
    discharge = component.enrich(work)
    assert ids(discharge) == ["pcp-lindqvist", "cc-rgh-01", "facility:MAPLEGROVE_SNF"]

    admit = component.enrich(work_of((FEEDS / "02-riverside-admit.hl7").read_bytes()))
    assert ids(admit) == ["pcp-lindqvist", "cc-rgh-01"]  # message PCP = roster PCP, once

    lakeview = component.enrich(work_of((FEEDS / "05-lakeview-admit-latin1.hl7").read_bytes()))
    assert ids(lakeview) == ["pcp-testwell", "cc-lmc-01"]
    assert all(not team["suppressed"] for team in (discharge, admit, lakeview))


def test_shipped_config_opt_outs_and_missing_addresses() -> None:
    component = shipped_enricher()
    opted = component.enrich(work_of(adt(patient="RG100241^^^RGH^MR", pd1=None)))
    assert [s["recipient_id"] for s in opted["suppressed"]] == [None]
    assert opted["recipients"]
    unlisted = component.enrich(work_of(adt(patient="RG100243^^^RGH^MR", pd1=None)))
    assert [s["recipient_id"] for s in unlisted["suppressed"]] == ["cm-plan-02"]
    assert "cm-plan-02" in ids(unlisted)
