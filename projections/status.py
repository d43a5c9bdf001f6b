"""The saga status view's rows, folded from events by a pure function.

    row = apply_status(row, event, position)

The fold mirrors ``saga_es.state.evolve`` for the columns that come from the saga's state, and
``row_from_state`` maps a ``SagaState`` to the same columns, so the two can be compared (the
tests compare them for every stream). A few columns are history rather than state:

* ``error_*``: the last error the saga met (a failed or timed-out attempt, the failure that
  turned it back, or what left it stuck), kept after a retry succeeds: it says why a saga took
  long, or why it ended as it did.
* ``finished_at``: when it reached a terminal state (cleared if an operator moves it on).
* ``retries``: attempts issued after the first, actions and compensations together.

An event type the fold does not know only moves ``updated_at``/``version``/``position``, and
the result says so (``Unknown``): the runner then recomputes the state columns by replaying the
saga's stream with ``saga_es.state``, which knows every event type the engine writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any
from uuid import UUID

from projections.eventinfo import UnknownEvent, event_type
from saga_es.state import TERMINAL, SagaState, SagaStatus, next_timer

__all__ = ["COLUMNS", "StatusRow", "apply_status", "row_from_state", "with_state"]

_TERMINAL = frozenset(s.value for s in TERMINAL)


@dataclass
class StatusRow:
    saga_id: UUID
    definition: str
    definition_version: int
    business_key: str
    correlation_id: str
    state: str
    started_at: datetime
    updated_at: datetime
    version: int
    position: int
    current_step: str | None = None
    phase: str | None = None
    attempt: int | None = None
    waiting_for: str | None = None
    next_deadline: datetime | None = None
    error_step: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    stuck_reason: str | None = None
    retries: int = 0
    compensations: int = 0
    finished_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)  # every field, and only fields: a plain dataclass


COLUMNS = tuple(f.name for f in fields(StatusRow))


def apply_status(row: StatusRow | None, event: Any, position: int) -> tuple[StatusRow, bool]:
    """The row after ``event`` (stored at ``position``), and whether the event was unknown."""
    kind = event_type(event)
    if kind == "SagaStarted" and not isinstance(event, UnknownEvent):
        started = StatusRow(
            saga_id=event.originator_id,
            definition=event.definition,
            definition_version=event.definition_version,
            business_key=event.business_key,
            correlation_id=event.correlation_id,
            state=SagaStatus.STARTED.value,
            started_at=event.timestamp,
            updated_at=event.timestamp,
            version=event.originator_version,
            position=position,
        )
        return started, False
    if row is None:
        raise ValueError(f"saga {event.originator_id}: {kind} before SagaStarted")
    row.updated_at = event.timestamp
    row.version = event.originator_version
    row.position = position
    rule = None if isinstance(event, UnknownEvent) else _RULES.get(kind)
    if rule is not None:
        rule(row, event)
        _finish(row, event.timestamp)
    return row, rule is None


def with_state(row: StatusRow, state: SagaState) -> StatusRow:
    """``row`` with its state columns recomputed from ``state`` (history columns kept)."""
    derived = row_from_state(state, position=row.position)
    for name in _STATE_COLUMNS:
        setattr(row, name, getattr(derived, name))
    _finish(row, state.updated_at)
    return row


def row_from_state(state: SagaState, *, position: int = 0) -> StatusRow:
    """The state columns of a saga's row, from its ``SagaState`` (history columns empty)."""
    timer = next_timer(state)
    where = state.awaiting or state.retry_wait
    stuck_step = state.stuck.step if state.stuck else None
    return StatusRow(
        saga_id=state.saga_id,
        definition=state.definition,
        definition_version=state.definition_version,
        business_key=state.business_key,
        correlation_id=state.correlation_id,
        state=state.status.value,
        started_at=state.started_at,
        updated_at=state.updated_at,
        version=state.version,
        position=position,
        current_step=where.step if where else stuck_step,
        phase=where.phase if where else None,
        attempt=where.attempt if where else None,
        waiting_for="reply" if state.awaiting else "retry" if state.retry_wait else None,
        next_deadline=timer.due if timer else None,
        stuck_reason=state.stuck_reason,
        retries=sum(1 for c in state.commands.values() if c.attempt > 1),
        compensations=len(state.compensated),
    )


_STATE_COLUMNS = (
    "state", "current_step", "phase", "attempt", "waiting_for", "next_deadline",
    "stuck_reason", "retries", "compensations", "updated_at", "version",
)  # fmt: skip


def _finish(row: StatusRow, at: datetime) -> None:
    if row.state in _TERMINAL:
        row.finished_at = row.finished_at or at
    else:
        row.finished_at = None


def _issued(state: str, phase: str) -> Callable[[StatusRow, Any], None]:
    def rule(row: StatusRow, e: Any) -> None:
        row.state = state
        row.current_step, row.phase, row.attempt = e.step, phase, e.attempt
        row.waiting_for, row.next_deadline = "reply", e.deadline
        if e.attempt > 1:
            row.retries += 1

    return rule


def _answered(row: StatusRow, e: Any) -> None:
    row.current_step = row.phase = row.attempt = None
    row.waiting_for = row.next_deadline = None


def _failed(row: StatusRow, e: Any) -> None:
    _answered(row, e)
    row.error_step, row.error_code, row.error_message = e.step, e.error_code, e.message


def _compensated_one(row: StatusRow, e: Any) -> None:
    _answered(row, e)
    row.compensations += 1


def _timed_out(row: StatusRow, e: Any) -> None:
    _answered(row, e)
    row.error_step, row.error_code = e.step, "timeout"
    row.error_message = f"no reply to attempt {e.attempt} by {e.deadline.isoformat()}"


def _retry(row: StatusRow, e: Any) -> None:
    row.current_step, row.phase, row.attempt = e.step, e.phase, e.attempt
    row.waiting_for, row.next_deadline = "retry", e.due


def _compensation_started(row: StatusRow, e: Any) -> None:
    row.state = SagaStatus.COMPENSATING.value
    row.error_step, row.error_code, row.error_message = e.failed_step, e.error_code, e.message


def _ended(state: SagaStatus) -> Callable[[StatusRow, Any], None]:
    def rule(row: StatusRow, e: Any) -> None:
        row.state = state.value

    return rule


def _stuck(row: StatusRow, e: Any) -> None:
    _answered(row, e)
    row.state = SagaStatus.STUCK.value
    row.current_step = e.step
    row.stuck_reason = e.reason
    row.error_step, row.error_code, row.error_message = e.step, e.error_code, e.message


_RULES: dict[str, Callable[[StatusRow, Any], None]] = {
    "StepCommandIssued": _issued(SagaStatus.PENDING.value, "action"),
    "CompensationIssued": _issued(SagaStatus.COMPENSATING.value, "compensation"),
    "StepSucceeded": _answered,
    "StepFailed": _failed,
    "StepTimedOut": _timed_out,
    "CompensationSucceeded": _compensated_one,
    "CompensationFailed": _failed,
    "RetryScheduled": _retry,
    "CompensationStarted": _compensation_started,
    "ReplyIgnored": lambda row, e: None,
    "SagaCompleted": _ended(SagaStatus.COMPLETED),
    "SagaCompensated": _ended(SagaStatus.FAILED),
    "SagaStuck": _stuck,
}
