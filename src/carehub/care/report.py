"""Per-patient care-transition reports: the encounter timeline and who was told what.

Used by `carehub demo`; reads the encounters, encounter_events, notifications and
deliveries tables directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select

from carehub.events import display_name
from carehub.store.schema import deliveries, encounter_events, encounters, notifications


@dataclass(slots=True)
class PatientReport:
    patient_key: str
    name: str = ""
    visits: dict[str, str] = field(default_factory=dict)  # visit key -> current state
    timeline: list[dict[str, Any]] = field(default_factory=list)
    told: list[dict[str, Any]] = field(default_factory=list)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def patient_reports(engine: Engine) -> Iterator[PatientReport]:
    """One report per patient with an encounter, in the order patients first appeared."""
    with engine.connect() as conn:
        visits = conn.execute(select(encounters).order_by(encounters.c.id)).all()
        events = conn.execute(select(encounter_events).order_by(encounter_events.c.id)).all()
        notes = conn.execute(select(notifications).order_by(notifications.c.id)).all()
        sent = {
            r.idempotency_key: r
            for r in conn.execute(
                select(
                    deliveries.c.idempotency_key,
                    deliveries.c.status,
                    deliveries.c.receipt,
                    deliveries.c.last_error,
                    deliveries.c.accepted_at,
                )
            )
        }
    by_visit = {v.id: v for v in visits}
    reports: dict[str, PatientReport] = {}
    for visit in visits:
        report = reports.setdefault(visit.patient_key, PatientReport(visit.patient_key))
        report.visits[visit.visit_key] = visit.state
        if visit.snapshot and not report.name:
            patient = json.loads(visit.snapshot).get("patient") or {}
            report.name = display_name(patient.get("name")) or ""
    for event in events:
        visit = by_visit.get(event.encounter_id)
        if visit is None:
            continue
        reports[visit.patient_key].timeline.append(
            {
                "visit": visit.visit_key,
                "trigger": event.trigger_event or "-",
                "transition": event.transition,
                "at": _aware(event.occurred_at) or _aware(event.recorded_at),
            }
        )
    for note in notes:
        report = reports.setdefault(note.patient_key, PatientReport(note.patient_key))
        delivery = sent.get(note.delivery_key) if note.delivery_key else None
        report.told.append(
            {
                "kind": note.kind,
                "recipient": note.recipient,
                "role": note.role or "",
                "channel": note.channel or "",
                "address": note.address or "",
                "status": note.status,
                "reason": note.reason or "",
                "delivery": delivery.status if delivery else "",
                "accepted_at": _aware(delivery.accepted_at) if delivery else None,
            }
        )
    yield from reports.values()
