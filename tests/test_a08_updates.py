"""An A08 that changes the patient's or the visit's details is ``updated``, naming what changed;
one that repeats what is known is ``none``. A copy of the shipped config/ on a real hub, fed
over MLLP, with aiosmtpd for the care team's email and an HTTP stand-in for the care platform's
webhook and FHIR endpoint: the platform hears of a new name, attending or unit, and the PCP is
not emailed of it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner
from sqlalchemy import select

from carehub.cli import main
from carehub.config import load_config
from carehub.hl7.ack import read_ack
from carehub.store.outbox import Outbox
from carehub.store.schema import messages, notifications
from carehub.testing import HubThread, mllp_exchange
from tests.helpers_http import HTTPServer, on_this_host, wait_for
from tests.helpers_smtp import Mailbox, free_port
from tests.test_care_e2e import CONFIG, point_sample_at

PCP = "lindqvist@springfield-fp.example.org"  # the roster's PCP of RG100234
MSH = "MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|{time}||ADT^{event}^ADT_A01|{cid}|P|2.5.1"
PID = "PID|1||RG100234^^^RGH^MR||{name}||19580312|F|||418 Birch Lane^^Springfield^IL^62704^USA"
PD1 = "PD1|||Springfield Family Practice^^^^^^^^^1306849450|1306849450^Lindqvist^Erik^^^Dr^^^NPI"
PV1 = (
    "PV1|1|I|{unit}^{room}^A^RIVERSIDE_GH||||{attending}|||MED|||||||"
    "1184629371^Haddad^Samir^^^Dr^^^NPI|IP|V20261124-0901^^^RGH^VN"
    + "|" * 25
    + "20261124081200-0500"
)
MOREAU = "1497758544^Moreau^Celine^^^Dr^^^NPI"
CHECK = (sys.executable, "-m", "carehub.cli", "routes", "check", "--offline")


def adt(
    event: str,
    cid: str,
    time: str,
    *,
    name: str = "Okafor^Amara^N",
    unit: str = "4W",
    room: str = "412",
    attending: str = MOREAU,
    phone: str = "",
) -> bytes:
    """A synthetic A01 or A08 for one visit of the roster's patient RG100234."""
    pid = PID.format(name=name) + (f"||{phone}" if phone else "")
    segments = [
        MSH.format(time=time, event=event, cid=cid),
        f"EVN|{event}|{time}",
        pid,
        PD1,
        PV1.format(unit=unit, room=room, attending=attending),
        "DG1|1||I21.4^Non-ST elevation myocardial infarction^I10||20261124|A",
    ]
    return ("\r".join(segments) + "\r").encode()


ADMIT = adt("A01", "UPD-001", "20261124103000-0500")


@dataclass
class Hub:
    running: HubThread
    http: HTTPServer
    mailbox: Mailbox
    config_path: Path
    data_dir: Path

    def send(self, *payloads: bytes) -> None:
        answers = mllp_exchange(self.running.mllp_address, payloads)
        assert [read_ack(a.decode())[0] for a in answers] == ["AA"] * len(payloads)
        outbox = Outbox(self.running.store)
        wait_for(lambda: not outbox.unfinished(), 30, 0.05, "routing and delivery to finish")

    def platform(self) -> list[dict[str, Any]]:
        """What the care platform's webhook received, in order."""
        return [r.json for r in self.http.requests if r.path == "/care-events"]

    def fhir(self) -> list[dict[str, Any]]:
        return [r.json for r in self.http.requests if r.path.endswith("$process-message")]

    def message_id(self, control_id: str) -> int:
        with self.running.store.engine.connect() as conn:
            found = conn.execute(
                select(messages.c.id).where(messages.c.control_id == control_id)
            ).scalar()
        assert found is not None, control_id
        return int(found)

    def notifications_of(self, control_id: str) -> list[dict[str, Any]]:
        message_id = self.message_id(control_id)
        with self.running.store.engine.connect() as conn:
            rows = conn.execute(
                select(notifications).where(notifications.c.message_id == message_id)
            )
            return [dict(r._mapping) for r in rows]

    def cli(self, *args: str) -> str:
        result = CliRunner().invoke(
            main,
            [*args, "--config", str(self.config_path), "--data-dir", str(self.data_dir)],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        return result.output


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    """The hub on a copy of config/, pointed at local servers, nothing sent yet."""
    for name in ("CAREHUB_CONFIG", "CAREHUB_DATA_DIR", "CAREHUB_STORE_URL", "CAREHUB_HTTP_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "config"
    shutil.copytree(CONFIG, folder)
    box = Mailbox()
    smtp = Controller(box, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        with HTTPServer(respond=lambda _: 202) as http:
            point_sample_at(monkeypatch, folder, smtp.port, http, tmp_path / "outbox")
            config_path = folder / "carehub.yaml"
            config = on_this_host(load_config(config_path))
            with HubThread(config, tmp_path / "data") as running:
                yield Hub(running, http, box, config_path, tmp_path / "data")
    finally:
        smtp.stop()


def test_an_a08_changing_name_attending_and_unit_reaches_the_platform_as_updated(
    hub: Hub,
) -> None:
    hub.send(ADMIT)
    assert [m.subject for m in hub.mailbox.mails if m.to == PCP] == [
        "Admission at Riverside General Hospital"
    ]
    fhir_before = len(hub.fhir())

    update = adt(
        "A08",
        "UPD-002",
        "20261124120000-0500",
        name="Okafor-Smith^Amara^N",
        unit="5E",
        room="501",
        attending="1111111112^Newdoc^Ann^^^Dr^^^NPI",
    )
    hub.send(update)

    told = {p["control_id"]: p for p in hub.platform()}
    assert list(told) == ["UPD-001", "UPD-002"]
    assert told["UPD-001"]["transition"] == {"kind": "admission", "state": "admitted"}
    assert told["UPD-002"]["transition"] == {
        "kind": "updated",
        "state": "admitted",
        "changed": ["patient.name", "encounter.location", "encounter.attending"],
    }
    assert told["UPD-002"]["event"]["patient"]["name"]["family"] == "Okafor-Smith"
    # Nobody on the care team is told of an update, and no FHIR notification goes for it.
    assert [m.subject for m in hub.mailbox.mails if m.to == PCP] == [
        "Admission at Riverside General Hospital"
    ]
    assert hub.notifications_of("UPD-002") == []
    assert len(hub.fhir()) == fhir_before
    # The visit is in the new unit, and its timeline names what changed.
    (visit,) = [json.loads(line) for line in hub.cli("encounters", "list", "--json").splitlines()]
    assert (visit["state"], visit["location"]) == ("admitted", "5E/501/A")
    shown = json.loads(hub.cli("encounters", "show", str(visit["id"]), "--json"))
    assert [(e["control_id"], e["transition"], e["note"]) for e in shown["timeline"]] == [
        ("UPD-001", "admission", None),
        ("UPD-002", "updated", "changed: patient.name, encounter.location, encounter.attending"),
    ]


def test_an_a08_that_repeats_what_is_known_is_none_and_kept_from_the_platform(hub: Hub) -> None:
    """What a sender rewrites without news (another MSH-10 and time, letter case, a doctor
    without the title, another bed in the same unit) is ``none``; a new phone number is
    ``updated``, naming only it."""
    echo = adt(
        "A08",
        "UPD-011",
        "20261124113000-0500",
        name="OKAFOR^AMARA^N",
        room="415",
        attending="1497758544^Moreau^Celine",
    )
    phone = adt("A08", "UPD-012", "20261124114500-0500", phone="^PRN^PH^^1^217^5550199")
    hub.send(ADMIT, echo, phone)

    assert [p["control_id"] for p in hub.platform()] == ["UPD-001", "UPD-012"]
    told = [(p["control_id"], p["transition"]) for p in hub.platform()]
    assert told == [
        ("UPD-001", {"kind": "admission", "state": "admitted"}),
        ("UPD-012", {"kind": "updated", "state": "admitted", "changed": ["patient.phone"]}),
    ]
    (visit,) = [json.loads(line) for line in hub.cli("encounters", "list", "--json").splitlines()]
    shown = json.loads(hub.cli("encounters", "show", str(visit["id"]), "--json"))
    assert [(e["control_id"], e["transition"]) for e in shown["timeline"]] == [
        ("UPD-001", "admission"),
        ("UPD-011", "none"),
        ("UPD-012", "updated"),
    ]
    assert [m.subject for m in hub.mailbox.mails if m.to == PCP] == [
        "Admission at Riverside General Hospital"
    ]


def test_a_unit_move_by_a02_and_its_cancel_are_updated_but_a_bed_move_is_not(hub: Hub) -> None:
    def move(event: str, cid: str, time: str, unit: str, room: str) -> bytes:
        return adt(event, cid, time, unit=unit, room=room).replace(
            b"ADT^%s^ADT_A01" % event.encode(), b"ADT^%s^ADT_A02" % event.encode()
        )

    bed = move("A02", "UPD-021", "20261124110000-0500", "4W", "420")
    unit = move("A02", "UPD-022", "20261124113000-0500", "5E", "501")
    back = move("A12", "UPD-023", "20261124114000-0500", "4W", "420")  # PV1-3: where it was
    hub.send(ADMIT, bed, unit, back)

    assert [p["control_id"] for p in hub.platform()] == ["UPD-001", "UPD-022", "UPD-023"]
    told = [(p["control_id"], p["transition"]) for p in hub.platform()]
    assert told == [
        ("UPD-001", {"kind": "admission", "state": "admitted"}),
        ("UPD-022", {"kind": "updated", "state": "admitted", "changed": ["encounter.location"]}),
        ("UPD-023", {"kind": "updated", "state": "admitted", "changed": ["encounter.location"]}),
    ]
    assert [m.subject for m in hub.mailbox.mails if m.to == PCP] == [
        "Admission at Riverside General Hospital"
    ]


def test_a_reprocessed_update_is_told_again_as_the_update_it_was(hub: Hub) -> None:
    """`messages reprocess` of an A08 applies nothing twice: it gets its recorded transition,
    so the platform hears the same ``updated`` again and the care team still nothing."""
    update = adt("A08", "UPD-031", "20261124120000-0500", name="Okafor-Smith^Amara^N")
    hub.send(ADMIT, update)
    first = [p for p in hub.platform() if p["control_id"] == "UPD-031"]
    assert [p["transition"]["kind"] for p in first] == ["updated"]

    output = hub.cli("messages", "reprocess", str(hub.message_id("UPD-031")))
    assert "(run 2)" in output
    outbox = Outbox(hub.running.store)
    wait_for(lambda: not outbox.unfinished(), 30, 0.05, "the second run delivered")

    runs = [p for p in hub.platform() if p["control_id"] == "UPD-031"]
    assert len(runs) == 2
    updated = {"kind": "updated", "state": "admitted", "changed": ["patient.name"]}
    assert [run["transition"] for run in runs] == [updated, updated]
    assert [m.subject for m in hub.mailbox.mails if m.to == PCP] == [
        "Admission at Riverside General Hospital"
    ]


def test_routes_check_takes_updated_as_a_transition(tmp_path: Path) -> None:
    """A "drop unchanged A08s" filter that names updated loads; a misspelling still does not."""
    routes = tmp_path / "routes.yaml"
    template = (
        "routes:\n"
        "  - name: a08\n"
        "    when: {type: ADT, events: [A08]}\n"
        "    steps:\n"
        "      - translate: v2-to-event\n"
        "      - enrich: encounter-state\n"
        "      - filter: {transition: {not: [none, %s]}}\n"
        "      - forward: {channel: file, name: out, directory: out}\n"
    )
    config = tmp_path / "carehub.yaml"
    config.write_text("routes: [routes.yaml]\n", encoding="utf-8")

    def check(transition: str) -> subprocess.CompletedProcess[str]:
        routes.write_text(template % transition, encoding="utf-8")
        return subprocess.run(
            [*CHECK, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    accepted = check("updated")
    assert accepted.returncode == 0, accepted.stderr
    refused = check("update")
    assert refused.returncode == 2, refused.stdout
    assert "'update' is not a care transition" in refused.stderr
    assert "updated" in refused.stderr  # the choices name it
