"""Talking to the test RabbitMQ vhost as the relay and the engine would: publish commands and
replies on the wire contract, read the replies participants send, empty queues between tests."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from amqp.exceptions import NotFound
from celery import Celery
from kombu import Connection, Consumer, Exchange, Queue

from saga_es.messages import CommandMessage, ReplyMessage
from saga_es.messaging import (
    REPLY_QUEUE,
    REPLY_TASK,
    celery_app,
    command_kwargs,
    reply_kwargs,
)

SERVICE_QUEUES = ("inventory", "payment", "shipping", "notification")
_apps: dict[str, Celery] = {}


def app(broker_url: str) -> Celery:
    if broker_url not in _apps:
        _apps[broker_url] = celery_app(broker_url)
    return _apps[broker_url]


def publish_command(broker_url: str, command: CommandMessage) -> None:
    """What the outbox relay does with an outbox row."""
    app(broker_url).send_task(
        command.command,
        kwargs=command_kwargs(command),
        task_id=str(command.message_id),
        queue=command.queue,
    )


def publish_reply(broker_url: str, reply: ReplyMessage) -> None:
    publish_raw(broker_url, REPLY_TASK, reply_kwargs(reply), REPLY_QUEUE, str(reply.message_id))


def publish_raw(
    broker_url: str, task: str, kwargs: dict[str, Any], queue: str, task_id: str
) -> None:
    app(broker_url).send_task(task, kwargs=kwargs, task_id=task_id, queue=queue)


def purge(broker_url: str, *queues: str) -> None:
    """Empty ``queues`` (those that exist): what an earlier test left must not leak in."""
    with Connection(broker_url) as connection:
        for name in queues:
            channel = connection.channel()  # a 404 closes the channel: one per queue
            with contextlib.suppress(NotFound):  # never declared: nothing to purge
                channel.queue_purge(name)


def collect_replies(broker_url: str, count: int, *, timeout: float = 60.0) -> list[ReplyMessage]:
    """Take ``count`` replies off the reply queue (no engine worker runs), in arrival order."""
    queue = Queue(REPLY_QUEUE, Exchange(REPLY_QUEUE, type="direct"), routing_key=REPLY_QUEUE)
    found: list[ReplyMessage] = []

    def take(body: Any, message: Any) -> None:
        assert message.headers["task"] == REPLY_TASK, message.headers
        _args, kwargs, _embed = body
        reply = ReplyMessage.model_validate(kwargs["reply"])
        assert message.headers["id"] == str(reply.message_id)
        found.append(reply)
        message.ack()

    deadline = time.monotonic() + timeout
    with (
        Connection(broker_url) as connection,
        Consumer(connection, [queue], callbacks=[take], accept=["json"], prefetch_count=1),
    ):
        while len(found) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timed out after {timeout:.0f}s: {len(found)} of {count} replies: {found}"
                )
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=min(left, 1.0))
    return found
