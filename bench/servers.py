"""Reference MLLP servers the intake benchmark compares carehub against.

Run as `python bench/servers.py KIND --port 0`: the server binds, prints `PORT <n>` (flushed) and
serves until SIGTERM, then exits 0. Each one runs in its own process so that it does not share a
GIL with the load generator, which would otherwise halve both sides' throughput.

    bare        asyncio streams, ACK from a string template, stores nothing: the ceiling.
    carehub-unstored
                carehub's own MLLP listener and intake path (framing, MSH-18 decoding, the
                header view, a full ACK) with a writer that stores nothing: a diagnostic that
                splits carehub's time per message into its path and its durable write.
    python-hl7  python-hl7's own asyncio MLLP server, parse + Message.create_ack().
    hl7apy      hl7apy's threaded MLLPServer, parse_message + an ACK built with hl7apy; it closes
                the connection after every message, so clients must reconnect each time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType

import hl7.mllp
from hl7.mllp import HL7StreamReader, HL7StreamWriter
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from carehub.cli import settle_garbage_collector
from carehub.config import MLLPListenerConfig
from carehub.intake.intake import Intake
from carehub.intake.mllp import MLLPListener
from carehub.store.group_commit import Committed, GroupCommit
from carehub.store.store import InsertOutcome, NewMessage

KINDS = ("bare", "carehub-unstored", "python-hl7", "hl7apy")

_END = b"\x1c\r"

# MSH-n is field n-1 after splitting on "|" (MSH-1 is the separator itself).
_BARE_ACK = (
    "\x0bMSH|{enc}|{rcv_app}|{rcv_fac}|{snd_app}|{snd_fac}|{now}||ACK^{trigger}^ACK|"
    "A{control_id}|P|{version}\rMSA|AA|{control_id}\r\x1c\r"
)


def announce(port: int) -> None:
    """Tell the parent which port the OS gave us; it waits for this line."""
    print(f"PORT {port}", flush=True)


def bare_ack(payload: bytes) -> bytes:
    """An AA ACK for one payload, from the MSH fields only: no parser, no storage."""
    text = payload.decode("latin-1")
    msh = text.split("\r", 1)[0].split("|")
    trigger = msh[8].split("^")[1] if "^" in msh[8] else ""
    return _BARE_ACK.format(
        enc=msh[1],
        snd_app=msh[2],
        snd_fac=msh[3],
        rcv_app=msh[4],
        rcv_fac=msh[5],
        now=datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
        trigger=trigger,
        control_id=msh[9],
        version=msh[11] if len(msh) > 11 else "2.5",
    ).encode("latin-1")


async def _serve_until_sigterm(server: asyncio.Server) -> None:
    """Serve until SIGTERM, then close the listener and return (exit code 0)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        announce(server.sockets[0].getsockname()[1])
        await stop.wait()


async def _bare_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection: read a frame, answer AA, repeat until the client goes away."""
    try:
        while True:
            frame = await reader.readuntil(_END)
            start = frame.find(b"\x0b")
            writer.write(bare_ack(frame[start + 1 : -2]))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def run_bare(host: str, port: int) -> None:
    """The ceiling: what asyncio streams alone cost per message."""
    server = await asyncio.start_server(_bare_connection, host, port)
    await _serve_until_sigterm(server)


class NothingStored(GroupCommit):
    """Answers each message as committed without storing it, on the next loop pass, so frames
    read together are answered together as carehub's group commit answers them. Never a carehub
    mode: only this diagnostic uses it."""

    def __init__(self) -> None:  # no store to hold
        self.batches = 0
        self.rows = 0
        self._waiting: list[Committed] = []

    def submit_soon(self, message: NewMessage, done: Committed) -> None:
        if not self._waiting:
            asyncio.get_running_loop().call_soon(self._answer_all)
        self._waiting.append(done)

    def _answer_all(self) -> None:
        waiting, self._waiting = self._waiting, []
        self.batches += 1
        for done in waiting:
            self.rows += 1
            done(InsertOutcome(self.rows, False))


async def run_carehub_unstored(host: str, port: int) -> None:
    """carehub's MLLP listener and intake with NothingStored in place of the store."""
    listener = MLLPListener(MLLPListenerConfig(host=host, port=port), Intake(NothingStored()))
    _, bound = await listener.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    settle_garbage_collector()  # as `carehub serve` does once it has started
    announce(bound)
    await stop.wait()
    await listener.stop()


async def _python_hl7_connection(reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
    """One connection on python-hl7's server, written the way its documentation shows."""
    try:
        while True:
            message = await reader.readmessage()
            writer.writemessage(message.create_ack())
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def run_python_hl7(host: str, port: int) -> None:
    """python-hl7's asyncio MLLP server: a full parse and create_ack() per message."""
    server = await hl7.mllp.start_hl7_server(_python_hl7_connection, host, port)
    await _serve_until_sigterm(server)


class AdtA01Handler(AbstractHandler):  # type: ignore[misc]
    """Parse the admission with hl7apy and answer AA, echoing MSH-10 in MSA-2."""

    def reply(self) -> str:
        incoming = parse_message(self.incoming_message)
        ack = Message("ACK", version="2.5")
        ack.msh.msh_3 = incoming.msh.msh_5.value
        ack.msh.msh_4 = incoming.msh.msh_6.value
        ack.msh.msh_5 = incoming.msh.msh_3.value
        ack.msh.msh_6 = incoming.msh.msh_4.value
        ack.msh.msh_9 = "ACK^A01^ACK"
        ack.msh.msh_10 = "A" + incoming.msh.msh_10.value
        ack.msa.msa_1 = "AA"
        ack.msa.msa_2 = incoming.msh.msh_10.value
        mllp: str = ack.to_mllp()
        return mllp


def run_hl7apy(host: str, port: int) -> None:
    """hl7apy's threaded MLLPServer; it handles one message per connection, then closes it."""
    server = MLLPServer(host, port, {"ADT^A01^ADT_A01": (AdtA01Handler,)})
    server.daemon_threads = True

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    announce(server.server_address[1])
    try:
        server.serve_forever()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    """Parse `KIND --port N [--host H]` and run that server in the foreground."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    runners: dict[str, Callable[[str, int], object]] = {
        "bare": lambda h, p: asyncio.run(run_bare(h, p)),
        "carehub-unstored": lambda h, p: asyncio.run(run_carehub_unstored(h, p)),
        "python-hl7": lambda h, p: asyncio.run(run_python_hl7(h, p)),
        "hl7apy": run_hl7apy,
    }
    with contextlib.suppress(KeyboardInterrupt):
        runners[args.kind](args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
