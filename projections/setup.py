"""Creating, switching and dropping the views' table sets.

Runners create what is missing when they start; on PostgreSQL under a transaction-scoped
advisory lock, because concurrent ``CREATE TABLE IF NOT EXISTS`` of the same table can fail
(the second creator hits the catalog's unique index) and compose starts every service at once.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Connection, delete, insert, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from projections.database import ViewDatabase
from projections.schema import (
    CONTROL,
    PROJECTIONS,
    Projection,
    projection_tracking,
    projection_views,
)
from saga_es.errors import StoreError

__all__ = ["create_version", "drop_version", "ensure_schema", "lock_schema", "point_view_at"]

#: pg_advisory_xact_lock key for the views' DDL ("saga-es projections", arbitrary but fixed).
_DDL_LOCK = 0x5A6A_E5_0001


def lock_schema(conn: Connection) -> None:
    """Serialise DDL on the views with any other runner or rebuild (PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _DDL_LOCK})


def ensure_schema(db: ViewDatabase) -> None:
    """Create the control tables and version 1 of every projection that has none."""
    try:
        with db.writer.begin() as conn:
            lock_schema(conn)
            CONTROL.create_all(conn, checkfirst=True)
            present = set(conn.execute(select(projection_views.c.name)).scalars())
            for projection in PROJECTIONS.values():
                if projection.name not in present:
                    create_version(conn, db, projection, 1)
                    conn.execute(
                        insert(projection_views).values(
                            name=projection.name, active_version=1, switched_at=_now()
                        )
                    )
                    point_view_at(conn, db, projection, 1)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot create the projection tables at {db.where()}: {exc}") from exc


def create_version(
    conn: Connection, db: ViewDatabase, projection: Projection, version: int
) -> None:
    """Empty tables for ``version`` and its tracking row at position 0."""
    for table in projection.tables(version):
        table.create(conn, checkfirst=True)
    conn.execute(
        delete(projection_tracking).where(
            projection_tracking.c.view == projection.tracking_key(version)
        )
    )
    conn.execute(
        insert(projection_tracking).values(
            view=projection.tracking_key(version),
            name=projection.name,
            version=version,
            position=0,
            updated_at=_now(),
        )
    )


def drop_version(conn: Connection, db: ViewDatabase, projection: Projection, version: int) -> None:
    """Drop ``version``'s tables and tracking row. Locks the tracking row first: a runner
    still in a batch on this version finishes it before the tables go."""
    key = projection.tracking_key(version)
    conn.execute(
        select(projection_tracking.c.view)
        .where(projection_tracking.c.view == key)
        .with_for_update()
    ).all()
    conn.execute(delete(projection_tracking).where(projection_tracking.c.view == key))
    for table in reversed(projection.tables(version)):
        table.drop(conn, checkfirst=True)


def point_view_at(conn: Connection, db: ViewDatabase, projection: Projection, version: int) -> None:
    """Make the SQL view queries read select from ``version`` (in the caller's transaction)."""
    public, source = db.table(projection.public), db.table(projection.tables(version)[0].name)
    conn.exec_driver_sql(f"DROP VIEW IF EXISTS {public}")
    conn.exec_driver_sql(f"CREATE VIEW {public} AS SELECT * FROM {source}")
    conn.execute(
        update(projection_views)
        .where(projection_views.c.name == projection.name)
        .values(active_version=version, switched_at=_now())
    )


def _now() -> datetime:
    return datetime.now(UTC)
