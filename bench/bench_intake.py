"""Intake benchmark: how fast carehub ACKs ADT^A01 over MLLP, next to the alternatives.

Every row is measured in the same run on the same machine, against the bare asyncio server
measured in that run, so the ratios hold even though absolute numbers vary between machines:

    bare               asyncio MLLP server that ACKs without storing anything: the ceiling
    carehub, no store  carehub's own listener and intake path with a writer that stores
                       nothing (a diagnostic, not a carehub mode): what carehub's time per
                       message is before its durable write
    carehub (process)  `carehub serve`, store durability=process (SQLite WAL, synchronous=NORMAL)
    carehub (power)    `carehub serve`, store durability=power (fsync on every commit group)
    python-hl7         python-hl7's asyncio MLLP server, parse + create_ack()
    hl7apy             hl7apy's threaded MLLPServer (one message per connection)

Each server runs in its own process; the load generator (loadgen.py) holds K connections, each
sending a message and waiting for its ACK before the next. The exit code is 0 whether or not the
targets are met (a benchmark reports), but 1 if a server crashed or an ACK was wrong.

    .venv/bin/python bench/bench_intake.py [--quick] [--n N] [--servers bare,python-hl7]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import platform
import re
import signal
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from loadgen import LoadResult, run_load
from messages import adt_a01

from carehub.builtins.channels import filesystem_type

BENCH_DIR = Path(__file__).resolve().parent
SERVERS_PY = BENCH_DIR / "servers.py"

START_TIMEOUT = 20.0  # seconds a server gets to say it is listening
STOP_TIMEOUT = 15.0  # seconds a server gets to exit after SIGTERM

LISTENER_RE = re.compile(r"MLLP listener '(\S+)' on ([\d.]+):(\d+)")
READY_LINE = "carehub ready"
PORT_RE = re.compile(r"^PORT (\d+)$")
DURABILITY_RE = re.compile(r"durability=(\w+)")

# Targets for carehub with durability=process, all relative to figures from the same run.
TARGET_VS_BARE = 0.45
TARGET_VS_PYTHON_HL7 = 3.0
TARGET_P99_MS = 20.0


@dataclass(slots=True, frozen=True)
class Plan:
    """One row of the table: which server, how many messages, how to connect."""

    label: str
    kind: str  # "bare" | "carehub-unstored" | "carehub" | "python-hl7" | "hl7apy"
    code: str  # one letter, part of every MSH-10 so control ids never repeat across rows
    n: int
    warmup: int
    reconnect_each: bool = False
    durability: str | None = None


@dataclass(slots=True)
class Row:
    """What happened for one plan: a measurement, or why there is none."""

    plan: Plan
    k: int
    result: LoadResult | None = None
    #: The server process's CPU time (user + system) per message of the timed run, in µs.
    cpu_us: float | None = None
    note: str | None = None  # e.g. "not available (...)": no figures, but not a failure
    problems: list[str] = field(default_factory=list)  # crashes, wrong ACKs: these fail the run


class Unavailable(Exception):
    """The server never said it was listening (not installed yet, crashed on start, too slow)."""


class ServerProcess:
    """A server subprocess whose stdout/stderr go to files, so a chatty server never blocks on a
    full pipe and the harness can show the tail of its logs when something goes wrong."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env
            )

    def stdout_lines(self) -> list[str]:
        return self.stdout_path.read_text(errors="replace").splitlines()

    def stderr_tail(self, lines: int = 5) -> str:
        text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    async def wait_ready(
        self, parse: Callable[[list[str]], tuple[str, int] | None], timeout: float
    ) -> tuple[str, int]:
        """Poll stdout until `parse` finds the address; Unavailable on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                address = parse(self.stdout_lines())
            except Unavailable:
                await self.stop()
                raise
            if address is not None:
                return address
            code = self.proc.poll()
            if code is not None:
                last = self.stderr_tail(1) or " | ".join(self.stdout_lines()[-1:])
                raise Unavailable(f"exited with code {code} on start: {last[-300:]}")
            if time.monotonic() > deadline:
                await self.stop()
                raise Unavailable(f"not listening after {timeout:g} s")
            await asyncio.sleep(0.05)

    def crashed(self) -> str | None:
        """A description if the server has died, else None."""
        code = self.proc.poll()
        if code is None:
            return None
        return f"died during the run with exit code {code}: {self.stderr_tail()[-300:]}"

    async def stop(self) -> str | None:
        """SIGTERM and wait; a description if it did not exit cleanly with code 0."""
        if self.proc.poll() is not None:
            code = self.proc.returncode
            return None if code == 0 else f"had already exited with code {code}"
        with contextlib.suppress(ProcessLookupError):  # it died between poll() and here
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                return f"did not exit within {STOP_TIMEOUT:g} s of SIGTERM (killed)"
            await asyncio.sleep(0.05)
        if self.proc.returncode != 0:
            tail = self.stderr_tail()[-300:]
            return f"exit code {self.proc.returncode} (0 expected on SIGTERM): {tail}"
        return None


def parse_port_line(lines: list[str]) -> tuple[str, int] | None:
    """servers.py prints `PORT <n>` once it is bound."""
    for line in lines:
        match = PORT_RE.match(line.strip())
        if match:
            return "127.0.0.1", int(match.group(1))
    return None


def carehub_ready_parser(listener: str | None) -> Callable[[list[str]], tuple[str, int] | None]:
    """Wait for `carehub ready`, then pick the named MLLP listener (or the first one)."""

    def parse(lines: list[str]) -> tuple[str, int] | None:
        if not any(line.strip() == READY_LINE for line in lines):
            return None
        found = [m for line in lines if (m := LISTENER_RE.search(line))]
        for match in found:
            if listener is None or match.group(1) == listener:
                host = match.group(2)
                return ("127.0.0.1" if host == "0.0.0.0" else host), int(match.group(3))
        names = ", ".join(m.group(1) for m in found) or "none"
        raise Unavailable(f"ready, but no MLLP listener {listener or ''} (listeners: {names})")

    return parse


def write_carehub_config(path: Path, durability: str, base: dict[str, Any] | None) -> None:
    """The YAML carehub is started with: the base config (if any) with store.durability set.

    This bench measures intake (store, then ACK), so unless the base config says otherwise
    the hub runs without routes and without its in-process routing worker, as a listener-only
    `carehub serve --no-worker` would in a scale-out deployment."""
    config: dict[str, Any] = dict(base or {})
    store = dict(config.get("store") or {})
    store["durability"] = durability
    config["store"] = store
    config.setdefault("routes", [])
    config.setdefault("worker", {"enabled": False})
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def run_tag() -> str:
    """Five base-36 characters from the clock, so MSH-10s differ between bench runs too."""
    alphabet = string.digits + string.ascii_uppercase
    value, tag = int(time.time()), ""
    for _ in range(5):
        value, digit = divmod(value, 36)
        tag = alphabet[digit] + tag
    return tag


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    plan: Plan,
    host: str,
    port: int,
    k: int,
    tag: str,
    ack_timeout: float,
    cpu: Callable[[], float | None] = lambda: None,
) -> tuple[LoadResult, LoadResult, float | None]:
    """Warm up (untimed), then the timed run, and the server's CPU seconds over it (``cpu``
    read before and after). GC is off while timing so that the client's collector pauses do
    not show up as server latency in p99."""
    warm = await run_load(
        host,
        port,
        n=plan.warmup,
        k=k,
        id_prefix=f"{tag}{plan.code}W",
        reconnect_each=plan.reconnect_each,
        ack_timeout=ack_timeout,
    )
    gc.collect()
    gc.disable()
    before = cpu()
    try:
        timed = await run_load(
            host,
            port,
            n=plan.n,
            k=k,
            id_prefix=f"{tag}{plan.code}T",
            reconnect_each=plan.reconnect_each,
            ack_timeout=ack_timeout,
        )
    finally:
        gc.enable()
    after = cpu()
    used = after - before if before is not None and after is not None else None
    return warm, timed, used


def carehub_serve_argv(carehub_bin: Path, config: Path, data_dir: Path) -> list[str]:
    """`carehub serve` on the given config and data dir, every port chosen by the OS."""
    return [
        str(carehub_bin),
        "serve",
        "--config",
        str(config),
        "--data-dir",
        str(data_dir),
        "--mllp-port",
        "0",
        "--http-port",
        "0",
    ]


async def start_carehub(
    name: str, carehub_bin: Path, run_dir: Path, config: Path
) -> tuple[ServerProcess, str, int]:
    """`carehub serve` with its data under ``run_dir``; returns once it says it is ready."""
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(name, carehub_serve_argv(carehub_bin, config, data_dir), run_dir)
    host, port = await server.wait_ready(carehub_ready_parser(None), START_TIMEOUT)
    return server, host, port


async def run_plan(plan: Plan, args: argparse.Namespace, work: Path, tag: str) -> Row:
    """Start the plan's server, load it, stop it; crashes and wrong ACKs become problems."""
    row = Row(plan=plan, k=args.k)
    name = plan.label.replace(" ", "").replace("(", "-").replace(")", "")
    if plan.kind == "carehub":
        assert plan.durability is not None
        run_dir = work / name
        data_dir = run_dir / "data"
        data_dir.mkdir(parents=True)
        config = run_dir / "carehub.yaml"
        write_carehub_config(config, plan.durability, args.carehub_base_config)
        argv = carehub_serve_argv(args.carehub_bin, config, data_dir)
        parse = carehub_ready_parser(args.carehub_listener)
        if plan.durability == "power" and filesystem_type(data_dir) == "tmpfs":
            row.note = "data dir is on tmpfs: fsync costs nothing, use --tmp-dir on a disk"
    else:
        argv = [sys.executable, str(SERVERS_PY), plan.kind, "--port", "0"]
        parse = parse_port_line

    print(f"[{plan.label}] starting ...", flush=True)
    try:
        server = ServerProcess(name, argv, work)
        host, port = await server.wait_ready(parse, START_TIMEOUT)
    except (Unavailable, OSError) as exc:
        if plan.kind == "carehub":
            row.note = f"not available ({exc})"
        else:
            row.problems.append(f"failed to start ({exc})")
        print(f"[{plan.label}] {row.note or exc}", flush=True)
        return row

    print(
        f"[{plan.label}] listening on {host}:{port}; warm-up {plan.warmup}, "
        f"timing {plan.n} messages over {args.k} connections ...",
        flush=True,
    )
    if plan.durability is not None:  # a config key carehub ignored would make the row a lie
        said = {m.group(1) for line in server.stdout_lines() if (m := DURABILITY_RE.search(line))}
        if said and said != {plan.durability}:
            row.problems.append(f"configured durability={plan.durability}, carehub says {said}")
    try:
        pid = server.proc.pid
        warm, timed, cpu_used = await measure(
            plan, host, port, args.k, tag, args.ack_timeout, lambda: process_cpu_seconds(pid)
        )
        row.result = timed
        if cpu_used is not None and timed.acked:
            row.cpu_us = cpu_used / timed.acked * 1e6
        if warm.errors:
            row.problems.append(f"{warm.errors} wrong or missing ACKs in the warm-up, e.g.")
            row.problems.extend(f"  {text}" for text in warm.error_samples[:3])
        if timed.errors:
            row.problems.append(f"{timed.errors} wrong or missing ACKs in the timed run, e.g.")
            row.problems.extend(f"  {text}" for text in timed.error_samples)
    finally:
        crash = server.crashed()
        if crash:
            row.problems.append(crash)
        else:
            stopped = await server.stop()
            if stopped:
                row.problems.append(stopped)
    return row


def build_plans(args: argparse.Namespace) -> list[Plan]:
    """Row list with N per server: python-hl7 and hl7apy are capped to keep the run bounded."""
    if args.quick:
        n, n_py, n_apy = 2000, 500, 40
    else:
        n, n_py, n_apy = 20_000, 3000, 200
    if args.n is not None:
        n, n_py, n_apy = args.n, min(args.n, n_py), min(args.n, n_apy)
    n_py = args.n_python_hl7 or n_py
    n_apy = args.n_hl7apy or n_apy

    def warmup(count: int) -> int:
        return max(args.k, min(500, count // 10))

    plans = {
        "bare": Plan("bare", "bare", "B", n, warmup(n)),
        "carehub-unstored": Plan("carehub, no store", "carehub-unstored", "U", n, warmup(n)),
        "carehub-process": Plan(
            "carehub (process)", "carehub", "C", n, warmup(n), durability="process"
        ),
        "carehub-power": Plan("carehub (power)", "carehub", "D", n, warmup(n), durability="power"),
        "python-hl7": Plan("python-hl7", "python-hl7", "P", n_py, warmup(n_py)),
        "hl7apy": Plan("hl7apy", "hl7apy", "H", n_apy, args.k, reconnect_each=True),
    }
    wanted: list[str] = []
    for item in args.servers.split(","):
        item = item.strip()
        keys = ["carehub-process", "carehub-power"] if item == "carehub" else [item]
        for key in keys:
            if key not in plans:
                raise SystemExit(f"unknown server {item!r}; choose from {', '.join(plans)}")
            if key not in wanted:
                wanted.append(key)
    return [plans[key] for key in plans if key in wanted]


def fmt(value: float | None, spec: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    return format(value, spec)


def print_table(rows: list[Row]) -> None:
    """The results table; ratios are against the bare row of this same run."""
    bare = next((r.result for r in rows if r.plan.kind == "bare" and r.result), None)
    headers = [
        "server",
        "K",
        "N",
        "msgs/s",
        "x vs bare",
        "ACK p50 ms",
        "p99 ms",
        "CPU us/msg",
        "errors",
    ]
    table: list[list[str]] = []
    for row in rows:
        res = row.result
        if res is None:
            table.append([row.plan.label, str(row.k), str(row.plan.n)] + ["-"] * 6)
            continue
        ratio = res.rate / bare.rate if bare and bare.rate else None
        ratio_spec = ".2f" if ratio is None or ratio >= 0.1 else ".3f" if ratio >= 0.01 else ".4f"
        table.append(
            [
                row.plan.label,
                str(res.k),
                str(res.n),
                fmt(res.rate, ",.0f"),
                fmt(ratio, ratio_spec),
                fmt(res.p50_ms, ".2f"),
                fmt(res.p99_ms, ".2f"),
                fmt(row.cpu_us, ",.0f"),
                str(res.errors),
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in table)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    print()
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for cells in table:
        print(line(cells))
    for row in rows:
        if row.note:
            print(f"{row.plan.label}: {row.note}")


def print_targets(rows: list[Row]) -> None:
    """Targets for carehub (durability=process), each from figures measured in this run."""

    def result(label: str) -> LoadResult | None:
        return next((r.result for r in rows if r.plan.label == label and r.result), None)

    carehub, bare, py = result("carehub (process)"), result("bare"), result("python-hl7")
    invalid = any(r.problems for r in rows if r.plan.label == "carehub (process)")

    def verdict(ok: bool | None) -> str:
        if ok is None:
            return "n/a (not measured)"
        if invalid:
            return "INVALID (errors)"
        return "MET" if ok else "NOT MET"

    checks: list[tuple[str, str, bool | None]] = []
    if carehub and bare:
        need = TARGET_VS_BARE * bare.rate
        checks.append(
            (
                f"carehub rate >= {TARGET_VS_BARE:.0%} of bare",
                f"{carehub.rate:,.0f} vs {need:,.0f} msg/s ({carehub.rate / bare.rate:.0%})",
                carehub.rate >= need,
            )
        )
    else:
        checks.append((f"carehub rate >= {TARGET_VS_BARE:.0%} of bare", "", None))
    if carehub and py:
        need = TARGET_VS_PYTHON_HL7 * py.rate
        checks.append(
            (
                f"carehub rate >= {TARGET_VS_PYTHON_HL7:g}x python-hl7",
                f"{carehub.rate:,.0f} vs {need:,.0f} msg/s ({carehub.rate / py.rate:.1f}x)",
                carehub.rate >= need,
            )
        )
    else:
        checks.append((f"carehub rate >= {TARGET_VS_PYTHON_HL7:g}x python-hl7", "", None))
    if carehub:
        checks.append(
            (
                f"carehub ACK p99 < {TARGET_P99_MS:g} ms",
                f"{carehub.p99_ms:.2f} ms",
                carehub.p99_ms < TARGET_P99_MS,
            )
        )
    else:
        checks.append((f"carehub ACK p99 < {TARGET_P99_MS:g} ms", "", None))

    print("\nTargets (carehub durability=process, same run):")
    width = max(len(name) for name, _, _ in checks)
    for name, detail, ok in checks:
        print(f"  {name.ljust(width)}  {verdict(ok):<18} {detail}".rstrip())
    cpu = {row.plan.label: row.cpu_us for row in rows}
    bare_cpu, stored_cpu = cpu.get("bare"), cpu.get("carehub (process)")
    if carehub and bare and bare_cpu and stored_cpu:
        by_rate = carehub.rate >= TARGET_VS_BARE * bare.rate
        by_cpu = stored_cpu <= bare_cpu / TARGET_VS_BARE
        if by_rate != by_cpu:
            # Both servers are short of CPU, so their rates should stand as their CPU per
            # message does; when the two disagree, the host's speed moved between the rows.
            print(
                f"  (the rate ratio and the CPU per message disagree: carehub spent "
                f"{stored_cpu / bare_cpu:.1f}x the bare server's CPU a message, the target "
                f"allows {1 / TARGET_VS_BARE:.1f}x; the host ran at another speed for one "
                "of the rows, so run it again)"
            )


def print_time_per_message(rows: list[Row]) -> None:
    """Wall time per message (1 / rate) of bare, carehub without and with its store: how much
    of carehub's time is its listener and intake path, how much the durable write, and what
    the rate target leaves for that write."""

    def result(label: str) -> LoadResult | None:
        return next((r.result for r in rows if r.plan.label == label and r.result), None)

    bare, path, stored = result("bare"), result("carehub, no store"), result("carehub (process)")
    if not (bare and path and stored and bare.rate and path.rate and stored.rate):
        return
    us = {
        label: 1e6 / res.rate for label, res in [("bare", bare), ("path", path), ("stored", stored)]
    }
    allowed = us["bare"] / TARGET_VS_BARE
    print("\nWall time per message (1 / rate), this run:")
    print(f"  bare                {us['bare']:6.1f} us")
    print(f"  carehub, no store   {us['path']:6.1f} us  (listener, decoding, header view, ACK)")
    print(
        f"  carehub (process)   {us['stored']:6.1f} us  "
        f"(the durable write adds {us['stored'] - us['path']:.1f} us)"
    )
    print(
        f"  At {TARGET_VS_BARE:.0%} of bare carehub has {allowed:.1f} us a message, which leaves "
        f"{allowed - us['path']:.1f} us for the durable write."
    )
    cpu = {row.plan.label: row.cpu_us for row in rows}
    bare_cpu, stored_cpu = cpu.get("bare"), cpu.get("carehub (process)")
    if bare_cpu and stored_cpu:
        # The host's speed moves the rates from minute to minute; the CPU each server spends
        # on a message is its own, apart from the load generator's share of the CPUs.
        print(
            f"Server CPU per message: bare {bare_cpu:.0f} us, carehub (process) "
            f"{stored_cpu:.0f} us ({stored_cpu / bare_cpu:.1f}x); a server short of CPU "
            f"reaches {TARGET_VS_BARE:.0%} of bare at no more than "
            f"{1 / TARGET_VS_BARE:.1f}x."
        )


def print_problems(rows: list[Row]) -> None:
    for row in rows:
        for text in row.problems:
            print(f"  {row.plan.label}: {text}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_bin = Path(sys.executable).parent / "carehub"
    parser = argparse.ArgumentParser(
        description="carehub MLLP intake benchmark", formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small N, for a smoke run")
    parser.add_argument("--n", type=int, help="messages per server (python-hl7/hl7apy capped)")
    parser.add_argument("--n-python-hl7", type=int, help="messages for python-hl7 (default 3000)")
    parser.add_argument("--n-hl7apy", type=int, help="messages for hl7apy (default 200)")
    parser.add_argument("--k", type=int, default=8, help="concurrent connections (default 8)")
    parser.add_argument(
        "--servers",
        default="bare,carehub-unstored,carehub,python-hl7,hl7apy",
        help="comma list of bare, carehub-unstored, carehub (= carehub-process,carehub-power),\n"
        "carehub-process, carehub-power, python-hl7, hl7apy (default: all)",
    )
    parser.add_argument("--carehub-bin", type=Path, default=default_bin)
    parser.add_argument(
        "--carehub-config",
        type=Path,
        help="base YAML for carehub; the bench sets store.durability in a copy of it",
    )
    parser.add_argument("--carehub-listener", help="MLLP listener name to load (default: first)")
    parser.add_argument("--tmp-dir", type=Path, help="where carehub's data dirs go (a real disk)")
    parser.add_argument(
        "--ack-timeout", type=float, default=10.0, help="seconds without any ACK before giving up"
    )
    args = parser.parse_args(argv)
    args.carehub_base_config = None
    if args.carehub_config is not None:
        args.carehub_base_config = yaml.safe_load(args.carehub_config.read_text()) or {}
    return args


async def run(args: argparse.Namespace) -> int:
    """Run every selected row, print the table, targets and problems; 1 on crash/wrong ACK."""
    plans = build_plans(args)
    tag = run_tag()
    print(
        f"carehub intake benchmark: python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, K={args.k}, ADT^A01 of {len(adt_a01('X' * 15))} bytes, "
        f"run tag {tag}",
        flush=True,
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="carehub-bench-", dir=args.tmp_dir) as tmp:
        for plan in plans:
            rows.append(await run_plan(plan, args, Path(tmp), tag))
    print_table(rows)
    print_targets(rows)
    print_time_per_message(rows)
    failed = [row for row in rows if row.problems]
    if failed:
        print("\nProblems (a server crashed or ACKs were wrong):")
        print_problems(rows)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
