"""A step that waits on something outside carehub (a lookup over the network) never holds up
the listeners: on SQLite, routes with such a step run on a helper thread, and a slow step is
named in the log. Also: a destination's failure run does not end while its deliveries are
only waiting out their retry delays."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from carehub.testing import HubThread, local_config, make_adt, mllp_exchange
from carehub.worker import TROUBLE_REPORT_SECONDS, DestinationTrouble
from tests.test_plugin_authoring import project

#: An enricher that waits LOOKUP_SECONDS per message, as a lookup service that answers slowly.
SLOW_LOOKUP_PLUGIN = """
import time

from carehub import hookimpl
from carehub.components import Enricher


class SlowLookup(Enricher):
    name = "slow-lookup"

    def enrich(self, work):
        time.sleep({seconds})
        return "looked up"


class QuickLookup(SlowLookup):
    name = "quick-lookup"

    def may_block(self):
        return False


@hookimpl
def carehub_register_enrichers(register):
    register(SlowLookup)
    register(QuickLookup)
"""

LOOKUP_SECONDS = 1.5


def _hub_config(tmp_path: Path, enricher: str) -> object:
    routes = f"""
        routes:
          - name: looked-up
            when: {{type: ADT}}
            steps:
              - enrich: {enricher}
              - forward: {{channel: file, name: archive, directory: {tmp_path / "out"}}}
    """
    plugin = SLOW_LOOKUP_PLUGIN.replace("{seconds}", str(LOOKUP_SECONDS))
    config = project(tmp_path / "config", routes, {"lookup": plugin})
    return local_config(worker=True, routes=["routes/*.yaml"], source=config, plugins_dir="plugins")


def _ack_seconds_while_routing(hub: HubThread) -> float:
    """Send one message, and while its lookup is under way, time the ACK of a second."""
    (first,) = mllp_exchange(hub.mllp_address, [make_adt("SLOW-1", patient_id="P1").encode()])
    assert b"MSA|AA|" in first
    time.sleep(0.3)  # the worker has taken SLOW-1 and is in its lookup
    started = time.monotonic()
    (second,) = mllp_exchange(hub.mllp_address, [make_adt("SLOW-2", patient_id="P2").encode()])
    assert b"MSA|AA|" in second
    return time.monotonic() - started


def test_a_plugin_lookup_does_not_hold_up_the_acks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carehub.worker")
    with HubThread(_hub_config(tmp_path, "slow-lookup"), tmp_path / "data") as hub:
        took = _ack_seconds_while_routing(hub)
        hub.wait_for_deliveries(2, timeout=30)
    assert took < LOOKUP_SECONDS / 3, f"the ACK waited {took:.2f} s for the lookup"
    assert "routing runs on a helper thread" in caplog.text
    assert "looked-up: enrich slow-lookup" in caplog.text
    assert "looked-up: enrich quick-lookup" not in caplog.text


def test_a_step_that_says_it_never_blocks_runs_on_the_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What may_block() says is what decides: a plugin's step that returns False is routed on
    the hub's loop (here it sleeps anyway, so the ACK waits: the plugin's promise, broken)."""
    caplog.set_level(logging.INFO, logger="carehub.worker")
    with HubThread(_hub_config(tmp_path, "quick-lookup"), tmp_path / "data") as hub:
        took = _ack_seconds_while_routing(hub)
        hub.wait_for_deliveries(2, timeout=30)
    assert took > LOOKUP_SECONDS / 3
    assert "routing runs on a helper thread" not in caplog.text


def test_a_slow_step_is_named_in_the_log_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="carehub.routing.router")
    with HubThread(_hub_config(tmp_path, "slow-lookup"), tmp_path / "data") as hub:
        messages = [make_adt(f"SLOW-{n}", patient_id=f"P{n}").encode() for n in range(2)]
        mllp_exchange(hub.mllp_address, messages)
        hub.wait_for_deliveries(2, timeout=30)
    slow = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert len(slow) == 1, slow
    assert slow[0].startswith("route looked-up step 0 (enrich slow-lookup) took 1.")


def test_a_failure_run_outlasts_the_retry_waits() -> None:
    """Quiet because every delivery waits out a 600 s retry delay is not a destination that
    works again: the run ends only after the longest wait and a summary period more, and says
    how long the failures went on without a negative figure."""
    trouble = DestinationTrouble("adt/ehr", longest_retry_wait=600 * 1.2)
    trouble.failed("connection refused")
    last = time.monotonic()
    trouble.end_if_quiet(last + TROUBLE_REPORT_SECONDS + 1)
    trouble.end_if_quiet(last + 700)
    assert trouble.failing
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("carehub.worker").addHandler(handler)
    try:
        trouble.end_if_quiet(last + 720 + TROUBLE_REPORT_SECONDS + 1)
    finally:
        logging.getLogger("carehub.worker").removeHandler(handler)
    assert not trouble.failing
    (said,) = [r.getMessage() for r in records]
    assert "this run of failures is closed" in said
    assert "-0.0" not in said and "failed in the 0.0 s before" in said


def test_routing_on_a_thread_keeps_each_patients_order(tmp_path: Path) -> None:
    """Off the loop, messages are still routed one at a time in arrival order."""
    with HubThread(_hub_config(tmp_path, "slow-lookup"), tmp_path / "data") as hub:
        sent = [make_adt(f"ORD-{n}", patient_id="SAME").encode() for n in range(3)]
        senders = [
            threading.Thread(target=mllp_exchange, args=(hub.mllp_address, [m])) for m in sent
        ]
        for sender in senders:
            sender.start()
            time.sleep(0.05)
        for sender in senders:
            sender.join()
        found = hub.wait_for_deliveries(3, timeout=30)
    assert [d.message_id for d in sorted(found, key=lambda d: d.id)] == sorted(
        d.message_id for d in found
    )
