"""Compensating an in-doubt step end to end: the charge command is lost on its way (the relay
holds it), every attempt times out, the saga compensates the charge it cannot know about and
the reservation; later the lost command arrives after all and is refused.

The timers are fired by the test's engine on a virtual clock (there is no timer service yet);
everything else goes through RabbitMQ, the example services and the engine worker."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from broker import SERVICE_QUEUES, publish_command, purge
from conftest import order
from example_services import (
    ExampleDatabase,
    TestRelay,
    start_engine_worker,
    start_services,
    worker_env,
)
from processes import Processes, wait_until

from examples.order_fulfillment.models import Charge, Reservation
from saga_es import ids
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.events import ReplyIgnored
from saga_es.messaging import REPLY_QUEUE
from saga_es.participant import COMPENSATED, NOT_APPLIED
from saga_es.state import SagaStatus
from saga_es.testing.clock import VirtualClock


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(datetime.now(UTC))


@pytest.fixture
def engine(postgres_url: str, broker_url: str, clock: VirtualClock) -> Iterator[SagaEngine]:
    purge(broker_url, *SERVICE_QUEUES, REPLY_QUEUE)
    with SagaEngine([order_fulfillment], database_url=postgres_url, clock=clock) as e:
        yield e


def test_late_action_after_compensating_an_in_doubt_step_is_refused(
    engine: SagaEngine,
    clock: VirtualClock,
    postgres_url: str,
    broker_url: str,
    tmp_path: Path,
) -> None:
    db = ExampleDatabase(postgres_url)
    db.create_tables()
    relay = TestRelay(engine, broker_url)
    relay.held.add("payment.charge")  # lost between the outbox and the payment service
    with Processes(tmp_path, worker_env(postgres_url, broker_url)) as processes:
        start_services(processes)
        start_engine_worker(processes, postgres_url, broker_url)
        saga = engine.start(order_fulfillment, order(7), business_key="o-7").saga_id

        def charging() -> bool:
            relay.pump([saga])
            return engine.get_state(saga).awaiting is not None and (
                engine.get_state(saga).awaiting.step == "charge_payment"  # type: ignore[union-attr]
            )

        wait_until(charging, timeout=60, what="the reservation and the charge command")
        while engine.get_state(saga).status != SagaStatus.COMPENSATING:
            [timer] = engine.store.timers(saga)  # the charge's deadline, then its retry
            clock.set(max(clock.now, timer["due_at"]) + timedelta(seconds=1))
            engine.handle_timer(saga, timer["timer_id"])
            relay.pump([saga])
        assert len(relay.withheld) == 4  # every attempt the policy allows, none delivered

        def finished() -> bool:
            relay.pump([saga])
            return engine.get_state(saga).is_terminal

        wait_until(finished, timeout=60, what="the compensation to finish")
        state = engine.get_state(saga)
        assert state.status == SagaStatus.FAILED
        assert state.compensated == ("charge_payment", "reserve_inventory")
        refund = db.inbox(ids.idempotency_key(saga, "compensation", "charge_payment"))
        assert refund is not None
        assert refund.result == NOT_APPLIED
        charge_key = ids.idempotency_key(saga, "action", "charge_payment")
        tombstone = db.inbox(charge_key)
        assert tombstone is not None
        assert tombstone.outcome == "tombstone"

        late = relay.withheld[0]  # attempt 1 finally arrives
        publish_command(broker_url, late)

        def refused() -> bool:
            return any(
                isinstance(e, ReplyIgnored) and e.command_id == late.message_id
                for e in engine.events(saga)
            )

        wait_until(refused, timeout=60, what="the late charge's reply to reach the saga")
    ignored = next(e for e in engine.events(saga) if isinstance(e, ReplyIgnored))
    assert (ignored.outcome, ignored.reason) == ("failure", "finished")
    assert db.count(Charge) == 0  # never charged, so nothing needed refunding
    entry = db.inbox(charge_key)
    assert entry is not None
    assert (entry.outcome, entry.error_code) == ("tombstone", COMPENSATED)
    [reservation] = db.rows(Reservation, order_id="o-7")
    assert reservation.released_at is not None
    db.close()
