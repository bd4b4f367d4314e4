"""End-to-end routing benchmark: MLLP in, routed, delivered to a webhook and to files.

The embedded default deployment (SQLite store, memory:// queue, the routing worker inside
`carehub serve`) with one route: `translate: v2-to-event`, then `forward` to a file channel
(`body: event`) and to a webhook channel pointed at bench/webhook_sink.py. Measured in one run:

  1. intake only: `carehub serve` with `routes: []` and the worker off; K connections send a
     fixed N messages, each waiting for its ACK -> msgs/s, the ceiling for everything below.
  2. routing: the same load sent continuously for --duration seconds while the bench samples,
     once a second, the ACKs so far, the webhook deliveries at the sink (distinct
     Idempotency-Keys) and the files in the outbox. A message counts as delivered end to end
     once both destinations have it (min of the two counts). Then sending stops and the bench
     waits for the backlog to drain and checks that every ACKed message reached each
     destination exactly once.
  3. the ratio end-to-end / intake-only, and the target (>= 1,000 msg/s sustained for the
     whole window), from this run's figures.

Exit code 0 whatever the figures; 1 if a process crashed (or did not exit 0 on SIGTERM), an ACK
was wrong or missing, or a message was lost: missing at a destination after the drain, or, when
the backlog did not drain within --drain-timeout, not accounted for in carehub's store.

    .venv/bin/python bench/bench_routing.py [--quick] [--duration 60] [--k 8] [--patients N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from loadgen import check_ack
from messages import CONTROL_ID_SLOT, END_BLOCK, START_BLOCK, TEMPLATE

BENCH_DIR = Path(__file__).resolve().parent
SINK_PY = BENCH_DIR / "webhook_sink.py"

START_TIMEOUT = 30.0  # seconds carehub (or the sink) gets to say it is ready
TARGET_RATE = 1000.0  # end-to-end msg/s, sustained over the whole window
STRETCH = 10  # seconds: the "sustained" check looks at every 10 s stretch of the window
ROUTING_STOP_TIMEOUT = 90.0  # seconds the routing hub gets to exit after SIGTERM
SLOW_STOP = 15.0  # ... and more than this is reported (bench_intake allows 15 s)
STALL_SECONDS = 30.0  # a drain with no progress for this long has stopped: stop waiting
TEMPLATE_MRN = "MRN00123456"  # PID-3.1 (the MR identifier) in messages.TEMPLATE
MAX_ERROR_SAMPLES = 10
LOG_LINE_RE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b")


# -- the message --------------------------------------------------------------------------------
class MessageFactory:
    """The bench's ADT^A01 (messages.py) with MSH-10 and the patient's MRN set per message.

    carehub delivers one patient's messages to one destination strictly in order (a later
    delivery is not claimed while an earlier one is pending), so a feed in which every message
    is for the same patient measures that ordering rule, not the engine. Message i is for
    patient i mod `patients`, as a hospital feed spreads over its census."""

    def __init__(self, patients: int) -> None:
        head, tail = TEMPLATE.split(CONTROL_ID_SLOT)
        if tail.count(TEMPLATE_MRN) != 1:
            raise SystemExit(f"messages.TEMPLATE no longer holds {TEMPLATE_MRN} once in PID-3")
        middle, end = tail.split(TEMPLATE_MRN)
        self.patients = max(1, patients)
        self._head = START_BLOCK + head.encode("ascii")
        self._middle = middle.encode("ascii")
        self._end = end.encode("ascii") + END_BLOCK

    @property
    def size(self) -> int:
        """Bytes of one message, without MLLP framing, with a 15-character MSH-10."""
        return len(self.frame("X" * 15, 1)) - len(START_BLOCK) - len(END_BLOCK)

    def frame(self, control_id: str, seq: int) -> bytes:
        mrn = f"MRN{seq % self.patients:08d}"
        return self._head + control_id.encode("ascii") + self._middle + mrn.encode() + self._end


# -- the load generator ---------------------------------------------------------------------------
@dataclass(slots=True)
class LoadState:
    """Shared by all connections: what to send next and what came back."""

    id_prefix: str
    factory: MessageFactory
    limit: int | None = None  # None: until stop_sending()
    stopping: bool = False
    sent: int = 0
    acked: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    failed_ids: set[str] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)

    def take(self) -> tuple[str, bytes] | None:
        """The next control id and its frame, or None when there is nothing more to send."""
        if self.stopping or (self.limit is not None and self.sent >= self.limit):
            return None
        self.sent += 1
        control_id = f"{self.id_prefix}{self.sent:08d}"
        return control_id, self.factory.frame(control_id, self.sent)

    def error(self, control_id: str | None, text: str) -> None:
        self.errors += 1
        if control_id is not None:
            self.failed_ids.add(control_id)
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(text)

    def control_id(self, seq: int) -> str:
        return f"{self.id_prefix}{seq:08d}"


class _Connection(asyncio.Protocol):
    """One persistent MLLP connection: send, wait for the ACK, check it, send the next (the
    same request/response loop as loadgen.py, with the message built per sequence number)."""

    def __init__(self, state: LoadState, done: asyncio.Future[None]) -> None:
        self.state = state
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.control_id: str | None = None
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send_next(self) -> None:
        work = self.state.take()
        if work is None or self.transport is None:
            self.control_id = None
            if not self.done.done():
                self.done.set_result(None)
            if self.transport is not None:
                self.transport.close()
            return
        self.control_id, frame = work
        self.sent_at = time.perf_counter()
        self.transport.write(frame)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(END_BLOCK)
        if end < 0:
            return
        received_at = time.perf_counter()
        frame = bytes(self.buffer[:end])
        extra = len(self.buffer) - end - len(END_BLOCK)
        self.buffer.clear()
        if self.control_id is None:
            self.state.error(None, f"unsolicited reply: {frame[:60]!r}")
            return
        self.state.acked += 1
        self.state.latencies.append(received_at - self.sent_at)
        problem = check_ack(frame, self.control_id)
        if problem is None and extra:
            problem = f"{self.control_id}: {extra} unexpected bytes after the ACK"
        if problem is not None:
            self.state.error(self.control_id, problem)
        self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.control_id is not None:
            reason = exc or "closed by server"
            self.state.error(self.control_id, f"{self.control_id}: connection lost ({reason})")
            self.control_id = None
        if not self.done.done():
            self.done.set_result(None)

    def abort(self, reason: str) -> None:
        if self.control_id is not None:
            self.state.error(self.control_id, f"{self.control_id}: {reason}")
            self.control_id = None
        if self.transport is not None:
            self.transport.abort()
        if not self.done.done():
            self.done.set_result(None)


class SteadyLoad:
    """K connections sending request/response, either N messages or until told to stop.

    If no ACK arrives for `ack_timeout` seconds while messages are outstanding, every
    connection is aborted and the outstanding messages count as errors."""

    def __init__(self, state: LoadState, k: int, ack_timeout: float) -> None:
        self.state = state
        self.k = k
        self.ack_timeout = ack_timeout
        self.connections: list[_Connection] = []
        self.started = 0.0
        self.ended = 0.0
        self._watchdog: asyncio.Task[None] | None = None

    async def connect(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.k):
            done: asyncio.Future[None] = loop.create_future()
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda d=done: _Connection(self.state, d), host, port),
                self.ack_timeout,
            )
            self.connections.append(protocol)

    def start(self) -> None:
        self.started = time.perf_counter()
        self._watchdog = asyncio.create_task(self._watch())
        for conn in self.connections:
            conn.send_next()

    @property
    def running(self) -> bool:
        return not all(conn.done.done() for conn in self.connections)

    def stop_sending(self) -> None:
        """Send nothing new; the messages in flight still get their ACKs."""
        self.state.stopping = True

    async def finished(self) -> float:
        """Wait until every connection is done; the seconds from start to the last ACK."""
        await asyncio.gather(*(conn.done for conn in self.connections))
        self.ended = time.perf_counter()
        if self._watchdog is not None:
            self._watchdog.cancel()
        return self.ended - self.started

    async def _watch(self) -> None:
        last, since = self.state.acked, time.monotonic()
        while self.running:
            await asyncio.sleep(min(0.5, self.ack_timeout / 4))
            if self.state.acked != last:
                last, since = self.state.acked, time.monotonic()
            elif time.monotonic() - since > self.ack_timeout:
                for conn in self.connections:
                    conn.abort(f"no ACK within {self.ack_timeout:g} s")
                return


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """User and system CPU seconds a process (all its threads) has used, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def percentile_ms(values: list[float], p: float) -> float:
    """Nearest-rank percentile in milliseconds (NaN for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1] * 1000


# -- the sink and the outbox ------------------------------------------------------------------
async def http_get_json(port: int, path: str, timeout: float = 10.0) -> Any:
    """GET http://127.0.0.1:<port><path> (Connection: close) and decode the JSON body."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            writer.write(request.encode("ascii"))
            data = await reader.read()
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET {path}: {head[:80]!r}")
    return json.loads(body)


def count_files(directory: Path) -> int:
    """Delivered files; the file channel's temp files are dot files and do not count."""
    try:
        with os.scandir(directory) as entries:
            return sum(1 for entry in entries if not entry.name.startswith("."))
    except FileNotFoundError:
        return 0


def file_names(directory: Path) -> list[str]:
    with os.scandir(directory) as entries:
        return [entry.name for entry in entries if not entry.name.startswith(".")]


KEY_RE = re.compile(r"^carehub-(\d+)-(\d+)-[0-9a-f]+")


def message_ids_of(keys: list[str]) -> tuple[set[int], int]:
    """carehub message ids named by idempotency keys (`carehub-<id>-<run>-<digest>`), and how
    many keys did not have that shape."""
    ids: set[int] = set()
    odd = 0
    for key in keys:
        match = KEY_RE.match(key)
        if match:
            ids.add(int(match.group(1)))
        else:
            odd += 1
    return ids, odd


@dataclass(slots=True, frozen=True)
class Sample:
    """One look at the pipeline; t is seconds since sending started."""

    t: float
    acked: int
    webhook: int  # distinct Idempotency-Keys the sink has seen
    requests: int  # POSTs the sink has answered (a resend counts again)
    files: int

    @property
    def delivered(self) -> int:
        """Messages delivered end to end: both destinations must have them."""
        return min(self.webhook, self.files)


async def take_sample(t0: float, state: LoadState, sink_port: int, outbox: Path) -> Sample:
    acked = state.acked
    stats, files = await asyncio.gather(
        http_get_json(sink_port, "/stats"), asyncio.to_thread(count_files, outbox)
    )
    return Sample(time.perf_counter() - t0, acked, stats["distinct_keys"], stats["requests"], files)


WEBHOOK_DESTINATION = "bench-webhook"
FILE_DESTINATION = "bench-file"


@dataclass(slots=True, frozen=True)
class StoreCounts:
    """Messages by status and deliveries by (destination, status), from one read transaction
    on carehub's SQLite file, so the figures agree with each other."""

    messages: dict[str, int]
    deliveries: dict[tuple[str, str], int]

    @property
    def total(self) -> int:
        return sum(self.messages.values())

    def of(self, destination: str, *statuses: str) -> int:
        """Deliveries to `destination` (carehub names it `<route>/<name>`) in these statuses."""
        return sum(
            n
            for (name, status), n in self.deliveries.items()
            if name.rsplit("/", 1)[-1] == destination and (not statuses or status in statuses)
        )

    def text(self) -> str:
        msgs = ", ".join(f"{s} {n:,}" for s, n in sorted(self.messages.items())) or "none"
        parts = [f"messages {msgs}"]
        for destination in sorted({d for d, _ in self.deliveries}):
            by_status = sorted((s, n) for (d, s), n in self.deliveries.items() if d == destination)
            parts.append(f"{destination} " + ", ".join(f"{s} {n:,}" for s, n in by_status))
        return "; ".join(parts)


def store_counts(db: Path) -> StoreCounts | str:
    """The counts, or why they could not be read."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10, isolation_level=None)
        try:
            con.execute("BEGIN")
            msgs = con.execute("SELECT status, count(*) FROM messages GROUP BY status").fetchall()
            dels = con.execute(
                "SELECT destination, status, count(*) FROM deliveries GROUP BY destination, status"
            ).fetchall()
            con.execute("COMMIT")
        finally:
            con.close()
    except sqlite3.Error as err:
        return f"store not readable: {err}"
    return StoreCounts(dict(msgs), {(d, s): n for d, s, n in dels})


# -- carehub ------------------------------------------------------------------------------------
def write_configs(
    run_dir: Path, base: dict[str, Any] | None, sink_port: int | None, outbox: Path
) -> Path:
    """carehub.yaml (and routes/bench.yaml when routing); intake-only when sink_port is None."""
    config: dict[str, Any] = dict(base or {})
    config.setdefault("store", {"durability": "process"})
    config.setdefault("queue", {"url": "memory://"})
    worker = dict(config.get("worker") or {})
    if sink_port is None:
        config["routes"] = []
        worker["enabled"] = False
    else:
        routes_dir = run_dir / "routes"
        routes_dir.mkdir()
        route = {
            "name": "bench-adt-events",
            "description": "bench_routing.py: ADT^A01 as care events, to files and a webhook",
            "when": {"type": "ADT", "events": ["A01"]},
            "steps": [
                {"translate": "v2-to-event"},
                {
                    "forward": {
                        "channel": "file",
                        "name": FILE_DESTINATION,
                        "directory": str(outbox),
                        "body": "event",
                    }
                },
                {
                    "forward": {
                        "channel": "webhook",
                        "name": WEBHOOK_DESTINATION,
                        "url": f"http://127.0.0.1:{sink_port}/events",
                    }
                },
            ],
        }
        (routes_dir / "bench.yaml").write_text(yaml.safe_dump({"routes": [route]}, sort_keys=False))
        config["routes"] = ["routes/*.yaml"]
        worker["enabled"] = True
    config["worker"] = worker
    path = run_dir / "carehub.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def log_report(server: ServerProcess) -> list[str]:
    """carehub's warnings and errors, summarised; a traceback is shown whole (the first)."""
    lines = server.stderr_path.read_text(errors="replace").splitlines()
    flagged = [line for line in lines if LOG_LINE_RE.search(line)]
    if not flagged and not any(line.startswith("Traceback") for line in lines):
        return []
    out = [f"carehub logged {len(flagged)} warning/error line(s), e.g.:"]
    out += [f"    {line[:300]}" for line in flagged[:3]]
    start = next((i for i, line in enumerate(lines) if line.startswith("Traceback")), None)
    if start is not None:
        out.append("  first traceback:")
        out += [f"    {line}" for line in lines[max(0, start - 1) : start + 40]]
    return out


# -- the two phases -----------------------------------------------------------------------------
@dataclass(slots=True)
class Outcome:
    problems: list[str] = field(default_factory=list)  # crashes, wrong ACKs, lost messages
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class IntakeFigures:
    n: int
    elapsed: float
    rate: float
    p50_ms: float
    p99_ms: float


async def run_intake_only(
    args: argparse.Namespace, work: Path, tag: str, factory: MessageFactory, outcome: Outcome
) -> IntakeFigures | None:
    """carehub with no routes and no worker: how fast it takes messages in (store, ACK)."""
    run_dir = work / "intake-only"
    run_dir.mkdir()
    config = write_configs(run_dir, args.base_config, None, run_dir / "outbox")
    print("[intake only] starting carehub (routes: [], worker off) ...", flush=True)
    try:
        server, host, port = await start_carehub(
            "carehub-intake", args.carehub_bin, run_dir, config
        )
    except (Unavailable, OSError) as exc:
        outcome.problems.append(f"intake-only carehub did not start: {exc}")
        return None
    figures: IntakeFigures | None = None
    try:
        print(
            f"[intake only] {host}:{port}; warm-up {args.warmup:,}, timing {args.n:,} messages "
            f"over K={args.k} connections ...",
            flush=True,
        )
        for label, n, code in (("warm-up", args.warmup, "W"), ("timed", args.n, "I")):
            state = LoadState(f"{tag}{code}", factory, limit=n)
            load = SteadyLoad(state, args.k, args.ack_timeout)
            await load.connect(host, port)
            load.start()
            elapsed = await load.finished()
            if state.errors:
                outcome.problems.append(f"intake only, {label}: {state.errors} wrong/missing ACKs")
                outcome.problems.extend(f"  {text}" for text in state.error_samples)
            if label == "timed":
                figures = IntakeFigures(
                    n,
                    elapsed,
                    state.acked / elapsed if elapsed > 0 else 0.0,
                    percentile_ms(state.latencies, 50),
                    percentile_ms(state.latencies, 99),
                )
    except OSError as exc:
        outcome.problems.append(f"intake only: cannot connect: {exc}")
    finally:
        crash = server.crashed()
        if crash:
            outcome.problems.append(f"intake-only carehub {crash}")
        elif stopped := await server.stop():
            outcome.problems.append(f"intake-only carehub {stopped}")
        outcome.notes += log_report(server)
    if figures is not None:
        print(
            f"[intake only] {figures.n:,} messages in {figures.elapsed:.1f} s -> "
            f"{figures.rate:,.0f} msg/s (ACK p50 {figures.p50_ms:.2f} ms, "
            f"p99 {figures.p99_ms:.2f} ms)",
            flush=True,
        )
    return figures


@dataclass(slots=True)
class RoutingFigures:
    window: float  # seconds of sending (sample at its end)
    samples: list[Sample]  # one a second during the window, t=0 first
    end: Sample  # the sample at the end of the window
    acked_total: int  # ACKs after the messages in flight at the end came back
    ack_p50_ms: float
    ack_p99_ms: float
    store_at_end: str
    drain_seconds: float | None  # None: not drained
    final: Sample  # after the drain (and 2 s more, for late duplicates)
    sink_stats: dict[str, int]
    store_final: str
    #: carehub's user and system CPU seconds over the window (None off Linux).
    cpu: tuple[float, float] | None = None


async def run_routing(
    args: argparse.Namespace, work: Path, tag: str, factory: MessageFactory, outcome: Outcome
) -> RoutingFigures | None:
    run_dir = work / "routing"
    run_dir.mkdir()
    outbox = run_dir / "outbox"
    print("[routing] starting the webhook sink ...", flush=True)
    try:
        sink = ServerProcess("webhook-sink", [sys.executable, str(SINK_PY), "--port", "0"], work)
        _, sink_port = await sink.wait_ready(parse_port_line, START_TIMEOUT)
    except (Unavailable, OSError) as exc:
        outcome.problems.append(f"webhook sink did not start: {exc}")
        return None
    server: ServerProcess | None = None
    try:
        config = write_configs(run_dir, args.base_config, sink_port, outbox)
        print("[routing] starting carehub (route: v2-to-event -> file + webhook) ...", flush=True)
        try:
            server, host, port = await start_carehub(
                "carehub-routing", args.carehub_bin, run_dir, config
            )
        except (Unavailable, OSError) as exc:
            outcome.problems.append(f"routing carehub did not start: {exc}")
            outcome.notes += stderr_block(run_dir / "carehub-routing.stderr")
            return None
        print(
            f"[routing] carehub pid {server.proc.pid} on {host}:{port}, sink on :{sink_port}, "
            f"outbox {outbox}; sending for {args.duration:g} s over K={args.k} ...",
            flush=True,
        )
        return await _drive_routing(
            args, tag, factory, server, host, port, sink_port, outbox, outcome
        )
    finally:
        if server is not None:
            crash = server.crashed()
            if crash:
                outcome.problems.append(f"routing carehub {crash}")
            else:
                seconds, stopped = await stop_slowly(server, ROUTING_STOP_TIMEOUT)
                if stopped:
                    outcome.problems.append(f"routing carehub {stopped}")
                elif seconds > SLOW_STOP:
                    outcome.notes.append(
                        f"routing carehub took {seconds:.1f} s to exit after SIGTERM "
                        f"(intake-only carehub: within {SLOW_STOP:g} s expected)"
                    )
            outcome.notes += log_report(server)
        if crash := sink.crashed():
            outcome.problems.append(f"webhook sink {crash}")
        elif stopped := await sink.stop():
            outcome.problems.append(f"webhook sink {stopped}")


async def stop_slowly(server: ServerProcess, timeout: float) -> tuple[float, str | None]:
    """SIGTERM and wait up to `timeout` (a hub with a delivery backlog may take a while):
    the seconds it took, and a description if it did not exit cleanly with code 0."""
    started = time.monotonic()
    if server.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            server.proc.send_signal(signal.SIGTERM)
    while server.proc.poll() is None:
        if time.monotonic() - started > timeout:
            server.proc.kill()
            server.proc.wait()
            return timeout, f"did not exit within {timeout:g} s of SIGTERM (killed)"
        await asyncio.sleep(0.05)
    seconds = time.monotonic() - started
    if server.proc.returncode != 0:
        tail = server.stderr_tail()[-300:]
        return seconds, f"exit code {server.proc.returncode} (0 expected on SIGTERM): {tail}"
    return seconds, None


def stderr_block(path: Path, lines: int = 40) -> list[str]:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return ["carehub stderr (tail):"] + [f"    {line}" for line in text[-lines:]] if text else []


async def _drive_routing(
    args: argparse.Namespace,
    tag: str,
    factory: MessageFactory,
    server: ServerProcess,
    host: str,
    port: int,
    sink_port: int,
    outbox: Path,
    outcome: Outcome,
) -> RoutingFigures | None:
    state = LoadState(f"{tag}R", factory)
    load = SteadyLoad(state, args.k, args.ack_timeout)
    try:
        await load.connect(host, port)
    except (OSError, TimeoutError) as exc:
        outcome.problems.append(f"routing: cannot connect to carehub: {exc}")
        return None

    def crashed() -> bool:
        crash = server.crashed()
        if crash:
            outcome.problems.append(f"routing carehub {crash}")
        return crash is not None

    # The sending window: a sample every second, on a fixed schedule.
    load.start()
    t0 = load.started
    cpu_start = cpu_seconds(server.proc.pid)
    samples = [Sample(0.0, 0, 0, 0, 0)]
    tick = 1
    while tick <= args.duration:
        await asyncio.sleep(max(0.0, t0 + tick - time.perf_counter()))
        if crashed() or not load.running:
            break
        samples.append(await take_sample(t0, state, sink_port, outbox))
        if tick % 10 == 0 or tick == int(args.duration):
            s = samples[-1]
            print(
                f"  t={tick:>3}s  acked {s.acked:>9,}  webhook {s.webhook:>9,}  "
                f"files {s.files:>9,}  backlog {s.acked - s.delivered:>8,}",
                flush=True,
            )
        tick += 1
    load.stop_sending()
    cpu_end = cpu_seconds(server.proc.pid)
    end = samples[-1]
    window = end.t
    stop_at = time.perf_counter()
    await load.finished()
    if state.errors:
        outcome.problems.append(f"routing run: {state.errors} wrong or missing ACKs, e.g.")
        outcome.problems.extend(f"  {text}" for text in state.error_samples)
    if len(samples) < 2 or server.crashed():
        crashed()
        return None
    db = outbox.parent / "data" / "carehub.db"
    snapshot = await asyncio.to_thread(store_counts, db)
    store_at_end = snapshot if isinstance(snapshot, str) else snapshot.text()
    acked_total = state.acked
    print(
        f"[routing] stopped sending at t={window:.1f} s; {acked_total:,} ACKed; "
        f"waiting up to {args.drain_timeout:g} s for delivery ...",
        flush=True,
    )

    # The drain: until both destinations have every ACKed message, or it stops moving.
    drain_seconds: float | None = None
    progress_at, last_delivered = time.perf_counter(), -1
    while True:
        final = await take_sample(t0, state, sink_port, outbox)
        now = time.perf_counter()
        if final.webhook >= acked_total and final.files >= acked_total:
            drain_seconds = now - stop_at
            break
        if final.delivered != last_delivered:
            progress_at, last_delivered = now, final.delivered
        if now - stop_at > args.drain_timeout or now - progress_at > STALL_SECONDS or crashed():
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(2.0)  # late resends (duplicates) would show up here
    # The store first, then the destinations: a delivery the store calls delivered must
    # already be at its destination (carehub records it after the send succeeds).
    store = await asyncio.to_thread(store_counts, db)
    final = await take_sample(t0, state, sink_port, outbox)
    sink_stats: dict[str, int] = await http_get_json(sink_port, "/stats")
    ids: dict[str, list[str]] = await http_get_json(sink_port, "/ids", timeout=60)
    names = await asyncio.to_thread(file_names, outbox)
    check_delivery(state, final, sink_stats, ids, names, store, drain_seconds is not None, outcome)
    return RoutingFigures(
        window=window,
        samples=samples,
        end=end,
        acked_total=acked_total,
        ack_p50_ms=percentile_ms(state.latencies, 50),
        ack_p99_ms=percentile_ms(state.latencies, 99),
        store_at_end=store_at_end,
        drain_seconds=drain_seconds,
        final=final,
        sink_stats=sink_stats,
        store_final=store if isinstance(store, str) else store.text(),
        cpu=(
            (cpu_end[0] - cpu_start[0], cpu_end[1] - cpu_start[1])
            if cpu_start and cpu_end
            else None
        ),
    )


def check_delivery(
    state: LoadState,
    final: Sample,
    sink: dict[str, int],
    ids: dict[str, list[str]],
    names: list[str],
    store: StoreCounts | str,
    drained: bool,
    outcome: Outcome,
) -> None:
    """Is every correctly ACKed message at both destinations, once? Drained: checked by name
    (control ids at the sink, carehub message ids in webhook keys and file names). Not
    drained: every message must still be accounted for in the store (stored, and either
    unrouted or with a pending delivery per destination), so slow is not mistaken for lost."""
    acked_ids = {state.control_id(seq) for seq in range(1, state.sent + 1)} - state.failed_ids
    expected = len(acked_ids)
    problems = outcome.problems
    if sink["missing_key"]:
        problems.append(f"{sink['missing_key']} webhook request(s) had no Idempotency-Key")
    if sink["bad_requests"]:
        problems.append(f"the sink could not parse {sink['bad_requests']} request(s)")
    seen = set(ids["control_ids"])
    extra = seen - acked_ids - state.failed_ids
    if extra:
        problems.append(f"{len(extra):,} control id(s) at the sink were never sent")
    webhook_ids, odd_keys = message_ids_of(ids["keys"])
    file_ids, odd_files = message_ids_of(names)
    if odd_keys or odd_files:
        outcome.notes.append(
            f"{odd_keys} webhook key(s) and {odd_files} file name(s) not shaped "
            "carehub-<message id>-<run>-<digest>"
        )
    for label, count in (("webhook distinct keys", final.webhook), ("files", final.files)):
        if count > expected:
            problems.append(f"{label}: {count:,}, more than the {expected:,} messages ACKed")

    if drained:
        missing = acked_ids - seen
        if missing:
            sample = ", ".join(sorted(missing)[:5])
            problems.append(f"{len(missing):,} ACKed control id(s) not at the sink: {sample}")
        if webhook_ids != file_ids:
            problems.append(
                f"webhook and outbox disagree: {len(webhook_ids - file_ids):,} message(s) "
                f"only at the webhook, {len(file_ids - webhook_ids):,} only in files"
            )
        return

    if isinstance(store, str):
        problems.append(f"not drained, and cannot tell slow from lost: {store}")
        return
    before = len(problems)
    unrouted = store.messages.get("received", 0)
    if store.total < expected:
        problems.append(f"{expected - store.total:,} ACKed message(s) are not in the store")
    for destination, arrived in (
        (WEBHOOK_DESTINATION, final.webhook),
        (FILE_DESTINATION, final.files),
    ):
        done = store.of(destination, "delivered")
        queued = store.of(destination, "pending", "sending")
        dead = store.of(destination, "dead")
        if dead:
            problems.append(f"{destination}: {dead:,} dead letter(s)")
        if arrived < done:
            problems.append(
                f"{destination}: the store says {done:,} delivered, only {arrived:,} arrived"
            )
        accounted = done + queued + dead + unrouted
        if accounted < store.total:
            problems.append(
                f"{destination}: {store.total - accounted:,} message(s) routed without a delivery"
            )
    if len(problems) == before:
        outcome.notes.append(
            f"not drained: {expected - final.delivered:,} message(s) not yet delivered end to "
            "end, all still queued in the store (unrouted or pending): slow, not lost"
        )


# -- the report ---------------------------------------------------------------------------------
def per_second_rates(samples: list[Sample], value: Callable[[Sample], int]) -> list[float]:
    return [
        (value(b) - value(a)) / (b.t - a.t) for a, b in itertools.pairwise(samples) if b.t > a.t
    ]


def stretch_rates(samples: list[Sample], seconds: int) -> list[float]:
    """Rates over every `seconds`-long stretch of consecutive samples (rolling)."""
    return [
        (b.delivered - a.delivered) / (b.t - a.t)
        for a, b in zip(samples, samples[seconds:], strict=False)
        if b.t > a.t
    ]


def bucket_rates(samples: list[Sample], seconds: int) -> list[float]:
    """Rates over back-to-back `seconds`-long buckets (the last one may be shorter)."""
    marks = samples[::seconds]
    if marks[-1] is not samples[-1]:
        marks.append(samples[-1])
    return [
        (b.delivered - a.delivered) / (b.t - a.t) for a, b in itertools.pairwise(marks) if b.t > a.t
    ]


def _line(label: str, rate: float | None, detail: str = "") -> str:
    figure = f"{rate:>9,.0f} msg/s" if rate is not None else f"{'-':>9}      "
    return f"    {label:<36} {figure}   {detail}".rstrip()


def print_report(
    intake: IntakeFigures | None, routing: RoutingFigures | None, outcome: Outcome
) -> None:
    print("\nResults")
    if intake is not None:
        acks = f"ACK p50 {intake.p50_ms:.2f} ms, p99 {intake.p99_ms:.2f} ms"
        print(_line("intake only (no routes, worker off)", intake.rate, f"{intake.n:,}; {acks}"))
    else:
        print(_line("intake only", None, "not measured"))
    if routing is None:
        print(_line("routing", None, "not measured"))
    else:
        w, end = routing.window, routing.end
        e2e = end.delivered / w if w else 0.0
        print(f"  routing run, {w:.1f} s window:")
        acks = f"ACK p50 {routing.ack_p50_ms:.2f} ms, p99 {routing.ack_p99_ms:.2f} ms"
        print(_line("intake (ACKed)", end.acked / w, f"{end.acked:,}; {acks}"))
        print(_line("webhook deliveries (distinct keys)", end.webhook / w, f"{end.webhook:,}"))
        print(_line("file deliveries", end.files / w, f"{end.files:,}"))
        print(_line("END-TO-END delivered (min of both)", e2e, f"{end.delivered:,}"))
        per_sec = per_second_rates(routing.samples, lambda s: s.delivered)
        if per_sec:
            print(
                f"    end-to-end per second: min {min(per_sec):,.0f} / median "
                f"{statistics.median(per_sec):,.0f} / max {max(per_sec):,.0f} msg/s "
                f"over {len(per_sec)} s"
            )
        if routing.cpu and end.delivered:
            user, system = routing.cpu
            print(
                f"    carehub CPU in the window: user {user:.1f} s + system {system:.1f} s = "
                f"{(user + system) / end.delivered * 1e6:,.0f} us per message delivered "
                f"({(user + system) / w:.0%} of one core)"
            )
        buckets = bucket_rates(routing.samples, STRETCH)
        print(f"    end-to-end per {STRETCH} s: " + " ".join(f"{rate:,.0f}" for rate in buckets))
        backlog = end.acked - end.delivered
        print(
            f"    backlog at end of window: {backlog:,} msgs ACKed but not delivered end to end "
            f"(webhook {end.acked - end.webhook:,}, files {end.acked - end.files:,})"
        )
        print(f"    store at end of window: {routing.store_at_end}")
        final, sink, acked = routing.final, routing.sink_stats, routing.acked_total
        if routing.drain_seconds is not None:
            rate = (acked - end.delivered) / routing.drain_seconds if routing.drain_seconds else 0
            print(
                f"  drain: backlog delivered {routing.drain_seconds:.1f} s after sending stopped "
                f"({rate:,.0f} msg/s end to end while draining)"
            )
        else:
            rate = (final.delivered - end.delivered) / (final.t - end.t) if final.t > end.t else 0
            left = acked - final.delivered
            eta = f"; ~{left / rate:,.0f} s more at that rate" if rate > 0 else ""
            print(
                f"  drain: NOT drained {final.t - end.t:.0f} s after sending stopped: {left:,} of "
                f"{acked:,} not delivered end to end (webhook {acked - final.webhook:,}, files "
                f"{acked - final.files:,}); draining at {rate:,.0f} msg/s{eta}"
            )
        print(f"  store after the drain: {routing.store_final}")
        dupes = f"duplicates at the sink {sink['duplicates']:,}"
        if routing.drain_seconds is None:
            print(f"  exactly once per destination: not established (not drained); {dupes}")
        else:
            once = final.webhook == final.files == acked and sink["duplicates"] == 0
            print(
                f"  exactly once per destination: {'yes' if once else 'NO'} -- ACKed {acked:,}; "
                f"webhook distinct keys {final.webhook:,} (requests {sink['requests']:,}, "
                f"{dupes}, distinct control ids {sink['distinct_control_ids']:,}); "
                f"files {final.files:,}"
            )
    if intake is not None and routing is not None and routing.window and intake.rate:
        e2e = routing.end.delivered / routing.window
        print(
            f"\n  ratio end-to-end / intake-only: {e2e / intake.rate:.2f} "
            f"({e2e:,.0f} / {intake.rate:,.0f} msg/s)"
        )
    print_target(routing, outcome)


def print_target(routing: RoutingFigures | None, outcome: Outcome) -> None:
    """MET when the window's average end-to-end rate and its slowest 10 s stretch (rolling,
    so a burst cannot carry a stall) both reach the target."""
    if routing is None or not routing.window:
        print(f"\nTarget: end-to-end >= {TARGET_RATE:,.0f} msg/s sustained: n/a (not measured)")
        return
    name = f"end-to-end >= {TARGET_RATE:,.0f} msg/s sustained for {routing.window:.0f} s"
    e2e = routing.end.delivered / routing.window
    stretches = stretch_rates(routing.samples, STRETCH)
    slowest = min(stretches) if stretches else e2e
    stretch = f"slowest {STRETCH} s stretch" if stretches else "whole window (< 10 s)"
    verdict = "MET" if e2e >= TARGET_RATE and slowest >= TARGET_RATE else "NOT MET"
    if outcome.problems:
        verdict += " (but the run had problems, see below)"
    print(
        f"\nTarget: {name}: {verdict}\n"
        f"  window average {e2e:,.0f} msg/s; {stretch} {slowest:,.0f} msg/s "
        f"(both must be >= {TARGET_RATE:,.0f})"
    )


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_bin = Path(sys.executable).parent / "carehub"
    parser = argparse.ArgumentParser(description="carehub end-to-end routing benchmark")
    parser.add_argument("--quick", action="store_true", help="10 s window, small intake N")
    parser.add_argument("--duration", type=float, help="seconds of sending (default 60)")
    parser.add_argument("--k", type=int, default=8, help="concurrent MLLP connections")
    parser.add_argument("--n", type=int, help="intake-only messages (default 20,000)")
    parser.add_argument(
        "--patients", type=int, default=10_000, help="distinct patients (MRNs) in the feed"
    )
    parser.add_argument("--drain-timeout", type=float, help="seconds to wait for the backlog")
    parser.add_argument("--ack-timeout", type=float, default=10.0)
    parser.add_argument("--carehub-bin", type=Path, default=default_bin)
    parser.add_argument(
        "--carehub-config",
        type=Path,
        help="base YAML (store, queue, worker settings); the bench sets routes and worker.enabled",
    )
    parser.add_argument("--tmp-dir", type=Path, help="where data and the outbox go (a real disk)")
    parser.add_argument(
        "--keep-data", action="store_true", help="keep the stores, logs and outbox afterwards"
    )
    args = parser.parse_args(argv)
    args.duration = args.duration or (10.0 if args.quick else 60.0)
    args.n = args.n or (2_000 if args.quick else 20_000)
    args.warmup = max(args.k, min(2_000, args.n // 10))
    args.drain_timeout = args.drain_timeout or (60.0 if args.quick else 180.0)
    args.base_config = None
    if args.carehub_config is not None:
        args.base_config = yaml.safe_load(args.carehub_config.read_text()) or {}
    return args


async def run(args: argparse.Namespace) -> int:
    tag = run_tag()
    factory = MessageFactory(args.patients)
    outcome = Outcome()
    work = Path(tempfile.mkdtemp(prefix="carehub-routing-", dir=args.tmp_dir))
    try:
        print(
            f"carehub routing benchmark: python {platform.python_version()}, {os.cpu_count()} "
            f"CPUs, K={args.k}, ADT^A01 of {factory.size:,} bytes, {factory.patients:,} "
            f"patients, run tag {tag}\ndata and outbox in {work} "
            f"({filesystem_type(work) or 'unknown filesystem'})",
            flush=True,
        )
        intake = await run_intake_only(args, work, tag, factory, outcome)
        routing = await run_routing(args, work, tag, factory, outcome)
    finally:
        if args.keep_data:
            print(f"\ndata, logs and outbox kept in {work}")
        else:
            await asyncio.to_thread(shutil.rmtree, work, True)
    print_report(intake, routing, outcome)
    if outcome.notes:
        print("\nNotes:")
        for line in outcome.notes:
            print(f"  {line}")
    if outcome.problems:
        print("\nProblems (crash, wrong ACK or undelivered message):")
        for line in outcome.problems:
            print(f"  {line}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
