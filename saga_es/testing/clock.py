"""A clock that moves only when told to, for testing timeouts and backoff without sleeping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["VirtualClock"]


class VirtualClock:
    """Callable like ``SagaEngine(clock=...)`` expects; ``advance`` moves it forward."""

    def __init__(self, start: datetime = datetime(2030, 1, 1, tzinfo=UTC)) -> None:
        if start.tzinfo is None:
            raise ValueError("a virtual clock needs a timezone-aware start")
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        if delta < timedelta(0):
            raise ValueError("a clock does not go back")
        self.now += delta
        return self.now

    def set(self, moment: datetime) -> datetime:
        return self.advance(moment - self.now)
