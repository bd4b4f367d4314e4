"""A sender over TLS that sends its frames, half-closes and then reads its ACKs gets every one,
whichever way it half-closes: with a TLS close_notify alert (as Go's CloseWrite and Node's
end() do) or with a TCP FIN alone (shutdown(SHUT_WR) on the socket under the TLS session)."""

from __future__ import annotations

import contextlib
import socket
import ssl

import pytest

from carehub.hl7.ack import read_ack
from carehub.hl7.framing import Frame, FrameDecoder, encode_frame
from carehub.intake.tls import client_context
from carehub.testing import HubThread, make_adt
from tests import test_tls
from tests.test_tls import TIMEOUT, Certs

# Fixtures of test_tls, shared by name (assigned, not imported, so the test parameters that use
# them do not shadow an import): the certificates and a hub serving MLLP over TLS.
certs = test_tls.certs
tls_hub = test_tls.tls_hub


class TlsClient:
    """TLS spoken over a plain blocking socket, so that the test chooses how to half-close."""

    def __init__(self, address: tuple[str, int], ca: ssl.SSLContext) -> None:
        self.sock = socket.create_connection(address, timeout=TIMEOUT)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ca.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._receive()
        self._flush()

    def _flush(self) -> None:
        if data := self.outgoing.read():
            self.sock.sendall(data)

    def _receive(self) -> bool:
        data = self.sock.recv(65536)
        if data:
            self.incoming.write(data)
        return bool(data)

    def send_and_half_close(self, data: bytes, how: str) -> None:
        """The frames and the half-close reach the hub together, before the frames are
        committed."""
        self.tls.write(data)
        if how == "close_notify":
            with contextlib.suppress(ssl.SSLWantReadError):  # the hub's answer comes later
                self.tls.unwrap()
        if how == "fin":  # MSG_MORE: the frames wait to leave with the FIN
            self.sock.sendall(self.outgoing.read(), socket.MSG_MORE)
            self.sock.shutdown(socket.SHUT_WR)
        else:
            self._flush()

    def read_frames(self, count: int) -> list[bytes]:
        decoder = FrameDecoder(1 << 20)
        frames: list[bytes] = []
        while len(frames) < count:
            try:
                data = self.tls.read(65536)
            except ssl.SSLWantReadError:
                if not self._receive():
                    break
                continue
            if not data:  # the hub's close_notify
                break
            frames += [e.payload for e in decoder.feed(data) if isinstance(e, Frame)]
        return frames

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("how", ["close_notify", "fin"])
@pytest.mark.parametrize("count", [1, 5])
def test_a_sender_that_half_closes_over_tls_reads_every_ack(
    tls_hub: HubThread, certs: Certs, how: str, count: int
) -> None:
    client = TlsClient(tls_hub.mllp_address, client_context(ca=certs.ca))
    try:
        ids = [f"TLSHC-{how}-{count}-{i}" for i in range(count)]
        frames = b"".join(encode_frame(make_adt(cid).encode()) for cid in ids)
        client.send_and_half_close(frames, how)
        acks = [read_ack(frame.decode()) for frame in client.read_frames(count)]
    finally:
        client.close()
    assert [(code, echoed) for code, echoed, _ in acks] == [("AA", cid) for cid in ids]
    assert sorted(m.control_id for m in tls_hub.store.find(limit=None)) == sorted(ids)


def test_a_bad_record_in_the_read_that_ends_the_handshake_is_no_handshake_failure(
    tls_hub: HubThread, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's Finished, a frame and a corrupt record in one read: the handshake did
    succeed, so the corrupt record ends the connection as any later one does, and no failed
    handshake is logged or counted (nor uses up the address's once-a-minute warning)."""
    caplog.set_level("INFO", logger="carehub.intake.mllp")
    sock = socket.create_connection(tls_hub.mllp_address, timeout=TIMEOUT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = client_context(ca=certs.ca, cert=None)
    session = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            session.do_handshake()
            break
        except ssl.SSLWantReadError:
            if data := outgoing.read():
                sock.sendall(data)
            incoming.write(sock.recv(65536))
    session.write(encode_frame(make_adt("SAMEREAD").encode()))
    oversize_record = b"\x17\x03\x03\xff\xff" + bytes(100)
    sock.sendall(outgoing.read() + oversize_record)  # Finished, the frame, the bad record
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass
    sock.close()
    listener = tls_hub.hub.mllp_listeners[0]
    ended = [r.getMessage() for r in caplog.records if "ended: TLS error" in r.getMessage()]
    assert ended, [r.getMessage() for r in caplog.records]
    assert listener.handshakes_failed == 0
    assert not [r for r in caplog.records if "TLS handshake with" in r.getMessage()]
