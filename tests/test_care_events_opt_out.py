"""The shipped configuration and a patient's opt-out: a patient the roster marks opted out, or
whose message says PD1-12 = Y, is told to nobody outside carehub, the care-coordination
platform's webhook included, as the FHIR notifications and the care team's emails and texts
already are. A copy of config/ on a real hub, with aiosmtpd and an HTTP stand-in for every
destination it names; the feeds are sent over MLLP."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from carehub.config import load_config
from carehub.store.outbox import Outbox
from carehub.testing import HubThread, mllp_exchange
from tests.helpers_http import HTTPServer, on_this_host, wait_for
from tests.helpers_smtp import Mailbox, free_port
from tests.test_care_e2e import CONFIG, point_sample_at

#: The roster's opted-out patient (config/care/roster.csv), registered in the ED.
ROSTER_OPT_OUT = (CONFIG / "feeds" / "15-riverside-ed-opted-out.hl7").read_bytes()
#: A rostered patient who says at registration not to be notified (PD1-12 = Y).
MESSAGE_OPT_OUT = (
    "\r".join(
        [
            "MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|20261126090000-0500||ADT^A04^ADT_A01"
            "|RGH-OPT-1|P|2.5.1",
            "EVN|A04|20261126090000-0500",
            "PID|1||RG100234^^^RGH^MR||Okafor^Amara^N||19580312|F",
            "PD1||||||||||||Y",  # PD1-12: Y
            "PV1|1|E|ED^ED03^01^RIVERSIDE_GH||||1497758544^Moreau^Celine^^^Dr^^^NPI"
            "||||||||||||V20261126-0009^^^RGH^VN" + "|" * 25 + "20261126085500-0500",
        ]
    )
    + "\r"
).encode()
#: Told as usual: the same patient's next visit, with no opt-out.
NOT_OPTED_OUT = (
    MESSAGE_OPT_OUT.replace(b"PD1||||||||||||Y", b"PD1||||||||||||N")
    .replace(b"RGH-OPT-1", b"RGH-OPT-2")
    .replace(b"V20261126-0009", b"V20261126-0010")
)


@pytest.fixture
def hub_and_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[HubThread, HTTPServer, Path]]:
    for name in ("CAREHUB_CONFIG", "CAREHUB_DATA_DIR", "CAREHUB_STORE_URL", "CAREHUB_HTTP_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "config"
    shutil.copytree(CONFIG, folder)
    smtp = Controller(Mailbox(), hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        with HTTPServer(respond=lambda _: 202) as http:
            outbox = tmp_path / "outbox"
            point_sample_at(monkeypatch, folder, smtp.port, http, outbox)
            config = on_this_host(load_config(folder / "carehub.yaml"))
            with HubThread(config, tmp_path / "data") as running:
                yield running, http, outbox
    finally:
        smtp.stop()


def settle(running: HubThread) -> None:
    outbox = Outbox(running.store)
    wait_for(lambda: not outbox.unfinished(), 30, 0.05, "routing and delivery to finish")


def test_opted_out_patients_reach_no_care_platform_and_stay_in_the_internal_archive(
    hub_and_servers: tuple[HubThread, HTTPServer, Path],
) -> None:
    running, http, outbox = hub_and_servers
    mllp_exchange(running.mllp_address, [ROSTER_OPT_OUT, MESSAGE_OPT_OUT, NOT_OPTED_OUT])
    settle(running)

    posted = [r.json for r in http.requests if r.path == "/care-events"]
    told = [(p["control_id"], p["event"]["kind"]) for p in posted]
    assert told == [("RGH-OPT-2", "ed_registration")], told
    archived = sorted(
        json.loads(path.read_text("utf-8"))["message_control_id"]
        for path in (outbox / "care-events").glob("*.json")
    )
    assert archived == ["RGH-000401", "RGH-OPT-1", "RGH-OPT-2"]


def test_opted_out_is_known_only_after_a_care_team_step(tmp_path: Path) -> None:
    """A filter that tests opted_out before any care-team step (or a route's own when) is a
    config error naming the file, line and step, as transition before encounter-state is."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "routes:\n"
        "  - name: platform\n"
        "    when: {type: ADT}\n"
        "    steps:\n"
        "      - filter: {opted_out: false}\n"
        "      - forward: {channel: file, name: out, directory: out}\n",
        encoding="utf-8",
    )
    config = tmp_path / "carehub.yaml"
    config.write_text("routes: [routes.yaml]\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "carehub.cli", "routes", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout
    assert f"{routes}:5" in done.stderr
    assert "opted_out is what a care-team step finds" in done.stderr
