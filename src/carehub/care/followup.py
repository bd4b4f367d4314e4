"""Transitional-care follow-up clocks: what a discharge home obliges the care team to do, and by
when.

TCM (CPT 99495/99496) pays for post-discharge care only if the practice makes an interactive
contact within 2 business days of discharge and sees the patient face to face within 14
calendar days (99495, moderate complexity) or 7 (99496, high complexity). A missed deadline
cannot be made up later, so carehub opens one ``followups`` row per obligation when an A03
sends a patient home, raises an alert when one passes unmet, and cancels them when an A13
takes the discharge back. When the obligation goes away otherwise, the pending items are closed
with a status that says why: a corrected discharge that no longer sends the patient home
(``not_home``) or says the patient died (``died``) closes them, and one that now sends the
patient home opens them; a readmission within 30 days of the discharge (the TCM service period)
ends that TCM episode (``readmitted``: no alert about a patient in hospital, and the next
discharge home starts a new episode), unless an A11 cancels the readmission, which reopens
them. A correction that moves the discharge time (PV1-45) moves the deadlines with it:
each pending item whose due date changes is closed as ``rescheduled`` (kept, with its old due
date and any alert, so the list shows what was worked to and why it stopped) and replaced by
one due from the corrected time, overdue at once if that is already past; done and closed
items stay as they are, except those a readmission closed: they are replaced in the same way
by items still closed as ``readmitted``, so an A11 that cancels the readmission reopens
clocks due from the corrected time.

A death closes every pending item of the patient as ``died``, whichever visit the message
that tells it comes on: a discharge disposition 20 or 40-42 (an ED visit days after the
discharge home), PID-30=Y or a PID-29 time on any ADT message (an A08, an A31). It is taken
back, and the items so closed reopen (open, or overdue if alerted before), by an A13 of the
discharge that gave the death, a correction of that disposition, or a later PID-30=N after a
death PID-29/PID-30 reported (see carehub.care.encounters). A readmission no admission
message told, found when a stay's A03 or A08 comes before its A01 (or without one) or when an
A40 joins two records, closes the earlier discharge's items as ``readmitted`` as the A01
would have.

An overdue item is marked alerted only once someone was told. One the notify step finds
nobody to alert about (no care coordinator told of the discharge or on the roster, none with a
channel the route has) stays unalerted: the visit's timeline says why, once, ``followups list``
says it too, and the alert goes at the first tick that finds someone (a coordinator added to
the roster). A patient who opted out of notifications gets clocks too: the follow-up is still
the care team's duty, only telling anyone is ruled out, so such an item alerts nobody in the
same way (the patient's choice is read then, so a later opt-out counts too, and a later
message saying the patient no longer objects lets the alert go).

Due-date convention (``BusinessCalendar``):

* The day of discharge is day 0 and never counts, whatever the time of discharge.
* ``contact`` is due at the **end** (23:59:59.999999) of the nth business day after the
  discharge date. Business days are Monday to Friday minus the configured holidays. So a
  discharge on Friday at 14:00 is due by the end of Tuesday, and one on Saturday or Sunday
  counts from Monday (Monday is day 1), so also the end of Tuesday. A Monday holiday moves both
  to the end of Wednesday.
* ``visit`` is due at the end of the nth *calendar* day after the discharge date (weekends and
  holidays count; CMS states the visit deadline in calendar days).
* "Day" means the hospital's local day. With a ``timezone`` (IANA name) the discharge time is
  converted to it, and an offset-less time is taken to be in it. Without one, an HL7 time with
  an offset (``-0500``) is read in its own offset. That offset is then used for the due date
  too, so a daylight-saving change between discharge and due date moves the due time by an
  hour. An offset-less time is taken as UTC. Due times are stored in UTC, like every time in
  the store.
* Holidays are known up to the end of the last year the holidays list names. Business days
  after that are counted as if none were a holiday: the step says so in the history of the
  discharge that opened the items (``calendar_note``), and warns at start, once a day and in
  ``routes check`` while the list names no holiday in this year or the next.

Dry runs have no store: the clocks then live in a ``FollowupMemory``, with the same behaviour.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click
import yaml
from pydantic import Field, field_validator
from sqlalchemy import Engine, insert, select, update

# carehub.cli imports only config and errors at module level and loads plugin commands (this
# module included) lazily, from inside a running command, so importing it here cannot cycle.
from carehub.care.encounters import DISCHARGE_CHANGES, EncounterTracker, patient_key_matches
from carehub.care.model import DIED, DISPOSITIONS, Transition, normalize_disposition
from carehub.cli import hub_options, operator_option
from carehub.cliparams import LIMIT, ROW_ID, parse_moment
from carehub.components import ComponentContext, ComponentOptions, Enricher, Work
from carehub.config import read_config_text
from carehub.errors import CarehubError, ConfigError
from carehub.events import display_name, parse_hl7_datetime
from carehub.store.schema import encounters as encounters_table
from carehub.store.schema import followups as followups_table
from carehub.store.schema import notifications as notifications_table
from carehub.store.store import _aware

if TYPE_CHECKING:
    from carehub.config import HubConfig

#: Table 0112 codes that send the patient home: home/self-care, home health, left against
#: medical advice (home, and among the patients most at risk), home IV.
DEFAULT_HOME_DISPOSITIONS = ("01", "06", "07", "08")
#: ED treat-and-release visits are not TCM-eligible discharges (inpatient, observation, SNF and
#: partial hospitalisation are), so ED discharges open nothing by default.
DEFAULT_EXCLUDED_CLASSES = ("E",)

OPEN = "open"
DONE = "done"
OVERDUE = "overdue"  # past due and alerted: still to be done
CANCELLED = "cancelled"
PATIENT_DIED = "died"
NOT_HOME = "not_home"
READMITTED = "readmitted"
RESCHEDULED = "rescheduled"
#: Statuses that still ask for work (an overdue item can still be done, or cancelled).
PENDING = (OPEN, OVERDUE)
#: Statuses of items closed without the work because it is no longer owed, and why.
WITHDRAWN = {
    CANCELLED: "the discharge was cancelled",
    PATIENT_DIED: "the corrected discharge says the patient died",
    NOT_HOME: "the corrected discharge no longer sends the patient home",
    READMITTED: "the patient was readmitted, which ends this TCM episode",
    RESCHEDULED: "the discharge time was corrected: this clock runs again from the corrected time",
}
#: Of those, the ones whose discharge home was taken back or corrected away: a discharge home
#: of the visit after them (a new A03, a correction back to home) opens fresh items.
DISCHARGE_UNDONE = (CANCELLED, PATIENT_DIED, NOT_HOME)
#: Statuses that leave a visit without clocks of its own: those above, and a rescheduled item,
#: whose replacement is the clock now.
_NOT_LIVE = (*DISCHARGE_UNDONE, RESCHEDULED)

#: Statuses of the items a corrected discharge time moves: those still to be worked, and those
#: a readmission closed, which an A11 may reopen.
_MOVABLE = (*PENDING, READMITTED)

#: Why a reprocessed message opens, closes or reopens nothing.
OVERTAKEN = "a later change to this discharge or admission came to the visit since this message"

log = logging.getLogger(__name__)

FollowupKind = Literal["contact", "visit"]
#: Transitions that say the patient was discharged, and where to.
_DISCHARGES = ("discharge", "discharge_corrected")
#: Transitions that make or take back a readmission.
_ADMISSION_CHANGES = ("admission", "cancel_admission")


class FollowupError(CarehubError):
    """A follow-up cannot be changed as asked (unknown id, already cancelled)."""


class MissingTransitionError(RuntimeError):
    """The follow-up step ran without the encounter-state step's Transition before it."""


# -- calendar --------------------------------------------------------------------------------
class BusinessCalendar:
    """Counts business and calendar days in the hospital's local time (see the module doc)."""

    def __init__(
        self,
        holidays: Iterable[date] = (),
        weekend: Sequence[int] = (5, 6),
        *,
        zone: tzinfo | None = None,
    ) -> None:
        """``weekend`` uses ``date.weekday()`` numbers (Monday 0 … Sunday 6). ``zone`` is the
        hospital's time zone. Without one, the discharge time's own offset is used."""
        self.holidays = frozenset(holidays)
        self.weekend = frozenset(weekend)
        if not self.weekend <= set(range(7)):
            raise ValueError(f"weekend days are 0 (Monday) to 6 (Sunday), not {sorted(weekend)}")
        if len(self.weekend) == 7:
            raise ValueError("a week needs at least one business day")
        self.zone = zone

    def is_business_day(self, day: date) -> bool:
        return day.weekday() not in self.weekend and day not in self.holidays

    @property
    def ends(self) -> date | None:
        """The last day the holidays cover: the end of the last year that has one (None
        without holidays). Business days after it are counted as if no day were a holiday."""
        return date(max(d.year for d in self.holidays), 12, 31) if self.holidays else None

    def missing_years(self, today: date) -> list[int]:
        """Of this year and the next, those with no holiday listed: a sign the holidays list
        was not carried forward, so deadlines then count holidays as business days. [] when
        no holidays are configured at all (a site that keeps none)."""
        if not self.holidays:
            return []
        years = {d.year for d in self.holidays}
        return [year for year in (today.year, today.year + 1) if year not in years]

    def local(self, moment: datetime) -> datetime:
        """``moment`` on the hospital's wall clock: in ``zone`` if set, otherwise as given."""
        if self.zone is None:
            return moment
        return moment.astimezone(self.zone) if moment.tzinfo else moment.replace(tzinfo=self.zone)

    def add_business_days(self, start: datetime, n: int) -> datetime:
        """The end of the nth business day after ``start``'s local date (that date is day 0).

        With n = 0 the result is the end of the start date, or of the next business day if the
        start date is not one."""
        if n < 0:
            raise ValueError(f"business days must be 0 or more, not {n}")
        local = self.local(start)
        day = local.date()
        counted = 0
        while counted < n:
            day += timedelta(days=1)
            if self.is_business_day(day):
                counted += 1
        while not self.is_business_day(day):  # only when n == 0
            day += timedelta(days=1)
        return _end_of(day, local.tzinfo)

    def add_days(self, start: datetime, n: int) -> datetime:
        """The end of the nth calendar day after ``start``'s local date (that date is day 0)."""
        if n < 0:
            raise ValueError(f"days must be 0 or more, not {n}")
        local = self.local(start)
        return _end_of(local.date() + timedelta(days=n), local.tzinfo)


def _end_of(day: date, zone: tzinfo | None) -> datetime:
    # The last microsecond of the day, not the next midnight, so listings show the due day.
    return datetime.combine(day, time.max, tzinfo=zone)


def load_holidays(dates: Iterable[date | str] = (), file: Path | None = None) -> set[date]:
    """Holidays from ISO dates and/or a YAML file.

    The file may hold a list of dates (``- 2026-11-26``), a list of ``{date: ..., name: ...}``
    entries, a mapping of date to name, or any of those under a top-level ``holidays`` key.
    """
    found = {_as_date(value, "holidays") for value in dates}
    if file is None:
        return found
    try:
        data = yaml.safe_load(read_config_text(file, "the holidays file"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: not valid YAML: {err}") from err
    if isinstance(data, dict) and "holidays" in data:
        data = data["holidays"]
    if data is None:
        return found
    entries: Iterable[Any]
    if isinstance(data, dict):
        entries = data.keys()
    elif isinstance(data, list):
        entries = [e.get("date") if isinstance(e, dict) else e for e in data]
    else:
        raise ConfigError(f"{file}: expected a list of dates or a mapping of date to name")
    found.update(_as_date(value, str(file)) for value in entries)
    return found


def _as_date(value: Any, where: str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an ISO date (YYYY-MM-DD)") from None


# -- what a discharge says -------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class DischargeFacts:
    """What the clocks need from a discharge: where the patient went, when and from what."""

    disposition: str | None
    discharged_at: datetime | None
    patient_class: str | None


def discharge_facts(transition: Transition, work: Work | None = None) -> DischargeFacts:
    """Read the facts from the Transition summary (the encounter's merged state), falling back
    to the message's own care event (PV1-36, PV1-45, PV1-2)."""
    summary = transition.summary or {}
    nested = summary.get("encounter") if isinstance(summary.get("encounter"), dict) else {}
    encounter = work.event.encounter if work is not None and work.event is not None else None

    def pick(*names: str, event_value: Any = None) -> Any:
        for source in (summary, nested):
            for name in names:
                if source.get(name) not in (None, ""):
                    return source[name]
        return event_value

    disposition = pick(
        "disposition",
        "discharge_disposition",
        event_value=encounter.discharge_disposition if encounter else None,
    )
    moment = pick(
        "discharged_at",
        "discharge_time",
        event_value=encounter.discharge_time if encounter else None,
    )
    patient_class = pick(
        "patient_class", event_value=encounter.patient_class if encounter else None
    )
    return DischargeFacts(
        normalize_disposition(disposition),
        _as_datetime(moment),
        str(patient_class).strip().upper() if patient_class else None,
    )


def _as_datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    text = str(value).strip()
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return parse_hl7_datetime(text)  # an HL7 DTM copied as sent


# -- items -----------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class FollowupItem:
    """One follow-up obligation (a row of ``followups``). Times are UTC."""

    id: int
    encounter_id: int
    patient_key: str
    kind: str
    due_at: datetime
    status: str
    created_at: datetime
    closed_at: datetime | None = None
    alerted_at: datetime | None = None
    #: Who marked it done, how (phone, visit, portal...) and their note, when done by hand.
    done_by: str | None = None
    done_method: str | None = None
    done_note: str | None = None

    @property
    def reason(self) -> str | None:
        """Why the item was closed without the work, or None."""
        return WITHDRAWN.get(self.status)

    def as_output(self) -> dict[str, Any]:
        """JSON-ready, times as ISO 8601 text."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, datetime) else value
        out["reason"] = self.reason
        return out


@dataclass(slots=True, frozen=True)
class FollowupAlert:
    """A follow-up that passed its due time unmet, for the notify step to send once."""

    id: int
    encounter_id: int
    patient_key: str
    kind: str
    due_at: datetime

    @property
    def about(self) -> str:
        """How an alert's record names the item (``follow-up #12 (contact)``)."""
        return _about(self.id, self.kind)

    def as_output(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "encounter_id": self.encounter_id,
            "patient_key": self.patient_key,
            "kind": self.kind,
            "due_at": self.due_at.isoformat(),
        }


def _about(item_id: int, kind: str) -> str:
    # "follow-up #12 (contact)" is never part of "follow-up #112 (contact)", so the records
    # of an item are told apart by this text (``FollowupClock.unalerted``).
    return f"follow-up #{item_id} ({kind})"


def _alert(item: FollowupItem) -> FollowupAlert:
    return FollowupAlert(item.id, item.encounter_id, item.patient_key, item.kind, item.due_at)


def _utc(moment: datetime) -> datetime:
    """Aware UTC: the store keeps UTC (SQLite drops offsets), and naive times are taken as UTC."""
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _minute(moment: datetime) -> str:
    """A time to the minute in UTC, for messages."""
    return _utc(moment).strftime("%Y-%m-%d %H:%M")


@dataclass(slots=True)
class FollowupMemory:
    """The ``followups`` table kept in memory, for dry runs and tests without a store."""

    items: dict[int, FollowupItem] = field(default_factory=dict)
    next_id: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(slots=True, frozen=True)
class FollowupPolicy:
    """Which discharges open clocks, and how long each one runs."""

    home_dispositions: frozenset[str] = frozenset(DEFAULT_HOME_DISPOSITIONS)
    contact_business_days: int = 2
    visit_days: int = 14  # 14 for 99495 (moderate complexity), 7 for 99496 (high)
    excluded_patient_classes: frozenset[str] = frozenset(DEFAULT_EXCLUDED_CLASSES)

    def why_not(self, facts: DischargeFacts) -> str | None:
        """Why this discharge opens no clocks, or None when it does."""
        if facts.patient_class and facts.patient_class in self.excluded_patient_classes:
            return f"patient class {facts.patient_class} is not a TCM-eligible discharge"
        if facts.disposition is None:
            return "no discharge disposition (PV1-36): cannot tell whether the patient went home"
        if facts.disposition not in self.home_dispositions:
            home = ", ".join(sorted(self.home_dispositions))
            return f"disposition {facts.disposition} is not a discharge home ({home})"
        return None

    def due_dates(
        self, discharged_at: datetime, calendar: BusinessCalendar
    ) -> dict[FollowupKind, datetime]:
        return {
            "contact": calendar.add_business_days(discharged_at, self.contact_business_days),
            "visit": calendar.add_days(discharged_at, self.visit_days),
        }


# -- the clock -------------------------------------------------------------------------------
class FollowupClock:
    """Opens, cancels, completes and alerts on follow-ups, in the store or in memory.

    ``target`` is the store's engine (``MessageStore.engine``) or a ``FollowupMemory``."""

    def __init__(
        self,
        target: Engine | FollowupMemory,
        calendar: BusinessCalendar | None = None,
        policy: FollowupPolicy | None = None,
    ) -> None:
        self.target = target
        self.calendar = calendar or BusinessCalendar()
        self.policy = policy or FollowupPolicy()

    @property
    def _memory(self) -> FollowupMemory | None:
        return self.target if isinstance(self.target, FollowupMemory) else None

    # -- opening and closing --------------------------------------------------------------
    def open_for_discharge(
        self,
        transition: Transition,
        now: datetime,
        *,
        facts: DischargeFacts | None = None,
    ) -> list[FollowupItem]:
        """Open the contact and visit items for a discharge home (or one corrected to home);
        returns the items opened.

        Returns [] for anything else: not a discharge, not home (see ``policy.why_not``), no
        encounter id, or an encounter that already has follow-ups other than those of a
        discharge undone (``DISCHARGE_UNDONE``) or rescheduled. The last rule makes a resent
        or reprocessed A03 harmless. A discharge after an A13, or a correction back to home,
        opens fresh items (the route step first makes sure it is not the A03 that A13 took
        back).
        ``facts`` default to ``discharge_facts(transition)``. Without a discharge time the
        clocks start at ``now``."""
        if transition.kind not in _DISCHARGES or transition.encounter_id is None:
            return []
        facts = facts or discharge_facts(transition)
        if self.policy.why_not(facts) is not None:
            return []
        start = facts.discharged_at or now
        rows = [
            {
                "encounter_id": transition.encounter_id,
                "patient_key": transition.patient_key,
                "kind": kind,
                "due_at": _utc(due),
                "status": OPEN,
                "created_at": _utc(now),
            }
            for kind, due in self.policy.due_dates(start, self.calendar).items()
        ]
        memory = self._memory
        if memory is not None:
            with memory.lock:
                if any(
                    i.encounter_id == transition.encounter_id and i.status not in _NOT_LIVE
                    for i in memory.items.values()
                ):
                    return []
                opened = []
                for row in rows:
                    item = FollowupItem(id=memory.next_id, **row)
                    memory.items[item.id] = item
                    memory.next_id += 1
                    opened.append(item)
                return opened
        assert isinstance(self.target, Engine)
        with self.target.begin() as conn:
            live = conn.execute(
                select(followups_table.c.id)
                .where(followups_table.c.encounter_id == transition.encounter_id)
                .where(followups_table.c.status.not_in(_NOT_LIVE))
                .limit(1)
            ).first()
            if live is not None:
                return []
            opened = []
            for row in rows:
                new_id = conn.execute(
                    insert(followups_table).values(**row).returning(followups_table.c.id)
                ).scalar_one()
                opened.append(FollowupItem(id=new_id, **row))
            return opened

    def cancel_for_encounter(self, encounter_id: int | None, now: datetime) -> list[FollowupItem]:
        """Cancel the encounter's pending items (an A13 took the discharge back); returns
        them as cancelled. Done items stay done: the work really happened."""
        if encounter_id is None:
            return []
        return self.withdraw([encounter_id], CANCELLED, now)

    def withdraw(
        self, encounter_ids: Iterable[int], status: str, now: datetime
    ) -> list[FollowupItem]:
        """Close the encounters' pending items with ``status``, one of ``WITHDRAWN`` (which
        says why they are no longer owed); returns them closed. Done items stay done."""
        if status not in WITHDRAWN:
            raise ValueError(f"{status!r} is not a status for withdrawn follow-ups")
        wanted = sorted(set(encounter_ids))
        return self._change(
            lambda i: i.encounter_id in wanted and i.status in PENDING,
            [followups_table.c.encounter_id.in_(wanted), followups_table.c.status.in_(PENDING)],
            status=status,
            closed_at=_utc(now),
        )

    def reopen_readmitted(self, encounter_ids: Iterable[int]) -> list[FollowupItem]:
        """Reopen the encounters' items a readmission closed, once that readmission is
        cancelled (A11): the TCM episode runs on. An item alerted before is overdue again, and
        is not alerted a second time; one that fell due meanwhile alerts at the next tick."""
        return self.reopen(encounter_ids, READMITTED)

    def reopen(self, encounter_ids: Iterable[int], status: str) -> list[FollowupItem]:
        """Reopen the encounters' items closed as ``status`` (a readmission cancelled, a
        reported death taken back), as ``reopen_readmitted`` says."""
        wanted = sorted(set(encounter_ids))
        t = followups_table
        closed = [t.c.encounter_id.in_(wanted), t.c.status == status]
        never_alerted = self._change(
            lambda i: i.encounter_id in wanted and i.status == status and i.alerted_at is None,
            [*closed, t.c.alerted_at.is_(None)],
            status=OPEN,
            closed_at=None,
        )
        alerted = self._change(  # those left were alerted
            lambda i: i.encounter_id in wanted and i.status == status,
            closed,
            status=OVERDUE,
            closed_at=None,
        )
        return sorted(never_alerted + alerted, key=lambda i: i.id)

    def reschedule(
        self, encounter_id: int, discharged_at: datetime, now: datetime
    ) -> tuple[list[FollowupItem], list[FollowupItem]]:
        """Due the encounter's pending items again from a corrected discharge time; returns
        (the items closed as ``rescheduled``, their replacements). An item whose due date
        stays the same is left alone, so a correction of minutes, or one applied twice, moves
        nothing. A replacement already past due that was alerted before stays overdue and is
        not alerted again; otherwise it is open, and alerts once its own due time passes.

        Items a readmission closed move too, their replacements closed as ``readmitted`` (at
        the readmission's time): an A11 that takes the readmission back reopens them, and they
        must then run from the corrected time, not the one the readmission found."""
        dates = self.policy.due_dates(discharged_at, self.calendar)
        due: dict[str, datetime] = {kind: _utc(moment) for kind, moment in dates.items()}
        at = _utc(now)

        def successor(item: FollowupItem) -> dict[str, Any]:
            past = due[item.kind] < at
            alerted = item.alerted_at if past else None
            readmitted = item.status == READMITTED
            return {
                "encounter_id": item.encounter_id,
                "patient_key": item.patient_key,
                "kind": item.kind,
                "due_at": due[item.kind],
                "status": READMITTED if readmitted else OVERDUE if alerted is not None else OPEN,
                "created_at": at,
                "closed_at": item.closed_at if readmitted else None,
                "alerted_at": alerted,
            }

        def moves(item: FollowupItem) -> bool:
            return item.kind in due and item.due_at != due[item.kind]

        closed: list[FollowupItem] = []
        opened: list[FollowupItem] = []
        memory = self._memory
        if memory is not None:
            with memory.lock:
                for item in sorted(memory.items.values(), key=lambda i: i.id):
                    if item.encounter_id != encounter_id or item.status not in _MOVABLE:
                        continue
                    if not moves(item):
                        continue
                    old = replace(item, status=RESCHEDULED, closed_at=at)
                    new = FollowupItem(id=memory.next_id, **successor(item))
                    memory.items.update({old.id: old, new.id: new})
                    memory.next_id += 1
                    closed.append(old)
                    opened.append(new)
            return closed, opened
        assert isinstance(self.target, Engine)
        t = followups_table
        with self.target.begin() as conn:
            pending = conn.execute(
                select(t)
                .where(t.c.encounter_id == encounter_id, t.c.status.in_(_MOVABLE))
                .order_by(t.c.id)
            ).all()
            for item in (_item(r) for r in pending):
                if not moves(item):
                    continue
                row = conn.execute(
                    update(t)
                    .where(t.c.id == item.id, t.c.status == item.status)
                    .values(status=RESCHEDULED, closed_at=at)
                    .returning(*t.c)
                ).first()
                if row is None:  # done or closed meanwhile: nothing to move
                    continue
                values = successor(item)
                new_id = conn.execute(insert(t).values(**values).returning(t.c.id)).scalar_one()
                closed.append(_item(row))
                opened.append(FollowupItem(id=new_id, **values))
        return closed, opened

    def links(
        self, items: Iterable[FollowupItem]
    ) -> tuple[dict[int, FollowupItem], dict[int, FollowupItem]]:
        """How ``items`` were rescheduled: ({replacement id: the item it replaced}, {rescheduled
        id: its replacement}). A replacement is written right after the item it replaces, so
        it is the next item of the same visit and kind."""
        visits = sorted({i.encounter_id for i in items})
        replaces: dict[int, FollowupItem] = {}
        replaced_by: dict[int, FollowupItem] = {}
        if not visits:
            return replaces, replaced_by
        memory = self._memory
        if memory is not None:
            with memory.lock:
                everything = [i for i in memory.items.values() if i.encounter_id in visits]
        else:
            assert isinstance(self.target, Engine)
            t = followups_table
            with self.target.connect() as conn:
                rows = conn.execute(select(t).where(t.c.encounter_id.in_(visits))).all()
            everything = [_item(r) for r in rows]
        last: dict[tuple[int, str], FollowupItem] = {}
        for item in sorted(everything, key=lambda i: i.id):
            earlier = last.get((item.encounter_id, item.kind))
            if earlier is not None and earlier.status == RESCHEDULED:
                replaces[item.id] = earlier
                replaced_by[earlier.id] = item
            last[item.encounter_id, item.kind] = item
        return replaces, replaced_by

    def complete(
        self,
        item_id: int,
        now: datetime,
        *,
        by: str | None = None,
        method: str | None = None,
        note: str | None = None,
        zone: tzinfo = UTC,
    ) -> FollowupItem:
        """Mark an item done at ``now`` (when the contact or visit happened). Done again is a
        no-op. A withdrawn or unknown item raises FollowupError, because completing it would
        record work that is no longer owed (a discharge withdrawn, a patient readmitted), and
        so does a time before the visit's discharge: a transitional-care contact or visit
        before the patient left cannot count. ``zone``: the one the refusal's times are in,
        the coordinator's."""
        pending = self.get(item_id)
        if pending is not None and pending.status in PENDING:
            discharged = self._discharged_at(pending.encounter_id)
            if discharged is not None and _utc(now) < discharged:
                raise FollowupError(
                    f"follow-up {item_id} cannot be done at {_zoned(now, zone)}: that is "
                    f"before the discharge at {_zoned(discharged, zone)}; not changed"
                )
        self._change(
            lambda i: i.id == item_id and i.status in PENDING,
            [followups_table.c.id == item_id, followups_table.c.status.in_(PENDING)],
            status=DONE,
            closed_at=_utc(now),
            done={"done_by": by, "done_method": method, "done_note": note},
        )
        item = self.get(item_id)
        if item is None:
            raise FollowupError(f"no follow-up {item_id}")
        if item.reason is not None:
            replacement = self.links([item])[1].get(item.id)
            instead = f" (now follow-up {replacement.id})" if replacement is not None else ""
            raise FollowupError(
                f"follow-up {item_id} is closed as {item.status}: {item.reason}{instead}; "
                "not changed"
            )
        return item

    def _change(
        self,
        matches: Any,
        where: list[Any],
        *,
        status: str,
        closed_at: datetime | None,
        done: dict[str, str | None] | None = None,
    ) -> list[FollowupItem]:
        """Set the status (and closing time, and for one done by hand who did it and how) of
        the items that ``matches`` (in memory) or ``where`` (in the store) select; returns
        them changed."""
        extra = done or {}
        memory = self._memory
        if memory is not None:
            with memory.lock:
                changed = [
                    replace(i, status=status, closed_at=closed_at, **extra)
                    for i in memory.items.values()
                    if matches(i)
                ]
                memory.items.update((i.id, i) for i in changed)
            return sorted(changed, key=lambda i: i.id)
        assert isinstance(self.target, Engine)
        with self.target.begin() as conn:
            rows = conn.execute(
                update(followups_table)
                .where(*where)
                .values(status=status, closed_at=closed_at, **extra)
                .returning(*followups_table.c)
            ).all()
        return sorted((_item(r) for r in rows), key=lambda i: i.id)

    def _discharged_at(self, encounter_id: int) -> datetime | None:
        """When the visit was discharged, in UTC (a time sent without an offset is read as
        UTC, as the hub reads it); None when unknown (dry runs keep no encounters)."""
        if self._memory is not None:
            return None
        assert isinstance(self.target, Engine)
        with self.target.connect() as conn:
            found = conn.execute(
                select(encounters_table.c.discharged_at).where(
                    encounters_table.c.id == encounter_id
                )
            ).scalar()
        return _utc(found) if found is not None else None

    # -- reading --------------------------------------------------------------------------
    def get(self, item_id: int) -> FollowupItem | None:
        memory = self._memory
        if memory is not None:
            return memory.items.get(item_id)
        assert isinstance(self.target, Engine)
        with self.target.connect() as conn:
            row = conn.execute(select(followups_table).where(followups_table.c.id == item_id))
            found = row.first()
        return _item(found) if found else None

    def find(
        self,
        *,
        encounter_id: int | None = None,
        patient_key: str | None = None,
        patient: str | None = None,
        statuses: Sequence[str] | None = PENDING,
        due_before: datetime | None = None,
        limit: int | None = None,
    ) -> list[FollowupItem]:
        """Items matching every given filter, soonest due first. ``patient_key`` is a key as
        stored; ``patient`` one as a person types it (``authority|id`` or a bare id, following
        merges in the store, as ``carehub encounters list`` does). ``statuses=None`` means any
        status. ``due_before`` keeps items due strictly before that time."""
        before = _utc(due_before) if due_before is not None else None
        memory = self._memory
        if memory is not None:
            with memory.lock:
                found = [
                    i
                    for i in memory.items.values()
                    if (encounter_id is None or i.encounter_id == encounter_id)
                    and (patient_key is None or i.patient_key == patient_key)
                    and (patient is None or _is_patient(i.patient_key, patient))
                    and (statuses is None or i.status in statuses)
                    and (before is None or i.due_at < before)
                ]
            found.sort(key=lambda i: (i.due_at, i.id))
            return found[:limit] if limit else found
        assert isinstance(self.target, Engine)
        t = followups_table
        query = select(t).order_by(t.c.due_at, t.c.id)
        if encounter_id is not None:
            query = query.where(t.c.encounter_id == encounter_id)
        if patient_key is not None:
            query = query.where(t.c.patient_key == patient_key)
        if statuses is not None:
            query = query.where(t.c.status.in_(list(statuses)))
        if before is not None:
            query = query.where(t.c.due_at < before)
        with self.target.connect() as conn:
            if patient is not None:
                query = query.where(patient_key_matches(conn, t.c.patient_key, patient))
            if limit:
                query = query.limit(limit)
            return [_item(r) for r in conn.execute(query)]

    # -- alerts ---------------------------------------------------------------------------
    def unalerted(self, items: Iterable[FollowupItem], now: datetime) -> dict[int, str]:
        """Why each of ``items`` that is past due and still unalerted has reached nobody so
        far (the latest reason the notify step recorded on its visit), by item id. The notify
        step tries again at each tick, so this says why the care team has not heard yet."""
        at = _utc(now)
        waiting = [i for i in items if i.status == OPEN and i.alerted_at is None and i.due_at < at]
        if not waiting or self._memory is not None:  # dry runs send no alerts
            return {}
        from carehub.care.notify import NOBODY

        assert isinstance(self.target, Engine)
        t = notifications_table
        with self.target.connect() as conn:
            rows = conn.execute(
                select(t.c.encounter_id, t.c.reason)
                .where(
                    t.c.encounter_id.in_(sorted({i.encounter_id for i in waiting})),
                    t.c.recipient == NOBODY,
                    t.c.kind == "followup_overdue",
                )
                .order_by(t.c.id)
            ).all()
        found: dict[int, str] = {}
        for row in rows:
            for item in waiting:
                if item.encounter_id == row.encounter_id and _about(item.id, item.kind) in (
                    row.reason or ""
                ):
                    found[item.id] = row.reason
        return found

    def due_alerts(self, now: datetime) -> list[FollowupAlert]:
        """Open items past due that have not been alerted yet. Nothing is marked. The notify
        step calls ``mark_alerted`` once it has queued the alerts, so a crash in between
        alerts again instead of never."""
        return [
            _alert(i) for i in self.find(statuses=(OPEN,), due_before=now) if i.alerted_at is None
        ]

    def mark_alerted(self, ids: Iterable[int], now: datetime) -> list[int]:
        """Mark items overdue and alerted; returns the ids this call marked. An id that is
        already alerted, or that was done or cancelled meanwhile, is left out. This keeps two
        workers from both claiming one alert."""
        wanted = set(ids)
        if not wanted:
            return []
        at = _utc(now)
        memory = self._memory
        if memory is not None:
            with memory.lock:
                marked = [
                    replace(i, status=OVERDUE, alerted_at=at)
                    for i in memory.items.values()
                    if i.id in wanted and i.status == OPEN and i.alerted_at is None
                ]
                memory.items.update((i.id, i) for i in marked)
            return sorted(i.id for i in marked)
        assert isinstance(self.target, Engine)
        t = followups_table
        with self.target.begin() as conn:
            rows = conn.execute(
                update(t)
                .where(t.c.id.in_(sorted(wanted)), t.c.status == OPEN, t.c.alerted_at.is_(None))
                .values(status=OVERDUE, alerted_at=at)
                .returning(t.c.id)
            ).all()
        return sorted(r.id for r in rows)

    def overdue(self, now: datetime) -> list[FollowupAlert]:
        """``due_alerts`` and ``mark_alerted`` in one call. Returns only the items this call
        marked, so each overdue item is returned once, ever."""
        alerts = self.due_alerts(now)
        marked = set(self.mark_alerted([a.id for a in alerts], now))
        return [a for a in alerts if a.id in marked]


def _is_patient(patient_key: str, patient: str) -> bool:
    """``patient_key_matches`` for the in-memory items (dry runs keep no merges)."""
    return patient_key == patient or ("|" not in patient and patient_key.endswith(f"|{patient}"))


def _item(row: Any) -> FollowupItem:
    values = dict(row._mapping)
    for name in ("due_at", "created_at", "closed_at", "alerted_at"):
        if values[name] is not None:
            values[name] = _aware(values[name]).astimezone(UTC)
    return FollowupItem(**values)


# -- the route step --------------------------------------------------------------------------
class FollowupEnricher(Enricher):
    """Opens TCM follow-up clocks on discharges home (and corrections to home), cancels them
    on A13, closes them when a correction no longer sends the patient home or the patient
    is readmitted (reopened if that readmission is cancelled), and reschedules the pending ones
    when a correction moves the discharge time.

    Runs after ``encounter-state`` and reads its Transition from ``work.data["encounter"]``.
    ``work.data["followups"]`` gets the encounter's pending items after a discharge (just
    opened, rescheduled, or already open on a resend), so a discharge notice can show the due
    dates, and ``work.data["followups_closed"]`` the items this message closed (their status
    says why). Otherwise each gets []."""

    name = "follow-up-clock"
    description = (
        "TCM follow-up clocks: a contact due in 2 business days and a visit due in 7 or 14 "
        "days after a discharge home; cancelled by A13, closed by a corrected discharge that "
        "is not home or by a readmission within 30 days, due again from a corrected discharge "
        "time"
    )

    class Options(ComponentOptions):
        home_dispositions: list[str] = Field(
            list(DEFAULT_HOME_DISPOSITIONS),
            description="PV1-36 codes (table 0112) that count as a discharge home: 01 home, "
            "06 home health, 07 left against medical advice, 08 home IV",
        )
        visit_days: Literal[7, 14] = Field(
            14,
            description="calendar days after discharge for the visit: 14 for 99495 (moderate "
            "complexity), 7 for 99496 (high)",
        )
        contact_business_days: int = Field(
            2,
            description="business days (Monday to Friday, not holidays) after discharge for "
            "the interactive contact",
        )
        holidays: list[date] = Field(
            [], description="ISO dates (YYYY-MM-DD) that are not business days"
        )
        holidays_file: str | None = Field(
            None,
            description="YAML file of more holidays, relative to the config folder: a list of "
            "dates, of {date, name}, or a mapping of date to name",
        )
        timezone: str | None = Field(
            None,
            description="the hospital's IANA time zone (America/Chicago), which sets the "
            "discharge day; unset: the time's own offset, or UTC without one",
        )
        exclude_patient_classes: list[str] = Field(
            list(DEFAULT_EXCLUDED_CLASSES),
            description="patient classes (PV1-2) whose discharges open nothing; E: ED visits "
            "are not TCM discharges",
        )

        @field_validator("home_dispositions", mode="before")
        @classmethod
        def _codes(cls, value: Any) -> Any:
            # YAML turns an unquoted 01 into the number 1.
            if isinstance(value, list):
                return [normalize_disposition(v) or "" for v in value]
            return value

        @field_validator("contact_business_days")
        @classmethod
        def _positive(cls, value: int) -> int:
            if value < 0:
                raise ValueError("must be 0 or more")
            return value

        @field_validator("timezone")
        @classmethod
        def _zone(cls, value: str | None) -> str | None:
            if value is not None:
                try:
                    ZoneInfo(value)
                except (ZoneInfoNotFoundError, ValueError):
                    raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from None
            return value

    options: Options

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        opts = self.options
        # Read the holidays file now so a bad file is a configuration error at startup,
        # not a failed step on the first discharge.
        holidays = load_holidays(
            opts.holidays, context.path(opts.holidays_file) if opts.holidays_file else None
        )
        self.calendar = BusinessCalendar(
            holidays, zone=ZoneInfo(opts.timezone) if opts.timezone else None
        )
        self.holidays_from = opts.holidays_file or "the follow-up-clock holidays option"
        self._calendar_checked: date | None = None
        self.policy = FollowupPolicy(
            home_dispositions=frozenset(opts.home_dispositions),
            contact_business_days=opts.contact_business_days,
            visit_days=opts.visit_days,
            excluded_patient_classes=frozenset(c.upper() for c in opts.exclude_patient_classes),
        )
        self.memory = FollowupMemory()

    async def start(self) -> None:
        self._check_calendar(datetime.now(UTC).date())

    def tick(self, now: datetime) -> None:
        """Once a day, warn again if the holidays list has run out: a hub runs for months,
        and the year a list covers ends while it does."""
        if self._calendar_checked != now.date():
            self._check_calendar(now.date())

    def _check_calendar(self, today: date) -> None:
        self._calendar_checked = today
        missing = self.calendar.missing_years(today)
        if missing:
            years = " or ".join(str(y) for y in missing)
            log.warning(
                "follow-up-clock: %s lists no holiday in %s: contact deadlines then count "
                "holidays as business days (add that year's holidays)",
                self.holidays_from,
                years,
            )

    def _calendar_note(self, discharged_at: datetime) -> str | None:
        """What the item's history must say when the contact's business days run past the
        end of the holidays list: they were counted without holidays."""
        ends = self.calendar.ends
        if ends is None:
            return None
        due = self.calendar.add_business_days(discharged_at, self.policy.contact_business_days)
        if due.date() <= ends:
            return None
        return (
            f"business days after {ends.isoformat()}, where the holidays list "
            f"({self.holidays_from}) ends, are counted without holidays"
        )

    @property
    def clock(self) -> FollowupClock:
        """The clock over the store when the hub runs, in memory in dry runs. The hub attaches
        the store after building components, so this is resolved on each use."""
        store = self.context.store
        target = store.engine if store is not None else self.memory
        return FollowupClock(target, self.calendar, self.policy)

    def enrich(self, work: Work) -> dict[str, Any]:
        transition = work.data.get("encounter")
        if not isinstance(transition, Transition):
            raise MissingTransitionError(
                f"route {work.route!r}: follow-up-clock needs the encounter transition in "
                "work.data['encounter']; put an 'encounter-state' enrich step before it"
            )
        work.data["followups"] = []
        work.data["followups_closed"] = []
        now = datetime.now(UTC)
        result = self._for_transition(transition, work, now)
        if result.get("reason") == OVERTAKEN:
            return result
        return {**result, **self._for_patient(transition, work, now)}

    def _for_patient(self, transition: Transition, work: Work, now: datetime) -> dict[str, Any]:
        """What the message tells of the patient rather than of its own visit's discharge: a
        death (every visit's pending items close as ``died``, so nobody is told to call a
        patient who died on a later visit), a death taken back (those items run again), and
        a readmission no admission transition told (a late or missing A01, an A40 that put
        two records together), which closes the earlier discharge's items as ``readmitted``.
        """
        summary = transition.summary or {}
        out: dict[str, Any] = {}
        readmission_of = summary.get("readmission_of") or []
        if readmission_of and transition.kind not in _ADMISSION_CHANGES:
            closed = self._withdraw(readmission_of, READMITTED, work, now)
            out["readmission_of"] = readmission_of
            out["readmitted"] = _briefs(closed)
        death = summary.get("death")
        if isinstance(death, dict) and death.get("encounter_ids"):
            closed = self._withdraw(death["encounter_ids"], PATIENT_DIED, work, now)
            out["death"] = {"source": death.get("source"), "items": _briefs(closed)}
        retracted = summary.get("death_retracted")
        if isinstance(retracted, dict) and retracted.get("encounter_ids"):
            reopened = self.clock.reopen(retracted["encounter_ids"], PATIENT_DIED)
            out["death_retracted"] = {
                "source": retracted.get("source"),
                "items": _briefs(reopened),
            }
        return out

    def _for_transition(self, transition: Transition, work: Work, now: datetime) -> dict[str, Any]:
        """What the message's own transition does to its visit's clocks."""
        base: dict[str, Any] = {"transition": transition.kind}
        if transition.encounter_id is None:
            return {**base, "action": "none", "reason": "the transition has no encounter id"}
        base["encounter_id"] = transition.encounter_id
        if self._overtaken(transition, work):
            return {**base, "action": "none", "reason": OVERTAKEN}
        readmission_of = transition.summary.get("readmission_of") or []
        if transition.kind in _DISCHARGES:
            return self._discharged(transition, work, now, base)
        if transition.kind == "cancel_discharge":
            cancelled = self._withdraw([transition.encounter_id], CANCELLED, work, now)
            if not cancelled:
                return {**base, "action": "none", "reason": "no pending follow-ups to cancel"}
            return {**base, "action": "cancelled", "items": [_brief(i) for i in cancelled]}
        if transition.kind == "admission" and readmission_of:
            base["readmission_of"] = readmission_of
            closed = self._withdraw(readmission_of, READMITTED, work, now)
            if not closed:
                return {**base, "action": "none", "reason": "no pending follow-ups to close"}
            return {**base, "action": "closed", "status": READMITTED, "items": _briefs(closed)}
        if transition.kind == "cancel_admission" and readmission_of:
            base["readmission_of"] = readmission_of
            reopened = self.clock.reopen_readmitted(readmission_of)
            if not reopened:
                return {**base, "action": "none", "reason": "no follow-ups closed by it"}
            return {**base, "action": "reopened", "items": _briefs(reopened)}
        return {**base, "action": "none", "reason": "not a discharge"}

    def _discharged(
        self, transition: Transition, work: Work, now: datetime, base: dict[str, Any]
    ) -> dict[str, Any]:
        """A discharge, or a correction of where a discharged patient went: one home opens the
        clocks (a resend finds them open); a correction that no longer sends the patient home
        closes those still pending, saying whether the patient died or went elsewhere."""
        clock = self.clock
        facts = discharge_facts(transition, work)
        if facts.discharged_at is None:
            # The receipt time, not the wall clock: a reprocess must give the same due dates.
            facts = replace(facts, discharged_at=work.message.received_at)
        base["disposition"] = facts.disposition
        reason = self.policy.why_not(facts)
        if reason is not None:
            if facts.disposition is None or facts.disposition not in DISPOSITIONS:
                # Not a discharge elsewhere but one nobody can place: the notice says that no
                # clock runs, so the care team does not take its silence for "none due".
                work.data["followup_note"] = reason
            if transition.kind == "discharge_corrected":
                status = PATIENT_DIED if facts.disposition in DIED else NOT_HOME
                closed = self._withdraw([transition.encounter_id or 0], status, work, now)
                if closed:
                    items = _briefs(closed)
                    return {**base, "action": "closed", "status": status, "items": items}
            return {**base, "action": "none", "reason": reason}
        assert facts.discharged_at is not None
        base["discharged_at"] = facts.discharged_at.isoformat()
        calendar_note = self._calendar_note(facts.discharged_at)
        if calendar_note is not None:
            base["calendar_note"] = calendar_note
        opened = clock.open_for_discharge(transition, now, facts=facts)
        if opened:
            work.data["followups"] = opened
            return {**base, "action": "opened", "items": _briefs(opened)}
        left_before = _time_corrected_from(transition, facts)
        if left_before is not None:
            base["previous_discharged_at"] = left_before.isoformat()
            moved, replacements = clock.reschedule(
                transition.encounter_id or 0, facts.discharged_at, now
            )
            if moved:
                work.data["followups"] = clock.find(encounter_id=transition.encounter_id)
                work.data["followups_closed"] = moved
                return {
                    **base,
                    "action": "rescheduled",
                    "items": _briefs(replacements),
                    "rescheduled": _briefs(moved),
                }
        existing = clock.find(encounter_id=transition.encounter_id)
        work.data["followups"] = existing
        return {**base, "action": "already_opened", "items": _briefs(existing)}

    def _withdraw(
        self, encounter_ids: list[int], status: str, work: Work, now: datetime
    ) -> list[FollowupItem]:
        """Close the encounters' pending items as ``status`` and hand them to the later steps
        (``work.data["followups_closed"]``), so a notice can say the clocks stopped and why."""
        closed = self.clock.withdraw(encounter_ids, status, now)
        work.data["followups_closed"] = [*work.data.get("followups_closed", []), *closed]
        return closed

    def _overtaken(self, transition: Transition, work: Work) -> bool:
        """Whether the discharge change (discharge, correction, A13) or the admission change
        (a readmission, its A11) this message made was overtaken on its visit (see
        ``EncounterTracker.overtaken``). A reprocessed message gets its recorded transition
        back; acting on it again would reopen the clocks of a discharge an A13 has since taken
        back, or close those a later correction opened, and reprocessing sends again but
        changes no state. Dry runs give every message id 0, so they cannot tell whose change
        it was: their messages are taken to stand."""
        store = self.context.store
        if store is None or transition.encounter_id is None:
            return False
        if transition.kind in DISCHARGE_CHANGES:
            kinds = DISCHARGE_CHANGES
        elif transition.kind in _ADMISSION_CHANGES:
            kinds = _ADMISSION_CHANGES
        else:
            return False
        tracker = EncounterTracker(store.engine)
        return tracker.overtaken(transition.encounter_id, work.message.id, kinds)


def _time_corrected_from(transition: Transition, facts: DischargeFacts) -> datetime | None:
    """The discharge time a ``discharge_corrected`` replaced, when it moved the discharge to
    another moment (times without an offset read as UTC, as the store keeps them); else None.
    """
    previous = (transition.summary or {}).get("previous_discharge")
    if transition.kind != "discharge_corrected" or not isinstance(previous, dict):
        return None
    before = _as_datetime(previous.get("discharged_at"))
    if before is None or facts.discharged_at is None:
        return None
    return before if _utc(before) != _utc(facts.discharged_at) else None


def _briefs(items: list[FollowupItem]) -> list[dict[str, Any]]:
    return [_brief(i) for i in items]


def _brief(item: FollowupItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "kind": item.kind,
        "due_at": item.due_at.isoformat(),
        "status": item.status,
    }


# -- commands --------------------------------------------------------------------------------
@click.group("followups")
def followups() -> None:
    """Transitional-care follow-ups (TCM contact and visit): list them, mark them done."""


#: How a follow-up can be done, for `followups done --method`.
DONE_METHODS = ("phone", "video", "visit", "portal", "other")


@dataclass(slots=True)
class _Worklist:
    """What the shipped route files say about the coordinator's worklist: the zone times are
    given in (the notify step's, else the follow-up clock's, else UTC), the roster and the
    roles that coordinate a patient's care."""

    zone: tzinfo = UTC
    roster: Path | None = None
    roles: tuple[str, ...] = ("care_coordinator",)


def _worklist(config: HubConfig, zone_name: str | None) -> _Worklist:
    """Read the route files for the notify and care-team steps (their timezone, roster and
    coordinator roles): the worklist gives times as the notices do."""
    found = _Worklist()
    folder = config.source.parent if config.source else Path.cwd()
    notify_zone = clock_zone = None
    for pattern in config.routes:
        for path in sorted(folder.glob(pattern)):
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                continue
            for route in data.get("routes") or []:
                for step in (route or {}).get("steps") or []:
                    if not isinstance(step, dict):
                        continue
                    notify = step.get("notify")
                    if isinstance(notify, dict):
                        notify_zone = notify_zone or notify.get("timezone")
                        roles = notify.get("coordinator_roles")
                        if roles:
                            found.roles = tuple(roles)
                    enrich = step.get("enrich")
                    if isinstance(enrich, dict) and enrich.get("use") == "follow-up-clock":
                        clock_zone = clock_zone or enrich.get("timezone")
                    if isinstance(enrich, dict) and enrich.get("use") == "care-team":
                        roster = enrich.get("roster")
                        if roster and found.roster is None:
                            found.roster = folder / roster
    name = zone_name or notify_zone or clock_zone
    if name:
        try:
            found.zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise click.BadParameter(
                f"unknown time zone {name!r}", param_hint="'--timezone'"
            ) from err
    return found


def _zoned(when: datetime | None, zone: tzinfo) -> str:
    """A stored time in the worklist's zone, with its abbreviation ("2026-12-04 14:30 CST")."""
    if when is None:
        return ""
    return _utc(when).astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")


def _worklist_facts(
    engine: Engine, items: Sequence[FollowupItem]
) -> tuple[dict[int, dict[str, Any]], dict[int, list[str]]]:
    """Per encounter: the patient's name, the hospital and the discharge time (from the
    visit's snapshot), and who was alerted about it or told of its discharge."""
    ids = {item.encounter_id for item in items}
    facts: dict[int, dict[str, Any]] = {}
    told: dict[int, list[str]] = {}
    if not ids:
        return facts, told
    with engine.connect() as conn:
        for row in conn.execute(
            select(
                encounters_table.c.id,
                encounters_table.c.snapshot,
                encounters_table.c.discharged_at,
            ).where(encounters_table.c.id.in_(ids))
        ):
            snapshot = json.loads(row.snapshot) if row.snapshot else {}
            patient = snapshot.get("patient") or {}
            encounter = snapshot.get("encounter") or {}
            facts[row.id] = {
                "name": display_name(patient.get("name") or {}) or "",
                "facility": encounter.get("facility") or snapshot.get("sending_facility") or "",
                "discharged_at": row.discharged_at,
            }
        for row in conn.execute(
            select(
                notifications_table.c.encounter_id,
                notifications_table.c.recipient,
                notifications_table.c.kind,
                notifications_table.c.status,
            ).where(notifications_table.c.encounter_id.in_(ids))
        ):
            if row.kind in ("discharge", "followup_overdue") and row.status in (
                "queued",
                "digest",
                "digested",
            ):
                names = told.setdefault(row.encounter_id, [])
                if row.recipient not in names:
                    names.append(row.recipient)
    return facts, told


def _assigned(setting: _Worklist, patient_key: str) -> list[tuple[str, str, str]]:
    """(member id, name, organization) of each coordinator the roster lists for the patient
    now; none without a roster."""
    if setting.roster is None or not setting.roster.exists():
        return []
    from carehub.care.roster import Roster

    entry = Roster(setting.roster).find_key(patient_key)
    if entry is None:
        return []
    return [(m.member_id, m.name, m.organization) for m in entry.members if m.role in setting.roles]


@followups.command("list")
@hub_options
@click.option("--overdue", is_flag=True, help="Only pending items already past due.")
@click.option("--patient", help="Patient id (PID-3.1), or authority|id; merged ids follow.")
@click.option(
    "--coordinator",
    help="Only patients this coordinator follows: a roster member id, name or address.",
)
@click.option(
    "--practice", help="Only patients whose coordinator is of this organization (roster)."
)
@click.option(
    "--timezone",
    "zone_name",
    help="IANA zone times are given in; default: the notify step's timezone.",
)
@click.option("--all", "show_all", is_flag=True, help="Also done and closed items.")
@click.option("--limit", type=LIMIT, default=200, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_followups(
    config: HubConfig,
    data_dir: Path,
    overdue: bool,
    patient: str | None,
    coordinator: str | None,
    practice: str | None,
    zone_name: str | None,
    show_all: bool,
    limit: int,
    as_json: bool,
) -> None:
    """Pending follow-ups (open or overdue), soonest due first, with the patient, hospital,
    discharge and the coordinator the roster assigns, times in the notify step's zone; one
    whose due date a corrected discharge time moved says from when, and an overdue one
    nobody could be alerted about yet says why."""
    from carehub.hub import open_store

    now = datetime.now(UTC)
    setting = _worklist(config, zone_name)
    store = open_store(config, data_dir, must_exist=True)
    try:
        clock = FollowupClock(store.engine)
        found = clock.find(
            patient=patient,
            statuses=None if show_all and not overdue else PENDING,
            due_before=now if overdue else None,
            limit=limit,
        )
        replaces, replaced_by = clock.links(found)
        unalerted = clock.unalerted(found, now)
        facts, told = _worklist_facts(store.engine, found)
    finally:
        store.close()
    assigned = {item.patient_key: _assigned(setting, item.patient_key) for item in found}
    if coordinator or practice:
        wanted_by = (coordinator or "").strip().lower()
        wanted_org = (practice or "").strip().lower()

        def follows(item: FollowupItem) -> bool:
            members = assigned[item.patient_key]
            if wanted_org and not any(wanted_org in org.lower() for _, _, org in members):
                return False
            if not wanted_by:
                return True
            names = [part.lower() for m in members for part in m[:2]]
            names += [r.lower() for r in told.get(item.encounter_id, [])]
            return any(wanted_by == n or (len(wanted_by) > 2 and wanted_by in n) for n in names)

        found = [item for item in found if follows(item)]
    zone = setting.zone
    if as_json:
        for item in found:
            earlier, later = replaces.get(item.id), replaced_by.get(item.id)
            fact = facts.get(item.encounter_id, {})
            out = item.as_output()
            out["replaces"] = earlier.id if earlier else None
            out["was_due_at"] = earlier.due_at.isoformat() if earlier else None
            out["replaced_by"] = later.id if later else None
            out["unalerted"] = unalerted.get(item.id)
            out["patient_name"] = fact.get("name") or None
            out["facility"] = fact.get("facility") or None
            discharged = fact.get("discharged_at")
            out["discharged_at"] = _utc(discharged).isoformat() if discharged else None
            out["coordinators"] = [
                {"id": m, "name": n, "organization": o} for m, n, o in assigned[item.patient_key]
            ]
            out["told"] = told.get(item.encounter_id, [])
            out["timezone"] = str(zone)
            out["due_local"] = _zoned(item.due_at, zone)
            click.echo(json.dumps(out, ensure_ascii=False))
        return
    from rich.table import Table
    from rich.text import Text

    from carehub.display import new_console

    table = Table(show_edge=False, header_style="bold")
    columns = (
        "id",
        "patient",
        "name",
        "hospital",
        "discharged",
        "kind",
        "due",
        "status",
        "coordinator",
        "alerted",
        "closed",
        "note",
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    for item in found:
        earlier, later = replaces.get(item.id), replaced_by.get(item.id)
        fact = facts.get(item.encounter_id, {})
        if item.reason is not None:
            note = item.reason + (f" (now #{later.id})" if later else "")
        elif earlier is not None:
            note = f"moved from {_zoned(earlier.due_at, zone)} (discharge time corrected)"
        else:
            note = ""
        if item.status == DONE and (item.done_by or item.done_method or item.done_note):
            how = " ".join(
                part
                for part in (
                    f"by {item.done_by}" if item.done_by else "",
                    f"via {item.done_method}" if item.done_method else "",
                )
                if part
            )
            note = "; ".join(
                part for part in (note, f"done {how}".strip(), item.done_note or "") if part
            )
        if item.id in unalerted:
            # Overdue with nobody told yet: the alert goes once someone can be.
            note = "; ".join(
                part for part in (note, f"nobody to alert yet: {unalerted[item.id]}") if part
            )
        members = assigned[item.patient_key]
        who = ", ".join(
            f"{name} ({org})" if org else name for _, name, org in members
        ) or ", ".join(told.get(item.encounter_id, []))
        # Pending and past due is overdue, whether or not the alert has gone out yet (the
        # alerted column says); a due date moved into the past is overdue at once.
        late = item.status == OPEN and item.due_at < now
        table.add_row(
            str(item.id),
            Text(item.patient_key),
            Text(fact.get("name", "")),
            Text(fact.get("facility", "")),
            _zoned(fact.get("discharged_at"), zone),
            item.kind,
            _zoned(item.due_at, zone),
            OVERDUE if late else item.status,
            Text(who),
            _zoned(item.alerted_at, zone),
            _zoned(item.closed_at, zone),
            Text(note),
        )
    console = new_console()
    console.print(table)
    console.print(f"{len(found)} follow-up(s); times in {zone}")


@followups.command("done")
@hub_options
@click.argument("item_id", type=ROW_ID)
@click.option(
    "--at",
    "happened_at",
    help="When the contact or visit took place: an ISO date/time (without an offset: in "
    "--timezone) or an age back from now (2h, 1d), not before the discharge. Default: now.",
)
@click.option(
    "--method",
    type=click.Choice(DONE_METHODS),
    help="How the contact was made or where the visit took place.",
)
@click.option("--note", help="A note for the record (who was reached, what was agreed).")
@click.option(
    "--timezone",
    "zone_name",
    help="IANA zone of --at without an offset and of the output; default: the notify "
    "step's timezone.",
)
@operator_option
def done_followup(
    config: HubConfig,
    data_dir: Path,
    item_id: int,
    happened_at: str | None,
    method: str | None,
    note: str | None,
    zone_name: str | None,
    operator: str | None,
) -> None:
    """Mark a follow-up done (the contact was made or the visit took place): who did it
    (--by), how (--method) and a note are kept on the item and in the audit trail, for
    billing and hand-offs."""
    from carehub.cli import _audited, _operator
    from carehub.hub import open_store

    now = datetime.now(UTC)
    zone = _worklist(config, zone_name).zone
    # Without an offset, in the coordinators' zone: they type the clock on the wall.
    when = parse_moment(happened_at, "--at", zone)
    if when is not None and when > now:
        raise click.BadParameter("is in the future", param_hint="'--at'")
    by = operator or _operator()
    store = open_store(config, data_dir, must_exist=True)
    try:
        with _audited(store, "followups done", f"follow-up {item_id}", by) as action:
            item = FollowupClock(store.engine).complete(
                item_id, when or now, by=by, method=method, note=note, zone=zone
            )
            action.detail = f"{item.kind}, {method or 'method not given'}"
    finally:  # a FollowupError is a CarehubError: one line, exit 2, as for any unknown id
        store.close()
    how = f" via {item.done_method}" if item.done_method else ""
    click.echo(
        f"follow-up {item.id} ({item.kind}, {item.patient_key}) done at "
        f"{_zoned(item.closed_at, zone)}{how}, recorded by {item.done_by}"
    )
