"""Before v2.5, MSA-3 (ST) and ERR-1 (ELD) hold at most 80 characters, and receivers built on
those versions keep them in fixed-size fields: an ACK to a v2.1-v2.4 message carries a short
form of its reason there, 80 characters at most once escaped (each delimiter in it is written
as a three-character escape sequence), over a real hub's MLLP listener. The store keeps the
whole reason, and from v2.5 on ERR-8 carries it whole."""

from __future__ import annotations

import pytest

from carehub.hl7.charsets import decode_message
from carehub.hl7.view import MessageView, Separators
from carehub.testing import HubThread, make_adt, mllp_exchange

TIMEOUT = 30.0
#: MSA-3 (ST) and ERR-1 (ELD) before v2.5.
SHORT_TEXT_LIMIT = 80
#: A line that is not a segment, quoted in the reason: every character of it needs escaping.
NOTE = "note: " + "|^&~\\" * 12
#: How the reason quotes it.
QUOTED = "note: |^&~"


def answer(hub: HubThread, message: str) -> MessageView:
    (ack,) = mllp_exchange(hub.mllp_address, [message.encode()], TIMEOUT)
    return MessageView(decode_message(ack).text)


@pytest.mark.parametrize("version", ["2.2", "2.3", "2.3.1", "2.4"])
def test_msa_3_and_err_1_hold_80_characters_at_most_before_v2_5(
    hub: HubThread, version: str
) -> None:
    control_id = f"LEN-{version}"
    ack = answer(hub, make_adt(control_id, version=version, extra_segments=[NOTE]))
    assert (ack.get("MSA-1"), ack.get("MSA-2")) == ("AE", control_id)
    msa_3, err_1 = ack.raw("MSA-3"), ack.raw("ERR-1")
    assert 0 < len(msa_3) <= SHORT_TEXT_LIMIT and 0 < len(err_1) <= SHORT_TEXT_LIMIT
    assert ack.get("MSA-3").startswith("line ") and ack.get("MSA-3").endswith("...")
    assert ack.get("ERR-1.4.1") == "100" and ack.get("ERR-1.4.3") == "HL70357"
    (stored,) = [m for m in hub.store.find() if m.control_id == control_id]
    assert QUOTED in (stored.detail or "")  # the whole reason, quoting the line


def test_from_v2_5_err_8_carries_the_whole_reason(hub: HubThread) -> None:
    ack = answer(hub, make_adt("LEN-2.5", version="2.5", extra_segments=[NOTE]))
    assert ack.get("MSA-1") == "AE"
    assert len(ack.raw("ERR-8")) > SHORT_TEXT_LIMIT and QUOTED in ack.get("ERR-8")


def test_a_reason_that_fits_is_kept_whole_over_mllp(hub: HubThread) -> None:
    ack = answer(hub, make_adt("", version="2.3"))
    assert ack.get("MSA-3") == "MSH-10 (message control ID) is empty"
    assert ack.get("ERR-1.4.2") == ack.get("MSA-3")


def test_the_short_form_ends_at_a_clause_and_counts_escape_sequences() -> None:
    from carehub.hl7.ack import short_text

    seps = Separators()
    reason = (
        "line 3 is not an HL7 segment (a segment ID such as PID, then '|'): it starts "
        "'note: see chart'; the message was stored but not accepted"
    )
    assert short_text(reason, seps, 80) == (
        "line 3 is not an HL7 segment (a segment ID such as PID, then '\\F\\')..."
    )
    escaped = short_text("|" * 100, seps, 80)
    assert len(escaped) <= 80 and escaped.endswith("\\F\\...")
    assert short_text("short enough", seps, 80) == "short enough"
