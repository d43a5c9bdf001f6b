"""The demo: a batch of order sagas through the real path, in one process.

The engine commits each saga's commands to the outbox; the relay publishes them through
Celery; Celery workers run the example participants (inventory, payment, shipping,
notification), whose replies go back through Celery to the engine worker, which decides the
next step. Embedded default: an SQLite file for the sagas, one for the shop, and Celery's
in-process ``memory://`` broker, with the relay and the two Celery workers on threads. With a
PostgreSQL and a RabbitMQ URL the very same components run against those servers.

Every run tells the same story: orders ending in 3 have their card declined, in 7 find no
carrier (the pivot fails), in 5 hit a transient payment error once that the participant retries.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from celery.contrib.testing.worker import start_worker

from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.messaging import REPLY_QUEUE
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.store import init_database
from saga_es.state import SagaStatus
from saga_es.worker import EngineWorker

__all__ = ["FAULTS", "DemoReport", "run_demo"]

FAULTS = (
    "payment.charge=fail:card_declined@order-*3;"
    "shipping.create=fail:no_carrier@order-*7;"
    "payment.charge=transient:1@order-*5"
)


@dataclass
class DemoReport:
    counts: dict[str, int] = field(default_factory=dict)
    events: int = 0
    outbox_published: int = 0
    effects: dict[str, int] = field(default_factory=dict)
    timeline: list[Any] = field(default_factory=list)
    seconds: float = 0.0


def run_demo(
    *,
    database_url: str,
    shop_database_url: str,
    broker_url: str,
    sagas: int,
    on_progress: Callable[[int], None] = lambda _: None,
    timeout: float = 300.0,
) -> DemoReport:
    # The example services read their settings from the environment when first imported.
    os.environ["SAGA_ES_EXAMPLES_DATABASE_URL"] = shop_database_url
    os.environ["SAGA_ES_BROKER_URL"] = broker_url
    os.environ.setdefault("SAGA_ES_EXAMPLES_FAULTS", FAULTS)
    os.environ.setdefault("SAGA_ES_EXAMPLES_BACKOFF", "0.2")
    from examples.order_fulfillment import services as shop

    init_database(DatabaseSettings.resolve(database_url))
    shop.create_tables()
    run = uuid.uuid4().hex[:6]  # fresh business keys: a rerun on a kept database starts anew
    started = time.perf_counter()
    # One Celery app and one in-process worker for the participants and the engine worker:
    # a solo pool runs tasks with the process's current app, so two apps would not mix.
    EngineWorker([order_fulfillment], database_url=database_url, celery=shop.app)
    with (
        _celery_worker(shop.app, [*(p.name for p in shop.participants), REPLY_QUEUE]),
        _relay(database_url, broker_url),
        SagaEngine([order_fulfillment], database_url=database_url) as engine,
    ):
        ids = [
            engine.start(order_fulfillment, _order(run, n), business_key=f"order-{run}-{n}").saga_id
            for n in range(1, sagas + 1)
        ]
        waiting = set(ids)
        deadline = time.monotonic() + timeout
        while waiting:
            waiting = {i for i in waiting if not engine.get_state(i).is_terminal}
            on_progress(len(ids) - len(waiting))
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} sagas unfinished after {timeout:.0f}s")
            time.sleep(0.1)
        return _report(engine, shop, ids, time.perf_counter() - started)


def _order(run: str, n: int) -> dict[str, Any]:
    return {
        "order_id": f"order-{run}-{n}",
        "customer_id": f"customer-{n % 7}",
        "lines": [{"sku": f"SKU-{n % 5}", "quantity": 1 + n % 3}],
        "amount": f"{10 + n}.00",
        "currency": "EUR",
    }


@contextmanager
def _celery_worker(app: Any, queues: list[str]) -> Iterator[None]:
    # An in-process Celery worker on a thread: the same consumer and task machinery as
    # `celery worker`, without a process of its own.
    try:
        with start_worker(
            app,
            pool="solo",
            queues=queues,
            perform_ping_check=False,
            loglevel="ERROR",
            shutdown_timeout=30,
        ):
            yield
    except RuntimeError as exc:
        # The sagas are finished and their report is built by now: a worker thread slow to
        # let go of its broker connection (a daemon thread, gone with the process) is no
        # reason to fail the demo.
        if "failed to exit" not in str(exc):
            raise
        warnings.warn(f"the demo's Celery worker is still stopping: {exc}", stacklevel=1)


@contextmanager
def _relay(database_url: str, broker_url: str) -> Iterator[None]:
    from outbox_relay.relay import Relay
    from outbox_relay.runner import open_publisher, open_source

    source = open_source(database_url)
    publisher = open_publisher(broker_url)
    relay = Relay(source, publisher, poll_interval=0.05, retention=None)
    thread = threading.Thread(target=relay.run, name="saga-es-relay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        relay.stop()
        thread.join(30)
        publisher.close()
        source.close()


def _report(engine: SagaEngine, shop: Any, ids: list[uuid.UUID], seconds: float) -> DemoReport:
    from examples.order_fulfillment import models

    report = DemoReport(seconds=seconds)
    states = [engine.get_state(i) for i in ids]
    for status in SagaStatus:
        report.counts[status.value] = sum(1 for s in states if s.status is status)
    report.events = sum(s.version for s in states)
    report.outbox_published = sum(
        1 for row in engine.store.outbox() if row["saga_id"] in set(ids) and row["published_at"]
    )
    with shop.participants[0].sessions() as session:
        for model in (models.Reservation, models.Charge, models.Shipment, models.Notification):
            report.effects[model.__tablename__] = session.query(model).count()
    compensated = [s for s in states if s.status is SagaStatus.FAILED and len(s.compensated) > 1]
    if compensated:
        report.timeline = engine.events(compensated[0].saga_id)
    return report
