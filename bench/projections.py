"""Projections at size on PostgreSQL: catch-up rate, and query latency over 100,000 sagas.

Loads ``--sagas`` order sagas (about ten events each) straight into the event store, built by
the real pure ``begin``/``decide`` of the demo order saga: most complete; some are declined at
the charge, run out of stock, find no carrier (and compensate), hit a transient payment error
and are retried after their backoff, or time out at shipping and get stuck. ``--in-flight``
sagas advance at once, so the log interleaves them as a busy engine's would. The events go in
through the recorder in large batches (no outbox rows: nothing reads them here).

Then, in the same run on the same log:

* baseline: read every notification with the library's own ``select_notifications`` (batches
  of ``--batch-size``) and decode it with ``mapper.to_domain_event``: reading the log and
  nothing else, the floor under any projection.
* ours: ``ProjectionRunner.catch_up()`` from position 0: the same read and decode, plus the
  status, audit and statistics views written, each batch in one transaction.
* query latency (p50/p99 over ``--samples`` calls): status by id, list by state (first page
  and a page deep in the keyset order), and a saga's history.

Everything runs in a fresh schema, dropped at the end (even on error).

    python bench/projections.py [--sagas 100000] [--in-flight 200] [--batch-size 1000]
                                [--samples 500] [--database-url postgresql://...]

The last line compares catch-up with the bare log read:

    ratio=<ours/baseline> ours=<events/s> baseline=<events/s> unit=events/s
"""

from __future__ import annotations

import sys
from pathlib import Path

# This script is named like the package it measures: keep its own folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import deque  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from decimal import Decimal  # noqa: E402
from typing import Any  # noqa: E402

import psycopg  # noqa: E402

from projections.queries import SagaQueries  # noqa: E402
from projections.runner import ProjectionRunner  # noqa: E402
from saga_es.decide import Decision, TimerFired, begin, decide  # noqa: E402
from saga_es.demo.order_saga import Order, OrderLine, order_fulfillment  # noqa: E402
from saga_es.ids import saga_id_for  # noqa: E402
from saga_es.messages import CommandMessage  # noqa: E402
from saga_es.persistence.settings import DatabaseSettings  # noqa: E402
from saga_es.persistence.store import SagaStore, init_database  # noqa: E402
from saga_es.state import SagaState, next_timer  # noqa: E402

DEFAULT_URL = "postgresql://root@127.0.0.1:5432/test"

#: How each saga's participants behave: (share, step that misbehaves, how).
FATES = [
    (0.80, None, None),
    (0.06, "charge_payment", "card_declined"),
    (0.04, "reserve_inventory", "out_of_stock"),
    (0.04, "create_shipment", "no_carrier"),
    (0.04, "charge_payment", "transient"),
    (0.02, "create_shipment", "timeout"),
]


class SagaRun:
    """One saga being driven: its state, the command it waits on, and its fate."""

    def __init__(self, key: str, fate: tuple[str | None, str | None], now: datetime) -> None:
        data = Order(
            order_id=key, customer_id="c-42", amount=Decimal("59.90"), currency="EUR",
            lines=[OrderLine(sku="SKU-1", quantity=2), OrderLine(sku="SKU-2", quantity=1)],
        )  # fmt: skip
        decision = begin(
            order_fulfillment, saga_id=saga_id_for(order_fulfillment.name, key),
            business_key=key, data=data, correlation_id=f"c-{key}", now=now,
        )  # fmt: skip
        self.fate_step, self.fate = fate
        self.state: SagaState | None = None
        self.command: CommandMessage | None = None
        self.pending: list[Any] = []
        self.take(decision)

    def take(self, decision: Decision) -> None:
        self.pending.extend(decision.events)
        self.state = decision.state
        self.command = decision.commands[-1] if decision.commands else None

    def advance(self, now: datetime) -> None:
        assert self.state is not None
        timer = next_timer(self.state)
        if self.command is None or self.state.retry_wait is not None:
            assert timer is not None
            self.take(
                decide(
                    order_fulfillment,
                    self.state,
                    TimerFired(self.state.saga_id, timer.timer_id),
                    max(now, timer.due),
                )
            )
            return
        c = self.command
        if c.step == self.fate_step and c.phase == "action":
            if self.fate == "timeout":
                assert timer is not None
                fired = TimerFired(self.state.saga_id, timer.timer_id)
                self.take(decide(order_fulfillment, self.state, fired, max(now, timer.due)))
                return
            if self.fate == "transient" and c.attempt == 1:
                reply = c.reply_failure(
                    uuid.uuid4(), "gateway_timeout", "try again", retryable=True
                )
                self.take(decide(order_fulfillment, self.state, reply, now))
                return
            if self.fate not in ("transient",):
                reply = c.reply_failure(uuid.uuid4(), self.fate or "error", "refused")
                self.take(decide(order_fulfillment, self.state, reply, now))
                return
        reply = c.reply_success(uuid.uuid4(), {"step": c.step, "ok": True})
        self.take(decide(order_fulfillment, self.state, reply, now))

    @property
    def done(self) -> bool:
        return self.state is not None and self.state.is_terminal


def generate(sagas: int, in_flight: int, seed: int = 7) -> Iterator[list[Any]]:
    """Chunks of events in log order: ``in_flight`` sagas advancing in turn."""
    rng = random.Random(seed)
    now = datetime(2030, 1, 1, tzinfo=UTC)
    waiting: deque[SagaRun] = deque()
    started = 0
    chunk: list[Any] = []
    while started < sagas or waiting:
        while started < sagas and len(waiting) < in_flight:
            roll, fate = rng.random(), FATES[0]
            for share, *rest in FATES:
                if roll < share:
                    fate = (share, *rest)
                    break
                roll -= share
            waiting.append(SagaRun(f"o-{started}", (fate[1], fate[2]), now))
            started += 1
        run = waiting.popleft()
        now += timedelta(microseconds=rng.randint(200, 3000))
        if run.pending:
            chunk.extend(run.pending)
            run.pending = []
        elif not run.done:
            run.advance(now)
            chunk.extend(run.pending)
            run.pending = []
        if not run.done:
            waiting.append(run)
        if len(chunk) >= 5000:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def load(store: SagaStore, sagas: int, in_flight: int) -> int:
    count = 0
    for chunk in generate(sagas, in_flight):
        store.app.events.put(chunk)
        count += len(chunk)
    return count


def baseline(store: SagaStore, batch_size: int) -> tuple[int, float]:
    recorder, mapper = store.app.recorder, store.app.mapper
    position, count = 0, 0
    started = time.perf_counter()
    while True:
        notifications = recorder.select_notifications(
            start=position, limit=batch_size, inclusive_of_start=False
        )
        if not notifications:
            break
        for n in notifications:
            mapper.to_domain_event(n)
        count += len(notifications)
        position = notifications[-1].id
    return count, time.perf_counter() - started


def latencies(call: Callable[[int], Any], samples: int) -> tuple[float, float]:
    timings = []
    for i in range(samples):
        started = time.perf_counter()
        call(i)
        timings.append((time.perf_counter() - started) * 1000)
    timings.sort()
    p99 = timings[min(len(timings) - 1, round(0.99 * len(timings)) - 1)]
    return statistics.median(timings), p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sagas", type=int, default=100_000)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--database-url", default=DEFAULT_URL)
    args = parser.parse_args()

    schema = f"bench_projections_{uuid.uuid4().hex[:8]}"
    sep = "&" if "?" in args.database_url else "?"
    settings = DatabaseSettings.from_url(f"{args.database_url}{sep}schema={schema}")
    init_database(settings)
    try:
        store = SagaStore(settings, create_tables=False)
        try:
            run(store, settings, args)
        finally:
            store.close()
    finally:
        conninfo = DatabaseSettings.from_url(args.database_url).psycopg_conninfo
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def run(store: SagaStore, settings: DatabaseSettings, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    events = load(store, args.sagas, args.in_flight)
    print(f"loaded {args.sagas} sagas, {events} events in {time.perf_counter() - started:.1f}s")

    count, seconds = baseline(store, args.batch_size)
    theirs = count / seconds
    print(f"baseline: select_notifications + to_domain_event: {count} events in {seconds:.1f}s")

    with ProjectionRunner(settings, batch_size=args.batch_size, store=store) as runner:
        started = time.perf_counter()
        applied = runner.catch_up()
        seconds = time.perf_counter() - started
    ours = applied / seconds
    print(f"catch-up: {applied} events into status, audit and stats in {seconds:.1f}s")

    queries = SagaQueries(settings)
    try:
        report_queries(queries, store, args.samples)
    finally:
        queries.close()
    print(f"ratio={ours / theirs:.2f} ours={ours:.0f} baseline={theirs:.0f} unit=events/s")


def report_queries(queries: SagaQueries, store: SagaStore, samples: int) -> None:
    rng = random.Random(11)
    ids = store.saga_ids()
    picks = [rng.choice(ids) for _ in range(samples)]
    # A cursor deep into the list: the last row of a page that ends half-way through it.
    completed = queries.list_sagas(state="completed", limit=1).items
    deep_cursor = None
    position = 0
    page_cursor: str | None = None
    while completed and position < len(ids) // 2:
        page = queries.list_sagas(state="completed", limit=1000, after=page_cursor)
        position += len(page.items)
        page_cursor = page.next_cursor
        if page_cursor is None:
            break
        deep_cursor = page_cursor
    results = {
        "status by id": latencies(lambda i: queries.status(picks[i]), samples),
        "list by state, first page": latencies(
            lambda i: queries.list_sagas(state="completed", limit=50), samples
        ),
        "list by state, deep page": latencies(
            lambda i: queries.list_sagas(state="completed", limit=50, after=deep_cursor), samples
        ),
        "history": latencies(lambda i: queries.history(picks[i]), samples),
    }
    for name, (p50, p99) in results.items():
        print(f"{name:28s} p50={p50:6.2f} ms  p99={p99:6.2f} ms")


if __name__ == "__main__":
    main()
