"""Email subjects carry no patient name: mail servers log them and phones show them on a locked
screen. The name stays in the body. A real hub sends a stay's notices and a correction to a
real SMTP server (the care route of test_notify, its fixtures reused); every built-in notice
text, the care team's and the referral notices', is checked too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import pytest

from carehub.care.notify import BUILTIN_TEMPLATES
from carehub.care.templating import MessageTemplates
from carehub.components import ComponentContext
from carehub.referrals.notices import DEFAULT_TEMPLATES as REFERRAL_TEMPLATES
from tests.test_notify import (  # noqa: F401  (fixtures: care, mailbox, gateway)
    PCP,
    adt,
    care,
    gateway,
    mailbox,
)

NAME = "Hollis Brightwater"


def test_a_stays_notices_name_the_patient_in_the_body_only(
    care: Callable[..., Any],  # noqa: F811
) -> None:
    with care() as hub:
        hub.send(
            adt("A04", "SUB-1"),
            adt("A01", "SUB-2", cls="I"),
            adt("A02", "SUB-3", cls="I", facility="NORTH"),
            adt("A12", "SUB-4", cls="I", facility="NORTH"),
            adt("A03", "SUB-5", cls="I", disposition="01", discharged_at="20261123120000+0000"),
        )
        hub.settle()
        mails = hub.mailbox.mails

    assert [m.subject for m in mails if m.to == PCP] == [
        "ED visit at GENERAL",
        "Admission at GENERAL",
        "Transfer at NORTH",
        "Correction from NORTH: transfer cancelled",
        "Discharge from GENERAL",
    ]
    for mail in mails:
        assert "Tester" not in mail.subject and "Pat" not in mail.subject, mail.subject
        assert "Pat Tester" in mail.body, mail.body


def _variables(**extra: Any) -> dict[str, Any]:
    """What a notice's template may read, every one set, the patient named ``NAME``."""
    return {
        "patient_name": NAME,
        "birth_date": "1958-03-12",
        "institution": "Riverside General Hospital",
        "practitioner": "Dr Celine Moreau",
        "occurred_at": "2026-11-24 08:15",
        "location": "ED12",
        "reason": "chest pain",
        "diagnoses": "R07.9",
        "disposition": "01 (home or self care)",
        "died": False,
        "discharged_to": "home",
        "followups": [],
        "recipient": {"name": "Dr Erik Lindqvist", "role_label": "primary care practitioner"},
        "full": True,
        "retracted_label": "admission",
        "followup_kind": "follow-up visit",
        "due": "2026-12-01",
        "status": "requested",
        "held": False,
        "referral_id": "RGH-R-2026-0042",
        "referred_to": "Springfield Community Food Bank",
        "referrer": {"name": "Dr Samir Haddad", "organization": "Riverside General Hospital"},
        "organization": "Springfield Community Food Bank",
        "status_label": "accepted",
        "status_verb": "accepted",
        "claimed_label": "completed",
        "changed": ["priority"],
        "needs": ["food"],
        "consent": {"stated": True, "text": "verbal consent"},
        "items": [{"when": "08:15", "label": "ED visit", "patient_name": NAME, "institution": "X"}],
        **extra,
    }


@pytest.mark.parametrize("died", [False, True])
@pytest.mark.parametrize(
    ("loader", "names"),
    [
        (jinja2.FileSystemLoader(str(BUILTIN_TEMPLATES)), sorted(BUILTIN_TEMPLATES.glob("*.txt"))),
        (jinja2.DictLoader(REFERRAL_TEMPLATES), sorted(REFERRAL_TEMPLATES)),
    ],
    ids=["care", "referral"],
)
def test_no_built_in_subject_names_the_patient(
    tmp_path: Path, loader: jinja2.BaseLoader, names: list[Any], died: bool
) -> None:
    templates = MessageTemplates(ComponentContext(tmp_path, tmp_path), None, loader)
    for name in names:
        kind, _, channel = Path(str(name)).name.removesuffix(".txt").partition(".")
        subject, body = templates.render(kind, channel or "email", _variables(died=died))
        assert NAME not in subject, (name, subject)
        if subject:
            assert NAME in body or kind == "digest", (name, body)
