"""The notify step: tell each member of the care team about a care transition, once.

    - notify:
        channels:                       # the recipient's channel -> how carehub sends on it
          email: {channel: email, host: smtp.example.org, sender: alerts@example.org}
          sms: {channel: sms, url: "${SMS_GATEWAY_URL}"}
        templates: care/templates       # optional: overrides of the built-in templates
        detail: {email: full}           # default: sms gets the minimum, others the full text
        digest_hour: 7                  # the hour daily digests go out, in timezone
        timezone: America/Chicago       # IANA name; default UTC
        coordinator_roles: [care_coordinator]
        facilities:                     # optional: facility code -> the name notices give
          RIVERSIDE_GH: Riverside General Hospital    # (others: the code as sent)

It reads what the earlier steps found: ``work.data["encounter"]`` (a Transition from the
encounter-state enricher) and ``work.data["care_team"]`` (a CareTeam from care-team). Every
decision is a row in ``notifications``: queued (a delivery was planned), digest (waits for
the recipient's daily digest), digested (went out in one), suppressed (with the reason),
retracted (a cancel took it back). Those rows are how "never the same thing twice" holds: a
recipient already told of an admission is not told again, those told of a visit hear of its
later events even when the care team changed (a merge), and a cancel sends a correction to
exactly those told (a digest reader in their next digest; a notice still waiting for a
digest is just withdrawn).

A notice and a digest line about the same event say the same: the time the hospital gave
(``notice_time``), the institution, and a death as a death. A text longer than an SMS channel's
``max_length`` goes as several numbered texts, each a delivery of its own, rather than cut.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from sqlalchemy import and_, func, insert, select, update

from carehub.builtins.messaging import SmsChannel
from carehub.care.model import (
    DIED,
    DISPOSITIONS,
    NOTIFIABLE,
    TOLD_OF_A_VISIT,
    CareTeam,
    Recipient,
    Transition,
)
from carehub.care.roster import ROLES, CareTeamEnricher
from carehub.care.templating import MessageTemplates
from carehub.components import ComponentContext, Outgoing, Work
from carehub.events import display_name
from carehub.routing.config import RetryPolicy
from carehub.routing.router import (
    PlannedDelivery,
    idempotency_key,
    key_of_this_store,
    store_id_of,
)
from carehub.store.outbox import Outbox
from carehub.store.schema import encounter_events, encounters, notifications, referral_events

BUILTIN_TEMPLATES = Path(__file__).parent / "templates"
KIND_LABELS = {
    "ed_arrival": "emergency department visit",
    "admission": "admission",
    "transfer": "transfer",
    "discharge": "discharge",
    "discharge_corrected": "corrected discharge",
}
#: Notices told again when the same thing happens again in one visit: each is news (a second
#: change of level of care; a discharge corrected once more), not a repeat.
TOLD_EACH_TIME = frozenset({"transfer", "discharge_corrected"})
#: What a recipient who wants discharge notices only is told.
DISCHARGE_NOTICES = frozenset({"discharge", "discharge_corrected"})
#: The role of a skilled nursing facility or home health agency a discharge sends the patient to.
POST_ACUTE = "post_acute"
ROLE_LABELS = {
    "pcp": "primary care practitioner",
    "care_coordinator": "care coordinator",
    "case_manager": "case manager",
    "behavioral_health": "behavioral health clinician",
    "post_acute": "post-acute care provider",
}
#: Channels that are not secure enough for more than the CMS minimum by default.
MINIMUM_BY_DEFAULT = {"sms"}
#: Statuses of a notification row whose recipient was told (or will be, in their digest).
TOLD = ("queued", "digest", "digested")
#: The recipient of a row that records an alert nobody could be sent.
NOBODY = "-"
#: The columns of such a row.
_NOBODY = {
    "message_id": None,
    "recipient": NOBODY,
    "role": None,
    "channel": None,
    "address": None,
    "status": "suppressed",
}


class NotifyConfig(BaseModel):
    """Options of a ``notify`` step. Besides unknown keys, a value that would quietly send
    more than asked for or tell nobody is an error: a ``detail`` for a channel the step does
    not have, a kind it cannot tell, a role the roster does not know."""

    model_config = ConfigDict(extra="forbid")

    channels: dict[str, dict[str, Any]] = Field(min_length=1)
    #: A folder of site templates (relative to the config folder); it must exist.
    templates: str | None = None
    #: The step's channel -> how much a notice on it says (each channel has a default).
    detail: dict[str, Literal["minimum", "full"]] = Field(default_factory=dict)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    digest_hour: int = Field(
        7, ge=0, le=23, description="the hour of the day daily digests go out, in timezone"
    )
    timezone: str = Field(
        "UTC",
        description="IANA time zone (America/Chicago) of digest_hour and of the digest's day",
    )
    #: Roster roles (carehub.care.roster.ROLES) that hear of overdue follow-ups.
    coordinator_roles: list[str] = Field(default_factory=lambda: ["care_coordinator"])
    #: The transitions told (carehub.care.model.NOTIFIABLE); cancels are always corrected.
    kinds: list[str] = Field(default_factory=lambda: list(NOTIFIABLE))
    #: Facility code (PV1-3.4, else MSH-4) -> the name notices give the sending institution.
    facilities: dict[str, str] = Field(default_factory=dict)

    @field_validator("detail")
    @classmethod
    def _detail_for_own_channels(
        cls, value: dict[str, str], info: ValidationInfo
    ) -> dict[str, str]:
        """A misspelt channel here would leave the real one at its default, which for email
        is the full text (diagnoses included)."""
        channels = info.data.get("channels")
        if channels is None:  # refused already; that error says why
            return value
        unknown = [key for key in value if key not in channels]
        if unknown:
            raise ValueError(
                "; ".join(
                    f"{key!r} is not a channel of this step ({_choices(channels)})"
                    for key in unknown
                )
            )
        return value

    @field_validator("coordinator_roles")
    @classmethod
    def _known_roles(cls, value: list[str]) -> list[str]:
        """A role no roster entry can have would send overdue alerts to nobody."""
        return _each_known("coordinator_roles", value, ROLES, "a roster role")

    @field_validator("kinds")
    @classmethod
    def _notifiable_kinds(cls, value: list[str]) -> list[str]:
        """A misspelt kind would tell nobody of that transition, and say nothing about it."""
        if not value:
            raise ValueError(f"name at least one kind to tell ({_choices(NOTIFIABLE)})")
        return _each_known("kinds", value, NOTIFIABLE, "a kind the notify step tells")

    @field_validator("timezone")
    @classmethod
    def _iana_zone(cls, value: str) -> str:
        """A zone this machine cannot find would stop every digest at the first tick."""
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            if not available_timezones():
                raise ValueError(
                    f"unknown time zone {value!r}: this machine has no IANA time zone database "
                    "(install the tzdata package)"
                ) from None
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name such as America/Chicago or UTC)"
            ) from None
        return value

    @field_validator("facilities")
    @classmethod
    def _codes_upper(cls, value: dict[str, str]) -> dict[str, str]:
        """Codes compare case-insensitively, as in the provider directory."""
        return {str(code).strip().upper(): name.strip() for code, name in value.items()}


def _each_known(option: str, given: list[str], known: Sequence[str], what: str) -> list[str]:
    """``given`` if every item is one of ``known``; else a ValueError naming each item that is
    not as ``option[index]`` (the route table reports each at its own line)."""
    problems = [
        f"{option}[{index}] {item!r} is not {what} ({_choices(known)})"
        for index, item in enumerate(given)
        if item not in known
    ]
    if problems:
        raise ValueError("; ".join(problems))
    return given


def _choices(known: Iterable[str]) -> str:
    return "one of: " + ", ".join(known)


@dataclass(slots=True)
class Decision:
    """One notification decided for one recipient (a notifications row)."""

    recipient: str
    role: str | None
    channel: str | None
    address: str | None
    kind: str
    status: str  # queued | digest | suppressed | retracted
    reason: str | None = None
    delivery_key: str | None = None

    def output(self) -> dict[str, Any]:
        return {
            "recipient": self.recipient,
            "role": self.role,
            "channel": self.channel,
            "kind": self.kind,
            "status": self.status,
            "reason": self.reason,
            "delivery_key": self.delivery_key,
        }


@dataclass(slots=True)
class _MemoryRows:
    """Notification rows for dry runs (no store): enough to show dedup and retraction."""

    rows: list[dict[str, Any]] = field(default_factory=list)


class Notifier:
    """Built once per notify step; plans deliveries while routing and sends digests and
    overdue follow-up alerts from tick()."""

    def __init__(
        self,
        route: str,
        config: NotifyConfig,
        destinations: dict[str, Any],
        context: ComponentContext,
    ) -> None:
        self.route = route
        self.config = config
        self.destinations = destinations  # recipient channel -> Destination
        self.context = context
        #: The route's care-team step, if it has one: the roster, for alerts about patients
        #: whose coordinators were never sent a notice (bound by routing.table).
        self.care_team: CareTeamEnricher | None = None
        self._memory = _MemoryRows()
        #: Where ``digest_hour`` is.
        self.zone = ZoneInfo(config.timezone)
        #: The zone notices give times in, when the step names one; else each time keeps the
        #: offset the hospital sent, labelled with it.
        self.notice_zone: ZoneInfo | None = (
            self.zone if "timezone" in config.model_fields_set else None
        )
        self.templates = MessageTemplates.from_folder(
            context, config.templates, BUILTIN_TEMPLATES, config.channels
        )

    # -- routing time ---------------------------------------------------------------------
    def plan(self, work: Work, run: int) -> tuple[list[PlannedDelivery], list[dict[str, Any]]]:
        transition = work.data.get("encounter")
        team = work.data.get("care_team")
        if not isinstance(transition, Transition):
            raise ValueError("notify needs the encounter-state enricher earlier in the route")
        if not isinstance(team, CareTeam):
            raise ValueError("notify needs the care-team enricher earlier in the route")
        message_id = work.message.id
        # By encounter too: notifications.message_id has no index, and a scan per message
        # made routing slow down as the table grew (the rows of a message share its encounter).
        existing = self._rows(encounter_id=transition.encounter_id, message_id=message_id)
        if existing:  # routed before (a crash between routing and its commit): same answer
            decisions = [_decision(row) for row in existing]
            return self._deliveries(work, transition, decisions, run), [
                d.output() for d in decisions
            ]
        decisions: list[Decision] = []
        retracted_kind = transition.retracts
        if retracted_kind:
            kinds = {retracted_kind}
            if retracted_kind == "discharge":
                # Whoever heard only of a correction of it (a facility it named) hears it
                # taken back too.
                kinds.add("discharge_corrected")
            if transition.state == "cancelled":
                # The whole visit was cancelled (an A11 for an ED registration or a direct
                # admission): take back everything told about it, not only an admission.
                kinds |= set(TOLD_OF_A_VISIT)
            decisions += self._retract(transition, kinds)
        elif transition.kind in self.config.kinds or (
            transition.kind == "discharge_corrected" and "discharge" in self.config.kinds
        ):
            # A corrected discharge (another disposition or destination) goes wherever a
            # discharge notice goes, and to whoever was told of the discharge and is no
            # longer on the team (a nursing facility the patient is not coming to after all).
            decisions += self._notify(transition, team)
        self._record(transition, message_id, decisions, work)
        return self._deliveries(work, transition, decisions, run), [d.output() for d in decisions]

    def _notify(self, transition: Transition, team: CareTeam) -> list[Decision]:
        kind = transition.kind
        decisions: list[Decision] = []
        opt_out = next((s.reason for s in team.suppressed if s.recipient_id is None), None)
        member_suppressed = {
            s.recipient_id: s.reason for s in team.suppressed if s.recipient_id is not None
        }
        earlier = self._rows(encounter_id=transition.encounter_id)
        told = {(row["recipient"], row["kind"]) for row in earlier if row["status"] in TOLD}
        for recipient in [*team.recipients, *_no_longer_listed(earlier, team)]:
            decision = Decision(
                recipient.id, recipient.role, recipient.channel, recipient.address, kind, "queued"
            )
            if opt_out:
                decision.status, decision.reason = "suppressed", f"patient opted out: {opt_out}"
            elif recipient.id in member_suppressed:
                decision.status, decision.reason = "suppressed", member_suppressed[recipient.id]
            elif (recipient.id, kind) in told and kind not in TOLD_EACH_TIME:
                # A transfer is only reported on a real change of level or facility, so a
                # second one in a stay is news (it used to be suppressed as a repeat).
                decision.status, decision.reason = "suppressed", "already told of this " + kind
            elif recipient.preference == "discharge_only" and kind not in DISCHARGE_NOTICES:
                decision.status, decision.reason = "suppressed", "prefers discharge notices only"
            elif recipient.channel not in self.destinations:
                decision.status = "suppressed"
                decision.reason = f"no {recipient.channel!r} channel on route {self.route!r}"
            elif recipient.preference == "daily_digest":
                decision.status = "digest"
            decisions.append(decision)
        listed = {r.id for r in team.recipients}
        for suppression in team.suppressed:
            if suppression.recipient_id is not None and suppression.recipient_id not in listed:
                decisions.append(
                    Decision(
                        suppression.recipient_id,
                        None,
                        None,
                        None,
                        kind,
                        "suppressed",
                        suppression.reason,
                    )
                )
        return decisions

    def _retract(self, transition: Transition, kinds: set[str]) -> list[Decision]:
        """Take back `kinds` from everyone told: a correction to those already sent a notice
        (now), a correction in the next digest to those who read it in a digest, and a quiet
        removal from digests not yet sent."""
        rows = [
            row
            for row in self._rows(encounter_id=transition.encounter_id)
            if row["kind"] in kinds and row["status"] in TOLD
        ]
        if transition.kind == "cancel_transfer" and rows:
            # An A12 undoes the last transfer only; earlier transfers were real.
            last = max(row["message_id"] or 0 for row in rows)
            rows = [row for row in rows if row["message_id"] == last]
        # One correction per recipient, even when a cancelled visit takes back several
        # notices (one delivery key per recipient and kind per message). A digest reader gets
        # theirs the way they asked to hear: in their daily digest.
        told: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for row in rows:
            was_sent = row["status"] in ("queued", "digested")
            in_digest = row["status"] == "digested"
            self._mark_retracted(row)
            if was_sent and row["channel"] in self.destinations:
                key = (row["recipient"], row["channel"], row["address"])
                told.setdefault(key, []).append({**row, "in_digest": in_digest})
        decisions: list[Decision] = []
        for (recipient, channel, address), items in told.items():
            ids = ", ".join(f"#{row['id']}" for row in items)
            in_digest = all(row["in_digest"] for row in items)
            decisions.append(
                Decision(
                    recipient,
                    items[0]["role"],
                    channel,
                    address,
                    "retraction",
                    "digest" if in_digest else "queued",
                    f"retracts notification {ids} ({items[0]['kind']})",
                )
            )
        return decisions

    def _deliveries(
        self, work: Work, transition: Transition, decisions: list[Decision], run: int
    ) -> list[PlannedDelivery]:
        planned = []
        for decision in decisions:
            if decision.status != "queued" or decision.channel not in self.destinations:
                continue
            destination = self.destinations[decision.channel]
            key = decision.delivery_key or _key(
                work.message.id, run, destination.name, decision, store_id_of(self.context)
            )
            decision.delivery_key = key
            context = self._template_context(work, transition, decision)
            subject, body = self.render(decision.kind, decision.channel or "", context)
            planned += self._planned(
                decision.kind,
                decision.channel or "",
                decision.address or "",
                subject,
                body,
                key,
                transition.patient_key,
                recipient_name=context["recipient"]["name"],
            )
        return planned

    def render(self, kind: str, channel: str, context: dict[str, Any]) -> tuple[str, str]:
        return self.templates.render(kind, channel, context)

    def _template_context(
        self, work: Work, transition: Transition, decision: Decision
    ) -> dict[str, Any]:
        event = _with_encounter_facts(work.event_json() or {}, transition.summary)
        context = self._event_context(event, decision.kind, transition.summary)
        default = "minimum" if decision.channel in MINIMUM_BY_DEFAULT else "full"
        detail = self.config.detail.get(decision.channel or "", default)
        team = work.data.get("care_team")
        member = next(
            (r for r in team.recipients if r.id == decision.recipient)
            if isinstance(team, CareTeam)
            else (),
            None,
        )
        if member is None or member.detail == "minimum":
            # The member asked for the minimum (never more on any channel), or the team no
            # longer lists them, so what they asked for is not known.
            detail = "minimum"
        followups = work.data.get("followups") or []
        context.update(
            kind=decision.kind,
            previous_discharge=self._previous_discharge(transition.summary),
            full=detail == "full",
            recipient=_recipient_context(decision, team),
            retracted_label=KIND_LABELS.get(_retracted_kind(decision.reason), "notification"),
            # follow-up-clock hands over FollowupItems (dicts accepted too): was dicts only,
            # so discharge notices never showed the due dates.
            # The follow-up clocks are the practice's work (TCM): a post-acute provider is
            # not sent the practice's deadlines.
            followups=[
                {
                    "kind": _field(f, "kind"),
                    "due": _local_day(_field(f, "due_at"), event, self.notice_zone),
                }
                for f in followups
            ]
            if decision.role != POST_ACUTE
            else [],
            followup_note=work.data.get("followup_note") if decision.role != POST_ACUTE else None,
        )
        return context

    def _previous_discharge(self, summary: dict[str, Any]) -> str | None:
        """What a corrected discharge said before (its disposition and destination, worded
        as a notice words them), for the correction to name; None for any other notice."""
        previous = summary.get("previous_discharge")
        if not isinstance(previous, dict):
            return None
        code = str(previous.get("disposition") or "").strip()
        label = DISPOSITIONS.get(code.zfill(2) if code.isdigit() else code)
        words = f"{code} ({label})" if label else code
        where = self._destination(previous.get("discharged_to"), None)
        said = " to ".join(part for part in (words, where) if part)
        was = previous.get("discharged_at")
        if was and was != summary.get("discharged_at"):
            local = _local_minute(was, summary.get("discharge_time"), self.notice_zone)
            said = f"{said} on {local}".strip()
        return said or None

    def _event_context(
        self,
        event: dict[str, Any],
        kind: str | None = None,
        summary: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``event_context`` with the institution by its name where ``facilities`` gives one,
        and where the patient went by the provider directory's name, with the code."""
        context = event_context(event, kind, summary, self.notice_zone)
        code = context["institution"]
        context["institution"] = self.config.facilities.get(code.strip().upper(), code)
        encounter = event.get("encounter") or {}
        context["discharged_to"] = self._destination(
            encounter.get("discharged_to"), encounter.get("discharged_to_name")
        )
        return context

    def _destination(self, code: str | None, name_sent: str | None) -> str | None:
        """Where a discharged patient went (PV1-37): the provider directory's name for the
        code with the code ("Maple Grove Skilled Nursing (MAPLEGROVE_SNF)"), else the name the
        message gave, else the code. A reader knows the facility, not the hospital's code."""
        directory = self.care_team.directory if self.care_team is not None else None
        entry = directory.by_code(code) if directory is not None and code else None
        name = entry.name if entry is not None else name_sent
        if name and code and name.strip().upper() != code.strip().upper():
            return f"{name} ({code})"
        return name or code

    # -- periodic -------------------------------------------------------------------------
    def tick(self, now: datetime) -> None:
        store = self.context.store
        if store is None:
            return
        self._send_digests(now)
        self._alert_overdue_followups(now)
        self._alert_overdue_referrals(now)

    def _send_digests(self, now: datetime) -> None:
        """At ``digest_hour`` in ``timezone``, one digest per reader and channel with
        everything held for them since the last one. It goes to the address the newest of
        those notices was decided for: a reader whose address changed during the day (a new
        inbox, a wrong one corrected) gets the whole day there, in one digest, rather than part
        of it at an address they may no longer read. The delivery key names the reader's day,
        so a second tick that day adds nothing; notices are marked digested only together
        with a digest put in the outbox then, so any that were not wait for the next one."""
        now = _aware(now)
        today = now.astimezone(self.zone).date()
        cutoff = datetime.combine(today, time(self.config.digest_hour), tzinfo=self.zone)
        if now < cutoff:
            return
        rows = [r for r in self._rows(status="digest") if _aware(r["created_at"]) < cutoff]
        by_reader: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in sorted(rows, key=lambda r: r["id"]):
            if row["channel"] in self.destinations:
                by_reader.setdefault((row["recipient"], row["channel"]), []).append(row)
        for (recipient, channel), items in by_reader.items():
            subject, body = self.render("digest", channel, {"items": self._digest_lines(items)})
            planned = self._planned(
                "digest",
                channel,
                items[-1]["address"],
                subject,
                body,
                _digest_key(today, recipient, channel, self.context),
                f"digest|{recipient}",
            )
            self._schedule(planned, items[-1]["message_id"], [r["id"] for r in items])

    def _digest_lines(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What a digest says of each notice it holds, as the immediate notice would have
        said it: from the facts the notice's message left (its transition summary), else,
        for want of those, from the visit as it is now."""
        told = self._told_facts(rows)
        snapshots = self._snapshots(
            {r["encounter_id"] for r in rows if (r["encounter_id"], r["message_id"]) not in told}
        )
        lines = []
        for row in rows:
            correction = row["kind"] == "retraction"
            kind = _retracted_kind(row["reason"]) if correction else row["kind"]
            summary = told.get((row["encounter_id"], row["message_id"]))
            if summary is not None:
                context = self._event_context(_event_of(summary), row["kind"], summary)
            else:
                context = self._event_context(snapshots.get(row["encounter_id"], {}), row["kind"])
            lines.append(
                {
                    "when": context["occurred_at"] or _received(row["created_at"], self.zone),
                    "label": KIND_LABELS.get(kind, kind or "notification"),
                    "correction": correction,
                    "died": kind in DISCHARGE_NOTICES and not correction and context["died"],
                    "patient_name": context["patient_name"],
                    "institution": context["institution"],
                }
            )
        return lines

    def _told_facts(self, rows: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, Any]]:
        """The transition summary each row's message left on its visit's timeline (what its
        notice was written from), by (encounter id, message id)."""
        store = self.context.store
        encounter_ids = {r["encounter_id"] for r in rows if r["encounter_id"] is not None}
        message_ids = {r["message_id"] for r in rows if r["message_id"] is not None}
        if store is None or not encounter_ids or not message_ids:
            return {}
        with store.engine.connect() as conn:
            events = conn.execute(
                select(
                    encounter_events.c.encounter_id,
                    encounter_events.c.message_id,
                    encounter_events.c.detail,
                ).where(
                    encounter_events.c.encounter_id.in_(encounter_ids),
                    encounter_events.c.message_id.in_(message_ids),
                )
            )
            found: dict[tuple[int, int], dict[str, Any]] = {}
            for event in events:
                detail = json.loads(event.detail) if event.detail else {}
                summary = (detail.get("result") or {}).get("summary")
                if isinstance(summary, dict):
                    found[(event.encounter_id, event.message_id)] = summary
            return found

    def _alert_overdue_followups(self, now: datetime) -> None:
        """Tell the care coordinators who were told of the discharge (else those the roster
        lists for the patient now), then mark the follow-up alerted: a crash in between alerts
        again rather than never, and the alert's delivery key (follow-up id + recipient) keeps
        a second attempt from sending twice. One with nobody to tell is not marked, as an
        overdue referral is not: the visit's timeline says why once (``_said_nobody``), and the
        alert goes at the first tick that finds someone (a coordinator added to the roster, a
        patient no longer opted out)."""
        from carehub.care.followup import FollowupClock

        clock = FollowupClock(self.context.store.engine)  # type: ignore[union-attr]
        told: list[int] = []
        for alert in clock.due_alerts(now):
            snapshot = self._snapshots({alert.encounter_id}).get(alert.encounter_id, {})
            # Read as a discharge notice reads it: when and how the patient left.
            context = self._event_context(snapshot, "discharge")
            still_open = [
                item
                for item in clock.find(encounter_id=alert.encounter_id)
                if item.id != alert.id and item.status in ("open", "overdue")
            ]
            context.update(
                followup_kind=_FOLLOWUP_LABELS.get(alert.kind, alert.kind),
                followup_id=alert.id,
                due=_local_day(alert.due_at, snapshot, self.notice_zone),
                discharged_at=context["occurred_at"],
                # The rest of the episode still owed, so one alert gives the whole picture.
                still_open=[
                    {
                        "id": item.id,
                        "kind": _FOLLOWUP_LABELS.get(item.kind, item.kind),
                        "due": _local_day(item.due_at, snapshot, self.notice_zone),
                    }
                    for item in still_open
                ],
                done_command=f"carehub followups done {alert.id}",
            )
            nobody = self._tell_coordinators(
                "followup_overdue",
                # Those told of the discharge the follow-up is due after, not of the visit's
                # other events: nobody is alerted about a discharge they never heard of.
                self._rows(encounter_id=alert.encounter_id, kind="discharge"),
                context,
                key_prefix=f"carehub-overdue-{alert.id}",
                patient_key=alert.patient_key,
                encounter_id=alert.encounter_id,
                about=alert.about,
                message_id=self._scalar(
                    select(encounters.c.last_message_id).where(
                        encounters.c.id == alert.encounter_id
                    )
                ),
            )
            if nobody is None:
                told.append(alert.id)
            elif not self._said_nobody(alert.encounter_id, nobody):
                self._record_nobody(
                    "followup_overdue", alert.patient_key, alert.encounter_id, nobody
                )
        if told:
            clock.mark_alerted(told, now)

    def _said_nobody(self, encounter_id: int, reason: str) -> bool:
        """Whether the visit's timeline already says that an overdue follow-up alert reached
        nobody for ``reason`` (which names the follow-up): it is tried again at every tick,
        and said once. Read through the notifications index by visit and recipient, so it
        costs the same at every tick."""
        rows = self._rows(encounter_id=encounter_id, recipient=NOBODY)
        return any(r["kind"] == "followup_overdue" and r["reason"] == reason for r in rows)

    def _record_nobody(
        self, kind: str, patient_key: str, encounter_id: int | None, reason: str
    ) -> None:
        """Record that an alert of ``kind`` reached nobody, and why."""
        row = {"encounter_id": encounter_id, "patient_key": patient_key, "kind": kind}
        self._insert_rows([{**row, **_NOBODY, "reason": reason}])

    def _alert_overdue_referrals(self, now: datetime) -> None:
        """A referral nobody answered in time: tell the patient's care coordinators (those
        told of any of the patient's visits, else the roster's), then mark the referral
        alerted. One with nobody to tell is not marked: its timeline says so once, and the
        alert goes at the first tick that finds someone (a coordinator added to the roster)."""
        from carehub.referrals.state import (
            ReferralTracker,
            inactive_warning,
            party_organization,
            referral_id_of,
            referral_recipients,
        )

        engine = self.context.store.engine  # type: ignore[union-attr]
        tracker = ReferralTracker(engine)
        told: list[int] = []
        for referral in tracker.overdue(now):
            patient_key = referral.patient_key or ""
            referred_to = referral.referred_to or {}
            holders = referral_recipients(referral, engine)
            context = self._event_context(referral.snapshot or {})
            context.update(
                status=referral.status,  # "received": answered pending, not yet accepted
                referral_id=referral_id_of(referral.referral_key),
                # Held: sent nowhere (nobody named, nothing matched), so nobody failed to answer.
                held=not holders,
                referred_to=(referred_to.get("organization") or {}).get("name")
                or ", ".join(holders)
                or "the service",
                # Made to a person by name (a specialist), not to an organisation.
                to_person=bool(referred_to.get("practitioner"))
                and not party_organization(referred_to),
                reason=referral.reason or "",
                # Sent to an organisation the directory lists as not active: due at once.
                inactive=inactive_warning(referral.matches) or "",
                due=_aware(referral.due_at).strftime("%Y-%m-%d %H:%M UTC")
                if referral.due_at
                else "",
            )
            nobody = self._tell_coordinators(
                "referral_overdue",
                self._rows(patient_key=patient_key),
                context,
                key_prefix=f"carehub-referral-overdue-{referral.id}",
                patient_key=patient_key,
                encounter_id=None,
                about=f"referral {referral_id_of(referral.referral_key)}",
                message_id=self._scalar(
                    select(func.max(referral_events.c.message_id)).where(
                        referral_events.c.referral_id == referral.id
                    )
                ),
            )
            if referral.id is None:
                continue
            if nobody is None:
                told.append(referral.id)
            elif tracker.note_unalerted(referral, nobody, now):
                # Once, as the referral's timeline says it: not again at every tick.
                self._record_nobody("referral_overdue", patient_key, None, nobody)
        if told:
            tracker.mark_alerted(told, now)

    def _tell_coordinators(
        self,
        kind: str,
        earlier: list[dict[str, Any]],
        context: dict[str, Any],
        *,
        key_prefix: str,
        patient_key: str,
        encounter_id: int | None,
        about: str,
        message_id: int | None,
    ) -> str | None:
        """Send `kind` to the care coordinators the roster lists for the patient now, at the
        address it gives now: a coordinator told earlier (`earlier` are notification rows)
        whom the roster no longer lists is not sent the patient's details again, and the
        visit's record says who was dropped and who was alerted instead. For a patient the
        roster does not list at all, those told earlier; else the roster's coordinators (one
        merged into a rostered patient since, one whose coordinator was added later), the
        alert going with ``message_id``. A patient who opted
        out (roster or message) is never the subject of an alert. Returns None when someone
        was told (queued), else why nobody was (naming ``about``): the caller records that
        once (``_record_nobody``) and leaves the alert to be tried again at the next tick, so
        it goes once someone can be told."""
        row = {"encounter_id": encounter_id, "patient_key": patient_key, "kind": kind}
        opted_out = self.care_team.opt_out(patient_key) if self.care_team is not None else None
        if opted_out is not None:
            # Nobody hears anything about an opted-out patient, not even those told before
            # the patient opted out.
            return f"{about}: {opted_out}"
        coordinators = {
            (r["recipient"], r["channel"], r["address"]): r
            for r in earlier
            if r["role"] in self.config.coordinator_roles
            and r["channel"] in self.destinations
            and r["status"] in TOLD
        }
        reason = f"no care coordinator on record for {about}"
        team: list[Recipient] = []
        if self.care_team is not None:
            team, _ = self.care_team.roster_team(patient_key, self.config.coordinator_roles)
        dropped: list[dict[str, Any]] = []
        if self.care_team is not None and self.care_team.roster_team(patient_key, ROLES)[0]:
            # The roster lists the patient: it says who coordinates their care now. One told
            # earlier whom it no longer lists (the patient moved to another practice) hears
            # nothing more about the patient; one it lists now is alerted, told before or not.
            listed = {member.id for member in team}
            dropped = [r for key, r in coordinators.items() if key[0] not in listed]
            told_before = {key[0]: r for key, r in coordinators.items() if key[0] in listed}
            anyone_before = bool(coordinators)
            coordinators = {}
            for member in team:
                if member.channel not in self.destinations or not member.address:
                    continue
                before = told_before.get(member.id)
                if before is not None:
                    told = {**before, "role": member.role, "added": False}
                elif message_id is not None:
                    told = {"message_id": message_id, "role": member.role}
                    told["added"] = anyone_before
                else:
                    continue
                coordinators[(member.id, member.channel, member.address)] = told
        if not coordinators and self.care_team is not None and message_id is not None:
            for member in team:
                if member.channel not in self.destinations or not member.address:
                    reason = (
                        f"{about}: care coordinator {member.id} has no address or no "
                        f"{member.channel!r} channel on route {self.route!r}"
                    )
                    continue
                told = {"message_id": message_id, "role": member.role}
                coordinators[(member.id, member.channel, member.address)] = told
        if not coordinators:
            return reason
        if dropped:
            now_listed = ", ".join(sorted({key[0] for key in coordinators}))
            self._insert_rows(
                [
                    {
                        **row,
                        "message_id": r["message_id"],
                        "recipient": r["recipient"],
                        "role": r["role"],
                        "channel": r["channel"],
                        "address": r["address"],
                        "status": "suppressed",
                        "reason": f"{about} overdue: no longer on the patient's care team "
                        f"(roster); alerted instead: {now_listed}",
                    }
                    for r in {r["recipient"]: r for r in dropped}.values()
                ]
            )
        for (recipient, channel, address), told in coordinators.items():
            role = told["role"] or ""
            subject, body = self.render(
                kind,
                channel,
                {
                    **context,
                    "full": self.config.detail.get(
                        channel, "minimum" if channel in MINIMUM_BY_DEFAULT else "full"
                    )
                    == "full",
                    "recipient": {
                        "id": recipient,
                        "role": role,
                        "role_label": ROLE_LABELS.get(role, role.replace("_", " ") or "a member"),
                    },
                },
            )
            key = key_of_this_store(f"{key_prefix}-{_safe(recipient)}", self.context)
            why = f"{about} overdue"
            if told.get("added"):
                why += " (on the roster's care team now; not told before)"
            self._insert_rows(
                [
                    {
                        **row,
                        "message_id": told["message_id"],
                        "recipient": recipient,
                        "role": told["role"],
                        "channel": channel,
                        "address": address,
                        "status": "queued",
                        "reason": why,
                        "delivery_key": key,
                    }
                ]
            )
            planned = self._planned(kind, channel, address, subject, body, key, patient_key)
            self._schedule(planned, told["message_id"])
        return None

    def _planned(
        self,
        kind: str,
        channel: str,
        address: str,
        subject: str,
        body: str,
        key: str,
        order_key: str,
        *,
        recipient_name: str | None = None,
    ) -> list[PlannedDelivery]:
        """The deliveries of one notice: one, or one per text when an SMS channel would
        otherwise cut the body at its ``max_length``. The first has ``key`` (the one the
        notification row names); the others ``key#2``, ``key#3``..."""
        destination = self.destinations[channel]
        sender = destination.channel
        texts = sender.as_texts(body) if isinstance(sender, SmsChannel) else [body]
        metadata = {"to": address, "subject": subject, "kind": kind}
        if recipient_name is not None:
            metadata["recipient_name"] = recipient_name
        return [
            PlannedDelivery(
                self.route,
                destination.name,
                sender.name,
                Outgoing(
                    text.encode("utf-8"),
                    "text/plain; charset=utf-8",
                    key if number == 1 else f"{key}#{number}",
                    dict(metadata),
                ),
                order_key,
                self.config.retry.max_attempts,
                give_up_after=self.config.retry.give_up_seconds,
            )
            for number, text in enumerate(texts, start=1)
        ]

    # -- persistence ----------------------------------------------------------------------
    def _record(
        self, transition: Transition, message_id: int, decisions: list[Decision], work: Work
    ) -> None:
        rows = [
            {
                "encounter_id": transition.encounter_id,
                "message_id": message_id,
                "patient_key": transition.patient_key,
                "recipient": d.recipient,
                "role": d.role,
                "channel": d.channel,
                "address": d.address,
                "kind": d.kind,
                "status": d.status,
                "reason": d.reason,
                "delivery_key": _key(
                    message_id,
                    1,
                    self.destinations[d.channel].name,
                    d,
                    store_id_of(self.context),
                )
                if d.status == "queued" and d.channel in self.destinations
                else None,
            }
            for d in decisions
        ]
        for row, decision in zip(rows, decisions, strict=True):
            decision.delivery_key = row["delivery_key"]
        self._insert_rows(rows)

    def _insert_rows(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        now = datetime.now(UTC)
        store = self.context.store
        if store is None:
            for row in rows:
                self._memory.rows.append(
                    {**row, "id": len(self._memory.rows) + 1, "created_at": now}
                )
            return
        with store.engine.begin() as conn:
            conn.execute(insert(notifications), [{**r, "created_at": now} for r in rows])

    def _rows(self, **where: Any) -> list[dict[str, Any]]:
        store = self.context.store
        if store is None:
            return [r for r in self._memory.rows if all(r.get(k) == v for k, v in where.items())]
        conditions = [getattr(notifications.c, k) == v for k, v in where.items()]
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(notifications).where(and_(*conditions)).order_by(notifications.c.id)
            )
            return [dict(r._mapping) for r in rows]

    def _scalar(self, query: Any) -> Any:
        store = self.context.store
        if store is None:
            return None
        with store.engine.connect() as conn:
            return conn.execute(query).scalar()

    def _mark_retracted(self, row: dict[str, Any]) -> None:
        store = self.context.store
        if store is None:
            row["status"] = "retracted"
            return
        with store.engine.begin() as conn:
            conn.execute(
                update(notifications)
                .where(notifications.c.id == row["id"])
                .values(status="retracted")
            )

    def _snapshots(self, encounter_ids: set[int]) -> dict[int, dict[str, Any]]:
        store = self.context.store
        if store is None or not encounter_ids:
            return {}
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(encounters.c.id, encounters.c.snapshot).where(
                    encounters.c.id.in_(encounter_ids)
                )
            )
            return {r.id: json.loads(r.snapshot) if r.snapshot else {} for r in rows}

    def _schedule(
        self,
        planned: list[PlannedDelivery],
        message_id: int | None,
        digested: Sequence[int] = (),
    ) -> bool:
        """Put the deliveries of a notice carehub itself decided on (a digest, an overdue
        alert) in the outbox, and mark the ``digested`` rows with the first one's key, all in
        one transaction. False, with nothing changed, when that key is there already (that
        day's digest went out): the rows then wait for the next digest rather than being
        marked as told in one that never held them."""
        store = self.context.store
        if store is None or message_id is None or not planned:
            return False
        first, *more = planned
        outbox = Outbox(store)
        with store.engine.begin() as conn:
            if not outbox.schedule(first, message_id, conn):
                return False
            for delivery in more:
                outbox.schedule(delivery, message_id, conn)
            if digested:
                conn.execute(
                    update(notifications)
                    .where(notifications.c.id.in_(digested))
                    .values(status="digested", delivery_key=first.outgoing.idempotency_key)
                )
        return True


#: The time a notice of each kind gives, from the transition summary: an ED arrival's PV1-44,
#: and the admission and discharge times as the encounter-state step judged them (an A01's
#: PV1-44, an A06's message time, PV1-45); other kinds, and these when the summary has none,
#: give when the message says it happened (EVN-2, else MSH-7).
_NOTICE_TIME = {
    "ed_arrival": "admit_time",
    "admission": "admitted_at",
    "discharge": "discharge_time",
    "discharge_corrected": "discharge_time",
}


#: How notices name a follow-up item's kind.
_FOLLOWUP_LABELS = {"contact": "interactive contact", "visit": "follow-up visit"}


def notice_time(kind: str | None, facts: dict[str, Any], zone: ZoneInfo | None = None) -> str:
    """When a notice of ``kind`` says it happened, from ``facts`` (a transition summary, or an
    event's times), with its zone: in ``zone`` ("2026-11-23 12:00 CST") when the notify step
    names one, else on the hospital's clock as its messages gave it, labelled with their offset
    ("2026-11-23 12:00 UTC-06:00"). A reader with hospitals on two clocks cannot tell an
    unlabelled time's zone. The immediate notice and the digest line read the same summary,
    so they agree."""
    moment = facts.get(_NOTICE_TIME.get(kind or "", "")) or facts.get("occurred_at") or ""
    return zoned_minute(moment, zone)


def zoned_minute(moment: Any, zone: ZoneInfo | None = None) -> str:
    """A time to the minute with its zone's abbreviation: converted to ``zone`` when given,
    else in the offset it carries; a time that carries none is given as it is."""
    text = str(moment or "")
    try:
        when = moment if isinstance(moment, datetime) else datetime.fromisoformat(text)
    except ValueError:
        return text[:16].replace("T", " ")
    if when.tzinfo is None:
        return text[:16].replace("T", " ")
    if zone is not None:
        when = when.astimezone(zone)
    return when.strftime("%Y-%m-%d %H:%M ") + (when.tzname() or "")


def event_context(
    event: dict[str, Any],
    kind: str | None = None,
    summary: dict[str, Any] | None = None,
    zone: ZoneInfo | None = None,
) -> dict[str, Any]:
    """Template variables from a care event (JSON form): the CMS minimum first. ``kind`` is
    the notice's, when it is not the event's own (a discharge an A08 brought); ``summary``
    the transition summary of the message, whose times the notice gives."""
    patient = event.get("patient") or {}
    name = patient.get("name") or {}
    encounter = event.get("encounter") or {}
    practitioner = encounter.get("attending") or encounter.get("admitting") or {}
    location = encounter.get("location") or {}
    diagnoses = [d.get("display") or d.get("code") for d in event.get("diagnoses") or []]
    disposition = (encounter.get("discharge_disposition") or "").strip()
    label = DISPOSITIONS.get(disposition.zfill(2) if disposition.isdigit() else disposition)
    # A discharge notice gives when the patient left (PV1-45), not when the message was sent:
    # an A03 sent on Monday for a Friday night discharge read as a Monday discharge.
    times = summary or {
        "occurred_at": event.get("occurred_at"),
        "admit_time": encounter.get("admit_time"),
        "discharge_time": encounter.get("discharge_time"),
    }
    return {
        "event": event,
        "patient_name": display_name(name) or "the patient",
        "birth_date": patient.get("birth_date"),
        "institution": encounter.get("facility") or event.get("sending_facility") or "the hospital",
        "practitioner": display_name(practitioner, with_prefix=True) or "",
        "occurred_at": notice_time(kind or event.get("kind"), times, zone),
        "location": " ".join(p for p in (location.get("point_of_care"), location.get("room")) if p),
        "reason": encounter.get("admit_reason"),
        "diagnoses": "; ".join(d for d in diagnoses if d),
        "disposition": f"{disposition} ({label})" if label else disposition or None,
        "died": disposition.zfill(2) in DIED if disposition.isdigit() else False,
        "discharged_to": encounter.get("discharged_to_name") or encounter.get("discharged_to"),
    }


def _with_encounter_facts(event: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The message's care event with the CMS minimum (patient name, treating practitioner,
    sending institution) and the diagnoses taken from what the encounter knows (a
    Transition summary) where the message leaves them out: an A03 often omits the PV1-7 that
    the admission sent."""
    patient = dict(event.get("patient") or {})
    encounter = dict(event.get("encounter") or {})
    if not patient.get("name") and summary.get("name"):
        patient["name"] = summary["name"]
    known_practitioner = summary.get("treating_practitioner")
    if not (encounter.get("attending") or encounter.get("admitting")) and known_practitioner:
        encounter["attending"] = known_practitioner
    if not encounter.get("facility") and summary.get("facility"):
        encounter["facility"] = summary["facility"]
    diagnoses = event.get("diagnoses") or summary.get("diagnoses") or []
    return {**event, "patient": patient, "encounter": encounter, "diagnoses": diagnoses}


def _event_of(summary: dict[str, Any]) -> dict[str, Any]:
    """A care event (JSON form) with what a transition summary says of the patient, the
    institution and the discharge, for ``event_context``."""
    return {
        "patient": {"name": summary.get("name")},
        "sending_facility": summary.get("sending_facility"),
        "encounter": {
            "facility": summary.get("facility"),
            "discharge_disposition": summary.get("disposition"),
            "discharged_to": summary.get("discharged_to"),
            "discharged_to_name": summary.get("discharged_to_name"),
        },
    }


def _received(created_at: datetime, zone: ZoneInfo) -> str:
    """When carehub heard of a notice, for a digest line whose message gave no time at all:
    labelled as such, with its zone, since every other line gives the hospital's clock."""
    return "received " + _aware(created_at).astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")


def _digest_key(day: date, recipient: str, channel: str, context: ComponentContext) -> str:
    """One digest per reader, channel and day (the reader's day, in the step's timezone)."""
    return key_of_this_store(
        f"carehub-digest-{day.isoformat()}-{_safe(recipient)}-{_safe(channel)}", context
    )


def _hospital_zone(*times: str | None) -> Any:
    """The hospital's UTC offset, from the first of ``times`` (as it sent them) that has one;
    None when none does. Times are stored in UTC, so a notice reads them back in this."""
    for text in times:
        try:
            zone = datetime.fromisoformat(text).tzinfo if text else None
        except (TypeError, ValueError):
            zone = None
        if zone is not None:
            return zone
    return None


def _local_day(due: Any, event: dict[str, Any], zone: ZoneInfo | None = None) -> str:
    """A due date as the hospital's calendar day: due times are stored in UTC, and the end of
    a local day is already the next day in UTC west of Greenwich. In ``zone`` when the notify
    step names one, else in the hospital's offset, taken from the event's own times."""
    if isinstance(due, str):
        try:
            due = datetime.fromisoformat(due)
        except ValueError:
            return due[:10]
    if not isinstance(due, datetime):
        return ""
    encounter = event.get("encounter") or {}
    zone = zone or _hospital_zone(encounter.get("discharge_time"), event.get("occurred_at"))
    return (_aware(due).astimezone(zone) if zone else _aware(due)).strftime("%Y-%m-%d")


def _local_minute(moment: str, local_example: str | None, zone: ZoneInfo | None = None) -> str:
    """A stored UTC time in ``zone`` when given, else as the hospital's clock reads it, its
    offset taken from another time the hospital sent (``local_example``); in UTC when that
    has none. Labelled with its zone either way."""
    try:
        when = _aware(datetime.fromisoformat(moment))
    except (TypeError, ValueError):
        return moment
    return zoned_minute(when, zone or _hospital_zone(local_example) or UTC)


def _no_longer_listed(earlier: list[dict[str, Any]], team: CareTeam) -> list[Recipient]:
    """Those told of this visit (``earlier`` are its notification rows) whom the care team no
    longer lists, e.g. the retired record's team after a merge: they hear of the visit's later
    events too, as before (immediately or in their digest), with the CMS minimum only, since
    what else they asked for is no longer on file."""
    listed = {r.id for r in team.recipients} | {s.recipient_id for s in team.suppressed}
    addresses = {(r.channel, r.address.strip().lower()) for r in team.recipients}
    found: dict[str, Recipient] = {}
    for row in earlier:
        if row["status"] not in TOLD or row["kind"] not in TOLD_OF_A_VISIT or not row["address"]:
            continue
        if row["recipient"] in listed or (row["channel"], row["address"].lower()) in addresses:
            continue
        found[row["recipient"]] = Recipient(
            id=row["recipient"],
            name=row["recipient"],
            role=row["role"] or "",
            channel=row["channel"],
            address=row["address"],
            preference="immediate" if row["status"] == "queued" else "daily_digest",
            detail="minimum",
        )
    return list(found.values())


def _recipient_context(decision: Decision, team: CareTeam | None) -> dict[str, Any]:
    member: Recipient | None = None
    if team is not None:
        member = next((r for r in team.recipients if r.id == decision.recipient), None)
    role = decision.role or ""
    return {
        "id": decision.recipient,
        # A name only as the roster or directory gives it: one no longer listed is addressed
        # by address alone, not by carehub's id for it ("facility:PRAIRIE_HHA").
        "name": member.name if member else None,
        "role": role,
        "role_label": ROLE_LABELS.get(role, role.replace("_", " ") or "a member of the care team"),
    }


def _field(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def _retracted_kind(reason: str | None) -> str:
    if reason and "(" in reason:
        return reason.rsplit("(", 1)[1].rstrip(")")
    return ""


def _decision(row: dict[str, Any]) -> Decision:
    return Decision(
        row["recipient"],
        row["role"],
        row["channel"],
        row["address"],
        row["kind"],
        row["status"],
        row["reason"],
        row["delivery_key"],
    )


def _key(message_id: int, run: int, destination: str, decision: Decision, store_id: str) -> str:
    key_of = f"{destination}/{decision.recipient}/{decision.kind}"
    return idempotency_key(message_id, run, key_of, store_id)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:60]


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
