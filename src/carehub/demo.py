"""`carehub demo`: the hub on the sample config, fed the sample feeds through its own MLLP port."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from carehub.client import MLLPClient
from carehub.config import load_config
from carehub.errors import ConfigError
from carehub.hl7.ack import read_ack
from carehub.hl7.batch import split_messages
from carehub.hl7.charsets import decode_message
from carehub.hl7.view import MessageView
from carehub.hub import Hub

console = Console(highlight=False)

#: A frame a misconfigured sender might produce, to show the AR answer.
NOT_HL7 = b"GET / HTTP/1.1\r\nHost: carehub\r\n\r\n"


@dataclass(slots=True)
class Sent:
    label: str
    message_type: str
    control_id: str
    ack_code: str
    ack_text: str


def find_sample_config() -> Path:
    """config/carehub.yaml of this checkout: from the working folder, else beside the package."""
    candidates = [Path.cwd() / "config" / "carehub.yaml"]
    candidates.append(Path(__file__).resolve().parents[2] / "config" / "carehub.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        "cannot find config/carehub.yaml; run from the carehub checkout or pass --config"
    )


def run_demo(config_path: Path | None, data_dir: Path | None) -> int:
    config_path = config_path or find_sample_config()
    config = load_config(config_path)
    feeds = sorted((config_path.parent / "feeds").glob("*.hl7"))
    if not feeds:
        raise ConfigError(f"{config_path.parent / 'feeds'}: no sample feeds (*.hl7) to send")
    # The demo never takes the configured ports: it runs beside anything already listening.
    for listener in config.listeners.mllp:
        listener.host, listener.port = "127.0.0.1", 0
    config.listeners.http.host, config.listeners.http.port = "127.0.0.1", 0
    config.listeners.files = []
    with tempfile.TemporaryDirectory(prefix="carehub-demo-") as scratch:
        return asyncio.run(_run(config, data_dir or Path(scratch), feeds))


async def _run(config, data_dir: Path, feeds: list[Path]) -> int:  # type: ignore[no-untyped-def]
    hub = Hub(config, data_dir)
    bound = await hub.start()
    try:
        console.print(
            "[bold]carehub demo[/bold]: the hub on the embedded default (SQLite, one process)"
        )
        for listener in bound:
            console.print(f"  {listener.kind} listener '{listener.name}' on {listener.address}")
        host, port = hub.mllp_listeners[0].address  # type: ignore[misc]
        sent: list[Sent] = []
        async with MLLPClient(host, port, timeout=10) as client:
            for feed in feeds:
                parts = split_messages(feed.read_bytes())
                for number, payload in enumerate(parts, start=1):
                    view = MessageView(decode_message(payload).text)
                    label = feed.name if len(parts) == 1 else f"{feed.name} #{number}"
                    answer = await client.send(payload)
                    code, _, text = read_ack(answer.decode("utf-8", "replace"))
                    message_type = f"{view.get('MSH-9.1')}^{view.get('MSH-9.2')}"
                    sent.append(Sent(label, message_type, view.get("MSH-10"), code, text))
            answer = await client.send(NOT_HL7)
            code, _, text = read_ack(answer.decode("utf-8", "replace"))
            sent.append(Sent("(a frame that is not HL7)", "-", "", code, text))
        _print_sent(sent)
        _print_store(hub)
    finally:
        await hub.stop()
    return 0


def _print_sent(sent: list[Sent]) -> None:
    table = Table(title="Sent over MLLP and acknowledged", show_edge=False, header_style="bold")
    for column in ("feed file", "type", "MSH-10", "ACK", "reason"):
        table.add_column(column)
    colours = {"AA": "green", "AE": "yellow", "AR": "red"}
    for item in sent:
        table.add_row(
            item.label,
            item.message_type,
            item.control_id or "(empty)",
            Text(item.ack_code, style=colours.get(item.ack_code, "")),
            Text(item.ack_text),
        )
    console.print()
    console.print(table)


def _print_store(hub: Hub) -> None:
    assert hub.store is not None
    stored = list(reversed(hub.store.find(limit=None)))
    table = Table(title="What the store holds", show_edge=False, header_style="bold")
    for column in ("id", "from", "type", "patient", "charset", "status", "history"):
        table.add_column(column)
    for message in stored:
        history = hub.store.history(message.id)
        events = ", ".join(change.event for change in history)
        sender = f"{message.sending_application or '-'}/{message.sending_facility or '-'}"
        kind = f"{message.message_type}^{message.trigger_event}" if message.message_type else "-"
        patient = f"{message.patient_id}^{message.patient_authority}" if message.patient_id else "-"
        table.add_row(
            str(message.id), sender, kind, patient, message.charset or "-", message.status, events
        )
    console.print()
    console.print(table)
    counts = hub.intake.counts
    totals: dict[str, int] = {}
    for (_, outcome), count in counts.items():
        totals[outcome] = totals.get(outcome, 0) + count
    console.print(
        f"\n{sum(totals.values())} frames answered: {totals.get('accepted', 0)} stored (AA), "
        f"{totals.get('duplicate', 0)} resend(s) recognised and not stored again (AA), "
        f"{totals.get('refused', 0)} refused (AE), {totals.get('rejected', 0)} rejected (AR)."
    )
    console.print(
        "Browse them with: carehub messages list --data-dir DIR / carehub messages show ID"
    )
