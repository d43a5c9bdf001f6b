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
        # No server-side prepared statements on these connections. When a pipelined decision
        # fails part-way (a redelivered reply, a lost concurrency race), psycopg's cache of
        # them goes out of step with the server: it counts as prepared a statement whose
        # Parse the server skipped, and every later use of it on that connection fails with
        # 'prepared statement "_pg3_N" does not exist'. The pool connects lazily, after this.
        datastore.pool.kwargs["prepare_threshold"] = None  # type: ignore[index]
        super().__init__(datastore, events_table_name=events_table_name)
        self.sql_create_statements.extend(
            SQL(s).format() for s in postgres_statements(datastore.schema)
        )
        self._side_writes = SQL(side_writes_sql(datastore.schema))

    def _insert_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        writes: SideWrites | None = kwargs.get("side_writes")
        if writes is not None:
            # One statement for all of it, whatever the number of decisions: every statement
            # costs a trip through psycopg's pipeline on the engine's hot path.
            curs.execute(self._side_writes, _parameters(writes))
            # Fetching the result makes this a sync point: a failure here (a reply already in
            # the inbox) raises now, as the integrity error it is. Left for later, it surfaces
            # while the library's statements queued behind it are processed, and the aborted
            # pipeline is reported as an OperationalError that the library retries in vain.
            curs.fetchone()
        super()._insert_events(curs, stored_events, **kwargs)


def side_writes_sql(schema: str) -> str:
    """Data-modifying CTEs fed by JSON arrays; the tables' own row types convert each field.

    PostgreSQL runs every data-modifying CTE whether or not it is referenced. A repeated
    inbox message id violates saga_inbox_pkey and aborts the transaction: nothing commits.
    """
    s = f'"{schema}"'
    columns = ", ".join(OUTBOX_COLUMNS)
    timer_columns = "saga_id, timer_id, kind, phase, step, attempt, due_at"
    return (
        f"WITH inbox AS (INSERT INTO {s}.saga_inbox (message_id, saga_id, received_at) "
        "SELECT message_id, saga_id, received_at "
        f"FROM jsonb_populate_recordset(NULL::{s}.saga_inbox, %(inbox)s)), "
        f"outbox AS (INSERT INTO {s}.saga_outbox ({columns}) SELECT {columns} "
        f"FROM jsonb_populate_recordset(NULL::{s}.saga_outbox, %(outbox)s)), "
        f"timers AS (INSERT INTO {s}.saga_timers ({timer_columns}) SELECT {timer_columns} "
        f"FROM jsonb_populate_recordset(NULL::{s}.saga_timers, %(timers)s) "
        "ON CONFLICT (saga_id) DO UPDATE SET timer_id = EXCLUDED.timer_id, "
        "kind = EXCLUDED.kind, phase = EXCLUDED.phase, step = EXCLUDED.step, "
        "attempt = EXCLUDED.attempt, due_at = EXCLUDED.due_at), "
        f"cleared AS (DELETE FROM {s}.saga_timers WHERE saga_id = ANY(%(cleared)s::uuid[])) "
        # Relays LISTEN on this channel; a notification is delivered at commit, or never.
        "SELECT CASE WHEN jsonb_array_length(%(outbox)s) > 0 "
        "THEN pg_notify('saga_outbox', '') END"
    )


def _parameters(writes: SideWrites) -> dict[str, Any]:
    outbox = []
    for command, position in writes.outbox_positions():
        row = command.model_dump(mode="json")
        row["position"] = position
        outbox.append(row)
    return {
        "inbox": Jsonb(
            [
                {
                    "message_id": str(e.message_id),
                    "saga_id": str(e.saga_id),
                    "received_at": e.received_at.isoformat(),
                }
                for e in writes.inbox
            ]
        ),
        "outbox": Jsonb(outbox),
        "timers": Jsonb(
            [
                {
                    "saga_id": str(saga_id),
                    "timer_id": str(t.timer_id),
                    "kind": t.kind,
                    "phase": t.phase,
                    "step": t.step,
                    "attempt": t.attempt,
                    "due_at": t.due.isoformat(),
                }
                for saga_id, t in writes.timers
            ]
        ),
        "cleared": list(writes.cleared_timers),
    }
