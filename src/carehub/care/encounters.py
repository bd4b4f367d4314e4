"""Encounter state: turn a noisy ADT feed into one record per visit and one transition per message.

Hospitals send about eight ADT messages per encounter: registrations, admits, transfers, bed
moves, A08 updates that repeat what is already known, cancels and merges. Care teams must hear
about the few that matter (ED arrival, admission, level-of-care transfer, discharge) exactly
once, and hear a retraction when one is cancelled. So this module keeps the visit's state in the
store (tables ``encounters``, ``encounter_events`` and ``patient_merges``) and tells the later
route steps, through a :class:`~carehub.care.model.Transition`, what each message changed.

Rules (see docs on each handler for the reasons):

- One encounter per visit, keyed by (patient key, visit key). The patient key is
  ``authority|id`` of the PID-3 identifier typed MR (else the first), the same format as the
  routing order key, resolved through ``patient_merges`` so a retired id follows its merge.
  The visit key is ``authority|value`` of PV1-19. An identifier sent without an assigning
  authority has the sending facility's code (MSH-4) as its authority: two hospitals' 55501
  are two patients. A visit stored under the bare keys (``|55501``) before that is still
  found by its PV1-19 (or, without one, when it is at the facility the message names) and
  goes on under them.
- A field sent as the explicit null ``""`` (the event's ``cleared``) is deleted from the
  visit's snapshot, where any other field a message leaves out is kept from earlier ones.
- PV1-19 missing: the message joins the patient's most recently updated *open* encounter
  (registered, ed, admitted) at the facility in PV1-3.4, or at any facility when PV1-3.4 is
  empty (an A13 looks for a discharged one instead);
  with none, a stand-in key ``noVN:<facility>:<YYYYMMDD>`` (the admit date PV1-44, else the
  message date EVN-2/MSH-7) is used. A registration or admission that finds that stand-in
  already closed gets ``...#2``, ``#3``: a second visit on the same day is a new visit.
- A message's facts (class, location, facility, the snapshot) are applied only when it is not
  older (EVN-2, else MSH-7) than the message whose facts the visit holds; an older one, late or
  out of order, only fills gaps, so a late A01 or A04 cannot put a discharged inpatient back
  in the ED. Times are compared only when both carry a UTC offset or neither does (a feed
  mixing the two cannot be ordered: such a message is applied). The first PV1-44 heard sets
  when the visit opened.
- A04 class E -> ``ed_arrival`` (state ed); other classes -> ``registration`` (registered).
  The first A04 of a visit an update already put in the ED is its ``ed_arrival``.
- A01/A06 -> ``admission`` (admitted); already admitted or discharged -> ``none``. A visit an
  A08 or A02 opened as inpatient was never told as admitted: its first A01/A06 is the
  ``admission``. An A06 naming an unknown new PV1-19 with the old one in MRG-5 renumbers the
  old encounter. A fresh A01/A06 under a new visit number quietly closes the patient's open ED
  visit at that facility (sites that give the inpatient stay its own number never discharge
  the ED visit).
- An admission within 30 days after another visit of the patient was discharged names that
  visit in ``readmission_of`` (the follow-up clocks end its TCM episode); an A11 of that
  admission names it again. An inpatient stay (class I) never told as admitted, because its
  A01 came late (after its A03) or never (an A03 or A08 was its first message), is a
  readmission by its PV1-44 all the same: the message that brings it names the visits in
  ``readmission_of``. So does an A40 that puts an admission and an earlier discharge of two
  records together (``merge``), and each such discharge's timeline says so.
- A death the message reports, whichever visit it comes on, is in the summary's ``death``
  (``source``: PV1-36 for a discharge disposition 20 or 40-42, PID-30 for Y, PID-29 for a
  death time; ``encounter_ids``: every visit of the patient, whose follow-ups end). A death
  is taken back (``death_retracted``) by an A13 of the discharge that gave it, by a
  correction of that disposition to one that is not a death, or, for a death PID-29/PID-30
  reported, by a later message of the patient with PID-30=N; ``encounter_ids`` then names the
  visits whose follow-ups run again (not those whose own discharge says the patient died).
  A PID-30 of N is only a retraction after such a report: senders that fill N on every
  message do not reopen anything, and it never takes back a death disposition.
- A08 or A02 that turns class E into I -> ``admission`` (site quirk). An A08 that brings a
  discharge time (PV1-45) no later than the message itself to a visit not yet discharged ->
  ``discharge`` (sites that discharge by update, never sending an A03: without it no one would
  be told and no follow-up clock would start); a discharge time after the message is a planned
  one and is kept out of the state. Any other A08 merges into the visit: ``updated`` when it
  changes a fact someone acts on (``UPDATE_FACTS``: the patient's name, birth date, sex,
  address, phone or PCP, the visit's class, unit or facility, its attending, admitting or
  referring doctor, service, reason or diagnoses), with those facts named in ``changed``,
  compared with the visit as known (case, spacing and a phone's punctuation aside, a doctor
  by NPI); ``none`` when it repeats what is known, however its fields are written.
- A02 -> ``transfer`` only when the patient class or the facility (PV1-3.4) changes; a move to
  another unit is ``updated`` (``changed: [encounter.location]``), a room or bed move inside
  the unit ``none``; both update the location. An A12 that undoes such a move is
  ``updated`` too (the location goes back).
- A03 -> ``discharge`` with PV1-45 (else the message time, kept in the snapshot as sent),
  PV1-36 and PV1-37; a discharge for an unknown visit creates the encounter already
  discharged, with no ``opened_at`` (PV1-44, else when the visit was first heard of, which
  a discharge does not tell). A later A03 or A08 giving the
  discharged visit another disposition, destination or discharge time (PV1-45, as a moment)
  -> ``discharge_corrected`` (with ``previous_discharge``: what it replaces, the time too); a
  new disposition without PV1-37 clears the old destination.
- A11 -> ``cancel_admission``: back to ed when the admission came from the ED, else cancelled.
  A12 -> ``cancel_transfer``: the location, class and facility before the last A02 come back.
  A13 -> ``cancel_discharge``: back to the state before the discharge (admitted, normally).
  An A13 that finds no discharge awaits it, as an early A11 awaits its admission: a discharge
  up to the A13's time is the one it took back (``none``); after an A13 that reopened the
  visit, a discharge from before it is too.
  Cancels of a visit never seen are ``none``: nothing was announced, nothing to take back. An
  A11 for a visit never seen leaves it cancelled, so the admission it cancels cannot open it
  when it arrives late.
- An A01/A04/A06 for a cancelled visit reopens it only when it happened after the cancel
  (EVN-2, else MSH-7): one from before is what the cancel took back, arriving out of order,
  and is ``none``. When the two times are equal the order of arrival decides (a re-admission
  after the cancel), except after an A11 that came before anything it could cancel: that one
  is still waiting for its admission, and an admission of the same time is it.
- A40 (and the other patient merges) -> ``merge``: each MRG-1 identifier's key is retired into
  the surviving PID's key, its encounters are re-keyed (keeping the retired identifiers as
  the snapshot's ``merged_identifiers``, which FHIR notifications name), and later messages
  follow.
- A28/A31 -> ``demographics``: the patient part of each open encounter's snapshot is updated.
- Other ADT triggers (A05, A07, ...) merge quietly into the visit their PV1-19 names, and
  never create one or join one by the PV1-19 fallback.
- Resends: a message already applied returns its recorded transition unchanged (the routing
  step may run again after a crash, or in a second route).
- ``tick``: an ED visit with no message for ``stale_ed_hours`` (by the hub's clock: message
  times are often local times without a zone) is closed as ``stale_closed``.

Without a store (dry runs) the same rules run over an in-memory copy of the tables.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, overload

from pydantic import Field
from sqlalchemy import Connection, Engine, delete, func, insert, or_, select, update

from carehub.care.merges import follow_merges
from carehub.care.model import (
    DIED,
    DISPOSITIONS,
    Transition,
    TransitionKind,
    normalize_disposition,
)
from carehub.components import ComponentOptions, TrackingEnricher, Work
from carehub.errors import CarehubError
from carehub.events import (
    MAX_DIAGNOSES,
    CareEvent,
    Encounter,
    Identifier,
    Location,
    display_name,
    facility_code,
    identifier_scope,
    patient_key_identifier,
)
from carehub.referrals.state import move_referrals_to_survivor
from carehub.store.schema import (
    clipped,
    encounter_events,
    encounters,
    followups,
    messages,
    notifications,
    patient_merges,
    patient_preferences,
)
from carehub.workqueue import patient_key as make_patient_key

__all__ = [
    "OPEN_STATES",
    "EncounterRecord",
    "EncounterStateEnricher",
    "EncounterStateError",
    "EncounterTracker",
    "Timeline",
    "TimelineEntry",
    "encounter_timeline",
    "get_encounter",
    "list_encounters",
    "patient_key_matches",
    "visit_key",
]

log = logging.getLogger(__name__)

#: States in which a visit is still going on (a PV1-19-less message may join it).
OPEN_STATES: tuple[str, ...] = ("registered", "ed", "admitted")
#: Every state an encounter row can be in.
STATES: tuple[str, ...] = (*OPEN_STATES, "discharged", "cancelled", "closed")
_OPENERS = frozenset({"A01", "A04", "A06"})
_DISCHARGE_KEYS = ("discharge_time", "discharge_disposition", "discharged_to", "discharged_to_name")
#: Transitions that change what a visit's discharge stands for (the follow-up clocks act on
#: them); a reprocessed one is overtaken once another of them came to the visit after it.
DISCHARGE_CHANGES = ("discharge", "discharge_corrected", "cancel_discharge")
#: An admission this soon after a discharge of the same patient is a readmission: the TCM
#: service period (30 days from discharge), which is also the usual readmission window.
READMISSION_WINDOW = timedelta(days=30)
#: Discharge times closer than this are one time restated (seconds dropped or added), not a
#: correction to tell anyone about.
_SAME_DISCHARGE_TIME = timedelta(minutes=1)
#: On the timeline row of an A13 that found nothing discharged: the discharge it cancels has
#: not arrived yet, and when it does it is taken back (see ``_discharge_cancelled_before``).
_AWAITS_DISCHARGE = "awaits_discharge"
#: The care-event kinds that merge into a visit without changing its state unless they bring
#: news (an A08, an A02 that is no transfer, an A12 that undoes one): one that changes one of
#: ``UPDATE_FACTS`` is ``updated``, one that changes none of them ``none``.
_UPDATES = frozenset({"update", "transfer", "cancel_transfer"})
#: What an update may change that a care team or a downstream system acts on, named as in the
#: care event: who the patient is and how to reach them, where the visit is, who treats the
#: patient and for what. Not what is only the message's own (its times, control id), a
#: discharge's facts (``discharge_corrected`` tells those) or a bed or room inside the same
#: unit (a bed move is no news, as for an A02).
UPDATE_FACTS: tuple[str, ...] = (
    "patient.name",
    "patient.birth_date",
    "patient.sex",
    "patient.address",
    "patient.phone",
    "patient.pcp",
    "encounter.patient_class",
    "encounter.location",
    "encounter.attending",
    "encounter.admitting",
    "encounter.referring",
    "encounter.hospital_service",
    "encounter.admit_reason",
    "diagnoses",
)


class EncounterStateError(CarehubError):
    """The encounter-state step cannot work with what the route gave it."""


# -- records -----------------------------------------------------------------------------------


@dataclass(slots=True)
class EncounterRecord:
    """One ``encounters`` row. ``snapshot`` is the visit's merged care event (CareEvent JSON),
    so templates and digests can describe the visit even from a message that says little."""

    id: int | None
    patient_key: str
    visit_key: str
    state: str
    created_at: datetime
    updated_at: datetime
    facility: str | None = None
    patient_class: str | None = None
    location: str | None = None
    opened_at: datetime | None = None
    admitted_at: datetime | None = None
    discharged_at: datetime | None = None
    disposition: str | None = None
    discharged_to: str | None = None
    snapshot: dict[str, Any] = field(default_factory=dict)
    last_message_id: int | None = None

    def core(self) -> dict[str, Any]:
        """What a cancel must be able to put back; recorded as ``before`` on every event row."""
        encounter = self.snapshot.get("encounter") or {}
        return {
            "state": self.state,
            "patient_class": self.patient_class,
            "facility": self.facility,
            "location": self.location,
            "location_detail": encounter.get("location"),
        }

    def as_output(self) -> dict[str, Any]:
        """JSON-ready, for ``carehub encounters list --json``."""
        out = asdict(self)
        for name, value in out.items():
            if isinstance(value, datetime):
                out[name] = _utc_iso(value)
        return out


@dataclass(slots=True)
class EventRecord:
    """One ``encounter_events`` row: what one message (or a stale closure) did to a visit."""

    id: int
    encounter_id: int
    message_id: int | None
    trigger_event: str | None
    transition: str
    occurred_at: datetime | None
    detail: dict[str, Any]
    recorded_at: datetime


# -- helpers -----------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _stored(value: datetime | None) -> datetime | None:
    """Times as the store keeps them: aware ones in UTC (SQLite drops the offset and keeps the
    wall clock), naive ones as sent (an HL7 time without a zone is the sender's local time)."""
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC)


@overload
def _aware(value: datetime) -> datetime: ...
@overload
def _aware(value: None) -> None: ...
def _aware(value: datetime | None) -> datetime | None:
    """A time without a zone, read as UTC: the hub's own clock columns (created/updated) come
    back from SQLite naive, and the event translator reads a message time without one so."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _utc_minute(value: datetime | None) -> str:
    """A time to the minute in UTC, for a timeline note (read as ``_aware`` reads it)."""
    return _aware(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M") if value else ""


def _utc_iso(value: datetime | None) -> str | None:
    """A time for the command line's JSON: in UTC and saying so, as the store keeps times (a
    message time sent without an offset is read as UTC, as the hub reads it)."""
    return _aware(value).astimezone(UTC).isoformat() if value is not None else None


def visit_key(visit_number: Identifier, scope: str | None = None) -> str:
    """The visit part of the encounter key: PV1-19 with its assigning authority, because visit
    numbers are only unique within the system that issued them; one sent without an authority
    is scoped by ``scope``, the sending facility (carehub.events.scoped_identifier)."""
    return f"{visit_number.authority or scope or ''}|{visit_number.value}"


def _location_text(location: Location | dict[str, Any] | None) -> str | None:
    """``unit/room/bed`` for the ``location`` column and lists; the facility has its own."""
    if location is None:
        return None
    data = location if isinstance(location, dict) else location.model_dump()
    parts = [data.get(k) for k in ("point_of_care", "room", "bed")]
    return "/".join(p for p in parts if p) or data.get("description") or None


def _state_for_class(patient_class: str | None, default: str = "registered") -> str:
    """The state a visit first seen mid-stream is in, judged by PV1-2 alone."""
    if patient_class == "E":
        return "ed"
    if patient_class == "I":
        return "admitted"
    return default


def _ed_turned_inpatient(before: dict[str, Any], enc: Encounter, rec: EncounterRecord) -> bool:
    """Whether the message makes an ED visit inpatient (PV1-2 E -> I): sites that admit from
    the ED by an A08 or an A02 rather than an A06 still admit, and care teams must hear it."""
    return (
        enc.patient_class == "I"
        and (before["patient_class"] == "E" or before["state"] == "ed")
        and rec.state in ("ed", "registered")
    )


def _where_to(disposition: str | None, discharged_to: str | None) -> str:
    """A discharge's disposition and destination in words, for the visit's timeline."""
    code = normalize_disposition(disposition)
    words = f"{code} ({DISPOSITIONS[code]})" if code in DISPOSITIONS else (code or "no disposition")
    return f"{words} to {discharged_to}" if discharged_to else words


def _later(moment: datetime, than: datetime) -> bool:
    """Whether ``moment`` comes after ``than``; a time without a zone is read as UTC, as the
    event translator reads one (a few hours either way cannot make a past discharge planned:
    planned ones are days ahead)."""
    return _aware(moment) > _aware(than)


def _cancelled_the_visit(event: EventRecord) -> bool:
    """The event row of the cancel that put the visit in ``cancelled`` (later cancels of the
    cancelled visit and the late messages it took back leave it as it was)."""
    result = event.detail.get("result") or {}
    before = event.detail.get("before") or {}
    return result.get("state") == "cancelled" and before.get("state") != "cancelled"


def _held_since(rec: EncounterRecord) -> datetime | None:
    """When the message whose facts the visit holds happened (its EVN-2, else MSH-7): the
    snapshot is that message's care event, with the gaps filled by earlier ones."""
    text = rec.snapshot.get("occurred_at")
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return None


def _older_than_held(rec: EncounterRecord, event: CareEvent) -> bool:
    """Whether the message happened before the one whose facts the visit holds: a message
    that arrives late (out of order, or sent again after newer news) must not put back what is
    no longer so. Without both times nothing can be told, and the message is applied. Nor
    when only one of them carries a UTC offset: a time without one is the sender's local
    time, hours away from UTC, so a feed that mixes the two would have real news (a transfer
    an hour later) judged old; such a message is applied as it comes."""
    held = _held_since(rec)
    if held is None or event.occurred_at is None:
        return False
    if (held.tzinfo is None) != (event.occurred_at.tzinfo is None):
        return False
    return _later(held, event.occurred_at)


def _admitted_at(rec: EncounterRecord) -> datetime | None:
    """When the visit's inpatient stay began: the admission told, else, for an inpatient
    (class I) visit no admission message reached, its PV1-44."""
    if rec.admitted_at is not None:
        return rec.admitted_at
    if (rec.patient_class or "").upper() == "I":
        return rec.opened_at
    return None


def _pid_death(patient: Any) -> bool:
    """Whether a visit's snapshot of the patient holds a death (PID-30 Y, or a PID-29 time
    not contradicted by PID-30 N)."""
    if not isinstance(patient, dict):
        return False
    if patient.get("deceased") is True:
        return True
    return bool(patient.get("death_time")) and patient.get("deceased") is not False


def _death_reported(
    rec: EncounterRecord | None, event: CareEvent
) -> tuple[str | None, datetime | None]:
    """Whether the message says the patient died, and how (PV1-36, PID-30 or PID-29) and
    when. A discharge disposition counts when the message gives it and it stands as the
    visit's; PID-30 N outweighs a PID-29 time."""
    enc = event.encounter
    if (
        rec is not None
        and enc is not None
        and normalize_disposition(enc.discharge_disposition) in DIED
        and rec.state == "discharged"
        and normalize_disposition(rec.disposition) in DIED
    ):
        return "PV1-36", rec.discharged_at
    patient = event.patient
    if patient is None or patient.deceased is False:
        return None, None
    if patient.deceased:
        return "PID-30", patient.death_time
    if patient.death_time is not None:
        return "PID-29", patient.death_time
    return None, None


def _merge_snapshot(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The visit's care event after one more message: the new message wins, but what it leaves
    out (an A08 without DG1, a discharge without the attending) is kept from earlier ones.
    ``patient`` and ``encounter`` merge one level deep (a new location replaces the whole old
    one, so a bed from the old unit never sticks); message-specific parts (merges, referral)
    come from the new message only. The result is still valid CareEvent JSON; its diagnoses
    are MAX_DIAGNOSES at most, with ``diagnoses_left_out`` counting the rest."""
    merged = dict(new)
    for part in ("patient", "encounter"):
        before = old.get(part)
        if isinstance(before, dict):
            merged[part] = {**before, **(new.get(part) or {})}
    if not new.get("diagnoses") and old.get("diagnoses"):
        merged["diagnoses"] = old["diagnoses"]
        if old.get("diagnoses_left_out"):
            merged["diagnoses_left_out"] = old["diagnoses_left_out"]
    diagnoses = merged.get("diagnoses") or []
    if len(diagnoses) > MAX_DIAGNOSES:  # a snapshot stored before there was a cap
        merged["diagnoses"] = diagnoses[:MAX_DIAGNOSES]
        left_out = len(diagnoses) - MAX_DIAGNOSES + (merged.get("diagnoses_left_out") or 0)
        merged["diagnoses_left_out"] = left_out
    return merged


def _clear(snapshot: dict[str, Any], cleared: list[str] | None) -> None:
    """Take out of the visit's snapshot what the message sent as the explicit null ``""``
    (the sender deleted it); a destination goes with its name."""
    for path in cleared or ():
        part, _, name = path.partition(".")
        found = snapshot.get(part)
        if isinstance(found, dict):
            found.pop(name, None)
            if name == "discharged_to":
                found.pop("discharged_to_name", None)


def _text(value: Any) -> str | None:
    """A value as compared between messages: case and spacing are how a sender writes it,
    not a new fact (``OKAFOR`` and ``Okafor`` name one patient)."""
    if value is None:
        return None
    text = " ".join(str(value).split()).casefold()
    return text or None


def _person(value: Any) -> tuple[Any, ...] | None:
    """A practitioner by who they are: the id (an NPI) when sent, else the name; a title or
    organization added or dropped is the same doctor."""
    if not isinstance(value, dict):
        return None
    if _text(value.get("id")):
        return ("id", _text(value.get("id")))
    name = (_text(value.get("family")), _text(value.get("given")))
    return ("name", *name) if any(name) else None


def _facts(rec: EncounterRecord) -> dict[str, Any]:
    """The visit's ``UPDATE_FACTS`` in a form that compares equal when nothing a reader acts
    on differs (see ``_changed_facts``)."""
    snap = rec.snapshot
    patient = snap.get("patient") or {}
    enc = snap.get("encounter") or {}
    name = patient.get("name") or {}
    address = patient.get("address") or {}
    location = enc.get("location") or {}
    phone = patient.get("phone")
    digits = "".join(ch for ch in str(phone) if ch.isdigit()) if phone else ""
    diagnoses = snap.get("diagnoses") or []
    return {
        "patient.name": tuple(_text(name.get(k)) for k in ("family", "given", "middle", "suffix")),
        "patient.birth_date": _text(patient.get("birth_date")),
        "patient.sex": _text(patient.get("sex")),
        "patient.address": tuple(
            _text(address.get(k))
            for k in ("line1", "line2", "city", "state", "postal_code", "country")
        ),
        "patient.phone": digits or _text(phone),
        "patient.pcp": _person(patient.get("pcp")),
        "encounter.patient_class": _text(rec.patient_class),
        # The facility column keeps PV1-3.4 when a later PV1-3 leaves it out.
        "encounter.location": (
            _text(rec.facility),
            _text(location.get("point_of_care") or location.get("description")),
        ),
        "encounter.attending": _person(enc.get("attending")),
        "encounter.admitting": _person(enc.get("admitting")),
        "encounter.referring": _person(enc.get("referring")),
        "encounter.hospital_service": _text(enc.get("hospital_service")),
        "encounter.admit_reason": _text(enc.get("admit_reason")),
        "diagnoses": frozenset(
            _text(d.get("code") or d.get("display")) for d in diagnoses if isinstance(d, dict)
        ),
    }


def _changed_facts(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The ``UPDATE_FACTS`` that differ, in that order (never the message's field order)."""
    return [name for name in UPDATE_FACTS if before.get(name) != after.get(name)]


def _transition_from(output: dict[str, Any]) -> Transition:
    return Transition(
        kind=output["kind"],
        encounter_id=output.get("encounter_id"),
        patient_key=output.get("patient_key", ""),
        trigger_event=output.get("trigger_event", ""),
        state=output.get("state", ""),
        summary=output.get("summary") or {},
    )


def _patient_summary(snapshot: dict[str, Any]) -> dict[str, Any]:
    patient = snapshot.get("patient") or {}
    return {
        "patient_name": display_name(patient.get("name"), with_prefix=True),
        "name": patient.get("name"),
        "birth_date": patient.get("birth_date"),
        "sex": patient.get("sex"),
        "identifiers": patient.get("identifiers") or [],
        "primary_identifier": patient.get("primary"),
        # What scopes the identifiers sent without an assigning authority (MSH-4's code).
        "identifier_scope": facility_code(snapshot.get("sending_facility")),
        # The identifiers an A40 retired into this patient during the visit.
        "replaced_identifiers": snapshot.get("merged_identifiers") or [],
        "account_number": patient.get("account_number"),
        "phone": patient.get("phone"),
        "address": patient.get("address"),
        "pcp": patient.get("pcp"),
    }


def _summary(
    rec: EncounterRecord, event: CareEvent | None, previous_state: str | None
) -> dict[str, Any]:
    """What a notification needs, flat (the CMS minimum is patient name, treating practitioner
    and sending institution; the rest is for full-detail channels and follow-up clocks)."""
    snap = rec.snapshot
    enc = snap.get("encounter") or {}
    practitioner = enc.get("attending") or enc.get("admitting")
    discharged = rec.state == "discharged"
    return {
        **_patient_summary(snap),
        "patient_key": rec.patient_key,
        "visit_key": rec.visit_key,
        "visit_number": (enc.get("visit_number") or {}).get("value"),
        "visit_identifier": enc.get("visit_number"),
        "facility": rec.facility,
        "sending_facility": snap.get("sending_facility"),
        "location": rec.location,
        "location_detail": enc.get("location"),
        "patient_class": rec.patient_class,
        "hospital_service": enc.get("hospital_service"),
        "attending": enc.get("attending"),
        "admitting": enc.get("admitting"),
        "treating_practitioner": practitioner,
        "treating_practitioner_name": display_name(practitioner, with_prefix=True),
        "admit_reason": enc.get("admit_reason"),
        # PV1-44 as the sender gave it (with its offset), or nothing: when the first message
        # about a visit came is not when it began, and opened_at as the store gives it back
        # has lost its offset.
        "admit_time": enc.get("admit_time"),
        "opened_at": _iso(rec.opened_at),
        "admitted_at": _iso(rec.admitted_at),
        "discharge_time": (enc.get("discharge_time") or _iso(rec.discharged_at))
        if discharged
        else None,
        "discharged_at": _iso(rec.discharged_at),
        "disposition": rec.disposition,
        "discharged_to": rec.discharged_to,
        "discharged_to_name": enc.get("discharged_to_name") if discharged else None,
        "diagnoses": snap.get("diagnoses") or [],
        # More DG1s than a care event keeps: the diagnoses above are the first of them.
        "diagnoses_left_out": snap.get("diagnoses_left_out"),
        "occurred_at": _iso(event.occurred_at) if event is not None else None,
        "previous_state": previous_state,
    }


# -- storage: the same operations over the store or over memory ---------------------------------


class _Backend(Protocol):
    """What the state machine needs from storage, inside one transaction."""

    def recorded_result(self, message_key: Any) -> dict[str, Any] | None: ...
    def merged_into(self, key: str) -> str | None: ...
    def record_merge(self, retired: str, surviving: str, message_id: int, at: datetime) -> None: ...
    def get(self, patient_key: str, visit_key: str) -> EncounterRecord | None: ...
    def get_by_id(self, encounter_id: int) -> EncounterRecord | None: ...
    def of_patient(
        self, patient_key: str, states: tuple[str, ...], facility: str | None = None
    ) -> list[EncounterRecord]: ...
    def save(self, rec: EncounterRecord) -> int: ...
    def add_event(self, row: dict[str, Any], message_key: Any) -> int: ...
    def events(self, encounter_id: int) -> list[EventRecord]: ...
    def last_event(
        self, encounter_id: int, transitions: tuple[str, ...], message_id: int | None = None
    ) -> EventRecord | None: ...
    def stale_ed(self, cutoff: datetime) -> list[EncounterRecord]: ...
    def close_if(self, encounter_id: int, state: str, new_state: str, now: datetime) -> bool: ...


#: What an encounter row says about the visit as the sender wrote it (clipped to fit).
_DESCRIPTIVE = ("patient_class", "location", "disposition", "discharged_to")


def _row_values(rec: EncounterRecord) -> dict[str, Any]:
    return clipped(encounters, _values(rec), _DESCRIPTIVE)


def _values(rec: EncounterRecord) -> dict[str, Any]:
    return {
        "patient_key": rec.patient_key,
        "visit_key": rec.visit_key,
        "facility": rec.facility,
        "state": rec.state,
        "patient_class": rec.patient_class,
        "location": rec.location,
        "opened_at": _stored(rec.opened_at),
        "admitted_at": _stored(rec.admitted_at),
        "discharged_at": _stored(rec.discharged_at),
        "disposition": rec.disposition,
        "discharged_to": rec.discharged_to,
        "snapshot": json.dumps(rec.snapshot, ensure_ascii=False) if rec.snapshot else None,
        "last_message_id": rec.last_message_id,
        "created_at": _stored(rec.created_at),
        "updated_at": _stored(rec.updated_at),
    }


def _to_record(row: Any) -> EncounterRecord:
    values = dict(row._mapping)
    values["snapshot"] = json.loads(values["snapshot"]) if values["snapshot"] else {}
    values["created_at"] = _aware(values["created_at"])
    values["updated_at"] = _aware(values["updated_at"])
    return EncounterRecord(**values)


def _to_event(row: Any) -> EventRecord:
    values = dict(row._mapping)
    values["detail"] = json.loads(values["detail"]) if values["detail"] else {}
    values["recorded_at"] = _aware(values["recorded_at"])
    return EventRecord(**values)


class _SqlBackend:
    """The tables, through one connection inside the caller's transaction."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def recorded_result(self, message_key: Any) -> dict[str, Any] | None:
        rows = self.conn.execute(
            select(encounter_events.c.detail)
            .where(encounter_events.c.message_id == message_key)
            .order_by(encounter_events.c.id)
        )
        for row in rows:
            detail = json.loads(row.detail) if row.detail else {}
            if "result" in detail:
                return detail["result"]
        return None

    def merged_into(self, key: str) -> str | None:
        return self.conn.execute(
            select(patient_merges.c.surviving_key).where(patient_merges.c.retired_key == key)
        ).scalar()

    def record_merge(self, retired: str, surviving: str, message_id: int, at: datetime) -> None:
        # The survivor is alive again if it had been retired (a merge that reverses an earlier one).
        self.conn.execute(patient_merges.delete().where(patient_merges.c.retired_key == surviving))
        values = {"surviving_key": surviving, "message_id": message_id, "merged_at": _stored(at)}
        changed = self.conn.execute(
            update(patient_merges).where(patient_merges.c.retired_key == retired).values(**values)
        ).rowcount
        if not changed:
            self.conn.execute(insert(patient_merges).values(retired_key=retired, **values))
        # What follows the patient rather than one visit moves too: the follow-up clocks
        # (their overdue alerts look up the survivor's care coordinators) and referrals (each
        # with a row on its timeline).
        self.conn.execute(
            update(followups)
            .where(followups.c.patient_key == retired)
            .values(patient_key=surviving)
        )
        move_referrals_to_survivor(self.conn, retired, surviving, message_id, at)
        self._merge_preference(retired, surviving)

    def _merge_preference(self, retired: str, surviving: str) -> None:
        """The retired record's do-not-notify choice moves to the survivor; when both have
        one, an opt-out on either wins (the privacy-safe reading)."""
        prefs = patient_preferences
        old = self.conn.execute(select(prefs).where(prefs.c.patient_key == retired)).first()
        if old is None:
            return
        self.conn.execute(delete(prefs).where(prefs.c.patient_key == retired))
        kept = self.conn.execute(select(prefs).where(prefs.c.patient_key == surviving)).first()
        values = dict(old._mapping, patient_key=surviving)
        if kept is None:
            self.conn.execute(insert(prefs).values(**values))
        elif old.opted_out and not kept.opted_out:
            survivor = prefs.c.patient_key == surviving
            self.conn.execute(update(prefs).where(survivor).values(**values))

    def get(self, patient_key: str, visit_key: str) -> EncounterRecord | None:
        row = self.conn.execute(
            select(encounters).where(
                encounters.c.patient_key == patient_key, encounters.c.visit_key == visit_key
            )
        ).first()
        return _to_record(row) if row else None

    def get_by_id(self, encounter_id: int) -> EncounterRecord | None:
        row = self.conn.execute(select(encounters).where(encounters.c.id == encounter_id)).first()
        return _to_record(row) if row else None

    def of_patient(
        self, patient_key: str, states: tuple[str, ...], facility: str | None = None
    ) -> list[EncounterRecord]:
        query = select(encounters).where(
            encounters.c.patient_key == patient_key, encounters.c.state.in_(states)
        )
        if facility is not None:
            query = query.where(encounters.c.facility == facility)
        query = query.order_by(encounters.c.updated_at.desc(), encounters.c.id.desc())
        return [_to_record(r) for r in self.conn.execute(query)]

    def save(self, rec: EncounterRecord) -> int:
        values = _row_values(rec)
        if rec.id is None:
            rec.id = int(
                self.conn.execute(insert(encounters).values(**values)).inserted_primary_key[0]
            )
        else:
            self.conn.execute(update(encounters).where(encounters.c.id == rec.id).values(**values))
        return rec.id

    def add_event(self, row: dict[str, Any], message_key: Any) -> int:
        values = {
            **row,
            "occurred_at": _stored(row["occurred_at"]),
            "recorded_at": _stored(row["recorded_at"]),
            "detail": json.dumps(row["detail"], ensure_ascii=False, default=str),
        }
        result = self.conn.execute(insert(encounter_events).values(**values))
        return int(result.inserted_primary_key[0])

    def events(self, encounter_id: int) -> list[EventRecord]:
        rows = self.conn.execute(
            select(encounter_events)
            .where(encounter_events.c.encounter_id == encounter_id)
            .order_by(encounter_events.c.id)
        )
        return [_to_event(r) for r in rows]

    def last_event(
        self, encounter_id: int, transitions: tuple[str, ...], message_id: int | None = None
    ) -> EventRecord | None:
        """The visit's latest event of ``transitions`` (made by ``message_id`` when given),
        through ix_encounter_events_transition: it reads the few events of those kinds, not
        the whole timeline, which a feed without PV1-19 grows by an event per A08. (As
        ``ORDER BY id DESC LIMIT 1``, SQLite walked the index by visit backwards instead.)"""
        t = encounter_events
        latest = select(func.max(t.c.id)).where(
            t.c.encounter_id == encounter_id, t.c.transition.in_(transitions)
        )
        if message_id is not None:
            latest = latest.where(t.c.message_id == message_id)
        row = self.conn.execute(select(t).where(t.c.id == latest.scalar_subquery())).first()
        return _to_event(row) if row else None

    def stale_ed(self, cutoff: datetime) -> list[EncounterRecord]:
        rows = self.conn.execute(
            select(encounters)
            .where(encounters.c.state == "ed", encounters.c.updated_at < _stored(cutoff))
            .order_by(encounters.c.id)
        )
        return [_to_record(r) for r in rows]

    def close_if(self, encounter_id: int, state: str, new_state: str, now: datetime) -> bool:
        """Compare-and-set, so two hub processes ticking at once close a visit once."""
        result = self.conn.execute(
            update(encounters)
            .where(encounters.c.id == encounter_id, encounters.c.state == state)
            .values(state=new_state, updated_at=_stored(now))
        )
        return result.rowcount == 1


class MemoryTables:
    """The three tables as dicts, for dry runs (no store). One per enricher instance."""

    def __init__(self) -> None:
        self.encounters: dict[int, EncounterRecord] = {}
        self.events: list[tuple[Any, EventRecord]] = []  # (message key, row)
        self.merges: dict[str, str] = {}


class _MemoryBackend:
    def __init__(self, tables: MemoryTables) -> None:
        self.t = tables

    def recorded_result(self, message_key: Any) -> dict[str, Any] | None:
        for key, row in self.t.events:
            if key == message_key and "result" in row.detail:
                return copy.deepcopy(row.detail["result"])
        return None

    def merged_into(self, key: str) -> str | None:
        return self.t.merges.get(key)

    def record_merge(self, retired: str, surviving: str, message_id: int, at: datetime) -> None:
        self.t.merges.pop(surviving, None)
        self.t.merges[retired] = surviving

    def get(self, patient_key: str, visit_key: str) -> EncounterRecord | None:
        for rec in self.t.encounters.values():
            if rec.patient_key == patient_key and rec.visit_key == visit_key:
                return copy.deepcopy(rec)
        return None

    def get_by_id(self, encounter_id: int) -> EncounterRecord | None:
        rec = self.t.encounters.get(encounter_id)
        return copy.deepcopy(rec) if rec else None

    def of_patient(
        self, patient_key: str, states: tuple[str, ...], facility: str | None = None
    ) -> list[EncounterRecord]:
        found = [
            copy.deepcopy(rec)
            for rec in self.t.encounters.values()
            if rec.patient_key == patient_key
            and rec.state in states
            and (facility is None or rec.facility == facility)
        ]
        return sorted(found, key=lambda r: (r.updated_at, r.id or 0), reverse=True)

    def save(self, rec: EncounterRecord) -> int:
        if rec.id is None:
            rec.id = max(self.t.encounters, default=0) + 1
        self.t.encounters[rec.id] = copy.deepcopy(rec)
        return rec.id

    def add_event(self, row: dict[str, Any], message_key: Any) -> int:
        event_id = len(self.t.events) + 1
        self.t.events.append((message_key, EventRecord(id=event_id, **copy.deepcopy(row))))
        return event_id

    def events(self, encounter_id: int) -> list[EventRecord]:
        return [copy.deepcopy(r) for _, r in self.t.events if r.encounter_id == encounter_id]

    def last_event(
        self, encounter_id: int, transitions: tuple[str, ...], message_id: int | None = None
    ) -> EventRecord | None:
        for _, row in reversed(self.t.events):
            if (
                row.encounter_id == encounter_id
                and row.transition in transitions
                and (message_id is None or row.message_id == message_id)
            ):
                return copy.deepcopy(row)
        return None

    def stale_ed(self, cutoff: datetime) -> list[EncounterRecord]:
        return [
            copy.deepcopy(rec)
            for rec in self.t.encounters.values()
            if rec.state == "ed" and rec.updated_at < cutoff
        ]

    def close_if(self, encounter_id: int, state: str, new_state: str, now: datetime) -> bool:
        rec = self.t.encounters.get(encounter_id)
        if rec is None or rec.state != state:
            return False
        rec.state, rec.updated_at = new_state, now
        return True


# -- the state machine -------------------------------------------------------------------------


@dataclass(slots=True)
class _Step:
    """What a handler decided for one message: the transition, what goes on the visit's
    timeline (``detail``) and what later steps need beyond the visit's facts (``summary``)."""

    kind: TransitionKind
    detail: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


class EncounterTracker:
    """Applies care events to encounter state: in the store's tables when given an engine,
    else in ``memory`` (dry runs). Each message is applied in one transaction."""

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        memory: MemoryTables | None = None,
        stale_ed_hours: float = 24,
        discharge_on_update: bool = True,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.engine = engine
        self.memory = memory if memory is not None else MemoryTables()
        self.stale_ed_hours = stale_ed_hours
        self.discharge_on_update = discharge_on_update
        self.clock = clock

    @contextmanager
    def _session(self) -> Iterator[_Backend]:
        if self.engine is None:
            yield _MemoryBackend(self.memory)
            return
        with self.engine.begin() as conn:
            yield _SqlBackend(conn)

    # -- reading ------------------------------------------------------------------------------
    def encounter(self, encounter_id: int) -> EncounterRecord | None:
        with self._session() as b:
            return b.get_by_id(encounter_id)

    def find(self, patient_key: str, visit_key: str) -> EncounterRecord | None:
        with self._session() as b:
            return b.get(self._resolve(b, patient_key), visit_key)

    def events(self, encounter_id: int) -> list[EventRecord]:
        with self._session() as b:
            return b.events(encounter_id)

    def overtaken(self, encounter_id: int, message_id: int, kinds: tuple[str, ...]) -> bool:
        """Whether another transition of ``kinds`` came to the visit after the one this
        message made: what the message did no longer stands (its A03 was taken back by an A13
        or corrected, its admission cancelled). A message applied again gets its recorded
        transition back, so the steps that act on it ask this first. False when the message
        made none of ``kinds`` on the visit."""
        with self._session() as b:
            last = b.last_event(encounter_id, kinds)
            if last is None or last.message_id == message_id:
                return False
            return b.last_event(encounter_id, kinds, message_id) is not None

    def discharge_overtaken(self, encounter_id: int, message_id: int) -> bool:
        """``overtaken`` for the transitions that change what the visit's discharge is."""
        return self.overtaken(encounter_id, message_id, DISCHARGE_CHANGES)

    def resolve(self, patient_key: str) -> str:
        """The surviving key for a patient key (itself unless merged away)."""
        with self._session() as b:
            return self._resolve(b, patient_key)

    @staticmethod
    def _resolve(b: _Backend, key: str) -> str:
        return follow_merges(b.merged_into, key)

    # -- applying -----------------------------------------------------------------------------
    def apply(
        self, event: CareEvent, message_id: int, *, identity: str | None = None
    ) -> Transition:
        """Apply one message and return its transition; a message already applied returns the
        recorded transition unchanged. ``identity`` (MSH-3/4/10) tells dry-run messages apart,
        which all carry message id 0; with a store the message id alone is the key."""
        message_key: Any = message_id if self.engine is not None else (message_id, identity)
        with self._session() as b:
            recorded = b.recorded_result(message_key)
            if recorded is not None:
                return _transition_from(recorded)
            return self._apply(b, event, message_id, message_key)

    def _apply(
        self, b: _Backend, event: CareEvent, message_id: int, message_key: Any
    ) -> Transition:
        trigger = event.trigger_event
        primary = patient_key_identifier(event.patient)
        if event.message_type != "ADT" or primary is None:
            key = make_patient_key(None, None, message_id)
            return Transition("none", None, key, trigger, "", {})
        key = self._resolve(b, make_patient_key(primary.value, primary.authority, message_id))
        if event.kind == "merge":
            return self._merge(b, event, message_id, message_key, key)
        if event.kind == "demographics":
            return self._demographics(b, event, message_id, message_key, key)
        unscoped = event.patient.unscoped_key if event.patient is not None else None
        legacy = (
            self._resolve(b, make_patient_key(unscoped.value, None, message_id))
            if unscoped is not None
            else None
        )
        return self._visit(b, event, message_id, message_key, key, legacy)

    def _event_row(
        self,
        rec: EncounterRecord,
        event: CareEvent | None,
        message_id: int | None,
        kind: str,
        detail: dict[str, Any],
    ) -> dict[str, Any]:
        assert rec.id is not None
        return {
            "encounter_id": rec.id,
            "message_id": message_id,
            "trigger_event": (event.trigger_event[:8] or None) if event is not None else None,
            "transition": kind,
            "occurred_at": event.occurred_at if event is not None else None,
            "detail": detail,
            "recorded_at": self.clock(),
        }

    # -- visits -------------------------------------------------------------------------------
    def _find_visit(
        self,
        b: _Backend,
        key: str,
        event: CareEvent,
        enc: Encounter,
        now: datetime,
        legacy: str | None = None,
    ) -> tuple[EncounterRecord | None, str, dict[str, Any]]:
        """The encounter a message belongs to: by PV1-19, else by the module's fallback.
        ``legacy`` is the patient's key as sent, when the sending facility scoped it: a visit
        recorded under the unscoped keys (before identifiers were scoped) is found there and
        goes on under them."""
        trigger = event.trigger_event
        scope = identifier_scope(event)
        if enc.visit_number is not None:
            vk = visit_key(enc.visit_number, scope)
            rec = b.get(key, vk)
            if rec is not None:
                return rec, vk, {"visit_match": "visit_number"}
            unscoped = visit_key(enc.visit_number)
            if legacy is not None or unscoped != vk:
                rec = b.get(legacy or key, unscoped)
                if rec is not None:
                    return rec, unscoped, {"visit_match": "visit_number"}
            prior = next((m.prior_visit_number for m in event.merges if m.prior_visit_number), None)
            if trigger == "A06" and prior is not None:
                # MRG-5 without an authority is taken to share the new number's authority.
                if prior.authority is None:
                    prior = prior.model_copy(update={"authority": enc.visit_number.authority})
                old = b.get(key, visit_key(prior, scope))
                if old is not None:  # ED visit renumbered for the inpatient stay
                    old.visit_key = vk
                    return (
                        old,
                        vk,
                        {"visit_match": "prior_visit", "renumbered_from": visit_key(prior, scope)},
                    )
            return None, vk, {"visit_match": "visit_number"}
        if event.kind == "other":
            return None, "", {"visit_match": "none"}  # an A05 or A07 must not guess its visit
        # No PV1-19: the open visit at this facility (PV1-3.4; when the message has none, at
        # any facility, since MSH-4 may name an interface engine), else a stand-in key.
        states = ("discharged",) if trigger == "A13" else OPEN_STATES
        facility = enc.location.facility if enc.location is not None else None
        candidates = b.of_patient(key, states, facility)
        if not candidates and legacy is not None:
            # The unscoped key may name another hospital's patient too: only a visit at the
            # facility this message names (PV1-3.4, else MSH-4) is this patient's.
            candidates = b.of_patient(legacy, states, facility or enc.facility)
        if candidates:
            rec = candidates[0]
            return rec, rec.visit_key, {"visit_match": "open_encounter"}
        moment = enc.admit_time or event.occurred_at or now
        base = f"noVN:{enc.facility or ''}:{moment:%Y%m%d}"
        vk, rec, n = base, b.get(key, base), 1
        while rec is not None and trigger in _OPENERS and rec.state not in OPEN_STATES:
            n += 1  # that visit is over: a new registration the same day is a new visit
            vk = f"{base}#{n}"
            rec = b.get(key, vk)
        return rec, vk, {"visit_match": "fallback"}

    def _visit(
        self,
        b: _Backend,
        event: CareEvent,
        message_id: int,
        message_key: Any,
        key: str,
        legacy: str | None = None,
    ) -> Transition:
        enc = event.encounter or Encounter()
        now = self.clock()
        trigger = event.trigger_event
        rec, vk, detail = self._find_visit(b, key, event, enc, now, legacy)
        if rec is None and event.kind == "other":  # A05, A07 ...: only merged into a known visit
            summary = _patient_summary(event.model_dump(mode="json", exclude_none=True))
            return Transition("none", None, key, trigger, "", summary)
        is_new = rec is None
        if rec is None:
            # When the visit began is PV1-44; a discharge heard of first says nothing of it.
            first_heard = None if event.kind == "discharge" else event.occurred_at or now
            rec = EncounterRecord(
                id=None,
                patient_key=key,
                visit_key=vk,
                state="",
                created_at=now,
                updated_at=now,
                opened_at=enc.admit_time or first_heard,
            )
        else:
            key = rec.patient_key  # a visit recorded under the unscoped key goes on under it
        before = None if is_new else rec.core()
        # What the visit was, for telling an update that changed it (read only for those).
        facts = _facts(rec) if not is_new and event.kind in _UPDATES else None
        previous_state = None if is_new else rec.state
        disposition_before = rec.disposition
        reported_here = _pid_death(rec.snapshot.get("patient"))
        late = _older_than_held(rec, event)
        self._merge_fields(rec, event, enc, message_id, now, late=late)
        handler = {
            "ed_registration": self._on_registration,
            "registration": self._on_registration,
            "admission": self._on_admission,
            "transfer": self._on_transfer,
            "discharge": self._on_discharge,
            "update": self._on_update,
            "cancel_admission": self._on_cancel_admission,
            "cancel_transfer": self._on_cancel_transfer,
            "cancel_discharge": self._on_cancel_discharge,
        }.get(event.kind, self._on_other)
        step = handler(b, rec, before, event, enc, now, late)
        if rec.state != "discharged":  # only an A03 puts discharge facts into the state
            encounter = rec.snapshot.get("encounter")
            if isinstance(encounter, dict):
                for name in _DISCHARGE_KEYS:
                    encounter.pop(name, None)
        if step.kind == "none" and facts is not None and event.kind in _UPDATES:
            step = self._updated(step, facts, rec)
        b.save(rec)
        if step.kind == "admission":
            step.summary["readmission_of"] = self._readmission_of(b, rec, event, now)
        elif self._admitted_untold(b, rec, event):
            found = self._readmission_of(b, rec, event, now, admitted=_admitted_at(rec))
            if found:
                step.summary["readmission_of"] = found
                step.detail["readmission_of"] = found
        self._death_news(
            b,
            rec,
            event,
            step,
            disposition_before,
            message_id,
            message_key,
            reported_here=reported_here,
        )
        summary = {**_summary(rec, event, previous_state), **step.summary}
        transition = Transition(step.kind, rec.id, key, trigger, rec.state, summary)
        if late:
            step.detail.setdefault("note", "older than the facts held: only fills their gaps")
        detail = {"result": transition.as_output(), "before": before, **detail, **step.detail}
        b.add_event(self._event_row(rec, event, message_id, step.kind, detail), message_key)
        if step.kind == "admission" and is_new and trigger in ("A01", "A06"):
            self._close_superseded_ed(b, rec, event, message_id, message_key, now)
        return transition

    @staticmethod
    def _updated(step: _Step, facts: dict[str, Any], rec: EncounterRecord) -> _Step:
        """An A08 (or an A02 that is no transfer) that changed no state: ``updated`` when it
        changed facts someone acts on (a corrected name, a new attending, another unit),
        naming them in ``changed``; else ``none``, an echo of what is known."""
        changed = _changed_facts(facts, _facts(rec))
        if not changed:
            return step
        note = "changed: " + ", ".join(changed)
        if step.detail.get("note"):
            note = f"{step.detail['note']}; {note}"
        detail = {**step.detail, "note": note, "changed": changed}
        return _Step("updated", detail, {**step.summary, "changed": changed})

    @staticmethod
    def _readmission_of(
        b: _Backend,
        rec: EncounterRecord,
        event: CareEvent,
        now: datetime,
        *,
        admitted: datetime | None = None,
    ) -> list[int]:
        """The patient's other visits discharged in the ``READMISSION_WINDOW`` before this
        admission (``admitted``, else the visit's): it is a readmission after them, which
        ends their TCM follow-up episode."""
        admitted = _aware(admitted or rec.admitted_at or event.occurred_at or now)
        found = []
        for other in b.of_patient(rec.patient_key, ("discharged",)):
            if other.id == rec.id or other.discharged_at is None:
                continue
            since = admitted - _aware(other.discharged_at)
            if timedelta(0) <= since <= READMISSION_WINDOW:
                found.append(other.id or 0)
        return sorted(found)

    def _admitted_untold(self, b: _Backend, rec: EncounterRecord, event: CareEvent) -> bool:
        """Whether the visit is an inpatient stay whose admission no message told (its A01
        came after its A03, or never came): the message that shows it must still ask whether
        it is a readmission, or the earlier discharge's follow-ups would run on. Cancels do
        not ask: they take something back."""
        if event.kind in ("cancel_admission", "cancel_transfer", "cancel_discharge"):
            return False
        admitted = _admitted_at(rec)
        if rec.state not in ("admitted", "discharged") or admitted is None:
            return False
        if (rec.patient_class or "").upper() != "I":
            return False
        if event.occurred_at is not None and _later(admitted, event.occurred_at):
            return False  # a pre-admission update: the stay is planned, not begun
        return not self._told(b, rec, "admission", undone_by="cancel_admission")

    def _death_news(
        self,
        b: _Backend,
        rec: EncounterRecord | None,
        event: CareEvent,
        step: _Step,
        disposition_before: str | None,
        message_id: int,
        message_key: Any,
        *,
        patient_key: str | None = None,
        reported_here: bool = False,
    ) -> None:
        """Put a death the message reports, or takes back, in the summary (see the module
        doc), and on the timeline of the patient's other discharged visits, whose follow-ups
        it closes or reopens. A death is patient news: the visit it comes on is often not the
        one whose follow-ups are open (an ED visit days after a discharge home). ``rec`` is
        the message's visit (None for an A28/A31), ``reported_here`` whether its snapshot
        held a PID-29/PID-30 death before the message."""
        key = rec.patient_key if rec is not None else patient_key or ""
        own = rec.id if rec is not None else None
        visits = [v for v in b.of_patient(key, STATES) if v.id != own]
        source, died_at = _death_reported(rec, event)
        reported_before = reported_here or any(
            _pid_death(v.snapshot.get("patient")) for v in visits
        )
        if source is not None:
            everyone = [*visits, *([rec] if rec is not None else [])]
            step.summary["death"] = {
                "source": source,
                "died_at": _iso(died_at),
                "encounter_ids": sorted(v.id or 0 for v in everyone),
            }
            step.detail.setdefault("note", f"the patient's death was reported ({source})")
            if source != "PV1-36":
                # Kept on every visit, so a later PID-30 N on any of them can take it back.
                for v in visits:
                    if not _pid_death(v.snapshot.get("patient")):
                        patient = v.snapshot.setdefault("patient", {})
                        patient["deceased"] = True
                        if died_at is not None:
                            patient["death_time"] = _iso(died_at)
                        b.save(v)
            news = step.kind in ("discharge", "discharge_corrected") or (
                source != "PV1-36" and not reported_before
            )
            if news:
                where = f" on visit {rec.visit_key}" if rec is not None else ""
                note = f"the patient's death was reported ({source}){where}"
                self._note_others(b, visits, event, message_id, message_key, note)
            return
        dead_before = normalize_disposition(disposition_before) in DIED
        undone: str | None = None
        if step.kind == "cancel_discharge" and dead_before:
            undone = "A13"
        elif step.kind == "discharge_corrected" and dead_before:
            undone = "PV1-36"
        elif event.patient is not None and event.patient.deceased is False and reported_before:
            undone = "PID-30"
            for v in [*visits, *([rec] if rec is not None else [])]:
                patient = v.snapshot.get("patient")
                if isinstance(patient, dict) and (
                    patient.get("deceased") or patient.get("death_time")
                ):
                    patient.pop("death_time", None)
                    patient["deceased"] = False
                    b.save(v)
        if undone is None:
            return
        # Visits whose own discharge says the patient died keep their follow-ups closed; so
        # does the visit whose own discharge was cancelled or corrected (its clocks follow
        # its own discharge, see carehub.care.followup).
        candidates = visits if undone != "PID-30" or rec is None else [*visits, rec]
        reopen = [v.id or 0 for v in candidates if normalize_disposition(v.disposition) not in DIED]
        step.summary["death_retracted"] = {"source": undone, "encounter_ids": sorted(reopen)}
        step.detail.setdefault("note", f"the patient's reported death was taken back ({undone})")
        where = f" on visit {rec.visit_key}" if rec is not None else ""
        note = f"the patient's reported death was taken back ({undone}){where}"
        self._note_others(b, visits, event, message_id, message_key, note)

    def _note_others(
        self,
        b: _Backend,
        visits: list[EncounterRecord],
        event: CareEvent | None,
        message_id: int,
        message_key: Any,
        note: str,
    ) -> None:
        """Say on the timeline of each discharged visit (those that can hold follow-ups)
        what another visit's message told of the patient."""
        for other in visits:
            if other.state == "discharged":
                row = self._event_row(other, event, message_id, "none", {"note": note})
                b.add_event(row, message_key)

    @staticmethod
    def _merge_fields(
        rec: EncounterRecord,
        event: CareEvent,
        enc: Encounter,
        message_id: int,
        now: datetime,
        *,
        late: bool = False,
    ) -> None:
        """Fold the message's facts into the visit ("merge quietly"); handlers then decide the
        state, and cancels put back what they undo. A ``late`` message (older than the facts
        held) only fills what the visit does not know yet."""
        message = event.model_dump(mode="json", exclude_none=True)
        # The identifiers an A40 retired into the patient (see _rekey), not a message's MRG-1.
        retired = rec.snapshot.get("merged_identifiers") or []
        if enc.admit_time is not None and not (rec.snapshot.get("encounter") or {}).get(
            "admit_time"
        ):
            # The first PV1-44 heard is when the visit began; until then opened_at was only
            # the time of the first message about it (a pre-admission update, say).
            rec.opened_at = enc.admit_time
        location = _location_text(enc.location) if enc.location is not None else None
        # PV1-3.4 names the treating facility; MSH-4 (the translator's fallback) only fills a gap.
        facility = enc.location.facility if enc.location is not None else None
        if late:
            rec.patient_class = rec.patient_class or enc.patient_class
            rec.location = rec.location or location
            rec.facility = rec.facility or facility or enc.facility
            rec.snapshot = _merge_snapshot(message, rec.snapshot)
        else:
            rec.patient_class = enc.patient_class or rec.patient_class
            rec.location = location or rec.location
            rec.facility = facility or rec.facility or enc.facility
            rec.snapshot = _merge_snapshot(rec.snapshot, message)
            _clear(rec.snapshot, event.cleared)
        if retired:
            rec.snapshot["merged_identifiers"] = retired
        else:
            rec.snapshot.pop("merged_identifiers", None)
        rec.last_message_id = message_id
        rec.updated_at = now

    @staticmethod
    def _restore(rec: EncounterRecord, before: dict[str, Any]) -> None:
        rec.patient_class = before.get("patient_class")
        rec.facility = before.get("facility")
        rec.location = before.get("location")
        encounter = rec.snapshot.setdefault("encounter", {})
        if before.get("location_detail"):
            encounter["location"] = before["location_detail"]
        else:
            encounter.pop("location", None)
        if before.get("patient_class"):
            encounter["patient_class"] = before["patient_class"]
        else:
            encounter.pop("patient_class", None)

    @staticmethod
    def _last(events: list[EventRecord], test: Callable[[EventRecord], bool]) -> EventRecord | None:
        return next((e for e in reversed(events) if test(e)), None)

    def _cancelled_before(self, b: _Backend, rec: EncounterRecord, event: CareEvent) -> bool:
        """Whether an admission or registration reaching a cancelled visit is one the cancel
        already took back, arriving out of order (see the module doc). Without both times
        nothing can be told, and the message reopens the visit as before."""
        if rec.state != "cancelled":
            return False
        cancel = self._last(b.events(rec.id or 0), _cancelled_the_visit)
        if cancel is None or cancel.occurred_at is None or event.occurred_at is None:
            return False
        if cancel.detail.get("before") is None:  # the cancel came first, awaiting its admission
            return not _later(event.occurred_at, cancel.occurred_at)
        return _later(cancel.occurred_at, event.occurred_at)

    def _discharge_cancelled_before(
        self, b: _Backend, rec: EncounterRecord, moment: datetime | None
    ) -> bool:
        """Whether a discharge (happening at ``moment``) reaching a visit that is not discharged
        is one an A13 already took back, arriving out of order: the rule ``_cancelled_before``
        applies to admissions. An A13 that came before any discharge awaits its discharge, so
        one up to the A13's time is it; after an A13 that reopened the visit, a discharge from
        before the A13 is the one it cancelled (an equal time is a new discharge)."""
        cancel = self._last(
            b.events(rec.id or 0),
            lambda e: e.transition == "cancel_discharge" or bool(e.detail.get(_AWAITS_DISCHARGE)),
        )
        if cancel is None or cancel.occurred_at is None or moment is None:
            return False
        if cancel.detail.get(_AWAITS_DISCHARGE):
            return not _later(moment, cancel.occurred_at)
        return _later(cancel.occurred_at, moment)

    def _told(
        self, b: _Backend, rec: EncounterRecord, kind: str, undone_by: str | None = None
    ) -> bool:
        """Whether a ``kind`` transition of the visit was made (and not taken back since by
        ``undone_by``). A visit first heard of in an update or a transfer is already in its
        state (ed, admitted) with nobody told; its first A04 or A01 is the news. Asked of
        every A04 or A01 the visit takes, so it reads the latest of those transitions alone."""
        kinds = (kind,) if undone_by is None else (kind, undone_by)
        last = b.last_event(rec.id or 0, kinds)
        return last is not None and last.transition == kind

    # Each handler gets the record with the message already merged in, ``before`` (None for a
    # visit first seen now) to compare with or restore, and whether the message is ``late``
    # (older than the facts the visit held, see ``_older_than_held``).

    def _on_registration(
        self, b: _Backend, rec: EncounterRecord, before: Any, event: CareEvent, *_: Any
    ) -> _Step:
        """A04. Class E is an ED arrival (a CoP notification); anything else a registration. An
        A04 never moves an admitted or finished visit backwards, and reopens a cancelled one
        only when dated after the cancel (``_cancelled_before``). The first A04 of a visit an
        update already put in the ED is its ED arrival."""
        if self._cancelled_before(b, rec, event):
            return _Step("none", {"note": "registration taken back by an earlier cancel"})
        ed = rec.patient_class == "E"
        if before is None or rec.state == "cancelled" or (rec.state == "registered" and ed):
            rec.state = "ed" if ed else "registered"
            return _Step("ed_arrival" if ed else "registration")
        if ed and rec.state == "ed" and not self._told(b, rec, "ed_arrival"):
            return _Step("ed_arrival", {"note": "the first arrival message of a known visit"})
        return _Step("none")

    def _on_admission(
        self,
        b: _Backend,
        rec: EncounterRecord,
        before: Any,
        event: CareEvent,
        enc: Encounter,
        now: datetime,
        *_: Any,
    ) -> _Step:
        """A01/A06: admitted. A second admit for the same visit is an echo; an admit after the
        discharge is not a readmission (only an A13 reopens a visit). A visit an update or a
        transfer already made inpatient was never told as admitted: this is its admission. A
        cancelled visit is admitted again only by an admission dated after the cancel
        (``_cancelled_before``): one from before is the admission the cancel took back."""
        if before is not None and rec.state == "discharged":
            return _Step("none")
        if (
            before is not None
            and rec.state == "admitted"
            and self._told(b, rec, "admission", undone_by="cancel_admission")
        ):
            return _Step("none")
        if self._cancelled_before(b, rec, event):
            return _Step("none", {"note": "admission taken back by an earlier cancel"})
        untold = before is not None and rec.state == "admitted"
        rec.state = "admitted"
        # An A06's PV1-44 is often the ED arrival; the message time is when the admit happened.
        first = enc.admit_time if event.trigger_event == "A01" else event.occurred_at
        rec.admitted_at = first or enc.admit_time or event.occurred_at or now
        return _Step(
            "admission", {"note": "the first admission message of a known visit"} if untold else {}
        )

    def _on_transfer(
        self,
        b: _Backend,
        rec: EncounterRecord,
        before: Any,
        event: CareEvent,
        enc: Encounter,
        now: datetime,
        late: bool = False,
    ) -> _Step:
        """A02: a transfer only when the level of care (patient class) or the facility changes;
        unit/room/bed moves just update the location (CMS and Da Vinci: no notice for bed
        moves; ``_visit`` makes a move to another unit ``updated``). An ED patient moved to an
        inpatient class is an admission, as by an A08. A late A02 reports a move the visit's
        newer facts already cover."""
        new_facility = enc.location.facility if enc.location is not None else None
        if before is None:
            rec.state = _state_for_class(rec.patient_class)
            prior = enc.prior_location.facility if enc.prior_location is not None else None
            moved = bool(prior and new_facility and prior != new_facility)
            return _Step("transfer" if moved else "none", {"note": "transfer of an unknown visit"})
        if before["state"] not in OPEN_STATES:
            return _Step("none", {"note": f"transfer ignored: visit is {before['state']}"})
        if late:
            return _Step("none")
        changed = []
        if (
            enc.patient_class
            and before["patient_class"]
            and enc.patient_class != before["patient_class"]
        ):
            changed.append("patient_class")
        if new_facility and before["facility"] and new_facility != before["facility"]:
            changed.append("facility")
        if _ed_turned_inpatient(before, enc, rec):
            rec.state = "admitted"
            rec.admitted_at = event.occurred_at or enc.admit_time or now
            note = "A02 changed the patient class from E to I"
            return _Step("admission", {"note": note, "changed": changed})
        if rec.patient_class == "I" and rec.state in ("ed", "registered"):
            rec.state = "admitted"
            rec.admitted_at = rec.admitted_at or event.occurred_at or now
        return _Step("transfer" if changed else "none", {"changed": changed})

    def _on_discharge(
        self,
        b: _Backend,
        rec: EncounterRecord,
        before: Any,
        event: CareEvent,
        enc: Encounter,
        now: datetime,
        late: bool = False,
    ) -> _Step:
        """A03: discharged, with the time (PV1-45, else the message time), the disposition
        (PV1-36, which drives post-acute routing) and where to (PV1-37). A second A03 for a
        discharged visit may correct those facts (``_correct_discharge``); one that an A13
        already took back changes nothing (``_discharge_cancelled_before``)."""
        if before is not None and rec.state == "discharged":
            if late:
                return _Step("none", {"note": "already discharged"})
            return self._correct_discharge(rec, enc, event) or _Step(
                "none", {"note": "already discharged"}
            )
        if self._discharge_cancelled_before(b, rec, event.occurred_at):
            return _Step("none", {"note": "discharge taken back by an earlier cancel"})
        rec.discharged_at = enc.discharge_time or rec.discharged_at or event.occurred_at or now
        if rec.discharged_at is event.occurred_at and event.occurred_at is not None:
            # The visit ended when the A03 says it happened, kept as the sender wrote it (the
            # store's copy of the time has lost its offset).
            encounter = rec.snapshot.setdefault("encounter", {})
            encounter["discharge_time"] = event.occurred_at.isoformat()
        self._discharge_facts(rec, event, enc)
        rec.state = "discharged"
        return _Step(
            "discharge", {} if before is not None else {"note": "discharge of an unknown visit"}
        )

    @staticmethod
    def _discharge_facts(rec: EncounterRecord, event: CareEvent, enc: Encounter) -> None:
        """A discharge's disposition (PV1-36) and destination (PV1-37), each kept from before
        when the message leaves it out; a destination sent as ``""`` is deleted."""
        rec.disposition = enc.discharge_disposition or rec.disposition
        if "encounter.discharged_to" in (event.cleared or ()):
            rec.discharged_to = None
        else:
            rec.discharged_to = enc.discharged_to or enc.discharged_to_name or rec.discharged_to

    @staticmethod
    def _correct_discharge(
        rec: EncounterRecord, enc: Encounter, event: CareEvent | None = None
    ) -> _Step | None:
        """A later message about a discharged visit that says when (PV1-45) or where (PV1-36,
        PV1-37) the patient went differently: a ``discharge_corrected`` carrying what it
        replaces (``previous_discharge``), so follow-up clocks and notices can be set right.
        A new disposition brings its own destination, so one the message leaves out is
        cleared (a patient now sent home is no longer going to the nursing facility); with
        the same disposition, a missing PV1-37 keeps the one known. A discharge time is
        compared as a moment (a time without an offset read as UTC, as the store keeps it), so
        one restated in another offset, or less than a minute apart (seconds dropped or
        added), tells nobody anything new. None when nothing changes."""
        left_at = rec.discharged_at
        rec.discharged_at = enc.discharge_time or left_at
        moved = (
            enc.discharge_time is not None
            and left_at is not None
            and abs(_aware(enc.discharge_time) - _aware(left_at)) >= _SAME_DISCHARGE_TIME
        )
        disposition = enc.discharge_disposition or rec.disposition
        destination = enc.discharged_to or enc.discharged_to_name
        new_disposition = normalize_disposition(disposition) != normalize_disposition(
            rec.disposition
        )
        deleted = event is not None and "encounter.discharged_to" in (event.cleared or ())
        if not new_disposition and not deleted:
            destination = destination or rec.discharged_to
        elsewhere = new_disposition or destination != rec.discharged_to
        if not elsewhere and not moved:
            return None
        previous = {
            "disposition": rec.disposition,
            "discharged_to": rec.discharged_to,
            "discharged_at": _utc_iso(left_at),
        }
        rec.disposition, rec.discharged_to = disposition, destination
        if new_disposition:
            encounter = rec.snapshot.setdefault("encounter", {})
            for name in ("discharged_to", "discharged_to_name"):
                value = getattr(enc, name)
                if value is None:
                    encounter.pop(name, None)
                else:
                    encounter[name] = value
        notes = []
        if elsewhere:
            was = _where_to(previous["disposition"], previous["discharged_to"])
            notes.append(f"discharge corrected: {was}, now {_where_to(disposition, destination)}")
        if moved:
            was, became = _utc_minute(left_at), _utc_minute(rec.discharged_at)
            notes.append(f"discharge time corrected: {was} UTC, now {became} UTC")
        detail = {"note": "; ".join(notes)}
        return _Step("discharge_corrected", detail, {"previous_discharge": previous})

    def _on_update(
        self,
        b: _Backend,
        rec: EncounterRecord,
        before: Any,
        event: CareEvent,
        enc: Encounter,
        now: datetime,
        late: bool = False,
    ) -> _Step:
        """A08: merged quietly, except for three things. A class change E -> I, which some
        sites send instead of an A06. A discharge time that has come (see the module doc):
        some sites discharge by A08 and never send an A03 (a discharge time after the
        message's own time is a plan, not a discharge). And a discharged visit's corrected
        disposition, destination or discharge time. A late A08 can still bring the discharge
        (its PV1-45 says when), but not a class or discharge facts older than those the visit
        holds. Otherwise ``none``, which ``_visit`` makes ``updated`` when the A08 changed a
        fact someone acts on (a new name, attending, unit)."""
        if before is None:
            rec.state = _state_for_class(rec.patient_class)
            return _Step("none", {"note": "update of an unknown visit"})
        if not late and _ed_turned_inpatient(before, enc, rec):
            rec.state = "admitted"
            rec.admitted_at = event.occurred_at or enc.admit_time or now
            return _Step("admission", {"note": "A08 changed the patient class from E to I"})
        if rec.state == "discharged":
            if late:
                return _Step("none")
            return self._correct_discharge(rec, enc, event) or _Step("none")
        if enc.discharge_time is not None:
            sent = event.occurred_at or now
            if not self.discharge_on_update or _later(enc.discharge_time, sent):
                return _Step("none", {"ignored_discharge_time": enc.discharge_time.isoformat()})
            if self._discharge_cancelled_before(b, rec, enc.discharge_time):
                return _Step("none", {"note": "discharge taken back by an earlier cancel"})
            rec.discharged_at = enc.discharge_time
            self._discharge_facts(rec, event, enc)
            rec.state = "discharged"
            return _Step("discharge", {"note": "A08 brought a discharge time (PV1-45)"})
        return _Step("none")

    def _on_cancel_admission(
        self, b: _Backend, rec: EncounterRecord, before: Any, event: CareEvent, *_: Any
    ) -> _Step:
        """A11: undo the admission. A visit admitted from the ED goes back to the ED (with its
        ED class and location); any other admitted or registered visit is cancelled. The
        visits the admission was a readmission after are named again (``readmission_of``):
        their follow-ups run on."""
        if before is None:
            rec.state = "cancelled"
            return _Step("none", {"note": "cancel of an unknown visit"})
        if rec.state == "admitted":
            admitted = b.last_event(rec.id or 0, ("admission",))
            prior = (admitted.detail.get("before") or {}) if admitted is not None else {}
            if prior.get("state") == "ed":
                self._restore(rec, prior)
                rec.state = "ed"
            else:
                rec.state = "cancelled"
            # What this admission is a readmission after, found again: an A40 may have put
            # visits together since it was told.
            found = self._readmission_of(b, rec, event, self.clock())
            rec.admitted_at = None
            told = (admitted.detail.get("result") or {}) if admitted is not None else {}
            readmission_of = sorted(
                {*((told.get("summary") or {}).get("readmission_of") or []), *found}
            )
            return _Step(
                "cancel_admission",
                {"undoes": admitted.id if admitted else None},
                {"readmission_of": readmission_of},
            )
        if rec.state in ("ed", "registered"):
            rec.state = "cancelled"
            return _Step("cancel_admission")
        return _Step("none", {"note": f"cancel ignored: visit is {rec.state}"})

    def _on_cancel_transfer(
        self,
        b: _Backend,
        rec: EncounterRecord,
        before: Any,
        event: CareEvent,
        enc: Encounter,
        now: datetime,
        *_: Any,
    ) -> _Step:
        """A12: put back the location, class and facility from before the last A02 not yet
        undone. Only undoing a real transfer is a ``cancel_transfer``; undoing a bed move is
        ``none`` (no notice went out for it), and undoing a move to another unit ``updated``
        (``_visit`` finds the unit changed back)."""
        if before is None:
            rec.state = _state_for_class(rec.patient_class)
            return _Step("none", {"note": "cancel of an unknown visit"})
        if rec.state not in OPEN_STATES:
            self._restore(rec, before)
            return _Step("none", {"note": f"cancel ignored: visit is {rec.state}"})
        history = b.events(rec.id or 0)
        undone = {e.detail.get("undoes") for e in history if e.trigger_event == "A12"}
        moved = self._last(history, lambda e: e.trigger_event == "A02" and e.id not in undone)
        if moved is None or not moved.detail.get("before"):
            # Nothing recorded to undo: the A12's PV1-3 (the original location) has been merged.
            return _Step("none", {"note": "no transfer to cancel"})
        prior = moved.detail["before"]
        self._restore(rec, prior)
        if prior.get("state") in OPEN_STATES:
            rec.state = prior["state"]
        kind: TransitionKind = "cancel_transfer" if moved.transition == "transfer" else "none"
        return _Step(kind, {"undoes": moved.id})

    def _on_cancel_discharge(
        self, b: _Backend, rec: EncounterRecord, before: Any, event: CareEvent, *_: Any
    ) -> _Step:
        """A13: reopen the visit in the state it had before the discharge (admitted, normally)
        and forget the discharge facts. An A13 that finds no discharge (the visit unknown or
        still open) awaits it: the discharge it cancels is on its way, out of order, and is
        taken back when it comes (``_discharge_cancelled_before``)."""
        awaits = {_AWAITS_DISCHARGE: True}
        if before is None:
            rec.state = _state_for_class(rec.patient_class, default="admitted")
            return _Step("none", {"note": "cancel of an unknown visit", **awaits})
        if rec.state in OPEN_STATES:
            return _Step("none", {"note": "cancel of a discharge not received yet", **awaits})
        if rec.state != "discharged":
            return _Step("none", {"note": f"cancel ignored: visit is {rec.state}"})
        discharged = b.last_event(rec.id or 0, ("discharge",))
        prior = (discharged.detail.get("before") or {}) if discharged is not None else {}
        state = prior.get("state")
        rec.state = state if state in OPEN_STATES else "admitted"
        rec.discharged_at = rec.disposition = rec.discharged_to = None
        return _Step("cancel_discharge", {"undoes": discharged.id if discharged else None})

    def _on_other(self, b: _Backend, rec: EncounterRecord, before: Any, *_: Any) -> _Step:
        """A05, A07 and the rest: merged into a known visit, nothing more."""
        return _Step("none")

    def _close_superseded_ed(
        self,
        b: _Backend,
        admitted: EncounterRecord,
        event: CareEvent,
        message_id: int,
        message_key: Any,
        now: datetime,
    ) -> None:
        """An admission under a new visit number ends the patient's open ED visit at the same
        facility; without this it would hang until the stale closure."""
        for rec in b.of_patient(admitted.patient_key, ("ed",), admitted.facility):
            if rec.id == admitted.id:
                continue
            before = rec.core()
            rec.state, rec.updated_at = "closed", now
            b.save(rec)
            note = f"ED visit ended by the admission under visit {admitted.visit_key}"
            detail = {"before": before, "note": note, "admitted_encounter": admitted.id}
            b.add_event(self._event_row(rec, event, message_id, "none", detail), message_key)

    # -- merges and demographics ---------------------------------------------------------------
    def _merge(
        self, b: _Backend, event: CareEvent, message_id: int, message_key: Any, key: str
    ) -> Transition:
        """A40 (and A30/A34/A36/A39): each MRG-1 identifier is retired into the PID before it.
        An MRG-1 without an assigning authority is taken to share the survivor's."""
        now = self.clock()
        retired: list[str] = []
        moved: list[EncounterRecord] = []
        patient = event.model_dump(mode="json", exclude_none=True).get("patient") or {}
        pairs = event.merges or []
        for merge in pairs:
            survivor = (
                merge.surviving_key or merge.surviving or patient_key_identifier(event.patient)
            )
            if survivor is None:
                continue
            surviving_key = make_patient_key(survivor.value, survivor.authority, message_id)
            for ident in merge.prior_keys or merge.prior_identifiers:
                authority = ident.authority or survivor.authority
                old = make_patient_key(ident.value, authority, message_id)
                if old == surviving_key or old in retired:
                    continue
                b.record_merge(old, surviving_key, message_id, now)
                target = self._resolve(b, surviving_key)
                retired.append(old)
                # The visits' later notifications name the retired identifier (a national
                # one only where the event keeps those), with the authority it was keyed by.
                told: list[dict[str, Any]] = []
                if ident in merge.prior_identifiers:
                    keyed = ident.model_copy(update={"authority": authority})
                    told.append(keyed.model_dump(mode="json", exclude_none=True))
                moved += self._rekey(b, old, target, patient, message_id, now, told)
        final = self._resolve(b, key)
        readmitted = self._readmissions_joined(b, final, moved)
        summary = {
            **_patient_summary({"patient": patient}),
            "patient_key": final,
            "retired_keys": retired,
            "encounter_ids": [r.id for r in moved],
            "occurred_at": _iso(event.occurred_at),
            "readmission_of": sorted(readmitted),
        }
        transition = Transition(
            "merge", moved[0].id if moved else None, final, event.trigger_event, "", summary
        )
        notes = {
            earlier_id: (
                f"readmission: visit {admission.visit_key} was admitted within "
                f"{READMISSION_WINDOW.days} days of this discharge (the merge joined them)"
            )
            for earlier_id, admission in readmitted.items()
        }
        for rec in moved:
            detail = {"result": transition.as_output(), "retired_keys": retired}
            if rec.id in notes:
                detail["note"] = notes.pop(rec.id or 0)
            b.add_event(self._event_row(rec, event, message_id, "merge", detail), message_key)
        for earlier_id, note in sorted(notes.items()):  # the survivor's own visits
            earlier = b.get_by_id(earlier_id)
            if earlier is not None:
                row = self._event_row(earlier, event, message_id, "none", {"note": note})
                b.add_event(row, message_key)
        return transition

    @staticmethod
    def _readmissions_joined(
        b: _Backend, patient_key: str, moved: list[EncounterRecord]
    ) -> dict[int, EncounterRecord]:
        """The patient's discharges followed within ``READMISSION_WINDOW`` by an admission of
        another visit, where a merge just brought one of the two over: {the discharged visit's
        id: the admission}. Each record held a part of the story, so neither's admission
        could have been found to be a readmission before."""
        moved_ids = {r.id for r in moved}
        visits = b.of_patient(patient_key, STATES)
        found: dict[int, EncounterRecord] = {}
        for admission in visits:
            admitted = _admitted_at(admission)
            if admitted is None or admission.state not in ("admitted", "discharged"):
                continue
            for other in visits:
                if other.id == admission.id or other.discharged_at is None:
                    continue
                if other.state != "discharged" or not {admission.id, other.id} & moved_ids:
                    continue
                since = _aware(admitted) - _aware(other.discharged_at)
                if timedelta(0) <= since <= READMISSION_WINDOW:
                    found.setdefault(other.id or 0, admission)
        return found

    @staticmethod
    def _rekey(
        b: _Backend,
        old: str,
        new: str,
        patient: dict[str, Any],
        message_id: int,
        now: datetime,
        retired: list[dict[str, Any]] | None = None,
    ) -> list[EncounterRecord]:
        """Move the retired key's encounters to the survivor. A visit both keys already have
        (the site sent it under each id) stays apart, renamed ``<visit>~merged<id>``, so no
        history is lost and later messages for that visit go to the survivor's record. Each
        moved visit keeps the ``retired`` identifiers (as ``merged_identifiers``), so its
        later FHIR notifications say which patient record the survivor replaces."""
        moved = []
        for rec in b.of_patient(old, STATES):
            if b.get(new, rec.visit_key) is not None:
                rec.visit_key = f"{rec.visit_key}~merged{rec.id}"
            rec.patient_key = new
            if patient:
                rec.snapshot["patient"] = {**(rec.snapshot.get("patient") or {}), **patient}
            known = list(rec.snapshot.get("merged_identifiers") or [])
            known += [i for i in retired or () if i not in known]
            if known:
                rec.snapshot["merged_identifiers"] = known
            rec.last_message_id, rec.updated_at = message_id, now
            b.save(rec)
            moved.append(rec)
        return moved

    def _demographics(
        self, b: _Backend, event: CareEvent, message_id: int, message_key: Any, key: str
    ) -> Transition:
        """A28/A31: no visit needed; the patient part of each open visit's snapshot is refreshed
        so later notices carry the new name, PCP and contact details."""
        now = self.clock()
        patient = event.model_dump(mode="json", exclude_none=True).get("patient") or {}
        summary = {
            **_patient_summary({"patient": patient}),
            "patient_key": key,
            "occurred_at": _iso(event.occurred_at),
        }
        # A death reported (or taken back) by an A31 is news for every visit's follow-ups.
        news = _Step("demographics")
        self._death_news(b, None, event, news, None, message_id, message_key, patient_key=key)
        summary.update(news.summary)
        transition = Transition("demographics", None, key, event.trigger_event, "", summary)
        deleted = [path for path in event.cleared or () if path.startswith("patient.")]
        for rec in b.of_patient(key, OPEN_STATES):
            rec.snapshot["patient"] = {**(rec.snapshot.get("patient") or {}), **patient}
            _clear(rec.snapshot, deleted)
            rec.last_message_id, rec.updated_at = message_id, now
            b.save(rec)
            detail = {"result": transition.as_output()}
            b.add_event(
                self._event_row(rec, event, message_id, "demographics", detail), message_key
            )
        return transition

    # -- periodic -----------------------------------------------------------------------------
    def close_stale(self, now: datetime) -> list[Transition]:
        """Close ED visits with no message for ``stale_ed_hours`` (hanging visits: no A03 ever
        comes). Measured on the hub's clock (``updated_at``), not on message times, which are
        usually local times without a zone."""
        cutoff = now - timedelta(hours=self.stale_ed_hours)
        closed: list[Transition] = []
        with self._session() as b:
            for rec in b.stale_ed(cutoff):
                assert rec.id is not None
                if not b.close_if(rec.id, "ed", "closed", now):
                    continue  # another process closed it, or a message just arrived
                before = rec.core()
                rec.state, rec.updated_at = "closed", now
                transition = Transition(
                    "stale_closed", rec.id, rec.patient_key, "", "closed", _summary(rec, None, "ed")
                )
                detail = {
                    "result": transition.as_output(),
                    "before": before,
                    "note": f"no message for {self.stale_ed_hours:g} h",
                }
                b.add_event(self._event_row(rec, None, None, "stale_closed", detail), None)
                closed.append(transition)
        return closed


# -- the route step ----------------------------------------------------------------------------


class EncounterStateEnricher(TrackingEnricher[EncounterTracker]):
    """Route step: apply the message to its encounter and hand the transition to later steps
    (``work.data["encounter"]``) for the care-team, notify and follow-up steps."""

    name = "encounter-state"
    description = (
        "Track each visit's state from ADT (PV1-19 stitching, cancels, merges, A08 noise) and "
        "say what the message changed: ed_arrival, admission, transfer, discharge, a cancel, "
        "updated (an A08 that changed the patient's or the visit's details, naming them), "
        "or none."
    )

    class Options(ComponentOptions):
        """How long an ED visit may go without any message before it is closed as stale."""

        stale_ed_hours: float = Field(
            default=24,
            gt=0,
            description="hours an ED visit may go without a message (by the hub's clock) "
            "before it is closed as stale_closed",
        )
        discharge_on_update: bool = Field(
            default=True,
            description="an A08 that brings a discharge time (PV1-45) no later than the "
            "message to a visit not yet discharged discharges it (for sites that never send "
            "an A03); false: only an A03 discharges",
        )

    missing_event_error = EncounterStateError

    def new_memory(self) -> MemoryTables:
        return MemoryTables()

    def new_tracker(self, engine: Engine | None, memory: MemoryTables) -> EncounterTracker:
        hours = getattr(self.options, "stale_ed_hours", 24)
        by_update = getattr(self.options, "discharge_on_update", True)
        return EncounterTracker(
            engine, memory=memory, stale_ed_hours=hours, discharge_on_update=by_update
        )

    def enrich(self, work: Work) -> Any:
        event = self.care_event(work)
        tracker = self.tracker
        # Only a dry run (no store, every message id 0) needs the identity, and its digest.
        identity = work.message.identity if tracker.engine is None else None
        transition = tracker.apply(event, work.message.id, identity=identity)
        work.data["encounter"] = transition
        return transition.as_output()

    def tick(self, now: datetime) -> None:
        closed = self.tracker.close_stale(now)
        if closed:
            log.info("closed %d stale ED visit(s)", len(closed))


# -- queries for the command line ---------------------------------------------------------------


def patient_key_matches(conn: Connection, column: Any, patient: str) -> Any:
    """The condition on a patient-key ``column`` (``encounters``, ``followups``) for a patient
    as a person types it: ``authority|id`` or a bare id, following merges (a retired id shows
    the survivor's rows, through a chain of merges too)."""

    def merged_into(key: str) -> str | None:
        return conn.execute(
            select(patient_merges.c.surviving_key).where(patient_merges.c.retired_key == key)
        ).scalar()

    retired = conn.execute(
        select(patient_merges.c.retired_key).where(
            or_(
                patient_merges.c.retired_key == patient,
                patient_merges.c.retired_key.like(f"%|{patient}"),
            )
        )
    ).scalars()
    keys = {patient} | {follow_merges(merged_into, key) for key in retired}
    conditions: list[Any] = [column.in_(sorted(keys))]
    if "|" not in patient:
        conditions.append(column.like(f"%|{patient}"))
    return or_(*conditions)


def list_encounters(
    engine: Engine,
    state: str | None = None,
    patient: str | None = None,
    limit: int | None = 50,
) -> list[EncounterRecord]:
    """Encounters, most recently updated first."""
    query = select(encounters).order_by(encounters.c.updated_at.desc(), encounters.c.id.desc())
    if state:
        query = query.where(encounters.c.state == state)
    with engine.connect() as conn:
        if patient:
            query = query.where(patient_key_matches(conn, encounters.c.patient_key, patient))
        if limit:
            query = query.limit(limit)
        return [_to_record(r) for r in conn.execute(query)]


def get_encounter(engine: Engine, encounter_id: int) -> EncounterRecord | None:
    with engine.connect() as conn:
        row = conn.execute(select(encounters).where(encounters.c.id == encounter_id)).first()
    return _to_record(row) if row else None


@dataclass(slots=True)
class TimelineEntry:
    """One message's effect on the visit, and the notifications decided for it."""

    event: EventRecord
    control_id: str | None
    notifications: list[dict[str, Any]]

    def as_output(self) -> dict[str, Any]:
        event = self.event
        return {
            "id": event.id,
            "message_id": event.message_id,
            "control_id": self.control_id,
            "trigger_event": event.trigger_event,
            "transition": event.transition,
            "occurred_at": _utc_iso(event.occurred_at),
            "recorded_at": _utc_iso(event.recorded_at),
            "note": event.detail.get("note"),
            "notifications": self.notifications,
        }


@dataclass(slots=True)
class Timeline:
    encounter: EncounterRecord
    entries: list[TimelineEntry]
    #: Notifications for this visit not tied to one of its messages (digests, alerts).
    other_notifications: list[dict[str, Any]]

    def as_output(self) -> dict[str, Any]:
        return {
            "encounter": self.encounter.as_output(),
            "timeline": [e.as_output() for e in self.entries],
            "other_notifications": self.other_notifications,
        }


def _notification(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "message_id": row.message_id,
        "recipient": row.recipient,
        "role": row.role,
        "channel": row.channel,
        "kind": row.kind,
        "status": row.status,
        "reason": row.reason,
        "created_at": _utc_iso(row.created_at),
    }


def encounter_timeline(engine: Engine, encounter_id: int) -> Timeline | None:
    """The visit, each message applied to it in order, and the notifications sent for each."""
    with engine.connect() as conn:
        row = conn.execute(select(encounters).where(encounters.c.id == encounter_id)).first()
        if row is None:
            return None
        rows = conn.execute(
            select(encounter_events, messages.c.control_id)
            .select_from(
                encounter_events.outerjoin(messages, messages.c.id == encounter_events.c.message_id)
            )
            .where(encounter_events.c.encounter_id == encounter_id)
            .order_by(encounter_events.c.id)
        ).all()
        sent = conn.execute(
            select(
                notifications.c.id,
                notifications.c.message_id,
                notifications.c.recipient,
                notifications.c.role,
                notifications.c.channel,
                notifications.c.kind,
                notifications.c.status,
                notifications.c.reason,
                notifications.c.created_at,
            )
            .where(notifications.c.encounter_id == encounter_id)
            .order_by(notifications.c.id)
        ).all()
    by_message: dict[int, list[dict[str, Any]]] = {}
    for n in sent:
        by_message.setdefault(n.message_id, []).append(_notification(n))
    entries = []
    for r in rows:
        values = dict(r._mapping)
        control_id = values.pop("control_id")
        event = _to_event(_Row(values))
        sent_for = by_message.pop(event.message_id, []) if event.message_id is not None else []
        entries.append(TimelineEntry(event, control_id, sent_for))
    other = [n for items in by_message.values() for n in items]
    return Timeline(_to_record(row), entries, other)


class _Row:
    """A mapping dressed as a row, for the converters above."""

    def __init__(self, mapping: dict[str, Any]) -> None:
        self._mapping = mapping
