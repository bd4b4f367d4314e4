"""A message its routes matched but filtered everywhere (nothing to deliver) is `filtered`: a
final status apart from `routed`, which says deliveries are still to be made. `messages list
--status filtered` finds it and `carehub status` counts it apart from those in flight. A
reprocess run that sends nothing new leaves the message the status its deliveries give it
(delivered stays delivered, a dead letter keeps it failed), and an early referral cancel
applied later to a message with nothing to deliver ends filtered, not routed. Real hub over
MLLP, real HTTP receivers, the CLI through CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carehub.config import load_config
from carehub.store.outbox import Outbox
from carehub.store.store import MessageStore
from carehub.testing import HubThread, make_adt
from tests.helpers_http import HTTPServer, wait_for
from tests.test_dead_letters import run
from tests.test_rabbitmq import pg_url
from tests.test_referral_early_updates import CANCEL
from tests.test_referral_recipients import _referral
from tests.test_status import status_json
from tests.test_worker import FAST_RETRY, send, statuses, write_config

__all__ = ["pg_url"]  # the fixture, for the PostgreSQL runs


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_line(request: pytest.FixtureRequest) -> str:
    """What the hub config says of its store: nothing (SQLite in the data dir), or a
    PostgreSQL schema of its own."""
    if request.param == "sqlite":
        return ""
    return f"store: {{url: '{request.getfixturevalue('pg_url')}'}}\n"


def _config(tmp_path: Path, routes: str, store_line: str = "") -> Path:
    """The hub config and its routes, on the store ``store_line`` names."""
    config = write_config(tmp_path, routes)
    with config.open("a", encoding="utf-8") as file:
        file.write(store_line)
    return config


def _listed(config: Path, data_dir: Path, status: str) -> list[str]:
    code, out, err = run(config, data_dir, "messages", "list", "--status", status, "--json")
    assert code == 0, out + err
    return [json.loads(line)["control_id"] for line in out.splitlines() if line]


def _events(store: MessageStore, message_id: int) -> list[str]:
    return [event.event for event in store.history(message_id)]


def test_a_message_filtered_everywhere_is_filtered_not_in_flight(
    tmp_path: Path, store_line: str
) -> None:
    """The outpatient is filtered; the inpatient's delivery is retrying, so it is routed."""
    with HTTPServer(lambda _: 503) as down:
        routes = f"""
routes:
  - name: inpatients
    when: {{type: ADT}}
    steps:
      - filter: {{patient_class: I}}
      - forward: {{channel: webhook, name: hook, url: {down.url()},
                  retry: {{max_attempts: 5, initial_delay: 600}}}}
"""
        config = _config(tmp_path, routes, store_line)
        data_dir = tmp_path / "data"
        with HubThread(load_config(config), data_dir) as hub:
            send(
                hub,
                [
                    make_adt("INPAT", patient_class="I", patient_id="P1"),
                    make_adt("OUTPAT", patient_class="O", patient_id="P2"),
                ],
            )
            wait_for(lambda: len(down.requests) == 1, what="the inpatient's first attempt")
            wait_for(
                lambda: statuses(hub.store) == {"INPAT": "routed", "OUTPAT": "filtered"},
                what="both routed",
            )
            assert _listed(config, data_dir, "filtered") == ["OUTPAT"]
            assert _listed(config, data_dir, "routed") == ["INPAT"]
            report = status_json(data_dir, "--config", str(config))
            assert report["by_status"] == {"routed": 1, "filtered": 1}
            outpatient = next(m for m in hub.store.find(limit=None) if m.control_id == "OUTPAT")
            assert _events(hub.store, outpatient.id) == ["received", "filtered"]
            assert outpatient.detail == "routes inpatients; nothing to deliver"
            assert Outbox(hub.store).find(message_id=outpatient.id) == []


ROUTES = """
routes:
  - name: raw
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: ehr, url: {ehr}, retry: {retry}}}
  - name: picky
    when: {{type: ADT}}
    steps:
      - filter: {{patient_class: I}}
      - forward: {{channel: webhook, name: platform, url: {platform}}}
"""


def test_a_reprocess_that_sends_nothing_new_leaves_a_delivered_message_delivered(
    tmp_path: Path, store_line: str
) -> None:
    """Delivered to raw/ehr; reprocessed for picky/platform, whose route filters it."""
    with HTTPServer() as ehr, HTTPServer() as platform:
        routes = ROUTES.format(ehr=ehr.url(), platform=platform.url(), retry=FAST_RETRY % 1)
        config = _config(tmp_path, routes, store_line)
        data_dir = tmp_path / "data"
        with HubThread(load_config(config), data_dir) as hub:
            send(hub, [make_adt("OP-1", patient_class="O", patient_id="P1")])
            wait_for(lambda: hub.store.get(1).status == "delivered", what="delivered to raw/ehr")

            code, out, err = run(
                config, data_dir, "messages", "reprocess", "1", "--destination", "picky/platform"
            )
            assert code == 0, out + err
            assert "message 1 (run 2): raw, picky; 0 deliveries queued, 1 left out" in out
            message = hub.store.get(1)
            assert message.status == "delivered"
            assert message.detail == "routes raw, picky; nothing new to deliver"
            assert _events(hub.store, 1) == ["received", "routed", "delivered", "delivered"]
        assert len(ehr.requests) == 1 and platform.requests == []


def test_a_reprocess_that_sends_nothing_new_leaves_a_dead_letter_failed(tmp_path: Path) -> None:
    """Dead at raw/ehr; reprocessed for picky/platform, whose route filters it: still failed
    for the dead letter, not routed with nothing left to deliver."""
    with HTTPServer(lambda _: 400) as ehr, HTTPServer() as platform:
        routes = ROUTES.format(ehr=ehr.url(), platform=platform.url(), retry=FAST_RETRY % 1)
        config = write_config(tmp_path, routes)
        data_dir = tmp_path / "data"
        with HubThread(load_config(config), data_dir) as hub:
            send(hub, [make_adt("OP-2", patient_class="O", patient_id="P1")])
            wait_for(lambda: hub.store.get(1).status == "failed", what="dead at raw/ehr")

            code, out, err = run(
                config, data_dir, "messages", "reprocess", "1", "--destination", "picky/platform"
            )
            assert code == 0, out + err
            message = hub.store.get(1)
            assert message.status == "failed"
            assert message.detail == (
                "routes raw, picky; nothing new to deliver; 1 of 1 deliveries are dead letters"
            )
            assert _listed(config, data_dir, "failed") == ["OP-2"]
        assert len(ehr.requests) == 1 and platform.requests == []


def test_an_early_cancel_with_nothing_to_deliver_ends_filtered_once_applied(
    tmp_path: Path,
) -> None:
    """A route that only tracks referrals: the cancel that came before its referral is failed
    while it waits; applied once the referral comes, it has nothing to deliver, as the
    referral's own message has not."""
    routes = """
routes:
  - name: referrals
    when: {type: REF}
    steps:
      - translate: v2-to-event
      - enrich: referral-state
"""
    config = write_config(tmp_path, routes)
    with HubThread(load_config(config), tmp_path / "data") as hub:
        send(hub, [_referral("RGH-620-X", "R-620", replace=CANCEL)])
        wait_for(lambda: statuses(hub.store) == {"RGH-620-X": "failed"}, what="the early cancel")
        send(hub, [_referral("RGH-620", "R-620")])
        wait_for(
            lambda: statuses(hub.store) == {"RGH-620-X": "filtered", "RGH-620": "filtered"},
            what="the cancel applied, nothing to deliver for either",
        )
        assert _events(hub.store, 1) == ["received", "failed", "filtered"]
