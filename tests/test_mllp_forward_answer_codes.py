"""What an MLLP forward makes of its receiver's AE and AR, on a real hub with a real MLLP
receiver: by default AE is retried and AR is a dead letter at once; `reject_ack: retry` retries
an AR (a receiver that rejects while it is down, as HL7 v2 describes AR), and
`error_ack: dead_letter` gives up at the first AE (a receiver whose AE means "fix it")."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from carehub.config import load_config
from carehub.hl7.ack import AckCode
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
