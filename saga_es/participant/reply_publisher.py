"""Sending replies to the engine, confirmed by the broker before the command is acknowledged.

On RabbitMQ a reply is the same Celery task message ``send_task`` would send (``saga_es.wire``),
published on a confirm-mode channel the worker threads of a process share. Replies are confirmed
in groups: a thread with a reply to send either finds no publish under way and publishes every
reply waiting at that moment, its own included, then waits once for the broker's acks; or it
waits while another thread does that, and its reply goes in the next group (or was in this one).
Each thread returns once its own reply is confirmed. Under load the broker confirms (and, for
persistent messages, syncs to disk) a few replies at a time instead of one: a quarter of the
broker CPU per reply, and less than half the client CPU of Celery's producer, which waits for
every message alone (``saga_es.amqp_confirms``). Other transports (the embedded in-process
broker, Redis) go through ``send_task``.

Participants registered on one Celery app (one worker serving several services) share one
publisher (``for_app``): their replies are grouped together, on one connection.

A connection that fails is dropped and the error raised in every thread whose reply was in the
group: each task retries its send (``task._send``) and the next group opens a new connection.
A forked process (Celery's prefork pool) opens its own.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from celery import Celery

from saga_es.amqp_confirms import ConfirmingChannel
from saga_es.messages import ReplyMessage
from saga_es.messaging import REPLY_QUEUE, REPLY_TASK, reply_kwargs
from saga_es.wire import TaskWire, WireMessage

__all__ = ["ReplyNotConfirmedError", "ReplyPublisher"]


class ReplyNotConfirmedError(Exception):
    """The broker nacked or returned a reply: send it again."""


class _Outgoing:
    __slots__ = ("error", "message", "settled")

    def __init__(self, message: WireMessage) -> None:
        self.message = message
        self.settled = False
        self.error: BaseException | None = None


class ReplyPublisher:
    @classmethod
    def for_app(cls, app: Celery) -> ReplyPublisher:
        """The publisher every participant registered on ``app`` sends its replies with. It
        lives on the app, and goes with it."""
        with _SHARING:
            publisher: ReplyPublisher | None = getattr(app, _ON_THE_APP, None)
            if publisher is None:
                publisher = cls(app)
                setattr(app, _ON_THE_APP, publisher)
            return publisher

    def __init__(self, app: Celery, *, confirm_timeout: float = 30.0) -> None:
        self._app = app
        self._confirm_timeout = confirm_timeout
        self._wire = TaskWire(app)
        self._raw: bool | None = None  # decided on first use: the app may be configured late
        self._turn = threading.Condition()
        self._waiting: list[_Outgoing] = []
        self._publishing = False
        self._conn: Any = None  # kombu.Connection, used only by the publishing thread
        self._channel: ConfirmingChannel | None = None
        self._pid = 0

    def send(self, reply: ReplyMessage, *, kwargsrepr: str) -> None:
        if self._raw is None:
            self._raw = self._app.connection_for_write().transport.driver_type == "amqp"
        if not self._raw:
            self._app.send_task(
                REPLY_TASK,
                kwargs=reply_kwargs(reply),
                task_id=str(reply.message_id),
                queue=REPLY_QUEUE,
                argsrepr="()",
                kwargsrepr=kwargsrepr,
            )
            return
        outgoing = _Outgoing(
            self._wire.encode(
                task=REPLY_TASK,
                task_id=str(reply.message_id),
                kwargs=reply_kwargs(reply),
                queue=REPLY_QUEUE,
                kwargsrepr=kwargsrepr,
            )
        )
        with self._turn:
            self._waiting.append(outgoing)
            while not outgoing.settled:
                if self._publishing:
                    self._turn.wait()
                    continue
                group, self._waiting = self._waiting, []
                self._publishing = True
                self._turn.release()
                try:
                    self._publish(group)
                finally:
                    self._turn.acquire()
                    self._publishing = False
                    self._turn.notify_all()
        if outgoing.error is not None:
            raise outgoing.error

    def close(self) -> None:
        """Close the broker connection (a later send opens a new one)."""
        with self._turn:
            while self._publishing:
                self._turn.wait()
            self._disconnect()

    def _publish(self, group: list[_Outgoing]) -> None:
        try:
            refusals = self._publish_reconnecting_once([o.message for o in group])
        except Exception as exc:
            refusals = {}
            for outgoing in group:
                outgoing.error = exc
        except BaseException:  # the publishing thread itself is stopping: fail the others
            for outgoing in group:
                outgoing.error = ReplyNotConfirmedError("the publishing thread was interrupted")
                outgoing.settled = True
            raise
        for index, why in refusals.items():
            group[index].error = ReplyNotConfirmedError(why)
        if refusals:
            self._disconnect()  # declare the queue again on a new channel
        for outgoing in group:
            outgoing.settled = True

    def _publish_reconnecting_once(self, messages: list[WireMessage]) -> dict[int, str]:
        try:
            return self._publish_once(messages)
        except Exception:
            # A connection idle since the broker restarted fails on first use: one fresh
            # connection is tried at once (as kombu's publish retry would) before the error
            # goes to the task's retry with backoff. A reply sent twice is harmless.
            return self._publish_once(messages)

    def _publish_once(self, messages: list[WireMessage]) -> dict[int, str]:
        try:
            return self._ready_channel().publish(messages, self._confirm_timeout)
        except BaseException:
            self._disconnect()
            raise

    def _ready_channel(self) -> ConfirmingChannel:
        if self._pid != os.getpid():  # forked: the parent's connection is not ours to use
            self._conn = self._channel = None
            self._pid = os.getpid()
        if self._conn is None:
            # Without py-amqp's confirm_publish, which would wait for every message alone:
            # the channel confirms groups itself.
            conn = self._app.connection_for_write(transport_options={"confirm_publish": False})
            # No retries inside kombu (it would sleep and try again): the task's retry decides.
            conn.ensure_connection(max_retries=0)
            self._conn = conn
        if self._channel is None:
            channel = ConfirmingChannel(self._conn)
            # Declared as a Celery worker consuming the queue declares it, so either may be
            # first; a returned reply means it vanished: the next group declares it again.
            self._app.amqp.queues[REPLY_QUEUE](channel.channel).declare()
            self._channel = channel
        return self._channel

    def _disconnect(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is None or self._pid != os.getpid():
            return
        try:
            conn.close()
        except Exception:  # closing a dead connection may fail; it is dropped either way
            conn.collect()


#: Where an app keeps its shared publisher.
_ON_THE_APP = "_saga_es_reply_publisher"
_SHARING = threading.Lock()
