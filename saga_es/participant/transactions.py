"""The transaction a command runs in, and what its handler is given to write with.

    session   (default) a SQLAlchemy ``Session``; PostgreSQL or SQLite
    psycopg   the psycopg ``Connection`` itself; PostgreSQL only

Either way the handler's writes, the inbox row and the commit are one transaction on one
connection from the participant's pool, and the handler must neither commit nor roll back.
The psycopg one skips the ORM's unit of work and SQLAlchemy's execution path: a handler that
writes with plain SQL costs about half the CPU per command (the inbox statements go straight
to psycopg in both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

import psycopg
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from saga_es.participant.inbox import Inbox

__all__ = ["Transactions", "Using", "psycopg_transactions", "session_transactions"]

#: What a handler is given: ``"session"`` or ``"psycopg"``.
Using = Literal["session", "psycopg"]

#: Opens one transaction: the inbox in it, and what the handler writes with. Leaving the
#: block normally commits; leaving it by an exception rolls back and re-raises.
Transactions = Callable[[], AbstractContextManager[tuple[Inbox, Any]]]


def session_transactions(sessions: sessionmaker[Session], participant: str) -> Transactions:
    @contextmanager
    def begin() -> Iterator[tuple[Inbox, Any]]:
        with sessions.begin() as session:
            yield Inbox.in_session(session, participant), session

    return begin


def psycopg_transactions(engine: Callable[[], Engine], participant: str) -> Transactions:
    """``engine``: the participant's engine, asked per transaction (a forked worker process
    gets its own)."""

    @contextmanager
    def begin() -> Iterator[tuple[Inbox, Any]]:
        pooled = engine().raw_connection()
        try:
            connection: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
            try:
                yield Inbox(participant, psycopg=connection), connection
            except BaseException:
                _roll_back(pooled, connection)
                raise
            connection.commit()
        finally:
            pooled.close()  # back to the pool (or closed, if it was invalidated)

    return begin


def _roll_back(pooled: Any, connection: psycopg.Connection[Any]) -> None:
    try:
        connection.rollback()
    except psycopg.Error:
        # The connection is broken (a database restart, say): the pool must not hand it out
        # again. The command fails as transient and its retry gets a fresh connection.
        pooled.invalidate()
