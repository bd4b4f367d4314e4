"""Looking up a patient's visits and follow-ups after a chain of merges, a feed that mixes
message times with and without a UTC offset, a follow-up marked done before its discharge, and
the zone of every time in the command line's JSON. Each story is sent over MLLP to a hub running
a copy of config/, with aiosmtpd for the care team's email, and checked through
`carehub encounters` / `carehub followups`."""

from __future__ import annotations

from datetime import datetime

from click.testing import CliRunner

from carehub.cli import main
from tests.test_encounter_corrections import AMARA, Care, admit_and_discharge, adt, care

__all__ = ["care"]  # the running hub on the shipped config, shared with those tests


def merge(control_id: str, at: str, retired: str, surviving: str) -> bytes:
    """An A40 from Riverside: ``retired`` (an MR id) merged into ``surviving``."""
    segments = [
        f"MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|{at}||ADT^A40^ADT_A39|{control_id}"
        "|P|2.5.1|||AL|NE",
        f"EVN|A40|{at}",
        f"PID|1||{surviving}^^^RGH^MR||Okafor^Amara^N||19580312|F",
        f"MRG|{retired}^^^RGH^MR",
    ]
    return ("\r".join(segments) + "\r").encode()


def test_a_retired_id_shows_the_visits_and_follow_ups_after_a_chain_of_merges(
    care: Care,
) -> None:
    care.send(
        adt("A01", "MC-1", "20261203090000-0600", admit="20261203090000-0600", patient="RG100242"),
        adt(
            "A03",
            "MC-2",
            "20261207153000-0600",
            discharge="20261207153000-0600",
            disposition="01",
            patient="RG100242",
        ),
        merge("MC-3", "20261208090000-0600", "RG100242", "RG100244"),
        merge("MC-4", "20261209090000-0600", "RG100244", "RG100250"),
    )
    survivor = care.cli("encounters", "list", "--patient", "RG100250")
    assert [e["patient_key"] for e in survivor] == ["RGH|RG100250"]
    assert len(care.followups("RG100250")) == 2
    for retired in ("RG100242", "RGH|RG100242", "RG100244"):
        assert care.cli("encounters", "list", "--patient", retired) == survivor, retired
        assert care.followups(retired) == care.followups("RG100250"), retired


def test_a_transfer_sent_without_an_offset_after_an_admission_with_one_is_told(
    care: Care,
) -> None:
    """09:00 without an offset is read as 09:00 UTC, before the admission's 14:00 UTC; but a
    time without an offset is the sender's local time, so the two cannot be ordered and the
    transfer is applied as it comes."""
    care.send(
        adt("A01", "MX-1", "20261209080000-0600", admit="20261209080000-0600"),
        adt("A02", "MX-2", "20261209090000", location="ICU^1^^RIVERSIDE_NORTH"),
    )
    assert care.timeline("V20261201-0900") == [("A01", "admission"), ("A02", "transfer")]
    visit = care.encounter("V20261201-0900")
    assert (visit["facility"], visit["location"]) == ("RIVERSIDE_NORTH", "ICU/1")
    kinds = [n["kind"] for n in care.notifications() if n["patient_key"] == AMARA]
    assert "transfer" in kinds


def test_a_late_message_with_the_same_kind_of_time_still_only_fills_gaps(care: Care) -> None:
    care.send(
        adt("A01", "MS-1", "20261209080000"),
        adt("A02", "MS-2", "20261209070000", location="ICU^1^^RIVERSIDE_NORTH"),
    )
    assert care.timeline("V20261201-0900") == [("A01", "admission"), ("A02", "none")]
    assert care.encounter("V20261201-0900")["facility"] == "RIVERSIDE_GH"


def done(care: Care, item_id: int, at: str) -> tuple[int, str]:
    """`carehub followups done ID --at AT`: exit code and output."""
    result = CliRunner().invoke(
        main,
        [
            *("followups", "done", str(item_id), "--at", at),
            *("--config", str(care.config_path), "--data-dir", str(care.data_dir)),
        ],
    )
    return result.exit_code, result.output


def test_a_follow_up_cannot_be_done_before_its_discharge(care: Care) -> None:
    admit_and_discharge(care, "01")  # discharged 2026-12-01 15:30 at -0600 (21:30 UTC)
    contact = min(f["id"] for f in care.followups() if f["kind"] == "contact")

    code, output = done(care, contact, "2026-11-28T10:00")
    assert code == 2
    # Times without an offset, and the answers, are in the coordinators' zone (the sample's
    # America/Chicago, -0600 in December).
    assert "before the discharge at 2026-12-01 15:30 CST" in output
    assert {f["status"] for f in care.followups()} == {"open"}

    code, output = done(care, contact, "2026-12-01T15:00")  # 21:00 UTC, still before
    assert code == 2
    code, output = done(care, contact, "2026-12-02T20:30:00+00:00")
    assert (code, "done at 2026-12-02 14:30 CST" in output) == (0, True)


def test_times_in_the_json_output_carry_their_offset(care: Care) -> None:
    sent_without_offset = adt("A01", "TZ-1", "20261203090000", admit="20261203090000", visit="V9")
    care.send(sent_without_offset)
    admit_and_discharge(care, "01")
    visit = care.encounter("V9")
    assert visit["opened_at"] == "2026-12-03T09:00:00+00:00"  # read as UTC, and saying so
    shown = care.show("V20261201-0900")
    times = [visit[name] for name in ("opened_at", "admitted_at", "created_at", "updated_at")]
    times += [shown["encounter"]["discharged_at"]]
    times += [t[name] for t in shown["timeline"] for name in ("occurred_at", "recorded_at")]
    times += [n["created_at"] for t in shown["timeline"] for n in t["notifications"]]
    times += [f[name] for f in care.followups() for name in ("due_at", "created_at")]
    for text in times:
        assert datetime.fromisoformat(text).utcoffset() is not None, text
