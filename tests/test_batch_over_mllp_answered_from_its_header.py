"""An FHS/BHS batch sent in one MLLP frame, over real sockets: MLLP carries one message per
frame, so the batch is refused (AR) and stored whole as rejected, but the AR is one its sender
can match to what it sent: MSH-3 to MSH-6 are the FHS/BHS receiver and sender, MSA-2 is the
batch's control ID (FHS-11, else BHS-11), and MSH-11 and MSH-12 are those of its first
message."""

from __future__ import annotations

from pathlib import Path

from carehub.hl7.view import MessageView
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange

TIMEOUT = 10.0


def batch(file_header: str, batch_header: str, *messages: str) -> bytes:
    trailers = f"BTS|{len(messages)}\r" + ("FTS|1\r" if file_header else "")
    headers = "".join(f"{line}\r" for line in (file_header, batch_header) if line)
    return (headers + "".join(messages) + trailers).encode()


def answered(tmp_path: Path, *payloads: bytes) -> tuple[list[MessageView], list[object]]:
    with HubThread(local_config(), tmp_path / "data") as hub:
        found = mllp_exchange(hub.mllp_address, payloads, TIMEOUT)
        stored = list(reversed(hub.store.find(limit=None)))
    return [MessageView(answer.decode()) for answer in found], stored


def test_a_file_batch_is_answered_from_its_fhs(tmp_path: Path) -> None:
    frame = batch(
        "FHS|^~\\&|EPIC|RIV|CAREHUB|HUB|20240101120000||||FILE-1",
        "BHS|^~\\&|EPIC|RIV|CAREHUB|HUB|20240101120000||||BATCH-1",
        make_adt("B-1", version="2.5.1"),
        make_adt("B-2", version="2.5.1"),
    )
    [answer], [row] = answered(tmp_path, frame)
    assert (answer.get("MSA-1"), answer.get("MSA-2")) == ("AR", "FILE-1")
    assert [answer.get(f"MSH-{n}") for n in (3, 4, 5, 6)] == ["CAREHUB", "HUB", "EPIC", "RIV"]
    assert (answer.get("MSH-11"), answer.get("MSH-12")) == ("P", "2.5.1")
    assert "FHS/BHS batch" in answer.get("ERR-8")
    assert (row.status, row.ack_code, row.control_id) == ("rejected", "AR", "FILE-1")
    assert (row.sending_application, row.sending_facility) == ("EPIC", "RIV")
    assert row.raw == frame  # kept whole


def test_a_batch_without_fhs_or_fhs_11_is_answered_with_bhs_11(tmp_path: Path) -> None:
    alone = batch("", "BHS|^~\\&|LAB|NORTH|||20240101||||BATCH-2", make_adt("B-3", version="2.3"))
    no_file_id = batch(
        "FHS|^~\\&|LAB|NORTH",
        "BHS|^~\\&|LAB|NORTH|||20240101||||BATCH-3",
        make_adt("B-4", version="2.4"),
    )
    answers, _ = answered(tmp_path, alone, no_file_id)
    assert [(a.get("MSA-1"), a.get("MSA-2"), a.get("MSH-12")) for a in answers] == [
        ("AR", "BATCH-2", "2.3"),
        ("AR", "BATCH-3", "2.4"),
    ]
    # Nobody receiving named: the hub answers as itself, to the batch's sender.
    assert [answers[0].get(f"MSH-{n}") for n in (3, 5, 6)] == ["CAREHUB", "LAB", "NORTH"]


def test_a_batch_whose_delimiters_cannot_be_read_is_still_answered(tmp_path: Path) -> None:
    (answer,), _ = answered(tmp_path, b"FHS\rBHS\rBTS|0\rFTS|1\r")
    assert (answer.get("MSA-1"), answer.get("MSA-2")) == ("AR", "")
    assert "FHS/BHS batch" in answer.get("ERR-8")
