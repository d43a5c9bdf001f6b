"""The outbox source contract, run against PostgreSQL, SQLite and the in-memory fake.

Claiming (each saga's head row only, oldest first, never a row another batch holds), marking,
recording failures and parking, rolling back, retention; and per-saga order with two claimers
working at once.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from relay_support import command, execute, insert_rows, row_of

from outbox_relay import (
    InMemoryOutboxSource,
    MessageRejectedError,
    OutboxSource,
    SourceUnavailableError,
    SQLiteOutboxSource,
    open_source,
)
from outbox_relay.rows import to_command
from saga_es.persistence.settings import DatabaseSettings


class Backend:
    """One outbox, opened as many times as a test needs claimers."""

    def __init__(self, kind: str, url: str | None) -> None:
        self.kind, self.url = kind, url
        self.memory = InMemoryOutboxSource() if kind == "memory" else None
        self.opened: list[OutboxSource] = []

    def open(self) -> OutboxSource:
        source = self.memory if self.memory is not None else open_source(self.url)
        self.opened.append(source)
        return source

    def insert(self, *rows: dict[str, Any]) -> list[str]:
        if self.memory is not None:
            for row in rows:
                payload = row["payload"]
                text = payload if isinstance(payload, str) else json.dumps(payload)
                self.memory.add_raw(**{**row, "payload": text})
        else:
            assert self.url is not None
            insert_rows(self.url, rows)
        return [str(row["message_id"]) for row in rows]

    def state(self, message_id: str) -> dict[str, Any]:
        if self.memory is not None:
            (stored,) = [s for s in self.memory.rows.values() if s.row.message_id == message_id]
            return {
                "published": stored.published_at is not None,
                "attempts": stored.publish_attempts,
                "last_error": stored.last_error,
                "parked": stored.parked_at is not None,
            }
        key = message_id if self.kind == "postgres" else UUID(message_id).hex
        ((published, attempts, error, parked),) = execute(
            self.url or "",
            "SELECT published_at, publish_attempts, last_error, parked_at FROM {outbox} "
            "WHERE message_id = ?",
            [key],
        )
        return {
            "published": published is not None,
            "attempts": attempts,
            "last_error": error,
            "parked": parked is not None,
        }

    def exists(self, message_id: str) -> bool:
        try:
            self.state(message_id)
        except ValueError:  # no row to unpack
            return False
        return True

    def set_published_at(self, message_id: str, when: datetime) -> None:
        if self.memory is not None:
            (stored,) = [s for s in self.memory.rows.values() if s.row.message_id == message_id]
            stored.published_at = when
            return
        if self.kind == "postgres":
            value: Any = when
            key = message_id
        else:
            value = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            key = UUID(message_id).hex
        execute(self.url or "", "UPDATE {outbox} SET published_at = ? WHERE message_id = ?",
                [value, key])  # fmt: skip

    def close(self) -> None:
        for source in self.opened:
            source.close()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    url = None
    if request.param != "memory":
        url = str(request.getfixturevalue(f"{request.param}_url"))
    b = Backend(request.param, url)
    yield b
    b.close()


def ids(rows: Any) -> list[str]:
    return [str(UUID(str(r.message_id))) for r in rows]


def saga_rows(versions: int, positions: int = 1, **kw: Any) -> list[dict[str, Any]]:
    saga = uuid.uuid4()
    return [
        row_of(command(saga, v, **kw), p) for v in range(1, versions + 1) for p in range(positions)
    ]


# -- claiming ---------------------------------------------------------------------------------


def test_claims_only_each_sagas_head_row_oldest_first(backend: Backend) -> None:
    a = saga_rows(3)
    b = saga_rows(1)
    c = saga_rows(1, positions=2)  # one decision, two commands
    backend.insert(*a, *b, *c)
    source = backend.open()
    with source.claim(10) as batch:
        assert ids(batch.rows) == [a[0]["message_id"], b[0]["message_id"], c[0]["message_id"]]


def test_claim_respects_the_limit(backend: Backend) -> None:
    rows = [saga_rows(1)[0] for _ in range(5)]
    backend.insert(*rows)
    with backend.open().claim(2) as batch:
        assert ids(batch.rows) == [r["message_id"] for r in rows[:2]]


def test_marked_rows_commit_and_their_successors_become_claimable(backend: Backend) -> None:
    a, c = saga_rows(2), saga_rows(1, positions=2)
    backend.insert(*a, *c)
    source = backend.open()
    with source.claim(10) as batch:
        batch.mark_published([r.seq for r in batch.rows])
    assert backend.state(a[0]["message_id"]) == {
        "published": True, "attempts": 1, "last_error": None, "parked": False,
    }  # fmt: skip
    with source.claim(10) as batch:
        assert ids(batch.rows) == [a[1]["message_id"], c[1]["message_id"]]
        batch.mark_published([r.seq for r in batch.rows])
    with source.claim(10) as batch:
        assert batch.rows == []


def test_an_exception_rolls_the_batch_back(backend: Backend) -> None:
    rows = saga_rows(2)
    backend.insert(*rows)
    source = backend.open()

    def mark_then_die() -> None:
        with source.claim(10) as batch:
            batch.mark_published([r.seq for r in batch.rows])
            batch.record_failures({batch.rows[0].seq: "x"}, park_after=1)
            raise RuntimeError("the relay died before committing")

    with pytest.raises(RuntimeError, match="died"):
        mark_then_die()
    assert backend.state(rows[0]["message_id"])["published"] is False
    assert backend.state(rows[0]["message_id"])["attempts"] == 0
    with source.claim(10) as batch:
        assert ids(batch.rows) == [rows[0]["message_id"]]


def test_failures_are_recorded_then_the_row_is_parked(backend: Backend) -> None:
    rows = saga_rows(3)
    backend.insert(*rows)
    head = rows[0]["message_id"]
    source = backend.open()
    for attempt in (1, 2, 3):
        with source.claim(10) as batch:
            assert ids(batch.rows) == [head]
            assert batch.rows[0].publish_attempts == attempt - 1
            parked = batch.record_failures({batch.rows[0].seq: f"boom {attempt}"}, park_after=3)
        assert parked == ({batch.rows[0].seq} if attempt == 3 else set())
        assert backend.state(head) == {
            "published": False, "attempts": attempt, "last_error": f"boom {attempt}",
            "parked": attempt == 3,
        }  # fmt: skip
    (row,) = source.parked_rows()
    assert (row.message_id, row.step, row.last_error, row.held_back) == (head, "charge",
                                                                          "boom 3", 2)  # fmt: skip
    with source.claim(10) as batch:  # parked, and its saga blocked behind it
        assert batch.rows == []


def test_a_parked_row_blocks_only_its_own_saga_unless_skipped(backend: Backend) -> None:
    bad, good = saga_rows(2), saga_rows(2)
    backend.insert(*bad, *good)
    source = backend.open()
    with source.claim(10) as batch:
        seqs = {str(UUID(str(r.message_id))): r.seq for r in batch.rows}
        batch.record_failures({seqs[bad[0]["message_id"]]: "bad"}, park_after=1)
        batch.mark_published([seqs[good[0]["message_id"]]])
    with source.claim(10) as batch:
        assert ids(batch.rows) == [good[1]["message_id"]]
    with source.claim(10, skip_parked=True) as batch:
        assert ids(batch.rows) == [bad[1]["message_id"], good[1]["message_id"]]


def test_unparking_makes_the_row_claimable_again(backend: Backend) -> None:
    rows = saga_rows(1)
    backend.insert(*rows)
    source = backend.open()
    with source.claim(10) as batch:
        batch.record_failures({batch.rows[0].seq: "bad"}, park_after=1)
    (parked,) = source.parked_rows()
    assert source.unpark([parked.seq]) == 1
    assert source.parked_rows() == []
    with source.claim(10) as batch:
        assert ids(batch.rows) == [rows[0]["message_id"]]
        assert batch.rows[0].publish_attempts == 0


def test_a_malformed_row_is_claimed_as_stored_and_fails_on_its_own(backend: Backend) -> None:
    good = saga_rows(1)[0]
    bad = row_of(command(), 0, payload=[1, 2], phase="sideways")
    backend.insert(bad, good)
    with backend.open().claim(10) as batch:
        assert len(batch.rows) == 2
        with pytest.raises(MessageRejectedError) as caught:
            to_command(batch.rows[0])
        assert "field 'phase'" in caught.value.reason
        assert "field 'payload'" in caught.value.reason
        assert to_command(batch.rows[1]).message_id == UUID(good["message_id"])


# -- two claimers -----------------------------------------------------------------------------


def test_a_second_claimer_skips_rows_another_batch_holds(backend: Backend) -> None:
    first_saga = saga_rows(2)
    others = [saga_rows(1)[0] for _ in range(3)]
    backend.insert(*first_saga, *others)
    one, two = backend.open(), backend.open()
    with one.claim(2) as held:
        assert ids(held.rows) == [first_saga[0]["message_id"], others[0]["message_id"]]
        if backend.kind == "sqlite":
            # SQLite has no row locks: the second claimer waits for the write lock, and
            # gives up after its busy timeout.
            impatient = SQLiteOutboxSource(DatabaseSettings.from_url(backend.url or ""),
                                           busy_timeout=0.2)  # fmt: skip
            backend.opened.append(impatient)
            with pytest.raises(SourceUnavailableError), impatient.claim(10):
                pass
            return
        with two.claim(10) as batch:
            # Neither the held rows nor the held saga's next row.
            assert ids(batch.rows) == [others[1]["message_id"], others[2]["message_id"]]


def test_two_concurrent_claimers_never_publish_a_saga_out_of_order(backend: Backend) -> None:
    sagas = [saga_rows(4, positions=2) for _ in range(60)]
    backend.insert(*[row for saga in sagas for row in saga])
    total = sum(len(s) for s in sagas)
    published: list[tuple[str, int, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def claimer(source: OutboxSource, limit: int) -> None:
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with source.claim(limit) as batch:
                    with lock:  # "publishing": the order the broker would see
                        published.extend(
                            (str(r.saga_id), r.saga_version, r.position) for r in batch.rows
                        )
                    batch.mark_published([r.seq for r in batch.rows])
                with lock:
                    if len(published) >= total:
                        return
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(backend.open(), limit)) for limit in (7, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert len(published) == total == len(set(published)), "each row exactly once"
    by_saga: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for saga, version, position in published:
        by_saga[saga].append((version, position))
    for saga, keys in by_saga.items():
        assert keys == sorted(keys), f"saga {saga} published out of order: {keys}"


# -- retention --------------------------------------------------------------------------------


def test_retention_deletes_old_published_rows_only(backend: Backend) -> None:
    old, recent, unpublished_old = saga_rows(1)[0], saga_rows(1)[0], saga_rows(1)[0]
    parked = saga_rows(1)[0]
    backend.insert(old, recent, unpublished_old, parked)
    source = backend.open()
    with source.claim(10) as batch:
        seqs = {str(UUID(str(r.message_id))): r.seq for r in batch.rows}
        batch.mark_published([seqs[old["message_id"]], seqs[recent["message_id"]]])
        batch.record_failures({seqs[parked["message_id"]]: "bad"}, park_after=1)
    now = datetime.now(UTC)
    backend.set_published_at(old["message_id"], now - timedelta(days=8))
    backend.set_published_at(recent["message_id"], now - timedelta(days=6))
    assert source.delete_published(timedelta(days=7)) == 1
    assert not backend.exists(old["message_id"])
    assert all(backend.exists(kept["message_id"]) for kept in (recent, unpublished_old, parked))


# -- waiting ----------------------------------------------------------------------------------


def test_waiting_returns_when_stopped(backend: Backend) -> None:
    stop = threading.Event()
    source = backend.open()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    source.wait_for_rows(30, stop)
    assert time.monotonic() - started < 5


@pytest.mark.postgres
def test_postgres_wakes_on_the_decisions_notification(postgres_url: str) -> None:
    source = open_source(postgres_url)
    try:
        with source.claim(1) as batch:  # starts listening
            assert batch.rows == []
        # (No "times out when nothing happens" check: the channel is database-wide, so tests
        # in other schemas of the same database may wake this listener at any moment.)

        def notify() -> None:
            execute(postgres_url, "SELECT pg_notify('saga_outbox', '')")

        threading.Timer(0.3, notify).start()
        started = time.monotonic()
        assert source.wait_for_rows(30, threading.Event()) is True
        assert time.monotonic() - started < 10
    finally:
        source.close()
