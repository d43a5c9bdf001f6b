"""The engine worker: consumes ``saga_es.replies`` and feeds each reply to its saga.

    saga-es worker --database-url postgresql://... --definitions shop.sagas:order
    celery -A saga_es.worker worker -Q saga_es.replies     # configured by environment

``saga-es worker`` drains the queue in batches (``saga_es.reply_consumer``, one transaction
per batch, through ``EngineWorker.handle_batch``); the Celery task below handles one reply per
transaction, for deployments that want a plain Celery worker (and for the embedded demo).

Per reply (the task ``saga_es.reply``, kwargs ``{"reply": ReplyMessage JSON}``):

* handled: ``SagaEngine.handle_reply`` commits the saga's events, its outbox rows and the
  reply's inbox row together. A redelivered reply hits the inbox and changes nothing, so
  Celery's at-least-once delivery is enough.
* unusable (malformed, unknown saga, unknown command, unknown definition): logged as one clear
  error and kept in ``saga_dead_letters`` with the reason, then acknowledged. Retrying would
  not make it usable, and requeueing it forever would block nothing but waste everything.
* the database failed (``StoreError``) or the saga kept losing races (``ConcurrencyError``):
  retried later with capped exponential backoff, without limit, so a reply is never lost
  to an outage.

Configuration from the environment (used by ``celery -A saga_es.worker``):
``SAGA_ES_DATABASE_URL``, ``SAGA_ES_BROKER_URL`` and ``SAGA_ES_DEFINITIONS``
(``module:attribute`` of each definition, comma-separated; default the demo order saga).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery
from eventsourcing.persistence import PersistenceError

from saga_es.backoff import exponential_delay
from saga_es.definition import SagaDefinition
from saga_es.engine import Outcome, SagaEngine
from saga_es.errors import ConcurrencyError, MalformedReplyError, SagaError, StoreError
from saga_es.messages import ReplyMessage, parse_reply
from saga_es.messaging import REPLY_TASK, celery_app

__all__ = [
    "DEFAULT_DEFINITIONS",
    "DEFINITIONS_ENV",
    "Delivery",
    "EngineWorker",
    "load_definitions",
]

log = logging.getLogger("saga_es.worker")

DEFINITIONS_ENV = "SAGA_ES_DEFINITIONS"
DEFAULT_DEFINITIONS = "saga_es.demo.order_saga:order_fulfillment"
DEAD_LETTER_SOURCE = "engine-worker"

# What "try again later" means: the database or the saga's version race, not the message.
_TRANSIENT = (StoreError, ConcurrencyError, PersistenceError)


@dataclass(frozen=True)
class Delivery:
    """One delivery of the reply task: its task id and call, or what makes it unusable."""

    message_id: str | None
    args: Sequence[Any]
    kwargs: Mapping[str, Any]
    problem: str | None = None


def load_definitions(spec: str) -> list[SagaDefinition]:
    """``"module:attribute,module:attribute"`` to the definitions they name.

    An attribute may also be a list or tuple of definitions (every version of a saga).
    """
    found: list[SagaDefinition] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        module_name, _, attribute = item.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"definition {item!r}: expected module:attribute")
        try:
            value = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"definition {item!r}: {exc}") from exc
        values = value if isinstance(value, list | tuple) else [value]
        for definition in values:
            if not isinstance(definition, SagaDefinition):
                raise ValueError(
                    f"definition {item!r} is a {type(definition).__name__}, not a saga definition"
                )
            found.append(definition)
    if not found:
        raise ValueError(f"no saga definitions in {spec!r}")
    return found


class EngineWorker:
    """A Celery app whose one task, ``saga_es.reply``, feeds replies to a ``SagaEngine``.

    definitions: every definition (and version) whose sagas may get replies here.
    database_url: the engine's database (default ``$SAGA_ES_DATABASE_URL``).
    broker_url / celery: the broker, or a ready app built with ``celery_app``.
    backoff / backoff_max: seconds before the first retry after a database failure (1.0),
        doubling up to ``backoff_max`` (60.0), jittered.
    """

    def __init__(
        self,
        definitions: Sequence[SagaDefinition],
        *,
        database_url: str | None = None,
        broker_url: str | None = None,
        celery: Celery | None = None,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
    ) -> None:
        self.definitions = list(definitions)
        self.database_url = database_url
        self.backoff, self.backoff_max = backoff, backoff_max
        self.celery = celery if celery is not None else celery_app(broker_url)
        self._engine: SagaEngine | None = None
        self._pid = 0
        self._register()

    @classmethod
    def from_environment(cls) -> EngineWorker:
        spec = os.environ.get(DEFINITIONS_ENV) or DEFAULT_DEFINITIONS
        return cls(load_definitions(spec))

    @property
    def engine(self) -> SagaEngine:
        """This process's engine. Celery's prefork pool forks after start-up: each child opens
        its own connections (a pool inherited across fork would be shared with the parent)."""
        if self._engine is None or self._pid != os.getpid():
            self._engine = SagaEngine(self.definitions, database_url=self.database_url)
            self._pid = os.getpid()
        return self._engine

    def check(self) -> None:
        """Open the engine's store once and close it: a wrong URL or missing tables fail here,
        before any worker process starts, with a ``SagaError`` that says what to do."""
        SagaEngine(self.definitions, database_url=self.database_url).close()

    def handle(
        self, message_id: str | None, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> None:
        """Handle one delivery of the reply task. Raises only ``_TRANSIENT`` errors: the
        caller retries those; everything else is handled or dead-lettered here."""
        try:
            reply = _read_reply(args, kwargs)
        except MalformedReplyError as exc:
            self._dead_letter(message_id, args, kwargs, exc)
            return
        try:
            outcome = self.engine.handle_reply(reply)
        except _TRANSIENT:
            raise
        except SagaError as exc:
            self._dead_letter(message_id, args, kwargs, exc)
            return
        except Exception as exc:  # a bug: keep the reply for an operator instead of looping
            log.exception("saga %s: reply %s raised unexpectedly", reply.saga_id, message_id)
            self._dead_letter(message_id, args, kwargs, exc)
            return
        _log_outcome(reply, outcome)

    def handle_batch(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Handle several deliveries, deciding the usable ones in one transaction. Returns
        those to try again later (the database failed, or a saga kept losing races); every
        other one is handled or dead-lettered here, and may be acknowledged."""
        retry: list[Delivery] = []
        readable: list[tuple[Delivery, ReplyMessage]] = []
        for delivery in deliveries:
            try:
                if delivery.problem:
                    raise MalformedReplyError(problems=[delivery.problem])
                readable.append((delivery, _read_reply(delivery.args, delivery.kwargs)))
            except MalformedReplyError as exc:
                retry += self._dead_letter_or_retry(delivery, exc)
        if not readable:
            return retry
        try:
            results = self.engine.handle_replies([reply for _, reply in readable])
        except _TRANSIENT as exc:
            log.warning(
                "%d reply message(s) not recorded (%s: %s)",
                len(readable),
                type(exc).__name__,
                exc,
            )
            return retry + [delivery for delivery, _ in readable]
        except Exception:
            # A bug somewhere in the batch: find the reply that trips it, one at a time.
            log.exception("a batch of %d replies raised; handling them singly", len(readable))
            return retry + self._one_by_one([delivery for delivery, _ in readable])
        for (delivery, reply), result in zip(readable, results, strict=True):
            if isinstance(result, _TRANSIENT):
                log.warning(
                    "reply message %s not recorded (%s: %s)",
                    delivery.message_id,
                    type(result).__name__,
                    result,
                )
                retry.append(delivery)
            elif isinstance(result, SagaError):
                retry += self._dead_letter_or_retry(delivery, result)
            else:
                _log_outcome(reply, result)
        return retry

    def _one_by_one(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        retry = []
        for delivery in deliveries:
            try:
                self.handle(delivery.message_id, delivery.args, delivery.kwargs)
            except _TRANSIENT:
                retry.append(delivery)
        return retry

    def _dead_letter_or_retry(self, delivery: Delivery, exc: Exception) -> list[Delivery]:
        try:
            self._dead_letter(delivery.message_id, delivery.args, delivery.kwargs, exc)
        except _TRANSIENT:
            return [delivery]  # the database is away: keep the message until it is back
        return []

    def _dead_letter(
        self, message_id: str | None, args: Sequence[Any], kwargs: Mapping[str, Any], exc: Exception
    ) -> None:
        body = json.dumps({"args": list(args), "kwargs": dict(kwargs)}, default=str)
        self.engine.store.dead_letter(
            source=DEAD_LETTER_SOURCE, body=body, error=str(exc), message_id=message_id
        )
        log.error(
            "reply message %s dead-lettered (kept in saga_dead_letters, not handled): %s",
            message_id,
            exc,
        )

    def _register(self) -> None:
        worker = self

        @self.celery.task(  # type: ignore[untyped-decorator]
            name=REPLY_TASK,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            typing=False,  # a malformed message is ours to dead-letter, not Celery's to reject
            max_retries=None,
            ignore_result=True,
            # Celery's default adds a task to every app in the process: it is this app's only.
            shared=False,
        )
        def reply(task: Any, *args: Any, **kwargs: Any) -> None:
            message_id = None if task.request.id is None else str(task.request.id)
            try:
                worker.handle(message_id, args, kwargs)
            except _TRANSIENT as exc:
                retries = int(task.request.retries or 0)
                delay = exponential_delay(retries, base=worker.backoff, cap=worker.backoff_max)
                log.warning(
                    "reply message %s not recorded (%s: %s); retry %d in %.1fs",
                    message_id,
                    type(exc).__name__,
                    exc,
                    retries + 1,
                    delay,
                )
                raise task.retry(exc=exc, countdown=delay, max_retries=None) from exc


def _log_outcome(reply: ReplyMessage, outcome: Outcome) -> None:
    if outcome.duplicate or not outcome.events:
        log.info(
            "saga %s: reply %s to command %s already handled; nothing changed",
            reply.saga_id,
            reply.message_id,
            reply.command_id,
        )
    else:
        log.info(
            "saga %s: reply %s (%s) to command %s handled: %s, %d command(s) to send",
            reply.saga_id,
            reply.message_id,
            reply.outcome,
            reply.command_id,
            outcome.state.status,
            len(outcome.commands),
        )


def _read_reply(args: Sequence[Any], kwargs: Mapping[str, Any]) -> ReplyMessage:
    problems = []
    if args:
        problems.append(f"{len(args)} positional argument(s); a reply comes as kwargs only")
    extra = sorted(set(kwargs) - {"reply"})
    if extra:
        problems.append(f"unexpected keyword argument(s) {', '.join(extra)}")
    if "reply" not in kwargs:
        problems.append("no 'reply' keyword argument")
    raw = kwargs.get("reply")
    about = raw if isinstance(raw, Mapping) else {}
    if problems:
        raise MalformedReplyError(
            problems=problems, saga_id=about.get("saga_id"), command_id=about.get("command_id")
        )
    return parse_reply(raw)


_default: EngineWorker | None = None


def __getattr__(name: str) -> Any:
    # ``celery -A saga_es.worker`` looks up ``app`` (or ``celery``): build it on first use from
    # the environment, so that importing this module has no side effects.
    global _default
    if name in ("app", "celery"):
        if _default is None:
            _default = EngineWorker.from_environment()
        return _default.celery
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
