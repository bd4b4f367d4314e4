"""The notify-referral step: tell the parties of a closed-loop referral, minimum necessary.

    - notify-referral:
        channels:                       # a recipient's channel -> how carehub sends on it
          email: {channel: email, host: smtp.example.org, sender: referrals@example.org}
          sms: {channel: sms, url: "${SMS_GATEWAY_URL}"}
        providers: care/providers.yaml  # the referring provider's channel, by NPI
        organizations:                  # where a CBO gets a new referral when HSDS has no email
          scfb: intake@foodbank.example.org         # by HSDS organization id ...
          Springfield Community Food Bank: intake@foodbank.example.org   # ... or by name
        templates: referrals/templates  # optional: overrides of the built-in texts
        tell: [referrer, organization]

Two gaps in the referral loop are closed here, both read from what earlier steps found
(``work.data["referral"]`` from referral-state, ``work.data["community_resources"]`` from
community-resources):

- **referrer**: when the receiving side's answer moved the referral
  (``ReferralTransition.notify_referrer``), the referring provider hears it on the channel the
  provider directory lists for the referring NPI. That is what "closing the loop" means. So
  does an answer carehub refused because the referral is cancelled while the organisation says
  it is working on it (``acted_on_cancelled``): the cancel did not stop them, and only the
  referrer can sort that out with them.
- **organization**: a new referral goes by email to the chosen community organisation: the one
  the referral names (PRD role RT), else the top ranked match; never a higher-ranked *other*
  organisation, since consent covers the one chosen. The rule is
  :func:`carehub.resources.matching.chosen_match`, which also picks the FHIR performer and Task
  owner, so both channels name the same organisation. The address is that organisation's match
  email (the service's, else its organisation's, from the HSDS directory) when it has one, else
  the ``organizations`` fallback for its id or name. A CBO is usually not a covered entity, so
  the text is the HIPAA minimum necessary for intake: the patient's name, date of birth and
  phone, the need *categories* (never the Z codes or any other diagnosis, never the free-text
  reason) of the needs its chosen service serves, as the FHIR copy's reasons are (never a need
  another organisation would serve), the referral id, the referrer's contact and the consent
  line. The consent line says only what the site recorded (``consent_reference`` /
  ``consent_note``, read as the FHIR copy reads them); without either it says plainly that
  consent was not stated. A referral that an answer or the referrer's cancel closed before it
  came (it overtook the I12: declined, cancelled) is sent to nobody
  (``ReferralTransition.sent_as_new``).
- **organization, later**: the organisations a referral was sent to (read from the outbox: the
  ``referral_new`` deliveries of the referral's earlier messages) hear of the referrer's
  accepted cancel (``referral_cancelled``: stop) and of a modify that changed something
  (``referral_changed``: what changed, in words, the priority, and the needs as above: those
  of its own service). A modify that names another organisation
  (``ReferralTransition.referred_to_before``) withdraws the referral from the one that had it
  (``referral_withdrawn``, without saying where it went) and sends it to the one named now as
  ``referral_new``. A dry run has no outbox: it remembers what it sent.

A notice to the referrer names who answered (:attr:`ReferralTransition.answered_by`: an RRI's
responding party or sender, a polled Task's owner), never simply the organisation the referral
named, and carries what they said (an RRI's NTEs, a webhook's or a Task's note). When carehub
does not know who answered (a webhook call with an intake token), it names the organisation
the referral is with, as that: "Eastside Neighbors Pantry (the organisation the referral is
with)". An answer that overtook its referral is told with the referral that it waited for
(:attr:`ReferralTransition.early_answer`).

A reprocessed message (``messages reprocess``) finds the transition its first run applied, not
the referral as it stands now, so a notice that an earlier run of the message made to the same
recipient about the same change (to the referrer, of the same kind; to an organisation, any of
its kinds, since the referral's standing then and now may word one change differently), and
that was delivered or is still on its way, is not made again (suppressed, with the reason):
the referrer is never told "accepted" after "completed", nor an organisation "updated" of the
move that sent it the referral.

Like the notify step, this only *plans* deliveries; the router commits them with the route and
the outbox sends them with retries. Nothing is written to ``notifications`` (that table is the
encounter notices' history): a referral notice is decided by one message, so the delivery key
(message id + routing run + destination + recipient + kind) is all the dedup it needs, and the
outbox refuses a key it already holds.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import jinja2
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from sqlalchemy import func, or_, select

from carehub.builtins.event_translator import translate_v2_to_event
from carehub.care.roster import DirectoryEntry, ProviderDirectory
from carehub.care.templating import MessageTemplates
from carehub.components import ComponentContext, Outgoing, Work
from carehub.referrals.fhir import consent_statement, needs_for, referral_record
from carehub.referrals.state import (
    SENT_AS_NEW_ACTIONS,
    SENT_KINDS,
    WITHDRAWN_KINDS,
    ReferralTransition,
    json_object,
    organizations_sent,
    party_recipient,
    referral_id_of,
)
from carehub.resources.matching import chosen_match, referred_to_name, same_organization
from carehub.routing.config import RetryPolicy
from carehub.routing.router import (
    PlannedDelivery,
    idempotency_key,
    key_of_this_store,
    order_key,
    store_id_of,
)
from carehub.store.outbox import Outbox
from carehub.store.schema import DeliveryStatus, deliveries, referral_events

__all__ = [
    "DEFAULT_TEMPLATES",
    "NoticeDecision",
    "ReferralNoticeConfig",
    "ReferralNotifier",
]

#: Built-in texts: ``<kind>.<channel>.txt`` wins over ``<kind>.txt``; a first line
#: ``Subject: ...`` is the subject. Kept here (not under care/templates) because they belong
#: to this step; a ``templates`` folder overrides them by name.
DEFAULT_TEMPLATES: dict[str, str] = {
    "referral_new.txt": """\
Subject: New referral {{ referral_id }} from {{ referrer.name }}
{{ organization }}:

{{ referrer.name }} has referred a patient to you.

Referral: {{ referral_id }}
Patient: {{ patient_name }}
Date of birth: {{ birth_date or "not given" }}
Phone: {{ phone or "not given" }}
Needs: {{ needs | join(", ") if needs else "not stated" }}

{% if consent.stated %}
Consent: {{ consent.text }}
{% else %}
Consent: NOT STATED. The referral does not say that the patient agreed to be referred to you.
Please confirm the patient's consent with {{ referrer.name }} before acting on it.
{% endif %}

Referrer contact: {{ referrer.name }}
{%- if referrer.organization %}, {{ referrer.organization }}{% endif %}
{%- if referrer.contact %} ({{ referrer.contact }}){% endif %}


Please tell the referrer whether you accept the referral, quoting referral {{ referral_id }}.
""",
    "referral_status.txt": """\
Subject: Referral {{ referral_id }} {{ status_label }} by {{ organization }}
{{ referrer.name }}:

{% set who = organization | sentence_start %}
{{ who }} has {{ status_verb }} your referral {{ referral_id }} for {{ patient_name }}
{%- if birth_date %} (born {{ birth_date }}){% endif %}.

Status: {{ status_label }}{% if from_label %} (was {{ from_label }}){% endif %}

{% if note %}

Note from {{ organization }}: {{ note }}
{% endif %}
""",
    # SMS is not a secure channel: no patient name or birth date, only what lets the
    # provider find the referral in their own records.
    "referral_status.sms.txt": """\
carehub: referral {{ referral_id }} {{ status_label }} by {{ organization }}. \
Details in your referral records.
""",
    # What the organisation that was sent a referral hears of the referrer's later messages:
    # only what it needs to act (stop, or look again), never the new reason's text.
    "referral_changed.txt": """\
Subject: Referral {{ referral_id }} updated by {{ referrer.name }}
{{ organization }}:

{{ referrer.name }} has updated referral {{ referral_id }} for {{ patient_name }}
{%- if birth_date %} (born {{ birth_date }}){% endif %}, which was sent to you.

Changed: {{ changed | join(", ") }}
{% if priority_label %}Priority: {{ priority_label }}
{% endif %}{% if needs %}Needs: {{ needs | join(", ") }}
{% endif %}

The referral still stands with you. Referrer contact: {{ referrer.name }}
{%- if referrer.organization %}, {{ referrer.organization }}{% endif %}
{%- if referrer.contact %} ({{ referrer.contact }}){% endif %}
""",
    "referral_cancelled.txt": """\
Subject: Referral {{ referral_id }} cancelled by {{ referrer.name }}
{{ organization }}:

{{ referrer.name }} has cancelled referral {{ referral_id }} for {{ patient_name }}
{%- if birth_date %} (born {{ birth_date }}){% endif %}, which was sent to you.

Please stop any work on it, and do not contact the patient about this referral.

Referrer contact: {{ referrer.name }}
{%- if referrer.organization %}, {{ referrer.organization }}{% endif %}
{%- if referrer.contact %} ({{ referrer.contact }}){% endif %}
""",
    "referral_withdrawn.txt": """\
Subject: Referral {{ referral_id }} withdrawn by {{ referrer.name }}
{{ organization }}:

{{ referrer.name }} has sent referral {{ referral_id }} for {{ patient_name }}
{%- if birth_date %} (born {{ birth_date }}){% endif %} to another organisation instead:
it no longer stands with you.

Please stop any work on it, and do not contact the patient about this referral.

Referrer contact: {{ referrer.name }}
{%- if referrer.organization %}, {{ referrer.organization }}{% endif %}
{%- if referrer.contact %} ({{ referrer.contact }}){% endif %}
""",
    "referral_after_cancel.txt": """\
Subject: Cancelled referral {{ referral_id }} reported {{ claimed_label }} by {{ organization }}
{{ referrer.name }}:

Your referral {{ referral_id }} for {{ patient_name }}
{%- if birth_date %} (born {{ birth_date }}){% endif %} was cancelled.
Since then, {{ organization }} has reported it {{ claimed_label }}.
They may be working on a referral that no longer stands; carehub keeps it cancelled.

Please contact {{ organization }} to confirm the cancellation,
or send a new referral if the patient still needs the service.
{% if note %}

Note from {{ organization }}: {{ note }}
{% endif %}
""",
    "referral_after_cancel.sms.txt": """\
carehub: referral {{ referral_id }} is cancelled, but {{ organization }} reports it \
{{ claimed_label }}. Please contact them. Details in your referral records.
""",
}

Party = Literal["referrer", "organization"]

#: A referral field a modify changed -> how the organisation's notice names it.
CHANGED_LABELS: dict[str, str] = {
    "priority": "priority",
    "type": "type of referral",
    "reason": "reason for referral",
    "referring": "referring provider",
    "referred_to": "receiving organisation",
    "patient_key": "patient identifier",
}
#: RF1-2 (HL7 table 0280) -> words.
PRIORITY_LABELS = {"S": "STAT", "A": "ASAP", "R": "routine"}
#: Without a store (a dry run): referral key -> {address: (recipient, name)} told so far.
_TOLD_MEMORY = "notify-referral:organisations-told"

#: Task status -> how a notice says it (FHIR's words are not always the ones people use).
STATUS_LABELS: dict[str, str] = {
    "received": "received",
    "accepted": "accepted",
    "rejected": "declined",
    "in-progress": "in progress",
    "on-hold": "on hold",
    "completed": "completed",
    "failed": "not completed",
    "cancelled": "cancelled",
    "requested": "sent",
}
STATUS_VERBS: dict[str, str] = {
    "received": "received",
    "accepted": "accepted",
    "rejected": "declined",
    "in-progress": "started work on",
    "on-hold": "put on hold",
    "completed": "completed",
    "failed": "could not complete",
    "cancelled": "cancelled",
}


class ReferralNoticeConfig(BaseModel):
    """Options of a ``notify-referral`` step (unknown keys are errors, as in every step).
    So is a setting that would leave a party it tells with no way to be told, or send a
    referral to an address chosen by which of two spellings of a name came last."""

    model_config = ConfigDict(extra="forbid")

    channels: dict[str, dict[str, Any]] = Field(min_length=1)
    #: Provider directory (see carehub.care.roster), relative to the config folder.
    providers: str | None = None
    #: Fallback address per HSDS organization id or organisation name (case-insensitive).
    organizations: dict[str, str] = Field(default_factory=dict)
    #: A folder of site templates (relative to the config folder); it must exist.
    templates: str | None = None
    #: The patient's consent as the site records it; the same two settings, read the same way
    #: (carehub.referrals.fhir.consent_statement), as on the fhir-referral forward, so the
    #: email and the FHIR copy of a referral say the same. Unset: "not stated".
    consent_reference: str | None = None
    consent_note: str | None = None
    tell: list[Party] = Field(
        default_factory=lambda: ["referrer", "organization"], min_length=1, validate_default=True
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    reload_seconds: float = Field(5.0, ge=0)

    @field_validator("organizations")
    @classmethod
    def _one_address_per_organisation(cls, value: dict[str, str]) -> dict[str, str]:
        """Keys compare case-insensitively, so two spellings of one organisation with
        different addresses would send to whichever came last; an address without an @ is a
        typo that would hold every referral to it in the dead letters."""
        problems = [
            f"{key!r}: {address!r} is not an email address"
            for key, address in value.items()
            if "@" not in address or len(address.split()) != 1
        ]
        seen: dict[str, tuple[str, str]] = {}
        for key, address in value.items():
            folded = key.strip().casefold()
            if folded in seen and seen[folded][1] != address.strip():
                problems.append(
                    f"{seen[folded][0]!r} and {key!r} name the same organisation (names "
                    "compare case-insensitively) with different addresses"
                )
            seen.setdefault(folded, (key, address.strip()))
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("tell")
    @classmethod
    def _each_party_can_be_told(cls, value: list[Party], info: ValidationInfo) -> list[Party]:
        """Organisations are told by email and referrers found in the provider directory: a
        party in ``tell`` the step cannot reach would never hear of a referral, silently."""
        channels = info.data.get("channels")
        if channels is None:  # refused already; that error says why
            return value
        if "organization" in value and "email" not in channels:
            raise ValueError(
                "organisations are told by email, but the step has no 'email' channel "
                f"(channels: {', '.join(channels)}); add one, or leave 'organization' out "
                "of tell"
            )
        if "referrer" in value and not info.data.get("providers"):
            raise ValueError(
                "referrers are found by NPI in the provider directory, but the step has no "
                "providers file; set providers, or leave 'referrer' out of tell"
            )
        return value


@dataclass(slots=True)
class NoticeDecision:
    """One party considered for one notice: queued (a delivery was planned) or suppressed,
    with the reason; the step's output, so a dry run shows why someone was not told."""

    recipient: str
    role: Party
    channel: str | None
    address: str | None
    #: referral_status | referral_after_cancel (to the referrer); referral_new,
    #: referral_changed, referral_cancelled, referral_withdrawn (to an organisation)
    kind: str
    status: str  # queued | suppressed
    reason: str | None = None
    delivery_key: str | None = None
    name: str = ""

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


class ReferralNotifier:
    """Built once per notify-referral step; the same ``plan``/``destinations``/``tick``
    surface as :class:`carehub.care.notify.Notifier`, so the router and the route table treat
    both alike."""

    def __init__(
        self,
        route: str,
        config: ReferralNoticeConfig,
        destinations: dict[str, Any],
        context: ComponentContext,
    ) -> None:
        self.route = route
        self.config = config
        self.destinations = destinations  # recipient channel -> Destination
        self.context = context
        self.directory: ProviderDirectory | None = None
        if config.providers:
            # Loaded now: a missing or broken directory is a start-up error, not a silent
            # "referrer not found" on every answer.
            self.directory = ProviderDirectory(
                context.path(config.providers), config.reload_seconds
            )
            self.directory.load()
        self._fallback = {k.strip().casefold(): v.strip() for k, v in config.organizations.items()}
        self.templates = MessageTemplates(
            context, config.templates, jinja2.DictLoader(DEFAULT_TEMPLATES), config.channels
        )

    # -- routing time ---------------------------------------------------------------------
    def plan(self, work: Work, run: int) -> tuple[list[PlannedDelivery], list[dict[str, Any]]]:
        """Deliveries for this message (none for most referral messages) and every decision."""
        transition = work.data.get("referral")
        if isinstance(transition, dict):
            transition = ReferralTransition.from_output(transition)
        if not isinstance(transition, ReferralTransition):
            raise ValueError(
                "notify-referral needs the referral-state enricher earlier in the route"
            )
        if self.directory is not None:
            self.directory.refresh()
        # Each decision with the transition its notice tells of.
        decisions: list[tuple[NoticeDecision, ReferralTransition]] = []
        # A refused update changed nothing, so nobody hears of it, except an organisation
        # working on a cancelled referral (acted_on_cancelled is only ever set on refusals).
        if "referrer" in self.config.tell and _tells_referrer(transition):
            decisions.append((self._referrer(transition), transition))
        early = _early_answer(transition)
        if "referrer" in self.config.tell and early is not None and _tells_referrer(early):
            # An answer that overtook its referral, applied once the referral came.
            decisions.append((self._referrer(early), early))
        if "organization" in self.config.tell:
            if transition.sent_as_new:
                decisions.append((self._organization(work, transition), transition))
            elif transition.action in SENT_AS_NEW_ACTIONS:
                decisions.append((self._closed_before_sent(work, transition), transition))
            elif transition.accepted and transition.action in ("modified", "cancelled"):
                decisions.extend(
                    (d, transition) for d in self._organizations_following(work, transition)
                )
        if run > 1:
            self._suppress_told_before(work, run, [d for d, _ in decisions])
        planned = [self._deliver(work, t, d, run) for d, t in decisions if _sendable(d)]
        if self.context.store is None:
            self._remember_told(transition, [d for d, _ in decisions])
        return planned, [d.output() for d, _ in decisions]

    def _suppress_told_before(self, work: Work, run: int, decisions: list[NoticeDecision]) -> None:
        """A reprocess (run > 1) finds the transition the first run applied, not the
        referral as it stands now: its notice would tell again what was told, and may be out
        of date (an "accepted" after the referral was completed). A notice an earlier run of
        this message made to the same recipient, of the same kind, delivered or still on its
        way, is not made again; one that was given up on (a dead letter, discarded) is."""
        store = self.context.store
        if store is None:
            return
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(deliveries.c.id, deliveries.c.run, deliveries.c.metadata)
                .where(
                    deliveries.c.message_id == work.message.id,
                    deliveries.c.route == self.route,
                    deliveries.c.run.between(1, run - 1),  # routing runs (0: carehub's own)
                    deliveries.c.status.in_(_TOLD),
                )
                .order_by(deliveries.c.id)
            ).all()
        told: dict[tuple[str, str], tuple[int, int]] = {}
        for row in rows:
            meta = json_object(row.metadata)
            told[(str(meta.get("recipient") or ""), _about(str(meta.get("kind") or "")))] = (
                row.id,
                row.run,
            )
        for decision in decisions:
            earlier = told.get((decision.recipient, _about(decision.kind)))
            if decision.status == "queued" and earlier is not None:
                decision.status = "suppressed"
                decision.reason = (
                    f"told by run {earlier[1]} of this message (delivery {earlier[0]}); a "
                    "reprocess does not tell it again"
                )

    def _organizations_following(
        self, work: Work, transition: ReferralTransition
    ) -> list[NoticeDecision]:
        """The organisations that were sent this referral hear of the referrer's change or
        cancel (they may be about to call the patient); one that the referral no longer names
        hears it is withdrawn, and the organisation it names now gets it as a new referral."""
        told = self._organizations_told(transition)
        if transition.action == "cancelled":
            return [self._told_again(r, a, n, "referral_cancelled") for r, a, n in told]
        if not transition.changed_fields:
            return []
        now_named = None
        if transition.referred_to_before is not None:
            now_named = referred_to_name(work.event) or _referred_to_org(transition.summary)
        if not now_named:
            return [self._told_again(r, a, n, "referral_changed") for r, a, n in told]
        decisions = [
            self._told_again(r, a, n, "referral_changed")
            if same_organization(n, now_named)
            else self._told_again(r, a, n, "referral_withdrawn")
            for r, a, n in told
        ]
        if not any(same_organization(n, now_named) for _, _, n in told):
            decisions.append(self._organization(work, transition))
        return decisions

    def _told_again(self, recipient: str, address: str, name: str, kind: str) -> NoticeDecision:
        decision = NoticeDecision(recipient, "organization", "email", None, kind, "suppressed")
        decision.name = name
        return self._route_to(decision, "email", address)

    def _organizations_told(self, transition: ReferralTransition) -> list[tuple[str, str, str]]:
        """(recipient, address, name) of each organisation sent this referral and not told
        since that it was withdrawn, oldest first: read from the outbox (what was planned for
        the referral's earlier messages), or without a store from this process's memory."""
        store = self.context.store
        if store is None:
            remembered = self.context.shared.get(_TOLD_MEMORY, {})
            told = remembered.get(transition.referral_key or "", {})
            return [(r, address, n) for address, (r, n) in told.items()]
        if transition.referral_id is None:
            return []
        return organizations_sent(store.engine, transition.referral_id)

    def _remember_told(
        self, transition: ReferralTransition, decisions: list[NoticeDecision]
    ) -> None:
        """A dry run's stand-in for the outbox (see _organizations_told)."""
        told = self.context.shared.setdefault(_TOLD_MEMORY, {})
        mine = told.setdefault(transition.referral_key or "", {})
        for decision in decisions:
            if decision.status != "queued" or decision.address is None:
                continue
            if decision.kind in SENT_KINDS:
                mine[decision.address] = (decision.recipient, decision.name)
            elif decision.kind in WITHDRAWN_KINDS:
                mine.pop(decision.address, None)

    def _referrer(self, transition: ReferralTransition) -> NoticeDecision:
        npi = _referring_npi(transition.summary)
        name = transition.summary.get("referring_name") or "the referring provider"
        decision = NoticeDecision(
            f"npi:{npi}" if npi else "referrer:unknown",
            "referrer",
            None,
            None,
            "referral_after_cancel" if transition.acted_on_cancelled else "referral_status",
            "suppressed",
            name=name,
        )
        if not npi:
            decision.reason = "the referral names no referring provider NPI"
            return decision
        entry = self.directory.by_npi(npi) if self.directory is not None else None
        if entry is None:
            decision.reason = f"referring NPI {npi} not in the provider directory"
            return decision
        decision.name = entry.name
        return self._route_to(decision, entry.channel, entry.address)

    def _organization(self, work: Work, transition: ReferralTransition) -> NoticeDecision:
        named = referred_to_name(work.event) or _referred_to_org(transition.summary)
        match = chosen_match(work.event, work.data.get("community_resources"))
        org_name = (match or {}).get("organization") or named
        org_id = (match or {}).get("organization_id")
        decision = NoticeDecision(
            f"org:{org_id or org_name or 'unknown'}",
            "organization",
            "email",
            None,
            "referral_new",
            "suppressed",
            name=org_name or "",
        )
        if not org_name and not org_id:
            person = party_recipient(transition.summary.get("referred_to"))
            if person:
                # Made to a person by name (a specialist, a health worker): it has gone to
                # them, and the directory has no address of theirs to email it to.
                decision.name = person
                decision.reason = f"names {person}, not an organisation: no address to email"
            else:
                decision.reason = (
                    "no community organisation chosen (no referred-to party, no match)"
                )
            return decision
        address = _match_email(match) or self._fallback_address(
            org_id, org_name, (match or {}).get("service_id")
        )
        if not address:
            decision.reason = (
                f"no email for {org_name or org_id}: none in the directory and no "
                "'organizations' fallback on the step"
            )
            return decision
        return self._route_to(decision, "email", address)

    def _closed_before_sent(self, work: Work, transition: ReferralTransition) -> NoticeDecision:
        """The organisation a new referral would go to, not told: what overtook the referral
        (the organisation's own answer declining it, the referrer's cancel) closed it."""
        decision = self._organization(work, transition)
        decision.status = "suppressed"
        decision.reason = (
            f"the referral is {STATUS_LABELS.get(transition.status or '', transition.status)} "
            "already (an answer or cancel that came before it closed it): not sent as new"
        )
        return decision

    def _route_to(self, decision: NoticeDecision, channel: str, address: str) -> NoticeDecision:
        decision.channel, decision.address = channel or None, address or None
        if not channel or not address:
            decision.reason = f"{decision.name} has no {channel or 'delivery'} address"
        elif channel not in self.destinations:
            decision.reason = f"no {channel!r} channel on the notify-referral step"
        else:
            decision.status = "queued"
        return decision

    def _fallback_address(self, *keys: str | None) -> str | None:
        for key in keys:
            if key and (found := self._fallback.get(key.strip().casefold())):
                return found
        return None

    def _deliver(
        self,
        work: Work,
        transition: ReferralTransition,
        decision: NoticeDecision,
        run: int,
        key: str | None = None,
    ) -> PlannedDelivery:
        assert decision.channel is not None and decision.address is not None
        destination = self.destinations[decision.channel]
        key = key or idempotency_key(
            work.message.id,
            run,
            f"{destination.name}/{decision.recipient}/{decision.kind}",
            store_id_of(self.context),
        )
        decision.delivery_key = key
        context = self._context(work, transition, decision)
        subject, body = self.render(decision.kind, decision.channel, context)
        metadata = {
            "to": decision.address,
            "subject": subject,
            "recipient": decision.recipient,
            "recipient_name": decision.name,
            "kind": decision.kind,
        }
        reply_to = context["referrer"].get("email")
        if decision.role == "organization" and reply_to:
            metadata["reply_to"] = reply_to  # the CBO's answer goes to the referrer
        return PlannedDelivery(
            route=self.route,
            destination=destination.name,
            channel=destination.channel.name,
            outgoing=Outgoing(body.encode("utf-8"), "text/plain; charset=utf-8", key, metadata),
            order_key=transition.patient_key or order_key(work.message),
            max_attempts=self.config.retry.max_attempts,
            give_up_after=self.config.retry.give_up_seconds,
        )

    def render(self, kind: str, channel: str, context: dict[str, Any]) -> tuple[str, str]:
        return self.templates.render(kind, channel, context)

    def _context(
        self, work: Work, transition: ReferralTransition, decision: NoticeDecision
    ) -> dict[str, Any]:
        """Template variables. Deliberately a short allow-list (no event, no diagnoses, no
        reason text): a template override cannot leak what it is never given."""
        summary = transition.summary
        patient = summary.get("patient") or {}
        event_patient = work.event.patient if work.event is not None else None
        status = transition.status or ""
        claimed = transition.to_status or ""
        if decision.role == "organization":
            organization = decision.name
        else:
            # Who answered, not whom the referral named: another organisation may answer (a
            # FHIR Task's owner, an RRI's sender), and the referrer must hear who it was.
            # When carehub does not know (a webhook call with an intake token), whom the
            # referral is with, said as that.
            organization = (
                transition.answered_by
                or _with_label(transition.sent_to)
                or "the receiving organisation"
            )
        if decision.role == "organization":
            # Only the needs its service in this referral serves, as the FHIR copy's reasons:
            # a food bank is not told of a housing need another organisation was chosen for.
            record = referral_record(self.context, transition.referral_key)
            found = needs_for(decision.name, work, record)
        else:
            found = (work.data.get("community_resources") or {}).get("needs") or []
        needs = [n.get("label") or n.get("category") for n in found if isinstance(n, dict)]
        return {
            "referral_id": summary.get("referral_id") or referral_id_of(transition.referral_key),
            "patient_name": summary.get("patient_name") or "the patient",
            "birth_date": patient.get("birth_date"),
            "phone": event_patient.phone if event_patient is not None else None,
            "needs": [n for n in needs if n],
            "organization": organization,
            "referrer": self._referrer_contact(summary),
            "status": status,
            "status_label": STATUS_LABELS.get(status, status.replace("-", " ")),
            "status_verb": STATUS_VERBS.get(status, f"updated ({status})"),
            "from_label": STATUS_LABELS.get(transition.from_status or "", ""),
            # What the organisation claimed, when carehub refused it (after a cancel).
            "claimed_label": STATUS_LABELS.get(claimed, claimed.replace("-", " ")),
            "note": _responder_note(work, transition),
            "changed": [CHANGED_LABELS.get(f, f) for f in transition.changed_fields],
            "priority_label": PRIORITY_LABELS.get(
                str(summary.get("priority") or ""), summary.get("priority") or ""
            ),
            "consent": consent_statement(self.config.consent_reference, self.config.consent_note),
        }

    def _referrer_contact(self, summary: dict[str, Any]) -> dict[str, Any]:
        """How the organisation reaches the referrer: the directory entry first (it is what the
        practice asked to be contacted on), else the phone or address sent in PRD."""
        practitioner = (summary.get("referring") or {}).get("practitioner") or {}
        npi = _referring_npi(summary)
        entry: DirectoryEntry | None = (
            self.directory.by_npi(npi) if self.directory is not None and npi else None
        )
        name = (entry.name if entry else None) or summary.get("referring_name") or "the referrer"
        organization = entry.organization if entry else ""
        email = entry.address if entry and entry.channel == "email" else None
        contact = email or (entry.address if entry and entry.channel == "sms" else None)
        if not contact:
            contact = practitioner.get("phone") or _one_line_address(practitioner.get("address"))
        return {"name": name, "organization": organization, "contact": contact, "email": email}

    def tick(self, now: datetime) -> None:
        """Answers that arrived without an HL7 message (POST /referrals/{key}/status, a
        polled FHIR Task) are told to the referrer here, as is such an answer refused because
        the referral is cancelled. The delivery key names the update, so each is told once
        however often this runs. (Overdue referrals are alerted by the notify step.)"""
        store = self.context.store
        if store is None or "referrer" not in self.config.tell:
            return
        since = now - ANSWER_LOOKBACK
        with store.engine.connect() as conn:
            answers = conn.execute(
                select(referral_events)
                .where(
                    referral_events.c.source.in_(("webhook", "fhir-task-poll")),
                    or_(
                        referral_events.c.accepted.is_(True),
                        referral_events.c.from_status == "cancelled",
                    ),
                    referral_events.c.at >= since,
                )
                .order_by(referral_events.c.id)
            ).all()
            # The referrer's first message of each referral (not an answer that came before
            # it, nor a merge that re-filed it).
            originals = {
                row.referral_id: row.first
                for row in conn.execute(
                    select(
                        referral_events.c.referral_id,
                        func.min(referral_events.c.message_id).label("first"),
                    )
                    .where(
                        referral_events.c.referral_id.in_({a.referral_id for a in answers}),
                        referral_events.c.source.like("REF^%"),
                    )
                    .group_by(referral_events.c.referral_id)
                )
            }
        outbox = Outbox(store)
        for answer in answers:
            detail = json.loads(answer.detail) if answer.detail else {}
            if "result" not in detail or originals.get(answer.referral_id) is None:
                continue
            transition = ReferralTransition.from_output(detail["result"])
            message = store.get(originals[answer.referral_id])
            if not _tells_referrer(transition) or message is None:
                continue
            work = Work(message=message, route=self.route, v2=message.text)
            with contextlib.suppress(Exception):  # the referral's own message, for context
                work.event = translate_v2_to_event(work.view)
            decision = self._referrer(transition)
            if _sendable(decision):
                # One key per update and recipient, whichever route's step gets there first.
                key = key_of_this_store(
                    f"carehub-referral-answer-{answer.id}-{decision.recipient}", self.context
                )
                planned = self._deliver(work, transition, decision, 0, key)
                outbox.schedule(planned, message.id)


#: How far back tick() looks for answers that came in over HTTP or a FHIR poll.
ANSWER_LOOKBACK = timedelta(days=2)


#: Deliveries that told their recipient, or are on their way to (see _suppress_told_before).
_TOLD = (
    DeliveryStatus.DELIVERED.value,
    DeliveryStatus.PENDING.value,
    DeliveryStatus.SENDING.value,
)


def _sendable(decision: NoticeDecision) -> bool:
    return decision.status == "queued"


#: What an organisation is told of one referral message: its notices are one account of that
#: message's change, whichever kind the referral's standing gave it then.
_ORGANIZATION_KINDS = frozenset(
    {"referral_new", "referral_changed", "referral_cancelled", "referral_withdrawn"}
)


def _about(kind: str) -> str:
    """What a notice tells of, for a reprocess to know it was told: an organisation's
    notices of one message are all one (a reprocessed modify that moved the referral finds
    the organisation it moved to holding it, and would tell it "updated" of the change it was
    sent as "new"); a referrer's, by kind."""
    return "organization" if kind in _ORGANIZATION_KINDS else kind


def _early_answer(transition: ReferralTransition) -> ReferralTransition | None:
    """The answer applied with a referral it had overtaken (ReferralTransition.early_answer)."""
    if not transition.early_answer:
        return None
    return ReferralTransition.from_output(transition.early_answer)


def _with_label(organizations: list[str]) -> str | None:
    """``Eastside Neighbors Pantry (the organisation the referral is with)``: for an answer
    whose sender carehub does not know, whom it can name, said as what it is."""
    if not organizations:
        return None
    if len(organizations) == 1:
        return f"{organizations[0]} (the organisation the referral is with)"
    return f"{', '.join(organizations)} (the organisations the referral is with)"


def _tells_referrer(transition: ReferralTransition) -> bool:
    """An answer that moved the referral, or one working on a referral already cancelled."""
    return transition.notify_referrer or transition.acted_on_cancelled


def _referring_npi(summary: dict[str, Any]) -> str | None:
    practitioner = (summary.get("referring") or {}).get("practitioner") or {}
    npi = str(practitioner.get("id") or "").strip()
    id_type = (practitioner.get("id_type") or "NPI").upper()
    return npi if npi and id_type == "NPI" else None


def _referred_to_org(summary: dict[str, Any]) -> str | None:
    """The organisation the referral itself names (PRD with role RT), if any."""
    organization = (summary.get("referred_to") or {}).get("organization") or {}
    name = organization.get("name")
    return name.strip() if isinstance(name, str) and name.strip() else None


def _match_email(match: dict[str, Any] | None) -> str | None:
    """The service's or its organisation's email, when the HSDS directory gives one."""
    if not match:
        return None
    for key in ("email", "organization_email"):
        value = match.get(key)
        if isinstance(value, str) and "@" in value:
            return value.strip()
    return None


def _responder_note(work: Work, transition: ReferralTransition) -> str | None:
    """What the receiving side said with its answer: a webhook's or a FHIR Task's note, or
    the NTEs of an RRI."""
    if transition.note:
        return transition.note
    if transition.answer_note:
        return transition.answer_note
    event = work.event
    if event is not None and event.kind == "referral_response" and event.referral is not None:
        return " ".join(n.strip() for n in event.referral.notes if n.strip()) or None
    return None


def _one_line_address(address: dict[str, Any] | None) -> str | None:
    if not address:
        return None
    parts = [address.get(k) for k in ("line1", "line2", "city", "state", "postal_code")]
    return ", ".join(p for p in parts if p) or None
