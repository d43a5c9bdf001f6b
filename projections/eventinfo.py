"""What the projections read from any saga event, known or not.

New event types appear as the engine grows (operator actions, for instance); a projection
running older code than the writers must still account for them. So every event, including one
whose class cannot be imported here, yields a type name, an actor and a JSON summary of its
fields, and the views treat the types they do not know generically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import Notification
from eventsourcing.utils import TopicError

__all__ = [
    "PARTICIPANT_EVENTS",
    "UnknownEvent",
    "actor_of",
    "decode",
    "event_attrs",
    "event_fields",
    "event_type",
    "json_default",
    "summary_of",
]

#: Events recorded because a participant replied.
PARTICIPANT_EVENTS = frozenset(
    {"StepSucceeded", "StepFailed", "CompensationSucceeded", "CompensationFailed", "ReplyIgnored"}
)

#: Fields every stored event has; the views keep them in columns of their own.
_ENVELOPE = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})


@dataclass(frozen=True)
class UnknownEvent:
    """An event whose class is not importable in this process: its topic and raw fields."""

    topic: str
    originator_id: UUID
    originator_version: int
    timestamp: datetime
    fields: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None


def decode(app: Application[UUID], notification: Notification) -> Any:
    """The domain event of ``notification``; an ``UnknownEvent`` if its class is unknown here."""
    try:
        return app.mapper.to_domain_event(notification)
    except TopicError:
        state = app.mapper.transcoder.decode(notification.state)
        return UnknownEvent(
            topic=notification.topic,
            originator_id=UUID(str(notification.originator_id)),
            originator_version=notification.originator_version,
            timestamp=state.get("timestamp") or datetime.fromisoformat("1970-01-01T00:00:00+00:00"),
            fields={k: v for k, v in state.items() if k not in _ENVELOPE},
        )


def event_type(event: Any) -> str:
    """The class name (``StepFailed``); for an unknown event, the name its topic ends with."""
    if isinstance(event, UnknownEvent):
        return event.topic.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    return type(event).__name__


def event_attrs(event: Any) -> Mapping[str, Any]:
    """The event's fields by name, without copying them: for reading a few (the envelope's
    may be there too)."""
    return event.fields if isinstance(event, UnknownEvent) else vars(event)


def event_fields(event: Any) -> dict[str, Any]:
    """A copy of the event's own fields (the envelope's left out)."""
    if isinstance(event, UnknownEvent):
        return dict(event.fields)
    return {k: v for k, v in vars(event).items() if k not in _ENVELOPE}


def actor_of(event: Any, kind: str | None = None) -> str:
    """Who caused the event: its ``actor`` field when it has one (operator actions),
    "participant" for the outcome of a reply, else "engine"."""
    actor = getattr(event, "actor", None)
    if isinstance(actor, str) and actor:
        return actor
    return "participant" if (kind or event_type(event)) in PARTICIPANT_EVENTS else "engine"


def json_default(value: Any) -> Any:
    if isinstance(value, UUID | Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"cannot summarise a {type(value).__name__}")


def summary_of(event: Any) -> dict[str, Any]:
    """The event's own fields as plain JSON values."""
    result: dict[str, Any] = json.loads(json.dumps(event_fields(event), default=json_default))
    return result
