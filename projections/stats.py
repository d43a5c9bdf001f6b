"""Step statistics: per definition, version, step and phase, what happened to its commands.

issued / succeeded / failed / timed_out / retried / ignored count events; latency is measured
from a command's issue to its (accepted) reply, in milliseconds of event time, and kept as a
count, a sum, a maximum and a histogram (``schema.BUCKET_LIMITS_MS``) from which percentiles
are read. "compensated" is the ``succeeded`` of the compensation phase.

Counting is pure: ``StatsBatch`` folds a batch of events into increments, given what it must
remember of each saga (``SagaContext``: the definition, and the command awaiting a reply).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from projections.eventinfo import UnknownEvent, event_type
from projections.schema import BUCKET_COLUMNS, BUCKET_LIMITS_MS

__all__ = ["COUNTERS", "SagaContext", "StatsBatch", "StepCounters", "bucket_of", "percentile"]

StatsKey = tuple[str, int, str, str]  # definition, version, step, phase
COUNTERS = ("issued", "succeeded", "failed", "retried", "timed_out", "ignored")


@dataclass
class SagaContext:
    saga_id: UUID
    definition: str
    definition_version: int
    command_id: UUID | None = None
    issued_at: datetime | None = None


@dataclass
class StepCounters:
    issued: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0
    ignored: int = 0
    latency_count: int = 0
    latency_sum_ms: float = 0.0
    latency_max_ms: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKET_COLUMNS))

    def observe(self, ms: float) -> None:
        self.latency_count += 1
        self.latency_sum_ms += ms
        self.latency_max_ms = max(self.latency_max_ms, ms)
        self.buckets[bucket_of(ms)] += 1

    def as_row(self, key: StatsKey) -> dict[str, Any]:
        definition, version, step, phase = key
        return {
            "definition": definition,
            "definition_version": version,
            "step": step,
            "phase": phase,
            **{name: getattr(self, name) for name in COUNTERS},
            "latency_count": self.latency_count,
            "latency_sum_ms": self.latency_sum_ms,
            "latency_max_ms": self.latency_max_ms,
            **dict(zip(BUCKET_COLUMNS, self.buckets, strict=True)),
        }


def bucket_of(ms: float) -> int:
    """Index of the bucket counting ``ms``: the first whose upper bound is >= ms."""
    return bisect_left(BUCKET_LIMITS_MS, ms)


def percentile(buckets: Sequence[int], q: float, max_ms: float) -> float | None:
    """The ``q`` quantile (0 < q <= 1) read from histogram counts, interpolating linearly in
    the bucket that holds it (no finer knowledge exists); None with no observations."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            lower = BUCKET_LIMITS_MS[index - 1] if index > 0 else 0.0
            upper = BUCKET_LIMITS_MS[index] if index < len(BUCKET_LIMITS_MS) else max_ms
            upper = max(lower, min(upper, max_ms))  # nothing was slower than the maximum
            return float(lower + (upper - lower) * (rank - seen) / count)
        seen += count
    return float(max_ms)


class StatsBatch:
    """Increments for one batch. ``contexts`` holds the batch's sagas already known; those it
    changes or adds are in ``changed``."""

    def __init__(self, contexts: dict[UUID, SagaContext]) -> None:
        self.contexts = contexts  # updated in place
        self.counters: dict[StatsKey, StepCounters] = {}
        self.changed: set[UUID] = set()

    def apply(self, saga_id: UUID, events: Iterable[Any]) -> None:
        """Count one saga's events of the batch, in order."""
        context = self.contexts.get(saga_id)
        for event in events:
            if isinstance(event, UnknownEvent):
                continue
            kind = event_type(event)
            if kind == "SagaStarted":
                context = self.contexts[saga_id] = SagaContext(
                    saga_id, event.definition, event.definition_version
                )
                self.changed.add(saga_id)
                continue
            handler = _HANDLERS.get(kind)
            # No handler: no step to count. No context: the stream began before the log did.
            if handler is not None and context is not None:
                handler(self, context, event)

    def _counters(self, context: SagaContext, step: str, phase: str) -> StepCounters:
        key = (context.definition, context.definition_version, step, phase)
        counters = self.counters.get(key)
        if counters is None:
            counters = self.counters[key] = StepCounters()
        return counters

    def _issued(self, context: SagaContext, event: Any, phase: str) -> None:
        self._counters(context, event.step, phase).issued += 1
        context.command_id, context.issued_at = event.command_id, event.timestamp
        self.changed.add(context.saga_id)

    def _answered(self, context: SagaContext, event: Any, phase: str, outcome: str) -> None:
        counters = self._counters(context, event.step, phase)
        setattr(counters, outcome, getattr(counters, outcome) + 1)
        if context.command_id == event.command_id and context.issued_at is not None:
            elapsed = (event.timestamp - context.issued_at).total_seconds() * 1000
            counters.observe(max(0.0, elapsed))
        context.command_id = context.issued_at = None
        self.changed.add(context.saga_id)

    def _timed_out(self, context: SagaContext, event: Any) -> None:
        self._counters(context, event.step, event.phase).timed_out += 1
        context.command_id = context.issued_at = None
        self.changed.add(context.saga_id)

    def _retried(self, context: SagaContext, event: Any) -> None:
        self._counters(context, event.step, event.phase).retried += 1

    def _ignored(self, context: SagaContext, event: Any) -> None:
        self._counters(context, event.step, event.phase).ignored += 1


_HANDLERS: dict[str, Any] = {
    "StepCommandIssued": lambda b, c, e: b._issued(c, e, "action"),
    "CompensationIssued": lambda b, c, e: b._issued(c, e, "compensation"),
    "StepSucceeded": lambda b, c, e: b._answered(c, e, "action", "succeeded"),
    "StepFailed": lambda b, c, e: b._answered(c, e, "action", "failed"),
    "CompensationSucceeded": lambda b, c, e: b._answered(c, e, "compensation", "succeeded"),
    "CompensationFailed": lambda b, c, e: b._answered(c, e, "compensation", "failed"),
    "StepTimedOut": StatsBatch._timed_out,
    "RetryScheduled": StatsBatch._retried,
    "ReplyIgnored": StatsBatch._ignored,
}
