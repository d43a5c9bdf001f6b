"""The audit trail: one row per saga event, in log order, never updated or deleted.

``position`` is the event's notification id in the log, so the trail is in the order things
happened across sagas, and a rebuilt trail has exactly the same rows.

``summary`` is the event's fields as JSON. The runner stores the event's own serialised state,
as the event store holds it (JSON whose UUIDs and times are tagged by eventsourcing's
transcoder): re-encoding every field would cost more than the rest of the row, and the trail
is written far more often than it is read. ``plain_summary`` turns it into plain JSON values
and leaves out what the row has columns for (saga, version, time, step, attempt, command id)
and the correlation id (the same for every event of a saga: it is in the status view).
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from projections.eventinfo import actor_of, event_attrs, event_fields, event_type, json_default

__all__ = ["audit_row", "plain_summary"]

_ENCODER = json.JSONEncoder(default=json_default, separators=(",", ":"))
_IN_COLUMNS = frozenset(
    {
        *("originator_id", "originator_version", "originator_topic", "timestamp"),
        *("correlation_id", "step", "attempt", "command_id"),
    }
)


def audit_row(event: Any, position: int, stored: str | None = None) -> dict[str, Any]:
    """The audit row of ``event``; ``stored``: its serialised state, if JSON, as summary."""
    kind = event_type(event)
    fields = event_attrs(event)
    step = fields.get("step") or fields.get("failed_step")
    attempt = fields.get("attempt")
    return {
        "position": position,
        "saga_id": event.originator_id,
        "version": event.originator_version,
        "event_type": kind,
        "step": step if isinstance(step, str) else None,
        "attempt": attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
        "command_id": _uuid(fields.get("command_id")),
        "occurred_at": event.timestamp,
        "actor": actor_of(event, kind),
        "summary": stored if stored is not None else _ENCODER.encode(event_fields(event)),
    }


def plain_summary(summary: str) -> dict[str, Any]:
    """The ``summary`` column as plain JSON values, without what has columns of its own."""
    fields = json.loads(summary)
    return {k: _untag(v) for k, v in fields.items() if k not in _IN_COLUMNS}


def _untag(value: Any) -> Any:
    if isinstance(value, dict):
        if value.keys() == {"_type_", "_data_"}:  # eventsourcing's transcoding of a type
            data = _untag(value["_data_"])
            return str(UUID(hex=data)) if value["_type_"] == "uuid_hex" else data
        return {k: _untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag(v) for v in value]
    return value


def _uuid(value: Any) -> UUID | None:
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            return None
    return None
