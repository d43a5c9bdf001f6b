"""The events of a saga's stream: everything that happened to it, in order.

They are frozen dataclasses (eventsourcing aggregate events) built by ``decide`` from the saga's
state, the input and ``now``; nothing here reads a clock or a database. Each event carries the
saga's correlation id. Their topics are pinned (``TOPIC``) because stored events name their class
by topic: moving a class must not orphan the streams already written. A test pins the list.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

__all__ = [
    "ALL_EVENT_TYPES",
    "CompensationFailed",
    "CompensationIssued",
    "CompensationStarted",
    "CompensationSucceeded",
    "OperatorEvent",
    "ReplyIgnored",
    "RetryAlertRaised",
    "RetryRequested",
    "RetryScheduled",
    "SagaAborted",
    "SagaCompensated",
    "SagaCompleted",
    "SagaEvent",
    "SagaResumed",
    "SagaStarted",
    "SagaStuck",
    "StepCommandIssued",
    "StepFailed",
    "StepMarkedCompensated",
    "StepSucceeded",
    "StepTimedOut",
    "TimerCancelled",
    "TimerRescheduled",
]


class _AppliesToSaga:
    """Evolving the aggregate is the aggregate's business (see ``aggregate.Saga.apply_event``)."""

    def apply(self, aggregate: Any) -> None:
        aggregate.apply_event(self)


@dataclass(frozen=True)
class SagaStarted(_AppliesToSaga, Aggregate.Created):
    TOPIC = "saga_es.events:SagaStarted"
    correlation_id: str
    definition: str
    definition_version: int
    business_key: str
    data: dict[str, Any]


@dataclass(frozen=True)
class SagaEvent(_AppliesToSaga, Aggregate.Event):
    """Every event after the first."""

    TOPIC = "saga_es.events:SagaEvent"
    correlation_id: str


@dataclass(frozen=True)
class _CommandIssued(SagaEvent):
    """A command went into the outbox, in this event's transaction."""

    step: str
    attempt: int
    command_id: UUID
    command: str
    queue: str
    deadline: datetime


@dataclass(frozen=True)
class _CommandSucceeded(SagaEvent):
    step: str
    attempt: int
    command_id: UUID
    result: dict[str, Any]


@dataclass(frozen=True)
class _CommandFailed(SagaEvent):
    step: str
    attempt: int
    command_id: UUID
    error_code: str
    message: str
    retryable: bool


@dataclass(frozen=True)
class StepCommandIssued(_CommandIssued):
    TOPIC = "saga_es.events:StepCommandIssued"


@dataclass(frozen=True)
class StepSucceeded(_CommandSucceeded):
    TOPIC = "saga_es.events:StepSucceeded"


@dataclass(frozen=True)
class StepFailed(_CommandFailed):
    TOPIC = "saga_es.events:StepFailed"


@dataclass(frozen=True)
class StepTimedOut(SagaEvent):
    """No reply to a command before its deadline. ``phase`` is "action" or "compensation"."""

    TOPIC = "saga_es.events:StepTimedOut"
    step: str
    phase: str
    attempt: int
    command_id: UUID
    deadline: datetime


@dataclass(frozen=True)
class RetryScheduled(SagaEvent):
    """Attempt ``attempt`` of the step's ``phase`` will be issued at ``due``."""

    TOPIC = "saga_es.events:RetryScheduled"
    step: str
    phase: str
    attempt: int
    due: datetime
    timer_id: UUID


@dataclass(frozen=True)
class CompensationStarted(SagaEvent):
    """The saga turned back. ``plan`` lists the steps to compensate, in the order they will be."""

    TOPIC = "saga_es.events:CompensationStarted"
    failed_step: str
    error_code: str
    message: str
    plan: list[str]


@dataclass(frozen=True)
class CompensationIssued(_CommandIssued):
    TOPIC = "saga_es.events:CompensationIssued"


@dataclass(frozen=True)
class CompensationSucceeded(_CommandSucceeded):
    TOPIC = "saga_es.events:CompensationSucceeded"


@dataclass(frozen=True)
class CompensationFailed(_CommandFailed):
    TOPIC = "saga_es.events:CompensationFailed"


@dataclass(frozen=True)
class ReplyIgnored(SagaEvent):
    """A reply that changed nothing, kept so that nothing arrives unseen.

    reason: "duplicate" (its command was already answered), "late" (its attempt had timed out,
    or an operator had given up on it), "stale" (an earlier attempt, superseded) or "finished"
    (the saga had already ended).
    """

    TOPIC = "saga_es.events:ReplyIgnored"
    command_id: UUID
    reply_id: UUID
    step: str
    phase: str
    attempt: int
    outcome: str
    reason: str


@dataclass(frozen=True)
class SagaCompleted(SagaEvent):
    TOPIC = "saga_es.events:SagaCompleted"


@dataclass(frozen=True)
class SagaCompensated(SagaEvent):
    """Terminal: a step failed and every completed step was compensated (state ``failed``)."""

    TOPIC = "saga_es.events:SagaCompensated"
    failed_step: str
    error_code: str
    message: str
    compensated: list[str]


@dataclass(frozen=True)
class SagaStuck(SagaEvent):
    """The saga can go neither forward nor back by itself; an operator has to act."""

    TOPIC = "saga_es.events:SagaStuck"
    step: str
    phase: str
    reason: str
    error_code: str
    message: str
    compensated: list[str]
    not_compensated: list[str]


@dataclass(frozen=True)
class RetryAlertRaised(SagaEvent):
    """A step has failed ``attempts`` times in a row (its policy's ``alert_after``) and is still
    being retried: the saga goes on, but someone should look. Cleared when the step succeeds."""

    TOPIC = "saga_es.events:RetryAlertRaised"
    step: str
    phase: str
    attempts: int
    error_code: str
    message: str


# -- operator actions: who did it (``actor``) and why (``reason``) are always recorded ---------


@dataclass(frozen=True)
class OperatorEvent(SagaEvent):
    """An operator acted on the saga (see ``saga_es.operator``). Never stored itself; its own
    topic keeps it from taking over ``SagaEvent``'s when a topic is looked up."""

    TOPIC = "saga_es.events:OperatorEvent"
    actor: str
    reason: str


@dataclass(frozen=True)
class RetryRequested(OperatorEvent):
    """Issue attempt ``attempt`` of the current step's ``phase`` now. An unanswered attempt is
    given up on: its reply, if it ever comes, is ignored as late."""

    TOPIC = "saga_es.events:RetryRequested"
    step: str
    phase: str
    attempt: int


@dataclass(frozen=True)
class SagaResumed(OperatorEvent):
    """A stuck saga issues attempt ``attempt`` of what it was stuck on, with a fresh retry
    budget: that attempt counts as the first of the step's policy again."""

    TOPIC = "saga_es.events:SagaResumed"
    step: str
    phase: str
    attempt: int


@dataclass(frozen=True)
class SagaAborted(OperatorEvent):
    """Forward progress stopped at ``step``; a ``CompensationStarted`` follows."""

    TOPIC = "saga_es.events:SagaAborted"
    step: str


@dataclass(frozen=True)
class StepMarkedCompensated(OperatorEvent):
    """The step's effect was undone outside the saga (``note`` says how); the saga counts it
    as compensated and never issues its compensation again."""

    TOPIC = "saga_es.events:StepMarkedCompensated"
    step: str
    note: str


@dataclass(frozen=True)
class TimerRescheduled(OperatorEvent):
    """The saga's timer (a reply deadline or a retry) is now due at ``due``."""

    TOPIC = "saga_es.events:TimerRescheduled"
    timer_id: UUID
    kind: str
    step: str
    phase: str
    attempt: int
    due: datetime


@dataclass(frozen=True)
class TimerCancelled(OperatorEvent):
    """The saga's timer was cancelled. A reply deadline: the saga waits for the reply without
    one. A retry: the saga could never move again by itself, so a ``SagaStuck`` follows."""

    TOPIC = "saga_es.events:TimerCancelled"
    timer_id: UUID
    kind: str
    step: str
    phase: str
    attempt: int


ALL_EVENT_TYPES: tuple[type[Any], ...] = (
    SagaStarted,
    StepCommandIssued,
    StepSucceeded,
    StepFailed,
    StepTimedOut,
    RetryScheduled,
    CompensationStarted,
    CompensationIssued,
    CompensationSucceeded,
    CompensationFailed,
    ReplyIgnored,
    SagaCompleted,
    SagaCompensated,
    SagaStuck,
    RetryAlertRaised,
    RetryRequested,
    SagaResumed,
    SagaAborted,
    StepMarkedCompensated,
    TimerRescheduled,
    TimerCancelled,
)
