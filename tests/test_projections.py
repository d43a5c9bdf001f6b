"""The views agree with the event streams, on PostgreSQL and SQLite.

After a mixed batch of sagas (every outcome the order saga has), the status, audit and
statistics views hold exactly what a replay of every stream with ``saga_es.state`` says, row
for row, whether they were built in one catch-up, batch by batch while the sagas ran, or by a
rebuild. The queries are checked against the same data.
"""

from __future__ import annotations

import gc
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from projection_support import KINDS, assert_views_agree, drive, drive_one, tracking

from projections.errors import (
    ImpossibleTimeRangeError,
    InvalidQueryError,
    SagaNotFoundError,
)
from projections.queries import SagaQueries, TimeRange
from projections.rebuild import rebuild
from projections.runner import ProjectionRunner
from projections.stats import percentile
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.events import SagaEvent
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.store import SagaStore
from saga_es.state import SagaStatus
from saga_es.testing.clock import VirtualClock


@dataclass(frozen=True)
class Setup:
    url: str
    settings: DatabaseSettings
    engine: SagaEngine
    clock: VirtualClock


@pytest.fixture
def setup(database_url: str) -> Any:
    clock = VirtualClock()
    engine = SagaEngine([order_fulfillment], database_url=database_url, clock=clock)
    yield Setup(database_url, DatabaseSettings.from_url(database_url), engine, clock)
    engine.close()


def test_views_agree_with_a_replay_of_every_stream(setup: Setup) -> None:
    drive(setup.engine, setup.clock, "a", rounds=2)
    with ProjectionRunner(setup.settings, batch_size=37) as runner:
        applied = runner.catch_up()
        assert applied == setup.engine.store.count("events")
        assert runner.catch_up() == 0  # nothing new: nothing applied twice
    assert_views_agree(setup.url, setup.engine.store)
    states = {row.state for row in SagaQueries(setup.settings).list_sagas(limit=1000).items}
    assert states == {"pending", "completed", "failed", "stuck"}  # every ending is covered


def test_views_built_batch_by_batch_while_sagas_run_agree_too(setup: Setup) -> None:
    with ProjectionRunner(setup.settings, batch_size=5) as runner:
        for n, kind in enumerate(KINDS):
            drive_one(setup.engine, setup.clock, f"b-{n}", kind)
            runner.step()  # a batch in the middle of things: views see partial sagas
        runner.catch_up()
    assert_views_agree(setup.url, setup.engine.store)


def test_batches_grow_while_catching_up_and_the_collector_is_given_back(setup: Setup) -> None:
    drive(setup.engine, setup.clock, "f")
    head = setup.engine.store.count("events")
    with ProjectionRunner(setup.settings, batch_size=4, max_batch_size=16) as runner:
        sizes = []
        while (events := runner.step().events) > 0:
            sizes.append(events)
        assert sizes[:3] == [4, 8, 16]  # doubling from batch_size up to max_batch_size
        assert all(size == 16 for size in sizes[2:-1])
        assert sum(sizes) == head
        assert gc.isenabled()  # the short batch at the head resumed it
        drive_one(setup.engine, setup.clock, "f-more", "complete")
        assert runner.step().events == 4  # back to batch_size once at the head
        runner.catch_up()
    assert gc.isenabled()  # catch_up and close give it back, whatever the last batch was
    assert_views_agree(setup.url, setup.engine.store)


@pytest.mark.postgres
def test_a_long_catch_up_ends_with_fresh_planner_statistics(postgres_url: str) -> None:
    clock = VirtualClock()
    settings = DatabaseSettings.from_url(postgres_url)
    with SagaEngine([order_fulfillment], database_url=postgres_url, clock=clock) as engine:
        ids = drive(engine, clock, "p")
        with ProjectionRunner(settings, batch_size=2, max_batch_size=2) as runner:
            status = runner.db.table("saga_status_v1")
            sql = f"SELECT reltuples FROM pg_class WHERE oid = '{status}'::regclass"
            runner.step()
            with runner.db.reader.connect() as conn:
                assert conn.exec_driver_sql(sql).scalar() == -1  # never analysed
            runner.catch_up()  # far more than ANALYZE_AFTER full batches
            with runner.db.reader.connect() as conn:
                assert conn.exec_driver_sql(sql).scalar() == len(ids)


def test_a_rebuild_gives_the_views_incremental_processing_gave(setup: Setup) -> None:
    drive(setup.engine, setup.clock, "c")
    with ProjectionRunner(setup.settings) as runner:
        runner.catch_up()
        for name in ("status", "audit", "stats"):
            report = rebuild(setup.settings, name, batch_size=11)
            assert (report.old_version, report.new_version) == (1, 2)
        drive(setup.engine, setup.clock, "d")  # the live runner now writes to version 2
        runner.catch_up()
    assert set(tracking(setup.url)) == {"status_v2", "audit_v2", "stats_v2"}  # v1 dropped
    assert_views_agree(setup.url, setup.engine.store)


@dataclass(frozen=True)
class OperatorNoted(SagaEvent):
    """An event type the projections' code has no rule for (as a newer engine could write)."""

    TOPIC = "tests.test_projections:OperatorNoted"
    actor: str
    reason: str


def _append_note(store: SagaStore, saga_id: uuid.UUID, at: datetime) -> None:
    state = store.load_state(saga_id)
    assert state is not None
    note = OperatorNoted(
        originator_id=saga_id,
        originator_version=state.version + 1,
        timestamp=at,
        correlation_id=state.correlation_id,
        actor="alice",
        reason="called the customer",
    )
    store.app.events.put([note])


def test_an_unknown_event_type_is_audited_and_moves_updated_at(setup: Setup) -> None:
    saga_id = drive_one(setup.engine, setup.clock, "e-1", "waiting")
    later = setup.clock.advance(timedelta(minutes=5))
    _append_note(setup.engine.store, saga_id, later)
    with ProjectionRunner(setup.settings) as runner:
        runner.catch_up()
    with SagaQueries(setup.settings) as queries:
        status = queries.status(saga_id)
        last = queries.history(saga_id)[-1]
    assert (status.state, status.current_step) == ("pending", "reserve_inventory")
    assert status.updated_at == later
    assert status.version == 3
    assert (last.event_type, last.actor) == ("OperatorNoted", "alice")
    assert last.summary == {"actor": "alice", "reason": "called the customer"}


def test_an_event_type_only_the_state_rules_know_is_replayed_with_them(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from saga_es import state as state_rules

    # As saga_es.state would learn a new event type before the projections' fold does.
    monkeypatch.setitem(
        state_rules._CHANGES, OperatorNoted, lambda s, e: {"status": SagaStatus.FAILED}
    )
    saga_id = drive_one(setup.engine, setup.clock, "f-1", "waiting")
    _append_note(setup.engine.store, saga_id, setup.clock.advance(timedelta(seconds=1)))
    with ProjectionRunner(setup.settings) as runner:
        runner.catch_up()
    with SagaQueries(setup.settings) as queries:
        assert queries.status(saga_id).state == "failed"


# -- queries ----------------------------------------------------------------------------------


def test_queries_filter_paginate_and_find_stuck_candidates(setup: Setup) -> None:
    ids = drive(setup.engine, setup.clock, "g", rounds=2)
    with ProjectionRunner(setup.settings) as runner:
        runner.catch_up()
    with SagaQueries(setup.settings) as q:
        everything = q.list_sagas(limit=1000).items
        assert {r.saga_id for r in everything} == set(ids)
        pages, cursor = [], None
        while True:
            page = q.list_sagas(limit=5, after=cursor)
            pages.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert [r.saga_id for r in pages] == [r.saga_id for r in everything]  # newest first
        assert [r.started_at for r in pages] == sorted((r.started_at for r in pages), reverse=True)
        declined = q.list_sagas(error_code="card_declined").items
        assert {r.business_key for r in declined} == {"g-declined-0", "g-declined-1"}
        refused = q.list_sagas(error_code="release_refused", state="stuck").items
        assert {r.business_key for r in refused} == {"g-release_fails-0", "g-release_fails-1"}
        stuck = q.list_sagas(state="stuck", definition="order-fulfillment").items
        assert {r.business_key.split("-")[1] for r in stuck} == {
            "pivot_timeout", "notify_fails", "release_fails"
        }  # fmt: skip
        waiting = q.list_sagas(step="reserve_inventory", state="pending").items
        assert {r.business_key for r in waiting} == {"g-waiting-0", "g-waiting-1"}
        one = q.status_by_key("g-complete-1")
        assert [r.state for r in one] == ["completed"]
        assert q.list_sagas(correlation_id=one[0].correlation_id).items == one
        # Stuck candidates: still running, no event for longer than X (as of a given now).
        idle = q.list_sagas(idle_for=timedelta(minutes=1), now=setup.clock.now + timedelta(hours=1))
        assert {r.business_key for r in idle.items} == {"g-waiting-0", "g-waiting-1"}
        assert q.list_sagas(idle_for=timedelta(days=1), now=setup.clock.now).items == []
        first = min(r.started_at for r in everything)
        early = q.list_sagas(started=TimeRange(before=first)).items
        assert [r.started_at for r in early] == [first]
        assert len(q.list_sagas(updated=TimeRange(after=first), limit=1000).items) == len(ids)
        history = q.history(ids[0])
        assert [e.version for e in history] == list(range(1, len(history) + 1))
        assert history[0].event_type == "SagaStarted"
        assert history[-1].event_type == "SagaCompleted"
        stats = {(s.step, s.phase): s for s in q.step_stats(definition="order-fulfillment")}
        assert stats[("reserve_inventory", "compensation")].compensated > 0
        charge = stats[("charge_payment", "action")]
        assert charge.p50_ms is not None
        assert charge.p50_ms <= charge.p95_ms <= charge.p99_ms


def test_bad_queries_are_refused_with_the_reason(setup: Setup) -> None:
    with ProjectionRunner(setup.settings) as runner:
        runner.catch_up()
    now = datetime(2030, 1, 1, tzinfo=UTC)
    with SagaQueries(setup.settings) as q:
        with pytest.raises(SagaNotFoundError, match="not in the status view"):
            q.status(uuid.uuid4())
        with pytest.raises(SagaNotFoundError, match="business key 'nope'"):
            q.status_by_key("nope")
        with pytest.raises(ImpossibleTimeRangeError, match="impossible time range"):
            q.list_sagas(started=TimeRange(after=now, before=now - timedelta(seconds=1)))
        with pytest.raises(InvalidQueryError, match="cursor"):
            q.list_sagas(after="not-a-cursor")
        with pytest.raises(InvalidQueryError, match="state 'done'"):
            q.list_sagas(state="done")
        with pytest.raises(InvalidQueryError, match="limit"):
            q.list_sagas(limit=0)
        with pytest.raises(InvalidQueryError, match="timezone"):
            q.list_sagas(updated=TimeRange(after=datetime(2030, 1, 1)))


# -- pure parts -------------------------------------------------------------------------------


def test_percentiles_from_the_histogram_fall_in_the_bucket_of_the_exact_value() -> None:
    from projections.schema import BUCKET_LIMITS_MS
    from projections.stats import StepCounters

    samples = [1.5 * (i % 97) + (i % 7) * 40.0 for i in range(1000)]
    counters = StepCounters()
    for ms in samples:
        counters.observe(ms)
    ordered = sorted(samples)
    limits = (0.0, *BUCKET_LIMITS_MS)
    for q in (0.5, 0.95, 0.99):
        exact = ordered[int(q * len(ordered)) - 1]
        found = percentile(counters.buckets, q, counters.latency_max_ms)
        assert found is not None
        low = max(x for x in limits if x < exact) if exact > 0 else 0.0
        high = min(x for x in (*BUCKET_LIMITS_MS, counters.latency_max_ms) if x >= exact)
        assert low <= found <= high, (q, exact, found)
    assert percentile([0] * len(counters.buckets), 0.5, 0.0) is None
