"""Reading patients' messages out of the store is in the audit trail: every `messages show`
(each form prints the message) and every `messages export`, with who, when, which message
ids or filters and how many, never the content. `messages list` prints header facts only and
is not recorded. A real hub stores the messages; the operator's side is the real CLI."""

from __future__ import annotations

from pathlib import Path

from carehub.config import load_config
from carehub.testing import HubThread, make_adt
from tests.test_dead_letter_order import cli
from tests.test_pause_and_audit import actions, trail_text
from tests.test_worker import send, write_config

PATIENT = "RG777001"
NAME = "Okafor^Amara"


def _stored(tmp_path: Path, count: int) -> tuple[Path, Path]:
    """A config and a data dir whose store holds ``count`` messages of one patient."""
    config = write_config(tmp_path, "routes: []\n")
    data_dir = tmp_path / "data"
    texts = [
        make_adt(f"READ-{n}", "A08", patient_id=PATIENT, name=NAME) for n in range(1, count + 1)
    ]
    with HubThread(load_config(config), data_dir) as hub:
        send(hub, texts)
    return config, data_dir


def test_every_show_is_recorded_with_what_it_printed(tmp_path: Path) -> None:
    config, data_dir = _stored(tmp_path, 1)
    for args in (
        ["--raw"],
        ["--payload", "--by", "alice"],
        ["--full"],
        [],
        ["--json", "--payload"],
    ):
        shown = cli(config, data_dir, "messages", "show", "1", *args)
        assert shown.exit_code == 0, shown.output
        assert PATIENT in shown.output
    missing = cli(config, data_dir, "messages", "show", "99")
    assert missing.exit_code != 0
    listed = cli(config, data_dir, "messages", "list")
    assert listed.exit_code == 0, listed.output

    found = actions(data_dir)
    assert [(a["command"], a["target"], a["outcome"]) for a in found] == [
        ("messages show", "message 1", "ok"),
        ("messages show", "message 1", "ok"),
        ("messages show", "message 1", "ok"),
        ("messages show", "message 1", "ok"),
        ("messages show", "message 1", "ok"),
        ("messages show", "message 99", "failed"),
    ]
    assert [a["detail"] for a in found[:5]] == [
        "printed: the message text",
        "printed: the message field by field, delivery payloads",
        "printed: the message field by field, route step outputs whole",
        "printed: the message field by field",
        "printed: the message text, route step outputs whole, delivery payloads",
    ]
    assert found[5]["detail"].startswith("no message with id 99")
    assert found[0]["actor"].count("@") == 1  # login@host by default
    assert found[1]["actor"] == "alice"
    trail = trail_text(data_dir)
    for value in (PATIENT, "Okafor", "READ-1", "MSH|"):
        assert value not in trail


def test_an_export_is_recorded_with_its_filters_and_the_ids_it_wrote(tmp_path: Path) -> None:
    config, data_dir = _stored(tmp_path, 3)
    out = tmp_path / "out"
    exported = cli(
        config, data_dir, "messages", "export", "--out", str(out),
        "--patient", PATIENT, "--contains", "Okafor", "--limit", "2", "--by", "bob",
    )  # fmt: skip
    assert exported.exit_code == 0, exported.output
    assert sorted(p.name for p in out.iterdir()) == ["2.hl7", "3.hl7"]
    again = cli(config, data_dir, "messages", "export", "--out", str(out), "--limit", "3")
    assert again.exit_code != 0 and "already there" in again.output
    forced = cli(config, data_dir, "messages", "export", "--out", str(out), "--force")
    assert forced.exit_code == 0, forced.output
    nothing = cli(config, data_dir, "messages", "export", "--out", str(out), "--event", "A01")
    assert nothing.exit_code == 0, nothing.output

    first, refused, everything, none = actions(data_dir)
    assert {a["command"] for a in (first, refused, everything, none)} == {"messages export"}
    assert (first["actor"], first["target"], first["counts"], first["outcome"]) == (
        "bob",
        "--patient (not recorded) --contains (not recorded) --limit 2",
        {"messages": 2},
        "ok",
    )
    assert first["detail"] == f"messages 3, 2 written to {out}"
    assert (refused["target"], refused["counts"], refused["outcome"]) == (
        "--limit 3",
        {"messages": 0},
        "failed",
    )
    assert "already there" in refused["detail"]
    assert (everything["target"], everything["counts"]) == ("all messages", {"messages": 3})
    assert everything["detail"] == f"messages 3, 2, 1 written to {out}"
    assert (none["target"], none["counts"], none["outcome"]) == (
        "--event A01",
        {"messages": 0},
        "none",
    )
    trail = trail_text(data_dir)
    for value in (PATIENT, "Okafor", "READ-", "MSH|"):
        assert value not in trail
