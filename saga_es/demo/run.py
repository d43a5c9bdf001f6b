"""The demo: a batch of order sagas on the embedded default, some of which fail and compensate.

Until the outbox relay exists, simulated participants answer commands in-process: each
command the engine decides is handed to ``simulate``, whose reply goes back through
``SagaEngine.handle_reply``; retries wait on the saga's durable timer like any other saga.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.messages import CommandMessage, ReplyMessage
from saga_es.state import SagaStatus

__all__ = ["DemoReport", "run_demo", "simulate"]


def simulate(command: CommandMessage) -> ReplyMessage:
    """A participant with a fixed temperament per order number, so every run tells one story:
    orders ending in 3 have their card declined, in 7 find no carrier (the pivot fails), in 5
    hit a payment gateway hiccup once and succeed on the retry."""
    n = int(str(command.payload["data"]["order_id"]).rsplit("-", 1)[-1])
    reply_id = uuid.uuid4()
    if command.command == "payment.charge" and n % 10 == 3:
        return command.reply_failure(reply_id, "card_declined", "issuer declined the card")
    if command.command == "payment.charge" and n % 10 == 5 and command.attempt == 1:
        return command.reply_failure(reply_id, "gateway_timeout", "gateway busy", retryable=True)
    if command.command == "shipping.create" and n % 10 == 7:
        return command.reply_failure(reply_id, "no_carrier", "no carrier serves the address")
    return command.reply_success(reply_id, {"ref": f"{command.command}:{n}"})


@dataclass
class DemoReport:
    counts: dict[str, int] = field(default_factory=dict)
    outbox_rows: int = 0
    events: int = 0
    example_saga: uuid.UUID | None = None
    timeline: list[Any] = field(default_factory=list)
    seconds: float = 0.0


def run_demo(
    engine: SagaEngine, sagas: int, on_progress: Callable[[int], None] = lambda _: None
) -> DemoReport:
    started = time.perf_counter()
    work: deque[CommandMessage] = deque()
    ids = []
    for n in range(1, sagas + 1):
        data = {
            "order_id": f"order-{n}",
            "customer_id": f"customer-{n % 7}",
            "lines": [{"sku": f"SKU-{n % 5}", "quantity": 1 + n % 3}],
            "amount": f"{10 + n}.00",
            "currency": "EUR",
        }
        outcome = engine.start(order_fulfillment, data, business_key=f"order-{n}")
        ids.append(outcome.saga_id)
        work.extend(outcome.commands)

    finished: set[uuid.UUID] = set()
    while True:
        if work:
            outcome = engine.handle_reply(simulate(work.popleft()))
            work.extend(outcome.commands)
        else:
            timers = engine.store.timers()
            if not timers:
                break
            due = timers[0]
            wait = (due["due_at"] - datetime.now(UTC)).total_seconds()
            if wait > 0:
                time.sleep(min(wait, 2.0))
                continue
            outcome = engine.handle_timer(due["saga_id"], due["timer_id"])
            work.extend(outcome.commands)
        if outcome.state.is_terminal and outcome.saga_id not in finished:
            finished.add(outcome.saga_id)
            on_progress(len(finished))

    report = DemoReport(seconds=time.perf_counter() - started)
    states = [engine.get_state(i) for i in ids]
    for status in SagaStatus:
        report.counts[status.value] = sum(1 for s in states if s.status is status)
    report.outbox_rows = len(engine.store.outbox())
    report.events = sum(s.version for s in states)
    failed = [s for s in states if s.status is SagaStatus.FAILED and len(s.compensated) > 1]
    if failed:
        report.example_saga = failed[0].saga_id
        report.timeline = engine.events(failed[0].saga_id)
    return report
