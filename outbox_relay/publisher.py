"""The publisher seam: hand a batch of commands to the broker and say which ones it holds.

Implementations: ``AmqpPublisher`` (RabbitMQ through py-amqp, one confirm wait per batch),
``SendTaskPublisher`` (Celery's own ``send_task``, for ``memory://`` and other transports) and
``InMemoryPublisher`` (the fake for unit tests).

``publish`` sends the commands in the order given, each as the Celery task named like the
command on the command's queue (``saga_es.messaging``), and returns:

* ``confirmed``: the broker has them (for RabbitMQ: confirmed, so persisted); these rows are
  marked published.
* ``rejected``: the message for this command cannot be built or sent as it is (too large, the
  serializer refuses it, the queue cannot be declared): counts toward parking the row.
* ``unconfirmed``: the broker refused or returned them for reasons that are not the row's
  (a nack, an unroutable return): they stay unpublished and are tried again later.

It raises ``BrokerUnavailableError`` when the broker cannot be reached or the connection dies
mid-batch; then nothing counts as confirmed (some messages may still have arrived: at least
once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from uuid import UUID

from outbox_relay.errors import BrokerUnavailableError
from saga_es.messages import CommandMessage

__all__ = ["InMemoryPublisher", "PublishResult", "Publisher"]


@dataclass(frozen=True)
class PublishResult:
    confirmed: frozenset[UUID] = frozenset()
    rejected: Mapping[UUID, str] = field(default_factory=dict)
    unconfirmed: Mapping[UUID, str] = field(default_factory=dict)


class Publisher(Protocol):
    description: str  # the broker, passwords redacted, for log lines

    def publish(self, commands: Sequence[CommandMessage]) -> PublishResult: ...

    def close(self) -> None: ...


class InMemoryPublisher:
    """Keeps what it publishes in ``sent``; can simulate an outage, rejections and nacks."""

    description = "memory"

    def __init__(self, *, reject: Callable[[CommandMessage], str | None] | None = None) -> None:
        self.sent: list[CommandMessage] = []
        self.unavailable = False
        self.reject = reject
        self.nack: set[UUID] = set()
        self.calls = 0

    def publish(self, commands: Sequence[CommandMessage]) -> PublishResult:
        self.calls += 1
        if self.unavailable:
            raise BrokerUnavailableError(self.description, "simulated outage")
        confirmed: set[UUID] = set()
        rejected: dict[UUID, str] = {}
        unconfirmed: dict[UUID, str] = {}
        for command in commands:
            reason = self.reject(command) if self.reject else None
            if reason is not None:
                rejected[command.message_id] = reason
            elif command.message_id in self.nack:
                unconfirmed[command.message_id] = "nacked by the broker"
            else:
                self.sent.append(command)
                confirmed.add(command.message_id)
        return PublishResult(frozenset(confirmed), rejected, unconfirmed)

    def close(self) -> None:
        pass
