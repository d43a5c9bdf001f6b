"""Publishing commands to RabbitMQ, each batch confirmed by the broker at once.

The batch goes out on a channel in confirm mode and the relay waits once for the acks of all of
it (``saga_es.amqp_confirms``). Messages are persistent and published ``mandatory``: a message
the broker returns (its queue vanished) or nacks is simply tried again. Queues are declared
durable, exactly as a Celery worker declares them (``app.amqp.queues``), once per connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from celery import Celery
from kombu.connection import Connection
from kombu.exceptions import OperationalError as KombuOperationalError

from outbox_relay.celery_wire import DEFAULT_MAX_MESSAGE_BYTES, CeleryWire, WireMessage
from outbox_relay.errors import BrokerUnavailableError, MessageRejectedError
from outbox_relay.publisher import PublishResult
from saga_es.amqp_confirms import ConfirmingChannel
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
        self._channel: ConfirmingChannel | None = None
        self._declared: set[str] = set()
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
            sent: list[tuple[UUID, WireMessage]] = []
            for message_id, wire in ready:
                if wire.queue in refused_queues:
                    rejected[message_id] = refused_queues[wire.queue]
                else:
                    sent.append((message_id, wire))
            refusals = self._ready_channel().publish(
                [wire for _, wire in sent], self._confirm_timeout
            )
        except self._errors as exc:
            self._disconnect()
            raise BrokerUnavailableError(self.description, exc) from exc
        unconfirmed = {sent[index][0]: why for index, why in refusals.items()}
        if unconfirmed:
            self._declared.clear()  # a returned message means a queue is gone: declare again
        confirmed = frozenset(m for m, _ in sent if m not in unconfirmed)
        return PublishResult(confirmed, rejected, unconfirmed)

    def close(self) -> None:
        self._disconnect()

    # -- the channel --------------------------------------------------------------------------

    def _ready_channel(self) -> ConfirmingChannel:
        if self._conn is None:
            conn = _connection(self._url, connect_timeout=self._connect_timeout)
            # No retries in kombu (its connect() sleeps 2 s and tries again): the relay's
            # own backoff decides when to try again.
            conn.ensure_connection(max_retries=0)
            self._conn = conn
            self._declared.clear()
        if self._channel is None:
            self._channel = ConfirmingChannel(self._conn)
        return self._channel

    def _declare(self, queues: set[str]) -> dict[str, str]:
        """Declare the queues not declared on this connection yet. A queue the broker refuses
        (its name is reserved, it exists with other arguments, no permission) closes the
        channel: its rows are rejected, the channel reopened, the other queues go on."""
        refused: dict[str, str] = {}
        for name in sorted(queues - self._declared):
            channel = self._ready_channel().channel
            try:
                self._app.amqp.queues[name](channel).declare()
            except self._channel_errors as exc:
                refused[name] = f"queue {name!r} cannot be declared: {exc}"
                self._channel = None  # the broker closed it
                continue
            self._declared.add(name)
        self._ready_channel()
        return refused

    def _disconnect(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        self._declared.clear()
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a dead connection may fail; it is dropped either way
                conn.collect()


def _connection(url: str, **options: Any) -> Any:
    return Connection(url, **options)  # type: ignore[no-untyped-call]  # kombu is untyped here
