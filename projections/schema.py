"""The views' tables, versioned so that a view can be rebuilt beside the live one.

Each projection owns a set of tables per version, ``<public name>_v<N>``, and queries read a
SQL view of the public name (``saga_status``, ``saga_audit``, ``step_stats``) that selects from
the active version. A rebuild fills version N+1 from position 0 while the runners keep
maintaining version N, then, in one transaction, points ``projection_views.active_version`` and
the SQL view at N+1 (DDL is transactional on PostgreSQL and SQLite: a query sees the old
version or the new one, never neither), and drops version N.

projection_views: one row per projection: the active version, and the version being rebuilt.
projection_tracking: one row per table set: the position (notification id) of the last event
    applied to it, written in the same transaction as the rows that event changed, so every
    event is applied exactly once. Runners lock the row (``FOR UPDATE``) for the length of a
    batch: a second runner for the same view waits, then continues from the new position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    text,
)

from projections.database import UTCDateTime

__all__ = [
    "ACTIVE_STATES",
    "BUCKET_COLUMNS",
    "BUCKET_LIMITS_MS",
    "CONTROL",
    "PROJECTIONS",
    "Projection",
    "audit_table",
    "projection_tracking",
    "projection_views",
    "public_tables",
    "stats_sagas_table",
    "stats_table",
    "status_table",
]

#: States a saga leaves by itself; anything else needs nothing (done) or an operator (stuck).
ACTIVE_STATES = ("started", "pending", "compensating")

#: Upper bounds of the latency histogram's buckets, in milliseconds; one more bucket counts
#: everything above the last. From a fast local participant to one that waits on a human.
BUCKET_LIMITS_MS: tuple[int, ...] = (
    *(1, 2, 5, 10, 20, 50, 100, 200, 500),
    *(1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000),
    *(1_800_000, 3_600_000, 21_600_000, 86_400_000),
)
BUCKET_COLUMNS: tuple[str, ...] = (*(f"le_{ms}ms" for ms in BUCKET_LIMITS_MS), "le_inf")

_ACTIVE = text("state IN ('started', 'pending', 'compensating')")


def status_table(metadata: MetaData, name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("saga_id", Uuid, primary_key=True),
        Column("definition", String, nullable=False),
        Column("definition_version", Integer, nullable=False),
        Column("business_key", String, nullable=False),
        Column("correlation_id", String, nullable=False),
        Column("state", String, nullable=False),
        Column("current_step", String),
        Column("phase", String),
        Column("attempt", Integer),
        Column("waiting_for", String),  # "reply" or "retry"
        Column("next_deadline", UTCDateTime),
        Column("error_step", String),
        Column("error_code", String),
        Column("error_message", Text),
        Column("stuck_reason", Text),
        Column("retries", Integer, nullable=False),
        Column("compensations", Integer, nullable=False),
        Column("started_at", UTCDateTime, nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
        Column("finished_at", UTCDateTime),
        Column("version", Integer, nullable=False),
        Column("position", BigInteger, nullable=False),
        # Lists are ordered newest first, by (started_at, saga_id): it never changes, so a
        # keyset cursor stays valid while the sagas on the page move on.
        Index(f"{name}_started", "started_at", "saga_id"),
        Index(f"{name}_state", "state", "started_at", "saga_id"),
        Index(f"{name}_definition", "definition", "started_at", "saga_id"),
        Index(f"{name}_step", "current_step", "started_at", "saga_id"),
        Index(f"{name}_error", "error_code", "started_at", "saga_id"),
        Index(f"{name}_key", "business_key"),
        Index(f"{name}_correlation", "correlation_id"),
        Index(f"{name}_idle", "updated_at", postgresql_where=_ACTIVE, sqlite_where=_ACTIVE),
    )  # fmt: skip


def audit_table(metadata: MetaData, name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("position", BigInteger, primary_key=True, autoincrement=False),
        Column("saga_id", Uuid, nullable=False),
        Column("version", Integer, nullable=False),
        Column("event_type", String, nullable=False),
        Column("step", String),
        Column("attempt", Integer),
        Column("command_id", Uuid),
        Column("occurred_at", UTCDateTime, nullable=False),
        Column("actor", String, nullable=False),
        Column("summary", Text, nullable=False),  # the event's fields, as JSON
        Index(f"{name}_saga", "saga_id", "version", unique=True),
    )


def stats_table(metadata: MetaData, name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("definition", String, primary_key=True),
        Column("definition_version", Integer, primary_key=True),
        Column("step", String, primary_key=True),
        Column("phase", String, primary_key=True),
        Column("issued", BigInteger, nullable=False),
        Column("succeeded", BigInteger, nullable=False),
        Column("failed", BigInteger, nullable=False),
        Column("retried", BigInteger, nullable=False),
        Column("timed_out", BigInteger, nullable=False),
        Column("ignored", BigInteger, nullable=False),
        Column("latency_count", BigInteger, nullable=False),
        Column("latency_sum_ms", Float, nullable=False),
        Column("latency_max_ms", Float, nullable=False),
        *(Column(c, BigInteger, nullable=False) for c in BUCKET_COLUMNS),
    )


def stats_sagas_table(metadata: MetaData, name: str) -> Table:
    """What the statistics need to remember per saga: events after the first do not name the
    definition, and a reply's latency is measured from its command's issue."""
    return Table(
        name,
        metadata,
        Column("saga_id", Uuid, primary_key=True),
        Column("definition", String, nullable=False),
        Column("definition_version", Integer, nullable=False),
        Column("command_id", Uuid),
        Column("issued_at", UTCDateTime),
    )


@dataclass(frozen=True)
class Projection:
    """A view: ``public`` is the name queries read; ``build`` makes one version's tables
    (the public one first)."""

    name: str
    public: str
    build: Callable[[MetaData, int], list[Table]]

    def tables(self, version: int, metadata: MetaData | None = None) -> list[Table]:
        return self.build(metadata or MetaData(), version)

    def tracking_key(self, version: int) -> str:
        return f"{self.name}_v{version}"


PROJECTIONS: dict[str, Projection] = {
    p.name: p
    for p in (
        Projection("status", "saga_status", lambda m, v: [status_table(m, f"saga_status_v{v}")]),
        Projection("audit", "saga_audit", lambda m, v: [audit_table(m, f"saga_audit_v{v}")]),
        Projection(
            "stats",
            "step_stats",
            lambda m, v: [
                stats_table(m, f"step_stats_v{v}"),
                stats_sagas_table(m, f"step_stats_v{v}_sagas"),
            ],
        ),
    )
}

CONTROL = MetaData()

projection_views = Table(
    "projection_views",
    CONTROL,
    Column("name", String, primary_key=True),
    Column("active_version", Integer, nullable=False),
    Column("building_version", Integer),
    Column("building_since", UTCDateTime),
    Column("switched_at", UTCDateTime),
)

projection_tracking = Table(
    "projection_tracking",
    CONTROL,
    Column("view", String, primary_key=True),  # "<projection>_v<version>"
    Column("name", String, nullable=False),
    Column("version", Integer, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("last_event_at", UTCDateTime),  # the time of the event at ``position``
    Column("updated_at", UTCDateTime),  # when a runner last committed here
)


def public_tables() -> dict[str, Table]:
    """The SQL views queries read, declared as tables (never created as such)."""
    metadata = MetaData()
    return {
        "status": status_table(metadata, "saga_status"),
        "audit": audit_table(metadata, "saga_audit"),
        "stats": stats_table(metadata, "step_stats"),
    }
