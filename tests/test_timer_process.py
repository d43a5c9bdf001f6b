"""The timer process on PostgreSQL and SQLite: due timers fire once in effect, however many
processes claim them, crash or stop; then as real ``saga-es timers run`` processes.

Exactly once is counted in the sagas' streams: each saga has one ``StepTimedOut`` per deadline
passed and one issued command per retry, never two.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest
from conftest import order
from processes import Processes, wait_until

from saga_es import events as ev
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.persistence.timer_table import ScheduledTimer, TimerTable
from saga_es.testing import VirtualClock
from saga_es.testing.invariants import sagas_left_hanging
from saga_es.timer_process import TimerProcess

SAGA_ES = shutil.which("saga-es", path=str(Path(sys.executable).parent)) or "saga-es"
DEADLINE = order_fulfillment.steps[0].timeout  # every saga starts waiting for its reservation


class SimulatedCrashError(Exception):
    """Raised by an ``after_claim`` hook: the process dies holding its claim."""


def start(engine: SagaEngine, count: int) -> list[UUID]:
    return [
        engine.start(order_fulfillment, order(n), business_key=f"o-{n}").saga_id
        for n in range(count)
    ]


def timeouts(engine: SagaEngine, sagas: Sequence[UUID]) -> Counter[UUID]:
    """StepTimedOut events per saga."""
    return Counter(
        saga_id
        for saga_id in sagas
        for e in engine.events(saga_id)
        if isinstance(e, ev.StepTimedOut)
    )


def _all_events(engine: SagaEngine, sagas: Sequence[UUID]) -> list[object]:
    return [e for saga_id in sagas for e in engine.events(saga_id)]


def _is_retry(e: object) -> bool:
    return isinstance(e, ev.StepCommandIssued) and e.attempt == 2


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def engine(database_url: str, clock: VirtualClock) -> Iterator[SagaEngine]:
    with SagaEngine([order_fulfillment], database_url=database_url, clock=clock) as e:
        yield e
        assert sagas_left_hanging(e.store) == []


def test_due_timers_fire_once_and_others_wait(engine: SagaEngine, clock: VirtualClock) -> None:
    sagas = start(engine, 5)
    process = TimerProcess(engine, batch_size=2)
    events = engine.store.count("events")

    assert process.run_once() == 0
    clock.advance(DEADLINE - timedelta(microseconds=1))
    assert process.run_once() == 0
    assert engine.store.count("events") == events

    clock.advance(timedelta(microseconds=1))
    assert process.run_once() == 5  # three batches: 2, 2, 1
    assert process.stats.claimed == 5
    assert timeouts(engine, sagas) == Counter(dict.fromkeys(sagas, 1))
    assert {t.kind for t in engine.timers()} == {"retry"}
    assert engine.store.count("events") == events + 2 * 5  # StepTimedOut, RetryScheduled
    assert process.run_once() == 0  # the retries are not due yet


def test_a_stale_claim_fired_after_another_process_fired_it_changes_nothing(
    engine: SagaEngine, clock: VirtualClock
) -> None:
    [saga_id] = start(engine, 1)
    table = TimerTable(engine.store)
    clock.advance(DEADLINE)
    # Process A claims, then stalls past its lease.
    [stale] = table.claim_due(clock(), lease_until=clock() + timedelta(seconds=5), limit=10)
    assert table.claim_due(clock(), lease_until=clock(), limit=10) == []  # held by the lease
    clock.advance(timedelta(seconds=5))
    # Process B claims it again once the lease has passed, and fires it.
    b = TimerProcess(engine)
    assert b.run_once() == 1
    events = engine.events(saga_id)

    # A wakes up and fires what it claimed: the timer is not the saga's any more.
    outcome = engine.handle_timer(stale.saga_id, stale.timer_id)
    assert outcome.events == ()
    assert engine.events(saga_id) == events
    assert timeouts(engine, [saga_id]) == Counter({saga_id: 1})


def test_two_processes_at_once_fire_every_timer_once(
    database_url: str, engine: SagaEngine, clock: VirtualClock
) -> None:
    sagas = start(engine, 40)
    clock.advance(DEADLINE)
    # Each process has its own engine and connections, as separate processes would.
    with (
        SagaEngine([order_fulfillment], database_url=database_url, clock=clock) as one,
        SagaEngine([order_fulfillment], database_url=database_url, clock=clock) as two,
    ):
        processes = [TimerProcess(e, batch_size=3) for e in (one, two)]
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def run(process: TimerProcess) -> None:
            try:
                barrier.wait()
                process.run_once()
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(p,)) for p in processes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors
        claimed = [p.stats.claimed for p in processes]
        fired = [p.stats.fired for p in processes]
        print(
            f"claimed {claimed}, fired {fired}, unchanged {[p.stats.unchanged for p in processes]}"
        )
    assert sum(fired) == 40
    assert timeouts(engine, sagas) == Counter(dict.fromkeys(sagas, 1))
    for saga_id in sagas:
        kinds = [type(e).__name__ for e in engine.events(saga_id)]
        assert kinds == ["SagaStarted", "StepCommandIssued", "StepTimedOut", "RetryScheduled"]


def test_timers_claimed_by_a_crashed_process_fire_once_after_the_lease(
    engine: SagaEngine, clock: VirtualClock
) -> None:
    sagas = start(engine, 6)
    clock.advance(DEADLINE)
    claims: list[Sequence[ScheduledTimer]] = []

    def crash_on_the_second_batch(batch: Sequence[ScheduledTimer]) -> None:
        claims.append(batch)
        if len(claims) == 2:
            raise SimulatedCrashError

    doomed = TimerProcess(
        engine, batch_size=2, lease=timedelta(seconds=30), after_claim=crash_on_the_second_batch
    )
    with pytest.raises(SimulatedCrashError):
        doomed.run_once()
    assert doomed.stats.fired == 2  # the first batch; the second is claimed, not fired
    held = {t.saga_id for t in claims[1]}

    restarted = TimerProcess(engine, batch_size=2)
    assert restarted.run_once() == 2  # the third batch; the crashed claim waits for its lease
    assert set(timeouts(engine, sagas)) == set(sagas) - held
    clock.advance(timedelta(seconds=30))
    assert restarted.run_once() == 2 + 4  # the held deadlines, and the others' retries
    assert timeouts(engine, sagas) == Counter(dict.fromkeys(sagas, 1))
    retried = [e.originator_id for e in _all_events(engine, sagas) if _is_retry(e)]
    assert sorted(retried) == sorted(set(sagas) - held)  # once each


def test_stopping_gives_back_the_claimed_timers_it_did_not_fire(
    engine: SagaEngine, clock: VirtualClock
) -> None:
    sagas = start(engine, 4)
    clock.advance(DEADLINE + timedelta(seconds=1))
    stopping = TimerProcess(engine, batch_size=10)
    stopping.after_claim = lambda batch: stopping.stop()  # SIGTERM arrives right after a claim
    assert stopping.run_once() == 0
    assert stopping.stats.released == 4
    due = {t.saga_id: t.due for t in engine.timers()}
    assert due == dict.fromkeys(sagas, clock.now - timedelta(seconds=1))  # their own due time
    assert TimerProcess(engine).run_once() == 4  # at once, no lease to wait for


def test_run_stops_on_request_and_fires_meanwhile(engine: SagaEngine, clock: VirtualClock) -> None:
    sagas = start(engine, 3)
    clock.advance(DEADLINE)
    process = TimerProcess(engine, poll_interval=0.05)
    thread = threading.Thread(target=process.run)
    thread.start()
    try:
        wait_until(lambda: process.stats.fired == 3, timeout=30, what="the timers to fire")
    finally:
        process.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert timeouts(engine, sagas) == Counter(dict.fromkeys(sagas, 1))


# -- as processes -----------------------------------------------------------------------------


def started_an_hour_ago(url: str, count: int) -> list[UUID]:
    """Sagas whose first deadline passed long ago, by the real clock."""
    past = VirtualClock(datetime.now(UTC) - timedelta(hours=1))
    with SagaEngine([order_fulfillment], database_url=url, clock=past) as e:
        return start(e, count)


@pytest.mark.postgres
def test_two_timer_processes_fire_each_timer_once_and_stop_on_sigterm(
    postgres_url: str, tmp_path: Path
) -> None:
    sagas = started_an_hour_ago(postgres_url, 40)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SAGA_ES_")},
        "SAGA_ES_DATABASE_URL": postgres_url,
        "SAGA_ES_TIMERS_BATCH_SIZE": "3",
        "SAGA_ES_TIMERS_POLL_INTERVAL": "0.1",
    }
    with (
        Processes(tmp_path, env) as processes,
        SagaEngine([order_fulfillment], database_url=postgres_url) as engine,
    ):
        both = [processes.start(f"timers-{n}", [SAGA_ES, "timers", "run"]) for n in (1, 2)]

        def retried() -> bool:  # the deadline fired, then the retry it scheduled
            waiting = [engine.get_state(s).awaiting for s in sagas]
            return all(a is not None and a.attempt == 2 for a in waiting)

        wait_until(retried, timeout=60, what="every saga to time out and retry")
        for process in both:
            os.killpg(process.pid, signal.SIGTERM)
            assert process.wait() == 0, process.output()
            assert "timers stopped" in process.output()
        fired = [p.output().count(" fired: ") for p in both]
        print(f"fired per process: {fired}")
        assert sum(fired) == 2 * 40  # each deadline and each retry, once
        assert timeouts(engine, sagas) == Counter(dict.fromkeys(sagas, 1))
        for saga_id in sagas:
            issued = [
                e.attempt for e in engine.events(saga_id) if isinstance(e, ev.StepCommandIssued)
            ]
            assert issued == [1, 2]
        assert sagas_left_hanging(engine.store) == []


def test_timers_run_once_fires_what_is_due_and_exits(sqlite_url: str) -> None:
    sagas = started_an_hour_ago(sqlite_url, 3)
    result = subprocess.run(
        [SAGA_ES, "timers", "run", "--once", "--database-url", sqlite_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "fired 3 timers (0 changed nothing, 0 failed)" in result.stdout
    with SagaEngine([order_fulfillment], database_url=sqlite_url) as engine:
        assert timeouts(engine, sagas) == Counter(dict.fromkeys(sagas, 1))


def test_a_timer_not_due_by_the_engines_clock_is_given_back(
    engine: SagaEngine, clock: VirtualClock
) -> None:
    [saga_id] = start(engine, 1)
    [timer] = engine.timers(saga_id)
    clock.advance(DEADLINE)
    process = TimerProcess(engine)

    def clocks_disagree(batch: Sequence[ScheduledTimer]) -> None:
        clock.now -= timedelta(seconds=10)  # the engine's clock is behind the claimer's

    process.after_claim = clocks_disagree
    assert process.run_once() == 0
    assert (process.stats.unchanged, process.stats.released) == (1, 1)
    assert engine.timers(saga_id) == [timer]  # due at its own time again, not at the lease
    assert timeouts(engine, [saga_id]) == Counter()
    process.after_claim = None
    clock.set(timer.due)
    assert process.run_once() == 1
