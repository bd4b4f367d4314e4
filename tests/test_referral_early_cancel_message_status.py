"""The message of a referrer's cancel (REF^I14) that came before its referral: failed while it
waits, and once the referral (REF^I12) comes and the cancel is applied to it, the message takes
the status a message routed without that problem has, its history saying when it was applied,
so `messages list --status failed` no longer shows a problem that is over. Also when the cancel
and its referral are routed in one batch (a backlog the worker takes up at start). The shipped
config on a real hub over MLLP, with an aiosmtpd server and a FHIR test server; SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from carehub.cli import main
from carehub.config import HubConfig
from carehub.store.store import MessageStore
from carehub.testing import HubThread
from tests.helpers_http import wait_for
from tests.test_rabbitmq import pg_url
from tests.test_referral_early_updates import CANCEL, _message, _referral_of, _timeline
from tests.test_referral_recipients import Loop, _referral, referral_loop

__all__ = ["pg_url"]  # the fixture, for the PostgreSQL run

PATIENT = "RG100234"  # feed 07's PID-3


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_setting(request: pytest.FixtureRequest) -> Callable[[HubConfig], None]:
    """What the hub's config is given: the store in its data dir, or a PostgreSQL schema."""
    if request.param == "sqlite":
        return lambda _: None
    url = request.getfixturevalue("pg_url")

    def on_postgresql(config: HubConfig) -> None:
        config.store.url = url

    return on_postgresql


@pytest.fixture
def loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_setting: Callable[[HubConfig], None]
) -> Iterator[Loop]:
    """The shipped config on a running hub, with its stand-ins, on either store."""
    with referral_loop(tmp_path, monkeypatch, store_setting) as running:
        yield running


def _history(store: MessageStore, message_id: int) -> list[tuple[str, str | None]]:
    return [(event.event, event.detail) for event in store.history(message_id)]


def _failed_listed(tmp_path: Path, loop: Loop) -> list[str]:
    """The control IDs `carehub messages list --status failed --json` shows."""
    hub = loop.running.hub
    assert hub.config.source is not None
    url = hub.config.store.url  # the PostgreSQL run's, set on the config, not in its file
    result = CliRunner(env={"CAREHUB_STORE_URL": url} if url else {}).invoke(
        main,
        [
            *("messages", "list", "--status", "failed", "--json"),
            *("--config", str(hub.config.source), "--data-dir", str(tmp_path / "data")),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line)["control_id"] for line in result.output.splitlines() if line]


def test_an_early_cancel_is_no_longer_failed_once_its_referral_comes(
    loop: Loop, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carehub")
    assert loop.send(_referral("RGH-610-X", "R-610", replace=CANCEL)) == "AA"
    cancel = _message(loop, "RGH-610-X")
    assert cancel.status == "failed"
    assert _failed_listed(tmp_path, loop) == ["RGH-610-X"]

    assert loop.send(_referral("RGH-610", "R-610")) == "AA"
    created = _message(loop, "RGH-610")
    referral = _referral_of(loop, "RIVERSIDE_GH|R-610")
    assert referral.status == "cancelled"
    store = loop.running.store
    wait_for(
        lambda: store.get(cancel.id).status == "delivered",
        what="the early cancel's message delivered once applied",
    )
    # Its history says when and why it stopped being failed, naming rows, not the patient.
    events = _history(store, cancel.id)
    assert [d for e, d in events if e == "routed"] == [
        f"REF^I14 applied when referral #{referral.id} arrived (REF^I12, message "
        f"{created.id}): it came before the referral and was kept for it"
    ]
    assert events[-1][0] == "delivered"
    assert _failed_listed(tmp_path, loop) == []
    # Applied once, with the referral: nothing else to do for it.
    assert _timeline(loop, "RIVERSIDE_GH|R-610") == [
        ("REF^I14", "unknown_referral", "cancelled", False),
        ("REF^I12", "created", "requested", True),
        ("REF^I14", "cancelled", "cancelled", True),
    ]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("applied when referral #" in line for line in said)
    for line in said:
        assert "R-610" not in line and PATIENT not in line, line


def test_an_early_cancel_routed_in_one_batch_with_its_referral_is_settled_by_the_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored while no worker runs, the cancel and its referral are routed in one batch when
    one starts: the referral's step finds the cancel's message still being routed, and the
    next periodic run settles it."""

    def no_worker(config: HubConfig) -> None:
        config.worker.enabled = False

    with referral_loop(tmp_path, monkeypatch, no_worker) as intake:
        assert intake.send(_referral("RGH-620-X", "R-620", replace=CANCEL)) == "AA"
        assert intake.send(_referral("RGH-620", "R-620")) == "AA"
        config = intake.running.hub.config
        intake.running.stop()
        config.worker.enabled = True
        with HubThread(config, tmp_path / "data") as running:
            loop = Loop(running, intake.fhir, intake.inbox)
            cancel = _message(loop, "RGH-620-X")
            created = _message(loop, "RGH-620")
            assert created.status == "delivered"
            referral = _referral_of(loop, "RIVERSIDE_GH|R-620")
            assert referral.status == "cancelled"
            loop.settled("referral-changes/referral-updates")  # the cancel's deliveries done
            store = running.store
            assert store.get(cancel.id).status == "failed"  # routed beside its referral

            running.hub.table.tick(datetime.now(UTC))
            wait_for(
                lambda: store.get(cancel.id).status == "delivered",
                what="the early cancel's message settled by the tick",
            )
            routed = [d for e, d in _history(store, cancel.id) if e == "routed"]
            assert routed == [
                f"REF^I14 applied when referral #{referral.id} arrived (REF^I12, message "
                f"{created.id}): it came before the referral and was kept for it"
            ]


#: A route that fails for one cancel only (its MSH-10), whatever the referral state says.
BROKEN_FOR_ONE = """
routes:
  - name: cancel-audit
    when:
      type: REF
      events: [I14]
      fields: {MSH-10: {regex: "^RGH-660-X$"}}
    steps:
      - transform: {edits: [{set: {"OBX[3]-5": X}}]}
      - forward: {channel: file, name: cancel-audit, directory: cancel-audit}
"""


def test_an_early_cancel_failed_for_something_else_too_stays_failed_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Applying the cancel mends only its own problem: one that another route failed stays
    failed for that, and the periodic runs leave its history as it is."""

    def with_broken_route(config: HubConfig) -> None:
        assert config.source is not None
        (config.source.parent / "routes" / "cancel-audit.yaml").write_text(BROKEN_FOR_ONE)

    with referral_loop(tmp_path, monkeypatch, with_broken_route) as loop:
        for number in ("650", "660"):
            assert loop.send(_referral(f"RGH-{number}-X", f"R-{number}", replace=CANCEL)) == "AA"
            assert _message(loop, f"RGH-{number}-X").status == "failed"
            assert loop.send(_referral(f"RGH-{number}", f"R-{number}")) == "AA"
            _message(loop, f"RGH-{number}")
            assert _referral_of(loop, f"RIVERSIDE_GH|R-{number}").status == "cancelled"
        store = loop.running.store
        plain, broken = _message(loop, "RGH-650-X"), _message(loop, "RGH-660-X")
        wait_for(lambda: store.get(plain.id).status == "delivered", what="the plain cancel")
        before = _history(store, broken.id)
        for _ in range(2):
            loop.running.hub.table.tick(datetime.now(UTC))
        assert store.get(broken.id).status == "failed"
        detail = store.get(broken.id).detail or ""
        assert "cancel-audit: step 0 (transform)" in detail
        assert _history(store, broken.id) == before
        assert "routed" not in [event for event, _ in before]
