"""`carehub referrals`: the referrals the referral-state step tracks, and every update offered
to one of them (applied or refused, with why), so "did the food bank ever answer?" or "why is
this referral still open?" can be answered from the command line."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from carehub.cli import hub_options
from carehub.cliparams import LIMIT, moment
from carehub.config import HubConfig
from carehub.display import new_console, short_time
from carehub.errors import CarehubError
from carehub.events import display_name


@click.group()
def referrals() -> None:
    """Closed-loop referrals from REF/RRI and CBO updates: list them, show one (what it was
    offered and its timeline), list the updates refused."""


@referrals.command("list")
@hub_options
@click.option("--open", "open_only", is_flag=True, help="Only referrals not closed yet.")
@click.option(
    "--overdue", is_flag=True, help="Only referrals still waiting for an answer past due."
)
@click.option("--status", help="One FHIR Task status (requested, accepted, completed ...).")
@click.option("--patient", help="Patient id (PID-3.1), or authority|id; merged ids follow.")
@click.option("--limit", type=LIMIT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_command(
    config: HubConfig,
    data_dir: Path,
    open_only: bool,
    overdue: bool,
    status: str | None,
    patient: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List referrals, most recently updated first."""
    from carehub.hub import open_store
    from carehub.referrals.state import list_referrals, referral_recipients, sent_to_text

    now = datetime.now(UTC)
    store = open_store(config, data_dir, must_exist=True)
    try:
        found = list_referrals(
            store.engine,
            open_only=open_only,
            overdue_now=now if overdue else None,
            status=status,
            patient=patient,
            limit=limit,
        )
        holders = {rec.id: referral_recipients(rec, store.engine) for rec in found}
        shown = {rec.id: sent_to_text(rec, store.engine) for rec in found}
    finally:
        store.close()
    if as_json:
        for rec in found:
            out = {**rec.as_output(), "overdue": rec.overdue_at(now)}
            out["sent_to"] = holders[rec.id]  # empty: held, sent nowhere
            click.echo(json.dumps(out))
        return
    table = Table(show_edge=False, header_style="bold")
    columns = ("id", "referral", "patient", "status", "referred to", "due", "updated")
    for column in columns:
        table.add_column(column, overflow="fold")
    for rec in found:
        due = short_time(rec.due_at)
        if rec.overdue_at(now):
            due += " OVERDUE"
        holder = Text(shown[rec.id])
        for warning in _warnings(rec.matches, holders[rec.id]):
            holder.append(f" [{warning}]", style="red")
        table.add_row(
            str(rec.id),
            Text(rec.referral_key.removeprefix("|")),
            Text(rec.patient_key or ""),
            rec.status,
            holder,
            Text(due),
            short_time(rec.updated_at),
        )
    console = new_console()
    console.print(table)
    console.print(f"{len(found)} referral(s)")


@referrals.command("show")
@hub_options
@click.argument("referral")
@click.option("--json", "as_json", is_flag=True, help="Print the referral and timeline as JSON.")
def show_command(config: HubConfig, data_dir: Path, referral: str, as_json: bool) -> None:
    """One referral (by authority|id, its referral id, or its row id as #N): the needs found,
    the services it was offered (rank, score, reasons; a warning in red) and its whole
    timeline: each update's source, from -> to, and whether it was applied or refused (with
    why). A referral id comes before a row id: 2 is the referral numbered 2."""
    from carehub.hub import open_store
    from carehub.referrals.state import (
        AWAITING_RESPONSE,
        UNALERTED,
        party_name,
        referral_recipients,
        referral_timeline,
        sent_to_text,
    )

    store = open_store(config, data_dir, must_exist=True)
    try:
        timeline = referral_timeline(store.engine, referral)
        holder = sent_to_text(timeline.referral, store.engine) if timeline else ""
        holders = referral_recipients(timeline.referral, store.engine) if timeline else []
    finally:
        store.close()
    if timeline is None:
        raise CarehubError(f"no referral {referral!r}")
    if as_json:
        click.echo(json.dumps(timeline.as_output(), ensure_ascii=False, indent=2))
        return

    console = new_console()
    rec = timeline.referral
    name = display_name((rec.snapshot.get("patient") or {}).get("name"))
    alerted = short_time(rec.alerted_at) or "-"
    if (
        rec.alerted_at is None
        and rec.status in AWAITING_RESPONSE
        and any(e.action == UNALERTED for e in timeline.events)
    ):
        alerted = "- (overdue, nobody to alert yet: see the timeline)"
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    facts = [
        ("referral", f"{rec.id}  {rec.referral_key.removeprefix('|')}"),
        ("patient", f"{rec.patient_key or '-'}{f'  ({name})' if name else ''}"),
        ("status", rec.status),
        ("priority / type", f"{rec.priority or '-'} / {rec.type or '-'}"),
        ("reason", rec.reason or "-"),
        ("referring", party_name(rec.referring) or "-"),
        ("referred to", holder),
        ("created (UTC)", short_time(rec.created_at)),
        ("due (UTC)", short_time(rec.due_at) or "-"),
        ("closed (UTC)", short_time(rec.closed_at) or "-"),
        ("alerted (UTC)", alerted),
    ]
    for label, value in facts:
        header.add_row(label, Text(value))
    for warning in _warnings(rec.matches, holders, named=True):
        header.add_row("warning", Text(warning, style="red"))
    console.print(header)
    _print_offered(console, rec.needs, rec.matches)

    console.print("\n[bold]Timeline[/bold]")
    table = Table(show_edge=False, header_style="bold")
    for column in ("at (UTC)", "source", "message", "action", "from -> to", "result"):
        table.add_column(column, overflow="fold")
    for event in timeline.events:
        message = ""
        if event.message_id is not None:
            message = str(event.message_id)
            control_id = event.detail.get("control_id")
            if control_id:
                message += f" ({control_id})"
        move = f"{event.from_status or '-'} -> {event.to_status or '-'}"
        if event.action == UNALERTED:
            result = Text(str(event.detail.get("note") or "nobody to alert"), style="yellow")
        elif event.accepted:
            result = Text(f"applied{_suffix(event.detail.get('note'))}")
        else:
            result = Text(f"REFUSED: {event.reason or 'no reason recorded'}", style="red")
        table.add_row(
            short_time(event.at),
            Text(event.source),
            Text(message),
            event.action,
            Text(move),
            result,
        )
    console.print(table)


@referrals.command("refused")
@hub_options
@click.option(
    "--since", callback=moment, help="At or after: ISO date/time or an age such as 30m, 2h, 7d."
)
@click.option(
    "--unattached",
    is_flag=True,
    help="Only those tied to no referral (no referral id, or one carehub does not know).",
)
@click.option("--limit", type=LIMIT, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def refused_command(
    config: HubConfig,
    data_dir: Path,
    since: datetime | None,
    unattached: bool,
    limit: int,
    as_json: bool,
) -> None:
    """Referral updates carehub refused, newest first: a REF without a referral id, an answer
    to an unknown referral, an illegal transition ... each with when, its message (store id and
    MSH-10) and why. One that came before its referral and was applied when the referral came
    says so ("applied later"). Ids only: `carehub messages show ID` has the message itself."""
    from carehub.hub import open_store
    from carehub.referrals.state import refused_referral_events

    store = open_store(config, data_dir, must_exist=True)
    try:
        found = refused_referral_events(
            store.engine, since, unattached_only=unattached, limit=limit
        )
    finally:
        store.close()
    if as_json:
        for event in found:
            click.echo(json.dumps(_refusal(event)))
        return
    table = Table(show_edge=False, header_style="bold")
    for column in ("id", "at (UTC)", "referral", "message", "source", "reason"):
        table.add_column(column, overflow="fold")
    for event in found:
        row = _refusal(event)
        message = "" if row["message_id"] is None else str(row["message_id"])
        if row["control_id"]:
            message += f" ({row['control_id']})"
        reason = Text(row["reason"] or "no reason recorded")
        if row["applied_later"]:
            reason.append("; applied later, when its referral came", style="green")
        table.add_row(
            str(row["id"]),
            short_time(event.at),
            "-" if row["referral_id"] is None else f"#{row['referral_id']}",
            Text(message),
            Text(row["source"]),
            reason,
        )
    console = new_console()
    console.print(table)
    console.print(f"{len(found)} refused referral update(s)")


def _refusal(event: Any) -> dict[str, Any]:
    """What `referrals refused` shows of a refused update: ids, time, source and reason, and
    nothing of the message's content (its detail may quote the responder's notes)."""
    return {
        "id": event.id,
        "at": event.at.isoformat(),
        "referral_id": event.referral_id,
        "message_id": event.message_id,
        "control_id": event.detail.get("control_id"),
        "source": event.source,
        "action": event.action,
        "reason": event.reason,
        # Refused when it came before its referral, applied once the referral came.
        "applied_later": event.detail.get("applied_later") is not None,
    }


def _suffix(note: Any) -> str:
    return f": {note}" if note else ""


def _offered(matches: Any) -> list[dict[str, Any]]:
    """The services kept on a referral, ranked ones first in rank order; an entry without a
    rank is the organisation the referral names, kept because it went there unranked."""
    found = [m for m in matches or [] if isinstance(m, dict)]
    return sorted(found, key=lambda m: m["rank"] if isinstance(m.get("rank"), int) else 1_000_000)


def _warnings(matches: Any, holders: list[str], *, named: bool = False) -> list[str]:
    """The warnings the matching step left on the services of the organisations the referral
    is with now (``holders``; a warning about one it was moved from is not its holder's), and
    with ``named`` each with the organisation it is about."""
    from carehub.resources.matching import same_organization

    return [
        f"{m.get('organization') or m.get('service')}: {m['warning']}" if named else m["warning"]
        for m in _offered(matches)
        if m.get("warning")
        and any(same_organization(str(m.get("organization") or ""), h) for h in holders)
    ]


def _print_offered(console: Console, needs: Any, matches: Any) -> None:
    """What the patient was offered, and why: the needs found (with what they were found
    from) and each service kept on the referral with its rank, score and reasons."""
    console.print("\n[bold]Needs[/bold]")
    found = [n for n in needs or [] if isinstance(n, dict)]
    if not found:
        console.print("none found")
    for need in found:
        line = Text(f"- {need.get('label') or need.get('category') or '?'}")
        evidence = [str(e) for e in need.get("evidence") or []]
        if evidence:
            line.append(f": {'; '.join(evidence)}")
        console.print(line)

    console.print("\n[bold]Offered[/bold]")
    offered = _offered(matches)
    if not offered:
        console.print("no service matched")
        return
    table = Table(show_edge=False, header_style="bold")
    for column in ("rank", "score", "organisation / service", "reasons"):
        table.add_column(column, overflow="fold")
    for match in offered:
        rank = match.get("rank")
        organization = str(match.get("organization") or "-")
        service = str(match.get("service") or "-")
        # A warning is among the reasons, in words; the header shows it in red.
        reasons = Text("\n".join(str(r) for r in match.get("reasons") or []))
        table.add_row(
            str(rank) if isinstance(rank, int) else "named",
            "-" if rank is None else str(match.get("score", "-")),
            Text(f"{organization} / {service}"),
            reasons,
        )
    console.print(table)
