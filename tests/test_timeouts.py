"""Timeouts, retries and failed compensations with a virtual clock, through the durable path:
the engine writes each saga's timer row, the timer process claims and fires it. No sleeping.

(The same rules, input by input without a database, are in test_order_scenarios.py.)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from conftest import order
from pydantic import BaseModel

from saga_es import events as ev
from saga_es.definition import PIVOT, saga, step
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.ids import spread
from saga_es.messages import CommandMessage
from saga_es.retry import RetryPolicy
from saga_es.state import SagaStatus
from saga_es.testing import VirtualClock
from saga_es.testing.invariants import sagas_left_hanging
from saga_es.timer_process import TimerProcess

STEPS = [s.name for s in order_fulfillment.steps]
RESERVE, CHARGE, SHIP, NOTIFY = STEPS


class Rig:
    """An engine on a virtual clock, and a timer process firing into it."""

    def __init__(self, engine: SagaEngine, clock: VirtualClock) -> None:
        self.engine, self.clock = engine, clock
        self.timers = TimerProcess(engine, batch_size=7)

    def start(self, n: int = 1) -> UUID:
        return self.engine.start(order_fulfillment, order(n), business_key=f"o-{n}").saga_id

    def command(self, saga_id: UUID) -> CommandMessage:
        """The awaited command, as the relay would publish it from the outbox."""
        state = self.engine.get_state(saga_id)
        assert state.awaiting is not None, state.status
        [row] = [
            r
            for r in self.engine.store.outbox(saga_id)
            if r["message_id"] == state.awaiting.command_id
        ]
        return CommandMessage.model_validate({k: row[k] for k in CommandMessage.model_fields})

    def succeed(self, saga_id: UUID, result: dict[str, Any] | None = None) -> None:
        self.engine.handle_reply(self.command(saga_id).reply_success(uuid.uuid4(), result))

    def fail(self, saga_id: UUID, code: str, *, retryable: bool) -> None:
        command = self.command(saga_id)
        reply = command.reply_failure(uuid.uuid4(), code, "no", retryable=retryable)
        self.engine.handle_reply(reply)

    def timer(self, saga_id: UUID) -> Any:
        [timer] = self.engine.timers(saga_id)
        return timer

    def fire_at(self, moment: Any) -> int:
        self.clock.set(moment)
        return self.timers.run_once()

    def kinds(self, saga_id: UUID) -> list[str]:
        return [type(e).__name__ for e in self.engine.events(saga_id)]


@pytest.fixture
def rig(sqlite_url: str) -> Iterator[Rig]:
    clock = VirtualClock()
    with SagaEngine([order_fulfillment], database_url=sqlite_url, clock=clock) as engine:
        yield Rig(engine, clock)
        assert sagas_left_hanging(engine.store) == []


@pytest.mark.parametrize("name", STEPS)
def test_each_step_times_out_when_its_deadline_passes(rig: Rig, name: str) -> None:
    saga_id = rig.start()
    for earlier in STEPS[: STEPS.index(name)]:
        rig.succeed(saga_id, {"step": earlier})
    command = rig.command(saga_id)
    timer = rig.timer(saga_id)
    assert (timer.kind, timer.step, timer.timer_id) == ("deadline", name, command.message_id)
    assert (
        timer.due == command.deadline == rig.clock.now + order_fulfillment.step_named(name).timeout
    )

    assert rig.fire_at(timer.due - timedelta(microseconds=1)) == 0  # not before its time
    assert rig.fire_at(timer.due) == 1
    events = rig.engine.events(saga_id)
    timed_out, retry = events[-2:]
    assert isinstance(timed_out, ev.StepTimedOut)
    assert (timed_out.step, timed_out.attempt, timed_out.deadline) == (name, 1, timer.due)
    assert isinstance(retry, ev.RetryScheduled)
    assert rig.timer(saga_id).timer_id == retry.timer_id  # the row follows the decision
    assert rig.fire_at(retry.due) == 1
    assert rig.command(saga_id).attempt == 2
    assert rig.kinds(saga_id).count("StepTimedOut") == 1


class Data(BaseModel):
    n: int = 0


POLICY = RetryPolicy(
    max_attempts=9,
    initial_backoff=timedelta(seconds=1),
    multiplier=3.0,
    max_backoff=timedelta(seconds=20),
    jitter=0.5,
    non_retryable=frozenset({"fatal"}),
)
FLAKY = saga(
    "flaky",
    data=Data,
    steps=[
        step(name="a", action="svc.a", compensation="svc.undo_a"),
        step(name="b", action="svc.b", compensation="svc.undo_b", retry=POLICY),
        step(name="c", action="svc.c", kind=PIVOT),
    ],
)


def test_the_retry_schedule_follows_the_policy_jitter_and_cap(sqlite_url: str) -> None:
    clock = VirtualClock()
    with SagaEngine([FLAKY], database_url=sqlite_url, clock=clock) as engine:
        rig = Rig(engine, clock)
        saga_id = engine.start(FLAKY, {"n": 1}, business_key="k").saga_id
        rig.succeed(saga_id)
        delays = {}
        for attempt in range(1, 10):
            assert rig.command(saga_id).attempt == attempt
            failed_at = clock.now
            rig.fail(saga_id, "busy", retryable=True)
            if attempt == 9:
                break
            retry = rig.timer(saga_id)
            assert (retry.kind, retry.attempt) == ("retry", attempt + 1)
            delays[attempt + 1] = (retry.due - failed_at).total_seconds()
            assert rig.fire_at(retry.due - timedelta(microseconds=1)) == 0
            assert rig.fire_at(retry.due) == 1

        # Written out: 1 s tripling, capped at 20 s from attempt 5 on (27 s would exceed it).
        bases = {2: 1.0, 3: 3.0, 4: 9.0, 5: 20.0, 6: 20.0, 7: 20.0, 8: 20.0, 9: 20.0}
        assert set(delays) == set(bases)
        for attempt, delay in delays.items():
            base = bases[attempt]
            assert base * (1 - POLICY.jitter) <= delay <= base, (attempt, delay)
            want = POLICY.delay_before(attempt, spread(saga_id, "action", "b", attempt))
            assert delay == want.total_seconds()
        assert len(set(delays.values())) == len(delays)  # jittered: no two alike
        state = engine.get_state(saga_id)
        assert state.status is SagaStatus.COMPENSATING  # 9 attempts, then it turned back
        assert state.compensation_plan == ("a",)


@pytest.mark.parametrize(("code", "retryable"), [("fatal", True), ("busy", False)])
def test_non_retryable_errors_skip_the_retries(sqlite_url: str, code: str, retryable: bool) -> None:
    clock = VirtualClock()
    with SagaEngine([FLAKY], database_url=sqlite_url, clock=clock) as engine:
        rig = Rig(engine, clock)
        saga_id = engine.start(FLAKY, {"n": 1}, business_key="k").saga_id
        rig.succeed(saga_id)
        rig.fail(saga_id, code, retryable=retryable)
        assert "RetryScheduled" not in rig.kinds(saga_id)
        assert rig.kinds(saga_id)[-3:] == [
            "StepFailed",
            "CompensationStarted",
            "CompensationIssued",
        ]
        assert rig.command(saga_id).command == "svc.undo_a"


def test_a_late_success_after_the_last_timeout_is_ignored_and_compensated(rig: Rig) -> None:
    saga_id = rig.start()
    rig.succeed(saga_id, {"reservation_id": "r-1"})
    first = rig.command(saga_id)
    for attempt in range(1, 5):  # the charge's policy: 4 attempts, each timing out
        assert rig.command(saga_id).attempt == attempt
        assert rig.fire_at(rig.timer(saga_id).due) == 1
        if attempt < 4:
            assert rig.fire_at(rig.timer(saga_id).due) == 1  # the retry
    refund = rig.command(saga_id)
    assert (refund.command, refund.phase) == ("payment.refund", "compensation")

    # The first attempt did charge the card, only too late to say so in time.
    late = rig.engine.handle_reply(first.reply_success(uuid.uuid4(), {"charge_id": "ch-1"}))
    [ignored] = late.events
    assert isinstance(ignored, ev.ReplyIgnored)
    assert (ignored.reason, ignored.attempt, ignored.outcome) == ("late", 1, "success")
    state = rig.engine.get_state(saga_id)
    assert state.compensation_plan == (CHARGE, RESERVE)  # the charge is refunded: in doubt
    assert state.awaiting is not None
    assert state.awaiting.command_id == refund.message_id
    rig.succeed(saga_id)  # refunded
    rig.succeed(saga_id)  # released
    state = rig.engine.get_state(saga_id)
    assert state.status is SagaStatus.FAILED
    assert state.compensated == (CHARGE, RESERVE)
    assert rig.kinds(saga_id).count("StepTimedOut") == 4


def test_compensation_retries_then_stuck_with_what_was_and_was_not_undone(rig: Rig) -> None:
    saga_id = rig.start()
    for name in (RESERVE, CHARGE):
        rig.succeed(saga_id, {"step": name})
    rig.fail(saga_id, "address_invalid", retryable=False)  # the pivot says no
    refunds = order_fulfillment.step_named(CHARGE).compensation_retry.max_attempts
    assert refunds == 5
    for attempt in range(1, refunds + 1):
        assert rig.command(saga_id).command == "payment.refund"
        assert rig.command(saga_id).attempt == attempt
        if attempt % 2:
            rig.fail(saga_id, "bank_down", retryable=True)
        else:  # no reply at all: the deadline passes
            assert rig.fire_at(rig.timer(saga_id).due) == 1
        if attempt < refunds:
            retry = rig.timer(saga_id)
            assert (retry.kind, retry.phase, retry.attempt) == (
                "retry",
                "compensation",
                attempt + 1,
            )
            assert rig.fire_at(retry.due) == 1

    state = rig.engine.get_state(saga_id)
    assert state.status is SagaStatus.STUCK
    assert state.stuck is not None
    assert (state.stuck.step, state.stuck.error_code) == (CHARGE, "bank_down")
    assert state.stuck_reason == "compensation of 'charge_payment' failed after 5 attempts"
    assert state.failure is not None
    assert state.failure.step == SHIP  # what turned it back
    assert (state.compensated, state.remaining_compensations) == ((), (CHARGE, RESERVE))
    assert rig.engine.timers(saga_id) == []  # stuck: nothing fires, an operator must act
    stuck = rig.engine.events(saga_id)[-1]
    assert isinstance(stuck, ev.SagaStuck)
    assert (stuck.compensated, stuck.not_compensated) == ([], [CHARGE, RESERVE])
    assert (stuck.step, stuck.phase, stuck.error_code) == (CHARGE, "compensation", "bank_down")


def test_a_retriable_step_raises_an_alert_and_keeps_retrying(rig: Rig) -> None:
    saga_id = rig.start()
    for name in (RESERVE, CHARGE, SHIP):
        rig.succeed(saga_id, {"step": name})
    alert_after = order_fulfillment.step_named(NOTIFY).retry.alert_after
    assert alert_after is not None
    for attempt in range(1, alert_after + 3):
        assert rig.engine.get_state(saga_id).retry_alert is None or attempt > alert_after
        rig.fail(saga_id, "smtp_down", retryable=True)
        assert rig.fire_at(rig.timer(saga_id).due) == 1
    state = rig.engine.get_state(saga_id)
    assert state.status is SagaStatus.PENDING
    assert state.retry_alert is not None
    assert (state.retry_alert.step, state.retry_alert.attempts) == (NOTIFY, alert_after)
    assert rig.kinds(saga_id).count("RetryAlertRaised") == 1
    rig.succeed(saga_id)
    state = rig.engine.get_state(saga_id)
    assert (state.status, state.retry_alert) == (SagaStatus.COMPLETED, None)
