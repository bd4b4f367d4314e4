"""The MLLP listener: asyncio, persistent connections, every frame answered in order.

(With ``enhanced_acks`` a frame whose MSH-15 asks for no answer to its outcome gets no accept
ACK, and one whose MSH-16 asks for an application ACK gets it right after the accept ACK, or
alone; a frame answered with nothing still keeps its place, so the answers that are sent stay
in frame order.)

Each connection is an ``asyncio.Protocol``: whatever the socket hands over goes through the
frame decoder, each complete frame goes to intake at once (frames read together share a
commit), and the ACKs are written in the order their frames came, each as soon as it and every
frame before it are answered. There is no task, stream or future per frame: under
`make bench-intake` the stream reader and writer, the task switch and the awaits per frame cost
more than reading the message's header.

A bad frame is answered with AR and the connection carries on; a peer that drops mid-frame
costs only its unfinished frame, which it never got an ACK for and will resend. A peer that
sends without reading its ACKs is paused once MAX_UNANSWERED frames wait for their answer or
the socket's send buffer is full, and resumed when it catches up. A peer address holds at most
``max_connections_per_peer`` open connections: one more closes that peer's longest idle one, so
a sender that opens a connection per message and never closes any cannot use up the hub's file
descriptors (and with them every other feed's connections and the store's files). A frame must
end within ``frame_timeout`` of its start block, and a connection that has sent nothing but
bytes outside any frame for ``idle_timeout`` is idle: a peer that sends a byte now and then
cannot hold its connections for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque

from carehub.config import MLLPListenerConfig
from carehub.hl7.ack import AckCode
from carehub.hl7.framing import BrokenFrame, Frame, FrameDecoder, OversizeFrame, encode_frame
from carehub.intake import tls as listener_tls
from carehub.intake.intake import Arrival, Intake, IntakeResult
from carehub.intake.tls import HandshakeFailures, PeerReports, report_accept_failures

log = logging.getLogger(__name__)

#: Frames of one connection waiting for their ACK before the connection stops reading.
MAX_UNANSWERED = 256
#: Seconds between log lines about connections closed over the per-peer limit.
SHED_REPORT_EVERY = 60.0
#: Seconds a frame's last byte read may be an <FS> with no <CR> after it before the <FS> is
#: taken as the end (FrameDecoder.end_frame_now): the <CR> normally comes in the same read.
LONE_END_WAIT = 0.2
#: Seconds between log lines about bytes outside any frame from one peer address.
OUTSIDE_FRAMES_REPORT_EVERY = 60.0
#: Most bytes taken from the TLS session at a time (asyncio's own TLS transport reads 256 KiB).
TLS_READ_BYTES = 256 * 1024


class _TlsTransport(asyncio.Transport):
    """TLS spoken by the MLLP connection itself over its TCP transport (ssl.MemoryBIO).

    asyncio's TLS transport closes the connection as soon as the sender half-closes, by a
    close_notify alert (Go's CloseWrite, Node's end()) or by a TCP FIN alone (it ignores
    eof_received returning True), so the ACKs of the last frames were never written. Here a
    half-close only ends the reading, as on plain TCP: the ACKs go out, then the hub's own
    close_notify and the close."""

    def __init__(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        super().__init__()
        self.raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._session = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.secured = False  # the handshake is done
        self.peer_closed = False  # the sender's close_notify was read: it sends no more

    def receive(self, data: bytes) -> bytes:
        """The application bytes in what the socket handed over (the handshake first).
        Raises ssl.SSLError for a failed handshake or a corrupt record."""
        self._incoming.write(data)
        chunks: list[bytes] = []
        try:
            if not self.secured:
                self._session.do_handshake()
                self.secured = True
            while chunk := self._session.read(TLS_READ_BYTES):
                chunks.append(chunk)
            self.peer_closed = True
        except ssl.SSLWantReadError:
            pass  # all read; the rest of the record (or of the handshake) is still on its way
        except ssl.SSLZeroReturnError:
            self.peer_closed = True
        finally:
            self._flush()  # handshake replies, session tickets, alerts
        return b"".join(chunks)

    def _flush(self) -> None:
        if data := self._outgoing.read():
            self.raw.write(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._session.write(data)
        self._flush()

    def close(self) -> None:
        """Send the hub's close_notify after whatever was written, then close."""
        if self.raw.is_closing():
            return
        with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: the peer's is not needed
            self._session.unwrap()
        self._flush()
        self.raw.close()

    def abort(self) -> None:
        self.raw.abort()

    def is_closing(self) -> bool:
        return self.raw.is_closing()

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.raw.get_extra_info(name, default)


class _Answer:
    """One frame's place in its connection's answer order; ``frame`` is set once settled."""

    __slots__ = ("frame",)

    def __init__(self) -> None:
        self.frame: bytes | None = None


class _Connection(asyncio.Protocol):
    """One MLLP connection: frames in, ACKs out in the same order."""

    def __init__(self, listener: MLLPListener) -> None:
        self.listener = listener
        self.decoder = FrameDecoder(listener.config.max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self.host = "unknown"  # the peer's address without its port: the per-peer limit's key
        self.arrival: Arrival | None = None
        self.last_activity = time.monotonic()
        self.closing = False  # the listener is stopping: answer what was read, then close
        self.peername: object = None  # the socket's (host, port, ...)
        #: Frames read so far; a frame started after the last of them is timed from its start.
        self.frames_taken = 0
        self._frame_started: float | None = None
        self._frame_number = 0  # frames_taken when the frame under way started
        self._frame_deadline: asyncio.TimerHandle | None = None
        self._frame_overdue = False  # closed for frame_timeout: already logged
        self._answers: deque[_Answer] = deque()
        self._stray_reported = 0  # decoder.stray_bytes already handed to the listener
        self._unframed_reported = 0
        self._writing_paused = False
        self._reading_paused = False
        self._lone_end: asyncio.TimerHandle | None = None
        #: TLS over the TCP transport; ``transport`` is set to it once its handshake is done.
        self._tls: _TlsTransport | None = None
        self._handshake_deadline: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> bool:
        """Frames read and not answered yet: the connection must not be closed now."""
        return bool(self._answers)

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peername = transport.get_extra_info("peername")
        self.peername = peername
        if peername:
            self.host = str(peername[0])
            self.peer = f"{peername[0]}:{peername[1]}"
        config = self.listener.config
        self.arrival = Arrival(
            "mllp",
            config.name,
            self.peer,
            config.default_charset,
            config.enhanced_acks,
            AckCode(config.not_stored_ack),
            tuple(config.processing_ids),
        )
        context = self.listener.ssl_context
        if context is not None:
            # TLS is spoken here rather than by the server, which drops a failed handshake
            # without a word (asyncio logs it only in debug mode), and by _TlsTransport rather
            # than asyncio's, which cannot answer a sender that half-closes.
            self._tls = _TlsTransport(transport, context)
        else:
            self.transport = transport
        self.listener.opened(self)  # may close it at once (max_connections_per_peer)
        log.debug("MLLP connection from %s on %s", self.peer, config.name)
        if self._tls is not None and not transport.is_closing():
            timeout = listener_tls.HANDSHAKE_TIMEOUT
            self._handshake_deadline = asyncio.get_running_loop().call_later(
                timeout,
                self._handshake_failed,
                TimeoutError(f"no handshake within {timeout:g} s"),
            )

    def _cancel_handshake_deadline(self) -> None:
        if self._handshake_deadline is not None:
            self._handshake_deadline.cancel()
            self._handshake_deadline = None

    def _handshake_failed(self, err: BaseException) -> None:
        assert self._tls is not None
        self._cancel_handshake_deadline()
        self.listener.handshake_failures.failed(self.peername, err)
        self._tls.abort()

    def _tls_received(self, tls: _TlsTransport, data: bytes) -> None:
        """Decrypt, finish the handshake, and take a close_notify as the sender's half-close."""
        if self.closing and tls.secured:
            return  # see data_received
        handshaking = not tls.secured
        try:
            data = tls.receive(data)
        except ssl.SSLError as err:
            if not tls.secured:
                self._handshake_failed(err)
            else:  # a bad record after the handshake, perhaps in the read that finished it
                self._cancel_handshake_deadline()
                reason = err.reason or type(err).__name__
                log.info("MLLP connection from %s ended: TLS error %s", self.peer, reason)
                tls.abort()
            return
        if handshaking and tls.secured:
            self._cancel_handshake_deadline()
            self.transport = tls
            if self.closing:  # the listener stopped meanwhile
                self.close()
                return
        if data:
            self._frames_received(data)
        if tls.peer_closed and not self.eof_received():
            self.close()

    def data_received(self, data: bytes) -> None:
        taken = self.frames_taken
        if self._tls is not None:
            self._tls_received(self._tls, data)
        else:
            self._frames_received(data)
        self._time_frames(taken)

    def _time_frames(self, taken: int) -> None:
        """After a read: a frame read whole or under way is activity (bytes outside any frame
        are not), and a frame under way must end within frame_timeout of its start."""
        mid_frame = self.decoder.mid_frame
        if not (mid_frame or self.frames_taken != taken):
            self._frame_started = None
            return
        now = time.monotonic()
        self.last_activity = now
        if not mid_frame or self.closing:
            self._frame_started = None
            return
        if self._frame_started is None or self._frame_number != self.frames_taken:
            self._frame_started = now  # a frame after the one timed before (or the first)
            self._frame_number = self.frames_taken
        timeout = self.listener.config.frame_timeout
        if timeout and self._frame_deadline is None:
            loop = asyncio.get_running_loop()
            self._frame_deadline = loop.call_later(timeout, self._check_frame_deadline)

    def _check_frame_deadline(self) -> None:
        """Close a connection whose frame under way is past frame_timeout: the frames before
        it are answered first; it is not (it never ended), so the sender resends it whole."""
        self._frame_deadline = None
        started = self._frame_started
        if (
            started is None
            or self.closing
            or not self.decoder.mid_frame
            or self._frame_number != self.frames_taken  # it ended (an <FS> taken as the end)
        ):
            return
        now = time.monotonic()
        if self._reading_paused:  # the hub is not reading: its time does not count
            started = self._frame_started = now
        left = started + self.listener.config.frame_timeout - now
        if left > 0:  # a later frame than the one the deadline was set for, or paused
            loop = asyncio.get_running_loop()
            self._frame_deadline = loop.call_later(left, self._check_frame_deadline)
            return
        self._frame_started = None
        self._frame_overdue = True
        self.listener.frame_overdue(self)
        self.stop()

    def _frames_received(self, data: bytes) -> None:
        if self.closing:
            return  # never ACKed, so the sender resends it to the next hub
        if self._lone_end is not None:
            self._lone_end.cancel()
            self._lone_end = None
        self._take(self.decoder.feed(data))
        if self.decoder.stray_bytes != self._stray_reported:
            self._report_bytes_outside_frames()
        if self.decoder.awaiting_end:
            loop = asyncio.get_running_loop()
            self._lone_end = loop.call_later(LONE_END_WAIT, self._end_lone_frame)
        self._pause_or_resume_reading()

    def eof_received(self) -> bool:
        """The peer half-closed: it sends no more, but may still read. Answer every frame it
        sent, then close (returning False would close at once, with their ACKs unsent)."""
        if self._tls is not None and not self._tls.secured:
            self._handshake_failed(ConnectionResetError("closed during the TLS handshake"))
            return False
        self._take(self.decoder.end_frame_now())
        self.closing = True
        return bool(self._answers)

    def _take(self, events: list[Frame | OversizeFrame | BrokenFrame]) -> None:
        self.frames_taken += len(events)
        for event in events:
            answer = _Answer()
            self._answers.append(answer)
            self._submit(event, answer)

    def _report_bytes_outside_frames(self) -> None:
        decoder = self.decoder
        self.listener.bytes_outside_frames_ignored(
            self,
            decoder.stray_bytes - self._stray_reported,
            decoder.unframed_messages - self._unframed_reported,
        )
        self._stray_reported = decoder.stray_bytes
        self._unframed_reported = decoder.unframed_messages

    def _end_lone_frame(self) -> None:
        self._lone_end = None
        if not self.closing:
            self._take(self.decoder.end_frame_now())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lone_end is not None:
            self._lone_end.cancel()
            self._lone_end = None
        if self._frame_deadline is not None:
            self._frame_deadline.cancel()
            self._frame_deadline = None
        if self._handshake_deadline is not None:  # reset mid-handshake
            self._handshake_failed(exc or ConnectionResetError("closed during the TLS handshake"))
        if exc is not None:
            log.info("MLLP connection from %s ended: %s", self.peer, exc.__class__.__name__)
        if self.decoder.mid_frame and not self._frame_overdue:  # that one is logged, rated
            log.warning(
                "MLLP peer %s left mid-frame; %d unacknowledged bytes dropped",
                self.peer,
                self.decoder.pending_bytes,
            )
        self.listener.closed(self)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._pause_or_resume_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._pause_or_resume_reading()

    # -- frames and answers --------------------------------------------------------------
    def _submit(self, event: Frame | OversizeFrame | BrokenFrame, answer: _Answer) -> None:
        assert self.arrival is not None
        intake = self.listener.intake

        def answered(result: IntakeResult) -> None:
            # b"": its sender's MSH-15 and MSH-16 asked for no answer; it still keeps its
            # place in line. In enhanced mode the application ACK follows the accept ACK.
            frame = encode_frame(result.ack) if result.send else b""
            if result.application_ack is not None:
                frame += encode_frame(result.application_ack)
            answer.frame = frame
            self._write_answered()

        if isinstance(event, Frame):
            intake.receive_soon(event.payload, self.arrival, answered)
            return
        if isinstance(event, OversizeFrame):
            reason = (
                f"message of {event.size} bytes exceeds this listener's limit of "
                f"{self.listener.config.max_message_bytes} bytes"
            )
        else:
            reason = (
                "frame cut short: a start block (0x0B) arrived before its end block (0x1C 0x0D)"
            )
        intake.reject_unreadable_frame_soon(event.head, event.size, self.arrival, reason, answered)

    def _write_answered(self) -> None:
        """Write every ACK now due: answered, with every frame before it answered too."""
        answers = self._answers
        ready: list[bytes] = []
        while answers and (frame := answers[0].frame) is not None:
            answers.popleft()
            if frame:
                ready.append(frame)
        transport = self.transport
        if ready and transport is not None and not transport.is_closing():
            transport.write(ready[0] if len(ready) == 1 else b"".join(ready))
            self.last_activity = time.monotonic()
        if self.closing and not answers:
            self.close()
        else:
            self._pause_or_resume_reading()

    def _pause_or_resume_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pause = self._writing_paused or len(self._answers) >= MAX_UNANSWERED
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        elif self._tls is not None:  # still in its TLS handshake
            self._cancel_handshake_deadline()
            self._tls.abort()

    def stop(self) -> None:
        """Answer the frames already read, then close; read no more."""
        self.closing = True
        if not self._answers:
            self.close()


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
        #: Open connections by peer address, oldest first (max_connections_per_peer).
        self._by_host: dict[str, list[_Connection]] = {}
        #: Connections closed because their peer went over max_connections_per_peer.
        self.connections_shed = 0
        self._shed_since_report = 0
        self._shed_reported_at = -SHED_REPORT_EVERY
        self._all_closed: asyncio.Event | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self.connections_total = 0
        #: Failed TLS handshakes, logged per peer address.
        self.handshake_failures = HandshakeFailures(f"MLLP listener {config.name}", log)
        #: Connections closed with a frame under way past frame_timeout.
        self.frames_timed_out = 0
        self._frame_reports = PeerReports()
        self.bytes_outside_frames = 0
        self._outside_frames_reported: dict[str, float] = {}

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def handshakes_failed(self) -> int:
        return self.handshake_failures.count

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        report_accept_failures(loop)
        self._server = await loop.create_server(
            lambda: _Connection(self),
            self.config.host,
            self.config.port,
            backlog=256,  # TLS, when configured, is set up by each connection (_secure)
        )
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        if self.config.idle_timeout:
            self._sweeper = asyncio.create_task(self._close_idle_connections())
        return self.address

    def opened(self, connection: _Connection) -> None:
        self._connections.add(connection)
        self.connections_total += 1
        if self._closing:  # accepted just as the listener stopped
            connection.stop()
            return
        same_peer = self._by_host.setdefault(connection.host, [])
        if len(same_peer) >= self.config.max_connections_per_peer:
            self._make_room(connection, same_peer)
        if not connection.closing:
            same_peer.append(connection)

    def _make_room(self, newcomer: _Connection, same_peer: list[_Connection]) -> None:
        """The peer is at its limit: close its longest idle connection (a sender that opens a
        connection per message and never closes one is the usual cause), or, when every one is
        waiting for an ACK, the newcomer. A connection with frames in flight is never cut."""
        idle = [conn for conn in same_peer if not conn.busy]
        victim = min(idle, key=lambda conn: conn.last_activity) if idle else newcomer
        if victim is not newcomer:
            same_peer.remove(victim)
        victim.closing = True
        victim.close()
        self.connections_shed += 1
        self._shed_since_report += 1
        now = time.monotonic()
        if now - self._shed_reported_at >= SHED_REPORT_EVERY:
            log.warning(
                "MLLP listener %s: closed %d connection(s) in the last %.0f s from peers over "
                "the limit of %d open connections per peer (latest: %s)",
                self.config.name,
                self._shed_since_report,
                min(now - self._shed_reported_at, SHED_REPORT_EVERY),
                self.config.max_connections_per_peer,
                newcomer.host,
            )
            self._shed_reported_at = now
            self._shed_since_report = 0

    def frame_overdue(self, connection: _Connection) -> None:
        """One WARNING per peer address a minute for connections closed with a frame that did
        not end in time. Never the frame's bytes: they may be part of a message."""
        self.frames_timed_out += 1
        times = self._frame_reports.due(connection.host)
        if not times:
            return
        log.warning(
            "MLLP listener %s: closed the connection from %s: a frame started %g s ago has not "
            "ended (frame_timeout), %d byte(s) of it read, unanswered; %d closed from this "
            "address since the last line, logged at most once a minute per address",
            self.config.name,
            connection.peer,
            self.config.frame_timeout,
            connection.decoder.pending_bytes,
            times,
        )

    def bytes_outside_frames_ignored(
        self, connection: _Connection, count: int, unframed_messages: int
    ) -> None:
        """Bytes with no start block before them are ignored and not answered, as MLLP has it;
        a sender waiting for an ACK to them would wait in vain, so one WARNING per peer address
        a minute says how many and why. Never the bytes themselves: they may be a message."""
        self.bytes_outside_frames += count
        now = time.monotonic()
        last = self._outside_frames_reported.get(connection.host)
        if last is not None and now - last < OUTSIDE_FRAMES_REPORT_EVERY:
            return
        self._outside_frames_reported[connection.host] = now
        shape = (
            f"; {unframed_messages} run(s) of them ended like a message (0x1C 0x0D): is the "
            "sender leaving out the start block?"
            if unframed_messages
            else ""
        )
        log.warning(
            "MLLP listener %s: ignored %d byte(s) from %s outside any frame (no start block "
            "0x0B before them), unanswered%s; later ones from this address are logged at most "
            "once a minute",
            self.config.name,
            count,
            connection.peer,
            shape,
        )

    def closed(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        same_peer = self._by_host.get(connection.host)
        if same_peer is not None and connection in same_peer:
            same_peer.remove(connection)
            if not same_peer:
                del self._by_host[connection.host]
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let connections answer the frames they have read, then close."""
        self._closing = True
        self._all_closed = asyncio.Event()
        if self._server:
            self._server.close()
        if self._sweeper:
            self._sweeper.cancel()
        for conn in list(self._connections):
            conn.stop()
        if self._connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        for conn in list(self._connections):  # still unanswered after the grace: give up
            if conn.transport is not None:
                conn.transport.abort()
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
                    conn.close()
