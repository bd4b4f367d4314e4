"""The ACK carries the sender's MSH-2 as written: a sender that wrote fewer than four encoding
characters (MSH|^~|) gets those back, not the defaults the hub read its message with."""

from __future__ import annotations

import pytest

from carehub.hl7.ack import read_ack
from carehub.testing import HubThread, make_adt, mllp_exchange

TIMEOUT = 10.0


@pytest.mark.parametrize("encoding", ["^~", "^~\\"])
def test_the_ack_carries_the_senders_encoding_characters(hub: HubThread, encoding: str) -> None:
    message = make_adt(f"ENC-{len(encoding)}").replace("MSH|^~\\&|", f"MSH|{encoding}|", 1)
    (answer,) = mllp_exchange(hub.mllp_address, [message.encode()], TIMEOUT)
    assert answer.decode().startswith(f"MSH|{encoding}|CAREHUB|")
    assert read_ack(answer.decode())[:2] == ("AA", f"ENC-{len(encoding)}")
