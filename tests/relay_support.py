"""Helpers for the relay tests: outbox rows written directly, queues read back, processes.

Rows are inserted the way a decision stores them (same columns, same encodings), which is much
faster than running sagas when a test needs thousands of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from kombu import Connection, Queue

from saga_es.messages import CommandMessage
from saga_es.persistence.schema import OUTBOX_COLUMNS
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.writes import sqlite_time

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


# -- rows -------------------------------------------------------------------------------------


def command(
    saga_id: UUID | None = None,
    version: int = 1,
    *,
    queue: str = "payment",
    name: str = "payment.charge",
    step: str = "charge",
    payload: dict[str, Any] | None = None,
) -> CommandMessage:
    saga_id = saga_id or uuid.uuid4()
    now = datetime.now(UTC)
    return CommandMessage(
        message_id=uuid.uuid4(),
        saga_id=saga_id,
        saga_version=version,
        definition="order_fulfillment",
        definition_version=1,
        step=step,
        phase="action",
        attempt=1,
        command=name,
        idempotency_key=uuid.uuid4(),
        payload=payload if payload is not None else {"order_id": "o-1", "amount": "25.00"},
        correlation_id=f"corr-{saga_id}",
        causation_id=uuid.uuid4(),
        queue=queue,
        deadline=now + timedelta(minutes=5),
        created_at=now,
    )


def row_of(cmd: CommandMessage, position: int = 0, **overrides: Any) -> dict[str, Any]:
    """The outbox row for ``cmd``; ``overrides`` replace stored values (malformed on purpose)."""
    values = cmd.model_dump(mode="json")
    values["position"] = position
    values.update(overrides)
    return values


def insert_rows(database_url: str, rows: Sequence[dict[str, Any]]) -> None:
    settings = DatabaseSettings.from_url(database_url)
    columns = ", ".join(OUTBOX_COLUMNS)
    if settings.backend == "postgres":
        placeholders = ", ".join("%s::jsonb" if c == "payload" else "%s" for c in OUTBOX_COLUMNS)
        sql = f'INSERT INTO "{settings.schema}".saga_outbox ({columns}) VALUES ({placeholders})'
        params = [
            [json.dumps(r[c]) if c == "payload" else r[c] for c in OUTBOX_COLUMNS] for r in rows
        ]
        with psycopg.connect(settings.psycopg_conninfo) as conn:
            conn.cursor().executemany(sql, params)
        return
    sql = f"INSERT INTO saga_outbox ({columns}) VALUES ({', '.join('?' * len(OUTBOX_COLUMNS))})"
    with _SQLite(settings) as conn:
        conn.executemany(sql, [[_sqlite_value(c, r[c]) for c in OUTBOX_COLUMNS] for r in rows])


def _sqlite_value(column: str, value: Any) -> Any:
    if column in ("message_id", "saga_id", "idempotency_key", "causation_id"):
        try:
            return UUID(str(value)).hex
        except ValueError:
            return value
    if column == "payload":
        return value if isinstance(value, str) else json.dumps(value)
    if column in ("deadline", "created_at") and isinstance(value, str):
        try:
            return sqlite_time(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return value
    return value


def execute(database_url: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the outbox's database; ``{outbox}`` names the table."""
    settings = DatabaseSettings.from_url(database_url)
    if settings.backend == "postgres":
        sql = sql.format(outbox=f'"{settings.schema}".saga_outbox').replace("?", "%s")
        with psycopg.connect(settings.psycopg_conninfo) as conn:
            cursor = conn.execute(sql, list(params))
            return cursor.fetchall() if cursor.description else []
    with _SQLite(settings) as conn:
        cursor = conn.execute(sql.format(outbox="saga_outbox"), list(params))
        return cursor.fetchall()


def outbox(database_url: str) -> dict[str, dict[str, Any]]:
    """Every row by message id (as text, dashed), with its relay columns."""
    rows = execute(
        database_url,
        "SELECT message_id, saga_id, saga_version, position, published_at, publish_attempts, "
        "last_error, parked_at, seq FROM {outbox}",
    )
    keys = ("saga_id", "saga_version", "position", "published_at", "publish_attempts",
            "last_error", "parked_at", "seq")  # fmt: skip
    return {_uuid_text(r[0]): dict(zip(keys, r[1:], strict=True)) for r in rows}


def unpublished(database_url: str) -> int:
    sql = "SELECT count(*) FROM {outbox} WHERE published_at IS NULL"
    return int(execute(database_url, sql)[0][0])


def _uuid_text(value: Any) -> str:
    try:
        return str(UUID(str(value)))
    except ValueError:
        return str(value)


class _SQLite:
    def __init__(self, settings: DatabaseSettings) -> None:
        assert settings.sqlite_path is not None
        self.conn = sqlite3.connect(settings.sqlite_path, timeout=30)

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.conn.commit()
        self.conn.close()


# -- the broker -------------------------------------------------------------------------------


def drain_queue(broker_url: str, queue: str, *, expected: int, timeout: float = 60) -> list[Any]:
    """Consume ``queue`` until ``expected`` messages arrived (fails after ``timeout``), then a
    short grace period for unexpected extras. Returns kombu messages in queue order."""
    received: list[Any] = []
    with Connection(broker_url) as conn:
        q = Queue(queue, durable=True, no_declare=True)
        deadline = time.monotonic() + timeout
        with conn.Consumer(q, callbacks=[lambda _b, m: received.append(m)], accept=["json"]) as c:
            c.qos(prefetch_count=1000)
            while len(received) < expected:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"queue {queue}: {len(received)} of {expected} messages after {timeout}s"
                    )
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=1)
            grace = time.monotonic() + 1.0
            while time.monotonic() < grace:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.2)
            for message in received:
                message.ack()
    return received


# -- processes --------------------------------------------------------------------------------


class Processes:
    """Subprocesses with their output in log files; leaving the block kills and reaps them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.running: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(
        self, name: str, argv: Iterable[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.directory / f"{name}-{len(self.running)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
        self.running.append((process, log))
        return process

    def log(self, process: subprocess.Popen[bytes]) -> str:
        for p, path in self.running:
            if p is process:
                return path.read_text(errors="replace")
        raise KeyError(process)

    def stop(self, process: subprocess.Popen[bytes], *, timeout: float = 30) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit status."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                return process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
        return process.wait()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for process, _ in self.running:
            if process.poll() is None:
                process.kill()
            process.wait()
