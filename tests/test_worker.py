"""The engine worker (``saga-es worker``, a real process) on PostgreSQL and RabbitMQ: replies
advance sagas, replies waiting together are recorded together, redeliveries change nothing,
unusable messages are kept aside, a database outage delays a reply without losing it, and
SIGTERM stops it cleanly."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import SERVICE_QUEUES, publish_raw, publish_reply, purge
from conftest import order
from example_services import (
    ExampleDatabase,
    TestRelay,
    count_in_log,
    start_engine_worker,
    start_services,
    worker_env,
)
from kombu import Connection
from processes import BIN, Processes, wait_until
from tcp_proxy import TcpProxy
from typer.testing import CliRunner

from examples.order_fulfillment.faults import Switch
from examples.order_fulfillment.models import Charge, Notification, Reservation, Shipment
from saga_es.cli import app as cli
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.messages import CommandMessage
from saga_es.messaging import REPLY_QUEUE, REPLY_TASK, reply_id_for, reply_kwargs
from saga_es.persistence.settings import DatabaseSettings
from saga_es.state import SagaStatus
from saga_es.worker import load_definitions


@pytest.fixture
def engine(postgres_url: str, broker_url: str) -> Iterator[SagaEngine]:
    purge(broker_url, *SERVICE_QUEUES, REPLY_QUEUE)
    with SagaEngine([order_fulfillment], database_url=postgres_url) as e:
        yield e


@pytest.fixture
def processes(postgres_url: str, broker_url: str, tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path, worker_env(postgres_url, broker_url)) as running:
        yield running


def test_sagas_complete_and_compensate_through_real_workers(
    engine: SagaEngine, processes: Processes, postgres_url: str, broker_url: str
) -> None:
    db = ExampleDatabase(postgres_url)
    db.create_tables()
    db.set_fault(Switch("payment.charge", "fail", "o-2", error_code="card_declined"))
    start_services(processes)
    start_engine_worker(processes, postgres_url, broker_url)
    relay = TestRelay(engine, broker_url)
    sagas = [
        engine.start(order_fulfillment, order(n), business_key=f"o-{n}").saga_id for n in (1, 2)
    ]

    def finished() -> bool:
        relay.pump(sagas)
        return all(engine.get_state(s).is_terminal for s in sagas)

    wait_until(finished, timeout=60, what="both sagas to finish")

    done, declined = (engine.get_state(s) for s in sagas)
    assert done.status == SagaStatus.COMPLETED
    assert declined.status == SagaStatus.FAILED
    assert declined.compensated == ("reserve_inventory",)
    [charge] = db.rows(Charge, order_id="o-1")
    assert done.results["charge_payment"]["charge_id"] == str(charge.charge_id)
    assert charge.refunded_at is None
    assert db.count(Shipment, order_id="o-1") == db.count(Notification, order_id="o-1") == 1
    assert db.count(Charge, order_id="o-2") == 0
    [released] = db.rows(Reservation, order_id="o-2")
    assert released.released_at is not None
    db.close()


def test_redelivered_reply_changes_nothing(
    engine: SagaEngine, processes: Processes, postgres_url: str, broker_url: str
) -> None:
    worker = start_engine_worker(processes, postgres_url, broker_url)
    started = engine.start(order_fulfillment, order(1), business_key="o-1")
    reserve = started.commands[0]
    reply = reserve.reply_success(reply_id_for(reserve), {"reservation_ids": ["r-1"]})

    publish_reply(broker_url, reply)
    wait_until(lambda: count_in_log(worker, "1 command(s) to send") == 1, what="the reply")
    events, outbox = len(engine.events(started.saga_id)), engine.store.outbox(started.saga_id)
    for _ in range(3):
        publish_reply(broker_url, reply)
    wait_until(
        lambda: count_in_log(worker, "already handled; nothing changed") == 3,
        what="three redeliveries",
    )

    assert len(engine.events(started.saga_id)) == events == 4  # started, issued, succeeded, issued
    assert engine.store.outbox(started.saga_id) == outbox
    assert [row["command"] for row in outbox] == ["inventory.reserve", "payment.charge"]
    assert engine.store.count("saga_inbox") == 1
    assert count_in_log(worker, "1 command(s) to send") == 1


def test_unusable_replies_are_dead_lettered_and_the_worker_keeps_going(
    engine: SagaEngine, processes: Processes, postgres_url: str, broker_url: str
) -> None:
    worker = start_engine_worker(processes, postgres_url, broker_url)
    reserve = engine.start(order_fulfillment, order(1), business_key="o-1").commands[0]
    good = reserve.reply_success(reply_id_for(reserve))
    stranger = good.model_copy(update={"saga_id": uuid.uuid4(), "message_id": uuid.uuid4()})
    unissued = good.model_copy(update={"command_id": uuid.uuid4(), "message_id": uuid.uuid4()})

    publish_raw(broker_url, REPLY_TASK, {"reply": {"outcome": "maybe"}}, REPLY_QUEUE, "bad-1")
    publish_reply(broker_url, stranger)
    publish_reply(broker_url, unissued)
    publish_raw(broker_url, REPLY_TASK, {"answer": reply_kwargs(good)}, REPLY_QUEUE, "bad-2")
    publish_reply(broker_url, good)

    wait_until(lambda: len(engine.store.dead_letters()) == 4, what="four dead letters")
    wait_until(lambda: count_in_log(worker, "1 command(s) to send") == 1, what="the good reply")
    errors = {d["message_id"]: d["error"] for d in engine.store.dead_letters()}
    assert "field 'outcome': Input should be 'success' or 'failure'" in errors["bad-1"]
    assert f"reply for unknown saga {stranger.saga_id}" in errors[str(stranger.message_id)]
    assert "which this saga never issued" in errors[str(unissued.message_id)]
    assert "no 'reply' keyword argument" in errors["bad-2"]
    wait_until(
        lambda: count_in_log(worker, "dead-lettered (kept in saga_dead_letters, not handled)") == 4,
        what="four log lines",
    )
    assert worker.running()
    assert engine.get_state(reserve.saga_id).results["reserve_inventory"] == {}


def test_replies_waiting_together_are_recorded_in_one_batch(
    engine: SagaEngine, processes: Processes, postgres_url: str, broker_url: str
) -> None:
    commands = [
        engine.start(order_fulfillment, order(n), business_key=f"o-{n}").commands[0]
        for n in range(30)
    ]
    for command in commands:  # queued before any worker runs: they wait side by side
        publish_reply(broker_url, command.reply_success(reply_id_for(command)))

    worker = start_engine_worker(processes, postgres_url, broker_url, concurrency=1)
    wait_until(lambda: count_in_log(worker, "1 command(s) to send") == 30, what="30 replies")

    batches = [
        int(line.split("batch of ")[1].split()[0])
        for line in worker.output().splitlines()
        if "batch of " in line
    ]
    assert sum(batches) == 30
    assert max(batches) > 1, batches
    assert all(engine.get_state(c.saga_id).succeeded == ("reserve_inventory",) for c in commands)
    assert engine.store.count("saga_inbox") == 30


def test_messages_that_are_no_reply_task_are_dead_lettered(
    engine: SagaEngine, processes: Processes, postgres_url: str, broker_url: str
) -> None:
    worker = start_engine_worker(processes, postgres_url, broker_url)
    reserve = engine.start(order_fulfillment, order(1), business_key="o-1").commands[0]
    publish_raw(broker_url, "payment.charge", {"command": {}}, REPLY_QUEUE, "stray-task")
    with Connection(broker_url) as connection:
        connection.Producer().publish(
            b"\x80\x04not json",
            routing_key=REPLY_QUEUE,
            content_type="application/json",
            content_encoding="binary",
            headers={"id": "garbage", "task": REPLY_TASK},
        )
    publish_reply(broker_url, reserve.reply_success(reply_id_for(reserve)))

    wait_until(lambda: len(engine.store.dead_letters()) == 2, what="two dead letters")
    wait_until(lambda: count_in_log(worker, "1 command(s) to send") == 1, what="the good reply")
    errors = {d["message_id"]: d["error"] for d in engine.store.dead_letters()}
    assert "task 'payment.charge' is not 'saga_es.reply'" in errors["stray-task"]
    assert "unreadable message body" in errors["garbage"]
    assert worker.running()


def test_sigterm_stops_the_worker_with_exit_status_0(
    engine: SagaEngine, processes: Processes, postgres_url: str, broker_url: str
) -> None:
    worker = start_engine_worker(processes, postgres_url, broker_url)
    reserve = engine.start(order_fulfillment, order(1), business_key="o-1").commands[0]
    publish_reply(broker_url, reserve.reply_success(reply_id_for(reserve)))
    wait_until(lambda: count_in_log(worker, "1 command(s) to send") == 1, what="the reply")

    assert worker.terminate() == 0
    assert "SIGTERM: stopping once the batch in hand is recorded" in worker.output()


def test_a_reply_waits_out_a_database_outage(
    engine: SagaEngine, processes: Processes, postgres_url: str, broker_url: str
) -> None:
    settings = DatabaseSettings.from_url(postgres_url)
    proxy = TcpProxy(settings.env["POSTGRES_HOST"], int(settings.env["POSTGRES_PORT"]))
    proxied = postgres_url.replace(f":{settings.env['POSTGRES_PORT']}/", f":{proxy.port}/")
    proxied += "&connect_timeout=1"  # give up on each call in seconds, not minutes
    try:
        worker = start_engine_worker(processes, proxied, broker_url, concurrency=1)
        reserve = engine.start(order_fulfillment, order(1), business_key="o-1").commands[0]
        publish_reply(broker_url, reserve.reply_success(reply_id_for(reserve)))
        wait_until(lambda: count_in_log(worker, "1 command(s) to send") == 1, what="a first reply")
        charge = engine.get_state(reserve.saga_id)
        [charge_command] = [c for c in engine.store.outbox(reserve.saga_id) if c["attempt"] == 1][
            1:
        ]

        proxy.cut()  # the worker's pooled connections break, and new ones are refused
        reply = CommandMessage.model_validate(
            {f: charge_command[f] for f in CommandMessage.model_fields}
        ).reply_success(uuid.uuid4(), {"charge_id": "ch-1"})
        publish_reply(broker_url, reply)
        wait_until(
            lambda: count_in_log(worker, "not recorded (StoreError") >= 1,
            timeout=120,
            what="the worker to meet the outage",
        )
        assert engine.get_state(reserve.saga_id) == charge
        proxy.restore()

        wait_until(
            lambda: "charge_payment" in engine.get_state(reserve.saga_id).succeeded,
            timeout=120,
            what="the reply to be recorded once the database is back",
        )
        assert engine.store.count("saga_inbox") == 2
        assert engine.store.dead_letters() == []
    finally:
        proxy.close()


def test_definitions_are_named_as_module_attribute() -> None:
    assert load_definitions("saga_es.demo.order_saga:order_fulfillment") == [order_fulfillment]
    with pytest.raises(ValueError, match="expected module:attribute"):
        load_definitions("saga_es.demo.order_saga")
    with pytest.raises(ValueError, match="not a saga definition"):
        load_definitions("saga_es.demo.order_saga:Order")
    result = CliRunner().invoke(
        cli, ["worker", "--definitions", "nowhere:saga"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2
    assert "No module named 'nowhere'" in result.output


def test_worker_with_an_unreachable_database_is_one_clear_line() -> None:
    result = subprocess.run(
        [str(BIN / "saga-es"), "worker", "--database-url", "postgresql://nobody@127.0.0.1:1/none"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "cannot reach PostgreSQL" in result.stderr
    assert "Traceback" not in result.stderr
