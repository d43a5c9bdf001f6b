"""``saga-es worker``: drain the reply queue in batches, one engine transaction per batch.

A Celery worker runs one task per message: for the engine that is one transaction, one commit
and one turn at the event table's lock per reply. Under load the replies are already queued
side by side, so this consumer takes what is there (up to ``batch_size``), decides them all,
commits them together (``SagaEngine.handle_replies``) and only then acknowledges them. When
the queue is quiet a batch is a single reply and nothing waits for company.

The messages are the Celery task messages participants send (task ``saga_es.reply``,
protocol 2: body ``[args, kwargs, embed]``, task id in the headers), so any participant,
ours or not, and ``celery -A saga_es.worker`` can serve the same queue.

Delivery guarantees, message by message:

* handled, or found already handled (the engine's inbox): acknowledged after the commit. A
  consumer killed before its acknowledgement gets the reply again, and the inbox absorbs it.
* unusable (not JSON, not a reply task, malformed, unknown saga or command): dead-lettered
  with the reason by ``EngineWorker``, then acknowledged.
* the database failed or the saga kept losing races: kept unacknowledged and tried again in
  place with capped exponential backoff, without limit. On stop, such messages are left to
  the broker, which hands them out again.

A broker outage drops the connection and every unacknowledged message with it (the broker
requeues them); the consumer logs one warning per outage and reconnects with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kombu.connection import Connection
from kombu.messaging import Consumer

from saga_es.backoff import exponential_delay
from saga_es.messaging import REPLY_QUEUE, REPLY_TASK, resolve_broker_url, transport_options
from saga_es.signals import stop_on_signals
from saga_es.worker import Delivery, EngineWorker

__all__ = ["ReplyConsumer", "run_consumers"]

log = logging.getLogger("saga_es.worker")


class ReplyConsumer:
    """Feeds ``saga_es.replies`` to an ``EngineWorker`` a batch at a time.

    batch_size: most replies decided in one transaction (100); also the broker's prefetch
        window, so a batch never waits for a message the broker holds back.
    linger: under load (the previous batch began less than ``linger`` ago), seconds a batch
        may wait for more replies once its first one arrived (0.02). A batch then holds many
        replies, each costing a fraction of a lone one, for that much more latency per step;
        on a quiet system a reply is decided as soon as it arrives.
    idle_timeout: seconds between checks for ``stop`` while the queue is empty (0.5).
    """

    def __init__(
        self,
        worker: EngineWorker,
        *,
        broker_url: str | None = None,
        batch_size: int = 100,
        linger: float = 0.02,
        idle_timeout: float = 0.5,
    ) -> None:
        if batch_size < 1 or not 0 <= linger < idle_timeout:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= linger < idle_timeout, got {batch_size}, "
                f"{linger}, {idle_timeout}"
            )
        self.linger = linger
        self.worker = worker
        self.broker_url = resolve_broker_url(broker_url)
        self.batch_size = batch_size
        self.idle_timeout = idle_timeout
        self._stopping = threading.Event()
        # Waiting out a failure must end early when asked to stop: Event.wait does both, and
        # says whether it was asked.
        self._sleep = self._stopping.wait
        self._buffer: list[Any] = []  # kombu Messages (kombu is untyped)
        self._outage = 0  # failed connection attempts since the broker was last reachable
        self._began = -float("inf")  # when the previous batch's first reply arrived

    def stop(self) -> None:
        """Finish the batch in hand and return from ``run`` (safe from a signal handler)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> None:
        """Consume until ``stop``; reconnects after broker failures."""
        while not self._stopping.is_set():
            connection: Any = Connection(  # type: ignore[no-untyped-call]  # kombu is untyped
                self.broker_url, transport_options=transport_options(self.broker_url)
            )
            errors = connection.connection_errors + connection.channel_errors
            try:
                with connection:
                    self._consume(connection)
            except errors as exc:
                self._buffer.clear()  # their delivery tags died with the channel
                if self._outage == 0:
                    log.warning("broker unavailable (%s); reconnecting with backoff", exc)
                delay = exponential_delay(
                    self._outage, base=self.worker.backoff, cap=self.worker.backoff_max
                )
                self._outage += 1
                self._sleep(delay)

    def _consume(self, connection: Any) -> None:
        channel = connection.channel()
        queue = self.worker.celery.amqp.queues[REPLY_QUEUE](channel)
        queue.declare()
        channel.basic_qos(prefetch_size=0, prefetch_count=self.batch_size, a_global=False)
        with Consumer(  # type: ignore[no-untyped-call]
            channel, queues=[queue], on_message=self._buffer.append, no_ack=False
        ):
            if self._outage:
                log.warning("broker back after %d attempt(s); consuming again", self._outage)
            self._outage = 0
            log.info(
                "engine worker ready. consuming %s, batches of up to %d",
                REPLY_QUEUE,
                self.batch_size,
            )
            while not self._stopping.is_set():
                try:
                    connection.drain_events(timeout=self.idle_timeout)
                except TimeoutError:
                    connection.heartbeat_check()
                    continue
                # Under load (the previous batch began less than ``linger`` ago), let this
                # one fill for up to ``linger`` seconds; otherwise take only what is here.
                began, previous = time.monotonic(), self._began
                self._began = began
                deadline = began + (self.linger if began - previous < self.linger else 0.0)
                while len(self._buffer) < self.batch_size:
                    try:
                        connection.drain_events(timeout=max(deadline - time.monotonic(), 0))
                    except TimeoutError:
                        break
                self._flush()

    def _flush(self) -> None:
        messages, self._buffer[:] = list(self._buffer), []
        pending = [(_delivery(message), message) for message in messages]
        failures = 0
        while pending:
            retry = {id(d) for d in self.worker.handle_batch([d for d, _ in pending])}
            if not retry and not failures:
                # Every message delivered on this channel up to the batch's last one is done
                # (earlier batches were acknowledged before this one was read): one frame
                # acknowledges them all, instead of one per message.
                pending[-1][1].ack(multiple=True)
                pending = []
            for delivery, message in pending:
                if id(delivery) not in retry:
                    message.ack()
            pending = [(d, m) for d, m in pending if id(d) in retry]
            if not pending:
                log.info("batch of %d reply message(s) done", len(messages))
                return
            delay = exponential_delay(
                failures, base=self.worker.backoff, cap=self.worker.backoff_max
            )
            failures += 1
            log.warning(
                "%d reply message(s) not recorded; retry %d in %.1fs", len(pending), failures, delay
            )
            if self._sleep(delay):
                return  # stopping: the broker hands the unacknowledged ones out again


def _delivery(message: Any) -> Delivery:
    """The task call a message carries, or what makes it no reply task message at all (the
    worker dead-letters it)."""
    headers: dict[str, Any] = dict(message.headers or {})
    message_id = headers.get("id") or message.properties.get("correlation_id")
    task = headers.get("task")
    try:
        body = message.decode()
    except Exception as exc:  # not JSON, or a content type we do not accept
        return Delivery(message_id, (), {}, problem=f"unreadable message body ({exc})")
    if isinstance(body, dict) and "task" in body:  # Celery protocol 1
        task, message_id = body.get("task"), body.get("id", message_id)
        body = [body.get("args", []), body.get("kwargs", {}), {}]
    if task != REPLY_TASK:
        return Delivery(message_id, (), {}, problem=f"task {task!r} is not {REPLY_TASK!r}")
    if not (isinstance(body, list | tuple) and len(body) == 3):
        return Delivery(message_id, (), {}, problem="body is not [args, kwargs, embed]")
    args, kwargs, _embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return Delivery(message_id, (), {}, problem="args is not a list or kwargs not an object")
    return Delivery(None if message_id is None else str(message_id), tuple(args), kwargs)


def run_consumers(
    worker: EngineWorker,
    *,
    broker_url: str | None = None,
    batch_size: int = 100,
    linger: float = 0.02,
    concurrency: int = 1,
) -> None:
    """``saga-es worker``: ``concurrency`` consumers, each a thread with its own broker
    connection, sharing one engine (it is thread-safe). Returns once SIGTERM or SIGINT has
    stopped them all, each after the batch in hand."""
    consumers = [
        ReplyConsumer(worker, broker_url=broker_url, batch_size=batch_size, linger=linger)
        for _ in range(concurrency)
    ]
    threads = [
        threading.Thread(target=c.run, name=f"reply-consumer-{n}", daemon=True)
        for n, c in enumerate(consumers, 1)
    ]

    def stop_all() -> None:
        for consumer in consumers:
            consumer.stop()

    with stop_on_signals(
        stop_all,
        stopping=lambda: consumers[0].stopping,
        log=log,
        graceful="stopping once the batch in hand is recorded",
        abrupt="stopping now; unacknowledged replies go back to the queue",
    ):
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.5)  # a bare join() would hold the signal off until it returns
        finally:
            worker.engine.close()
