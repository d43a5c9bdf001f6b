"""PostgreSQL: a decision's events and the engine's rows in one statement, one transaction.

A decision commits through one call of the plpgsql function ``saga_es_commit`` on an autocommit
connection: inbox, outbox and timer rows, then eventsourcing's table lock and the events
INSERT, then the commit, all in one round trip. A failure anywhere (a reply already in the
inbox, a saga version taken by a racing writer, a lost connection) rolls the whole statement
back; there is no Python between its parts that could fail half-way.

Why a function rather than the library's pipelined insert with a hook for the extra rows: that
path costs seven statements in three round trips per decision (BEGIN, the side rows, SET LOCAL,
LOCK TABLE, NOTIFY, INSERT, COMMIT), each parsed and planned again by the server; the function
is planned once per connection. Measured on one engine starting sagas in a loop, a start costs
about a third of the CPU it did, client and server alike.

What stays the library's: the events table and its columns, the ``EXCLUSIVE`` table lock that
makes notification ids commit in order (readers tailing the log never skip a late-committing
id), its NOTIFY on the events channel, and how its errors are mapped
(``IntegrityError`` for a taken key, ``OperationalError`` for a lost connection, retried).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.utils import retry
from psycopg.sql import SQL
from psycopg.types.json import Jsonb

from saga_es.errors import ConfigurationError
from saga_es.persistence.schema import OUTBOX_COLUMNS, postgres_statements
from saga_es.persistence.writes import SideWrites

__all__ = ["COMMIT_FUNCTION_SIGNATURE", "SagaPostgresRecorder", "commit_function_sql"]

#: How ``saga-es db init`` names the function, with its argument types (``to_regprocedure``).
COMMIT_FUNCTION_SIGNATURE = (
    "saga_es_commit(uuid[], bigint[], text[], bytea[], jsonb, jsonb, jsonb, uuid[], text)"
)


class SagaPostgresRecorder(PostgresApplicationRecorder):
    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"):
        if datastore.enable_db_functions:
            raise ConfigurationError(
                "POSTGRES_ENABLE_DB_FUNCTIONS must stay off: saga-es commits a decision "
                "through its own function, saga_es_commit, which writes the outbox, inbox and "
                "timer rows with the events"
            )
        # No server-side prepared statements on these connections: psycopg's cache of them
        # drifts from the server when a pipelined statement fails part-way, and every later
        # use then fails with 'prepared statement "_pg3_N" does not exist'. The commit needs
        # none: the function's statements are planned once per connection by PL/pgSQL.
        datastore.pool.kwargs["prepare_threshold"] = None  # type: ignore[index]
        super().__init__(datastore, events_table_name=events_table_name)
        schema = datastore.schema
        self.sql_create_statements.extend(SQL(s).format() for s in postgres_statements(schema))
        self.sql_create_statements.append(
            SQL(commit_function_sql(schema, events_table_name)).format()
        )
        self._commit_call = (
            f'SELECT notification_id FROM "{schema}".saga_es_commit('
            "%(ids)b, %(versions)b::bigint[], %(topics)b, %(states)b, "
            "%(inbox)b, %(outbox)b, %(timers)b, %(cleared)b::uuid[], %(lock_timeout)s) "
            "AS notification_id"
        )
        self._lock_timeout = f"{datastore.lock_timeout}s"

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int]:
        """Commit the events and ``side_writes`` (a ``SideWrites``) in one statement; the
        events' notification ids, in order. The connection is in autocommit: the statement
        is the transaction."""
        writes: SideWrites = kwargs.get("side_writes") or SideWrites()
        parameters = {
            "ids": [e.originator_id for e in stored_events],
            "versions": [e.originator_version for e in stored_events],
            "topics": [e.topic for e in stored_events],
            "states": [e.state for e in stored_events],
            **side_write_parameters(writes),
            "lock_timeout": self._lock_timeout,
        }
        with self.datastore.get_connection() as conn:
            rows = conn.execute(self._commit_call, parameters).fetchall()
        return [row["notification_id"] for row in rows]


def commit_function_sql(schema: str, events_table: str) -> str:
    """``saga_es_commit``: the side rows, then the events under the table lock; their ids.

    The side rows go first so that the events table is locked for as short a time as possible
    (every writer of every saga waits for that lock). A repeated inbox message id violates
    ``saga_inbox_pkey``, a taken saga version the events' primary key: either aborts it all.
    """
    s = f'"{schema}"'
    outbox_columns = ", ".join(OUTBOX_COLUMNS)
    timer_columns = "saga_id, timer_id, kind, phase, step, attempt, due_at"
    return f"""CREATE OR REPLACE FUNCTION {s}.saga_es_commit(
    new_ids uuid[], new_versions bigint[], new_topics text[], new_states bytea[],
    inbox_rows jsonb, outbox_rows jsonb, timer_rows jsonb, cleared_sagas uuid[],
    events_lock_timeout text)
RETURNS SETOF bigint LANGUAGE plpgsql AS $commit$
BEGIN
    IF jsonb_array_length(inbox_rows) > 0 THEN
        INSERT INTO {s}.saga_inbox (message_id, saga_id, received_at)
        SELECT message_id, saga_id, received_at
        FROM jsonb_populate_recordset(NULL::{s}.saga_inbox, inbox_rows);
    END IF;
    IF jsonb_array_length(outbox_rows) > 0 THEN
        INSERT INTO {s}.saga_outbox ({outbox_columns})
        SELECT {outbox_columns}
        FROM jsonb_populate_recordset(NULL::{s}.saga_outbox, outbox_rows);
        -- Relays LISTEN on this channel; a notification is delivered at commit, or never.
        PERFORM pg_notify('saga_outbox', '');
    END IF;
    IF jsonb_array_length(timer_rows) > 0 THEN
        INSERT INTO {s}.saga_timers ({timer_columns})
        SELECT {timer_columns}
        FROM jsonb_populate_recordset(NULL::{s}.saga_timers, timer_rows)
        ON CONFLICT (saga_id) DO UPDATE SET timer_id = EXCLUDED.timer_id,
            kind = EXCLUDED.kind, phase = EXCLUDED.phase, step = EXCLUDED.step,
            attempt = EXCLUDED.attempt, due_at = EXCLUDED.due_at;
    END IF;
    IF cardinality(cleared_sagas) > 0 THEN
        DELETE FROM {s}.saga_timers WHERE saga_id = ANY(cleared_sagas);
    END IF;
    -- eventsourcing's rule: notification ids are issued and committed one transaction at a
    -- time, so a reader tailing the log never passes an id that commits later.
    PERFORM set_config('lock_timeout', events_lock_timeout, true);
    LOCK TABLE {s}."{events_table}" IN EXCLUSIVE MODE;
    PERFORM pg_notify('{events_table}', '');
    RETURN QUERY
        INSERT INTO {s}."{events_table}" (originator_id, originator_version, topic, state)
        SELECT * FROM unnest(new_ids, new_versions, new_topics, new_states)
        RETURNING notification_id;
END
$commit$"""


def side_write_parameters(writes: SideWrites) -> dict[str, Any]:
    """The side rows as the function takes them: JSON arrays the tables' row types read."""
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
