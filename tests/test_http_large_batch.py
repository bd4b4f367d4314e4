"""A large batch posted over HTTP, against a real `carehub serve`: other senders' MLLP messages
are answered while it is split and stored, and the batch is stored whole, once, in order."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx

from carehub.hl7.ack import read_ack
from tests.helpers_http import CarehubProcess
from tests.test_filedrop import wait_for
from tests.test_filedrop_large_files import (
    LONGEST_GAP,
    Sender,
    nightly_batch,
    stored_meanwhile,
    stored_rows,
)

HTTP_LINE = re.compile(r"HTTP listener '\S+' on ([\d.]+):(\d+)")
#: About 17 MB: split on the event loop, it held every listener for about 2 s on a 2-CPU
#: machine, and starting all its messages at once held them again.
MESSAGES = 4_000
POST_TIMEOUT = 240.0


def serve_args(tmp_path: Path) -> list[str]:
    """`carehub serve` with an MLLP listener for the live sender and an HTTP listener that
    takes bodies of up to 64 MiB; nothing routed and no worker."""
    config = tmp_path / "carehub.yaml"
    config.write_text(
        "listeners:\n"
        "  mllp: [{name: senders, host: 127.0.0.1, port: 0}]\n"
        "  http: {host: 127.0.0.1, port: 0, max_message_bytes: 67108864, body_timeout: 120}\n"
        "routes: []\nworker: {enabled: false}\n"
    )
    return ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]


def test_mllp_senders_are_answered_while_a_large_batch_is_posted(tmp_path: Path) -> None:
    """The body is split off the event loop and stored a group at a time: the MLLP sender's
    answers keep coming and its messages are stored between the batch's own, while every
    message of the batch is answered AA in order and stored once."""
    batch, control_ids = nightly_batch(MESSAGES)
    assert len(batch) > 16 * 1024 * 1024
    with CarehubProcess(serve_args(tmp_path), tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        match = HTTP_LINE.search(serve.stdout)
        assert match, serve.stdout
        url = f"http://127.0.0.1:{match.group(2)}/hl7"
        sender = Sender(serve.mllp_address)
        sender.start()
        wait_for(lambda: len(sender.answered) >= 5 or sender.failure is not None, "answers")
        start = time.monotonic()
        response = httpx.post(
            url,
            content=batch,
            headers={"Content-Type": "x-application/hl7-v2+er7"},
            timeout=POST_TIMEOUT,
        )
        end = time.monotonic()
        time.sleep(0.2)  # an answer after the batch is taken closes the last gap
        sender.finish()
        gap = sender.longest_gap(start, end)
        assert serve.terminate() == 0
    assert response.status_code == 200, response.text[:500]
    acks = [read_ack(a) for a in re.split(r"(?=MSH\|)", response.text) if a.startswith("MSH")]
    assert [(code, echoed) for code, echoed, _ in acks] == [("AA", c) for c in control_ids]
    assert gap < LONGEST_GAP, (
        f"an MLLP sender waited {gap:.2f} s for an answer while the batch was posted "
        f"({end - start:.1f} s)"
    )
    rows = stored_rows(tmp_path / "data")
    posted = [m for m in rows if m.transport == "http"]
    assert [m.control_id for m in posted] == control_ids
    between = stored_meanwhile(rows, posted, "senders")
    assert len(between) >= 3, (
        f"{len(between)} of the sender's {len(sender.control_ids)} messages were stored while "
        "the batch was"
    )
