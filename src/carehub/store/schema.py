"""Tables of the message store. Alembic migrations (store/migrations) create and upgrade them."""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Column,
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
)

metadata = MetaData()

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
IdType = BigInteger().with_variant(Integer(), "sqlite")


class MessageStatus(StrEnum):
    """Where a message is in its life. Every change is also a row in message_events."""

    RECEIVED = "received"  # stored and ACKed AA, waiting for routing
    REFUSED = "refused"  # stored, content refused (ACKed AE)
    REJECTED = "rejected"  # not HL7 or over the size limit (ACKed AR)
    ROUTED = "routed"
    UNROUTED = "unrouted"
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
    # MSH-3, MSH-4 and MSH-10 joined: a resend carries the same identity as the original. Only
    # accepted messages have one, so a refused or rejected frame never shadows a good resend.
    Column("identity", Text, nullable=True),
    UniqueConstraint("identity", name="uq_messages_identity"),
)
Index("ix_messages_received_at", messages.c.received_at)
Index("ix_messages_status", messages.c.status)
Index("ix_messages_type_event", messages.c.message_type, messages.c.trigger_event)
Index("ix_messages_patient", messages.c.patient_id, messages.c.patient_authority)

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


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # waiting for its turn or its next attempt
    SENDING = "sending"  # claimed by a worker until lease_until
    DELIVERED = "delivered"
    DEAD = "dead"  # gave up: attempts exhausted or refused for good; see last_error


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
    Column("outcome", String(16), nullable=False),  # ok | filtered | error
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
    Column("not_before", DateTime(timezone=True), nullable=False),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("receipt", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
Index("ix_deliveries_due", deliveries.c.status, deliveries.c.not_before)
Index("ix_deliveries_order", deliveries.c.destination, deliveries.c.order_key, deliveries.c.status)
Index("ix_deliveries_message", deliveries.c.message_id)

delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("delivery_id", IdType, ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("outcome", String(16), nullable=False),  # delivered | failed | dead
    Column("detail", Text, nullable=True),
)
Index("ix_delivery_attempts_delivery", delivery_attempts.c.delivery_id)
