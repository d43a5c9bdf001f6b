"""What every example service shares: settings from the environment, the Celery app, and the
participant class that obeys the fault switches."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from examples.order_fulfillment.faults import holding_reply
from saga_es.messages import CommandMessage, ReplyMessage
from saga_es.messaging import celery_app
from saga_es.participant import Participant

__all__ = ["QUEUES", "Settings", "app", "participant", "settings"]

DATABASE_URL_ENV = "SAGA_ES_EXAMPLES_DATABASE_URL"
DEFAULT_DATABASE_URL = "sqlite:///saga-es-examples.db"
QUEUES = ("inventory", "payment", "shipping", "notification")


@dataclass(frozen=True)
class Settings:
    database_url: str
    max_retries: int  # transient failures retried per command before a retryable failure
    backoff: float  # seconds before the first of those retries, doubling

    @classmethod
    def from_environment(cls) -> Settings:
        return cls(
            database_url=os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL,
            max_retries=int(os.environ.get("SAGA_ES_EXAMPLES_MAX_RETRIES", "5")),
            backoff=float(os.environ.get("SAGA_ES_EXAMPLES_BACKOFF", "1.0")),
        )


settings = Settings.from_environment()
app = celery_app(name="order-fulfillment")
# Without -Q a worker consumes every service's queue (never the engine's reply queue, the
# default of celery_app, whose messages it could not handle).
app.conf.task_queues = {q: {"exchange": q, "routing_key": q} for q in QUEUES}


class ExampleParticipant(Participant):
    """A participant whose reply can be held back after the commit by a ``hold_reply``
    switch: the window in which a crash leaves a committed effect without a reply."""

    def send_reply(self, command: CommandMessage, reply: ReplyMessage) -> None:
        while holding_reply(self.sessions, command):
            time.sleep(0.2)
        super().send_reply(command, reply)


def participant(name: str) -> Participant:
    return ExampleParticipant(name, database_url=settings.database_url, celery=app)
