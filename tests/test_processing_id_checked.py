"""MSH-11, the processing ID (HL7 table 0103: P production, T training, D debugging), over real
sockets: a listener takes only the IDs its ``processing_ids`` names, P by default. A training
or debugging message sent to it (a test system pointed at a production port by mistake) is
answered AR (CR in enhanced mode) with ERR 202 and a reason naming the value and the setting,
stored as rejected, and never routed. An empty MSH-11 is refused (AE), as an empty MSH-10 is.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from carehub.config import load_config
from carehub.errors import ConfigError
from carehub.hl7.framing import encode_frame
from carehub.hl7.view import MessageView
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange, read_frames
from tests.conftest import corpus_files, requires_corpus
from tests.helpers_http import wait_for

TIMEOUT = 10.0


def with_processing_id(control_id: str, processing_id: str, **kwargs: str) -> bytes:
    """An ADT whose MSH-11 is ``processing_id``."""
    return make_adt(control_id, **kwargs).replace("|P|2.5", f"|{processing_id}|2.5", 1).encode()


def answered(hub: HubThread, *payloads: bytes) -> list[MessageView]:
    return [MessageView(a.decode()) for a in mllp_exchange(hub.mllp_address, payloads, TIMEOUT)]


def stored(hub: HubThread, control_id: str) -> tuple[str, str, str | None]:
    (message,) = [m for m in hub.store.find(limit=None) if m.control_id == control_id]
    return message.status, message.ack_code, message.detail


@pytest.fixture
def routing_hub(tmp_path: Path) -> Iterator[HubThread]:
    """A hub whose worker routes what intake accepts (no routes: each becomes 'unrouted')."""
    config = local_config(worker=True)
    config.worker.poll_interval = 0.05
    with HubThread(config, tmp_path / "data") as running:
        yield running


def test_a_training_message_is_rejected_stored_and_never_routed(routing_hub: HubThread) -> None:
    training, production = answered(
        routing_hub, with_processing_id("TRAIN-77", "T"), with_processing_id("PROD-1", "P")
    )
    reason = (
        "MSH-11 processing ID 'T' (training) is not taken by this listener (processing_ids: [P])"
    )
    assert (training.get("MSA-1"), training.get("MSA-2")) == ("AR", "TRAIN-77")
    assert (training.get("ERR-2"), training.get("ERR-8")) == ("MSH^1^11", reason)
    assert training.get("MSH-11") == "T"  # the ACK speaks as the message did
    assert (production.get("MSA-1"), production.get("MSA-2")) == ("AA", "PROD-1")

    # The message after it is routed (no routes here: 'unrouted'); the training one never is.
    wait_for(lambda: stored(routing_hub, "PROD-1")[0] == "unrouted", what="PROD-1 routed")
    assert stored(routing_hub, "TRAIN-77") == ("rejected", "AR", reason)


def test_the_error_code_is_202_unsupported_processing_id(routing_hub: HubThread) -> None:
    (training,) = answered(routing_hub, with_processing_id("TRAIN-78", "T"))
    assert training.get("ERR-3") == "202^Unsupported processing ID^HL70357"


def test_a_debugging_message_and_a_value_outside_table_0103_are_rejected_by_name(
    routing_hub: HubThread,
) -> None:
    debugging, unknown = answered(
        routing_hub, with_processing_id("DEBUG-1", "D^T"), with_processing_id("ODD-1", "X")
    )
    assert debugging.get("MSA-1") == "AR"
    assert debugging.get("ERR-8") == (
        "MSH-11 processing ID 'D' (debugging) is not taken by this listener (processing_ids: [P])"
    )
    assert unknown.get("MSA-1") == "AR"
    assert "'X' (not an HL7 table 0103 value)" in unknown.get("ERR-8")
    assert stored(routing_hub, "DEBUG-1")[:2] == ("rejected", "AR")


def test_an_empty_processing_id_is_refused_with_its_own_reason(routing_hub: HubThread) -> None:
    (empty,) = answered(routing_hub, with_processing_id("NOPID-1", ""))
    assert (empty.get("MSA-1"), empty.get("MSA-2")) == ("AE", "NOPID-1")
    assert empty.get("ERR-2") == "MSH^1^11"
    assert empty.get("ERR-3.1") == "101"
    assert empty.get("ERR-8").startswith("MSH-11 (processing ID) is empty")
    assert "this listener takes [P]" in empty.get("ERR-8")
    assert stored(routing_hub, "NOPID-1")[:2] == ("refused", "AE")


def test_a_listener_that_names_training_takes_it(tmp_path: Path) -> None:
    config = local_config()
    config.listeners.mllp[0].processing_ids = ["P", "T"]
    with HubThread(config, tmp_path / "data") as hub:
        training, debugging = answered(
            hub, with_processing_id("TRAIN-1", "T"), with_processing_id("DEBUG-2", "D")
        )
        assert (training.get("MSA-1"), training.get("MSA-2")) == ("AA", "TRAIN-1")
        assert debugging.get("MSA-1") == "AR"
        assert "(processing_ids: [P, T])" in debugging.get("ERR-8")
        assert stored(hub, "TRAIN-1")[:2] == ("received", "AA")


def test_enhanced_mode_answers_a_commit_reject(tmp_path: Path) -> None:
    config = local_config()
    config.listeners.mllp[0].enhanced_acks = True
    text = with_processing_id("TRAIN-CR", "T").decode()
    msh, rest = text.split("\r", 1)
    with (
        HubThread(config, tmp_path / "data") as hub,
        socket.create_connection(hub.mllp_address, timeout=TIMEOUT) as sock,
    ):
        sock.sendall(encode_frame(f"{msh}|||AL|NE\r{rest}".encode()))
        (answer,) = [MessageView(f.decode()) for f in read_frames(sock, 1, TIMEOUT)]
        assert (answer.get("MSA-1"), answer.get("MSA-2")) == ("CR", "TRAIN-CR")
        assert "processing ID 'T' (training)" in answer.get("ERR-8")
        assert stored(hub, "TRAIN-CR")[:2] == ("rejected", "AR")


def test_http_takes_production_messages_only_by_default(tmp_path: Path) -> None:
    with HubThread(local_config(), tmp_path / "data") as hub:
        response = httpx.post(
            f"{hub.http_url}/hl7",
            content=with_processing_id("HTTP-T", "T"),
            headers={"Content-Type": "x-application/hl7-v2+er7"},
            timeout=TIMEOUT,
        )
        answer = MessageView(response.content.decode())
        assert (answer.get("MSA-1"), answer.get("MSA-2")) == ("AR", "HTTP-T")
        assert answer.get("ERR-2") == "MSH^1^11"
        assert stored(hub, "HTTP-T")[:2] == ("rejected", "AR")


@requires_corpus
def test_the_training_samples_of_the_corpus_are_rejected_by_a_default_listener(
    tmp_path: Path,
) -> None:
    """Nine public samples say MSH-11 T; the rest say P and are taken."""
    files = corpus_files()
    with HubThread(local_config(), tmp_path / "data") as hub:
        answers = mllp_exchange(hub.mllp_address, [p.read_bytes() for p in files], TIMEOUT)
    codes: dict[str, list[str]] = {}
    for path, answer in zip(files, answers, strict=True):
        ack = MessageView(answer.decode("utf-8", "replace"))
        codes.setdefault(ack.get("MSA-1"), []).append(path.name)
        if ack.get("MSA-1") == "AR":
            assert ack.get("MSH-11") == "T", path.name
            assert "processing ID 'T' (training)" in ack.get("ERR-8") + ack.get("MSA-3")
    assert sorted(codes) == ["AA", "AR"]
    assert len(codes["AR"]) == 9 and "ORU-R01-01.hl7" in codes["AR"]


def test_processing_ids_are_table_0103_values(tmp_path: Path) -> None:
    config = tmp_path / "carehub.yaml"
    config.write_text(
        "routes: []\nlisteners:\n  mllp:\n    - name: adt\n      processing_ids: [P, X]\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"carehub.yaml:5: listeners.mllp\[0\].processing_ids"):
        load_config(config)
    config.write_text("routes: []\nlisteners:\n  http:\n    processing_ids: []\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="processing_ids"):
        load_config(config)
    config.write_text("routes: []\n", encoding="utf-8")
    loaded = load_config(config)
    assert loaded.listeners.mllp[0].processing_ids == ["P"]
    assert loaded.listeners.http.processing_ids == ["P"]
