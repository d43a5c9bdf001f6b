"""All four example services in one Celery app:

    celery -A examples.order_fulfillment.services worker -Q inventory,payment,shipping,notification

On SQLite the tables are created when the worker starts; on PostgreSQL run
``python -m examples.order_fulfillment init-db`` once first (two workers creating tables at
the same moment can fail, as for the engine's own tables).
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_init

from examples.order_fulfillment.faults import FaultRow
from examples.order_fulfillment.inventory import inventory
from examples.order_fulfillment.models import Base
from examples.order_fulfillment.notification import notification
from examples.order_fulfillment.payment import payment
from examples.order_fulfillment.runtime import app
from examples.order_fulfillment.shipping import shipping

__all__ = ["FaultRow", "app", "create_tables", "participants"]

participants = (inventory, payment, shipping, notification)


def create_tables() -> None:
    """The participants' inbox tables, the services' tables and the fault switches (the four
    services share ``settings.database_url``)."""
    for service in participants:
        service.create_tables()  # also creates the URL's schema, if it names one
    with inventory.database.engine.begin() as connection:
        Base.metadata.create_all(connection)


def _create_tables_on_sqlite(**_: Any) -> None:
    if inventory.database.backend == "sqlite":
        create_tables()


worker_init.connect(_create_tables_on_sqlite, weak=False)
