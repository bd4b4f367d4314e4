"""MLLP load generator: K connections share N ADT^A01 messages, one in flight per connection.

Each connection sends a message, waits for its ACK and only then sends the next
(request/response, as real MLLP senders do). Every ACK is checked: MSA-1 must be AA and MSA-2
must echo the MSH-10 that was sent, so a fast server that ACKs the wrong thing does not win.

The persistent-connection path is a bare asyncio Protocol that sends the next message straight
from data_received: no tasks, futures or stream buffers per message. With only a couple of cores
shared between client and server, a heavier client would measure itself rather than the server.

Run alone against a listening server: `python bench/loadgen.py --port 2575 --n 1000`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field

from messages import adt_a01_frame

END_BLOCK = b"\x1c\r"
#: How many error descriptions a result keeps; the count covers all of them.
MAX_ERROR_SAMPLES = 10


@dataclass(slots=True)
class LoadResult:
    """What one load run measured; latencies are seconds, one per ACK received."""

    n: int
    k: int
    elapsed: float
    acked: int
    latencies: list[float]
    errors: int
    error_samples: list[str]

    @property
    def rate(self) -> float:
        """ACKs received per second of wall time."""
        return self.acked / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_ms(self, p: float) -> float:
        """Nearest-rank percentile of the ACK latencies, in milliseconds (NaN if none)."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1] * 1000

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(99)


def check_ack(frame: bytes, control_id: str) -> str | None:
    """None if `frame` (up to, not including, <FS><CR>) is an AA ACK for `control_id`."""
    if not frame.startswith(b"\x0b"):
        return f"{control_id}: reply does not start with <VT>: {frame[:40]!r}"
    text = frame[1:].decode("latin-1")
    sep = text[3] if text.startswith("MSH") and len(text) > 3 else "|"
    for segment in text.replace("\n", "\r").split("\r"):
        if segment.startswith("MSA"):
            fields = segment.split(sep)
            code = fields[1] if len(fields) > 1 else ""
            echoed = fields[2] if len(fields) > 2 else ""
            if code != "AA":
                return f"{control_id}: MSA-1 is {code!r}, not 'AA': {segment[:120]!r}"
            if echoed != control_id:
                return f"{control_id}: MSA-2 echoes {echoed!r}"
            return None
    return f"{control_id}: no MSA segment in reply: {text[:120]!r}"


@dataclass(slots=True)
class _Shared:
    """State shared by all connections of one run: the work counter and what was measured."""

    n: int
    id_prefix: str
    next_seq: int = 0
    acked: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def take(self) -> str | None:
        """The control id of the next message to send, or None when all N are taken."""
        if self.next_seq >= self.n:
            return None
        self.next_seq += 1
        return f"{self.id_prefix}{self.next_seq:08d}"

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(text)


class _Connection(asyncio.Protocol):
    """One persistent MLLP connection: send, wait for the ACK, send the next."""

    def __init__(self, shared: _Shared, done: asyncio.Future[None]) -> None:
        self.shared = shared
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.control_id: str | None = None
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def start(self) -> None:
        self._send_next()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def _send_next(self) -> None:
        control_id = self.shared.take()
        self.control_id = control_id
        if control_id is None or self.transport is None:
            self._finish()
            return
        frame = adt_a01_frame(control_id)
        self.sent_at = time.perf_counter()
        self.transport.write(frame)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(END_BLOCK)
        if end < 0:
            return
        received_at = time.perf_counter()
        frame = bytes(self.buffer[:end])
        extra = bytes(self.buffer[end + 2 :])
        self.buffer.clear()
        if self.control_id is None:
            self.shared.error(f"unsolicited reply: {frame[:60]!r}")
            return
        self.shared.acked += 1
        self.shared.latencies.append(received_at - self.sent_at)
        problem = check_ack(frame, self.control_id)
        if problem is None and extra:
            problem = f"{self.control_id}: {len(extra)} unexpected bytes after the ACK"
        if problem is not None:
            self.shared.error(problem)
        self._send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.control_id is not None:
            reason = exc or "closed by server"
            self.shared.error(f"{self.control_id}: connection lost awaiting ACK ({reason})")
            self.control_id = None
        if not self.done.done():
            self.done.set_result(None)

    def abort(self, reason: str) -> None:
        if self.control_id is not None:
            self.shared.error(f"{self.control_id}: {reason}")
            self.control_id = None
        if self.transport is not None:
            self.transport.abort()
        if not self.done.done():
            self.done.set_result(None)


async def _watchdog(shared: _Shared, timeout: float, stalled: asyncio.Event) -> None:
    """Set `stalled` if no ACK arrives for `timeout` seconds, so a hung server ends the run."""
    last, since = shared.acked, time.monotonic()
    while True:
        await asyncio.sleep(min(0.5, timeout / 4))
        if shared.acked != last:
            last, since = shared.acked, time.monotonic()
        elif time.monotonic() - since > timeout:
            stalled.set()
            return


async def _run_persistent(
    host: str, port: int, shared: _Shared, k: int, ack_timeout: float
) -> float:
    """Open K connections first, then time from the first send to the last ACK."""
    loop = asyncio.get_running_loop()
    connections: list[_Connection] = []
    for _ in range(k):
        done: asyncio.Future[None] = loop.create_future()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda d=done: _Connection(shared, d), host, port),
                ack_timeout,
            )
        except (OSError, TimeoutError) as exc:
            shared.error(f"connect to {host}:{port} failed: {exc!r}")
            continue
        connections.append(protocol)
    if not connections:
        return 0.0
    stalled = asyncio.Event()
    watchdog = asyncio.create_task(_watchdog(shared, ack_timeout, stalled))
    started = time.perf_counter()
    for conn in connections:
        conn.start()
    all_done = asyncio.gather(*(conn.done for conn in connections))
    stall_wait = asyncio.create_task(stalled.wait())
    await asyncio.wait([all_done, stall_wait], return_when=asyncio.FIRST_COMPLETED)
    if stalled.is_set():
        for conn in connections:
            conn.abort(f"no ACK within {ack_timeout:g} s")
    await all_done
    elapsed = time.perf_counter() - started
    watchdog.cancel()
    stall_wait.cancel()
    return elapsed


async def _reconnect_worker(host: str, port: int, shared: _Shared, ack_timeout: float) -> None:
    """One sender that opens a new connection per message (latency includes the connect)."""
    while (control_id := shared.take()) is not None:
        sent_at = time.perf_counter()
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(ack_timeout):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(adt_a01_frame(control_id))
                frame = await reader.readuntil(END_BLOCK)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            shared.error(f"{control_id}: {exc!r}")
            continue
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        shared.acked += 1
        shared.latencies.append(time.perf_counter() - sent_at)
        problem = check_ack(frame[:-2], control_id)
        if problem is not None:
            shared.error(problem)


async def run_load(
    host: str,
    port: int,
    *,
    n: int,
    k: int = 8,
    id_prefix: str = "BENCH",
    reconnect_each: bool = False,
    ack_timeout: float = 10.0,
) -> LoadResult:
    """Send N messages over K concurrent connections and measure rate and ACK latency.

    `id_prefix` + an 8-digit sequence number forms each MSH-10, so give every run its own prefix
    to keep control ids unique across runs (servers may treat a repeat as a duplicate).
    `reconnect_each` opens a fresh connection per message, for servers that close after each
    ACK. A run in which no ACK arrives for `ack_timeout` seconds is cut short and the messages
    left unacknowledged count as errors.
    """
    shared = _Shared(n=n, id_prefix=id_prefix)
    if reconnect_each:
        started = time.perf_counter()
        await asyncio.gather(
            *(_reconnect_worker(host, port, shared, ack_timeout) for _ in range(k))
        )
        elapsed = time.perf_counter() - started
    else:
        elapsed = await _run_persistent(host, port, shared, k, ack_timeout)
    never_sent = n - shared.next_seq
    if never_sent > 0:  # the connections died or stalled before taking all N
        shared.errors += never_sent
        shared.error_samples.append(f"{never_sent} of {n} messages were never sent")
    return LoadResult(
        n=n,
        k=k,
        elapsed=elapsed,
        acked=shared.acked,
        latencies=shared.latencies,
        errors=shared.errors,
        error_samples=shared.error_samples,
    )


def main(argv: list[str] | None = None) -> int:
    """Stand-alone use: load one server and print its figures."""
    parser = argparse.ArgumentParser(description="MLLP ADT^A01 load generator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n", type=int, default=1000, help="messages in total")
    parser.add_argument("--k", type=int, default=8, help="concurrent connections")
    parser.add_argument("--reconnect-each", action="store_true")
    parser.add_argument("--id-prefix", default=f"LG{int(time.time()) % 100000:05d}")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run_load(
            args.host,
            args.port,
            n=args.n,
            k=args.k,
            id_prefix=args.id_prefix,
            reconnect_each=args.reconnect_each,
        )
    )
    print(
        f"K={result.k} N={result.n} acked={result.acked} {result.rate:.0f} msg/s "
        f"p50={result.p50_ms:.2f} ms p99={result.p99_ms:.2f} ms errors={result.errors}"
    )
    for text in result.error_samples:
        print(f"  error: {text}")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
