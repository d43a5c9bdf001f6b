"""A saga participant: the service side of a step, with its handlers and its inbox.

    payments = Participant("payment", database_url="postgresql://.../shop?schema=payments")

    @payments.handles("payment.charge", max_retries=5)
    def charge(command: CommandMessage, session: Session) -> dict[str, Any]:
        if declined(command.payload):
            raise BusinessError("card_declined", "issuer said no")
        session.add(Charge(order_id=command.payload["data"]["order_id"], ...))
        return {"charge_id": ...}

    celery -A shop.payments worker -Q payment

A handler that writes with plain SQL can take the transaction's psycopg connection instead of a
session (PostgreSQL; about half the CPU per command, see ``transactions``):

    @payments.handles("payment.refund", using="psycopg")
    def refund(command: CommandMessage, connection: psycopg.Connection) -> None:
        connection.execute("UPDATE charges SET refunded = true WHERE order_id = %s", (...,))

Each command runs its handler at most once per ``idempotency_key`` (see ``applying``); the reply
goes to the engine after the commit (see ``task``). ``process`` does the same without Celery.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, cast, overload

import psycopg
from celery import Celery
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from saga_es.errors import ConfigurationError
from saga_es.messages import CommandMessage, ReplyMessage
from saga_es.messaging import celery_app
from saga_es.participant.applying import Handler, apply_command, describe
from saga_es.participant.database import Database
from saga_es.participant.reply_publisher import ReplyPublisher
from saga_es.participant.tables import DeadLetter, Tables
from saga_es.participant.task import register_task
from saga_es.participant.transactions import (
    Transactions,
    Using,
    psycopg_transactions,
    session_transactions,
)

__all__ = ["Participant", "Registration"]

P = ParamSpec("P")
R = TypeVar("R", bound="Mapping[str, Any] | None")


@dataclass(frozen=True, kw_only=True)
class Registration:
    """One command a participant handles, and how transient failures are retried."""

    command: str
    queue: str
    handler: Handler
    using: Using
    max_retries: int
    backoff: float
    backoff_max: float
    jitter: bool


class Participant:
    """The commands one service handles, the database its effects go to, the broker it uses.

    name: the service, in logs and in the inbox rows.
    database_url: where the inbox and the handlers' writes go (SQLAlchemy URL, PostgreSQL or
        SQLite; see ``saga_es.participant.database`` for the saga-es options such as ``schema``).
    broker_url: used when ``celery`` is not given; default ``$SAGA_ES_BROKER_URL``.
    celery: a Celery app to register the handlers' tasks on, for several participants in one
        worker. Build it with ``saga_es.messaging.celery_app`` so it speaks the wire contract.
    """

    def __init__(
        self,
        name: str,
        *,
        database_url: str,
        broker_url: str | None = None,
        celery: Celery | None = None,
    ) -> None:
        self.name = name
        self.database = Database(database_url)
        if celery is None:
            celery = celery_app(broker_url, name=f"saga_es.participant.{name}")
            # celery_app's default queue is the engine's reply queue: a worker started without
            # -Q would consume replies there and drop them as tasks it does not know.
            celery.conf.task_default_queue = name
        self.celery = celery
        self._replies = ReplyPublisher.for_app(celery)
        self._registrations: dict[str, Registration] = {}
        self._sessions: sessionmaker[Session] | None = None

    @overload
    def handles(
        self,
        command: str,
        *,
        queue: str | None = None,
        using: Literal["session"] = "session",
        max_retries: int = 5,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
        jitter: bool = True,
    ) -> Callable[
        [Callable[Concatenate[CommandMessage, Session, P], R]],
        Callable[Concatenate[CommandMessage, Session, P], R],
    ]: ...

    @overload
    def handles(
        self,
        command: str,
        *,
        queue: str | None = None,
        using: Literal["psycopg"],
        max_retries: int = 5,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
        jitter: bool = True,
    ) -> Callable[
        [Callable[Concatenate[CommandMessage, psycopg.Connection[Any], P], R]],
        Callable[Concatenate[CommandMessage, psycopg.Connection[Any], P], R],
    ]: ...

    def handles(
        self,
        command: str,
        *,
        queue: str | None = None,
        using: Using = "session",
        max_retries: int = 5,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
        jitter: bool = True,
    ) -> Callable[[Callable[..., R]], Callable[..., R]]:
        """Register the decorated function as the handler of ``command``; it stays callable
        as it was (tests can call it with a session of their own).

        queue: where the command arrives, for ``queues`` (default: the command's prefix,
            ``payment`` for ``payment.charge``, as saga definitions route by default).
        using: what the handler writes with, in the participant's transaction: a SQLAlchemy
            ``"session"`` (default) or the ``"psycopg"`` connection (PostgreSQL only).
        max_retries: transient failures retried before replying a retryable failure (5).
        backoff: seconds before the first retry (1.0), doubling each time up to
            ``backoff_max`` seconds (60.0); with ``jitter`` (on) each delay is drawn from
            [half of it, all of it].
        """
        where = f"participant '{self.name}' command '{command}'"
        if command in self._registrations:
            raise ValueError(f"participant '{self.name}': '{command}' has a handler already")
        if max_retries < 0 or backoff < 0 or backoff_max < backoff:
            raise ValueError(
                f"{where}: need max_retries >= 0 and "
                f"0 <= backoff <= backoff_max, got {max_retries}, {backoff}, {backoff_max}"
            )
        if using not in ("session", "psycopg"):
            raise ValueError(f"{where}: using must be 'session' or 'psycopg', not {using!r}")
        if using == "psycopg" and self.database.backend != "postgres":
            raise ConfigurationError(
                f"{where}: using='psycopg' needs a PostgreSQL database; this participant's is "
                f"{self.database.url.get_backend_name()} (use the default, a session)"
            )

        def register(handler: Callable[..., R]) -> Callable[..., R]:
            registration = Registration(
                command=command,
                queue=queue or command.split(".", 1)[0],
                handler=cast(Handler, handler),
                using=using,
                max_retries=max_retries,
                backoff=backoff,
                backoff_max=backoff_max,
                jitter=jitter,
            )
            self._registrations[command] = registration
            register_task(self, registration)
            return handler

        return register

    @property
    def commands(self) -> Sequence[str]:
        return tuple(self._registrations)

    @property
    def queues(self) -> Sequence[str]:
        """The queues to consume (``celery worker -Q ...``) for every registered command."""
        return tuple(dict.fromkeys(r.queue for r in self._registrations.values()))

    @property
    def sessions(self) -> sessionmaker[Session]:
        engine = self.database.engine  # first use in a (forked) process opens its own pool
        if self._sessions is None:
            self._sessions = sessionmaker(bind=engine, expire_on_commit=False)
        return self._sessions

    def process(self, command: CommandMessage) -> ReplyMessage:
        """Handle ``command`` exactly as the worker does, minus Celery: returns the reply to
        send; raises the transient failure (after rolling back) if there was one."""
        registration = self._registrations.get(command.command)
        if registration is None:
            raise KeyError(f"participant '{self.name}' has no handler for {describe(command)}")
        return apply_command(self._transactions(registration.using), command, registration.handler)

    def _transactions(self, using: Using) -> Transactions:
        if using == "psycopg":
            return psycopg_transactions(lambda: self.database.engine, self.name)
        return session_transactions(self.sessions, self.name)

    def send_reply(self, command: CommandMessage, reply: ReplyMessage) -> None:
        """Publish ``reply`` to the engine. Called after the commit; the seam to override for
        another transport. Its id is derived from the command, so sending it twice is safe."""
        self._replies.send(
            reply,
            # What worker logs show for the call. Celery's default, a safe repr of the whole
            # reply, costs more CPU than the rest of the send.
            kwargsrepr=f"{{'reply': {reply.outcome} to command {reply.command_id}}}",
        )

    def close(self) -> None:
        """Close the broker connection replies went out on (shared by the participants of
        this Celery app: the next reply opens a new one) and the database pool."""
        self._replies.close()
        self.database.dispose()

    def dead_letter(self, *, task: str, message_id: str | None, body: Any, error: str) -> None:
        """Keep a message that could not be used, with the reason, in its own transaction."""
        with self.sessions.begin() as session:
            session.add(
                DeadLetter(
                    participant=self.name,
                    task=task,
                    message_id=message_id,
                    body=json.dumps(body, default=str),
                    error=error,
                    received_at=datetime.now(UTC),
                )
            )

    def create_tables(self) -> None:
        """Create the inbox and dead-letter tables (and the URL's schema) if missing. The
        handlers' business tables are the service's own to create."""
        with self.database.engine.begin() as connection:
            if self.database.schema:
                connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.database.schema}"'))
            Tables.metadata.create_all(connection)

    def __repr__(self) -> str:
        return f"Participant({self.name!r}, commands={list(self._registrations)})"
