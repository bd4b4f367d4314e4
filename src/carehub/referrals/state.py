"""Closed-loop referral state: one record per referral and one recorded decision per update.

A referral only closes the loop when the referring provider hears what became of it, so this
module keeps each referral's status in the store (tables ``referrals`` and ``referral_events``)
and tells later route steps, through a :class:`ReferralTransition`, what one message (or one
webhook / FHIR Task poll) changed and whether the referrer should be told.

The status model is FHIR ``Task.status`` as the Gravity SDOH Clinical Care IG uses it for
referral management (requester sets requested; the responder sets received/accepted/rejected/
in-progress/on-hold/failed/completed; either may cancel). HL7 v2 chapter 11 messages map onto it:

- ``REF^I12`` (new) -> a referral in ``requested``, due for an answer ``response_hours`` later.
  A second I12 for a referral already on file is a resend: recorded, nothing changes. One
  with other content (priority, type, reason, parties) is applied as a modify, its timeline
  row saying a second I12 changed it: a referrer's system often resends the I12 rather than
  send an I13, and a STAT upgrade dropped as a resend would be lost unseen.
- ``REF^I13`` (modify) -> the referrer's fields (priority, type, reason, parties, snapshot) are
  updated; the status stays. An I13 for an unknown id creates the referral (the referrer owns it
  and the I13 carries the whole referral, so losing the I12 must not lose the referral); an I13
  for a closed referral is refused.
- ``REF^I14`` (cancel) -> ``cancelled``. ``REF^I15`` (status request) -> recorded only.
- ``RRI^I12..I15`` (responses): RF1-1 (table 0283) A -> accepted, R -> rejected,
  P -> received (pending), E -> failed (expired). An answer counts only from an organisation
  the referral is with (referral_recipients): one whose PRD role RT names another, or whose
  sender (MSH-4, MSH-3) is an organisation a modify took the referral from, is refused, and
  the referral keeps waiting for its own organisation's answer. One that names no
  organisation is taken from its sender (unless the sender is the referrer's own system
  relaying it: then it is told as the answer of whom the referral is with). Organisation
  names compare as resources.matching.same_organization says (case, punctuation, a legal
  form aside). The same holds for a FHIR Task's owner and an organisation's token.
- An answer is never applied to a referral of another patient (PID-3, merges followed): two
  hospitals both number a referral R-310, and an answer echoing the bare id goes to its own
  patient's.
- An update that overtook its referral is refused (unknown referral) and kept: the I12 (or an
  I13 that creates the referral) applies, just after it and in the order they came, the
  newest RRI that named its id (with or without the authority) about its patient from an
  organisation it is with (``ReferralTransition.early_answer``: the referrer hears it and no
  overdue alert fires), and the referrer's own I14 for it (``early_cancel``). Only what is
  applied joins its timeline (its row marked ``applied_later``); the rest stay unattached for
  the referral they belong to. A referral such an update closed is sent to nobody
  (``ReferralTransition.sent_as_new``). The early I14's message, failed for want of its
  referral, then takes the status it would have had, its history saying when it was applied
  (:func:`settle_early_updates`). A reprocess applies afresh a message recorded as belonging
  to no referral, so an early I14 finds its referral once it is on file.
- A message naming no referral id, or the referrer's I14/I15 for a referral carehub never had,
  belongs to no referral: it is recorded (:func:`refused_referral_events`) and the step raises
  :class:`ReferralUntracked` (a :class:`~carehub.routing.router.StepProblem`): the message ends
  ``failed`` and says why, while the route's other steps still run (the referral desk's file
  copy is written; the notices and the FHIR copy, which need a referral, send nothing).
- The patient is filed under the identifier a merge (A40) left standing: a later message with
  the retired identifier changes nothing, and the merge itself is a row on the timeline of
  each referral it moves (:func:`move_referrals_to_survivor`).
- Every status change is checked against :data:`TRANSITIONS`. A refused update (an RRI for an
  unknown referral, a completion after a cancel, a regression such as pending after accepted)
  changes nothing but is recorded with ``accepted=False`` and the reason, so the timeline shows
  what the other side claimed and why carehub did not believe it. Nothing here raises on odd
  content: one bad response must not stop the referral route. A refused answer that says the
  organisation is working on a cancelled referral is flagged ``acted_on_cancelled`` (the first
  time each status is claimed), for the referrer to be told.
- Resends: a message already applied returns its recorded transition unchanged.
- :meth:`ReferralTracker.advance` applies the same checks to updates that are not v2 messages
  (a CBO's webhook, a FHIR Task poll, an operator).
- A referral goes to the party it names (PRD role RT): an organisation, or a person named
  without one (a specialist); else to its top community match. One with none of these is
  held (``ReferralTransition.held``): its changes and cancel have nobody to reach.
- Overdue: a referral still ``requested``/``received`` after ``due_at`` has had no answer; the
  tick raises one alert per referral, marked once someone was told (``mark_alerted``). One
  nobody could be told of says so on its timeline once (``note_unalerted``) and is alerted
  when someone can be. One sent (new, or moved by a modify) to an organisation the directory
  lists as not active is due at once (:func:`record_matches`).

Without a store (dry runs) the same rules run over an in-memory copy of the tables.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import Field
from sqlalchemy import Connection, Engine, and_, insert, or_, select, update

from carehub.care.merges import follow_merges
from carehub.components import ComponentOptions, TrackingEnricher, Work
from carehub.errors import CarehubError
from carehub.events import (
    CareEvent,
    Identifier,
    Organization,
    Practitioner,
    Referral,
    display_name,
    patient_key_identifier,
)
from carehub.resources.matching import same_organization
from carehub.routing.router import StepProblem
from carehub.store.schema import (
    DeliveryStatus,
    MessageStatus,
    clipped,
    deliveries,
    messages,
    patient_merges,
    referral_events,
    referrals,
)
from carehub.workqueue import patient_key as make_patient_key

if TYPE_CHECKING:
    from carehub.store.store import MessageStore

__all__ = [
    "AWAITING_RESPONSE",
    "CLOSED_STATUSES",
    "OPEN_STATUSES",
    "RF1_STATUS",
    "STATUSES",
    "TRANSITIONS",
    "ReferralEvent",
    "ReferralMemory",
    "ReferralRecord",
    "ReferralStateEnricher",
    "ReferralStateError",
    "ReferralTimeline",
    "ReferralTracker",
    "ReferralTransition",
    "ReferralUntracked",
    "is_allowed",
    "list_referrals",
    "move_referrals_to_survivor",
    "party_name",
    "referral_key",
    "referral_timeline",
    "refused_referral_events",
]

log = logging.getLogger(__name__)

#: Statuses in which the referral is still going somewhere.
OPEN_STATUSES: tuple[str, ...] = ("requested", "received", "accepted", "in-progress", "on-hold")
#: Terminal statuses: the loop is closed, nothing may move the referral again.
CLOSED_STATUSES: tuple[str, ...] = ("rejected", "completed", "cancelled", "failed")
#: The FHIR Task statuses carehub tracks (draft, ready and entered-in-error are not used).
STATUSES: tuple[str, ...] = (*OPEN_STATUSES, *CLOSED_STATUSES)
#: Statuses that still wait for the responder's answer (what the overdue check watches).
AWAITING_RESPONSE: tuple[str, ...] = ("requested", "received")

_RESPONDER = frozenset({"accepted", "rejected", "in-progress", "on-hold", "completed", "failed"})
#: Answers that say the receiving side is working on a referral (or has done the work). One
#: of these for a referral carehub knows is cancelled means the cancel did not stop them.
_ACTING = frozenset({"received", "accepted", "in-progress", "on-hold", "completed"})

#: Allowed from -> to. Forward jumps are allowed (requested -> completed) because a FHIR Task
#: poll may run only once a business day and miss the statuses in between; going back
#: (accepted -> received) or leaving a closed status is refused. Staying put is not a
#: transition: it is recorded as "unchanged".
TRANSITIONS: dict[str, frozenset[str]] = {
    "requested": frozenset({"received", *_RESPONDER, "cancelled"}),
    "received": frozenset({*_RESPONDER, "cancelled"}),
    "accepted": frozenset({"in-progress", "on-hold", "completed", "failed", "cancelled"}),
    "in-progress": frozenset({"on-hold", "completed", "failed", "cancelled"}),
    "on-hold": frozenset({"in-progress", "completed", "failed", "cancelled"}),
    "rejected": frozenset(),
    "completed": frozenset(),
    "cancelled": frozenset(),
    "failed": frozenset(),
}

#: RF1-1 (HL7 table 0283) in a response -> FHIR Task status.
RF1_STATUS: dict[str, str] = {"A": "accepted", "R": "rejected", "P": "received", "E": "failed"}

_CURRENT = "\x00current"  # _record's default "from": the status the referral has now

#: A message recorded with one of these belonged to no referral: a reprocess applies it afresh.
_UNTRACKED_ACTIONS = ("unknown_referral", "no_referral_id")

_REFERRAL_KINDS = frozenset(
    {
        "referral_new",
        "referral_modify",
        "referral_cancel",
        "referral_status_request",
        "referral_response",
    }
)


class ReferralStateError(CarehubError):
    """The referral-state step cannot work with what the route gave it."""


class ReferralUntracked(ReferralStateError, StepProblem):
    """A referral message that belongs to no referral: recorded, and the message ends
    ``failed`` with why, while the route's other steps still run (the desk's file copy is
    written; the forwards that need a referral send nothing)."""


def is_allowed(from_status: str, to_status: str) -> bool:
    """Whether the transition table allows ``from_status -> to_status``."""
    return to_status in TRANSITIONS.get(from_status, frozenset())


def referral_key(ident: Identifier) -> str:
    """``authority|id``: referral ids are only unique within the system that issued them."""
    return f"{ident.authority or ''}|{ident.value}"


def placed_referral_key(ident: Identifier, event: CareEvent) -> str:
    """The key of a referral the message's sender placed (REF^I12-I15): RF1-6 with its
    authority, and without one the sending facility (else application) as the authority. A
    bare number is only unique at the hospital that issued it: two hospitals' R-5000 were one
    referral, and the second hospital's was dropped as a resend of the first's."""
    if ident.authority:
        return referral_key(ident)
    issuer = event.sending_facility or event.sending_application
    return f"{issuer or ''}|{ident.value}"


def _placed_by_the_same(rec: ReferralRecord, placed: str) -> bool:
    """A referral stored under a bare ``|id`` key (before keys named their sender) is the
    placer's own only when the sender it came from is the one placing this message."""
    issuer = placed.split("|", 1)[0]
    snapshot = rec.snapshot or {}
    sent_by = snapshot.get("sending_facility") or snapshot.get("sending_application")
    return not rec.referral_key.split("|", 1)[0] and (sent_by is None or sent_by == issuer)


def referral_id_of(key: str | None) -> str:
    """The referral's id as its referrer wrote it: the key without its authority (which may
    be the sending facility's name, see placed_referral_key), for notices to people."""
    return (key or "").split("|", 1)[-1]


def _label(key: str | None) -> str:
    """A key as people read it (no leading bar when the id has no authority)."""
    return (key or "").removeprefix("|")


# -- times -------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    """A hub-clock time in UTC; naive ones are taken as UTC already (that is what SQLite hands
    back and what the hub's own clock means)."""
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _utc(value: datetime | None) -> datetime | None:
    """Hub-clock times as the store keeps them (UTC; SQLite drops the offset)."""
    return _as_utc(value) if value is not None else None


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; they were written in UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# -- records -----------------------------------------------------------------------------------


@dataclass(slots=True)
class ReferralRecord:
    """One ``referrals`` row. ``snapshot`` is the referrer's latest care event (CareEvent JSON),
    so a notice to the referrer can name the patient, the need and the parties."""

    id: int | None
    referral_key: str
    status: str
    created_at: datetime
    updated_at: datetime
    patient_key: str | None = None
    priority: str | None = None
    type: str | None = None
    reason: str | None = None
    referring: dict[str, Any] = field(default_factory=dict)
    referred_to: dict[str, Any] = field(default_factory=dict)
    needs: list[Any] = field(default_factory=list)
    matches: Any = None
    due_at: datetime | None = None
    closed_at: datetime | None = None
    alerted_at: datetime | None = None
    snapshot: dict[str, Any] = field(default_factory=dict)

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    def overdue_at(self, now: datetime) -> bool:
        """Still waiting for an answer after its deadline."""
        if self.status not in AWAITING_RESPONSE or self.due_at is None:
            return False
        return _as_utc(self.due_at) < _as_utc(now)

    def as_output(self) -> dict[str, Any]:
        """JSON-ready, for ``carehub referrals list --json`` and step outputs."""
        out = asdict(self)
        for name, value in out.items():
            if isinstance(value, datetime):
                out[name] = value.isoformat()
        return out


@dataclass(slots=True)
class ReferralEvent:
    """One ``referral_events`` row: one update offered to a referral and what carehub made of
    it. ``to_status`` is the status asked for, applied only when ``accepted``."""

    id: int
    referral_id: int | None
    referral_key: str | None
    message_id: int | None
    source: str
    action: str
    from_status: str | None
    to_status: str | None
    accepted: bool
    reason: str | None
    detail: dict[str, Any]
    at: datetime

    def as_output(self) -> dict[str, Any]:
        out = asdict(self)
        out["at"] = _iso(self.at)
        detail = out.pop("detail")
        out["detail"] = {k: v for k, v in detail.items() if k != "result"}
        out["note"] = self.detail.get("note")
        out["control_id"] = self.detail.get("control_id")
        return out


@dataclass(slots=True)
class ReferralTransition:
    """What one update did to a referral, for later route steps (``work.data["referral"]``).

    ``from_status``/``to_status`` are the status before and the status asked for; ``status``
    is where the referral stands afterwards (unchanged when ``accepted`` is False; for a
    referral created with an early answer or cancel, after those).
    ``notify_referrer`` is True when the receiving side's answer moved the referral (received,
    accepted, rejected, in progress, completed ...), i.e. when a notify or forward step should
    tell the referring provider; the referrer's own messages never set it."""

    #: created, released (a held referral names an organisation now: sent as new), resend,
    #: modified, cancelled, status, unchanged, status_request, ...
    action: str
    source: str
    accepted: bool
    referral_id: int | None = None
    referral_key: str | None = None
    patient_key: str | None = None
    from_status: str | None = None
    to_status: str | None = None
    status: str | None = None
    changed: bool = False
    reason: str | None = None  # why it was refused
    note: str | None = None
    notify_referrer: bool = False
    #: Refused because the referral is cancelled, yet the receiving side says it is working
    #: on it: the referrer should hear of it (once per status claimed), or the organisation
    #: goes on serving a referral nobody expects.
    acted_on_cancelled: bool = False
    #: Who gave this answer, as far as carehub knows: the responding party of an RRI (PRD
    #: role RT, else MSH-4/MSH-3), the owner of a polled FHIR Task; None when the update does
    #: not say (a webhook call). Not the organisation the referral named: another may answer.
    answered_by: str | None = None
    #: What the receiving side said with a webhook call or a FHIR Task update.
    answer_note: str | None = None
    #: An answer from the receiving side: the organisations the referral was with when it
    #: came (referral_recipients), for a notice about an answer whose sender carehub does not
    #: know (a webhook call with an intake token).
    sent_to: list[str] = field(default_factory=list)
    #: A referral created by this message (I12, I13) that had an answer waiting: an RRI that
    #: overtook it, applied just after it. That answer's transition (as_output), for the
    #: referrer to hear it as if it had come after the referral.
    early_answer: dict[str, Any] | None = None
    #: Likewise the referrer's own cancel (REF^I14) that overtook the referral it cancels.
    early_cancel: dict[str, Any] | None = None
    message_id: int | None = None
    #: For notices: patient, referral id, parties, priority, reason, due date.
    summary: dict[str, Any] = field(default_factory=dict)
    #: A modify: the referral's fields it changed (priority, type, reason, referring,
    #: referred_to, patient_key), and whom the referral named before, when it names another
    #: party now: the organisation that had it must hear it no longer stands with them.
    changed_fields: list[str] = field(default_factory=list)
    referred_to_before: dict[str, Any] | None = None
    #: The referral has gone to nobody (no organisation or person named, no organisation
    #: matched when it was made): a change or cancel of it has nobody to reach.
    held: bool = False

    @property
    def sent_as_new(self) -> bool:
        """This update sends the referral to an organisation as a new one (created, or
        released from being held), which the notice and FHIR steps act on; not when what
        came before it (an early answer or cancel) closed it: ``status`` is then closed."""
        return self.action in SENT_AS_NEW_ACTIONS and self.status not in CLOSED_STATUSES

    @property
    def closes_loop(self) -> bool:
        """The referral reached a closed status with this update."""
        return self.accepted and self.changed and self.status in CLOSED_STATUSES

    def as_output(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_output(cls, data: dict[str, Any]) -> ReferralTransition:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


#: Actions that send a referral to an organisation as a new one (ReferralTransition.sent_as_new).
SENT_AS_NEW_ACTIONS = ("created", "released")

#: Notices (notify-referral) that put a referral with an organisation, and the one that
#: takes it away again: the outbox's record of whom a referral was emailed to.
SENT_KINDS = ("referral_new",)
WITHDRAWN_KINDS = ("referral_withdrawn",)


@dataclass(slots=True)
class _OutboxOrganizations:
    """What the outbox says of the organisations one referral was emailed to."""

    #: (recipient, address, name) of each emailed it and not told since that it was
    #: withdrawn, oldest first.
    sent: list[tuple[str, str, str]]
    #: The names of those told it was withdrawn (and not sent it again since).
    withdrawn: list[str]


def _outbox_organizations(conn: Connection, referral_id: int) -> _OutboxOrganizations:
    """The ``referral_new`` and ``referral_withdrawn`` deliveries of the referral's earlier
    messages in the outbox, read through ``conn`` (the caller's transaction, or its own)."""
    earlier = (
        select(referral_events.c.message_id)
        .where(
            referral_events.c.referral_id == referral_id,
            referral_events.c.message_id.is_not(None),
        )
        .scalar_subquery()
    )
    rows = conn.execute(
        select(deliveries.c.metadata)
        .where(
            deliveries.c.message_id.in_(earlier),
            deliveries.c.status != DeliveryStatus.DISCARDED.value,
        )
        .order_by(deliveries.c.id)
    ).all()
    by_address: dict[str, tuple[str, str]] = {}
    withdrawn: dict[str, str] = {}
    for (text,) in rows:
        meta = json_object(text)
        address = str(meta.get("to") or "")
        name = str(meta.get("recipient_name") or address)
        if meta.get("kind") in SENT_KINDS and address:
            recipient = str(meta.get("recipient") or f"org:{address}")
            by_address[address] = (recipient, name)
            withdrawn.pop(address, None)
        elif meta.get("kind") in WITHDRAWN_KINDS:
            by_address.pop(address, None)
            if address:
                withdrawn[address] = name
    return _OutboxOrganizations(
        [(r, address, n) for address, (r, n) in by_address.items()], list(withdrawn.values())
    )


def organizations_sent(engine: Engine, referral_id: int) -> list[tuple[str, str, str]]:
    """(recipient, address, name) of each organisation emailed the referral (row id) and not
    told since that it was withdrawn, oldest first: the ``referral_new`` deliveries of the
    referral's earlier messages in the outbox, less the ``referral_withdrawn`` ones."""
    with engine.connect() as conn:
        return _outbox_organizations(conn, referral_id).sent


def referral_recipients(record: ReferralRecord, engine: Engine | None) -> list[str]:
    """Who has the referral, as far as carehub knows: the party it names (PRD role RT; after
    a modify, the one named now: an organisation, else the person named, such as a
    specialist), else the top community match it went out with (the rule of
    resources.matching.chosen_match); and the organisations it was emailed to and not
    withdrawn from. Empty: it was held, sent nowhere (nobody named, nothing matched).

    The same reads are made whatever the referral, so that the time a status call takes does
    not tell a caller which of another organisation's referrals exist."""
    sent: list[tuple[str, str, str]] = []
    if engine is not None:
        sent = organizations_sent(engine, record.id if record.id is not None else -1)
    return _recipients(record, [name for _, _, name in sent])


def _recipients(record: ReferralRecord, emailed: Iterable[str]) -> list[str]:
    """referral_recipients, given the names of the organisations emailed it."""
    found: list[str] = []
    named = party_recipient(record.referred_to) or _top_match(record.matches)
    if named:
        found.append(named)
    for name in emailed:
        if not any(same_organization(name, f) for f in found):
            found.append(name)
    return found


#: Who has a referral that went to nobody, as lists and alerts say it.
HELD_TEXT = "held: nobody named, nothing matched"


def sent_to_text(record: ReferralRecord, engine: Engine | None) -> str:
    """Who has the referral, as lists and alerts show it: the party it names (PRD role RT),
    else the organisations it went to (its directory match, those emailed), else HELD_TEXT."""
    named = party_name(record.referred_to)
    if named:
        return named
    holders = referral_recipients(record, engine)
    return ", ".join(holders) if holders else HELD_TEXT


def _top_match(matches: Any) -> str | None:
    ranked = [m for m in matches or [] if isinstance(m, dict)]
    ranked.sort(key=lambda m: m["rank"] if isinstance(m.get("rank"), int) else 1_000_000)
    return str(ranked[0].get("organization") or "") or None if ranked else None


def json_object(text: str | None) -> dict[str, Any]:
    """A JSON column's object (metadata, detail); {} for anything else."""
    with contextlib.suppress(ValueError, TypeError):
        value = json.loads(text or "{}")
        if isinstance(value, dict):
            return value
    return {}


def party_organization(party: dict[str, Any] | None) -> str | None:
    """The organisation of a stored referral party: the organisation itself, or the one a
    named practitioner works for."""
    party = party or {}
    organization = (party.get("organization") or {}).get("name")
    if not organization:
        organization = (party.get("practitioner") or {}).get("organization")
    return str(organization) if organization else None


def party_recipient(party: dict[str, Any] | None) -> str | None:
    """Whom a stored referral party (PRD role RT) sends the referral to: its organisation
    (party_organization), else the person it names. A referral made to a specialist by name
    has gone to them: it is not held, and its modify and cancel must follow it there."""
    organization = party_organization(party)
    if organization:
        return organization
    practitioner = (party or {}).get("practitioner") or {}
    person = display_name(practitioner, with_prefix=True) or practitioner.get("id")
    return str(person) if person else None


def _party(
    person: Practitioner | Organization | None, organization: Organization | None = None
) -> dict[str, Any]:
    """A referral party as JSON: the person and/or the organisation (a CBO is often only an
    organisation; a referring doctor often comes with their practice)."""
    out: dict[str, Any] = {}
    if isinstance(person, Practitioner):
        out["practitioner"] = person.model_dump(mode="json", exclude_none=True)
    elif isinstance(person, Organization):
        out["organization"] = person.model_dump(mode="json", exclude_none=True)
    if organization is not None and "organization" not in out:
        out["organization"] = organization.model_dump(mode="json", exclude_none=True)
    return out


def party_name(party: dict[str, Any] | None) -> str | None:
    """``Dr Samir Haddad (Springfield Clinic)`` for lists and notices."""
    if not party:
        return None
    person = display_name(party.get("practitioner"), with_prefix=True)
    org = (party.get("organization") or {}).get("name")
    if person and org:
        return f"{person} ({org})"
    return person or org or (party.get("practitioner") or {}).get("id")


def _summary(rec: ReferralRecord | None) -> dict[str, Any]:
    """What a notice to the referrer (or an overdue alert) needs, flat."""
    if rec is None:
        return {}
    snap = rec.snapshot
    patient = snap.get("patient") or {}
    referral = snap.get("referral") or {}
    return {
        "referral_key": rec.referral_key,
        "referral_id": (referral.get("referral_id") or {}).get("value"),
        "patient_key": rec.patient_key,
        "patient_name": display_name(patient.get("name"), with_prefix=True),
        "patient": {
            k: patient[k] for k in ("name", "birth_date", "sex", "primary") if k in patient
        },
        "status": rec.status,
        "priority": rec.priority,
        "type": rec.type,
        "reason": rec.reason,
        "referring": rec.referring,
        "referring_name": party_name(rec.referring),
        "referred_to": rec.referred_to,
        "referred_to_name": party_name(rec.referred_to),
        "diagnoses": snap.get("diagnoses") or [],
        "sending_application": snap.get("sending_application"),
        "sending_facility": snap.get("sending_facility"),
        "created_at": _iso(rec.created_at),
        "due_at": _iso(rec.due_at),
        "closed_at": _iso(rec.closed_at),
    }


# -- storage: the same operations over the store or over memory ---------------------------------


class _Backend(Protocol):
    """What the state machine needs from storage, inside one transaction."""

    def recorded_result(self, message_key: Any) -> dict[str, Any] | None: ...
    def get(self, key: str) -> ReferralRecord | None: ...
    def get_by_id(self, referral_id: int) -> ReferralRecord | None: ...
    def by_value(self, value: str) -> list[ReferralRecord]: ...
    def save(self, rec: ReferralRecord) -> int: ...
    def add_event(self, row: dict[str, Any], message_key: Any) -> int: ...
    def events(self, rec: ReferralRecord) -> list[ReferralEvent]: ...
    def events_of(self, referral_id: int, action: str) -> list[ReferralEvent]: ...
    def awaiting(self) -> list[ReferralRecord]: ...
    def mark_alerted(self, referral_id: int, now: datetime) -> bool: ...
    def hold(self, referral_id: int) -> None: ...
    def merged_into(self, patient_key: str) -> str | None: ...
    def outbox_organizations(self, referral_id: int) -> _OutboxOrganizations: ...
    def orphans(self, keys: Iterable[str]) -> list[ReferralEvent]: ...
    def adopt(self, event_ids: Iterable[int], referral_id: int) -> None: ...
    def update_detail(self, event_id: int, values: dict[str, Any]) -> None: ...


def _dump(value: Any) -> str | None:
    if value is None or value == {} or value == []:
        return None
    return json.dumps(value, ensure_ascii=False, default=str)


def _row_values(rec: ReferralRecord) -> dict[str, Any]:
    return clipped(referrals, _values(rec), ("priority", "type"))


def _values(rec: ReferralRecord) -> dict[str, Any]:
    return {
        "referral_key": rec.referral_key,
        "patient_key": rec.patient_key,
        "status": rec.status,
        "priority": rec.priority,
        "type": rec.type,
        "reason": rec.reason,
        "referring": _dump(rec.referring),
        "referred_to": _dump(rec.referred_to),
        "needs": _dump(rec.needs),
        "matches": _dump(rec.matches),
        "due_at": _utc(rec.due_at),
        "created_at": _utc(rec.created_at),
        "updated_at": _utc(rec.updated_at),
        "closed_at": _utc(rec.closed_at),
        "alerted_at": _utc(rec.alerted_at),
        "snapshot": _dump(rec.snapshot),
    }


def _to_record(row: Any) -> ReferralRecord:
    values = dict(row._mapping)
    for name, empty in (("referring", {}), ("referred_to", {}), ("needs", []), ("snapshot", {})):
        values[name] = json.loads(values[name]) if values[name] else empty
    values["matches"] = json.loads(values["matches"]) if values["matches"] else None
    for name in ("due_at", "created_at", "updated_at", "closed_at", "alerted_at"):
        values[name] = _aware(values[name])
    return ReferralRecord(**values)


def _to_event(row: Any) -> ReferralEvent:
    values = dict(row._mapping)
    values["detail"] = json.loads(values["detail"]) if values["detail"] else {}
    values["accepted"] = bool(values["accepted"])
    values["at"] = _aware(values["at"])
    return ReferralEvent(**values)


def _events_query(rec: ReferralRecord) -> Any:
    """A referral's own rows, plus refused rows that named its key before it existed (an RRI
    that overtook its I12): the timeline should show both."""
    assert rec.id is not None
    return (
        select(referral_events)
        .where(
            or_(
                referral_events.c.referral_id == rec.id,
                and_(
                    referral_events.c.referral_id.is_(None),
                    referral_events.c.referral_key == rec.referral_key,
                ),
            )
        )
        .order_by(referral_events.c.id)
    )


class _SqlBackend:
    """The tables, through one connection inside the caller's transaction.

    With ``lock`` the referral rows read are locked until the transaction ends (PostgreSQL
    ``FOR UPDATE``; SQLite already serialises writers), so an RRI and a webhook for the same
    referral, handled by two workers at once, are checked against each other's result rather
    than against the same stale status."""

    def __init__(self, conn: Connection, *, lock: bool = True) -> None:
        self.conn = conn
        self.lock = lock

    def _select(self) -> Any:
        query = select(referrals)
        return query.with_for_update() if self.lock else query

    def recorded_result(self, message_key: Any) -> dict[str, Any] | None:
        rows = self.conn.execute(
            select(referral_events.c.detail)
            .where(referral_events.c.message_id == message_key)
            .order_by(referral_events.c.id)
        )
        for row in rows:
            detail = json.loads(row.detail) if row.detail else {}
            if "result" in detail:
                return detail["result"]
        return None

    def get(self, key: str) -> ReferralRecord | None:
        row = self.conn.execute(self._select().where(referrals.c.referral_key == key)).first()
        return _to_record(row) if row else None

    def get_by_id(self, referral_id: int) -> ReferralRecord | None:
        row = self.conn.execute(self._select().where(referrals.c.id == referral_id)).first()
        return _to_record(row) if row else None

    def by_value(self, value: str) -> list[ReferralRecord]:
        escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = referrals.c.referral_key.like(f"%|{escaped}", escape="\\")
        # All of them: an answer picks its patient's among them (ReferralTracker._find).
        rows = self.conn.execute(self._select().where(pattern).order_by(referrals.c.id))
        # An authority may itself contain a bar: keep only rows whose id part is the value.
        return [r for r in map(_to_record, rows) if r.referral_key.split("|", 1)[1] == value]

    def save(self, rec: ReferralRecord) -> int:
        values = _row_values(rec)
        if rec.id is None:
            result = self.conn.execute(insert(referrals).values(**values))
            rec.id = int(result.inserted_primary_key[0])
        else:
            self.conn.execute(update(referrals).where(referrals.c.id == rec.id).values(**values))
        return rec.id

    def add_event(self, row: dict[str, Any], message_key: Any) -> int:
        values = {
            **row,
            "at": _utc(row["at"]),
            "detail": json.dumps(row["detail"], ensure_ascii=False, default=str),
        }
        result = self.conn.execute(insert(referral_events).values(**values))
        return int(result.inserted_primary_key[0])

    def events(self, rec: ReferralRecord) -> list[ReferralEvent]:
        return [_to_event(r) for r in self.conn.execute(_events_query(rec))]

    def events_of(self, referral_id: int, action: str) -> list[ReferralEvent]:
        rows = self.conn.execute(
            select(referral_events)
            .where(
                referral_events.c.referral_id == referral_id,
                referral_events.c.action == action,
            )
            .order_by(referral_events.c.id)
        )
        return [_to_event(r) for r in rows]

    def awaiting(self) -> list[ReferralRecord]:
        rows = self.conn.execute(
            select(referrals)
            .where(referrals.c.status.in_(AWAITING_RESPONSE), referrals.c.alerted_at.is_(None))
            .order_by(referrals.c.id)
        )
        return [_to_record(r) for r in rows]

    def mark_alerted(self, referral_id: int, now: datetime) -> bool:
        """Compare-and-set, so two hub processes ticking at once alert a referral once."""
        result = self.conn.execute(
            update(referrals)
            .where(
                referrals.c.id == referral_id,
                referrals.c.alerted_at.is_(None),
                referrals.c.status.in_(AWAITING_RESPONSE),
            )
            .values(alerted_at=_utc(now))
        )
        return result.rowcount == 1

    def hold(self, referral_id: int) -> None:
        """Write to the referral's row (changing nothing) before reading it: the write holds
        the row (SQLite: the store) until the commit, so a second process doing the same
        waits for this one and then reads what it wrote."""
        self.conn.execute(
            update(referrals)
            .where(referrals.c.id == referral_id)
            .values(alerted_at=referrals.c.alerted_at)
        )

    def merged_into(self, patient_key: str) -> str | None:
        return self.conn.execute(
            select(patient_merges.c.surviving_key).where(
                patient_merges.c.retired_key == patient_key
            )
        ).scalar()

    def outbox_organizations(self, referral_id: int) -> _OutboxOrganizations:
        return _outbox_organizations(self.conn, referral_id)

    def orphans(self, keys: Iterable[str]) -> list[ReferralEvent]:
        rows = self.conn.execute(
            select(referral_events)
            .where(
                referral_events.c.referral_id.is_(None),
                referral_events.c.referral_key.in_(sorted(set(keys))),
            )
            .order_by(referral_events.c.id)
        )
        return [_to_event(r) for r in rows]

    def adopt(self, event_ids: Iterable[int], referral_id: int) -> None:
        ids = sorted(set(event_ids))
        if ids:
            self.conn.execute(
                update(referral_events)
                .where(referral_events.c.id.in_(ids), referral_events.c.referral_id.is_(None))
                .values(referral_id=referral_id)
            )

    def update_detail(self, event_id: int, values: dict[str, Any]) -> None:
        text = self.conn.execute(
            select(referral_events.c.detail).where(referral_events.c.id == event_id)
        ).scalar()
        detail = {**json_object(text), **values}
        self.conn.execute(
            update(referral_events)
            .where(referral_events.c.id == event_id)
            .values(detail=json.dumps(detail, ensure_ascii=False, default=str))
        )


class ReferralMemory:
    """The two tables as dicts, for dry runs (no store). One per enricher instance."""

    def __init__(self) -> None:
        self.referrals: dict[int, ReferralRecord] = {}
        self.events: list[tuple[Any, ReferralEvent]] = []  # (message key, row)
        self.lock = threading.RLock()


class _MemoryBackend:
    def __init__(self, tables: ReferralMemory) -> None:
        self.t = tables

    def recorded_result(self, message_key: Any) -> dict[str, Any] | None:
        for key, row in self.t.events:
            if key == message_key and "result" in row.detail:
                return copy.deepcopy(row.detail["result"])
        return None

    def get(self, key: str) -> ReferralRecord | None:
        found = next((r for r in self.t.referrals.values() if r.referral_key == key), None)
        return copy.deepcopy(found)

    def get_by_id(self, referral_id: int) -> ReferralRecord | None:
        return copy.deepcopy(self.t.referrals.get(referral_id))

    def by_value(self, value: str) -> list[ReferralRecord]:
        return [
            copy.deepcopy(r)
            for r in self.t.referrals.values()
            if r.referral_key.split("|", 1)[1] == value
        ]

    def save(self, rec: ReferralRecord) -> int:
        if rec.id is None:
            rec.id = max(self.t.referrals, default=0) + 1
        self.t.referrals[rec.id] = copy.deepcopy(rec)
        return rec.id

    def add_event(self, row: dict[str, Any], message_key: Any) -> int:
        event_id = len(self.t.events) + 1
        self.t.events.append((message_key, ReferralEvent(id=event_id, **copy.deepcopy(row))))
        return event_id

    def events(self, rec: ReferralRecord) -> list[ReferralEvent]:
        return [
            copy.deepcopy(e)
            for _, e in self.t.events
            if e.referral_id == rec.id
            or (e.referral_id is None and e.referral_key == rec.referral_key)
        ]

    def events_of(self, referral_id: int, action: str) -> list[ReferralEvent]:
        return [
            copy.deepcopy(e)
            for _, e in self.t.events
            if e.referral_id == referral_id and e.action == action
        ]

    def awaiting(self) -> list[ReferralRecord]:
        return [
            copy.deepcopy(r)
            for r in self.t.referrals.values()
            if r.status in AWAITING_RESPONSE and r.alerted_at is None
        ]

    def mark_alerted(self, referral_id: int, now: datetime) -> bool:
        rec = self.t.referrals.get(referral_id)
        if rec is None or rec.alerted_at is not None or rec.status not in AWAITING_RESPONSE:
            return False
        rec.alerted_at = _utc(now)
        return True

    def hold(self, referral_id: int) -> None:
        return None  # the memory's lock is held for the whole session

    def merged_into(self, patient_key: str) -> str | None:
        return None  # a dry run's merges are the encounter-state step's, not kept here

    def outbox_organizations(self, referral_id: int) -> _OutboxOrganizations:
        return _OutboxOrganizations([], [])  # a dry run has no outbox

    def orphans(self, keys: Iterable[str]) -> list[ReferralEvent]:
        wanted = set(keys)
        return [
            copy.deepcopy(e)
            for _, e in self.t.events
            if e.referral_id is None and e.referral_key in wanted
        ]

    def adopt(self, event_ids: Iterable[int], referral_id: int) -> None:
        ids = set(event_ids)
        for _, event in self.t.events:
            if event.id in ids and event.referral_id is None:
                event.referral_id = referral_id

    def update_detail(self, event_id: int, values: dict[str, Any]) -> None:
        for _, event in self.t.events:
            if event.id == event_id:
                event.detail.update(copy.deepcopy(values))


# -- the state machine -------------------------------------------------------------------------


class ReferralTracker:
    """Applies referral messages and status updates: in the store's tables when given an
    engine, else in ``memory`` (dry runs). Each update is applied in one transaction."""

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        memory: ReferralMemory | None = None,
        response_hours: float = 72,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.engine = engine
        self.memory = memory if memory is not None else ReferralMemory()
        self.response_hours = response_hours
        self.clock = clock

    @contextmanager
    def _session(self) -> Iterator[_Backend]:
        if self.engine is None:
            with self.memory.lock:
                yield _MemoryBackend(self.memory)
            return
        with self.engine.begin() as conn:
            yield _SqlBackend(conn)

    # -- reading ------------------------------------------------------------------------------
    def referral(self, key: str | int) -> ReferralRecord | None:
        """A referral by row id or by ``authority|id`` key."""
        with self._session() as b:
            return b.get_by_id(key) if isinstance(key, int) else b.get(key)

    def events(self, key: str | int) -> list[ReferralEvent]:
        """A referral's timeline rows, oldest first ([] for an unknown referral)."""
        with self._session() as b:
            rec = b.get_by_id(key) if isinstance(key, int) else b.get(key)
            return b.events(rec) if rec is not None else []

    # -- v2 messages --------------------------------------------------------------------------
    def apply_message(
        self, event: CareEvent, message_id: int, *, identity: str | None = None
    ) -> ReferralTransition:
        """Apply one REF/RRI message; a message already applied returns the recorded
        transition unchanged. With a store the message id alone is the key. Dry-run messages
        all carry message id 0, so ``identity`` (MSH-3/4/10) and what the message says tell
        them apart, as the hub's intake does: a message that reuses a control ID with other
        content is another message, not a resend (its time aside, MSH-7, which the hub's
        content hash leaves out too)."""
        message_key: Any = message_id
        if self.engine is None:
            said = event.model_dump_json(exclude={"occurred_at"})
            message_key = (message_id, identity, said)
        with self._session() as b:
            recorded = b.recorded_result(message_key)
            if recorded is None:
                return self._apply(b, event, message_id, message_key)
            earlier = ReferralTransition.from_output(recorded)
            if earlier.action not in _UNTRACKED_ACTIONS:
                return earlier
            # It belonged to no referral then: its referral may be on file now (a reprocess
            # after the I12 came), so it is applied afresh; still none, the same refusal.
            return self._apply(b, event, message_id, message_key, earlier)

    def _apply(
        self,
        b: _Backend,
        event: CareEvent,
        message_id: int,
        message_key: Any,
        earlier: ReferralTransition | None = None,
    ) -> ReferralTransition:
        """Apply one message; ``earlier`` is its recorded refusal for want of a referral,
        returned again (not recorded twice) when there is still none."""
        source = f"{event.message_type}^{event.trigger_event}"
        if event.kind not in _REFERRAL_KINDS:
            # Nothing recorded: this step only owns referral messages.
            return ReferralTransition(
                action="not_a_referral",
                source=source,
                accepted=False,
                reason=f"{source} is not a referral message",
                message_id=message_id,
            )
        ctx = _Context(b, event, source, message_id, message_key, self.clock())
        ref = event.referral or Referral()
        if ref.referral_id is None:
            if earlier is not None and earlier.action == "no_referral_id":
                return earlier
            return self._record(
                ctx,
                None,
                None,
                "no_referral_id",
                None,
                accepted=False,
                reason="the message has no referral id (RF1-6 or RF1-11)",
            )
        responding = event.kind == "referral_response"
        key = (
            referral_key(ref.referral_id)
            if responding
            else placed_referral_key(ref.referral_id, event)
        )
        patient = _patient_of(event) if responding else None
        rec = self._find(
            b, ref, loose=responding, placed=None if responding else key, patient=patient
        )
        if event.kind == "referral_new":
            return self._on_new(ctx, rec, key)
        if event.kind == "referral_modify":
            return self._on_modify(ctx, rec, key)
        if rec is None:
            if earlier is not None and earlier.action == "unknown_referral":
                return earlier
            return self._record(
                ctx,
                None,
                key,
                "unknown_referral",
                self._target(event),
                accepted=False,
                reason=self._unknown_reason(b, ref, key, patient),
            )
        if event.kind == "referral_cancel":
            return self._change(ctx, rec, "cancelled")
        if event.kind == "referral_status_request":
            return self._record(
                ctx, rec, rec.referral_key, "status_request", rec.status, note="status inquiry"
            )
        return self._on_response(ctx, rec, ref)

    @staticmethod
    def _target(event: CareEvent) -> str | None:
        """The status an update for an unknown referral asked for (for the record)."""
        if event.kind == "referral_cancel":
            return "cancelled"
        if event.kind == "referral_response" and event.referral is not None:
            return RF1_STATUS.get((event.referral.status or "").upper())
        return None

    @staticmethod
    def _find(
        b: _Backend,
        ref: Referral,
        *,
        loose: bool,
        placed: str | None = None,
        patient: str | None = None,
    ) -> ReferralRecord | None:
        """The referral a message names: by the key its placer gave it (``placed``, for the
        referrer's own messages), by RF1-6 (else RF1-11) with its authority, then by RF1-11.
        ``loose`` (responses only) also takes the bare id when either side left the
        authority out and exactly one referral of the answer's ``patient`` has that id:
        responders often echo the id without its namespace, while the referrer knows its own
        ids exactly. An answer is never taken by a referral of another patient (two hospitals
        both number a referral R-310: each answer goes to its own patient's)."""
        if placed is not None:
            rec = b.get(placed)
            if rec is not None:
                return rec
        candidates = [i for i in (ref.referral_id, ref.external_id) if i is not None]
        for ident in candidates:
            rec = b.get(referral_key(ident))
            if (
                rec is not None
                and (placed is None or _placed_by_the_same(rec, placed))
                and _same_patient(b, rec, patient)
            ):
                return rec
        if not loose:
            return None
        for ident in candidates:
            found = [
                r
                for r in b.by_value(ident.value)
                if (not ident.authority or not r.referral_key.split("|", 1)[0])
                and _same_patient(b, r, patient)
            ]
            if len(found) == 1:
                return found[0]
        return None

    @staticmethod
    def _unknown_reason(b: _Backend, ref: Referral, key: str, patient: str | None) -> str:
        """Why an update names no referral on file: none has its id, or (an answer) those
        that have it are another patient's."""
        if patient is not None and ref.referral_id is not None:
            others = b.by_value(ref.referral_id.value)
            if others and not any(_same_patient(b, r, patient) for r in others):
                return f"no referral {_label(key)} for the patient the answer names (PID-3)"
        return f"no referral {_label(key)}"

    def _on_new(self, ctx: _Context, rec: ReferralRecord | None, key: str) -> ReferralTransition:
        if rec is None:
            rec = self._create(ctx, key)
            return self._created(ctx, rec, key)
        if self._changes(rec, ctx.event, ctx.b):
            # The referrer sent the referral again with other content (a STAT instead of a
            # routine, another organisation): many referring systems resend an I12 rather
            # than send an I13, and dropping it as a resend would lose the change unseen.
            return self._on_modify(ctx, rec, key, resent=True)
        return self._record(
            ctx,
            rec,
            rec.referral_key,
            "resend",
            rec.status,
            note=f"referral already on file ({rec.status}): nothing changed",
        )

    def _changes(self, rec: ReferralRecord, event: CareEvent | None, b: _Backend) -> list[str]:
        """The referral's fields a message would change (as a modify applies them), on a
        copy: a party written otherwise that names the same recipient is no change."""
        probe = copy.deepcopy(rec)
        changed = self._merge_fields(probe, event, b)
        if "referred_to" in changed and not any(_recipient_moves(rec, probe)):
            changed.remove("referred_to")
        return changed

    def _on_modify(
        self, ctx: _Context, rec: ReferralRecord | None, key: str, *, resent: bool = False
    ) -> ReferralTransition:
        """A modify (REF^I13), or a new referral (REF^I12) sent again for one on file with
        other content (``resent``): applied alike, and the timeline says which it was."""
        if rec is None:
            rec = self._create(ctx, key)
            note = "created from a modify: the original referral (I12) was never seen"
            return self._created(ctx, rec, key, note)
        what = "a second REF^I12 with other content" if resent else "a modify"
        if rec.status in CLOSED_STATUSES:
            return self._record(
                ctx,
                rec,
                rec.referral_key,
                "illegal",
                rec.status,
                accepted=False,
                reason=f"referral is {rec.status}: {what} cannot change a closed referral",
            )
        named_before = copy.deepcopy(rec.referred_to)
        holder_before = _holder(rec)
        earlier = copy.deepcopy(rec)
        before = rec.status
        changed = self._merge_fields(rec, ctx.event, ctx.b)
        moved, released = _recipient_moves(earlier, rec)
        if "referred_to" in changed and not (moved or released):
            changed.remove("referred_to")  # the same recipient, written otherwise
        if moved or released:
            # Sent to an organisation afresh: it starts from the beginning, with its own time
            # to answer, whatever another had said (it may accept or decline it anew).
            rec.status = "requested"
            rec.due_at = ctx.now + timedelta(hours=self.response_hours)
            rec.alerted_at = None
        rec.updated_at = ctx.now
        ctx.b.save(rec)
        note = f"changed: {', '.join(changed)}" if changed else "nothing changed"
        if resent:
            note = f"{what}, applied as a modify; {note}"
        if moved:
            note += f"; sent to another organisation, so {before} -> requested"
        if released:
            note += "; it names an organisation now: sent as a new referral"
        return self._record(
            ctx,
            rec,
            rec.referral_key,
            "released" if released else "modified",
            rec.status,
            changed=(moved or released) and before != rec.status,
            before=before,
            note=note,
            extra={"fields": changed},
            changed_fields=changed,
            referred_to_before=(named_before or {"organization": {"name": holder_before}})
            if moved
            else None,
            held=holder_before is None and not released,
        )

    def _on_response(self, ctx: _Context, rec: ReferralRecord, ref: Referral) -> ReferralTransition:
        code = (ref.status or "").upper()
        target = RF1_STATUS.get(code)
        extra = {"rf1_status": ref.status}
        if target is None:
            return self._record(
                ctx,
                rec,
                rec.referral_key,
                "unknown_status",
                None,
                accepted=False,
                reason=f"RF1-1 status {ref.status!r} is not A, R, P or E (table 0283)",
                extra=extra,
            )
        refusal = self._answer_refusal(
            ctx.b, rec, _responding_organization(ctx.event), _senders(ctx.event)
        )
        if refusal is not None:
            return self._record(
                ctx,
                rec,
                rec.referral_key,
                "other_organization",
                target,
                accepted=False,
                reason=refusal,
                extra=extra,
            )
        trigger = ctx.event.trigger_event if ctx.event is not None else ""
        if trigger == "I14" and rec.status == "cancelled":
            return self._record(
                ctx,
                rec,
                rec.referral_key,
                "cancel_confirmed",
                rec.status,
                note="the receiving side answered the cancel",
                extra=extra,
            )
        return self._change(ctx, rec, target, extra=extra)

    def _answer_refusal(
        self, b: _Backend, rec: ReferralRecord, organization: str | None, senders: list[str]
    ) -> str | None:
        """Why an answer cannot be the answer of whoever has the referral, or None. An answer
        that names its organisation (PRD role RT) must name one the referral is with (unless
        it is with none: held); one that names none is taken, unless its sender (MSH-4, MSH-3)
        is an organisation the referral was withdrawn from. A sender is a facility code as
        often as a name, so only a name carehub knows tells it apart."""
        outbox = b.outbox_organizations(rec.id if rec.id is not None else -1)
        holders = _recipients(rec, [name for _, _, name in outbox.sent])
        withdrawn = [
            name
            for name in [*outbox.withdrawn, *self._moved_from(b, rec)]
            if not _among(name, holders)
        ]
        now_with = f"it is with {', '.join(holders)}" if holders else "it is with nobody now"
        if organization:
            if _among(organization, holders) or not (holders or _among(organization, withdrawn)):
                return None
            how = (
                "was withdrawn from it" if _among(organization, withdrawn) else "was not sent to it"
            )
            return f"answer from {organization}, but the referral {how}: {now_with}"
        for sender in senders:
            if _among(sender, withdrawn) and not _among(sender, holders):
                return f"answer from {sender}, but the referral was withdrawn from it: {now_with}"
        return None

    @staticmethod
    def _moved_from(b: _Backend, rec: ReferralRecord) -> list[str]:
        """The recipients a modify took the referral from (ReferralTransition
        .referred_to_before), as the timeline recorded them: known with or without an outbox."""
        names = []
        for event in b.events(rec):
            result = event.detail.get("result") or {}
            if event.accepted and event.action == "modified" and result.get("referred_to_before"):
                name = party_recipient(result["referred_to_before"])
                if name:
                    names.append(name)
        return names

    # -- a referral that was waited for --------------------------------------------------------
    def _created(
        self, ctx: _Context, rec: ReferralRecord, key: str, note: str | None = None
    ) -> ReferralTransition:
        """Record a referral this message created, then what came for it before it did and
        is its own: the newest answer that overtook it (an RRI about its patient, from an
        organisation it is with) and the referrer's cancel (REF^I14 from the same sender),
        applied just after it in the order they came, as if they had come then. Only what is
        applied joins its timeline: another patient's answer, or one it refuses, stays
        unattached (``referrals refused --unattached``) for the referral it belongs to."""
        waiting = self._waiting(ctx, rec)
        transition = self._record(
            ctx, rec, key, "created", "requested", changed=True, before=None, note=note
        )
        created_row = ctx.last_event_id
        early = [self._early_answer(ctx, rec, waiting), _early_cancel(rec, waiting)]
        for row in sorted((e for e in early if e is not None), key=lambda e: e.id):
            applied = self._apply_early(ctx, rec, row)
            if applied is None:
                continue
            if row.source.startswith("REF^"):
                transition.early_cancel = applied.as_output()
            else:
                transition.early_answer = applied.as_output()
        if (transition.early_answer or transition.early_cancel) and created_row is not None:
            # Where it stands after them: closed, it is sent to nobody (sent_as_new).
            transition.status = rec.status
            ctx.b.update_detail(created_row, {"result": transition.as_output()})
        return transition

    @staticmethod
    def _waiting(ctx: _Context, rec: ReferralRecord) -> list[ReferralEvent]:
        """The refused rows, tied to no referral, that named this referral's id before it
        existed: by its key, by the id with the authority the message gave it, and by the
        bare id (as an RRI echoes RF1-6), whichever referral they turn out to be for."""
        ref = ctx.event.referral if ctx.event is not None else None
        ident = ref.referral_id if ref is not None else None
        if ident is None:
            return []
        keys = {rec.referral_key, f"|{ident.value}", ident.value}
        if ident.authority:
            keys.add(referral_key(ident))
        return ctx.b.orphans(keys)

    def _early_answer(
        self, ctx: _Context, rec: ReferralRecord, waiting: list[ReferralEvent]
    ) -> ReferralEvent | None:
        """The newest answer (RRI, not the answer to a cancel) among ``waiting`` that is this
        referral's: with a status carehub reads, about its patient (an answer that names no
        patient only when it named this referral exactly, or no other referral has its id),
        from whoever it is with. Only RRIs: their senders were acknowledged and will not send
        them again, while a webhook caller was answered 404 and knows to try again."""
        ref = ctx.event.referral if ctx.event is not None else None
        ident = ref.referral_id if ref is not None else None
        named_exactly = {
            rec.referral_key,
            *([referral_key(ident)] if ident and ident.authority else []),
        }
        only_one = ident is not None and [r.id for r in ctx.b.by_value(ident.value)] == [rec.id]
        answers = [
            e
            for e in waiting
            if e.action == "unknown_referral"
            and e.source.startswith("RRI^")
            and e.source != "RRI^I14"
            and e.to_status in RF1_STATUS.values()
        ]
        for answer in reversed(answers):
            responder = answer.detail.get("responder") or {}
            patient = responder.get("patient_key")
            if patient is None and answer.referral_key not in named_exactly and not only_one:
                continue
            if not _same_patient(ctx.b, rec, patient):
                continue
            organization, senders = responder.get("organization"), _senders_of(responder)
            if self._answer_refusal(ctx.b, rec, organization, senders) is None:
                return answer
        return None

    def _apply_early(
        self, ctx: _Context, rec: ReferralRecord, row: ReferralEvent
    ) -> ReferralTransition | None:
        """Apply one update that came before the referral (``row``, its refused record) now,
        if the referral may still move so; it then joins the referral's timeline, marked as
        applied later. None when it may not (an answer after an early cancel)."""
        assert row.to_status is not None
        if not is_allowed(rec.status, row.to_status):
            return None
        answering = row.source.startswith("RRI^")
        responder = row.detail.get("responder") or {}
        notes = [str(n) for n in responder.get("notes") or [] if str(n).strip()]
        what = "an answer" if answering else "a cancel"
        detail: dict[str, Any] = {
            "early_update": row.id,
            "note": f"{what} that came before the referral (timeline row {row.id}), applied "
            "after it",
        }
        if answering:
            detail["responder"] = responder
        replay = _Context(
            ctx.b,
            None,
            row.source,
            row.message_id,
            ctx.message_key,
            ctx.now,
            detail,
            answered_by=_early_answerer(responder, rec) if answering else None,
            answer_note=" ".join(n.strip() for n in notes) or None,
        )
        applied = self._change(replay, rec, row.to_status)
        ctx.b.adopt([row.id], rec.id if rec.id is not None else -1)
        ctx.b.update_detail(row.id, {"applied_later": replay.last_event_id})
        return applied

    # -- other sources ------------------------------------------------------------------------
    def advance(
        self,
        key: str,
        to_status: str,
        source: str,
        detail: dict[str, Any] | None = None,
    ) -> ReferralTransition:
        """Apply a status update that did not come as a v2 message: a CBO's webhook, a FHIR
        Task poll (``Task.status``), an operator. Same legality checks as messages; an unknown
        referral or status is recorded as refused, never raised, because the caller is usually
        a listener that must keep going."""
        with self._session() as b:
            event_detail = dict(detail or {})
            ctx = _Context(b, None, source, None, None, self.clock(), event_detail)
            rec = b.get(key)
            if rec is None:
                return self._record(
                    ctx,
                    None,
                    key,
                    "unknown_referral",
                    to_status,
                    accepted=False,
                    reason=f"no referral {_label(key)}",
                )
            if to_status not in STATUSES:
                return self._record(
                    ctx,
                    rec,
                    key,
                    "unknown_status",
                    None,
                    accepted=False,
                    reason=f"unknown status {to_status!r} (expected one of {', '.join(STATUSES)})",
                    extra={"asked": to_status},
                )
            answered_by = event_detail.get("answered_by")
            if answered_by and source in _ANSWER_SOURCES:
                # A Task's owner, an organisation's token: the same rule as for an RRI that
                # names its organisation, so an answer from one the referral was taken from
                # (or never sent to) does not move it.
                refusal = self._answer_refusal(b, rec, str(answered_by), [])
                if refusal is not None:
                    return self._record(
                        ctx,
                        rec,
                        key,
                        "other_organization",
                        to_status,
                        accepted=False,
                        reason=refusal,
                    )
            return self._change(ctx, rec, to_status)

    # -- the one place statuses change ---------------------------------------------------------
    def _change(
        self,
        ctx: _Context,
        rec: ReferralRecord,
        target: str,
        *,
        extra: dict[str, Any] | None = None,
    ) -> ReferralTransition:
        before = rec.status
        if target == before:
            note = f"already {before}"
            return self._record(
                ctx, rec, rec.referral_key, "unchanged", target, note=note, extra=extra
            )
        if not is_allowed(before, target):
            return self._record(
                ctx,
                rec,
                rec.referral_key,
                "illegal",
                target,
                accepted=False,
                reason=f"illegal transition {before} -> {target}",
                extra=extra,
                acted_on_cancelled=self._first_claim_after_cancel(ctx, rec, target),
            )
        rec.status = target
        rec.updated_at = ctx.now
        if target in CLOSED_STATUSES:
            rec.closed_at = ctx.now
        ctx.b.save(rec)
        action = "cancelled" if target == "cancelled" else "status"
        return self._record(
            ctx, rec, rec.referral_key, action, target, changed=True, before=before, extra=extra
        )

    @staticmethod
    def _first_claim_after_cancel(ctx: _Context, rec: ReferralRecord, target: str) -> bool:
        """The receiving side says it works on a cancelled referral, and has not said so with
        this status before (a second identical claim tells the referrer nothing new)."""
        if rec.status != "cancelled" or target not in _ACTING or ctx.source.startswith("REF^"):
            return False
        return not any(
            e.from_status == "cancelled" and e.to_status == target and not e.accepted
            for e in ctx.b.events(rec)
        )

    def _create(self, ctx: _Context, key: str) -> ReferralRecord:
        rec = ReferralRecord(
            id=None,
            referral_key=key,
            status="requested",
            created_at=ctx.now,
            updated_at=ctx.now,
            due_at=ctx.now + timedelta(hours=self.response_hours),
        )
        self._merge_fields(rec, ctx.event, ctx.b)
        ctx.b.save(rec)
        return rec

    @staticmethod
    def _merge_fields(rec: ReferralRecord, event: CareEvent | None, b: _Backend) -> list[str]:
        """Fold the referrer's message into the record; returns the fields that changed. What
        a modify leaves out (no PRD RT, no reason) is kept from before. The patient is filed
        under the identifier a merge (A40) left standing: a message that still sends the
        retired one changes nothing about whose referral it is."""
        if event is None:
            return []
        ref = event.referral or Referral()
        new: dict[str, Any] = {
            "priority": ref.priority,
            "type": ref.type,
            "reason": ref.reason,
            "referring": _party(ref.referring, ref.referring_organization) or None,
            "referred_to": _party(ref.referred_to) or None,
        }
        primary = patient_key_identifier(event.patient)
        if primary is not None:
            new["patient_key"] = _surviving_key(
                b, make_patient_key(primary.value, primary.authority, 0)
            )
        changed = []
        for name, value in new.items():
            if value is not None and value != getattr(rec, name):
                setattr(rec, name, value)
                changed.append(name)
        snapshot = event.model_dump(mode="json", exclude_none=True)
        old = rec.snapshot
        if isinstance(old.get("patient"), dict):
            snapshot["patient"] = {**old["patient"], **(snapshot.get("patient") or {})}
        if not snapshot.get("diagnoses") and old.get("diagnoses"):
            snapshot["diagnoses"] = old["diagnoses"]
        rec.snapshot = snapshot
        return changed

    def _record(
        self,
        ctx: _Context,
        rec: ReferralRecord | None,
        key: str | None,
        action: str,
        to_status: str | None,
        *,
        accepted: bool = True,
        changed: bool = False,
        reason: str | None = None,
        note: str | None = None,
        before: str | None = _CURRENT,
        extra: dict[str, Any] | None = None,
        acted_on_cancelled: bool = False,
        changed_fields: list[str] | None = None,
        referred_to_before: dict[str, Any] | None = None,
        held: bool | None = None,
    ) -> ReferralTransition:
        """Build the transition and write its timeline row (also for refused updates).
        ``held``: see ReferralTransition; by default, whether ``rec`` names or matched no
        organisation."""
        current = rec.status if rec is not None else None
        from_status = current if before == _CURRENT else before
        transition = ReferralTransition(
            action=action,
            source=ctx.source,
            accepted=accepted,
            referral_id=rec.id if rec is not None else None,
            referral_key=key,
            patient_key=rec.patient_key if rec is not None else None,
            from_status=from_status,
            to_status=to_status,
            status=current,
            changed=changed,
            reason=reason,
            note=note,
            # The referrer hears about what the other side did, not about its own messages.
            notify_referrer=accepted and changed and not ctx.source.startswith("REF^"),
            acted_on_cancelled=acted_on_cancelled,
            answered_by=_answered_by(ctx, rec),
            answer_note=_answer_note(ctx),
            sent_to=self._sent_to(ctx, rec),
            message_id=ctx.message_id,
            summary=_summary(rec),
            changed_fields=list(changed_fields or []),
            referred_to_before=referred_to_before or None,
            held=bool(held)
            if held is not None
            else action != "created" and rec is not None and not referral_recipients(rec, None),
        )
        detail: dict[str, Any] = {**ctx.detail, **(extra or {})}
        if note:
            detail["note"] = note
        if ctx.event is not None:
            detail["control_id"] = ctx.event.message_control_id
            detail["occurred_at"] = _iso(ctx.event.occurred_at)
            if ctx.event.kind == "referral_response" and ctx.event.referral is not None:
                responder = ctx.event.referral
                detail["responder"] = {
                    "organization": _responding_organization(ctx.event),
                    "sending_application": ctx.event.sending_application,
                    "sending_facility": ctx.event.sending_facility,
                    "external_id": responder.external_id.model_dump(exclude_none=True)
                    if responder.external_id
                    else None,
                    "notes": responder.notes,
                    # Whose answer it is (PID-3): a referral that comes after it takes it
                    # only if it is that patient's.
                    "patient_key": _patient_of(ctx.event),
                }
        detail["result"] = transition.as_output()
        row = {
            "referral_id": rec.id if rec is not None else None,
            "referral_key": key,
            "message_id": ctx.message_id,
            "source": ctx.source[:64],
            "action": action,
            "from_status": from_status,
            "to_status": to_status,
            "accepted": accepted,
            "reason": reason,
            "detail": detail,
            "at": ctx.now,
        }
        ctx.last_event_id = ctx.b.add_event(row, ctx.message_key)
        return transition

    @staticmethod
    def _sent_to(ctx: _Context, rec: ReferralRecord | None) -> list[str]:
        """For an answer from the receiving side: whom the referral is with (see
        ReferralTransition.sent_to); nothing for the referrer's own messages."""
        answering = (
            ctx.event.kind == "referral_response"
            if ctx.event is not None
            else ctx.source in _ANSWER_SOURCES
            or ctx.source.startswith("RRI^")  # an early answer, applied after its referral
            or ctx.answered_by is not None
        )
        if not answering or rec is None or rec.id is None:
            return []
        emailed = ctx.b.outbox_organizations(rec.id).sent
        return _recipients(rec, [name for _, _, name in emailed])

    # -- overdue -------------------------------------------------------------------------------
    def overdue(self, now: datetime, response_hours: float | None = None) -> list[ReferralRecord]:
        """Referrals still waiting for an answer (requested/received) past their deadline and
        not alerted yet. The deadline is ``due_at`` (set at creation), or ``created_at +
        response_hours`` when given, so a changed setting applies to referrals already open.
        Nothing is marked: call :meth:`mark_alerted` once the alert is queued, so a crash in
        between alerts again instead of never."""
        moment = _as_utc(now)
        found = []
        with self._session() as b:
            for rec in b.awaiting():
                deadline = (
                    rec.created_at + timedelta(hours=response_hours)
                    if response_hours is not None
                    else rec.due_at
                )
                if deadline is not None and _as_utc(deadline) < moment:
                    found.append(rec)
        return found

    def mark_alerted(self, ids: Iterable[int], now: datetime) -> list[int]:
        """Mark referrals alerted (one timeline row each); returns the ids this call marked.
        One already alerted or answered meanwhile is left out, so two workers never both
        raise the same alert."""
        marked = []
        with self._session() as b:
            for referral_id in sorted(set(ids)):
                if not b.mark_alerted(referral_id, now):
                    continue
                rec = b.get_by_id(referral_id)
                assert rec is not None
                marked.append(referral_id)
                ctx = _Context(b, None, "carehub", None, None, _as_utc(now))
                note = f"no answer by {_iso(rec.due_at)}"
                self._record(ctx, rec, rec.referral_key, "overdue_alert", rec.status, note=note)
        return marked

    def note_unalerted(self, referral: ReferralRecord, reason: str, now: datetime) -> bool:
        """Record on an overdue referral's timeline that nobody could be alerted, and why,
        once for each time it is overdue (a modify that moves it starts another); the
        referral stays unalerted, so the alert goes once someone can be told (a coordinator
        added to the roster). True when this call recorded it, False when it was already
        said (or the referral no longer waits for an answer). ``referral`` as overdue()
        read it: checked first without writing, as each tick asks about it again."""
        referral_id = referral.id
        if referral_id is None:
            return False
        with self._session() as b:
            if _said_unalerted(b, referral, reason):
                return False
        with self._session() as b:
            b.hold(referral_id)
            rec = b.get_by_id(referral_id)
            if (
                rec is None
                or rec.alerted_at is not None
                or rec.status not in AWAITING_RESPONSE
                or _said_unalerted(b, rec, reason)
            ):
                return False
            ctx = _Context(b, None, "carehub", None, None, _as_utc(now), {"unalerted": reason})
            note = (
                f"no answer by {_iso(rec.due_at)}, and nobody to alert: {reason}; the alert "
                "goes once someone can be told"
            )
            self._record(ctx, rec, rec.referral_key, UNALERTED, rec.status, note=note)
        return True


#: The timeline action of an overdue referral nobody could be alerted of (note_unalerted).
UNALERTED = "overdue_unalerted"


def _said_unalerted(b: _Backend, rec: ReferralRecord, reason: str) -> bool:
    """Whether the referral's timeline already says, since it was last due, that nobody could
    be alerted for ``reason``."""
    if rec.id is None:
        return False
    due = _as_utc(rec.due_at) if rec.due_at is not None else None
    return any(
        e.detail.get("unalerted") == reason and (due is None or _as_utc(e.at) >= due)
        for e in b.events_of(rec.id, UNALERTED)
    )


@dataclass(slots=True)
class _Context:
    """One update being applied: where it came from and the transaction it runs in."""

    b: _Backend
    event: CareEvent | None
    source: str
    message_id: int | None
    message_key: Any
    now: datetime
    detail: dict[str, Any] = field(default_factory=dict)
    #: An answer applied after it came (one that overtook its referral): who gave it and
    #: what they said, as recorded when it came.
    answered_by: str | None = None
    answer_note: str | None = None
    #: The timeline row _record wrote last.
    last_event_id: int | None = None


#: Sources whose updates come from the receiving side without a v2 message.
_ANSWER_SOURCES = frozenset({"webhook", "fhir-task-poll"})


def _answered_by(ctx: _Context, rec: ReferralRecord | None) -> str | None:
    """The party that gave an answer: an RRI's responding party (PRD role RT, else its sending
    facility or application, see _answering_sender); for a webhook or Task poll what the
    caller recorded in ``detail["answered_by"]`` (a Task's owner)."""
    if ctx.answered_by is not None:
        return ctx.answered_by
    event = ctx.event
    if event is not None:
        if event.kind != "referral_response":
            return None
        party = event.referral.referred_to if event.referral is not None else None
        name: str | None = None
        if isinstance(party, Organization):
            name = party.name
        elif isinstance(party, Practitioner):
            person = display_name(party.model_dump(exclude_none=True), with_prefix=True)
            name = party.organization or person
        return name or _answering_sender(_senders(event), rec)
    found = ctx.detail.get("answered_by")
    return str(found) if found and ctx.source in _ANSWER_SOURCES else None


def _answering_sender(senders: list[str], rec: ReferralRecord | None) -> str | None:
    """Whom an answer that names no organisation is credited to: its sender (MSH-4, else
    MSH-3), unless the sender is the referrer's own system relaying it (the facility or
    application that placed the referral, or the authority of its id): then nobody by name,
    and a notice names whom the referral is with, as that."""
    if rec is not None:
        snapshot = rec.snapshot or {}
        placer = {
            str(name).strip().casefold()
            for name in (
                snapshot.get("sending_facility"),
                snapshot.get("sending_application"),
                rec.referral_key.split("|", 1)[0],
            )
            if name
        }
        if any(sender.strip().casefold() in placer for sender in senders):
            return None
    return senders[0] if senders else None


def _answer_note(ctx: _Context) -> str | None:
    """The note a webhook call or a Task update carried (an RRI's notes are its NTEs)."""
    if ctx.answer_note is not None:
        return ctx.answer_note
    note = ctx.detail.get("note")
    return str(note) if note and ctx.event is None and ctx.source in _ANSWER_SOURCES else None


def _responding_organization(event: CareEvent | None) -> str | None:
    """The organisation an RRI names as its responding party (PRD role RT): the organisation,
    or the one the named person works for. None when it names none."""
    party = event.referral.referred_to if event is not None and event.referral else None
    if isinstance(party, Organization):
        return party.name or None
    if isinstance(party, Practitioner):
        return party.organization or None
    return None


def _senders(event: CareEvent | None) -> list[str]:
    """Who sent a message, as its header says: MSH-4, MSH-3."""
    if event is None:
        return []
    return [s for s in (event.sending_facility, event.sending_application) if s]


def _patient_of(event: CareEvent | None) -> str | None:
    """The patient key (authority|id) of the patient a message names (PID-3), as the referral
    files it before merges; None when it names none."""
    primary = patient_key_identifier(event.patient if event is not None else None)
    if primary is None or not primary.value:
        return None
    return make_patient_key(primary.value, primary.authority, 0)


def _same_patient(b: _Backend, rec: ReferralRecord, patient: str | None) -> bool:
    """Whether an answer about ``patient`` (a patient key, None: it names none) can be this
    referral's: the same patient once merges (A40) are followed, compared by identifier
    alone when either side leaves out its authority. An answer naming no patient, or a
    referral filed under none, cannot be told apart, and is taken as before."""
    ours = rec.patient_key or ""
    if patient is None or "|" not in ours or ours.startswith("message|"):
        return True
    theirs = _surviving_key(b, patient)
    if theirs == ours:
        return True
    their_authority, _, their_id = theirs.partition("|")
    our_authority, _, our_id = ours.partition("|")
    return their_id == our_id and not (their_authority and our_authority)


def _early_answerer(responder: dict[str, Any], rec: ReferralRecord) -> str | None:
    """_answered_by for an answer applied after the referral it overtook, from its record."""
    organization = responder.get("organization")
    return str(organization) if organization else _answering_sender(_senders_of(responder), rec)


def _senders_of(responder: dict[str, Any]) -> list[str]:
    """_senders, as an answer's record keeps them (``detail["responder"]``)."""
    return [
        str(responder[k]) for k in ("sending_facility", "sending_application") if responder.get(k)
    ]


def _early_cancel(rec: ReferralRecord, waiting: list[ReferralEvent]) -> ReferralEvent | None:
    """The newest of the referrer's cancels (REF^I14) among ``waiting`` that named this
    referral's own key: the same sender (or the authority of its id) placed both."""
    cancels = [
        e
        for e in waiting
        if e.action == "unknown_referral"
        and e.source == "REF^I14"
        and e.referral_key == rec.referral_key
    ]
    return cancels[-1] if cancels else None


def _holder(rec: ReferralRecord) -> str | None:
    """Whom the referral went to: the party it names, else its top community match."""
    return party_recipient(rec.referred_to) or _top_match(rec.matches)


def _recipient_moves(before: ReferralRecord, after: ReferralRecord) -> tuple[bool, bool]:
    """(moved, released) by a modify that made ``after`` of ``before``: moved, it names
    another recipient than the one that had it; released, it was held (nobody named, nothing
    matched) and names one now, so it is sent as a new referral: nothing of it reached
    anyone before."""
    holder_before, named_now = _holder(before), party_recipient(after.referred_to)
    moved = bool(holder_before and named_now) and not same_organization(holder_before, named_now)
    return moved, holder_before is None and bool(named_now)


def _among(name: str, names: Iterable[str]) -> bool:
    return any(same_organization(name, other) for other in names)


def _surviving_key(b: _Backend, patient_key: str) -> str:
    """The patient key a merge (A40) left standing for ``patient_key``, as the encounter-state
    step follows it."""
    return follow_merges(b.merged_into, patient_key)


# -- the route step ----------------------------------------------------------------------------


class ReferralStateEnricher(TrackingEnricher[ReferralTracker]):
    """Route step: apply a REF/RRI message to its referral and hand the transition to later
    steps (``work.data["referral"]``), e.g. a notify step that tells the referring provider
    when ``notify_referrer`` is set. A message that belongs to no referral (no RF1-6, an I14
    or I15 for a referral not on file) ends ``failed`` with the reason, and the route's other
    steps still run."""

    name = "referral-state"
    description = (
        "Track closed-loop referrals from REF/RRI (I12-I15) as FHIR Task statuses: new, "
        "modify, cancel, responses (RF1-1 A/R/P/E); refuse illegal transitions with a reason; "
        "alert when no answer comes within response_hours."
    )

    class Options(ComponentOptions):
        """How long the receiving side has to answer (accept, reject, or say it is pending)
        before the referral is reported overdue."""

        response_hours: float = Field(
            default=72,
            gt=0,
            description="hours after a referral is first recorded by which an answer is due; "
            "one still requested or received after that is reported overdue",
        )

    missing_event_error = ReferralStateError

    def new_memory(self) -> ReferralMemory:
        return ReferralMemory()

    def new_tracker(self, engine: Engine | None, memory: ReferralMemory) -> ReferralTracker:
        hours = getattr(self.options, "response_hours", 72)
        return ReferralTracker(engine, memory=memory, response_hours=hours)

    def enrich(self, work: Work) -> Any:
        event = self.care_event(work)
        message = work.message
        tracker = self.tracker
        # Only a dry run (no store, every message id 0) needs the identity, and its digest.
        identity = message.identity if tracker.engine is None else None
        transition = tracker.apply_message(event, message.id, identity=identity)
        work.data["referral"] = transition
        if transition.early_cancel is not None and transition.referral_id is not None:
            self._settle_early(referral_id=transition.referral_id)
        untracked = _untracked(transition)
        if untracked is not None:
            # Recorded (refused_referral_events lists it); the message ends 'failed' with the
            # reason rather than 'delivered', and the route's other steps still run.
            raise ReferralUntracked(untracked)
        return transition.as_output()

    def tick(self, now: datetime) -> None:
        """Log referrals newly past their deadline, once per store whichever of the routes'
        referral-state steps gets there first. The alert itself goes to the patient's care
        coordinator from the notify step, which marks them alerted once it is queued."""
        store = self.context.store
        by_store = self.context.shared.setdefault(_OVERDUE_LOGGED, {})
        logged: set[int | None] = by_store.setdefault(
            store.instance_id if store is not None else "", set()
        )
        late = [r for r in self.tracker.overdue(now) if r.id not in logged]
        if late:
            logged.update(r.id for r in late)
            # Row ids, not referral numbers: a referral number identifies a patient's referral,
            # and logs carry no identifiers (`carehub referrals show ID` gives the rest).
            ids = ", ".join(f"#{r.id}" for r in late)
            log.warning("%d referral(s) without an answer: %s", len(late), ids)
        if store is not None:
            # Once per store and tick, whichever of the routes' steps gets there first.
            ticked = self.context.shared.setdefault(_EARLY_SETTLED, {})
            if ticked.get(store.instance_id) != now:
                ticked[store.instance_id] = now
                self._settle_early(since=now - EARLY_SETTLE_WINDOW)

    def _settle_early(
        self, *, referral_id: int | None = None, since: datetime | None = None
    ) -> None:
        """settle_early_updates on the store, when there is one. Just after the referral came
        its failure is logged and left to the next tick: the referral is applied, and its
        message's routing must not fail for a status that can be mended later."""
        store = self.context.store
        if store is None:
            return
        try:
            settle_early_updates(store, referral_id=referral_id, since=since)
        except Exception as err:
            if referral_id is None:
                raise  # the tick's own failure, logged and retried by the worker
            log.warning(
                "the messages of updates applied when referral #%d came are settled at the "
                "next periodic run (%s)",
                referral_id,
                type(err).__name__,
            )


#: ComponentContext.shared: store id -> the referral rows whose overdue warning was logged.
_OVERDUE_LOGGED = "enrich:referral-state:overdue-logged"
#: ComponentContext.shared: store id -> the time of the last tick that settled early updates.
_EARLY_SETTLED = "enrich:referral-state:early-settled"
#: How long after its message was last failed the periodic run still settles an update applied
#: after it came (one routed in the same batch as its referral, which the referral's step
#: found still being routed).
EARLY_SETTLE_WINDOW = timedelta(days=2)
#: In an early update's refused row once its message was settled (the status it took), or
#: found failed for something else as well (None).
_SETTLED = "message_settled"


def settle_early_updates(
    store: MessageStore, *, referral_id: int | None = None, since: datetime | None = None
) -> list[tuple[int, str]]:
    """The messages of the referrer's updates that came before their referral (a REF^I14) and
    were applied when it came (ReferralTracker._created), still failed because their
    referral-state step found no referral then: each takes the status a message routed
    without that problem has, its history saying when it was applied (an operator must not
    take it for a problem still open, and reprocess it). ``referral_id``: only that
    referral's; ``since``: only messages failed since then. A message still being routed
    (in the same batch as its referral) is left for a later call. Returns (message id,
    status) of each settled."""
    query = (
        select(
            referral_events.c.id,
            referral_events.c.message_id,
            referral_events.c.referral_id,
            referral_events.c.source,
            referral_events.c.detail,
        )
        .select_from(referral_events.join(messages, messages.c.id == referral_events.c.message_id))
        .where(
            referral_events.c.action == "unknown_referral",
            referral_events.c.referral_id.is_not(None),  # set once it was applied (adopt)
            messages.c.status == MessageStatus.FAILED.value,
        )
        .order_by(referral_events.c.id)
    )
    if referral_id is not None:
        query = query.where(referral_events.c.referral_id == referral_id)
    if since is not None:
        query = query.where(messages.c.status_at >= _utc(since))
    with store.engine.connect() as conn:
        # Each once: settled, or found failed for something else too (a dead letter).
        waiting = [
            (row, problem)
            for row in conn.execute(query)
            if _SETTLED not in json_object(row.detail)
            and (problem := _waiting_problem(row.source)) is not None
        ]
        arrivals = _arrivals(conn, {row.referral_id for row, _ in waiting})
    settled: list[tuple[int, str]] = []
    for row, problem in waiting:
        applied_to, source, message_id = row.referral_id, row.source, row.message_id
        came = arrivals.get(applied_to)
        by = f" ({came[1]}, message {came[0]})" if came else ""
        note = (
            f"{source} applied when referral #{applied_to} arrived{by}: it came before the "
            "referral and was kept for it"
        )
        status = store.clear_step_problem(message_id, problem, note)
        with store.engine.begin() as conn:
            _SqlBackend(conn, lock=False).update_detail(row.id, {_SETTLED: status})
        if status is not None:
            # Row ids only: logs carry no referral numbers.
            log.info(
                "message %d (%s) applied when referral #%d arrived: %s now",
                message_id,
                source,
                applied_to,
                status,
            )
            settled.append((message_id, status))
    return settled


def _waiting_problem(source: str) -> str | None:
    """The problem a referral-state step raised for an update of ``source`` that named a
    referral not on file (see _untracked); None for one that fails no message (an answer)."""
    return _untracked(ReferralTransition(action="unknown_referral", source=source, accepted=False))


def _arrivals(conn: Connection, referral_ids: Iterable[int]) -> dict[int, tuple[int, str]]:
    """The message that created each referral: referral row id -> (message id, its type)."""
    ids = sorted(set(referral_ids))
    if not ids:
        return {}
    rows = conn.execute(
        select(
            referral_events.c.referral_id, referral_events.c.message_id, referral_events.c.source
        )
        .where(
            referral_events.c.referral_id.in_(ids),
            referral_events.c.action == "created",
            referral_events.c.message_id.is_not(None),
        )
        .order_by(referral_events.c.id)
    ).all()
    found: dict[int, tuple[int, str]] = {}
    for row in rows:
        found.setdefault(row.referral_id, (row.message_id, row.source))
    return found


def _untracked(transition: ReferralTransition) -> str | None:
    """Why a referral message can be tied to no referral at all, or None: it names no
    referral id, or it is the referrer's cancel or status request (I14, I15) for a referral
    carehub does not have (a cancel is applied if its referral comes after it). Said without
    the id, since it becomes the message's status detail. An answer (RRI) for an unknown
    referral is not one: it is kept for its referral, which may come after it (see
    ReferralTracker._created)."""
    if transition.action == "no_referral_id":
        return (
            f"{transition.source} not tracked: the message has no referral id (RF1-6 or "
            "RF1-11), so it belongs to no referral"
        )
    if transition.action == "unknown_referral" and transition.source == "REF^I14":
        return (
            f"{transition.source} not tracked: no referral with its id (RF1-6) is on file, "
            "so there is nothing to apply it to yet; it is applied when the referral (REF^I12 "
            "or I13) comes from the same sender, and `carehub messages reprocess` applies it "
            "to one on file"
        )
    if transition.action == "unknown_referral" and transition.source.startswith("REF^"):
        return (
            f"{transition.source} not tracked: no referral with its id (RF1-6) is on file, "
            "so there is nothing to apply it to"
        )
    return None


# -- queries for the command line ---------------------------------------------------------------


def refused_referral_events(
    engine: Engine,
    since: datetime | None = None,
    *,
    unattached_only: bool = False,
    limit: int | None = 100,
) -> list[ReferralEvent]:
    """Referral updates carehub refused, newest first, with the MSH-10 of their messages:
    ``since`` a time (all without one); ``unattached_only`` keeps those tied to no referral
    (no referral id, an unknown one) that no referral's timeline shows."""
    query = (
        select(referral_events)
        .where(referral_events.c.accepted.is_(False))
        .order_by(referral_events.c.id.desc())
    )
    if since is not None:
        query = query.where(referral_events.c.at >= _utc(since))
    if unattached_only:
        query = query.where(referral_events.c.referral_id.is_(None))
    if limit:
        query = query.limit(limit)
    with engine.connect() as conn:
        events = [_to_event(row) for row in conn.execute(query)]
        _add_control_ids(conn, events)
    return events


def _add_control_ids(conn: Connection, events: list[ReferralEvent]) -> None:
    """Each event's message's MSH-10 as the store has it, into ``detail["control_id"]``."""
    ids = {e.message_id for e in events if e.message_id is not None}
    if not ids:
        return
    control_ids = dict(
        conn.execute(
            select(messages.c.id, messages.c.control_id).where(messages.c.id.in_(ids))
        ).all()
    )
    for event in events:
        stored = control_ids.get(event.message_id) if event.message_id is not None else None
        if stored:
            event.detail["control_id"] = stored


def move_referrals_to_survivor(
    conn: Connection, retired: str, surviving: str, message_id: int | None, at: datetime
) -> list[int]:
    """A merge (A40) retired ``retired`` into ``surviving``: file the retired patient's
    referrals under the survivor, each with a row on its timeline saying so (the referral's
    patient changed without a message of its own). Runs in the caller's transaction (the
    encounter-state step's, which records the merge). Returns the referral row ids moved."""
    moved = conn.execute(
        select(referrals.c.id, referrals.c.referral_key, referrals.c.status).where(
            referrals.c.patient_key == retired
        )
    ).all()
    if not moved:
        return []
    conn.execute(
        update(referrals)
        .where(referrals.c.id.in_([row.id for row in moved]))
        .values(patient_key=surviving)
    )
    note = f"patient {_label(retired)} merged into {_label(surviving)}: filed under it now"
    detail = json.dumps({"note": note, "retired_key": retired, "surviving_key": surviving})
    conn.execute(
        insert(referral_events),
        [
            {
                "referral_id": row.id,
                "referral_key": row.referral_key,
                "message_id": message_id,
                "source": "patient-merge",
                "action": "patient_merged",
                "from_status": row.status,
                "to_status": row.status,
                "accepted": True,
                "reason": None,
                "detail": detail,
                "at": _utc(at),
            }
            for row in moved
        ],
    )
    return [row.id for row in moved]


def list_referrals(
    engine: Engine,
    open_only: bool = False,
    overdue_now: datetime | None = None,
    *,
    status: str | None = None,
    patient: str | None = None,
    limit: int | None = 50,
) -> list[ReferralRecord]:
    """Referrals, most recently updated first. ``overdue_now`` keeps only those still waiting
    for an answer past their deadline at that time (alerted or not). ``patient`` is an
    ``authority|id`` or a bare id, merges followed: a retired id (A40) finds the referrals now
    filed under the patient it was merged into, as the paperwork may still carry it."""
    from carehub.care.encounters import patient_key_matches  # encounters moves referrals

    query = select(referrals).order_by(referrals.c.updated_at.desc(), referrals.c.id.desc())
    if open_only:
        query = query.where(referrals.c.status.in_(OPEN_STATUSES))
    if overdue_now is not None:
        query = query.where(
            referrals.c.status.in_(AWAITING_RESPONSE), referrals.c.due_at < _utc(overdue_now)
        )
    if status:
        query = query.where(referrals.c.status == status)
    with engine.connect() as conn:
        if patient:
            query = query.where(patient_key_matches(conn, referrals.c.patient_key, patient))
        if limit:
            query = query.limit(limit)
        return [_to_record(r) for r in conn.execute(query)]


@dataclass(slots=True)
class ReferralTimeline:
    """A referral and every update offered to it, in order (with the MSH-10 of messages)."""

    referral: ReferralRecord
    events: list[ReferralEvent]

    def as_output(self) -> dict[str, Any]:
        return {
            "referral": self.referral.as_output(),
            "timeline": [e.as_output() for e in self.events],
        }


def referral_timeline(engine: Engine, ident: int | str) -> ReferralTimeline | None:
    """A referral by its ``authority|id`` key, its bare referral id, or its row id (``#2``,
    or digits that are no referral's id), with its timeline; None when there is no such
    referral. The referral's own id comes first: "2" is the referral the hospital numbered 2,
    not whatever referral happens to sit in row 2. A bare id that several senders used is
    an error naming their keys."""
    with engine.connect() as conn:
        rec: ReferralRecord | None = None
        text = str(ident).strip()
        row_id = int(text[1:]) if text.startswith("#") and text[1:].isdigit() else None
        if isinstance(ident, int):
            row_id = ident
        if row_id is None:
            backend = _SqlBackend(conn, lock=False)
            rec = backend.get(text)
            if rec is None and "|" not in text:
                found = backend.by_value(text)
                if len(found) > 1:
                    keys = ", ".join(sorted(r.referral_key for r in found))
                    raise CarehubError(
                        f"referral id {text!r} was used by {len(found)} senders: give one of "
                        f"{keys}, or a row id as #N"
                    )
                rec = found[0] if found else None
            if rec is None and text.isdigit():
                row_id = int(text)
        if row_id is not None:
            row = conn.execute(select(referrals).where(referrals.c.id == row_id)).first()
            rec = _to_record(row) if row else None
        if rec is None:
            return None
        events = [_to_event(row) for row in conn.execute(_events_query(rec))]
        _add_control_ids(conn, events)
    return ReferralTimeline(rec, events)


def record_matches(
    engine: Engine | ReferralMemory, referral_key: str, needs: list[Any] | None, matches: Any
) -> bool:
    """Keep the needs found and the ranked services (with each rank's reasons) on the
    referral, so `carehub referrals show` answers "what was this patient offered, and why",
    and a later change or cancel knows who has it. ``needs`` None keeps the needs it has. In
    a dry run, on its memory tables.

    A referral sent to an organisation the directory lists as not active (its entry carries
    a ``warning``) is due for an answer now: nobody may answer it, and the care coordinator
    hears at the next tick (the overdue alert, saying why) rather than after response_hours."""
    due_now = datetime.now(UTC) if inactive_warning(matches) else None
    if isinstance(engine, ReferralMemory):
        with engine.lock:
            found = [r for r in engine.referrals.values() if r.referral_key == referral_key]
            for rec in found:
                if needs is not None:
                    rec.needs = copy.deepcopy(needs)
                rec.matches = copy.deepcopy(matches)
                if due_now is not None and rec.status not in CLOSED_STATUSES:
                    due = _utc(rec.due_at)
                    rec.due_at = due_now if due is None else min(due, due_now)
        return bool(found)
    values = {"matches": json.dumps(matches, default=str)}
    if needs is not None:
        values["needs"] = json.dumps(needs, default=str)
    with engine.begin() as conn:
        changed = conn.execute(
            update(referrals).where(referrals.c.referral_key == referral_key).values(**values)
        ).rowcount
        if due_now is not None:
            conn.execute(
                update(referrals)
                .where(
                    referrals.c.referral_key == referral_key,
                    referrals.c.status.not_in(CLOSED_STATUSES),
                    or_(referrals.c.due_at.is_(None), referrals.c.due_at > due_now),
                )
                .values(due_at=due_now)
            )
    return bool(changed)


def inactive_warning(matches: Any) -> str | None:
    """The warning on the organisation a referral went to when the directory lists it as not
    active (resources.matching._named_organization), else None."""
    for match in matches or []:
        if isinstance(match, dict) and match.get("warning"):
            return str(match["warning"])
    return None
