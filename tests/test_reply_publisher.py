"""Replies sent with group confirms on a real RabbitMQ (``participant.reply_publisher``).

What the engine gets must be exactly what Celery's ``send_task`` would have sent (a Celery
worker may consume the reply queue); concurrent senders share one channel and each returns
only once its own reply is confirmed; a reply the broker returns is an error for its sender
only, and the next send works again; a connection broken while idle is replaced at once.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from amqp.exceptions import NotFound
from broker import collect_replies, purge
from kombu import Connection
from kombu.exceptions import OperationalError

from saga_es.messages import ReplyMessage
from saga_es.messaging import REPLY_QUEUE, celery_app
from saga_es.participant import Participant
from saga_es.participant.reply_publisher import ReplyNotConfirmedError, ReplyPublisher


def reply(outcome: str = "success") -> ReplyMessage:
    if outcome == "success":
        return ReplyMessage(
            message_id=uuid.uuid4(),
            saga_id=uuid.uuid4(),
            command_id=uuid.uuid4(),
            outcome="success",
            result={"charge_id": "ch-1"},
        )
    return ReplyMessage(
        message_id=uuid.uuid4(),
        saga_id=uuid.uuid4(),
        command_id=uuid.uuid4(),
        outcome="failure",
        error_code="card_declined",
        error_message="issuer said no",
    )


@pytest.fixture
def publisher(broker_url: str) -> Iterator[ReplyPublisher]:
    purge(broker_url, REPLY_QUEUE)
    publisher = ReplyPublisher(celery_app(broker_url))
    yield publisher
    publisher.close()
    purge(broker_url, REPLY_QUEUE)


def queued(broker_url: str) -> int:
    with Connection(broker_url) as conn:
        _, count, _ = conn.default_channel.queue_declare(REPLY_QUEUE, passive=True)
        return int(count)


def test_a_reply_arrives_as_the_celery_reply_task_and_is_confirmed_on_return(
    broker_url: str, publisher: ReplyPublisher
) -> None:
    sent = [reply(), reply("failure")]
    for count, r in enumerate(sent, start=1):
        publisher.send(r, kwargsrepr="{}")
        assert queued(broker_url) == count  # confirmed on return: on the queue already
    assert collect_replies(broker_url, 2) == sent


def test_concurrent_senders_each_get_their_own_reply_confirmed(
    broker_url: str, publisher: ReplyPublisher
) -> None:
    threads, per_thread = 8, 25
    sent: list[list[ReplyMessage]] = [[reply() for _ in range(per_thread)] for _ in range(threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def send_all(replies: list[ReplyMessage]) -> None:
        start.wait()
        try:
            for r in replies:
                publisher.send(r, kwargsrepr="{}")
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=send_all, args=(batch,)) for batch in sent]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not errors
    got = collect_replies(broker_url, threads * per_thread)
    assert sorted(str(r.message_id) for r in got) == sorted(
        str(r.message_id) for batch in sent for r in batch
    )
    for batch in sent:  # one thread's replies stay in its order
        mine = {r.message_id for r in batch}
        assert [r for r in got if r.message_id in mine] == batch


def test_a_returned_reply_fails_its_send_and_the_next_declares_the_queue_again(
    broker_url: str, publisher: ReplyPublisher
) -> None:
    publisher.send(reply(), kwargsrepr="{}")
    with Connection(broker_url) as conn:  # someone deletes the queue behind our back
        conn.default_channel.queue_delete(REPLY_QUEUE)
    lost = reply()
    with pytest.raises(ReplyNotConfirmedError, match="unroutable"):
        publisher.send(lost, kwargsrepr="{}")
    again = reply()
    publisher.send(again, kwargsrepr="{}")
    assert collect_replies(broker_url, 1) == [again]


def test_a_connection_broken_while_idle_is_replaced_within_the_send(
    broker_url: str, publisher: ReplyPublisher
) -> None:
    publisher.send(reply(), kwargsrepr="{}")
    broken = publisher._conn  # the broker dropped it (restarted) while it sat idle
    assert broken is not None
    broken.connection.sock.close()
    after = reply()
    publisher.send(after, kwargsrepr="{}")
    assert publisher._conn is not broken
    assert collect_replies(broker_url, 2)[-1] == after


def test_an_unreachable_broker_fails_the_send() -> None:
    publisher = ReplyPublisher(celery_app("amqp://guest:guest@127.0.0.1:1//"))
    try:
        with pytest.raises(OperationalError, match="Connection refused"):
            publisher.send(reply(), kwargsrepr="{}")
    finally:
        publisher.close()


def test_the_reply_queue_is_declared_by_the_first_send(broker_url: str) -> None:
    with Connection(broker_url) as conn:
        conn.default_channel.queue_delete(REPLY_QUEUE)
        with pytest.raises(NotFound):
            conn.channel().queue_declare(REPLY_QUEUE, passive=True)
    publisher = ReplyPublisher(celery_app(broker_url))
    try:
        publisher.send(reply(), kwargsrepr="{}")
    finally:
        publisher.close()
    assert queued(broker_url) == 1
    purge(broker_url, REPLY_QUEUE)


def test_participants_on_one_celery_app_share_one_publisher(sqlite_url: str) -> None:
    """So that one worker serving several services groups all their replies together, on
    one broker connection."""
    app = celery_app("memory://")
    payments = Participant("payment", database_url=sqlite_url, celery=app)
    shipping = Participant("shipping", database_url=sqlite_url, celery=app)
    alone = Participant("inventory", database_url=sqlite_url)
    try:
        assert ReplyPublisher.for_app(app) is ReplyPublisher.for_app(app)
        assert payments._replies is shipping._replies is ReplyPublisher.for_app(app)
        assert alone._replies is not payments._replies
    finally:
        for participant in (payments, shipping, alone):
            participant.close()
