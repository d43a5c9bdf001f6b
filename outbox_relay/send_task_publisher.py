"""Publishing through Celery's own ``send_task``: for transports other than AMQP.

The embedded setup runs the relay and a worker in one process over ``memory://``, where a
message is in the queue as soon as ``send_task`` returns. On other transports this gives the
guarantee Celery's producer gives on them, no more (RabbitMQ gets ``AmqpPublisher``).
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from celery import Celery
from kombu.exceptions import EncodeError
from kombu.exceptions import OperationalError as KombuOperationalError

from outbox_relay.errors import BrokerUnavailableError
from outbox_relay.publisher import PublishResult
from saga_es.messages import CommandMessage
from saga_es.messaging import celery_app, command_kwargs

__all__ = ["SendTaskPublisher"]


class SendTaskPublisher:
    def __init__(self, broker_url: str | None = None, *, app: Celery | None = None) -> None:
        self._owns_app = app is None
        self._app = app or celery_app(broker_url)
        connection = self._app.connection_for_write()
        self.description: str = connection.as_uri()
        self._errors: tuple[type[BaseException], ...] = (
            *connection.connection_errors,
            *connection.channel_errors,
            KombuOperationalError,
        )

    def publish(self, commands: Sequence[CommandMessage]) -> PublishResult:
        confirmed: set[UUID] = set()
        rejected: dict[UUID, str] = {}
        try:
            with self._app.producer_or_acquire() as producer:
                for command in commands:
                    try:
                        self._app.send_task(
                            command.command,
                            kwargs=command_kwargs(command),
                            task_id=str(command.message_id),
                            queue=command.queue,
                            producer=producer,
                            retry=False,  # the relay's backoff decides when to try again
                        )
                    except EncodeError as exc:
                        rejected[command.message_id] = f"the serializer rejected it: {exc}"
                        continue
                    confirmed.add(command.message_id)
        except self._errors as exc:
            raise BrokerUnavailableError(self.description, exc) from exc
        return PublishResult(frozenset(confirmed), rejected)

    def close(self) -> None:
        if self._owns_app:  # an app passed in may be serving a worker in this process too
            self._app.close()
