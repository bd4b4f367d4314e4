"""What the care-transition steps hand each other through ``work.data``.

``work.data["encounter"]`` is a Transition (from the encounter-state enricher) and
``work.data["care_team"]`` a CareTeam (from the care-team enricher); the notify step reads
both to decide who is told what.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

#: Transitions worth telling a care team about (CMS e-notification events and their undoing).
NOTIFIABLE = ("ed_arrival", "admission", "transfer", "discharge")
#: What a notice told of a visit may be: the notifiable transitions and a corrected
#: discharge (told where a discharge notice goes, carehub.care.notify).
TOLD_OF_A_VISIT = (*NOTIFIABLE, "discharge_corrected")
#: What a cancel retracts.
RETRACTS = {
    "cancel_admission": "admission",
    "cancel_transfer": "transfer",
    "cancel_discharge": "discharge",
}

#: PV1-36 discharge dispositions as US sites send them (table 0112 is user-defined there; the
#: values are the UB-04 patient discharge status codes), worded for a notice.
DISPOSITIONS = {
    "01": "home or self care",
    "02": "to a short-term general hospital",
    "03": "to a skilled nursing facility",
    "04": "to an intermediate care facility",
    "05": "to another type of institution",
    "06": "home with home health care",
    "07": "left against medical advice",
    "08": "home with home IV therapy",
    "09": "admitted as an inpatient",
    "20": "expired",
    "21": "to court or law enforcement",
    "30": "still a patient",
    "40": "expired at home",
    "41": "expired in a medical facility",
    "42": "expired, place unknown",
    "43": "to a federal health care facility",
    "50": "to hospice at home",
    "51": "to a hospice facility",
    "61": "to a swing bed",
    "62": "to an inpatient rehabilitation facility",
    "63": "to a long-term care hospital",
    "64": "to a nursing facility (Medicaid)",
    "65": "to a psychiatric hospital",
    "66": "to a critical access hospital",
    "69": "to a designated disaster alternative care site",
    "70": "to another type of health care institution",
}
#: Of those, the patient died: a notice says so rather than "was discharged".
DIED = frozenset({"20", "40", "41", "42"})


def normalize_disposition(value: Any) -> str | None:
    """PV1-36 as a two-digit table 0112 code: "1" and "01^Home" both become "01".

    YAML reads an unquoted ``01`` as the number 1, and some senders drop the leading zero."""
    if value is None:
        return None
    text = str(value).split("^", 1)[0].strip()
    if not text:
        return None
    return text.zfill(2) if text.isdigit() and len(text) < 2 else text


TransitionKind = Literal[
    "ed_arrival",  # A04 with patient class E
    "admission",  # A01, A06 (or an A08 that turns E into I)
    "transfer",  # A02 changing level of care or facility (not a bed move)
    "discharge",  # A03
    # A second A03 (or an A08) giving a discharged visit another disposition or destination;
    # the summary's previous_discharge holds what it replaces
    "discharge_corrected",
    "cancel_admission",  # A11
    "cancel_transfer",  # A12
    "cancel_discharge",  # A13
    "registration",  # A04 outpatient
    "merge",  # A40
    "demographics",  # A28, A31
    # An A08 (or an A02 that is no transfer) that changed details someone acts on (name,
    # address, phone, PCP, class, unit, doctors, diagnoses) but not the visit's state; the
    # summary's ``changed`` names them (carehub.care.encounters.UPDATE_FACTS). Not in
    # NOTIFIABLE: nobody is notified of it, a route may forward it.
    "updated",
    "stale_closed",  # an ED visit with no discharge after the configured time
    "none",  # A08 echo, bed move, resend: nothing new, merged quietly
]
#: Every transition kind, for configuration that names them (a filter's ``transition``).
TRANSITION_KINDS: tuple[str, ...] = get_args(TransitionKind)


@dataclass(slots=True)
class Transition:
    """What a message did to its encounter."""

    kind: TransitionKind
    encounter_id: int | None
    patient_key: str
    trigger_event: str = ""
    state: str = ""  # the encounter's state after the message
    #: For templates: patient, encounter, facility, treating practitioner, diagnoses, ...
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def notifiable(self) -> bool:
        return self.kind in NOTIFIABLE

    @property
    def retracts(self) -> str | None:
        """The notification kind a cancel takes back, or None."""
        return RETRACTS.get(self.kind)

    def as_output(self) -> dict[str, Any]:
        return asdict(self)

    def for_receiver(self) -> dict[str, Any]:
        """What a webhook tells its receiver of the transition: the kind, the visit's state
        after it and, for ``updated``, which facts changed. The care event beside it carries
        the facts themselves, so the summary's copy of them is not sent twice."""
        told: dict[str, Any] = {"kind": self.kind, "state": self.state or None}
        changed = self.summary.get("changed")
        if changed:
            told["changed"] = list(changed)
        return told


Preference = Literal["immediate", "daily_digest", "discharge_only"]
Detail = Literal["minimum", "full"]


@dataclass(slots=True, frozen=True)
class Recipient:
    """One member of a patient's care team and how they want to hear."""

    id: str  # roster member id or "npi:<NPI>"
    name: str
    role: str  # pcp, care_coordinator, case_manager, behavioral_health, post_acute, ...
    channel: str  # email, sms, webhook, ...
    address: str
    organization: str = ""
    preference: Preference = "immediate"
    #: How much the message may carry; None lets the channel decide (SMS gets the minimum).
    detail: Detail | None = None


@dataclass(slots=True, frozen=True)
class Suppression:
    """A notification that will not be sent, and why (recorded for audit)."""

    reason: str
    recipient_id: str | None = None  # None: the whole patient (opt-out)


@dataclass(slots=True)
class CareTeam:
    recipients: list[Recipient] = field(default_factory=list)
    suppressed: list[Suppression] = field(default_factory=list)

    @property
    def opted_out(self) -> bool:
        return any(s.recipient_id is None for s in self.suppressed)

    def as_output(self) -> dict[str, Any]:
        return {
            "recipients": [asdict(r) for r in self.recipients],
            "suppressed": [asdict(s) for s in self.suppressed],
        }
