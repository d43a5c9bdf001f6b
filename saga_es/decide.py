"""What a saga does next: ``begin`` and ``decide``, pure functions.

    decision = decide(definition, state, input, now)

``input`` is a ``ReplyMessage`` (a participant answered a command) or a ``TimerFired`` (a reply
deadline passed, or a retry is due). The decision lists the events to append and the commands to
send; the engine records both in one transaction. Nothing here reads a clock, a database or a
random number generator: ids and retry jitter are derived from the saga id (see ``ids``).

The rules, in the words of the business process:

* A step's action succeeds: record it, issue the next step, or complete after the last one.
* It fails, or its deadline passes: retry while the step's policy allows (bounded exponential
  backoff, error codes listed as non-retryable fail at once).
* When retries run out: before the pivot has succeeded, compensate the completed compensatable
  steps one at a time in reverse order; the failing step is compensated too if its last attempt
  timed out, because its effect may have happened (participants treat compensating an action
  they never applied as a no-op). A pivot whose outcome is unknown, or a retriable step that
  fails for good, leaves the saga stuck: only an operator can tell which way it must go.
* A compensation fails: retry under the compensation policy; when that runs out, stuck.
* A reply for any command other than the one awaited is recorded as ``ReplyIgnored``.
* A timer that is not the saga's current timer changes nothing (timers may fire twice).
* A retry policy with ``alert_after`` records ``RetryAlertRaised`` once that many attempts in a
  row have failed, and keeps retrying (retriable steps after the pivot retry without bound).

Late replies: why a timed-out step is compensated
-------------------------------------------------
A deadline passing proves nothing about the participant: the action may have committed a moment
later, and its success reply arrive after ``StepTimedOut``. That reply is recorded as
``ReplyIgnored`` (reason "late") and changes nothing, because the saga has already acted on the
timeout; and the decision it would have needed ("this effect exists") is taken anyway:

* while retries remain, the next attempt carries the same ``idempotency_key``. A participant that
  applied the late attempt replies to the retry with that stored outcome instead of applying it
  again, so the saga learns of the success through the retry;
* when the step's last attempt timed out and the saga turns back, the step is put in the
  compensation plan *in doubt*, as if it had succeeded. Its compensation either undoes the late
  effect, or, if the action never took effect, is a no-op at the participant, which also
  tombstones the action's key so that an attempt still in flight can never apply it afterwards.
  Either way nothing is left applied, whichever of the late action and its compensation the
  participant sees first;
* an operator who gives up waiting for an attempt (retry now, abort) leaves it in doubt in the
  same way ("abandoned"): its late reply is ignored, and abort compensates the step.

A pivot has no compensation, so a pivot whose last attempt timed out cannot be put in doubt
this way: the saga is stuck, and resuming it asks the participant again under the same key,
which answers with the outcome it stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel

from saga_es import events as ev
from saga_es.definition import SagaDefinition, Step, StepKind
from saga_es.errors import UnknownCommandError
from saga_es.ids import command_id, event_id, idempotency_key, retry_timer_id, spread
from saga_es.messages import CommandMessage, ReplyMessage
from saga_es.state import Phase, SagaState, Timer, evolve, next_timer

__all__ = ["Decision", "Plan", "TimerFired", "begin", "decide"]

TIMEOUT = "timeout"


@dataclass(frozen=True)
class TimerFired:
    """A durable timer came due. ``timer_id`` is a ``Timer.timer_id`` of the saga."""

    saga_id: UUID
    timer_id: UUID


@dataclass(frozen=True)
class Decision:
    events: tuple[Any, ...]
    commands: tuple[CommandMessage, ...]
    state: SagaState | None  # after the events; None only for an empty decision on no saga

    @property
    def timer(self) -> Timer | None:
        return next_timer(self.state) if self.state else None

    @property
    def changed(self) -> bool:
        return bool(self.events)


def begin(
    definition: SagaDefinition,
    *,
    saga_id: UUID,
    business_key: str,
    data: BaseModel,
    correlation_id: str,
    now: datetime,
) -> Decision:
    """Start a saga: record ``SagaStarted`` and issue the first step's action."""
    started = ev.SagaStarted(
        originator_id=saga_id,
        originator_version=1,
        timestamp=now,
        originator_topic=_SAGA_TOPIC,
        correlation_id=correlation_id,
        definition=definition.name,
        definition_version=definition.version,
        business_key=business_key,
        data=data.model_dump(mode="json"),
    )
    plan = Plan(definition, evolve(None, started), now, data)
    plan.events.append(started)
    plan.issue("action", definition.steps[0], attempt=1)
    return plan.decision()


def decide(
    definition: SagaDefinition, state: SagaState, input: ReplyMessage | TimerFired, now: datetime
) -> Decision:
    plan = Plan(definition, state, now)
    if isinstance(input, ReplyMessage):
        plan.on_reply(input)
    else:
        plan.on_timer(input.timer_id)
    return plan.decision()


# Resolved lazily: the aggregate module imports the events, not the other way round.
_SAGA_TOPIC = "saga_es.aggregate:Saga"


class Plan:
    """Accumulates one decision: each recorded event is folded into ``state`` at once, so every
    rule below sees the state as it will be after the events before it. Shared with
    ``saga_es.operator``, whose actions set the same rules in motion."""

    def __init__(
        self,
        definition: SagaDefinition,
        state: SagaState,
        now: datetime,
        data: BaseModel | None = None,
    ) -> None:
        self.definition = definition
        self.state = state
        self.now = now
        self.events: list[Any] = []
        self.commands: list[CommandMessage] = []
        self._data = data

    def decision(self) -> Decision:
        return Decision(tuple(self.events), tuple(self.commands), self.state)

    def record(self, event_class: type[Any], **fields: Any) -> None:
        event = event_class(
            originator_id=self.state.saga_id,
            originator_version=self.state.version + 1,
            timestamp=self.now,
            correlation_id=self.state.correlation_id,
            **fields,
        )
        self.state = evolve(self.state, event)
        self.events.append(event)

    # -- inputs -------------------------------------------------------------------------------

    def on_reply(self, reply: ReplyMessage) -> None:
        known = self.state.commands.get(reply.command_id)
        if known is None:
            raise UnknownCommandError(
                saga_id=self.state.saga_id,
                definition=self.state.definition,
                command_id=reply.command_id,
            )
        awaiting = self.state.awaiting
        if awaiting is None or awaiting.command_id != reply.command_id:
            reason = (
                "finished"
                if self.state.is_terminal
                else "late"
                if known.outcome in ("timed_out", "abandoned")
                else "duplicate"
                if known.outcome is not None
                else "stale"
            )
            self.record(
                ev.ReplyIgnored,
                command_id=reply.command_id,
                reply_id=reply.message_id,
                step=known.step,
                phase=known.phase,
                attempt=known.attempt,
                outcome=reply.outcome,
                reason=reason,
            )
            return
        step = self.definition.step_named(awaiting.step)
        fields = {"step": step.name, "attempt": awaiting.attempt, "command_id": reply.command_id}
        action = awaiting.phase == "action"
        if reply.ok:
            succeeded = ev.StepSucceeded if action else ev.CompensationSucceeded
            self.record(succeeded, result=reply.result, **fields)
            if action:
                self.advance_after(step)
            else:
                self.compensate_next()
            return
        code = reply.error_code or "error"
        self.record(
            ev.StepFailed if action else ev.CompensationFailed,
            error_code=code,
            message=reply.error_message,
            retryable=reply.retryable,
            **fields,
        )
        failed = self.action_failed if action else self.compensation_failed
        failed(step, awaiting.attempt, code, reply.error_message, reply.retryable)

    def on_timer(self, timer_id: UUID) -> None:
        timer = next_timer(self.state)
        if timer is None or timer.timer_id != timer_id:
            return  # already handled, or superseded: firing twice changes nothing
        if self.now < timer.due:
            return  # early (clocks differ between processes): it stays, to fire again later
        step = self.definition.step_named(timer.step)
        if timer.kind == "retry":
            self.issue(timer.phase, step, timer.attempt)
            return
        self.record(
            ev.StepTimedOut,
            step=step.name,
            phase=timer.phase,
            attempt=timer.attempt,
            command_id=timer.timer_id,
            deadline=timer.due,
        )
        message = f"no reply within {self._timeout(timer.phase, step)}"
        if timer.phase == "action":
            self.action_failed(
                step, timer.attempt, TIMEOUT, message, retryable=True, timed_out=True
            )
        else:
            self.compensation_failed(step, timer.attempt, TIMEOUT, message, retryable=True)

    # -- going forward ------------------------------------------------------------------------

    def issue(self, phase: Phase, step: Step, attempt: int) -> None:
        event_class: type[Any]
        cid = command_id(self.state.saga_id, phase, step.name, attempt)
        if phase == "action":
            name, queue, event_class = step.action, step.queue, ev.StepCommandIssued
        else:
            assert step.compensation is not None
            name, queue, event_class = (
                step.compensation,
                step.compensation_queue,
                ev.CompensationIssued,
            )
        deadline = self.now + self._timeout(phase, step)
        self.record(
            event_class,
            step=step.name,
            attempt=attempt,
            command_id=cid,
            command=name,
            queue=queue,
            deadline=deadline,
        )
        self.commands.append(
            CommandMessage(
                message_id=cid,
                saga_id=self.state.saga_id,
                saga_version=self.state.version,
                definition=self.definition.name,
                definition_version=self.definition.version,
                step=step.name,
                phase=phase,
                attempt=attempt,
                command=name,
                idempotency_key=idempotency_key(self.state.saga_id, phase, step.name),
                payload=self._payload(step, phase),
                correlation_id=self.state.correlation_id,
                causation_id=event_id(self.state.saga_id, self.state.version - 1),
                queue=queue,
                deadline=deadline,
                created_at=self.now,
            )
        )

    def advance_after(self, step: Step) -> None:
        index = self.definition.index_of(step.name)
        if index + 1 < len(self.definition.steps):
            self.issue("action", self.definition.steps[index + 1], attempt=1)
        else:
            self.record(ev.SagaCompleted)

    def action_failed(
        self,
        step: Step,
        attempt: int,
        code: str,
        message: str,
        retryable: bool,
        *,
        timed_out: bool = False,
    ) -> None:
        spent = self.attempts_counted("action", step, attempt)
        if step.retry.allows_another(spent, code, retryable=retryable):
            self.schedule_retry("action", step, attempt, code, message)
            return
        # timed_out: the saga's own deadline passed, so the outcome is in doubt. A reply whose
        # error code happens to be "timeout" is an answer, not a missed deadline.
        if step.kind is StepKind.RETRIABLE:
            self.stuck(
                step,
                "action",
                f"retriable step '{step.name}' failed for good after the "
                "pivot; it cannot be compensated",
                code,
                message,
            )
        elif step.kind is StepKind.PIVOT and timed_out:
            self.stuck(
                step,
                "action",
                f"outcome of pivot step '{step.name}' is unknown (no reply "
                f"after {attempt} attempts): check the participant",
                code,
                message,
            )
        else:
            self.turn_back(step, code, message, in_doubt=timed_out)

    def turn_back(self, step: Step, code: str, message: str, *, in_doubt: bool) -> None:
        """Compensate the completed compensatable steps, latest first; ``step`` too when its
        outcome is ``in_doubt`` (see "Late replies" in the module docstring)."""
        plan = [s for s in self.state.succeeded if self.definition.step_named(s).is_compensatable]
        if in_doubt and step.is_compensatable:
            plan.append(step.name)
        self.record(
            ev.CompensationStarted,
            failed_step=step.name,
            error_code=code,
            message=message,
            plan=list(reversed(plan)),
        )
        self.compensate_next()

    # -- going back ---------------------------------------------------------------------------

    def compensate_next(self) -> None:
        remaining = self.state.remaining_compensations
        if remaining:
            self.issue("compensation", self.definition.step_named(remaining[0]), attempt=1)
            return
        failure = self.state.failure
        assert failure is not None
        self.record(
            ev.SagaCompensated,
            failed_step=failure.step,
            error_code=failure.error_code,
            message=failure.message,
            compensated=list(self.state.compensated),
        )

    def compensation_failed(
        self, step: Step, attempt: int, code: str, message: str, retryable: bool
    ) -> None:
        spent = self.attempts_counted("compensation", step, attempt)
        if step.compensation_retry.allows_another(spent, code, retryable=retryable):
            self.schedule_retry("compensation", step, attempt, code, message)
            return
        self.stuck(
            step,
            "compensation",
            f"compensation of '{step.name}' failed after {attempt} attempts",
            code,
            message,
        )

    # -- shared -------------------------------------------------------------------------------

    def attempts_counted(self, phase: Phase, step: Step, attempt: int) -> int:
        """Attempts that count against the policy: all, unless an operator resumed the step
        with a fresh budget (then those after that)."""
        return attempt - self.state.budget_spent.get((phase, step.name), 0)

    def schedule_retry(
        self, phase: Phase, step: Step, failed_attempt: int, code: str, message: str
    ) -> None:
        """Attempt ``failed_attempt + 1`` after the policy's delay; alert past its threshold."""
        policy = step.retry if phase == "action" else step.compensation_retry
        spent = self.attempts_counted(phase, step, failed_attempt)
        attempt = failed_attempt + 1
        # The delay follows the budget (a resumed step starts from initial_backoff again); the
        # jitter follows the attempt, which is unique.
        delay = policy.delay_before(
            spent + 1, spread(self.state.saga_id, phase, step.name, attempt)
        )
        self.record(
            ev.RetryScheduled,
            step=step.name,
            phase=phase,
            attempt=attempt,
            due=self.now + delay,
            timer_id=retry_timer_id(self.state.saga_id, phase, step.name, attempt),
        )
        if (
            policy.alert_after is not None
            and spent >= policy.alert_after
            and self.state.retry_alert is None
        ):
            self.record(
                ev.RetryAlertRaised,
                step=step.name,
                phase=phase,
                attempts=spent,
                error_code=code,
                message=message,
            )

    def stuck(self, step: Step, phase: Phase, reason: str, code: str, message: str) -> None:
        self.record(
            ev.SagaStuck,
            step=step.name,
            phase=phase,
            reason=reason,
            error_code=code,
            message=message,
            compensated=list(self.state.compensated),
            not_compensated=self._not_compensated(),
        )

    def _not_compensated(self) -> list[str]:
        """Effects an operator may still have to undo: the plan's remaining steps once
        compensation began; before that, while the pivot has not succeeded, every completed
        compensatable step (latest first). After the pivot nothing is to be undone."""
        if self.state.compensation_plan:
            return list(self.state.remaining_compensations)
        steps = [self.definition.step_named(s) for s in self.state.succeeded]
        if any(s.kind is StepKind.PIVOT for s in steps):
            return []
        return [s.name for s in reversed(steps) if s.is_compensatable]

    def _timeout(self, phase: Phase, step: Step) -> Any:
        return step.timeout if phase == "action" else step.compensation_timeout

    def _payload(self, step: Step, phase: Phase) -> dict[str, Any]:
        if self._data is None:
            self._data = self.definition.data_model.model_validate(self.state.data)
        payload = step.payload(self._data, self.state.results)
        if phase == "compensation":
            # What the action returned (a reservation id, a charge id) is what undoing needs.
            payload = {**payload, "action_result": dict(self.state.results.get(step.name, {}))}
        return payload
