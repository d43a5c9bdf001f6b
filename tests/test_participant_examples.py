"""The example services' fault switches, in-process on SQLite: what each mode does, to which
orders, and how the environment variable spells them."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import order
from example_services import ExampleDatabase

from examples.order_fulfillment.faults import (
    InjectedTransientError,
    Switch,
    inject_faults,
    parse_switches,
)
from examples.order_fulfillment.inventory import reserve as reserve_handler
from examples.order_fulfillment.models import Reservation
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.messages import CommandMessage
from saga_es.participant import BusinessError
from saga_es.participant.delivery import Delivery, delivering


@pytest.fixture
def db(tmp_path: Path) -> Iterator[ExampleDatabase]:
    database = ExampleDatabase(f"sqlite:///{tmp_path}/shop.db")
    database.create_tables()
    yield database
    database.close()


@pytest.fixture
def reserve(sqlite_url: str) -> CommandMessage:
    with SagaEngine([order_fulfillment], database_url=sqlite_url) as engine:
        return engine.start(order_fulfillment, order(13), business_key="o-13").commands[0]


def inject(db: ExampleDatabase, command: CommandMessage, retries: int = 0) -> None:
    with db.sessions() as session, delivering(Delivery("t", retries, redelivered=False)):
        inject_faults(command, session)


def test_switches_apply_to_their_command_and_matching_orders(
    db: ExampleDatabase, reserve: CommandMessage
) -> None:
    db.set_fault(Switch("inventory.reserve", "fail", "o-2*", error_code="out_of_stock"))
    db.set_fault(Switch("payment.charge", "fail", "*"))
    inject(db, reserve)  # neither switch is for this command and order

    db.set_fault(Switch("inventory.reserve", "fail", "o-1?", error_code="out_of_stock"))
    with pytest.raises(BusinessError, match="out_of_stock: switched to fail for order o-13"):
        inject(db, reserve)
    db.clear_faults("inventory.reserve")
    inject(db, reserve)


def test_transient_switch_fails_the_first_tries_of_each_message(
    db: ExampleDatabase, reserve: CommandMessage
) -> None:
    db.set_fault(Switch("inventory.reserve", "transient", times=2))
    for retries in (0, 1):
        with pytest.raises(InjectedTransientError, match=f"this was try {retries + 1}"):
            inject(db, reserve, retries)
    inject(db, reserve, retries=2)


def test_hang_switch_sleeps_before_the_work(db: ExampleDatabase, reserve: CommandMessage) -> None:
    db.set_fault(Switch("inventory.reserve", "hang", seconds=0.3))
    started = time.monotonic()
    inject(db, reserve)
    assert time.monotonic() - started >= 0.3


def test_switches_from_the_environment() -> None:
    spec = "payment.charge=fail:card_declined@o-13*; shipping.create=hang:90;x.y=transient:3"
    assert parse_switches(spec) == [
        Switch("payment.charge", "fail", "o-13*", error_code="card_declined"),
        Switch("shipping.create", "hang", seconds=90.0),
        Switch("x.y", "transient", times=3),
    ]
    with pytest.raises(ValueError, match="fault mode 'explode'"):
        parse_switches("payment.charge=explode")
    with pytest.raises(ValueError, match=re.escape("'payment.charge=hang:soon'")):
        parse_switches("payment.charge=hang:soon")


def test_handlers_run_without_a_worker(db: ExampleDatabase, reserve: CommandMessage) -> None:
    """Handlers stay plain functions: callable with any session, for unit tests."""
    with db.sessions.begin() as session:
        result = reserve_handler(reserve, session)
    assert len(result["reservation_ids"]) == 1
    assert db.count(Reservation, order_id="o-13") == 1
