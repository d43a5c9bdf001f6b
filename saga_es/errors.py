"""Every error saga-es raises on purpose.

Each exception takes the ids it is about (saga, step, field...) as keyword arguments and builds its
own message from them, so a log line always says which saga and which step went wrong.

    SagaError
    ├── DefinitionError            a saga definition breaks a rule (names the step and the rule)
    ├── UnknownDefinitionError     no registered definition has that name / version
    ├── InvalidInputError          bad input from outside; nothing stored is changed
    │   ├── InvalidSagaDataError       start data fails the definition's data model
    │   ├── MalformedReplyError        a reply message is missing or has a bad field
    │   ├── UnknownSagaError           a reply, timer or query names a saga that does not exist
    │   ├── UnknownCommandError        a reply names a command the saga never issued
    │   ├── StartConflictError         same business key started again with different data
    │   └── ActionRefusedError         an operator action makes no sense in the saga's state
    ├── ConcurrencyError           a decision kept losing optimistic-concurrency races
    └── StoreError                 the database could not be reached or refused a write
        └── ConfigurationError         the database URL or the environment is not usable

Lower-level errors (psycopg, sqlite3, eventsourcing) are translated at the boundary with
``raise ... from exc`` so the original stays visible in the traceback.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

__all__ = [
    "ActionRefusedError",
    "ConcurrencyError",
    "ConfigurationError",
    "DefinitionError",
    "InvalidInputError",
    "InvalidSagaDataError",
    "MalformedReplyError",
    "SagaError",
    "StartConflictError",
    "StoreError",
    "UnknownCommandError",
    "UnknownDefinitionError",
    "UnknownSagaError",
]


class SagaError(Exception):
    """Base class. ``context`` holds the ids the error is about, for structured logs."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.context = {key: value for key, value in context.items() if value is not None}


class DefinitionError(SagaError):
    def __init__(self, *, definition: str, rule: str, detail: str, step: str | None = None) -> None:
        where = f"saga '{definition}'" + (f" step '{step}'" if step else "")
        super().__init__(
            f"{where}: {detail} (rule: {rule})", definition=definition, step=step, rule=rule
        )
        self.definition, self.step, self.rule = definition, step, rule


class UnknownDefinitionError(SagaError):
    def __init__(self, *, definition: str, version: int | None = None, known: list[str]) -> None:
        wanted = f"'{definition}'" + (f" version {version}" if version is not None else "")
        super().__init__(
            f"unknown saga definition {wanted}; registered: {', '.join(known) or 'none'}",
            definition=definition,
            version=version,
        )


class InvalidInputError(SagaError):
    """Input from outside the engine was rejected before anything was written."""


class InvalidSagaDataError(InvalidInputError):
    def __init__(self, *, definition: str, business_key: str, problems: list[str]) -> None:
        super().__init__(
            f"saga '{definition}' key '{business_key}': data rejected: {'; '.join(problems)}",
            definition=definition,
            business_key=business_key,
        )
        self.problems = problems


class MalformedReplyError(InvalidInputError):
    def __init__(self, *, problems: list[str], saga_id: Any = None, command_id: Any = None) -> None:
        about = f"saga {saga_id}: " if saga_id else ""
        super().__init__(
            f"{about}malformed reply: {'; '.join(problems)}",
            saga_id=saga_id,
            command_id=command_id,
        )
        self.problems = problems


class UnknownSagaError(InvalidInputError):
    def __init__(self, *, saga_id: UUID, what: str = "reply") -> None:
        super().__init__(f"{what} for unknown saga {saga_id}", saga_id=saga_id)
        self.saga_id = saga_id


class UnknownCommandError(InvalidInputError):
    def __init__(self, *, saga_id: UUID, definition: str, command_id: UUID) -> None:
        super().__init__(
            f"saga {saga_id} ('{definition}'): reply names command {command_id}, "
            "which this saga never issued (field: command_id)",
            saga_id=saga_id,
            command_id=command_id,
        )


class StartConflictError(InvalidInputError):
    def __init__(self, *, saga_id: UUID, definition: str, business_key: str) -> None:
        super().__init__(
            f"saga '{definition}' key '{business_key}' ({saga_id}) was already started with "
            "different data; a business key identifies one saga (field: data)",
            saga_id=saga_id,
            definition=definition,
            business_key=business_key,
        )


class ActionRefusedError(InvalidInputError):
    """An operator action (retry, resume, abort, mark-compensated, a timer change) was refused;
    nothing was recorded. ``why`` says what in the saga's state rules it out."""

    def __init__(self, *, saga_id: UUID, action: str, status: str, why: str) -> None:
        super().__init__(
            f"saga {saga_id} ({status}): cannot {action}: {why}",
            saga_id=saga_id,
            action=action,
            status=status,
        )
        self.saga_id, self.action, self.status, self.why = saga_id, action, status, why


class ConcurrencyError(SagaError):
    def __init__(self, *, saga_id: UUID, attempts: int) -> None:
        super().__init__(
            f"saga {saga_id}: gave up after {attempts} optimistic-concurrency conflicts in a row",
            saga_id=saga_id,
            attempts=attempts,
        )


class StoreError(SagaError):
    """The database failed; the decision was not recorded (the transaction rolled back)."""


class ConfigurationError(StoreError):
    """The database URL or environment cannot be used."""
