"""Random input sequences against saga definitions; invariants checked after every input.

Inputs: a reply (success, business failure, retryable failure, non-retryable error code) to the
awaited command, a previous reply delivered again, a reply to any earlier command, the current
timer firing (a reply deadline or a retry), a timer that is not the current one, time passing.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

from conftest import ORDER
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from saga_es import events as ev
from saga_es.definition import PIVOT, RETRIABLE, RETRIABLE_MIN_ATTEMPTS, SagaDefinition, saga, step
from saga_es.demo.order_saga import order_fulfillment
from saga_es.ids import event_id
from saga_es.retry import RetryPolicy
from saga_es.state import SagaState, SagaStatus, replay
from saga_es.testing import Scenario, scenario

ISSUED = (ev.StepCommandIssued, ev.CompensationIssued)
TERMINAL_EVENTS = (ev.SagaCompleted, ev.SagaCompensated, ev.SagaStuck)
ACTION_OUTCOMES = (ev.StepSucceeded, ev.StepFailed)

# How often each input is drawn: answering and timing out are what move a saga on.
WEIGHTS = {
    "success": 4,
    "business_failure": 1,
    "retryable_failure": 2,
    "listed_code": 1,
    "redeliver": 1,
    "earlier_command": 1,
    "current_timer": 3,
    "stale_timer": 1,
    "advance": 1,
}
INPUTS = [kind for kind, weight in WEIGHTS.items() for _ in range(weight)]


@st.composite
def scripts(draw: st.DrawFn) -> list[tuple[str, int]]:
    """Inputs drawn from a per-example mix, so that some examples time out or fail over and
    over (reaching stuck sagas and exhausted retries) while others mostly succeed."""
    if draw(st.booleans()):
        mix = INPUTS
    else:
        mix = [*draw(st.lists(st.sampled_from(INPUTS), min_size=1, max_size=6)), "current_timer"]
    moves = st.tuples(st.sampled_from(mix), st.integers(0, 2**16))
    return draw(st.lists(moves, min_size=5, max_size=100))


SCRIPTS = scripts()
REPLIES = ("success", "business_failure", "retryable_failure", "listed_code")
FATAL = "fatal"  # listed as non-retryable in generated definitions
# "timeout" as a participant's error code is an answer, not a missed deadline.
BUSINESS_CODES = ("biz", "transient", "timeout")


class Data(BaseModel):
    x: int = 0


@st.composite
def definitions(draw: st.DrawFn) -> SagaDefinition:
    """A valid definition of 1 to 5 steps: compensatable ones, then maybe a pivot, then
    retriable ones (only after a pivot)."""
    n_comp = draw(st.integers(0, 5))
    has_pivot = n_comp == 0 or (n_comp < 5 and draw(st.booleans()))
    n_retriable = draw(st.integers(0, 4 - n_comp)) if has_pivot else 0

    def policy(min_attempts: int = 1, max_attempts: int = 3) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=draw(st.integers(min_attempts, max_attempts)),
            initial_backoff=timedelta(seconds=draw(st.integers(0, 30))),
            multiplier=draw(st.sampled_from([1.0, 1.5, 2.0, 3.0])),
            max_backoff=timedelta(seconds=draw(st.integers(30, 600))),
            jitter=draw(st.sampled_from([0.0, 0.2, 0.5, 1.0])),
            non_retryable=frozenset({FATAL}) if draw(st.booleans()) else frozenset(),
        )

    def timeout() -> timedelta:
        return timedelta(seconds=draw(st.integers(1, 120)))

    steps = []
    for i in range(n_comp):
        steps.append(
            step(
                name=f"c{i}",
                action=f"svc{i}.do",
                compensation=f"svc{i}.undo",
                timeout=timeout(),
                retry=policy(),
                compensation_retry=policy(),
                compensation_timeout=timeout(),
            )
        )
    if has_pivot:
        steps.append(
            step(name="pivot", action="pivot.do", kind=PIVOT, timeout=timeout(), retry=policy())
        )
    for i in range(n_retriable):
        bounded = draw(st.booleans())
        steps.append(
            step(
                name=f"r{i}",
                action=f"retry{i}.do",
                kind=RETRIABLE,
                timeout=timeout(),
                retry=policy(RETRIABLE_MIN_ATTEMPTS, RETRIABLE_MIN_ATTEMPTS + 2)
                if bounded
                else RetryPolicy.forever(),
            )
        )
    return saga("generated", data=Data, steps=steps)


# -- driving a saga -------------------------------------------------------------------------------


def comparable(state: SagaState) -> SagaState:
    return replace(state, version=0, updated_at=state.started_at, ignored_replies=0)


def stale_timer_ids(s: Scenario) -> list[uuid.UUID]:
    current = s.timer.timer_id if s.timer else None
    known = [c.message_id for c in s.commands]
    known += [e.timer_id for e in s.events if isinstance(e, ev.RetryScheduled)]
    return [t for t in known if t != current]


def run(definition: SagaDefinition, data: dict[str, Any], script: list[tuple[str, int]]) -> None:
    s = scenario(definition).given(data)
    check_history(definition, s)
    listed = sorted({code for st_ in definition.steps for code in st_.retry.non_retryable})
    for kind, n in script:
        before = s.state
        events_before, commands_before = len(s.events), len(s.commands)
        expect_ignored = expect_nothing = False
        if kind in REPLIES and before.awaiting is None:
            kind = "current_timer"  # nothing to answer: the retry comes due instead
        if kind in REPLIES:
            command = s.awaited
            if kind == "success":
                s.reply_success({"n": n})
            elif kind == "business_failure":
                s.reply_failure(BUSINESS_CODES[n % len(BUSINESS_CODES)], retryable=False)
            elif kind == "retryable_failure":
                s.reply_failure(BUSINESS_CODES[n % len(BUSINESS_CODES)], retryable=True)
            else:
                code = listed[n % len(listed)] if listed else FATAL
                s.reply_failure(code, retryable=True)
            answered = s.last.events[0]
            assert not isinstance(answered, ev.ReplyIgnored)
            assert answered.command_id == command.message_id
        elif kind == "redeliver":
            if not s.replies:
                continue
            reply = s.replies[n % len(s.replies)]
            expect_ignored = (
                before.awaiting is None or before.awaiting.command_id != reply.command_id
            )
            s.deliver(reply)
        elif kind == "earlier_command":
            command = s.commands[n % len(s.commands)]
            expect_ignored = (
                before.awaiting is None or before.awaiting.command_id != command.message_id
            )
            if n % 2:
                s.reply_success({"late": n}, to=command)
            else:
                s.reply_failure(f"old{n % 5}", retryable=bool(n % 3), to=command)
        elif kind == "current_timer":
            timer = s.timer
            if timer is None:
                continue
            s.now = max(s.now, timer.due)
            s.fire_timer(timer.timer_id)
            assert s.last.changed
        elif kind == "stale_timer":
            candidates = [*stale_timer_ids(s), uuid.UUID(int=n)]
            s.fire_timer(candidates[n % len(candidates)])
            expect_nothing = True
        else:  # "advance": time passes without the timer firing, nothing is decided
            s.now += timedelta(seconds=n % 50)
            continue

        decision = s.last
        assert decision is not None
        assert s.events[events_before:] == list(decision.events)
        assert s.commands[commands_before:] == list(decision.commands)
        if expect_nothing:
            assert decision.events == ()
            assert decision.commands == ()
            assert s.state == before
        if expect_ignored:
            assert [type(e) for e in decision.events] == [ev.ReplyIgnored]
            assert decision.commands == ()
            assert comparable(s.state) == comparable(before)
            assert s.state.ignored_replies == before.ignored_replies + 1
            reason = decision.events[0].reason
            if before.is_terminal:
                assert reason == "finished"
            else:
                assert reason in ("duplicate", "late", "stale")
        if before.is_terminal:
            assert decision.commands == ()
            assert all(
                isinstance(e, ev.ReplyIgnored) and e.reason == "finished" for e in decision.events
            )
            assert comparable(s.state) == comparable(before)
        check_history(definition, s)
    describe(s)


def describe(s: Scenario) -> None:
    """Statistics (pytest --hypothesis-show-statistics): which paths the examples reached."""
    event(f"ended {s.state.status.value}")
    for e in s.events:
        if isinstance(e, ev.ReplyIgnored):
            event(f"reply ignored as {e.reason}")
        elif isinstance(e, ev.CompensationStarted) and e.error_code == "timeout":
            event("compensation with a step in doubt")
        elif isinstance(e, ev.SagaStuck):
            event(f"stuck in {e.phase}")


# -- invariants -----------------------------------------------------------------------------------


def check_history(d: SagaDefinition, s: Scenario) -> None:
    events, commands, state = s.events, s.commands, s.state
    saga_id = state.saga_id

    # Versions are contiguous from 1; folding the whole stream gives the same state.
    assert [e.originator_version for e in events] == list(range(1, len(events) + 1))
    assert isinstance(events[0], ev.SagaStarted)
    assert replay(events) == state
    assert state.version == len(events)

    # Each issuing event has exactly one command with the same id, and ids are unique.
    issued = [e for e in events if isinstance(e, ISSUED)]
    assert [e.command_id for e in issued] == [c.message_id for c in commands]
    assert len({c.message_id for c in commands}) == len(commands)
    for e, c in zip(issued, commands, strict=True):
        phase = "action" if isinstance(e, ev.StepCommandIssued) else "compensation"
        assert (c.step, c.phase, c.attempt, c.command, c.queue, c.deadline) == (
            e.step,
            phase,
            e.attempt,
            e.command,
            e.queue,
            e.deadline,
        )
        assert c.saga_version == e.originator_version
        assert c.causation_id == event_id(saga_id, e.originator_version - 1)

    # Terminal states are absorbing: one terminal event, then only replies ignored as finished.
    terminal_at = [i for i, e in enumerate(events) if isinstance(e, TERMINAL_EVENTS)]
    assert len(terminal_at) <= 1
    if terminal_at:
        assert state.is_terminal
        assert state.awaiting is None
        assert state.retry_wait is None
        assert s.timer is None
        for e in events[terminal_at[0] + 1 :]:
            assert isinstance(e, ev.ReplyIgnored)
            assert e.reason == "finished"
    else:
        assert not state.is_terminal
        assert (state.awaiting is None) != (state.retry_wait is None)

    # Attempts of each step's action or compensation are numbered 1, 2, 3... within policy.
    attempts: dict[tuple[str, str], list[int]] = {}
    for c in commands:
        attempts.setdefault((c.phase, c.step), []).append(c.attempt)
    for (phase, name), numbers in attempts.items():
        assert numbers == list(range(1, len(numbers) + 1))
        policy = (
            d.step_named(name).retry if phase == "action" else d.step_named(name).compensation_retry
        )
        assert policy.max_attempts is None or len(numbers) <= policy.max_attempts

    # Going forward: each step starts after the one before it succeeded.
    succeeded = [e.step for e in events if isinstance(e, ev.StepSucceeded)]
    assert len(succeeded) == len(set(succeeded))
    assert succeeded == [x.name for x in d.steps[: len(succeeded)]]
    for e in events:
        if isinstance(e, ev.StepCommandIssued):
            index = d.index_of(e.step)
            done_before = {
                x.step
                for x in events[: e.originator_version - 1]
                if isinstance(x, ev.StepSucceeded)
            }
            assert {x.name for x in d.steps[:index]} <= done_before
            assert e.step not in done_before
    if any(isinstance(e, ev.SagaCompleted) for e in events):
        assert succeeded == [x.name for x in d.steps]
        assert state.status is SagaStatus.COMPLETED

    # Stuck going forward: a retriable step failed for good, or the pivot's outcome is unknown
    # because its last attempt got no reply.
    for e in events:
        if isinstance(e, ev.SagaStuck) and e.phase == "action":
            kind = d.step_named(e.step).kind
            outcomes = [
                x
                for x in events[: e.originator_version - 1]
                if isinstance(x, (*ACTION_OUTCOMES, ev.StepTimedOut)) and x.step == e.step
            ]
            assert kind is RETRIABLE or (
                kind is PIVOT and isinstance(outcomes[-1], ev.StepTimedOut)
            ), e.reason

    check_compensations(d, events, state)


def check_compensations(d: SagaDefinition, events: list[Any], state: SagaState) -> None:
    starts = [i for i, e in enumerate(events) if isinstance(e, ev.CompensationStarted)]
    compensating = [
        e
        for e in events
        if isinstance(e, ev.CompensationIssued | ev.CompensationSucceeded | ev.CompensationFailed)
    ]
    if not starts:
        assert not compensating
        assert not any(isinstance(e, ev.SagaCompensated) for e in events)
        return
    assert len(starts) == 1
    at = starts[0]
    started = events[at]
    before, after = events[:at], events[at + 1 :]
    assert not any(isinstance(e, ev.StepCommandIssued) for e in after)  # no way forward again
    assert all(events.index(e) > at for e in compensating)

    # The pivot never succeeded; what may be undone is what succeeded, plus the failing step
    # when its last attempt timed out (its effect is in doubt).
    succeeded = [e.step for e in before if isinstance(e, ev.StepSucceeded)]
    assert not any(d.step_named(x).kind is PIVOT for x in succeeded)
    last_outcome = [
        e
        for e in before
        if isinstance(e, (*ACTION_OUTCOMES, ev.StepTimedOut))
        and e.step == started.failed_step
        and getattr(e, "phase", "action") == "action"
    ]
    assert last_outcome, "compensation started without the failing step having an outcome"
    in_doubt = isinstance(last_outcome[-1], ev.StepTimedOut)
    if in_doubt:
        assert started.error_code == "timeout"
    rank = {name: i for i, name in enumerate(succeeded) if d.step_named(name).is_compensatable}
    if in_doubt and d.step_named(started.failed_step).is_compensatable:
        rank[started.failed_step] = len(succeeded)
    assert started.plan == sorted(rank, key=rank.__getitem__, reverse=True)

    issued_order: list[str] = []
    done: list[str] = []
    for e in after:
        if isinstance(e, ev.CompensationIssued):
            assert e.step in rank, (
                f"compensation of {e.step}, which neither succeeded nor is in doubt"
            )
            if e.step not in issued_order:
                # One at a time: the previous one succeeded before the next one starts.
                assert issued_order == done
                issued_order.append(e.step)
        elif isinstance(e, ev.CompensationSucceeded):
            assert e.step not in done
            done.append(e.step)
    # Strictly reverse order of success.
    ranks = [rank[x] for x in issued_order]
    assert ranks == sorted(ranks, reverse=True)
    assert len(set(ranks)) == len(ranks)
    assert issued_order == started.plan[: len(issued_order)]
    assert tuple(done) == state.compensated
    for e in after:
        if isinstance(e, ev.SagaCompensated):
            assert e.compensated == started.plan
            assert state.status is SagaStatus.FAILED
        if isinstance(e, ev.SagaStuck) and e.phase == "compensation":
            assert e.compensated == done
            assert e.compensated + e.not_compensated == started.plan


# -- the properties -------------------------------------------------------------------------------

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(script=SCRIPTS)
def test_order_saga_invariants_hold_for_any_input_sequence(script: list[tuple[str, int]]) -> None:
    run(order_fulfillment, ORDER, script)


@SETTINGS
@given(definition=definitions(), script=SCRIPTS)
def test_generated_definitions_invariants_hold_for_any_input_sequence(
    definition: SagaDefinition, script: list[tuple[str, int]]
) -> None:
    run(definition, {"x": 1}, script)


@SETTINGS
@given(script=SCRIPTS)
def test_same_inputs_give_the_same_history(script: list[tuple[str, int]]) -> None:
    # Reply ids are random in the scenario helper; everything the saga decides must not be.
    def history(s: Scenario) -> tuple[list[Any], list[Any]]:
        return [{k: v for k, v in vars(e).items() if k != "reply_id"} for e in s.events], [
            c.model_dump() for c in s.commands
        ]

    first = scenario(order_fulfillment)
    second = scenario(order_fulfillment)
    for s in (first, second):
        s.given(ORDER)
        for kind, n in script:
            if kind == "current_timer" and s.timer is not None:
                s.now = max(s.now, s.timer.due)
                s.fire_timer(s.timer.timer_id)
            elif s.state.awaiting is not None and kind in ("success", "business_failure"):
                if kind == "success":
                    s.reply_success({"n": n})
                else:
                    s.reply_failure("biz", retryable=False)
            elif s.state.awaiting is not None and kind == "retryable_failure":
                s.reply_failure("transient", retryable=True)
    assert history(first) == history(second)
    assert first.state == second.state
