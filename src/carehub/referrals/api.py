"""HTTP status updates for referrals: ``POST /referrals/{referral_key}/status``.

Many community organizations have no FHIR server and no HL7 interface, but can call a webhook
(or have a coordination platform call one) when they accept, start, or finish a referral. This
route feeds such an update to the same state machine as RRI messages and FHIR Task polls
(:meth:`ReferralTracker.advance`, source ``webhook``), so every path is checked by the same
transition rules and shows up on the same timeline.

Request: ``{"status": "accepted", "note": "intake call booked"}`` with ``status`` one of the
FHIR Task statuses carehub tracks (:data:`STATUSES`) and an optional ``note`` (kept on the
timeline). The referral key is ``authority|id`` as the referral-state step stores it (URL-encode
the bar as ``%7C``); a bare id is accepted when it is unambiguous.

Answers: 200 with the transition (also when nothing changed, ``changed: false``); 404 for an
unknown referral; 409 for a transition the rules refuse (e.g. ``completed -> accepted``) with
the reason, or for a bare id several senders' referrals have (an organisation gets 404); 422
for a body that is not a valid update; 401 without a valid bearer token; 503 when the store
cannot be reached. Refused updates are still recorded on the timeline, so what the other side
claimed is never lost.

Tokens: the intake tokens of ``POST /hl7`` (a trusted system, such as a coordination platform
acting for many organisations), or an organisation's own token
(``listeners.http.organization_tokens``). An organisation's token opens this route only, for
the referrals sent to that organisation (another's answers 404, as an unknown one, and nothing
is recorded), and its answers are recorded as that organisation's: the referrer is told who
answered. A community organisation is usually not a covered entity: a token that also let it
post HL7 into the hospital's feed, or answer for another organisation, would be a breach.

The answer leaves out the transition's ``summary`` (patient name, birth date, parties), its
``patient_key`` (the patient's MRN with its authority) and ``sent_to`` (whom else the referral
is with): the caller already knows the referral, and a status call should not hand back more
PHI, or more of the referral's parties, than it sent.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.exc import SQLAlchemyError

from carehub.errors import CarehubError
from carehub.intake.http import CLOSE, read_body
from carehub.referrals.state import (
    STATUSES,
    ReferralRecord,
    ReferralTracker,
    ReferralTransition,
    referral_recipients,
    referral_timeline,
)
from carehub.resources.matching import same_organization

if TYPE_CHECKING:
    from carehub.store.store import MessageStore

__all__ = ["StatusUpdate", "register_referral_routes"]

log = logging.getLogger(__name__)

SOURCE = "webhook"


#: Seconds between log lines about one organisation's refused status calls.
REFUSAL_REPORT_EVERY = 60.0

#: A status update is a status and a short note; a larger body is refused unread.
MAX_STATUS_UPDATE_BYTES = 64 * 1024


class StatusUpdate(BaseModel):
    """The body of a status update. Unknown keys are refused so a typo (``"stauts"``) is an
    error the caller sees, not an update that silently did nothing."""

    model_config = ConfigDict(extra="forbid")

    status: str
    note: str | None = Field(default=None, max_length=2000)

    @field_validator("status")
    @classmethod
    def _known_status(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        return value


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a status call: ``organization`` names the community organisation whose token
    it carried; None is a system holding an intake token (or any caller of an open API)."""

    organization: str | None = None


def _caller(request: Request, tokens: list[str], organizations: dict[str, str]) -> Caller | None:
    """The caller the bearer token stands for, or None (401). No token of either kind
    configured means open, as for /hl7; an intake token is a trusted system; an
    organisation's token is that organisation. Tokens are compared in constant time."""
    if not tokens and not organizations:
        return Caller()
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return None
    given = presented.encode()
    if any(hmac.compare_digest(given, token.encode()) for token in tokens):
        return Caller()
    for name, token in organizations.items():
        if hmac.compare_digest(given, token.encode()):
            return Caller(name)
    return None


def _sent_to(tracker: ReferralTracker, key: str, organization: str) -> bool:
    """Whether the referral went to this organisation (state.referral_recipients; names
    compared as everywhere, resources.matching.same_organization). The same reads are made
    whether or not the referral exists, so that the time a refusal takes does not tell a
    caller which of another organisation's referrals exist."""
    record = tracker.referral(key)
    now = datetime.now(UTC)
    probe = record or ReferralRecord(None, key, "", now, now)
    holders = referral_recipients(probe, tracker.engine)
    return record is not None and any(same_organization(h, organization) for h in holders)


#: Transition fields a status answer leaves out: the patient's identity and the referral's
#: parties (and whom else it is with) are not the caller's to learn from a status call.
_NOT_ANSWERED = ("summary", "patient_key", "sent_to")


def _public(transition: ReferralTransition) -> dict[str, Any]:
    out = transition.as_output()
    for name in _NOT_ANSWERED:
        out.pop(name, None)
    return out


def _resolve(tracker: ReferralTracker, key: str) -> str:
    """The stored key for what the caller sent: exact, else ``|id`` (no authority), else a
    bare id that only one referral has. Unknown keys come back unchanged, so the tracker
    records the refused update under the key the caller used."""
    if tracker.referral(key) is not None or "|" in key:
        return key
    if tracker.referral(f"|{key}") is not None:
        return f"|{key}"
    if tracker.engine is not None and not key.isdigit():  # digits alone would be a row id
        found = referral_timeline(tracker.engine, key)
        if found is not None:
            return found.referral.referral_key
    return key


def register_referral_routes(
    app: FastAPI,
    store: MessageStore | None,
    tokens: list[str],
    *,
    organizations: dict[str, str] | None = None,
    tracker: ReferralTracker | None = None,
) -> None:
    """Add ``POST /referrals/{referral_key}/status`` to ``app``.

    ``store`` is the hub's open store (its referral tables); ``tokens`` the HTTP listener's
    bearer tokens; ``organizations`` its organisation tokens (name -> token), each good for
    this route only and for the referrals sent to that organisation. ``tracker`` overrides the
    tracker built on ``store`` (tests, or a hub that shares one); with neither, updates go to
    an in-memory tracker and are lost on exit."""
    organizations = dict(organizations or {})
    refusals_logged: dict[str, float] = {}

    def refused_for(organization: str) -> JSONResponse:
        """As for an unknown referral: whether another organisation's referral exists is
        not this caller's to learn, and nothing is recorded against it. One WARNING per
        organisation a minute says it happens (a misconfigured caller, or one probing)."""
        now = time.monotonic()
        last = refusals_logged.get(organization)
        if last is None or now - last >= REFUSAL_REPORT_EVERY:
            refusals_logged[organization] = now
            log.warning(
                "referral status call refused: the referral was not sent to the calling "
                "organisation %r (logged at most once a minute per organisation)",
                organization,
            )
        return JSONResponse(
            {"error": "no such referral was sent to your organisation"}, status_code=404
        )

    if tracker is None:
        tracker = ReferralTracker(store.engine if store is not None else None)
    active = tracker

    @app.post(
        "/referrals/{referral_key:path}/status",
        summary="Report a referral's new status (FHIR Task status) from the receiving side",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": StatusUpdate.model_json_schema()}},
            }
        },
    )
    async def referral_status(referral_key: str, request: Request) -> JSONResponse:
        caller = _caller(request, tokens, organizations)
        if caller is None:
            return JSONResponse(
                {"error": "missing or invalid bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="carehub"'},
            )
        body, size = await read_body(request, MAX_STATUS_UPDATE_BYTES)
        if size > MAX_STATUS_UPDATE_BYTES:
            return JSONResponse(
                {"error": f"a status update is at most {MAX_STATUS_UPDATE_BYTES} bytes"},
                status_code=413,
                headers=CLOSE,
            )
        try:
            update = StatusUpdate.model_validate_json(body)
        except ValidationError as err:
            problems = [
                {"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
                for e in err.errors(include_url=False)
            ]
            return JSONResponse(
                {"error": "invalid status update", "problems": problems}, status_code=422
            )
        detail: dict[str, Any] = {"via": "http"}
        if update.note:
            detail["note"] = update.note
        if request.client is not None:
            detail["peer"] = request.client.host
        if caller.organization is not None:
            detail["answered_by"] = caller.organization  # the referrer hears who answered
        try:
            try:
                key = await asyncio.to_thread(_resolve, active, referral_key)
            except CarehubError as err:  # a bare id that several senders' referrals have
                if caller.organization is not None:
                    return refused_for(caller.organization)
                return JSONResponse({"error": str(err)}, status_code=409)
            if caller.organization is not None and not await asyncio.to_thread(
                _sent_to, active, key, caller.organization
            ):
                return refused_for(caller.organization)
            transition = await asyncio.to_thread(active.advance, key, update.status, SOURCE, detail)
        except SQLAlchemyError as err:
            log.warning("referral status update not recorded: store error: %s", err)
            return JSONResponse({"error": "the store is not reachable; retry"}, status_code=503)
        if transition.action == "other_organization" and caller.organization is not None:
            return refused_for(caller.organization)  # as above: not the caller's to learn
        body = _public(transition)
        if transition.action == "unknown_referral":
            return JSONResponse({"error": transition.reason, **body}, status_code=404)
        if not transition.accepted:
            return JSONResponse({"error": transition.reason, **body}, status_code=409)
        return JSONResponse(body, status_code=200)
