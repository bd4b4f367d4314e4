"""An observer hook that is slow (it holds up the hub's work, ACKs included) is named in a
WARNING with its plugin, its hook and the time it took, once per plugin and hook every
SLOW_OBSERVER_EVERY seconds however many messages it slows; a quick one is never named."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from carehub import plugins
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange
from tests.test_plugins import plugins_dir

#: Seconds the slow observer takes: over carehub's SLOW_OBSERVER (0.25 s).
SLEEP = 0.4

OBSERVERS = """
import time

from carehub import hookimpl


@hookimpl
def carehub_message_received(message):
    time.sleep({sleep})


@hookimpl
def carehub_message_routed(message, routes):
    pass
"""


def test_a_slow_observer_is_named_once_and_a_quick_one_never(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carehub")
    (tmp_path / "routes.yaml").write_text(
        "routes:\n  - name: r\n    steps: [{translate: v2-to-event}]\n", encoding="utf-8"
    )
    plugins_dir(tmp_path / "plugins", slowobs=OBSERVERS.format(sleep=SLEEP))
    config = local_config(
        worker=True, routes=["routes.yaml"], source=tmp_path / "carehub.yaml", plugins_dir="plugins"
    )
    with HubThread(config, tmp_path / "data") as hub:
        for control_id in ("SO-1", "SO-2", "SO-3"):
            (ack,) = mllp_exchange(hub.mllp_address, [make_adt(control_id).encode()])
            assert b"MSA|AA|" in ack

        def slow_lines() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.WARNING and "of plugin 'slowobs' took" in r.getMessage()
            ]

        deadline = time.monotonic() + 20
        while not slow_lines() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(3 * SLEEP)  # the other two messages' calls

    (line,) = slow_lines()  # three slow calls, one line
    assert plugins.SLOW_OBSERVER < SLEEP and plugins.SLOW_OBSERVER_EVERY >= 60
    assert line.startswith("carehub_message_received of plugin 'slowobs' took 0.")
    assert "carehub_message_routed" not in " ".join(r.getMessage() for r in caplog.records)
    assert "SO-1" not in line and "TESTPATIENT" not in line
