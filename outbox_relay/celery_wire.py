"""A command as a Celery task message (protocol 2), built the way Celery builds it.

Headers and properties come from ``app.amqp.as_task_v2``, the function ``send_task`` itself
calls, and the body is serialised with the app's task serializer, so a plain Celery worker
consuming the queue runs the task named like the command with ``{"command": ...}`` as kwargs
and the outbox message id as task id (``saga_es.messaging``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.utils.nodenames import anon_nodename
from kombu import serialization

from outbox_relay.errors import MessageRejectedError
from saga_es.messages import CommandMessage
from saga_es.messaging import command_kwargs

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "CeleryWire", "WireMessage"]

#: RabbitMQ's default ``max_message_size``. A larger message makes the broker close the
#: channel, which would look like an outage forever; refusing it here parks just that row.
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024

_PERSISTENT = 2


@dataclass(frozen=True, slots=True)
class WireMessage:
    queue: str
    body: bytes
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    properties: dict[str, Any]  # correlation_id, reply_to, delivery_mode, priority


class CeleryWire:
    def __init__(self, app: Celery, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self._as_task = app.amqp.as_task_v2
        self._serializer: str = app.conf.task_serializer
        self._repr_max: int = app.amqp.kwargsrepr_maxsize
        self._max_bytes = max_message_bytes
        # Celery computes the origin node name per message; it is the same for every message.
        self._origin = anon_nodename()

    def encode(self, command: CommandMessage) -> WireMessage:
        """The message for ``command``, or ``MessageRejectedError`` saying why there can be none."""
        task_id = str(command.message_id)
        kwargs = command_kwargs(command)
        try:
            message = self._as_task(
                task_id,
                command.command,
                kwargs=kwargs,
                origin=self._origin,
                # Celery's default saferepr costs ~0.4 ms per message, most of the relay's
                # CPU time; repr() cut to the same bound gives workers the same log line.
                argsrepr="()",
                kwargsrepr=_bounded_repr(kwargs, self._repr_max),
            )
            content_type, content_encoding, body = _dumps(message.body, self._serializer)
            if isinstance(body, str):
                body = body.encode(content_encoding)
        except Exception as exc:  # any refusal by Celery or the serializer is about this row
            raise MessageRejectedError(
                command.message_id, f"the serializer rejected it: {type(exc).__name__}: {exc}"
            ) from exc
        if len(body) > self._max_bytes:
            raise MessageRejectedError(
                command.message_id,
                f"message of {len(body)} bytes exceeds the limit of {self._max_bytes} bytes",
            )
        properties = {**message.properties, "delivery_mode": _PERSISTENT, "priority": 0}
        return WireMessage(
            command.queue, body, content_type, content_encoding, message.headers, properties
        )


def _bounded_repr(value: object, limit: int) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _dumps(body: Any, serializer: str) -> tuple[str, str, str | bytes]:
    encoded: tuple[str, str, str | bytes] = serialization.dumps(  # type: ignore[no-untyped-call]
        body, serializer=serializer
    )
    return encoded
