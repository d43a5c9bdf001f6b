"""The two messages that cross the engine's boundary: commands out, replies in.

Both are pydantic models, validated where they enter or leave. A command is what the outbox
stores and the relay publishes; a reply is what a participant sends back. Anything that does
not validate is rejected with the saga, step and field named, before anything is written.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from saga_es.errors import MalformedReplyError

__all__ = ["CommandMessage", "ReplyMessage", "parse_reply"]


class CommandMessage(BaseModel):
    """One command to one participant: an attempt at a step's action or compensation.

    message_id is unique per attempt (outbox key, Celery task id). idempotency_key is the same
    for every attempt of the step's action (or of its compensation): participants dedupe on it,
    so an attempt that committed late is not applied a second time by the retry.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: UUID
    saga_id: UUID
    saga_version: int = Field(description="version of the event that issued this command")
    definition: str
    definition_version: int
    step: str
    phase: Literal["action", "compensation"]
    attempt: int = Field(ge=1)
    command: str
    idempotency_key: UUID
    payload: dict[str, Any]
    correlation_id: str
    causation_id: UUID = Field(description="event_id of the saga event that caused it")
    queue: str
    deadline: datetime
    created_at: datetime

    def reply_success(self, reply_id: UUID, result: dict[str, Any] | None = None) -> ReplyMessage:
        return ReplyMessage(
            message_id=reply_id,
            saga_id=self.saga_id,
            command_id=self.message_id,
            outcome="success",
            result=result or {},
        )

    def reply_failure(
        self, reply_id: UUID, error_code: str, message: str = "", *, retryable: bool = False
    ) -> ReplyMessage:
        return ReplyMessage(
            message_id=reply_id,
            saga_id=self.saga_id,
            command_id=self.message_id,
            outcome="failure",
            error_code=error_code,
            error_message=message,
            retryable=retryable,
        )


class ReplyMessage(BaseModel):
    """A participant's answer to one command.

    A failure is a business failure (``retryable=False``: the effect did not happen and will not)
    or a transient one (``retryable=True``: nothing committed, try again).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: UUID
    saga_id: UUID
    command_id: UUID
    outcome: Literal["success", "failure"]
    result: dict[str, Any] = Field(default_factory=dict)
    error_code: str | None = Field(default=None, min_length=1, max_length=200)
    error_message: str = Field(default="", max_length=10_000)
    retryable: bool = False

    @model_validator(mode="after")
    def _failure_names_its_error(self) -> ReplyMessage:
        if self.outcome == "failure" and not self.error_code:
            raise ValueError("a failure reply needs an error_code")
        if self.outcome == "success" and self.error_code:
            raise ValueError("a success reply carries no error_code")
        return self

    @property
    def ok(self) -> bool:
        return self.outcome == "success"


def parse_reply(raw: Any) -> ReplyMessage:
    """Validate a reply from outside (a dict, JSON text or a ReplyMessage)."""
    if isinstance(raw, ReplyMessage):
        return raw
    try:
        if isinstance(raw, str | bytes):
            return ReplyMessage.model_validate_json(raw)
        return ReplyMessage.model_validate(raw)
    except ValidationError as exc:
        problems = [
            f"field '{'.'.join(str(p) for p in err['loc']) or '(message)'}': {err['msg']}"
            for err in exc.errors()
        ]
        about = raw if isinstance(raw, dict) else {}
        raise MalformedReplyError(
            problems=problems, saga_id=about.get("saga_id"), command_id=about.get("command_id")
        ) from exc
