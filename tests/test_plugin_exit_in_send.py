"""A plugin whose code raises SystemExit (a vendor SDK calling sys.exit()) or KeyboardInterrupt
inside a channel's send() or a route step: that attempt or step fails, named in the log with
its channel and plugin, and the hub goes on. SIGINT and SIGTERM sent to `carehub serve` still
stop it, exit 0."""

from __future__ import annotations

import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from carehub.testing import make_adt, mllp_exchange, run_routes
from tests.helpers_cli import CAREHUB, environment
from tests.helpers_http import CarehubProcess, wait_for

#: A channel whose send() raises ``exits`` (SystemExit(3) or KeyboardInterrupt) on the first
#: attempt of each message, then writes the payload to ``directory`` and succeeds.
EXITING_PLUGIN = """
import sys
from pathlib import Path

from carehub import hookimpl
from carehub.components import Channel, ComponentOptions, Outgoing


class Exiting(Channel):
    name = "exiting"

    class Options(ComponentOptions):
        directory: str
        exits: str

    def __init__(self, options, context):
        super().__init__(options, context)
        self.seen = set()

    def render(self, work, key):
        return Outgoing(work.view.get("MSH-10").encode(), "text/plain", key)

    async def send(self, outgoing):
        if outgoing.payload not in self.seen:
            self.seen.add(outgoing.payload)
            if self.options.exits == "SystemExit":
                sys.exit(3)
            raise KeyboardInterrupt
        Path(self.options.directory, outgoing.payload.decode()).write_bytes(b"sent")
        return "ok"


@hookimpl
def carehub_register_channels(register):
    register(Exiting)
"""

#: A translator that calls sys.exit() as a vendor SDK does on an error it deems fatal.
EXITING_STEP_PLUGIN = """
import sys

from carehub import hookimpl
from carehub.components import Translator


class ExitingStep(Translator):
    name = "exiting-step"

    def translate(self, work):
        sys.exit(4)


@hookimpl
def carehub_register_translators(register):
    register(ExitingStep)
"""


def serve_project(folder: Path, exits: str) -> tuple[Path, Path]:
    """carehub.yaml (returned, with the folder the channel writes to) for one route
    forwarding every message to the exiting channel, retried quickly."""
    (folder / "plugins").mkdir(parents=True)
    (folder / "plugins" / "exiting.py").write_text(EXITING_PLUGIN, encoding="utf-8")
    sent = folder / "sent"
    sent.mkdir()
    (folder / "routes.yaml").write_text(
        textwrap.dedent(
            f"""\
            routes:
              - name: r
                steps:
                  - forward:
                      channel: exiting
                      directory: {sent}
                      exits: {exits}
                      retry: {{max_attempts: 3, initial_delay: 0.1, jitter: 0}}
            """
        ),
        encoding="utf-8",
    )
    config = folder / "carehub.yaml"
    config.write_text(
        "routes: [routes.yaml]\n"
        "plugins_dir: plugins\n"
        "listeners:\n"
        "  mllp: [{name: adt, host: 127.0.0.1, port: 0}]\n"
        "  http: {host: 127.0.0.1, port: 0}\n"
        "worker: {poll_interval: 0.05}\n",
        encoding="utf-8",
    )
    return config, sent


@pytest.mark.parametrize("exits", ["SystemExit", "KeyboardInterrupt"])
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_an_exit_raised_in_send_is_a_failed_attempt_and_serve_goes_on(
    tmp_path: Path, exits: str, stop: int
) -> None:
    config, sent = serve_project(tmp_path / "project", exits)
    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]
    with CarehubProcess(args, tmp_path / "logs", "serve") as hub:
        hub.wait_ready()
        for control_id in ("EX-1", "EX-2"):
            (ack,) = mllp_exchange(hub.mllp_address, [make_adt(control_id).encode()])
            assert b"MSA|AA|" in ack
        # Each message's first attempt raised; the retry delivered it, in the same process.
        wait_for(
            lambda: {p.name for p in sent.iterdir()} == {"EX-1", "EX-2"},
            30,
            0.05,
            "both messages delivered on their second attempt",
        )
        assert hub.process.poll() is None, hub.stderr
        with socket.create_connection(hub.mllp_address, timeout=10):
            pass  # still listening
        output = hub.stdout + hub.stderr
        raised = "SystemExit(3)" if exits == "SystemExit" else "KeyboardInterrupt"
        assert f"send() of channel 'exiting' (plugin 'exiting') raised {raised}" in output
        # The process's own stop signal still stops it, cleanly.
        hub.process.send_signal(stop)
        assert hub.process.wait(60) == 0, output
    output = hub.stdout + hub.stderr
    assert "carehub stopping" in output
    assert "Traceback" not in output


def test_an_exit_raised_in_a_step_fails_its_route_only(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "exitstep.py").write_text(EXITING_STEP_PLUGIN, encoding="utf-8")
    (tmp_path / "routes.yaml").write_text(
        "routes:\n"
        "  - name: exits\n"
        "    steps: [{translate: exiting-step}]\n"
        "  - name: goes-on\n"
        "    steps: [{translate: v2-to-event}]\n",
        encoding="utf-8",
    )
    config = tmp_path / "carehub.yaml"
    config.write_text("routes: [routes.yaml]\nplugins_dir: plugins\n", encoding="utf-8")

    result = run_routes(make_adt("EX-3"), config, tmp_path / "data")

    exits, goes_on = result.routes
    assert exits.error is not None
    assert "step translate exiting-step (plugin 'exitstep') raised SystemExit(4)" in exits.error
    assert goes_on.error is None
    assert [s.outcome for s in goes_on.steps] == ["ok"]


#: A translator that takes its time, so a Ctrl-C comes while a route runs.
SLOW_STEP_PLUGIN = """
import time

from carehub import hookimpl
from carehub.components import Translator


class Slow(Translator):
    name = "slow-step"

    def translate(self, work):
        time.sleep(0.5)
        return None


@hookimpl
def carehub_register_translators(register):
    register(Slow)
"""


def test_one_ctrl_c_stops_routes_test_at_once(tmp_path: Path) -> None:
    """A Ctrl-C while `carehub routes test` runs a step is the operator's, not a plugin's:
    it stops the command, rather than failing one step and going on with the rest."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "slow.py").write_text(SLOW_STEP_PLUGIN, encoding="utf-8")
    (tmp_path / "routes.yaml").write_text(
        "routes:\n  - name: slow\n    steps: [{translate: slow-step}]\n", encoding="utf-8"
    )
    config = tmp_path / "carehub.yaml"
    config.write_text("routes: [routes.yaml]\nplugins_dir: plugins\n", encoding="utf-8")
    feed = tmp_path / "feed.hl7"
    feed.write_text("".join(make_adt(f"SLOW-{n}") for n in range(40)), encoding="utf-8")
    process = subprocess.Popen(
        [*CAREHUB, "routes", "test", str(feed), "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    try:
        time.sleep(3.0)  # started, and some way through the 20 s of steps
        process.send_signal(signal.SIGINT)
        began = time.monotonic()
        process.communicate(timeout=30)
        stopped_in = time.monotonic() - began
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert stopped_in < 3.0, stopped_in
