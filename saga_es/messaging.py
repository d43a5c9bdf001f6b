"""How commands and replies travel: one Celery configuration, task names, queues, envelopes.

Commands: the Celery task named like the command (``"payment.charge"``), on the step's queue,
with the outbox message id as task id and ``{"command": <CommandMessage as JSON>}`` as kwargs.
Replies: the task ``saga_es.reply`` on queue ``saga_es.replies``, with the reply's message id
as task id and ``{"reply": <ReplyMessage as JSON>}`` as kwargs.

Every process (relay, engine worker, participants) builds its Celery app with ``celery_app``
so that they agree on serialisation (JSON only), durability and acknowledgement: messages are
persistent, publishing waits for broker confirms, and tasks are acknowledged only after they
ran (``acks_late``), so a worker killed mid-task has its message redelivered.
"""

from __future__ import annotations

import os
from typing import Any
from uuid import UUID, uuid5

from celery import Celery

from saga_es.messages import CommandMessage, ReplyMessage

__all__ = [
    "BROKER_URL_ENV",
    "DEFAULT_BROKER_URL",
    "REPLY_QUEUE",
    "REPLY_TASK",
    "celery_app",
    "command_kwargs",
    "reply_id_for",
    "reply_kwargs",
    "resolve_broker_url",
    "transport_options",
]

BROKER_URL_ENV = "SAGA_ES_BROKER_URL"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
REPLY_TASK = "saga_es.reply"
REPLY_QUEUE = "saga_es.replies"


def resolve_broker_url(url: str | None = None) -> str:
    return url or os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL


def celery_app(broker_url: str | None = None, *, name: str = "saga_es") -> Celery:
    url = resolve_broker_url(broker_url)
    app = Celery(name, broker=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_default_delivery_mode="persistent",
        task_create_missing_queues=True,
        task_default_queue=REPLY_QUEUE,
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options(url),
    )
    return app


def transport_options(url: str) -> dict[str, Any]:
    """kombu transport options for a broker URL, for Celery apps and plain kombu alike."""
    if url.startswith("amqp"):
        return {"confirm_publish": True}
    if url.startswith("memory"):
        # The in-process broker is polled (kombu's default: once a second); polling it is
        # nearly free, and the embedded demo should not wait a second at every step.
        return {"polling_interval": 0.01}
    return {}


def command_kwargs(command: CommandMessage) -> dict[str, Any]:
    return {"command": command.model_dump(mode="json")}


def reply_kwargs(reply: ReplyMessage) -> dict[str, Any]:
    return {"reply": reply.model_dump(mode="json")}


def reply_id_for(command: CommandMessage) -> UUID:
    """A participant's reply to a command always has the same id, however often it is sent,
    so the engine's inbox absorbs the repeats."""
    return uuid5(command.message_id, "reply")
