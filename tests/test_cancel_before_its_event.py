"""An A11 that arrives before the admission or registration it cancels: the visit stays
cancelled and nobody is told, while a real re-admission after the cancel still opens it. The
state rules through the enricher (store and memory), and the whole care route on a real hub
(MLLP intake, mail server, SMS gateway), as in test_notify."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from carehub.care.encounters import list_encounters
from tests.test_encounters import Feed, feed
from tests.test_encounters import adt as visit_message
from tests.test_notify import PCP, adt, care, gateway, mailbox, next_digest_time

__all__ = ["care", "feed", "gateway", "mailbox"]  # fixtures shared with those modules

CANCEL_AT = "20261207083000"
BEFORE_CANCEL = "20261207081000"
AFTER_CANCEL = "20261207090000"


@pytest.mark.parametrize(
    ("opener", "cls"), [("A01", "I"), ("A06", "I"), ("A04", "E"), ("A04", "O")]
)
@pytest.mark.parametrize("opened_at", [BEFORE_CANCEL, CANCEL_AT])
def test_an_opener_no_later_than_an_earlier_arriving_cancel_keeps_the_visit_cancelled(
    feed: Feed, opener: str, cls: str, opened_at: str
) -> None:
    cancel = feed.send(visit_message("A11", "K1", cls=cls, at=CANCEL_AT))
    assert (cancel.kind, cancel.state) == ("none", "cancelled")
    late = feed.send(visit_message(opener, "K2", cls=cls, at=opened_at))
    assert (late.kind, late.state) == ("none", "cancelled")
    assert late.encounter_id == cancel.encounter_id
    echo = feed.send(visit_message(opener, "K3", cls=cls, at=BEFORE_CANCEL))
    assert (echo.kind, echo.state) == ("none", "cancelled")
    # A genuinely later admission of the same visit number opens it.
    again = feed.send(visit_message("A01", "K4", cls="I", at=AFTER_CANCEL))
    assert (again.kind, again.state) == ("admission", "admitted")
    assert again.encounter_id == cancel.encounter_id


def test_an_admission_dated_before_a_cancel_that_undid_one_stays_cancelled(feed: Feed) -> None:
    """After A01 and A11 in order, a further A01 dated before the A11 is one the cancel took
    back; one dated at or after it re-admits (as after any cancel)."""
    feed.send(visit_message("A01", "M1", cls="I", at=BEFORE_CANCEL))
    cancelled = feed.send(visit_message("A11", "M2", cls="I", at=CANCEL_AT))
    assert (cancelled.kind, cancelled.state) == ("cancel_admission", "cancelled")
    late = feed.send(visit_message("A01", "M3", cls="I", at=BEFORE_CANCEL))
    assert (late.kind, late.state) == ("none", "cancelled")
    again = feed.send(visit_message("A01", "M4", cls="I", at=CANCEL_AT))
    assert (again.kind, again.state) == ("admission", "admitted")
    # Cancelled once more, the new cancel is the one later messages are weighed against.
    feed.send(visit_message("A11", "M5", cls="I", at=AFTER_CANCEL))
    stale = feed.send(visit_message("A01", "M6", cls="I", at=CANCEL_AT))
    assert (stale.kind, stale.state) == ("none", "cancelled")


def _cancel_then_an_earlier_opener(hub: Any, event: str, cls: str, visit: str) -> None:
    """An A11 for ``visit``, then the ``event`` it cancelled, dated before it: the visit stays
    cancelled and nobody is told, now or in the next digest."""
    hub.send(adt("A11", f"CAN-{visit}", cls=cls, visit=visit, when=CANCEL_AT))
    hub.settle()
    hub.send(adt(event, f"OPEN-{visit}", cls=cls, visit=visit, when=BEFORE_CANCEL))
    hub.settle()
    (found,) = list_encounters(hub.store.engine)
    assert (found.visit_key, found.state) == (f"HOSP|{visit}", "cancelled")
    assert hub.rows() == []
    assert hub.mailbox.mails == [] and hub.texts() == []
    hub.tick(next_digest_time())
    assert hub.mailbox.mails == [] and hub.texts() == []


def test_an_admission_after_an_earlier_arriving_cancel_is_not_announced(
    care: Callable[..., Any],
) -> None:
    with care() as hub:
        _cancel_then_an_earlier_opener(hub, "A01", "I", "V42")

        hub.send(adt("A01", "ADM42B", cls="I", visit="V42", when=AFTER_CANCEL))
        hub.settle()
        assert list_encounters(hub.store.engine)[0].state == "admitted"
        assert ("pcp-a", "admission", "queued") in hub.decisions()
        (mail,) = hub.mailbox.to(PCP)
        assert mail.subject == "Admission at GENERAL"


def test_an_ed_arrival_after_an_earlier_arriving_cancel_is_not_announced(
    care: Callable[..., Any],
) -> None:
    with care() as hub:
        _cancel_then_an_earlier_opener(hub, "A04", "E", "V38")
