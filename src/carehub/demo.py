"""`carehub demo`: the hub on the sample config, fed the sample feeds through its own MLLP port.

It starts a stand-in for the care-coordination platform (an HTTP endpoint the sample routes
post care events to), points the routes' outboxes beside the store (kept with --data-dir, else
in a scratch folder), sends every feed in config/feeds/, waits for the deliveries, and prints
what was received, how it was answered, and what was delivered to whom; then it moves the
clock forward for the periodic work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from aiosmtpd.controller import Controller
from fastapi import FastAPI, Request, Response
from rich.table import Table
from rich.text import Text

from carehub.client import MLLPClient
from carehub.config import HTTPListenerConfig, HubConfig, load_config
from carehub.display import new_console
from carehub.errors import ConfigError
from carehub.hl7.ack import read_ack
from carehub.hl7.batch import split_messages
from carehub.hl7.charsets import decode_message
from carehub.hl7.view import MessageView
from carehub.hub import Hub
from carehub.intake.http import HTTPListener
from carehub.store.outbox import DeliveryRecord, Outbox

# Wide enough for the tables when the output goes to a log or a pipe rather than a terminal.
console = new_console(pipe_width=120)

#: A frame a misconfigured sender might produce, to show the AR answer.
NOT_HL7 = b"GET / HTTP/1.1\r\nHost: carehub\r\n\r\n"

#: Where the demo moves the clock for the periodic work: just past the sample's digest_hour
#: (7, in its notify timezone, America/Chicago), at least as long after the feeds as its
#: stale_ed_hours and its referrals' response_hours (24), so stale ED visits close, digests go
#: out and referrals fall overdue.
PERIODIC_WORK_TIME = clock_time(7, 5, tzinfo=ZoneInfo("America/Chicago"))
PERIODIC_WORK_AFTER = timedelta(hours=24)


@dataclass(slots=True)
class Sent:
    label: str
    message_type: str
    control_id: str
    ack_code: str
    ack_text: str


def find_sample_config() -> Path:
    """config/carehub.yaml of this checkout: from the working folder, else beside the package
    (a checkout's src/), else the copy an installed wheel carries (carehub/samples)."""
    here = Path(__file__).resolve()
    candidates = [
        Path.cwd() / "config" / "carehub.yaml",
        here.parents[2] / "config" / "carehub.yaml",
        here.parent / "samples" / "carehub.yaml",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        "cannot find config/carehub.yaml; run from the carehub checkout or pass --config"
    )


def run_demo(config_path: Path | None, data_dir: Path | None) -> int:
    config_path = config_path or find_sample_config()
    load_config(config_path)  # a config that cannot be read is named before anything else
    feeds = sorted((config_path.parent / "feeds").glob("*.hl7"))
    if not feeds:
        raise ConfigError(f"{config_path.parent / 'feeds'}: no sample feeds (*.hl7) to send")
    with tempfile.TemporaryDirectory(prefix="carehub-demo-") as scratch:
        kept = data_dir is not None
        return asyncio.run(
            _run(config_path, (data_dir or Path(scratch) / "data").resolve(), kept, feeds)
        )


class CarePlatform:
    """Stand-ins for the outside world the sample routes talk to: the care-coordination
    platform (webhook), the care-management platform's FHIR endpoint ($process-message), the
    community platform's FHIR server, an SMS gateway (HTTP) and a mail server (SMTP,
    aiosmtpd)."""

    def __init__(self) -> None:
        self._environment_before: dict[str, str | None] = {}
        #: How the start warnings name the stand-ins (see OwnStandIns); set by start().
        self.addresses: tuple[str, ...] = ()
        self.received: list[dict[str, Any]] = []
        self.texts: list[dict[str, Any]] = []
        self.mail: list[EmailMessage] = []
        self.fhir: list[dict[str, Any]] = []  # transaction bundles the community platform got
        self.notifications: list[dict[str, Any]] = []  # message bundles care management got
        app = FastAPI()

        @app.post("/care-events")
        async def care_events(request: Request) -> Response:
            body = json.loads(await request.body())
            body["_idempotency_key"] = request.headers.get("idempotency-key")
            self.received.append(body)
            return Response(status_code=202)

        @app.post("/messages")
        async def sms(request: Request) -> Response:
            self.texts.append(json.loads(await request.body()))
            return Response(status_code=202)

        @app.post("/care-fhir/$process-message")
        async def fhir_notification(request: Request) -> Response:
            self.notifications.append(json.loads(await request.body()))
            return Response(status_code=200)

        @app.post("/fhir")
        async def fhir_transaction(request: Request) -> Response:
            bundle = json.loads(await request.body())
            self.fhir.append(bundle)
            number = len(self.fhir)
            entries = [
                {
                    "response": {
                        "status": "201 Created",
                        "location": f"{e['resource']['resourceType']}/{number}-{i}/_history/1",
                    }
                }
                for i, e in enumerate(bundle.get("entry", []))
            ]
            body = {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
            return Response(json.dumps(body), status_code=200, media_type="application/fhir+json")

        @app.get("/fhir/Task/{task_id}")
        async def fhir_task(task_id: str) -> Response:
            # Nobody at the platform has picked the task up yet: the answer comes another way.
            task = {"resourceType": "Task", "id": task_id, "status": "requested", "intent": "order"}
            return Response(json.dumps(task), media_type="application/fhir+json")

        platform = self

        class Mailbox:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                platform.mail.append(
                    BytesParser(policy=default_policy).parsebytes(envelope.content)  # type: ignore[arg-type]
                )
                return "250 OK"

        self.smtp = Controller(Mailbox(), hostname="127.0.0.1", port=_free_port())

        self.listener = HTTPListener(HTTPListenerConfig(host="127.0.0.1", port=0), app)

    async def start(self) -> None:
        host, port = await self.listener.start()
        self.smtp.start()
        self.addresses = (f"http://{host}:{port} ", f"SMTP server 127.0.0.1:{self.smtp.port} ")
        self._environment_before = set_environment(
            {
                "CARE_PLATFORM_URL": f"http://{host}:{port}/care-events",
                "CARE_PLATFORM_SECRET": secrets.token_urlsafe(24),  # the stand-in's own
                "SMS_GATEWAY_URL": f"http://{host}:{port}/messages",
                "CBO_FHIR_URL": f"http://{host}:{port}/fhir",
                "CARE_FHIR_URL": f"http://{host}:{port}/care-fhir",
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(self.smtp.port),
                "SMTP_STARTTLS": "false",
            }
        )

    async def stop(self) -> None:
        self.smtp.stop()
        await self.listener.stop()
        restore_environment(self._environment_before)


class OwnStandIns(logging.Filter):
    """Leaves out the start warnings about sending in clear to the demo's own stand-ins on
    this machine: they hold their ports from before the hub starts until after it stops, so
    no other account can take them meanwhile. Any other warning is kept."""

    def __init__(self, addresses: tuple[str, ...]) -> None:
        super().__init__()
        self.addresses = addresses

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (
            "on this machine: any local user" in text and any(a in text for a in self.addresses)
        )


def set_environment(values: dict[str, str]) -> dict[str, str | None]:
    """Set the variables the sample routes read (``${CARE_FHIR_URL}``, ...) to the demo's
    stand-ins; returns what they were, for restore_environment. The demo runs inside other
    programs too (tests, `make demo` under a shell that exports its own): the stand-ins'
    addresses must not outlive them there."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    return before


def restore_environment(before: dict[str, str | None]) -> None:
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: The sample's food bank (config/resources/directory.json), which the demo's referral names.
FOOD_BANK = "Springfield Community Food Bank"


def _demo_config(config_path: Path) -> HubConfig:
    config = load_config(config_path)
    # The demo never takes the configured ports: it runs beside anything already listening.
    for listener in config.listeners.mllp:
        listener.host, listener.port = "127.0.0.1", 0
    config.listeners.http.host, config.listeners.http.port = "127.0.0.1", 0
    config.listeners.files = []
    config.worker.poll_interval = 0.1
    # The food bank answers with a token of its own, as an organisation does in service: good
    # for its referrals' status only, and its answer is told to the referrer under its name.
    config.listeners.http.tokens = [secrets.token_urlsafe(16)]
    config.listeners.http.organization_tokens = {FOOD_BANK: secrets.token_urlsafe(16)}
    return config


def periodic_work_clock(now: datetime) -> datetime:
    """The time the demo moves the clock to: PERIODIC_WORK_TIME on the first day at least
    PERIODIC_WORK_AFTER from ``now``, so it shows the periodic work on whatever day it runs."""
    later = datetime.combine(now.date(), PERIODIC_WORK_TIME)
    while later < now + PERIODIC_WORK_AFTER:
        later += timedelta(days=1)
    return later


async def _run(config_path: Path, data_dir: Path, kept: bool, feeds: list[Path]) -> int:
    """The demo itself; ``kept`` says the data dir (and so the outbox beside the store) is the
    user's --data-dir, which stays after the demo ends."""
    platform = CarePlatform()
    await platform.start()
    outbox_dir = data_dir / "outbox"  # beside the store, as the sample's routes write it
    outbox_before = set_environment({"CAREHUB_OUTBOX": str(outbox_dir)})
    try:
        return await _run_hub(config_path, data_dir, kept, feeds, platform, outbox_dir)
    finally:
        await platform.stop()
        restore_environment(outbox_before)


async def _run_hub(
    config_path: Path,
    data_dir: Path,
    kept: bool,
    feeds: list[Path],
    platform: CarePlatform,
    outbox_dir: Path,
) -> int:
    """The hub's part of the demo, with its stand-ins running."""
    hub = Hub(_demo_config(config_path), data_dir)
    own = OwnStandIns(platform.addresses)
    table_log = logging.getLogger("carehub.routing.table")
    table_log.addFilter(own)
    try:
        bound = await hub.start()
    finally:
        table_log.removeFilter(own)
    try:
        console.print("[bold]carehub demo[/bold]: the hub on the embedded default")
        console.print("  SQLite store, in-process queue and worker, one process")
        for listener in bound:
            console.print(f"  {listener.kind} listener '{listener.name}' on {listener.address}")
        console.print(f"  routes: {', '.join(r.name for r in hub.table.routes)}")
        host, port = hub.mllp_listeners[0].address  # type: ignore[misc]
        sent = await _send_feeds(host, port, feeds)
        _print_sent(sent)
        assert hub.store is not None
        await asyncio.to_thread(_wait_for_deliveries, Outbox(hub.store))
        _print_store(hub)
        _print_deliveries(hub, platform, outbox_dir, kept)
        if hub.table.notifiers():
            _print_care(hub, platform, "Care transitions: who was told what")
            later = periodic_work_clock(datetime.now(UTC))
            console.print(
                f"\n[bold]Moving the clock to {later:%Y-%m-%d %H:%M} UTC[/bold] for the periodic "
                "work: stale ED visits close, overdue follow-ups and referrals alert the care "
                "coordinator, daily digests go out."
            )
            if _has_referrals(hub):
                await _close_a_referral(hub)
            await asyncio.to_thread(hub.table.tick, later)
            await asyncio.to_thread(_wait_for_deliveries, Outbox(hub.store))
            _print_care(hub, platform, "After the clock moved", only_new=True)
        if _has_referrals(hub):
            _print_referrals(hub, platform)
    finally:
        await hub.stop()
    return 0


async def _send_feeds(host: str, port: int, feeds: list[Path]) -> list[Sent]:
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
    return sent


def _wait_for_deliveries(outbox: Outbox, timeout: float = 20.0) -> None:
    """Until routing has run and no delivery is waiting (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not outbox.unfinished():
            return
        time.sleep(0.1)


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
    for column in ("id", "from", "type", "patient", "status", "history"):
        table.add_column(column)
    for message in stored:
        history = hub.store.history(message.id)
        events = ", ".join(change.event for change in history)
        sender = message.sending_facility or "-"
        kind = f"{message.message_type}^{message.trigger_event}" if message.message_type else "-"
        patient = f"{message.patient_id}^{message.patient_authority}" if message.patient_id else "-"
        table.add_row(str(message.id), sender, kind, patient, message.status, events)
    console.print()
    console.print(table)
    totals: dict[str, int] = {}
    for (_, outcome), count in hub.intake.counts.items():
        totals[outcome] = totals.get(outcome, 0) + count
    console.print(
        f"{sum(totals.values())} frames answered: {totals.get('accepted', 0)} stored (AA), "
        f"{totals.get('duplicate', 0)} resend(s) recognised and not stored again (AA), "
        f"{totals.get('refused', 0)} refused (AE), {totals.get('rejected', 0)} rejected (AR)."
    )


def _delivered_to(delivery: DeliveryRecord) -> str:
    """The destination and channel, and for a notification the person it was for: the
    table says to whom, not only through which destination."""
    where = f"{delivery.destination.split('/', 1)[-1]} ({delivery.channel})"
    person = delivery.metadata.get("recipient_name")
    return f"{person} via {where}" if person else where


def _print_deliveries(hub: Hub, platform: CarePlatform, outbox_dir: Path, kept: bool) -> None:
    assert hub.store is not None
    outbox = Outbox(hub.store)
    table = Table(title="Delivered to whom", show_edge=False, header_style="bold")
    for column in ("message", "route", "to", "status", "tries", "receipt / error"):
        table.add_column(column)
    for delivery in outbox.find(limit=None):
        message = hub.store.get(delivery.message_id)
        label = (
            f"#{delivery.message_id} {message.message_type}^{message.trigger_event}"
            if message
            else "?"
        )
        table.add_row(
            label,
            delivery.route,
            _delivered_to(delivery),
            delivery.status,
            str(delivery.attempts),
            Text(delivery.receipt or delivery.last_error or ""),
        )
    console.print()
    console.print(table)
    console.print()
    console.print("[bold]The care platform received[/bold] (webhook, JSON care events):")
    for body in platform.received:
        event = body.get("event") or {}
        patient = (event.get("patient") or {}).get("name") or {}
        encounter = event.get("encounter") or {}
        where = encounter.get("facility") or event.get("sending_facility")
        name = f"{patient.get('family', '')}, {patient.get('given', '')}"
        key = body.get("_idempotency_key")
        console.print(Text(f"  {event.get('kind', '?'):18s} {name:18s} at {where}  (key {key})"))
    if platform.notifications:
        console.print(
            "\n[bold]The care-management platform received[/bold] (FHIR, Da Vinci notification "
            "Bundles):"
        )
    for bundle in platform.notifications:
        console.print(Text("  " + _notification_line(bundle)))
    folders: dict[str, int] = {}
    for path in outbox_dir.rglob("*"):
        if path.is_file():
            folder = str(path.parent.relative_to(outbox_dir))
            folders[folder] = folders.get(folder, 0) + 1
    summary = ", ".join(f"{folder}/ {count}" for folder, count in sorted(folders.items()))
    where = "kept" if kept else "removed when the demo ends; --data-dir keeps it"
    console.print(
        f"\n[bold]Files written[/bold] under the outbox {outbox_dir} ({where}): {summary or 'none'}"
    )
    console.print(
        "\nRe-run a message through the routes without sending: "
        "carehub routes test config/feeds/04-riverside-discharge-to-snf.hl7"
    )


def _notification_line(bundle: dict[str, Any]) -> str:
    """One notification Bundle as a line: its event, the Encounter's status and class, the
    patient and the facility."""
    resources = {e["fullUrl"]: e["resource"] for e in bundle.get("entry", [])}
    header = next(iter(resources.values()), {})
    encounter = resources.get((header.get("focus") or [{}])[0].get("reference", ""), {})
    patient = resources.get(encounter.get("subject", {}).get("reference", ""), {})
    name = (patient.get("name") or [{}])[0]
    who = f"{name.get('family', '')}, {' '.join(name.get('given', [])[:1])}"
    sender = (header.get("sender") or {}).get("display", "?")
    event = (header.get("eventCoding") or {}).get("code", "?")
    state = f"Encounter {encounter.get('status', '?')} ({encounter.get('class', {}).get('code')})"
    return f"{event:23s} {state:27s} {who:18s} from {sender}"


_seen_notifications: set[tuple[str, str, str, str]] = set()


def _note_key(item: dict[str, Any]) -> tuple[str, str, str, str]:
    return (item["kind"], item["recipient"], item["status"], item["reason"])


def _print_care(hub: Hub, platform: CarePlatform, title: str, only_new: bool = False) -> None:
    """Per patient: the encounter timeline, then each notification decided for the care team
    (sent, held for a digest, suppressed and why, retracted)."""
    from carehub.care.report import patient_reports

    assert hub.store is not None
    console.print()
    console.print(f"[bold]{title}[/bold] (times in UTC)")
    for report in patient_reports(hub.store.engine):
        fresh = [t for t in report.told if _note_key(t) not in _seen_notifications]
        events = [e for e in report.timeline if not only_new or e["transition"] == "stale_closed"]
        if only_new and not fresh and not events:
            continue
        visits = ", ".join(f"{key.split('|')[-1]} {state}" for key, state in report.visits.items())
        console.print(
            Text(f"\n  {report.name or '?'} ({report.patient_key}): {visits}", style="bold")
        )
        for event in events:
            when = event["at"].strftime("%Y-%m-%d %H:%M") if event["at"] else "-"
            visit = event["visit"].split("|")[-1]
            console.print(
                Text(f"    {when}  {event['trigger']:4s} {event['transition']:17s} {visit}")
            )
        for item in fresh if only_new else report.told:
            _seen_notifications.add(_note_key(item))
            if item["status"] == "queued":
                outcome = f"sent ({item['delivery'] or 'queued'}"
                outcome += f" {item['accepted_at']:%H:%M:%S})" if item["accepted_at"] else ")"
            elif item["status"] == "digest":
                outcome = "held for the daily digest"
            elif item["status"] == "digested":
                outcome = "sent in the daily digest"
            else:
                outcome = item["status"]
            reason = f": {item['reason']}" if item["reason"] else ""
            who = f"{item['recipient']} ({item['role'] or '-'})"
            channel = item["channel"] or "-"
            console.print(
                Text(f"      {item['kind']:16s} {who:34s} {channel:5s} {outcome}{reason}")
            )
    console.print(
        f"\n  mail server received {len(platform.mail)} email(s); "
        f"SMS gateway received {len(platform.texts)} text(s)"
    )
    if platform.mail and not only_new:
        first = platform.mail[0]
        console.print(Text(f"  e.g. To: {first['To']}  Subject: {first['Subject']}"))
        console.print(Text("       " + first.get_content().strip().replace("\n", "\n       ")))
    if platform.texts and not only_new:
        console.print(
            Text(f"  e.g. SMS to {platform.texts[0].get('to')}: {platform.texts[0].get('text')}")
        )


def _has_referrals(hub: Hub) -> bool:
    return any(r.name == "sdoh-referrals" for r in hub.table.routes)


async def _close_a_referral(hub: Hub) -> None:
    """The food bank reports the patient enrolled, through carehub's HTTP API."""
    import httpx

    from carehub.referrals.state import list_referrals

    assert hub.store is not None and hub.http_listener and hub.http_listener.address
    food = [r for r in list_referrals(hub.store.engine, limit=None) if r.status == "accepted"]
    if not food:
        return
    host, port = hub.http_listener.address
    key = food[0].referral_key
    token = hub.config.listeners.http.organization_tokens[FOOD_BANK]
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"http://{host}:{port}/referrals/{quote(key, safe='')}/status",
            json={"status": "completed", "note": "Enrolled in the weekly food box programme"},
            headers={"Authorization": f"Bearer {token}"},
        )
    console.print(
        f"\n[bold]The food bank reports back[/bold] over HTTP with its own token: POST "
        f"/referrals/{quote(key)}/status completed -> HTTP {answer.status_code}"
    )


def _print_referrals(hub: Hub, platform: CarePlatform) -> None:
    """Each referral: what the patient needs, the services matched and why, and its timeline
    from the referral to the answer that closed the loop (or the alert that it went unanswered)."""
    from carehub.referrals.state import list_referrals, referral_timeline

    assert hub.store is not None
    console.print("\n[bold]Closed-loop referrals[/bold]")
    for referral in reversed(list_referrals(hub.store.engine, limit=None)):
        timeline = referral_timeline(hub.store.engine, referral.id or referral.referral_key)
        target = (referral.referred_to or {}).get("organization") or {}
        console.print(
            Text(
                f"\n  {referral.referral_key} for {referral.patient_key}: {referral.reason or ''}"
                f" -> {target.get('name', '?')}; now {referral.status}",
                style="bold",
            )
        )
        needs = ", ".join(n.get("label") or n.get("category", "?") for n in referral.needs or [])
        if needs:
            console.print(Text(f"    needs: {needs}"))
        for match in (referral.matches or [])[:3]:
            reasons = "; ".join(match.get("reasons", [])[:3])
            console.print(
                Text(
                    f"    match {match.get('rank')}: {match.get('service')} "
                    f"({match.get('organization')}): {reasons}"
                )
            )
        for event in timeline.events if timeline else []:
            move = f"{event.from_status or '-'} -> {event.to_status or '-'}"
            verdict = "" if event.accepted else f"  REFUSED: {event.reason}"
            note = event.detail.get("note") if isinstance(event.detail, dict) else None
            console.print(
                Text(
                    f"    {event.at:%Y-%m-%d %H:%M}  {event.source:15s} {event.action:15s} "
                    f"{move}{verdict}{'  (' + note + ')' if note else ''}"
                )
            )
    console.print(
        f"\n  the community platform received {len(platform.fhir)} FHIR transaction(s) "
        "(Gravity ServiceRequest + Task)"
    )
    notices = [m for m in platform.mail if "eferral" in str(m["Subject"])]
    for mail in notices:
        console.print(Text(f"  email to {mail['To']}: {mail['Subject']}"))
    if notices:
        console.print(Text("  e.g. " + notices[0].get_content().strip().replace("\n", "\n       ")))
