"""Questions an operator asks, answered from the views (SQLAlchemy 2 Core).

    queries = SagaQueries(settings)
    queries.status(saga_id)                       # where is it, why, since when
    queries.status_by_key("o-4711")               # the same, by business key
    queries.list_sagas(state="stuck", limit=50)   # a Page; page.next_cursor for the next one
    queries.list_sagas(idle_for=timedelta(minutes=10))   # stuck candidates
    queries.history(saga_id)                      # the audit timeline
    queries.step_stats(definition="order-fulfillment")

Lists are newest first by (started_at, saga_id), which never changes for a saga, so a keyset
cursor stays valid while the sagas on a page move on; each page is one index range scan, as
fast deep in the list as at its start. Bad input raises ``InvalidQueryError`` (or
``ImpossibleTimeRangeError``) before any query runs.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, Select, Uuid, bindparam, select, tuple_
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from projections.audit import plain_summary
from projections.database import UTCDateTime, ViewDatabase
from projections.errors import (
    ImpossibleTimeRangeError,
    InvalidQueryError,
    SagaNotFoundError,
    ViewNotReadyError,
)
from projections.schema import ACTIVE_STATES, BUCKET_COLUMNS, public_tables
from projections.stats import percentile
from projections.status import COLUMNS, StatusRow
from saga_es.errors import StoreError
from saga_es.persistence.settings import DatabaseSettings

__all__ = ["MAX_LIMIT", "AuditEntry", "Page", "SagaQueries", "StepStatistics", "TimeRange"]

MAX_LIMIT = 1000
_TABLES = public_tables()
_STATUS, _AUDIT, _STATS = _TABLES["status"], _TABLES["audit"], _TABLES["stats"]
_STATES = ("started", "pending", "compensating", "completed", "failed", "stuck")


@dataclass(frozen=True)
class TimeRange:
    """``after <= t <= before``; either end may be open. An empty range is refused."""

    after: datetime | None = None
    before: datetime | None = None

    def check(self, field_name: str) -> None:
        for end in (self.after, self.before):
            if end is not None and end.tzinfo is None:
                raise InvalidQueryError(
                    field=field_name, value=end.isoformat(), detail="needs a timezone"
                )
        if self.after and self.before and self.after > self.before:
            raise ImpossibleTimeRangeError(field=field_name, after=self.after, before=self.before)


@dataclass(frozen=True)
class Page:
    items: list[StatusRow]
    next_cursor: str | None  # None: this was the last page

    @staticmethod
    def cursor_after(row: StatusRow) -> str:
        raw = json.dumps([row.started_at.isoformat(), row.saga_id.hex]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@dataclass(frozen=True)
class AuditEntry:
    position: int
    saga_id: UUID
    version: int
    event_type: str
    step: str | None
    attempt: int | None
    command_id: UUID | None
    occurred_at: datetime
    actor: str
    summary: dict[str, Any]


@dataclass(frozen=True)
class StepStatistics:
    definition: str
    definition_version: int
    step: str
    phase: str  # "action" or "compensation" ("succeeded" of a compensation: compensated)
    issued: int
    succeeded: int
    failed: int
    retried: int
    timed_out: int
    ignored: int
    latency_count: int
    latency_mean_ms: float | None
    latency_max_ms: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    buckets: dict[str, int] = field(default_factory=dict)

    @property
    def compensated(self) -> int:
        return self.succeeded if self.phase == "compensation" else 0


class SagaQueries:
    def __init__(self, settings: DatabaseSettings, *, db: ViewDatabase | None = None) -> None:
        self._own_db = db is None
        self.db = db or ViewDatabase(settings)

    def close(self) -> None:
        if self._own_db:
            self.db.dispose()

    def __enter__(self) -> SagaQueries:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- status -------------------------------------------------------------------------------

    def status(self, saga_id: UUID) -> StatusRow:
        with self._connection() as conn:
            row = conn.execute(select(_STATUS).where(_STATUS.c.saga_id == saga_id)).first()
        if row is None:
            raise SagaNotFoundError(saga_id=saga_id)
        return _status(row)

    def status_by_key(self, business_key: str, *, definition: str | None = None) -> list[StatusRow]:
        """Every saga with this business key (one per definition that uses it)."""
        query = select(_STATUS).where(_STATUS.c.business_key == business_key)
        if definition is not None:
            query = query.where(_STATUS.c.definition == definition)
        with self._connection() as conn:
            rows = conn.execute(query.order_by(_STATUS.c.definition)).all()
        if not rows:
            raise SagaNotFoundError(business_key=business_key)
        return [_status(r) for r in rows]

    def list_sagas(
        self,
        *,
        state: str | None = None,
        definition: str | None = None,
        step: str | None = None,
        error_code: str | None = None,
        correlation_id: str | None = None,
        started: TimeRange | None = None,
        updated: TimeRange | None = None,
        idle_for: timedelta | None = None,
        now: datetime | None = None,
        limit: int = 50,
        after: str | None = None,
    ) -> Page:
        """Sagas matching every filter given, newest first, ``limit`` at a time.

        ``idle_for``: only sagas still running (not completed, failed or stuck) whose last
        event is older than that, as of ``now`` (default: the wall clock): stuck candidates.
        ``after``: the ``next_cursor`` of the previous page.
        """
        if state is not None and state not in _STATES:
            raise InvalidQueryError(
                field="state", value=state, detail=f"one of {', '.join(_STATES)}"
            )
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidQueryError(field="limit", value=limit, detail=f"from 1 to {MAX_LIMIT}")
        if idle_for is not None and idle_for <= timedelta(0):
            raise InvalidQueryError(
                field="idle_for", value=str(idle_for), detail="must be positive"
            )
        t = _STATUS
        query: Select[Any] = select(t)
        for column, value in (
            (t.c.state, state), (t.c.definition, definition), (t.c.current_step, step),
            (t.c.error_code, error_code), (t.c.correlation_id, correlation_id),
        ):  # fmt: skip
            if value is not None:
                query = query.where(column == value)
        for column, span, name in (
            (t.c.started_at, started, "started"),
            (t.c.updated_at, updated, "updated"),
        ):
            if span is not None:
                span.check(name)
                if span.after is not None:
                    query = query.where(column >= span.after)
                if span.before is not None:
                    query = query.where(column <= span.before)
        if idle_for is not None:
            moment = now or datetime.now(UTC)
            query = query.where(t.c.state.in_(ACTIVE_STATES), t.c.updated_at < moment - idle_for)
        if after is not None:
            started_at, saga_id = _parse_cursor(after)
            query = query.where(
                tuple_(t.c.started_at, t.c.saga_id)
                < tuple_(
                    bindparam("cursor_time", started_at, type_=UTCDateTime()),
                    bindparam("cursor_id", saga_id, type_=Uuid()),
                )
            )
        query = query.order_by(t.c.started_at.desc(), t.c.saga_id.desc()).limit(limit + 1)
        with self._connection() as conn:
            rows = [_status(r) for r in conn.execute(query).all()]
        more = len(rows) > limit
        items = rows[:limit]
        return Page(items, Page.cursor_after(items[-1]) if more else None)

    # -- history and statistics ---------------------------------------------------------------

    def history(self, saga_id: UUID) -> list[AuditEntry]:
        """The saga's audit trail, oldest first."""
        query = select(_AUDIT).where(_AUDIT.c.saga_id == saga_id).order_by(_AUDIT.c.version)
        with self._connection() as conn:
            rows = conn.execute(query).all()
        if not rows:
            raise SagaNotFoundError(saga_id=saga_id)
        return [AuditEntry(**{**r._asdict(), "summary": plain_summary(r.summary)}) for r in rows]

    def step_stats(self, *, definition: str | None = None) -> list[StepStatistics]:
        """Per definition, version, step and phase; steps in the order most commands reach
        them (the process order, for a saga that runs its steps one after another)."""
        t = _STATS
        query = select(t)
        if definition is not None:
            query = query.where(t.c.definition == definition)
        query = query.order_by(
            t.c.definition, t.c.definition_version, t.c.phase, t.c.issued.desc(), t.c.step
        )
        with self._connection() as conn:
            rows = conn.execute(query).all()
        return [_statistics(r) for r in rows]

    # -- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        try:
            with self.db.reader.connect() as conn:
                yield conn
        except DBAPIError as exc:
            text = str(exc.orig).lower()
            if ("relation" in text and "does not exist" in text) or "no such table" in text:
                raise ViewNotReadyError(where=self.db.where()) from exc
            raise StoreError(f"query failed at {self.db.where()}: {exc.orig}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"query failed at {self.db.where()}: {exc}") from exc


def _status(row: Any) -> StatusRow:
    return StatusRow(**{c: getattr(row, c) for c in COLUMNS})


def _statistics(row: Any) -> StepStatistics:
    buckets: Sequence[int] = [getattr(row, c) for c in BUCKET_COLUMNS]
    count, maximum = row.latency_count, row.latency_max_ms

    def q(quantile: float) -> float | None:
        return percentile(buckets, quantile, maximum) if count else None

    return StepStatistics(
        definition=row.definition,
        definition_version=row.definition_version,
        step=row.step,
        phase=row.phase,
        issued=row.issued,
        succeeded=row.succeeded,
        failed=row.failed,
        retried=row.retried,
        timed_out=row.timed_out,
        ignored=row.ignored,
        latency_count=count,
        latency_mean_ms=row.latency_sum_ms / count if count else None,
        latency_max_ms=maximum if count else None,
        p50_ms=q(0.50),
        p95_ms=q(0.95),
        p99_ms=q(0.99),
        buckets=dict(zip(BUCKET_COLUMNS, buckets, strict=True)),
    )


def _parse_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        started_at, saga_id = json.loads(raw)
        moment = datetime.fromisoformat(started_at)
        if moment.tzinfo is None:
            raise ValueError("no timezone")
        return moment, UUID(hex=saga_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidQueryError(
            field="cursor", value=cursor, detail="not a cursor this command returned"
        ) from exc
