"""Tables of the message store. Alembic migrations (store/migrations) create and upgrade them."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    literal_column,
)

metadata = MetaData()

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
IdType = BigInteger().with_variant(Integer(), "sqlite")
#: Text compared byte by byte: PostgreSQL's default collation may order by language rules, which
#: ignore control characters such as the separators inside a message identity.
IDENTITY_TYPE = Text().with_variant(Text(collation="C"), "postgresql")


class MessageStatus(StrEnum):
    """Where a message is in its life. Every change after intake is also a row in message_events;
    the intake status itself is read from the message row (see ``intake_detail``)."""

    RECEIVED = "received"  # stored and ACKed AA, waiting for routing
    REFUSED = "refused"  # stored, content refused (ACKed AE)
    REJECTED = "rejected"  # not HL7 or over the size limit (ACKed AR)
    ROUTED = "routed"  # routed, deliveries to make: delivered or failed once they are made
    UNROUTED = "unrouted"  # no route matched
    # Routes matched, and none had anything to deliver (filtered, or no forward): final, never
    # in flight, so a message a filter stopped is found as such, apart from those still sent.
    FILTERED = "filtered"
    DELIVERED = "delivered"
    FAILED = "failed"


messages = Table(
    "messages",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("transport", String(16), nullable=False),  # mllp | http | file
    Column("listener", String(64), nullable=False),
    Column("peer", String(255), nullable=True),
    Column("raw", LargeBinary, nullable=False),
    Column("size", Integer, nullable=False),
    Column("charset", String(32), nullable=True),
    Column("sending_application", String(255), nullable=True),
    Column("sending_facility", String(255), nullable=True),
    Column("receiving_application", String(255), nullable=True),
    Column("receiving_facility", String(255), nullable=True),
    Column("message_type", String(16), nullable=True),
    Column("trigger_event", String(16), nullable=True),
    Column("structure", String(16), nullable=True),
    Column("control_id", String(199), nullable=True),
    Column("version", String(16), nullable=True),
    Column("patient_id", String(255), nullable=True),
    Column("patient_authority", String(255), nullable=True),
    Column("ack_code", String(2), nullable=False),
    Column("status", String(16), nullable=False),
    Column("status_at", DateTime(timezone=True), nullable=False),
    Column("detail", Text, nullable=True),
    # What intake noted (a refusal reason, a character-set warning). The intake event itself
    # (received / refused / rejected at received_at) is read from this row, not written to
    # message_events: one row per message on the intake path, not two.
    Column("intake_detail", Text, nullable=True),
    # MSH-3, MSH-4, MSH-10 and a hash of the content (store.NewMessage.identity): a resend
    # carries the same identity as the original. Only accepted messages have one, so a refused
    # or rejected frame never shadows a good resend. Compared byte by byte (collation "C" on
    # PostgreSQL, SQLite's BINARY), so that every identity of one sender and control ID sorts
    # together and the index answers a range probe for them (migration 0009).
    Column("identity", IDENTITY_TYPE, nullable=True),
    UniqueConstraint("identity", name="uq_messages_identity"),
)
Index("ix_messages_received_at", messages.c.received_at)
Index("ix_messages_status", messages.c.status)
Index("ix_messages_type_event", messages.c.message_type, messages.c.trigger_event)
Index("ix_messages_patient", messages.c.patient_id, messages.c.patient_authority)

# SQLite numbers a new row after the highest id left in the table, so once retention deleted the
# newest messages their ids would come round again, and a new message would look like one the
# care records and receivers' idempotency keys already know. Retention records the highest id
# it deleted here, and intake numbers after it (PostgreSQL's identities never go back).
id_floors = Table(
    "id_floors",
    metadata,
    Column("table_name", String(64), primary_key=True),
    Column("last_id", BigInteger, nullable=False),
)

# Message ids start at 1 in every store, so what a store sends under them (delivery idempotency
# keys, FHIR message ids) must also say which store: two hubs, or a store rebuilt, sending to one
# receiver would otherwise give two patients' messages the same key. One row, made when the
# schema is created (migration 0015), changed only by `carehub store renew-identity` (after a
# restore, see MessageStore.instance_id).
store_identity = Table(
    "store_identity",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

message_events = Table(
    "message_events",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column(
        "message_id",
        IdType,
        ForeignKey("messages.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("event", String(16), nullable=False),  # a status entered, or "resent"
    Column("detail", Text, nullable=True),
)
Index("ix_message_events_message", message_events.c.message_id)
# Resends by time, for `carehub status` (migration 0012): few rows, so a partial index.
_resent = message_events.c.event == literal_column("'resent'")
Index(
    "ix_message_events_resent",
    message_events.c.at,
    sqlite_where=_resent,
    postgresql_where=_resent,
)


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # waiting for its turn or its next attempt
    SENDING = "sending"  # claimed by a worker until lease_until
    DELIVERED = "delivered"
    DEAD = "dead"  # gave up: attempts exhausted or refused for good; see last_error
    #: A dead letter an operator gave up on for good (`carehub dead-letters discard`): kept,
    #: with an attempt row saying who and when, never sent, and holding no line.
    DISCARDED = "discarded"
    #: The channel found nothing to send (a resend the receiver already has, a cancel of a
    #: notification it never had, a Task already closed at the organisation): settled, nothing
    #: went out, the reason in ``receipt``. Not a failure: no retry, no dead letter, no line held.
    SKIPPED = "skipped"


# What each route step made of a message: one row per step per routing run.
message_steps = Table(
    "message_steps",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("message_id", IdType, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("run", Integer, nullable=False),  # 1, then +1 for each reprocess
    Column("route", String(128), nullable=False),
    Column("position", Integer, nullable=False),
    Column("step", String(128), nullable=False),
    Column("outcome", String(16), nullable=False),  # ok | filtered | error | cleared
    Column("output", Text, nullable=True),  # JSON
    Column("at", DateTime(timezone=True), nullable=False),
)
Index("ix_message_steps_message", message_steps.c.message_id)

# One row per (message, route, destination): the outbox the delivery workers drain.
deliveries = Table(
    "deliveries",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("message_id", IdType, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("run", Integer, nullable=False),
    Column("route", String(128), nullable=False),
    Column("destination", String(255), nullable=False),
    Column("channel", String(64), nullable=False),
    Column("idempotency_key", String(128), nullable=False, unique=True),
    Column("order_key", String(255), nullable=False),  # patient: sent in order per destination
    Column("payload", LargeBinary, nullable=False),
    Column("content_type", String(128), nullable=False),
    Column("metadata", Text, nullable=True),  # JSON
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    # Seconds from failing_since after which a failure makes it a dead letter (its
    # destination's retry.give_up_seconds); 0 or NULL: no time limit (migration 0022).
    Column("give_up_after", Integer, nullable=True),
    # When its current run of failed attempts began; NULL until one fails, and again once a
    # dead letter is retried (migration 0022).
    Column("failing_since", DateTime(timezone=True), nullable=True),
    Column("not_before", DateTime(timezone=True), nullable=False),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    # Of last_error, what the log may show (DeliveryError.loggable): `carehub status` shows
    # this, never what the destination answered. NULL before migration 0017.
    Column("last_error_loggable", Text, nullable=True),
    Column("receipt", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # When the destination accepted it (quality measures count receipt times).
    Column("accepted_at", DateTime(timezone=True), nullable=True),
    # A dead letter's: whether the later deliveries of its line (line, order_key) wait
    # for it to be retried or discarded (the destination's retry.after_dead_letter). NULL on
    # every other delivery (migration 0010).
    Column("holds_line", Boolean, nullable=True),
    # The line the delivery keeps its patient's order in: its destination, or the line the
    # forwards that reach one receiving system share (routing.table.share_lines). NULL on
    # deliveries finished before migration 0021, whose line was their destination.
    Column("line", String(255), nullable=True),
)


def delivery_in(table: Any, *statuses: DeliveryStatus) -> ColumnElement[bool]:
    """``status = 'x'`` or ``status IN ('x', 'y')`` with the values written into the SQL, as
    in the partial indexes below. A database uses a partial index only for a query whose WHERE
    implies the index's condition; with the status as a bound parameter, SQLite re-prepares
    the statement per value to prove it, and PostgreSQL's generic plans cannot."""
    values = [literal_column(f"'{status.value}'") for status in statuses]
    return table.c.status == values[0] if len(values) == 1 else table.c.status.in_(values)


# Partial indexes over the few rows still in play (migration 0007 says why). Claims walk pending
# rows in the order they fall due (0006); the place-in-line check, the lease sweep and "anything
# unfinished?" read the unfinished ones; dead letters are listed on their own, and read by line
# for the place-in-line check (0010), as are the discarded ones listed, and the skipped ones
# counted (0016).
PENDING = (DeliveryStatus.PENDING,)
UNFINISHED = (DeliveryStatus.PENDING, DeliveryStatus.SENDING)
_pending = delivery_in(deliveries, *PENDING)
_unfinished = delivery_in(deliveries, *UNFINISHED)
_dead = delivery_in(deliveries, DeliveryStatus.DEAD)
Index(
    "ix_deliveries_due",
    deliveries.c.not_before,
    deliveries.c.id,
    sqlite_where=_pending,
    postgresql_where=_pending,
)
Index(
    "ix_deliveries_unfinished",
    deliveries.c.line,
    deliveries.c.order_key,
    deliveries.c.id,
    sqlite_where=_unfinished,
    postgresql_where=_unfinished,
)
# A destination's own (pausing it, counting what waits for it): lines may span destinations.
Index(
    "ix_deliveries_unfinished_destination",
    deliveries.c.destination,
    sqlite_where=_unfinished,
    postgresql_where=_unfinished,
)
Index("ix_deliveries_dead", deliveries.c.id, sqlite_where=_dead, postgresql_where=_dead)
Index(
    "ix_deliveries_dead_line",
    deliveries.c.line,
    deliveries.c.order_key,
    deliveries.c.id,
    sqlite_where=_dead,
    postgresql_where=_dead,
)
_discarded = delivery_in(deliveries, DeliveryStatus.DISCARDED)
Index(
    "ix_deliveries_discarded",
    deliveries.c.id,
    sqlite_where=_discarded,
    postgresql_where=_discarded,
)
_skipped = delivery_in(deliveries, DeliveryStatus.SKIPPED)
Index(
    "ix_deliveries_skipped",
    deliveries.c.id,
    sqlite_where=_skipped,
    postgresql_where=_skipped,
)
Index("ix_deliveries_message", deliveries.c.message_id)

delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("delivery_id", IdType, ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("duration_ms", Integer, nullable=False),
    # delivered | failed | failed early (not counted) | dead | skipped | discarded
    Column("outcome", String(16), nullable=False),
    Column("detail", Text, nullable=True),
)
Index("ix_delivery_attempts_delivery", delivery_attempts.c.delivery_id)

# Destinations an operator paused (`carehub destinations pause`): a row while paused, deleted
# on resume. In the store, so every worker on every host honours it; their deliveries stay
# pending, parked, and are not claimed (migration 0011). Past pauses are in operator_actions.
paused_destinations = Table(
    "paused_destinations",
    metadata,
    Column("destination", String(255), primary_key=True),
    Column("channel", String(64), nullable=True),  # as the routes had it, for status and metrics
    Column("paused_at", DateTime(timezone=True), nullable=False),
    Column("paused_by", String(255), nullable=False),
    Column("reason", Text, nullable=True),
)

# What operators did to the hub's work (reprocess, retry, discard, prune, pause, resume,
# reload): who, when, what it touched (row ids, filter text with patient values left out, a
# destination) and counts. Never message content or patient identifiers.
operator_actions = Table(
    "operator_actions",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(255), nullable=False),
    Column("command", String(64), nullable=False),  # e.g. "dead-letters retry"
    Column("target", Text, nullable=True),
    Column("counts", Text, nullable=True),  # JSON object of names to numbers
    Column("outcome", String(16), nullable=False),  # ok | none | partial | refused | failed
    Column("detail", Text, nullable=True),
)
Index("ix_operator_actions_at", operator_actions.c.at)

# Every `carehub serve` and `carehub worker` on this store while it runs: where, since when,
# when it last said so, and which route set it runs (store/processes.py). A process that stops
# removes its row; one that dies leaves it, going stale, until it is pruned a week later.
hub_processes = Table(
    "hub_processes",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("role", String(16), nullable=False),  # serve | worker
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("version", String(32), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
    Column("routes", String(64), nullable=True),  # route_set_digest of the routes it loaded
    Column("routes_loaded_at", DateTime(timezone=True), nullable=True),
    Column("partitions", Integer, nullable=True),  # queue.partitions; NULL: in-process queue
)


# -- care transitions (encounter state, notifications, follow-up clocks) ----------------------

# One row per visit: PV1-19 with the patient key, or a stand-in when PV1-19 is missing.
encounters = Table(
    "encounters",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("patient_key", String(255), nullable=False),  # authority|id, re-keyed by merges
    Column("visit_key", String(255), nullable=False),
    Column("facility", String(255), nullable=True),
    Column(
        "state", String(24), nullable=False
    ),  # registered|ed|admitted|discharged|cancelled|closed
    Column("patient_class", String(8), nullable=True),
    Column("location", String(255), nullable=True),
    Column("opened_at", DateTime(timezone=True), nullable=True),
    Column("admitted_at", DateTime(timezone=True), nullable=True),
    Column("discharged_at", DateTime(timezone=True), nullable=True),
    Column("disposition", String(16), nullable=True),
    Column("discharged_to", String(255), nullable=True),
    Column("snapshot", Text, nullable=True),  # JSON: the latest care event, for templates
    Column("last_message_id", IdType, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("patient_key", "visit_key", name="uq_encounters_visit"),
)
Index("ix_encounters_state", encounters.c.state, encounters.c.updated_at)

# What each message did to an encounter (its timeline); one row per (message, encounter).
encounter_events = Table(
    "encounter_events",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("encounter_id", IdType, ForeignKey("encounters.id", ondelete="CASCADE"), nullable=False),
    Column("message_id", IdType, nullable=True),  # None for carehub's own (stale closure)
    Column("trigger_event", String(8), nullable=True),
    Column("transition", String(32), nullable=False),  # admission, discharge, none, ...
    Column("occurred_at", DateTime(timezone=True), nullable=True),
    Column("detail", Text, nullable=True),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("message_id", "encounter_id", name="uq_encounter_events_message"),
)
Index("ix_encounter_events_encounter", encounter_events.c.encounter_id)
# The latest event of a kind (was the visit's admission told, which discharge does an A13 take
# back) without reading the whole timeline, which an update per message can make long.
Index(
    "ix_encounter_events_transition",
    encounter_events.c.encounter_id,
    encounter_events.c.transition,
    encounter_events.c.id,
)

# A40 merges: the retired patient key points at the surviving one.
patient_merges = Table(
    "patient_merges",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("retired_key", String(255), nullable=False, unique=True),
    Column("surviving_key", String(255), nullable=False),
    Column("message_id", IdType, nullable=True),
    Column("merged_at", DateTime(timezone=True), nullable=False),
)

# Every notification decided for a care-team member, sent or suppressed, with why.
notifications = Table(
    "notifications",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("encounter_id", IdType, nullable=True),
    Column("message_id", IdType, nullable=True),
    Column("patient_key", String(255), nullable=False),
    Column("recipient", String(255), nullable=False),  # roster member id or NPI
    Column("role", String(64), nullable=True),
    Column("channel", String(32), nullable=True),
    Column("address", String(255), nullable=True),
    Column("kind", String(32), nullable=False),  # ed_arrival, admission, ..., retraction, digest
    Column("status", String(16), nullable=False),  # queued|suppressed|digest|retracted
    Column("reason", Text, nullable=True),  # why suppressed / what is retracted
    Column("delivery_key", String(128), nullable=True),  # the delivery's idempotency key
    Column("created_at", DateTime(timezone=True), nullable=False),
)
Index("ix_notifications_encounter", notifications.c.encounter_id, notifications.c.recipient)
Index("ix_notifications_status", notifications.c.status)

# A patient's do-not-notify choice as the last message that said anything about it left it
# (the care-team step's opt_out_field, e.g. PD1-12): a later message with the field empty does
# not take it back, only one that says otherwise does. Re-keyed by merges, opted out if either
# record was.
patient_preferences = Table(
    "patient_preferences",
    metadata,
    Column("patient_key", String(255), primary_key=True),  # authority|id
    Column("opted_out", Boolean, nullable=False),
    Column("value", String(255), nullable=True),  # as the field said it
    Column("message_id", IdType, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Transitional-care follow-up items opened by a discharge home.
followups = Table(
    "followups",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("encounter_id", IdType, ForeignKey("encounters.id", ondelete="CASCADE"), nullable=False),
    Column("patient_key", String(255), nullable=False),
    Column("kind", String(32), nullable=False),  # contact | visit
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=False),  # open|done|overdue|cancelled
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("closed_at", DateTime(timezone=True), nullable=True),
    Column("alerted_at", DateTime(timezone=True), nullable=True),
    # Who marked it done, how (phone, visit, portal, other) and their note (migration 0023).
    Column("done_by", String(255), nullable=True),
    Column("done_method", String(32), nullable=True),
    Column("done_note", Text, nullable=True),
)
Index("ix_followups_due", followups.c.status, followups.c.due_at)
# A visit's follow-ups: found by index when a discharge opens them, and when retention deletes
# the visit (ON DELETE CASCADE looks its follow-ups up by encounter_id; without the index,
# every visit deleted scanned the whole table). Revision 0025.
Index("ix_followups_encounter", followups.c.encounter_id)


# -- closed-loop referrals (REF/RRI, webhooks, FHIR Task polls) -------------------------------
# Appended by the referral feature; Boolean could join the import list at the top of the file.

# One row per referral, keyed by the referral id the referrer issued (RF1-6, else RF1-11).
referrals = Table(
    "referrals",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("referral_key", String(255), nullable=False, unique=True),  # authority|id
    Column("patient_key", String(255), nullable=True),  # authority|id of PID-3 (MR, else first)
    # FHIR Task.status: requested|received|accepted|in-progress|on-hold (open),
    # rejected|completed|cancelled|failed (closed)
    Column("status", String(24), nullable=False),
    Column("priority", String(16), nullable=True),  # RF1-2, table 0280
    Column("type", String(64), nullable=True),  # RF1-3, table 0281
    Column("reason", Text, nullable=True),  # RF1-10 text
    Column("referring", Text, nullable=True),  # JSON: {"practitioner": ..., "organization": ...}
    Column("referred_to", Text, nullable=True),  # JSON, same shape
    Column("needs", Text, nullable=True),  # JSON list, filled by a matching step
    Column("matches", Text, nullable=True),  # JSON, filled by a matching step
    Column("due_at", DateTime(timezone=True), nullable=True),  # the responder's deadline
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("closed_at", DateTime(timezone=True), nullable=True),
    Column("alerted_at", DateTime(timezone=True), nullable=True),  # overdue alert raised
    Column("snapshot", Text, nullable=True),  # JSON: the referrer's latest care event
)
Index("ix_referrals_status", referrals.c.status, referrals.c.due_at)
Index("ix_referrals_patient", referrals.c.patient_key)

# Every update offered to a referral, applied or refused, with why (the referral's timeline).
referral_events = Table(
    "referral_events",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    # None when no referral matched (an RRI for an unknown id): the row still records it.
    Column("referral_id", IdType, ForeignKey("referrals.id", ondelete="CASCADE"), nullable=True),
    Column("referral_key", String(255), nullable=True),
    Column("message_id", IdType, nullable=True),  # None for webhooks, polls and carehub's own
    Column("source", String(64), nullable=False),  # REF^I12, RRI^I12, webhook, fhir-task-poll ...
    Column("action", String(32), nullable=False),  # created, modified, status, illegal, ...
    Column("from_status", String(24), nullable=True),
    Column("to_status", String(24), nullable=True),
    Column("accepted", Boolean, nullable=False),  # False: refused, see reason
    Column("reason", Text, nullable=True),
    Column("detail", Text, nullable=True),  # JSON
    Column("at", DateTime(timezone=True), nullable=False),
)
Index("ix_referral_events_referral", referral_events.c.referral_id)
Index("ix_referral_events_key", referral_events.c.referral_key)
Index("ix_referral_events_message", referral_events.c.message_id)


def clipped(table: Table, values: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``values`` with each of ``names`` that is text cut to its column's length.

    A coded field may come as words of any length (PV1-36 "Skilled nursing facility"):
    PostgreSQL refuses a value too long for its column, failing the whole step (and the
    care team's notice), where SQLite, the embedded default, stores it whole. Only columns
    that describe are clipped; keys are looked up by equality and must stay whole."""
    fitted = dict(values)
    for name in names:
        value = fitted.get(name)
        length = getattr(table.c[name].type, "length", None)
        if isinstance(value, str) and length is not None and len(value) > length:
            fitted[name] = value[:length]
    return fitted
