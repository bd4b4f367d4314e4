"""TCM follow-up clocks on the shipped care-transitions route when the patient comes back: a
readmission ends the episode (no overdue alert about a patient in hospital), and an A11 that
takes the readmission back lets the clocks run on. Also how a coordinator finds and closes
items: `carehub followups list --patient` by a bare id or a merged one, and `followups done
--at`. Messages go over MLLP to a hub on a copy of config/, alerts to aiosmtpd."""

from __future__ import annotations

from datetime import UTC, datetime

from click.testing import CliRunner

from carehub.cli import main
from tests.test_encounter_corrections import AMARA, COORDINATOR, Care, adt, care

__all__ = ["care"]  # the running hub on the shipped config, shared with those tests

AFTER_BOTH_DUE = datetime(2026, 12, 20, 12, 0, tzinfo=UTC)
READMITTED_REASON = "the patient was readmitted, which ends this TCM episode"


def discharged_home(care: Care) -> None:
    """Amara Okafor admitted on 27 November, home on Tuesday 1 December at 15:30 (-0600)."""
    care.send(
        adt("A01", "RA-1", "20261127090000-0600", admit="20261127090000-0600"),
        adt(
            "A03",
            "RA-2",
            "20261201153000-0600",
            discharge="20261201153000-0600",
            disposition="01",
        ),
    )
    assert sorted(f["status"] for f in care.followups()) == ["open", "open"]


def readmission() -> bytes:
    return adt(
        "A01", "RA-3", "20261205020000-0600", visit="V20261205-0101", admit="20261205020000-0600"
    )


def overdue_alerts(care: Care) -> list[str]:
    return [
        subject for kind, subject in care.told(AMARA, COORDINATOR) if kind == "followup_overdue"
    ]


def test_a_readmission_ends_the_tcm_episode(care: Care) -> None:
    discharged_home(care)
    care.send(readmission())
    items = care.followups()
    assert [f["status"] for f in items] == ["readmitted", "readmitted"]
    assert {f["reason"] for f in items} == {READMITTED_REASON}
    care.tick(AFTER_BOTH_DUE)  # still in hospital when both fall due
    assert overdue_alerts(care) == []
    listed = care.text("followups", "list", "--all", "--patient", AMARA)
    assert listed.count("readmitted") == 4  # status and why, for each item
    # Nothing pending is left to do, and a closed item cannot be marked done.
    assert care.cli("followups", "list") == []
    refused = CliRunner().invoke(
        main,
        [
            "followups",
            "done",
            str(items[0]["id"]),
            "--config",
            str(care.config_path),
            "--data-dir",
            str(care.data_dir),
        ],
    )
    assert refused.exit_code == 2
    assert READMITTED_REASON in refused.output


def test_a_cancelled_readmission_lets_the_clocks_run_on(care: Care) -> None:
    discharged_home(care)
    care.send(
        readmission(),
        adt("A11", "RA-4", "20261205040000-0600", visit="V20261205-0101"),
    )
    assert sorted(f["status"] for f in care.followups()) == ["open", "open"]
    care.tick(AFTER_BOTH_DUE)
    assert len(overdue_alerts(care)) == 2


def test_follow_ups_are_found_by_a_bare_id_and_after_a_merge(care: Care) -> None:
    discharged_home(care)
    assert len(care.cli("followups", "list", "--patient", "RG100234")) == 2
    assert care.cli("followups", "list", "--patient", "RG100999") == []
    merge = (
        "\r".join(
            [
                "MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|20261202090000-0600||"
                "ADT^A40^ADT_A39|RA-M|P|2.5.1|||AL|NE",
                "EVN|A40|20261202090000-0600",
                "PID|1||RG100299^^^RGH^MR||Okafor^Amara^N||19580312|F",
                "MRG|RG100234^^^RGH^MR",
            ]
        )
        + "\r"
    ).encode()
    care.send(merge)
    for typed in ("RG100234", "RGH|RG100234", "RG100299"):
        found = care.cli("followups", "list", "--patient", typed)
        assert {f["patient_key"] for f in found} == {"RGH|RG100299"}, typed
        assert len(found) == 2


def test_done_records_when_the_contact_happened(care: Care) -> None:
    discharged_home(care)
    contact = next(f for f in care.followups() if f["kind"] == "contact")
    said = care.text("followups", "done", str(contact["id"]), "--at", "2026-12-02T14:30:00-06:00")
    assert f"follow-up {contact['id']} (contact, {AMARA}) done at 2026-12-02 14:30 CST" in said
    (done,) = [f for f in care.followups() if f["id"] == contact["id"]]
    assert (done["status"], done["closed_at"]) == ("done", "2026-12-02T20:30:00+00:00")
    future = CliRunner().invoke(
        main,
        [
            "followups",
            "done",
            str(contact["id"]),
            "--at",
            "2099-01-01T00:00:00+00:00",
            "--config",
            str(care.config_path),
            "--data-dir",
            str(care.data_dir),
        ],
    )
    assert future.exit_code == 2
    assert "in the future" in future.output
