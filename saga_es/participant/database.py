"""From a database URL to a SQLAlchemy engine a participant can share with its handlers.

Accepted: any SQLAlchemy 2 URL for PostgreSQL or SQLite, plus the saga-es URL conventions, so
one URL can name the engine's database and a participant's:

* ``postgresql://`` and ``postgres://`` use psycopg 3 (the driver saga-es already depends on);
* ``?schema=name`` puts the participant's tables in that schema (it becomes the connection's
  ``search_path``, so handlers' unqualified table names land there too);
* ``?pool_size=`` / ``?max_overflow=`` size the pool, ``?lock_timeout=`` (seconds) bounds lock
  waits.

SQLite gets ``BEGIN IMMEDIATE`` transactions: a participant transaction always writes (its
inbox row), and two deferred transactions that both upgrade to writing fail with "database is
locked" at once instead of waiting their turn. WAL lets readers proceed meanwhile.
"""

from __future__ import annotations

import os
import re
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from saga_es.errors import ConfigurationError

__all__ = ["Database"]

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_OUR_OPTIONS = ("schema", "pool_size", "max_overflow", "lock_timeout")


class Database:
    """One database, opened lazily and once per process.

    Celery's prefork pool forks worker processes after the application (and possibly a
    connection pool) was set up: a child must not use its parent's connections, so each process
    gets its own engine the first time it asks.
    """

    def __init__(self, url: str) -> None:
        self.url, self.schema, self._engine_options = _parse(url)
        self._engine: Engine | None = None
        self._pid = 0

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self._create()
        elif self._pid != os.getpid():
            # Forget the parent's pooled connections without closing them: they are still the
            # parent's, and closing a shared socket from here would break them there.
            self._engine.dispose(close=False)
        self._pid = os.getpid()
        return self._engine

    @property
    def backend(self) -> str:
        return "postgres" if self.url.get_backend_name() == "postgresql" else "sqlite"

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _create(self) -> Engine:
        engine = create_engine(self.url, **self._engine_options)
        if self.backend == "sqlite":
            _immediate_transactions(engine)
        return engine


def _parse(raw: str) -> tuple[URL, str | None, dict[str, Any]]:
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ConfigurationError(f"participant database URL {raw!r}: {exc}") from exc
    backend = url.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    if backend not in ("postgresql", "sqlite"):
        raise ConfigurationError(
            f"participant database URL {url.render_as_string()!r}: "
            "scheme must be postgresql:// or sqlite:///"
        )
    query = dict(url.query)
    ours = {key: str(query.pop(key)) for key in _OUR_OPTIONS if key in query}
    url = url.set(query=query)
    if backend == "sqlite":
        if ours:
            raise ConfigurationError(
                f"participant database URL {url.render_as_string()!r}: "
                f"{', '.join(sorted(ours))} apply to PostgreSQL only"
            )
        return url, None, {"connect_args": {"timeout": 30}}
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    schema = ours.get("schema")
    if schema is not None and not _IDENTIFIER.match(schema):
        raise ConfigurationError(
            f"participant database URL {url.render_as_string(hide_password=True)!r}: "
            f"schema {schema!r} must be a lower-case identifier"
        )
    settings = []
    if schema:
        settings.append(f"-c search_path={schema}")
    try:
        if "lock_timeout" in ours:
            settings.append(f"-c lock_timeout={int(float(ours['lock_timeout']) * 1000)}ms")
        options: dict[str, Any] = {
            # No pre-ping (a round trip per command): a pooled connection that died with a
            # database restart fails its command as a transient error, SQLAlchemy discards
            # the pool's connections, and the retry runs on a fresh one.
            "pool_size": int(ours.get("pool_size", 5)),
            "max_overflow": int(ours.get("max_overflow", 10)),
        }
    except ValueError as exc:
        raise ConfigurationError(
            f"participant database URL {url.render_as_string(hide_password=True)!r}: "
            f"pool_size, max_overflow and lock_timeout are numbers ({exc})"
        ) from exc
    if settings:
        options["connect_args"] = {"options": " ".join(settings)}
    return url, schema, options


def _immediate_transactions(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, say when transactions begin (the module's
        # own implicit BEGIN would be DEFERRED and would break savepoints).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
