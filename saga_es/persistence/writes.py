"""What decisions write besides their events, handed to the recorder in one value.

Several decisions (for different sagas, or successive ones for the same saga) may commit in
one transaction; ``SideWrites.of`` merges what they write.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from saga_es.messages import CommandMessage
from saga_es.state import Timer

__all__ = ["InboxEntry", "SideWrites", "parse_sqlite_time", "sqlite_time"]

_SQLITE_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"


@dataclass(frozen=True)
class InboxEntry:
    message_id: UUID
    saga_id: UUID
    received_at: datetime


@dataclass(frozen=True)
class SideWrites:
    """Rows that commit with the events or not at all.

    outbox: one row per command decided, in decision order.
    inbox: the handled replies' message ids (a repeat violates the key and aborts it all).
    timers: each saga's next wake-up after its last decision here.
    cleared_timers: sagas left with no wake-up.
    """

    outbox: tuple[CommandMessage, ...] = ()
    inbox: tuple[InboxEntry, ...] = ()
    timers: tuple[tuple[UUID, Timer], ...] = ()
    cleared_timers: tuple[UUID, ...] = ()

    @classmethod
    def of(cls, decisions: Iterable[tuple[Any, UUID | None]]) -> SideWrites:
        """Merge ``(decision, reply id or None)`` pairs, in the order they were decided."""
        outbox: list[CommandMessage] = []
        inbox: list[InboxEntry] = []
        final_timer: dict[UUID, Timer | None] = {}
        for decision, reply_id in decisions:
            saga_id = decision.state.saga_id
            outbox.extend(decision.commands)
            if reply_id is not None:
                inbox.append(InboxEntry(reply_id, saga_id, decision.events[-1].timestamp))
            final_timer[saga_id] = decision.timer  # the last decision for a saga wins
        return cls(
            outbox=tuple(outbox),
            inbox=tuple(inbox),
            timers=tuple((s, t) for s, t in final_timer.items() if t is not None),
            cleared_timers=tuple(s for s, t in final_timer.items() if t is None),
        )

    def outbox_positions(self) -> list[tuple[CommandMessage, int]]:
        """Each command with its index among the commands of its own saga version."""
        seen: dict[tuple[UUID, int], int] = {}
        positioned = []
        for command in self.outbox:
            key = (command.saga_id, command.saga_version)
            positioned.append((command, seen.get(key, 0)))
            seen[key] = seen.get(key, 0) + 1
        return positioned


def sqlite_time(moment: datetime) -> str:
    """Fixed-width UTC text, so that SQLite compares times correctly as strings."""
    return moment.astimezone(UTC).strftime(_SQLITE_TIME)


def parse_sqlite_time(text: str) -> datetime:
    return datetime.strptime(text, _SQLITE_TIME).replace(tzinfo=UTC)
