"""A participant's own tables, next to the service's business tables in the same database.

participant_inbox: one row per effect (a step's action, or its compensation) this participant
    decided, keyed by the command's ``idempotency_key`` (the same for every attempt of that
    action or compensation). It commits in the transaction of the handler's own writes, so
    "the effect happened" and "it is recorded as having happened" are one fact: a redelivery
    or a retry finds the row and replies with the stored outcome instead of running again.
    ``outcome`` is ``success``, ``failure`` (a business refusal: nothing was written) or
    ``tombstone``: an action key recorded by its compensation, which arrived first. A late
    action then finds the tombstone and is refused (see ``saga_es.participant.applying``).
participant_dead_letters: messages that could not be read as commands, kept with the reason.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import JSON, DateTime, Integer, String, Text, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["FAILURE", "PENDING", "SUCCESS", "TOMBSTONE", "DeadLetter", "InboxEntry", "Tables"]

SUCCESS, FAILURE, TOMBSTONE = "success", "failure", "tombstone"
#: Only ever seen inside the transaction that claimed the key: it ends as one of the above.
PENDING = "pending"


class Tables(DeclarativeBase):
    """The participant's tables only: ``Tables.metadata.create_all`` never touches the
    service's business tables, which have their own metadata."""


class InboxEntry(Tables):
    __tablename__ = "participant_inbox"

    idempotency_key: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    participant: Mapped[str] = mapped_column(String(100))
    saga_id: Mapped[UUID] = mapped_column(Uuid)
    step: Mapped[str] = mapped_column(String(100))
    phase: Mapped[str] = mapped_column(String(20))
    command: Mapped[str] = mapped_column(String(100))
    #: The message that decided the outcome (attempts after it only replay it).
    first_message_id: Mapped[UUID] = mapped_column(Uuid)
    outcome: Mapped[str] = mapped_column(String(20))
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error_code: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str] = mapped_column(Text, default="")
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DeadLetter(Tables):
    __tablename__ = "participant_dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    participant: Mapped[str] = mapped_column(String(100))
    task: Mapped[str] = mapped_column(String(200))
    message_id: Mapped[str | None] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
