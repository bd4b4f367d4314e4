"""Dry runs: what would the routes do with this message, without storing or sending it."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

from carehub.hl7.ack import AckCode
from carehub.hl7.charsets import decode_message
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.intake.intake import Arrival, Intake, IntakeResult
from carehub.plugins import PluginHost
from carehub.routing.conditions import Check
from carehub.routing.router import Router, RoutingResult
from carehub.routing.table import RouteTable
from carehub.store.group_commit import Committed, GroupCommit
from carehub.store.schema import MessageStatus
from carehub.store.store import InsertOutcome, NewMessage, StoredMessage

#: How a dry run's message arrives. The checks that belong to MLLP alone (MLLP block bytes
#: in the message, UTF-16 and UTF-32) depend on the listener and are not applied.
#: A dry run shows what the routes do with a message, whatever its MSH-11: which processing IDs
#: a listener takes is intake's question, not the routes'.
DRY_RUN_ARRIVAL = Arrival(transport="dry-run", listener="dry-run", processing_ids=("P", "T", "D"))


@dataclass(slots=True)
class DryRunResult(RoutingResult):
    """What the routes would do with a message, and how the hub's intake would answer it.
    Only an AA message is routed: for AE or AR, ``routes`` is empty and ``refusal`` says
    why the hub would refuse it."""

    ack_code: str = AckCode.ACCEPT.value
    refusal: str | None = None

    @property
    def not_routed(self) -> str | None:
        """'not routed: the hub would answer AE: <reason>' for a message the hub would not
        route, else None."""
        if self.ack_code == AckCode.ACCEPT.value:
            return None
        return f"not routed: the hub would answer {self.ack_code}: {self.refusal}"


class _NothingStored(GroupCommit):
    """A writer for intake that stores nothing and takes every message as new, so the hub's
    own Intake decides AA, AE or AR for a dry run without a store."""

    def __init__(self) -> None:
        """No store and no counts: nothing is ever written."""

    def submit_soon(self, message: NewMessage, done: Committed) -> None:
        done(InsertOutcome(message_id=0, duplicate=False))


async def intake_answer(raw: bytes) -> IntakeResult:
    """How the hub's intake would answer these bytes (AA, AE or AR, and why), nothing stored."""
    return await Intake(_NothingStored()).receive(raw, DRY_RUN_ARRIVAL)


def preview_message(raw: bytes, message_id: int = 0) -> StoredMessage:
    """A StoredMessage built in memory from bytes intake accepts (AA), as the store would
    hold it: the row is made by the store's own NewMessage, so its patient (an identifier
    without an assigning authority keyed by the sending facility) and so the order keys of
    its deliveries are the ones real routing gives."""
    decoded = decode_message(raw)
    header = MessageHeader.read(MessageView(decoded.text))
    received = NewMessage(
        raw=raw,
        transport=DRY_RUN_ARRIVAL.transport,
        listener=DRY_RUN_ARRIVAL.listener,
        peer=None,
        status=MessageStatus.RECEIVED,
        ack_code=AckCode.ACCEPT.value,
        header=header,
        charset=decoded.charset,
        detail=decoded.warning,
        text=decoded.text,
    )
    return received.stored(message_id)


def dry_run_message_id(message: StoredMessage) -> int:
    """The id a dry run gives a message, in place of the store's row id: a number made from
    its identity as the store has it (MSH-3, MSH-4, MSH-10 and the content's hash, see
    StoredMessage.identity), so different messages get different idempotency keys
    (``carehub-ID-RUN-...``) and a resend (the same content, a new MSH-7, say) the original's,
    as on the hub. They are not the keys the hub gives the message, which are made from its
    row id and the store's own id."""
    digest = hashlib.sha256(message.identity.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:5], "big") or 1


def dry_run(table: RouteTable, host: PluginHost, raw: bytes) -> DryRunResult:
    """Route one message through the table with components started, nothing stored or sent."""
    return dry_run_all(table, host, [raw])[0]


def dry_run_all(table: RouteTable, host: PluginHost, payloads: list[bytes]) -> list[DryRunResult]:
    """Route messages in turn through the table, started once for all of them (starting loads
    rosters and directories and opens sessions: per message, a batch file took minutes).
    Runs its own event loop; from a coroutine, await dry_run_all_async instead."""
    return asyncio.run(dry_run_all_async(table, host, payloads))


async def dry_run_all_async(
    table: RouteTable, host: PluginHost, payloads: list[bytes]
) -> list[DryRunResult]:
    """dry_run_all on the running event loop (an async test's, say), where asyncio.run
    cannot be called. A message the hub's intake would refuse (AE) or reject (AR) goes
    through no route, as on the hub."""
    await table.start()
    try:
        router = Router(table, host)
        results = []
        for raw in payloads:
            # Steps run synchronously: without a turn of the loop between messages, a Ctrl-C
            # (asyncio.run cancels the main task) would land only after the last of them.
            await asyncio.sleep(0)
            answer = await intake_answer(raw)
            if answer.code is not AckCode.ACCEPT:
                results.append(
                    DryRunResult(
                        message_id=0,
                        run=0,
                        routes=[],
                        ack_code=answer.code.value,
                        refusal=answer.reason,
                    )
                )
                continue
            preview = preview_message(raw)
            preview = dataclasses.replace(preview, id=dry_run_message_id(preview))
            routed = router.route(preview, explain=True)
            results.append(DryRunResult(routed.message_id, routed.run, routed.routes))
        return results
    finally:
        await table.close()


def result_as_json(result: DryRunResult) -> dict[str, Any]:
    """The dry-run result as plain JSON: the hub's answer (``ack``, and ``not_routed`` when
    it is not AA), routes, why they matched, step outputs, deliveries."""
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
    found: dict[str, Any] = {"ack": result.ack_code}
    if result.not_routed:
        found["not_routed"] = result.not_routed
    return {**found, "matched": [r.route for r in result.matched], "routes": routes}


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
