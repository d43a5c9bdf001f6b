"""A bounded, thread-safe LRU of saga states between decisions.

Sharing is safe because states are frozen; correctness never depends on the cache, because
every load still reads the events after the cached version.
"""

from __future__ import annotations

from collections import OrderedDict
from threading import Lock
from uuid import UUID

from saga_es.state import SagaState

__all__ = ["StateCache"]


class StateCache:
    def __init__(self, size: int) -> None:
        self._size = size
        self._states: OrderedDict[UUID, SagaState] = OrderedDict()
        self._lock = Lock()

    def get(self, saga_id: UUID) -> SagaState | None:
        with self._lock:
            state = self._states.get(saga_id)
            if state is not None:
                self._states.move_to_end(saga_id)
            return state

    def put(self, saga_id: UUID, state: SagaState) -> None:
        if self._size <= 0:
            return
        with self._lock:
            current = self._states.get(saga_id)
            if current is not None and current.version > state.version:
                return  # a racing thread already cached a later state
            self._states[saga_id] = state
            self._states.move_to_end(saga_id)
            while len(self._states) > self._size:
                self._states.popitem(last=False)
