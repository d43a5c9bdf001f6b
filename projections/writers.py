"""Apply a batch of events to one version of a view, inside the caller's transaction.

Each writer reads the rows the batch touches, folds the events in memory with the pure
projectors (``status``, ``audit``, ``stats``) and writes every changed row back in a few
statements; the runner commits them with the tracking position. Upserts are the dialect's own
``INSERT ... ON CONFLICT`` (PostgreSQL and SQLite share the syntax).
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import cached_property
from typing import Any, Generic, Protocol, TypeVar
from uuid import UUID

from sqlalchemy import Connection, Table

from projections.audit import audit_row
from projections.bulk import insert_many, qualified, rows_by_id, upsert_many
from projections.schema import BUCKET_COLUMNS, Projection
from projections.stats import COUNTERS, SagaContext, StatsBatch
from projections.status import COLUMNS, StatusRow, apply_status, with_state
from saga_es.state import SagaState

__all__ = [
    "AuditWriter",
    "Batch",
    "Item",
    "StateLoader",
    "StatsWriter",
    "StatusWriter",
    "ViewWriter",
    "writer_for",
]

log = logging.getLogger("projections.runner")

#: (position, event, its stored JSON state or None).
Item = tuple[int, Any, str | None]
StateLoader = Callable[[UUID, int], SagaState | None]
_Row = TypeVar("_Row")


class Batch:
    """A batch's decoded events, in log order (``items``), and grouped by saga (``by_saga``):
    the status and statistics folds work saga by saga, so each looks a saga up once per
    batch rather than once per event."""

    def __init__(self, items: list[Item]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def after(self, position: int) -> Batch:
        """The events after ``position``."""
        return Batch([item for item in self.items if item[0] > position])

    @cached_property
    def by_saga(self) -> dict[UUID, list[tuple[int, Any]]]:
        """Each saga's (position, event) pairs in order; worked out once for every writer."""
        groups: defaultdict[UUID, list[tuple[int, Any]]] = defaultdict(list)
        for position, event, _ in self.items:
            groups[event.originator_id].append((position, event))
        return dict(groups)  # a plain dict: looking up a saga not in the batch adds nothing


class ViewWriter(Protocol):
    def apply(self, conn: Connection, batch: Batch) -> None:
        """Apply ``batch`` in the caller's transaction."""

    def forget(self) -> None:
        """Drop what is remembered of the view's rows: another process may have changed
        them, or the transaction that would have stored them rolled back."""

    def caught_up(self, conn: Connection) -> None:
        """The runner has just applied a long run of full batches and reached the head."""


class _Cache(Generic[_Row]):
    """The rows of recently seen sagas, so that a batch need not read them back. Valid only
    while this process is the view's only writer: the runner calls ``forget`` otherwise."""

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self.rows: dict[UUID, _Row] = {}

    def split(self, ids: Iterable[UUID]) -> tuple[dict[UUID, _Row], list[UUID]]:
        found, missing = {}, []
        for saga_id in ids:
            row = self.rows.get(saga_id)
            if row is None:
                missing.append(saga_id)
            else:
                found[saga_id] = row
        return found, missing

    def keep(self, rows: dict[UUID, _Row]) -> None:
        self.rows.update(rows)
        excess = len(self.rows) - self.size
        if excess > 0:  # the oldest inserted go first: sagas that have not moved for longest
            for saga_id in list(itertools.islice(self.rows, excess + self.size // 10)):
                del self.rows[saga_id]

    def clear(self) -> None:
        self.rows.clear()


def writer_for(projection: Projection, version: int, load_state: StateLoader) -> ViewWriter:
    tables = projection.tables(version)
    if projection.name == "status":
        return StatusWriter(tables[0], load_state)
    if projection.name == "audit":
        return AuditWriter(tables[0])
    return StatsWriter(tables[0], tables[1])


class StatusWriter:
    def __init__(self, table: Table, load_state: StateLoader) -> None:
        self.table, self.load_state = table, load_state
        self.cache: _Cache[StatusRow] = _Cache()

    def forget(self) -> None:
        self.cache.clear()

    def caught_up(self, conn: Connection) -> None:
        # Lists filter and order by any of eight indexes: which one is fast depends on the
        # planner's statistics, stale after a bulk load until autovacuum gets to the table.
        # (SQLite has none unless asked, before or after: nothing to refresh there.)
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"ANALYZE {qualified(conn, self.table)}")

    def apply(self, conn: Connection, batch: Batch) -> None:
        groups = batch.by_saga
        rows, missing = self.cache.split(s for s, events in groups.items() if not _starts(events))
        for r in rows_by_id(conn, self.table, missing):
            rows[r.saga_id] = StatusRow(**{c: getattr(r, c) for c in COLUMNS})
        for saga_id, events in groups.items():
            row = self._fold(saga_id, rows.get(saga_id), events)
            if row is not None:
                rows[saga_id] = row
        upsert_many(conn, self.table, ["saga_id"], [r.as_dict() for r in rows.values()])
        self.cache.keep(rows)

    def _fold(
        self, saga_id: UUID, row: StatusRow | None, events: list[tuple[int, Any]]
    ) -> StatusRow | None:
        for position, event in events:
            if row is None and not _is_start(event):
                log.warning("saga %s: event at %d before its start; skipped", saga_id, position)
                continue
            row, unknown = apply_status(row, event, position)
            if unknown:
                # A type this fold does not know (newer than this code): the saga's own state
                # rules do; rebuild the state columns from its stream up to this event.
                state = self.load_state(saga_id, event.originator_version)
                if state is not None:
                    with_state(row, state)
        return row


class AuditWriter:
    def __init__(self, table: Table) -> None:
        self.table = table

    def forget(self) -> None:
        pass  # nothing kept: every event is a new row

    def caught_up(self, conn: Connection) -> None:
        pass  # read by saga only, through its one index: no plan to choose

    def apply(self, conn: Connection, batch: Batch) -> None:
        # A plain INSERT: a position already recorded violates the primary key and aborts the
        # batch, a second guard (after the tracking row) against applying an event twice.
        rows = [audit_row(e, p, stored) for p, e, stored in batch.items]
        insert_many(conn, self.table, rows)


class StatsWriter:
    def __init__(self, table: Table, sagas: Table) -> None:
        self.table, self.sagas = table, sagas
        self.cache: _Cache[SagaContext] = _Cache()

    def forget(self) -> None:
        self.cache.clear()

    def caught_up(self, conn: Connection) -> None:
        pass  # a few rows per step, read whole: no plan to choose

    def apply(self, conn: Connection, batch: Batch) -> None:
        groups = batch.by_saga
        known, missing = self.cache.split(s for s, events in groups.items() if not _starts(events))
        for r in rows_by_id(conn, self.sagas, missing):
            known[r.saga_id] = SagaContext(
                r.saga_id, r.definition, r.definition_version, r.command_id, r.issued_at
            )
        counting = StatsBatch(known)
        for saga_id, events in groups.items():
            counting.apply(saga_id, [event for _, event in events])
        contexts = [vars(counting.contexts[s]) for s in counting.changed]
        upsert_many(conn, self.sagas, ["saga_id"], contexts)
        upsert_many(
            conn,
            self.table,
            ["definition", "definition_version", "step", "phase"],
            [c.as_row(k) for k, c in counting.counters.items()],
            add=(*COUNTERS, "latency_count", "latency_sum_ms", *BUCKET_COLUMNS),
            maximum=("latency_max_ms",),
        )
        self.cache.keep(counting.contexts)


def _is_start(event: Any) -> bool:
    return type(event).__name__ == "SagaStarted"


def _starts(events: list[tuple[int, Any]]) -> bool:
    """Whether a saga's events in a batch begin with its start: a saga new to the views."""
    return _is_start(events[0][1])
