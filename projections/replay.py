"""Replay a saga's stream for debugging: each decision, what caused it, what it did, and why.

Read from the event stream itself (not from the views), and folded with ``saga_es.state``:

    replay = explain(store.events(saga_id), to_version=12)
    for decision in replay.decisions:
        decision.cause          # the input: a start, a reply, a timer, an operator's action
        decision.events         # what was recorded, each with the reason for it
        decision.commands       # the commands the decision issued (sent through the outbox)
        decision.state          # the saga's state after it
    replay.state                # the state at ``to_version``

A decision is the run of events one input produced: it begins with the input's own event (the
start, a reply's outcome, a timeout, an operator's action: any event with an ``actor``) or, for
a retry timer, with the command it re-issues (a decision that schedules a retry ends there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from projections.errors import InvalidQueryError
from projections.eventinfo import UnknownEvent, actor_of, event_type, summary_of
from saga_es.state import SagaState, evolve

__all__ = ["Explained", "Replay", "ReplayDecision", "explain"]

#: Events recorded for an input: a start, a reply, a reply deadline passing. Any other event
#: is a consequence of the input before it, unless an operator caused it (it has an ``actor``).
_INPUTS = frozenset(
    {
        "SagaStarted", "StepSucceeded", "StepFailed", "CompensationSucceeded",
        "CompensationFailed", "ReplyIgnored", "StepTimedOut",
    }
)  # fmt: skip
_ISSUED = frozenset({"StepCommandIssued", "CompensationIssued"})


@dataclass(frozen=True)
class Explained:
    """One event and the reason it was recorded."""

    version: int
    event_type: str
    actor: str
    event: Any
    why: str

    def summary(self) -> dict[str, Any]:
        return summary_of(self.event)


@dataclass
class ReplayDecision:
    cause: Explained
    events: list[Explained] = field(default_factory=list)  # the cause first
    commands: list[dict[str, Any]] = field(default_factory=list)
    state: SagaState | None = None
    note: str | None = None  # set when the state could not be folded


@dataclass(frozen=True)
class Replay:
    saga_id: Any
    to_version: int
    last_version: int
    decisions: list[ReplayDecision]
    state: SagaState | None


def explain(events: Sequence[Any], *, to_version: int | None = None) -> Replay:
    """``events``: a saga's whole stream, in order. ``to_version``: stop after that event."""
    if not events:
        raise ValueError("a replay needs the saga's events")
    last = events[-1].originator_version
    if to_version is not None and not 1 <= to_version <= last:
        raise InvalidQueryError(
            field="--to-version", value=to_version, detail=f"this saga has versions 1 to {last}"
        )
    upto = [e for e in events if to_version is None or e.originator_version <= to_version]
    decisions: list[ReplayDecision] = []
    state: SagaState | None = None
    previous: str | None = None
    for event in upto:
        kind = event_type(event)
        starts = (
            not decisions
            or kind in _INPUTS
            or isinstance(getattr(event, "actor", None), str)  # an operator's action
            or (kind in _ISSUED and previous == "RetryScheduled")  # a retry timer fired
        )
        explained = Explained(
            event.originator_version, kind, actor_of(event, kind), event, _why(event, kind, starts)
        )
        if starts:
            decisions.append(ReplayDecision(cause=explained))
        decision = decisions[-1]
        decision.events.append(explained)
        if kind in ("StepCommandIssued", "CompensationIssued"):
            decision.commands.append(
                {
                    "command": event.command, "queue": event.queue, "step": event.step,
                    "phase": "action" if kind == "StepCommandIssued" else "compensation",
                    "attempt": event.attempt, "command_id": str(event.command_id),
                    "reply_due": event.deadline.isoformat(),
                }
            )  # fmt: skip
        try:
            state = evolve(state, event) if not isinstance(event, UnknownEvent) else state
        except (TypeError, ValueError) as exc:
            decision.note = f"the state rules here cannot apply {kind}: {exc}"
        decision.state = state
        previous = kind
    return Replay(events[0].originator_id, upto[-1].originator_version, last, decisions, state)


def _why(e: Any, kind: str, starts: bool) -> str:
    """The reason for an event, in the words of the process."""
    step = getattr(e, "step", None)
    attempt = getattr(e, "attempt", None)
    if kind == "SagaStarted":
        return f"started: {e.definition} v{e.definition_version}, business key {e.business_key}"
    if kind == "StepSucceeded":
        return f"reply: {step} (attempt {attempt}) succeeded"
    if kind in ("StepFailed", "CompensationFailed"):
        what = "compensation of " if kind == "CompensationFailed" else ""
        kind_of = "retryable" if e.retryable else "final"
        error = f"{e.error_code} {e.message}".rstrip()
        return f"reply: {what}{step} (attempt {attempt}) failed, {kind_of}: {error}"
    if kind == "CompensationSucceeded":
        return f"reply: compensation of {step} succeeded"
    if kind == "ReplyIgnored":
        return (
            f"reply to {e.phase} {step} attempt {attempt} ({e.outcome}) changed nothing: {e.reason}"
        )
    if kind == "StepTimedOut":
        return f"timer: no reply to {e.phase} {step} attempt {attempt} by {e.deadline.isoformat()}"
    if kind in ("StepCommandIssued", "CompensationIssued"):
        verb = "undo" if kind == "CompensationIssued" else "do"
        because = "timer: retry due; " if starts else ""
        due = e.deadline.isoformat()
        send = f"send {e.command} to {e.queue} (attempt {attempt})"
        return f"{because}{verb} {step}: {send}, reply due {due}"
    if kind == "RetryScheduled":
        return f"retry policy allows {e.phase} {step} attempt {attempt}, at {e.due.isoformat()}"
    if kind == "CompensationStarted":
        plan = ", ".join(e.plan) or "nothing"
        return f"{e.failed_step} failed for good ({e.error_code}): undo {plan}, in that order"
    if kind == "SagaCompleted":
        return "every step succeeded"
    if kind == "SagaCompensated":
        undone = ", ".join(e.compensated) or "none"
        return f"every completed step undone ({undone}) after {e.failed_step} failed"
    if kind == "SagaStuck":
        return f"stuck: {e.reason}"
    reason = getattr(e, "reason", None)
    return f"{kind} by {actor_of(e, kind)}" + (f": {reason}" if reason else "")
