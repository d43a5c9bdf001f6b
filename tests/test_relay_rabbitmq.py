"""The relay against a real RabbitMQ (the session's vhost) and a real PostgreSQL schema.

A real ``celery worker`` runs the published commands; two relay processes share the outbox;
a relay is killed with SIGKILL between publish and mark and restarted; the broker is stopped
and started under a running relay; SIGTERM lets a relay finish its batch and exit 0.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import _rabbitmqctl, order
from kombu import Connection
from processes import wait_until
from relay_support import (
    BIN,
    ROOT,
    Processes,
    command,
    drain_queue,
    insert_rows,
    outbox,
    row_of,
    unpublished,
)

from outbox_relay import AmqpPublisher, BrokerUnavailableError, Relay, open_source
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.messages import CommandMessage

pytestmark = pytest.mark.postgres


@pytest.fixture
def queue(broker_url: str) -> Iterator[str]:
    """A queue of this test's own; deleted afterwards (the vhost goes at the end anyway)."""
    name = f"relay-test-{uuid.uuid4().hex[:8]}"
    yield name
    with Connection(broker_url) as conn:
        conn.default_channel.queue_delete(name)
        conn.default_channel.exchange_delete(name)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path) as running:
        yield running


def cli_relay(database_url: str, broker_url: str, *options: str) -> list[str]:
    return [str(BIN / "saga-es"), "relay", "--database-url", database_url,
            "--broker-url", broker_url, "--poll-interval", "0.2", *options]  # fmt: skip


def relay_process_argv(database_url: str, broker_url: str, *options: str) -> list[str]:
    return [str(BIN / "python"), str(ROOT / "tests" / "relay_process.py"),
            "--database-url", database_url, "--broker-url", broker_url, *options]  # fmt: skip


def wave_rows(sagas: list[uuid.UUID], version: int, queue: str) -> list[dict[str, Any]]:
    return [row_of(command(s, version, queue=queue)) for s in sagas]


def saga_order(messages: list[Any]) -> dict[str, list[int]]:
    """Each saga's command versions in the order the queue delivered them."""
    seen: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        cmd = m.payload[1]["command"]
        seen[cmd["saga_id"]].append(cmd["saga_version"])
    return seen


# -- a real Celery worker ---------------------------------------------------------------------


def test_a_celery_worker_runs_the_command_task_with_its_kwargs_and_task_id(
    postgres_url: str, broker_url: str, processes: Processes, tmp_path: Path
) -> None:
    with SagaEngine([order_fulfillment], database_url=postgres_url) as engine:
        outcome = engine.start(order_fulfillment, order(f"w-{uuid.uuid4().hex[:6]}"),
                               business_key=f"worker-{uuid.uuid4()}")  # fmt: skip
    (cmd,) = outcome.commands
    assert (cmd.command, cmd.queue) == ("inventory.reserve", "inventory")
    relay = Relay(open_source(postgres_url), AmqpPublisher(broker_url))
    try:
        assert relay.publish_pending() == 1
    finally:
        relay.publisher.close()
        relay.source.close()

    output = tmp_path / "ran.jsonl"
    worker = processes.start(
        "celery-worker",
        [str(BIN / "celery"), "-A", "relay_worker_app", "worker", "-Q", cmd.queue, "-P", "solo",
         "-c", "1", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"],
        env={"PYTHONPATH": str(ROOT / "tests"), "SAGA_ES_BROKER_URL": broker_url,
             "RELAY_TEST_OUTPUT": str(output)},
    )  # fmt: skip

    def ran() -> list[dict[str, Any]]:
        if not output.exists():
            return []
        lines = [json.loads(line) for line in output.read_text().splitlines()]
        return [line for line in lines if line["task_id"] == str(cmd.message_id)]

    try:
        wait_until(lambda: ran() or worker.poll() is not None, timeout=60,
                   what="the worker to run the command")  # fmt: skip
        assert worker.poll() is None, processes.log(worker)
        (task,) = ran()
    finally:
        assert processes.stop(worker) == 0, processes.log(worker)
    assert task["task"] == "inventory.reserve"
    assert task["queue"] == "inventory"
    assert task["kwargs"] == {"command": cmd.model_dump(mode="json")}
    assert CommandMessage.model_validate(task["kwargs"]["command"]) == cmd


def test_relay_wakes_on_the_decisions_notification_not_the_poll(
    postgres_url: str, broker_url: str, processes: Processes
) -> None:
    relay = processes.start(
        "relay", [*cli_relay(postgres_url, broker_url)[:-2], "--poll-interval", "120"]
    )
    wait_until(lambda: "relay started" in processes.log(relay) or relay.poll() is not None,
               timeout=30, what="the relay to start")  # fmt: skip
    assert relay.poll() is None, processes.log(relay)
    with SagaEngine([order_fulfillment], database_url=postgres_url) as engine:
        engine.start(order_fulfillment, order("l1"), business_key=f"listen-{uuid.uuid4()}")
        # Published means claimed, and a relay LISTENs before its first claim; it then finds
        # nothing more and waits (up to the poll interval).
        wait_until(lambda: unpublished(postgres_url) == 0, timeout=15, what="the first row")
        engine.start(order_fulfillment, order("l2"), business_key=f"listen-{uuid.uuid4()}")
    # Far sooner than the 120 s poll: only the notification can have woken it.
    wait_until(lambda: unpublished(postgres_url) == 0, timeout=15, what="the row to be published")
    assert processes.stop(relay) == 0, processes.log(relay)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_publishes_from_either_backend(
    request: pytest.FixtureRequest, backend: str, broker_url: str, queue: str
) -> None:
    url = str(request.getfixturevalue(f"{backend}_url"))
    sagas = [uuid.uuid4() for _ in range(20)]
    insert_rows(url, [*wave_rows(sagas, 1, queue), *wave_rows(sagas, 2, queue)])
    relay = Relay(open_source(url), AmqpPublisher(broker_url), batch_size=7)
    try:
        assert relay.publish_pending() == 40
    finally:
        relay.publisher.close()
        relay.source.close()
    messages = drain_queue(broker_url, queue, expected=40)
    assert len(messages) == 40
    assert all(versions == [1, 2] for versions in saga_order(messages).values())
    assert all(m.properties["delivery_mode"] == 2 for m in messages)


# -- several relays, crashes ------------------------------------------------------------------


def test_two_relays_publish_2000_sagas_exactly_once_in_saga_order(
    postgres_url: str, broker_url: str, queue: str, processes: Processes
) -> None:
    relays = [
        processes.start("relay", cli_relay(postgres_url, broker_url, "--batch-size", "100"))
        for _ in range(2)
    ]
    sagas = [uuid.uuid4() for _ in range(2000)]
    for version in (1, 2, 3):  # each wave commits after the previous one, as decisions do
        insert_rows(postgres_url, wave_rows(sagas, version, queue))
    wait_until(lambda: unpublished(postgres_url) == 0, timeout=180, what="all rows published")
    for relay in relays:
        assert processes.stop(relay) == 0, processes.log(relay)
    messages = drain_queue(broker_url, queue, expected=6000, timeout=120)
    ids = Counter(m.headers["id"] for m in messages)
    assert len(messages) == 6000
    assert max(ids.values()) == 1, "a row was published twice"
    order_by_saga = saga_order(messages)
    assert len(order_by_saga) == 2000
    out_of_order = {s: v for s, v in order_by_saga.items() if v != [1, 2, 3]}
    assert not out_of_order, list(out_of_order.items())[:5]
    assert all(r["publish_attempts"] == 1 for r in outbox(postgres_url).values())


def test_a_relay_killed_between_publish_and_mark_is_republished_after_restart(
    postgres_url: str, broker_url: str, queue: str, processes: Processes, tmp_path: Path
) -> None:
    sagas = [uuid.uuid4() for _ in range(500)]
    insert_rows(postgres_url, [*wave_rows(sagas, 1, queue), *wave_rows(sagas, 2, queue)])
    record = tmp_path / "batches.jsonl"
    doomed = processes.start(
        "relay-killed",
        relay_process_argv(postgres_url, broker_url, "--batch-size", "100", "--record", str(record),
                     "--kill-after-batches", "3"),
    )  # fmt: skip
    assert doomed.wait(60) == -9, processes.log(doomed)
    batches = [json.loads(line) for line in record.read_text().splitlines()]
    assert [len(b) for b in batches] == [100, 100, 100]
    in_flight = set(batches[2])
    rows = outbox(postgres_url)
    assert {m for m, r in rows.items() if r["published_at"] is not None} == set(
        batches[0] + batches[1]
    ), "confirmed but unmarked rows must still be unpublished"

    relay = processes.start("relay-restarted", cli_relay(postgres_url, broker_url))
    wait_until(lambda: unpublished(postgres_url) == 0, timeout=60, what="all rows published")
    assert processes.stop(relay) == 0, processes.log(relay)

    messages = drain_queue(broker_url, queue, expected=1000 + len(in_flight))
    counts = Counter(m.headers["id"] for m in messages)
    assert set(counts) == set(rows), "every row reached the queue"
    duplicates = {m for m, n in counts.items() if n > 1}
    assert duplicates == in_flight, "exactly the killed batch was published twice"
    assert sum(counts.values()) - len(counts) == 100
    for saga, versions in saga_order(messages).items():
        assert versions == sorted(versions), f"saga {saga} out of order: {versions}"


# -- the broker goes away ---------------------------------------------------------------------


def test_a_broker_outage_is_waited_out_with_one_warning(
    postgres_url: str, broker_url: str, queue: str, processes: Processes
) -> None:
    relay = processes.start(
        "relay", relay_process_argv(postgres_url, broker_url, "--backoff-cap", "1")
    )
    before = [row_of(command(queue=queue)) for _ in range(300)]
    insert_rows(postgres_url, before)
    wait_until(lambda: unpublished(postgres_url) == 0, timeout=60, what="the first rows")
    _rabbitmqctl("stop_app")
    try:
        during = [row_of(command(queue=queue)) for _ in range(300)]
        insert_rows(postgres_url, during)
        wait_until(lambda: "broker unavailable" in processes.log(relay), timeout=30,
                   what="the relay to notice the outage")  # fmt: skip
        assert unpublished(postgres_url) == 300
    finally:
        _rabbitmqctl("start_app")
    wait_until(lambda: unpublished(postgres_url) == 0, timeout=120,
               what="the rows to be published once the broker is back")  # fmt: skip
    assert processes.stop(relay) == 0, processes.log(relay)
    log = processes.log(relay)
    assert log.count("WARNING outbox_relay: broker unavailable") == 1, log
    assert log.count("INFO outbox_relay: broker available again") == 1, log
    messages = drain_queue(broker_url, queue, expected=600)
    assert {m.headers["id"] for m in messages} == {str(r["message_id"]) for r in before + during}


# -- rows that cannot be published ------------------------------------------------------------


def test_bad_rows_are_parked_with_their_error_and_block_only_their_saga(
    postgres_url: str, broker_url: str, queue: str
) -> None:
    invalid = row_of(command(queue=queue), phase="sideways")
    after_invalid = row_of(command(uuid.UUID(invalid["saga_id"]), 2, queue=queue))
    not_allowed = row_of(command(queue="billing"))
    too_big = row_of(command(queue=queue, payload={"blob": "x" * 5000}))
    refused_by_broker = row_of(command(queue="amq.relay-test"))  # reserved: cannot declare
    good = [row_of(command(queue=queue)) for _ in range(50)]
    insert_rows(postgres_url, [invalid, after_invalid, not_allowed, too_big, refused_by_broker,
                               *good[:25]])  # fmt: skip
    insert_rows(postgres_url, good[25:])
    relay = Relay(
        open_source(postgres_url),
        AmqpPublisher(broker_url, max_message_bytes=4000),
        max_attempts=2,
        allowed_queues=[queue, "amq.relay-*"],
    )
    try:
        assert relay.publish_pending() == 50
        parked = {p.message_id: p for p in relay.parked_rows()}
        blocked = relay.blocked_sagas()
    finally:
        relay.publisher.close()
        relay.source.close()
    messages = drain_queue(broker_url, queue, expected=50)
    assert {m.headers["id"] for m in messages} == {g["message_id"] for g in good}
    errors = {m: (p.publish_attempts, p.last_error) for m, p in parked.items()}
    assert set(errors) == {r["message_id"] for r in (invalid, not_allowed, too_big,
                                                      refused_by_broker)}  # fmt: skip
    assert all(attempts == 2 for attempts, _ in errors.values())
    assert "field 'phase'" in str(errors[invalid["message_id"]][1])
    assert "not an allowed destination" in str(errors[not_allowed["message_id"]][1])
    assert "exceeds the limit of 4000 bytes" in str(errors[too_big["message_id"]][1])
    assert "cannot be declared" in str(errors[refused_by_broker["message_id"]][1])
    assert [(b.message_id, b.held_back) for b in blocked] == [(invalid["message_id"], 1)]
    assert outbox(postgres_url)[after_invalid["message_id"]]["published_at"] is None


# -- stopping ---------------------------------------------------------------------------------


def test_sigterm_finishes_the_batch_in_hand_and_exits_0(
    postgres_url: str, broker_url: str, queue: str, processes: Processes, tmp_path: Path
) -> None:
    insert_rows(postgres_url, [row_of(command(queue=queue)) for _ in range(200)])
    record = tmp_path / "batches.jsonl"
    relay = processes.start(
        "relay",
        relay_process_argv(postgres_url, broker_url, "--batch-size", "50", "--record", str(record),
                     "--term-after-batches", "1"),
    )  # fmt: skip
    assert relay.wait(60) == 0, processes.log(relay)
    (batch,) = [json.loads(line) for line in record.read_text().splitlines()]
    published = {m for m, r in outbox(postgres_url).items() if r["published_at"] is not None}
    assert published == set(batch)
    assert len(batch) == 50
    assert "SIGTERM: stopping once the batch in hand is published and marked" in processes.log(
        relay
    )
    assert len(drain_queue(broker_url, queue, expected=50)) == 50


def test_the_cli_relay_exits_0_on_sigint_while_idle(
    sqlite_url: str, broker_url: str, processes: Processes
) -> None:
    relay = processes.start("relay", cli_relay(sqlite_url, broker_url))
    wait_until(lambda: "relay started" in processes.log(relay) or relay.poll() is not None,
               timeout=30, what="the relay to start")  # fmt: skip
    relay.send_signal(2)
    assert relay.wait(30) == 0, processes.log(relay)


def test_the_cli_relay_reports_missing_tables_in_one_line(tmp_path: Path, broker_url: str) -> None:
    result = subprocess.run(
        cli_relay(f"sqlite:///{tmp_path}/nothing.db", broker_url),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "saga-es db init" in result.stderr
    assert "Traceback" not in result.stderr


# -- the publisher on its own -----------------------------------------------------------------


def test_a_returned_message_is_unconfirmed_and_its_queue_declared_again(
    broker_url: str, queue: str
) -> None:
    publisher = AmqpPublisher(broker_url)
    try:
        first, second, third = (command(queue=queue) for _ in range(3))
        assert publisher.publish([first]).confirmed == {first.message_id}
        with Connection(broker_url) as conn:  # someone deletes the queue behind our back
            conn.default_channel.queue_delete(queue)
        result = publisher.publish([second])
        assert result.confirmed == frozenset()
        assert result.unconfirmed == {second.message_id: "returned by the broker as unroutable"}
        assert publisher.publish([second, third]).confirmed == {second.message_id,
                                                                third.message_id}  # fmt: skip
    finally:
        publisher.close()
    assert [m.headers["id"] for m in drain_queue(broker_url, queue, expected=2)] == [
        str(second.message_id),
        str(third.message_id),
    ]


def test_an_unreachable_broker_fails_fast_as_unavailable() -> None:
    publisher = AmqpPublisher("amqp://guest:guest@127.0.0.1:1//", connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="broker unavailable at amqp://guest:"):
        publisher.publish([command()])
    assert time.monotonic() - started < 2  # kombu's own retry (2 s sleep) is not used
    publisher.close()
