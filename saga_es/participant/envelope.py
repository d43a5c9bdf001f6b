"""Reading a command out of a Celery task's arguments, naming everything that is wrong.

The wire contract (``saga_es.messaging``): no positional arguments, one keyword argument
``command`` holding a ``CommandMessage`` as JSON, and the task named like the command.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from saga_es.messages import CommandMessage
from saga_es.participant.errors import MalformedCommandError

__all__ = ["read_command"]


def read_command(
    *,
    participant: str,
    task: str,
    message_id: str | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> CommandMessage:
    """The command in a task's arguments; ``MalformedCommandError`` if there is none."""
    problems: list[str] = []
    if args:
        problems.append(f"{len(args)} positional argument(s); a command comes as kwargs only")
    extra = sorted(set(kwargs) - {"command"})
    if extra:
        problems.append(f"unexpected keyword argument(s) {', '.join(extra)}")
    raw = kwargs.get("command")
    about = raw if isinstance(raw, Mapping) else {}
    command: CommandMessage | None = None
    if raw is None:
        problems.append("no 'command' keyword argument")
    else:
        try:
            command = CommandMessage.model_validate(raw)
        except ValidationError as exc:
            problems.extend(
                f"field '{'.'.join(str(p) for p in err['loc']) or '(command)'}': {err['msg']}"
                for err in exc.errors()
            )
    if command is not None and command.command != task:
        problems.append(f"field 'command': '{command.command}' was delivered to task '{task}'")
    if problems:
        raise MalformedCommandError(
            participant=participant,
            task=task,
            message_id=message_id,
            problems=problems,
            saga_id=about.get("saga_id"),
            step=about.get("step"),
        )
    assert command is not None
    return command
