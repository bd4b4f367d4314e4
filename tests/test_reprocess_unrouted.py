"""`messages reprocess` of a message no route took, and of one refused at intake. An unrouted
message reprocessed once a route for it is added is routed for real: a reprocess run in its
steps and history, its delivery made by the running hub, and the command's counts and audit
row say what was recorded. A message refused (AE) is left as it is, with why, as a rejected
one is: only a message accepted at intake is routed. Real `carehub serve`, real MLLP, every
command run as its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from carehub.config import load_config
from carehub.hub import open_store
from carehub.testing import make_adt, mllp_exchange
from tests.helpers_http import CarehubProcess, wait_for

HUB_YAML = """
listeners:
  mllp: [{name: test, host: 127.0.0.1, port: 0}]
  http: {enabled: false}
worker: {poll_interval: 0.05}
routes: [%s]
"""

ADT_ROUTE = """
routes:
  - name: adt-archive
    when: {type: ADT}
    steps:
      - forward: {channel: file, directory: out/adt}
"""

VXU_ROUTE = """
routes:
  - name: vxu-archive
    when: {type: VXU}
    steps:
      - forward: {channel: file, directory: out/vxu}
"""

VXU = "\r".join(
    [
        "MSH|^~\\&|EHR|CLINIC|IIS|STATE|20260624084727||VXU^V04^VXU_V04|VXU-0001|P|2.5.1",
        "PID|1||IZ9001^^^CLINIC^MR||TESTCHILD^SAM||20200615|F",
        "RXA|0|1|20260624||08^HepB^CVX|0.5|mL",
    ]
)


@dataclass
class Hub:
    """A running `carehub serve` and the files it works from."""

    folder: Path
    config: Path
    data_dir: Path
    serve: CarehubProcess

    def carehub(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A carehub command on this hub's config and data dir, as its own process."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAREHUB_")}
        hub_options = ["--config", str(self.config), "--data-dir", str(self.data_dir)]
        return subprocess.run(
            [sys.executable, "-m", "carehub.cli", *args, *hub_options],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env=env,
            check=False,
        )

    def send(self, text: str) -> bytes:
        (answer,) = mllp_exchange(self.serve.mllp_address, [text.encode()])
        return answer

    def shown(self, message_id: int) -> dict[str, Any]:
        """`messages show --json`: the message, its history, steps and deliveries."""
        shown = self.carehub("messages", "show", str(message_id), "--json")
        assert shown.returncode == 0, shown.stderr
        return json.loads(shown.stdout)

    def status(self, message_id: int) -> str:
        """Read from the store in this process: quick enough to wait on."""
        store = open_store(load_config(self.config), self.data_dir, must_exist=True)
        try:
            message = store.get(message_id)
            return message.status if message else "not stored"
        finally:
            store.close()

    def recorded(self, message_id: int) -> tuple[list[str], list[int], list[int]]:
        """The message's history (statuses entered), its steps' runs, its deliveries' runs."""
        shown = self.shown(message_id)
        return (
            [change["event"] for change in shown["history"]],
            [step["run"] for step in shown["steps"]],
            [delivery["run"] for delivery in shown["deliveries"]],
        )

    def last_audit_row(self) -> dict[str, object]:
        listed = self.carehub("audit", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        # Reading a message is audited too; the row wanted is the latest change made.
        return next(r for r in rows if r["command"] != "messages show")

    def files_in(self, folder: str) -> list[Path]:
        found = self.folder / folder
        return sorted(found.iterdir()) if found.is_dir() else []


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    """`carehub serve` with one route, for ADT messages: a VXU matches none."""
    (tmp_path / "adt.yaml").write_text(ADT_ROUTE, encoding="utf-8")
    config = tmp_path / "carehub.yaml"
    config.write_text(HUB_YAML % "adt.yaml", encoding="utf-8")
    data_dir = tmp_path / "data"
    args = ["serve", "--config", str(config), "--data-dir", str(data_dir)]
    with CarehubProcess(args, tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        yield Hub(tmp_path, config, data_dir, serve)
        assert serve.terminate() == 0, serve.stderr


def test_an_unrouted_message_is_routed_once_a_route_for_it_is_added(hub: Hub) -> None:
    assert b"MSA|AA|VXU-0001" in hub.send(VXU)
    wait_for(lambda: hub.status(1) == "unrouted", what="no route took the VXU")
    assert hub.recorded(1) == (["received", "unrouted"], [], [])

    # The interface analyst adds a route for it, and the hub takes it.
    (hub.folder / "vxu.yaml").write_text(VXU_ROUTE, encoding="utf-8")
    hub.config.write_text(HUB_YAML % "adt.yaml, vxu.yaml", encoding="utf-8")
    reload = hub.carehub("routes", "reload")
    assert reload.returncode == 0, reload.stdout + reload.stderr

    done = hub.carehub(
        "messages", "reprocess", "--status", "unrouted", "--type", "VXU", "--yes", "--by", "ia"
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "message 1 (run 2): vxu-archive; 1 deliveries queued" in done.stdout
    wait_for(lambda: hub.status(1) == "delivered", what="the VXU delivered")
    (written,) = hub.files_in("out/vxu")
    assert "VXU^V04" in written.read_text(encoding="utf-8")
    history, steps, made = hub.recorded(1)
    assert history == ["received", "unrouted", "routed", "delivered"]
    assert steps and set(steps) == {2}
    assert made == [2]
    row = hub.last_audit_row()
    assert (row["command"], row["actor"], row["outcome"]) == ("messages reprocess", "ia", "ok")
    assert row["counts"] == {"messages": 1, "deliveries": 1, "skipped": 0, "failed": 0}

    # Reprocessed again, it goes out again under a new run (and a new key), once.
    again = hub.carehub("messages", "reprocess", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "message 1 (run 3): vxu-archive; 1 deliveries queued" in again.stdout
    wait_for(lambda: len(hub.files_in("out/vxu")) == 2, what="the VXU sent again")
    assert hub.recorded(1)[2] == [2, 3]


def test_a_message_refused_at_intake_is_left_as_it_is_and_says_why(hub: Hub) -> None:
    """Its content was refused (no MSH-10): the sender was told to correct it and send it
    again, so routing the stored copy would send the message a second time."""
    assert b"MSA|AE|" in hub.send(make_adt("", patient_id="P1"))
    wait_for(lambda: hub.status(1) == "refused", what="the ADT refused")

    done = hub.carehub("messages", "reprocess", "1", "--by", "ia")

    assert done.returncode == 1, done.stdout + done.stderr
    assert (
        "message 1: refused at intake (ACK AE: MSH-10 (message control ID) is empty), so it "
        "is not routed: only a message accepted (AA) is" in done.stderr
    )
    assert "deliveries queued" not in done.stdout
    assert "out of order" not in done.stderr
    assert hub.status(1) == "refused"
    assert hub.recorded(1) == (["refused"], [], [])
    row = hub.last_audit_row()
    assert row["outcome"] == "partial"
    assert row["counts"] == {"messages": 0, "deliveries": 0, "skipped": 1, "failed": 0}

    dry_run = hub.carehub("messages", "reprocess", "--status", "refused", "--dry-run")
    assert dry_run.returncode == 0, dry_run.stderr
    assert (
        "dry run: 0 message(s) would be reprocessed, 1 left as they are (refused or rejected "
        "at intake); nothing changed" in dry_run.stdout
    )
    by_status = hub.carehub("messages", "reprocess", "--status", "refused", "--yes")
    assert by_status.returncode == 1
    assert "refused at intake" in by_status.stderr
    assert hub.recorded(1) == (["refused"], [], []) and hub.files_in("out/adt") == []
