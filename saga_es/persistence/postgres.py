"""PostgreSQL: eventsourcing's recorder plus the engine's tables, in one transaction.

eventsourcing 9.5 runs ``_insert_events`` inside the same ``conn.transaction()`` and pipeline as
the events INSERT, before it. Everything extra happens there and nowhere later: its
``insert_events`` swallows a Python exception raised after the events INSERT and re-raises it
only after the transaction has COMMITTED. Database errors at any point roll everything back.

``POSTGRES_ENABLE_DB_FUNCTIONS`` would route inserts through a plpgsql function that never calls
this hook (events without outbox rows), so the recorder refuses to run with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL
from psycopg.types.json import Jsonb

from saga_es.errors import ConfigurationError
from saga_es.messages import CommandMessage
from saga_es.persistence.schema import OUTBOX_COLUMNS, postgres_statements
from saga_es.persistence.writes import SideWrites

__all__ = ["SagaPostgresRecorder"]


class SagaPostgresRecorder(PostgresApplicationRecorder):
    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"):
        if datastore.enable_db_functions:
            raise ConfigurationError(
                "POSTGRES_ENABLE_DB_FUNCTIONS must stay off: its insert function skips the hook "
                "that writes outbox rows, so commands would be lost"
            )
        super().__init__(datastore, events_table_name=events_table_name)
        schema = datastore.schema
        self.sql_create_statements.extend(SQL(s).format() for s in postgres_statements(schema))
        columns = ", ".join(OUTBOX_COLUMNS)
        marks = ", ".join(["%s"] * len(OUTBOX_COLUMNS))
        self._insert_outbox = f'INSERT INTO "{schema}".saga_outbox ({columns}) VALUES ({marks})'
        self._insert_inbox = (
            f'INSERT INTO "{schema}".saga_inbox (message_id, saga_id, received_at) '
            "VALUES (%s, %s, %s)"
        )
        self._upsert_timer = (
            f'INSERT INTO "{schema}".saga_timers '
            "(saga_id, timer_id, kind, phase, step, attempt, due_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (saga_id) DO UPDATE SET "
            "timer_id = EXCLUDED.timer_id, kind = EXCLUDED.kind, phase = EXCLUDED.phase, "
            "step = EXCLUDED.step, attempt = EXCLUDED.attempt, due_at = EXCLUDED.due_at"
        )
        self._delete_timer = f'DELETE FROM "{schema}".saga_timers WHERE saga_id = %s'

    def _insert_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        writes: SideWrites | None = kwargs.get("side_writes")
        if writes is not None:
            # Take the events table's EXCLUSIVE lock now rather than at the events INSERT, so
            # that outbox ``seq`` values are handed out in commit order too (the library takes
            # the same lock again later; a second LOCK in one transaction is a no-op).
            self._lock_table(curs)
            if writes.reply_id is not None:
                # A redelivered reply violates saga_inbox_pkey: the whole decision rolls back.
                curs.execute(self._insert_inbox, (writes.reply_id, writes.saga_id, writes.at))
            if writes.outbox:
                rows = [_outbox_row(c, i) for i, c in enumerate(writes.outbox)]
                curs.executemany(self._insert_outbox, rows)
            if writes.timer is None:
                curs.execute(self._delete_timer, (writes.saga_id,))
            else:
                t = writes.timer
                curs.execute(
                    self._upsert_timer,
                    (writes.saga_id, t.timer_id, t.kind, t.phase, t.step, t.attempt, t.due),
                )
        super()._insert_events(curs, stored_events, **kwargs)


def _outbox_row(command: CommandMessage, position: int) -> tuple[Any, ...]:
    values = command.model_dump()
    values["position"] = position
    values["payload"] = Jsonb(command.model_dump(mode="json", include={"payload"})["payload"])
    return tuple(values[column] for column in OUTBOX_COLUMNS)
