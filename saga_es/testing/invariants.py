"""Checks that hold for every saga at rest, for the end of end-to-end and crash tests.

A saga that is not terminal must be waiting for something that will happen by itself: a reply
to a command that is in the outbox, with a deadline (unless an operator cancelled it), or a
retry. Otherwise nothing will ever move it again, and it hangs unseen.
"""

from __future__ import annotations

from saga_es.persistence.store import SagaStore
from saga_es.state import next_timer

__all__ = ["sagas_left_hanging"]


def sagas_left_hanging(store: SagaStore) -> list[str]:
    """One line per violation; empty when every saga is terminal or has something pending."""
    timers = {row["saga_id"]: row for row in store.timers()}
    outbox = {row["message_id"] for row in store.outbox()}
    problems = []
    for saga_id in store.saga_ids():
        state = store.load_state(saga_id)
        if state is None or state.is_terminal:
            if state is not None and saga_id in timers:
                problems.append(f"saga {saga_id} is {state.status.value} but has a timer")
            continue
        where = f"saga {saga_id} ({state.status.value}, step {state.current_step})"
        timer, expected = timers.get(saga_id), next_timer(state)
        if expected is None:
            # Only an awaited reply whose deadline an operator cancelled has no timer.
            if state.awaiting is None:
                problems.append(f"{where}: waits for no reply and no timer")
            elif timer is not None:
                problems.append(f"{where}: has a timer, but its deadline was cancelled")
        elif timer is None:
            problems.append(f"{where}: no timer, so nothing will ever wake it")
        elif timer["timer_id"] != expected.timer_id:
            problems.append(f"{where}: its timer is not its {expected.kind} timer")
        if state.awaiting and state.awaiting.command_id not in outbox:
            problems.append(f"{where}: awaits command {state.awaiting.command_id}, not in outbox")
    return problems
