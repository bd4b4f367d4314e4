"""A resend that differs only in delimiters with nothing after them (``DOE^JANE`` against
``DOE^JANE^^^``, ``PV1|...|VN`` against ``PV1|...|VN|||``) says the same thing, so it is
recognised as a resend: answered AA and stored once. A message written without such
delimiters keeps the content digest it always had, so identities already stored still
recognise its resends."""

from __future__ import annotations

from carehub.hl7.view import MessageView
from carehub.testing import HubThread, make_adt
from tests.test_intake_integrity import exchange, with_msh7


def padded(text: str) -> str:
    """The same message with trailing empty components, fields and repetitions added."""
    return (
        text.replace("TESTPATIENT^ALEX|", "TESTPATIENT^ALEX^^^|")
        .replace("^HOSP^VN\r", "^HOSP^VN|||\r")
        .replace("|F\r", "|F^~&|\r")
    )


def test_a_resend_with_trailing_delimiters_is_recognised_as_a_resend(hub: HubThread) -> None:
    original = make_adt("TRAIL-1")
    resend = with_msh7(padded(original), "20261125090000")
    assert resend != original and "ALEX^^^|" in resend and "VN|||\r" in resend
    answers = exchange(hub, original.encode(), resend.encode(), padded(original).encode())
    assert answers == [("AA", "TRAIL-1", "")] * 3
    (stored,) = hub.store.find()
    assert stored.raw == original.encode()
    assert [c.event for c in hub.store.history(stored.id)] == ["received", "resent", "resent"]


def test_only_trailing_delimiters_are_left_out_of_the_padding_free_digest() -> None:
    """The content digest (the identity's end, hashed for every message) is the one it always
    was, so identities stored earlier still match; the padding-free digest, compared only when
    a control ID is met again, leaves trailing delimiters out, while delimiters inside a field
    or segment still tell messages apart."""
    digest = MessageView(make_adt("PIN-1")).content_digest()
    assert digest == "lT5XxzvUF5eKdyDk6qWyyg"
    assert MessageView(padded(make_adt("PIN-1"))).content_digest() != digest
    plain = MessageView(make_adt("PIN-1")).padding_free_digest()
    assert MessageView(padded(make_adt("PIN-1"))).padding_free_digest() == plain
    moved = make_adt("PIN-1", name="TESTPATIENT^^ALEX")  # an empty component in the middle
    assert MessageView(moved).padding_free_digest() != plain
    shifted = make_adt("PIN-1").replace("|F\r", "||F\r")  # PID-8 moved to PID-9
    assert MessageView(shifted).padding_free_digest() != plain


def test_a_new_message_that_reuses_a_control_id_is_still_stored(hub: HubThread) -> None:
    """The padding-free comparison is no loophole: other content under a used control ID is
    a new message, stored and noted."""
    first = make_adt("TRAIL-2")
    other = padded(make_adt("TRAIL-2", patient_id="P0002"))
    answers = exchange(hub, first.encode(), other.encode())
    assert answers == [("AA", "TRAIL-2", "")] * 2
    assert len(hub.store.find()) == 2
