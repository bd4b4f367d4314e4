"""Closed-loop referral state from REF/RRI and CBO updates: each rule, through the real store
and in memory (dry runs), plus the command line."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect, select

from carehub.builtins.event_translator import translate_v2_to_event
from carehub.components import ComponentContext, Work
from carehub.errors import CarehubError
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView
from carehub.referrals.cli import referrals as referrals_cli
from carehub.referrals.state import (
    CLOSED_STATUSES,
    STATUSES,
    TRANSITIONS,
    ReferralEvent,
    ReferralRecord,
    ReferralStateEnricher,
    ReferralStateError,
    ReferralTracker,
    ReferralTransition,
    is_allowed,
    list_referrals,
    referral_timeline,
)
from carehub.routing.dryrun import preview_message
from carehub.store.schema import MessageStatus, referral_events, referrals
from carehub.store.store import MessageStore, NewMessage, sqlite_url

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 27, 17, 0, tzinfo=UTC)


# -- messages ----------------------------------------------------------------------------------

RP = (
    "PRD|RP^Referring provider^HL70286|Haddad^Samir^^^Dr|1200 Medical Pkwy^^Springfield^IL^62701"
    "||||1184629371^NPI"
)
RT = (
    "PRD|RT^Referred to provider^HL70286|Springfield Community Food Bank"
    "|900 Market St^^Springfield^IL^62703"
)
PID = "PID|1||RG100234^^^RGH^MR||Okafor^Amara^N||19580312|F|||418 Birch Lane^^Springfield^IL^62704"
DG1 = "DG1|1||Z59.41^Food insecurity^I10||20261127|F"


def ref(
    trigger: str,
    control_id: str,
    *,
    ref_id: str = "R-1^RGH",
    priority: str = "R^Routine^HL70280",
    reason: str = "Z59.41^Food insecurity",
    referred_to: str | None = RT,
) -> str:
    """A REF^I12..I15 from the referring hospital (RF1, PRD RP/RT, PID, DG1)."""
    segments = [
        f"MSH|^~\\&|RGH_REF|RIVERSIDE_GH|CAREHUB|CAREHUB|20261127120000-0500||REF^{trigger}^REF_I12"
        f"|{control_id}|P|2.5",
        f"RF1|P^Pending^HL70283|{priority}|SO^Social services^HL70281|R^Referral^HL70282||{ref_id}"
        f"|20261127|20261227||{reason}",
        RP,
        *([referred_to] if referred_to else []),
        PID,
        DG1,
    ]
    return "\r".join(segments) + "\r"


def rri(
    trigger: str,
    control_id: str,
    status: str,
    *,
    ref_id: str = "R-1^RGH",
    external_id: str = "FB-77^SCFB",
) -> str:
    """An RRI^I12..I15 from the food bank: RF1-1 carries its answer (table 0283)."""
    segments = [
        f"MSH|^~\\&|FOODBANK|SCFB|RGH_REF|RIVERSIDE_GH|20261128090000-0500||RRI^{trigger}^RRI_I12"
        f"|{control_id}|P|2.5",
        "MSA|AA|RGH-REF-1",
        f"RF1|{status}|R^Routine^HL70280|SO^Social services^HL70281|||{ref_id}|||||{external_id}",
        RP,
        RT,
        PID,
        "NTE|1||Intake call booked",
    ]
    return "\r".join(segments) + "\r"


# -- harness -----------------------------------------------------------------------------------


class Feed:
    """Sends messages through the enricher the way the router does (translator first)."""

    def __init__(self, enricher: ReferralStateEnricher, store: MessageStore | None) -> None:
        self.enricher = enricher
        self.store = store
        self.next_id = 1

    def send(
        self, text: str, message_id: int | None = None, *, untracked: bool = False
    ) -> ReferralTransition:
        """``untracked``: a message tied to no referral, whose step fails the route."""
        if message_id is None:
            message_id, self.next_id = self.next_id, self.next_id + 1
        work = Work(message=preview_message(text.encode(), message_id), route="refs", v2=text)
        work.event = translate_v2_to_event(work.view)
        if untracked:
            with pytest.raises(ReferralStateError, match="not tracked"):
                self.enricher.enrich(work)
            transition = work.data["referral"]
            assert isinstance(transition, ReferralTransition)
            return transition
        output = self.enricher.enrich(work)
        transition = work.data["referral"]
        assert isinstance(transition, ReferralTransition)
        assert output == transition.as_output()
        json.dumps(output)  # step outputs are stored as JSON
        return transition

    @property
    def tracker(self) -> ReferralTracker:
        return self.enricher.tracker

    def referral(self, key: str | int = "RGH|R-1") -> ReferralRecord:
        rec = self.tracker.referral(key)
        assert rec is not None
        return rec

    def events(self, key: str | int = "RGH|R-1") -> list[ReferralEvent]:
        return self.tracker.events(key)

    def all_events(self) -> list[tuple[str | None, str, bool, str | None]]:
        """Every timeline row, matched or not: (key, action, accepted, reason)."""
        if self.store is None:
            rows = [e for _, e in self.tracker.memory.events]
            return [(e.referral_key, e.action, e.accepted, e.reason) for e in rows]
        with self.store.engine.connect() as conn:
            found = conn.execute(select(referral_events).order_by(referral_events.c.id)).all()
        return [(r.referral_key, r.action, bool(r.accepted), r.reason) for r in found]

    def referral_count(self) -> int:
        if self.store is None:
            return len(self.tracker.memory.referrals)
        with self.store.engine.connect() as conn:
            return len(conn.execute(select(referrals.c.id)).all())


def make_enricher(
    tmp_path: Path, store: MessageStore | None, hours: float = 72
) -> ReferralStateEnricher:
    options = ReferralStateEnricher.Options(response_hours=hours)
    return ReferralStateEnricher(options, ComponentContext(tmp_path, tmp_path, store))


PG = "postgresql+psycopg://{role}@127.0.0.1:5432/test"


@pytest.fixture
def pg_store() -> Iterator[MessageStore]:
    """A migrated store in a fresh schema of the local PostgreSQL test database (skipped
    without one): the row locks and the Boolean column only really run there."""
    psycopg = pytest.importorskip("psycopg")
    role = None
    for candidate in ("postgres", "root"):
        try:
            with psycopg.connect(
                host="127.0.0.1", port=5432, user=candidate, dbname="test", connect_timeout=3
            ):
                role = candidate
                break
        except psycopg.Error:
            continue
    if role is None:
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432 (database test)")
    schema = f"carehub_referrals_{uuid.uuid4().hex[:12]}"

    def admin(sql: str) -> None:
        with psycopg.connect(
            host="127.0.0.1", port=5432, user=role, dbname="test", autocommit=True
        ) as conn:
            conn.execute(sql)

    admin(f'CREATE SCHEMA "{schema}"')
    opened = MessageStore(PG.format(role=role) + f"?options=-csearch_path%3D{schema}")
    try:
        opened.migrate()
        yield opened
    finally:
        opened.close()
        admin(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["store", "memory", pytest.param("postgresql", marks=pytest.mark.postgres)])
def feed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Feed]:
    """Every rule runs over the store's tables (SQLite, and PostgreSQL when there is one) and
    in memory (store None: dry runs)."""
    if request.param == "memory":
        enricher = make_enricher(tmp_path, None)
        enricher.tracker.clock = lambda: T0
        yield Feed(enricher, None)
        return
    if request.param == "postgresql":
        opened = request.getfixturevalue("pg_store")
        enricher = make_enricher(tmp_path, opened)
        enricher.tracker.clock = lambda: T0
        yield Feed(enricher, opened)
        return
    opened = MessageStore(sqlite_url(tmp_path))
    opened.migrate()
    enricher = make_enricher(tmp_path, opened)
    enricher.tracker.clock = lambda: T0
    yield Feed(enricher, opened)
    opened.close()


# -- the transition table ------------------------------------------------------------------------


def test_transition_table_is_closed_and_one_way() -> None:
    assert set(TRANSITIONS) == set(STATUSES)
    for source, targets in TRANSITIONS.items():
        assert targets <= set(STATUSES)
        assert source not in targets  # staying put is "unchanged", not a transition
        assert "requested" not in targets  # only the requester sets requested, at creation
    for closed in CLOSED_STATUSES:
        assert TRANSITIONS[closed] == frozenset()
    assert is_allowed("requested", "accepted") and is_allowed("on-hold", "in-progress")
    assert not is_allowed("accepted", "received")  # no going back
    assert not is_allowed("cancelled", "completed")
    assert not is_allowed("draft", "requested")  # not a tracked status


# -- the main path -------------------------------------------------------------------------------


def test_new_referral_then_responses_close_the_loop(feed: Feed) -> None:
    created = feed.send(ref("I12", "REF-1"))
    assert (created.action, created.from_status, created.to_status, created.status) == (
        "created",
        None,
        "requested",
        "requested",
    )
    assert created.accepted and created.changed and not created.notify_referrer
    assert created.source == "REF^I12" and created.referral_key == "RGH|R-1"
    assert created.patient_key == "RGH|RG100234"
    summary = created.summary
    assert summary["patient_name"] == "Amara Okafor"
    assert summary["referring_name"] == "Dr Samir Haddad"
    assert summary["referred_to_name"] == "Springfield Community Food Bank"
    assert summary["reason"] == "Food insecurity"
    assert summary["diagnoses"][0]["code"] == "Z59.41"

    rec = feed.referral()
    assert rec.status == "requested" and rec.priority == "R" and rec.type == "SO"
    assert rec.referring["practitioner"]["id"] == "1184629371"
    assert rec.referred_to["organization"]["name"] == "Springfield Community Food Bank"
    assert rec.created_at == T0 and rec.due_at == T0 + timedelta(hours=72)
    assert rec.needs == [] and rec.matches is None and rec.closed_at is None

    pending = feed.send(rri("I12", "RRI-1", "P^Pending^HL70283"))
    assert (pending.action, pending.from_status, pending.to_status) == (
        "status",
        "requested",
        "received",
    )
    assert pending.notify_referrer and pending.source == "RRI^I12"

    accepted = feed.send(rri("I12", "RRI-2", "A^Accepted^HL70283"))
    assert (accepted.from_status, accepted.status) == ("received", "accepted")
    assert accepted.notify_referrer and not accepted.closes_loop

    again = feed.send(rri("I15", "RRI-3", "A"))  # an answer to a status inquiry: no news
    assert (again.action, again.accepted, again.changed) == ("unchanged", True, False)
    assert not again.notify_referrer

    working = feed.tracker.advance("RGH|R-1", "in-progress", "webhook", {"by": "cbo-portal"})
    assert (working.action, working.from_status, working.status) == (
        "status",
        "accepted",
        "in-progress",
    )
    assert working.notify_referrer and working.message_id is None

    done = feed.tracker.advance("RGH|R-1", "completed", "fhir-task-poll", {"task": "Task/9"})
    assert done.status == "completed" and done.closes_loop and done.notify_referrer
    assert feed.referral().closed_at == T0

    timeline = feed.events()
    assert [(e.source, e.action, e.from_status, e.to_status, e.accepted) for e in timeline] == [
        ("REF^I12", "created", None, "requested", True),
        ("RRI^I12", "status", "requested", "received", True),
        ("RRI^I12", "status", "received", "accepted", True),
        ("RRI^I15", "unchanged", "accepted", "accepted", True),
        ("webhook", "status", "accepted", "in-progress", True),
        ("fhir-task-poll", "status", "in-progress", "completed", True),
    ]
    assert timeline[1].detail["control_id"] == "RRI-1"
    assert timeline[1].detail["responder"]["external_id"] == {"value": "FB-77", "authority": "SCFB"}
    assert timeline[1].detail["responder"]["notes"] == ["Intake call booked"]
    assert timeline[4].detail["by"] == "cbo-portal"
    assert timeline[5].detail["task"] == "Task/9"


@pytest.mark.parametrize(
    ("code", "status"),
    [("R^Rejected^HL70283", "rejected"), ("E^Expired^HL70283", "failed"), ("A", "accepted")],
)
def test_rf1_status_codes(feed: Feed, code: str, status: str) -> None:
    feed.send(ref("I12", "REF-1"))
    answer = feed.send(rri("I12", "RRI-1", code))
    assert (answer.action, answer.status, answer.notify_referrer) == ("status", status, True)
    assert (feed.referral().closed_at is not None) == (status in CLOSED_STATUSES)


def test_sample_feed_referral(feed: Feed) -> None:
    """The REF^I12 from config/feeds: its RF1-6 has no assigning authority, so the sending
    facility (MSH-4) stands for it."""
    text = (PROJECT_ROOT / "config" / "feeds" / "07-riverside-sdoh-referral.hl7").read_text()
    created = feed.send(text)
    key = "RIVERSIDE_GH|RGH-R-2026-0042"
    assert (created.action, created.referral_key) == ("created", key)
    assert feed.referral(key).reason == "Food and housing support after discharge"


def test_two_hospitals_numbering_alike_place_two_referrals(feed: Feed) -> None:
    """Riverside's and Lakeview's R-5000, with no authority in RF1-6: two referrals, not a
    second taken for a resend of the first (dropped, nothing sent); each hospital's cancel
    reaches its own; an answer naming only "R-5000" matches neither (it cannot tell which)."""
    riverside = ref("I12", "TWO-1", ref_id="R-5000")
    lakeview = ref("I12", "TWO-2", ref_id="R-5000").replace(
        "|RGH_REF|RIVERSIDE_GH|", "|LMC_REF|LAKEVIEW_MC|"
    )
    assert "|LMC_REF|LAKEVIEW_MC|" in lakeview
    first, second = feed.send(riverside), feed.send(lakeview)
    assert (first.action, second.action) == ("created", "created")
    riverside_key, lakeview_key = "RIVERSIDE_GH|R-5000", "LAKEVIEW_MC|R-5000"
    assert (first.referral_key, second.referral_key) == (riverside_key, lakeview_key)
    cancel = ref("I14", "TWO-3", ref_id="R-5000").replace(
        "|RGH_REF|RIVERSIDE_GH|", "|LMC_REF|LAKEVIEW_MC|"
    )
    assert feed.send(cancel).action == "cancelled"
    assert feed.referral(lakeview_key).status == "cancelled"
    assert feed.referral(riverside_key).status == "requested"
    answer = feed.send(rri("I12", "TWO-4", "A", ref_id="R-5000"))
    assert answer.action == "unknown_referral"


# -- resends and modifies ------------------------------------------------------------------------


def test_resend_and_replay_are_idempotent(feed: Feed) -> None:
    first = feed.send(ref("I12", "REF-1"), message_id=10)
    replay = feed.send(ref("I12", "REF-1"), message_id=10)  # same message routed again
    assert replay == first
    assert len(feed.events()) == 1

    resend = feed.send(ref("I12", "REF-1b"), message_id=11)  # re-sent under a new MSH-10
    assert (resend.action, resend.changed, resend.status) == ("resend", False, "requested")
    assert resend.accepted and not resend.notify_referrer
    assert resend.note and "already on file" in resend.note
    assert feed.referral_count() == 1

    feed.send(rri("I12", "RRI-1", "A"), message_id=12)
    replayed = feed.send(rri("I12", "RRI-1", "A"), message_id=12)
    assert (replayed.action, replayed.from_status, replayed.notify_referrer) == (
        "status",
        "requested",
        True,  # the recorded result, exactly as the first run decided it
    )
    assert [e.action for e in feed.events()] == ["created", "resend", "status"]
    resend_after = feed.send(ref("I12", "REF-1c"), message_id=13)
    assert (resend_after.action, resend_after.status) == ("resend", "accepted")


def test_modify_updates_fields_and_keeps_status(feed: Feed) -> None:
    feed.send(ref("I12", "REF-1"))
    feed.send(rri("I12", "RRI-1", "P"))
    modified = feed.send(
        ref("I13", "REF-2", priority="S^STAT^HL70280", reason="^Urgent food need", referred_to=None)
    )
    assert (modified.action, modified.from_status, modified.to_status, modified.status) == (
        "modified",
        "received",
        "received",
        "received",
    )
    assert modified.accepted and not modified.changed and not modified.notify_referrer
    rec = feed.referral()
    assert (rec.priority, rec.reason) == ("S", "Urgent food need")
    # A modify without PRD RT keeps the referred-to party.
    assert rec.referred_to["organization"]["name"] == "Springfield Community Food Bank"
    assert feed.events()[-1].detail["fields"] == ["priority", "reason"]

    same = feed.send(
        ref("I13", "REF-3", priority="S^STAT^HL70280", reason="^Urgent food need", referred_to=None)
    )
    assert same.action == "modified" and same.note == "nothing changed"


def test_modify_of_unknown_referral_creates_it(feed: Feed) -> None:
    created = feed.send(ref("I13", "REF-9", ref_id="R-9^RGH"))
    assert (created.action, created.status, created.referral_key) == (
        "created",
        "requested",
        "RGH|R-9",
    )
    assert created.note and "never seen" in created.note


def test_status_request_is_recorded_only(feed: Feed) -> None:
    feed.send(ref("I12", "REF-1"))
    asked = feed.send(ref("I15", "REF-2"))
    assert (asked.action, asked.status, asked.changed, asked.accepted) == (
        "status_request",
        "requested",
        False,
        True,
    )
    assert feed.referral().status == "requested"
    assert [e.source for e in feed.events()] == ["REF^I12", "REF^I15"]


# -- cancels and refused updates -----------------------------------------------------------------


def test_cancel_then_completion_is_refused_with_a_reason(feed: Feed) -> None:
    feed.send(ref("I12", "REF-1"))
    feed.send(rri("I12", "RRI-1", "A"))
    cancelled = feed.send(ref("I14", "REF-2"))
    assert (cancelled.action, cancelled.from_status, cancelled.status) == (
        "cancelled",
        "accepted",
        "cancelled",
    )
    assert not cancelled.notify_referrer  # the referrer cancelled it itself
    assert feed.referral().closed_at is not None

    confirmed = feed.send(rri("I14", "RRI-2", "A"))
    assert (confirmed.action, confirmed.accepted, confirmed.status) == (
        "cancel_confirmed",
        True,
        "cancelled",
    )

    late = feed.tracker.advance("RGH|R-1", "completed", "webhook")
    assert (late.action, late.accepted, late.changed, late.notify_referrer) == (
        "illegal",
        False,
        False,
        False,
    )
    assert (late.from_status, late.to_status, late.status) == (
        "cancelled",
        "completed",
        "cancelled",
    )
    assert late.reason == "illegal transition cancelled -> completed"

    late_rri = feed.send(rri("I12", "RRI-3", "A"))
    assert late_rri.reason == "illegal transition cancelled -> accepted"
    assert feed.referral().status == "cancelled"

    twice = feed.send(ref("I14", "REF-3"))
    assert (twice.action, twice.accepted) == ("unchanged", True)

    refused = [(e.from_status, e.to_status, e.reason) for e in feed.events() if not e.accepted]
    assert refused == [
        ("cancelled", "completed", "illegal transition cancelled -> completed"),
        ("cancelled", "accepted", "illegal transition cancelled -> accepted"),
    ]

    closed_modify = feed.send(ref("I13", "REF-4", priority="S"))
    assert (closed_modify.action, closed_modify.accepted) == ("illegal", False)
    assert closed_modify.reason and "closed referral" in closed_modify.reason
    assert feed.referral().priority == "R"


def test_response_for_unknown_referral_is_recorded_not_created(feed: Feed) -> None:
    answer = feed.send(rri("I12", "RRI-1", "A", ref_id="NOPE^RGH", external_id=""))
    assert (answer.action, answer.accepted, answer.referral_id) == ("unknown_referral", False, None)
    assert (answer.referral_key, answer.to_status) == ("RGH|NOPE", "accepted")
    assert answer.reason == "no referral RGH|NOPE"
    assert feed.referral_count() == 0
    assert feed.all_events() == [("RGH|NOPE", "unknown_referral", False, "no referral RGH|NOPE")]

    cancel = feed.send(ref("I14", "REF-1", ref_id="NOPE2^RGH"), untracked=True)
    assert (cancel.action, cancel.accepted) == ("unknown_referral", False)
    status = feed.send(ref("I15", "REF-2", ref_id="NOPE3^RGH"), untracked=True)
    assert (status.action, status.accepted) == ("unknown_referral", False)
    assert feed.referral_count() == 0

    # The I12 arrives after its answer (feeds reorder): the refused row joins its timeline,
    # and the answer is applied just after the referral it overtook.
    created = feed.send(ref("I12", "REF-3", ref_id="NOPE^RGH"))
    assert created.early_answer is not None and created.early_answer["status"] == "accepted"
    assert [(e.action, e.accepted) for e in feed.events("RGH|NOPE")] == [
        ("unknown_referral", False),
        ("created", True),
        ("status", True),
    ]
    assert feed.referral("RGH|NOPE").status == "accepted"


def test_regression_and_unknown_codes_are_refused(feed: Feed) -> None:
    feed.send(ref("I12", "REF-1"))
    feed.send(rri("I12", "RRI-1", "A"))
    back = feed.send(rri("I12", "RRI-2", "P"))
    assert (back.action, back.accepted, back.reason) == (
        "illegal",
        False,
        "illegal transition accepted -> received",
    )
    odd = feed.send(rri("I12", "RRI-3", "X^Whatever"))
    assert (odd.action, odd.accepted) == ("unknown_status", False)
    assert odd.reason and "table 0283" in odd.reason
    assert feed.referral().status == "accepted"


def test_response_echoing_the_bare_id_matches(feed: Feed) -> None:
    feed.send(ref("I12", "REF-1"))
    answer = feed.send(rri("I12", "RRI-1", "A", ref_id="R-1", external_id=""))
    assert (answer.action, answer.referral_key, answer.status) == ("status", "RGH|R-1", "accepted")


def test_referrer_ids_match_exactly_and_like_wildcards_do_not(feed: Feed) -> None:
    feed.send(ref("I12", "REF-1"))
    # The referrer knows its own ids: a bare R-1 from it is another referral, not a resend,
    # numbered in its sending facility's name.
    other = feed.send(ref("I12", "REF-2", ref_id="R-1"))
    assert (other.action, other.referral_key) == ("created", "RIVERSIDE_GH|R-1")
    # An answer naming R-1 bare could be either: refused rather than guessed.
    echo = feed.send(rri("I12", "RRI-1", "A", ref_id="R-1", external_id=""))
    assert (echo.action, echo.reason) == ("unknown_referral", "no referral R-1")
    named = feed.send(rri("I12", "RRI-1B", "A", ref_id="R-1^RIVERSIDE_GH", external_id=""))
    assert named.referral_key == "RIVERSIDE_GH|R-1" and named.status == "accepted"
    # Two referrals share the bare id 5 under different authorities: an echo without the
    # authority is ambiguous, so it is refused rather than guessed.
    feed.send(ref("I12", "REF-4", ref_id="5^NORTH"))
    feed.send(ref("I12", "REF-5", ref_id="5^SOUTH"))
    unsure = feed.send(rri("I12", "RRI-3", "A", ref_id="5", external_id=""))
    assert (unsure.action, unsure.reason) == ("unknown_referral", "no referral 5")
    feed.send(ref("I12", "REF-3", ref_id="R_9^RGH"))
    lookalike = feed.send(rri("I12", "RRI-2", "A", ref_id="RX9", external_id=""))
    assert (lookalike.action, lookalike.accepted) == ("unknown_referral", False)
    assert feed.referral("RGH|R_9").status == "requested"


def test_message_without_referral_id_or_not_a_referral(feed: Feed) -> None:
    missing = feed.send(rri("I12", "RRI-1", "A", ref_id="", external_id=""), untracked=True)
    assert (missing.action, missing.accepted) == ("no_referral_id", False)
    assert missing.reason and "RF1-6" in missing.reason

    adt = "\r".join(
        [
            "MSH|^~\\&|ADT|MAIN|CAREHUB|CAREHUB|20261125083000||ADT^A01^ADT_A01|ADT-1|P|2.5",
            "EVN|A01|20261125083000",
            PID,
        ]
    )
    other = feed.send(adt)
    assert (other.action, other.accepted) == ("not_a_referral", False)
    assert feed.referral_count() == 0


def test_advance_checks_and_records(feed: Feed) -> None:
    unknown = feed.tracker.advance("RGH|NONE", "accepted", "webhook")
    assert (unknown.action, unknown.accepted, unknown.reason) == (
        "unknown_referral",
        False,
        "no referral RGH|NONE",
    )
    feed.send(ref("I12", "REF-1"))
    bogus = feed.tracker.advance("RGH|R-1", "ready", "fhir-task-poll")
    assert (bogus.action, bogus.accepted) == ("unknown_status", False)
    held = feed.tracker.advance("RGH|R-1", "on-hold", "fhir-task-poll")
    resumed = feed.tracker.advance("RGH|R-1", "in-progress", "fhir-task-poll")
    failed = feed.tracker.advance("RGH|R-1", "failed", "webhook", {"why": "unreachable"})
    assert [t.status for t in (held, resumed, failed)] == ["on-hold", "in-progress", "failed"]
    assert failed.closes_loop and failed.notify_referrer
    operator = feed.tracker.advance("RGH|R-1", "requested", "carehub")
    assert (operator.accepted, operator.reason) == (False, "illegal transition failed -> requested")
    assert feed.events()[-2].detail["why"] == "unreachable"
    assert ("RGH|NONE", "unknown_referral", False, "no referral RGH|NONE") in feed.all_events()


# -- overdue -------------------------------------------------------------------------------------


def test_overdue_detection_and_alerts(feed: Feed) -> None:
    feed.send(ref("I12", "REF-1"))
    feed.send(ref("I12", "REF-2", ref_id="R-2^RGH"))
    feed.send(ref("I12", "REF-3", ref_id="R-3^RGH"))
    feed.send(rri("I12", "RRI-1", "P", ref_id="R-2^RGH"))  # received: still waiting
    feed.send(rri("I12", "RRI-2", "A", ref_id="R-3^RGH"))  # answered: never overdue
    tracker = feed.tracker

    assert tracker.overdue(T0 + timedelta(hours=71)) == []
    late = tracker.overdue(T0 + timedelta(hours=73))
    assert sorted(r.referral_key for r in late) == ["RGH|R-1", "RGH|R-2"]
    # A shorter setting applies to referrals already open.
    assert len(tracker.overdue(T0 + timedelta(hours=2), response_hours=1)) == 2
    assert tracker.overdue(T0 + timedelta(minutes=30), response_hours=1) == []

    ids = [r.id for r in late if r.id is not None]
    now = T0 + timedelta(hours=73)
    assert tracker.mark_alerted(ids, now) == sorted(ids)
    assert tracker.mark_alerted(ids, now) == []  # once, ever
    assert tracker.overdue(T0 + timedelta(hours=200)) == []
    alert = feed.events()[-1]
    assert (alert.source, alert.action, alert.accepted) == ("carehub", "overdue_alert", True)
    assert feed.referral().alerted_at == now

    # The step's tick only logs; the notify step alerts the care coordinator and marks it.
    feed.send(ref("I12", "REF-4", ref_id="R-4^RGH"))
    feed.enricher.tick(T0 + timedelta(hours=100))
    assert feed.referral("RGH|R-4").alerted_at is None
    assert [r.referral_key for r in tracker.overdue(T0 + timedelta(hours=100))] == ["RGH|R-4"]


def test_enricher_needs_the_event(tmp_path: Path) -> None:
    enricher = make_enricher(tmp_path, None)
    text = ref("I12", "REF-1")
    work = Work(message=preview_message(text.encode(), 1), route="refs", v2=text)
    with pytest.raises(ReferralStateError, match="v2-to-event"):
        enricher.enrich(work)


def test_dry_run_messages_share_id_zero(tmp_path: Path) -> None:
    """Dry runs give every message id 0: MSH-3/4/10 keep them apart."""
    feed = Feed(make_enricher(tmp_path, None), None)
    feed.send(ref("I12", "REF-1"), message_id=0)
    answer = feed.send(rri("I12", "RRI-1", "A"), message_id=0)
    assert answer.action == "status"
    assert feed.send(rri("I12", "RRI-1", "A"), message_id=0) == answer


# -- the store -----------------------------------------------------------------------------------


def test_migration_creates_the_tables(tmp_path: Path) -> None:
    store = MessageStore(sqlite_url(tmp_path))
    try:
        store.migrate()
        assert (store.schema_revision() or "") >= "0004"  # referrals arrived in 0004
        names = set(inspect(store.engine).get_table_names())
        assert {"referrals", "referral_events"} <= names
        columns = {c["name"] for c in inspect(store.engine).get_columns("referral_events")}
        assert {"referral_id", "message_id", "source", "from_status", "to_status"} <= columns
        assert {"accepted", "reason", "detail", "at"} <= columns
    finally:
        store.close()


def _store_message(store: MessageStore, text: str) -> int:
    new = NewMessage(
        raw=text.encode(),
        transport="mllp",
        listener="test",
        peer=None,
        status=MessageStatus.RECEIVED,
        ack_code="AA",
        header=MessageHeader.read(MessageView(text)),
        charset="utf-8",
    )
    return store.insert_messages([new])[0].message_id


def _seed(store: MessageStore, tmp_path: Path, created: datetime = T0) -> Feed:
    enricher = make_enricher(tmp_path, store)
    enricher.tracker.clock = lambda: created
    feed = Feed(enricher, store)
    texts = [
        ref("I12", "CLI-1"),
        rri("I12", "CLI-2", "A"),
        ref("I14", "CLI-3"),
        ref("I12", "CLI-4", ref_id="R-2^RGH"),
    ]
    for text in texts:
        feed.send(text, message_id=_store_message(store, text))
    feed.tracker.advance("RGH|R-1", "completed", "webhook")
    return feed


def test_queries(tmp_path: Path) -> None:
    store = MessageStore(sqlite_url(tmp_path))
    store.migrate()
    try:
        _seed(store, tmp_path)
        engine = store.engine
        assert {r.referral_key for r in list_referrals(engine)} == {"RGH|R-1", "RGH|R-2"}
        assert [r.referral_key for r in list_referrals(engine, open_only=True)] == ["RGH|R-2"]
        assert list_referrals(engine, overdue_now=T0 + timedelta(hours=1)) == []
        late = list_referrals(engine, overdue_now=T0 + timedelta(hours=80))
        assert [r.referral_key for r in late] == ["RGH|R-2"]
        assert [r.status for r in list_referrals(engine, status="cancelled")] == ["cancelled"]
        assert len(list_referrals(engine, patient="RG100234")) == 2

        timeline = referral_timeline(engine, "RGH|R-1")
        assert timeline is not None
        assert [(e.action, e.detail.get("control_id")) for e in timeline.events] == [
            ("created", "CLI-1"),
            ("status", "CLI-2"),
            ("cancelled", "CLI-3"),
            ("illegal", None),
        ]
        by_id = referral_timeline(engine, timeline.referral.id or 0)
        by_value = referral_timeline(engine, "R-1")
        assert by_id is not None and by_value is not None
        assert by_id.referral.id == by_value.referral.id == timeline.referral.id
        assert referral_timeline(engine, "nope") is None
        json.dumps(timeline.as_output())
    finally:
        store.close()


# -- the command line ----------------------------------------------------------------------------


def test_cli_list_and_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CAREHUB_CONFIG", "CAREHUB_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store = MessageStore(sqlite_url(data_dir))
    store.migrate()
    # The CLI judges "overdue" by the real clock: these referrals were made ten days ago.
    feed = _seed(store, tmp_path, created=datetime.now(UTC) - timedelta(days=10))
    r1 = feed.referral("RGH|R-1")
    store.close()

    runner = CliRunner(env={"COLUMNS": "200"})
    base = ["--data-dir", str(data_dir)]
    listed = runner.invoke(referrals_cli, ["list", *base], catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    text = ANSI.sub("", listed.output)
    assert "RGH|R-1" in text and "cancelled" in text and "2 referral(s)" in text
    assert "Springfield Community Food Bank" in text
    assert "OVERDUE" in text  # R-2 is long past its 72 h

    opened = runner.invoke(referrals_cli, ["list", *base, "--open", "--json"])
    rows = [json.loads(line) for line in opened.output.splitlines()]
    assert [(r["referral_key"], r["status"], r["overdue"]) for r in rows] == [
        ("RGH|R-2", "requested", True)
    ]
    overdue = runner.invoke(referrals_cli, ["list", *base, "--overdue", "--json"])
    assert [json.loads(line)["referral_key"] for line in overdue.output.splitlines()] == ["RGH|R-2"]

    shown = runner.invoke(referrals_cli, ["show", str(r1.id), *base], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    text = ANSI.sub("", shown.output)
    for expected in (
        "Amara Okafor",
        "REF^I12",
        "RRI^I12",
        "REF^I14",
        "webhook",
        "requested -> accepted",
        "accepted -> cancelled",
        "CLI-2",
        "REFUSED: illegal transition cancelled -> completed",
    ):
        assert expected in text, expected

    detail = runner.invoke(referrals_cli, ["show", "RGH|R-1", *base, "--json"])
    data = json.loads(detail.output)
    assert data["referral"]["status"] == "cancelled"
    assert [(e["source"], e["accepted"]) for e in data["timeline"]] == [
        ("REF^I12", True),
        ("RRI^I12", True),
        ("REF^I14", True),
        ("webhook", False),
    ]
    assert data["timeline"][3]["reason"] == "illegal transition cancelled -> completed"

    missing = runner.invoke(referrals_cli, ["show", "999", *base])
    assert missing.exit_code != 0


def test_show_takes_a_numeric_referral_id_before_a_row_id(tmp_path: Path) -> None:
    """Row 1 is R-1; a referral the hospital numbered "1" sits in a later row. "1" shows the
    referral numbered 1 (it showed row 1, another patient's referral); "#1" shows row 1; an
    id two senders used is an error naming both keys."""
    store = MessageStore(sqlite_url(tmp_path))
    store.migrate()
    try:
        feed = _seed(store, tmp_path)
        for text in (
            ref("I12", "NUM-1", ref_id="1^RGH"),
            ref("I12", "NUM-2", ref_id="7^RGH"),
            ref("I12", "NUM-3", ref_id="7^LMC"),
        ):
            feed.send(text, message_id=_store_message(store, text))
        engine = store.engine
        first_row = referral_timeline(engine, "#1")
        numbered_one = referral_timeline(engine, "1")
        assert first_row is not None and numbered_one is not None
        assert first_row.referral.referral_key == "RGH|R-1"
        assert numbered_one.referral.referral_key == "RGH|1"
        with pytest.raises(CarehubError, match=r"'7' was used by 2 senders: give one of LMC\|7"):
            referral_timeline(engine, "7")
        assert referral_timeline(engine, "LMC|7") is not None
    finally:
        store.close()
