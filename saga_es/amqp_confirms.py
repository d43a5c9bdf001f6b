"""Publishing a batch of messages to RabbitMQ and waiting once for the broker's confirms.

py-amqp's ``confirm_publish`` transport option (what ``saga_es.messaging.celery_app`` sets for
Celery's own producers) waits for the broker's ack after every single message: a round trip per
message, and for persistent messages a disk sync and about four times the broker CPU of a
message confirmed in a batch. Here the channel is put in confirm mode once, a batch is written,
and then the publisher waits once for the acks covering every delivery tag. RabbitMQ numbers a
confirm-mode channel's publishes 1, 2, 3... and acks them singly or with ``multiple=True``
(every tag up to this one), in any grouping.

Messages are published ``mandatory``: should a queue vanish between its declaration and the
publish, the broker returns the message (before acking it) instead of dropping it, and the
caller learns that this message was not delivered.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from saga_es.wire import WireMessage

__all__ = ["ConfirmingChannel"]


class ConfirmingChannel:
    """A channel of a py-amqp (kombu) connection, in confirm mode. Not thread-safe: one user
    at a time, and the connection's events are drained only by that user."""

    def __init__(self, connection: Any) -> None:
        """``connection``: a kombu connection opened without the ``confirm_publish``
        transport option (py-amqp would then wait for each message's ack by itself)."""
        self._connection = connection
        self.channel: Any = connection.channel()
        self.channel.confirm_select()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)
        self._last_tag = 0
        self._floor = 1  # every tag below this one is settled
        self._pending: dict[int, int] = {}  # delivery tag -> index in the batch
        self._refused: dict[int, str] = {}  # index in the batch -> why
        self._returned_ids: dict[str, int] = {}  # correlation id -> index in the batch

    def publish(self, messages: Sequence[WireMessage], timeout: float) -> dict[int, str]:
        """Publish ``messages`` and wait for their confirms; the ones the broker did not take,
        by index, with the reason. Raises ``TimeoutError`` (and whatever the connection
        raises): the channel is unusable afterwards, since late acks would be attributed to
        the wrong batch."""
        self._refused = {}
        self._returned_ids = {}
        for index, message in enumerate(messages):
            self._last_tag += 1
            self._pending[self._last_tag] = index
            correlation_id = message.properties.get("correlation_id")
            if correlation_id is not None:
                self._returned_ids[str(correlation_id)] = index
            # The default exchange routes by queue name, as Celery's send_task does for a
            # queue on a direct exchange.
            self.channel.basic_publish(
                message.prepare(self.channel),
                exchange="",
                routing_key=message.queue,
                mandatory=True,
            )
        deadline = time.monotonic() + timeout
        while self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no broker confirm within {timeout}s")
            self._connection.drain_events(timeout=remaining)
        return self._refused

    # -- confirm callbacks (run inside drain_events) ------------------------------------------

    def _settle(self, delivery_tag: int, multiple: bool) -> list[int]:
        if not multiple:
            settled = self._pending.pop(delivery_tag, None)
            return [settled] if settled is not None else []
        popped = (self._pending.pop(t, None) for t in range(self._floor, delivery_tag + 1))
        indexes = [i for i in popped if i is not None]
        self._floor = max(self._floor, delivery_tag + 1)
        return indexes

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        for index in self._settle(delivery_tag, multiple):
            self._refused.setdefault(index, "nacked by the broker")

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        index = self._returned_ids.get(str(message.properties.get("correlation_id")))
        if index is not None:
            self._refused[index] = "returned by the broker as unroutable"
