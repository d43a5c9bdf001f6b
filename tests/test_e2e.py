"""Order sagas through the production topology (docker-compose.yml, run as local processes):
the engine worker, two relays, two timer processes and the four participant workers, on
PostgreSQL and RabbitMQ.

Each test ends with every saga terminal, every effect in the services' tables exactly as often
as the saga's outcome says (once, or never), the whole outbox published and marked, no saga
left hanging and nothing dead-lettered but what the test sent on purpose
(``Topology.assert_at_rest``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from broker import publish_raw
from processes import wait_until
from quick_order import CHARGE_TIMEOUT, quick_order
from quick_order import SPEC as QUICK_SPEC
from sqlalchemy import delete
from topology import (
    COMPLETED,
    FAILED_AT_CHARGE,
    FAILED_AT_RESERVE,
    FAILED_AT_SHIPPING,
    HAPPY_EVENTS,
    Topology,
    kinds,
    participant_services,
)

from examples.order_fulfillment.faults import FAULTS_ENV, FaultRow, Switch
from examples.order_fulfillment.models import Charge, Reservation
from saga_es import events as ev
from saga_es.messaging import REPLY_QUEUE, REPLY_TASK
from saga_es.participant import TRANSIENT_EXHAUSTED
from saga_es.state import SagaStatus
from saga_es.testing import VirtualClock
from saga_es.worker import DEFINITIONS_ENV

# Fewer and shorter participant retries than the services' defaults (5, from 1 s doubling):
# the same code path, in a fraction of the time.
FAST_RETRIES = {"SAGA_ES_EXAMPLES_MAX_RETRIES": "2", "SAGA_ES_EXAMPLES_BACKOFF": "0.05"}
#: How long a hanging payment service sleeps in each charge.
HANG_SECONDS = 8


def inbox_rows(topology: Topology) -> dict[UUID, list[tuple[str, str, str, Any]]]:
    """Each saga's participant inbox rows (step, phase, outcome, result), in the order the
    participants decided them."""
    rows = topology.shop_sql(
        "SELECT saga_id, step, phase, outcome, result FROM {schema}.participant_inbox "
        "ORDER BY recorded_at"
    )
    found: dict[UUID, list[tuple[str, str, str, Any]]] = defaultdict(list)
    for saga_id, step, phase, outcome, result in rows:
        found[saga_id].append((step, phase, outcome, result))
    return found


def test_orders_complete_through_the_whole_topology(topology: Topology) -> None:
    topology.up()
    sagas = topology.start_orders(f"ok-{n}" for n in range(20))

    states = topology.settle(sagas.values())

    assert {s.status for s in states.values()} == {SagaStatus.COMPLETED}
    topology.assert_at_rest(dict.fromkeys(sagas.values(), COMPLETED))
    for saga_id in sagas.values():
        assert kinds(topology, saga_id) == HAPPY_EVENTS
    # Each command reached its participant once: no relay published anything twice here.
    received = topology.received(*participant_services(topology))
    assert sum(received.values()) == len(received) == 4 * len(sagas)


def test_a_failure_at_each_step_compensates_what_was_done_in_reverse(
    topology: Topology,
) -> None:
    topology.up(
        env={
            FAULTS_ENV: "inventory.reserve=fail:out_of_stock@o-reserve-*;"
            "payment.charge=fail:card_declined@o-charge-*;"
            "shipping.create=fail:no_carrier@o-ship-*"
        }
    )
    groups = {
        kind: topology.start_orders(f"{kind}-{n}" for n in range(3))
        for kind in ("ok", "reserve", "charge", "ship")
    }

    states = topology.settle(s for group in groups.values() for s in group.values())

    expected = {
        "ok": COMPLETED,
        "reserve": FAILED_AT_RESERVE,
        "charge": FAILED_AT_CHARGE,
        "ship": FAILED_AT_SHIPPING,
    }
    topology.assert_at_rest(
        {saga: expected[kind] for kind, group in groups.items() for saga in group.values()}
    )
    failed = {
        "reserve": ("reserve_inventory", "out_of_stock", ()),
        "charge": ("charge_payment", "card_declined", ("reserve_inventory",)),
        "ship": ("create_shipment", "no_carrier", ("charge_payment", "reserve_inventory")),
    }
    inbox = inbox_rows(topology)
    reservations = {r.saga_id: r for r in topology.shop.rows(Reservation)}
    charges = {c.saga_id: c for c in topology.shop.rows(Charge)}
    for kind, (step, code, undone) in failed.items():
        for saga_id in groups[kind].values():
            state = states[saga_id]
            assert state.status == SagaStatus.FAILED
            assert state.failure is not None
            assert (state.failure.step, state.failure.error_code) == (step, code)
            assert state.compensated == undone
            events = topology.engine.events(saga_id)
            issued = [e.command for e in events if isinstance(e, ev.CompensationIssued)]
            assert issued == [
                {"charge_payment": "payment.refund", "reserve_inventory": "inventory.release"}[s]
                for s in undone
            ]
            assert not any(isinstance(e, ev.RetryScheduled) for e in events)  # non-retryable
            # Each compensation was decided once, by the participant, and undid this saga's row.
            compensations = [
                (s, o, r) for s, phase, o, r in inbox[saga_id] if phase == "compensation"
            ]
            assert [s for s, _, _ in compensations] == list(undone)
            for undone_step, outcome, result in compensations:
                assert outcome == "success"
                if undone_step == "reserve_inventory":
                    assert result == {"released": [str(reservations[saga_id].reservation_id)]}
                else:
                    assert result == {"refunded": [str(charges[saga_id].charge_id)]}
    for saga_id in groups["ship"].values():  # refunded first, then released
        refunded_at, released_at = charges[saga_id].refunded_at, reservations[saga_id].released_at
        assert refunded_at is not None
        assert released_at is not None
        assert refunded_at < released_at


def test_transient_failures_are_retried_by_the_participant_then_by_the_saga(
    topology: Topology,
) -> None:
    topology.up(env=FAST_RETRIES, without=["timers"])
    # Transient switches count the tries of each command message: 1 is within the
    # participant's 2 retries; 99 outlasts them, so the saga gets a retryable failure.
    topology.shop.set_fault(Switch("payment.charge", "transient", "o-blip-*", times=1))
    topology.shop.set_fault(Switch("payment.charge", "transient", "o-retry-*", times=99))
    topology.shop.set_fault(Switch("inventory.reserve", "transient", "o-never-*", times=99))
    blip = topology.start_orders(["blip-1"])["blip-1"]
    retried = topology.start_orders(["retry-1"])["retry-1"]
    never = topology.start_orders(["never-1"])["never-1"]

    # The charge's participant retries run out; the saga schedules attempt 2. The switch is
    # cleared before the timer service fires the retry: the timers service is held back until
    # then, so attempt 2 cannot come before the switch is gone.
    wait_until(
        lambda: topology.engine.get_state(retried).retry_wait is not None,
        timeout=60,
        what="the saga to schedule a second charge attempt",
    )
    with topology.shop.sessions.begin() as session:
        session.execute(delete(FaultRow).where(FaultRow.order_pattern == "o-retry-*"))
    topology.start("timers")
    states = topology.settle([blip, retried, never])

    assert states[blip].status == SagaStatus.COMPLETED
    assert kinds(topology, blip) == HAPPY_EVENTS  # the saga never saw the blip
    payment_log = topology["payment"].output()
    blips = [line for line in payment_log.splitlines() if str(blip) in line]
    assert sum("transient failure (InjectedTransientError" in line for line in blips) == 1

    assert states[retried].status == SagaStatus.COMPLETED
    failures = [e for e in topology.engine.events(retried) if isinstance(e, ev.StepFailed)]
    assert [(e.step, e.attempt, e.error_code, e.retryable) for e in failures] == [
        ("charge_payment", 1, TRANSIENT_EXHAUSTED, True)
    ]
    charges = [
        e
        for e in topology.engine.events(retried)
        if isinstance(e, ev.StepCommandIssued) and e.step == "charge_payment"
    ]
    assert [e.attempt for e in charges] == [1, 2]

    assert states[never].status == SagaStatus.FAILED  # three attempts, then nothing to undo
    failures = [e for e in topology.engine.events(never) if isinstance(e, ev.StepFailed)]
    assert [(e.step, e.attempt, e.error_code) for e in failures] == [
        ("reserve_inventory", n, TRANSIENT_EXHAUSTED) for n in (1, 2, 3)
    ]
    topology.assert_at_rest({blip: COMPLETED, retried: COMPLETED, never: FAILED_AT_RESERVE})


def test_malformed_messages_are_dead_lettered_and_the_workers_keep_going(
    topology: Topology,
) -> None:
    topology.up()
    before = topology.start_orders(f"before-{n}" for n in range(5))
    publish_raw(
        topology.broker_url,
        "payment.charge",
        {"command": {"saga_id": "nope"}},
        "payment",
        "bad-command-1",
    )
    publish_raw(
        topology.broker_url, REPLY_TASK, {"reply": {"outcome": "maybe"}}, REPLY_QUEUE, "bad-reply-1"
    )

    wait_until(
        lambda: len(topology.shop.dead_letters()) == 1,
        timeout=30,
        what="the command to be dead-lettered",
    )
    wait_until(
        lambda: len(topology.engine.store.dead_letters()) == 1,
        timeout=30,
        what="the reply to be dead-lettered",
    )
    after = topology.start_orders(f"after-{n}" for n in range(5))
    topology.settle([*before.values(), *after.values()])

    [command] = topology.shop.dead_letters()
    assert (command.participant, command.task, command.message_id) == (
        "payment",
        "payment.charge",
        "bad-command-1",
    )
    assert "field 'saga_id': Input should be a valid UUID" in command.error
    [reply] = topology.engine.store.dead_letters()
    assert (reply["source"], reply["message_id"]) == ("engine-worker", "bad-reply-1")
    assert "field 'outcome': Input should be 'success' or 'failure'" in reply["error"]
    payment_log = topology["payment"].output()
    assert "participant 'payment': malformed command message bad-command-1" in payment_log
    assert "kept in participant_dead_letters, not handled" in payment_log
    assert (
        topology["engine-worker"].count_in_log(
            "reply message bad-reply-1 dead-lettered (kept in saga_dead_letters, not handled)"
        )
        == 1
    )
    assert topology["payment"].running()
    assert topology["engine-worker"].running()
    topology.assert_at_rest(
        dict.fromkeys([*before.values(), *after.values()], COMPLETED),
        saga_dead_letters=1,
        participant_dead_letters=1,
    )


@pytest.mark.slow  # about 2.5 minutes on 2 cores: the whole topology is CPU-bound there
@pytest.mark.timeout(600)
def test_two_relays_carry_2000_sagas_in_order(topology: Topology) -> None:
    # Without the timers service: 2000 sagas started at once queue their first commands for
    # longer than the steps' deadlines on 2 cores, and this test is about the relays' order,
    # not about timeouts (those are in the tests below). Every timer stays in its table.
    topology.up(without=["timers"], env={FAULTS_ENV: "shipping.create=fail:no_carrier@o-big-*7"})
    assert topology["relay"].spec.replicas == 2
    sagas = topology.start_orders(f"big-{n}" for n in range(2000))

    states = topology.settle(sagas.values(), timeout=280)

    failing = {s for key, s in sagas.items() if key.endswith("7")}
    assert {s for s, st in states.items() if st.status == SagaStatus.FAILED} == failing
    topology.assert_at_rest(
        {s: FAILED_AT_SHIPPING if s in failing else COMPLETED for s in sagas.values()}
    )
    # Per saga, the participants decided its commands in the saga's order.
    happy = [
        ("reserve_inventory", "action"),
        ("charge_payment", "action"),
        ("create_shipment", "action"),
        ("send_confirmation", "action"),
    ]
    compensated = [
        *happy[:3],
        ("charge_payment", "compensation"),
        ("reserve_inventory", "compensation"),
    ]
    inbox = inbox_rows(topology)
    out_of_order = {
        s: inbox[s]
        for s in sagas.values()
        if [r[:2] for r in inbox[s]] != (compensated if s in failing else happy)
    }
    assert not out_of_order, list(out_of_order.items())[:3]
    # ... and so did the effects' own clocks: reserved, charged, (shipped, notified) or
    # (refunded, released).
    rows = topology.shop_sql(
        "SELECT r.saga_id, r.reserved_at, c.charged_at, s.created_at, n.sent_at, "
        "c.refunded_at, r.released_at FROM {schema}.example_reservations r "
        "JOIN {schema}.example_charges c USING (saga_id) "
        "LEFT JOIN {schema}.example_shipments s USING (saga_id) "
        "LEFT JOIN {schema}.example_notifications n USING (saga_id)"
    )
    assert len(rows) == 2000
    for saga_id, *times in rows:
        seen = [t for t in times if t is not None]
        assert seen == sorted(seen), (saga_id, times)
    # Duplicates: commands and replies delivered more than once (the test asserts what they
    # did, exactly-once effects above, not how many there were).
    commands = topology.received(*participant_services(topology))
    replies = topology.received("engine-worker")
    twice = {m: n for m, n in commands.items() if n > 1}
    reply_twice = {m: n for m, n in replies.items() if n > 1}
    attempts = Counter(
        n for (n,) in topology.sql("SELECT publish_attempts FROM {schema}.saga_outbox")
    )
    print(
        f"2000 sagas: {sum(commands.values())} command deliveries for {len(commands)} "
        f"commands, {len(twice)} delivered more than once {sorted(twice.items())[:10]}; "
        f"{sum(replies.values())} reply deliveries for {len(replies)} replies, "
        f"{len(reply_twice)} more than once; outbox publish_attempts {dict(attempts)}"
    )
    assert set(commands) == {
        str(m) for (m,) in topology.sql("SELECT message_id FROM {schema}.saga_outbox")
    }


# -- time: reply deadlines and retries fired by the timers service --------------------------------


def test_a_hanging_participant_times_out_and_the_saga_compensates_by_itself(
    topology: Topology,
) -> None:
    # The charge hangs far longer than the quick saga waits for it (CHARGE_TIMEOUT), on both
    # attempts. Nobody fires a timer or touches a saga here: the timers service does it all.
    hang = HANG_SECONDS
    assert timedelta(seconds=hang) > 4 * CHARGE_TIMEOUT
    topology.up(
        env={
            FAULTS_ENV: f"payment.charge=hang:{hang}@o-hang-*",
            DEFINITIONS_ENV: QUICK_SPEC,
            "PYTHONPATH": str(Path(__file__).parent),
        }
    )
    hung = topology.start_orders(["hang-1"], definition=quick_order)["hang-1"]
    fine = topology.start_orders([f"fine-{n}" for n in range(3)])

    states = topology.settle([hung, *fine.values()], timeout=120)

    assert {states[s].status for s in fine.values()} == {SagaStatus.COMPLETED}
    state = states[hung]
    assert state.status == SagaStatus.FAILED
    assert state.failure is not None
    assert (state.failure.step, state.failure.error_code) == ("charge_payment", "timeout")
    # Both charge attempts timed out; the charge was in doubt, so it was refunded too.
    assert state.compensated == ("charge_payment", "reserve_inventory")
    events = topology.engine.events(hung)
    assert [(e.step, e.attempt) for e in events if isinstance(e, ev.StepTimedOut)] == [
        ("charge_payment", 1),
        ("charge_payment", 2),
    ]
    started = [e for e in events if isinstance(e, ev.CompensationStarted)]
    assert [e.plan for e in started] == [["charge_payment", "reserve_inventory"]]
    # The charges did commit, after the deadlines: their replies were late, and ignored.
    ignored = [
        (e.step, e.attempt, e.reason, e.outcome) for e in events if isinstance(e, ev.ReplyIgnored)
    ]
    assert sorted(ignored) == [
        ("charge_payment", 1, "late", "success"),
        ("charge_payment", 2, "late", "success"),
    ]
    # ... and the late charge is refunded: nothing is left applied.
    topology.assert_at_rest({hung: FAILED_AT_SHIPPING, **dict.fromkeys(fine.values(), COMPLETED)})
    assert topology["timers"].count_in_log("fired: StepTimedOut") >= 2


def test_two_timer_services_fire_each_due_timer_once(topology: Topology) -> None:
    # Relays held back: the sagas' commands stay in the outbox, so nothing but the timers
    # moves them until every deadline and retry has fired. Small batches: both replicas claim.
    topology.up(without=["relay"], env={"SAGA_ES_TIMERS_BATCH_SIZE": "2"})
    assert topology["timers"].spec.replicas == 2
    an_hour_ago = VirtualClock(datetime.now(UTC) - timedelta(hours=1))
    sagas = topology.start_orders([f"due-{n}" for n in range(30)], clock=an_hour_ago)

    wait_until(
        lambda: topology.timed_out_and_retried(sagas.values()),
        timeout=60,
        what="every saga's deadline and then its retry to fire",
    )
    for saga_id in sagas.values():
        events = topology.engine.events(saga_id)
        assert [type(e).__name__ for e in events] == [
            "SagaStarted",
            "StepCommandIssued",
            "StepTimedOut",
            "RetryScheduled",
            "StepCommandIssued",
        ]
    fired = [replica.output().count(" fired: ") for replica in topology["timers"].replicas]
    print(f"timers fired per replica: {fired}")
    assert sum(fired) == 2 * len(sagas)  # no timer fired twice to any effect

    topology.start("relay")
    states = topology.settle(sagas.values())
    assert {s.status for s in states.values()} == {SagaStatus.COMPLETED}
    for saga_id in sagas.values():  # attempt 1 was answered too, after its timeout: ignored
        ignored = [e for e in topology.engine.events(saga_id) if isinstance(e, ev.ReplyIgnored)]
        assert [(e.attempt, e.reason) for e in ignored] == [(1, "late")]
    topology.assert_at_rest(dict.fromkeys(sagas.values(), COMPLETED))
