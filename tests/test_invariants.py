"""The "nothing left hanging" check used at the end of end-to-end and crash tests."""

from __future__ import annotations

import uuid

from conftest import order

from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.testing.invariants import sagas_left_hanging


def test_sagas_at_rest_pass_and_a_saga_without_a_timer_is_reported(database_url: str) -> None:
    with SagaEngine([order_fulfillment], database_url=database_url) as engine:
        pending = engine.start(order_fulfillment, order(1), business_key="o-1")
        done = engine.start(order_fulfillment, order(2), business_key="o-2")
        failed = engine.handle_reply(done.commands[0].reply_failure(uuid.uuid4(), "out_of_stock"))
        assert failed.state.is_terminal
        assert sagas_left_hanging(engine.store) == []

        store = engine.store
        store._execute(
            f"DELETE FROM {store.table('saga_timers')} WHERE saga_id = ?", [pending.saga_id]
        )
        store._execute(
            f"DELETE FROM {store.table('saga_outbox')} WHERE saga_id = ?", [pending.saga_id]
        )

        problems = sagas_left_hanging(store)
        assert len(problems) == 2
        assert all(str(pending.saga_id) in p for p in problems)
        assert "nothing will ever wake it" in problems[0]
        assert "not in outbox" in problems[1]
