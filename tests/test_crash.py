"""Crashes in the production topology (docker-compose.yml as local processes): a relay, a
participant worker, the engine worker and a timer process are killed with SIGKILL at their worst
moments, and the broker is stopped and started, while order sagas run.

Each test ends as a calm run does (``Topology.assert_at_rest``): every saga terminal, each
participant effect exactly once, no outbox row left unpublished, no saga left hanging.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

from conftest import _rabbitmqctl
from processes import wait_until
from topology import COMPLETED, HAPPY_EVENTS, ROOT, Topology, kinds, participant_services

from examples.order_fulfillment.faults import Switch
from examples.order_fulfillment.models import Charge
from saga_es.state import SagaStatus
from saga_es.testing import VirtualClock


def assert_completed_once(topology: Topology, sagas: dict[str, UUID], timeout: float = 90) -> None:
    states = topology.settle(sagas.values(), timeout=timeout)
    assert {s.status for s in states.values()} == {SagaStatus.COMPLETED}
    topology.assert_at_rest(dict.fromkeys(sagas.values(), COMPLETED))
    for saga_id in sagas.values():  # redelivered replies were absorbed by the engine's inbox
        assert kinds(topology, saga_id) == HAPPY_EVENTS


def test_a_relay_killed_between_publish_and_mark_is_restarted_and_nothing_is_lost(
    topology: Topology, tmp_path: Path
) -> None:
    topology.up(without=["relay"])
    sagas = topology.start_orders(f"relay-{n}" for n in range(20))
    # One replica runs the relay with the tests' hook (tests/relay_process.py): it sends
    # itself SIGKILL once the broker confirmed its third batch, before marking it published.
    record = tmp_path / "batches.jsonl"
    doomed = topology.processes.start(
        "relay-doomed",
        [sys.executable, str(ROOT / "tests" / "relay_process.py"),
         "--database-url", topology.database_url, "--broker-url", topology.broker_url,
         "--batch-size", "5", "--record", str(record), "--kill-after-batches", "3"],
        **topology["relay"].env,
    )  # fmt: skip
    assert doomed.wait() == -9, doomed.output()
    in_flight = json.loads(record.read_text().splitlines()[2])
    assert len(in_flight) == 5
    unmarked = topology.sql(
        "SELECT message_id::text FROM {schema}.saga_outbox "
        "WHERE published_at IS NULL AND message_id = ANY(%s::uuid[])",
        [in_flight],
    )
    assert sorted(m for (m,) in unmarked) == sorted(in_flight), "confirmed, not marked"

    topology.start("relay")  # both compose replicas
    assert_completed_once(topology, sagas)

    # The killed batch reached the participants twice; the second time they replayed the
    # outcome they had stored, and the engine's inbox absorbed the repeated replies.
    received = topology.received(*participant_services(topology))
    assert all(received[m] == 2 for m in in_flight), {m: received[m] for m in in_flight}
    participant_logs = "".join(topology[s].output() for s in participant_services(topology))
    for message_id in in_flight:
        assert f"(message {message_id}): decided already" in participant_logs
    duplicates = {m: n for m, n in received.items() if n > 1}
    print(f"relay crash: {len(duplicates)} commands delivered twice: {sorted(duplicates)}")


def test_a_participant_killed_after_its_commit_before_its_reply_replies_on_redelivery(
    topology: Topology,
) -> None:
    topology.up()
    topology.shop.set_fault(Switch("payment.charge", "hold_reply", "o-held-*"))
    held = topology.start_orders(["held-1", "held-2"])
    others = topology.start_orders(f"other-{n}" for n in range(8))
    wait_until(
        lambda: (
            topology.shop.count(Charge, order_id="o-held-1")
            + topology.shop.count(Charge, order_id="o-held-2")
            == 2
        ),
        timeout=60,
        what="both held charges to commit (their replies held back)",
    )

    topology["payment"].kill9()
    topology.shop.clear_faults()
    topology["payment"].restart()

    assert_completed_once(topology, {**held, **others})
    payment_log = topology["payment"].output()
    for key, saga_id in held.items():
        [charge] = topology.shop.rows(Charge, saga_id=saga_id)
        state = topology.engine.get_state(saga_id)
        assert state.results["charge_payment"]["charge_id"] == str(charge.charge_id), key
        replayed = [line for line in payment_log.splitlines()
                    if str(saga_id) in line and "decided already (success" in line]  # fmt: skip
        assert len(replayed) == 1, replayed


def test_the_engine_worker_killed_again_and_again_loses_and_repeats_nothing(
    topology: Topology,
) -> None:
    topology.up()
    sagas = topology.start_orders(f"engine-{n}" for n in range(30))
    engine_worker = topology["engine-worker"]
    for threshold in (15, 45, 75):  # of the 120 replies the 30 sagas get
        wait_until(
            lambda: topology.replies_handled() >= threshold,  # noqa: B023 (called right here)
            timeout=60,
            what=f"{threshold} replies to be handled",
        )
        engine_worker.kill9()
        engine_worker.restart()
    assert engine_worker.process.starts == 4

    assert_completed_once(topology, sagas)
    assert topology.replies_handled() == 4 * len(sagas)


def test_a_broker_restart_during_a_run_needs_no_manual_action(topology: Topology) -> None:
    topology.up()
    before = topology.start_orders(f"before-{n}" for n in range(10))
    wait_until(lambda: topology.replies_handled() >= 10, timeout=60, what="replies to flow")
    _rabbitmqctl("stop_app")
    try:
        during = topology.start_orders(f"during-{n}" for n in range(10))
        # Celery workers (the participants) say it their way; the relay and the engine worker
        # theirs. The timers and projections services use only the database.
        brokered = {
            name: "Connection to broker lost" if service.spec.celery else "broker unavailable"
            for name, service in topology.services.items()
            if service.spec.celery or name in ("relay", "engine-worker")
        }
        wait_until(
            lambda: all(line in topology[name].output() for name, line in brokered.items()),
            timeout=60,
            what="the relay, the engine worker and every participant to meet the outage",
        )
    finally:
        _rabbitmqctl("start_app")

    assert_completed_once(topology, {**before, **during}, timeout=180)
    stopped = [name for name, service in topology.services.items() if not service.running()]
    assert not stopped, f"{stopped} exited: nothing may need restarting by hand"
    assert all(p.starts == 1 for p in topology.processes.all)


def test_the_timer_process_killed_holding_due_timers_fires_each_once_after_restart(
    topology: Topology, tmp_path: Path
) -> None:
    # Relays held back, so that only timers move the sagas until the test lets them go.
    topology.up(without=["relay", "timers"])
    an_hour_ago = VirtualClock(datetime.now(UTC) - timedelta(hours=1))
    sagas = topology.start_orders([f"late-{n}" for n in range(20)], clock=an_hour_ago)
    # Every first deadline is long due. This process fires two batches of 5, claims a third
    # and dies by SIGKILL before firing it (tests/timer_crash_process.py).
    record = tmp_path / "claimed.json"
    doomed = topology.processes.start(
        "timers-doomed",
        [sys.executable, str(ROOT / "tests" / "timer_crash_process.py"),
         "--database-url", topology.database_url, "--batch-size", "5", "--lease", "3",
         "--kill-after-claims", "3", "--record", str(record)],
        **topology["timers"].env,
    )  # fmt: skip
    assert doomed.wait() == -9, doomed.output()
    held = {UUID(s) for s in json.loads(record.read_text())}
    assert len(held) == 5
    fired = {s for s in sagas.values() if kinds(topology, s).count("StepTimedOut")}
    assert len(fired) == 10
    assert not held & fired
    pending = {t.saga_id: t.due for t in topology.engine.timers()}
    assert set(pending) == set(sagas.values())  # fired or not, every saga still has a timer
    assert all(pending[s] > datetime.now(UTC) - timedelta(seconds=1) for s in held)  # leased

    topology.start("timers")  # compose's two replicas
    wait_until(
        lambda: topology.timed_out_and_retried(sagas.values()),
        timeout=60,
        what="every deadline, the held ones after their lease, and every retry to fire",
    )
    for saga_id in sagas.values():
        assert kinds(topology, saga_id) == [
            "SagaStarted", "StepCommandIssued", "StepTimedOut", "RetryScheduled",
            "StepCommandIssued"]  # fmt: skip

    topology.start("relay")
    states = topology.settle(sagas.values())
    assert {s.status for s in states.values()} == {SagaStatus.COMPLETED}
    topology.assert_at_rest(dict.fromkeys(sagas.values(), COMPLETED))
    for saga_id in sagas.values():
        assert kinds(topology, saga_id).count("StepTimedOut") == 1
