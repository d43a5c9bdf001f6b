"""Sagas of every kind for the projection tests, and what the views must hold, from replays.

``drive(engine, clock, prefix)`` runs a mixed batch of order sagas through the real engine:
completed, failed at each step and compensated, retried after a transient failure, timed out
(some retried, some stuck), a compensation that fails, duplicate and late replies, and sagas
left waiting. ``expected_views(store)`` computes the status, audit and statistics rows from
each saga's stream, folded with ``saga_es.state`` (not with the projections' own code), and
``actual_views(url)`` reads what the projections wrote; a test compares the two.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict
from datetime import timedelta
from typing import Any
from uuid import UUID

from conftest import order
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from projections.audit import plain_summary
from projections.database import ViewDatabase
from projections.eventinfo import json_default
from projections.schema import BUCKET_COLUMNS, BUCKET_LIMITS_MS, public_tables
from projections.status import row_from_state
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import Outcome, SagaEngine
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.store import SagaStore
from saga_es.state import TERMINAL, SagaState, evolve, next_timer
from saga_es.testing.clock import VirtualClock

#: Every kind of saga the mixed batch has, by the way its participants behave.
KINDS = (
    "complete", "out_of_stock", "declined", "no_carrier", "transient", "reserve_timeout",
    "pivot_timeout", "notify_fails", "release_fails", "duplicate_reply", "late_reply", "waiting",
)  # fmt: skip


def _reply_ok(engine: SagaEngine, outcome: Outcome, **result: Any) -> Outcome:
    return engine.handle_reply(outcome.commands[-1].reply_success(uuid.uuid4(), result))


def _reply_fail(
    engine: SagaEngine, outcome: Outcome, code: str, retryable: bool = False
) -> Outcome:
    command = outcome.commands[-1]
    return engine.handle_reply(command.reply_failure(uuid.uuid4(), code, "no", retryable=retryable))


def _fire(engine: SagaEngine, clock: VirtualClock, saga_id: UUID) -> Outcome:
    """Let the saga's next timer come due and fire it."""
    state = engine.get_state(saga_id)
    timer = next_timer(state)
    assert timer is not None, f"{saga_id} has no timer"
    clock.set(max(clock.now, timer.due + timedelta(milliseconds=1)))
    return engine.handle_timer(saga_id, timer.timer_id)


def drive_one(engine: SagaEngine, clock: VirtualClock, key: str, kind: str) -> UUID:
    """Run one saga of ``kind`` as far as that kind goes."""
    o = engine.start(order_fulfillment, order(key), business_key=key)
    sid = o.saga_id
    tick = timedelta(milliseconds=7 + len(key) % 13)

    def step() -> None:
        clock.advance(tick)

    step()
    if kind == "reserve_timeout":  # no reply: times out, retried, then answered
        o = _fire(engine, clock, sid)
        o = _fire(engine, clock, sid)
    if kind == "out_of_stock":
        _reply_fail(engine, o, "out_of_stock")
        return sid
    if kind == "waiting":
        return sid
    first = o
    o = _reply_ok(engine, o, reservation="r-1")
    if kind == "duplicate_reply":  # the same command answered again: ignored
        engine.handle_reply(first.commands[-1].reply_success(uuid.uuid4(), {"again": True}))
    step()
    if kind == "declined":
        o = _reply_fail(engine, o, "card_declined")
        step()
        _reply_ok(engine, o)
        return sid
    if kind == "release_fails":
        o = _reply_fail(engine, o, "card_declined")
        step()
        _reply_fail(engine, o, "release_refused")  # a compensation failing for good: stuck
        return sid
    if kind == "transient":
        _reply_fail(engine, o, "gateway_timeout", retryable=True)
        o = _fire(engine, clock, sid)  # the retry comes due: attempt 2
        step()
    o = _reply_ok(engine, o, charge="c-1")
    step()
    if kind == "no_carrier":
        o = _reply_fail(engine, o, "no_carrier")
        step()
        o = _reply_ok(engine, o)
        step()
        _reply_ok(engine, o)
        return sid
    if kind in ("pivot_timeout", "late_reply"):
        shipment = o
        o = _fire(engine, clock, sid)  # no reply by the deadline: retry scheduled
        if kind == "late_reply":
            engine.handle_reply(shipment.commands[-1].reply_success(uuid.uuid4(), {}))
        o = _fire(engine, clock, sid)  # attempt 2 issued
        if kind == "pivot_timeout":  # every attempt times out: the pivot's outcome is unknown
            while not engine.get_state(sid).is_terminal:
                _fire(engine, clock, sid)
            return sid
        step()
    o = _reply_ok(engine, o, shipment="s-1")
    step()
    if kind == "notify_fails":
        _reply_fail(engine, o, "bad_address")  # a retriable step failing for good: stuck
        return sid
    _reply_ok(engine, o)
    return sid


def drive(engine: SagaEngine, clock: VirtualClock, prefix: str, rounds: int = 1) -> list[UUID]:
    """``rounds`` sagas of every kind; their ids."""
    return [
        drive_one(engine, clock, f"{prefix}-{kind}-{n}", kind)
        for n in range(rounds)
        for kind in KINDS
    ]


# -- what the views must hold -----------------------------------------------------------------


def _last_error(events: list[Any]) -> tuple[str | None, str | None, str | None]:
    error: tuple[str | None, str | None, str | None] = (None, None, None)
    for e in events:
        kind = type(e).__name__
        if kind in ("StepFailed", "CompensationFailed", "SagaStuck"):
            error = (e.step, e.error_code, e.message)
        elif kind == "StepTimedOut":
            message = f"no reply to attempt {e.attempt} by {e.deadline.isoformat()}"
            error = (e.step, "timeout", message)
        elif kind == "CompensationStarted":
            error = (e.failed_step, e.error_code, e.message)
    return error


def expected_views(store: SagaStore) -> dict[str, Any]:
    notifications = store.app.recorder.select_notifications(start=1, limit=1_000_000)
    position = {(n.originator_id, n.originator_version): n.id for n in notifications}
    status, audit = {}, {}
    counts: dict[tuple[Any, ...], Counter[str]] = defaultdict(Counter)
    latencies: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for saga_id in store.saga_ids():
        events = store.events(saga_id)
        state: SagaState | None = None
        finished = None
        for e in events:
            state = evolve(state, e)
            finished = (finished or e.timestamp) if state.status in TERMINAL else None
        assert state is not None
        row = row_from_state(state, position=position[(saga_id, state.version)]).as_dict()
        row["error_step"], row["error_code"], row["error_message"] = _last_error(events)
        row["finished_at"] = finished
        status[saga_id] = row
        key = (state.definition, state.definition_version)
        for command in state.commands.values():
            c = counts[(*key, command.step, command.phase)]
            c["issued"] += 1
            if command.outcome:
                c[command.outcome] += 1
            if command.attempt > 1:
                c["retried"] += 1
        if state.retry_wait is not None:  # scheduled, not issued yet
            counts[(*key, state.retry_wait.step, state.retry_wait.phase)]["retried"] += 1
        issued_at = {}
        for e in events:
            kind = type(e).__name__
            if kind in ("StepCommandIssued", "CompensationIssued"):
                issued_at[e.command_id] = e.timestamp
            elif kind in (
                "StepSucceeded",
                "StepFailed",
                "CompensationSucceeded",
                "CompensationFailed",
            ):
                phase = "compensation" if kind.startswith("Compensation") else "action"
                ms = (e.timestamp - issued_at[e.command_id]).total_seconds() * 1000
                latencies[(*key, e.step, phase)].append(ms)
            elif kind == "ReplyIgnored":
                counts[(*key, e.step, e.phase)]["ignored"] += 1
            fields = {k: v for k, v in vars(e).items()}
            audit[position[(saga_id, e.originator_version)]] = {
                "position": position[(saga_id, e.originator_version)],
                "saga_id": saga_id,
                "version": e.originator_version,
                "event_type": kind,
                "step": fields.get("step") or fields.get("failed_step"),
                "attempt": fields.get("attempt"),
                "command_id": fields.get("command_id"),
                "occurred_at": e.timestamp,
                "actor": "participant"
                if kind in ("StepSucceeded", "StepFailed", "CompensationSucceeded",
                            "CompensationFailed", "ReplyIgnored")
                else "engine",
                "summary": json.loads(json.dumps(
                    {k: v for k, v in fields.items() if k not in _IN_COLUMNS},
                    default=json_default,
                )),
            }  # fmt: skip
    stats = {}
    for key in set(counts) | set(latencies):
        c, ms = counts[key], latencies[key]
        buckets = [
            sum(
                1
                for m in ms
                if (i == 0 or m > BUCKET_LIMITS_MS[i - 1])
                and (i == len(BUCKET_LIMITS_MS) or m <= BUCKET_LIMITS_MS[i])
            )
            for i in range(len(BUCKET_COLUMNS))
        ]
        stats[key] = {
            **{
                n: c[n]
                for n in ("issued", "succeeded", "failed", "retried", "timed_out", "ignored")
            },
            "latency_count": len(ms),
            "latency_sum_ms": round(sum(ms), 3),
            "latency_max_ms": max(ms, default=0.0),
            **dict(zip(BUCKET_COLUMNS, buckets, strict=True)),
        }
    return {"status": status, "audit": audit, "stats": stats}


_IN_COLUMNS = {
    "originator_id", "originator_version", "originator_topic", "timestamp",
    "correlation_id", "step", "attempt", "command_id",
}  # fmt: skip


def actual_views(url: str) -> dict[str, Any]:
    db = ViewDatabase(DatabaseSettings.from_url(url))
    tables = public_tables()
    try:
        with db.reader.connect() as conn:
            status = {
                r.saga_id: dict(r._mapping) for r in conn.execute(tables["status"].select()).all()
            }
            audit = {}
            for r in conn.execute(tables["audit"].select()).all():
                row = dict(r._mapping)
                row["summary"] = plain_summary(row["summary"])
                audit[row["position"]] = row
            stats = {}
            for r in conn.execute(tables["stats"].select()).all():
                row = dict(r._mapping)
                key = tuple(
                    row.pop(k) for k in ("definition", "definition_version", "step", "phase")
                )
                row["latency_sum_ms"] = round(row["latency_sum_ms"], 3)
                stats[key] = row
    finally:
        db.dispose()
    return {"status": status, "audit": audit, "stats": stats}


def tracking(url: str) -> dict[str, int]:
    """Each table set's position; empty before a runner has created the tables."""
    db = ViewDatabase(DatabaseSettings.from_url(url))
    try:
        with db.reader.connect() as conn:
            rows = conn.execute(
                text(f"SELECT view, position FROM {db.table('projection_tracking')}")
            ).all()
    except DBAPIError as exc:
        if "projection_tracking" not in str(exc.orig):
            raise
        return {}
    finally:
        db.dispose()
    return {view: position for view, position in rows}


def assert_views_agree(url: str, store: SagaStore) -> None:
    """The views hold exactly what a replay of every stream says, row for row."""
    expected, actual = expected_views(store), actual_views(url)
    for view in ("status", "audit", "stats"):
        missing = set(expected[view]) - set(actual[view])
        extra = set(actual[view]) - set(expected[view])
        assert not missing, f"{view}: missing {missing}"
        assert not extra, f"{view}: extra {extra}"
        wrong = {k: (actual[view][k], v) for k, v in expected[view].items() if actual[view][k] != v}
        assert not wrong, f"{view}: {len(wrong)} rows differ, e.g. {next(iter(wrong.items()))}"
