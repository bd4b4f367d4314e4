"""Retention of the care-transition and referral records: the shipped config fed every sample
feed (and a referral cancel, and an answer for a referral nobody sent) through a real hub,
then `carehub store prune` run as its own process, on SQLite and PostgreSQL. What the feeds
said about each patient (family name, birth date, street) is looked for in every table."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import func, select

from carehub.config import load_config
from carehub.hl7.ack import read_ack
from carehub.store.outbox import Outbox
from carehub.store.schema import (
    encounters,
    metadata,
    notifications,
    patient_merges,
    patient_preferences,
)
from carehub.store.store import MessageStore
from carehub.testing import HubThread, mllp_exchange
from tests.helpers_http import HTTPServer, on_this_host, wait_for
from tests.helpers_smtp import Mailbox, free_port
from tests.test_care_e2e import CONFIG, FEEDS, point_sample_at, send_feeds
from tests.test_store import store_url

__all__ = ["store_url"]  # the SQLite / PostgreSQL store fixture, shared with test_store

#: Amara Okafor's referral (07) cancelled by the hospital: a closed referral.
CANCEL_REFERRAL = (
    "MSH|^~\\&|RGH_REF|RIVERSIDE_GH|CAREHUB|CAREHUB|20261128120000-0500||REF^I14^REF_I12|"
    "RGH-REF-7002|P|2.5|||AL|NE\r"
    "RF1|P^Pending^HL70283|R^Routine^HL70280|SO^Social services^HL70281|R^Referral^HL70282||"
    "RGH-R-2026-0042|20261127|20261227||Food and housing support after discharge\r"
    "PRD|RP^Referring provider^HL70286|Haddad^Samir^^^Dr|1200 Medical Pkwy^^Springfield^IL^62701"
    "||||1184629371^NPI\r"
    "PID|1||RG100234^^^RGH^MR||Okafor^Amara^N||19580312|F|||418 Birch Lane^^Springfield^IL^62704"
    "^USA\r"
)
#: An answer for a referral carehub never saw: recorded as a referral event of no referral.
UNMATCHED_ANSWER = (
    "MSH|^~\\&|SCFB_REFERRALS|SPRINGFIELD_FOOD_BANK|CAREHUB|CAREHUB|20261128093000-0600||"
    "RRI^I12^RRI_I12|SCFB-9002|P|2.5|||AL|NE\r"
    "MSA|AA|RGH-REF-0000\r"
    "RF1|R^Rejected^HL70283|R^Routine^HL70280|SO^Social services^HL70281|||RGH-R-2026-9999|"
    "20261127|20261227||Food support\r"
)


@dataclass(frozen=True)
class Patient:
    name: str  # the family name the feeds first give
    needles: frozenset[str]  # what a row about the patient would hold


def feed_patients() -> dict[str, Patient]:
    """Each patient of the sample feeds (by birth date: one patient sent under two ids is
    one) -> every identifier (PID-3.1), family name, birth date (as sent and as ISO) and
    street the PID segments give, in the forms a row may hold them (text, or JSON with
    non-ASCII escaped)."""
    found: dict[str, tuple[str, set[str]]] = {}
    for feed in FEEDS:
        raw = feed.read_bytes()
        text = raw.decode("latin-1" if b"8859/1" in raw else "utf-8")
        for segment in re.split(r"[\r\n]+", text):
            fields = segment.split("|")
            if fields[0] != "PID" or len(fields) < 8:
                continue
            identifier, family, birth = (
                fields[3].split("^")[0],
                fields[5].split("^")[0],
                fields[7][:8],
            )
            street = fields[11].split("^")[0] if len(fields) > 11 else ""
            iso = f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}"
            values = found.setdefault(birth, (family, set()))[1]
            values.update({identifier, family, birth, iso, street} - {""})
    return {
        name: Patient(name, frozenset(values | {json.dumps(v)[1:-1] for v in values}))
        for name, values in found.values()
    }


def cell_texts(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bytes | memoryview):
        data = bytes(value)
        return [data.decode("utf-8", "replace"), data.decode("latin-1")]
    return [str(value)]


def tables_holding(store: MessageStore, patient: Patient) -> set[str]:
    """The tables with a row that holds anything the feeds said about the patient."""
    holding = set()
    with store.engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(select(table)):
                texts = [text for value in row for text in cell_texts(value)]
                if any(needle in text for text in texts for needle in patient.needles):
                    holding.add(table.name)
                    break
    return holding


def row_counts(store: MessageStore) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {
            table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
            for table in metadata.sorted_tables
        }


def care_counts(text: str) -> dict[str, int]:
    """ "3 encounter(s), 10 encounter event(s), ..." -> {"encounters": 3, ...}."""
    nouns = {
        "encounter(s)": "encounters",
        "encounter event(s)": "encounter_events",
        "notification(s)": "notifications",
        "follow-up(s)": "followups",
        "referral(s)": "referrals",
        "referral event(s)": "referral_events",
        "patient merge(s)": "patient_merges",
    }
    counts = {}
    for part in text.split(", "):
        number, noun = part.split(" ", 1)
        counts[nouns[noun]] = int(number.replace(",", ""))
    return counts


MESSAGE_TABLES = {"messages", "message_events", "message_steps", "deliveries", "delivery_attempts"}


@dataclass
class Fed:
    config_path: Path
    data_dir: Path
    env: dict[str, str]
    store: MessageStore

    def carehub(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`carehub ARGS` as its own process, on this config and data dir."""
        command = [sys.executable, "-m", "carehub.cli", *args]
        command += ["--config", str(self.config_path), "--data-dir", str(self.data_dir)]
        done = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def hub(self) -> HubThread:
        return HubThread(on_this_host(load_config(self.config_path)), self.data_dir)

    def send(self, *texts: str) -> None:
        """Send ``texts`` to a hub started for them, and stop it once they are dealt with."""
        with self.hub() as running:
            answers = mllp_exchange(running.mllp_address, [t.encode() for t in texts])
            assert [read_ack(a.decode())[0] for a in answers] == ["AA"] * len(texts)
            outbox = Outbox(running.store)
            wait_for(lambda: not outbox.unfinished(), 60, 0.05, "every message dealt with")


@pytest.fixture
def fed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_url: str) -> Iterator[Fed]:
    """The shipped config on ``store_url`` after every sample feed, a cancel of Amara Okafor's
    referral and an answer to a referral nobody sent went through a hub and were dealt with
    (the hub stopped again); local SMTP and HTTP servers stand in for every destination."""
    for name in ("CAREHUB_CONFIG", "CAREHUB_DATA_DIR", "CAREHUB_HTTP_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CAREHUB_STORE_URL", store_url)
    folder = tmp_path / "config"
    shutil.copytree(CONFIG, folder)
    smtp = Controller(Mailbox(), hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        with HTTPServer(respond=lambda _: 202) as http:
            point_sample_at(monkeypatch, folder, smtp.port, http, tmp_path / "outbox")
            store = MessageStore(store_url)
            fed = Fed(folder / "carehub.yaml", tmp_path / "data", dict(os.environ), store)
            try:
                with fed.hub() as running:
                    acks = send_feeds(running)
                    assert {c for name, c in acks.items() if not name.startswith("09")} == {"AA"}
                fed.send(CANCEL_REFERRAL, UNMATCHED_ANSWER)
                yield fed
            finally:
                store.close()
    finally:
        smtp.stop()


def test_prune_deletes_finished_care_and_referral_records_and_keeps_open_ones(fed: Fed) -> None:
    """`store prune --older-than 0`: the finished visits (Amara Okafor's discharge, José
    Peña's cancelled admission, Marcus Whitlock's ED visit) go with their events and
    notifications, Amara's cancelled referral with its events, and the answer to a referral
    nobody sent; the visits still open, Inés Quiñones's discharge with follow-ups pending, her
    open referral and the merge into the admitted Renee Delacroix stay. --include-unfinished
    then leaves nothing the feeds said about any patient, in any table."""
    patients = feed_patients()
    care_tables = {"encounters", "encounter_events", "notifications", "referrals", "followups"}
    assert care_tables - {"followups"} <= tables_holding(fed.store, patients["Okafor"])
    assert care_tables <= tables_holding(fed.store, patients["Quiñones"])
    assert {"encounters", "notifications"} <= tables_holding(fed.store, patients["Peña"])
    assert "patient_merges" in tables_holding(fed.store, patients["Delacroix"])
    before = row_counts(fed.store)

    dry = fed.carehub("store", "prune", "--older-than", "0", "--dry-run").stdout.splitlines()
    assert row_counts(fed.store) == before  # a dry run changes nothing
    at = dry.index("care and referral records last changed before then:")
    would = care_counts(dry[at + 1].removeprefix("  would delete "))
    assert {k: would[k] for k in ("encounters", "referrals", "followups", "patient_merges")} == {
        "encounters": 3,
        "referrals": 1,
        "followups": 0,
        "patient_merges": 0,
    }
    assert would["referral_events"] == before["referral_events"] - 1  # Inés's stays
    assert dry[at + 2] == (
        "  would keep 6 with work left: 4 open encounter(s), 1 encounter(s) with follow-ups "
        "pending, 1 open referral(s) (--include-unfinished deletes them too)"
    )
    assert dry[at + 3].startswith("  would keep 1 older patient merge(s): ")

    pruned = fed.carehub("store", "prune", "--older-than", "0", "--yes").stdout.splitlines()
    after = row_counts(fed.store)
    line = next(text for text in pruned if text.startswith("pruned care and referral records: "))
    done = care_counts(line.removeprefix("pruned care and referral records: "))
    assert done == would
    assert {table: before[table] - after[table] for table in done} == done
    assert "kept 6 older care and referral record(s) with work left: " in "\n".join(pruned)
    messages_line = pruned[0]
    assert re.match(
        r"pruned \d+ message\(s\) older than 0 day\(s\); (store file|pruned tables) ", messages_line
    ), messages_line

    # Nothing is left of the patients whose records were all finished.
    assert tables_holding(fed.store, patients["Peña"]) == set()
    assert tables_holding(fed.store, patients["Whitlock"]) == set()
    # Amara's cancel is a dead letter (the stand-in has no Task to read): that message and
    # its deliveries stay, as unfinished messages do; her care and referral records are gone.
    assert tables_holding(fed.store, patients["Okafor"]) <= MESSAGE_TABLES
    # The open visits, the discharge with follow-ups pending and the open referral stay.
    for name in ("Delacroix", "Fairweather", "Brightwater", "Quiñones"):
        assert "encounters" in tables_holding(fed.store, patients[name]), name
    assert "referrals" in tables_holding(fed.store, patients["Quiñones"])
    assert after["followups"] == before["followups"] == 2
    assert after["patient_merges"] == 1

    (action,) = [a for a in fed_audit(fed) if a["command"] == "store prune"]
    messages_deleted = int(messages_line.split()[1])
    assert action["counts"] == {
        "messages": messages_deleted,
        **done,
        "kept": before["messages"] - messages_deleted,
        "kept_care_records": 6,
        "kept_patient_merges": 1,
    }

    fed.carehub("store", "prune", "--older-than", "0", "--include-unfinished", "--yes")
    for patient in patients.values():
        assert tables_holding(fed.store, patient) == set(), patient.name
    emptied = row_counts(fed.store)
    for table in (*MESSAGE_TABLES, *done):
        assert emptied[table] == 0, table


def fed_audit(fed: Fed) -> list[dict[str, Any]]:
    listed = fed.carehub("audit", "list", "--json").stdout
    return [json.loads(line) for line in listed.splitlines() if line.strip()]


#: A patient who opted out (PD1-12) and whose one visit was cancelled, then a duplicate
#: record of hers merged into hers.
OPTED_OUT_STORY = (
    "MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|20261126080000-0500||ADT^A04^ADT_A01|"
    "RGH-009001|P|2.5.1|||AL|NE\r"
    "EVN|A04|20261126080000-0500\r"
    "PID|1||RG900001^^^RGH^MR||Exampleperson^Pat||19610101|F|||1 Sample Way^^Springfield^IL\r"
    "PD1||||1245319599^Sampleton^Sam^^^Dr^^^NPI||||||||Y\r"
    "PV1|1|O|CLIN^C2^01^RIVERSIDE_GH||||1497758544^Moreau^Celine^^^Dr^^^NPI||||||||||||"
    "V20261126-9001^^^RGH^VN\r",
    "MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|20261126090000-0500||ADT^A11^ADT_A09|"
    "RGH-009002|P|2.5.1|||AL|NE\r"
    "EVN|A11|20261126090000-0500\r"
    "PID|1||RG900001^^^RGH^MR||Exampleperson^Pat||19610101|F\r"
    "PV1|1|O|CLIN^C2^01^RIVERSIDE_GH||||||||||||||||V20261126-9001^^^RGH^VN\r",
    "MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|20261126100000-0500||ADT^A40^ADT_A39|"
    "RGH-009003|P|2.5.1|||AL|NE\r"
    "EVN|A40|20261126100000-0500\r"
    "PID|1||RG900001^^^RGH^MR||Exampleperson^Pat||19610101|F\r"
    "MRG|RG900002^^^RGH^MR\r",
)
#: Later, a registration under the retired identifier, its PD1-12 empty.
LATE_UNDER_RETIRED_ID = (
    "MSH|^~\\&|RGH_ADT|RIVERSIDE_GH|CAREHUB|CAREHUB|20261210080000-0500||ADT^A04^ADT_A01|"
    "RGH-009004|P|2.5.1|||AL|NE\r"
    "EVN|A04|20261210080000-0500\r"
    "PID|1||RG900002^^^RGH^MR||Exampleperson^Pat||19610101|F\r"
    "PD1||||1245319599^Sampleton^Sam^^^Dr^^^NPI\r"
    "PV1|1|E|ED^ED05^01^RIVERSIDE_GH||||1902837465^Ortega^Lucia^^^Dr^^^NPI||||||||||||"
    "V20261210-9004^^^RGH^VN\r"
)


def test_a_merge_stays_while_its_patient_has_a_record_and_late_messages_follow_it(
    fed: Fed,
) -> None:
    """Everything pruned, unfinished work too: a patient's opt-out is her instruction, not a
    record of care, so it stays, and so does the merge of her duplicate record into hers (a
    merge whose patients have nothing left in the store goes). A registration that comes
    later under the retired identifier joins her record and honours her opt-out."""
    fed.send(*OPTED_OUT_STORY)
    survivor, retired = "RGH|RG900001", "RGH|RG900002"
    with fed.store.engine.connect() as conn:
        merges = conn.execute(select(patient_merges.c.retired_key)).scalars().all()
        preferences = conn.execute(select(patient_preferences)).all()
    assert sorted(merges) == ["RGH|RG100299", retired]
    assert [(p.patient_key, p.opted_out) for p in preferences] == [(survivor, True)]

    pruned = fed.carehub("store", "prune", "--older-than", "0", "--include-unfinished", "--yes")
    assert "kept 1 older patient merge(s): " in pruned.stdout
    counts = row_counts(fed.store)
    assert counts["encounters"] == counts["messages"] == counts["notifications"] == 0
    with fed.store.engine.connect() as conn:
        merges = conn.execute(select(patient_merges.c.retired_key)).scalars().all()
        assert merges == [retired]  # Renee Delacroix's went with her records
        assert conn.execute(select(patient_preferences)).all() == preferences

    fed.send(LATE_UNDER_RETIRED_ID)
    with fed.store.engine.connect() as conn:
        (visit,) = conn.execute(select(encounters)).all()
        told = conn.execute(select(notifications)).all()
    assert visit.patient_key == survivor
    assert told and all(n.status == "suppressed" and "opted out" in n.reason for n in told)
