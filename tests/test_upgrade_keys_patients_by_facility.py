"""A store written before identifiers sent without an assigning authority were keyed by the
sending facility (``|55501``, a message row with no authority), upgraded: its rows take their
sender's code (revision 0019), so an A40 naming the bare id moves the visits and follow-ups
stored before, a readmission sees the discharge stored before, and `--patient 55501^HOSP` or
``HOSP|55501`` lists them. Each story runs the shipped care-transitions route on a copy of
config/ over MLLP (aiosmtpd for the care team's mail, a real HTTP server for the rest), turns
the store back into what the older release wrote, runs `carehub store upgrade` as a process,
and goes on with the hub started again."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from click.testing import CliRunner
from sqlalchemy import insert, select, text, update

from carehub.cli import main
from carehub.config import load_config
from carehub.store.schema import (
    encounter_events,
    encounters,
    followups,
    messages,
    notifications,
    patient_merges,
    patient_preferences,
    referrals,
)
from carehub.store.store import MIGRATIONS, MessageStore, sqlite_url
from carehub.testing import HubThread
from tests.helpers_cli import carehub
from tests.helpers_http import HTTPServer, on_this_host
from tests.helpers_smtp import Mailbox, free_port
from tests.test_care_e2e import CONFIG, point_sample_at
from tests.test_encounter_corrections import Care
from tests.test_store import new_message, store_url

__all__ = ["store_url"]  # the SQLite / PostgreSQL store fixture, shared with test_store

NORTH, SOUTH = "NORTHSIDE_HOSP", "SOUTHSIDE_CLINIC"
COORDINATOR = "cc@north.example.org"
#: Tables and columns that hold a patient or visit key ``authority|id``.
KEY_COLUMNS = {
    "encounters": ("patient_key", "visit_key"),
    "followups": ("patient_key",),
    "notifications": ("patient_key",),
    "patient_merges": ("retired_key", "surviving_key"),
    "patient_preferences": ("patient_key",),
    "referrals": ("patient_key",),
    "deliveries": ("order_key",),
}


def adt(
    event: str,
    control_id: str,
    at: str,
    *,
    facility: str = NORTH,
    patient: str = "55501",
    visit: str = "9001",
    admit: str = "",
    discharge: str = "",
    disposition: str = "",
) -> bytes:
    """An ADT from ``facility`` whose MRN and visit number carry no assigning authority."""
    pv1 = [""] * 46
    pv1[0], pv1[1], pv1[2], pv1[3] = "PV1", "1", "I", f"4W^412^A^{facility}"
    pv1[7] = "1497758544^Moreau^Celine^^^Dr^^^NPI"
    pv1[19] = f"{visit}^^^^VN"
    pv1[36] = disposition
    pv1[44], pv1[45] = admit, discharge
    segments = [
        f"MSH|^~\\&|ADT|{facility}|CAREHUB|CAREHUB|{at}||ADT^{event}^ADT_A01|{control_id}"
        "|P|2.5.1|||AL|NE",
        f"EVN|{event}|{at}",
        f"PID|1||{patient}^^^^MR||Alpha^Alice||19580312|F",
        "|".join(pv1),
    ]
    return ("\r".join(segments) + "\r").encode()


def merge(control_id: str, at: str, surviving: str, retired: str) -> bytes:
    """An A40 from the north hospital: ``retired`` (no authority) merged into ``surviving``."""
    segments = [
        f"MSH|^~\\&|ADT|{NORTH}|CAREHUB|CAREHUB|{at}||ADT^A40^ADT_A39|{control_id}|P|2.5.1|||AL|NE",
        f"EVN|A40|{at}",
        f"PID|1||{surviving}^^^^MR||Alpha^Alice||19580312|F",
        f"MRG|{retired}^^^^MR",
    ]
    return ("\r".join(segments) + "\r").encode()


def admitted_and_home(control: str, facility: str = NORTH, visit: str = "9001") -> list[bytes]:
    """Admitted on 27 November, home (disposition 01) on Tuesday 1 December."""
    return [
        adt(
            "A01",
            f"{control}-1",
            "20261127090000-0600",
            facility=facility,
            visit=visit,
            admit="20261127090000-0600",
        ),
        adt(
            "A03",
            f"{control}-2",
            "20261201153000-0600",
            facility=facility,
            visit=visit,
            discharge="20261201153000-0600",
            disposition="01",
        ),
    ]


def as_the_older_release_wrote_it(data_dir: Path) -> None:
    """The store as the release before facility scoping left it: every key a facility's code
    scoped holds the bare id (``|55501``), message rows hold no authority, timelines record
    the bare keys, and the schema is at revision 0018."""
    store = MessageStore(sqlite_url(data_dir))
    try:
        with store.engine.begin() as conn:
            for table, columns in KEY_COLUMNS.items():
                for column in columns:
                    for code in (NORTH, SOUTH):
                        conn.execute(
                            text(
                                f"UPDATE {table} SET {column} = substr({column}, :cut) "
                                f"WHERE {column} LIKE :scoped"
                            ),
                            {"cut": len(code) + 1, "scoped": f"{code}|%"},
                        )
            conn.execute(
                text(
                    "UPDATE messages SET patient_authority = NULL "
                    "WHERE patient_authority IN (:north, :south)"
                ),
                {"north": NORTH, "south": SOUTH},
            )
            for code in (NORTH, SOUTH):
                conn.execute(
                    text("UPDATE encounter_events SET detail = replace(detail, :scoped, '\"|')"),
                    {"scoped": f'"{code}|'},
                )
        if store.schema_revision() != "0018":
            store.downgrade("0018")
    finally:
        store.close()


def keys(data_dir: Path) -> dict[str, set[str]]:
    """Every patient and visit key the care tables hold, by table."""
    store = MessageStore(sqlite_url(data_dir))
    try:
        with store.engine.connect() as conn:
            return {
                "encounters": {
                    f"{r.patient_key} {r.visit_key}" for r in conn.execute(select(encounters))
                },
                "followups": set(conn.execute(select(followups.c.patient_key)).scalars()),
                "notifications": set(conn.execute(select(notifications.c.patient_key)).scalars()),
                "messages": {
                    f"{r.patient_id}^{r.patient_authority or ''}"
                    for r in conn.execute(
                        select(messages.c.patient_id, messages.c.patient_authority)
                    )
                },
            }
    finally:
        store.close()


@dataclass
class Site:
    """A copy of the shipped config with a coordinator for the north hospital's 55501, its
    mail and HTTP stand-ins, and the data dir the hub runs on, again and again."""

    config_path: Path
    data_dir: Path
    mailbox: Mailbox
    http: HTTPServer

    @contextmanager
    def hub(self) -> Iterator[Care]:
        config = on_this_host(load_config(self.config_path))
        with HubThread(config, self.data_dir) as running:
            yield Care(running, self.mailbox, self.http, self.config_path, self.data_dir)

    def upgrade(self) -> str:
        """`carehub store upgrade` as a process; what it printed, both streams."""
        done = carehub(
            "store",
            "upgrade",
            "--config",
            str(self.config_path),
            "--data-dir",
            str(self.data_dir),
            CAREHUB_OUTBOX=os.environ.get("CAREHUB_OUTBOX"),
        )
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    def cli(self, *args: str) -> list[dict[str, Any]]:
        runner = CliRunner(env={"COLUMNS": "200"})
        result = runner.invoke(
            main,
            [*args, "--json", "--config", str(self.config_path), "--data-dir", str(self.data_dir)],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.output.splitlines() if line.strip()]


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    for name in list(os.environ):
        if name.startswith("CAREHUB_"):
            monkeypatch.delenv(name)
    folder = tmp_path / "config"
    shutil.copytree(CONFIG, folder)
    with (folder / "care" / "roster.csv").open("a", encoding="utf-8") as roster:
        roster.write(
            f"55501,{NORTH},false,,cc-north,Casey Sampleton RN,care_coordinator,"
            f"Northside Care Management,,email,{COORDINATOR},immediate,full\n"
        )
    box = Mailbox()
    smtp = Controller(box, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        with HTTPServer(respond=lambda _: 202) as http:
            point_sample_at(monkeypatch, folder, smtp.port, http, tmp_path / "outbox")
            yield Site(folder / "carehub.yaml", tmp_path / "data", box, http)
    finally:
        smtp.stop()


def upgraded_from_before(site: Site, *stories: list[bytes]) -> str:
    """Each story sent to the hub, the store turned back into the older release's, then
    upgraded by `carehub store upgrade`; what that printed."""
    with site.hub() as care:
        for story in stories:
            care.send(*story)
    as_the_older_release_wrote_it(site.data_dir)
    before = keys(site.data_dir)
    assert before["encounters"] >= {"|55501 |9001"}
    assert f"{NORTH}|55501" not in before["followups"]
    return site.upgrade()


def test_an_a40_naming_a_bare_id_moves_the_visits_and_follow_ups_stored_before(
    site: Site,
) -> None:
    upgraded_from_before(site, admitted_and_home("OLD"))
    with site.hub() as care:
        care.send(merge("MRG-1", "20261202090000-0600", "55599", "55501"))
        found = site.cli("encounters", "list", "--patient", f"{NORTH}|55599")
        assert [(e["patient_key"], e["visit_key"], e["state"]) for e in found] == [
            (f"{NORTH}|55599", f"{NORTH}|9001", "discharged")
        ]
        items = site.cli("followups", "list", "--patient", f"{NORTH}|55599")
        assert sorted((f["patient_key"], f["kind"]) for f in items) == [
            (f"{NORTH}|55599", "contact"),
            (f"{NORTH}|55599", "visit"),
        ]
        # The retired id, typed either way, finds the survivor's visit.
        for typed in ("55501", f"{NORTH}|55501"):
            moved = site.cli("encounters", "list", "--patient", typed)
            assert [e["patient_key"] for e in moved] == [f"{NORTH}|55599"], typed


def test_a_readmission_sees_the_discharge_stored_before(site: Site) -> None:
    upgraded_from_before(site, admitted_and_home("OLD"))
    with site.hub() as care:
        care.send(
            adt(
                "A01",
                "NEW-1",
                "20261205020000-0600",
                visit="9002",
                admit="20261205020000-0600",
            )
        )
        # By the id alone, which finds the items under either key.
        items = site.cli("followups", "list", "--all", "--patient", "55501")
        assert sorted((f["kind"], f["status"]) for f in items) == [
            ("contact", "readmitted"),
            ("visit", "readmitted"),
        ]
        (readmission,) = [
            e
            for e in site.cli("encounters", "list", "--patient", f"{NORTH}|55501")
            if e["visit_key"] == f"{NORTH}|9002"
        ]
        assert readmission["state"] == "admitted"


def test_patient_filters_with_the_facility_find_what_was_stored_before(site: Site) -> None:
    nameless = adt("A01", "ANON-1", "20261127090000-0600", patient="55777", visit="9501")
    nameless = nameless.replace(f"|ADT|{NORTH}|".encode(), b"|ADT||", 1)  # no MSH-4
    said = upgraded_from_before(
        site, admitted_and_home("OLD"), admitted_and_home("STH", SOUTH, "9101"), [nameless]
    )
    north = site.cli("messages", "list", "--patient", f"55501^{NORTH}")
    assert sorted(m["control_id"] for m in north) == ["OLD-1", "OLD-2"]
    assert {m["patient_authority"] for m in north} == {NORTH}
    assert len(site.cli("messages", "list", "--patient", "55501")) == 4
    visits = site.cli("encounters", "list", "--patient", f"{NORTH}|55501")
    assert [(e["patient_key"], e["visit_key"]) for e in visits] == [
        (f"{NORTH}|55501", f"{NORTH}|9001")
    ]
    south = site.cli("followups", "list", "--patient", f"{SOUTH}|55501")
    assert {f["patient_key"] for f in south} == {f"{SOUTH}|55501"} and len(south) == 2
    # What no facility sent keeps its key; the upgrade says how much, naming nobody.
    assert "1 message(s), 1 visit(s) keep the patient key they had" in said
    assert not any(number in said for number in ("55777", "9501", "55501"))
    # The two hospitals' 55501, one patient in the older store, are two now.
    after = keys(site.data_dir)
    assert after["encounters"] == {
        f"{NORTH}|55501 {NORTH}|9001",
        f"{SOUTH}|55501 {SOUTH}|9101",
        "|55777 |9501",
    }
    assert after["notifications"] <= {f"{NORTH}|55501", f"{SOUTH}|55501", "|55777"}
    assert after["messages"] == {f"55501^{NORTH}", f"55501^{SOUTH}", "55777^"}
    assert [e["state"] for e in site.cli("encounters", "list", "--patient", "55777")] == [
        "admitted"
    ]


def fhir_focus(request: Any) -> tuple[str, str]:
    """The Encounter and Patient full URLs of a FHIR notification Bundle."""
    urls = {
        e["resource"]["resourceType"]: e["fullUrl"]
        for e in request.json["entry"]
        if e["resource"]["resourceType"] in ("Encounter", "Patient")
    }
    return urls["Encounter"], urls["Patient"]


def test_a_visit_stored_before_goes_on_under_its_new_keys(site: Site) -> None:
    """The next message of a visit stored before finds it under the keys it has now (no
    second visit is opened), its discharge opens the follow-ups under them, and to the FHIR
    receiver it is the same Encounter and Patient as the admission sent before."""
    upgraded_from_before(site, admitted_and_home("OLD")[:1])
    with site.hub() as care:
        care.send(admitted_and_home("OLD")[1])
        (visit,) = site.cli("encounters", "list", "--patient", "55501")
        assert (visit["patient_key"], visit["visit_key"], visit["state"]) == (
            f"{NORTH}|55501",
            f"{NORTH}|9001",
            "discharged",
        )
        items = site.cli("followups", "list", "--patient", "55501")
        assert [f["patient_key"] for f in items] == [f"{NORTH}|55501"] * 2
    admission, discharge = [r for r in site.http.requests if r.path.endswith("$process-message")]
    assert fhir_focus(admission) == fhir_focus(discharge)


# -- the revision itself, on SQLite and PostgreSQL ------------------------------------------------
AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def store_at_0018(url: str) -> MessageStore:
    """A store whose schema is at 0018, the last revision before this one."""
    store = MessageStore(url)
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        alembic_command.upgrade(config, "0018")
    return store


def older_rows(store: MessageStore) -> dict[str, int]:
    """What the older release left: messages and care rows under bare keys, of the north
    hospital, the south one, both (a visit), and of no facility that can be told. Returns
    the row ids the checks name."""
    sent = store.insert_messages(
        [
            new_message("N1", patient_id="55501", sending_facility=NORTH),
            new_message("N2", event="A03", patient_id="55501", sending_facility=NORTH),
            new_message("S1", patient_id="55501", sending_facility=SOUTH),
            new_message("X1", patient_id="55503", sending_facility=""),
            new_message("M1", event="A40", patient_id="55501", sending_facility=NORTH),
            new_message("A1", patient_id="55501", sending_facility="FOODBANK"),
        ]
    )
    m1, m2, m3, m4, m5, m6 = (outcome.message_id for outcome in sent)
    ids: dict[str, int] = {}
    with store.engine.begin() as conn:
        conn.execute(update(messages).values(patient_authority=None))
        conn.execute(update(messages).where(messages.c.id == m6).values(message_type="RRI"))

        def visit(name: str, patient: str, visit_key: str, *made_by: int, snap: str = "") -> int:
            snapshot = json.dumps({"sending_facility": snap}) if snap else None
            ids[name] = int(
                conn.execute(
                    insert(encounters).values(
                        patient_key=patient,
                        visit_key=visit_key,
                        state="discharged",
                        snapshot=snapshot,
                        created_at=AT,
                        updated_at=AT,
                    )
                ).inserted_primary_key[0]
            )
            for message_id in made_by:
                result = {"kind": "admission", "patient_key": patient, "summary": {
                    "patient_key": patient, "visit_key": visit_key}}  # fmt: skip
                conn.execute(
                    insert(encounter_events).values(
                        encounter_id=ids[name],
                        message_id=message_id,
                        transition="admission",
                        detail=json.dumps({"result": result}),
                        recorded_at=AT,
                    )
                )
            return ids[name]

        north = visit("north", "|55501", "|9001", m1, m2)
        south = visit("south", "|55501", "|9101", m3)
        both = visit("both", "|55501", "|9201", m1, m3)
        visit("pruned", "|55502", "|9301", 999_999, snap=f"{NORTH}^1.2.3^ISO")
        visit("unknown", "|55503", "noVN:X:20261201", m4)
        visit("taken", "|55504", "|9401", m1)
        visit("holder", f"{NORTH}|55504", f"{NORTH}|9401", m1)
        for encounter_id, key in ((north, "|55501"), (both, "|55501"), (ids["pruned"], "|55502")):
            conn.execute(
                insert(followups).values(
                    encounter_id=encounter_id,
                    patient_key=key,
                    kind="contact",
                    due_at=AT,
                    status="open",
                    created_at=AT,
                )
            )
        for encounter_id, message_id in ((south, m3), (None, m5), (None, m6)):
            conn.execute(
                insert(notifications).values(
                    encounter_id=encounter_id,
                    message_id=message_id,
                    patient_key="|55501",
                    recipient="cc-1",
                    kind="referral_overdue" if encounter_id is None else "admission",
                    status="queued",
                    created_at=AT,
                )
            )
        conn.execute(
            insert(patient_merges),
            [
                {"retired_key": "|55500", "surviving_key": "|55501", "message_id": m5,
                 "merged_at": AT},
                {"retired_key": "|55600", "surviving_key": "|55601", "message_id": None,
                 "merged_at": AT},
            ],
        )  # fmt: skip
        conn.execute(
            insert(patient_preferences),
            [
                {"patient_key": "|55501", "opted_out": True, "message_id": m2, "updated_at": AT},
                {"patient_key": "|55503", "opted_out": True, "message_id": m4, "updated_at": AT},
            ],
        )
        for key, snapshot in (("R-1", {"sending_facility": SOUTH}), ("R-2", {})):
            conn.execute(
                insert(referrals).values(
                    referral_key=f"|{key}",
                    patient_key="|55501",
                    status="requested",
                    snapshot=json.dumps(snapshot),
                    created_at=AT,
                    updated_at=AT,
                )
            )
    return ids


def care_keys(store: MessageStore) -> dict[str, Any]:
    with store.engine.connect() as conn:
        return {
            "messages": sorted(
                (r.control_id, r.patient_authority)
                for r in conn.execute(select(messages.c.control_id, messages.c.patient_authority))
            ),
            "encounters": {
                r.id: (r.patient_key, r.visit_key)
                for r in conn.execute(
                    select(encounters.c.id, encounters.c.patient_key, encounters.c.visit_key)
                )
            },
            "events": sorted(
                json.loads(d)["result"]["patient_key"]
                for d in conn.execute(select(encounter_events.c.detail)).scalars()
            ),
            "followups": sorted(conn.execute(select(followups.c.patient_key)).scalars()),
            "notifications": sorted(conn.execute(select(notifications.c.patient_key)).scalars()),
            "merges": sorted(
                (r.retired_key, r.surviving_key) for r in conn.execute(select(patient_merges))
            ),
            "preferences": sorted(
                conn.execute(select(patient_preferences.c.patient_key)).scalars()
            ),
            "referrals": sorted(
                (r.referral_key, r.patient_key) for r in conn.execute(select(referrals))
            ),
        }


def test_each_row_takes_the_code_of_the_facility_that_sent_it(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_at_0018(store_url)
    try:
        ids = older_rows(store)
        with caplog.at_level(logging.INFO, logger="carehub.store.migrations"):
            store.migrate()
        found = care_keys(store)
        assert found["messages"] == [
            ("A1", "FOODBANK"), ("M1", NORTH), ("N1", NORTH), ("N2", NORTH), ("S1", SOUTH),
            ("X1", None),
        ]  # fmt: skip
        visits = found["encounters"]
        assert visits[ids["north"]] == (f"{NORTH}|55501", f"{NORTH}|9001")
        assert visits[ids["south"]] == (f"{SOUTH}|55501", f"{SOUTH}|9101")
        # No message left: the hospital of its latest care event.
        assert visits[ids["pruned"]] == (f"{NORTH}|55502", f"{NORTH}|9301")
        # Messages of two hospitals, no facility, or another visit under the new keys.
        assert visits[ids["both"]] == ("|55501", "|9201")
        assert visits[ids["unknown"]] == ("|55503", "noVN:X:20261201")
        assert visits[ids["taken"]] == ("|55504", "|9401")
        # What a reprocessed message replays names the keys the visit has now.
        assert found["events"] == sorted(
            [f"{NORTH}|55501"] * 2 + [f"{SOUTH}|55501"] + ["|55501"] * 2
            + [f"{NORTH}|55502", "|55503", "|55504", f"{NORTH}|55504"]
        )  # fmt: skip
        assert found["followups"] == sorted([f"{NORTH}|55501", "|55501", f"{NORTH}|55502"])
        # The A40's alert is the north hospital's; an organisation's answer tells nothing.
        assert found["notifications"] == sorted([f"{SOUTH}|55501", f"{NORTH}|55501", "|55501"])
        assert found["merges"] == sorted(
            [("|55600", "|55601"), (f"{NORTH}|55500", f"{NORTH}|55501")]
        )
        assert found["preferences"] == sorted(["|55503", f"{NORTH}|55501"])
        # A referral's patient is its referrer's; its own key is left as it was.
        assert found["referrals"] == [("|R-1", f"{SOUTH}|55501"), ("|R-2", "|55501")]

        said = [r for r in caplog.records if r.name == "carehub.store.migrations"]
        warning = next(r.getMessage() for r in said if r.levelno == logging.WARNING)
        assert warning.startswith(
            "store revision 0019: 1 message(s), 3 visit(s), 1 follow-up(s), 1 notification(s), "
            "1 patient merge(s), 1 opt-out choice(s), 1 referral(s) keep the patient key"
        )
        assert "1 visit(s) have messages from more than one)" in warning
        info = next(r.getMessage() for r in said if r.levelno == logging.INFO)
        assert "5 message(s), 3 visit(s), 2 follow-up(s), 2 notification(s)" in info
        assert not any(number in r.getMessage() for r in said for number in ("555", "9001"))

        # Again, after a downgrade: what was keyed stays as it is, nothing is keyed twice.
        store.downgrade("0018")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="carehub.store.migrations"):
            store.migrate()
        assert care_keys(store) == found
        again = [r.getMessage() for r in caplog.records if r.name == "carehub.store.migrations"]
        assert len(again) == 1 and again[0] == warning
    finally:
        store.close()


def test_a_store_with_nothing_to_key_is_left_as_it_is(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_at_0018(store_url)
    try:
        store.insert_messages([new_message("K1", patient_id="55501", sending_facility=NORTH)])
        with caplog.at_level(logging.INFO, logger="carehub.store.migrations"):
            store.migrate()
        assert care_keys(store)["messages"] == [("K1", "HOSP")]  # PID-3.4 as sent
        assert [r for r in caplog.records if r.name == "carehub.store.migrations"] == []
    finally:
        store.close()
