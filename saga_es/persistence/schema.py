"""The engine's own tables, next to the saga event stream, for PostgreSQL and SQLite.

saga_outbox: one row per command decided, written in the same transaction as the events that
    decided it. The relay publishes it and marks it published.
saga_inbox: one row per reply handled (its message id), in the same transaction as the events
    the reply caused: a redelivered reply hits the primary key and changes nothing.
saga_dead_letters: messages the engine could not use (malformed, unknown saga...), kept with
    the reason so that nothing is dropped silently and an operator can look at them.
saga_timers: each saga's single next wake-up (a reply deadline or a retry), replaced or deleted
    by every decision in the same transaction, so a timer can never outlive its reason.

Ordering the relay may rely on
------------------------------
* Per saga, rows are totally ordered by ``(saga_version, position)``: ``saga_version`` is the
  version of the event that issued the command and ``position`` its index in its decision. A
  decision commits only if the saga's stream still ended at the version it read (the event
  store's primary key on (saga id, version) makes a racing decision fail and roll back with
  its rows), so a saga's rows commit one decision after another, in that order, never
  interleaved.
* The row for a saga's later command is never committed before the row of an earlier one. A
  relay that, for each saga, only publishes the unpublished row with the lowest
  ``(saga_version, position)`` therefore publishes each saga's commands in decision order.
* ``seq`` only orders rows roughly by age (for fairness between sagas). It is not assigned in
  commit order and has gaps (rolled-back decisions burn values), so a relay must claim
  unpublished rows (``published_at IS NULL``), never tail ``seq`` as a cursor.
* Across sagas there is no order, and ``created_at`` (the decision's ``now``) is not one.
"""

from __future__ import annotations

__all__ = ["OUTBOX_COLUMNS", "postgres_statements", "sqlite_statements"]

#: Columns written by a decision, in insert order.
OUTBOX_COLUMNS = (
    "message_id",
    "saga_id",
    "saga_version",
    "position",
    "definition",
    "definition_version",
    "step",
    "phase",
    "attempt",
    "command",
    "idempotency_key",
    "payload",
    "correlation_id",
    "causation_id",
    "queue",
    "deadline",
    "created_at",
)


def postgres_statements(schema: str) -> list[str]:
    s = f'"{schema}"'
    return [
        f"""CREATE TABLE IF NOT EXISTS {s}.saga_outbox (
            seq bigserial NOT NULL,
            message_id uuid PRIMARY KEY,
            saga_id uuid NOT NULL,
            saga_version integer NOT NULL,
            position smallint NOT NULL,
            definition text NOT NULL,
            definition_version integer NOT NULL,
            step text NOT NULL,
            phase text NOT NULL,
            attempt integer NOT NULL,
            command text NOT NULL,
            idempotency_key uuid NOT NULL,
            payload jsonb NOT NULL,
            correlation_id text NOT NULL,
            causation_id uuid NOT NULL,
            queue text NOT NULL,
            deadline timestamptz NOT NULL,
            created_at timestamptz NOT NULL,
            published_at timestamptz,
            publish_attempts integer NOT NULL DEFAULT 0,
            last_error text,
            parked_at timestamptz,
            UNIQUE (saga_id, saga_version, position))""",
        f"""CREATE INDEX IF NOT EXISTS saga_outbox_unpublished
            ON {s}.saga_outbox (seq) WHERE published_at IS NULL""",
        # Retention deletes published rows by age.
        f"""CREATE INDEX IF NOT EXISTS saga_outbox_published
            ON {s}.saga_outbox (published_at) WHERE published_at IS NOT NULL""",
        f"""CREATE TABLE IF NOT EXISTS {s}.saga_inbox (
            message_id uuid PRIMARY KEY,
            saga_id uuid NOT NULL,
            received_at timestamptz NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS {s}.saga_timers (
            saga_id uuid PRIMARY KEY,
            timer_id uuid NOT NULL,
            kind text NOT NULL,
            phase text NOT NULL,
            step text NOT NULL,
            attempt integer NOT NULL,
            due_at timestamptz NOT NULL)""",
        f"CREATE INDEX IF NOT EXISTS saga_timers_due ON {s}.saga_timers (due_at)",
        f"""CREATE TABLE IF NOT EXISTS {s}.saga_dead_letters (
            id bigserial PRIMARY KEY,
            source text NOT NULL,
            message_id text,
            body text NOT NULL,
            error text NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now())""",
    ]


def sqlite_statements() -> list[str]:
    # UUIDs are stored as 32-char hex, like eventsourcing's own SQLite tables; times as ISO text.
    return [
        """CREATE TABLE IF NOT EXISTS saga_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            message_id TEXT NOT NULL UNIQUE,
            saga_id TEXT NOT NULL,
            saga_version INTEGER NOT NULL,
            position INTEGER NOT NULL,
            definition TEXT NOT NULL,
            definition_version INTEGER NOT NULL,
            step TEXT NOT NULL,
            phase TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            command TEXT NOT NULL,
            idempotency_key TEXT NOT NULL,
            payload TEXT NOT NULL,
            correlation_id TEXT NOT NULL,
            causation_id TEXT NOT NULL,
            queue TEXT NOT NULL,
            deadline TEXT NOT NULL,
            created_at TEXT NOT NULL,
            published_at TEXT,
            publish_attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            parked_at TEXT,
            UNIQUE (saga_id, saga_version, position))""",
        """CREATE INDEX IF NOT EXISTS saga_outbox_unpublished
            ON saga_outbox (seq) WHERE published_at IS NULL""",
        """CREATE INDEX IF NOT EXISTS saga_outbox_published
            ON saga_outbox (published_at) WHERE published_at IS NOT NULL""",
        """CREATE TABLE IF NOT EXISTS saga_inbox (
            message_id TEXT PRIMARY KEY,
            saga_id TEXT NOT NULL,
            received_at TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS saga_timers (
            saga_id TEXT PRIMARY KEY,
            timer_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            phase TEXT NOT NULL,
            step TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            due_at TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS saga_timers_due ON saga_timers (due_at)",
        """CREATE TABLE IF NOT EXISTS saga_dead_letters (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            source TEXT NOT NULL,
            message_id TEXT,
            body TEXT NOT NULL,
            error TEXT NOT NULL,
            received_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))""",
    ]
