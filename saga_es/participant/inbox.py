"""The participant inbox: claim an idempotency key, record the outcome, find it again.

Claiming is an ``INSERT ... ON CONFLICT DO NOTHING`` of the key, first thing in the transaction.
On PostgreSQL a second transaction claiming the same key (attempt 2 of a step, sent while
attempt 1 is still running) waits on the first one's uncommitted row: if the first commits,
the second finds the key taken and replays the outcome; if it rolls back, the second proceeds.
So a handler never runs twice for one key at the same time, and never twice in sequence. On
SQLite, ``BEGIN IMMEDIATE`` serialises the transactions to the same effect.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.orm import Session

from saga_es.messages import CommandMessage, ReplyMessage
from saga_es.participant.tables import PENDING, TOMBSTONE, InboxEntry

__all__ = ["Inbox", "InboxRecord"]

_TABLE = cast(Table, InboxEntry.__table__)


@dataclass(frozen=True)
class InboxRecord:
    idempotency_key: UUID
    saga_id: UUID
    step: str
    phase: str
    command: str
    first_message_id: UUID
    outcome: str
    result: Mapping[str, Any]
    error_code: str | None
    error_message: str


class Inbox:
    """The inbox seen from inside one participant transaction.

    On PostgreSQL every statement goes straight to psycopg, on the transaction's connection:
    SQLAlchemy's execution path costs more CPU than the statements themselves, and a
    participant runs them for every command. On SQLite they go through the session.
    """

    def __init__(self, participant: str, *, psycopg: Any = None, session: Session | None = None):
        if (psycopg is None) == (session is None):
            raise ValueError("an inbox works on a psycopg connection or on a session")
        self.participant = participant
        self._psycopg = psycopg
        self._session = session

    @classmethod
    def in_session(cls, session: Session, participant: str) -> Inbox:
        """The inbox in ``session``'s transaction (psycopg underneath, on PostgreSQL)."""
        connection = session.connection()
        if connection.dialect.name == "postgresql":
            return cls(participant, psycopg=connection.connection.driver_connection)
        return cls(participant, session=session)

    def claim(self, command: CommandMessage, outcome: ReplyMessage | None = None) -> bool:
        """Take the command's idempotency key, pending or with its ``outcome`` already known
        (a refusal); False if an earlier delivery took it."""
        if outcome is None:
            return self._insert(command.idempotency_key, command, phase=command.phase)
        return self._insert(
            command.idempotency_key, command, phase=command.phase, **_outcome_columns(outcome)
        )

    def tombstone(self, action_key: UUID, compensation: CommandMessage) -> bool:
        """Record that the action behind ``action_key`` must never be applied, because it was
        compensated before it arrived. False if the action's key is taken (it arrived first)."""
        return self._insert(
            action_key,
            compensation,
            phase="action",
            outcome=TOMBSTONE,
            error_code="compensated",
            error_message=f"compensated by message {compensation.message_id} before it arrived",
        )

    def get(self, key: UUID) -> InboxRecord | None:
        if self._psycopg is not None:
            found = self._psycopg.execute(_PG_SELECT, {"key": key}).fetchone()
            return None if found is None else InboxRecord(*found)
        assert self._session is not None
        row = self._session.execute(_SELECT, {"key": key}).mappings().first()
        if row is None:
            return None
        return InboxRecord(**{f: row[f] for f in InboxRecord.__dataclass_fields__})

    def record(self, command: CommandMessage, outcome: ReplyMessage) -> None:
        """The claimed key's outcome (in the claiming transaction)."""
        values = {
            "key": command.idempotency_key,
            **_outcome_columns(outcome),
            "recorded_at": _now(),
        }
        if self._psycopg is not None:
            self._psycopg.execute(_PG_RECORD, {**values, "result": json.dumps(values["result"])})
        else:
            assert self._session is not None
            self._session.execute(_RECORD, values)

    def _insert(self, key: UUID, command: CommandMessage, **values: Any) -> bool:
        row = {
            "idempotency_key": key,
            "participant": self.participant,
            "saga_id": command.saga_id,
            "step": command.step,
            "command": command.command,
            "first_message_id": command.message_id,
            "outcome": PENDING,
            "result": {},
            "error_code": None,
            "error_message": "",
            "recorded_at": _now(),
            **values,
        }
        if self._psycopg is not None:
            claimed = self._psycopg.execute(_PG_CLAIM, {**row, "result": json.dumps(row["result"])})
            return claimed.fetchone() is not None
        assert self._session is not None
        return self._session.execute(_CLAIM_SQLITE, row).first() is not None


def _outcome_columns(reply: ReplyMessage) -> dict[str, Any]:
    return {
        "outcome": reply.outcome,
        "result": dict(reply.result),
        "error_code": reply.error_code,
        "error_message": reply.error_message,
    }


def _now() -> datetime:
    return datetime.now(UTC)


# Built once: SQLAlchemy then compiles each statement once per connection type instead of
# building and hashing a new statement object for every command.
_COLUMNS = {c.name: bindparam(c.name, type_=c.type) for c in _TABLE.columns}
_CLAIM = {
    dialect.__name__.rsplit(".", 1)[-1]: dialect.insert(_TABLE)
    .values(_COLUMNS)
    .on_conflict_do_nothing(index_elements=[_TABLE.c.idempotency_key])
    # RETURNING, not rowcount: drivers differ in what rowcount says for this statement.
    .returning(_TABLE.c.idempotency_key)
    for dialect in (postgresql, sqlite)
}
_CLAIM_SQLITE = _CLAIM["sqlite"]
# The record's fields, in InboxRecord's order, so that a row is the record's arguments.
_SELECT = select(*(_TABLE.c[f] for f in InboxRecord.__dataclass_fields__)).where(
    _TABLE.c.idempotency_key == bindparam("key")
)
_RECORD = (
    update(_TABLE)
    .where(_TABLE.c.idempotency_key == bindparam("key"))
    .values(
        outcome=bindparam("outcome"),
        result=bindparam("result", type_=_TABLE.c.result.type),
        error_code=bindparam("error_code"),
        error_message=bindparam("error_message"),
        recorded_at=bindparam("recorded_at", type_=_TABLE.c.recorded_at.type),
    )
)
# The same statements as SQL for psycopg (which takes the JSON column as JSON text).
_PSYCOPG = psycopg_dialect()  # type: ignore[no-untyped-call]
_PG_CLAIM = str(_CLAIM["postgresql"].compile(dialect=_PSYCOPG))
_PG_RECORD = str(_RECORD.compile(dialect=_PSYCOPG))
_PG_SELECT = str(_SELECT.compile(dialect=_PSYCOPG))
