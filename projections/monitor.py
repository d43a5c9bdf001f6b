"""Where each projection is: its position in the log, and how far behind the log it is.

lag_events: events logged after the projection's position (counted: notification ids have
    gaps, so subtracting positions would overstate it).
lag_seconds: the time between the last event it applied and the newest event logged, both in
    the engine's own event time; 0 when it is caught up, None before its first batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from eventsourcing.persistence import PersistenceError
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from projections.database import ViewDatabase
from projections.errors import ViewNotReadyError
from projections.eventinfo import decode
from projections.schema import projection_tracking, projection_views
from saga_es.errors import StoreError
from saga_es.persistence.store import SagaStore

__all__ = ["ProjectionPosition", "positions"]


@dataclass(frozen=True)
class ProjectionPosition:
    name: str
    version: int
    role: str  # "active" (queries read it) or "building" (a rebuild is filling it)
    position: int
    head: int
    lag_events: int
    lag_seconds: float | None  # None: nothing applied yet
    last_event_at: datetime | None
    updated_at: datetime | None


def positions(db: ViewDatabase, store: SagaStore) -> list[ProjectionPosition]:
    recorder = store.app.recorder
    try:
        head = recorder.max_notification_id() or 0
        newest = recorder.select_notifications(start=head, limit=1) if head else []
        head_time = decode(store.app, newest[0]).timestamp if newest else None
    except PersistenceError as exc:
        raise StoreError(f"cannot read the saga log at {db.where()}: {exc}") from exc
    events = recorder.events_table_name  # type: ignore[attr-defined]
    if db.backend == "postgres":
        count = f"SELECT count(*) FROM {db.table(events)} WHERE notification_id > :p"
    else:
        count = f"SELECT count(*) FROM {events} WHERE rowid > :p"
    try:
        with db.reader.connect() as conn:
            views = {
                r.name: r
                for r in conn.execute(select(projection_views).order_by(projection_views.c.name))
            }
            found = []
            for row in conn.execute(select(projection_tracking)).all():
                view = views.get(row.name)
                if view is None:
                    continue
                role = "active" if row.version == view.active_version else "building"
                behind = int(conn.execute(text(count), {"p": row.position}).scalar_one())
                lag: float | None = 0.0
                if behind and head_time is not None and row.last_event_at is not None:
                    lag = max(0.0, (head_time - row.last_event_at).total_seconds())
                elif behind:
                    lag = None  # nothing applied yet
                found.append(
                    ProjectionPosition(
                        row.name,
                        row.version,
                        role,
                        row.position,
                        head,
                        behind,
                        lag,
                        row.last_event_at,
                        row.updated_at,
                    )
                )
    except SQLAlchemyError as exc:
        text_ = str(getattr(exc, "orig", exc)).lower()
        if "projection_" in text_ and ("does not exist" in text_ or "no such table" in text_):
            raise ViewNotReadyError(where=db.where()) from exc
        raise StoreError(f"cannot read the projections' positions: {exc}") from exc
    return sorted(found, key=lambda p: (p.name, p.role != "active", p.version))
