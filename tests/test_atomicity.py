"""One decision, one transaction: its events, outbox rows, inbox row and timer row commit
together or not at all, on both backends.

Failures are injected where each backend does its writing, and before failing they look at
the failing transaction itself, so the tests know the rows really were written; then the
tests check that none of them survived the failure.

On SQLite the rows are written by Python, in the recorder's ``_insert_events`` hook: a
recorder subclass, selected by topic the way a deployment selects the production recorder
(``SagaStore(recorder_topic=...)``), fails there. On PostgreSQL a decision is one call of the
function ``saga_es_commit``, with no Python between its writes: triggers on the engine's
tables, installed in the test's own schema, fail inside that call. They report what they saw
in the error's DETAIL or, when they kill the connection (no error reaches the client), in
sequences, which a rollback does not undo.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import psycopg
import pytest
from conftest import _new_schema_url, drop_schema, order, tables
from eventsourcing.persistence import (
    DataError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import get_topic

import saga_es
from saga_es import events as ev
from saga_es.decide import decide
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.errors import ConfigurationError, StoreError, UnknownSagaError
from saga_es.persistence.postgres import (
    COMMIT_FUNCTION_SIGNATURE,
    SagaPostgresRecorder,
    commit_function_sql,
)
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.sqlite import SagaSQLiteRecorder
from saga_es.persistence.store import SagaStore, init_database
from saga_es.state import next_timer
from saga_es.testing import VirtualClock

SAGA = order_fulfillment.name


class InjectedError(RuntimeError):
    pass


# -- SQLite: a recorder that fails on purpose ------------------------------------------------


def _sqlite_rows_in_transaction(c: Any, stored_events: Sequence[StoredEvent]) -> dict[str, Any]:
    s = UUID(str(stored_events[0].originator_id)).hex
    c.execute(
        "SELECT (SELECT count(*) FROM stored_events WHERE originator_id = ?) AS events,"
        " (SELECT count(*) FROM saga_outbox WHERE saga_id = ?) AS outbox,"
        " (SELECT count(*) FROM saga_inbox WHERE saga_id = ?) AS inbox,"
        " (SELECT timer_id FROM saga_timers WHERE saga_id = ?) AS timer_id",
        (s, s, s, s),
    )
    row = dict(c.fetchone())
    row["timer_id"] = UUID(row["timer_id"]) if row["timer_id"] else None
    return row


class SQLiteFailsInHook(SagaSQLiteRecorder):
    """A Python error in the hook, after the events and the inbox/outbox/timer rows."""

    def _insert_events(self, c: Any, stored_events: Sequence[StoredEvent], **kw: Any) -> Any:
        super()._insert_events(c, stored_events, **kw)
        self.seen = _sqlite_rows_in_transaction(c, stored_events)
        raise InjectedError("after the events and the side rows")


# -- PostgreSQL: triggers that fail on purpose -----------------------------------------------

# Counters a trigger keeps across the transactions it breaks: nextval and setval are never
# rolled back. ``attempts`` counts firings, ``kills`` the connections killed, ``seen_*`` what
# the last killed transaction held (a killed connection carries no error DETAIL).
_COUNTERS = ("attempts", "kills", "seen_events", "seen_outbox", "seen_inbox")

# The function runs with the test schema as its search path, so no name in it is qualified.
# TG_ARGV[0] is the deciding saga; ``{events}`` the events table; ``{action}`` what to do.
_INJECT_FUNCTION = """
CREATE FUNCTION "{schema}".saga_test_inject() RETURNS trigger LANGUAGE plpgsql
SET search_path = "{schema}" AS $inject$
DECLARE
    saga uuid := TG_ARGV[0];
    attempt bigint := nextval('attempts');
    seen jsonb := jsonb_build_object(
        'events', (SELECT count(*) FROM "{events}" WHERE originator_id = saga),
        'outbox', (SELECT count(*) FROM saga_outbox WHERE saga_id = saga),
        'inbox', (SELECT count(*) FROM saga_inbox WHERE saga_id = saga),
        'timer_id', (SELECT timer_id FROM saga_timers WHERE saga_id = saga));
BEGIN
    {action}
    RETURN NULL;
END
$inject$"""

RAISE_AN_ERROR = "RAISE EXCEPTION 'injected failure' USING DETAIL = seen::text;"

# A real ``1/0`` could not carry what the transaction saw; this is the same error.
DIVIDE_BY_ZERO = (
    "RAISE EXCEPTION 'division by zero (injected)' "
    "USING ERRCODE = 'division_by_zero', DETAIL = seen::text;"
)


def kill_the_connection(*, attempts: int | None = None) -> str:
    """Terminate the transaction's own backend: on every attempt, or the first ``attempts``."""
    condition = "true" if attempts is None else f"attempt <= {attempts}"
    return f"""IF {condition} THEN
        PERFORM setval('seen_events', (seen->>'events')::bigint),
                setval('seen_outbox', (seen->>'outbox')::bigint),
                setval('seen_inbox', (seen->>'inbox')::bigint),
                nextval('kills');
        PERFORM pg_terminate_backend(pg_backend_pid());
    END IF;"""


def _connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(DatabaseSettings.from_url(url).psycopg_conninfo, autocommit=True)


def _events_table(engine: SagaEngine) -> str:
    return str(engine.store.app.recorder.events_table_name)  # type: ignore[attr-defined]


@contextmanager
def failing_trigger(engine: SagaEngine, table: str, saga_id: UUID, action: str) -> Iterator[None]:
    """``action`` runs after each INSERT statement on ``table`` in ``engine``'s schema
    (statement-level: once per decision, and for an upsert too) until the block exits; the
    counters stay, for ``counter`` to read, until the test's schema is dropped."""
    url = engine.store.settings.url
    schema = engine.store.settings.schema
    events = _events_table(engine)
    with _connect(url) as conn:
        for name in _COUNTERS:
            # MINVALUE 0 for the seen_* counts; START 1 so that a count of n means n.
            conn.execute(f'CREATE SEQUENCE IF NOT EXISTS "{schema}".{name} MINVALUE 0 START 1')
        conn.execute(_INJECT_FUNCTION.format(schema=schema, events=events, action=action))
        conn.execute(
            f'CREATE TRIGGER saga_test_inject AFTER INSERT ON "{schema}"."{table}" '
            f"FOR EACH STATEMENT EXECUTE FUNCTION \"{schema}\".saga_test_inject('{saga_id}')"
        )
    try:
        yield
    finally:
        with _connect(url) as conn:
            conn.execute(f'DROP TRIGGER saga_test_inject ON "{schema}"."{table}"')
            conn.execute(f'DROP FUNCTION "{schema}".saga_test_inject()')


def counter(url: str, name: str) -> int:
    schema = DatabaseSettings.from_url(url).schema
    with _connect(url) as conn:
        row = conn.execute(
            f'SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM "{schema}".{name}'
        ).fetchone()
    assert row is not None
    return int(row[0])


def seen_in(error: BaseException) -> dict[str, Any]:
    """What the trigger saw, from the DETAIL of the database error behind ``error``."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, psycopg.Error):
        cause = cause.__cause__
    assert cause is not None, f"no database error behind {error!r}"
    assert cause.diag.message_detail, f"no DETAIL in {cause!r}"
    seen: dict[str, Any] = json.loads(cause.diag.message_detail)
    seen["timer_id"] = UUID(seen["timer_id"]) if seen["timer_id"] else None
    return seen


# -- helpers ----------------------------------------------------------------------------------


def engine_with(url: str, recorder: type | None = None, **options: Any) -> SagaEngine:
    settings = DatabaseSettings.from_url(url)
    topic = get_topic(recorder) if recorder else None
    store = SagaStore(settings, create_tables=False, recorder_topic=topic)
    return SagaEngine([order_fulfillment], store=store, **options)


def first_reply(engine: SagaEngine, saga_id: UUID) -> dict[str, Any]:
    (row,) = engine.store.outbox(saga_id)
    return {
        "message_id": str(uuid.uuid4()),
        "saga_id": str(saga_id),
        "command_id": str(row["message_id"]),
        "outcome": "success",
        "result": {"reservation_id": "r-1"},
    }


@pytest.fixture
def engine(database_url: str) -> Iterator[SagaEngine]:
    with engine_with(database_url) as e:
        yield e


# -- failures inside the decision's transaction ----------------------------------------------


@pytest.mark.parametrize("decision", ["start", "reply"])
def test_a_failure_once_the_side_rows_are_written_rolls_back_every_row(
    engine: SagaEngine, database_url: str, decision: str
) -> None:
    """SQLite: a Python error in the hook, after the events and the side rows. PostgreSQL: a
    database error in ``saga_es_commit`` after the side rows, before the events."""
    backend = engine.store.settings.backend
    saga_id = engine.saga_id(SAGA, "o-1")
    if decision == "reply":
        engine.start(SAGA, order(1), business_key="o-1")
        message = first_reply(engine, saga_id)
    before = tables(engine.store)

    def decide_on(broken: SagaEngine) -> None:
        if decision == "start":
            broken.start(SAGA, order(1), business_key="o-1")
        else:
            broken.handle_reply(message)

    if backend == "sqlite":
        with engine_with(database_url, SQLiteFailsInHook) as broken:
            with pytest.raises(InjectedError):
                decide_on(broken)
            seen = broken.store.app.recorder.seen  # type: ignore[attr-defined]
    else:
        # The timer upsert is the last side row the function writes before the events.
        with (
            failing_trigger(engine, "saga_timers", saga_id, RAISE_AN_ERROR),
            engine_with(database_url) as broken,
            pytest.raises(StoreError, match="injected failure") as caught,
        ):
            decide_on(broken)
        assert isinstance(caught.value.__cause__, ProgrammingError)
        seen = seen_in(caught.value)

    # Inside the transaction the rows were there (on SQLite the events too) ...
    assert seen["outbox"] == len(before["outbox"]) + 1
    assert seen["timer_id"] is not None
    assert seen["inbox"] == (1 if decision == "reply" else 0)
    if backend == "sqlite":
        assert seen["events"] == before["events"] + 2
    else:
        assert seen["events"] == before["events"]  # the function writes the events last
        if decision == "reply":
            assert seen["timer_id"] != before["timers"][0]["timer_id"]
    # ... and after it, none of them.
    assert tables(engine.store) == before
    if decision == "start":
        with pytest.raises(UnknownSagaError):
            engine.get_state(saga_id)
    else:
        assert not engine.store.has_reply(UUID(message["message_id"]))
        assert not engine.handle_reply(message).duplicate  # the reply was never recorded


@pytest.fixture
def pg_engine(postgres_url: str) -> Iterator[SagaEngine]:
    with engine_with(postgres_url) as e:
        yield e


def _started_with_reply(engine: SagaEngine) -> tuple[UUID, dict[str, Any], dict[str, Any]]:
    saga_id = engine.start(SAGA, order(1), business_key="o-1").saga_id
    return saga_id, first_reply(engine, saga_id), tables(engine.store)


@pytest.mark.postgres
def test_postgres_database_error_after_the_events_insert_rolls_back_every_row(
    pg_engine: SagaEngine, postgres_url: str
) -> None:
    saga_id, message, before = _started_with_reply(pg_engine)

    with (
        failing_trigger(pg_engine, _events_table(pg_engine), saga_id, DIVIDE_BY_ZERO),
        engine_with(postgres_url) as broken,
        pytest.raises(StoreError, match="division by zero") as caught,
    ):
        broken.handle_reply(message)

    assert isinstance(caught.value.__cause__, DataError)
    seen = seen_in(caught.value)
    assert seen == {"events": 4, "outbox": 2, "inbox": 1, "timer_id": seen["timer_id"]}
    assert seen["timer_id"] != before["timers"][0]["timer_id"]
    assert tables(pg_engine.store) == before
    assert not pg_engine.store.has_reply(UUID(message["message_id"]))


@pytest.mark.postgres
def test_postgres_connection_killed_after_the_events_insert_commits_nothing(
    pg_engine: SagaEngine, postgres_url: str
) -> None:
    """What surfaces: psycopg reports the server closing the connection; eventsourcing maps
    it to its OperationalError, our ``insert_events`` retries the whole call (10 attempts,
    each killed here), then the engine raises StoreError. No attempt committed anything."""
    saga_id, message, before = _started_with_reply(pg_engine)

    with (
        failing_trigger(pg_engine, _events_table(pg_engine), saga_id, kill_the_connection()),
        engine_with(postgres_url) as broken,
        pytest.raises(StoreError, match="decision not recorded") as caught,
    ):
        broken.handle_reply(message)

    assert isinstance(caught.value.__cause__, OperationalError)
    kills = counter(postgres_url, "kills")
    assert kills > 1, "an insert whose connection was lost is retried"
    assert kills == counter(postgres_url, "attempts")
    seen = tuple(counter(postgres_url, f"seen_{t}") for t in ("events", "outbox", "inbox"))
    assert seen == (4, 2, 1)
    assert tables(pg_engine.store) == before
    assert not pg_engine.store.has_reply(UUID(message["message_id"]))


@pytest.mark.postgres
def test_postgres_connection_killed_once_is_retried_and_commits_exactly_once(
    pg_engine: SagaEngine, postgres_url: str
) -> None:
    saga_id, message, before = _started_with_reply(pg_engine)

    with (
        failing_trigger(
            pg_engine, _events_table(pg_engine), saga_id, kill_the_connection(attempts=1)
        ),
        engine_with(postgres_url) as flaky,
    ):
        outcome = flaky.handle_reply(message)

    assert counter(postgres_url, "kills") == 1
    assert counter(postgres_url, "attempts") == 2
    assert not outcome.duplicate
    assert [type(e) for e in outcome.events] == [ev.StepSucceeded, ev.StepCommandIssued]
    assert pg_engine.store.count("events") == before["events"] + 2
    assert len(pg_engine.store.outbox()) == len(before["outbox"]) + 1
    assert pg_engine.store.count("saga_inbox") == 1
    (timer,) = pg_engine.store.timers()
    assert timer["timer_id"] == outcome.commands[0].message_id


# -- where each recorder does its extra writes -----------------------------------------------


def _our_recorder_classes() -> list[type]:
    for module in pkgutil.walk_packages(saga_es.__path__, "saga_es."):
        importlib.import_module(module.name)
    found: list[type] = []
    todo: list[type] = [PostgresApplicationRecorder, SQLiteApplicationRecorder]
    while todo:
        subclasses: list[type] = todo.pop().__subclasses__()
        for sub in subclasses:
            todo.append(sub)
            if sub.__module__.split(".")[0] == "saga_es":
                found.append(sub)
    return found


def test_sqlite_writes_in_the_hook_and_postgres_writes_the_side_rows_before_the_lock() -> None:
    ours = _our_recorder_classes()
    assert SagaPostgresRecorder in ours
    assert SagaSQLiteRecorder in ours

    # SQLite: the library runs the hook inside its BEGIN ... COMMIT and rolls back on any
    # exception, so the extra rows belong there and nowhere else.
    assert "_insert_events" in vars(SagaSQLiteRecorder)
    for cls in ours:
        if issubclass(cls, SQLiteApplicationRecorder):
            assert "insert_events" not in vars(cls), f"{cls.__qualname__} overrides insert_events"
    source = inspect.getsource(SQLiteApplicationRecorder.insert_events)
    assert source.index("transaction(commit=True)") < source.index("self._insert_events(")

    # PostgreSQL: one call of saga_es_commit replaces the library's insert path, so code in
    # that path's hooks would never run.
    assert "insert_events" in vars(SagaPostgresRecorder)
    for cls in ours:
        if issubclass(cls, PostgresApplicationRecorder):
            for name in (
                "_insert_events",
                "_insert_stored_events",
                "_fetch_ids_after_insert_events",
            ):
                assert name not in vars(cls), f"{cls.__qualname__} overrides {name}, never called"
    # The side rows go before the events-table lock, which every writer waits for.
    sql = commit_function_sql("s", "saga_events")
    side_rows = [
        sql.index('INSERT INTO "s".saga_inbox'),
        sql.index('INSERT INTO "s".saga_outbox'),
        sql.index('INSERT INTO "s".saga_timers'),
        sql.index('DELETE FROM "s".saga_timers'),
    ]
    lock = sql.index('LOCK TABLE "s"."saga_events" IN EXCLUSIVE MODE')
    assert max(side_rows) < lock < sql.index('INSERT INTO "s"."saga_events"')


# -- POSTGRES_ENABLE_DB_FUNCTIONS -------------------------------------------------------------


@pytest.mark.postgres
def test_the_process_environment_cannot_override_the_database_url(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # eventsourcing reads its settings from os.environ, application-prefixed keys first; the
    # store is configured by its URL alone, so none of these may take effect.
    monkeypatch.setenv("SAGA_POSTGRES_ENABLE_DB_FUNCTIONS", "y")
    monkeypatch.setenv("POSTGRES_ENABLE_DB_FUNCTIONS", "y")
    monkeypatch.setenv("SAGA_CREATE_TABLE", "y")
    monkeypatch.setenv("SAGA_PERSISTENCE_MODULE", "eventsourcing.popo")
    with SagaEngine([order_fulfillment], database_url=postgres_url) as engine:
        recorder = engine.store.app.recorder
        assert recorder.datastore.enable_db_functions is False  # type: ignore[attr-defined]
        engine.start(SAGA, order(1), business_key="o-1")
        assert len(engine.store.outbox()) == 1  # went through saga_es_commit, into PostgreSQL


@pytest.mark.postgres
def test_enable_db_functions_in_the_settings_is_refused(postgres_url: str) -> None:
    settings = DatabaseSettings.from_url(postgres_url)
    env = {**settings.env, "POSTGRES_ENABLE_DB_FUNCTIONS": "y"}
    enabled = dataclasses.replace(settings, env=env)
    with pytest.raises(ConfigurationError, match="POSTGRES_ENABLE_DB_FUNCTIONS must stay off"):
        SagaStore(enabled)


# -- table creation ---------------------------------------------------------------------------

_CATALOG = """
    SELECT 'relation', c.relname, c.xmin::text FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(schema)s
    UNION ALL
    SELECT 'function', p.proname, p.xmin::text FROM pg_proc p
      JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %(schema)s
    UNION ALL
    SELECT 'type', t.typname, t.xmin::text FROM pg_type t
      JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = %(schema)s
    ORDER BY 1, 2"""


def catalog(url: str) -> list[tuple[str, str, str]]:
    """The schema's objects with the transaction that last wrote each catalog row: any DDL
    that creates or replaces something (CREATE OR REPLACE FUNCTION included) changes it."""
    settings = DatabaseSettings.from_url(url)
    with psycopg.connect(settings.psycopg_conninfo) as conn:
        return conn.execute(_CATALOG, {"schema": settings.schema}).fetchall()


@pytest.fixture(params=["empty schema", "no schema"])
def uninitialised_url(postgres_server: str, request: pytest.FixtureRequest) -> Iterator[str]:
    schema, url = _new_schema_url(postgres_server)
    if request.param == "empty schema":
        with psycopg.connect(DatabaseSettings.from_url(url).psycopg_conninfo, autocommit=True) as c:
            c.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield url
    finally:
        drop_schema(postgres_server, schema)


@pytest.mark.postgres
def test_postgres_defaults_to_no_ddl_and_asks_for_db_init(uninitialised_url: str) -> None:
    settings = DatabaseSettings.from_url(uninitialised_url)

    with pytest.raises(ConfigurationError, match="saga-es db init"):
        SagaStore(settings)
    with pytest.raises(ConfigurationError, match="saga-es db init"):
        SagaEngine([order_fulfillment], database_url=uninitialised_url)

    assert catalog(uninitialised_url) == []


@pytest.mark.postgres
def test_stores_built_concurrently_on_an_initialised_schema_issue_no_ddl(
    postgres_url: str,
) -> None:
    settings = DatabaseSettings.from_url(postgres_url)
    before = catalog(postgres_url)
    assert any(kind == "function" for kind, _, _ in before)
    start = threading.Barrier(8)
    stores: list[SagaStore] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            start.wait(timeout=60)
            store = SagaStore(settings, create_tables=False)
            stores.append(store)
            store.count("events")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert len(stores) == 8
    finally:
        for store in stores:
            store.close()
    assert catalog(postgres_url) == before

    # The check can see DDL: a store that creates tables does replace saga_es_commit.
    SagaStore(settings, create_tables=True).close()
    assert catalog(postgres_url) != before


@pytest.mark.postgres
def test_postgres_without_the_commit_function_asks_for_db_init(postgres_url: str) -> None:
    """A schema set up before decisions went through saga_es_commit has the tables but not
    the function: refused when the store opens, not at the first decision."""
    settings = DatabaseSettings.from_url(postgres_url)
    with psycopg.connect(settings.psycopg_conninfo, autocommit=True) as conn:
        conn.execute(f'DROP FUNCTION "{settings.schema}".{COMMIT_FUNCTION_SIGNATURE}')

    with pytest.raises(ConfigurationError, match="saga-es db init") as refused:
        SagaStore(settings)
    assert "saga_es_commit does not exist" in str(refused.value)

    init_database(settings)
    with SagaEngine([order_fulfillment], store=SagaStore(settings)) as engine:
        outcome = engine.start(SAGA, order(1), business_key="o-1")
        assert outcome.created
        assert len(engine.store.outbox(outcome.saga_id)) == 1


# -- connections after failed decisions ------------------------------------------------------


@pytest.mark.postgres
def test_postgres_decisions_use_no_prepared_statements(postgres_url: str) -> None:
    """psycopg's prepared-statement cache drifts from the server when a pipelined statement
    fails part-way (a statement it believes prepared was skipped by the server), and the
    connection then fails every later use of it with 'prepared statement "_pg3_N" does not
    exist'. Decisions were pipelined once and this happened within seconds under concurrent
    duplicate replies; the store's connections still prepare nothing, failed decisions
    included."""
    url = f"{postgres_url}&pool_size=1&max_overflow=0"  # every decision on one session
    with engine_with(url) as engine:
        for n in range(8):  # past psycopg's threshold for preparing a repeated statement
            saga_id = engine.start(SAGA, order(n), business_key=f"o-{n}").saga_id
            message = first_reply(engine, saga_id)
            engine.handle_reply(message)
            assert engine.handle_reply(message).duplicate  # a failed side-writes statement
        datastore = engine.store.app.recorder.datastore  # type: ignore[attr-defined]
        with datastore.get_connection() as conn:
            prepared = conn.execute("SELECT statement FROM pg_prepared_statements").fetchall()
    assert prepared == []


# -- optimistic concurrency ------------------------------------------------------------------


def test_the_loser_of_a_concurrency_conflict_leaves_no_rows(database_url: str) -> None:
    clock = VirtualClock()
    with engine_with(database_url, clock=clock) as engine:
        store = engine.store
        saga_id = engine.start(SAGA, order(1), business_key="o-1").saga_id
        reserve = engine.store.outbox(saga_id)[0]
        charge_command = engine.handle_reply(first_reply(engine, saga_id)).commands[0]
        assert reserve["message_id"] != charge_command.message_id

        # Two workers load the same version and decide on different replies to one command.
        mine, theirs = store.load_state(saga_id), store.load_state(saga_id)
        assert mine is not None
        assert theirs is not None
        assert mine.version == theirs.version
        declined = charge_command.reply_failure(uuid.uuid4(), "card_declined")
        charged = charge_command.reply_success(uuid.uuid4(), {"charge_id": "ch-1"})
        winner = decide(order_fulfillment, mine, declined, clock())
        loser = decide(order_fulfillment, theirs, charged, clock())
        assert winner.commands[0].command == "inventory.release"
        assert loser.commands[0].command == "shipping.create"

        store.commit(winner, reply_id=declined.message_id)
        committed = tables(store)
        with pytest.raises(IntegrityError):
            store.commit(loser, reply_id=charged.message_id)

        assert tables(store) == committed
        assert not store.has_reply(charged.message_id)
        assert store.has_reply(declined.message_id)
        outbox_ids = [r["message_id"] for r in store.outbox(saga_id)]
        assert loser.commands[0].message_id not in outbox_ids
        assert outbox_ids[-1] == winner.commands[0].message_id
        events = store.events(saga_id)
        assert list(events[-len(winner.events) :]) == list(winner.events)
        assert len(events) == 4 + len(winner.events)
        timer = next_timer(winner.state)  # type: ignore[arg-type]
        assert timer is not None
        assert [t["timer_id"] for t in store.timers(saga_id)] == [timer.timer_id]

        # Deciding again on the fresh state, as the engine does: the late success is ignored.
        late = engine.handle_reply(charged)
        assert [type(e) for e in late.events] == [ev.ReplyIgnored]
        assert late.events[0].reason == "duplicate"
        assert store.has_reply(charged.message_id)
