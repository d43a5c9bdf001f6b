"""The timer process: fires due saga timers into the engine, so no saga waits forever.

    saga-es timers run --database-url postgresql://... [--batch-size 100] [--poll-interval 1]

A saga's timer (its reply deadline, or the moment its next retry is due) is a row in
saga_timers, written in the same transaction as the events that set it. This process claims
the due rows (``TimerTable.claim_due``: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several
processes may run side by side, each claiming different rows), fires each one with
``SagaEngine.handle_timer``, and sleeps until the next row is due, never longer than the poll
interval (a decision in another process may set a sooner timer meanwhile).

Exactly once in effect: the engine decides a timer against the saga's state. A timer that is
not the saga's current one any more (a reply came first, another process fired it, it was
rescheduled or cancelled) decides nothing, and a decision's events can only commit on top of
the version of the saga they were decided from. So whether a timer is fired once, twice or by
two processes at once, its effect (a ``StepTimedOut`` and what follows, or the retry's
command) is recorded once. The decision also replaces or deletes the row in its transaction.

Timer process, not Celery: a Celery ETA/countdown task is held in a worker's memory and may be
delivered twice or lost with the worker; the table is durable, and is the saga's own record.

SIGTERM or SIGINT stops the process after the timer in hand; claimed timers it did not fire are
given back (due at their own time again). After a crash they are claimed again once the claim's
lease has passed.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from eventsourcing.persistence import PersistenceError

from saga_es.backoff import exponential_delay
from saga_es.definition import SagaDefinition
from saga_es.engine import SagaEngine
from saga_es.errors import ConcurrencyError, SagaError, StoreError
from saga_es.persistence.timer_table import ScheduledTimer, TimerTable
from saga_es.signals import stop_on_signals
from saga_es.state import next_timer

__all__ = ["TimerProcess", "TimerStats", "run_timers"]

log = logging.getLogger("saga_es.timers")

#: The database failed, not the timer: try again later. (Claims use the datastore directly, so
#: drivers' own errors arrive here untranslated.)
_TRANSIENT = (StoreError, ConcurrencyError, PersistenceError, psycopg.Error, sqlite3.Error)

#: Called with each claimed batch before it is fired (tests use it to crash at that moment).
AfterClaim = Callable[[Sequence[ScheduledTimer]], None]


@dataclass
class TimerStats:
    claimed: int = 0
    fired: int = 0  # changed their saga
    unchanged: int = 0  # decided nothing: handled already, or not due by the engine's clock
    failed: int = 0  # left claimed, to be claimed again after the lease
    released: int = 0  # given back unfired on stop


class TimerProcess:
    """Fires due timers into ``engine``; ``run`` until ``stop``, or ``run_once``.

    batch_size: timers claimed per transaction.
    poll_interval: longest sleep between looks at the table, in seconds.
    lease: how long a claimed timer is kept from other processes; after a crash, how long
        its timers wait. Keep it well above the time a batch takes to fire.
    """

    def __init__(
        self,
        engine: SagaEngine,
        *,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        lease: timedelta = timedelta(seconds=60),
        after_claim: AfterClaim | None = None,
    ) -> None:
        if batch_size < 1 or poll_interval <= 0 or lease <= timedelta(0):
            raise ValueError("batch_size, poll_interval and lease must be positive")
        self.engine = engine
        self.table = TimerTable(engine.store)
        self.batch_size, self.poll_interval, self.lease = batch_size, poll_interval, lease
        self.after_claim = after_claim
        self.stats = TimerStats()
        self._stop = threading.Event()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> TimerStats:
        """Fire timers as they come due until ``stop``; database outages are waited out."""
        log.info("timers started (batch %d, poll %.2fs)", self.batch_size, self.poll_interval)
        failures = 0
        while not self.stopping:
            try:
                self.run_once()
                wait = self._until_next_due()
                failures = 0
            except _TRANSIENT as exc:
                wait = exponential_delay(failures, base=self.poll_interval, cap=30.0)
                failures += 1
                log.warning("timers: database unavailable (%s); again in %.1fs", exc, wait)
            self._stop.wait(wait)
        log.info("timers stopped: %s", self.stats)
        return self.stats

    def run_once(self) -> int:
        """Fire every timer due now, batch after batch; how many changed their saga."""
        fired = 0
        while not self.stopping:
            now = self.engine.clock()
            batch = self.table.claim_due(now, lease_until=now + self.lease, limit=self.batch_size)
            self.stats.claimed += len(batch)
            if batch and self.after_claim is not None:
                self.after_claim(batch)
            fired += self._fire(batch, lease_until=now + self.lease)
            if len(batch) < self.batch_size:
                break
        return fired

    def _fire(self, batch: Sequence[ScheduledTimer], *, lease_until: datetime) -> int:
        fired = 0
        for index, timer in enumerate(batch):
            if self.stopping:
                self._release(batch[index:], lease_until)
                break
            what = f"saga {timer.saga_id}: timer {timer.timer_id} ({timer.kind}, {timer.phase} "
            what += f"'{timer.step}' attempt {timer.attempt}, due {timer.due.isoformat()})"
            try:
                outcome = self.engine.handle_timer(timer.saga_id, timer.timer_id)
            except _TRANSIENT as exc:
                self.stats.failed += 1
                log.warning("%s not fired, claimed again after the lease: %s", what, exc)
                continue
            except SagaError as exc:  # an unknown saga or definition: an operator must look
                self.stats.failed += 1
                log.error("%s cannot be fired, claimed again after the lease: %s", what, exc)
                continue
            except Exception:  # a bug: keep going with the other sagas
                self.stats.failed += 1
                log.exception("%s: firing raised unexpectedly", what)
                continue
            if outcome.events:
                fired += 1
                self.stats.fired += 1
                names = ", ".join(type(e).__name__ for e in outcome.events)
                log.info("%s fired: %s", what, names)
                continue
            self.stats.unchanged += 1
            current = next_timer(outcome.state)
            if current is not None and current.timer_id == timer.timer_id:
                # Still pending: not due yet by the engine's clock. Due at its own time again.
                self._release([timer], lease_until)
                log.info("%s not due yet by the engine's clock; given back", what)
            else:
                log.info("%s changed nothing (handled already)", what)
        return fired

    def _release(self, timers: Sequence[ScheduledTimer], lease_until: datetime) -> None:
        for timer in timers:
            try:
                if self.table.release(timer, lease_until=lease_until):
                    self.stats.released += 1
            except _TRANSIENT as exc:  # it will be claimed again after the lease anyway
                log.warning("saga %s: timer not given back (%s)", timer.saga_id, exc)

    def _until_next_due(self) -> float:
        due = self.table.next_due()
        if due is None:
            return self.poll_interval
        seconds = (due - self.engine.clock()).total_seconds()
        # Due already: another process holds it locked right now, or it was just set. Look
        # again soon, without spinning.
        return min(max(seconds, 0.05), self.poll_interval)


def run_timers(
    definitions: Sequence[SagaDefinition],
    database_url: str | None = None,
    *,
    once: bool = False,
    batch_size: int = 100,
    poll_interval: float = 1.0,
    lease: timedelta = timedelta(seconds=60),
    after_claim: AfterClaim | None = None,
) -> TimerStats:
    """Run a timer process until SIGTERM/SIGINT (or one pass, ``once``); its statistics."""
    with SagaEngine(definitions, database_url=database_url) as engine:
        process = TimerProcess(
            engine,
            batch_size=batch_size,
            poll_interval=poll_interval,
            lease=lease,
            after_claim=after_claim,
        )
        if once:
            process.run_once()
            return process.stats
        with stop_on_signals(
            process.stop,
            stopping=lambda: process.stopping,
            log=log,
            graceful="stopping after the timer in hand",
            abrupt="stopping now; claimed timers wait for their lease",
        ):
            return process.run()
