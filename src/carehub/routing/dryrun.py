"""Dry runs: what would the routes do with this message, without storing or sending it."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from typing import Any

from carehub.hl7.charsets import decode_message
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.plugins import PluginHost
from carehub.routing.conditions import Check
from carehub.routing.router import Router, RoutingResult
from carehub.routing.table import RouteTable
from carehub.store.schema import MessageStatus
from carehub.store.store import StoredMessage


def preview_message(raw: bytes, message_id: int = 0) -> StoredMessage:
    """A StoredMessage built in memory from bytes, as intake would have stored it."""
    decoded = decode_message(raw)
    header = MessageHeader.read(MessageView(decoded.text))
    now = datetime.now(UTC)
    patient = header.patient
    return StoredMessage(
        id=message_id,
        received_at=now,
        transport="dry-run",
        listener="dry-run",
        peer=None,
        raw=raw,
        size=len(raw),
        charset=decoded.charset,
        sending_application=header.sending_application,
        sending_facility=header.sending_facility,
        receiving_application=header.receiving_application,
        receiving_facility=header.receiving_facility,
        message_type=header.message_type or None,
        trigger_event=header.trigger_event or None,
        structure=header.structure or None,
        control_id=header.control_id or None,
        version=header.version or None,
        patient_id=patient.value if patient else None,
        patient_authority=patient.authority if patient else None,
        ack_code="AA",
        status=MessageStatus.RECEIVED.value,
        status_at=now,
        detail=None,
    )


def dry_run(table: RouteTable, host: PluginHost, raw: bytes) -> RoutingResult:
    """Route one message through the table with components started, nothing stored or sent."""
    return dry_run_all(table, host, [raw])[0]


def dry_run_all(table: RouteTable, host: PluginHost, payloads: list[bytes]) -> list[RoutingResult]:
    """Route messages in turn through the table, started once for all of them (starting loads
    rosters and directories and opens sessions: per message, a batch file took minutes).
    Runs its own event loop; from a coroutine, await dry_run_all_async instead."""
    return asyncio.run(dry_run_all_async(table, host, payloads))


async def dry_run_all_async(
    table: RouteTable, host: PluginHost, payloads: list[bytes]
) -> list[RoutingResult]:
    """dry_run_all on the running event loop (an async test's, say), where asyncio.run
    cannot be called."""
    await table.start()
    try:
        router = Router(table, host)
        return [router.route(preview_message(raw), explain=True) for raw in payloads]
    finally:
        await table.close()


def result_as_json(result: RoutingResult) -> dict[str, Any]:
    """The dry-run result as plain JSON: routes, why they matched, step outputs, deliveries."""
    routes = []
    for route in result.routes:
        routes.append(
            {
                "route": route.route,
                "matched": route.matched,
                "checks": [_check_json(c) for c in route.checks],
                "steps": [
                    {
                        "position": s.position,
                        "step": s.step,
                        "outcome": s.outcome,
                        "output": s.output,
                    }
                    for s in route.steps
                ],
                "deliveries": [
                    {
                        "destination": d.destination,
                        "channel": d.channel,
                        "idempotency_key": d.outgoing.idempotency_key,
                        "content_type": d.outgoing.content_type,
                        "metadata": d.outgoing.metadata,
                        **_payload(d.outgoing.payload, d.outgoing.content_type),
                    }
                    for d in route.deliveries
                ],
                "error": route.error,
            }
        )
    return {"matched": [r.route for r in result.matched], "routes": routes}


def _check_json(check: Check) -> dict[str, Any]:
    """One condition as JSON; ``at`` (where a ``[*]`` path held) only when there is one."""
    found: dict[str, Any] = {
        "condition": check.what,
        "value": check.value,
        "expected": check.expected,
        "passed": check.passed,
    }
    if check.at:
        found["at"] = check.at
    return found


def _payload(payload: bytes, content_type: str) -> dict[str, str]:
    textual = content_type.startswith(("text/", "application/json", "x-application/hl7"))
    if textual:
        try:
            return {"payload": payload.decode("utf-8")}
        except UnicodeDecodeError:
            pass
    return {"payload_base64": base64.b64encode(payload).decode("ascii")}
