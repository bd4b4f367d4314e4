"""A step that fails ends its route there, and the forwards before it are still sent: each was
fixed when its step ran, as when a filter stops a route. `messages show` and `routes test` say
what was sent, the message is `failed` once in its history (not again when its other
deliveries are made), and after the route is fixed `messages reprocess --undelivered` sends
only what is missing, never the earlier forward's copy a second time. Real hub over MLLP, real
HTTP receivers, the CLI through CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

from carehub.config import load_config
from carehub.store.outbox import Outbox
from carehub.testing import HubThread, make_adt
from tests.helpers_http import HTTPServer, wait_for
from tests.test_dead_letters import run
from tests.test_worker import send, write_config

#: A transform that sets a field of a segment the test messages lack (they have no PV2).
FAILING = "{edits: [{set: {PV2-3: ROUTINE}}]}"
#: The same route fixed: the segment is added first.
FIXED = '{edits: [{add: {segment: "PV2|||ROUTINE", after: PV1}}]}'

ROUTES = """
routes:
  - name: adt
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: before, url: {before}}}
      - transform: {transform}
      - forward: {{channel: webhook, name: after, url: {after}}}
"""


def _shown(config: Path, data_dir: Path, message_id: int) -> dict[str, object]:
    code, out, err = run(config, data_dir, "messages", "show", str(message_id), "--json")
    assert code == 0, out + err
    shown: dict[str, object] = json.loads(out)
    return shown


def _failed_rows(shown: dict[str, object]) -> list[str]:
    history = shown["history"]
    assert isinstance(history, list)
    return [h["detail"] for h in history if h["event"] == "failed"]


def test_forwards_before_a_failing_step_are_sent_and_a_fixed_route_sends_only_the_rest(
    tmp_path: Path,
) -> None:
    with HTTPServer() as before, HTTPServer() as after:
        routes = ROUTES.format(before=before.url(), after=after.url(), transform=FAILING)
        config = write_config(tmp_path, routes)
        data_dir = tmp_path / "data"
        with HubThread(load_config(config), data_dir) as hub:
            send(hub, [make_adt("RF-1", patient_id="P1")])
            wait_for(lambda: len(before.requests) == 1, what="the forward before the failure sent")
            wait_for(
                lambda: [d.status for d in Outbox(hub.store).find(message_id=1)] == ["delivered"],
                what="its delivery recorded",
            )
            assert hub.store.get(1).status == "failed"
            assert after.requests == []

            shown = _shown(config, data_dir, 1)
            steps = {s["position"]: s for s in shown["steps"]}  # type: ignore[union-attr]
            assert steps[0]["outcome"] == "ok" and steps[1]["outcome"] == "error"
            assert 2 not in steps  # the route ended at the failing step
            (delivery,) = shown["deliveries"]  # type: ignore[misc]
            assert delivery["destination"] == "adt/before"
            assert delivery["status"] == "delivered"
            # The key the step record names is the one the receiver got.
            key = steps[0]["output"]["idempotency_key"]
            assert delivery["idempotency_key"] == key
            (failure,) = _failed_rows(shown)
            assert failure.startswith("adt: step 1 (transform): EditError")

            # The route fixed: only the forward the failure stopped is sent.
            (tmp_path / "routes.yaml").write_text(
                ROUTES.format(before=before.url(), after=after.url(), transform=FIXED),
                encoding="utf-8",
            )
            code, out, err = run(
                config, data_dir, "messages", "reprocess", "1", "--undelivered", "--by", "tester"
            )
            assert code == 0, out + err
            assert "message 1 (run 2): adt; 1 deliveries queued, 1 left out" in out
            wait_for(lambda: len(after.ok()) == 1, what="the missing forward sent")
            wait_for(lambda: hub.store.get(1).status == "delivered", what="the message delivered")
            assert b'"control_id":"RF-1"' in after.ok()[0].body
        assert len(before.requests) == 1  # never twice


def test_routes_test_shows_what_a_failing_route_still_sends(tmp_path: Path) -> None:
    """`routes test` says the earlier forward would be sent, as the hub sends it."""
    routes = ROUTES.format(
        before="http://127.0.0.1:9/before", after="http://127.0.0.1:9/after", transform=FAILING
    )
    config = write_config(tmp_path, routes)
    message = tmp_path / "a01.hl7"
    message.write_text(make_adt("RT-1"), encoding="utf-8")
    code, out, _ = run(config, tmp_path / "data", "routes", "test", str(message))
    assert code == 1  # a route error
    assert "would send to adt/before via webhook" in out
    assert "would send to adt/after" not in out
    assert "error: step 1 (transform): EditError" in out


def test_a_route_failure_is_one_row_of_the_history_when_other_deliveries_are_made(
    tmp_path: Path,
) -> None:
    """The message is failed when routed; its other route's delivery made later does not
    write the same failure into its history a second time."""
    with HTTPServer() as ehr:
        routes = f"""
routes:
  - name: broken
    when: {{type: ADT}}
    steps:
      - transform: {FAILING}
  - name: raw
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: ehr, url: {ehr.url()}}}
"""
        config = write_config(tmp_path, routes)
        data_dir = tmp_path / "data"
        with HubThread(load_config(config), data_dir) as hub:
            send(hub, [make_adt("RF-2", patient_id="P2")])
            wait_for(
                lambda: [d.status for d in Outbox(hub.store).find(message_id=1)] == ["delivered"],
                what="the raw copy delivered",
            )
            shown = _shown(config, data_dir, 1)
            assert hub.store.get(1).status == "failed"
            history = shown["history"]
            assert isinstance(history, list)
            assert [h["event"] for h in history] == ["received", "failed"]
            (failure,) = _failed_rows(shown)
            assert failure.startswith("broken: step 0 (transform): EditError")
