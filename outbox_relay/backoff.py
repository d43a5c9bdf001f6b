"""Waiting out an outage: capped exponential backoff, and one warning per outage.

A broker restart makes every publish fail for a while; logging each failed attempt would bury
the one line that matters. ``Outage`` logs a warning when a dependency first fails, stays
quiet (debug) while it keeps failing, and logs one info line when it works again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from outbox_relay.errors import UnavailableError
from saga_es.backoff import exponential_delay

__all__ = ["Backoff", "Outage"]


@dataclass
class Backoff:
    """Delays ``initial``, ``2 * initial``, ... up to ``cap`` seconds, each shortened by up to
    ``jitter`` (a fraction) so that relays restarted together do not retry in lockstep."""

    initial: float = 0.5
    cap: float = 30.0
    jitter: float = 0.2
    failures: int = 0

    def next_delay(self) -> float:
        delay = exponential_delay(
            self.failures,
            base=self.initial,
            cap=self.cap,
            jitter=self.jitter > 0,
            spread=self.jitter,
        )
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class Outage:
    """The state of one dependency (the broker, or the database) as seen by one relay."""

    def __init__(
        self,
        target: str,
        log: logging.Logger,
        backoff: Backoff,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self._log = log
        self._backoff = backoff
        self._clock = clock
        self._since: float | None = None
        self.count = 0  # outages so far, for tests and metrics

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    @property
    def failures(self) -> int:
        """Consecutive failures so far (0 when the dependency works)."""
        return self._backoff.failures

    def failed(self, error: UnavailableError) -> float:
        """Record a failure; return how long to wait before trying again."""
        delay = self._backoff.next_delay()
        if self._since is None:
            self._since = self._clock()
            self.count += 1
            self._log.warning(
                "%s unavailable at %s: %s; rows stay unpublished, retrying with backoff "
                "(up to %.0fs between tries)",
                self.target, error.where, error.detail, self._backoff.cap,
            )  # fmt: skip
        else:
            self._log.debug("%s still unavailable: %s", self.target, error.detail)
        return delay

    def succeeded(self) -> None:
        if self._since is not None:
            self._log.info(
                "%s available again after %.1fs (%d tries)",
                self.target, self._clock() - self._since, self._backoff.failures,
            )  # fmt: skip
            self._since = None
        self._backoff.reset()
