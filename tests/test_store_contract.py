"""The storage contract, run once per backend (SQLite and PostgreSQL).

Everything here goes through the engine and reads back what the store committed: the saga's
events, one outbox row per command decided, the saga's single timer row and the inbox of
handled replies. Inputs that are rejected must leave every table exactly as it was.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from conftest import order, tables

from saga_es import events as ev
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import Outcome, SagaEngine
from saga_es.errors import (
    InvalidSagaDataError,
    MalformedReplyError,
    StartConflictError,
    UnknownCommandError,
    UnknownDefinitionError,
    UnknownSagaError,
)
from saga_es.ids import command_id, event_id, idempotency_key, retry_timer_id, saga_id_for
from saga_es.messages import CommandMessage
from saga_es.persistence.store import SagaStore
from saga_es.state import SagaState, SagaStatus, next_timer, replay
from saga_es.testing import VirtualClock

SAGA = order_fulfillment.name
ISSUING_EVENTS = (ev.StepCommandIssued, ev.CompensationIssued)


# -- helpers ----------------------------------------------------------------------------------


def moment(value: datetime | str) -> datetime:
    """PostgreSQL returns datetimes, SQLite fixed-width ISO text: compare them as instants."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def as_command(row: dict[str, Any]) -> CommandMessage:
    """An outbox row read back as the command it stores (validates every column)."""
    return CommandMessage.model_validate({k: row[k] for k in CommandMessage.model_fields})


def awaited_row(engine: SagaEngine, saga_id: UUID) -> dict[str, Any]:
    """What a participant sees: the outbox row of the command the saga waits for."""
    awaiting = engine.get_state(saga_id).awaiting
    assert awaiting is not None, f"saga {saga_id} awaits nothing"
    rows = [r for r in engine.store.outbox(saga_id) if r["message_id"] == awaiting.command_id]
    assert len(rows) == 1, rows
    return rows[0]


def reply(row: dict[str, Any], outcome: str = "success", **fields: Any) -> dict[str, Any]:
    """A participant's reply to an outbox row, as a plain dict (the wire format)."""
    return {
        "message_id": str(uuid.uuid4()),
        "saga_id": str(row["saga_id"]),
        "command_id": str(row["message_id"]),
        "outcome": outcome,
        **fields,
    }


def assert_timer_follows(store: SagaStore, state: SagaState) -> None:
    """The saga's timer row is exactly its next wake-up, or absent when it has none."""
    rows = store.timers(state.saga_id)
    timer = next_timer(state)
    if timer is None:
        assert rows == []
        return
    assert len(rows) == 1
    (row,) = rows
    assert (row["timer_id"], row["kind"], row["phase"], row["step"], row["attempt"]) == (
        timer.timer_id,
        timer.kind,
        timer.phase,
        timer.step,
        timer.attempt,
    )
    assert moment(row["due_at"]) == timer.due


def assert_outbox_is(store: SagaStore, saga_id: UUID, decisions: list[Outcome]) -> None:
    """Outbox rows == the commands decided, in decision order, positions within a decision."""
    decided = [(c, i) for o in decisions for i, c in enumerate(o.commands)]
    rows = sorted(store.outbox(saga_id), key=lambda r: r["seq"])
    assert [as_command(r) for r in rows] == [c for c, _ in decided]
    assert [r["position"] for r in rows] == [i for _, i in decided]
    versions = [r["saga_version"] for r in rows]
    assert versions == sorted(set(versions)), f"saga_version not strictly increasing: {versions}"
    for row in rows:
        assert row["published_at"] is None
        assert row["publish_attempts"] == 0
        assert row["last_error"] is None
    # And each row is the command of the event that issued it, at that event's version.
    issued = [
        (e.command_id, e.originator_version, e.command)
        for e in store.events(saga_id)
        if isinstance(e, ISSUING_EVENTS)
    ]
    assert [(r["message_id"], r["saga_version"], r["command"]) for r in rows] == issued


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def engine(database_url: str, clock: VirtualClock) -> Iterator[SagaEngine]:
    with SagaEngine([order_fulfillment], database_url=database_url, clock=clock) as e:
        yield e


# -- start ------------------------------------------------------------------------------------


def test_start_writes_the_saga_its_first_command_and_its_timer(
    engine: SagaEngine, clock: VirtualClock
) -> None:
    started_at = clock()
    outcome = engine.start(SAGA, order(1), business_key="o-1", correlation_id="corr-1")

    saga_id = saga_id_for(SAGA, "o-1")
    assert outcome.created
    assert outcome.saga_id == saga_id
    events = engine.events(saga_id)
    assert [type(e) for e in events] == [ev.SagaStarted, ev.StepCommandIssued]

    (row,) = engine.store.outbox()
    assert isinstance(row["seq"], int)
    expected = {
        "message_id": command_id(saga_id, "action", "reserve_inventory", 1),
        "saga_id": saga_id,
        "saga_version": 2,
        "position": 0,
        "definition": "order-fulfillment",
        "definition_version": 1,
        "step": "reserve_inventory",
        "phase": "action",
        "attempt": 1,
        "command": "inventory.reserve",
        "idempotency_key": idempotency_key(saga_id, "action", "reserve_inventory"),
        "payload": {"data": order(1), "results": {}},
        "correlation_id": "corr-1",
        "causation_id": event_id(saga_id, 1),
        "queue": "inventory",
        "deadline": started_at + timedelta(seconds=30),
        "created_at": started_at,
        "published_at": None,
        "publish_attempts": 0,
        "last_error": None,
    }
    got = {k: row[k] for k in expected}
    got["deadline"], got["created_at"] = moment(row["deadline"]), moment(row["created_at"])
    assert got == expected
    assert as_command(row) == outcome.commands[0]

    assert engine.store.timers() == engine.store.timers(saga_id)
    (timer,) = engine.store.timers()
    assert {k: timer[k] for k in ("saga_id", "timer_id", "kind", "phase", "step", "attempt")} == {
        "saga_id": saga_id,
        "timer_id": expected["message_id"],
        "kind": "deadline",
        "phase": "action",
        "step": "reserve_inventory",
        "attempt": 1,
    }
    assert moment(timer["due_at"]) == expected["deadline"]
    assert engine.store.count("saga_inbox") == 0


def test_starting_again_with_the_same_data_returns_the_existing_saga(
    engine: SagaEngine, clock: VirtualClock
) -> None:
    first = engine.start(SAGA, order(1), business_key="o-1")
    before = tables(engine.store)
    clock.advance(timedelta(minutes=1))

    again = engine.start(SAGA, order(1), business_key="o-1", correlation_id="another")

    assert not again.created
    assert again.saga_id == first.saga_id
    assert again.state == first.state
    assert again.events == ()
    assert again.commands == ()
    assert tables(engine.store) == before


def test_starting_again_with_other_data_is_a_conflict_and_changes_nothing(
    engine: SagaEngine,
) -> None:
    first = engine.start(SAGA, order(1), business_key="o-1")
    before = tables(engine.store)

    with pytest.raises(StartConflictError, match="field: data") as caught:
        engine.start(SAGA, {**order(1), "amount": "26.00"}, business_key="o-1")

    assert caught.value.context["saga_id"] == first.saga_id
    assert tables(engine.store) == before
    assert engine.get_state(first.saga_id).data == order(1)


@pytest.mark.parametrize(
    ("field", "data"),
    [
        ("amount", {**order(1), "amount": "-1.00"}),
        ("currency", {**order(1), "currency": "euro"}),
        ("customer_id", {k: v for k, v in order(1).items() if k != "customer_id"}),
        ("lines.0.quantity", {**order(1), "lines": [{"sku": "SKU-1", "quantity": 0}]}),
    ],
)
def test_invalid_start_data_is_rejected_naming_the_field(
    engine: SagaEngine, field: str, data: dict[str, Any]
) -> None:
    with pytest.raises(InvalidSagaDataError) as caught:
        engine.start(SAGA, data, business_key="o-1")

    assert f"field '{field}'" in str(caught.value)
    assert any(p.startswith(f"field '{field}'") for p in caught.value.problems)
    assert tables(engine.store) == {"events": 0, "outbox": [], "inbox": 0, "timers": []}
    with pytest.raises(UnknownSagaError):
        engine.get_state(saga_id_for(SAGA, "o-1"))


# -- replies ----------------------------------------------------------------------------------


def test_happy_path_outbox_holds_every_command_decided_and_the_timer_follows(
    engine: SagaEngine, clock: VirtualClock
) -> None:
    decisions = [engine.start(SAGA, order(1), business_key="o-1")]
    saga_id = decisions[0].saga_id
    assert_timer_follows(engine.store, decisions[0].state)
    replies = []
    for result in ({"reservation_id": "r-1"}, {"charge_id": "ch-1"}, {"shipment": "s-1"}, {}):
        clock.advance(timedelta(seconds=5))
        message = reply(awaited_row(engine, saga_id), result=result)
        replies.append(message)
        decisions.append(engine.handle_reply(message))
        assert_timer_follows(engine.store, decisions[-1].state)
        assert decisions[-1].state == engine.get_state(saga_id)

    state = engine.get_state(saga_id)
    assert state.status is SagaStatus.COMPLETED
    assert [c.command for o in decisions for c in o.commands] == [
        "inventory.reserve",
        "payment.charge",
        "shipping.create",
        "notification.send",
    ]
    assert_outbox_is(engine.store, saga_id, decisions)
    assert engine.store.timers() == []
    assert engine.store.count("saga_inbox") == len(replies)
    assert all(engine.store.has_reply(UUID(m["message_id"])) for m in replies)
    # Later commands carry earlier results in their payload, as stored JSON.
    (confirm,) = [r for r in engine.store.outbox(saga_id) if r["command"] == "notification.send"]
    assert confirm["payload"]["results"] == {
        "reserve_inventory": {"reservation_id": "r-1"},
        "charge_payment": {"charge_id": "ch-1"},
        "create_shipment": {"shipment": "s-1"},
    }


def test_compensation_path_outbox_holds_the_compensation_and_the_timer_follows(
    engine: SagaEngine,
) -> None:
    decisions = [engine.start(SAGA, order(1), business_key="o-1")]
    saga_id = decisions[0].saga_id
    decisions.append(
        engine.handle_reply(reply(awaited_row(engine, saga_id), result={"reservation_id": "r-1"}))
    )
    decisions.append(
        engine.handle_reply(
            reply(awaited_row(engine, saga_id), "failure", error_code="card_declined")
        )
    )
    compensating = decisions[-1].state
    assert compensating.status is SagaStatus.COMPENSATING
    assert_timer_follows(engine.store, compensating)
    (timer,) = engine.store.timers(saga_id)
    assert (timer["phase"], timer["step"]) == ("compensation", "reserve_inventory")

    release = awaited_row(engine, saga_id)
    assert release["command"] == "inventory.release"
    assert release["payload"]["action_result"] == {"reservation_id": "r-1"}
    decisions.append(engine.handle_reply(reply(release, result={})))

    state = engine.get_state(saga_id)
    assert state.status is SagaStatus.FAILED
    assert state.compensated == ("reserve_inventory",)
    assert [c.command for o in decisions for c in o.commands] == [
        "inventory.reserve",
        "payment.charge",
        "inventory.release",
    ]
    assert_outbox_is(engine.store, saga_id, decisions)
    assert engine.store.timers() == []
    assert engine.store.count("saga_inbox") == 3


@pytest.mark.parametrize("when", ["pending", "finished"])
def test_a_redelivered_reply_is_a_duplicate_and_writes_nothing(
    engine: SagaEngine, when: str
) -> None:
    saga_id = engine.start(SAGA, order(1), business_key="o-1").saga_id
    row = awaited_row(engine, saga_id)
    message = (
        reply(row, result={"reservation_id": "r-1"})
        if when == "pending"
        else reply(row, "failure", error_code="out_of_stock")  # not retryable: saga fails
    )
    handled = engine.handle_reply(message)
    assert handled.events
    assert not handled.duplicate
    assert handled.state.is_terminal is (when == "finished")
    before = tables(engine.store)

    again = engine.handle_reply(message)

    assert again.duplicate
    assert again.events == ()
    assert again.commands == ()
    assert again.state == engine.get_state(saga_id) == handled.state
    assert tables(engine.store) == before


def test_a_reply_for_an_unknown_saga_is_rejected(engine: SagaEngine) -> None:
    saga_id = engine.start(SAGA, order(1), business_key="o-1").saga_id
    stranger = {**reply(awaited_row(engine, saga_id)), "saga_id": str(uuid.uuid4())}
    before = tables(engine.store)

    with pytest.raises(UnknownSagaError) as caught:
        engine.handle_reply(stranger)

    assert str(caught.value.saga_id) == stranger["saga_id"]
    assert tables(engine.store) == before
    assert not engine.store.has_reply(UUID(stranger["message_id"]))


@pytest.mark.parametrize(
    ("field", "spoil"),
    [
        ("command_id", lambda m: {k: v for k, v in m.items() if k != "command_id"}),
        ("message_id", lambda m: {k: v for k, v in m.items() if k != "message_id"}),
        ("error_code", lambda m: {**m, "outcome": "failure"}),
        ("saga_id", lambda m: {**m, "saga_id": "not-a-uuid"}),
        ("command_id", lambda m: {**m, "command_id": "1234"}),
        ("outcome", lambda m: {**m, "outcome": "maybe"}),
    ],
)
def test_a_malformed_reply_is_rejected_naming_the_field(
    engine: SagaEngine, field: str, spoil: Any
) -> None:
    saga_id = engine.start(SAGA, order(1), business_key="o-1").saga_id
    message = spoil(reply(awaited_row(engine, saga_id)))
    before = tables(engine.store)

    with pytest.raises(MalformedReplyError) as caught:
        engine.handle_reply(message)

    assert field in str(caught.value)
    assert tables(engine.store) == before
    assert engine.get_state(saga_id).awaiting is not None


def test_a_reply_for_a_command_never_issued_is_rejected(engine: SagaEngine) -> None:
    saga_id = engine.start(SAGA, order(1), business_key="o-1").saga_id
    message = {**reply(awaited_row(engine, saga_id)), "command_id": str(uuid.uuid4())}
    before = tables(engine.store)

    with pytest.raises(UnknownCommandError, match="command_id") as caught:
        engine.handle_reply(message)

    assert str(caught.value.context["command_id"]) == message["command_id"]
    assert tables(engine.store) == before
    assert not engine.store.has_reply(UUID(message["message_id"]))


def test_an_engine_without_the_sagas_definition_version_refuses_to_decide(
    engine: SagaEngine, database_url: str
) -> None:
    saga_id = engine.start(SAGA, order(1), business_key="o-1").saga_id
    message = reply(awaited_row(engine, saga_id))
    timer = engine.store.timers(saga_id)[0]
    before = tables(engine.store)
    version_2_only = dataclasses.replace(order_fulfillment, version=2)

    with SagaEngine([version_2_only], database_url=database_url) as other:
        with pytest.raises(UnknownDefinitionError, match="'order-fulfillment' version 1"):
            other.handle_reply(message)
        with pytest.raises(UnknownDefinitionError):
            other.handle_timer(saga_id, timer["timer_id"])

    assert tables(engine.store) == before
    assert not engine.store.has_reply(UUID(message["message_id"]))


# -- history ----------------------------------------------------------------------------------


def test_time_travel_equals_replaying_the_first_events(engine: SagaEngine) -> None:
    saga_id = engine.start(SAGA, order(1), business_key="o-1").saga_id
    first = reply(awaited_row(engine, saga_id), result={"reservation_id": "r-1"})
    engine.handle_reply(first)
    engine.handle_reply(reply(awaited_row(engine, saga_id), "failure", error_code="card_declined"))
    engine.handle_reply({**first, "message_id": str(uuid.uuid4())})  # recorded as ignored
    engine.handle_reply(reply(awaited_row(engine, saga_id)))

    events = engine.events(saga_id)
    assert [type(e).__name__ for e in events] == [
        "SagaStarted",
        "StepCommandIssued",
        "StepSucceeded",
        "StepCommandIssued",
        "StepFailed",
        "CompensationStarted",
        "CompensationIssued",
        "ReplyIgnored",
        "CompensationSucceeded",
        "SagaCompensated",
    ]
    assert [e.originator_version for e in events] == list(range(1, len(events) + 1))
    assert all(e.originator_id == saga_id for e in events)

    for n in range(1, len(events) + 1):
        past = engine.get_state(saga_id, version=n)
        assert past == replay(events[:n]), f"state at version {n}"
        assert past.version == n
        aggregate = engine.store.load(saga_id, version=n)  # eventsourcing's own replay
        assert aggregate is not None
        assert (aggregate.version, aggregate.state) == (n, past)
    assert engine.get_state(saga_id, version=5).status is SagaStatus.PENDING
    assert engine.get_state(saga_id, version=7).status is SagaStatus.COMPENSATING
    assert engine.get_state(saga_id) == replay(events)
    assert engine.get_state(saga_id).status is SagaStatus.FAILED


def test_events_of_an_unknown_saga_is_an_error(engine: SagaEngine) -> None:
    with pytest.raises(UnknownSagaError):
        engine.events(uuid.uuid4())


# -- timers -----------------------------------------------------------------------------------


def test_a_due_deadline_times_out_then_retries_and_firing_twice_changes_nothing(
    engine: SagaEngine, clock: VirtualClock
) -> None:
    started = engine.start(SAGA, order(1), business_key="o-1")
    saga_id = started.saga_id
    (deadline,) = engine.store.timers(saga_id)
    first_command = started.commands[0]
    assert deadline["timer_id"] == first_command.message_id

    # The reply deadline passes: the attempt times out and a retry is scheduled.
    clock.set(moment(deadline["due_at"]))
    timed_out = engine.handle_timer(saga_id, deadline["timer_id"])
    assert [type(e) for e in timed_out.events] == [ev.StepTimedOut, ev.RetryScheduled]
    assert timed_out.commands == ()
    assert_timer_follows(engine.store, timed_out.state)
    (retry,) = engine.store.timers(saga_id)
    assert retry["kind"] == "retry"
    assert retry["attempt"] == 2
    assert retry["timer_id"] == retry_timer_id(saga_id, "action", "reserve_inventory", 2)
    assert moment(retry["due_at"]) == timed_out.events[1].due > clock()
    assert len(engine.store.outbox(saga_id)) == 1

    # The same deadline firing again (timers are at-least-once) changes nothing.
    before = tables(engine.store)
    again = engine.handle_timer(saga_id, deadline["timer_id"])
    assert again.events == ()
    assert again.commands == ()
    assert tables(engine.store) == before

    # The retry comes due: attempt 2 goes out, with the same idempotency key.
    clock.set(moment(retry["due_at"]))
    retried = engine.handle_timer(saga_id, retry["timer_id"])
    assert [type(e) for e in retried.events] == [ev.StepCommandIssued]
    (second_command,) = retried.commands
    assert second_command.attempt == 2
    assert second_command.message_id == command_id(saga_id, "action", "reserve_inventory", 2)
    assert second_command.idempotency_key == first_command.idempotency_key
    assert_outbox_is(engine.store, saga_id, [started, retried])
    assert_timer_follows(engine.store, retried.state)
    assert moment(engine.store.timers(saga_id)[0]["due_at"]) == clock() + timedelta(seconds=30)

    before = tables(engine.store)
    for stale in (retry["timer_id"], deadline["timer_id"]):
        assert engine.handle_timer(saga_id, stale).events == ()
    assert tables(engine.store) == before


def test_a_timer_for_an_unknown_saga_is_an_error(engine: SagaEngine) -> None:
    with pytest.raises(UnknownSagaError):
        engine.handle_timer(uuid.uuid4(), uuid.uuid4())


def test_a_reply_handled_by_another_engine_is_a_duplicate_for_a_stale_one(
    database_url: str, clock: VirtualClock
) -> None:
    """The stale engine's decision fails on the inbox key, the first statement of its
    transaction: that must surface as a duplicate at once, never as a store error."""
    with (
        SagaEngine([order_fulfillment], database_url=database_url, clock=clock) as first,
        SagaEngine([order_fulfillment], database_url=database_url, clock=clock) as stale,
    ):
        for n in range(20):
            saga_id = first.start(SAGA, order(n), business_key=f"o-{n}").saga_id
            message = reply(awaited_row(first, saga_id), result={"n": n})
            stale.get_state(saga_id)  # caches the state the reply is about to make stale
            assert not first.handle_reply(message).duplicate

            again = stale.handle_reply(message)

            assert again.duplicate
            assert again.state == first.get_state(saga_id)
