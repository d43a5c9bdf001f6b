"""The outbox source: where the relay claims unpublished rows and records what became of them.

The seam between the relay and its database. Implementations: ``PostgresOutboxSource``
(psycopg, ``SELECT ... FOR UPDATE SKIP LOCKED``, LISTEN for wake-ups), ``SQLiteOutboxSource``
(one writer at a time, polling) and ``InMemoryOutboxSource`` (the fake for unit tests). One
contract test runs against all three.

The contract:

* ``claim`` opens a transaction and yields the claimable rows, oldest ``seq`` first, at most
  ``limit``. A row is claimable when it is unpublished, not parked, not claimed by a batch
  still open elsewhere, and it is its saga's head: no row of the same saga with a lower
  ``(saga_version, position)`` is unpublished. With ``skip_parked``, parked rows do not count
  as unpublished for that test (policy ``on_parked="skip"``). So a batch holds at most one row
  per saga, and a saga's next row only becomes claimable once the previous one is committed
  as published.
* What the batch records (``mark_published``, ``record_failures``) commits when the ``with``
  block ends normally. If it raises, everything rolls back: the rows are unpublished and
  unclaimed again, exactly as before, and will be claimed again (publishing is at least once).
* Losing the database raises ``SourceUnavailableError``; the relay backs off and reconnects.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Protocol

from outbox_relay.rows import OutboxRow, ParkedRow

__all__ = ["ClaimedBatch", "OutboxSource", "truncate_error"]

#: Longest ``last_error`` stored; a pathological exception text must not bloat the row.
MAX_ERROR_LENGTH = 2000


class ClaimedBatch(Protocol):
    @property
    def rows(self) -> Sequence[OutboxRow]: ...

    def mark_published(self, seqs: Collection[int]) -> None:
        """published_at = now, publish_attempts + 1."""

    def record_failures(self, errors: Mapping[int, str], *, park_after: int) -> set[int]:
        """publish_attempts + 1 and last_error for each row; park the rows whose attempts
        reach ``park_after``. Returns the seqs parked now."""


class OutboxSource(Protocol):
    description: str  # where it reads from, passwords redacted, for log lines

    def claim(
        self, limit: int, *, skip_parked: bool = False
    ) -> AbstractContextManager[ClaimedBatch]: ...

    def wait_for_rows(self, timeout: float, stop: threading.Event) -> bool:
        """Block until new rows may have been committed, ``timeout`` passed or ``stop`` is set.
        True when woken by a notification (PostgreSQL); polling sources just wait."""

    def delete_published(self, older_than: timedelta) -> int:
        """Delete rows published more than ``older_than`` ago; never unpublished ones."""

    def parked_rows(self) -> list[ParkedRow]: ...

    def unpark(self, seqs: Collection[int]) -> int:
        """Make parked rows claimable again (once the cause is fixed); attempts restart."""

    def close(self) -> None: ...


def truncate_error(text: str) -> str:
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"
