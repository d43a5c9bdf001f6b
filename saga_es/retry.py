"""Retry policies: how many attempts a step gets and how long to wait between them.

The delay is computed, never drawn: jitter comes from a number in [0, 1) that the caller derives
from the saga id, step and attempt (see ``decide``), so the same history always gives the same
schedule. That keeps ``decide`` pure and makes retry schedules testable without a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta

__all__ = ["DEFAULT_ALERT_AFTER", "RetryPolicy"]

#: ``RetryPolicy.forever()`` raises a retry alert after this many failed attempts in a row.
DEFAULT_ALERT_AFTER = 10


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """When to retry a failed or timed-out command.

    max_attempts: attempts in all, the first included; ``None`` retries without bound (only
        sensible after the pivot, where the saga can only go forward).
    initial_backoff: delay before the second attempt.
    multiplier: each further delay is the previous one times this.
    max_backoff: no delay is ever longer than this (the cap applies after jitter too).
    jitter: fraction in [0, 1]; the delay is drawn from [base * (1 - jitter), base] so that
        many sagas failing together do not retry together.
    non_retryable: error codes that fail the step at once, whatever attempts are left.
    alert_after: after this many failed attempts in a row the saga records a
        ``RetryAlertRaised`` (its state's ``retry_alert``, shown in status) and keeps retrying;
        ``None`` never alerts. Meant for unbounded policies, where nothing else would tell.
    """

    max_attempts: int | None = 3
    initial_backoff: timedelta = timedelta(seconds=1)
    multiplier: float = 2.0
    max_backoff: timedelta = timedelta(minutes=5)
    jitter: float = 0.2
    non_retryable: frozenset[str] = field(default_factory=frozenset)
    alert_after: int | None = None

    @classmethod
    def forever(cls, **options: object) -> RetryPolicy:
        """Unbounded attempts, for retriable steps after the pivot; alerts after
        ``DEFAULT_ALERT_AFTER`` failed attempts unless ``alert_after`` says otherwise."""
        options.setdefault("alert_after", DEFAULT_ALERT_AFTER)
        return cls(max_attempts=None, **options)  # type: ignore[arg-type]

    @classmethod
    def never(cls) -> RetryPolicy:
        """One attempt only."""
        return cls(max_attempts=1)

    def problems(self) -> list[str]:
        """What is wrong with this policy, in words; empty when it is usable."""
        found = []
        if self.max_attempts is not None and self.max_attempts < 1:
            found.append(f"max_attempts must be at least 1 or None, not {self.max_attempts}")
        if self.initial_backoff < timedelta(0):
            found.append("initial_backoff must not be negative")
        if not self.multiplier >= 1:  # also refuses NaN
            found.append(f"multiplier must be at least 1, not {self.multiplier}")
        if self.max_backoff < self.initial_backoff:
            found.append("max_backoff must not be shorter than initial_backoff")
        if not 0 <= self.jitter <= 1:
            found.append(f"jitter must be between 0 and 1, not {self.jitter}")
        if self.alert_after is not None and self.alert_after < 1:
            found.append(f"alert_after must be at least 1 or None, not {self.alert_after}")
        return found

    def allows_another(self, attempts_made: int, error_code: str, *, retryable: bool) -> bool:
        """Whether a failure of attempt ``attempts_made`` may be followed by another attempt."""
        if not retryable or error_code in self.non_retryable:
            return False
        return self.max_attempts is None or attempts_made < self.max_attempts

    def delay_before(self, attempt: int, spread: float) -> timedelta:
        """Delay before ``attempt`` (2 or more); ``spread`` in [0, 1) picks the jitter."""
        if attempt < 2:
            return timedelta(0)
        initial = self.initial_backoff.total_seconds()
        try:
            base = initial * self.multiplier ** (attempt - 2)
        except OverflowError:  # unbounded policies reach attempts whose power exceeds a float
            base = math.inf if initial else 0.0
        base = min(base, self.max_backoff.total_seconds())
        return timedelta(seconds=base * (1 - self.jitter * spread))
