"""A Celery task message (protocol 2), for raw publishing.

The relay publishes commands this way and participants their replies: both need publisher
confirms without the per-message cost of Celery's producer (a copy of the message options, a
queue declaration check and a confirm wait per message; see ``outbox_relay.amqp_publisher`` and
``saga_es.participant.reply_publisher``). Any Celery worker consuming the queue runs the task
as if ``send_task`` had sent it.

The headers are the ones Celery's protocol 2 requires (``lang``, ``task``, ``id``, ``root_id``,
``parent_id``, ``group``) plus ``kwargsrepr`` and ``origin`` for workers' logs. ``send_task``
also writes a dozen optional ones holding their defaults (no ETA, no expiry, no time limit, no
retries yet...), which a worker reads as absent anyway. Each header costs encoding in Python on
the way out, decoding on the way in, and broker CPU in between: as AMQP tables they were most
of a message's size and about half of py-amqp's cost to publish one.
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
        """The message calling ``task(**kwargs)`` on ``queue``; whatever the serializer
        raises for arguments it cannot carry."""
        headers = {
            "lang": "py",
            "task": task,
            "id": task_id,
            "root_id": task_id,
            "parent_id": None,
            "group": None,
            # Celery's default saferepr costs ~0.4 ms per message; repr() cut to the same
            # bound gives workers the same log line.
            "kwargsrepr": kwargsrepr or _bounded_repr(kwargs, self._repr_max),
            "origin": self._origin,
        }
        body = ((), kwargs, _NO_WORKFLOW)
        content_type, content_encoding, payload = _dumps(body, self._serializer)
        if isinstance(payload, str):
            payload = payload.encode(content_encoding)
        properties = {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": _PERSISTENT,
            "priority": 0,
        }
        return WireMessage(queue, payload, content_type, content_encoding, headers, properties)


#: The third part of a protocol-2 body: no callbacks, errbacks, chain or chord.
_NO_WORKFLOW = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _bounded_repr(value: object, limit: int) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _dumps(body: Any, serializer: str) -> tuple[str, str, str | bytes]:
    encoded: tuple[str, str, str | bytes] = serialization.dumps(  # type: ignore[no-untyped-call]
        body, serializer=serializer
    )
    return encoded
