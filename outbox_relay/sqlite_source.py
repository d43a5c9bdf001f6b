"""The SQLite outbox source: one writer at a time, polling.

SQLite has no row locks, so a claim takes the database's write lock up front
(``BEGIN IMMEDIATE``) and holds it until the batch is published and marked: a second relay,
or an engine committing a decision, waits for it (up to the busy timeout). Keep batches small
with SQLite. There is no LISTEN either: the relay polls.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

from outbox_relay.errors import SourceUnavailableError
from outbox_relay.rows import CLAIM_COLUMNS, OutboxRow, ParkedRow
from outbox_relay.source import truncate_error
from saga_es.errors import ConfigurationError
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.writes import parse_sqlite_time, sqlite_time

__all__ = ["SQLiteOutboxSource"]


def _claim_sql(*, skip_parked: bool) -> str:
    # The head-of-saga rule of the PostgreSQL claim (see postgres_source.claim_sql). Here the
    # write lock taken by BEGIN IMMEDIATE makes claims strictly one after another, so a claim
    # always sees the previous one committed (or rolled back) in full.
    parked = "AND earlier.parked_at IS NULL " if skip_parked else ""
    return (
        f"SELECT {', '.join('o.' + c for c in CLAIM_COLUMNS)} FROM saga_outbox AS o "
        "WHERE o.published_at IS NULL AND o.parked_at IS NULL "
        "AND NOT EXISTS (SELECT 1 FROM saga_outbox AS earlier "
        "WHERE earlier.saga_id = o.saga_id AND earlier.published_at IS NULL "
        f"{parked}"
        "AND (earlier.saga_version, earlier.position) < (o.saga_version, o.position)) "
        "ORDER BY o.seq LIMIT ?"
    )


class SQLiteOutboxSource:
    def __init__(
        self,
        settings: DatabaseSettings,
        *,
        busy_timeout: float = 30,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if settings.backend != "sqlite" or settings.sqlite_path is None:
            raise ValueError("SQLiteOutboxSource needs a sqlite:/// URL")
        self.description = settings.redacted()
        self._path: Path = settings.sqlite_path
        self._busy_timeout = busy_timeout
        self._clock = clock
        self._claim = {flag: _claim_sql(skip_parked=flag) for flag in (False, True)}
        self._conn: sqlite3.Connection | None = None

    @contextmanager
    def claim(self, limit: int, *, skip_parked: bool = False) -> Iterator[_SQLiteBatch]:
        with self._transaction() as conn:
            cursor = conn.execute(self._claim[skip_parked], [limit])
            rows = [OutboxRow(*values) for values in cursor]
            yield _SQLiteBatch(conn, rows, self._now)

    def wait_for_rows(self, timeout: float, stop: threading.Event) -> bool:
        stop.wait(timeout)
        return False

    def delete_published(self, older_than: timedelta) -> int:
        cutoff = sqlite_time(self._clock() - older_than)
        with self._transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM saga_outbox WHERE published_at IS NOT NULL AND published_at < ?",
                [cutoff],
            )
            return cursor.rowcount

    def parked_rows(self) -> list[ParkedRow]:
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT p.seq, p.message_id, p.saga_id, p.saga_version, p.position, p.step, "
                "p.command, p.queue, p.publish_attempts, p.last_error, p.parked_at, "
                "(SELECT count(*) FROM saga_outbox AS later WHERE later.saga_id = p.saga_id "
                "AND later.published_at IS NULL AND (later.saga_version, later.position) "
                "> (p.saga_version, p.position)) "
                "FROM saga_outbox AS p WHERE p.parked_at IS NOT NULL AND p.published_at IS NULL "
                "ORDER BY p.seq"
            ).fetchall()
        return [
            ParkedRow(
                seq, _uuid_text(message_id), _uuid_text(saga_id), version, position, step,
                command, queue, attempts, error, parse_sqlite_time(parked_at), held_back,
            )
            for (
                seq, message_id, saga_id, version, position, step, command, queue, attempts,
                error, parked_at, held_back,
            ) in rows
        ]  # fmt: skip

    def unpark(self, seqs: Collection[int]) -> int:
        with self._transaction() as conn:
            cursor = conn.executemany(
                "UPDATE saga_outbox SET parked_at = NULL, publish_attempts = 0 "
                "WHERE seq = ? AND parked_at IS NOT NULL AND published_at IS NULL",
                [(seq,) for seq in seqs],
            )
            return cursor.rowcount

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- plumbing -----------------------------------------------------------------------------

    def _now(self) -> str:
        return sqlite_time(self._clock())

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:  # locked past the busy timeout, disk gone
            self.close()
            raise SourceUnavailableError(self.description, exc) from exc
        try:
            yield conn
        except sqlite3.OperationalError as exc:
            self._roll_back(conn)
            raise SourceUnavailableError(self.description, exc) from exc
        except BaseException:
            self._roll_back(conn)
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self.close()  # closing rolls back whatever the failed COMMIT left open
            raise SourceUnavailableError(self.description, exc) from exc

    def _roll_back(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            self.close()  # a connection that cannot roll back is dropped (which rolls back)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if not self._path.exists():
                raise ConfigurationError(
                    f"no database at {self.description}: run `saga-es db init` first"
                )
            # isolation_level=None: the module must not open transactions behind our back;
            # every transaction here is an explicit BEGIN IMMEDIATE.
            conn = sqlite3.connect(
                self._path, isolation_level=None, timeout=self._busy_timeout,
                check_same_thread=False,
            )  # fmt: skip
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'saga_outbox'"
            ).fetchone()
            if found is None:
                conn.close()
                raise ConfigurationError(
                    f"the saga tables do not exist at {self.description}: "
                    "run `saga-es db init` once before starting relays"
                )
            self._conn = conn
        return self._conn


class _SQLiteBatch:
    def __init__(
        self, conn: sqlite3.Connection, rows: list[OutboxRow], now: Callable[[], str]
    ) -> None:
        self._conn = conn
        self._now = now
        self.rows: Sequence[OutboxRow] = rows

    def mark_published(self, seqs: Collection[int]) -> None:
        now = self._now()
        self._conn.executemany(
            "UPDATE saga_outbox SET published_at = ?, publish_attempts = publish_attempts + 1 "
            "WHERE seq = ? AND published_at IS NULL",
            [(now, seq) for seq in seqs],
        )

    def record_failures(self, errors: Mapping[int, str], *, park_after: int) -> set[int]:
        now = self._now()
        parked: set[int] = set()
        for seq, error in errors.items():
            row = self._conn.execute(
                "UPDATE saga_outbox SET publish_attempts = publish_attempts + 1, last_error = ?, "
                "parked_at = CASE WHEN publish_attempts + 1 >= ? THEN ? END "
                "WHERE seq = ? AND published_at IS NULL RETURNING parked_at IS NOT NULL",
                [truncate_error(error), park_after, now, seq],
            ).fetchone()
            if row is not None and row[0]:
                parked.add(seq)
        return parked


def _uuid_text(value: str) -> str:
    """Stored hex as the usual dashed form; a malformed id is shown as it is."""
    try:
        return str(UUID(value))
    except (ValueError, TypeError, AttributeError):
        return str(value)
