"""The MLLP listener: asyncio, persistent connections, every frame answered in order.

Each connection reads whatever the socket hands over, feeds the frame decoder, and submits all
complete frames to intake together (so they share a commit), then writes their ACKs in order.
A bad frame is answered with AR and the connection carries on; a peer that drops mid-frame
costs only its unfinished frame, which it never got an ACK for and will resend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass, field

from carehub.config import MLLPListenerConfig
from carehub.hl7.framing import BrokenFrame, Frame, FrameDecoder, OversizeFrame, encode_frame
from carehub.intake.intake import Arrival, Intake, IntakeResult

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024


@dataclass(eq=False)
class _Connection:
    peer: str
    writer: asyncio.StreamWriter
    last_activity: float = field(default_factory=time.monotonic)
    busy: bool = False
    task: asyncio.Task[None] | None = None


class MLLPListener:
    """One named MLLP port."""

    def __init__(
        self,
        config: MLLPListenerConfig,
        intake: Intake,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.intake = intake
        self.ssl_context = ssl_context
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self.connections_total = 0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(
            self._serve_connection,
            self.config.host,
            self.config.port,
            ssl=self.ssl_context,
            limit=READ_SIZE,
            backlog=256,
        )
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        if self.config.idle_timeout:
            self._sweeper = asyncio.create_task(self._close_idle_connections())
        return self.address

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let connections finish the frames they are storing, then close."""
        self._closing = True
        if self._server:
            self._server.close()
        if self._sweeper:
            self._sweeper.cancel()
        for conn in list(self._connections):
            if not conn.busy and conn.task:
                conn.task.cancel()
        tasks = [c.task for c in self._connections if c.task]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        if self._server:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=1)

    async def _close_idle_connections(self) -> None:
        timeout = self.config.idle_timeout
        while True:
            await asyncio.sleep(min(timeout / 2, 5.0))
            now = time.monotonic()
            for conn in list(self._connections):
                if not conn.busy and now - conn.last_activity > timeout:
                    log.info("closing MLLP connection from %s: idle for %.0f s", conn.peer, timeout)
                    conn.writer.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "unknown"
        conn = _Connection(peer, writer, task=asyncio.current_task())  # type: ignore[arg-type]
        self._connections.add(conn)
        self.connections_total += 1
        arrival = Arrival("mllp", self.config.name, peer, self.config.default_charset)
        decoder = FrameDecoder(self.config.max_message_bytes)
        log.debug("MLLP connection from %s on %s", peer, self.config.name)
        try:
            while not self._closing:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                conn.last_activity = time.monotonic()
                events = decoder.feed(data)
                if not events:
                    continue
                conn.busy = True
                if len(events) == 1:
                    results = [await self._answer(events[0], arrival)]
                else:  # submitted together, so they share one commit; answered in order
                    results = await asyncio.gather(*(self._answer(e, arrival) for e in events))
                writer.write(b"".join(encode_frame(r.ack) for r in results))
                await writer.drain()
                conn.busy = False
                conn.last_activity = time.monotonic()
        except asyncio.CancelledError:
            pass
        except (ConnectionError, ssl.SSLError, OSError) as err:
            log.info("MLLP connection from %s ended: %s", peer, err.__class__.__name__)
        finally:
            if decoder.mid_frame:
                log.warning(
                    "MLLP peer %s left mid-frame; %d unacknowledged bytes dropped",
                    peer,
                    decoder.pending_bytes,
                )
            self._connections.discard(conn)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(
        self, event: Frame | OversizeFrame | BrokenFrame, arrival: Arrival
    ) -> IntakeResult:
        if isinstance(event, Frame):
            return await self.intake.receive(event.payload, arrival)
        if isinstance(event, OversizeFrame):
            reason = (
                f"message of {event.size} bytes exceeds this listener's limit of "
                f"{self.config.max_message_bytes} bytes"
            )
        else:
            reason = (
                "frame cut short: a start block (0x0B) arrived before its end block (0x1C 0x0D)"
            )
        return await self.intake.reject_unreadable_frame(event.head, event.size, arrival, reason)
