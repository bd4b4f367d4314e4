"""What an MLLP forward makes of its receiver's AE and AR, on a real hub with a real MLLP
receiver: by default AE is retried and AR is a dead letter at once; `reject_ack: retry` retries
an AR (a receiver that rejects while it is down, as HL7 v2 describes AR), and
`error_ack: dead_letter` gives up at the first AE (a receiver whose AE means "fix it")."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from carehub.config import load_config
from carehub.hl7.ack import AckCode
from carehub.hl7.framing import Frame, FrameDecoder, encode_frame
from carehub.hl7.view import MessageView
from carehub.testing import HubThread
from tests.helpers_http import wait_for
from tests.test_one_receiver_one_line import Receiver, adt, receiver, statuses
from tests.test_worker import send

receiver = receiver  # the fixture: a real MLLP peer whose answers the test decides
RETRY = "{max_attempts: 3, initial_delay: 0.2, multiplier: 1, max_delay: 0.2, jitter: 0}"


def hub_config(tmp_path: Path, port: int, answers: str) -> Path:
    (tmp_path / "routes.yaml").write_text(
        "routes:\n"
        "  - name: adt\n"
        "    when: {type: ADT}\n"
        "    steps:\n"
        f"      - forward: {{channel: mllp, name: ehr, host: 127.0.0.1, port: {port},"
        f" timeout: 5, allow_cleartext: true, retry: {RETRY}{answers}}}\n",
        encoding="utf-8",
    )
    path = tmp_path / "carehub.yaml"
    path.write_text(
        "listeners:\n  mllp: [{name: test, host: 127.0.0.1, port: 0}]\n  http: {enabled: false}\n"
        "worker: {poll_interval: 0.05}\nroutes: [routes.yaml]\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(
    ("answers", "first", "outcome", "tries"),
    [
        ("", AckCode.ERROR, "delivered", 2),
        ("", AckCode.REJECT, "dead", 1),
        (", reject_ack: retry", AckCode.REJECT, "delivered", 2),
        (", error_ack: dead_letter", AckCode.ERROR, "dead", 1),
    ],
    ids=["AE-retried", "AR-dead", "AR-retried", "AE-dead"],
)
def test_the_forward_answers_ae_and_ar_as_configured(
    tmp_path: Path, receiver: Receiver, answers: str, first: AckCode, outcome: str, tries: int
) -> None:
    receiver.decide = lambda _cid, _event, seen: first if seen == 0 else AckCode.ACCEPT
    config = hub_config(tmp_path, receiver.port, answers)
    with HubThread(load_config(config), tmp_path / "data") as hub:
        send(hub, [adt("ANS-1", "A01")])
        wait_for(lambda: statuses(hub.store).get("ANS-1") == outcome, what=f"the A01 {outcome}")
        if outcome == "dead":
            time.sleep(1.0)  # five retry delays: a retry would have come by now
    assert len(receiver.seen()) == tries, receiver.seen()


def commit_accept(control_id: str) -> bytes:
    msh = f"MSH|^~\\&|EHR|EHR|CAREHUB|CAREHUB|20261201||ACK|C{control_id}|P|2.5"
    return f"{msh}\rMSA|CA|{control_id}\r".encode()


class CommitOnlyReceiver:
    """An MLLP peer in enhanced mode that commits each message (CA) and sends its application
    ACK later on another connection, as receivers with two connections do: on this one,
    nothing more follows the CA."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        decoder = FrameDecoder(1 << 20)
        with conn:
            while data := conn.recv(65536):
                for event in decoder.feed(data):
                    if isinstance(event, Frame):
                        control_id = MessageView(event.payload.decode()).get("MSH-10")
                        self.received.append(control_id)
                        ack = (
                            f"MSH|^~\\&|EHR|EHR|CAREHUB|CAREHUB|20261201||ACK|C{control_id}|P|2.5\r"
                        )
                        conn.sendall(encode_frame(f"{ack}MSA|CA|{control_id}\r".encode()))

    def close(self) -> None:
        self.server.close()


def test_a_commit_accept_without_its_application_ack_is_delivered_once(tmp_path: Path) -> None:
    """The message asks MSH-15/16 AL/AL; the receiver commits it (CA) and says no more on the
    connection: delivered, sent once, and the next message goes on a fresh connection."""
    peer = CommitOnlyReceiver()
    try:
        config = hub_config(tmp_path, peer.port, "")
        (tmp_path / "routes.yaml").write_text(
            (tmp_path / "routes.yaml").read_text().replace("timeout: 5", "timeout: 1"), "utf-8"
        )
        with HubThread(load_config(config), tmp_path / "data") as hub:
            first, second = (
                adt(cid, "A01").replace("|P|2.5\r", "|P|2.5|||AL|AL\r", 1)
                for cid in ("CA-1", "CA-2")
            )
            send(hub, [first, second])
            wait_for(
                lambda: statuses(hub.store) == {"CA-1": "delivered", "CA-2": "delivered"},
                timeout=20,
                what="both delivered",
            )
            time.sleep(1.5)  # a resend would have come by now
        assert peer.received == ["CA-1", "CA-2"]
    finally:
        peer.close()
