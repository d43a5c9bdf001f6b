"""The eventsourcing aggregate for one saga: its stream, its version, and its state.

It adds nothing to the state the events describe: ``apply_event`` folds with ``state.evolve``.
``decide`` builds the events and the engine appends them to the event store directly; this
class is what eventsourcing's repository rebuilds from them (``SagaStore.load``, time travel).
"""

from __future__ import annotations

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
