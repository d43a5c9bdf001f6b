"""Outbox rows as the relay sees them, and how a stored row becomes a ``CommandMessage``.

A claimed row keeps its columns as the database returned them (UUIDs and times as objects on
PostgreSQL, as text on SQLite) and its payload as JSON text: nothing is parsed while claiming,
so that one malformed row can only fail its own conversion, never the whole batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from outbox_relay.errors import MessageRejectedError
from saga_es.messages import CommandMessage
from saga_es.persistence.schema import OUTBOX_COLUMNS

__all__ = ["CLAIM_COLUMNS", "OutboxRow", "ParkedRow", "to_command"]

#: Columns a claim selects, in ``OutboxRow`` field order (``payload`` as text): what a
#: decision wrote, between the relay's own bookkeeping columns.
CLAIM_COLUMNS = ("seq", *OUTBOX_COLUMNS, "publish_attempts")

_COMMAND_FIELDS = tuple(
    c for c in CLAIM_COLUMNS if c not in {"seq", "position", "publish_attempts", "payload"}
)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One unpublished row. ``seq`` is the key the relay marks it by: unlike ``message_id`` it
    is valid even when the rest of the row is not."""

    seq: int
    message_id: Any
    saga_id: Any
    saga_version: int
    position: int
    definition: Any
    definition_version: Any
    step: Any
    phase: Any
    attempt: Any
    command: Any
    idempotency_key: Any
    payload: str
    correlation_id: Any
    causation_id: Any
    queue: Any
    deadline: Any
    created_at: Any
    publish_attempts: int

    def describe(self) -> str:
        """The ids a log line about this row must carry."""
        return (
            f"saga={self.saga_id} step={self.step} command={self.command} "
            f"message_id={self.message_id} (v{self.saga_version}.{self.position})"
        )


@dataclass(frozen=True, slots=True)
class ParkedRow:
    """A row the relay gave up on. ``held_back``: the saga's later rows still unpublished,
    which stay so while this row is parked when the policy is ``on_parked="block"``."""

    seq: int
    message_id: str
    saga_id: str
    saga_version: int
    position: int
    step: str
    command: str
    queue: str
    publish_attempts: int
    last_error: str | None
    parked_at: datetime
    held_back: int


def to_command(row: OutboxRow) -> CommandMessage:
    """Validate a stored row as the command it must be, or say precisely why it is not one."""
    try:
        payload = json.loads(row.payload)
    except (ValueError, RecursionError) as exc:
        raise MessageRejectedError(row.message_id, f"payload is not valid JSON: {exc}") from exc
    fields = {name: getattr(row, name) for name in _COMMAND_FIELDS}
    fields["payload"] = payload
    try:
        return CommandMessage.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '(row)'}': {err['msg']}"
            for err in exc.errors()
        )
        raise MessageRejectedError(row.message_id, f"not a valid command: {problems}") from exc
