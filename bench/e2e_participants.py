"""Participants for bench/e2e.py doing what the chain's tasks do: one INSERT per step.

Each handler inserts one row through the SDK, which adds what makes it a saga participant:
the inbox row keyed by the idempotency key in the same transaction, and the reply. Like the
chain's tasks, the handlers write with psycopg (``using="psycopg"``: the transaction's own
connection). The shipment fails for orders whose id starts with ``fail-`` (a business failure:
compensate). Configured by environment: ``SAGA_ES_EXAMPLES_DATABASE_URL``,
``SAGA_ES_BROKER_URL``.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
from sqlalchemy import text

from saga_es.messages import CommandMessage
from saga_es.messaging import celery_app
from saga_es.participant import BusinessError, Participant

QUEUES = ("inventory", "payment", "shipping", "notification")
app = celery_app(name="bench-participants")
app.conf.task_queues = {q: {"exchange": q, "routing_key": q} for q in QUEUES}
_url = os.environ.get("SAGA_ES_EXAMPLES_DATABASE_URL", "sqlite:///bench-e2e.db")
services = {name: Participant(name, database_url=_url, celery=app) for name in QUEUES}


def record(
    connection: psycopg.Connection[Any], command: CommandMessage, step: str
) -> dict[str, Any]:
    connection.execute(
        "INSERT INTO bench_effects (order_id, step) VALUES (%s, %s)",
        (command.payload["data"]["order_id"], step),
    )
    return {}


def handler(step: str, fails: bool = False) -> Any:
    def handle(command: CommandMessage, connection: psycopg.Connection[Any]) -> dict[str, Any]:
        if fails and command.payload["data"]["order_id"].startswith("fail-"):
            raise BusinessError("no_carrier", "no carrier for this order")
        return record(connection, command, step)

    handle.__name__ = step.replace(".", "_")
    return handle


for command_name, fails in (
    ("inventory.reserve", False),
    ("inventory.release", False),
    ("payment.charge", False),
    ("payment.refund", False),
    ("shipping.create", True),
    ("notification.send", False),
):
    service = services[command_name.split(".")[0]]
    service.handles(command_name, using="psycopg")(handler(command_name, fails))


def create_tables() -> None:
    for service in services.values():
        service.create_tables()
    with services["inventory"].database.engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE IF NOT EXISTS bench_effects (id bigserial PRIMARY KEY, "
                "order_id text NOT NULL, step text NOT NULL)"
            )
        )
