"""A channel whose send() raises asyncio.CancelledError of its own (a library's, or by hand),
not because the worker is stopping: a failed attempt like any other, retried and then a dead
letter, never a delivery left 'sending' holding its patient's line until a restart. The
worker's own stop still hands the sends it cuts off back unsent."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from carehub.plugins import ENV_ALLOW, ENV_BLOCK, ENV_PLUGINS_DIR
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange
from tests.test_plugins import plugins_dir

#: A channel that raises CancelledError on the first ``cancels`` attempts of each message.
CANCELLING_PLUGIN = """
import asyncio

from carehub import hookimpl
from carehub.components import Channel, ComponentOptions, Outgoing


class Cancelling(Channel):
    name = "cancelling"

    class Options(ComponentOptions):
        cancels: int

    def __init__(self, options, context):
        super().__init__(options, context)
        self.attempts = {}

    def render(self, work, key):
        return Outgoing(work.view.get("MSH-10").encode(), "text/plain", key)

    async def send(self, outgoing):
        seen = self.attempts[outgoing.payload] = self.attempts.get(outgoing.payload, 0) + 1
        if seen <= self.options.cancels:
            raise asyncio.CancelledError()
        return "ok"


@hookimpl
def carehub_register_channels(register):
    register(Cancelling)
"""

ROUTES = """\
routes:
  - name: r
    steps:
      - forward:
          channel: cancelling
          cancels: {cancels}
          retry: {{max_attempts: 2, initial_delay: 0.05, jitter: 0}}
"""


@pytest.fixture(autouse=True)
def clean_plugin_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_ALLOW, ENV_BLOCK, ENV_PLUGINS_DIR):
        monkeypatch.delenv(name, raising=False)


def hub_with(folder: Path, cancels: int) -> HubThread:
    (folder / "routes").mkdir(parents=True)
    (folder / "routes" / "routes.yaml").write_text(ROUTES.format(cancels=cancels), "utf-8")
    plugins_dir(folder / "plugins", cancelling=CANCELLING_PLUGIN)
    config = local_config(
        worker=True,
        routes=["routes/*.yaml"],
        source=folder / "carehub.yaml",
        plugins_dir="plugins",
    )
    return HubThread(config, folder / "data")


def test_a_cancelled_error_from_send_is_a_failed_attempt_that_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carehub")
    with hub_with(tmp_path, cancels=1) as hub:
        for control_id in ("C1", "C2"):  # one patient: the second waits behind the first
            mllp_exchange(hub.mllp_address, [make_adt(control_id).encode()])
        first, second = hub.wait_for_deliveries(2, timeout=15)

    for delivery in (first, second):
        assert (delivery.status, delivery.attempts) == ("delivered", 2)
    assert any(
        r.levelno == logging.WARNING and "r/cancelling failed (CancelledError)" in r.getMessage()
        for r in caplog.records
    )


def test_a_send_that_keeps_raising_cancelled_error_becomes_a_dead_letter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carehub")
    with hub_with(tmp_path, cancels=99) as hub:
        mllp_exchange(hub.mllp_address, [make_adt("D1").encode()])
        (delivery,) = hub.wait_for_deliveries(1, timeout=15)

    assert (delivery.status, delivery.attempts) == ("dead", 2)
    assert delivery.last_error.startswith("CancelledError")
    assert any(
        "r/cancelling is a dead letter after attempt 2 of 2" in r.getMessage()
        and r.getMessage().endswith("CancelledError")
        for r in caplog.records
    )
