"""What notices say and to whom a cancel is corrected: a digest reader told of a visit in a
digest gets the correction in their next digest; a discharge that leaves out the treating
practitioner or diagnoses gives those the encounter already knows; and every notice names
the sending institution by the name the notify step's ``facilities`` gives its code. A real
hub with the care route, as in test_notify (its fixtures are reused)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import test_notify
from tests.conftest import PROJECT_ROOT
from tests.test_notify import (  # noqa: F401  (fixtures: care, mailbox, gateway)
    CC_PHONE,
    CM,
    PCP,
    _aware,
    adt,
    care,
    gateway,
    mailbox,
    next_digest_time,
)

ATTENDING = "1234567893^Attend^Ann^^^Dr^^^NPI"


def digest_lines(mail: Any) -> list[str]:
    return [line for line in mail.body.splitlines() if line.startswith("- ")]


def test_a_cancel_after_the_digest_went_out_is_corrected_in_the_next_digest(
    care: Callable[..., Any],  # noqa: F811
) -> None:
    """The case manager reads a daily digest. The admission went out in one; a transfer is
    still waiting for the next when an A11 cancels the visit. The next digest carries one
    correction (of the admission) and no transfer; nobody else gets a second correction."""
    with care() as hub:
        hub.send(adt("A01", "DC-1", cls="I"))
        hub.settle()
        first_day = next_digest_time()
        hub.tick(first_day)
        (digest,) = hub.mailbox.to(CM)
        assert ": admission - Pat Tester at GENERAL" in digest_lines(digest)[0]

        hub.send(adt("A02", "DC-2", cls="I", facility="NORTH"))
        hub.settle()
        assert ("cm-a", "transfer", "digest") in hub.decisions()
        hub.send(adt("A11", "DC-3", cls="I", facility="NORTH"))
        hub.settle()
        assert hub.decisions(recipient="cm-a") == [
            ("cm-a", "admission", "retracted"),
            ("cm-a", "transfer", "retracted"),
            ("cm-a", "retraction", "digest"),
        ]
        (correction,) = hub.rows(recipient="cm-a", kind="retraction")
        (admission,) = hub.rows(recipient="cm-a", kind="admission")
        assert correction["reason"] == f"retracts notification #{admission['id']} (admission)"
        assert len(hub.mailbox.to(CM)) == 1  # not now: in the digest, as asked

        hub.tick(first_day + timedelta(days=1))
        _, second = hub.mailbox.to(CM)
        assert second.subject == "Daily care-transition digest (1 update)"
        (line,) = digest_lines(second)
        assert "CORRECTION - NORTH cancelled the admission of Pat Tester" in line
        assert "reported in an earlier digest; please disregard it" in line
        pcp_corrections = [m for m in hub.mailbox.to(PCP) if m.subject.startswith("Correction")]
        assert len(pcp_corrections) == 1
        hub.assert_sent_with_receipt_times()


def test_a_discharge_without_pv1_7_names_the_practitioner_the_encounter_knows(
    care: Callable[..., Any],  # noqa: F811
) -> None:
    """The admission named the attending (PV1-7) and a diagnosis; the A03 leaves both out. The
    discharge notice still gives the treating practitioner (email and SMS) and the diagnosis
    (email, full detail)."""
    bare_discharge = (
        adt("A03", "TP-2", cls="I", disposition="03", discharged_at="20261126100000")
        .replace(ATTENDING, "")
        .replace("DG1|1||R07.9^Chest pain, unspecified^I10||20261125|A\r", "")
    )
    assert ATTENDING not in bare_discharge and "DG1" not in bare_discharge
    with care() as hub:
        hub.send(adt("A01", "TP-1", cls="I"), bare_discharge)
        hub.settle()
        (mail,) = [m for m in hub.mailbox.to(PCP) if m.subject.startswith("Discharge")]
        assert "Treating practitioner: Dr Ann Attend." in mail.body
        assert "Diagnoses: Chest pain, unspecified" in mail.body
        text = hub.texts()[-1]
        assert text["to"] == CC_PHONE
        assert "Dr Ann Attend" in text["text"] and "not recorded" not in text["text"]


def test_every_notice_names_the_institution_by_its_configured_name(
    care: Callable[..., Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``facilities: {general: ...}`` on the notify step (codes in any case): the notices, the
    digest and the overdue follow-up alert say "General Test Hospital"; a code without a name
    (NORTH) is given as sent."""
    routes = test_notify.ROUTES.replace(
        "          coordinator_roles:",
        "          facilities: {{general: General Test Hospital}}\n          coordinator_roles:",
    )
    monkeypatch.setattr(test_notify, "ROUTES", routes)
    with care() as hub:
        hub.send(
            adt("A01", "FN-1", cls="I"),
            adt("A02", "FN-2", cls="I", facility="NORTH"),
            adt(
                "A03",
                "FN-3",
                cls="I",
                disposition="01",
                discharged_at="20261123120000+0000",
            ),
        )
        hub.settle()
        assert [m.subject for m in hub.mailbox.to(PCP)] == [
            "Admission at General Test Hospital",
            "Transfer at NORTH",
            "Discharge from General Test Hospital",
        ]
        assert "discharged from General Test Hospital on" in hub.mailbox.to(PCP)[-1].body
        assert "General Test Hospital" in hub.texts()[-1]["text"]

        hub.tick(next_digest_time())
        (digest,) = hub.mailbox.to(CM)
        assert all("GENERAL" not in line for line in digest_lines(digest))
        assert "General Test Hospital" in digest_lines(digest)[0]

        contact_due = min(_aware(f["due_at"]) for f in hub.followups())
        hub.tick(contact_due + timedelta(hours=1))
        alert = hub.texts()[-1]["text"]
        assert "discharge from General Test Hospital" in alert


def test_the_sample_config_names_its_hospitals() -> None:
    route = PROJECT_ROOT / "config" / "routes" / "care-transitions.yaml"
    (config,) = yaml.safe_load(Path(route).read_text(encoding="utf-8"))["routes"]
    (notify,) = [step["notify"] for step in config["steps"] if "notify" in step]
    assert notify["facilities"]["RIVERSIDE_GH"] == "Riverside General Hospital"
    assert notify["facilities"]["LAKEVIEW_MC"] == "Lakeview Medical Center"
