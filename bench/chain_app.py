"""The naive alternative for bench/e2e.py: a Celery chain of the order's four steps.

What a Python team writes without a saga engine: each step a task doing one INSERT + COMMIT,
the steps chained, and a ``link_error`` task that undoes the earlier steps when one fails.
RabbitMQ with publisher confirms; run with ``--pool=prefork -c 2``. Configured by environment:
``CHAIN_DATABASE`` (psycopg conninfo), ``CHAIN_SCHEMA``, ``CHAIN_BROKER_URL``.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
from celery import Celery


def make_app(broker_url: str) -> Celery:
    """The worker's app, and a fresh one per run for the side that submits chains."""
    app = Celery("chain", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_default_queue="chain",
        broker_transport_options={"confirm_publish": True},
        worker_hijack_root_logger=False,
    )
    return app


app = make_app(os.environ.get("CHAIN_BROKER_URL", "amqp://guest:guest@127.0.0.1//"))
SCHEMA = os.environ.get("CHAIN_SCHEMA", "public")
_connection: psycopg.Connection[Any] | None = None


def connection() -> psycopg.Connection[Any]:
    global _connection  # one connection per worker process, opened after the fork
    if _connection is None or _connection.closed:
        _connection = psycopg.connect(os.environ.get("CHAIN_DATABASE", "dbname=test"))
    return _connection


def record(order_id: str, step: str) -> str:
    conn = connection()
    conn.execute(
        f'INSERT INTO "{SCHEMA}".chain_effects (order_id, step) VALUES (%s, %s)', (order_id, step)
    )
    conn.commit()
    return order_id


@app.task(name="chain.reserve")
def reserve(order_id: str) -> str:
    return record(order_id, "reserve")


@app.task(name="chain.charge")
def charge(order_id: str) -> str:
    return record(order_id, "charge")


@app.task(name="chain.ship")
def ship(order_id: str) -> str:
    if order_id.startswith("fail-"):
        raise RuntimeError(f"no carrier for {order_id}")
    return record(order_id, "ship")


@app.task(name="chain.notify")
def notify(order_id: str) -> str:
    return record(order_id, "notify")


@app.task(name="chain.compensate")
def compensate(request: Any, exc: Any, traceback: Any, order_id: str) -> None:
    conn = connection()
    conn.execute(
        f'UPDATE "{SCHEMA}".chain_effects SET compensated = true WHERE order_id = %s', (order_id,)
    )
    conn.execute(
        f'INSERT INTO "{SCHEMA}".chain_effects (order_id, step) VALUES (%s, %s)',
        (order_id, "compensated"),
    )
    conn.commit()
