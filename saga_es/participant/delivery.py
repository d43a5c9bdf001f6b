"""What a handler may want to know about the delivery it runs in, without importing Celery.

``current_delivery()`` is set while a participant's worker runs a handler: which Celery task
(the command's message id), how many transient failures came before this run, and whether the
broker redelivered the message (a worker died holding it). It is ``None`` when a handler runs
through ``Participant.process`` directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["Delivery", "current_delivery", "delivering"]


@dataclass(frozen=True)
class Delivery:
    task_id: str
    retries: int  # transient failures (Celery retries) before this run; 0 on the first
    redelivered: bool


_current: ContextVar[Delivery | None] = ContextVar("saga_es_participant_delivery", default=None)


def current_delivery() -> Delivery | None:
    return _current.get()


@contextmanager
def delivering(delivery: Delivery) -> Iterator[Delivery]:
    token = _current.set(delivery)
    try:
        yield delivery
    finally:
        _current.reset(token)
