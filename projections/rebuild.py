"""Rebuild a view from position 0 beside the live one, without stopping anything.

1. Reserve version N+1 (``projection_views.building_version``) and create its empty tables.
2. Fill it from the start of the log in batches, like any runner, while the live runners keep
   maintaining version N and the engine keeps appending.
3. Switch, in one transaction: apply what was logged meanwhile, point the SQL view and
   ``active_version`` at N+1. Queries see N until that commit and N+1 after it; live runners
   read the pointer at the start of each batch, so their next batch goes to N+1, from the
   position the switch left it at.
4. Drop version N (after any batch still writing to it has finished: see ``drop_version``).

A rebuild whose process died leaves its reservation behind; ``force=True`` drops that
half-built version and starts again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from projections.errors import (
    RebuildInProgressError,
    RebuildSupersededError,
    UnknownProjectionError,
)
from projections.runner import ProjectionRunner, Target
from projections.schema import PROJECTIONS, projection_views
from projections.setup import create_version, drop_version, lock_schema, point_view_at
from saga_es.errors import StoreError
from saga_es.persistence.settings import DatabaseSettings

__all__ = ["RebuildReport", "rebuild"]

log = logging.getLogger("projections.rebuild")


@dataclass(frozen=True)
class RebuildReport:
    name: str
    old_version: int
    new_version: int
    events: int  # applied to the new version
    seconds: float


def rebuild(
    settings: DatabaseSettings,
    name: str,
    *,
    batch_size: int = 1000,
    force: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> RebuildReport:
    """Rebuild projection ``name``; ``on_progress(position, head)`` after each batch."""
    projection = PROJECTIONS.get(name)
    if projection is None:
        raise UnknownProjectionError(name=name, known=sorted(PROJECTIONS))
    started = time.monotonic()
    with ProjectionRunner(settings, names=[name], batch_size=batch_size) as live:
        db = live.db
        try:
            old, new = _reserve(live, name, force=force)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot start the rebuild at {db.where()}: {exc}") from exc
    log.info("rebuilding %s: version %d beside version %d", name, new, old)
    target = Target(projection, new)
    with ProjectionRunner(settings, targets=[target], batch_size=batch_size) as builder:
        applied = 0
        while True:
            head = builder.head()
            result = builder.step()
            applied += result.events
            if on_progress is not None:
                on_progress(result.end, head)
            if result.events < batch_size or result.end >= head:
                break
        try:
            applied += _switch(builder, name, new)
            with builder.db.writer.begin() as conn:
                lock_schema(conn)
                drop_version(conn, builder.db, projection, old)
        except SQLAlchemyError as exc:
            builder.reset()
            raise StoreError(f"rebuild of {name} could not switch: {exc}") from exc
    log.info("rebuilt %s: version %d is live, version %d dropped", name, new, old)
    return RebuildReport(name, old, new, applied, time.monotonic() - started)


def _reserve(live: ProjectionRunner, name: str, *, force: bool) -> tuple[int, int]:
    projection = PROJECTIONS[name]
    with live.db.writer.begin() as conn:
        lock_schema(conn)
        row = conn.execute(
            select(projection_views).where(projection_views.c.name == name).with_for_update()
        ).one()
        building = row.building_version
        if building is not None:
            if not force:
                raise RebuildInProgressError(name=name, version=building)
            drop_version(conn, live.db, projection, building)
        new = max(row.active_version, building or 0) + 1
        create_version(conn, live.db, projection, new)
        conn.execute(
            update(projection_views)
            .where(projection_views.c.name == name)
            .values(building_version=new, building_since=datetime.now(UTC))
        )
        return row.active_version, new


def _switch(builder: ProjectionRunner, name: str, new: int) -> int:
    """Catch up the last events and make ``new`` the live version, in one transaction."""
    projection = PROJECTIONS[name]
    applied = 0
    with builder.db.writer.begin() as conn:
        building = conn.execute(
            select(projection_views.c.building_version)
            .where(projection_views.c.name == name)
            .with_for_update()
        ).scalar_one()
        if building != new:
            raise RebuildSupersededError(name=name, version=new)
        head = builder.head()
        while True:
            result = builder.apply_batch(conn)
            applied += result.events
            if result.events == 0 or result.end >= head:
                break
        point_view_at(conn, builder.db, projection, new)
        conn.execute(
            update(projection_views)
            .where(projection_views.c.name == name)
            .values(building_version=None, building_since=None)
        )
    return applied
