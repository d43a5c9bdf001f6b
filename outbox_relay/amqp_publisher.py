"""Publishing to RabbitMQ with publisher confirms, one wait per batch.

py-amqp's ``confirm_publish`` transport option (what ``saga_es.messaging.celery_app`` sets for
Celery's own producers) waits for the broker's ack after every single message: one round trip
and one disk sync on the broker per message. Here the channel is put in confirm mode once
(``confirm_select``), the whole batch is written, and then the relay waits once for the acks
covering every delivery tag. RabbitMQ numbers a confirm-mode channel's publishes 1, 2, 3... and
acks them singly or with ``multiple=True`` (every tag up to this one), in any grouping.

Messages are persistent and published ``mandatory``: should a queue vanish between its
declaration and the publish, the broker returns the message (before acking it) instead of
dropping it, and the row is simply tried again. Queues are declared durable, exactly as a
Celery worker declares them (``app.amqp.queues``), once per connection.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from celery import Celery
from kombu.connection import Connection
from kombu.exceptions import OperationalError as KombuOperationalError

from outbox_relay.celery_wire import DEFAULT_MAX_MESSAGE_BYTES, CeleryWire, WireMessage
from outbox_relay.errors import BrokerUnavailableError, MessageRejectedError
from outbox_relay.publisher import PublishResult
from saga_es.messages import CommandMessage
from saga_es.messaging import celery_app

__all__ = ["AmqpPublisher"]


class AmqpPublisher:
    def __init__(
        self,
        broker_url: str,
        *,
        app: Celery | None = None,
        confirm_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._app = app or celery_app(broker_url)
        self._wire = CeleryWire(self._app, max_message_bytes=max_message_bytes)
        self._url = broker_url
        self._confirm_timeout = confirm_timeout
        self._connect_timeout = connect_timeout
        self._conn: Any = None  # kombu.Connection
        self._channel: Any = None  # kombu's pyamqp Channel, in confirm mode
        self._declared: set[str] = set()
        # Per channel: the tag of the last publish, and the tags still awaiting an ack.
        self._last_tag = 0
        self._pending: dict[int, UUID] = {}
        self._floor = 1  # every tag below this one is settled
        self._nacked: set[UUID] = set()
        self._returned: set[str] = set()
        probe = _connection(broker_url)
        self.description: str = probe.as_uri()  # the password masked
        self._channel_errors: tuple[type[BaseException], ...] = probe.channel_errors
        self._errors: tuple[type[BaseException], ...] = (
            probe.connection_errors + probe.channel_errors + (TimeoutError, KombuOperationalError)
        )

    def publish(self, commands: Sequence[CommandMessage]) -> PublishResult:
        rejected: dict[UUID, str] = {}
        ready: list[tuple[UUID, WireMessage]] = []
        for command in commands:
            try:
                ready.append((command.message_id, self._wire.encode(command)))
            except MessageRejectedError as exc:
                rejected[command.message_id] = exc.reason
        if not ready:
            return PublishResult(rejected=rejected)
        try:
            refused_queues = self._declare({wire.queue for _, wire in ready})
            sent: list[UUID] = []
            for message_id, wire in ready:
                if wire.queue in refused_queues:
                    rejected[message_id] = refused_queues[wire.queue]
                    continue
                self._send(message_id, wire)
                sent.append(message_id)
            self._await_confirms()
        except self._errors as exc:
            self._disconnect()
            raise BrokerUnavailableError(self.description, exc) from exc
        unconfirmed = {m: "nacked by the broker" for m in sent if m in self._nacked}
        for m in sent:
            if str(m) in self._returned:
                unconfirmed[m] = "returned by the broker as unroutable"
        if unconfirmed:
            self._declared.clear()  # a returned message means a queue is gone: declare again
        self._nacked.clear()
        self._returned.clear()
        confirmed = frozenset(m for m in sent if m not in unconfirmed)
        return PublishResult(confirmed, rejected, unconfirmed)

    def close(self) -> None:
        self._disconnect()

    # -- the channel --------------------------------------------------------------------------

    def _ready_channel(self) -> Any:
        if self._conn is None:
            conn = _connection(self._url, connect_timeout=self._connect_timeout)
            # No retries in kombu (its connect() sleeps 2 s and tries again): the relay's
            # own backoff decides when to try again.
            conn.ensure_connection(max_retries=0)
            self._conn = conn
            self._declared.clear()
        if self._channel is None:
            channel = self._conn.channel()
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
            self._channel = channel
            self._last_tag, self._floor = 0, 1
            self._pending.clear()
        return self._channel

    def _declare(self, queues: set[str]) -> dict[str, str]:
        """Declare the queues not declared on this connection yet. A queue the broker refuses
        (its name is reserved, it exists with other arguments, no permission) closes the
        channel: its rows are rejected, the channel reopened, the other queues go on."""
        refused: dict[str, str] = {}
        for name in sorted(queues - self._declared):
            channel = self._ready_channel()
            try:
                self._app.amqp.queues[name](channel).declare()
            except self._channel_errors as exc:
                refused[name] = f"queue {name!r} cannot be declared: {exc}"
                self._channel = None  # the broker closed it
                continue
            self._declared.add(name)
        self._ready_channel()
        return refused

    def _send(self, message_id: UUID, wire: WireMessage) -> None:
        properties = dict(wire.properties)
        message = self._channel.prepare_message(
            wire.body,
            properties.pop("priority"),
            wire.content_type,
            wire.content_encoding,
            wire.headers,
            properties,
        )
        self._last_tag += 1
        self._pending[self._last_tag] = message_id
        # The default exchange routes by queue name, as Celery's send_task does for a queue
        # on a direct exchange.
        self._channel.basic_publish(message, exchange="", routing_key=wire.queue, mandatory=True)

    def _await_confirms(self) -> None:
        deadline = time.monotonic() + self._confirm_timeout
        while self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Late acks would be attributed to the wrong batch: drop the connection.
                raise TimeoutError(f"no confirm within {self._confirm_timeout}s")
            self._conn.drain_events(timeout=remaining)

    # -- confirm callbacks (run inside drain_events) ------------------------------------------

    def _settle(self, delivery_tag: int, multiple: bool) -> list[UUID]:
        if not multiple:
            settled = self._pending.pop(delivery_tag, None)
            return [settled] if settled is not None else []
        ids = [m for t in range(self._floor, delivery_tag + 1) if (m := self._pending.pop(t, None))]
        self._floor = max(self._floor, delivery_tag + 1)
        return ids

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._nacked.update(self._settle(delivery_tag, multiple))

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self._returned.add(str(message.properties.get("correlation_id")))

    def _disconnect(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        self._pending.clear()
        self._nacked.clear()
        self._returned.clear()
        self._declared.clear()
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a dead connection may fail; it is dropped either way
                conn.collect()


def _connection(url: str, **options: Any) -> Any:
    return Connection(url, **options)  # type: ignore[no-untyped-call]  # kombu is untyped here
