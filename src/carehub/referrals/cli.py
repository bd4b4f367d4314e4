"""`carehub referrals`: the referrals the referral-state step tracks, and every update offered
to one of them (applied or refused, with why), so "did the food bank ever answer?" or "why is
this referral still open?" can be answered from the command line."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from carehub.cli import hub_options
from carehub.cliparams import LIMIT
from carehub.config import HubConfig
from carehub.display import new_console, short_time
from carehub.errors import CarehubError
from carehub.events import display_name


@click.group()
def referrals() -> None:
    """Closed-loop referrals from REF/RRI and CBO updates: list them, show one's timeline."""


@referrals.command("list")
@hub_options
@click.option("--open", "open_only", is_flag=True, help="Only referrals not closed yet.")
@click.option(
    "--overdue", is_flag=True, help="Only referrals still waiting for an answer past due."
)
@click.option("--status", help="One FHIR Task status (requested, accepted, completed ...).")
@click.option("--patient", help="Patient id (PID-3.1), or authority|id.")
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
        table.add_row(
            str(rec.id),
            Text(rec.referral_key.removeprefix("|")),
            Text(rec.patient_key or ""),
            rec.status,
            Text(shown[rec.id]),
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
    """One referral (by authority|id, its referral id, or its row id as #N) and its whole
    timeline: each update's source, from -> to, and whether it was applied or refused (with
    why). A referral id comes before a row id: 2 is the referral numbered 2."""
    from carehub.hub import open_store
    from carehub.referrals.state import party_name, referral_timeline, sent_to_text

    store = open_store(config, data_dir, must_exist=True)
    try:
        timeline = referral_timeline(store.engine, referral)
        holder = sent_to_text(timeline.referral, store.engine) if timeline else ""
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
        ("alerted (UTC)", short_time(rec.alerted_at) or "-"),
    ]
    for label, value in facts:
        header.add_row(label, Text(value))
    console.print(header)

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
        if event.accepted:
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


def _suffix(note: Any) -> str:
    return f": {note}" if note else ""
