"""`carehub encounters`: the visits the encounter-state step has built, and what each message
did to one of them (with the notifications decided for it), so a question such as "why was the
PCP not told about this discharge?" can be answered from the command line.

Every time is printed in UTC and labelled so, as the store keeps times: a message time sent
with an offset is converted, one sent without is read as UTC, as the hub reads it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from carehub.cli import hub_options
from carehub.cliparams import LIMIT, ROW_ID
from carehub.config import HubConfig
from carehub.display import new_console
from carehub.errors import CarehubError
from carehub.events import display_name


def utc_minute(value: datetime | None) -> str:
    """A time to the minute in UTC, for columns labelled "(UTC)"; "" for none."""
    if value is None:
        return ""
    return (value.astimezone(UTC) if value.tzinfo else value).strftime("%Y-%m-%d %H:%M")


@click.group()
def encounters() -> None:
    """Encounter state built from ADT: list visits, show one visit's timeline."""


@encounters.command("list")
@hub_options
@click.option(
    "--state", help="registered, ed, admitted, discharged, cancelled or closed (stale ED visits)."
)
@click.option("--patient", help="Patient id (PID-3.1), or authority|id; merged ids follow.")
@click.option("--limit", type=LIMIT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_command(
    config: HubConfig,
    data_dir: Path,
    state: str | None,
    patient: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List encounters, most recently updated first."""
    from carehub.care.encounters import list_encounters
    from carehub.hub import open_store

    store = open_store(config, data_dir, must_exist=True)
    try:
        found = list_encounters(store.engine, state=state, patient=patient, limit=limit)
    finally:
        store.close()
    if as_json:
        for rec in found:
            click.echo(json.dumps(rec.as_output(), ensure_ascii=False))
        return
    table = Table(show_edge=False, header_style="bold")
    columns = ("id", "patient", "visit", "state", "where")
    for column in (*columns, "opened (UTC)", "discharged (UTC)", "updated (UTC)"):
        table.add_column(column, overflow="fold")
    for rec in found:
        where = " ".join(p for p in (rec.facility, rec.location) if p)
        if rec.patient_class:
            where += f" ({rec.patient_class})"
        discharged = utc_minute(rec.discharged_at)
        if rec.disposition:
            discharged += f" [{rec.disposition}]"
        table.add_row(
            str(rec.id),
            Text(rec.patient_key),
            Text(rec.visit_key),
            rec.state,
            Text(where),
            utc_minute(rec.opened_at),
            Text(discharged),
            utc_minute(rec.updated_at),
        )
    console = new_console()
    console.print(table)
    console.print(f"{len(found)} encounter(s)")


@encounters.command("show")
@hub_options
@click.argument("encounter_id", type=ROW_ID)
@click.option("--json", "as_json", is_flag=True, help="Print the visit and timeline as JSON.")
def show_command(config: HubConfig, data_dir: Path, encounter_id: int, as_json: bool) -> None:
    """One visit: its state, each message that changed it, and the notifications sent."""
    from carehub.care.encounters import encounter_timeline
    from carehub.hub import open_store

    store = open_store(config, data_dir, must_exist=True)
    try:
        timeline = encounter_timeline(store.engine, encounter_id)
    finally:
        store.close()
    if timeline is None:
        raise CarehubError(f"no encounter with id {encounter_id}")
    if as_json:
        click.echo(json.dumps(timeline.as_output(), ensure_ascii=False, indent=2))
        return

    console = new_console()
    rec = timeline.encounter
    name = display_name((rec.snapshot.get("patient") or {}).get("name"))
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    facts = [
        ("encounter", str(rec.id)),
        ("patient", f"{rec.patient_key}{f'  ({name})' if name else ''}"),
        ("visit", rec.visit_key),
        ("facility", rec.facility or "-"),
        ("state", rec.state),
        ("class", rec.patient_class or "-"),
        ("location", rec.location or "-"),
        ("opened (UTC)", utc_minute(rec.opened_at) or "-"),
        ("admitted (UTC)", utc_minute(rec.admitted_at) or "-"),
        ("discharged (UTC)", utc_minute(rec.discharged_at) or "-"),
        ("disposition", f"{rec.disposition or '-'}  to {rec.discharged_to or '-'}"),
        ("updated (UTC)", utc_minute(rec.updated_at)),
    ]
    for label, value in facts:
        header.add_row(label, Text(value))
    console.print(header)

    console.print("\n[bold]Timeline[/bold]")
    table = Table(show_edge=False, header_style="bold")
    columns = ("message", "trigger", "transition", "event time (UTC)", "recorded (UTC)", "note")
    for column in columns:
        table.add_column(column, overflow="fold")
    for entry in timeline.entries:
        event = entry.event
        message = str(event.message_id) if event.message_id is not None else "carehub"
        if entry.control_id:
            message += f" ({entry.control_id})"
        table.add_row(
            Text(message),
            event.trigger_event or "",
            event.transition,
            utc_minute(event.occurred_at),
            utc_minute(event.recorded_at),
            Text(str(event.detail.get("note") or "")),
        )
        for sent in entry.notifications:
            table.add_row("", "", "", "", "", Text(f"notified: {_notice(sent)}", style="dim"))
    console.print(table)
    if timeline.other_notifications:
        console.print("\n[bold]Other notifications[/bold]")
        for sent in timeline.other_notifications:
            console.print(Text(f"  {_notice(sent)}"))


def _notice(row: dict[str, Any]) -> str:
    why = f": {row['reason']}" if row.get("reason") else ""
    return (
        f"{row['kind']} to {row['recipient']} via {row.get('channel') or '-'} {row['status']}{why}"
    )
