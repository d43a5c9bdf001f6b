"""Every error the outbox relay raises on purpose.

The relay sorts failures by what they say about the rows, because that decides what it does:

    SagaError                     (saga_es.errors: the CLI prints any of these as one line)
    └── RelayError
        ├── RelayConfigurationError   a relay option is unusable (batch size, policy, URL)
        ├── UnavailableError          nothing is wrong with the rows; the world is down:
        │   ├── BrokerUnavailableError         the broker cannot be reached or dropped us
        │   └── SourceUnavailableError         the database cannot be reached or dropped us
        └── MessageRejectedError           this one row cannot be published as it is stored

* ``UnavailableError``: the batch rolls back, its rows stay unpublished and untouched, the
  relay backs off and tries again. One warning per outage, one info line when it is over.
* ``MessageRejectedError``: the row's ``publish_attempts`` and ``last_error`` are recorded; after a
  bounded number of attempts the row is parked. Other rows of the batch are unaffected.

Lower-level errors (psycopg, sqlite3, kombu, amqp) are translated where they are caught, with
``raise ... from exc``, so the original stays visible in the traceback.
"""

from __future__ import annotations

from uuid import UUID

from saga_es.errors import SagaError

__all__ = [
    "BrokerUnavailableError",
    "MessageRejectedError",
    "RelayConfigurationError",
    "RelayError",
    "SourceUnavailableError",
    "UnavailableError",
]


class RelayError(SagaError):
    """Base class of the relay's own errors."""


class RelayConfigurationError(RelayError):
    def __init__(self, option: str, detail: str) -> None:
        super().__init__(f"relay option {option}: {detail}", option=option)
        self.option = option


class UnavailableError(RelayError):
    """A dependency is down. ``target`` names it ("broker" or "database") for log lines."""

    target = "dependency"

    def __init__(self, where: str, cause: BaseException | str) -> None:
        detail = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"{self.target} unavailable at {where}: {detail}", where=where)
        self.where = where
        self.detail = detail


class BrokerUnavailableError(UnavailableError):
    target = "broker"


class SourceUnavailableError(UnavailableError):
    target = "database"


class MessageRejectedError(RelayError):
    """One outbox row cannot become a message: it fails validation, names a destination that
    is not allowed, or the serializer refuses it. Retrying the same row cannot help unless
    someone changes it (or the relay's configuration), hence bounded attempts, then parking."""

    def __init__(self, message_id: UUID | str, reason: str) -> None:
        super().__init__(f"outbox row {message_id}: {reason}", message_id=str(message_id))
        self.message_id = message_id
        self.reason = reason
