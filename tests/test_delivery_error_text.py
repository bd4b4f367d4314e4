"""What a failed send puts in the log and what in the store. A destination's answer may quote
the message it refuses ("Unknown patient DOE^JANE MRN RG100234"): it is kept with the attempt,
for `messages show` and `dead-letters list`, and never written to the log, which gets the
channel's own words. A real hub, a plugin channel that fails with each kind of error, caplog."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from carehub.store.outbox import Outbox
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange
from tests.helpers_http import wait_for
from tests.test_plugin_authoring import project

#: A channel that refuses every message the way engines answer: quoting the patient.
QUOTING_PLUGIN = """
from carehub import hookimpl
from carehub.components import Channel, DeliveryError, Outgoing


class Quoting(Channel):
    name = "quoting"

    def render(self, work, key):
        return Outgoing(work.v2.encode(), "x-application/hl7-v2+er7", key)

    async def send(self, outgoing):
        text = outgoing.payload.decode()
        pid = next(line for line in text.split("\\r") if line.startswith("PID"))
        name, mrn = pid.split("|")[5], pid.split("|")[3]
        if "SAID" in text:
            raise DeliveryError(
                "ehr:2575 rejected the message (AR)",
                retryable=False,
                said=f"Unknown patient {name} MRN {mrn}",
            )
        raise DeliveryError(f"ehr:2575 rejected the message (AR): Unknown patient {name}")


@hookimpl
def carehub_register_channels(register):
    register(Quoting)
"""


@pytest.mark.parametrize("said", [True, False])
def test_what_the_destination_said_is_stored_and_not_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, said: bool
) -> None:
    caplog.set_level(logging.INFO)
    routes = """
        routes:
          - name: ehr
            steps:
              - forward: {channel: quoting, retry: {max_attempts: 1}}
    """
    config = project(tmp_path / "config", routes, {"quoting": QUOTING_PLUGIN})
    hub_config = local_config(
        worker=True, routes=["routes/*.yaml"], source=config, plugins_dir=Path("plugins")
    )
    message = make_adt("SAID-1" if said else "PLAIN-1", name="QUIXOTE^ZEBULON", patient_id="ZQ77")
    with HubThread(hub_config, tmp_path / "data") as hub:
        (answer,) = mllp_exchange(hub.mllp_address, [message.encode()])
        assert b"MSA|AA|" in answer
        dead = wait_for(lambda: Outbox(hub.store).find(status="dead"), what="a dead letter")
    (letter,) = dead
    assert "Unknown patient QUIXOTE^ZEBULON" in (letter.last_error or "")  # kept for operators
    assert "QUIXOTE" not in caplog.text and "ZQ77" not in caplog.text
    assert "ehr:2575 rejected the message (AR)" in caplog.text
