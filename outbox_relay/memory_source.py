"""The in-memory outbox source: the fake behind unit tests, held to the same contract test as
the PostgreSQL and SQLite sources.

A claimed batch works like a transaction: its rows are locked against other claims, what it
records is staged and applied when the ``with`` block ends normally, and dropped if it raises.
``unavailable`` simulates a database outage: every call raises ``SourceUnavailableError``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from outbox_relay.errors import SourceUnavailableError
from outbox_relay.rows import OutboxRow, ParkedRow
from outbox_relay.source import truncate_error
from saga_es.messages import CommandMessage

__all__ = ["InMemoryOutboxSource", "StoredRow"]


@dataclass
class StoredRow:
    row: OutboxRow
    published_at: datetime | None = None
    publish_attempts: int = 0
    last_error: str | None = None
    parked_at: datetime | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.row.saga_version, self.row.position)


class InMemoryOutboxSource:
    description = "memory"

    def __init__(self, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.clock = clock
        self.unavailable = False
        self.rows: dict[int, StoredRow] = {}
        self._seq = itertools.count(1)
        self._claimed: set[int] = set()
        self._changed = threading.Condition()
        self._version = 0  # bumped by every change, so that a wait can tell it happened

    # -- test helpers -------------------------------------------------------------------------

    def add(self, command: CommandMessage, *, position: int = 0) -> int:
        fields = command.model_dump(mode="json")
        fields["payload"] = json.dumps(fields["payload"])
        return self.add_raw(position=position, **fields)

    def add_raw(self, **fields: Any) -> int:
        """A row as a decision would store it; any field may be malformed on purpose."""
        with self._changed:
            seq = next(self._seq)
            values = {"seq": seq, "publish_attempts": 0, **fields}
            self.rows[seq] = StoredRow(OutboxRow(**values))
            self._bump()
            return seq

    # -- the source ---------------------------------------------------------------------------

    @contextmanager
    def claim(self, limit: int, *, skip_parked: bool = False) -> Iterator[_MemoryBatch]:
        with self._changed:
            self._check()
            rows = [
                dataclasses.replace(s.row, publish_attempts=s.publish_attempts)
                for s in self._claimable(skip_parked)[:limit]
            ]
            self._claimed.update(row.seq for row in rows)
        batch = _MemoryBatch(rows)
        try:
            yield batch
            with self._changed:
                self._check()
                self._apply(batch)
        finally:
            with self._changed:
                self._claimed.difference_update(row.seq for row in rows)

    def wait_for_rows(self, timeout: float, stop: threading.Event) -> bool:
        self._check()
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = self._version
            while self._version == seen and not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.05))  # short: also watch ``stop``
            return self._version != seen

    def delete_published(self, older_than: timedelta) -> int:
        cutoff = self.clock() - older_than
        with self._changed:
            self._check()
            old = [k for k, s in self.rows.items() if s.published_at and s.published_at < cutoff]
            for seq in old:
                del self.rows[seq]
            return len(old)

    def parked_rows(self) -> list[ParkedRow]:
        with self._changed:
            self._check()
            return [self._parked(s) for s in self.rows.values() if self._is_parked(s)]

    def unpark(self, seqs: Collection[int]) -> int:
        with self._changed:
            self._check()
            found = [self.rows[seq] for seq in seqs if seq in self.rows]
            unparked = [s for s in found if self._is_parked(s)]
            for stored in unparked:
                stored.parked_at, stored.publish_attempts = None, 0
            self._bump()
            return len(unparked)

    def close(self) -> None:
        pass

    # -- plumbing -----------------------------------------------------------------------------

    def _bump(self) -> None:
        self._version += 1
        self._changed.notify_all()

    def _check(self) -> None:
        if self.unavailable:
            raise SourceUnavailableError(self.description, "simulated outage")

    def _claimable(self, skip_parked: bool) -> list[StoredRow]:
        unpublished = [s for s in self.rows.values() if s.published_at is None]
        head: dict[Any, tuple[int, int]] = {}
        for stored in unpublished:
            if skip_parked and stored.parked_at is not None:
                continue
            saga = stored.row.saga_id
            head[saga] = min(head.get(saga, stored.key), stored.key)
        return [
            s
            for s in sorted(unpublished, key=lambda s: s.row.seq)
            if s.parked_at is None
            and s.row.seq not in self._claimed
            and head.get(s.row.saga_id) == s.key
        ]

    def _apply(self, batch: _MemoryBatch) -> None:
        now = self.clock()
        for seq in batch.published:
            stored = self.rows[seq]
            stored.published_at = now
            stored.publish_attempts += 1
        for seq, (error, park) in batch.failed.items():
            stored = self.rows[seq]
            stored.publish_attempts += 1
            stored.last_error = error
            if park:
                stored.parked_at = now
        self._bump()

    def _is_parked(self, stored: StoredRow) -> bool:
        return stored.parked_at is not None and stored.published_at is None

    def _parked(self, stored: StoredRow) -> ParkedRow:
        assert stored.parked_at is not None
        held_back = sum(
            1
            for other in self.rows.values()
            if other.row.saga_id == stored.row.saga_id
            and other.published_at is None
            and other.key > stored.key
        )
        row = stored.row
        return ParkedRow(
            row.seq, str(row.message_id), str(row.saga_id), row.saga_version, row.position,
            str(row.step), str(row.command), str(row.queue), stored.publish_attempts,
            stored.last_error, stored.parked_at, held_back,
        )  # fmt: skip


class _MemoryBatch:
    def __init__(self, rows: list[OutboxRow]) -> None:
        self.rows: Sequence[OutboxRow] = rows
        self.published: set[int] = set()
        self.failed: dict[int, tuple[str, bool]] = {}
        self._attempts = {row.seq: row.publish_attempts for row in rows}

    def mark_published(self, seqs: Collection[int]) -> None:
        self.published.update(seqs)

    def record_failures(self, errors: Mapping[int, str], *, park_after: int) -> set[int]:
        parked = set()
        for seq, error in errors.items():
            park = self._attempts[seq] + 1 >= park_after
            self.failed[seq] = (truncate_error(error), park)
            if park:
                parked.add(seq)
        return parked
