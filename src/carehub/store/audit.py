"""The trail of operator actions: who reprocessed, retried, discarded, pruned, paused, resumed
or reloaded, when, what it touched and how it went.

Kept in the store beside the work it describes, so every operator's commands on every host
land in one place. What an action touched is written as row ids, a destination or the filter
text with patient values left out; message content and patient identifiers never go in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select

from carehub.store.schema import operator_actions
from carehub.store.store import MessageStore, _aware

#: Outcomes an action is recorded with.
OK, NONE, PARTIAL, REFUSED, FAILED = "ok", "none", "partial", "refused", "failed"


@dataclass(slots=True, frozen=True)
class OperatorAction:
    id: int
    at: datetime
    actor: str
    command: str
    target: str | None
    counts: dict[str, int] = field(default_factory=dict)
    outcome: str = OK
    detail: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "command": self.command,
            "target": self.target,
            "counts": self.counts,
            "outcome": self.outcome,
            "detail": self.detail,
        }


def record_action(
    store: MessageStore,
    *,
    actor: str,
    command: str,
    target: str | None,
    counts: dict[str, int] | None = None,
    outcome: str = OK,
    detail: str | None = None,
) -> None:
    """Add one action to the trail, in a transaction of its own: the action's own writes
    have committed (or failed) by then, and the trail says which."""
    with store.engine.begin() as conn:
        conn.execute(
            insert(operator_actions).values(
                at=datetime.now(UTC),
                actor=actor[:255],
                command=command,
                target=target,
                counts=json.dumps(counts, sort_keys=True) if counts else None,
                outcome=outcome,
                detail=detail,
            )
        )


def list_actions(
    store: MessageStore, since: datetime | None = None, limit: int | None = None
) -> list[OperatorAction]:
    """Actions at or after ``since``, newest first (by the time index)."""
    query = select(operator_actions).order_by(
        operator_actions.c.at.desc(), operator_actions.c.id.desc()
    )
    if since is not None:
        query = query.where(operator_actions.c.at >= since)
    if limit:
        query = query.limit(limit)
    with store.engine.connect() as conn:
        return [
            OperatorAction(
                row.id,
                _aware(row.at),
                row.actor,
                row.command,
                row.target,
                json.loads(row.counts) if row.counts else {},
                row.outcome,
                row.detail,
            )
            for row in conn.execute(query)
        ]
