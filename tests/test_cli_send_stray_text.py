"""`carehub send` refuses a file holding text outside its messages (a note typed after one)
before anything is sent, naming the file and where the text is, rather than sending the
messages and passing the text over in silence."""

from __future__ import annotations

from pathlib import Path

from carehub.testing import HubThread, make_adt
from tests import test_cli
from tests.test_cli import run, send_args, write

# test_cli's autouse fixture, shared by name: no CAREHUB_* settings, a scratch working folder.
_clean_env = test_cli._clean_env


def test_send_refuses_a_file_with_text_outside_its_messages(hub: HubThread, tmp_path: Path) -> None:
    good = write(tmp_path, "good.hl7", make_adt("STRAY-0"))
    message = make_adt("STRAY-1")
    noted = write(tmp_path, "noted.hl7", message + "this is a note\n")
    result = run(*send_args(hub, good, noted))
    assert result.exit_code != 0
    assert (
        f"{noted}: text outside any HL7 message (15 bytes at byte {len(message)})" in result.stderr
    )
    assert "nothing was sent" in result.stderr and "this is a note" not in result.stderr
    assert hub.store.count() == 0  # every file is checked before anything is sent
