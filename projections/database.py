"""SQLAlchemy engines for the views, on the saga store's database, and the column types.

The views live next to the event store (same PostgreSQL schema, or the same SQLite file), so
one database URL configures both. Two engines per database:

* ``writer``: the projection runner's transactions. On SQLite a batch starts with
  ``BEGIN IMMEDIATE``, taking the database's single write lock before it reads its tracking
  position: a second runner waits for the lock instead of reading a position about to change.
* ``reader``: queries, plain ``BEGIN`` (SQLite) so that reading never takes the write lock.

Types store the same on both backends as the engine's own SQLite tables do: UUIDs as 32-char
hex, times as fixed-width UTC text (so that comparing strings compares times).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import URL, DateTime, Engine, String, create_engine, event
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator, TypeEngine

from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.writes import parse_sqlite_time, sqlite_time

__all__ = ["UTCDateTime", "ViewDatabase"]


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes: ``timestamptz`` on PostgreSQL, fixed-width text on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(27))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"{value!r}: times must be timezone-aware")
        return sqlite_time(value) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            return parse_sqlite_time(value)
        assert isinstance(value, datetime)
        return value.astimezone(UTC)


class ViewDatabase:
    """The database of the views: engines, the dialect, and schema-qualified names for raw SQL."""

    def __init__(self, settings: DatabaseSettings, *, pool_size: int = 2) -> None:
        self.settings = settings
        self.backend = settings.backend
        self.schema = settings.schema if settings.backend == "postgres" else None
        self.writer: Engine
        self.reader: Engine
        if settings.backend == "postgres":
            e = settings.env
            url = URL.create(
                "postgresql+psycopg",
                username=e["POSTGRES_USER"],
                password=e["POSTGRES_PASSWORD"] or None,
                host=e["POSTGRES_HOST"],
                port=int(e["POSTGRES_PORT"]),
                database=e["POSTGRES_DBNAME"],
            )
            # Tables are declared without a schema; every statement is compiled for this one.
            options = {"schema_translate_map": {None: settings.schema}}
            connect_args = {"application_name": "saga-es-projections", "connect_timeout": 10}
            self.writer = create_engine(
                url, pool_size=pool_size, max_overflow=2, pool_pre_ping=True,
                connect_args=connect_args,
            ).execution_options(**options)  # fmt: skip
            self.reader = self.writer
        else:
            assert settings.sqlite_path is not None
            url = URL.create("sqlite", database=str(settings.sqlite_path))
            self.writer = _sqlite_engine(url, begin="BEGIN IMMEDIATE")
            self.reader = _sqlite_engine(url, begin="BEGIN")

    def table(self, name: str) -> str:
        """``name`` qualified with the PostgreSQL schema, for raw SQL (SQLite has none)."""
        return f'"{self.schema}"."{name}"' if self.schema else f'"{name}"'

    def where(self) -> str:
        return self.settings.redacted()

    def dispose(self) -> None:
        self.writer.dispose()
        if self.reader is not self.writer:
            self.reader.dispose()


def _sqlite_engine(url: URL, *, begin: str) -> Engine:
    # No pool: a connection is cheap to open on SQLite, and a pooled one would keep the file's
    # WAL from being checkpointed by other processes for no benefit. ``timeout`` is how long a
    # writer waits for another one's lock.
    engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 60})

    # pysqlite's own transaction handling would defer BEGIN to the first write; take control
    # of it so that a runner's batch holds the write lock from its first read (the
    # SQLAlchemy documentation's recipe for SQLite transactions).
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)

    return engine
