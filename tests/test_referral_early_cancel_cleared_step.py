"""An early cancel (REF^I14 before its REF^I12) settled once its referral came: the step that
raised its problem is marked cleared (`messages show` says so, with the error it had), and a
dead letter of the same message retried later delivers it rather than failing it again for
the problem dealt with. The shipped config on a real hub over MLLP, with an aiosmtpd server and
a FHIR test server; the `carehub` command line against its store."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from carehub.cli import main
from carehub.config import HubConfig
from carehub.store.outbox import Outbox
from tests.helpers_http import wait_for
from tests.test_rabbitmq import pg_url
from tests.test_referral_early_cancel_message_status import store_setting
from tests.test_referral_early_updates import ANSI, CANCEL, _message, _referral_of
from tests.test_referral_recipients import Loop, _referral, referral_loop

__all__ = ["pg_url", "store_setting"]  # fixtures: the store, SQLite or PostgreSQL

STEP = "enrich referral-state"
DESK_COPY = """          name: referral-updates
          directory: ${CAREHUB_OUTBOX:-${CAREHUB_DATA_DIR}/outbox}/referrals
          body: event
"""


def _cli(loop: Loop, *args: str) -> str:
    """`carehub ARGS` against the running hub's store (its data dir, or its PostgreSQL)."""
    hub = loop.running.hub
    assert hub.config.source is not None
    url = hub.config.store.url  # the PostgreSQL run's, set on the config, not in its file
    env = {"COLUMNS": "240", **({"CAREHUB_STORE_URL": url} if url else {})}
    result = CliRunner(env=env).invoke(
        main,
        [*args, "--config", str(hub.config.source), "--data-dir", str(hub.data_dir)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.output)


def _steps(loop: Loop, message_id: int) -> list[tuple[str, str, str]]:
    """(route, outcome, output) of the referral-state steps `messages show --json` lists."""
    shown = json.loads(_cli(loop, "messages", "show", str(message_id), "--json"))
    return [
        (s["route"], s["outcome"], str(s["output"]))
        for s in shown["steps"]
        if str(s["step"]).endswith("referral-state")
    ]


def test_the_step_an_early_cancel_failed_is_shown_cleared_once_applied(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store_setting: Callable[[HubConfig], None],
) -> None:
    with referral_loop(tmp_path, monkeypatch, store_setting) as loop:
        assert loop.send(_referral("RGH-710-X", "R-710", replace=CANCEL)) == "AA"
        cancel = _message(loop, "RGH-710-X")
        ((route, outcome, output),) = _steps(loop, cancel.id)
        assert (route, outcome) == ("referral-changes", "error")
        assert "REF^I14 not tracked" in output

        assert loop.send(_referral("RGH-710", "R-710")) == "AA"
        store = loop.running.store
        wait_for(lambda: store.get(cancel.id).status == "delivered", what="the cancel settled")
        ((route, outcome, output),) = _steps(loop, cancel.id)
        assert (route, outcome) == ("referral-changes", "cleared")
        assert "REF^I14 not tracked" in output  # what it was cleared of
        shown = " ".join(_cli(loop, "messages", "show", str(cancel.id)).split())
        assert f"referral-changes #1 {STEP}: cleared" in shown


def test_an_early_cancel_settled_with_a_dead_letter_is_delivered_once_it_is_retried(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store_setting: Callable[[HubConfig], None],
) -> None:
    """Its desk copy died while the folder was unusable: settled, it is failed for that dead
    letter alone, and once the copy is retried and written, it is delivered."""

    def one_attempt_for_the_desk(config: HubConfig) -> None:
        store_setting(config)
        assert config.source is not None
        path = config.source.parent / "routes" / "referrals.yaml"
        text = path.read_text(encoding="utf-8")
        assert DESK_COPY in text
        path.write_text(
            text.replace(DESK_COPY, DESK_COPY + "          retry: {max_attempts: 1}\n"),
            encoding="utf-8",
        )

    with referral_loop(tmp_path, monkeypatch, one_attempt_for_the_desk) as loop:
        folder = tmp_path / "outbox" / "referrals"
        shutil.rmtree(folder)
        folder.write_text("not a folder")  # every file copy fails until it is one again

        assert loop.send(_referral("RGH-720-X", "R-720", replace=CANCEL)) == "AA"
        cancel = _message(loop, "RGH-720-X")
        assert cancel.status == "failed"
        outbox = Outbox(loop.running.store)

        def dead() -> list[int]:
            return [
                d.id
                for d in outbox.find(limit=None)
                if d.message_id == cancel.id and d.status == "dead"
            ]

        (letter,) = wait_for(dead, what="the cancel's desk copy dead")

        assert loop.send(_referral("RGH-720", "R-720")) == "AA"
        assert _referral_of(loop, "RIVERSIDE_GH|R-720").status == "cancelled"
        store = loop.running.store
        wait_for(
            lambda: any(e.event == "routed" for e in store.history(cancel.id)[1:]),
            what="the cancel applied",
        )
        settled = store.get(cancel.id)
        assert settled.status == "failed"
        assert settled.detail is not None and "dead letter" in settled.detail
        assert "not tracked" not in settled.detail

        folder.unlink()
        folder.mkdir()
        _cli(loop, "dead-letters", "retry", str(letter))
        wait_for(lambda: store.get(cancel.id).status != "routed", what="the retry finished")
        done = store.get(cancel.id)
        assert (done.status, done.detail) == ("delivered", "1 of 2 had nothing to send")
        ((_, outcome, _),) = _steps(loop, cancel.id)
        assert outcome == "cleared"
