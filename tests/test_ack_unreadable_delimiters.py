"""What a sender and an operator get back from messages that are hard to read, over real MLLP
sockets and the real `carehub messages list` process: a header with unusable encoding
characters (MSH-2) is answered AR echoing what its field separator alone finds, and its row is
found by its control ID; the reason in a pre-v2.5 ERR-1 is escaped once; and `--field` reads a
path as a route does, ``[*]`` included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from carehub.hl7.charsets import decode_message
from carehub.hl7.view import MessageView
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange
from tests.test_cli import env_without_carehub

TIMEOUT = 30.0


def exchange(hub: HubThread, *payloads: bytes) -> list[MessageView]:
    answers = mllp_exchange(hub.mllp_address, payloads, TIMEOUT)
    return [MessageView(decode_message(answer).text) for answer in answers]


def messages_list(data_dir: Path, *args: str) -> list[dict[str, Any]]:
    """`carehub messages list --json` in a process of its own."""
    command = [sys.executable, "-m", "carehub.cli", "messages", "list", "--json"]
    done = subprocess.run(
        [*command, "--data-dir", str(data_dir), *args],
        capture_output=True,
        timeout=60,
        env=env_without_carehub(),
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


# -- MSH-2 that cannot be used ---------------------------------------------------------------
REPEATED = (
    b"MSH|^^\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20260101||ADT^A01|DELIM4|P|2.5.1\rPID|1||123^^^H\r"
)
#: MSH-2 missing: "A" is MSH-3, and every later field would be read one place off.
MISSING = b"MSH|A|B|C|D|20260101||ADT^A01|X5|P|2.5\rPID|1\r"


def test_repeated_encoding_characters_are_answered_with_what_msh1_reads(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with HubThread(local_config(), data_dir) as hub:
        repeated, missing = exchange(hub, REPEATED, MISSING)

    assert (repeated.get("MSA-1"), repeated.get("MSA-2")) == ("AR", "DELIM4")
    assert [repeated.get(f"MSH-{n}") for n in (3, 4, 5, 6)] == [
        "RECVAPP",
        "RECVFAC",
        "SENDAPP",
        "SENDFAC",
    ]
    assert repeated.get("MSH-2") == "^~\\&"  # the ACK is written with delimiters it can use
    assert repeated.get("ERR-2") == "MSH^1^2"
    assert "MSH-2 (the encoding characters) is '^^\\&'" in repeated.get("ERR-8")

    # Where MSH-2 is missing nothing is echoed: the fields would be the wrong ones.
    assert (missing.get("MSA-1"), missing.get("MSA-2"), missing.get("MSH-3")) == (
        "AR",
        "",
        "CAREHUB",
    )

    (row,) = messages_list(data_dir, "--control-id", "DELIM4")
    assert (row["status"], row["ack_code"]) == ("rejected", "AR")
    assert (row["sending_application"], row["sending_facility"]) == ("SENDAPP", "SENDFAC")
    assert (row["receiving_application"], row["receiving_facility"]) == ("RECVAPP", "RECVFAC")
    assert (row["version"], row["message_type"], row["patient_id"]) == ("2.5.1", None, None)
    assert [r["control_id"] for r in messages_list(data_dir, "--sender", "SENDAPP")] == ["DELIM4"]


# -- ERR-1 before v2.5 -----------------------------------------------------------------------
def test_err1_before_v2_5_escapes_the_reason_once(tmp_path: Path) -> None:
    junk = make_adt("JUNK23", version="2.3", extra_segments=["note: see '|' and '^' here"])
    with HubThread(local_config(), tmp_path / "data") as hub:
        (ack,) = exchange(hub, junk.encode())
        (stored,) = hub.store.find()
    assert (ack.get("MSA-1"), ack.get("MSA-2")) == ("AE", "JUNK23")
    # A v2.3 ACK holds a short form (MSA-3 and ERR-1 are 80 characters); the store the whole.
    reason = ack.get("MSA-3")
    assert reason.startswith("line ") and "then '|')" in reason and reason.endswith("...")
    assert "note: see '|' and '^" in (stored.detail or "")
    # ERR-1 (ELD): location, then the code with the text as its second subcomponent.
    assert ack.get("ERR-1.4.1") == "100"
    assert reason.startswith(ack.get("ERR-1.4.2").removesuffix("..."))
    assert ack.get("ERR-1.4.3") == "HL70357"
    assert "\\E\\" not in ack.raw("ERR-1")


# -- `messages list --field` with [*] --------------------------------------------------------
def lab_result(control_id: str, identifiers: str, codes: list[str]) -> bytes:
    results = [f"OBX|{n}|NM|{code}^Test {n}||{n}" for n, code in enumerate(codes, start=1)]
    segments = [
        f"MSH|^~\\&|LAB|HOSP|CAREHUB|CAREHUB|20260101||ORU^R01^ORU_R01|{control_id}|P|2.5",
        f"PID|1||{identifiers}||DOE^JANE",
        "OBR|1",
        *results,
    ]
    return ("\r".join(segments) + "\r").encode()


def test_messages_list_field_reads_every_repetition_and_segment_as_routes_do(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    messages = [
        lab_result("FIRST", "123456789^^^SSA^SS~MRN1^^^HOSP^MR", ["WBC"]),
        lab_result("SECOND", "MRN2^^^HOSP^MR~123456789^^^SSA^SS", ["WBC", "GLU"]),
        lab_result("NEITHER", "MRN3^^^HOSP^MR~987654321^^^SSA^SS", ["HGB", "WBC"]),
    ]
    with HubThread(local_config(), data_dir) as hub:
        assert [ack.get("MSA-1") for ack in exchange(hub, *messages)] == ["AA"] * 3

    def found(*args: str) -> list[str]:
        return sorted(row["control_id"] for row in messages_list(data_dir, *args))

    assert found("--field", "PID-3[*].1=123456789") == ["FIRST", "SECOND"]
    assert found("--field", "PID-3[*].4=HOSP") == ["FIRST", "NEITHER", "SECOND"]
    assert found("--field", "OBX[*]-3.1=GLU") == ["SECOND"]
    assert found("--field", "OBX[*]-3.1=WBC", "--field", "PID-3[*].1=987654321") == ["NEITHER"]
    # Without [*], the first repetition and the first OBX only, as before.
    assert found("--field", "PID-3.1=123456789") == ["FIRST"]
    assert found("--field", "OBX-3.1=WBC") == ["FIRST", "SECOND"]
