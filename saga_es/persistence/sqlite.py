"""SQLite, the embedded default: the same tables and the same one-transaction rule.

eventsourcing's SQLite recorder inserts the events in ``_insert_events`` itself, inside
``BEGIN ... COMMIT``, and rolls back on any exception; so here the extra rows go in after
``super()``. The schema and its ordering guarantees are in ``schema.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteCursor

from saga_es.messages import CommandMessage
from saga_es.persistence.schema import OUTBOX_COLUMNS, sqlite_statements
from saga_es.persistence.writes import SideWrites, sqlite_time

__all__ = ["SagaSQLiteRecorder"]

_INSERT_OUTBOX = (
    f"INSERT INTO saga_outbox ({', '.join(OUTBOX_COLUMNS)}) "
    f"VALUES ({', '.join(['?'] * len(OUTBOX_COLUMNS))})"
)
_INSERT_INBOX = "INSERT INTO saga_inbox (message_id, saga_id, received_at) VALUES (?, ?, ?)"
_UPSERT_TIMER = (
    "INSERT INTO saga_timers (saga_id, timer_id, kind, phase, step, attempt, due_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (saga_id) DO UPDATE SET "
    "timer_id = excluded.timer_id, kind = excluded.kind, phase = excluded.phase, "
    "step = excluded.step, attempt = excluded.attempt, due_at = excluded.due_at"
)
_DELETE_TIMER = "DELETE FROM saga_timers WHERE saga_id = ?"


class SagaSQLiteRecorder(SQLiteApplicationRecorder):
    def construct_create_table_statements(self) -> list[str]:
        return [*super().construct_create_table_statements(), *sqlite_statements()]

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        notification_ids = super()._insert_events(c, stored_events, **kwargs)
        writes: SideWrites | None = kwargs.get("side_writes")
        if writes is not None:
            c.executemany(
                _INSERT_INBOX,
                [
                    (e.message_id.hex, e.saga_id.hex, sqlite_time(e.received_at))
                    for e in writes.inbox
                ],
            )
            c.executemany(
                _INSERT_OUTBOX, [_outbox_row(c_, p) for c_, p in writes.outbox_positions()]
            )
            c.executemany(
                _UPSERT_TIMER,
                [
                    (s.hex, t.timer_id.hex, t.kind, t.phase, t.step, t.attempt, sqlite_time(t.due))
                    for s, t in writes.timers
                ],
            )
            c.executemany(_DELETE_TIMER, [(s.hex,) for s in writes.cleared_timers])
        return notification_ids


def _outbox_row(command: CommandMessage, position: int) -> tuple[Any, ...]:
    values = command.model_dump(mode="json")
    for key in ("message_id", "saga_id", "idempotency_key", "causation_id"):
        values[key] = getattr(command, key).hex
    values["deadline"] = sqlite_time(command.deadline)
    values["created_at"] = sqlite_time(command.created_at)
    values["payload"] = json.dumps(values["payload"], separators=(",", ":"))
    values["position"] = position
    return tuple(values[column] for column in OUTBOX_COLUMNS)
