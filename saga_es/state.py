"""A saga's state: small, frozen, rebuilt from its events by ``evolve``, a plain function.

``replay(events)`` folds a whole stream; step through it in a debugger to see how a saga got
where it is. The state holds what ``decide`` needs and what an operator asks first: where the
saga is, what it waits for, what succeeded, what was undone, and why it failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID

from saga_es import events as ev

__all__ = [
    "TERMINAL",
    "Awaiting",
    "Failure",
    "IssuedCommand",
    "Phase",
    "RetryAlert",
    "RetryWait",
    "SagaState",
    "SagaStatus",
    "Timer",
    "evolve",
    "next_timer",
    "replay",
]

Phase = Literal["action", "compensation"]


class SagaStatus(StrEnum):
    STARTED = "started"
    PENDING = "pending"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    FAILED = "failed"  # every completed step was compensated
    STUCK = "stuck"  # needs an operator


#: No reply and no timer moves a saga out of these (only an operator can move a stuck saga on).
TERMINAL = frozenset({SagaStatus.COMPLETED, SagaStatus.FAILED, SagaStatus.STUCK})


@dataclass(frozen=True)
class Awaiting:
    """The one command whose reply the saga waits for. ``deadline`` is None only when an
    operator cancelled it: the saga then waits for the reply however long it takes."""

    phase: Phase
    step: str
    attempt: int
    command_id: UUID
    deadline: datetime | None


@dataclass(frozen=True)
class RetryWait:
    """No command out: the saga waits until ``due`` to issue attempt ``attempt``."""

    phase: Phase
    step: str
    attempt: int
    due: datetime
    timer_id: UUID


@dataclass(frozen=True)
class IssuedCommand:
    """What the saga knows of a command it issued; ``outcome`` is None while unanswered.
    "abandoned": an operator stopped waiting for it (its effect is in doubt, as on a timeout)."""

    phase: Phase
    step: str
    attempt: int
    outcome: Literal["succeeded", "failed", "timed_out", "abandoned"] | None = None


@dataclass(frozen=True)
class Failure:
    step: str
    error_code: str
    message: str


@dataclass(frozen=True)
class RetryAlert:
    """A step still retried after ``attempts`` failures in a row; the last one's error."""

    phase: Phase
    step: str
    attempts: int
    error_code: str
    message: str
    raised_at: datetime


@dataclass(frozen=True)
class Timer:
    """The saga's next wake-up: a reply deadline or a retry. Derived from the state."""

    timer_id: UUID
    kind: Literal["deadline", "retry"]
    phase: Phase
    step: str
    attempt: int
    due: datetime


@dataclass(frozen=True)
class SagaState:
    saga_id: UUID
    version: int
    definition: str
    definition_version: int
    business_key: str
    correlation_id: str
    data: Mapping[str, Any]
    status: SagaStatus
    started_at: datetime
    updated_at: datetime
    awaiting: Awaiting | None = None
    retry_wait: RetryWait | None = None
    commands: Mapping[UUID, IssuedCommand] = field(default_factory=dict)
    succeeded: tuple[str, ...] = ()
    results: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    compensation_plan: tuple[str, ...] = ()
    compensated: tuple[str, ...] = ()
    failure: Failure | None = None  # the failure that turned the saga back (or stopped it)
    stuck: Failure | None = None  # where it got stuck, when that differs from ``failure``
    stuck_reason: str | None = None
    ignored_replies: int = 0
    retry_alert: RetryAlert | None = None  # a step retried past its policy's alert_after
    # Per (phase, step): attempts that no longer count against the retry policy, because an
    # operator resumed the step with a fresh budget after them.
    budget_spent: Mapping[tuple[str, str], int] = field(default_factory=dict)
    marked_compensated: tuple[str, ...] = ()  # undone by hand, recorded by an operator

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def current_step(self) -> str | None:
        if self.awaiting:
            return self.awaiting.step
        if self.retry_wait:
            return self.retry_wait.step
        return None

    @property
    def remaining_compensations(self) -> tuple[str, ...]:
        return tuple(s for s in self.compensation_plan if s not in self.compensated)

    def last_attempt(self, phase: Phase, step: str) -> IssuedCommand | None:
        """The latest attempt issued of the step's action or compensation."""
        attempts = [c for c in self.commands.values() if c.phase == phase and c.step == step]
        return max(attempts, key=lambda c: c.attempt, default=None)


def next_timer(state: SagaState) -> Timer | None:
    if state.awaiting:
        a = state.awaiting
        if a.deadline is None:
            return None
        return Timer(a.command_id, "deadline", a.phase, a.step, a.attempt, a.deadline)
    if state.retry_wait:
        r = state.retry_wait
        return Timer(r.timer_id, "retry", r.phase, r.step, r.attempt, r.due)
    return None


def replay(events: Iterable[Any]) -> SagaState:
    state: SagaState | None = None
    for event in events:
        state = evolve(state, event)
    if state is None:
        raise ValueError("a saga stream starts with SagaStarted; no events were given")
    return state


def evolve(state: SagaState | None, event: Any) -> SagaState:
    """The state after ``event``. Pure: the same state and event always give the same result."""
    if isinstance(event, ev.SagaStarted):
        if state is not None:
            raise ValueError(f"saga {event.originator_id} started twice")
        return SagaState(
            saga_id=event.originator_id,
            version=event.originator_version,
            definition=event.definition,
            definition_version=event.definition_version,
            business_key=event.business_key,
            correlation_id=event.correlation_id,
            data=event.data,
            status=SagaStatus.STARTED,
            started_at=event.timestamp,
            updated_at=event.timestamp,
        )
    if state is None:
        raise ValueError(f"saga {event.originator_id}: {type(event).__name__} before SagaStarted")
    handler = _CHANGES.get(type(event))
    if handler is None:
        raise TypeError(f"saga {state.saga_id}: no rule to apply {type(event).__name__}")
    # One ``replace`` per event: replay speed is decision speed for a saga not in the cache.
    return replace(
        state, version=event.originator_version, updated_at=event.timestamp, **handler(state, event)
    )


# Each rule returns the fields an event changes.
Changes = dict[str, Any]


def _issued(state: SagaState, e: Any, phase: Phase, status: SagaStatus) -> Changes:
    return {
        "status": status,
        "awaiting": Awaiting(phase, e.step, e.attempt, e.command_id, e.deadline),
        "retry_wait": None,
        "commands": {**state.commands, e.command_id: IssuedCommand(phase, e.step, e.attempt)},
    }


def _answered(state: SagaState, command_id: UUID, outcome: Any, **more: Any) -> Changes:
    known = state.commands[command_id]
    return {
        "awaiting": None,
        "commands": {**state.commands, command_id: replace(known, outcome=outcome)},
        **more,
    }


def _step_succeeded(s: SagaState, e: ev.StepSucceeded) -> Changes:
    return _answered(
        s,
        e.command_id,
        "succeeded",
        succeeded=(*s.succeeded, e.step),
        results={**s.results, e.step: e.result},
        retry_alert=None,  # only the awaited step can succeed: the one alerted about, if any
    )


def _retry(s: SagaState, e: ev.RetryScheduled) -> Changes:
    phase: Phase = "compensation" if e.phase == "compensation" else "action"
    return {"awaiting": None, "retry_wait": RetryWait(phase, e.step, e.attempt, e.due, e.timer_id)}


def _compensation_started(s: SagaState, e: ev.CompensationStarted) -> Changes:
    return {
        "status": SagaStatus.COMPENSATING,
        "compensation_plan": tuple(e.plan),
        "failure": Failure(e.failed_step, e.error_code, e.message),
    }


def _stuck(s: SagaState, e: ev.SagaStuck) -> Changes:
    return {
        "status": SagaStatus.STUCK,
        "awaiting": None,
        "retry_wait": None,
        "retry_alert": None,  # being stuck says more
        "stuck_reason": e.reason,
        "stuck": Failure(e.step, e.error_code, e.message),
        # A compensation that got stuck keeps the original cause as the saga's failure.
        "failure": s.failure or Failure(e.step, e.error_code, e.message),
    }


def _abandon(s: SagaState) -> Changes:
    """Stop waiting: for the awaited reply (its command is then in doubt) or for a retry."""
    changes: Changes = {"awaiting": None, "retry_wait": None}
    if s.awaiting is not None:
        changes.update(_answered(s, s.awaiting.command_id, "abandoned"))
    return changes


def _alert(s: SagaState, e: ev.RetryAlertRaised) -> Changes:
    phase: Phase = "compensation" if e.phase == "compensation" else "action"
    alert = RetryAlert(phase, e.step, e.attempts, e.error_code, e.message, e.timestamp)
    return {"retry_alert": alert}


def _resumed(s: SagaState, e: ev.SagaResumed) -> Changes:
    changes: Changes = {
        "stuck": None,
        "stuck_reason": None,
        "retry_alert": None,
        "budget_spent": {**s.budget_spent, (e.phase, e.step): e.attempt - 1},
    }
    if e.phase == "action" and not s.compensation_plan:
        changes["failure"] = None  # going forward again: what stopped it is history now
    return changes


def _marked_compensated(s: SagaState, e: ev.StepMarkedCompensated) -> Changes:
    changes: Changes = {
        "compensated": (*s.compensated, e.step),
        "marked_compensated": (*s.marked_compensated, e.step),
    }
    if s.current_step == e.step or (s.stuck is not None and s.stuck.step == e.step):
        # It was the compensation in hand: stop waiting for it; the saga moves on.
        changes.update(_abandon(s), status=SagaStatus.COMPENSATING, stuck=None, stuck_reason=None)
        changes["retry_alert"] = None
    return changes


def _rescheduled(s: SagaState, e: ev.TimerRescheduled) -> Changes:
    if e.kind == "deadline" and s.awaiting is not None:
        return {"awaiting": replace(s.awaiting, deadline=e.due)}
    if e.kind == "retry" and s.retry_wait is not None:
        return {"retry_wait": replace(s.retry_wait, due=e.due)}
    return {}


def _cancelled(s: SagaState, e: ev.TimerCancelled) -> Changes:
    if e.kind == "deadline" and s.awaiting is not None:
        return {"awaiting": replace(s.awaiting, deadline=None)}
    return {"retry_wait": None}  # a SagaStuck follows in the same decision


_CHANGES: dict[type[Any], Callable[[SagaState, Any], Changes]] = {
    ev.StepCommandIssued: lambda s, e: _issued(s, e, "action", SagaStatus.PENDING),
    ev.CompensationIssued: lambda s, e: _issued(s, e, "compensation", SagaStatus.COMPENSATING),
    ev.StepSucceeded: _step_succeeded,
    ev.StepFailed: lambda s, e: _answered(s, e.command_id, "failed"),
    ev.StepTimedOut: lambda s, e: _answered(s, e.command_id, "timed_out"),
    ev.CompensationSucceeded: lambda s, e: _answered(
        s, e.command_id, "succeeded", compensated=(*s.compensated, e.step), retry_alert=None
    ),
    ev.CompensationFailed: lambda s, e: _answered(s, e.command_id, "failed"),
    ev.RetryScheduled: _retry,
    ev.CompensationStarted: _compensation_started,
    ev.ReplyIgnored: lambda s, e: {"ignored_replies": s.ignored_replies + 1},
    ev.SagaCompleted: lambda s, e: {"status": SagaStatus.COMPLETED},
    ev.SagaCompensated: lambda s, e: {"status": SagaStatus.FAILED},
    ev.SagaStuck: _stuck,
    ev.RetryAlertRaised: _alert,
    ev.RetryRequested: lambda s, e: _abandon(s),
    ev.SagaResumed: _resumed,
    ev.SagaAborted: lambda s, e: {
        **_abandon(s),
        "retry_alert": None,
        "stuck": None,
        "stuck_reason": None,
    },
    ev.StepMarkedCompensated: _marked_compensated,
    ev.TimerRescheduled: _rescheduled,
    ev.TimerCancelled: _cancelled,
}
