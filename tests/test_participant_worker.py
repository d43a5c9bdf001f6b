"""The example services behind a real ``celery worker`` process, RabbitMQ and PostgreSQL.

Commands are published as the outbox relay publishes them; replies are read off the reply
queue (no engine worker here), so each test sees exactly what a participant sends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import SERVICE_QUEUES, collect_replies, publish_command, publish_raw, purge
from conftest import order
from example_services import ExampleDatabase, count_in_log, start_services, wait_ready, worker_env
from processes import Process, Processes, wait_until

from examples.order_fulfillment.faults import Switch
from examples.order_fulfillment.models import Charge, Reservation
from saga_es import ids
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.messages import CommandMessage
from saga_es.messaging import REPLY_QUEUE, reply_id_for
from saga_es.participant import TRANSIENT_EXHAUSTED, InboxEntry


class World:
    def __init__(self, engine: SagaEngine, db: ExampleDatabase, processes: Processes, url: str):
        self.engine, self.db, self.processes, self.broker_url = engine, db, processes, url
        self.services: Process = start_services(processes)

    def reserve(self, n: int) -> CommandMessage:
        return self.engine.start(order_fulfillment, order(n), business_key=f"o-{n}").commands[0]

    def charge(self, n: int) -> CommandMessage:
        """The charge command the engine issues once the reservation succeeded."""
        reserve = self.reserve(n)
        outcome = self.engine.handle_reply(reserve.reply_success(reply_id_for(reserve), {}))
        return outcome.commands[0]


@pytest.fixture
def world(postgres_url: str, broker_url: str, tmp_path: Path) -> Iterator[World]:
    purge(broker_url, *SERVICE_QUEUES, REPLY_QUEUE)
    db = ExampleDatabase(postgres_url)
    db.create_tables()
    with (
        SagaEngine([order_fulfillment], database_url=postgres_url) as engine,
        Processes(tmp_path, worker_env(postgres_url, broker_url)) as processes,
    ):
        yield World(engine, db, processes, broker_url)
    db.close()


def attempt(command: CommandMessage, number: int) -> CommandMessage:
    message_id = ids.command_id(command.saga_id, command.phase, command.step, number)
    return command.model_copy(update={"message_id": message_id, "attempt": number})


def test_redelivered_and_retried_command_applies_once(world: World) -> None:
    command = world.reserve(1)
    publish_command(world.broker_url, command)
    publish_command(world.broker_url, command)  # the relay published it twice
    publish_command(world.broker_url, attempt(command, 2))  # the engine retried the step

    replies = collect_replies(world.broker_url, 3)

    assert all(r.ok for r in replies), replies
    assert len({tuple(r.result["reservation_ids"]) for r in replies}) == 1
    assert {r.message_id for r in replies} == {
        reply_id_for(command),
        reply_id_for(attempt(command, 2)),
    }
    assert world.db.count(Reservation, saga_id=command.saga_id) == 1  # one line, reserved once
    assert world.db.count(InboxEntry, saga_id=command.saga_id) == 1


def test_transient_failures_are_retried_until_the_command_succeeds(world: World) -> None:
    world.db.set_fault(Switch("payment.charge", "transient", "o-2", times=2))
    command = world.charge(2)
    publish_command(world.broker_url, command)

    [reply] = collect_replies(world.broker_url, 1)

    assert reply.ok, reply
    assert [str(c.charge_id) for c in world.db.rows(Charge)] == [reply.result["charge_id"]]
    assert count_in_log(world.services, "transient failure (InjectedTransientError") == 2


def test_exhausted_transient_failure_replies_a_retryable_failure(world: World) -> None:
    world.db.set_fault(Switch("payment.charge", "transient", "*", times=99))
    command = world.charge(3)
    publish_command(world.broker_url, command)

    [reply] = collect_replies(world.broker_url, 1)

    assert (reply.outcome, reply.error_code, reply.retryable) == (
        "failure",
        TRANSIENT_EXHAUSTED,
        True,
    )
    assert "InjectedTransientError: switched to fail transiently" in reply.error_message
    assert world.db.count(Charge) == 0
    assert world.db.inbox(command.idempotency_key) is None  # the engine may try again
    assert count_in_log(world.services, "after 2 retries; replying a retryable failure") == 1


def test_business_failure_replies_a_final_failure_and_keeps_nothing(world: World) -> None:
    world.db.set_fault(Switch("payment.charge", "fail", "o-4", error_code="card_declined"))
    command = world.charge(4)
    publish_command(world.broker_url, command)
    publish_command(world.broker_url, attempt(command, 2))

    replies = collect_replies(world.broker_url, 2)

    assert {(r.outcome, r.error_code, r.retryable) for r in replies} == {
        ("failure", "card_declined", False)
    }
    assert world.db.count(Charge) == 0
    entry = world.db.inbox(command.idempotency_key)
    assert entry is not None
    assert entry.outcome == "failure"
    assert count_in_log(world.services, "transient failure") == 0


def test_malformed_command_is_dead_lettered_and_the_worker_keeps_going(world: World) -> None:
    publish_raw(
        world.broker_url, "payment.charge", {"command": {"saga_id": "nope"}}, "payment", "m-1"
    )
    good = world.charge(5)
    publish_raw(
        world.broker_url, "payment.charge", {"cmd": good.model_dump(mode="json")}, "payment", "m-2"
    )
    publish_command(world.broker_url, good)

    [reply] = collect_replies(world.broker_url, 1)
    assert reply.ok
    assert reply.command_id == good.message_id

    wait_until(lambda: len(world.db.dead_letters()) == 2, timeout=30, what="two dead letters")
    letters = {d.message_id: d for d in world.db.dead_letters()}
    assert "field 'saga_id': Input should be a valid UUID" in letters["m-1"].error
    assert "no 'command' keyword argument" in letters["m-2"].error
    assert "unexpected keyword argument(s) cmd" in letters["m-2"].error
    wait_until(
        lambda: count_in_log(world.services, "kept in participant_dead_letters, not handled") == 2,
        timeout=30,
        what="two log lines",
    )
    log = world.services.output()
    assert "participant 'payment': malformed command message m-1 for 'payment.charge'" in log
    assert world.services.running()


def test_worker_killed_between_commit_and_reply_replies_the_stored_outcome(world: World) -> None:
    """SIGKILL after the charge committed but before its reply was sent: RabbitMQ redelivers
    the unacknowledged command to the restarted worker, which finds the inbox row and replies
    with the stored result. The card was charged once."""
    world.db.set_fault(Switch("payment.charge", "hold_reply", "o-6"))
    command = world.charge(6)
    publish_command(world.broker_url, command)
    wait_until(
        lambda: world.db.count(Charge, order_id="o-6") == 1,
        timeout=30,
        what="the charge to commit",
    )

    world.services.kill9()
    world.db.clear_faults()
    world.services.start()
    wait_ready(world.services, starts=2)

    [reply] = collect_replies(world.broker_url, 1)
    [charge] = world.db.rows(Charge, order_id="o-6")
    assert reply.ok
    assert reply.result["charge_id"] == str(charge.charge_id)
    assert reply.message_id == reply_id_for(command)
    entry = world.db.inbox(command.idempotency_key)
    assert entry is not None
    assert entry.first_message_id == command.message_id


def test_services_run_on_sqlite(broker_url: str, tmp_path: Path) -> None:
    """The embedded default: the worker creates its tables at start-up, and its forked
    processes take turns on the file (BEGIN IMMEDIATE) instead of failing as locked."""
    purge(broker_url, *SERVICE_QUEUES, REPLY_QUEUE)
    url = f"sqlite:///{tmp_path}/shop.db"
    with (
        SagaEngine([order_fulfillment], database_url=url) as engine,
        Processes(tmp_path, worker_env(url, broker_url)) as processes,
    ):
        start_services(processes)
        commands = [
            engine.start(order_fulfillment, order(n), business_key=f"o-{n}").commands[0]
            for n in range(10)
        ]
        for command in commands * 2:  # each delivered twice
            publish_command(broker_url, command)

        replies = collect_replies(broker_url, 20)

    assert all(r.ok for r in replies), [r for r in replies if not r.ok]
    assert {r.command_id for r in replies} == {c.message_id for c in commands}
    db = ExampleDatabase(url)
    assert db.count(Reservation) == 10
    assert db.count(InboxEntry) == 10
    db.close()
