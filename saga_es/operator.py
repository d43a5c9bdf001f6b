"""Operator actions: what a person may ask of a saga, decided as purely as ``decide``.

    decision = act(definition, state, Abort(actor="ann", reason="customer cancelled"), now)

Each action records an event in the saga's own stream naming who acted (``actor``) and why
(``reason``), then sets in motion what follows through the same rules as ``decide`` (issuing a
command, compensating, getting stuck); or it raises ``ActionRefusedError`` naming the saga, its
state and why, and nothing is recorded. The engine commits the decision like any other: events,
outbox rows and the saga's timer in one transaction.

================  =========================================  ======================================
action            allowed when                               what happens
================  =========================================  ======================================
RetryNow          pending or compensating: waiting for a     the current step's next attempt is
                  reply or for a retry                       issued now; an unanswered attempt is
                                                             abandoned (in doubt, as on a timeout)
Resume            stuck                                      what it got stuck on is issued again
                                                             (the failed compensation, or the
                                                             action), with a fresh retry budget
Abort             going forward, and the pivot has neither   the completed compensatable steps
                  succeeded nor been sent without a          are compensated, latest first, and
                  definite answer                            the current one too if in doubt
MarkCompensated   compensating, or stuck compensating, and   the step counts as compensated; if it
                  the step is still to be compensated        was the one in hand, the saga goes on
CancelTimer       a timer is pending                         a reply deadline: the saga waits for
                                                             the reply without one; a retry: the
                                                             saga is stuck (nothing else would
                                                             move it), to resume or abort
RescheduleTimer   a timer is pending, or a reply is awaited  the timer is due at the new time
                  without a deadline
================  =========================================  ======================================

Abort and the pivot: past the point of no return there is nothing a saga may undo, so abort is
refused once the pivot succeeded, and also while any attempt of the pivot lacks a definite
answer (sent and unanswered, timed out, abandoned), because it may have succeeded. Retrying
or resuming the pivot asks the participant again under the same idempotency key, and its
answer says which way the saga must go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar
from uuid import UUID

from saga_es import events as ev
from saga_es.decide import Decision, Plan
from saga_es.definition import SagaDefinition, StepKind
from saga_es.errors import ActionRefusedError
from saga_es.state import Phase, SagaState, SagaStatus, next_timer

__all__ = [
    "Abort",
    "CancelTimer",
    "MarkCompensated",
    "OperatorAction",
    "RescheduleTimer",
    "Resume",
    "RetryNow",
    "act",
]

#: What an attempt's outcome must be for the saga to know its effect did not happen.
_DEFINITE_FAILURE = "failed"


@dataclass(frozen=True, kw_only=True)
class OperatorAction:
    """Who acts and why; both are recorded and both are required."""

    verb: ClassVar[str] = "act"
    actor: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class RetryNow(OperatorAction):
    verb: ClassVar[str] = "retry"


@dataclass(frozen=True, kw_only=True)
class Resume(OperatorAction):
    verb: ClassVar[str] = "resume"


@dataclass(frozen=True, kw_only=True)
class Abort(OperatorAction):
    verb: ClassVar[str] = "abort"


@dataclass(frozen=True, kw_only=True)
class MarkCompensated(OperatorAction):
    """``note``: what was done by hand to undo the step's effect."""

    verb: ClassVar[str] = "mark compensated"
    step: str
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class CancelTimer(OperatorAction):
    """``timer_id``, if given, must be the saga's pending timer (guards against acting on a
    timer that changed since it was listed)."""

    verb: ClassVar[str] = "cancel the timer"
    timer_id: UUID | None = None


@dataclass(frozen=True, kw_only=True)
class RescheduleTimer(OperatorAction):
    verb: ClassVar[str] = "reschedule the timer"
    due: datetime
    timer_id: UUID | None = None


def act(
    definition: SagaDefinition, state: SagaState, action: OperatorAction, now: datetime
) -> Decision:
    """The decision for ``action``; raises ``ActionRefusedError`` when it makes no sense."""
    context = _Context(Plan(definition, state, now), action)
    if not action.actor.strip():
        raise context.refuse("say who is acting (actor)")
    if not action.reason.strip():
        raise context.refuse("give a reason; it is recorded in the saga's history")
    _RULES[type(action)](context)
    return context.plan.decision()


@dataclass
class _Context:
    plan: Plan
    action: OperatorAction

    @property
    def state(self) -> SagaState:
        return self.plan.state

    @property
    def who(self) -> dict[str, str]:
        return {"actor": self.action.actor.strip(), "reason": self.action.reason.strip()}

    def refuse(self, why: str) -> ActionRefusedError:
        return ActionRefusedError(
            saga_id=self.state.saga_id,
            action=self.action.verb,
            status=self.state.status.value,
            why=why,
        )

    def refuse_terminal(self, what_instead: str) -> None:
        state = self.state
        if state.status in (SagaStatus.COMPLETED, SagaStatus.FAILED):
            raise self.refuse("it has finished; nothing about it can change any more")
        if state.status is SagaStatus.STUCK:
            raise self.refuse(f"it is stuck ({state.stuck_reason}); {what_instead}")


def _retry_now(c: _Context) -> None:
    c.refuse_terminal("resume it instead")
    state = c.state
    current = state.awaiting or state.retry_wait
    if current is None:  # only between the events of one decision
        raise c.refuse("it waits for no step")
    attempt = _next_attempt(state, current.phase, current.step)
    c.plan.record(
        ev.RetryRequested, step=current.step, phase=current.phase, attempt=attempt, **c.who
    )
    c.plan.issue(current.phase, c.plan.definition.step_named(current.step), attempt)


def _resume(c: _Context) -> None:
    state = c.state
    if state.status is not SagaStatus.STUCK or state.stuck is None:
        if state.is_terminal:
            raise c.refuse("it has finished; only a stuck saga can be resumed")
        raise c.refuse("it is not stuck; to hurry its current step, retry it")
    # Stuck going back leaves a compensation plan; stuck going forward (a pivot in doubt, a
    # retriable step, a cancelled retry) never started one.
    phase: Phase = "compensation" if state.compensation_plan else "action"
    step = state.stuck.step
    attempt = _next_attempt(state, phase, step)
    c.plan.record(ev.SagaResumed, step=step, phase=phase, attempt=attempt, **c.who)
    c.plan.issue(phase, c.plan.definition.step_named(step), attempt)


def _abort(c: _Context) -> None:
    state, definition = c.state, c.plan.definition
    if state.status in (SagaStatus.COMPLETED, SagaStatus.FAILED):
        raise c.refuse("it has finished; there is nothing left to stop")
    if state.compensation_plan:
        raise c.refuse(
            "it is compensating already"
            + (
                f" and stuck on '{state.stuck.step}': resume it, or mark that step compensated"
                if state.stuck
                else ""
            )
        )
    for pivot in (s for s in definition.steps if s.kind is StepKind.PIVOT):
        if pivot.name in state.succeeded:
            raise c.refuse(
                f"the pivot '{pivot.name}' has succeeded: past the point of no return the saga "
                "can only go forward (retry or resume it)"
            )
        attempts = [
            command
            for command in state.commands.values()
            if command.phase == "action" and command.step == pivot.name
        ]
        if any(command.outcome != _DEFINITE_FAILURE for command in attempts):
            raise c.refuse(
                f"the pivot '{pivot.name}' may have taken effect (an attempt has no definite "
                "answer): retry or resume it, and the participant's answer says which way to go"
            )
    name = state.current_step or (state.stuck.step if state.stuck else None)
    if name is None:  # only between the events of one decision
        raise c.refuse("it is at no step")
    last = state.last_attempt("action", name)
    in_doubt = last is not None and last.outcome != _DEFINITE_FAILURE
    message = f"aborted by {c.who['actor']}: {c.who['reason']}"
    c.plan.record(ev.SagaAborted, step=name, **c.who)
    c.plan.turn_back(definition.step_named(name), "aborted", message, in_doubt=in_doubt)


def _mark_compensated(c: _Context) -> None:
    action = c.action
    assert isinstance(action, MarkCompensated)
    state, name = c.state, action.step
    if name not in {s.name for s in c.plan.definition.steps}:
        raise c.refuse(f"its definition has no step '{name}'")
    if state.status in (SagaStatus.COMPLETED, SagaStatus.FAILED):
        raise c.refuse("it has finished; nothing is left to compensate")
    if not state.compensation_plan:
        raise c.refuse("it is not compensating; only a step waiting to be compensated can be")
    if name in state.compensated:
        raise c.refuse(f"step '{name}' is compensated already")
    if name not in state.compensation_plan:
        plan = ", ".join(state.compensation_plan)
        raise c.refuse(f"step '{name}' is not to be compensated (the plan: {plan})")
    in_hand = state.current_step == name or (state.stuck is not None and state.stuck.step == name)
    c.plan.record(ev.StepMarkedCompensated, step=name, note=action.note.strip(), **c.who)
    if in_hand:
        c.plan.compensate_next()


def _cancel_timer(c: _Context) -> None:
    action = c.action
    assert isinstance(action, CancelTimer)
    c.refuse_terminal("it has no timer")
    timer = next_timer(c.state)
    if timer is None:
        raise c.refuse("it has no pending timer (its reply deadline was cancelled already)")
    if action.timer_id is not None and action.timer_id != timer.timer_id:
        raise c.refuse(f"timer {action.timer_id} is not its pending timer ({timer.timer_id})")
    c.plan.record(
        ev.TimerCancelled,
        timer_id=timer.timer_id,
        kind=timer.kind,
        step=timer.step,
        phase=timer.phase,
        attempt=timer.attempt,
        **c.who,
    )
    if timer.kind == "retry":
        # Nothing would ever issue the retry: the saga must not wait unseen.
        who = c.who
        c.plan.stuck(
            c.plan.definition.step_named(timer.step),
            timer.phase,
            f"retry of '{timer.step}' ({timer.phase}) cancelled by {who['actor']}: "
            f"{who['reason']}; resume or abort it",
            "cancelled",
            who["reason"],
        )


def _reschedule_timer(c: _Context) -> None:
    action = c.action
    assert isinstance(action, RescheduleTimer)
    c.refuse_terminal("it has no timer")
    if action.due.tzinfo is None:
        raise c.refuse(f"the new due time {action.due.isoformat()} has no time zone")
    state = c.state
    if state.awaiting is not None:
        a = state.awaiting
        timer_id, kind, phase, step, attempt = a.command_id, "deadline", a.phase, a.step, a.attempt
    elif state.retry_wait is not None:
        r = state.retry_wait
        timer_id, kind, phase, step, attempt = r.timer_id, "retry", r.phase, r.step, r.attempt
    else:  # only between the events of one decision
        raise c.refuse("it has no timer")
    if action.timer_id is not None and action.timer_id != timer_id:
        raise c.refuse(f"timer {action.timer_id} is not its pending timer ({timer_id})")
    c.plan.record(
        ev.TimerRescheduled,
        timer_id=timer_id,
        kind=kind,
        step=step,
        phase=phase,
        attempt=attempt,
        due=action.due,
        **c.who,
    )


def _next_attempt(state: SagaState, phase: Phase, step: str) -> int:
    last = state.last_attempt(phase, step)
    return (last.attempt if last else 0) + 1


_RULES: dict[type[OperatorAction], Callable[[_Context], None]] = {
    RetryNow: _retry_now,
    Resume: _resume,
    Abort: _abort,
    MarkCompensated: _mark_compensated,
    CancelTimer: _cancel_timer,
    RescheduleTimer: _reschedule_timer,
}
