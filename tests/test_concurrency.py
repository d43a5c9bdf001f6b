"""Many engines, one PostgreSQL schema, the same sagas: the outbox stays exactly the commands
decided, and every reply is handled exactly once.

8 worker threads, each with its own SagaEngine (its own connection pool), start the same 50
order sagas and then drive them by reading what each saga awaits from the store and replying
to it: the same reply message from several workers (redelivery), other messages for the same
command (a participant answering twice), and replies to commands answered long ago (stale).
Half the sagas complete; the other half have the card declined and release the stock.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psycopg
import pytest
from conftest import order

from saga_es import events as ev
from saga_es.demo.order_saga import order_fulfillment
from saga_es.engine import SagaEngine
from saga_es.ids import saga_id_for
from saga_es.persistence.settings import DatabaseSettings
from saga_es.state import SagaState, SagaStatus

pytestmark = pytest.mark.postgres

SAGA = order_fulfillment.name
SAGAS = 50
WORKERS = 8
MAX_ROUNDS = 10  # a saga needs at most 4 replies; every round answers each awaited command
REPLY_NAMESPACE = uuid.UUID("0f2a9c4e-3b1d-4e8f-9a6b-5c7d8e9f0a1b")

EXPECTED_COMMANDS = {
    True: ["inventory.reserve", "payment.charge", "shipping.create", "notification.send"],
    False: ["inventory.reserve", "payment.charge", "inventory.release"],
}
ISSUING = (ev.StepCommandIssued, ev.CompensationIssued)
ANSWERING = (
    ev.StepSucceeded,
    ev.StepFailed,
    ev.CompensationSucceeded,
    ev.CompensationFailed,
    ev.ReplyIgnored,
)


def succeeds(business_key: str) -> bool:
    return int(business_key.rsplit("-", 1)[1]) % 2 == 0


def participant_reply(
    state: SagaState, command_id: UUID, message_id: UUID | None = None
) -> dict[str, Any]:
    """What the participant answers to a command: always the same answer for the same command;
    by default always the same message too (so several workers redeliver one message)."""
    issued = state.commands[command_id]
    message = {
        "message_id": str(message_id or uuid.uuid5(REPLY_NAMESPACE, str(command_id))),
        "saga_id": str(state.saga_id),
        "command_id": str(command_id),
    }
    if issued.step == "charge_payment" and not succeeds(state.business_key):
        return {**message, "outcome": "failure", "error_code": "card_declined"}
    return {**message, "outcome": "success", "result": {issued.step: state.business_key}}


@dataclass
class Worker:
    number: int
    engine: SagaEngine
    saga_ids: list[UUID]
    rng: random.Random = field(init=False)
    sent: set[UUID] = field(default_factory=set)
    stats: Counter[str] = field(default_factory=Counter)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.number)
        # Most workers go through the sagas in the same order, so they collide head-on; two
        # take their own order and meet them at random.
        if self.number >= WORKERS - 2:
            self.saga_ids = self.rng.sample(self.saga_ids, len(self.saga_ids))

    def run(self, rounds: Rounds) -> None:
        try:
            rounds.barrier.wait()
            for n in range(SAGAS):
                key = f"c-{n}"
                outcome = self.engine.start(SAGA, order(key), business_key=key)
                self.stats["started" if outcome.created else "start found existing"] += 1
            while True:
                # Every worker starts each round at once, so same-order workers collide.
                rounds.barrier.wait()
                if rounds.finished or rounds.played > MAX_ROUNDS:
                    return
                self.play_round()
        except BaseException as exc:
            self.error = exc
            rounds.barrier.abort()  # release the others rather than leave them waiting

    def play_round(self) -> None:
        """Reply to what each unfinished saga awaits, with some redeliveries and stale replies."""
        for saga_id in self.saga_ids:
            state = self.engine.get_state(saga_id)
            answered = [c for c, i in state.commands.items() if i.outcome is not None]
            if answered and self.rng.random() < 0.2:
                # Stale: a reply to an earlier command, redelivered or a fresh message.
                old = self.rng.choice(answered)
                fresh = uuid.uuid4() if self.rng.random() < 0.5 else None
                self.send(participant_reply(state, old, fresh))
            if state.is_terminal:
                continue
            assert state.awaiting is not None, f"saga {saga_id} waits for nothing: {state}"
            command = state.awaiting.command_id
            rows = [r for r in self.engine.store.outbox(saga_id) if r["message_id"] == command]
            assert len(rows) == 1, f"awaited command {command} has {len(rows)} outbox rows"
            self.send(participant_reply(state, command))
            if self.rng.random() < 0.25:
                # The participant answers the same command again, as another message.
                self.send(participant_reply(state, command, uuid.uuid4()))

    def send(self, message: dict[str, Any]) -> None:
        outcome = self.engine.handle_reply(message)
        self.sent.add(UUID(message["message_id"]))
        if outcome.duplicate:
            self.stats["duplicate message"] += 1
        elif [type(e) for e in outcome.events] == [ev.ReplyIgnored]:
            self.stats[f"ignored ({outcome.events[0].reason})"] += 1
        else:
            assert outcome.events, f"reply {message} changed nothing and was no duplicate"
            self.stats["advanced"] += 1


class Rounds:
    """Lock-step rounds: the barrier's action (run once, while every worker waits) decides
    for all of them whether there is anything left to do."""

    def __init__(self, observer: SagaEngine, saga_ids: list[UUID]) -> None:
        self.observer = observer
        self.saga_ids = saga_ids
        self.finished = False
        self.played = -1  # the first wait is the start, not a round
        self.error: BaseException | None = None
        self.barrier = threading.Barrier(WORKERS, action=self.check, timeout=120)

    def check(self) -> None:
        self.played += 1
        if self.played == 0:
            return  # nothing started yet
        try:
            self.finished = all(self.observer.get_state(s).is_terminal for s in self.saga_ids)
        except BaseException as exc:
            self.error = exc
            raise


class ConflictCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.conflicts = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "concurrency conflict" in record.msg:
            self.conflicts += 1


@pytest.fixture
def conflicts() -> Iterator[ConflictCounter]:
    logger = logging.getLogger("saga_es.engine")
    counter, level = ConflictCounter(), logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.DEBUG)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)


def test_eight_engines_driving_the_same_sagas_decide_each_command_once(
    postgres_url: str, conflicts: ConflictCounter
) -> None:
    url = f"{postgres_url}&pool_size=1&max_overflow=2"  # 8 engines share one server
    keys = [f"c-{n}" for n in range(SAGAS)]
    saga_ids = [saga_id_for(SAGA, k) for k in keys]
    engines = [SagaEngine([order_fulfillment], database_url=url) for _ in range(WORKERS + 1)]
    try:
        observer = engines[WORKERS]
        workers = [Worker(n, engines[n], list(saga_ids)) for n in range(WORKERS)]
        rounds = Rounds(observer, saga_ids)
        threads = [threading.Thread(target=w.run, args=(rounds,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert not any(t.is_alive() for t in threads), "a worker did not finish"
        errors = [f"worker {w.number}: {w.error!r}" for w in workers if w.error]
        assert (rounds.error, errors) == (None, [])
        assert rounds.finished, f"sagas still running after {MAX_ROUNDS} rounds"

        stats = sum((w.stats for w in workers), Counter())
        print(
            f"\n{WORKERS} workers, {SAGAS} sagas, {rounds.played - 1} rounds: {dict(stats)}; "
            f"{conflicts.conflicts} optimistic-concurrency conflicts retried"
        )
        assert stats["started"] == SAGAS

        store = engines[0].store
        issued_total = answered_total = 0
        for key, saga_id in zip(keys, saga_ids, strict=True):
            state = engines[0].get_state(saga_id)
            events = engines[0].events(saga_id)
            if succeeds(key):
                assert state.status is SagaStatus.COMPLETED, key
            else:
                assert state.status is SagaStatus.FAILED, key
                assert state.compensated == ("reserve_inventory",)
                assert state.failure is not None
                assert state.failure.error_code == "card_declined"
            issued = [
                (e.command_id, e.originator_version) for e in events if isinstance(e, ISSUING)
            ]
            rows = sorted(store.outbox(saga_id), key=lambda r: r["seq"])
            assert [(r["message_id"], r["saga_version"]) for r in rows] == issued, key
            assert [r["command"] for r in rows] == EXPECTED_COMMANDS[succeeds(key)], key
            versions = [r["saga_version"] for r in rows]
            assert all(a < b for a, b in itertools.pairwise(versions)), key
            issued_total += len(issued)
            answered_total += sum(isinstance(e, ANSWERING) for e in events)

        all_rows = store.outbox()
        assert len(all_rows) == issued_total
        assert len({r["message_id"] for r in all_rows}) == len(all_rows)
        assert store.timers() == []

        # Exactly-once replies: every message sent is in the inbox once, and each inbox row
        # made exactly one decision (one answering event), however often it was delivered.
        settings = DatabaseSettings.from_url(postgres_url)
        with psycopg.connect(settings.psycopg_conninfo) as conn:
            inbox = [
                r[0]
                for r in conn.execute(
                    f'SELECT message_id FROM "{settings.schema}".saga_inbox'
                ).fetchall()
            ]
        assert set(inbox) == set().union(*(w.sent for w in workers))
        assert len(inbox) == answered_total
    finally:
        for engine in engines:
            engine.close()
