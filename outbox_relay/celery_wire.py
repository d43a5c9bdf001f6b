"""A command as a Celery task message: the task named like the command, on the step's queue,
with the outbox message id as task id and ``{"command": ...}`` as kwargs (``saga_es.messaging``).
A command that cannot be one (the serializer refuses it, or it is too large for the broker) is
refused here, so that only its own row is parked.
"""

from __future__ import annotations

from celery import Celery

from outbox_relay.errors import MessageRejectedError
from saga_es.messages import CommandMessage
from saga_es.messaging import command_kwargs
from saga_es.wire import TaskWire, WireMessage

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "CeleryWire", "WireMessage"]

#: RabbitMQ's default ``max_message_size``. A larger message makes the broker close the
#: channel, which would look like an outage forever; refusing it here parks just that row.
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024


class CeleryWire:
    def __init__(self, app: Celery, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self._wire = TaskWire(app)
        self._max_bytes = max_message_bytes

    def encode(self, command: CommandMessage) -> WireMessage:
        """The message for ``command``, or ``MessageRejectedError`` saying why there can be none."""
        try:
            message = self._wire.encode(
                task=command.command,
                task_id=str(command.message_id),
                kwargs=command_kwargs(command),
                queue=command.queue,
            )
        except Exception as exc:  # any refusal by Celery or the serializer is about this row
            raise MessageRejectedError(
                command.message_id, f"the serializer rejected it: {type(exc).__name__}: {exc}"
            ) from exc
        if len(message.body) > self._max_bytes:
            raise MessageRejectedError(
                command.message_id,
                f"message of {len(message.body)} bytes exceeds the limit of "
                f"{self._max_bytes} bytes",
            )
        return message
