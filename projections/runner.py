"""Follow the saga event log and keep the views up to date, exactly once.

    runner = ProjectionRunner(settings)
    runner.catch_up()            # apply everything logged so far, then return
    runner.run(stop)             # and then follow the log until ``stop`` is set

A batch is one transaction: lock the views' tracking rows (``FOR UPDATE``; ``BEGIN IMMEDIATE``
on SQLite), read the events after the lowest position, apply each to the views that have not
seen it, move the tracking rows to the batch's last position, commit. So a view row and the
position that accounts for it commit together or not at all: a crash (even ``kill -9``) at any
point loses nothing and applies nothing twice, and a second runner for the same views blocks on
the tracking rows until the first commits, then goes on from the position it left.

Events are read and decoded once per batch for every view: views at different positions (one
just rebuilt) are fed from the lowest, each skipping what it already has.

Catching up, batches grow: after a full batch the next one reads twice as many events, up to
``max_batch_size``, and the size drops back to ``batch_size`` as soon as a batch comes back
short (the runner has reached the head). What a batch costs whatever its size (a commit, a
dozen statements) is then paid less often, and a saga's events fall into fewer batches, so its
status row is written fewer times: catching up on a million events took 40% less time
(``bench/projections.py``, batches of 1,000 growing to 10,000). On SQLite a batch holds the
database's only write lock, which the engine waits on too, so there batches keep
``batch_size``. While batches come back full, the cyclic garbage collector stays paused
(``collector``). When the runner reaches the head after ``ANALYZE_AFTER`` full batches or
more, the writers refresh the query planner's statistics of their tables (``ANALYZE``, in
that batch's transaction): autovacuum would too, but a minute or so later, and until then a
freshly filled status table can get a slow plan (at 20,000 sagas, listing by state took
14 ms instead of 2 to 4).

Waiting for new events: on PostgreSQL the runner LISTENs on the channel eventsourcing NOTIFYs
on every insert into the events table (the ``saga_outbox`` channel would miss decisions that
issue no command, such as a saga completing), and polls every ``poll_interval`` seconds as
well, in case a notification is lost with a dropped connection. SQLite has no notifications:
it polls.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import PersistenceError
from sqlalchemy import Connection, select, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from projections.collector import CollectorPause
from projections.database import ViewDatabase
from projections.errors import RebuildSupersededError
from projections.eventinfo import decode
from projections.schema import PROJECTIONS, Projection, projection_tracking, projection_views
from projections.setup import ensure_schema
from projections.writers import Batch, ViewWriter, writer_for
from saga_es.errors import StoreError
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.store import SagaStore
from saga_es.state import SagaState

__all__ = [
    "ANALYZE_AFTER",
    "CATCH_UP_GROWTH",
    "CATCH_UP_LIMIT",
    "BatchResult",
    "ProjectionRunner",
    "Target",
]

log = logging.getLogger("projections.runner")

#: How many times ``batch_size`` a batch grows to while catching up, by default (PostgreSQL),
#: but to no more than ``CATCH_UP_LIMIT`` events: the batch and the one read ahead are in memory.
CATCH_UP_GROWTH = 10
CATCH_UP_LIMIT = 20_000

#: Full batches in a row after which reaching the head refreshes the planner's statistics.
ANALYZE_AFTER = 10


@dataclass(frozen=True)
class Target:
    projection: Projection
    version: int

    @property
    def key(self) -> str:
        return self.projection.tracking_key(self.version)


@dataclass(frozen=True)
class BatchResult:
    events: int  # read from the log in this batch
    start: int  # positions (start, end] were read
    end: int


class _ViewMovedError(Exception):
    """A version this batch meant to write was switched away from and dropped meanwhile."""


class ProjectionRunner:
    """Keeps the active version of ``names`` (default: every projection) up to date.

    ``targets`` instead names explicit (projection, version) table sets: the rebuild uses it
    to fill a new version beside the live one. ``batch_size`` is the events per transaction
    when following the log, ``max_batch_size`` the most a batch grows to while catching up
    (default: ``CATCH_UP_GROWTH`` times ``batch_size`` on PostgreSQL, at most
    ``CATCH_UP_LIMIT``; ``batch_size`` on SQLite). ``pause_before_commit``
    holds every batch open that many seconds before its commit, for crash tests and for
    watching two runners take turns; never in production.
    """

    def __init__(
        self,
        settings: DatabaseSettings,
        *,
        names: Sequence[str] | None = None,
        targets: Sequence[Target] | None = None,
        batch_size: int = 1000,
        max_batch_size: int | None = None,
        poll_interval: float = 1.0,
        pause_before_commit: float = 0.0,
        store: SagaStore | None = None,
    ) -> None:
        self.settings = settings
        self.names = list(names or PROJECTIONS)
        self.fixed_targets = list(targets) if targets else None
        self.batch_size = batch_size
        self.max_batch_size = max(
            batch_size, max_batch_size or _catch_up_size(settings, batch_size)
        )
        self._limit = batch_size  # of the next read: grows while catching up
        self._behind = False  # the last batch came back full
        self._full_batches = 0  # in a row, up to the last
        self._collector = CollectorPause()
        self.poll_interval = poll_interval
        self.pause_before_commit = pause_before_commit
        self._own_store = store is None
        self.store = store or SagaStore(settings, create_tables=settings.backend == "sqlite")
        self.db = ViewDatabase(settings)
        self._writers: dict[str, ViewWriter] = {}
        # The position each view was at when this runner last committed to it: if a view is
        # found elsewhere, someone else wrote to it and what the writers remember is stale.
        self._committed: dict[str, int] = {}
        self._pending: dict[str, int] = {}
        self._listener: psycopg.Connection[Any] | None = None
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="projections-read")
        self._ahead: tuple[int, Future[Batch]] | None = None
        ensure_schema(self.db)

    def close(self) -> None:
        self._collector.resume()
        self._prefetch.shutdown(wait=True, cancel_futures=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.db.dispose()
        if self._own_store:
            self.store.close()

    def __enter__(self) -> ProjectionRunner:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- running ------------------------------------------------------------------------------

    def catch_up(self, *, until: int | None = None) -> int:
        """Apply batches until the views have every event logged when this was called (or up
        to position ``until``); the number of events read."""
        head = self.head() if until is None else until
        total = 0
        try:
            while True:
                result = self._retrying(self.step)
                total += result.events
                if result.events == 0 or result.end >= head:
                    return total
        finally:
            self._collector.resume()

    def run(self, stop: threading.Event) -> None:
        """Follow the log until ``stop`` is set. Database outages are waited out."""
        log.info(
            "projections started: %s at %s (batch_size=%d)",
            ", ".join(self.names), self.db.where(), self.batch_size,
        )  # fmt: skip
        try:
            self._follow(stop)
        finally:
            self._collector.resume()
        log.info("projections stopped")

    def _follow(self, stop: threading.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                self._listen()
                result = self._retrying(self.step)
                if failing:
                    log.info("projections: database reachable again")
                    failing = False
            except (StoreError, SQLAlchemyError, psycopg.Error, PersistenceError) as exc:
                if not failing:
                    log.warning("projections: database unavailable, retrying: %s", exc)
                failing = True
                self._drop_listener()
                stop.wait(self.poll_interval)
                continue
            if result.events < self.batch_size:
                self._wait(stop)

    def step(self) -> BatchResult:
        """One batch, in one transaction. While batches come back full, the garbage collector
        stays paused between them (``catch_up``, ``run`` and ``close`` resume it)."""
        self._collector.pause()
        try:
            with self.db.writer.begin() as conn:
                result = self.apply_batch(conn)
                if result.events and self.pause_before_commit:
                    log.info("holding batch (%d, %d] before commit", result.start, result.end)
                    time.sleep(self.pause_before_commit)
        except BaseException:
            self._collector.resume()
            self.reset()
            raise
        self._collector.batch_done(behind=self._behind)
        if result.events:
            self._committed.update(self._pending)
            log.info("committed batch (%d, %d]", result.start, result.end)
        return result

    def apply_batch(self, conn: Connection) -> BatchResult:
        """One batch in the caller's transaction (which must then commit, or ``reset``)."""
        targets = self._targets(conn)
        positions = self._lock(conn, targets)
        start = min(positions.values())
        events = self._fetch(start)
        if not events:
            self._mind_statistics(conn, targets)
            return BatchResult(0, start, start)
        end, last, _ = events.items[-1]
        last_time = last.timestamp
        now = datetime.now(UTC)
        for target in targets:
            seen = positions[target.key]
            writer = self._writer(target)
            if self._committed.get(target.key) != seen:
                writer.forget()
            mine = events.after(seen) if seen > start else events
            if mine:
                writer.apply(conn, mine)
            moved = conn.execute(
                update(projection_tracking)
                .where(projection_tracking.c.view == target.key)
                .where(projection_tracking.c.position == seen)
                .values(position=end, last_event_at=last_time, updated_at=now)
            )
            if moved.rowcount != 1:  # cannot happen while the row is locked: say so loudly
                raise RuntimeError(f"tracking row {target.key} moved under its lock")
        self._mind_statistics(conn, targets)
        self._pending = {target.key: end for target in targets}
        return BatchResult(len(events), start, end)

    def _mind_statistics(self, conn: Connection, targets: Sequence[Target]) -> None:
        """Count full batches in a row; when a long run of them ends (the runner has caught
        up), the writers refresh the query planner's statistics, in this transaction."""
        if self._behind:
            self._full_batches += 1
            return
        if self._full_batches >= ANALYZE_AFTER:
            for target in targets:
                self._writer(target).caught_up(conn)
        self._full_batches = 0

    def reset(self) -> None:
        """Forget everything remembered between batches (after a rollback)."""
        for writer in self._writers.values():
            writer.forget()
        self._committed.clear()
        self._ahead = None
        self._limit = self.batch_size
        self._behind = False
        self._full_batches = 0

    def head(self) -> int:
        """The log's last position (0 when empty)."""
        try:
            return self.store.app.recorder.max_notification_id() or 0
        except PersistenceError as exc:
            raise StoreError(f"cannot read the saga log at {self.db.where()}: {exc}") from exc

    # -- inside a batch -----------------------------------------------------------------------

    def _targets(self, conn: Connection) -> list[Target]:
        if self.fixed_targets is not None:
            return self.fixed_targets
        rows = conn.execute(
            select(projection_views.c.name, projection_views.c.active_version)
            .where(projection_views.c.name.in_(self.names))
            .order_by(projection_views.c.name)
        ).all()
        return [Target(PROJECTIONS[name], version) for name, version in rows]

    def _lock(self, conn: Connection, targets: Sequence[Target]) -> dict[str, int]:
        keys = sorted(t.key for t in targets)
        rows = conn.execute(
            select(projection_tracking.c.view, projection_tracking.c.position)
            .where(projection_tracking.c.view.in_(keys))
            .order_by(projection_tracking.c.view)
            .with_for_update()
        ).all()
        if len(rows) != len(keys):
            if self.fixed_targets is not None:
                gone = sorted(set(keys) - {view for view, _ in rows})
                target = next(t for t in self.fixed_targets if t.key in gone)
                raise RebuildSupersededError(name=target.projection.name, version=target.version)
            raise _ViewMovedError()
        return {view: position for view, position in rows}

    def _fetch(self, start: int) -> Batch:
        """The decoded events after ``start``. While catching up, the next batch is read and
        decoded in the background while this one is written: the log is append-only and
        gap-free once committed (see ``eventsourcing.postgres``'s table lock), so what was
        read after a position stays right for as long as a batch starts there."""
        ahead, self._ahead = self._ahead, None
        fresh = ahead is None or ahead[0] != start
        events = self._read(start, self._limit) if fresh or ahead is None else ahead[1].result()
        self._behind = len(events) == self._limit
        if not self._behind:  # at the head: back to following it
            self._limit = self.batch_size
            return events
        self._limit = min(2 * self._limit, self.max_batch_size)
        after = events.items[-1][0]
        self._ahead = (after, self._prefetch.submit(self._read, after, self._limit))
        return events

    def _read(self, start: int, limit: int) -> Batch:
        app = self.store.app
        try:
            notifications = app.recorder.select_notifications(
                start=start, limit=limit, inclusive_of_start=False
            )
        except PersistenceError as exc:
            raise StoreError(f"cannot read the saga log at {self.db.where()}: {exc}") from exc
        # The audit trail keeps each event's stored JSON (see ``audit``), unless the store
        # compresses or encrypts it.
        raw = app.mapper.cipher is None and app.mapper.compressor is None
        return Batch(
            [(n.id, decode(app, n), n.state.decode() if raw else None) for n in notifications]
        )

    def _writer(self, target: Target) -> ViewWriter:
        writer = self._writers.get(target.key)
        if writer is None:
            writer = self._writers[target.key] = writer_for(
                target.projection, target.version, self._load_state
            )
        return writer

    def _load_state(self, saga_id: UUID, version: int) -> SagaState | None:
        try:
            return self.store.load_state(saga_id, version=version)
        except (TypeError, ValueError) as exc:  # a type saga_es.state does not know either
            log.warning("saga %s: cannot replay to version %d: %s", saga_id, version, exc)
            return None

    def _retrying(self, step: Any) -> BatchResult:
        # A rebuild switched a view to its new version and dropped the old one while this
        # batch was starting: read the pointers again.
        for _ in range(10):
            try:
                result: BatchResult = step()
                return result
            except _ViewMovedError:
                continue
            except DBAPIError as exc:
                if not _vanished_table(exc):
                    raise
        raise StoreError("projection views kept moving under this runner (10 attempts)")

    # -- waiting ------------------------------------------------------------------------------

    def _listen(self) -> None:
        if self.settings.backend != "postgres" or self._listener is not None:
            return
        # LISTEN before the next batch: an event committed between an empty batch and the
        # wait would otherwise wait for the next poll.
        conn = psycopg.connect(self.settings.psycopg_conninfo, autocommit=True, connect_timeout=10)
        channel = self.store.app.recorder.channel_name  # type: ignore[attr-defined]
        conn.execute(f'LISTEN "{channel}"')
        self._listener = conn

    def _drop_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(psycopg.Error):
                self._listener.close()
            self._listener = None

    def _wait(self, stop: threading.Event) -> None:
        if self._listener is None:
            stop.wait(self.poll_interval)
            return
        deadline = time.monotonic() + self.poll_interval
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                # notifies() cannot watch the stop flag: wait in short slices.
                slice_ = min(0.25, max(0.0, deadline - time.monotonic()))
                if any(True for _ in self._listener.notifies(timeout=slice_, stop_after=1)):
                    for _ in self._drained():
                        pass
                    return
        except psycopg.Error as exc:
            log.warning("projections: lost the LISTEN connection: %s", exc)
            self._drop_listener()

    def _drained(self) -> Iterator[Any]:
        assert self._listener is not None
        yield from self._listener.notifies(timeout=0.001)


def _catch_up_size(settings: DatabaseSettings, batch_size: int) -> int:
    if settings.backend != "postgres":
        return batch_size  # a batch holds SQLite's write lock: the engine would wait longer
    return max(batch_size, min(CATCH_UP_GROWTH * batch_size, CATCH_UP_LIMIT))


def _vanished_table(exc: DBAPIError) -> bool:
    text = str(exc.orig).lower()
    return "does not exist" in text or "no such table" in text
