"""Relay throughput, PostgreSQL to RabbitMQ: messages per second against raw kombu publishing.

ours: N outbox rows (one saga each, as a burst of started sagas leaves them) are published by
the relay: claim a batch with FOR UPDATE SKIP LOCKED, validate each row, build the Celery
message, publish the batch, wait once for the broker's confirms, mark the rows published and
commit; until no row is left. The clock runs from the first claim to the last commit.

baseline: the same number of messages of the same size (the relay's own Celery message body
and headers) published to the same queue with kombu and py-amqp's per-message publisher
confirms (``transport_options={"confirm_publish": True}``, persistent): the usual way to
publish reliably from Python, with no database at all.

Each round inserts fresh rows (untimed), runs both sides (alternating which goes first), and
purges the queue between sides. Everything runs in a fresh PostgreSQL schema and a fresh
queue, both dropped at the end (even on error). Medians are reported.

    python bench/relay.py [--rows 20000] [--rounds 3] [--batch-size 500]
        [--database-url postgresql://root@127.0.0.1:5432/test]
        [--broker-url amqp://guest:guest@127.0.0.1:5672//]

The last line:

    ratio=<ours/baseline> ours=<msg/s> baseline=<msg/s> unit=messages/s
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import psycopg
from kombu import Connection, Exchange, Producer, Queue

from outbox_relay import AmqpPublisher, PostgresOutboxSource, Relay
from outbox_relay.celery_wire import CeleryWire
from saga_es.messages import CommandMessage
from saga_es.messaging import celery_app
from saga_es.persistence.schema import OUTBOX_COLUMNS
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.store import init_database

DEFAULT_DATABASE = "postgresql://root@127.0.0.1:5432/test"
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def command(queue: str, n: int) -> CommandMessage:
    saga_id, now = uuid.uuid4(), datetime.now(UTC)
    return CommandMessage(
        message_id=uuid.uuid4(),
        saga_id=saga_id,
        saga_version=1,
        definition="order_fulfillment",
        definition_version=1,
        step="charge",
        phase="action",
        attempt=1,
        command="payment.charge",
        idempotency_key=uuid.uuid4(),
        payload={
            "order_id": f"order-{n:08d}",
            "customer_id": "c-42",
            "lines": [{"sku": "SKU-1", "quantity": 2}, {"sku": "SKU-2", "quantity": 1}],
            "amount": "59.90",
            "currency": "EUR",
        },
        correlation_id=f"order-{n:08d}",
        causation_id=uuid.uuid4(),
        queue=queue,
        deadline=now + timedelta(minutes=5),
        created_at=now,
    )


def insert_rows(conninfo: str, schema: str, queue: str, count: int, offset: int) -> None:
    """COPY, as fast as the table takes them; the decisions' own path is bench/engine.py."""
    with psycopg.connect(conninfo) as conn, conn.cursor() as cursor:
        columns = ", ".join(OUTBOX_COLUMNS)
        with cursor.copy(f'COPY "{schema}".saga_outbox ({columns}) FROM STDIN') as copy:
            for n in range(offset, offset + count):
                row = command(queue, n).model_dump(mode="json")
                row["position"] = 0
                row["payload"] = psycopg.types.json.Jsonb(row["payload"])
                copy.write_row([row[c] for c in OUTBOX_COLUMNS])
        conn.commit()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # Fresh statistics, as autovacuum would have after a burst, so the claim plan is the
        # one a running system gets.
        conn.execute(f'VACUUM ANALYZE "{schema}".saga_outbox')


def run_relay(url: str, broker_url: str, batch_size: int, expected: int) -> float:
    settings = DatabaseSettings.from_url(url)
    relay = Relay(
        PostgresOutboxSource(settings), AmqpPublisher(broker_url), batch_size=batch_size,
        retention=None,
    )  # fmt: skip
    try:
        started = time.perf_counter()
        published = relay.publish_pending()
        elapsed = time.perf_counter() - started
    finally:
        relay.publisher.close()
        relay.source.close()
    if published != expected:
        raise RuntimeError(f"the relay published {published} messages, expected {expected}")
    return published / elapsed


def run_baseline(broker_url: str, queue: str, sample: CommandMessage, count: int) -> float:
    wire = CeleryWire(celery_app(broker_url)).encode(sample)
    properties = {k: v for k, v in wire.properties.items() if k != "delivery_mode"}
    target = Queue(queue, Exchange(queue, "direct", durable=True), routing_key=queue, durable=True)
    with Connection(broker_url, transport_options={"confirm_publish": True}) as conn:
        producer = Producer(conn.default_channel)
        target(producer.channel).declare()
        producer.publish(wire.body, routing_key=queue, content_type=wire.content_type,
                         content_encoding=wire.content_encoding, headers=wire.headers,
                         delivery_mode=2, **properties)  # fmt: skip  # warm-up
        started = time.perf_counter()
        for _ in range(count):
            producer.publish(wire.body, routing_key=queue, content_type=wire.content_type,
                             content_encoding=wire.content_encoding, headers=wire.headers,
                             delivery_mode=2, **properties)  # fmt: skip
        return count / (time.perf_counter() - started)


def purge(broker_url: str, queue: str) -> int:
    with Connection(broker_url) as conn:
        return int(conn.default_channel.queue_purge(queue) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER)
    args = parser.parse_args(argv)

    schema = f"bench_relay_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    queue = f"bench-relay-{uuid.uuid4().hex[:8]}"
    base = DatabaseSettings.from_url(args.database_url)
    url = f"{args.database_url}{'&' if '?' in args.database_url else '?'}schema={schema}"
    results: list[tuple[float, float]] = []
    try:
        init_database(DatabaseSettings.from_url(url))
        insert_rows(base.psycopg_conninfo, schema, queue, 1 + args.batch_size, 0)
        run_relay(url, args.broker_url, args.batch_size, 1 + args.batch_size)  # warm-up
        run_baseline(args.broker_url, queue, command(queue, 0), 200)
        purge(args.broker_url, queue)
        for r in range(args.rounds):
            offset = (r + 1) * 10 * args.rows
            insert_rows(base.psycopg_conninfo, schema, queue, args.rows, offset)
            sides: dict[str, float] = {}
            for side in ("ours", "baseline") if r % 2 == 0 else ("baseline", "ours"):
                if side == "ours":
                    sides[side] = run_relay(url, args.broker_url, args.batch_size, args.rows)
                else:
                    sides[side] = run_baseline(
                        args.broker_url, queue, command(queue, offset), args.rows
                    )
                purge(args.broker_url, queue)
            results.append((sides["ours"], sides["baseline"]))
            print(
                f"round {r + 1}: relay {sides['ours']:8.0f} msg/s   "
                f"kombu+confirm_publish {sides['baseline']:8.0f} msg/s",
                flush=True,
            )
    finally:
        with psycopg.connect(base.psycopg_conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        with Connection(args.broker_url) as conn:
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)

    ours, baseline = (statistics.median(column) for column in zip(*results, strict=True))
    print(f"median : relay {ours:8.0f} msg/s   kombu+confirm_publish {baseline:8.0f} msg/s")
    print(f"ratio={ours / baseline:.2f} ours={ours:.0f} baseline={baseline:.0f} unit=messages/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
