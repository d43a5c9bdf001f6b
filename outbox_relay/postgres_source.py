"""The PostgreSQL outbox source: claims with ``FOR UPDATE SKIP LOCKED``, wakes on LISTEN.

Two connections: one for claim transactions, one in autocommit that LISTENs on the channel
every decision notifies at commit (``pg_notify('saga_outbox', '')``, see
``saga_es.persistence.postgres``). Both reconnect after a failure; losing either raises
``SourceUnavailableError``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import psycopg

from outbox_relay.errors import SourceUnavailableError
from outbox_relay.rows import CLAIM_COLUMNS, OutboxRow, ParkedRow
from outbox_relay.source import truncate_error
from saga_es.errors import ConfigurationError
from saga_es.persistence.settings import DatabaseSettings

__all__ = ["CHANNEL", "PostgresOutboxSource", "claim_sql"]

CHANNEL = "saga_outbox"
# How often a wait checks the stop flag: psycopg's notifies() cannot also watch an event.
_STOP_CHECK_SECONDS = 0.2


def claim_sql(table: str, *, skip_parked: bool) -> str:
    # Why this keeps each saga's rows in order with any number of relays:
    #
    # * Only a saga's head row qualifies: NOT EXISTS finds no row of the same saga with a lower
    #   (saga_version, position) that is unpublished, whether another relay holds it right now,
    #   it failed before, or it is parked (unless the policy skips parked rows). A batch
    #   therefore holds at most one row per saga, and the saga's next row is published only in
    #   a later transaction.
    # * The test runs against this statement's MVCC snapshot, in which a predecessor counts as
    #   published only if the transaction that marked it had COMMITTED, and a relay commits
    #   only after the broker confirmed the message. So row n+1 of a saga is claimable only
    #   once row n is confirmed on the broker: it is enqueued after n, by any relay.
    # * The head row itself is locked FOR UPDATE: a second relay SKIPs it while it is claimed.
    #   If the first relay commits between the second relay's snapshot and its lock attempt,
    #   PostgreSQL re-checks the row's newest version against the WHERE clause (READ
    #   COMMITTED's EvalPlanQual), finds published_at set and drops it: never published twice
    #   by two live relays. If the first relay dies or rolls back, its lock goes and the row is
    #   claimable again, and republished: at least once, participants dedupe.
    # * A saga's later row never commits before an earlier one (schema.py), so no snapshot can
    #   show row n+1 without row n.
    parked = "AND earlier.parked_at IS NULL " if skip_parked else ""
    columns = ", ".join("o.payload::text" if c == "payload" else f"o.{c}" for c in CLAIM_COLUMNS)
    return (
        f"SELECT {columns} FROM {table} AS o "
        "WHERE o.published_at IS NULL AND o.parked_at IS NULL "
        f"AND NOT EXISTS (SELECT 1 FROM {table} AS earlier "
        "WHERE earlier.saga_id = o.saga_id AND earlier.published_at IS NULL "
        f"{parked}"
        "AND (earlier.saga_version, earlier.position) < (o.saga_version, o.position)) "
        # seq only orders roughly by age: fairness between sagas, not an ordering guarantee.
        "ORDER BY o.seq LIMIT %(limit)s "
        "FOR UPDATE OF o SKIP LOCKED"
    )


class PostgresOutboxSource:
    def __init__(self, settings: DatabaseSettings, *, connect_timeout: float = 10) -> None:
        if settings.backend != "postgres":
            raise ValueError("PostgresOutboxSource needs a postgresql:// URL")
        self.description = settings.redacted()
        self._conninfo = settings.psycopg_conninfo
        self._connect_timeout = connect_timeout
        self._table = f'"{settings.schema}".saga_outbox'
        self._claim = {flag: claim_sql(self._table, skip_parked=flag) for flag in (False, True)}
        self._conn: psycopg.Connection[Any] | None = None
        self._listener: psycopg.Connection[Any] | None = None

    # -- claiming -----------------------------------------------------------------------------

    @contextmanager
    def claim(self, limit: int, *, skip_parked: bool = False) -> Iterator[_PostgresBatch]:
        with self._translated_errors():
            # LISTEN before the first claim: a decision committed between an empty claim and
            # the wait then still wakes the relay.
            self._listening()
            conn = self._connection()
            with conn.transaction():
                cursor = conn.execute(self._claim[skip_parked], {"limit": limit}, prepare=True)
                rows = [OutboxRow(*values) for values in cursor.fetchall()]
                yield _PostgresBatch(conn, self._table, rows)

    def wait_for_rows(self, timeout: float, stop: threading.Event) -> bool:
        deadline = time.monotonic() + timeout
        with self._translated_errors():
            listener = self._listening()
            while not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                slice_ = min(remaining, _STOP_CHECK_SECONDS)
                if any(True for _ in listener.notifies(timeout=slice_, stop_after=1)):
                    # One wake-up covers every commit so far: drop the notifications queued
                    # behind this one instead of waking once per decision.
                    for _ in listener.notifies(timeout=0.001):
                        pass
                    return True
        return False

    # -- operations ---------------------------------------------------------------------------

    def delete_published(self, older_than: timedelta) -> int:
        with self._translated_errors():
            conn = self._connection()
            with conn.transaction():
                cursor = conn.execute(
                    f"DELETE FROM {self._table} "
                    "WHERE published_at IS NOT NULL AND published_at < now() - %s",
                    [older_than],
                )
                return cursor.rowcount

    def parked_rows(self) -> list[ParkedRow]:
        with self._translated_errors():
            conn = self._connection()
            with conn.transaction():
                cursor = conn.execute(
                    "SELECT p.seq, p.message_id::text, p.saga_id::text, p.saga_version, "
                    "p.position, p.step, p.command, p.queue, p.publish_attempts, p.last_error, "
                    "p.parked_at, (SELECT count(*) FROM "
                    f"{self._table} AS later WHERE later.saga_id = p.saga_id "
                    "AND later.published_at IS NULL AND (later.saga_version, later.position) "
                    "> (p.saga_version, p.position)) "
                    f"FROM {self._table} AS p "
                    "WHERE p.parked_at IS NOT NULL AND p.published_at IS NULL ORDER BY p.seq"
                )
                return [ParkedRow(*values) for values in cursor.fetchall()]

    def unpark(self, seqs: Collection[int]) -> int:
        with self._translated_errors():
            conn = self._connection()
            with conn.transaction():
                cursor = conn.execute(
                    f"UPDATE {self._table} SET parked_at = NULL, publish_attempts = 0 "
                    "WHERE seq = ANY(%s) AND parked_at IS NOT NULL AND published_at IS NULL",
                    [list(seqs)],
                )
                return cursor.rowcount

    def close(self) -> None:
        for conn in (self._conn, self._listener):
            if conn is not None:
                conn.close()
        self._conn = self._listener = None

    # -- plumbing -----------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect(autocommit=False)
            self._require_table(self._conn)
        return self._conn

    def _listening(self) -> psycopg.Connection[Any]:
        if self._listener is None or self._listener.closed:
            self._listener = self._connect(autocommit=True)
            self._listener.execute(f"LISTEN {CHANNEL}")
        return self._listener

    def _connect(self, *, autocommit: bool) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self._conninfo,
            autocommit=autocommit,
            connect_timeout=max(1, round(self._connect_timeout)),
            application_name="saga-es relay",
            # Until the outbox has statistics (a fresh table, or a burst autovacuum has not
            # analysed yet), the planner may answer the claim's NOT EXISTS with a BitmapAnd
            # that scans the whole unpublished index once per candidate row: 0.8 s instead of
            # 0.7 ms for a 100-row claim over 6,000 rows. Without bitmap scans the plan is the
            # intended one with or without statistics: walk the unpublished index by seq,
            # probe the (saga_id, saga_version, position) key. Only relay statements run on
            # these connections.
            options="-c enable_bitmapscan=off",
        )

    def _require_table(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            found = conn.execute("SELECT to_regclass(%s)", [self._table]).fetchone()
        if not found or found[0] is None:
            raise ConfigurationError(
                f"the saga tables do not exist at {self.description}: "
                "run `saga-es db init` once before starting relays"
            )

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.OperationalError as exc:
            # Server gone, connection reset, admin shutdown: the outage kind. Whatever the
            # connections held is rolled back by the server; start again from new ones.
            self.close()
            raise SourceUnavailableError(self.description, exc) from exc
        except psycopg.InterfaceError as exc:
            self.close()
            raise SourceUnavailableError(self.description, exc) from exc


class _PostgresBatch:
    def __init__(self, conn: psycopg.Connection[Any], table: str, rows: list[OutboxRow]) -> None:
        self._conn = conn
        self._table = table
        self.rows: Sequence[OutboxRow] = rows

    def mark_published(self, seqs: Collection[int]) -> None:
        if not seqs:
            return
        # published_at IS NULL also lets the planner use the partial index on unpublished rows.
        self._conn.execute(
            f"UPDATE {self._table} SET published_at = clock_timestamp(), "
            "publish_attempts = publish_attempts + 1 "
            "WHERE seq = ANY(%s) AND published_at IS NULL",
            [list(seqs)],
            prepare=True,
        )

    def record_failures(self, errors: Mapping[int, str], *, park_after: int) -> set[int]:
        if not errors:
            return set()
        cursor = self._conn.execute(
            f"UPDATE {self._table} AS o SET publish_attempts = o.publish_attempts + 1, "
            "last_error = f.error, parked_at = CASE WHEN o.publish_attempts + 1 >= %s "
            "THEN clock_timestamp() END "
            "FROM unnest(%s::bigint[], %s::text[]) AS f(seq, error) "
            "WHERE o.seq = f.seq AND o.published_at IS NULL "
            "RETURNING o.seq, o.parked_at IS NOT NULL",
            [park_after, list(errors), [truncate_error(e) for e in errors.values()]],
        )
        return {seq for seq, parked in cursor.fetchall() if parked}
