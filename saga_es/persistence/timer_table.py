"""The saga_timers table as timer processes use it: claim the due rows, give a claim back.

Each saga has one row, its next wake-up, written by every decision in the decision's own
transaction (``schema.py``). Timer processes only ever move a row's ``due_at``; what a timer
means, and whether firing it still does anything, is decided by the engine.

Claiming
--------
A claim is one short transaction that picks due rows and pushes their ``due_at`` forward to
``lease_until``, then commits. The process fires the claimed timers afterwards, each into the
engine, whose decision replaces or deletes the row in its own transaction.

* The row locks are not held while firing: the engine's decision writes the same row from
  another connection, and would wait on the claim's lock for as long as the claim waits on the
  decision, a deadlock broken only by a lock timeout. The pushed ``due_at`` is what keeps other
  processes off a claimed row instead.
* On PostgreSQL the rows are picked ``FOR UPDATE SKIP LOCKED``: two processes claiming at the
  same moment each lock what they pick and skip what the other has locked, so their claims are
  disjoint and neither waits. That is why several timer processes may run.
* On SQLite, ``BEGIN IMMEDIATE`` takes the database's write lock before reading, so claims are
  serialised across processes; processes poll.
* A process that dies after claiming leaves rows due at ``lease_until``: they are claimed
  again by whichever process looks after that. A claim that outlives its lease (a process
  stalled longer than it) can be claimed twice; firing a timer twice is harmless, because a
  timer that is no longer the saga's current one changes nothing (``decide``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from saga_es.persistence.store import SagaStore
from saga_es.persistence.writes import parse_sqlite_time, sqlite_time

__all__ = ["ScheduledTimer", "TimerTable"]

_COLUMNS = "saga_id, timer_id, kind, phase, step, attempt, due_at"


@dataclass(frozen=True)
class ScheduledTimer:
    """One row of saga_timers: the saga's next wake-up, ``due`` at that time."""

    saga_id: UUID
    timer_id: UUID
    kind: str  # "deadline" (a reply's) or "retry"
    phase: str
    step: str
    attempt: int
    due: datetime

    @classmethod
    def from_row(cls, row: Any) -> ScheduledTimer:
        saga_id, timer_id, kind, phase, step, attempt, due = row
        if isinstance(due, str):  # SQLite: hex ids and fixed-width UTC text
            saga_id, timer_id, due = UUID(saga_id), UUID(timer_id), parse_sqlite_time(due)
        return cls(saga_id, timer_id, kind, phase, step, int(attempt), due)


class TimerTable:
    def __init__(self, store: SagaStore) -> None:
        self.store = store
        self.settings = store.settings
        self._table = store.table("saga_timers")

    def pending(self, saga_id: UUID | None = None, *, limit: int = 1000) -> list[ScheduledTimer]:
        """Timers, soonest first; a saga has at most one."""
        where = "WHERE saga_id = ?" if saga_id else ""
        sql = f"SELECT {_COLUMNS} FROM {self._table} {where} ORDER BY due_at LIMIT ?"
        return [
            ScheduledTimer.from_row(r)
            for r in self._run(sql, ([saga_id] if saga_id else []) + [limit], write=False)
        ]

    def next_due(self) -> datetime | None:
        """When the soonest timer is due (claimed ones at their lease's end)."""
        rows = self._run(f"SELECT min(due_at) FROM {self._table}", [], write=False)
        due = rows[0][0] if rows else None
        return parse_sqlite_time(due) if isinstance(due, str) else due

    def claim_due(
        self, now: datetime, *, lease_until: datetime, limit: int
    ) -> list[ScheduledTimer]:
        """Claim up to ``limit`` timers due at ``now``, soonest first; each is returned with its
        own due time, and left in the table due at ``lease_until``."""
        if self.settings.backend == "postgres":
            sql = (
                f"WITH due AS (SELECT saga_id, due_at FROM {self._table} WHERE due_at <= %s "
                "ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED) "
                f"UPDATE {self._table} AS t SET due_at = %s FROM due WHERE t.saga_id = due.saga_id "
                "RETURNING t.saga_id, t.timer_id, t.kind, t.phase, t.step, t.attempt, due.due_at"
            )
            with self.store.datastore.transaction(commit=True) as cursor:
                cursor.execute(sql, [now, limit, lease_until])
                rows = [tuple(r.values()) for r in cursor.fetchall()]
            return sorted(map(ScheduledTimer.from_row, rows), key=lambda t: t.due)
        with self._sqlite_write() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM saga_timers WHERE due_at <= ? ORDER BY due_at LIMIT ?",
                [sqlite_time(now), limit],
            ).fetchall()
            conn.executemany(
                "UPDATE saga_timers SET due_at = ? WHERE saga_id = ?",
                [(sqlite_time(lease_until), r[0]) for r in rows],
            )
        return [ScheduledTimer.from_row(r) for r in rows]

    def release(self, timer: ScheduledTimer, *, lease_until: datetime) -> bool:
        """Give back a claim that was not fired: due at its own time again, unless a decision
        has replaced or moved the timer meanwhile. Whether it was given back."""
        sql = (
            f"UPDATE {self._table} SET due_at = ? WHERE saga_id = ? AND timer_id = ? AND due_at = ?"
        )
        params: list[Any] = [timer.due, timer.saga_id, timer.timer_id, lease_until]
        if self.settings.backend == "postgres":
            with self.store.datastore.transaction(commit=True) as cursor:
                cursor.execute(sql.replace("?", "%s"), params)
                return bool(cursor.rowcount)
        with self._sqlite_write() as conn:
            cursor = conn.execute(
                sql,
                [
                    sqlite_time(timer.due),
                    timer.saga_id.hex,
                    timer.timer_id.hex,
                    sqlite_time(lease_until),
                ],
            )
            return bool(cursor.rowcount)

    # -- plumbing -----------------------------------------------------------------------------

    def _run(self, sql: str, params: list[Any], *, write: bool) -> list[tuple[Any, ...]]:
        if self.settings.backend == "postgres":
            with self.store.datastore.transaction(commit=write) as cursor:
                cursor.execute(sql.replace("?", "%s"), params)
                return [tuple(r.values()) for r in cursor.fetchall()]
        params = [p.hex if isinstance(p, UUID) else p for p in params]
        with self.store.datastore.transaction(commit=write) as cursor:
            cursor.execute(sql, params)
            return [tuple(r) for r in cursor.fetchall()]

    @contextmanager
    def _sqlite_write(self) -> Iterator[sqlite3.Connection]:
        # Our own connection: eventsourcing's begins deferred transactions, which two
        # processes upgrading from read to write at once can fail with "database is locked".
        assert self.settings.sqlite_path is not None
        with closing(
            sqlite3.connect(self.settings.sqlite_path, timeout=30, isolation_level=None)
        ) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
