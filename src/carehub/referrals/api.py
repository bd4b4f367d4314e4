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
the reason; 422 for a body that is not a valid update; 401 without a valid bearer token (the
same tokens and header as ``POST /hl7``); 503 when the store cannot be reached. Refused updates
are still recorded on the timeline, so what the other side claimed is never lost.

The answer leaves out the transition's ``summary`` (patient name, birth date, parties) and its
``patient_key`` (the patient's MRN with its authority): the caller already knows the referral,
and a status call should not hand back more PHI than it sent.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.exc import SQLAlchemyError

from carehub.intake.http import CLOSE, read_body
from carehub.referrals.state import STATUSES, ReferralTracker, ReferralTransition, referral_timeline

if TYPE_CHECKING:
    from carehub.store.store import MessageStore

__all__ = ["StatusUpdate", "register_referral_routes"]

log = logging.getLogger(__name__)

SOURCE = "webhook"


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


def _authorized(request: Request, tokens: list[str]) -> bool:
    """The /hl7 rule: no tokens configured means open; else ``Authorization: Bearer <token>``
    matching one of them (compared in constant time)."""
    if not tokens:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    return any(hmac.compare_digest(presented.encode(), t.encode()) for t in tokens)


#: Transition fields a status answer leaves out: the patient's identity and the referral's
#: parties are not the caller's to learn from a status call.
_NOT_ANSWERED = ("summary", "patient_key")


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
    tracker: ReferralTracker | None = None,
) -> None:
    """Add ``POST /referrals/{referral_key}/status`` to ``app``.

    ``store`` is the hub's open store (its referral tables); ``tokens`` the HTTP listener's
    bearer tokens. ``tracker`` overrides the tracker built on ``store`` (tests, or a hub that
    shares one); with neither, updates go to an in-memory tracker and are lost on exit."""
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
        if not _authorized(request, tokens):
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
        try:
            key = await asyncio.to_thread(_resolve, active, referral_key)
            transition = await asyncio.to_thread(active.advance, key, update.status, SOURCE, detail)
        except SQLAlchemyError as err:
            log.warning("referral status update not recorded: store error: %s", err)
            return JSONResponse({"error": "the store is not reachable; retry"}, status_code=503)
        body = _public(transition)
        if transition.action == "unknown_referral":
            return JSONResponse({"error": transition.reason, **body}, status_code=404)
        if not transition.accepted:
            return JSONResponse({"error": transition.reason, **body}, status_code=409)
        return JSONResponse(body, status_code=200)
