"""Retry policies: bounded exponential backoff with computed jitter, and when to give up."""

from __future__ import annotations

import math
import uuid
from datetime import timedelta

import pytest

from saga_es.ids import spread
from saga_es.retry import RetryPolicy

JUST_UNDER_ONE = math.nextafter(1.0, 0.0)
SPREADS = [0.0, 1e-12, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999999, JUST_UNDER_ONE]


def seconds(delta: timedelta) -> float:
    return delta.total_seconds()


def expected_base(policy: RetryPolicy, attempt: int) -> float:
    base = seconds(policy.initial_backoff) * policy.multiplier ** (attempt - 2)
    return min(base, seconds(policy.max_backoff))


# -- delay_before ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(jitter=0.0),
        RetryPolicy(
            max_attempts=10,
            initial_backoff=timedelta(milliseconds=250),
            multiplier=3.0,
            max_backoff=timedelta(seconds=60),
            jitter=0.0,
        ),
        RetryPolicy(
            max_attempts=8, initial_backoff=timedelta(seconds=2), multiplier=1.0, jitter=0.0
        ),
        RetryPolicy(
            max_attempts=12,
            initial_backoff=timedelta(seconds=1),
            multiplier=1.5,
            max_backoff=timedelta(seconds=10),
            jitter=0.0,
        ),
    ],
)
def test_delay_without_jitter_is_exponential_and_capped(policy: RetryPolicy) -> None:
    last = policy.max_attempts or 20
    for attempt in range(2, last + 1):
        want = expected_base(policy, attempt)
        got = seconds(policy.delay_before(attempt, 0.0))
        assert got == pytest.approx(want, rel=1e-9), attempt
        # Spread does nothing without jitter.
        assert seconds(policy.delay_before(attempt, 0.7)) == pytest.approx(want, rel=1e-9)


def test_default_policy_schedule_written_out() -> None:
    policy = RetryPolicy(max_attempts=12, jitter=0.0)  # 1s, x2, capped at 5 min
    got = [seconds(policy.delay_before(n, 0.0)) for n in range(2, 13)]
    assert got == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]


def test_first_attempt_has_no_delay() -> None:
    policy = RetryPolicy(initial_backoff=timedelta(seconds=9))
    assert policy.delay_before(1, 0.5) == timedelta(0)
    assert policy.delay_before(0, 0.5) == timedelta(0)
    assert policy.delay_before(2, 0.0) == timedelta(seconds=9)


@pytest.mark.parametrize("jitter", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("spread_value", SPREADS)
def test_jitter_stays_within_bounds(jitter: float, spread_value: float) -> None:
    policy = RetryPolicy(
        max_attempts=None,
        initial_backoff=timedelta(seconds=1),
        multiplier=2.0,
        max_backoff=timedelta(seconds=100),
        jitter=jitter,
    )
    for attempt in range(2, 30):
        base = expected_base(policy, attempt)
        got = seconds(policy.delay_before(attempt, spread_value))
        assert base * (1 - jitter) - 1e-6 <= got <= base + 1e-6, (attempt, got)
        assert got <= seconds(policy.max_backoff) + 1e-6
        assert got >= 0


def test_jitter_extremes() -> None:
    policy = RetryPolicy(initial_backoff=timedelta(seconds=10), jitter=0.2)
    assert policy.delay_before(2, 0.0) == timedelta(seconds=10)
    assert seconds(policy.delay_before(2, JUST_UNDER_ONE)) == pytest.approx(8.0, abs=1e-6)
    assert seconds(policy.delay_before(2, JUST_UNDER_ONE)) > 8.0 - 1e-6
    assert seconds(policy.delay_before(2, 0.5)) == pytest.approx(9.0, abs=1e-6)


def test_full_jitter_can_approach_zero_but_not_go_below() -> None:
    policy = RetryPolicy(initial_backoff=timedelta(seconds=10), jitter=1.0)
    assert 0 <= seconds(policy.delay_before(2, JUST_UNDER_ONE)) < 1e-3


def test_cap_applies_after_jitter_too() -> None:
    policy = RetryPolicy(
        max_attempts=None,
        initial_backoff=timedelta(seconds=1),
        max_backoff=timedelta(seconds=5),
        jitter=0.5,
    )
    for attempt in range(2, 40):
        for s in SPREADS:
            assert policy.delay_before(attempt, s) <= timedelta(seconds=5)
    # Once capped, the jitter works on the cap.
    assert seconds(policy.delay_before(30, 0.5)) == pytest.approx(3.75)


def test_delay_is_monotonic_for_a_fixed_spread() -> None:
    policy = RetryPolicy(
        max_attempts=None,
        initial_backoff=timedelta(seconds=1),
        multiplier=2.0,
        max_backoff=timedelta(minutes=10),
        jitter=0.3,
    )
    delays = [policy.delay_before(n, 0.4) for n in range(2, 40)]
    assert delays == sorted(delays)


def test_unbounded_policy_never_overflows() -> None:
    policy = RetryPolicy.forever(max_backoff=timedelta(minutes=10))
    for attempt in (1_000, 1_025, 1_026, 1_100, 10_000, 1_000_000):
        delay = policy.delay_before(attempt, 0.5)
        assert timedelta(minutes=8) <= delay <= timedelta(minutes=10), attempt
    zero = RetryPolicy.forever(initial_backoff=timedelta(0), max_backoff=timedelta(0))
    assert zero.delay_before(5_000, 0.5) == timedelta(0)


def test_delay_with_spread_from_ids_is_deterministic_and_bounded() -> None:
    policy = RetryPolicy(max_attempts=None, jitter=0.2)
    saga_id = uuid.UUID(int=42)
    for attempt in range(2, 50):
        s = spread(saga_id, "action", "step", attempt)
        assert 0.0 <= s < 1.0
        assert s == spread(saga_id, "action", "step", attempt)
        first = policy.delay_before(attempt, s)
        assert first == policy.delay_before(attempt, s)
        base = expected_base(policy, attempt)
        assert base * 0.8 - 1e-6 <= seconds(first) <= base + 1e-6


def test_spread_differs_between_attempts_phases_and_sagas() -> None:
    saga_id = uuid.UUID(int=7)
    values = {spread(saga_id, "action", "s", n) for n in range(2, 40)}
    assert len(values) == 38
    assert spread(saga_id, "action", "s", 2) != spread(saga_id, "compensation", "s", 2)
    assert spread(saga_id, "action", "s", 2) != spread(uuid.UUID(int=8), "action", "s", 2)


# -- allows_another -------------------------------------------------------------------------------


@pytest.mark.parametrize("max_attempts", [1, 2, 3, 5])
def test_allows_another_respects_max_attempts(max_attempts: int) -> None:
    policy = RetryPolicy(max_attempts=max_attempts)
    for made in range(1, max_attempts + 3):
        assert policy.allows_another(made, "boom", retryable=True) is (made < max_attempts), made


def test_never_allows_no_retry() -> None:
    assert RetryPolicy.never().max_attempts == 1
    assert not RetryPolicy.never().allows_another(1, "timeout", retryable=True)


def test_unbounded_policy_always_allows_another() -> None:
    policy = RetryPolicy.forever()
    assert policy.max_attempts is None
    for made in (1, 2, 10, 1_000, 10**9):
        assert policy.allows_another(made, "timeout", retryable=True)


def test_non_retryable_codes_fail_at_once() -> None:
    policy = RetryPolicy(max_attempts=10, non_retryable=frozenset({"card_declined", "fraud"}))
    assert not policy.allows_another(1, "card_declined", retryable=True)
    assert not policy.allows_another(1, "fraud", retryable=True)
    assert policy.allows_another(1, "gateway_down", retryable=True)
    assert policy.allows_another(1, "Card_Declined", retryable=True)  # codes are exact
    forever = RetryPolicy.forever(non_retryable=frozenset({"gone"}))
    assert not forever.allows_another(1, "gone", retryable=True)
    assert forever.allows_another(1, "other", retryable=True)


def test_retryable_false_fails_at_once() -> None:
    assert not RetryPolicy(max_attempts=10).allows_another(1, "boom", retryable=False)
    assert not RetryPolicy.forever().allows_another(1, "boom", retryable=False)


def test_forever_passes_options_through() -> None:
    policy = RetryPolicy.forever(initial_backoff=timedelta(seconds=3), jitter=0.0)
    assert policy.max_attempts is None
    assert policy.delay_before(2, 0.9) == timedelta(seconds=3)
    assert policy.problems() == []
