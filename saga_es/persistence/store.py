"""The saga store: load a saga, commit a decision, read the engine's tables.

A thin layer over an eventsourcing ``Application`` whose recorder (chosen by the database URL)
writes outbox, inbox and timer rows in the events' transaction. The engine never touches SQL;
tests and tools read the side tables through ``outbox``/``timers``/``has_reply``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import PersistenceError
from eventsourcing.utils import Environment, EnvType

from saga_es.aggregate import Saga
from saga_es.decide import Decision
from saga_es.errors import ConfigurationError, StoreError
from saga_es.persistence.postgres import COMMIT_FUNCTION_SIGNATURE
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.state_cache import StateCache
from saga_es.persistence.writes import SideWrites, parse_sqlite_time
from saga_es.state import SagaState, evolve, replay

__all__ = ["SagaApplication", "SagaStore", "init_database"]

_UUID_COLUMNS = {"message_id", "saga_id", "idempotency_key", "causation_id", "timer_id"}
_TIME_COLUMNS = {"deadline", "created_at", "published_at", "received_at", "due_at"}


class SagaApplication(Application[UUID]):
    # The name prefixes the PostgreSQL tables: saga_events. (SQLite tables are never prefixed.)
    name = "Saga"

    def construct_env(self, name: str, env: EnvType | None = None) -> Environment:
        # The database URL is the whole configuration. eventsourcing would also read
        # os.environ, with "SAGA_"-prefixed keys first, so a stray SAGA_CREATE_TABLE or
        # SAGA_POSTGRES_ENABLE_DB_FUNCTIONS could silently override what the URL says.
        return Environment(name, dict(env or {}))


class SagaStore:
    def __init__(
        self,
        settings: DatabaseSettings,
        *,
        create_tables: bool | None = None,
        recorder_topic: str | None = None,
        cache_size: int = 10_000,
    ) -> None:
        """``create_tables`` defaults to on for SQLite (embedded use) and off for PostgreSQL,
        where several workers creating tables at once fail: run ``saga-es db init`` once.
        ``cache_size`` bounds the saga states kept between decisions (0 keeps none)."""
        self.settings = settings
        if create_tables is None:
            create_tables = settings.backend == "sqlite"
        env = {**settings.env, "CREATE_TABLE": "y" if create_tables else "n"}
        if recorder_topic:
            env["APPLICATION_RECORDER_TOPIC"] = recorder_topic
        if settings.backend == "postgres":
            _require_schema(settings, create=create_tables)
        elif settings.sqlite_path is not None:
            settings.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.app = SagaApplication(env=env)
        except PersistenceError as exc:
            raise StoreError(f"cannot open saga store at {settings.redacted()}: {exc}") from exc
        if not create_tables:
            self._require_tables()
        self._states = StateCache(cache_size)

    # -- the stream ---------------------------------------------------------------------------

    def load(self, saga_id: UUID, version: int | None = None) -> Saga | None:
        try:
            saga: Saga = self.app.repository.get(saga_id, version=version)
        except AggregateNotFoundError:
            return None
        return saga

    def events(self, saga_id: UUID) -> list[Any]:
        return list(self.app.events.get(saga_id))

    def load_state(
        self, saga_id: UUID, *, version: int | None = None, cached_ok: bool = False
    ) -> SagaState | None:
        """The saga's state, from the cache brought up to date by reading only newer events.

        States are frozen, so a cached one is shared, never copied, and only committed states
        are cached. ``cached_ok`` skips the read when the saga is cached: the caller must then
        treat the state as possibly behind (a decision on it cannot commit if it is: its next
        version already exists). ``version`` replays the stream up to that event (time travel).
        """
        if version is not None:
            events = self.app.events.get(saga_id, lte=version)
            return replay(events) if events else None
        cached = self._states.get(saga_id)
        if cached_ok and cached is not None:
            return cached
        state = cached
        for event in self.app.events.get(saga_id, gt=cached.version if cached else None):
            state = evolve(state, event)
        if state is not None and state is not cached:
            self._states.put(saga_id, state)
        return state

    def commit(self, decision: Decision, *, reply_id: UUID | None = None) -> None:
        """Append the decision's events and write its side rows, all in one transaction.

        Raises eventsourcing's ``IntegrityError`` when another writer advanced the saga first
        (or the reply was already handled); nothing of this decision is then stored.
        """
        self.commit_many([(decision, reply_id)])

    def commit_many(self, decisions: Sequence[tuple[Decision, UUID | None]]) -> None:
        """Commit several decisions in one transaction (group commit): all of them, or none.

        Each pair is a decision and the reply that caused it (None for a start or a timer).
        Decisions for the same saga must be in the order they were decided.
        """
        if not decisions or any(d.state is None or not d.events for d, _ in decisions):
            raise ValueError("an empty decision has nothing to commit")
        events = [event for decision, _ in decisions for event in decision.events]
        # The events go in as they are: ``decide`` built them as the sagas' next versions, and
        # the event store's (saga id, version) key is the concurrency check. ``events.put`` is
        # what ``Application.save`` calls once it has collected events from aggregates; with
        # ready events, that collecting (a runtime Protocol check per event) is pure cost.
        self.app.events.put(events, side_writes=SideWrites.of(decisions))
        for decision, _ in decisions:
            assert decision.state is not None
            self._states.put(decision.state.saga_id, decision.state)

    # -- the side tables ----------------------------------------------------------------------

    def saga_ids(self) -> list[UUID]:
        """Every saga in the store, oldest first (a scan: for tools and tests)."""
        events = self.table(self.app.recorder.events_table_name)  # type: ignore[attr-defined]
        sql = f"SELECT originator_id FROM {events} WHERE originator_version = 1 ORDER BY 1"
        return [
            r["originator_id"] if isinstance(r["originator_id"], UUID) else UUID(r["originator_id"])
            for r in self._query(sql, [], uuid_columns=set())
        ]

    def has_reply(self, message_id: UUID) -> bool:
        sql = f"SELECT 1 FROM {self.table('saga_inbox')} WHERE message_id = ?"
        return bool(self._query(sql, [message_id]))

    def outbox(self, saga_id: UUID | None = None) -> list[dict[str, Any]]:
        """Outbox rows (oldest first), for tools and tests; the relay has its own queries."""
        where, params = ("WHERE saga_id = ?", [saga_id]) if saga_id else ("", [])
        rows = self._query(
            f"SELECT * FROM {self.table('saga_outbox')} {where} "
            "ORDER BY saga_id, saga_version, position",
            params,
        )
        for row in rows:
            if isinstance(row["payload"], str):
                row["payload"] = json.loads(row["payload"])
        return rows

    def timers(self, saga_id: UUID | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE saga_id = ?", [saga_id]) if saga_id else ("", [])
        return self._query(
            f"SELECT * FROM {self.table('saga_timers')} {where} ORDER BY due_at", params
        )

    def dead_letter(self, *, source: str, body: str, error: str, message_id: str | None) -> None:
        """Keep a message the engine could not use, with the reason, outside any decision."""
        sql = (
            f"INSERT INTO {self.table('saga_dead_letters')} (source, message_id, body, error) "
            "VALUES (?, ?, ?, ?)"
        )
        self._execute(sql, [source, message_id, body, error])

    def dead_letters(self) -> list[dict[str, Any]]:
        sql = f"SELECT * FROM {self.table('saga_dead_letters')} ORDER BY id"
        return self._query(sql, [], uuid_columns=set())  # message_id: whatever arrived

    def count(self, table: str) -> int:
        if table not in {"saga_outbox", "saga_inbox", "saga_timers", "saga_dead_letters", "events"}:
            raise ValueError(table)
        name = self.app.recorder.events_table_name if table == "events" else table  # type: ignore[attr-defined]
        return int(self._query(f"SELECT count(*) AS n FROM {self.table(name)}", [])[0]["n"])

    def close(self) -> None:
        self.app.close()

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def datastore(self) -> Any:
        """eventsourcing's datastore: ``transaction(commit=...)`` yields a cursor."""
        return self.app.recorder.datastore  # type: ignore[attr-defined]

    def table(self, name: str) -> str:
        """``name`` qualified with the PostgreSQL schema (SQLite has none)."""
        if self.settings.backend == "postgres":
            return f'"{self.settings.schema}".{name}'
        return name

    def _query(
        self, sql: str, params: list[Any], uuid_columns: set[str] = _UUID_COLUMNS
    ) -> list[dict[str, Any]]:
        datastore = self.app.recorder.datastore  # type: ignore[attr-defined]
        if self.settings.backend == "postgres":
            sql = sql.replace("?", "%s")
            with datastore.transaction(commit=False) as cursor:
                cursor.execute(sql, params)
                return [dict(row) for row in cursor.fetchall()]
        params = [p.hex if isinstance(p, UUID) else p for p in params]
        with datastore.transaction(commit=False) as cursor:
            cursor.execute(sql, params)
            rows = [dict(row) for row in cursor.fetchall()]
        # Give SQLite rows the same Python types PostgreSQL returns.
        for row in rows:
            for column in uuid_columns & row.keys():
                row[column] = UUID(row[column])
            for column in _TIME_COLUMNS & row.keys():
                if row[column] is not None:
                    row[column] = parse_sqlite_time(row[column])
        return rows

    def _execute(self, sql: str, params: list[Any]) -> None:
        datastore = self.app.recorder.datastore  # type: ignore[attr-defined]
        if self.settings.backend == "postgres":
            sql = sql.replace("?", "%s")
        else:
            params = [p.hex if isinstance(p, UUID) else p for p in params]
        with datastore.transaction(commit=True) as cursor:
            cursor.execute(sql, params)

    def _require_tables(self) -> None:
        try:
            self._query(f"SELECT 1 FROM {self.table('saga_outbox')} WHERE 1 = 0", [])
        except PersistenceError as exc:
            raise self._not_initialised("the saga tables do not exist") from exc
        if self.settings.backend == "postgres":
            function = self.table(COMMIT_FUNCTION_SIGNATURE)
            if self._query("SELECT to_regprocedure(?) AS f", [function])[0]["f"] is None:
                raise self._not_initialised(
                    "the function saga_es_commit does not exist (set up by an older saga-es?)"
                )

    def _not_initialised(self, what: str) -> ConfigurationError:
        return ConfigurationError(
            f"{what} at {self.settings.redacted()}: "
            "run `saga-es db init` once before starting engines, workers or relays"
        )


def init_database(settings: DatabaseSettings) -> None:
    """Create the schema, the event tables and the engine's tables (idempotent)."""
    SagaStore(settings, create_tables=True).close()


def _require_schema(settings: DatabaseSettings, *, create: bool) -> None:
    try:
        with psycopg.connect(settings.psycopg_conninfo, autocommit=True, connect_timeout=10) as c:
            if create:
                c.execute(f'CREATE SCHEMA IF NOT EXISTS "{settings.schema}"')
    except psycopg.Error as exc:
        raise StoreError(f"cannot reach PostgreSQL at {settings.redacted()}: {exc}") from exc
