"""Terminal rendering of stored messages (rich tables), for `carehub messages list|show`."""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from carehub.config import without_password
from carehub.hl7.fieldnames import field_name
from carehub.hl7.view import MessageView, NotHL7Error
from carehub.store.outbox import EARLY_FAILURE, AttemptRow, DeliveryRecord, Discard, StepRow
from carehub.store.schema import UNFINISHED
from carehub.store.store import StatusChange, StoredMessage
from carehub.timespans import span_text

if TYPE_CHECKING:
    from carehub.routing.dryrun import DryRunResult

#: Columns for output that goes to a pipe or a file rather than a terminal.
PIPE_WIDTH = 200


def new_console(pipe_width: int = PIPE_WIDTH) -> Console:
    """Made per command, so the terminal width (or $COLUMNS) is read when it runs. Piped into
    grep, a file, CI or cron, rich would wrap at 80 columns and cut destination names, dates
    and errors mid-word; such output gets ``pipe_width`` columns instead."""
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    return Console(highlight=False, soft_wrap=False, width=None if wide else pipe_width)


_console = new_console()
#: Delivery statuses a time limit still applies to: waiting for an attempt, or being sent.
_WAITING = frozenset(status.value for status in UNFINISHED)


def attempts_text(delivery: DeliveryRecord, early: int = 0) -> str:
    """``2/5``, and ``2/5 (+1 early)`` when attempts made early as the destination seemed
    back failed: those are in the history but not in the count against the limit. With no
    count limit, ``2`` when a time limit applies (see give_up_text) and ``2/forever`` when
    none does."""
    attempts, limit = delivery.attempts, delivery.max_attempts
    if limit:
        counted = f"{attempts}/{limit}"
    else:
        counted = str(attempts) if delivery.give_up_after else f"{attempts}/forever"
    return f"{counted} (+{early} early)" if early else counted


def _after_comma(text: str) -> str:
    return f", {text}" if text else ""


def give_up_text(delivery: DeliveryRecord) -> str:
    """When a waiting delivery that goes on failing becomes a dead letter by its time limit:
    ``gives up at 2026-12-08 09:00 UTC`` once a run of failures has begun, else ``gives up
    after 24h of failing``; empty with no time limit, and for a finished delivery."""
    if not delivery.give_up_after or delivery.status not in _WAITING:
        return ""
    if delivery.failing_since is None:
        return f"gives up after {span_text(delivery.give_up_after)} of failing"
    deadline = delivery.failing_since + timedelta(seconds=delivery.give_up_after)
    return f"gives up at {deadline.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


#: Dead letters holding a waiting delivery's line, by the waiting delivery's id, each as
#: (delivery id, message id, destination), oldest first (Outbox.holding).
Holders = Mapping[int, list[tuple[int, int, str]]]


def held_text(delivery: DeliveryRecord, holders: list[tuple[int, int, str]]) -> str:
    """Why a waiting delivery is not sent, and what lets it go: ``held behind dead letter #N
    (message M): carehub dead-letters retry|discard N``. A holder of another destination (its
    line is shared by forwards that reach one receiving system) is named with it."""
    named = ", ".join(
        f"#{dead_id}"
        + (f" to {destination}" if destination != delivery.destination else "")
        + f" (message {message_id})"
        for dead_id, message_id, destination in holders
    )
    ids = " ".join(str(dead_id) for dead_id, _, _ in holders)
    noun = "dead letter" if len(holders) == 1 else "dead letters"
    return f"held behind {noun} {named}: carehub dead-letters retry|discard {ids}"


def _early_count(attempts: list[AttemptRow]) -> int:
    return sum(1 for attempt in attempts if attempt.outcome == EARLY_FAILURE)


def short_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else ""


def _type_of(message: StoredMessage) -> str:
    if not message.message_type:
        return "-"
    return (
        f"{message.message_type}^{message.trigger_event}"
        if message.trigger_event
        else message.message_type
    )


def message_table(found: list[StoredMessage]) -> None:
    table = Table(show_edge=False, header_style="bold")
    for column in ("id", "received (UTC)", "via", "type", "control id", "patient", "ack", "status"):
        table.add_column(column)
    for m in found:
        patient = (
            f"{m.patient_id}^{m.patient_authority}" if m.patient_authority else (m.patient_id or "")
        )
        table.add_row(
            str(m.id),
            m.received_at.strftime("%Y-%m-%d %H:%M:%S"),
            f"{m.transport}:{m.listener}",
            _type_of(m),
            m.control_id or "",
            patient,
            m.ack_code,
            m.status,
        )
    _console.print(table)
    _console.print(f"{len(found)} message(s)")


def show_message(
    message: StoredMessage,
    history: list[StatusChange],
    steps: list[StepRow] | None = None,
    sent: list[tuple[DeliveryRecord, list[AttemptRow]]] | None = None,
    *,
    full: bool = False,
    payloads: bool = False,
    held: Holders | None = None,
) -> None:
    """`carehub messages show`: compact by default (step outputs cut short, no payloads);
    ``full`` prints each step's output whole, ``payloads`` what each delivery sent; ``held``
    names the dead letters a waiting delivery is held behind."""
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    facts = [
        ("id", str(message.id)),
        ("received", message.received_at.isoformat()),
        ("via", f"{message.transport} listener '{message.listener}' from {message.peer or '-'}"),
        ("sending", f"{message.sending_application or ''} / {message.sending_facility or ''}"),
        (
            "receiving",
            f"{message.receiving_application or ''} / {message.receiving_facility or ''}",
        ),
        ("type", f"{_type_of(message)} {message.structure or ''}".strip()),
        ("control id", message.control_id or "-"),
        ("version", message.version or "-"),
        ("patient", f"{message.patient_id or '-'} (authority {message.patient_authority or '-'})"),
        ("size", f"{message.size:,} bytes, {message.charset or 'unknown charset'}"),
        ("ack", message.ack_code),
        ("status", message.status),
    ]
    for name, value in facts:
        header.add_row(name, Text(value))
    _console.print(header)

    _console.print("\n[bold]History[/bold]")
    for change in history:
        detail = f"  {change.detail}" if change.detail else ""
        stamp = change.at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        _console.print(Text(f"  {stamp}  {change.event}{detail}"))

    if steps:
        _console.print("\n[bold]Route steps[/bold]")
        cut = False
        for step in steps:
            line = f"  run {step.run}  {step.route} #{step.position} {step.step}: {step.outcome}"
            if not full:
                output = _short(step.output)
                cut = cut or output != _short(step.output, sys.maxsize)
                _console.print(Text(f"{line}  {output}"))
                continue
            _console.print(Text(line))
            if step.output is not None:
                whole = json.dumps(step.output, indent=2, default=str, ensure_ascii=False)
                _print_block(terminal_text(whole), "      ")
        if cut:
            _console.print(Text("  (outputs cut short: --full shows them whole)", style="dim"))
    if sent:
        _console.print("\n[bold]Deliveries[/bold]")
        for delivery, attempts in sent:
            early = _early_count(attempts)
            _console.print(
                Text(
                    f"  #{delivery.id} {delivery.destination} ({delivery.channel}) "
                    f"{delivery.status}, "
                    f"{attempts_text(delivery, early)} attempts"
                    f"{_after_comma(give_up_text(delivery))}, "
                    f"key {delivery.idempotency_key}, "
                    f"{len(delivery.payload):,} bytes {delivery.content_type}"
                )
            )
            holders = (held or {}).get(delivery.id)
            if holders:
                _console.print(Text(f"      {held_text(delivery, holders)}"))
            for attempt in attempts:
                stamp = attempt.started_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
                outcome = attempt.outcome
                if outcome == EARLY_FAILURE:  # in the history, not in the count
                    outcome += " (not counted)"
                _console.print(
                    Text(
                        f"      attempt {attempt.number} {stamp} {attempt.duration_ms} ms "
                        f"{outcome}: {without_password(attempt.detail or '')}"
                    )
                )
            if payloads:
                _print_payload(delivery)
        if not payloads:
            _console.print(Text("  (--payload shows what each one sends)", style="dim"))

    _console.print("\n[bold]Message[/bold]")
    try:
        view = MessageView(message.text)
    except NotHL7Error:
        _console.print("(not an HL7 v2 message; raw text follows)")
        _console.print(Text(message.text))
        return
    version = message.version or "2.5"
    for position in range(len(view.segments)):
        fields = view.fields(position)
        name = fields[0]
        _console.print(f"[bold cyan]{name}[/bold cyan]")
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True)
        table.add_column(no_wrap=True, style="dim")
        table.add_column(overflow="fold")
        for number in range(1, len(fields)):
            value = fields[number]
            if value == "":
                continue
            table.add_row(f"{name}-{number}", field_name(name, number, version) or "", Text(value))
        _console.print(table)


# -- delivery payloads -----------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class PayloadView:
    """A delivery's payload as a person reads it: its text, or None when it is binary."""

    text: str | None
    charset: str | None = None
    note: str | None = None  # how the text was read, when that is worth saying


#: A charset parameter in a Content-Type.
_CHARSET_PARAM = re.compile(r";\s*charset\s*=\s*\"?([^\";\s]+)", re.IGNORECASE)
#: Control characters a terminal could act on; line breaks and tabs are not among them.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_V2_STARTS = (b"MSH", b"FHS", b"BHS", b"\xef\xbb\xbfMSH")


def payload_view(payload: bytes, content_type: str) -> PayloadView:
    """Decode a payload as its receiver reads it: HL7 v2 by its MSH-18 (the character set the
    channel encoded it in), anything else by its Content-Type's charset, else as UTF-8.
    Bytes that do not decode, or that hold NUL, are binary."""
    from carehub.hl7.charsets import decode_message

    if "hl7-v2" in content_type.lower() or payload.startswith(_V2_STARTS):
        decoded = decode_message(payload)
        if "\x00" in decoded.text:
            return PayloadView(None)
        return PayloadView(decoded.text, decoded.charset, decoded.warning)
    found = _CHARSET_PARAM.search(content_type)
    charset = found.group(1) if found else "utf-8"
    try:
        text = payload.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return PayloadView(None)
    return PayloadView(None) if "\x00" in text else PayloadView(text, charset)


def terminal_text(text: str) -> str:
    """Text safe to print on a terminal: each segment (CR) on a line of its own, and any other
    control character written as an escape (\\x1b), so that it cannot act on the terminal."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", lines)


def _print_payload(delivery: DeliveryRecord) -> None:
    view = payload_view(delivery.payload, delivery.content_type)
    if view.text is None:
        size = len(delivery.payload)
        _console.print(Text(f"      payload: binary, {size:,} bytes, as base64:"))
        _print_block(base64.encodebytes(delivery.payload).decode("ascii"), "        ")
        return
    about = view.charset or "text"
    _console.print(Text(f"      payload ({about}{f'; {view.note}' if view.note else ''}):"))
    _print_block(terminal_text(view.text), "        ")


def _print_block(text: str, prefix: str) -> None:
    """Lines printed whole, indented: never wrapped by the console, so that a payload or an
    output copied from the screen (or a pipe) is what was stored."""
    for line in text.rstrip("\n").split("\n"):
        _console.print(Text(prefix + line), soft_wrap=True)


def message_json(
    message: StoredMessage,
    history: list[StatusChange],
    steps: list[StepRow],
    sent: list[tuple[DeliveryRecord, list[AttemptRow]]],
    *,
    payloads: bool = False,
    held: Holders | None = None,
) -> dict[str, Any]:
    """`carehub messages show --json`: everything the text view shows, nothing cut short.
    Payloads only with ``payloads``: as text when they decode, else as base64. Each delivery's
    ``held_behind`` lists the dead letters holding its line (empty when none do)."""
    return {
        "message": message.summary(),
        "text": message.text,
        "history": [
            {"at": change.at.isoformat(), "event": change.event, "detail": change.detail}
            for change in history
        ],
        "steps": [
            {
                "run": step.run,
                "route": step.route,
                "position": step.position,
                "step": step.step,
                "outcome": step.outcome,
                "output": step.output,
                "at": step.at.isoformat(),
            }
            for step in steps
        ],
        "deliveries": [
            _delivery_json(d, attempts, payloads, (held or {}).get(d.id, []))
            for d, attempts in sent
        ],
    }


def masked_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A delivery's metadata as it may be printed: channels record where they send
    (``destination``: a FHIR server's URL), which may carry a password or an access token."""
    return {
        key: without_password(value) if isinstance(value, str) else value
        for key, value in metadata.items()
    }


def _delivery_json(
    delivery: DeliveryRecord,
    attempts: list[AttemptRow],
    payloads: bool,
    holders: list[tuple[int, int, str]],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": delivery.id,
        "run": delivery.run,
        "route": delivery.route,
        "destination": delivery.destination,
        "channel": delivery.channel,
        "idempotency_key": delivery.idempotency_key,
        "order_key": delivery.order_key,
        "line": delivery.line or delivery.destination,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "early_attempts": _early_count(attempts),
        "max_attempts": delivery.max_attempts,
        "give_up_after": delivery.give_up_after,
        "failing_since": delivery.failing_since.isoformat() if delivery.failing_since else None,
        "not_before": delivery.not_before.isoformat(),
        "held_behind": [
            {"delivery_id": dead_id, "message_id": message_id, "destination": destination}
            for dead_id, message_id, destination in holders
        ],
        "last_error": without_password(delivery.last_error)
        if delivery.last_error
        else delivery.last_error,
        "receipt": delivery.receipt,
        "created_at": delivery.created_at.isoformat(),
        "updated_at": delivery.updated_at.isoformat(),
        "accepted_at": delivery.accepted_at.isoformat() if delivery.accepted_at else None,
        "content_type": delivery.content_type,
        "size": len(delivery.payload),
        "metadata": masked_metadata(delivery.metadata),
        "attempt_log": [
            {
                "number": attempt.number,
                "started_at": attempt.started_at.isoformat(),
                "duration_ms": attempt.duration_ms,
                "outcome": attempt.outcome,
                "detail": without_password(attempt.detail) if attempt.detail else attempt.detail,
            }
            for attempt in attempts
        ],
    }
    if payloads:
        view = payload_view(delivery.payload, delivery.content_type)
        if view.text is None:
            out["payload"] = {"base64": base64.b64encode(delivery.payload).decode("ascii")}
        else:
            out["payload"] = {"text": view.text, "charset": view.charset}
    return out


def _short(value: object, limit: int = 160) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown_count(shown: int, total: int) -> str:
    """``12 delivery(ies)``, or ``100 of 512 delivery(ies) shown (--limit N shows more)``."""
    if total <= shown:
        return f"{shown} delivery(ies)"
    return f"{shown} of {total} delivery(ies) shown (--limit N shows more)"


def delivery_table(found: list[DeliveryRecord], title: str, total: int | None = None) -> None:
    table = Table(title=title, show_edge=False, header_style="bold")
    for column in ("id", "message", "destination", "channel", "attempts", "updated", "last error"):
        table.add_column(column)
    for d in found:
        table.add_row(
            str(d.id),
            str(d.message_id),
            d.destination,
            d.channel,
            attempts_text(d, d.early_attempts) + _after_comma(give_up_text(d)),
            d.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
            Text(without_password(d.last_error or "")),
        )
    _console.print(table)
    _console.print(_shown_count(len(found), len(found) if total is None else total))


def discarded_table(
    found: list[DeliveryRecord], discards: dict[int, Discard], total: int | None = None
) -> None:
    """`dead-letters list --discarded`: when each was given up on, by whom and why, beside
    the error it had died of (kept apart, so neither reads as the other)."""
    table = Table(title="Discarded dead letters", show_edge=False, header_style="bold")
    for column in (
        "id",
        "message",
        "destination",
        "channel",
        "attempts",
        "discarded (UTC)",
        "by",
        "reason",
        "last send error",
    ):
        table.add_column(column)
    for d in found:
        discard = discards.get(d.id)
        when = discard.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if discard else ""
        by = discard.by if discard else None
        reason = discard.reason if discard else None
        table.add_row(
            str(d.id),
            str(d.message_id),
            d.destination,
            d.channel,
            attempts_text(d, d.early_attempts),
            when,
            Text(by or ""),
            Text(reason or ""),
            Text(without_password(d.last_error or "")),
        )
    _console.print(table)
    _console.print(_shown_count(len(found), len(found) if total is None else total))


def show_dry_run(label: str, result: DryRunResult) -> None:
    """What `carehub routes test` prints: each route, why it matched or not, each step; for
    a message the hub would refuse, why it would not be routed."""
    if result.not_routed:
        _console.print(Text(f"{label}: {result.not_routed}", style="bold red"))
        return
    matched = ", ".join(r.route for r in result.matched) or "no route"
    _console.print(Text(f"{label}: matched {matched}", style="bold"))
    for route in result.routes:
        if not route.matched:
            failed = [c for c in route.checks if not c.passed]
            why = "; ".join(f"{c.what} = {c.value!r}, wanted {c.expected}" for c in failed)
            _console.print(Text(f"  route {route.route}: not matched ({why})"))
            continue
        _console.print(Text(f"  route {route.route}: matched"))
        for check in route.checks:
            _console.print(Text(f"      when {check.what} = {check.value!r}: {check.expected}"))
        for step in route.steps:
            # A failed step's output is the route's error, printed once below.
            output = "" if step.outcome == "error" else f"  {_short(step.output)}"
            _console.print(Text(f"    step {step.position} {step.step}: {step.outcome}{output}"))
        for delivery in route.deliveries:
            not_sent = delivery.outgoing.metadata.get("not_sent")
            if not delivery.outgoing.payload and not_sent:
                # A channel that decided at routing time to send nothing says why.
                _console.print(
                    Text(
                        f"    would not send to {delivery.destination} via {delivery.channel}: "
                        f"{not_sent}"
                    )
                )
                continue
            preview = delivery.outgoing.payload[:200].decode("utf-8", "replace")
            preview = preview.replace("\r", "\\r ").replace("\n", " ")
            _console.print(
                Text(
                    f"    would send to {delivery.destination} via {delivery.channel} "
                    f"({delivery.outgoing.content_type}, {len(delivery.outgoing.payload)} bytes, "
                    f"key {delivery.outgoing.idempotency_key}): {preview}"
                )
            )
        if route.error:
            _console.print(Text(f"    error: {route.error}", style="red"))
