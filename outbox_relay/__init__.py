"""Publishes committed outbox rows through Celery: the outbox relay.

    from outbox_relay import run_relay
    run_relay("postgresql://root@127.0.0.1/app", "amqp://guest:guest@127.0.0.1//")

or ``saga-es relay``. The pieces, each replaceable in tests: an ``OutboxSource`` (PostgreSQL,
SQLite, in memory) to claim and mark rows, a ``Publisher`` (RabbitMQ with batched confirms,
Celery's ``send_task``, in memory) to send them, and the ``Relay`` loop between the two.
"""

from outbox_relay.amqp_publisher import AmqpPublisher
from outbox_relay.errors import (
    BrokerUnavailableError,
    MessageRejectedError,
    RelayConfigurationError,
    RelayError,
    SourceUnavailableError,
    UnavailableError,
)
from outbox_relay.memory_source import InMemoryOutboxSource
from outbox_relay.postgres_source import PostgresOutboxSource
from outbox_relay.publisher import InMemoryPublisher, Publisher, PublishResult
from outbox_relay.relay import BatchReport, OnParked, Relay
from outbox_relay.rows import OutboxRow, ParkedRow
from outbox_relay.runner import open_publisher, open_source, run_relay
from outbox_relay.send_task_publisher import SendTaskPublisher
from outbox_relay.source import ClaimedBatch, OutboxSource
from outbox_relay.sqlite_source import SQLiteOutboxSource

__all__ = [
    "AmqpPublisher",
    "BatchReport",
    "BrokerUnavailableError",
    "ClaimedBatch",
    "InMemoryOutboxSource",
    "InMemoryPublisher",
    "MessageRejectedError",
    "OnParked",
    "OutboxRow",
    "OutboxSource",
    "ParkedRow",
    "PostgresOutboxSource",
    "PublishResult",
    "Publisher",
    "Relay",
    "RelayConfigurationError",
    "RelayError",
    "SQLiteOutboxSource",
    "SendTaskPublisher",
    "SourceUnavailableError",
    "UnavailableError",
    "open_publisher",
    "open_source",
    "run_relay",
]
