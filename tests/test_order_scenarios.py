"""The order saga, input by input, without a database: happy path, failures at each step,
compensation failures, timeouts, and every kind of reply that must change nothing."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from conftest import order

from saga_es import events as ev
from saga_es.decide import TimerFired, decide
from saga_es.demo.order_saga import order_fulfillment
from saga_es.errors import UnknownCommandError
from saga_es.ids import command_id, event_id, idempotency_key, retry_timer_id, saga_id_for, spread
from saga_es.messages import CommandMessage
from saga_es.state import Failure, SagaState, SagaStatus, evolve, next_timer, replay
from saga_es.testing import Scenario, scenario

RESERVE, CHARGE, SHIP, NOTIFY = (s.name for s in order_fulfillment.steps)
ACTIONS = {s.name: s.action for s in order_fulfillment.steps}
STEPS = [RESERVE, CHARGE, SHIP, NOTIFY]
RESULTS = {
    RESERVE: {"reservation_id": "r-1"},
    CHARGE: {"charge_id": "ch-1"},
    SHIP: {"shipment_id": "sh-1"},
    NOTIFY: {"notification_id": "n-1"},
}


def start(n: int = 1, **options: Any) -> Scenario:
    return scenario(order_fulfillment, **options).given(order(n))


def succeed_through(s: Scenario, last: str) -> Scenario:
    """Reply success to every step up to and including ``last``."""
    for name in STEPS[: STEPS.index(last) + 1]:
        s.expect_command(ACTIONS[name], attempt=1).reply_success(RESULTS[name])
    return s


def at_step(name: str, n: int = 1) -> Scenario:
    """A saga waiting for attempt 1 of ``name``."""
    s = start(n)
    index = STEPS.index(name)
    if index:
        succeed_through(s, STEPS[index - 1])
    s.expect_command(ACTIONS[name], attempt=1)
    return s


def names(events: Any) -> list[str]:
    return [type(e).__name__ for e in events]


def only(events: Any, kind: type[Any]) -> Any:
    found = [e for e in events if isinstance(e, kind)]
    assert len(found) == 1, names(events)
    return found[0]


def comparable(state: SagaState) -> SagaState:
    """The state without what every recorded event changes."""
    return replace(state, version=0, updated_at=state.started_at, ignored_replies=0)


def check_consistent(s: Scenario) -> None:
    """Versions contiguous, replay equals the incremental state, commands match their events."""
    assert [e.originator_version for e in s.events] == list(range(1, len(s.events) + 1))
    assert replay(s.events) == s.state
    issued = [e for e in s.events if isinstance(e, ev.StepCommandIssued | ev.CompensationIssued)]
    assert [e.command_id for e in issued] == [c.message_id for c in s.commands]
    assert len({c.message_id for c in s.commands}) == len(s.commands)


class Unchanged:
    """Asserts that the input under it only recorded one ReplyIgnored (or nothing at all)."""

    def __init__(self, s: Scenario, *, reason: str | None) -> None:
        self.s, self.reason = s, reason

    def __enter__(self) -> Unchanged:
        self.before = self.s.state
        self.events, self.commands = len(self.s.events), len(self.s.commands)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        s, before = self.s, self.before
        assert len(s.commands) == self.commands
        assert s.last is not None
        assert s.last.commands == ()
        if self.reason is None:
            assert s.last.events == ()
            assert s.state == before
            return
        s.expect_ignored(self.reason)
        assert comparable(s.state) == comparable(before)
        assert s.state.ignored_replies == before.ignored_replies + 1
        assert s.state.version == before.version + 1
        assert s.timer == next_timer(before)
        check_consistent(s)


# -- the happy path -------------------------------------------------------------------------------


def test_happy_path_completes_with_the_exact_event_sequence() -> None:
    s = start()
    s.expect_events("SagaStarted", "StepCommandIssued").expect_state("pending")
    for name in STEPS:
        s.expect_command(ACTIONS[name], attempt=1).reply_success(RESULTS[name])
    s.expect_events("StepSucceeded", "SagaCompleted").expect_state("completed").expect_no_command()

    assert [(type(e).__name__, getattr(e, "step", None)) for e in s.events] == [
        ("SagaStarted", None),
        ("StepCommandIssued", RESERVE),
        ("StepSucceeded", RESERVE),
        ("StepCommandIssued", CHARGE),
        ("StepSucceeded", CHARGE),
        ("StepCommandIssued", SHIP),
        ("StepSucceeded", SHIP),
        ("StepCommandIssued", NOTIFY),
        ("StepSucceeded", NOTIFY),
        ("SagaCompleted", None),
    ]
    assert [(c.command, c.queue, c.phase, c.attempt) for c in s.commands] == [
        ("inventory.reserve", "inventory", "action", 1),
        ("payment.charge", "payment", "action", 1),
        ("shipping.create", "shipping", "action", 1),
        ("notification.send", "notification", "action", 1),
    ]
    state = s.state
    assert state.succeeded == tuple(STEPS)
    assert dict(state.results) == RESULTS
    assert state.awaiting is None
    assert state.retry_wait is None
    assert state.compensation_plan == ()
    assert state.compensated == ()
    assert state.failure is None
    assert state.stuck_reason is None
    assert state.is_terminal
    assert s.timer is None
    assert all(e.correlation_id == "correlation-1" for e in s.events)
    check_consistent(s)


def test_payloads_carry_the_data_and_earlier_results() -> None:
    s = start(7)
    succeed_through(s, SHIP)
    notify = s.awaited
    assert notify.payload["data"]["order_id"] == "o-7"
    assert notify.payload["results"] == {k: RESULTS[k] for k in (RESERVE, CHARGE, SHIP)}
    assert s.commands[0].payload["results"] == {}
    assert "action_result" not in notify.payload


def test_deadlines_follow_each_step_timeout() -> None:
    s = start()
    for name, timeout in zip(
        STEPS,
        [timedelta(seconds=30), timedelta(seconds=60), timedelta(minutes=2), timedelta(seconds=30)],
        strict=True,
    ):
        command = s.awaited
        assert command.step == name
        assert command.deadline == s.now + timeout
        assert s.timer.kind == "deadline"
        assert s.timer.due == command.deadline
        assert s.timer.timer_id == command.message_id
        s.advance(timedelta(seconds=5))  # before the deadline: nothing fires
        assert s.state.awaiting is not None
        assert s.state.awaiting.command_id == command.message_id
        s.reply_success(RESULTS[name])


# -- business failure at each step ----------------------------------------------------------------


def test_failure_at_step_1_fails_without_compensation() -> None:
    s = at_step(RESERVE)
    s.reply_failure("out_of_stock", "SKU-1 sold out")
    s.expect_events("StepFailed", "CompensationStarted", "SagaCompensated").expect_no_command()
    s.expect_state("failed")
    started = only(s.last.events, ev.CompensationStarted)
    assert (started.failed_step, started.error_code, started.plan) == (RESERVE, "out_of_stock", [])
    done = only(s.last.events, ev.SagaCompensated)
    assert (done.failed_step, done.error_code, done.message, done.compensated) == (
        RESERVE,
        "out_of_stock",
        "SKU-1 sold out",
        [],
    )
    assert s.state.failure == Failure(RESERVE, "out_of_stock", "SKU-1 sold out")
    assert [c.phase for c in s.commands] == ["action"]
    check_consistent(s)


@pytest.mark.parametrize(
    ("code", "retryable"), [("card_declined", True), ("card_declined", False), ("fraud", False)]
)
def test_failure_at_step_2_releases_the_inventory(code: str, retryable: bool) -> None:
    s = at_step(CHARGE)
    s.reply_failure(code, "no", retryable=retryable)
    s.expect_events("StepFailed", "CompensationStarted", "CompensationIssued")
    s.expect_compensation("inventory.release", attempt=1).expect_state("compensating")
    assert only(s.last.events, ev.CompensationStarted).plan == [RESERVE]
    release = s.awaited
    assert release.queue == "inventory"
    assert release.payload["action_result"] == RESULTS[RESERVE]
    s.reply_success()
    s.expect_events("CompensationSucceeded", "SagaCompensated").expect_state("failed")
    assert only(s.last.events, ev.SagaCompensated).compensated == [RESERVE]
    assert s.state.compensated == (RESERVE,)
    assert s.state.failure == Failure(CHARGE, code, "no")
    assert [c.command for c in s.commands if c.phase == "compensation"] == ["inventory.release"]
    check_consistent(s)


@pytest.mark.parametrize("via", ["non-retryable", "retries-exhausted"])
def test_definitive_pivot_failure_refunds_then_releases(via: str) -> None:
    s = at_step(SHIP)
    if via == "non-retryable":
        s.reply_failure("address_invalid")
    else:
        for attempt in (1, 2):
            s.expect_command("shipping.create", attempt=attempt)
            s.reply_failure("carrier_down", retryable=True)
            s.expect_events("StepFailed", "RetryScheduled")
            s.retry_now()
        s.expect_command("shipping.create", attempt=3).reply_failure("carrier_down", retryable=True)
    s.expect_events("StepFailed", "CompensationStarted", "CompensationIssued")
    assert only(s.last.events, ev.CompensationStarted).plan == [CHARGE, RESERVE]
    s.expect_compensation("payment.refund")
    assert s.awaited.payload["action_result"] == RESULTS[CHARGE]
    s.reply_success().expect_events("CompensationSucceeded", "CompensationIssued")
    s.expect_compensation("inventory.release")
    assert s.awaited.payload["action_result"] == RESULTS[RESERVE]
    s.reply_success().expect_events("CompensationSucceeded", "SagaCompensated")
    s.expect_state("failed")
    assert only(s.last.events, ev.SagaCompensated).compensated == [CHARGE, RESERVE]
    assert [c.command for c in s.commands if c.phase == "compensation"] == [
        "payment.refund",
        "inventory.release",
    ]
    check_consistent(s)


def test_retriable_step_retries_forward_and_never_compensates() -> None:
    s = at_step(NOTIFY)
    alert_after = order_fulfillment.step_named(NOTIFY).retry.alert_after
    assert alert_after == 10  # RetryPolicy.forever()'s default
    for attempt in range(1, 31):
        s.expect_command("notification.send", attempt=attempt)
        s.reply_failure("smtp_down", retryable=True)
        if attempt == alert_after:  # once, at the threshold, and the saga keeps retrying
            s.expect_events("StepFailed", "RetryScheduled", "RetryAlertRaised")
            alert = only(s.last.events, ev.RetryAlertRaised)
            assert (alert.step, alert.phase, alert.attempts, alert.error_code) == (
                NOTIFY, "action", 10, "smtp_down")  # fmt: skip
        else:
            s.expect_events("StepFailed", "RetryScheduled")
        assert (s.state.retry_alert is not None) == (attempt >= alert_after)
        assert s.state.status is SagaStatus.PENDING
        s.retry_now()
    s.expect_command("notification.send", attempt=31).reply_success(RESULTS[NOTIFY])
    s.expect_state("completed")
    assert s.state.retry_alert is None  # cleared by the success
    assert not any(isinstance(e, ev.CompensationStarted | ev.CompensationIssued) for e in s.events)
    assert all(c.phase == "action" for c in s.commands)
    check_consistent(s)


def test_retriable_step_failing_non_retryably_is_stuck() -> None:
    s = at_step(NOTIFY)
    s.reply_failure("no_such_address", "bounced")
    s.expect_events("StepFailed", "SagaStuck").expect_state("stuck").expect_no_command()
    stuck = only(s.last.events, ev.SagaStuck)
    assert (stuck.step, stuck.phase, stuck.error_code, stuck.message) == (
        NOTIFY,
        "action",
        "no_such_address",
        "bounced",
    )
    assert "send_confirmation" in stuck.reason
    assert "cannot be compensated" in stuck.reason
    assert (stuck.compensated, stuck.not_compensated) == ([], [])
    assert s.state.stuck_reason == stuck.reason
    assert s.state.failure == Failure(NOTIFY, "no_such_address", "bounced")
    assert s.timer is None
    check_consistent(s)


# -- compensation failures ------------------------------------------------------------------------


def test_compensation_failing_non_retryably_is_stuck() -> None:
    s = at_step(SHIP)
    s.reply_failure("address_invalid").expect_compensation("payment.refund")
    s.reply_success().expect_compensation("inventory.release")
    s.reply_failure("reservation_gone", "unknown reservation", retryable=False)
    s.expect_events("CompensationFailed", "SagaStuck").expect_state("stuck").expect_no_command()
    stuck = only(s.last.events, ev.SagaStuck)
    assert stuck.step == RESERVE
    assert stuck.phase == "compensation"
    assert stuck.error_code == "reservation_gone"
    assert stuck.message == "unknown reservation"
    assert stuck.reason == "compensation of 'reserve_inventory' failed after 1 attempts"
    assert stuck.compensated == [CHARGE]
    assert stuck.not_compensated == [RESERVE]
    state = s.state
    assert state.stuck_reason == stuck.reason
    # The stuck point is kept apart from the failure that turned the saga back.
    assert state.stuck == Failure(RESERVE, "reservation_gone", "unknown reservation")
    assert state.failure is not None
    assert state.failure.step == SHIP
    assert state.compensated == (CHARGE,)
    assert state.remaining_compensations == (RESERVE,)
    assert state.compensation_plan == (CHARGE, RESERVE)
    assert state.awaiting is None
    assert state.retry_wait is None
    check_consistent(s)


def test_compensation_retries_exhausted_is_stuck() -> None:
    s = at_step(SHIP)
    s.reply_failure("address_invalid")
    refund = order_fulfillment.step_named(CHARGE)
    assert refund.compensation_retry.max_attempts == 5
    for attempt in range(1, 5):
        s.expect_compensation("payment.refund", attempt=attempt)
        s.reply_failure("bank_down", retryable=True)
        s.expect_events("CompensationFailed", "RetryScheduled")
        retry = only(s.last.events, ev.RetryScheduled)
        assert (retry.phase, retry.step, retry.attempt) == ("compensation", CHARGE, attempt + 1)
        s.retry_now()
    s.expect_compensation("payment.refund", attempt=5).reply_failure("bank_down", retryable=True)
    s.expect_events("CompensationFailed", "SagaStuck").expect_state("stuck")
    stuck = only(s.last.events, ev.SagaStuck)
    assert stuck.reason == "compensation of 'charge_payment' failed after 5 attempts"
    assert (stuck.step, stuck.phase, stuck.error_code) == (CHARGE, "compensation", "bank_down")
    assert (stuck.compensated, stuck.not_compensated) == ([], [CHARGE, RESERVE])
    assert s.state.remaining_compensations == (CHARGE, RESERVE)
    assert len({c.idempotency_key for c in s.commands_named("payment.refund")}) == 1
    check_consistent(s)


def test_compensation_timing_out_for_good_is_stuck() -> None:
    s = at_step(CHARGE)
    s.reply_failure("card_declined").expect_compensation("inventory.release", attempt=1)
    for attempt in range(1, 5):
        s.time_out().expect_events("StepTimedOut", "RetryScheduled")
        assert only(s.last.events, ev.StepTimedOut).phase == "compensation"
        s.retry_now().expect_compensation("inventory.release", attempt=attempt + 1)
    s.time_out().expect_events("StepTimedOut", "SagaStuck").expect_state("stuck")
    stuck = only(s.last.events, ev.SagaStuck)
    assert (stuck.step, stuck.phase, stuck.error_code) == (RESERVE, "compensation", "timeout")
    assert (stuck.compensated, stuck.not_compensated) == ([], [RESERVE])
    check_consistent(s)


def test_compensation_retry_then_success_finishes_compensating() -> None:
    s = at_step(CHARGE)
    s.reply_failure("card_declined")
    s.reply_failure("busy", retryable=True).retry_now()
    s.expect_compensation("inventory.release", attempt=2).reply_success()
    s.expect_state("failed")
    assert s.state.compensated == (RESERVE,)


# -- timeouts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STEPS)
def test_timeout_of_each_step_retries_with_the_next_attempt(name: str) -> None:
    s = at_step(name)
    first = s.awaited
    s.time_out().expect_events("StepTimedOut", "RetryScheduled").expect_no_command()
    timed_out = only(s.last.events, ev.StepTimedOut)
    assert (timed_out.step, timed_out.phase, timed_out.attempt) == (name, "action", 1)
    assert timed_out.command_id == first.message_id
    assert timed_out.deadline == first.deadline
    retry = only(s.last.events, ev.RetryScheduled)
    assert (retry.step, retry.phase, retry.attempt) == (name, "action", 2)
    policy = order_fulfillment.step_named(name).retry
    assert retry.due == s.now + policy.delay_before(2, spread(s.state.saga_id, "action", name, 2))
    assert retry.timer_id == retry_timer_id(s.state.saga_id, "action", name, 2)
    assert s.timer.kind == "retry"
    assert s.timer.timer_id == retry.timer_id
    assert s.state.status is SagaStatus.PENDING
    assert s.state.awaiting is None

    s.retry_now().expect_events("StepCommandIssued").expect_command(ACTIONS[name], attempt=2)
    second = s.awaited
    assert second.message_id != first.message_id
    assert second.idempotency_key == first.idempotency_key
    assert second.payload == first.payload
    s.reply_success(RESULTS[name])
    assert s.state.succeeded[-1] == name
    check_consistent(s)


def test_retry_fires_only_when_its_time_comes() -> None:
    s = at_step(CHARGE)
    s.time_out()
    due = s.timer.due
    s.advance(due - s.now - timedelta(microseconds=1))
    s.expect_events("StepTimedOut", "RetryScheduled")
    assert s.state.retry_wait is not None
    s.advance(timedelta(microseconds=1)).expect_command("payment.charge", attempt=2)


def test_timeouts_exhausting_step_2_compensate_it_in_doubt_before_step_1() -> None:
    s = at_step(CHARGE)
    for attempt in range(1, 4):
        s.expect_command("payment.charge", attempt=attempt).time_out().retry_now()
    s.expect_command("payment.charge", attempt=4).time_out()
    s.expect_events("StepTimedOut", "CompensationStarted", "CompensationIssued")
    started = only(s.last.events, ev.CompensationStarted)
    assert (started.failed_step, started.error_code) == (CHARGE, "timeout")
    assert started.plan == [CHARGE, RESERVE]
    s.expect_compensation("payment.refund")
    assert s.awaited.payload["action_result"] == {}  # never answered
    s.reply_success().expect_compensation("inventory.release").reply_success()
    s.expect_state("failed")
    assert only(s.last.events, ev.SagaCompensated).compensated == [CHARGE, RESERVE]
    check_consistent(s)


def test_timeouts_exhausting_step_1_compensate_it_in_doubt() -> None:
    s = at_step(RESERVE)
    for _ in range(2):
        s.time_out().retry_now()
    s.time_out()
    assert only(s.last.events, ev.CompensationStarted).plan == [RESERVE]
    s.expect_compensation("inventory.release").reply_success().expect_state("failed")


def test_last_attempt_failing_for_sure_is_not_in_doubt() -> None:
    s = at_step(CHARGE)
    s.time_out().retry_now().time_out().retry_now()
    s.expect_command("payment.charge", attempt=3).reply_failure("card_declined")
    assert only(s.last.events, ev.CompensationStarted).plan == [RESERVE]
    s.expect_compensation("inventory.release")


def test_participant_error_code_timeout_at_the_pivot_is_a_definite_failure() -> None:
    # The participant answered: the shipment was not created, so the saga can turn back. Only
    # the saga's own missed deadline leaves the pivot's outcome unknown.
    s = at_step(SHIP)
    s.reply_failure("timeout", "carrier API timed out", retryable=False)
    s.expect_events("StepFailed", "CompensationStarted", "CompensationIssued")
    assert only(s.last.events, ev.CompensationStarted).plan == [CHARGE, RESERVE]
    s.expect_compensation("payment.refund").reply_success()
    s.expect_compensation("inventory.release").reply_success()
    s.expect_state("failed")


def test_participant_error_code_timeout_does_not_put_the_step_in_doubt() -> None:
    s = at_step(CHARGE)
    for _ in range(3):
        s.reply_failure("timeout", "gateway timed out", retryable=True).retry_now()
    s.expect_command("payment.charge", attempt=4).reply_failure("timeout", retryable=True)
    started = only(s.last.events, ev.CompensationStarted)
    assert started.error_code == "timeout"
    assert started.plan == [RESERVE]


def test_pivot_timing_out_for_good_is_stuck() -> None:
    s = at_step(SHIP)
    s.time_out().retry_now().time_out().retry_now()
    s.expect_command("shipping.create", attempt=3).time_out()
    s.expect_events("StepTimedOut", "SagaStuck").expect_state("stuck").expect_no_command()
    stuck = only(s.last.events, ev.SagaStuck)
    assert (stuck.step, stuck.phase, stuck.error_code) == (SHIP, "action", "timeout")
    assert "outcome of pivot step 'create_shipment' is unknown" in stuck.reason
    assert "after 3 attempts" in stuck.reason
    # Nothing was undone, and the steps before the pivot may need undoing by hand.
    assert (stuck.compensated, stuck.not_compensated) == ([], [CHARGE, RESERVE])
    assert not any(c.phase == "compensation" for c in s.commands)
    assert s.state.stuck_reason == stuck.reason
    check_consistent(s)


def test_retriable_step_times_out_forever_without_getting_stuck() -> None:
    s = at_step(NOTIFY)
    for attempt in range(1, 41):
        s.expect_command("notification.send", attempt=attempt).time_out().retry_now()
    assert s.state.status is SagaStatus.PENDING
    s.reply_success(RESULTS[NOTIFY]).expect_state("completed")
    check_consistent(s)


# -- replies that change nothing ------------------------------------------------------------------


def test_redelivered_reply_is_a_duplicate() -> None:
    s = start()
    s.reply_success(RESULTS[RESERVE])
    with Unchanged(s, reason="duplicate"):
        s.redeliver_last_reply()
    ignored = s.last.events[0]
    reply = s.replies[-1]
    assert (ignored.command_id, ignored.reply_id) == (reply.command_id, reply.message_id)
    assert (ignored.step, ignored.phase, ignored.attempt, ignored.outcome) == (
        RESERVE,
        "action",
        1,
        "success",
    )
    with Unchanged(s, reason="duplicate"):
        s.redeliver_last_reply()
    assert s.state.ignored_replies == 2
    s.expect_ignored("duplicate")
    s.reply_success(RESULTS[CHARGE])  # the saga goes on as if nothing happened
    assert s.state.succeeded == (RESERVE, CHARGE)


def test_different_second_reply_for_an_answered_command_is_a_duplicate() -> None:
    s = start()
    reserve = s.awaited
    s.reply_success(RESULTS[RESERVE])
    with Unchanged(s, reason="duplicate"):
        s.reply_failure("out_of_stock", to=reserve)
    assert s.last.events[0].outcome == "failure"
    with Unchanged(s, reason="duplicate"):
        s.reply_success({"reservation_id": "other"}, to=reserve)
    assert s.state.results[RESERVE] == RESULTS[RESERVE]


def test_reply_to_a_failed_attempt_after_the_next_attempt_was_issued() -> None:
    s = at_step(CHARGE)
    first = s.awaited
    s.reply_failure("gateway_busy", retryable=True).retry_now()
    s.expect_command("payment.charge", attempt=2)
    with Unchanged(s, reason="duplicate"):
        s.reply_success(RESULTS[CHARGE], to=first)
    assert s.state.awaiting is not None
    assert s.state.awaiting.attempt == 2
    assert s.last.events[0].attempt == 1
    s.reply_success(RESULTS[CHARGE]).expect_command("shipping.create")


def test_reply_to_a_timed_out_attempt_is_late() -> None:
    s = at_step(CHARGE)
    first = s.awaited
    s.time_out()
    with Unchanged(s, reason="late"):  # while the retry waits
        s.reply_success(RESULTS[CHARGE], to=first)
    assert s.state.retry_wait is not None
    s.retry_now().expect_command("payment.charge", attempt=2)
    with Unchanged(s, reason="late"):  # after attempt 2 was issued
        s.reply_failure("card_declined", to=first)
    with Unchanged(s, reason="late"):
        s.redeliver_last_reply()
    s.reply_success(RESULTS[CHARGE]).expect_command("shipping.create")


def test_unanswered_superseded_command_is_stale() -> None:
    # decide never supersedes an unanswered command by itself (an attempt ends with a reply or a
    # timeout first); the state is built by folding a second issue over the first, the way a
    # stream written by another version could look.
    s = at_step(CHARGE)
    first = s.awaited
    second_id = command_id(s.state.saga_id, "action", CHARGE, 2)
    forced = ev.StepCommandIssued(
        originator_id=s.state.saga_id,
        originator_version=s.state.version + 1,
        timestamp=s.now,
        correlation_id=s.state.correlation_id,
        step=CHARGE,
        attempt=2,
        command_id=second_id,
        command="payment.charge",
        queue="payment",
        deadline=s.now + timedelta(seconds=60),
    )
    state = evolve(s.state, forced)
    assert state.awaiting is not None
    assert state.awaiting.command_id == second_id
    assert state.commands[first.message_id].outcome is None

    decision = decide(order_fulfillment, state, first.reply_success(uuid.uuid4()), s.now)
    assert names(decision.events) == ["ReplyIgnored"]
    ignored = decision.events[0]
    assert (ignored.reason, ignored.attempt, ignored.command_id) == ("stale", 1, first.message_id)
    assert decision.commands == ()
    assert decision.state is not None
    assert comparable(decision.state) == comparable(state)


def test_reply_for_an_old_step_after_the_saga_moved_on() -> None:
    s = start()
    reserve = s.awaited
    s.reply_success(RESULTS[RESERVE])
    charge = s.awaited
    s.reply_success(RESULTS[CHARGE]).expect_command("shipping.create")
    with Unchanged(s, reason="duplicate"):
        s.reply_failure("out_of_stock", to=reserve)
    with Unchanged(s, reason="duplicate"):
        s.reply_success(to=charge)
    # While compensating, replies to the actions being undone are ignored too.
    s.reply_failure("address_invalid").expect_compensation("payment.refund")
    with Unchanged(s, reason="duplicate"):
        s.reply_success(RESULTS[CHARGE], to=charge)
    assert s.state.status is SagaStatus.COMPENSATING


def test_reply_to_an_in_doubt_step_during_its_compensation_is_late() -> None:
    s = at_step(CHARGE)
    s.time_out().retry_now().time_out().retry_now().time_out().retry_now().time_out()
    s.expect_compensation("payment.refund")
    charges = s.commands_named("payment.charge")
    with Unchanged(s, reason="late"):
        s.reply_success(RESULTS[CHARGE], to=charges[-1])
    with Unchanged(s, reason="late"):
        s.reply_success(RESULTS[CHARGE], to=charges[0])


def completed() -> Scenario:
    return succeed_through(start(), NOTIFY).expect_state("completed")


def failed() -> Scenario:
    return at_step(CHARGE).reply_failure("card_declined").reply_success().expect_state("failed")


def stuck() -> Scenario:
    return at_step(NOTIFY).reply_failure("bounced").expect_state("stuck")


@pytest.mark.parametrize("finish", [completed, failed, stuck])
def test_replies_after_the_end_are_finished(finish: Any) -> None:
    s = finish()
    status = s.state.status
    with Unchanged(s, reason="finished"):
        s.redeliver_last_reply()
    for command in list(s.commands):
        with Unchanged(s, reason="finished"):
            s.reply_success(to=command)
        with Unchanged(s, reason="finished"):
            s.reply_failure("late_news", retryable=True, to=command)
    assert s.state.status is status
    assert s.state.ignored_replies == 1 + 2 * len(s.commands)


def test_reply_naming_an_unknown_command_raises() -> None:
    s = at_step(CHARGE)
    before, events = s.state, len(s.events)
    template = s.awaited
    for bogus in (
        uuid.uuid4(),
        command_id(s.state.saga_id, "action", CHARGE, 2),  # not issued yet
        command_id(s.state.saga_id, "compensation", RESERVE, 1),
        command_id(saga_id_for("order-fulfillment", "other"), "action", CHARGE, 1),
    ):
        reply = template.model_copy(update={"message_id": bogus}).reply_success(uuid.uuid4())
        with pytest.raises(UnknownCommandError) as caught:
            decide(order_fulfillment, s.state, reply, s.now)
        assert str(bogus) in str(caught.value)
        assert str(s.state.saga_id) in str(caught.value)
        assert caught.value.context["command_id"] == bogus
        with pytest.raises(UnknownCommandError):
            s.deliver(reply)
    assert s.state == before
    assert len(s.events) == events


# -- timers that change nothing -------------------------------------------------------------------


def test_deadline_timer_fired_twice_changes_nothing() -> None:
    s = at_step(CHARGE)
    deadline = s.timer.timer_id
    s.time_out().expect_events("StepTimedOut", "RetryScheduled")
    with Unchanged(s, reason=None):
        s.fire_timer(deadline)
    assert s.last is not None
    assert not s.last.changed


def test_retry_timer_fired_twice_changes_nothing() -> None:
    s = at_step(CHARGE)
    s.time_out()
    retry = s.timer.timer_id
    s.retry_now().expect_command("payment.charge", attempt=2)
    with Unchanged(s, reason=None):
        s.fire_timer(retry)


def test_deadline_timer_after_the_reply_changes_nothing() -> None:
    s = start()
    deadline = s.timer.timer_id
    s.reply_success(RESULTS[RESERVE])
    with Unchanged(s, reason=None):
        s.fire_timer(deadline)
    with Unchanged(s, reason=None):
        s.fire_timer(uuid.uuid4())


@pytest.mark.parametrize("finish", [completed, failed, stuck])
def test_timers_after_the_end_change_nothing(finish: Any) -> None:
    s = finish()
    for command in list(s.commands):
        with Unchanged(s, reason=None):
            s.fire_timer(command.message_id)
    decision = decide(order_fulfillment, s.state, TimerFired(s.state.saga_id, uuid.uuid4()), s.now)
    assert decision.events == ()
    assert decision.commands == ()
    assert decision.state == s.state


# -- ids ------------------------------------------------------------------------------------------


def busy_history(s: Scenario) -> Scenario:
    """Retries, a timeout, an ignored reply and a compensation: every kind of command."""
    s.reply_success(RESULTS[RESERVE])
    s.reply_failure("gateway_busy", retryable=True).retry_now()
    s.time_out().retry_now()
    s.redeliver_last_reply()
    s.reply_success(RESULTS[CHARGE])
    s.reply_failure("address_invalid")
    s.reply_failure("bank_down", retryable=True).retry_now()
    s.reply_success().reply_success()
    return s.expect_state("failed")


def test_causation_id_is_the_event_before_the_issuing_one() -> None:
    s = busy_history(start())
    by_version = {e.originator_version: e for e in s.events}
    for c in s.commands:
        assert c.causation_id == event_id(s.state.saga_id, c.saga_version - 1)
        issuing = by_version[c.saga_version]
        assert isinstance(issuing, ev.StepCommandIssued | ev.CompensationIssued)
        assert issuing.command_id == c.message_id
        assert c.saga_id == s.state.saga_id
        assert c.correlation_id == "correlation-1"
        assert (c.definition, c.definition_version) == ("order-fulfillment", 1)
    check_consistent(s)


def test_command_ids_are_deterministic() -> None:
    one, two = busy_history(start()), busy_history(start())
    assert [c.message_id for c in one.commands] == [c.message_id for c in two.commands]
    assert [c.idempotency_key for c in one.commands] == [c.idempotency_key for c in two.commands]
    assert [c.causation_id for c in one.commands] == [c.causation_id for c in two.commands]
    assert [c.model_dump() for c in one.commands] == [c.model_dump() for c in two.commands]
    for c in one.commands:
        assert c.message_id == command_id(one.state.saga_id, c.phase, c.step, c.attempt)
    assert one.state == two.state
    other = busy_history(start(n=1, business_key="key-2"))
    assert not {c.message_id for c in other.commands} & {c.message_id for c in one.commands}


def test_idempotency_key_is_per_step_and_phase_not_per_attempt() -> None:
    s = busy_history(start())
    keys: dict[tuple[str, str], set[uuid.UUID]] = {}
    for c in s.commands:
        keys.setdefault((c.step, c.phase), set()).add(c.idempotency_key)
        assert c.idempotency_key == idempotency_key(s.state.saga_id, c.phase, c.step)
    assert all(len(v) == 1 for v in keys.values())
    assert len(s.commands_named("payment.charge")) == 3
    assert len(s.commands_named("payment.refund")) == 2
    charge = s.commands_named("payment.charge")[0].idempotency_key
    refund = s.commands_named("payment.refund")[0].idempotency_key
    release = s.commands_named("inventory.release")[0].idempotency_key
    reserve = s.commands_named("inventory.reserve")[0].idempotency_key
    assert len({charge, refund, release, reserve}) == 4


def test_command_messages_are_valid_commands() -> None:
    s = busy_history(start())
    for c in s.commands:
        assert isinstance(c, CommandMessage)
        assert CommandMessage.model_validate(c.model_dump()) == c
        assert c.created_at <= c.deadline


def test_a_deadline_fired_before_it_is_due_changes_nothing() -> None:
    # Timer processes and engines read different clocks: an early firing must not time out.
    s = start()
    deadline = s.timer
    s.fire_timer(deadline.timer_id).expect_unchanged()
    assert s.state.awaiting is not None
    assert s.timer == deadline  # still there, to fire when due
    s.advance(deadline.due - s.now).expect_events("StepTimedOut", "RetryScheduled")
