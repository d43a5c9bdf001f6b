"""Delays between redeliveries of one message, for the workers' Celery retries.

Sagas have their own, deterministic retry schedule (``saga_es.retry``). This one is for a worker
that could not finish handling a message (a database outage, a flaky dependency) and puts it
back on the broker to try again: exponential, capped, and jittered so that many workers that
failed together (the database went away for all of them) do not all come back in the same
instant.
"""

from __future__ import annotations

import random

__all__ = ["exponential_delay"]


def exponential_delay(
    retries: int,
    *,
    base: float,
    cap: float,
    jitter: bool = True,
    spread: float = 0.5,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``retries + 1`` (``retries`` made so far).

    ``base * 2**retries``, never more than ``cap``; with ``jitter`` a value drawn from
    [``1 - spread`` of that, all of it].
    """
    if retries < 0:
        raise ValueError(f"retries must not be negative, not {retries}")
    try:
        delay = min(cap, base * 2.0**retries)
    except OverflowError:  # a message retried without bound reaches powers beyond a float
        delay = cap
    if jitter:
        delay *= (rng or random).uniform(1.0 - spread, 1.0)
    return delay
