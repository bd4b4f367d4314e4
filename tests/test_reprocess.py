"""`messages reprocess` and what was already delivered: a message "failed" for one dead letter
is sent again only where it was not delivered (--undelivered) or where named (--destination);
the run's deliveries take the place of earlier runs' deliveries not made yet (dead letters,
waiting ones) at the same destinations, in their patients' lines, so the message is never sent
twice nor after the patient's later messages; a route error makes the command fail. Real hub,
real HTTP servers, the CLI through CliRunner."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub.config import load_config
from carehub.store.outbox import Outbox
from carehub.store.processes import ProcessBeacon
from carehub.testing import HubThread, make_adt
from tests.helpers_http import HTTPServer, wait_for
from tests.test_dead_letters import ROUTES, run
from tests.test_worker import FAST_RETRY, all_status, send, write_config


@pytest.fixture
def servers() -> Iterator[tuple[HTTPServer, HTTPServer]]:
    """``a`` takes everything; ``b`` refuses (HTTP 400: a dead letter at once) until told."""
    with HTTPServer(lambda _: 200) as a, HTTPServer(lambda _: 400) as b:
        yield a, b


@contextlib.contextmanager
def one_dead_letter(
    tmp_path: Path, a: HTTPServer, b: HTTPServer
) -> Iterator[tuple[Path, Path, HubThread]]:
    """A running hub (its config, data dir) holding one message delivered to care/a and
    dead at care/b."""
    config = write_config(tmp_path, ROUTES.format(a=a.url(), b=b.url(), retry=FAST_RETRY % 1))
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [make_adt("RP-1", patient_id="P1")])
        wait_for(lambda: all_status(hub.store, 1, "failed"), what="dead at care/b")
        yield config, data_dir, hub


def test_undelivered_sends_only_where_the_message_did_not_arrive(
    tmp_path: Path, servers: tuple[HTTPServer, HTTPServer]
) -> None:
    a, b = servers
    with one_dead_letter(tmp_path, a, b) as (config, data_dir, hub):
        (dead,) = Outbox(hub.store).find(status="dead")
        b.respond = lambda _: 200

        code, out, err = run(
            config, data_dir, "messages", "reprocess", "1", "--undelivered", "--by", "tester"
        )
        assert code == 0, out + err
        assert "message 1 (run 2): care; 1 deliveries queued, 1 left out" in out
        assert f"in place of earlier dead letter #{dead.id}, keeping the place in line" in out
        assert "already made" not in err
        wait_for(lambda: len(b.ok()) == 1, what="care/b sent once")
        wait_for(lambda: all_status(hub.store, 1, "delivered"), what="the message delivered")

        assert len(a.requests) == 1  # delivered before: not sent again
        assert Outbox(hub.store).find(status="dead") == []
        code, out, _ = run(config, data_dir, "dead-letters", "retry", "--all")
        assert "0 dead letter(s) queued again" in out
        code, out, _ = run(config, data_dir, "messages", "show", "1")
        assert f"delivery #{dead.id} (dead) carries reprocess run 2's delivery to care/b" in out
    assert len(b.ok()) == 1 and len(a.requests) == 1


def test_a_plain_reprocess_says_what_goes_again_and_never_sends_a_dead_letter_twice(
    tmp_path: Path, servers: tuple[HTTPServer, HTTPServer]
) -> None:
    """Every destination gets the message again (what a corrected route is for), and the
    command says so first; the dead letter it supersedes cannot be retried into a second copy."""
    a, b = servers
    with one_dead_letter(tmp_path, a, b) as (config, data_dir, _hub):
        b.respond = lambda _: 200

        code, out, err = run(config, data_dir, "messages", "reprocess", "--status", "failed")
        assert code == 1  # asked, and CliRunner gives no answer: nothing done
        assert "1 delivery(ies) of these messages were already made and will be made again" in err

        code, out, err = run(
            config, data_dir, "messages", "reprocess", "--status", "failed", "--yes"
        )
        assert code == 0, out + err
        assert "2 deliveries queued" in out and "in place of earlier dead letter" in out
        wait_for(lambda: len(a.requests) == 2 and len(b.ok()) == 1, what="both sent")
        code, out, _ = run(config, data_dir, "dead-letters", "retry", "--all")
        assert "0 dead letter(s) queued again" in out
        keys = {r.key for r in a.requests}
        assert len(keys) == 2  # a new key: the receiver is told it is another delivery
    assert len(b.ok()) == 1


def test_destination_names_where_to_send_and_refuses_an_unknown_one(
    tmp_path: Path, servers: tuple[HTTPServer, HTTPServer]
) -> None:
    a, b = servers
    with one_dead_letter(tmp_path, a, b) as (config, data_dir, hub):
        code, out, err = run(
            config, data_dir, "messages", "reprocess", "1", "--destination", "care/x"
        )
        assert code == 2
        assert "no destination 'care/x' in the routes (there are: care/a, care/b)" in err

        code, out, err = run(
            config, data_dir, "messages", "reprocess", "1", "--destination", "care/a"
        )
        assert code == 0, out + err
        assert "1 deliveries queued, 1 left out" in out and "in place of" not in out
        wait_for(lambda: len(a.requests) == 2, what="care/a sent again")
        assert len(Outbox(hub.store).find(status="dead")) == 1  # care/b is left as it was


def test_a_route_error_fails_the_reprocess(tmp_path: Path) -> None:
    routes = """
routes:
  - name: broken
    steps:
      - transform: {edits: [{set: {"OBX[3]-5": X}}]}
      - forward: {channel: file, directory: out}
"""
    config = write_config(tmp_path, routes)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [make_adt("RP-1", patient_id="P1")])
        wait_for(lambda: all_status(hub.store, 1, "failed"), what="the route failed")
    code, out, _ = run(config, data_dir, "messages", "reprocess", "1")
    assert code == 1
    assert "errors: broken: step 0 (transform)" in out


def test_reprocess_warns_when_a_worker_runs_other_route_files(tmp_path: Path) -> None:
    """The warning reads the process registry, so it holds on every store (a scale-out
    worker on PostgreSQL has no lock file to read): here a worker registered with another
    route set than the files on disk."""
    routes = """
routes:
  - name: archive
    steps: [{forward: {channel: file, directory: out}}]
"""
    config = write_config(tmp_path, routes)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [make_adt("RP-1", patient_id="P1")])
        wait_for(lambda: all_status(hub.store, 1, "delivered"), what="delivered")
        code, _, err = run(config, data_dir, "messages", "reprocess", "1", "--dry-run")
        assert code == 0 and "other route files" not in err
        other = ProcessBeacon(hub.store, "worker", lambda: "0123456789ab")
        hub.call(other.start(every=3600))
        try:
            code, _, err = run(config, data_dir, "messages", "reprocess", "1", "--dry-run")
        finally:
            hub.call(other.stop())
    assert code == 0
    assert f"warning: worker {socket.gethostname()} pid {os.getpid()} routed with other " in err


@contextlib.contextmanager
def held_line(
    tmp_path: Path, a: HTTPServer, b: HTTPServer
) -> Iterator[tuple[Path, Path, HubThread]]:
    """A running hub where a patient's admission (message 1) is a dead letter at care/b,
    holding its line, and the discharge after it (message 2) waits behind it there."""
    config = write_config(tmp_path, ROUTES.format(a=a.url(), b=b.url(), retry=FAST_RETRY % 1))
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, [make_adt("HL-1", "A01", patient_id="P1")])
        wait_for(lambda: Outbox(hub.store).find(status="dead"), what="the A01 dead at care/b")
        send(hub, [make_adt("HL-2", "A03", patient_id="P1")])
        wait_for(lambda: len(a.ok()) == 2, what="both delivered to care/a")
        yield config, data_dir, hub


def _sent_to(server: HTTPServer) -> list[str]:
    return [r.json["control_id"] for r in server.ok()]


def test_a_reprocessed_dead_letter_goes_before_the_patients_later_messages(
    tmp_path: Path, servers: tuple[HTTPServer, HTTPServer]
) -> None:
    """The README's recipe after an outage: the admission goes again, and the discharge held
    behind its dead letter still follows it (a new delivery queued behind the discharge)."""
    a, b = servers
    with held_line(tmp_path, a, b) as (config, data_dir, _hub):
        b.respond = lambda _: 200
        code, out, err = run(config, data_dir, "messages", "reprocess", "1", "--undelivered")
        assert code == 0, out + err
        assert "1 deliveries queued, 1 left out; in place of earlier dead letter" in out
        wait_for(lambda: len(b.ok()) == 2, what="both sent to care/b")
        assert _sent_to(b) == ["HL-1", "HL-2"]


def test_undelivered_never_adds_a_second_delivery_where_one_waits(
    tmp_path: Path, servers: tuple[HTTPServer, HTTPServer]
) -> None:
    a, b = servers
    with held_line(tmp_path, a, b) as (config, data_dir, hub):
        code, out, err = run(config, data_dir, "messages", "reprocess", "2", "--undelivered")
        assert code == 0, out + err
        assert "in place of earlier delivery #" in out and "(pending)" in out
        waiting = [d for d in Outbox(hub.store).find(limit=None) if d.message_id == 2]
        assert sorted(d.destination for d in waiting) == ["care/a", "care/b"]  # no second one
        b.respond = lambda _: 200
        code, out, _ = run(config, data_dir, "dead-letters", "retry", "--all")
        assert code == 0, out
        wait_for(lambda: len(b.ok()) == 2, what="both sent to care/b")
        time.sleep(0.5)  # a second copy would follow within the worker's poll
        assert _sent_to(b) == ["HL-1", "HL-2"]


def test_reprocess_keeps_a_discarded_dead_letter_discarded_and_warns_of_overtaking(
    tmp_path: Path, servers: tuple[HTTPServer, HTTPServer]
) -> None:
    """A discarded dead letter leaves its message 'failed', so `reprocess --status failed
    --undelivered` picks it up: that destination is left out (the operator gave up on it), and
    sending it there by name says it arrives after the patient's later messages."""
    a, b = servers
    with one_dead_letter(tmp_path, a, b) as (config, data_dir, hub):
        (dead,) = Outbox(hub.store).find(status="dead")
        b.respond = lambda _: 200
        send(hub, [make_adt("RP-2", "A03", patient_id="P1")])
        # Routed (held behind the dead letter) before the discard lets its line go on.
        wait_for(
            lambda: len(Outbox(hub.store).find(destination="care/b")) == 2,
            what="the A03 routed behind the dead letter",
        )
        code, out, err = run(config, data_dir, "dead-letters", "discard", str(dead.id))
        assert code == 0, out + err
        wait_for(lambda: len(b.ok()) == 1, what="the later A03 sent once the line goes on")

        code, out, err = run(
            config,
            data_dir,
            "messages",
            "reprocess",
            "--status",
            "failed",
            "--undelivered",
            "--yes",
        )
        assert code == 0, out + err
        assert "message 1 (run 2): care; 0 deliveries queued, 2 left out" in out
        assert "message 1: left out care/b, where its dead letter was discarded" in err
        assert "out of order" not in err

        code, out, err = run(
            config, data_dir, "messages", "reprocess", "1", "--destination", "care/b"
        )
        assert code == 0, out + err
        assert (
            "warning: message 1 reaches care/b after 1 later message(s) of the same patient "
            "already delivered there: the receiver gets it out of order"
        ) in err
        wait_for(lambda: len(b.ok()) == 2, what="sent by name")
    assert len(a.requests) == 2  # RP-1 and RP-2, once each
