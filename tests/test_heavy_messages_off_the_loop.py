"""A message that takes long to route (thousands of segments or repetitions, still under the
size limit) is routed on a helper thread: one sender's such messages never hold up another
sender's ACKs, which the hub's event loop writes."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from carehub.config import load_config
from carehub.hl7.framing import encode_frame
from carehub.routing.router import LOOP_MAX_BYTES, LOOP_MAX_PARTS, fits_the_loop
from carehub.testing import HTTPReceiver, HubThread, make_adt, mllp_exchange, read_frames
from tests.helpers_channels import stored
from tests.test_fhir_notifications import routes
from tests.test_worker import write_config

#: DG1 segments of the heavy message: each becomes a diagnosis and a FHIR Condition.
HEAVY_DIAGNOSES = 20_000
#: Seconds an ACK to the other sender may take while the heavy message is routed: routing
#: it on the event loop holds every ACK for the whole routing (seconds); off it, an ACK
#: waits for its turn at the interpreter lock now and then.
ACK_BOUND = 2.0


def _heavy(control_id: str) -> str:
    diagnoses = [f"DG1|{i}||I21.{i % 9}^AMI^I10" for i in range(1, HEAVY_DIAGNOSES + 1)]
    return make_adt(
        control_id, "A04", patient_id="HEAVY1", patient_class="E", extra_segments=diagnoses
    )


def _unrouted(hub: HubThread) -> set[str]:
    return {m.control_id or "" for m in hub.store.find(status="received", limit=None)}


def test_a_senders_heavy_message_does_not_hold_up_another_senders_acks(tmp_path: Path) -> None:
    with HTTPReceiver() as fhir:
        route = routes(fhir.url("/fhir"), settings={}, retry="{max_attempts: 1}")
        config = load_config(write_config(tmp_path, route))
        with HubThread(config, tmp_path / "data") as hub:
            heavy = _heavy("HEAVY-1").encode()
            assert len(heavy) < config.listeners.mllp[0].max_message_bytes
            (answer,) = mllp_exchange(hub.mllp_address, [heavy], timeout=120)
            assert b"MSA|AA|HEAVY-1" in answer
            waits: list[float] = []
            deadline = time.monotonic() + 300
            with socket.create_connection(hub.mllp_address, timeout=120) as other:
                while "HEAVY-1" in _unrouted(hub):
                    assert time.monotonic() < deadline, "the heavy message was never routed"
                    control_id = f"OTHER-{len(waits)}"
                    normal = make_adt(control_id, "A08", patient_id=f"P{len(waits)}")
                    started = time.monotonic()
                    other.sendall(encode_frame(normal.encode()))
                    (ack,) = read_frames(other, 1, timeout=120)
                    waits.append(time.monotonic() - started)
                    assert f"MSA|AA|{control_id}".encode() in ack
            (routed,) = [m for m in hub.store.find(limit=None) if m.control_id == "HEAVY-1"]
            assert routed.status != "received"
    assert waits, "the heavy message was routed before another sender could send"
    assert max(waits) < ACK_BOUND, (
        f"another sender's ACK waited {max(waits):.2f} s while a heavy message was routed "
        f"({len(waits)} ACKs, {sum(w >= ACK_BOUND for w in waits)} over {ACK_BOUND} s)"
    )


def test_what_real_messages_hold_is_routed_on_the_loop() -> None:
    assert fits_the_loop(stored(make_adt("N-1")))
    lab = make_adt("N-2", extra_segments=[f"OBX|{i}|TX|||line {i}" for i in range(150)])
    assert fits_the_loop(stored("\ufeff" + lab))


def test_many_segments_or_repetitions_or_bytes_are_routed_off_the_loop() -> None:
    assert not fits_the_loop(stored(_heavy("H-1")))
    identifiers = "~".join(f"ID{i}^^^RGH^MR" for i in range(LOOP_MAX_PARTS + 1))
    one_segment = make_adt("H-2").replace("P0001^^^HOSP^MR", identifiers)
    assert one_segment.count("\r") < 10
    assert not fits_the_loop(stored(one_segment))
    report = make_adt("H-3", extra_segments=["OBX|1|TX|||" + "x" * LOOP_MAX_BYTES])
    assert not fits_the_loop(stored(report))


def test_the_repetition_separator_is_the_messages_own() -> None:
    """MSH-2 may name another repetition separator: those are counted, a ``~`` is data."""
    repeated = "!".join(f"ID{i}^^^RGH^MR" for i in range(LOOP_MAX_PARTS + 1))
    text = make_adt("R-1").replace("^~\\&", "^!\\&").replace("P0001^^^HOSP^MR", repeated)
    assert not fits_the_loop(stored(text))
    tildes = make_adt("R-2", name="TILDE" + "~" * (LOOP_MAX_PARTS + 1)).replace("^~\\&", "^!\\&")
    assert fits_the_loop(stored(tildes))
