"""Running a relay process: pick the source and publisher from the URLs, stop on signals.

    run_relay("postgresql://...?schema=app", "amqp://guest:guest@rabbit//", batch_size=500)

The first SIGTERM or SIGINT asks the relay to stop: it finishes the batch in hand (publish,
mark, commit) and ``run_relay`` returns, so the process exits 0. A second one stops at once;
the batch in hand rolls back and is published again by the next relay (at least once).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from celery import Celery

from outbox_relay.amqp_publisher import AmqpPublisher
from outbox_relay.celery_wire import DEFAULT_MAX_MESSAGE_BYTES
from outbox_relay.postgres_source import PostgresOutboxSource
from outbox_relay.publisher import Publisher
from outbox_relay.relay import AfterPublish, OnParked, Relay
from outbox_relay.send_task_publisher import SendTaskPublisher
from outbox_relay.source import OutboxSource
from outbox_relay.sqlite_source import SQLiteOutboxSource
from saga_es.messaging import resolve_broker_url
from saga_es.persistence.settings import DatabaseSettings
from saga_es.signals import stop_on_signals

__all__ = ["open_publisher", "open_source", "parse_retention", "run_relay"]

log = logging.getLogger("outbox_relay")

_AMQP_SCHEMES = {"amqp", "amqps", "pyamqp"}


def open_source(database_url: str | None = None) -> OutboxSource:
    settings = DatabaseSettings.resolve(database_url)
    if settings.backend == "postgres":
        return PostgresOutboxSource(settings)
    return SQLiteOutboxSource(settings)


def open_publisher(
    broker_url: str | None = None,
    *,
    app: Celery | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Publisher:
    """RabbitMQ gets batched confirms; other transports (``memory://``...) Celery's producer."""
    url = resolve_broker_url(broker_url)
    if urlsplit(url).scheme in _AMQP_SCHEMES:
        return AmqpPublisher(url, app=app, max_message_bytes=max_message_bytes)
    return SendTaskPublisher(url, app=app)


def run_relay(
    database_url: str | None = None,
    broker_url: str | None = None,
    *,
    batch_size: int = 500,
    poll_interval: float = 1.0,
    retention: timedelta | None = timedelta(days=7),
    on_parked: OnParked = "block",
    max_attempts: int = 5,
    allowed_queues: Collection[str] | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    after_publish: AfterPublish | None = None,
    **relay_options: Any,
) -> Relay:
    """Run a relay until SIGTERM/SIGINT (when called from the main thread); returns it."""
    source = open_source(database_url)
    try:
        publisher = open_publisher(broker_url, max_message_bytes=max_message_bytes)
    except BaseException:
        source.close()
        raise
    relay = Relay(
        source,
        publisher,
        batch_size=batch_size,
        poll_interval=poll_interval,
        retention=retention,
        on_parked=on_parked,
        max_attempts=max_attempts,
        allowed_queues=allowed_queues,
        after_publish=after_publish,
        **relay_options,
    )
    try:
        with stop_on_signals(
            relay.stop,
            stopping=lambda: relay.stopping,
            log=log,
            graceful="stopping once the batch in hand is published and marked",
            abrupt="stopping now, the batch in hand rolls back",
        ):
            relay.run()
    finally:
        publisher.close()
        source.close()
    return relay


def parse_retention(text: str) -> timedelta | None:
    """``30m``, ``12h``, ``7d``, ``3600s`` (or ``3600``: seconds); ``off`` keeps rows forever."""
    text = text.strip().lower()
    if text in ("off", "none", "forever"):
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"{text!r}: expected a duration such as 30m, 12h or 7d, or off") from None
    if seconds <= 0:
        raise ValueError(f"{text!r}: must be positive (use off to keep rows forever)")
    return timedelta(seconds=seconds)
