"""The eventsourcing aggregate for one saga: its stream, its version, and its state.

It adds nothing to the state the events describe: ``apply_event`` folds with ``state.evolve``.
``decide`` builds the events; ``record`` appends them here so that eventsourcing's repository,
snapshots and optimistic concurrency work as they do for any aggregate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from saga_es.ids import saga_id_for
from saga_es.state import SagaState, evolve

__all__ = ["Saga"]


class Saga(Aggregate):
    state: SagaState | None

    def __init__(self) -> None:  # called by SagaStarted.mutate(); the event sets the state
        self.state = None

    @staticmethod
    def create_id(definition: str, business_key: str) -> UUID:
        return saga_id_for(definition, business_key)

    def apply_event(self, event: Any) -> None:
        self.state = evolve(self.state, event)

    def record(self, events: Iterable[Any]) -> None:
        """Append events decided elsewhere, checking each is the next in this stream."""
        for event in events:
            event.mutate(self)
            self.pending_events.append(event)

    @property
    def saga_state(self) -> SagaState:
        assert self.state is not None, "a Saga aggregate exists only after SagaStarted"
        return self.state
