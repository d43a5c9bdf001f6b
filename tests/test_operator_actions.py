"""Operator actions on the order saga, without a database: every action in every state where it
matters, allowed or refused, then what each allowed action sets in motion.

Each allowed action records its event (with actor and reason) and whatever follows; each refused
one raises ``ActionRefusedError`` naming the saga, its state and why, and records nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from conftest import order

from saga_es import events as ev
from saga_es.demo.order_saga import order_fulfillment
from saga_es.errors import ActionRefusedError
from saga_es.ids import spread
from saga_es.operator import (
    Abort,
    CancelTimer,
    MarkCompensated,
    OperatorAction,
    RescheduleTimer,
    Resume,
    RetryNow,
)
from saga_es.state import SagaStatus, replay
from saga_es.testing import Scenario, scenario

RESERVE, CHARGE, SHIP, NOTIFY = (s.name for s in order_fulfillment.steps)
WHO = {"actor": "ann", "reason": "ticket OPS-7"}
LATER = timedelta(minutes=10)


def start() -> Scenario:
    return scenario(order_fulfillment).given(order(1))


def through(last: str) -> Scenario:
    s = start()
    for name in (RESERVE, CHARGE, SHIP, NOTIFY)[: (RESERVE, CHARGE, SHIP, NOTIFY).index(last) + 1]:
        s.reply_success({"id": name})
    return s


# -- the states -----------------------------------------------------------------------------------


def awaiting_charge() -> Scenario:
    return through(RESERVE).expect_command("payment.charge", attempt=1)


def charge_retry_wait() -> Scenario:
    return awaiting_charge().time_out().expect_events("StepTimedOut", "RetryScheduled")


def charge_failed_retry_wait() -> Scenario:
    """The charge's attempt 1 got a definite (retryable) failure: nothing in doubt."""
    return awaiting_charge().reply_failure("gateway_busy", retryable=True)


def pivot_in_flight() -> Scenario:
    return through(CHARGE).expect_command("shipping.create", attempt=1)


def after_pivot() -> Scenario:
    return through(SHIP).expect_command("notification.send", attempt=1)


def compensating() -> Scenario:
    s = awaiting_charge().reply_failure("card_declined")
    return s.expect_compensation("inventory.release", attempt=1)


def compensation_retry_wait() -> Scenario:
    return compensating().reply_failure("busy", retryable=True)


def stuck_compensating() -> Scenario:
    return compensating().reply_failure("reservation_gone").expect_state("stuck")


def stuck_pivot() -> Scenario:
    s = pivot_in_flight()
    for _ in range(2):
        s.time_out().retry_now()
    return s.time_out().expect_state("stuck")


def stuck_retriable() -> Scenario:
    return after_pivot().reply_failure("no_such_address").expect_state("stuck")


def completed() -> Scenario:
    return through(NOTIFY).expect_state("completed")


def failed() -> Scenario:
    return compensating().reply_success().expect_state("failed")


def deadline_cancelled() -> Scenario:
    return awaiting_charge().act(CancelTimer(**WHO))


STATES: dict[str, Callable[[], Scenario]] = {
    f.__name__: f
    for f in (
        awaiting_charge,
        charge_retry_wait,
        pivot_in_flight,
        after_pivot,
        compensating,
        compensation_retry_wait,
        stuck_compensating,
        stuck_pivot,
        stuck_retriable,
        completed,
        failed,
        deadline_cancelled,
    )
}

ACTIONS: dict[str, Callable[[Scenario], OperatorAction]] = {
    "retry": lambda s: RetryNow(**WHO),
    "resume": lambda s: Resume(**WHO),
    "abort": lambda s: Abort(**WHO),
    "mark_compensated": lambda s: MarkCompensated(step=RESERVE, note="released by hand", **WHO),
    "cancel_timer": lambda s: CancelTimer(**WHO),
    "reschedule_timer": lambda s: RescheduleTimer(due=s.now + LATER, **WHO),
}

FINISHED = "it has finished"
# state -> action -> the events it records, or "refused: <why>".
EXPECTED: dict[str, dict[str, tuple[str, ...] | str]] = {
    "awaiting_charge": {
        "retry": ("RetryRequested", "StepCommandIssued"),
        "resume": "refused: it is not stuck",
        "abort": ("SagaAborted", "CompensationStarted", "CompensationIssued"),
        "mark_compensated": "refused: it is not compensating",
        "cancel_timer": ("TimerCancelled",),
        "reschedule_timer": ("TimerRescheduled",),
    },
    "charge_retry_wait": {
        "retry": ("RetryRequested", "StepCommandIssued"),
        "resume": "refused: it is not stuck",
        "abort": ("SagaAborted", "CompensationStarted", "CompensationIssued"),
        "mark_compensated": "refused: it is not compensating",
        "cancel_timer": ("TimerCancelled", "SagaStuck"),
        "reschedule_timer": ("TimerRescheduled",),
    },
    "pivot_in_flight": {
        "retry": ("RetryRequested", "StepCommandIssued"),
        "resume": "refused: it is not stuck",
        "abort": "refused: the pivot 'create_shipment' may have taken effect",
        "mark_compensated": "refused: it is not compensating",
        "cancel_timer": ("TimerCancelled",),
        "reschedule_timer": ("TimerRescheduled",),
    },
    "after_pivot": {
        "retry": ("RetryRequested", "StepCommandIssued"),
        "resume": "refused: it is not stuck",
        "abort": "refused: the pivot 'create_shipment' has succeeded",
        "mark_compensated": "refused: it is not compensating",
        "cancel_timer": ("TimerCancelled",),
        "reschedule_timer": ("TimerRescheduled",),
    },
    "compensating": {
        "retry": ("RetryRequested", "CompensationIssued"),
        "resume": "refused: it is not stuck",
        "abort": "refused: it is compensating already",
        "mark_compensated": ("StepMarkedCompensated", "SagaCompensated"),
        "cancel_timer": ("TimerCancelled",),
        "reschedule_timer": ("TimerRescheduled",),
    },
    "compensation_retry_wait": {
        "retry": ("RetryRequested", "CompensationIssued"),
        "resume": "refused: it is not stuck",
        "abort": "refused: it is compensating already",
        "mark_compensated": ("StepMarkedCompensated", "SagaCompensated"),
        "cancel_timer": ("TimerCancelled", "SagaStuck"),
        "reschedule_timer": ("TimerRescheduled",),
    },
    "stuck_compensating": {
        "retry": "refused: it is stuck",
        "resume": ("SagaResumed", "CompensationIssued"),
        "abort": "refused: it is compensating already and stuck on 'reserve_inventory'",
        "mark_compensated": ("StepMarkedCompensated", "SagaCompensated"),
        "cancel_timer": "refused: it is stuck",
        "reschedule_timer": "refused: it is stuck",
    },
    "stuck_pivot": {
        "retry": "refused: it is stuck",
        "resume": ("SagaResumed", "StepCommandIssued"),
        "abort": "refused: the pivot 'create_shipment' may have taken effect",
        "mark_compensated": "refused: it is not compensating",
        "cancel_timer": "refused: it is stuck",
        "reschedule_timer": "refused: it is stuck",
    },
    "stuck_retriable": {
        "retry": "refused: it is stuck",
        "resume": ("SagaResumed", "StepCommandIssued"),
        "abort": "refused: the pivot 'create_shipment' has succeeded",
        "mark_compensated": "refused: it is not compensating",
        "cancel_timer": "refused: it is stuck",
        "reschedule_timer": "refused: it is stuck",
    },
    "completed": {action: f"refused: {FINISHED}" for action in ACTIONS},
    "failed": {action: f"refused: {FINISHED}" for action in ACTIONS},
    "deadline_cancelled": {
        "retry": ("RetryRequested", "StepCommandIssued"),
        "resume": "refused: it is not stuck",
        "abort": ("SagaAborted", "CompensationStarted", "CompensationIssued"),
        "mark_compensated": "refused: it is not compensating",
        "cancel_timer": "refused: it has no pending timer",
        "reschedule_timer": ("TimerRescheduled",),
    },
}
CASES = [(state, action) for state in STATES for action in ACTIONS]


def test_the_matrix_covers_every_action_in_every_state() -> None:
    assert {state: set(row) for state, row in EXPECTED.items()} == {
        state: set(ACTIONS) for state in STATES
    }


@pytest.mark.parametrize(("state", "action"), CASES)
def test_each_action_in_each_state(state: str, action: str) -> None:
    s = STATES[state]()
    before, events_before = s.state, len(s.events)
    expected = EXPECTED[state][action]
    operator_action = ACTIONS[action](s)
    if isinstance(expected, str):
        why = expected.removeprefix("refused: ")
        with pytest.raises(ActionRefusedError) as refused:
            s.act(operator_action)
        message = str(refused.value)
        assert message.startswith(f"saga {before.saga_id} ({before.status.value}): cannot ")
        assert why in message
        assert refused.value.context == {
            "saga_id": before.saga_id,
            "action": operator_action.verb,
            "status": before.status.value,
        }
        assert s.state == before
        assert len(s.events) == events_before
        return
    s.act(operator_action)
    s.expect_events(*expected)
    recorded = s.last.events[0]
    assert isinstance(recorded, ev.OperatorEvent)
    assert (recorded.actor, recorded.reason) == ("ann", "ticket OPS-7")
    assert replay(s.events) == s.state
    assert [e.originator_version for e in s.events] == list(range(1, len(s.events) + 1))
    timer = s.timer
    if s.state.is_terminal:
        assert timer is None
    elif timer is None:  # only a reply awaited without its deadline
        assert s.state.awaiting is not None
        assert s.state.awaiting.deadline is None


@pytest.mark.parametrize(
    "action",
    [
        RetryNow(actor=" ", reason="r"),
        RetryNow(actor="ann", reason=""),
        MarkCompensated(step="no_such_step", **WHO),
        MarkCompensated(step=CHARGE, **WHO),  # not in the plan: it never succeeded
    ],
)
def test_bad_arguments_are_refused(action: OperatorAction) -> None:
    s = compensating()
    before = s.state
    with pytest.raises(ActionRefusedError, match=f"saga {before.saga_id}"):
        s.act(action)
    assert s.state == before


def test_a_timer_id_that_is_not_the_pending_one_is_refused() -> None:
    s = awaiting_charge()
    stale = s.commands_named("inventory.reserve")[0].message_id
    with pytest.raises(ActionRefusedError, match=f"timer {stale} is not its pending timer"):
        s.act(CancelTimer(timer_id=stale, **WHO))
    with pytest.raises(ActionRefusedError, match="is not its pending timer"):
        s.act(RescheduleTimer(due=s.now, timer_id=stale, **WHO))
    s.act(CancelTimer(timer_id=s.timer.timer_id, **WHO)).expect_events("TimerCancelled")


def test_a_due_time_without_a_time_zone_is_refused() -> None:
    s = awaiting_charge()
    with pytest.raises(ActionRefusedError, match="has no time zone"):
        s.act(RescheduleTimer(due=s.now.replace(tzinfo=None), **WHO))


# -- what each action sets in motion --------------------------------------------------------------


def test_retry_now_gives_up_on_the_unanswered_attempt_whose_late_reply_is_ignored() -> None:
    s = awaiting_charge()
    first = s.awaited
    s.act(RetryNow(**WHO)).expect_command("payment.charge", attempt=2)
    retried = s.last.events[0]
    assert (retried.step, retried.phase, retried.attempt) == (CHARGE, "action", 2)
    assert s.state.commands[first.message_id].outcome == "abandoned"
    assert s.timer.timer_id == s.awaited.message_id  # the new attempt's deadline
    s.reply_success({"charge_id": "late"}, to=first).expect_ignored("late")
    s.reply_success({"charge_id": "ch-2"}).expect_command("shipping.create")


def test_retry_now_issues_the_scheduled_retry_without_waiting() -> None:
    s = charge_retry_wait()
    due = s.timer.due
    s.act(RetryNow(**WHO)).expect_command("payment.charge", attempt=2)
    assert s.now < due
    assert s.state.retry_wait is None


def test_resume_gives_the_failed_compensation_a_fresh_retry_budget() -> None:
    s = compensating()
    policy = order_fulfillment.step_named(RESERVE).compensation_retry
    assert policy.max_attempts == 5
    for _ in range(4):
        s.reply_failure("busy", retryable=True).retry_now()
    s.reply_failure("busy", retryable=True).expect_state("stuck")
    assert s.state.stuck is not None
    assert s.state.stuck.step == RESERVE

    s.act(Resume(**WHO)).expect_compensation("inventory.release", attempt=6)
    assert s.state.status is SagaStatus.COMPENSATING
    assert (s.state.stuck, s.state.stuck_reason) == (None, None)
    assert s.state.failure is not None
    assert s.state.failure.error_code == "card_declined"  # the original cause stays
    s.reply_failure("busy", retryable=True).expect_events("CompensationFailed", "RetryScheduled")
    retry = s.last.events[-1]
    # Attempt 7 is the second of the fresh budget: the backoff starts over.
    assert retry.due == s.now + policy.delay_before(
        2, spread(s.state.saga_id, "compensation", RESERVE, 7)
    )
    for attempt in (7, 8, 9):
        s.retry_now().expect_compensation("inventory.release", attempt=attempt)
        s.reply_failure("busy", retryable=True).expect_events(
            "CompensationFailed", "RetryScheduled"
        )
    s.retry_now().reply_failure("busy", retryable=True).expect_state("stuck")
    assert "failed after 10 attempts" in (s.state.stuck_reason or "")


def test_resume_asks_the_pivot_again_and_its_answer_decides() -> None:
    s = stuck_pivot()
    s.act(Resume(**WHO)).expect_command("shipping.create", attempt=4)
    assert s.state.failure is None  # going forward again
    s.reply_success({"shipment_id": "sh-1"}).expect_command("notification.send")
    s.reply_success().expect_state("completed")


def test_abort_compensates_the_step_in_doubt_and_ignores_its_late_success() -> None:
    s = awaiting_charge()
    charge = s.awaited
    s.act(Abort(**WHO))
    started = s.last.events[1]
    assert isinstance(started, ev.CompensationStarted)
    assert started.plan == [CHARGE, RESERVE]  # the charge may commit late: refund it too
    assert (started.failed_step, started.error_code) == (CHARGE, "aborted")
    assert started.message == "aborted by ann: ticket OPS-7"
    s.expect_compensation("payment.refund")
    s.reply_success({"charge_id": "ch-late"}, to=charge).expect_ignored("late")
    s.reply_success().expect_compensation("inventory.release").reply_success()
    s.expect_state("failed")
    assert s.state.compensated == (CHARGE, RESERVE)
    assert s.state.failure is not None
    assert s.state.failure.error_code == "aborted"


def test_abort_after_a_definite_failure_does_not_compensate_that_step() -> None:
    s = charge_failed_retry_wait()
    s.act(Abort(**WHO))
    assert s.last.events[1].plan == [RESERVE]
    s.expect_compensation("inventory.release")


def test_abort_before_anything_succeeded_fails_at_once() -> None:
    s = start().reply_failure("busy", retryable=True)
    s.act(Abort(**WHO)).expect_events("SagaAborted", "CompensationStarted", "SagaCompensated")
    s.expect_state("failed")


def test_abort_is_allowed_when_every_pivot_attempt_failed_for_sure() -> None:
    s = pivot_in_flight().reply_failure("carrier_down", retryable=True)
    s.act(Abort(**WHO)).expect_compensation("payment.refund")
    assert s.last.events[1].plan == [CHARGE, RESERVE]


def test_marking_a_later_step_compensated_skips_its_compensation() -> None:
    s = pivot_in_flight().reply_failure("address_invalid").expect_compensation("payment.refund")
    s.act(MarkCompensated(step=RESERVE, note="released in the WMS", **WHO))
    s.expect_events("StepMarkedCompensated")
    assert s.last.commands == ()
    assert s.state.awaiting is not None  # the refund is still awaited
    s.reply_success().expect_events("CompensationSucceeded", "SagaCompensated")
    assert s.state.compensated == (RESERVE, CHARGE)
    assert s.state.marked_compensated == (RESERVE,)
    marked = [e for e in s.events if isinstance(e, ev.StepMarkedCompensated)]
    assert [(e.step, e.note, e.actor) for e in marked] == [(RESERVE, "released in the WMS", "ann")]


def test_marking_the_stuck_step_compensated_moves_the_saga_on() -> None:
    s = pivot_in_flight().reply_failure("address_invalid")
    s.reply_failure("bank_down").expect_state("stuck")  # the refund failed for good
    s.act(MarkCompensated(step=CHARGE, note="refunded in the bank's portal", **WHO))
    s.expect_events("StepMarkedCompensated", "CompensationIssued")
    s.expect_compensation("inventory.release")
    assert s.state.status is SagaStatus.COMPENSATING
    s.reply_success().expect_state("failed")


def test_a_cancelled_retry_leaves_the_saga_stuck_with_a_way_out() -> None:
    s = charge_retry_wait()
    s.act(CancelTimer(**WHO)).expect_state("stuck")
    stuck = s.last.events[1]
    assert (stuck.step, stuck.phase, stuck.error_code) == (CHARGE, "action", "cancelled")
    assert "cancelled by ann: ticket OPS-7" in stuck.reason
    assert s.timer is None
    s.act(Resume(**WHO)).expect_command("payment.charge", attempt=2)
    s.reply_success().expect_command("shipping.create")


def test_a_cancelled_retry_can_be_aborted_instead() -> None:
    s = charge_failed_retry_wait().act(CancelTimer(**WHO)).expect_state("stuck")
    s.act(Abort(**WHO)).expect_compensation("inventory.release")


def test_a_cancelled_deadline_waits_for_the_reply_and_can_be_set_again() -> None:
    s = deadline_cancelled()
    assert s.timer is None
    s.advance(timedelta(days=1)).expect_events("TimerCancelled")  # nothing fired
    s.act(RescheduleTimer(due=s.now + timedelta(seconds=5), **WHO))
    assert s.timer.kind == "deadline"
    s.advance(timedelta(seconds=5)).expect_events("StepTimedOut", "RetryScheduled")


def test_a_rescheduled_retry_fires_at_its_new_time_only() -> None:
    s = charge_retry_wait()
    old = s.timer
    s.act(RescheduleTimer(due=old.due + LATER, **WHO))
    assert (s.timer.timer_id, s.timer.due) == (old.timer_id, old.due + LATER)
    s.now = old.due
    s.fire_timer(old.timer_id).expect_unchanged()  # not due any more
    s.advance(LATER).expect_command("payment.charge", attempt=2)


def test_operator_events_say_who_and_why() -> None:
    s = charge_retry_wait()
    s.act(RescheduleTimer(due=s.now, actor="  bob ", reason=" backlog cleared ", timer_id=None))
    event: Any = s.last.events[0]
    assert (event.actor, event.reason) == ("bob", "backlog cleared")
    assert (event.kind, event.step, event.attempt) == ("retry", CHARGE, 2)
