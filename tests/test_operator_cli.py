"""Operator actions from Python and from the command line, on a real store: recorded in the
saga's stream with actor and reason, with their outbox rows and timer in the same transaction;
refused in one clear line, with nothing written."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import order, tables

from saga_es import events as ev
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.errors import ActionRefusedError
from saga_es.state import SagaStatus
from saga_es.testing import VirtualClock
from saga_es.testing.invariants import sagas_left_hanging

SAGA_ES = shutil.which("saga-es", path=str(Path(sys.executable).parent)) or "saga-es"


def saga_es(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SAGA_ES, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_actions_commit_their_events_commands_and_timer_together(database_url: str) -> None:
    clock = VirtualClock()
    with SagaEngine([order_fulfillment], database_url=database_url, clock=clock) as engine:
        saga_id = engine.start(order_fulfillment, order(1), business_key="o-1").saga_id
        reserve = engine.get_state(saga_id).awaiting
        assert reserve is not None

        retried = engine.retry_now(saga_id, actor="ann", reason="broker lost it")
        [command] = retried.commands
        assert (command.command, command.attempt) == ("inventory.reserve", 2)
        assert [r["attempt"] for r in engine.store.outbox(saga_id)] == [1, 2]
        [timer] = engine.timers(saga_id)
        assert (timer.timer_id, timer.due) == (command.message_id, command.deadline)

        due = clock.now + timedelta(hours=1)
        engine.reschedule_timer(saga_id, due, actor="ann", reason="participant in maintenance")
        assert engine.timers(saga_id)[0].due == due

        before = tables(engine.store)
        with pytest.raises(ActionRefusedError, match="it is not stuck"):
            engine.resume(saga_id, actor="ann", reason="why not")
        assert tables(engine.store) == before

        aborted = engine.abort(saga_id, actor="bob", reason="customer cancelled")
        assert aborted.state.status is SagaStatus.COMPENSATING
        [release] = aborted.commands
        assert release.command == "inventory.release"  # the reservation is in doubt
        engine.handle_reply(release.reply_success(uuid.uuid4()))
        assert engine.get_state(saga_id).status is SagaStatus.FAILED
        assert engine.timers(saga_id) == []
        recorded = [
            (type(e).__name__, e.actor, e.reason)
            for e in engine.events(saga_id)
            if isinstance(e, ev.OperatorEvent)
        ]
        assert recorded == [
            ("RetryRequested", "ann", "broker lost it"),
            ("TimerRescheduled", "ann", "participant in maintenance"),
            ("SagaAborted", "bob", "customer cancelled"),
        ]
        assert sagas_left_hanging(engine.store) == []


def test_a_cancelled_deadline_is_not_a_saga_left_hanging(sqlite_url: str) -> None:
    with SagaEngine([order_fulfillment], database_url=sqlite_url) as engine:
        saga_id = engine.start(order_fulfillment, order(1), business_key="o-1").saga_id
        engine.cancel_timer(saga_id, actor="ann", reason="slow batch job, no timeout")
        assert engine.timers(saga_id) == []
        assert sagas_left_hanging(engine.store) == []  # it waits for the reply in the outbox
        engine.store._execute(  # the reply's command lost: now nothing would move it
            f"DELETE FROM {engine.store.table('saga_outbox')} WHERE saga_id = ?", [saga_id]
        )
        assert any("not in outbox" in p for p in sagas_left_hanging(engine.store))


def test_operator_commands_record_or_refuse_in_one_line(sqlite_url: str) -> None:
    with SagaEngine([order_fulfillment], database_url=sqlite_url) as engine:
        saga_id = engine.start(order_fulfillment, order(1), business_key="o-1").saga_id
        stuck_id = engine.start(order_fulfillment, order(2), business_key="o-2").saga_id
    db = ("--database-url", sqlite_url)
    sid = str(saga_id)

    listed = saga_es("timers", "list", "--saga", sid, *db)
    assert listed.returncode == 0, listed.stderr
    assert "reserve_inventory" in listed.stdout
    assert "deadline" in listed.stdout

    moved = saga_es("timers", "reschedule", sid, "--in", "5m", "--reason", "slow", *db)
    assert moved.returncode == 0, moved.stderr
    assert f"saga {sid}: timer due at" in moved.stdout

    retried = saga_es("retry", sid, "--reason", "lost", "--actor", "ann", *db)
    assert retried.returncode == 0, retried.stderr
    assert f"saga {sid}: retried; sent inventory.reserve (action attempt 2)" in retried.stdout
    assert "now pending at 'reserve_inventory'" in retried.stdout

    aborted = saga_es("abort", sid, "--reason", "customer cancelled", *db)
    assert aborted.returncode == 0, aborted.stderr
    assert "sent inventory.release (compensation attempt 1)" in aborted.stdout

    again = saga_es("abort", sid, "--reason", "twice", *db)
    assert again.returncode == 2
    assert again.stderr.strip().startswith(f"error: saga {sid} (compensating): cannot abort:")
    assert "it is compensating already" in again.stderr

    cancelled = saga_es("timers", "cancel", str(stuck_id), "--reason", "hold", *db)
    assert cancelled.returncode == 0, cancelled.stderr
    marked = saga_es("mark-compensated", sid, "reserve_inventory", "--reason", "r", *db)
    assert marked.returncode == 0, marked.stderr
    assert "marked compensated" in marked.stdout
    assert "now failed" in marked.stdout

    for bad, says in [
        (("resume", sid, "--reason", "r", *db), "it has finished"),
        (("retry", "not-a-saga", "--reason", "r", *db), "is not a saga id"),
        (("retry", str(uuid.uuid4()), "--reason", "r", *db), "operator action for unknown saga"),
        (("timers", "reschedule", sid, "--at", "2030-01-01T10:00", "--reason", "r", *db),
         "has no time zone"),
    ]:  # fmt: skip
        result = saga_es(*bad)
        assert result.returncode == 2, (bad, result.stdout, result.stderr)
        assert says in result.stderr, (bad, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout

    with SagaEngine([order_fulfillment], database_url=sqlite_url) as engine:
        actors = [
            (type(e).__name__, e.actor) for e in engine.events(saga_id) if hasattr(e, "actor")
        ]
        assert [a for _, a in actors][1] == "ann"
        assert [n for n, _ in actors] == [
            "TimerRescheduled",
            "RetryRequested",
            "SagaAborted",
            "StepMarkedCompensated",
        ]
        assert sagas_left_hanging(engine.store) == []
