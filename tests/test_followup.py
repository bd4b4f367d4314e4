"""TCM follow-up clocks: due-date arithmetic, opening/cancelling/completing items in memory and in
a real SQLite store, overdue alerts that fire once, the route step and the CLI."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner, Result
from pydantic import ValidationError
from sqlalchemy import insert, select

from carehub.care.followup import (
    CANCELLED,
    DONE,
    OPEN,
    OVERDUE,
    BusinessCalendar,
    DischargeFacts,
    FollowupClock,
    FollowupEnricher,
    FollowupError,
    FollowupMemory,
    FollowupPolicy,
    MissingTransitionError,
    discharge_facts,
    followups,
    load_holidays,
    normalize_disposition,
)
from carehub.care.model import Transition
from carehub.cli import main
from carehub.components import ComponentContext, Work
from carehub.errors import ConfigError
from carehub.events import CareEvent, Encounter
from carehub.store.schema import encounters
from carehub.store.schema import followups as followups_table
from carehub.store.store import MessageStore, StoredMessage, sqlite_url

EST = timezone(timedelta(hours=-5))
NEW_YORK = ZoneInfo("America/New_York")
FRIDAY_2PM = datetime(2026, 11, 20, 14, 0, tzinfo=EST)  # Friday 20 Nov 2026
MEMORIAL_DAY = date(2026, 5, 25)  # a Monday


def end_of(day: date, tz: timezone | ZoneInfo | None = EST) -> datetime:
    return datetime(day.year, day.month, day.day, 23, 59, 59, 999999, tzinfo=tz)


def discharge(
    encounter_id: int | None = 1,
    disposition: str | None = "01",
    at: datetime | None = FRIDAY_2PM,
    patient_key: str = "HOSP|1001",
    **summary: object,
) -> Transition:
    facts: dict[str, object] = {"disposition": disposition, **summary}
    if at is not None:
        facts["discharged_at"] = at.isoformat()
    return Transition(
        kind="discharge",
        encounter_id=encounter_id,
        patient_key=patient_key,
        trigger_event="A03",
        state="discharged",
        summary=facts,
    )


def cancel(encounter_id: int = 1) -> Transition:
    return Transition(
        kind="cancel_discharge",
        encounter_id=encounter_id,
        patient_key="HOSP|1001",
        trigger_event="A13",
        state="admitted",
    )


# -- calendar --------------------------------------------------------------------------------
class TestBusinessCalendar:
    def test_friday_discharge_contact_due_end_of_tuesday(self) -> None:
        due = BusinessCalendar().add_business_days(FRIDAY_2PM, 2)
        assert due == end_of(date(2026, 11, 24))
        assert due.strftime("%A") == "Tuesday"

    @pytest.mark.parametrize("day", [21, 22])  # Saturday, Sunday
    def test_weekend_discharge_counts_from_monday(self, day: int) -> None:
        start = datetime(2026, 11, day, 9, 0, tzinfo=EST)
        assert BusinessCalendar().add_business_days(start, 1) == end_of(date(2026, 11, 23))
        assert BusinessCalendar().add_business_days(start, 2) == end_of(date(2026, 11, 24))

    def test_midweek_discharge(self) -> None:
        wednesday = datetime(2026, 11, 18, 23, 50, tzinfo=EST)
        assert BusinessCalendar().add_business_days(wednesday, 2) == end_of(date(2026, 11, 20))

    def test_monday_holiday_pushes_due_date(self) -> None:
        friday = datetime(2026, 5, 22, 10, 0, tzinfo=EST)
        assert BusinessCalendar().add_business_days(friday, 2) == end_of(date(2026, 5, 26))
        with_holiday = BusinessCalendar({MEMORIAL_DAY})
        assert with_holiday.add_business_days(friday, 2) == end_of(date(2026, 5, 27))

    def test_thanksgiving_thursday_and_friday(self) -> None:
        calendar = BusinessCalendar({date(2026, 11, 26), date(2026, 11, 27)})
        wednesday = datetime(2026, 11, 25, 16, 0, tzinfo=EST)
        assert calendar.add_business_days(wednesday, 2) == end_of(date(2026, 12, 1))

    def test_zero_days_is_end_of_day_or_next_business_day(self) -> None:
        calendar = BusinessCalendar()
        assert calendar.add_business_days(FRIDAY_2PM, 0) == end_of(date(2026, 11, 20))
        saturday = datetime(2026, 11, 21, 9, 0, tzinfo=EST)
        assert calendar.add_business_days(saturday, 0) == end_of(date(2026, 11, 23))

    def test_calendar_days_ignore_weekends_and_holidays(self) -> None:
        calendar = BusinessCalendar({date(2026, 11, 26)})
        assert calendar.add_days(FRIDAY_2PM, 7) == end_of(date(2026, 11, 27))
        assert calendar.add_days(FRIDAY_2PM, 14) == end_of(date(2026, 12, 4))

    def test_day_is_the_hospitals_local_day(self) -> None:
        # 23:30 Friday in New York is already Saturday in UTC; the local Friday still counts.
        late_friday_utc = datetime(2026, 11, 21, 4, 30, tzinfo=UTC)
        calendar = BusinessCalendar(zone=NEW_YORK)
        due = calendar.add_business_days(late_friday_utc, 2)
        assert due == end_of(date(2026, 11, 24), NEW_YORK)
        # Without a zone the instant is read in its own offset (UTC here): Saturday counts
        # from Monday, so the answer happens to agree, but the due time is UTC's midnight.
        assert BusinessCalendar().add_business_days(late_friday_utc, 2) == end_of(
            date(2026, 11, 24), UTC
        )

    def test_zone_follows_daylight_saving(self) -> None:
        friday = datetime(2026, 3, 6, 12, 0, tzinfo=NEW_YORK)  # EST; DST starts Sunday 8 March
        due = BusinessCalendar(zone=NEW_YORK).add_business_days(friday, 2)
        assert due.utcoffset() == timedelta(hours=-4)
        assert due.astimezone(UTC) == datetime(2026, 3, 11, 3, 59, 59, 999999, tzinfo=UTC)

    def test_naive_time_with_zone_is_local(self) -> None:
        naive = datetime(2026, 11, 20, 14, 0)
        due = BusinessCalendar(zone=NEW_YORK).add_business_days(naive, 2)
        assert due == end_of(date(2026, 11, 24), NEW_YORK)

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError):
            BusinessCalendar(weekend=range(7))
        with pytest.raises(ValueError):
            BusinessCalendar(weekend=(7,))
        with pytest.raises(ValueError):
            BusinessCalendar().add_business_days(FRIDAY_2PM, -1)

    def test_custom_weekend(self) -> None:
        # Friday/Saturday weekend: Thursday + 2 business days = Monday.
        thursday = datetime(2026, 11, 19, 9, 0, tzinfo=EST)
        calendar = BusinessCalendar(weekend=(4, 5))
        assert calendar.add_business_days(thursday, 2) == end_of(date(2026, 11, 23))


class TestHolidays:
    def test_iso_strings_and_dates(self) -> None:
        assert load_holidays(["2026-05-25", date(2026, 7, 3)]) == {MEMORIAL_DAY, date(2026, 7, 3)}

    @pytest.mark.parametrize(
        "text",
        [
            "- 2026-05-25\n- '2026-07-03'\n",
            "holidays:\n  - {date: 2026-05-25, name: Memorial Day}\n  - date: '2026-07-03'\n",
            "2026-05-25: Memorial Day\n2026-07-03: Independence Day (observed)\n",
        ],
    )
    def test_yaml_file_forms(self, tmp_path: Path, text: str) -> None:
        path = tmp_path / "holidays.yaml"
        path.write_text(text, encoding="utf-8")
        assert load_holidays(["2026-12-25"], path) == {
            MEMORIAL_DAY,
            date(2026, 7, 3),
            date(2026, 12, 25),
        }

    def test_bad_entries_are_config_errors(self, tmp_path: Path) -> None:
        path = tmp_path / "holidays.yaml"
        path.write_text("- next tuesday\n", encoding="utf-8")
        with pytest.raises(ConfigError, match="not an ISO date"):
            load_holidays([], path)
        with pytest.raises(ConfigError, match="cannot read"):
            load_holidays([], tmp_path / "missing.yaml")
        with pytest.raises(ConfigError, match="not an ISO date"):
            load_holidays(["25/12/2026"])


# -- discharge facts -------------------------------------------------------------------------
def test_normalize_disposition() -> None:
    assert normalize_disposition(1) == "01"
    assert normalize_disposition("6") == "06"
    assert normalize_disposition("01^Home") == "01"
    assert normalize_disposition("") is None
    assert normalize_disposition(None) is None


def test_discharge_facts_from_summary_nested_or_hl7_time() -> None:
    flat = discharge_facts(discharge(disposition="1", patient_class="i"))
    assert (flat.disposition, flat.discharged_at, flat.patient_class) == ("01", FRIDAY_2PM, "I")
    nested = Transition(
        kind="discharge",
        encounter_id=1,
        patient_key="HOSP|1001",
        summary={
            "encounter": {"discharge_disposition": "06", "discharge_time": "202611201400-0500"}
        },
    )
    facts = discharge_facts(nested)
    assert (facts.disposition, facts.discharged_at) == ("06", FRIDAY_2PM)


def test_policy_reasons() -> None:
    policy = FollowupPolicy()
    assert policy.why_not(DischargeFacts("01", None, "I")) is None
    assert "not a discharge home" in (policy.why_not(DischargeFacts("03", None, "I")) or "")
    assert "PV1-36" in (policy.why_not(DischargeFacts(None, None, "I")) or "")
    assert "patient class E" in (policy.why_not(DischargeFacts("01", None, "E")) or "")


# -- the clock, in memory and in a real store ------------------------------------------------
def seeded(store: MessageStore) -> MessageStore:
    """Migrate and add encounters 1 and 2 (followups.encounter_id is a foreign key to
    encounters)."""
    store.migrate()
    now = datetime(2026, 11, 20, 19, 0, tzinfo=UTC)
    with store.engine.begin() as conn:
        for encounter_id, patient in ((1, "HOSP|1001"), (2, "HOSP|2002")):
            conn.execute(
                insert(encounters).values(
                    id=encounter_id,
                    patient_key=patient,
                    visit_key=f"V{encounter_id}",
                    state="discharged",
                    created_at=now,
                    updated_at=now,
                )
            )
    return store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MessageStore]:
    """A migrated SQLite store under tmp_path/data with encounters 1 and 2."""
    data = tmp_path / "data"
    data.mkdir()
    opened = seeded(MessageStore(sqlite_url(data)))
    yield opened
    opened.close()


PG = "postgresql+psycopg://{role}@127.0.0.1:5432/test"


@pytest.fixture
def pg_store() -> Iterator[MessageStore]:
    """The same in a fresh schema of the local PostgreSQL test database (skipped without one)."""
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
    schema = f"carehub_followup_{uuid.uuid4().hex[:12]}"

    def admin(sql: str) -> None:
        with psycopg.connect(
            host="127.0.0.1", port=5432, user=role, dbname="test", autocommit=True
        ) as conn:
            conn.execute(sql)

    admin(f'CREATE SCHEMA "{schema}"')
    opened = MessageStore(PG.format(role=role) + f"?options=-csearch_path%3D{schema}")
    try:
        yield seeded(opened)
    finally:
        opened.close()
        admin(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def clock(request: pytest.FixtureRequest) -> FollowupClock:
    if request.param == "memory":
        return FollowupClock(FollowupMemory())
    fixture = "store" if request.param == "sqlite" else "pg_store"
    return FollowupClock(request.getfixturevalue(fixture).engine)


NOW = datetime(2026, 11, 20, 20, 0, tzinfo=UTC)  # Friday 15:00 in New York


class TestClock:
    def test_discharge_home_opens_contact_and_visit(self, clock: FollowupClock) -> None:
        opened = clock.open_for_discharge(discharge(), NOW)
        assert [(i.kind, i.status) for i in opened] == [("contact", OPEN), ("visit", OPEN)]
        contact, visit = opened
        assert contact.due_at == end_of(date(2026, 11, 24)).astimezone(UTC)
        assert visit.due_at == end_of(date(2026, 12, 4)).astimezone(UTC)
        assert contact.due_at.tzinfo is UTC
        assert clock.find(encounter_id=1) == opened
        assert clock.get(contact.id) == contact

    @pytest.mark.parametrize("code", ["01", "06", "07", "08"])
    def test_every_home_disposition_opens(self, clock: FollowupClock, code: str) -> None:
        assert len(clock.open_for_discharge(discharge(disposition=code), NOW)) == 2

    @pytest.mark.parametrize("code", ["03", "02", "20", None])
    def test_non_home_dispositions_open_nothing(self, clock: FollowupClock, code: str) -> None:
        assert clock.open_for_discharge(discharge(disposition=code), NOW) == []
        assert clock.find(statuses=None) == []

    def test_ed_discharge_opens_nothing(self, clock: FollowupClock) -> None:
        assert clock.open_for_discharge(discharge(patient_class="E"), NOW) == []

    def test_not_a_discharge_opens_nothing(self, clock: FollowupClock) -> None:
        assert clock.open_for_discharge(cancel(), NOW) == []

    def test_seven_day_visit(self, clock: FollowupClock) -> None:
        clock.policy = FollowupPolicy(visit_days=7)
        visit = clock.open_for_discharge(discharge(), NOW)[1]
        assert visit.due_at == end_of(date(2026, 11, 27)).astimezone(UTC)

    def test_holiday_calendar_applies(self, clock: FollowupClock) -> None:
        clock.calendar = BusinessCalendar({date(2026, 11, 23)})  # Monday off
        contact = clock.open_for_discharge(discharge(), NOW)[0]
        assert contact.due_at == end_of(date(2026, 11, 25)).astimezone(UTC)

    def test_missing_discharge_time_starts_now(self, clock: FollowupClock) -> None:
        contact = clock.open_for_discharge(discharge(at=None), NOW)[0]
        assert contact.due_at == end_of(date(2026, 11, 24), UTC)

    def test_resend_does_not_open_twice(self, clock: FollowupClock) -> None:
        first = clock.open_for_discharge(discharge(), NOW)
        assert clock.open_for_discharge(discharge(), NOW + timedelta(minutes=5)) == []
        assert clock.find(statuses=None) == first
        # Done items still count: a reprocessed A03 must not reopen finished work.
        clock.complete(first[0].id, NOW)
        clock.complete(first[1].id, NOW)
        assert clock.open_for_discharge(discharge(), NOW) == []
        # Another encounter is independent.
        assert len(clock.open_for_discharge(discharge(encounter_id=2), NOW)) == 2

    def test_cancel_discharge_cancels_pending_items(self, clock: FollowupClock) -> None:
        contact, visit = clock.open_for_discharge(discharge(), NOW)
        clock.complete(contact.id, NOW + timedelta(hours=1))
        later = NOW + timedelta(hours=2)
        cancelled = clock.cancel_for_encounter(1, later)
        assert [(i.id, i.status, i.closed_at) for i in cancelled] == [(visit.id, CANCELLED, later)]
        assert clock.get(contact.id).status == DONE  # type: ignore[union-attr]
        assert clock.cancel_for_encounter(1, later) == []
        assert clock.find() == []

    def test_discharge_after_cancel_opens_fresh_items(self, clock: FollowupClock) -> None:
        clock.open_for_discharge(discharge(), NOW)
        clock.cancel_for_encounter(1, NOW)
        monday = datetime(2026, 11, 23, 10, 0, tzinfo=EST)
        reopened = clock.open_for_discharge(discharge(at=monday), NOW)
        assert [i.due_at for i in reopened] == [
            end_of(date(2026, 11, 25)).astimezone(UTC),
            end_of(date(2026, 12, 7)).astimezone(UTC),
        ]
        assert len(clock.find(statuses=None)) == 4

    def test_complete(self, clock: FollowupClock) -> None:
        contact, visit = clock.open_for_discharge(discharge(), NOW)
        done = clock.complete(contact.id, NOW + timedelta(hours=3))
        assert (done.status, done.closed_at) == (DONE, NOW + timedelta(hours=3))
        assert clock.complete(contact.id, NOW + timedelta(days=1)) == done  # idempotent
        clock.cancel_for_encounter(1, NOW)
        with pytest.raises(FollowupError, match="cancelled"):
            clock.complete(visit.id, NOW)
        with pytest.raises(FollowupError, match="no follow-up 999"):
            clock.complete(999, NOW)

    def test_overdue_alerts_once(self, clock: FollowupClock) -> None:
        contact, visit = clock.open_for_discharge(discharge(), NOW)
        assert clock.due_alerts(contact.due_at) == []  # due at, not past due
        wednesday = contact.due_at + timedelta(microseconds=1)
        alerts = clock.due_alerts(wednesday)
        assert [(a.id, a.kind, a.encounter_id, a.patient_key) for a in alerts] == [
            (contact.id, "contact", 1, "HOSP|1001")
        ]
        assert alerts[0].due_at == contact.due_at
        assert clock.due_alerts(wednesday) == alerts  # reading marks nothing
        assert clock.mark_alerted([a.id for a in alerts], wednesday) == [contact.id]
        assert clock.mark_alerted([contact.id], wednesday) == []  # a second worker gets nothing
        assert clock.due_alerts(wednesday + timedelta(days=1)) == []
        marked = clock.get(contact.id)
        assert marked is not None
        assert (marked.status, marked.alerted_at) == (OVERDUE, wednesday)
        # Overdue is still pending work: it lists, and it can be done.
        assert [i.id for i in clock.find(due_before=wednesday)] == [contact.id]
        assert clock.complete(contact.id, wednesday).status == DONE
        # The visit falls due later and alerts on its own.
        late = visit.due_at + timedelta(hours=1)
        assert [a.id for a in clock.overdue(late)] == [visit.id]
        assert clock.overdue(late) == []

    def test_done_and_cancelled_items_never_alert(self, clock: FollowupClock) -> None:
        contact, _visit = clock.open_for_discharge(discharge(), NOW)
        clock.complete(contact.id, NOW)
        clock.open_for_discharge(discharge(encounter_id=2, patient_key="HOSP|2002"), NOW)
        clock.cancel_for_encounter(2, NOW)
        assert [a.kind for a in clock.due_alerts(NOW + timedelta(days=30))] == ["visit"]
        assert clock.mark_alerted([], NOW) == []

    def test_find_filters(self, clock: FollowupClock) -> None:
        clock.open_for_discharge(discharge(), NOW)
        clock.open_for_discharge(discharge(encounter_id=2, patient_key="HOSP|2002"), NOW)
        assert {i.encounter_id for i in clock.find(patient_key="HOSP|2002")} == {2}
        assert len(clock.find(limit=3)) == 3
        due = [i.due_at for i in clock.find()]
        assert due == sorted(due)


def test_store_rows_are_utc(store: MessageStore) -> None:
    FollowupClock(store.engine).open_for_discharge(discharge(), NOW)
    with store.engine.connect() as conn:
        row = conn.execute(select(followups_table).order_by(followups_table.c.id)).first()
    assert row is not None
    # SQLite keeps the wall clock only: it must be UTC's (Wednesday 04:59 UTC = Tuesday EST).
    assert row.due_at.replace(tzinfo=UTC) == end_of(date(2026, 11, 24)).astimezone(UTC)
    assert (row.encounter_id, row.patient_key, row.kind, row.status) == (
        1,
        "HOSP|1001",
        "contact",
        OPEN,
    )


# -- the route step --------------------------------------------------------------------------
def message(received_at: datetime = NOW) -> StoredMessage:
    return StoredMessage(
        id=1,
        received_at=received_at,
        transport="mllp",
        listener="test",
        peer=None,
        raw=b"MSH|^~\\&|",
        size=9,
        charset=None,
        sending_application="ADT",
        sending_facility="HOSP",
        receiving_application=None,
        receiving_facility=None,
        message_type="ADT",
        trigger_event="A03",
        structure="ADT_A03",
        control_id="1",
        version="2.5.1",
        patient_id="1001",
        patient_authority="HOSP",
        ack_code="AA",
        status="received",
        status_at=received_at,
        detail=None,
    )


def work_for(transition: Transition | None, received_at: datetime = NOW) -> Work:
    work = Work(message=message(received_at), route="adt", v2="MSH|^~\\&|")
    if transition is not None:
        work.data["encounter"] = transition
    return work


def enricher(
    tmp_path: Path, store: MessageStore | None = None, **options: object
) -> FollowupEnricher:
    return FollowupEnricher(
        FollowupEnricher.Options.model_validate(options),
        ComponentContext(tmp_path, tmp_path / "data", store),
    )


class TestEnricher:
    def test_options_accept_yaml_values(self) -> None:
        # What yaml.safe_load makes of `[01, 06, 08]` and of unquoted dates.
        opts = FollowupEnricher.Options.model_validate(
            {"home_dispositions": [1, 6, "08"], "holidays": ["2026-05-25", date(2026, 7, 3)]}
        )
        assert opts.home_dispositions == ["01", "06", "08"]
        assert opts.holidays == [MEMORIAL_DAY, date(2026, 7, 3)]
        assert FollowupEnricher.name == "follow-up-clock"

    @pytest.mark.parametrize(
        "bad",
        [{"visit_days": 10}, {"timezone": "Mars/Olympus"}, {"contact_business_days": -1}, {"x": 1}],
    )
    def test_bad_options(self, bad: dict[str, object]) -> None:
        with pytest.raises(ValidationError):
            FollowupEnricher.Options.model_validate(bad)

    def test_bad_holidays_file_fails_at_build(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"missing\.yaml"):
            enricher(tmp_path, holidays_file="missing.yaml")

    def test_a_missing_holidays_file_names_the_route_file_line_and_step(
        self, tmp_path: Path
    ) -> None:
        """As every other route option error: where it is written, not only the file path."""
        (tmp_path / "routes").mkdir()
        (tmp_path / "carehub.yaml").write_text("routes: [routes/care.yaml]\n")
        (tmp_path / "routes" / "care.yaml").write_text(
            "routes:\n"
            "  - name: care\n"
            "    steps:\n"
            "      - translate: v2-to-event\n"
            "      - enrich: {use: encounter-state}\n"
            "      - enrich: {use: follow-up-clock, holidays_file: nope.yaml}\n"
        )
        result = CliRunner().invoke(
            main, ["routes", "check", "--offline", "--config", str(tmp_path / "carehub.yaml")]
        )
        assert result.exit_code == 2, result.output
        assert "routes/care.yaml:6: route 'care': steps[2]" in result.stderr
        assert "nope.yaml: cannot read the holidays file" in result.stderr

    def test_missing_transition_is_a_clear_error(self, tmp_path: Path) -> None:
        with pytest.raises(MissingTransitionError, match="encounter-state"):
            enricher(tmp_path).enrich(work_for(None))

    def test_memory_mode_opens_then_recognises_a_resend(self, tmp_path: Path) -> None:
        step = enricher(tmp_path, visit_days=7)
        work = work_for(discharge())
        output = step.enrich(work)
        assert output["action"] == "opened"
        assert output["disposition"] == "01"
        assert output["discharged_at"] == FRIDAY_2PM.isoformat()
        assert [(i["kind"], i["due_at"]) for i in output["items"]] == [
            ("contact", "2026-11-25T04:59:59.999999+00:00"),
            ("visit", "2026-11-28T04:59:59.999999+00:00"),
        ]
        assert [i.kind for i in work.data["followups"]] == ["contact", "visit"]
        json.dumps(output)  # JSON-ready for message_steps.output

        resent = work_for(discharge())
        again = step.enrich(resent)
        assert again["action"] == "already_opened"
        assert [i["id"] for i in again["items"]] == [i["id"] for i in output["items"]]
        assert resent.data["followups"] == work.data["followups"]

    def test_store_mode_and_cancel(self, tmp_path: Path, store: MessageStore) -> None:
        step = enricher(tmp_path, store)
        assert step.enrich(work_for(discharge()))["action"] == "opened"
        assert len(FollowupClock(store.engine).find()) == 2
        work = work_for(cancel())
        output = step.enrich(work)
        assert output["action"] == "cancelled"
        assert [i["status"] for i in output["items"]] == [CANCELLED, CANCELLED]
        assert work.data["followups"] == []
        assert FollowupClock(store.engine).find() == []
        assert step.enrich(work_for(cancel()))["action"] == "none"

    def test_store_attached_after_build(self, tmp_path: Path, store: MessageStore) -> None:
        # The hub binds routes first and attaches the store in start().
        step = enricher(tmp_path)
        step.context.store = store
        step.enrich(work_for(discharge()))
        assert len(FollowupClock(store.engine).find()) == 2
        assert step.memory.items == {}

    def test_nothing_to_do(self, tmp_path: Path) -> None:
        step = enricher(tmp_path)
        snf = step.enrich(work_for(discharge(disposition="03")))
        assert snf["action"] == "none"
        assert "03" in snf["reason"]
        admission = Transition(kind="admission", encounter_id=1, patient_key="HOSP|1001")
        assert step.enrich(work_for(admission)) == {
            "transition": "admission",
            "encounter_id": 1,
            "action": "none",
            "reason": "not a discharge",
        }
        orphan = step.enrich(work_for(discharge(encounter_id=None)))
        assert orphan["action"] == "none"
        assert step.memory.items == {}

    def test_no_discharge_time_uses_receipt_time(self, tmp_path: Path) -> None:
        step = enricher(tmp_path)
        saturday = datetime(2026, 11, 21, 15, 0, tzinfo=UTC)
        output = step.enrich(work_for(discharge(at=None), received_at=saturday))
        assert output["discharged_at"] == saturday.isoformat()
        assert output["items"][0]["due_at"] == "2026-11-24T23:59:59.999999+00:00"

    def test_facts_fall_back_to_the_care_event(self, tmp_path: Path) -> None:
        # A bare Transition: disposition, time and class come from the message's own PV1.
        bare = Transition(kind="discharge", encounter_id=3, patient_key="HOSP|1001")
        work = work_for(bare)
        work.event = CareEvent(
            kind="discharge",
            message_type="ADT",
            trigger_event="A03",
            encounter=Encounter(
                patient_class="I", discharge_disposition="06", discharge_time=FRIDAY_2PM
            ),
        )
        output = enricher(tmp_path).enrich(work)
        assert (output["action"], output["disposition"]) == ("opened", "06")
        assert output["discharged_at"] == FRIDAY_2PM.isoformat()
        ed = work_for(bare)
        ed.event = work.event.model_copy(
            update={"encounter": Encounter(patient_class="E", discharge_disposition="01")}
        )
        assert "patient class E" in enricher(tmp_path).enrich(ed)["reason"]

    def test_holidays_file_and_timezone(self, tmp_path: Path) -> None:
        (tmp_path / "holidays.yaml").write_text("- 2026-11-23\n", encoding="utf-8")
        step = enricher(
            tmp_path,
            holidays=["2026-11-24"],
            holidays_file="holidays.yaml",
            timezone="America/New_York",
        )
        # Naive PV1-45 read as New York time; Mon and Tue are holidays -> end of Thursday.
        naive = Transition(
            kind="discharge",
            encounter_id=7,
            patient_key="HOSP|1001",
            summary={"disposition": "06", "discharged_at": "2026-11-20T14:00:00"},
        )
        output = step.enrich(work_for(naive))
        assert output["items"][0]["due_at"] == "2026-11-27T04:59:59.999999+00:00"

    def test_configured_dispositions(self, tmp_path: Path) -> None:
        step = enricher(tmp_path, home_dispositions=["01", "50"])
        assert step.enrich(work_for(discharge(disposition="06")))["action"] == "none"
        assert step.enrich(work_for(discharge(disposition="50")))["action"] == "opened"


# -- commands --------------------------------------------------------------------------------
@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CAREHUB_* settings from the developer's shell."""
    for name in list(os.environ):
        if name.startswith("CAREHUB_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(followups, list(args), catch_exceptions=False)


@pytest.mark.usefixtures("cli_env")
class TestCommands:
    def seed(self, store: MessageStore) -> tuple[int, int, int]:
        """Encounter 1 discharged in 2020 (long overdue), encounter 2 with future due dates."""
        clock = FollowupClock(store.engine)
        old = clock.open_for_discharge(discharge(at=datetime(2020, 1, 3, 14, 0, tzinfo=EST)), NOW)
        future = datetime.now(UTC) + timedelta(days=1)
        clock.open_for_discharge(discharge(encounter_id=2, patient_key="HOSP|2002", at=future), NOW)
        return old[0].id, old[1].id, len(clock.find())

    def test_list_overdue_and_done(self, tmp_path: Path, store: MessageStore) -> None:
        contact_id, visit_id, total = self.seed(store)
        data_dir = str(tmp_path / "data")

        listed = invoke("list", "--data-dir", data_dir, "--json")
        assert listed.exit_code == 0, listed.output
        assert len(listed.output.splitlines()) == total == 4

        overdue = invoke("list", "--overdue", "--data-dir", data_dir, "--json")
        rows = [json.loads(line) for line in overdue.output.splitlines()]
        assert [(r["id"], r["kind"], r["patient_key"]) for r in rows] == [
            (contact_id, "contact", "HOSP|1001"),
            (visit_id, "visit", "HOSP|1001"),
        ]
        assert rows[0]["due_at"] == "2020-01-08T04:59:59.999999+00:00"

        table = invoke("list", "--overdue", "--data-dir", data_dir)
        assert "HOSP|1001" in table.output and "HOSP|2002" not in table.output
        assert "2 follow-up(s)" in table.output

        done = invoke("done", str(contact_id), "--data-dir", data_dir)
        assert done.exit_code == 0, done.output
        assert f"follow-up {contact_id} (contact, HOSP|1001) done" in done.output
        after = invoke("list", "--overdue", "--data-dir", data_dir, "--json")
        assert [json.loads(line)["id"] for line in after.output.splitlines()] == [visit_id]
        everything = invoke("list", "--all", "--data-dir", data_dir, "--json")
        statuses = {
            json.loads(line)["id"]: json.loads(line)["status"]
            for line in everything.output.splitlines()
        }
        assert statuses[contact_id] == DONE

    def test_list_by_patient(self, tmp_path: Path, store: MessageStore) -> None:
        self.seed(store)
        out = invoke(
            "list", "--patient", "HOSP|2002", "--data-dir", str(tmp_path / "data"), "--json"
        )
        assert {json.loads(line)["encounter_id"] for line in out.output.splitlines()} == {2}

    def test_done_errors(self, tmp_path: Path, store: MessageStore) -> None:
        contact_id, _visit_id, _total = self.seed(store)
        FollowupClock(store.engine).cancel_for_encounter(1, NOW)
        data_dir = str(tmp_path / "data")
        # Through the carehub command, as a person runs it: an unknown id is a one-line
        # error with exit 2, as for every other command.
        missing = CliRunner().invoke(main, ["followups", "done", "999", "--data-dir", data_dir])
        assert missing.exit_code == 2
        assert "error: no follow-up 999" in missing.output
        cancelled = CliRunner().invoke(
            main, ["followups", "done", str(contact_id), "--data-dir", data_dir]
        )
        assert cancelled.exit_code == 2
        assert "cancelled" in cancelled.output
