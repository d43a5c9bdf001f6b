"""``saga-es timers``: run the timer process, and list, reschedule or cancel sagas' timers.

    saga-es timers run [--batch-size N] [--poll-interval S] [--lease S] [--once]
    saga-es timers list [--saga ID] [--limit N]
    saga-es timers reschedule ID (--at 2030-01-01T12:00:00+00:00 | --in 30s) --reason TEXT
    saga-es timers cancel ID --reason TEXT [--timer TIMER_ID]

Rescheduling and cancelling are operator actions, recorded in the saga's stream with the actor
and the reason. Cancelling a retry leaves the saga stuck (nothing else would move it).
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Annotated
from uuid import UUID

import typer
from rich.console import Console
from rich.table import Table

from saga_es.cli_options import (
    Actor,
    DatabaseUrl,
    Definitions,
    Reason,
    SagaId,
    default_actor,
    definitions_from,
    open_engine,
    parse_saga_id,
)
from saga_es.operator_cli import report
from saga_es.timer_process import run_timers
from saga_es.worker import DEFAULT_DEFINITIONS

__all__ = ["parse_duration", "timers_app"]

timers_app = typer.Typer(no_args_is_help=True, help="Saga timers: fire, list, reschedule, cancel.")
console = Console(highlight=False, soft_wrap=True)

TimerId = Annotated[
    str | None,
    typer.Option(
        "--timer",
        help="Act only if this is still the saga's pending timer (as listed).",
        show_default=False,
    ),
]


@timers_app.command("run")
def run(
    database_url: DatabaseUrl = None,
    definitions: Definitions = DEFAULT_DEFINITIONS,
    batch_size: Annotated[
        int,
        typer.Option(
            min=1, max=10_000, envvar="SAGA_ES_TIMERS_BATCH_SIZE", help="Timers per claim."
        ),
    ] = 100,
    poll_interval: Annotated[
        float,
        typer.Option(
            min=0.01, envvar="SAGA_ES_TIMERS_POLL_INTERVAL", help="Longest sleep, in seconds."
        ),
    ] = 1.0,
    lease: Annotated[
        float,
        typer.Option(
            min=0.1,
            envvar="SAGA_ES_TIMERS_LEASE",
            help="Seconds a claimed timer is kept from other processes (after a crash: waits).",
        ),
    ] = 60.0,
    once: Annotated[bool, typer.Option(help="Fire what is due now, then exit.")] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING...")] = "INFO",
) -> None:
    """Fire due timers into the engine until SIGTERM/SIGINT (then exit 0). Several may run."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stats = run_timers(
        definitions_from(definitions),
        database_url,
        once=once,
        batch_size=batch_size,
        poll_interval=poll_interval,
        lease=timedelta(seconds=lease),
    )
    if once:
        console.print(
            f"fired {stats.fired} timers ({stats.unchanged} changed nothing, {stats.failed} failed)"
        )


@timers_app.command("list")
def list_timers(
    saga: Annotated[str | None, typer.Option(help="Only this saga's timer.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, soonest first.")] = 100,
    database_url: DatabaseUrl = None,
    definitions: Definitions = DEFAULT_DEFINITIONS,
) -> None:
    """Pending timers, soonest first."""
    with open_engine(database_url, definitions) as engine:
        timers = engine.timers(parse_saga_id(saga) if saga else None, limit=limit)
    if not timers:
        console.print("no pending timers" + (f" for saga {saga}" if saga else ""))
        return
    table = Table(title="Pending timers")
    for column in ("saga", "kind", "step", "phase", "attempt", "due", "timer"):
        table.add_column(column, no_wrap=True)
    for t in timers:
        table.add_row(
            str(t.saga_id), t.kind, t.step, t.phase, str(t.attempt), t.due.isoformat(),
            str(t.timer_id),
        )  # fmt: skip
    # Piped into grep or a file, ids must come out whole: no terminal width to fit.
    Console(width=None if sys.stdout.isatty() else 250).print(table)


@timers_app.command("reschedule")
def reschedule(
    saga_id: SagaId,
    reason: Reason,
    at: Annotated[str | None, typer.Option(help="New due time, ISO 8601 with a time zone.")] = None,
    in_: Annotated[
        str | None, typer.Option("--in", help="New due time from now: 30s, 5m, 2h, 1d, now.")
    ] = None,
    timer: TimerId = None,
    actor: Actor = None,
    database_url: DatabaseUrl = None,
    definitions: Definitions = DEFAULT_DEFINITIONS,
) -> None:
    """Move the saga's timer (its reply deadline or its retry) to a new time."""
    if (at is None) == (in_ is None):
        raise typer.BadParameter("give exactly one of --at and --in", param_hint="--at/--in")
    with open_engine(database_url, definitions) as engine:
        due = _parse_at(at) if at is not None else engine.clock() + parse_duration(in_ or "")
        outcome = engine.reschedule_timer(
            parse_saga_id(saga_id),
            due,
            actor=default_actor(actor),
            reason=reason,
            timer_id=_timer_id(timer),
        )
    console.print(report(outcome, f"timer due at {due.isoformat()}"))


@timers_app.command("cancel")
def cancel(
    saga_id: SagaId,
    reason: Reason,
    timer: TimerId = None,
    actor: Actor = None,
    database_url: DatabaseUrl = None,
    definitions: Definitions = DEFAULT_DEFINITIONS,
) -> None:
    """Cancel the saga's pending timer (a cancelled retry leaves the saga stuck)."""
    with open_engine(database_url, definitions) as engine:
        outcome = engine.cancel_timer(
            parse_saga_id(saga_id),
            actor=default_actor(actor),
            reason=reason,
            timer_id=_timer_id(timer),
        )
    console.print(report(outcome, "timer cancelled"))


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``30s``, ``5m``, ``2h``, ``1d``, ``90`` (seconds) or ``now``."""
    text = text.strip().lower()
    if text == "now":
        return timedelta(0)
    found = _DURATION.match(text)
    if found is None:
        raise typer.BadParameter(
            f"{text!r}: expected a duration such as 30s, 5m, 2h or 1d, or now", param_hint="--in"
        )
    return timedelta(seconds=float(found.group(1)) * _UNITS[found.group(2)])


def _parse_at(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time", param_hint="--at") from None
    if moment.tzinfo is None:
        raise typer.BadParameter(
            f"{text!r} has no time zone; add one, e.g. +00:00", param_hint="--at"
        )
    return moment.astimezone(UTC)


def _timer_id(text: str | None) -> UUID | None:
    if text is None:
        return None
    try:
        return UUID(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a timer id", param_hint="--timer") from None
