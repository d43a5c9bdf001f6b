"""A Celery task message (protocol 2), built the way Celery builds it, for raw publishing.

Headers and properties come from ``app.amqp.as_task_v2``, the function ``send_task`` itself
calls, and the body is serialised with the app's task serializer, so a plain Celery worker
consuming the queue runs the task as if ``send_task`` had sent it. The relay publishes commands
this way and participants their replies: both need publisher confirms without the per-message
cost of Celery's producer (a copy of the message options, a queue declaration check and a
confirm wait per message; see ``outbox_relay.amqp_publisher`` and
``saga_es.participant.reply_publisher``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.utils.nodenames import anon_nodename
from kombu import serialization

__all__ = ["TaskWire", "WireMessage"]

_PERSISTENT = 2


@dataclass(frozen=True, slots=True)
class WireMessage:
    queue: str
    body: bytes
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    properties: dict[str, Any]  # correlation_id, reply_to, delivery_mode, priority

    def prepare(self, channel: Any) -> Any:
        """The py-amqp message to ``basic_publish`` on ``channel``."""
        properties = dict(self.properties)
        return channel.prepare_message(
            self.body,
            properties.pop("priority"),
            self.content_type,
            self.content_encoding,
            self.headers,
            properties,
        )


class TaskWire:
    """Encodes task calls for one Celery app (its serializer and its log bounds)."""

    def __init__(self, app: Celery) -> None:
        self._as_task = app.amqp.as_task_v2
        self._serializer: str = app.conf.task_serializer
        self._repr_max: int = app.amqp.kwargsrepr_maxsize
        # Celery computes the origin node name per message; it is the same for every message.
        self._origin = anon_nodename()

    def encode(
        self,
        *,
        task: str,
        task_id: str,
        kwargs: dict[str, Any],
        queue: str,
        kwargsrepr: str | None = None,
    ) -> WireMessage:
        """The message calling ``task(**kwargs)`` on ``queue``; whatever Celery or the
        serializer raise for arguments they cannot carry."""
        message = self._as_task(
            task_id,
            task,
            kwargs=kwargs,
            origin=self._origin,
            # Celery's default saferepr costs ~0.4 ms per message; repr() cut to the same
            # bound gives workers the same log line.
            argsrepr="()",
            kwargsrepr=kwargsrepr or _bounded_repr(kwargs, self._repr_max),
        )
        content_type, content_encoding, body = _dumps(message.body, self._serializer)
        if isinstance(body, str):
            body = body.encode(content_encoding)
        properties = {**message.properties, "delivery_mode": _PERSISTENT, "priority": 0}
        return WireMessage(queue, body, content_type, content_encoding, message.headers, properties)


def _bounded_repr(value: object, limit: int) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _dumps(body: Any, serializer: str) -> tuple[str, str, str | bytes]:
    encoded: tuple[str, str, str | bytes] = serialization.dumps(  # type: ignore[no-untyped-call]
        body, serializer=serializer
    )
    return encoded
