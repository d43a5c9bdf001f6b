"""One database URL configures everything.

    postgresql://user[:password]@host[:port]/dbname[?schema=name&pool_size=5&connect_timeout=30]
    sqlite:///relative/path.db        sqlite:////absolute/path.db

Read from the ``SAGA_ES_DATABASE_URL`` environment variable unless given explicitly; the default
is an SQLite file in the working directory, so a first run needs no server.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from eventsourcing.utils import get_topic

from saga_es.errors import ConfigurationError
from saga_es.persistence.postgres import SagaPostgresRecorder
from saga_es.persistence.sqlite import SagaSQLiteRecorder

__all__ = ["DATABASE_URL_ENV", "DEFAULT_DATABASE_URL", "DatabaseSettings"]

DATABASE_URL_ENV = "SAGA_ES_DATABASE_URL"
DEFAULT_DATABASE_URL = "sqlite:///saga-es.db"
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class DatabaseSettings:
    url: str
    backend: str  # "postgres" | "sqlite"
    env: dict[str, str]  # eventsourcing environment, without CREATE_TABLE
    schema: str = "public"
    sqlite_path: Path | None = None

    @classmethod
    def resolve(cls, url: str | None = None) -> DatabaseSettings:
        return cls.from_url(url or os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL)

    @classmethod
    def from_url(cls, url: str) -> DatabaseSettings:
        parts = urlsplit(url)
        if parts.scheme in ("postgresql", "postgres", "postgresql+psycopg"):
            return cls._postgres(url, parts)
        if parts.scheme == "sqlite":
            return cls._sqlite(url, parts)
        raise ConfigurationError(
            f"database URL {_redact(url)!r}: scheme must be postgresql:// or sqlite:///"
        )

    @classmethod
    def _postgres(cls, url: str, p: SplitResult) -> DatabaseSettings:
        options = {k: v[-1] for k, v in parse_qs(p.query).items()}
        known = {"schema", "pool_size", "max_overflow", "lock_timeout", "connect_timeout"}
        unknown = set(options) - known
        if unknown:
            raise ConfigurationError(
                f"database URL {_redact(url)!r}: unknown option(s) {', '.join(sorted(unknown))}"
            )
        dbname = unquote(p.path.lstrip("/"))
        if not dbname:
            raise ConfigurationError(f"database URL {_redact(url)!r}: no database name")
        schema = options.get("schema", "public")
        if not _IDENTIFIER.match(schema):
            raise ConfigurationError(
                f"database URL {_redact(url)!r}: schema {schema!r} must be a lower-case identifier"
            )
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": dbname,
            "POSTGRES_HOST": p.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(p.port or 5432),
            "POSTGRES_USER": unquote(p.username or os.environ.get("USER", "postgres")),
            "POSTGRES_PASSWORD": unquote(p.password or ""),
            "POSTGRES_SCHEMA": schema,
            "POSTGRES_POOL_SIZE": options.get("pool_size", "2"),
            "POSTGRES_MAX_OVERFLOW": options.get("max_overflow", "8"),
            # The library waits forever for the events-table lock by default; a stuck writer
            # should surface as an error (retried by the library) instead.
            "POSTGRES_LOCK_TIMEOUT": options.get("lock_timeout", "10"),
            # How long a call waits for a connection while the database is unreachable (the
            # library tries 10 times before giving up with an error).
            "POSTGRES_CONNECT_TIMEOUT": options.get("connect_timeout", "30"),
            "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": "30",
            "POSTGRES_ENABLE_DB_FUNCTIONS": "n",
            "APPLICATION_RECORDER_TOPIC": get_topic(SagaPostgresRecorder),
        }
        return cls(url=url, backend="postgres", env=env, schema=schema)

    @classmethod
    def _sqlite(cls, url: str, p: SplitResult) -> DatabaseSettings:
        raw = unquote(p.path)
        if p.netloc or not raw.startswith("/") or raw == "/":
            raise ConfigurationError(
                f"database URL {url!r}: use sqlite:///relative.db or sqlite:////absolute.db"
            )
        path = Path(raw[1:]).absolute()
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(path),
            "SQLITE_LOCK_TIMEOUT": "30",
            "APPLICATION_RECORDER_TOPIC": get_topic(SagaSQLiteRecorder),
        }
        return cls(url=url, backend="sqlite", env=env, sqlite_path=path)

    @property
    def psycopg_conninfo(self) -> str:
        e = self.env
        return (
            f"host={e['POSTGRES_HOST']} port={e['POSTGRES_PORT']} dbname={e['POSTGRES_DBNAME']} "
            f"user={e['POSTGRES_USER']}"
            + (f" password={e['POSTGRES_PASSWORD']}" if e["POSTGRES_PASSWORD"] else "")
        )

    def redacted(self) -> str:
        return _redact(self.url)


def _redact(url: str) -> str:
    return re.sub(r"(//[^:/@]+):[^@]*@", r"\1:***@", url)
