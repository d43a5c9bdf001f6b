"""The example services and the engine worker as real processes, their database as a test
reads it, and a stand-in for the outbox relay (which publishes outbox rows as they appear)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from typing import Any, TypeVar

from broker import SERVICE_QUEUES, publish_command
from processes import BIN, Process, Processes, wait_until
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from examples.order_fulfillment.faults import Switch, clear_faults, set_fault
from examples.order_fulfillment.models import Base
from saga_es.engine import SagaEngine
from saga_es.messages import CommandMessage
from saga_es.participant import DeadLetter, InboxEntry, Participant
from saga_es.participant.database import Database

Model = TypeVar("Model")


def worker_env(database_url: str, broker_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "SAGA_ES_BROKER_URL": broker_url,
        "SAGA_ES_EXAMPLES_DATABASE_URL": database_url,
        "SAGA_ES_DATABASE_URL": database_url,
        "SAGA_ES_EXAMPLES_MAX_RETRIES": "2",
        "SAGA_ES_EXAMPLES_BACKOFF": "0.05",
    }


def start_services(processes: Processes, name: str = "services") -> Process:
    """All four example services in one prefork worker, as the examples' README runs them."""
    argv = [
        str(BIN / "celery"),
        "--app",
        "examples.order_fulfillment.services",
        "worker",
        "--queues",
        ",".join(SERVICE_QUEUES),
        "--loglevel",
        "INFO",
        "--concurrency",
        "2",
        "--without-mingle",
        "--without-gossip",
        "--hostname",
        f"{name}-{uuid.uuid4().hex[:8]}@%h",
    ]
    return wait_ready(processes.start(name, argv))


def start_engine_worker(
    processes: Processes, database_url: str, broker_url: str, *, concurrency: int = 2
) -> Process:
    argv = [
        str(BIN / "saga-es"),
        "worker",
        "--database-url",
        database_url,
        "--broker-url",
        broker_url,
        "--concurrency",
        str(concurrency),
    ]
    return wait_ready(processes.start("engine-worker", argv))


def wait_ready(process: Process, starts: int = 1) -> Process:
    wait_until(
        lambda: process.output().count(" ready.") >= starts or not process.running(),
        timeout=60,
        what=f"{process.name} to be ready",
    )
    assert process.running(), process.output()
    return process


def count_in_log(process: Process, text: str) -> int:
    return process.output().count(text)


class ExampleDatabase:
    """The example services' tables (and participant inbox) in the test's schema."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.database = Database(url)
        self.sessions = sessionmaker(bind=self.database.engine, expire_on_commit=False)

    def create_tables(self) -> None:
        Participant("setup", database_url=self.url).create_tables()
        with self.database.engine.begin() as connection:
            Base.metadata.create_all(connection)

    def count(self, model: Any, **where: Any) -> int:
        with self.sessions() as session:
            query = select(func.count()).select_from(model).filter_by(**where)
            return int(session.scalar(query) or 0)

    def rows(self, model: type[Model], **where: Any) -> list[Model]:
        with self.sessions() as session:
            return list(session.scalars(select(model).filter_by(**where)))

    def inbox(self, key: uuid.UUID) -> InboxEntry | None:
        with self.sessions() as session:
            return session.get(InboxEntry, key)

    def dead_letters(self) -> list[DeadLetter]:
        return self.rows(DeadLetter)

    def set_fault(self, switch: Switch) -> None:
        with self.sessions.begin() as session:
            set_fault(session, switch)

    def clear_faults(self, command: str | None = None) -> None:
        with self.sessions.begin() as session:
            clear_faults(session, command)

    def close(self) -> None:
        self.database.dispose()


class TestRelay:
    """Publishes the engine's outbox rows, once each, as the real relay would."""

    __test__ = False  # not a test class

    def __init__(self, engine: SagaEngine, broker_url: str) -> None:
        self.engine, self.broker_url = engine, broker_url
        self.sent: set[uuid.UUID] = set()
        self.held: set[str] = set()  # command names not to publish (a lost message)
        self.withheld: list[CommandMessage] = []

    def pump(self, saga_ids: Iterable[uuid.UUID]) -> int:
        published = 0
        for saga_id in saga_ids:
            for row in self.engine.store.outbox(saga_id):
                if row["message_id"] in self.sent:
                    continue
                command = CommandMessage.model_validate(
                    {field: row[field] for field in CommandMessage.model_fields}
                )
                self.sent.add(command.message_id)
                if command.command in self.held:
                    self.withheld.append(command)
                    continue
                publish_command(self.broker_url, command)
                published += 1
        return published
