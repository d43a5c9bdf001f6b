"""What a decision writes besides its events, handed to the recorder hook in one value."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from saga_es.messages import CommandMessage
from saga_es.state import Timer

__all__ = ["SideWrites", "parse_sqlite_time", "sqlite_time"]

_SQLITE_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"


@dataclass(frozen=True)
class SideWrites:
    """Rows that commit with the events or not at all.

    outbox: one row per command decided.
    timer: the saga's next wake-up after the decision; ``None`` deletes the saga's timer row.
    reply_id: the handled reply's message id, for the inbox (None when no reply caused it).
    """

    saga_id: UUID
    at: datetime
    outbox: tuple[CommandMessage, ...] = ()
    timer: Timer | None = None
    reply_id: UUID | None = None


def sqlite_time(moment: datetime) -> str:
    """Fixed-width UTC text, so that SQLite compares times correctly as strings."""
    return moment.astimezone(UTC).strftime(_SQLITE_TIME)


def parse_sqlite_time(text: str) -> datetime:
    return datetime.strptime(text, _SQLITE_TIME).replace(tzinfo=UTC)
