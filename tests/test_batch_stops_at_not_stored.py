"""A batch (an HTTP body, a dropped file) that the store refuses part of, against a real
`carehub serve`: once one message is answered "not stored", none after it is stored, so the
sender's resend brings each patient's messages in the batch's order.

The store refuses for real: a trigger in the hub's own SQLite store fails every commit that
holds one chosen message, as a full disk fails the commit that does not fit."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import httpx

from carehub.hl7.ack import read_ack
from carehub.intake.intake import BATCH_GROUP
from carehub.testing import make_adt
from tests.helpers_http import CarehubProcess
from tests.test_filedrop import drop, names, wait_for
from tests.test_filedrop_large_files import stored_rows

HTTP_LINE = re.compile(r"HTTP listener '\S+' on ([\d.]+):(\d+)")
PATIENTS = BATCH_GROUP
#: The A01 whose commit the store refuses: its group is not stored.
REFUSED = "A01-050"


def feed() -> tuple[bytes, list[str]]:
    """Every patient's A01, then every A08, then every A03 (as a nightly extract is written),
    and the control IDs in body order."""
    control_ids = [f"{event}-{n:03d}" for event in ("A01", "A08", "A03") for n in range(PATIENTS)]
    body = "".join(
        make_adt(cid, event=cid[:3], patient_id=f"P{int(cid[4:]):04d}", visit_number=cid[4:])
        for cid in control_ids
    )
    return body.encode(), control_ids


def refuse(database: Path, control_id: str | None) -> None:
    """Make the store fail every commit holding ``control_id`` (None: stop doing so)."""
    with sqlite3.connect(database, timeout=30) as db:
        db.execute("DROP TRIGGER IF EXISTS refuse_one")
        if control_id is not None:
            db.execute(
                "CREATE TRIGGER refuse_one BEFORE INSERT ON messages "
                f"WHEN NEW.control_id = '{control_id}' "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )


def serve_args(tmp_path: Path, listeners: str) -> list[str]:
    config = tmp_path / "carehub.yaml"
    config.write_text(f"listeners:\n{listeners}\nroutes: []\nworker: {{enabled: false}}\n")
    return ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]


def stored_order(tmp_path: Path) -> list[str]:
    return [m.control_id or "" for m in stored_rows(tmp_path / "data")]


def assert_each_patient_in_order(order: list[str]) -> None:
    for n in range(PATIENTS):
        mine = [cid[:3] for cid in order if cid.endswith(f"-{n:03d}")]
        assert mine == ["A01", "A08", "A03"], f"patient {n} stored in the order {mine}"


def answers(response: httpx.Response) -> list[tuple[str | None, str | None, str | None]]:
    return [read_ack(a) for a in re.split(r"(?=MSH\|)", response.text) if a.startswith("MSH")]


def test_a_posted_batch_stores_nothing_after_a_message_it_could_not_store(tmp_path: Path) -> None:
    body, control_ids = feed()
    listeners = "  mllp: []\n  http: {host: 127.0.0.1, port: 0}"
    with CarehubProcess(serve_args(tmp_path, listeners), tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        match = HTTP_LINE.search(serve.stdout)
        assert match, serve.stdout
        url = f"http://127.0.0.1:{match.group(2)}/hl7"
        refuse(tmp_path / "data" / "carehub.db", REFUSED)
        first = httpx.post(url, content=body, timeout=120)
        assert first.status_code == 503, first.text[:300]
        acks = answers(first)
        assert [echoed for _, echoed, _ in acks] == control_ids
        assert {code for code, _, _ in acks} == {"AE"}  # the A01s refused, nothing after
        later = [text for _, echoed, text in acks if not echoed.startswith("A01")]
        assert all("an earlier message of this batch was not stored" in t for t in later)
        assert stored_order(tmp_path) == []

        refuse(tmp_path / "data" / "carehub.db", None)  # room again: the sender resends
        again = httpx.post(url, content=body, timeout=120)
        assert again.status_code == 200, again.text[:300]
        assert [code for code, _, _ in answers(again)] == ["AA"] * len(control_ids)
        assert serve.terminate() == 0
    order = stored_order(tmp_path)
    assert order == control_ids
    assert_each_patient_in_order(order)


def test_a_dropped_file_stores_nothing_after_a_message_it_could_not_store(tmp_path: Path) -> None:
    body, control_ids = feed()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    listeners = (
        "  mllp: []\n  http: {enabled: false}\n  files:\n"
        f"    - {{name: inbox, directory: {inbox}, poll_interval: 0.05, settle_seconds: 0}}"
    )
    # The second A08's group is refused: the A01s are stored, the A08s and A03s are not.
    refused = "A08-020"
    with CarehubProcess(serve_args(tmp_path, listeners), tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        refuse(tmp_path / "data" / "carehub.db", refused)
        drop(inbox, "extract.hl7", body)
        wait_for(lambda: "extract.hl7" in names(inbox / "error"), "extract.hl7 in error/")
        reasons = (inbox / "error" / "extract.hl7.error.txt").read_text()
        assert stored_order(tmp_path) == control_ids[:PATIENTS]
        refuse(tmp_path / "data" / "carehub.db", None)
        (inbox / "error" / "extract.hl7").rename(inbox / "extract.hl7")  # dropped again
        wait_for(lambda: "extract.hl7" in names(inbox / "processed"), "extract.hl7 processed")
        assert serve.terminate() == 0
    lines = reasons.splitlines()
    assert len(lines) == PATIENTS + 1, reasons[:2000]  # the refused group, then one line
    assert all("A08-" in line and "not stored" in line for line in lines[:PATIENTS])
    assert lines[-1].startswith(
        f"messages {2 * PATIENTS + 1} to {3 * PATIENTS} of {3 * PATIENTS} were not stored"
    )
    order = stored_order(tmp_path)
    assert order == control_ids
    assert_each_patient_in_order(order)
