"""How the inspection commands print: rich tables for people, JSON for scripts."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from projections.eventinfo import json_default
from projections.monitor import ProjectionPosition
from projections.queries import AuditEntry, Page, StepStatistics
from projections.replay import Replay
from projections.status import StatusRow
from saga_es.state import SagaState, next_timer

__all__ = [
    "history_table",
    "page_table",
    "plain",
    "positions_table",
    "print_json",
    "replay_json",
    "replay_tables",
    "state_json",
    "stats_table",
    "status_table",
]


def plain(value: Any) -> Any:
    """``value`` as JSON values: dataclasses as objects, UUIDs and times as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(plain(k)): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    try:
        return json_default(value)  # UUIDs, decimals, times, enums
    except TypeError:
        return value  # a JSON value already


def print_json(console: Console, value: Any) -> None:
    console.print_json(json.dumps(plain(value)), highlight=False)


def _time(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def status_table(row: StatusRow) -> Table:
    table = Table(title=f"saga {row.saga_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    where = row.current_step or ""
    if where and row.phase:
        where += f" ({row.phase}, attempt {row.attempt})"
    if row.waiting_for:
        where += f", waiting for a {row.waiting_for} until {_time(row.next_deadline)}"
    error = ""
    if row.error_code:
        error = f"{row.error_code} at {row.error_step}: {row.error_message or ''}".rstrip(": ")
    for name, value in (
        ("definition", f"{row.definition} v{row.definition_version}"),
        ("business key", row.business_key),
        ("correlation id", row.correlation_id),
        ("state", row.state),
        ("where", where),
        ("stuck because", row.stuck_reason or ""),
        ("last error", error),
        ("retries", str(row.retries)),
        ("compensations", str(row.compensations)),
        ("started", _time(row.started_at)),
        ("updated", _time(row.updated_at)),
        ("finished", _time(row.finished_at)),
        ("version", str(row.version)),
    ):
        if value:
            table.add_row(name, value)
    return table


def page_table(page: Page) -> Table:
    table = Table(title=f"{len(page.items)} sagas")
    for column in ("saga id", "definition", "key", "state", "step", "last error", "updated"):
        table.add_column(column)
    for row in page.items:
        step = row.current_step or ""
        if step and row.attempt:
            step += f" #{row.attempt}"
        table.add_row(
            str(row.saga_id), f"{row.definition} v{row.definition_version}", row.business_key,
            row.state, step, row.error_code or "", _time(row.updated_at),
        )  # fmt: skip
    return table


def history_table(entries: Sequence[AuditEntry], *, title: str) -> Table:
    table = Table(title=title)
    for column in ("v", "time", "event", "step", "#", "actor", "details"):
        table.add_column(column)
    for e in entries:
        details = ", ".join(
            f"{k}={_short(v)}" for k, v in e.summary.items() if v not in ("", [], {})
        )
        table.add_row(
            str(e.version), _time(e.occurred_at), e.event_type, e.step or "",
            "" if e.attempt is None else str(e.attempt), e.actor, details,
        )  # fmt: skip
    return table


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 1] + "…"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def stats_table(rows: Sequence[StepStatistics]) -> Table:
    table = Table(title="step statistics (latency: command issued to reply, ms)")
    columns = ("definition", "step", "phase", "issued", "ok", "failed", "retried", "timed out")
    for column in (*columns, "ignored", "p50", "p95", "p99", "max"):
        table.add_column(column, justify="left" if column in columns[:3] else "right")
    for s in rows:
        table.add_row(
            f"{s.definition} v{s.definition_version}", s.step, s.phase, str(s.issued),
            str(s.succeeded), str(s.failed), str(s.retried), str(s.timed_out), str(s.ignored),
            _ms(s.p50_ms), _ms(s.p95_ms), _ms(s.p99_ms), _ms(s.latency_max_ms),
        )  # fmt: skip
    return table


def positions_table(rows: Sequence[ProjectionPosition]) -> Table:
    table = Table(title="projections")
    for column in ("projection", "version", "role", "position", "log head", "behind (events)"):
        table.add_column(column)
    table.add_column("behind (s)")
    table.add_column("last commit")
    for p in rows:
        lag = "-" if p.lag_seconds is None else f"{p.lag_seconds:.1f}"
        table.add_row(
            p.name, str(p.version), p.role, str(p.position), str(p.head), str(p.lag_events),
            lag, _time(p.updated_at),
        )  # fmt: skip
    return table


def state_json(state: SagaState | None) -> dict[str, Any] | None:
    if state is None:
        return None
    timer = next_timer(state)
    return {
        "status": state.status.value,
        "version": state.version,
        "current_step": state.current_step,
        "awaiting": plain(state.awaiting),
        "retry_wait": plain(state.retry_wait),
        "next_timer": plain(timer),
        "succeeded": list(state.succeeded),
        "compensation_plan": list(state.compensation_plan),
        "compensated": list(state.compensated),
        "failure": plain(state.failure),
        "stuck": plain(state.stuck),
        "stuck_reason": state.stuck_reason,
        "ignored_replies": state.ignored_replies,
        "updated_at": state.updated_at.isoformat(),
    }


def replay_json(replay: Replay) -> dict[str, Any]:
    return {
        "saga_id": str(replay.saga_id),
        "to_version": replay.to_version,
        "last_version": replay.last_version,
        "state": state_json(replay.state),
        "decisions": [
            {
                "cause": d.cause.why,
                "events": [
                    {
                        "version": e.version,
                        "type": e.event_type,
                        "actor": e.actor,
                        "time": e.event.timestamp.isoformat(),
                        "why": e.why,
                        "fields": e.summary(),
                    }
                    for e in d.events
                ],
                "commands": d.commands,
                "state": state_json(d.state),
                "note": d.note,
            }
            for d in replay.decisions
        ],
    }


def replay_tables(replay: Replay) -> list[Table]:
    upto = "" if replay.to_version == replay.last_version else f" up to version {replay.to_version}"
    table = Table(title=f"replay of saga {replay.saga_id}{upto} (of {replay.last_version})")
    for column in ("v", "time", "event", "actor", "why"):
        table.add_column(column)
    table.add_column("state after")
    for d in replay.decisions:
        for index, e in enumerate(d.events):
            after = ""
            if index == len(d.events) - 1 and d.state is not None:
                after = d.state.status.value + (
                    f" at {d.state.current_step}" if d.state.current_step else ""
                )
            if index == len(d.events) - 1 and d.note:
                after = f"{after} ({d.note})".strip()
            table.add_row(
                str(e.version), _time(e.event.timestamp), e.event_type, e.actor, e.why, after,
                end_section=index == len(d.events) - 1,
            )  # fmt: skip
    state = Table(title=f"state at version {replay.to_version}", show_header=False)
    state.add_column("field", style="bold")
    state.add_column("value")
    for key, value in (state_json(replay.state) or {}).items():
        if value not in (None, [], {}):
            state.add_row(key, json.dumps(value) if not isinstance(value, str) else value)
    return [table, state]
