"""A delivery that goes on failing is given up on after a time, not after a handful of
attempts: with no limit written a forward retries for a day, so a receiving system down for a
maintenance window gets its backlog when it is back instead of a dead-letter queue an operator
must retry by hand. ``give_up_after`` sets the span; ``max_attempts`` written alone keeps its
meaning. A real hub sends to a real HTTP receiver that answers 503; the operator's side is
the real CLI."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from carehub.cli import main
from carehub.components import ComponentContext
from carehub.config import load_config
from carehub.plugins import PluginHost
from carehub.routing.config import RetryPolicy, load_route_files
from carehub.routing.table import bind_routes
from carehub.store.outbox import Outbox
from carehub.testing import HubThread
from tests import test_store
from tests.helpers_http import HTTPServer, wait_for
from tests.test_dead_letter_order import adt, cli, delivery_of, hub_config, statuses
from tests.test_retry_limit_follows_routes import first_attempt_failed, shown
from tests.test_worker import send

store_url = test_store.store_url

#: Attempts every 0.3 s for 2 s, then a dead letter.
TWO_SECONDS = "{give_up_after: 2, initial_delay: 0.3, multiplier: 1, max_delay: 0.3, jitter: 0}"
#: A second attempt only after 3 s: time to reload between the first and it.
SLOW = "{give_up_after: 1h, initial_delay: 3, multiplier: 1, max_delay: 3, jitter: 0}"
#: Long waits, and a time limit shorter than the next wait: the last attempt is at the limit.
LONG_WAITS_SHORT_LIMIT = "{give_up_after: 2, initial_delay: 60, max_delay: 60, jitter: 0}"


def test_the_default_retries_for_a_day_and_max_attempts_alone_keeps_its_meaning() -> None:
    assert (RetryPolicy().max_attempts, RetryPolicy().give_up_seconds) == (0, 86_400)
    assert not RetryPolicy().forever
    written = RetryPolicy.model_validate({"max_attempts": 8})
    assert (written.max_attempts, written.give_up_seconds) == (8, 0)
    assert RetryPolicy.model_validate({"max_attempts": "forever"}).forever
    both = RetryPolicy.model_validate({"max_attempts": 5, "give_up_after": "30m"})
    assert (both.max_attempts, both.give_up_seconds) == (5, 1800)
    assert RetryPolicy.model_validate({"give_up_after": "3d"}).give_up_seconds == 3 * 86_400
    assert RetryPolicy.model_validate({"give_up_after": "forever"}).forever


@pytest.mark.parametrize(
    ("written", "told"),
    [("soon", "use a span such as 90s, 30m, 24h or 3d"), ("-5", "must be 0 or more")],
)
def test_a_give_up_after_that_is_not_a_span_is_a_config_error_naming_the_key(
    tmp_path: Path, written: str, told: str
) -> None:
    (tmp_path / "routes.yaml").write_text(
        "routes:\n"
        "  - name: ehr\n"
        "    steps:\n"
        "      - forward: {channel: webhook, url: 'http://x', "
        f"retry: {{give_up_after: {written}}}}}\n",
        encoding="utf-8",
    )
    config = tmp_path / "carehub.yaml"
    config.write_text("routes: [routes.yaml]\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["routes", "check", "--offline", "--config", str(config)])
    assert result.exit_code != 0
    assert "retry.give_up_after" in result.output and told in result.output


def test_a_delivery_is_a_dead_letter_once_it_has_failed_for_give_up_after(
    tmp_path: Path, store_url: str
) -> None:
    with HTTPServer(lambda _: 503) as receiver:
        config = hub_config(tmp_path, receiver.url(), TWO_SECONDS, store_url)
        data_dir = tmp_path / "data"
        with HubThread(load_config(config), data_dir) as hub:
            send(hub, [adt("RGH-G-0001", "A01")])
            wait_for(lambda: first_attempt_failed(hub), what="the first attempt to fail")
            waiting = delivery_of(hub.store, "RGH-G-0001")
            assert waiting.failing_since is not None and waiting.give_up_after == 2
            listed = cli(config, data_dir, "messages", "show", str(waiting.message_id))
            deadline = waiting.failing_since + timedelta(seconds=2)
            assert f"gives up at {deadline:%Y-%m-%d %H:%M} UTC" in listed.output

            wait_for(
                lambda: statuses(hub.store)["RGH-G-0001"] == "dead",
                what="a dead letter",
                timeout=10,
            )
            dead = delivery_of(hub.store, "RGH-G-0001")
            # Every 0.3 s for 2 s: about seven attempts, where no count limit was written.
            assert 5 <= dead.attempts <= 9, dead.attempts
            assert len(receiver.requests) == dead.attempts
            attempts = Outbox(hub.store).attempts(dead.id)
            run = attempts[-1].started_at - attempts[0].started_at
            assert timedelta(seconds=1.9) <= run <= timedelta(seconds=3), run
            assert dead.failing_since == waiting.failing_since

            retried = cli(config, data_dir, "dead-letters", "retry", str(dead.id))
            assert retried.exit_code == 0, retried.output
            receiver.respond = lambda _: 200
            wait_for(lambda: statuses(hub.store)["RGH-G-0001"] == "delivered", what="delivered")


def test_the_last_attempt_is_made_when_the_time_is_up_not_a_whole_delay_later(
    tmp_path: Path,
) -> None:
    with HTTPServer(lambda _: 503) as receiver:
        config = hub_config(tmp_path, receiver.url(), LONG_WAITS_SHORT_LIMIT)
        with HubThread(load_config(config), tmp_path / "data") as hub:
            began = time.monotonic()
            send(hub, [adt("RGH-G-0002", "A01")])
            wait_for(
                lambda: statuses(hub.store).get("RGH-G-0002") == "dead",
                what="a dead letter",
                timeout=15,
            )
            assert time.monotonic() - began < 15  # not after the 60 s delay
            assert delivery_of(hub.store, "RGH-G-0002").attempts == 2


def test_a_reload_that_shortens_give_up_after_applies_to_the_delivery_waiting(
    tmp_path: Path,
) -> None:
    with HTTPServer(lambda _: 503) as receiver:
        config = hub_config(tmp_path, receiver.url(), SLOW)
        data_dir = tmp_path / "data"
        with HubThread(load_config(config), data_dir) as hub:
            send(hub, [adt("RGH-G-0003", "A01")])
            wait_for(lambda: first_attempt_failed(hub), what="the first attempt to fail")
            message_id = delivery_of(hub.store, "RGH-G-0003").message_id
            assert shown(config, data_dir, message_id)["give_up_after"] == 3600

            hub_config(tmp_path, receiver.url(), TWO_SECONDS)
            assert hub.call(hub.hub.reload_routes()) is True
            assert shown(config, data_dir, message_id)["give_up_after"] == 2
            wait_for(
                lambda: statuses(hub.store)["RGH-G-0003"] == "dead",
                what="a dead letter",
                timeout=10,
            )


@pytest.mark.parametrize(
    ("retry", "limits"),
    [
        ("", (0, 86_400)),
        ("retry: {max_attempts: 3}", (3, 0)),
        ("retry: {give_up_after: 2h}", (0, 7200)),
    ],
)
def test_a_notify_steps_channels_keep_the_retry_limits_as_written(
    tmp_path: Path, retry: str, limits: tuple[int, int]
) -> None:
    """A notify step hands its one ``retry:`` to each channel's destination: what it leaves
    unwritten stays unwritten there, so the day's default is not lost on the way."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "routes:\n"
        "  - name: tell\n"
        "    steps:\n"
        "      - notify:\n"
        "          channels:\n"
        "            sms: {channel: sms, url: 'https://sms.example.org/send'}\n"
        f"          {retry}\n",
        encoding="utf-8",
    )
    table = bind_routes(
        load_route_files([routes]),
        PluginHost().load(),
        ComponentContext(tmp_path, tmp_path / "data"),
    )
    [destination] = table.destinations.values()
    assert (destination.retry.max_attempts, destination.retry.give_up_seconds) == limits
