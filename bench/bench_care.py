"""Care-transitions benchmark: a noisy ADT feed through the whole care route, on the embedded
default (`carehub serve`: SQLite store, memory:// queue, the routing worker in process).

The feed (generated, synthetic): --messages ADT messages (default 100,000) over --encounters
visits (default 10,000), about ten per visit, for ~0.8 patients per visit (some patients come
back). Each visit follows one story: ED treat-and-release (A04 E, A03), ED then admitted (A04,
A01, A02 to another campus, an A02 bed move, A03), direct admission (A01, A02, A03), and the
cancels: an admission cancelled (A11, some after a transfer), an ED admission cancelled back to
the ED (A11) then discharged, a discharge cancelled (A13). A08 updates that change nothing are
spread between the story's messages, and ~3% of messages are resent (same MSH-10). Discharges
home from inpatient stays open follow-up clocks. A generated roster CSV gives every patient a
care team of 1-3 members with email addresses (a PCP, often a care coordinator, sometimes a
case manager; some prefer discharge notices only; ~2% of patients opted out).

Two runs of `carehub serve`, each fed the same messages over --k MLLP connections (a patient's
messages all on one connection, each sent after the previous one's ACK):

  1. routing only: one route, `translate: v2-to-event` and no forward -> messages routed/s.
  2. care: v2-to-event -> encounter-state -> care-team -> follow-up-clock -> notify. The notify
     step sends to a sink in its own process: `--sink http` (default: an SMS-gateway-style HTTP
     receiver, keep-alive, the fastest to receive; the roster's `email` channel is bound to
     carehub's `sms` HTTP channel, addresses unchanged) or `--sink smtp` (aiosmtpd; carehub's
     `email` channel, one SMTP session per notification).

Reported: intake msgs/s (ACKs), messages routed/s, notifications/s (deliveries accepted by the
sink), each over the time from the first message sent, and the ratio of the care run to the
routing-only run. Notification templates carry a marker (kind, recipient, visit), so the sink
checks that each (encounter, recipient, kind) is notified at most once; the count is checked
against what the feed's stories should produce and against carehub's store.

Exit code 0 whatever the figures; 1 if a process crashed, an ACK was wrong, or a notification
was lost or duplicated.

    .venv/bin/python bench/bench_care.py [--quick] [--messages N] [--encounters E] [--k 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import yaml
from bench_intake import (
    ServerProcess,
    Unavailable,
    filesystem_type,
    parse_port_line,
    run_tag,
    start_carehub,
)
from bench_routing import http_get_json, log_report, percentile_ms, stop_slowly
from loadgen import check_ack
from webhook_sink import HTTPConnection, Tally

BENCH_DIR = Path(__file__).resolve().parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 90.0
STALL_SECONDS = 60.0  # a drain with no progress for this long has stopped
SAMPLE_SECONDS = 0.25
START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\r"
MARK = re.compile(r"\[bench (\S+) (\S+) (\S+)\]")
NOTIFIABLE = ("ed_arrival", "admission", "transfer", "discharge")
ROUTE_NAME = "care-transitions"


# -- the feed ------------------------------------------------------------------------------------
@dataclass(slots=True)
class Step:
    """One message of a story, and what it should mean to the care team."""

    event: str
    cls: str
    where: str  # ED | WARD | ICU | ICU2 (a bed move inside the ICU)
    facility: str
    notice: str | None = None  # a notifiable kind this message should announce
    retracts: frozenset[str] = frozenset()  # kinds this message takes back
    disposition: str = ""


LOCATIONS = {
    "ED": "ED^E{n}^1",
    "WARD": "4W^4{n:02d}^A",
    "ICU": "ICU^I{n:02d}^A",
    "ICU2": "ICU^I{n:02d}^B",
}


def story(kind: str, rng: random.Random) -> list[Step]:
    """The core messages of one visit."""
    home = rng.choice(("01", "01", "03"))
    if kind == "ed_release":
        return [
            Step("A04", "E", "ED", "GENERAL", "ed_arrival"),
            Step("A03", "E", "ED", "GENERAL", "discharge", disposition="01"),
        ]
    if kind == "ed_admit":
        return [
            Step("A04", "E", "ED", "GENERAL", "ed_arrival"),
            Step("A01", "I", "WARD", "GENERAL", "admission"),
            Step("A02", "I", "ICU", "NORTH", "transfer"),
            Step("A02", "I", "ICU2", "NORTH"),  # a bed move: no notice
            Step("A03", "I", "ICU2", "NORTH", "discharge", disposition=home),
        ]
    if kind == "direct":
        return [
            Step("A01", "I", "WARD", "GENERAL", "admission"),
            Step("A02", "I", "ICU", "NORTH", "transfer"),
            Step("A03", "I", "ICU", "NORTH", "discharge", disposition=home),
        ]
    if kind == "direct_cancel":  # the visit is cancelled: every notice is taken back
        steps = [Step("A01", "I", "WARD", "GENERAL", "admission")]
        facility = "GENERAL"
        if rng.random() < 0.5:
            steps.append(Step("A02", "I", "ICU", "NORTH", "transfer"))
            facility = "NORTH"
        where = steps[-1].where
        return [*steps, Step("A11", "I", where, facility, retracts=frozenset(NOTIFIABLE))]
    if kind == "ed_admit_cancel":  # back to the ED, then discharged from there
        return [
            Step("A04", "E", "ED", "GENERAL", "ed_arrival"),
            Step("A01", "I", "WARD", "GENERAL", "admission"),
            Step("A11", "E", "ED", "GENERAL", retracts=frozenset({"admission"})),
            Step("A03", "E", "ED", "GENERAL", "discharge", disposition="01"),
        ]
    if kind == "discharge_cancel":
        return [
            Step("A01", "I", "WARD", "GENERAL", "admission"),
            Step("A03", "I", "WARD", "GENERAL", "discharge", disposition="01"),
            Step("A13", "I", "WARD", "GENERAL", retracts=frozenset({"discharge"})),
        ]
    raise ValueError(kind)


STORIES = {
    "ed_release": 0.25,
    "ed_admit": 0.25,
    "direct": 0.30,
    "direct_cancel": 0.07,
    "ed_admit_cancel": 0.06,
    "discharge_cancel": 0.07,
}
FAMILY = ("Okoro", "Lindgren", "Moreau", "Haddad", "Nakamura", "Ortega", "Brennan", "Kowalski")
GIVEN = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun")
DIAGNOSES = (
    ("R07.9", "Chest pain, unspecified"),
    ("I21.4", "Non-ST elevation myocardial infarction"),
    ("J18.9", "Pneumonia, unspecified organism"),
    ("R55", "Syncope and collapse"),
    ("I50.9", "Heart failure, unspecified"),
)


@dataclass(slots=True)
class Member:
    member_id: str
    name: str
    role: str
    address: str
    preference: str  # immediate | discharge_only

    def told(self, steps: list[Step]) -> Counter[str]:
        """Notifications (notices and corrections) this member should get for a visit."""
        live: set[str] = set()
        told: Counter[str] = Counter()
        for step in steps:
            if step.notice and (self.preference != "discharge_only" or step.notice == "discharge"):
                live.add(step.notice)
                told[step.notice] += 1
            if step.retracts and live & step.retracts:
                live -= step.retracts
                told["retraction"] += 1  # one correction, however many notices it takes back
        return told


@dataclass(slots=True)
class Feed:
    buckets: list[list[tuple[str, bytes]]]  # per connection: (control id, MLLP frame)
    roster_csv: str
    messages: int  # frames to send, resends included
    resends: int
    encounters: int
    patients: int
    stories: Counter[str]
    expected_notifications: int
    expected_by_kind: Counter[str]

    @property
    def stored(self) -> int:
        return self.messages - self.resends


def _message(
    control_id: str,
    step: Step,
    *,
    event: str,
    mrn: str,
    name: tuple[str, str],
    dob: str,
    visit: str,
    at: datetime,
    admitted: datetime,
    bed: int,
    diagnosis: tuple[str, str],
) -> bytes:
    ts = at.strftime("%Y%m%d%H%M%S+0000")
    pv1 = [""] * 46
    pv1[0], pv1[1], pv1[2] = "PV1", "1", step.cls
    pv1[3] = LOCATIONS[step.where].format(n=bed) + "^" + step.facility
    pv1[7] = "1497758544^Moreau^Celine^^^Dr^^^NPI"
    pv1[10] = "MED" if step.cls == "I" else "EM"
    pv1[19] = f"{visit}^^^BENCH^VN"
    pv1[36] = step.disposition if event == "A03" else ""
    pv1[44] = admitted.strftime("%Y%m%d%H%M%S+0000")
    pv1[45] = ts if event == "A03" else ""
    family, given = name
    segments = [
        f"MSH|^~\\&|BENCH_ADT|{step.facility}|CAREHUB|CAREHUB|{ts}||ADT^{event}^ADT_A01|"
        f"{control_id}|P|2.5.1|||AL|NE",
        f"EVN|{event}|{ts}",
        f"PID|1||{mrn}^^^BENCH^MR||{family}^{given}^Q||{dob}|F|||"
        "418 Birch Lane^^Springfield^IL^62704^USA||^PRN^PH^^1^217^5550142",
        "|".join(pv1).rstrip("|"),
        f"DG1|1||{diagnosis[0]}^{diagnosis[1]}^I10||{at:%Y%m%d}|A",
    ]
    return START_BLOCK + ("\r".join(segments) + "\r").encode("ascii") + END_BLOCK


def build_feed(messages: int, encounters: int, k: int, tag: str, seed: int) -> Feed:
    rng = random.Random(seed)
    encounters = max(1, encounters)
    patients = max(1, round(encounters * 0.8))
    # Encounters per patient: one each, then the rest to random patients (return visits).
    visits_of: list[list[int]] = [[p] for p in range(patients)]
    for e in range(patients, encounters):
        visits_of[rng.randrange(patients)].append(e)
    kinds = list(STORIES)
    weights = list(STORIES.values())
    stories = {e: rng.choices(kinds, weights)[0] for e in range(encounters)}
    cores = {e: story(stories[e], rng) for e in range(encounters)}
    core_total = sum(len(c) for c in cores.values())
    budget = max(0, messages - core_total)
    resends = min(budget, round(messages * 0.03))
    # A08 noise goes between a story's messages (never after the last one), so each update
    # repeats the state the previous message left.
    noise: dict[int, Counter[int]] = {e: Counter() for e in range(encounters)}
    slotted = [e for e in range(encounters) if len(cores[e]) > 1]
    for _ in range(budget - resends):
        e = rng.choice(slotted)
        noise[e][rng.randrange(len(cores[e]) - 1)] += 1

    pcps = [f"pcp-{i:03d}" for i in range(max(1, patients // 20))]
    ccs = [f"cc-{i:03d}" for i in range(max(1, patients // 100))]
    cms = [f"cm-{i:03d}" for i in range(max(1, patients // 200))]
    header = (
        "patient_id,authority,opt_out,opt_out_reason,member_id,name,role,organization,npi,"
        "channel,address,preference,detail"
    )
    roster = [header]
    expected_by_kind: Counter[str] = Counter()
    now = datetime.now(UTC).replace(microsecond=0)
    timed: list[tuple[datetime, int, str, bytes]] = []  # (time, patient, control id, frame)
    seq = 0
    for p in range(patients):
        mrn = f"{tag}M{p:07d}"
        opted_out = rng.random() < 0.02
        team = [Member(rng.choice(pcps), "", "pcp", "", "immediate")]
        if rng.random() < 0.7:
            team.append(Member(rng.choice(ccs), "", "care_coordinator", "", "immediate"))
        if rng.random() < 0.2:
            team.append(Member(rng.choice(cms), "", "case_manager", "", "immediate"))
        for member in team:
            member.name = f"{member.member_id.upper()} (bench)"
            number = int(member.member_id.rsplit("-", 1)[1])
            member.address = f"{member.member_id}@care{number % 40}.example.org"
            if rng.random() < 0.1:
                member.preference = "discharge_only"
            flag = "true" if opted_out else "false"
            roster.append(
                f"{mrn},BENCH,{flag},,{member.member_id},{member.name},{member.role},"
                f"Bench Org,,email,{member.address},{member.preference},"
            )
        name = (rng.choice(FAMILY), rng.choice(GIVEN))
        dob = f"19{rng.randrange(30, 99)}0{rng.randrange(1, 10)}1{rng.randrange(0, 10)}"
        at = now - timedelta(hours=36) + timedelta(minutes=rng.randrange(0, 24 * 60))
        for e in visits_of[p]:
            visit = f"{tag}V{e:07d}"
            steps = cores[e]
            if not opted_out:
                for member in team:
                    expected_by_kind += member.told(steps)
            bed = rng.randrange(1, 40)
            diagnosis = rng.choice(DIAGNOSES)
            admitted = at
            plan: list[tuple[Step, str]] = []
            for i, step in enumerate(steps):
                plan.append((step, step.event))
                plan += [(step, "A08")] * noise[e][i]
            for step, event in plan:
                seq += 1
                at += timedelta(minutes=rng.randrange(5, 30))
                control_id = f"{tag}{seq:08d}"
                frame = _message(
                    control_id,
                    step,
                    event=event,
                    mrn=mrn,
                    name=name,
                    dob=dob,
                    visit=visit,
                    at=at,
                    admitted=admitted,
                    bed=bed,
                    diagnosis=diagnosis,
                )
                timed.append((at, p, control_id, frame))
            at += timedelta(hours=rng.randrange(6, 72))  # a later visit starts after this one
    # Resends: a frame sent again right after itself (the sender missed the ACK).
    chosen = set(rng.sample(range(len(timed)), min(resends, len(timed))))
    with_resends: list[tuple[datetime, int, str, bytes]] = []
    for i, item in enumerate(timed):
        with_resends.append(item)
        if i in chosen:
            with_resends.append(item)
    buckets: list[list[tuple[str, bytes]]] = [[] for _ in range(k)]
    # One patient's messages on one connection, in order; connections interleave patients.
    order = sorted(range(len(with_resends)), key=lambda i: (with_resends[i][0], i))
    for i in order:
        _, p, control_id, frame = with_resends[i]
        buckets[p % k].append((control_id, frame))
    return Feed(
        buckets=buckets,
        roster_csv="\n".join(roster) + "\n",
        messages=len(with_resends),
        resends=len(chosen),
        encounters=encounters,
        patients=patients,
        stories=Counter(stories.values()),
        expected_notifications=sum(expected_by_kind.values()),
        expected_by_kind=expected_by_kind,
    )


# -- the sink (run as `bench_care.py sink http|smtp`) ----------------------------------------------
class CareTally(Tally):
    """webhook_sink's tally, plus the (kind, recipient, visit) marker of each notification."""

    def __init__(self) -> None:
        super().__init__()
        self.notices: Counter[tuple[str, str, str]] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.repeated = 0
        self.repeat_samples: list[str] = []
        self.unmarked = 0

    def delivery(self, key: str | None, body: bytes) -> None:
        resend = key is not None and key in self.keys
        super().delivery(key, body)
        if resend:
            return  # the same delivery again: counted as a duplicate by the tally
        try:
            text = json.loads(body).get("text", "")
        except ValueError:
            text = body.decode("utf-8", "replace")
        self.note(text)

    def note(self, text: str) -> None:
        match = MARK.search(text)
        if match is None:
            self.unmarked += 1
            return
        notice = (match.group(1), match.group(2), match.group(3))
        self.notices[notice] += 1
        self.by_kind[notice[0]] += 1
        if self.notices[notice] == 2:
            self.repeated += 1
            if len(self.repeat_samples) < 5:
                self.repeat_samples.append(" ".join(notice))

    def stats(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            **super().stats(),
            "notices": len(self.notices),
            "repeated_notices": self.repeated,
            "repeat_samples": self.repeat_samples,
            "unmarked": self.unmarked,
            "by_kind": dict(self.by_kind),
        }


class SmtpHandler:
    """aiosmtpd handler: each message is a delivery (key from X-Carehub-Delivery)."""

    def __init__(self, tally: CareTally) -> None:
        self.tally = tally

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.original_content, policy=default_policy)
        key = message.get("X-Carehub-Delivery")
        resend = key is not None and key in self.tally.keys
        self.tally.requests += 1
        if key is None:
            self.tally.missing_key += 1
        elif resend:
            self.tally.duplicates += 1
        else:
            self.tally.keys.add(key)
            self.tally.note(message.get_content())  # type: ignore[attr-defined]
        return "250 2.0.0 Ok: queued"


async def serve_sink(kind: str, host: str) -> None:
    """The HTTP sink (deliveries and GET /stats on one port) or the SMTP sink (SMTP on one
    port, GET /stats on another). Prints `PORT <n>` (and `STATS <n>`), serves until SIGTERM."""
    tally = CareTally()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    http = await loop.create_server(lambda: HTTPConnection(tally), host, 0, backlog=1024)
    http_port = http.sockets[0].getsockname()[1]
    servers = [http]
    if kind == "smtp":
        from aiosmtpd.smtp import SMTP

        handler = SmtpHandler(tally)
        smtp = await loop.create_server(
            lambda: SMTP(handler, hostname="bench-sink", loop=loop), host, 0, backlog=1024
        )
        servers.append(smtp)
        print(f"PORT {smtp.sockets[0].getsockname()[1]}", flush=True)
    else:
        print(f"PORT {http_port}", flush=True)
    print(f"STATS {http_port}", flush=True)
    try:
        await stop.wait()
    finally:
        for server in servers:
            server.close()


def parse_sink_ports(lines: list[str]) -> tuple[str, int] | None:
    """(the delivery port, the stats port) packed as host "stats:<n>" once both are printed."""
    port = parse_port_line(lines)
    stats = next((int(line.split()[1]) for line in lines if line.startswith("STATS ")), None)
    if port is None or stats is None:
        return None
    return f"stats:{stats}", port[1]


# -- carehub -------------------------------------------------------------------------------------
TEMPLATE = '{{% include "{kind}.txt" +%}}\n[bench {kind} {{{{ recipient.id }}}} ' + (
    "{{{{ event.encounter.visit_number.value }}}}]\n"
)


def write_config(run_dir: Path, feed: Feed, sink: str | None, sink_port: int) -> Path:
    """carehub.yaml and the route: the care route when `sink` is given, else routing only."""
    routes_dir = run_dir / "routes"
    routes_dir.mkdir(parents=True)
    steps: list[dict[str, Any]] = [{"translate": "v2-to-event"}]
    if sink is not None:
        (run_dir / "care").mkdir()
        (run_dir / "care" / "roster.csv").write_text(feed.roster_csv, encoding="utf-8")
        templates = run_dir / "templates"
        templates.mkdir()
        for kind in (*NOTIFIABLE, "retraction"):
            (templates / f"{kind}.email.txt").write_text(TEMPLATE.format(kind=kind))
        if sink == "smtp":
            channel = {
                "channel": "email",
                "host": "127.0.0.1",
                "port": sink_port,
                "starttls": False,
                "sender": "care-alerts@bench.example.org",
                "max_connections": 16,
            }
        else:  # the roster's email recipients, through an HTTP gateway
            channel = {
                "channel": "sms",
                "url": f"http://127.0.0.1:{sink_port}/messages",
                "max_length": 4000,
            }
        steps += [
            {"enrich": {"use": "encounter-state", "stale_ed_hours": 24}},
            {"enrich": {"use": "care-team", "roster": "care/roster.csv"}},
            {"enrich": {"use": "follow-up-clock", "contact_business_days": 2, "visit_days": 14}},
            {
                "notify": {
                    "channels": {"email": channel},
                    "templates": "templates",
                    "detail": {"email": "full"},
                    "retry": {"max_attempts": 8, "initial_delay": 0.5, "max_delay": 5},
                }
            },
        ]
    route = {"name": ROUTE_NAME, "when": {"type": "ADT"}, "steps": steps}
    (routes_dir / "care.yaml").write_text(yaml.safe_dump({"routes": [route]}, sort_keys=False))
    config = {
        "store": {"durability": "process"},
        "queue": {"url": "memory://"},
        # No periodic work during the run (digests, stale ED visits, overdue alerts).
        "worker": {"enabled": True, "tick_interval": 86400},
        "routes": ["routes/*.yaml"],
    }
    path = run_dir / "carehub.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass(slots=True)
class StoreState:
    messages: int = 0
    received: int = 0  # stored, not routed yet
    deliveries: Counter[str] = field(default_factory=Counter)
    notifications: Counter[str] = field(default_factory=Counter)
    planned: int = 0  # distinct delivery keys the notify step recorded
    error: str | None = None

    @property
    def waiting(self) -> int:
        return self.deliveries["pending"] + self.deliveries["sending"]


def read_store(db: Path, notifications: bool = False) -> StoreState:
    state = StoreState()
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10, isolation_level=None)
        try:
            con.execute("BEGIN")
            state.messages = con.execute("SELECT count(*) FROM messages").fetchone()[0]
            state.received = con.execute(
                "SELECT count(*) FROM messages WHERE status = 'received'"
            ).fetchone()[0]
            for status, n in con.execute("SELECT status, count(*) FROM deliveries GROUP BY 1"):
                state.deliveries[status] = n
            if notifications:
                rows = con.execute("SELECT status, count(*) FROM notifications GROUP BY 1")
                for status, n in rows:
                    state.notifications[status] = n
                state.planned = con.execute(
                    "SELECT count(DISTINCT delivery_key) FROM notifications"
                ).fetchone()[0]
            con.execute("COMMIT")
        finally:
            con.close()
    except sqlite3.Error as err:
        state.error = str(err)
    return state


# -- sending ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class Sending:
    acked: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(text)


class FeedConnection(asyncio.Protocol):
    """Sends its list of frames in order, each after the previous one's ACK (checked)."""

    def __init__(
        self, frames: list[tuple[str, bytes]], state: Sending, done: asyncio.Future[None]
    ) -> None:
        self.frames = frames
        self.state = state
        self.done = done
        self.next = 0
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.control_id: str | None = None
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send_next(self) -> None:
        if self.next >= len(self.frames) or self.transport is None:
            self.control_id = None
            if not self.done.done():
                self.done.set_result(None)
            if self.transport is not None:
                self.transport.close()
            return
        self.control_id, frame = self.frames[self.next]
        self.next += 1
        self.sent_at = time.perf_counter()
        self.transport.write(frame)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(END_BLOCK)
        if end < 0:
            return
        frame = bytes(self.buffer[:end])
        self.buffer.clear()
        if self.control_id is None:
            self.state.error(f"unsolicited reply: {frame[:60]!r}")
            return
        self.state.acked += 1
        self.state.latencies.append(time.perf_counter() - self.sent_at)
        problem = check_ack(frame, self.control_id)
        if problem is not None:
            self.state.error(problem)
        self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.control_id is not None:
            self.state.error(f"{self.control_id}: connection lost ({exc or 'closed by server'})")
            self.control_id = None
        if not self.done.done():
            self.done.set_result(None)

    def abort(self, reason: str) -> None:
        if self.control_id is not None:
            self.state.error(f"{self.control_id}: {reason}")
            self.control_id = None
        if self.transport is not None:
            self.transport.abort()
        if not self.done.done():
            self.done.set_result(None)


# -- one run ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class RunFigures:
    label: str
    sent: int = 0
    intake_seconds: float | None = None
    routed: int = 0
    routed_seconds: float | None = None
    delivered: int = 0
    delivered_seconds: float | None = None
    ack_p50_ms: float = float("nan")
    ack_p99_ms: float = float("nan")
    store: StoreState | None = None
    sink: dict[str, Any] | None = None

    @staticmethod
    def rate(count: int, seconds: float | None) -> float | None:
        return count / seconds if seconds else None

    @property
    def intake_rate(self) -> float | None:
        return self.rate(self.sent, self.intake_seconds)

    @property
    def routed_rate(self) -> float | None:
        return self.rate(self.routed, self.routed_seconds)

    @property
    def delivered_rate(self) -> float | None:
        return self.rate(self.delivered, self.delivered_seconds)


@dataclass(slots=True)
class Outcome:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


async def run_once(
    label: str,
    args: argparse.Namespace,
    work: Path,
    feed: Feed,
    outcome: Outcome,
    sink: str | None,
) -> RunFigures | None:
    run_dir = work / label
    run_dir.mkdir()
    figures = RunFigures(label)
    sink_proc: ServerProcess | None = None
    stats_port = 0
    sink_port = 0
    if sink is not None:
        argv = [sys.executable, str(Path(__file__).resolve()), "sink", sink]
        try:
            sink_proc = ServerProcess(f"{label}-sink", argv, run_dir)
            packed, sink_port = await sink_proc.wait_ready(parse_sink_ports, START_TIMEOUT)
            stats_port = int(packed.split(":")[1])
        except (Unavailable, OSError) as exc:
            outcome.problems.append(f"[{label}] the {sink} sink did not start: {exc}")
            return None
    config = write_config(run_dir, feed, sink, sink_port)
    server: ServerProcess | None = None
    try:
        try:
            server, host, port = await start_carehub(
                f"{label}-carehub", args.carehub_bin, run_dir, config
            )
        except (Unavailable, OSError) as exc:
            outcome.problems.append(f"[{label}] carehub did not start: {exc}")
            return None
        print(f"[{label}] carehub pid {server.proc.pid} on {host}:{port}", flush=True)
        await drive(label, args, feed, server, host, port, run_dir, stats_port, figures, outcome)
        return figures
    finally:
        if server is not None:
            if crash := server.crashed():
                outcome.problems.append(f"[{label}] carehub {crash}")
            else:
                _, stopped = await stop_slowly(server, STOP_TIMEOUT)
                if stopped:
                    outcome.problems.append(f"[{label}] carehub {stopped}")
            outcome.notes += [f"[{label}] {line}" for line in log_report(server)]
        if sink_proc is not None:
            if crash := sink_proc.crashed():
                outcome.problems.append(f"[{label}] sink {crash}")
            elif stopped := await sink_proc.stop():
                outcome.problems.append(f"[{label}] sink {stopped}")


async def drive(
    label: str,
    args: argparse.Namespace,
    feed: Feed,
    server: ServerProcess,
    host: str,
    port: int,
    run_dir: Path,
    stats_port: int,
    figures: RunFigures,
    outcome: Outcome,
) -> None:
    loop = asyncio.get_running_loop()
    state = Sending()
    connections: list[FeedConnection] = []
    for frames in feed.buckets:
        done: asyncio.Future[None] = loop.create_future()
        _, protocol = await loop.create_connection(
            lambda f=frames, d=done: FeedConnection(f, state, d), host, port
        )
        connections.append(protocol)
    db = run_dir / "data" / "carehub.db"
    care = stats_port != 0
    t0 = time.perf_counter()
    for conn in connections:
        conn.send_next()
    last_ack, last_ack_at = 0, time.monotonic()
    progress_at, last_progress = time.monotonic(), (-1, -1, -1)
    next_print = 5.0
    while True:
        await asyncio.sleep(SAMPLE_SECONDS)
        now = time.perf_counter() - t0
        if figures.intake_seconds is None:
            if all(c.done.done() for c in connections):
                figures.intake_seconds = now
            elif state.acked != last_ack:
                last_ack, last_ack_at = state.acked, time.monotonic()
            elif time.monotonic() - last_ack_at > args.ack_timeout:
                for conn in connections:
                    conn.abort(f"no ACK within {args.ack_timeout:g} s")
                figures.intake_seconds = now
        store = await asyncio.to_thread(read_store, db)
        sink = await http_get_json(stats_port, "/stats") if care else None
        distinct = sink["distinct_keys"] if sink else 0
        all_routed = (
            figures.intake_seconds is not None
            and not store.error
            and store.messages >= feed.stored
            and store.received == 0
        )
        if all_routed and figures.routed_seconds is None:
            figures.routed_seconds = now
        all_delivered = not care or (
            store.waiting == 0 and distinct >= store.deliveries["delivered"]
        )
        if figures.routed_seconds is not None and all_delivered:
            figures.delivered_seconds = now
        if now >= next_print:
            next_print += 5.0
            print(
                f"  [{label}] t={now:6.1f}s acked {state.acked:>8,} routed "
                f"{store.messages - store.received:>8,} deliveries pending "
                f"{store.waiting:>7,} delivered {store.deliveries['delivered']:>8,}"
                + (f" at sink {distinct:>8,}" if care else ""),
                flush=True,
            )
        if figures.delivered_seconds is not None:
            break
        progress = (state.acked, store.messages - store.received, distinct)
        if progress != last_progress:
            progress_at, last_progress = time.monotonic(), progress
        if server.crashed() or time.monotonic() - progress_at > STALL_SECONDS:
            outcome.notes.append(f"[{label}] stopped waiting at t={now:.0f} s: no progress")
            break
        if now > args.drain_timeout:
            outcome.notes.append(f"[{label}] stopped waiting at t={now:.0f} s (--drain-timeout)")
            break
    figures.sent = state.acked
    figures.ack_p50_ms = percentile_ms(state.latencies, 50)
    figures.ack_p99_ms = percentile_ms(state.latencies, 99)
    if state.errors:
        outcome.problems.append(f"[{label}] {state.errors} wrong or missing ACKs, e.g.")
        outcome.problems += [f"  {text}" for text in state.error_samples]
    if care:
        await asyncio.sleep(2.0)  # late resends (duplicates) would show up here
    figures.store = await asyncio.to_thread(read_store, db, care)
    figures.routed = figures.store.messages - figures.store.received
    if care:
        figures.sink = await http_get_json(stats_port, "/stats")
        figures.delivered = int(figures.sink["distinct_keys"])
        check(label, feed, figures, outcome)
    elif figures.store.messages != feed.stored:
        outcome.problems.append(
            f"[{label}] the store holds {figures.store.messages:,} messages, "
            f"expected {feed.stored:,} ({feed.messages:,} sent, {feed.resends:,} resends)"
        )


def check(label: str, feed: Feed, figures: RunFigures, outcome: Outcome) -> None:
    """Lost or duplicated notifications, by the sink's count, the store and the feed."""
    store, sink = figures.store, figures.sink
    assert store is not None and sink is not None
    problems = outcome.problems
    if store.error:
        problems.append(f"[{label}] store not readable: {store.error}")
        return
    if store.messages != feed.stored:
        problems.append(
            f"[{label}] the store holds {store.messages:,} messages, expected {feed.stored:,} "
            f"({feed.messages:,} sent, {feed.resends:,} resends)"
        )
    if sink["duplicates"]:
        problems.append(f"[{label}] {sink['duplicates']:,} notification(s) delivered twice")
    if sink["repeated_notices"]:
        samples = "; ".join(sink["repeat_samples"])
        problems.append(
            f"[{label}] {sink['repeated_notices']:,} (encounter, recipient, kind) notified more "
            f"than once under different keys, e.g. {samples}"
        )
    if sink["unmarked"] or sink["missing_key"] or sink["bad_requests"]:
        problems.append(
            f"[{label}] sink: {sink['unmarked']} unmarked, {sink['missing_key']} without a key, "
            f"{sink['bad_requests']} unparsable"
        )
    if store.deliveries["dead"]:
        problems.append(f"[{label}] {store.deliveries['dead']:,} dead letter(s)")
    total = sum(store.deliveries.values())
    if store.planned != total:
        problems.append(
            f"[{label}] the notify step recorded {store.planned:,} delivery keys, the outbox "
            f"holds {total:,} deliveries"
        )
    delivered = store.deliveries["delivered"]
    if figures.delivered < delivered:
        problems.append(
            f"[{label}] lost: the store says {delivered:,} delivered, the sink has "
            f"{figures.delivered:,}"
        )
    if figures.delivered_seconds is None:
        outcome.notes.append(
            f"[{label}] not drained: {store.waiting:,} deliveries still queued in the store "
            "(slow, not lost); the feed check is skipped"
        )
        return
    if figures.delivered != feed.expected_notifications:
        by_kind = {k: (v, sink["by_kind"].get(k, 0)) for k, v in feed.expected_by_kind.items()}
        problems.append(
            f"[{label}] the feed's stories call for {feed.expected_notifications:,} "
            f"notifications, the sink has {figures.delivered:,} (expected, received by kind: "
            f"{by_kind})"
        )


# -- report ----------------------------------------------------------------------------------------
def _rate(value: float | None) -> str:
    return f"{value:>9,.0f}/s" if value is not None else f"{'-':>9}  "


def print_report(feed: Feed, runs: dict[str, RunFigures | None], sink: str) -> None:
    print("\nResults (each rate over the time from the first message sent)")
    for label, figures in runs.items():
        if figures is None:
            print(f"  {label}: not measured")
            continue
        print(f"  {label}:")
        acks = f"ACK p50 {figures.ack_p50_ms:.2f} ms, p99 {figures.ack_p99_ms:.2f} ms"
        print(
            f"    intake (ACKed)              {_rate(figures.intake_rate)}  "
            f"{figures.sent:,} msgs in {figures.intake_seconds or 0:.1f} s; {acks}"
        )
        print(
            f"    messages routed             {_rate(figures.routed_rate)}  "
            f"{figures.routed:,} stored msgs in {figures.routed_seconds or 0:.1f} s"
        )
        if figures.sink is not None:
            kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(figures.sink["by_kind"].items()))
            print(
                f"    notifications accepted      {_rate(figures.delivered_rate)}  "
                f"{figures.delivered:,} at the {sink} sink in "
                f"{figures.delivered_seconds or 0:.1f} s ({kinds})"
            )
            store = figures.store
            if store is not None:
                told = ", ".join(f"{k} {v:,}" for k, v in sorted(store.notifications.items()))
                print(f"    notification decisions      {told}")
    care, plain = runs.get("care"), runs.get("routing-only")
    if care and plain and care.routed_rate and plain.routed_rate:
        print(
            f"\n  ratio care / routing-only: routed {care.routed_rate / plain.routed_rate:.2f} "
            f"({care.routed_rate:,.0f} / {plain.routed_rate:,.0f} msg/s)"
            + (
                f", intake {care.intake_rate / plain.intake_rate:.2f}"
                if care.intake_rate and plain.intake_rate
                else ""
            )
            + (
                f", notifications/s vs routing-only routed/s "
                f"{care.delivered_rate / plain.routed_rate:.2f}"
                if care.delivered_rate
                else ""
            )
        )


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_bin = Path(sys.executable).parent / "carehub"
    parser = argparse.ArgumentParser(description="carehub care-transitions benchmark")
    parser.add_argument("--quick", action="store_true", help="5,000 messages over 500 visits")
    parser.add_argument("--messages", type=int, help="ADT messages in the feed (100,000)")
    parser.add_argument("--encounters", type=int, help="visits in the feed (10,000)")
    parser.add_argument("--k", type=int, default=8, help="concurrent MLLP connections")
    parser.add_argument("--sink", choices=("http", "smtp"), default="http")
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--ack-timeout", type=float, default=30.0)
    parser.add_argument("--drain-timeout", type=float, help="seconds a run may take (1,800)")
    parser.add_argument("--carehub-bin", type=Path, default=default_bin)
    parser.add_argument("--tmp-dir", type=Path, help="where stores go (a real disk)")
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--skip-routing-only", action="store_true")
    args = parser.parse_args(argv)
    args.messages = args.messages or (5_000 if args.quick else 100_000)
    args.encounters = args.encounters or (500 if args.quick else 10_000)
    args.drain_timeout = args.drain_timeout or (300.0 if args.quick else 1800.0)
    return args


async def run(args: argparse.Namespace) -> int:
    tag = run_tag()
    started = time.perf_counter()
    feed = await asyncio.to_thread(
        build_feed, args.messages, args.encounters, args.k, tag, args.seed
    )
    work = Path(tempfile.mkdtemp(prefix="carehub-care-", dir=args.tmp_dir))
    print(
        f"carehub care-transitions benchmark: python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, K={args.k}, run tag {tag}\n"
        f"feed: {feed.messages:,} ADT messages ({feed.resends:,} resends) over "
        f"{feed.encounters:,} visits of {feed.patients:,} patients, built in "
        f"{time.perf_counter() - started:.1f} s; stories "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(feed.stories.items()))
        + f"\nexpected notifications {feed.expected_notifications:,} ("
        + ", ".join(f"{k} {v:,}" for k, v in sorted(feed.expected_by_kind.items()))
        + f"); sink: {args.sink}\ndata in {work} ({filesystem_type(work) or 'unknown fs'})",
        flush=True,
    )
    outcome = Outcome()
    runs: dict[str, RunFigures | None] = {}
    try:
        if not args.skip_routing_only:
            print("[routing-only] route: translate v2-to-event, no forward", flush=True)
            runs["routing-only"] = await run_once(
                "routing-only", args, work, feed, outcome, sink=None
            )
        print(
            "[care] route: v2-to-event -> encounter-state -> care-team -> follow-up-clock -> "
            f"notify ({args.sink} sink)",
            flush=True,
        )
        runs["care"] = await run_once("care", args, work, feed, outcome, sink=args.sink)
    finally:
        if args.keep_data:
            print(f"\ndata and logs kept in {work}")
        else:
            await asyncio.to_thread(shutil.rmtree, work, True)
    print_report(feed, runs, args.sink)
    if outcome.notes:
        print("\nNotes:")
        for line in outcome.notes:
            print(f"  {line}")
    if outcome.problems:
        print("\nProblems (crash, wrong ACK, lost or duplicated notification):")
        for line in outcome.problems:
            print(f"  {line}")
        return 1
    print("\nno lost or duplicated notifications")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sink"]:
        kind = argv[1] if len(argv) > 1 else "http"
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_sink(kind, "127.0.0.1"))
        return 0
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
