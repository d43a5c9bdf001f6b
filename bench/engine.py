"""Engine throughput on PostgreSQL: decisions per second against a plain INSERT+COMMIT loop.

One order saga is five decisions: the start plus one success reply to each of its four steps
(each reply answers the command the previous decision put in the outbox). A decision appends
the saga's events and writes its outbox, inbox and timer rows in one transaction.

Two ways of driving the engine are measured, both single-threaded:

* worker: how an engine worker runs. Each saga is started on its own (an API request each);
  replies are handled as a worker drains its queue, ``handle_replies`` on batches of up to
  ``--batch`` replies, whose decisions commit in one transaction (group commit).
* one-by-one: every decision in its own transaction (``start`` / ``handle_reply``).

The baseline, in the same run on the same server, is a psycopg 3 loop of single-row
INSERT + COMMIT into a three-column table, as many rows as the engine makes decisions: the
cheapest durable write per operation. Everything runs in a fresh schema dropped at the end
(even on error); rounds alternate which side goes first; medians are reported.

    python bench/engine.py [--sagas 2000] [--rounds 3] [--batch 100]
                           [--database-url postgresql://root@127.0.0.1:5432/test]

The last line compares the worker mode with the baseline:

    ratio=<ours/baseline> ours=<decisions/s> baseline=<inserts/s> unit=decisions/s
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from saga_es.demo.order_saga import Order, OrderLine, order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.messages import CommandMessage
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.store import init_database
from saga_es.state import SagaStatus

DEFAULT_URL = "postgresql://root@127.0.0.1:5432/test"
DECISIONS_PER_SAGA = 5  # start + one success reply for each of the four steps


def order(key: str) -> Order:
    return Order(
        order_id=key,
        customer_id="c-42",
        lines=[OrderLine(sku="SKU-1", quantity=2), OrderLine(sku="SKU-2", quantity=1)],
        amount=Decimal("59.90"),
        currency="EUR",
    )


def success(command: CommandMessage) -> Any:
    return command.reply_success(uuid.uuid4(), {"step": command.step, "ok": True})


def worker_mode(engine: SagaEngine, keys: Sequence[str], batch: int) -> int:
    """Start each saga alone, then answer commands in batches, wave after wave."""
    commands = [engine.start(order_fulfillment, order(k), business_key=k).commands[0] for k in keys]
    decisions = len(keys)
    while commands:
        following: list[CommandMessage] = []
        for i in range(0, len(commands), batch):
            for outcome in engine.handle_replies([success(c) for c in commands[i : i + batch]]):
                if isinstance(outcome, Exception):
                    raise outcome
                following.extend(outcome.commands)
                decisions += 1
        commands = following
    return decisions


def one_by_one(engine: SagaEngine, keys: Sequence[str]) -> int:
    decisions = 0
    for key in keys:
        outcome = engine.start(order_fulfillment, order(key), business_key=key)
        decisions += 1
        while outcome.commands:
            outcome = engine.handle_reply(success(outcome.commands[0]))
            decisions += 1
    return decisions


def baseline(conninfo: str, schema: str, count: int) -> float:
    sql = f'INSERT INTO "{schema}".baseline (id, saga_id, payload) VALUES (%s, %s, %s)'
    with psycopg.connect(conninfo) as conn:
        started = time.perf_counter()
        for i in range(count):
            conn.execute(sql, (uuid.uuid4(), uuid.uuid4(), Jsonb({"n": i, "step": "reserve"})))
            conn.commit()
        return count / (time.perf_counter() - started)


def timed(run: Any, engine: SagaEngine, keys: Sequence[str], *extra: Any) -> float:
    started = time.perf_counter()
    decisions = run(engine, keys, *extra)
    rate = decisions / (time.perf_counter() - started)
    if decisions != len(keys) * DECISIONS_PER_SAGA:
        raise RuntimeError(f"expected {len(keys) * DECISIONS_PER_SAGA} decisions, made {decisions}")
    for key in keys[:: max(1, len(keys) // 50)]:
        state = engine.get_state(engine.saga_id(order_fulfillment.name, key))
        if state.status is not SagaStatus.COMPLETED:
            raise RuntimeError(f"saga {key} ended {state.status}, not completed")
    return rate


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100, help="replies per handle_replies call")
    parser.add_argument("--database-url", default=DEFAULT_URL)
    args = parser.parse_args(argv)

    schema = f"bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    base = DatabaseSettings.from_url(args.database_url)
    url = f"{args.database_url}{'&' if '?' in args.database_url else '?'}schema={schema}"
    rows: list[tuple[float, float, float]] = []
    try:
        init_database(DatabaseSettings.from_url(url))
        with psycopg.connect(base.psycopg_conninfo, autocommit=True) as conn:
            conn.execute(
                f'CREATE TABLE "{schema}".baseline '
                "(id uuid PRIMARY KEY, saga_id uuid NOT NULL, payload jsonb NOT NULL)"
            )
        with SagaEngine([order_fulfillment], database_url=url) as engine:
            worker_mode(engine, [f"warm-{i}" for i in range(40)], args.batch)
            one_by_one(engine, [f"warm1-{i}" for i in range(20)])
            baseline(base.psycopg_conninfo, schema, 200)
            operations = args.sagas * DECISIONS_PER_SAGA
            for r in range(args.rounds):
                keys = [f"r{r}-{i}" for i in range(args.sagas)]
                single = [f"r{r}-single-{i}" for i in range(max(1, args.sagas // 4))]
                if r % 2:
                    plain = baseline(base.psycopg_conninfo, schema, operations)
                    ours = timed(worker_mode, engine, keys, args.batch)
                else:
                    ours = timed(worker_mode, engine, keys, args.batch)
                    plain = baseline(base.psycopg_conninfo, schema, operations)
                alone = timed(one_by_one, engine, single)
                rows.append((ours, alone, plain))
                print(
                    f"round {r + 1}: worker {ours:7.0f} dec/s   one-by-one {alone:7.0f} dec/s"
                    f"   INSERT+COMMIT {plain:7.0f} /s",
                    flush=True,
                )
    finally:
        with psycopg.connect(base.psycopg_conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    ours, alone, plain = (statistics.median(column) for column in zip(*rows, strict=True))
    print(
        f"median : worker {ours:7.0f} dec/s   one-by-one {alone:7.0f} dec/s"
        f"   INSERT+COMMIT {plain:7.0f} /s   (one-by-one ratio {alone / plain:.2f})"
    )
    print(f"ratio={ours / plain:.2f} ours={ours:.0f} baseline={plain:.0f} unit=decisions/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
