"""The participant's transaction, in-process on real databases (no broker): effects happen once
per idempotency key, business failures keep nothing but the outcome, transient failures leave no
trace, and compensating an action that never took effect makes sure it never will.

The behaviour tests run for both kinds of handler: ORM handlers given a session (SQLite and
PostgreSQL) and plain-SQL handlers given the psycopg connection (``using="psycopg"``,
PostgreSQL only)."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from conftest import order, postgres_base_url
from processes import wait_until
from psycopg.pq import TransactionStatus
from sqlalchemy import String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from saga_es import ids
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.errors import ConfigurationError
from saga_es.messages import CommandMessage
from saga_es.messaging import celery_app, reply_id_for
from saga_es.participant import (
    COMPENSATED,
    NOT_APPLIED,
    BusinessError,
    InboxEntry,
    Participant,
    report_outcome,
)
from saga_es.participant.database import Database
from saga_es.participant.transactions import Transactions, Using
from saga_es.persistence.settings import DatabaseSettings


class Base(DeclarativeBase):
    pass


class Effect(Base):
    __tablename__ = "test_effects"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    saga_id: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(20))


class Service:
    """A participant whose handlers count their calls and can be told to fail.

    using: what its handlers write with, an ORM session or the psycopg connection (plain SQL).
    Either way they write the same rows, return the same results, and ``before`` is called
    with what the handler was given, first thing in the reserve handler.
    """

    def __init__(self, database_url: str, using: Using = "session") -> None:
        self.url = database_url
        self.participant = Participant("inventory", database_url=database_url)
        self.calls: Counter[str] = Counter()
        self.fail_with: Exception | None = None
        self.before: Callable[[Any], None] = lambda writer: None
        self.participant.create_tables()
        with self.participant.database.engine.begin() as connection:
            Base.metadata.create_all(connection)
        if using == "psycopg":
            self._psycopg_handlers()
        else:
            self._session_handlers()

    def _session_handlers(self) -> None:
        @self.participant.handles("inventory.reserve")
        def reserve(command: CommandMessage, session: Session) -> dict[str, Any]:
            self.before(session)
            self.calls[command.command] += 1
            session.add(Effect(saga_id=str(command.saga_id), kind="reserved"))
            session.flush()
            if self.fail_with is not None:
                raise self.fail_with
            return {"reservation": "r-1", "amount": Decimal("12.50")}

        @self.participant.handles("inventory.release")
        def release(command: CommandMessage, session: Session) -> None:
            self.calls[command.command] += 1
            session.add(Effect(saga_id=str(command.saga_id), kind="released"))

    def _psycopg_handlers(self) -> None:
        insert = "INSERT INTO test_effects (saga_id, kind) VALUES (%s, %s)"

        @self.participant.handles("inventory.reserve", using="psycopg")
        def reserve(command: CommandMessage, connection: psycopg.Connection[Any]) -> dict[str, Any]:
            assert connection.info.transaction_status == TransactionStatus.INTRANS  # the claim's
            self.before(connection)
            self.calls[command.command] += 1
            connection.execute(insert, (str(command.saga_id), "reserved"))
            if self.fail_with is not None:
                raise self.fail_with
            return {"reservation": "r-1", "amount": Decimal("12.50")}

        @self.participant.handles("inventory.release", using="psycopg")
        def release(command: CommandMessage, connection: psycopg.Connection[Any]) -> None:
            self.calls[command.command] += 1
            connection.execute(insert, (str(command.saga_id), "released"))

    def effects(self, kind: str = "reserved") -> int:
        with self.participant.sessions() as session:
            return int(
                session.scalar(select(func.count()).select_from(Effect).where(Effect.kind == kind))
                or 0
            )

    def inbox(self) -> dict[uuid.UUID, InboxEntry]:
        with self.participant.sessions() as session:
            return {e.idempotency_key: e for e in session.scalars(select(InboxEntry))}


def query(writer: Session | psycopg.Connection[Any], sql: str) -> Any:
    """The one value ``sql`` selects, asked with what a handler was given (either kind)."""
    if isinstance(writer, Session):
        return writer.scalar(text(sql))
    row = writer.execute(sql).fetchone()
    return None if row is None else row[0]


def terminate(pid: int) -> None:
    """End a database connection from outside, as a database restart or a proxy would."""
    conninfo = DatabaseSettings.from_url(postgres_base_url()).psycopg_conninfo
    gone = "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = %s"
    with psycopg.connect(conninfo, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        wait_until(
            lambda: admin.execute(gone, (pid,)).fetchone() == (True,),
            timeout=30,
            what=f"backend {pid} to exit",
        )


#: (database, handler kind): psycopg handlers need PostgreSQL, so there is no SQLite one.
FLAVOURS = [
    pytest.param(("sqlite_url", "session"), id="sqlite-session"),
    pytest.param(("postgres_url", "session"), id="postgres-session"),
    pytest.param(("postgres_url", "psycopg"), id="postgres-psycopg"),
]


@pytest.fixture(params=FLAVOURS)
def service(request: pytest.FixtureRequest) -> Iterator[Service]:
    url_fixture, using = request.param
    s = Service(str(request.getfixturevalue(url_fixture)), using)
    yield s
    s.participant.database.dispose()


@pytest.fixture
def engine(service: Service) -> Iterator[SagaEngine]:
    """The saga engine on the service's database."""
    with SagaEngine([order_fulfillment], database_url=service.url) as e:
        yield e


def reserve_command(engine: SagaEngine, n: int = 1) -> CommandMessage:
    return engine.start(order_fulfillment, order(n), business_key=f"o-{n}").commands[0]


def attempt(command: CommandMessage, number: int) -> CommandMessage:
    """A later attempt of the same step: new message id, same idempotency key."""
    message_id = ids.command_id(command.saga_id, command.phase, command.step, number)
    return command.model_copy(update={"message_id": message_id, "attempt": number})


def compensation_of(action: CommandMessage) -> CommandMessage:
    saga, step = action.saga_id, action.step
    return action.model_copy(
        update={
            "message_id": ids.command_id(saga, "compensation", step, 1),
            "phase": "compensation",
            "command": "inventory.release",
            "idempotency_key": ids.idempotency_key(saga, "compensation", step),
            "attempt": 1,
        }
    )


def test_handler_runs_once_per_idempotency_key(service: Service, engine: SagaEngine) -> None:
    command = reserve_command(engine)
    first = service.participant.process(command)
    redelivered = service.participant.process(command)
    retried = service.participant.process(attempt(command, 2))

    assert service.calls["inventory.reserve"] == 1
    assert service.effects() == 1
    assert first.ok
    assert first.result == {"reservation": "r-1", "amount": "12.50"}
    assert redelivered == first  # same reply id: the engine's inbox absorbs it
    assert retried.ok
    assert retried.result == first.result
    assert retried.command_id == attempt(command, 2).message_id
    assert retried.message_id == reply_id_for(attempt(command, 2)) != first.message_id
    entry = service.inbox()[command.idempotency_key]
    assert (entry.outcome, entry.first_message_id) == ("success", command.message_id)


def test_business_error_keeps_only_the_outcome(service: Service, engine: SagaEngine) -> None:
    command = reserve_command(engine)
    service.fail_with = BusinessError("out_of_stock", "SKU-1 is sold out")

    reply = service.participant.process(command)
    again = service.participant.process(attempt(command, 2))

    assert (reply.outcome, reply.error_code, reply.retryable) == ("failure", "out_of_stock", False)
    assert reply.error_message == "SKU-1 is sold out"
    assert (again.error_code, again.error_message) == ("out_of_stock", "SKU-1 is sold out")
    assert service.calls["inventory.reserve"] == 1
    assert service.effects() == 0  # the handler's write rolled back with the refusal
    assert service.inbox()[command.idempotency_key].outcome == "failure"


def test_a_refusal_yields_to_a_delivery_that_claimed_the_key_meanwhile(
    service: Service, engine: SagaEngine
) -> None:
    """A refusal rolls back everything and records itself in a second transaction. Another
    delivery of the same key (attempt 2) may commit in between: its outcome is the one kept
    and replied, never both."""
    command = reserve_command(engine)
    participant = service.participant
    real = participant._transactions
    meanwhile: list[Any] = []

    def interleaved(using: Using) -> Transactions:
        """Runs attempt 2 to its commit just before the refusal is recorded."""
        begin = real(using)
        begun = 0

        def counted() -> Any:
            nonlocal begun
            begun += 1
            if begun == 2 and not meanwhile:
                service.fail_with = None
                participant._transactions = real  # type: ignore[method-assign]
                meanwhile.append(participant.process(attempt(command, 2)))
            return begin()

        return counted

    service.fail_with = BusinessError("out_of_stock", "SKU-1 is sold out")
    participant._transactions = interleaved  # type: ignore[method-assign]
    try:
        reply = participant.process(command)
    finally:
        participant._transactions = real  # type: ignore[method-assign]

    [second] = meanwhile
    assert second.ok
    assert reply.ok  # the stored outcome, not the refusal
    assert reply.result == second.result
    assert service.calls["inventory.reserve"] == 2  # refused once, applied once
    assert service.effects() == 1
    assert service.inbox()[command.idempotency_key].outcome == "success"


def test_transient_error_leaves_no_trace_and_the_retry_applies(
    service: Service, engine: SagaEngine
) -> None:
    command = reserve_command(engine)
    service.fail_with = ConnectionError("gateway unreachable")
    with pytest.raises(ConnectionError, match="gateway unreachable"):
        service.participant.process(command)
    assert service.effects() == 0
    assert service.inbox() == {}

    service.fail_with = None
    assert service.participant.process(command).ok
    assert service.calls["inventory.reserve"] == 2
    assert service.effects() == 1


def test_compensating_a_never_applied_action_tombstones_it(
    service: Service, engine: SagaEngine
) -> None:
    action = reserve_command(engine)
    compensation = compensation_of(action)

    undone = service.participant.process(compensation)
    late = service.participant.process(action)
    late_retry = service.participant.process(attempt(action, 2))

    assert undone.ok
    assert undone.result == NOT_APPLIED
    assert service.calls == Counter()  # neither handler ran
    assert (late.outcome, late.error_code, late.retryable) == ("failure", COMPENSATED, False)
    assert late_retry.error_code == COMPENSATED
    assert service.effects("reserved") == service.effects("released") == 0
    inbox = service.inbox()
    assert inbox[action.idempotency_key].outcome == "tombstone"
    assert inbox[compensation.idempotency_key].outcome == "success"
    assert service.participant.process(compensation) == undone  # redelivery: same reply


def test_compensating_an_applied_action_runs_the_handler_once(
    service: Service, engine: SagaEngine
) -> None:
    action = reserve_command(engine)
    service.participant.process(action)
    compensation = compensation_of(action)

    replies = [service.participant.process(compensation) for _ in range(2)]
    replies.append(service.participant.process(attempt(compensation, 2)))

    assert all(r.ok and r.result == {} for r in replies)
    assert service.calls == Counter({"inventory.reserve": 1, "inventory.release": 1})
    assert service.effects("released") == 1


def test_compensating_a_refused_action_is_a_no_op(service: Service, engine: SagaEngine) -> None:
    action = reserve_command(engine)
    service.fail_with = BusinessError("out_of_stock")
    service.participant.process(action)

    undone = service.participant.process(compensation_of(action))

    assert undone.ok
    assert undone.result == NOT_APPLIED
    assert service.calls["inventory.release"] == 0


@pytest.mark.parametrize("using", ["session", "psycopg"])
def test_concurrent_attempts_of_one_step_wait_for_each_other(
    postgres_url: str, using: Using
) -> None:
    """Attempt 2 (sent after a timeout) arrives while attempt 1 is still running: it waits on
    attempt 1's inbox claim and then replays its outcome instead of running the handler."""
    service = Service(postgres_url, using)
    first_running, release_first = threading.Event(), threading.Event()
    backend: list[int] = []

    def hold_first_attempt(writer: Any) -> None:
        if not backend:
            backend.append(int(query(writer, "SELECT pg_backend_pid()")))
            first_running.set()
            assert release_first.wait(30)

    service.before = hold_first_attempt
    with SagaEngine([order_fulfillment], database_url=postgres_url) as engine:
        command = reserve_command(engine)
    replies: dict[str, Any] = {}
    one = threading.Thread(target=lambda: replies.update(one=service.participant.process(command)))
    one.start()
    assert first_running.wait(30)
    two = threading.Thread(
        target=lambda: replies.update(two=service.participant.process(attempt(command, 2)))
    )
    two.start()
    blocked = text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))")
    with service.participant.database.engine.connect() as watcher:
        wait_until(
            lambda: watcher.execute(blocked, {"pid": backend[0]}).scalar(),
            timeout=30,
            what="attempt 2 to wait on attempt 1's inbox claim",
        )
    release_first.set()
    one.join(30)
    two.join(30)

    assert service.calls["inventory.reserve"] == 1
    assert service.effects() == 1
    assert replies["one"].result == replies["two"].result
    service.participant.database.dispose()


def test_psycopg_commands_hand_the_pooled_connection_back_idle(postgres_url: str) -> None:
    """With one pooled connection (pool_size=1), every command runs on the same backend in
    turn: after a success, a transient failure and a refusal the connection is back in the
    pool outside any transaction, and the next command applies on it."""
    service = Service(f"{postgres_url}&pool_size=1&max_overflow=0", "psycopg")
    pids: list[int] = []
    service.before = lambda connection: pids.append(query(connection, "SELECT pg_backend_pid()"))
    with SagaEngine([order_fulfillment], database_url=postgres_url) as engine:
        applied, transient, refused, last = (reserve_command(engine, n) for n in range(1, 5))

    def pooled() -> tuple[int, TransactionStatus]:
        connection = service.participant.database.engine.raw_connection()
        try:
            info = connection.driver_connection.info  # type: ignore[union-attr]
            return info.backend_pid, info.transaction_status
        finally:
            connection.close()

    assert service.participant.process(applied).ok
    [pid] = pids
    assert pooled() == (pid, TransactionStatus.IDLE)

    service.fail_with = ConnectionError("gateway unreachable")
    with pytest.raises(ConnectionError):
        service.participant.process(transient)
    assert pooled() == (pid, TransactionStatus.IDLE)

    service.fail_with = BusinessError("out_of_stock")
    assert service.participant.process(refused).error_code == "out_of_stock"
    assert pooled() == (pid, TransactionStatus.IDLE)

    service.fail_with = None
    assert service.participant.process(transient).ok
    assert service.participant.process(last).ok
    assert pids == [pid] * 5  # every handler call on the one pooled connection
    assert service.effects() == 3
    assert {e.outcome for e in service.inbox().values()} == {"success", "failure"}
    assert len(service.inbox()) == 4
    service.participant.database.dispose()


@pytest.mark.parametrize("broken", ["between commands", "in the handler"])
def test_psycopg_broken_connection_is_replaced_and_the_retry_applies_once(
    postgres_url: str, broken: str
) -> None:
    """The participant's only pooled connection dies (a database restart, say): the command
    on it fails as transient, the pool forgets that connection, and the retry applies the
    command once on a fresh one."""
    service = Service(f"{postgres_url}&pool_size=1&max_overflow=0", "psycopg")
    pids: list[int] = []

    def note_backend(connection: psycopg.Connection[Any]) -> None:
        pids.append(query(connection, "SELECT pg_backend_pid()"))
        if broken == "in the handler" and len(pids) == 2:
            terminate(pids[-1])  # after the claim and before the handler's write

    service.before = note_backend
    with SagaEngine([order_fulfillment], database_url=postgres_url) as engine:
        first, second = reserve_command(engine, 1), reserve_command(engine, 2)
    assert service.participant.process(first).ok
    if broken == "between commands":
        terminate(pids[0])

    with pytest.raises(psycopg.OperationalError):
        service.participant.process(second)
    retried = service.participant.process(second)

    assert retried.ok
    assert retried.result == {"reservation": "r-1", "amount": "12.50"}
    assert pids[-1] != pids[0]  # a fresh connection
    assert len(set(pids)) == 2
    assert service.calls["inventory.reserve"] == len(pids)
    assert service.effects() == 2  # once per command
    inbox = service.inbox()
    assert {inbox[c.idempotency_key].outcome for c in (first, second)} == {"success"}
    assert service.participant.process(second) == retried
    service.participant.database.dispose()


def test_report_outcome_appends_the_sagas_events_directly(database_url: str) -> None:
    with SagaEngine([order_fulfillment], database_url=database_url) as engine:
        command = reserve_command(engine)

        outcome = report_outcome(engine, command, result={"reservation": "r-9"})
        again = report_outcome(engine, command, result={"reservation": "r-9"})

        assert outcome.state.results["reserve_inventory"] == {"reservation": "r-9"}
        assert [c.command for c in outcome.commands] == ["payment.charge"]
        assert again.duplicate  # the same reply id: the engine's inbox kept the first
        charge = outcome.commands[0]
        declined = report_outcome(engine, charge, error=BusinessError("card_declined", "no"))
        assert [c.command for c in declined.commands] == ["inventory.release"]
        with pytest.raises(ValueError, match="not both"):
            report_outcome(engine, charge, result={}, error=BusinessError("x"))


def test_handles_validates_its_options_and_keeps_the_function(sqlite_url: str) -> None:
    participant = Participant("payment", database_url=sqlite_url)

    def charge(command: CommandMessage, session: Session) -> dict[str, Any]:
        return {}

    assert participant.handles("payment.charge", max_retries=0)(charge) is charge
    assert participant.queues == ("payment",)
    assert "payment.charge" in participant.celery.tasks
    other = celery_app("memory://")
    assert "payment.charge" not in other.tasks  # no leaking into the process's other apps
    with pytest.raises(ValueError, match="has a handler already"):
        participant.handles("payment.charge")
    with pytest.raises(ValueError, match="backoff"):
        participant.handles("payment.refund", backoff=10, backoff_max=1)
    with pytest.raises(ValueError, match="1 to 200 characters"):
        BusinessError("")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql://db/x", "scheme must be postgresql:// or sqlite:///"),
        ("postgresql://h/db?schema=Bad-Name", "must be a lower-case identifier"),
        ("sqlite:///x.db?schema=s", "apply to PostgreSQL only"),
        ("postgresql://h/db?pool_size=many", "are numbers"),
    ],
)
def test_bad_database_urls_are_configuration_errors(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        Database(url)


def test_psycopg_handlers_need_postgres_and_using_is_checked(
    sqlite_url: str, postgres_url: str
) -> None:
    def charge(command: CommandMessage, connection: psycopg.Connection[Any]) -> None:
        pass

    on_sqlite = Participant("payment", database_url=sqlite_url)
    with pytest.raises(ConfigurationError) as refused:
        on_sqlite.handles("payment.charge", using="psycopg")
    assert "participant 'payment' command 'payment.charge'" in str(refused.value)
    assert "needs a PostgreSQL database" in str(refused.value)
    assert on_sqlite.commands == ()

    on_postgres = Participant("payment", database_url=postgres_url)
    unknown: Any = "orm"
    with pytest.raises(ValueError, match="using must be 'session' or 'psycopg', not 'orm'"):
        on_postgres.handles("payment.charge", using=unknown)
    assert on_postgres.handles("payment.charge", using="psycopg")(charge) is charge
    assert on_postgres._registrations["payment.charge"].using == "psycopg"
    assert on_postgres._registrations["payment.charge"].handler is charge
    assert "payment.charge" in on_postgres.celery.tasks
