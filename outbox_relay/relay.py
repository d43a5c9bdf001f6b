"""The relay: claim a batch of outbox rows, publish it, mark it, commit. Again.

One cycle (``publish_batch``) is one source transaction: claim each saga's head row (at most
``batch_size``), turn the rows into commands, publish them all, wait for the broker's confirms
once, then mark the confirmed rows published and record the failures, and commit. A relay
that dies anywhere before the commit leaves its rows unpublished and unclaimed: they are
published again (at least once; participants dedupe on the message and idempotency ids).

Failures are sorted by what they say about the rows (``outbox_relay.errors``):

* broker or database unavailable: the batch rolls back untouched; the relay backs off
  (capped, exponential), logs one warning per outage and one info line when it is over;
* a row that cannot be published as stored (invalid, destination not allowed, refused by the
  serializer): ``publish_attempts`` + 1 and ``last_error``; after ``max_attempts`` the row is
  parked. A parked row never holds up other sagas. For its own saga, ``on_parked="block"``
  (default) keeps the saga's later rows unpublished, in order, until someone unparks it
  (``blocked_sagas`` lists them); ``"skip"`` lets them go.

``run`` loops until ``stop`` (called from a signal handler, say): the batch in hand is
finished first. Between batches it waits for a notification (PostgreSQL) or the poll
interval, and deletes rows published more than ``retention`` ago, periodically.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, get_args
from uuid import UUID

from outbox_relay.backoff import Backoff, Outage
from outbox_relay.destinations import Destinations
from outbox_relay.errors import (
    BrokerUnavailableError,
    MessageRejectedError,
    RelayConfigurationError,
    SourceUnavailableError,
    UnavailableError,
)
from outbox_relay.publisher import Publisher, PublishResult
from outbox_relay.rows import OutboxRow, ParkedRow, to_command
from outbox_relay.source import OutboxSource
from saga_es.messages import CommandMessage

__all__ = ["BatchReport", "OnParked", "Relay"]

OnParked = Literal["block", "skip"]
AfterPublish = Callable[[Sequence[OutboxRow], PublishResult], None]

log = logging.getLogger("outbox_relay")


@dataclass(frozen=True)
class BatchReport:
    claimed: int = 0
    published: int = 0
    failed: int = 0  # recorded, not parked yet
    parked: int = 0
    unconfirmed: int = 0  # nacked or returned by the broker: retried later


class Relay:
    def __init__(
        self,
        source: OutboxSource,
        publisher: Publisher,
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        on_parked: OnParked = "block",
        max_attempts: int = 5,
        allowed_queues: Collection[str] | None = None,
        retention: timedelta | None = timedelta(days=7),
        retention_interval: float = 600.0,
        backoff_initial: float = 0.5,
        backoff_cap: float = 30.0,
        linger: float = 0.0,
        after_publish: AfterPublish | None = None,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        """``after_publish`` is called once the broker confirmed a batch, before it is marked
        (metrics, tests that kill the relay there). ``retention=None`` keeps rows forever.

        ``linger``: under load (rows came less than ``linger`` ago), seconds to let rows
        gather before the next claim, after a wake-up or a batch that was not full. Every claim
        then carries many rows instead of the one or two a single decision commits, for that
        much more latency per command; on a quiet system nothing waits.
        """
        _check("batch_size", batch_size >= 1, "must be at least 1")
        _check("poll_interval", poll_interval > 0, "must be positive")
        _check("on_parked", on_parked in get_args(OnParked), "must be 'block' or 'skip'")
        _check("max_attempts", max_attempts >= 1, "must be at least 1")
        _check("retention", retention is None or retention > timedelta(0), "must be positive")
        _check("backoff", 0 < backoff_initial <= backoff_cap, "needs 0 < initial <= cap")
        _check("linger", 0 <= linger < poll_interval, "needs 0 <= linger < poll_interval")
        self.source = source
        self.publisher = publisher
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.linger = linger
        self._rows_seen_at = -float("inf")  # when the last claim found rows
        self.on_parked: OnParked = on_parked
        self.max_attempts = max_attempts
        self.destinations = Destinations(allowed_queues)
        self.retention = retention
        self.retention_interval = retention_interval
        self.published_total = 0
        self._after_publish = after_publish
        self._clock = clock
        self._log = logger
        self._stop = threading.Event()
        self._next_purge = clock()
        self.broker = Outage("broker", logger, Backoff(backoff_initial, backoff_cap), clock)
        self.database = Outage("database", logger, Backoff(backoff_initial, backoff_cap), clock)

    # -- one cycle ----------------------------------------------------------------------------

    def publish_batch(self) -> BatchReport:
        """Claim, publish, mark, commit: one transaction. Raises ``UnavailableError``."""
        with self.source.claim(self.batch_size, skip_parked=self.on_parked == "skip") as batch:
            rows = list(batch.rows)
            if not rows:
                return BatchReport()
            failures: dict[int, str] = {}
            commands: list[CommandMessage] = []
            row_of: dict[UUID, OutboxRow] = {}
            for row in rows:
                try:
                    command = to_command(row)
                    self.destinations.check(command)
                except MessageRejectedError as exc:
                    failures[row.seq] = exc.reason
                    continue
                commands.append(command)
                row_of[command.message_id] = row
            result = self.publisher.publish(commands) if commands else PublishResult()
            if self._after_publish is not None:
                self._after_publish(rows, result)
            failures.update({row_of[m].seq: reason for m, reason in result.rejected.items()})
            batch.mark_published([row_of[m].seq for m in result.confirmed])
            parked = batch.record_failures(failures, park_after=self.max_attempts)
        # Logged once committed, so that every line states what the database now says.
        self.published_total += len(result.confirmed)
        self._log_outcome(rows, result, failures, parked, row_of)
        return BatchReport(
            claimed=len(rows),
            published=len(result.confirmed),
            failed=len(failures) - len(parked),
            parked=len(parked),
            unconfirmed=len(result.unconfirmed),
        )

    def publish_pending(self) -> int:
        """Publish until nothing is claimable (embedded use, tests); returns how many."""
        published = 0
        while True:
            report = self.publish_batch()
            published += report.published
            if not (report.published or report.failed or report.parked):
                return published

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        self._log.info(
            "relay started: %s -> %s (batch_size=%d, poll_interval=%.1fs, on_parked=%s)",
            self.source.description, self.publisher.description, self.batch_size,
            self.poll_interval, self.on_parked,
        )  # fmt: skip
        self._report_parked()
        while not self._stop.is_set():
            try:
                self._purge_if_due()
                report = self.publish_batch()
            except UnavailableError as exc:
                self._pause(self._outage(exc).failed(exc))
                continue
            self.database.succeeded()
            if report.unconfirmed:
                refused = BrokerUnavailableError(
                    self.publisher.description,
                    f"{report.unconfirmed} message(s) nacked or returned by the broker",
                )
                self._pause(self.broker.failed(refused))
                continue
            if report.claimed > report.failed + report.parked:
                self.broker.succeeded()  # something reached the publisher and got through
            if report.claimed == 0:
                if self._wait_for_rows() and self._busy():
                    self._pause(self.linger)
            else:
                busy = self._busy()
                self._rows_seen_at = self._clock()
                if busy and report.claimed < self.batch_size:
                    self._pause(self.linger)
        self._log.info("relay stopped; %d messages published", self.published_total)

    def stop(self) -> None:
        """Finish the batch in hand, then return from ``run``. Safe from a signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- what an operator looks at ------------------------------------------------------------

    def parked_rows(self) -> list[ParkedRow]:
        return self.source.parked_rows()

    def blocked_sagas(self) -> list[ParkedRow]:
        """Parked rows that hold back later rows of their saga (policy ``block``)."""
        if self.on_parked != "block":
            return []
        return [row for row in self.source.parked_rows() if row.held_back]

    def unpark(self, seqs: Collection[int]) -> int:
        """Let parked rows be tried again, once whatever made them fail is fixed."""
        count = self.source.unpark(seqs)
        self._log.info("unparked %d outbox rows", count)
        return count

    def purge_published(self) -> int:
        if self.retention is None:
            return 0
        deleted = self.source.delete_published(self.retention)
        if deleted:
            self._log.info("retention: deleted %d rows published before %s ago", deleted,
                           self.retention)  # fmt: skip
        return deleted

    # -- plumbing -----------------------------------------------------------------------------

    def _outage(self, error: UnavailableError) -> Outage:
        return self.database if isinstance(error, SourceUnavailableError) else self.broker

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            self._stop.wait(seconds)

    def _busy(self) -> bool:
        """Under load: rows came less than ``linger`` ago. A lone command on a quiet system
        goes out at once; a stream of them waits to share a claim."""
        return self._clock() - self._rows_seen_at < self.linger

    def _wait_for_rows(self) -> bool:
        """Whether a notification came (False after a quiet poll interval or a failure)."""
        try:
            return self.source.wait_for_rows(self.poll_interval, self._stop)
        except SourceUnavailableError as exc:
            self._pause(self.database.failed(exc))
            return False

    def _purge_if_due(self) -> None:
        if self.retention is None or self._clock() < self._next_purge:
            return
        self.purge_published()
        self._next_purge = self._clock() + self.retention_interval

    def _report_parked(self) -> None:
        try:
            parked = self.source.parked_rows()
        except SourceUnavailableError:
            return  # the loop reports the outage
        if parked:
            blocked = sum(1 for p in parked if p.held_back) if self.on_parked == "block" else 0
            self._log.warning(
                "%d parked outbox rows (%d sagas blocked behind one): see Relay.parked_rows()",
                len(parked), blocked,
            )  # fmt: skip

    def _log_outcome(
        self,
        rows: list[OutboxRow],
        result: PublishResult,
        failures: dict[int, str],
        parked: set[int],
        row_of: dict[UUID, OutboxRow],
    ) -> None:
        debug = self._log.isEnabledFor(logging.DEBUG)
        if debug:
            for message_id in result.confirmed:
                row = row_of[message_id]
                self._log.debug("published %s to queue %s", row.describe(), row.queue)
        for message_id, reason in result.unconfirmed.items():
            self._log.warning("not confirmed, will retry: %s: %s",
                              row_of[message_id].describe(), reason)  # fmt: skip
        by_seq = {row.seq: row for row in rows}
        for seq, reason in failures.items():
            row = by_seq[seq]
            attempt = row.publish_attempts + 1
            if seq in parked:
                held = (
                    "its saga's later commands stay unpublished until it is unparked"
                    if self.on_parked == "block"
                    else "its saga's later commands go on without it"
                )
                self._log.error(
                    "parked after %d attempts: %s: %s; %s", attempt, row.describe(), reason, held
                )
            else:
                self._log.warning("cannot publish (attempt %d of %d): %s: %s",
                                  attempt, self.max_attempts, row.describe(), reason)  # fmt: skip


def _check(option: str, ok: bool, detail: str) -> None:
    if not ok:
        raise RelayConfigurationError(option, detail)
