"""The participant inbox: claim an idempotency key, record the outcome, find it again.

Claiming is an ``INSERT ... ON CONFLICT DO NOTHING`` of the key, first thing in the transaction.
On PostgreSQL a second transaction claiming the same key (attempt 2 of a step, sent while
attempt 1 is still running) waits on the first one's uncommitted row: if the first commits,
the second finds the key taken and replays the outcome; if it rolls back, the second proceeds.
So a handler never runs twice for one key at the same time, and never twice in sequence. On
SQLite, ``BEGIN IMMEDIATE`` serialises the transactions to the same effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID

from sqlalchemy import Table, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from saga_es.messages import CommandMessage
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
    """The inbox seen from inside one participant transaction (``session``)."""

    def __init__(self, session: Session, participant: str) -> None:
        self.session = session
        self.participant = participant

    def claim(self, command: CommandMessage) -> bool:
        """Take the command's idempotency key; False if an earlier delivery took it."""
        return self._insert(command.idempotency_key, command, phase=command.phase, outcome=PENDING)

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
        row = (
            self.session.execute(select(_TABLE).where(_TABLE.c.idempotency_key == key))
            .mappings()
            .first()
        )
        if row is None:
            return None
        return InboxRecord(**{f: row[f] for f in InboxRecord.__dataclass_fields__})

    def record(
        self,
        command: CommandMessage,
        *,
        outcome: str,
        result: Mapping[str, Any],
        error_code: str | None = None,
        error_message: str = "",
    ) -> None:
        """The claimed key's outcome (in the claiming transaction)."""
        self.session.execute(
            update(_TABLE)
            .where(_TABLE.c.idempotency_key == command.idempotency_key)
            .values(
                outcome=outcome,
                result=dict(result),
                error_code=error_code,
                error_message=error_message,
                recorded_at=datetime.now(UTC),
            )
        )

    def _insert(self, key: UUID, command: CommandMessage, **values: Any) -> bool:
        dialect = self.session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        row = {
            "idempotency_key": key,
            "participant": self.participant,
            "saga_id": command.saga_id,
            "step": command.step,
            "command": command.command,
            "first_message_id": command.message_id,
            "result": {},
            "error_message": "",
            "recorded_at": datetime.now(UTC),
        }
        statement = (
            insert(_TABLE)
            .values({**row, **values})
            .on_conflict_do_nothing(index_elements=[_TABLE.c.idempotency_key])
            # RETURNING, not rowcount: drivers differ in what rowcount says for this statement.
            .returning(_TABLE.c.idempotency_key)
        )
        return self.session.execute(statement).first() is not None
