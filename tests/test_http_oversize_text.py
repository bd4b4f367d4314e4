"""The 413 AR for an HTTP body over the size limit states the body's size when it declared one
(Content-Length), and when it did not (chunked) only that it is over the limit: the hub stops
reading there, so the bytes it read are not the body's size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx

from carehub.testing import HubThread, local_config, make_adt
from tests.test_http import HL7_TYPE, ack_of

LIMIT = 1024


def test_an_oversize_body_is_described_by_what_is_known_of_its_size(tmp_path: Path) -> None:
    config = local_config()
    config.listeners.http.max_message_bytes = LIMIT
    body = make_adt("OVER", extra_segments=[f"NTE|1||{'x' * 6000}"]).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for at in range(0, len(body), 500):
            yield body[at : at + 500]

    with HubThread(config, tmp_path / "data") as hub:
        url, headers = f"{hub.http_url}/hl7", {"Content-Type": HL7_TYPE}
        chunked = httpx.post(url, content=chunks(), headers=headers, timeout=10)
        declared = httpx.post(url, content=body, headers=headers, timeout=10)
    assert (chunked.status_code, declared.status_code) == (413, 413)
    text = ack_of(chunked)[2]
    assert f"message of more than {LIMIT} bytes exceeds this listener's limit" in text
    assert f"{len(body)} bytes" not in text
    assert f"message of {len(body)} bytes exceeds" in ack_of(declared)[2]
