"""What a participant's handlers raise, and what the participant raises itself.

    Exception
    ├── BusinessError             a handler's answer "no": nothing it wrote commits, the saga is
    │                             told (failure, not retryable) and the outcome is remembered
    └── SagaError (saga_es.errors)
        └── InvalidInputError
            └── MalformedCommandError   a command message that is not a CommandMessage;
                                        dead-lettered, never handled

Any other exception a handler raises is a transient failure: its transaction rolls back and the
command is tried again later (see ``Participant.handles``).
"""

from __future__ import annotations

from typing import Any

from saga_es.errors import InvalidInputError

__all__ = ["BusinessError", "MalformedCommandError"]


class BusinessError(Exception):
    """Raised by a handler to refuse a command for a business reason (``card_declined``).

    ``code`` is what the saga definition's retry policy matches (``non_retryable``); ``message``
    is for people. The refusal is final for this step: retried or redelivered, the command gets
    the same answer without the handler running again.
    """

    def __init__(self, code: str, message: str = "") -> None:
        if not code or len(code) > 200:
            raise ValueError(f"a business error code has 1 to 200 characters, not {code!r}")
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class MalformedCommandError(InvalidInputError):
    """A message on a participant's queue that cannot be handled as a command."""

    def __init__(
        self,
        *,
        participant: str,
        task: str,
        message_id: str | None,
        problems: list[str],
        saga_id: Any = None,
        step: Any = None,
    ) -> None:
        about = ", ".join(
            f"{name} {value}" for name, value in (("saga", saga_id), ("step", step)) if value
        )
        super().__init__(
            f"participant '{participant}': malformed command message {message_id} for "
            f"'{task}'{f' ({about})' if about else ''}: {'; '.join(problems)}",
            participant=participant,
            task=task,
            message_id=message_id,
            saga_id=saga_id,
            step=step,
        )
        self.problems = problems
