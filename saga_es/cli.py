"""The ``saga-es`` command line. Typer and rich stay here, at the edge.

    saga-es db init [--database-url URL]     create the schema once, before any worker starts
    saga-es demo [--sagas N] [--database-url URL]
    saga-es worker [--database-url URL] [--broker-url URL] [--definitions M:A,...]
                   [--concurrency N] [--batch-size N]   feed participants' replies to sagas
    saga-es relay [--database-url URL] [--broker-url URL] [--batch-size N] [--poll-interval S]
                  [--retention 7d] [--on-parked block|skip]   publish the outbox to the broker
    saga-es timers run|list|reschedule|cancel      fire due timers; inspect or change them
    saga-es retry|resume|abort|mark-compensated ID ... --reason TEXT     operator actions
    saga-es status|list|history|replay|stats ...   inspect sagas (projections.cli)
    saga-es projections run|status|rebuild         keep the status, audit and stats views

Errors from saga-es print as one clear line and exit with status 2; never a traceback.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from projections.cli import register as register_inspection_commands
from saga_es.cli_options import DatabaseUrl
from saga_es.demo.run import DemoReport, run_demo
from saga_es.errors import SagaError
from saga_es.operator_cli import register as register_operator_commands
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.store import init_database
from saga_es.timer_cli import timers_app
from saga_es.worker import DEFAULT_DEFINITIONS, DEFINITIONS_ENV, EngineWorker, load_definitions

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Event-sourced sagas.")
db_app = typer.Typer(no_args_is_help=True, help="Database administration.")
app.add_typer(db_app, name="db")
app.add_typer(timers_app, name="timers")  # run, list, reschedule, cancel (saga_es.timer_cli)
register_operator_commands(app)  # retry, resume, abort, mark-compensated (saga_es.operator_cli)
register_inspection_commands(app)  # status, list, history, replay, stats, projections
console = Console()
errors = Console(stderr=True)


@db_app.command("init")
def db_init(database_url: DatabaseUrl = None) -> None:
    """Create the saga tables (idempotent). Run once before starting engines or workers."""
    settings = DatabaseSettings.resolve(database_url)
    init_database(settings)
    console.print(f"saga tables ready at {settings.redacted()}")


@app.command()
def demo(
    sagas: Annotated[
        int, typer.Option(min=1, max=10_000, help="How many order sagas to run.")
    ] = 40,
    postgres: Annotated[
        str | None,
        typer.Option("--postgres", help="Run on this PostgreSQL (postgresql://...?schema=...)."),
    ] = None,
    broker: Annotated[
        str | None, typer.Option("--broker", help="Run through this RabbitMQ (amqp://...).")
    ] = None,
) -> None:
    """Run a batch of order sagas through the relay, Celery and the example participants."""
    if postgres is None:
        database_url, shop_url = _fresh_sqlite("saga-es-demo.db"), _fresh_sqlite("saga-es-shop.db")
    else:
        database_url = shop_url = postgres
    broker_url = broker or "memory://"
    where = DatabaseSettings.resolve(database_url).redacted()
    console.print(f"[bold]saga-es demo[/]: {sagas} order sagas, stored in {where}")
    console.print(
        "Each command goes into the outbox with the saga's events, the relay publishes it "
        f"through Celery ({'in-process broker' if broker is None else broker_url}) to the "
        "example inventory, payment, shipping and notification participants, and their "
        "replies come back through Celery to the engine worker. Orders ending in 3 get their "
        "card declined, in 7 find no carrier, in 5 hit a transient payment error once.\n"
    )
    columns = (TextColumn("sagas finished"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("sagas", total=sagas)
        report = run_demo(
            database_url=database_url,
            shop_database_url=shop_url,
            broker_url=broker_url,
            sagas=sagas,
            on_progress=lambda done: progress.update(task, completed=done),
        )
    _print_report(report)


def _fresh_sqlite(name: str) -> str:
    path = Path(name).absolute()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}"


@app.command()
def worker(
    database_url: DatabaseUrl = None,
    broker_url: Annotated[
        str | None,
        typer.Option(
            "--broker-url",
            help="amqp://... (default: $SAGA_ES_BROKER_URL, else the local RabbitMQ)",
            show_default=False,
        ),
    ] = None,
    definitions: Annotated[
        str,
        typer.Option(
            envvar=DEFINITIONS_ENV,
            help="The sagas to serve, as module:attribute, comma-separated.",
        ),
    ] = DEFAULT_DEFINITIONS,
    concurrency: Annotated[
        int, typer.Option(min=1, max=64, help="Consumers (threads), each with its own connection.")
    ] = 1,
    batch_size: Annotated[
        int, typer.Option(min=1, max=10_000, help="Most replies recorded in one transaction.")
    ] = 100,
    linger: Annotated[
        float,
        typer.Option(min=0.0, max=0.25, help="Under load, seconds a batch waits for more."),
    ] = 0.02,
    log_level: Annotated[str, typer.Option(help="DEBUG/INFO log every reply.")] = "INFO",
) -> None:
    """Run the engine worker: feed replies from saga_es.replies to their sagas, recording
    the replies that are waiting together, until SIGTERM/SIGINT (then exit 0)."""
    import logging

    from saga_es.reply_consumer import run_consumers

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        loaded = load_definitions(definitions)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--definitions") from exc
    engine_worker = EngineWorker(loaded, database_url=database_url, broker_url=broker_url)
    engine_worker.check()
    run_consumers(
        engine_worker,
        broker_url=broker_url,
        batch_size=batch_size,
        linger=linger,
        concurrency=concurrency,
    )


@app.command()
def relay(
    database_url: DatabaseUrl = None,
    broker_url: Annotated[
        str | None,
        typer.Option(
            "--broker-url",
            help="amqp://... or memory:// (default: $SAGA_ES_BROKER_URL, else the local RabbitMQ)",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Rows per batch.")] = 500,
    poll_interval: Annotated[
        float, typer.Option(min=0.01, help="Seconds between polls when no notification comes.")
    ] = 1.0,
    retention: Annotated[
        str, typer.Option(help="Delete rows published longer ago than this (30m, 12h, 7d; off).")
    ] = "7d",
    on_parked: Annotated[
        str,
        typer.Option(
            help="block: a parked row holds back its saga's later commands; skip: they go on."
        ),
    ] = "block",
    max_attempts: Annotated[
        int, typer.Option(min=1, help="Attempts at a failing row before it is parked.")
    ] = 5,
    allowed_queue: Annotated[
        list[str] | None,
        typer.Option(help="Allowed destination queue or pattern (repeatable; default: any)."),
    ] = None,
    linger: Annotated[
        float,
        typer.Option(
            min=0.0, max=0.5, help="Under load, seconds to let rows gather before a claim."
        ),
    ] = 0.02,
    log_level: Annotated[str, typer.Option(help="DEBUG logs every message published.")] = "INFO",
) -> None:
    """Publish committed outbox rows to the broker until SIGTERM/SIGINT (then exit 0)."""
    import logging

    from outbox_relay.runner import parse_retention, run_relay

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if on_parked not in ("block", "skip"):
        raise typer.BadParameter("must be 'block' or 'skip'", param_hint="--on-parked")
    try:
        keep = parse_retention(retention)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--retention") from exc
    run_relay(
        database_url,
        broker_url,
        batch_size=batch_size,
        poll_interval=poll_interval,
        retention=keep,
        on_parked="skip" if on_parked == "skip" else "block",
        max_attempts=max_attempts,
        allowed_queues=allowed_queue or None,
        linger=min(linger, poll_interval / 2),
    )


def _print_report(report: DemoReport) -> None:
    summary = Table(title="Outcome")
    summary.add_column("state")
    summary.add_column("sagas", justify="right")
    for state, count in report.counts.items():
        if count:
            summary.add_row(state, str(count))
    console.print(summary)
    effects = ", ".join(f"{table} {count}" for table, count in report.effects.items())
    console.print(
        f"{report.events} events and {report.outbox_published} published commands in "
        f"{report.seconds:.1f}s; effects recorded by the participants: {effects}\n"
    )
    if not report.timeline:
        return
    first = report.timeline[0]
    timeline = Table(title=f"Timeline of compensated saga {first.business_key}")
    for column in ("v", "after", "event", "details"):
        timeline.add_column(column)
    for event in report.timeline:
        timeline.add_row(
            str(event.originator_version),
            _offset(first.timestamp, event.timestamp),
            type(event).__name__,
            _details(event),
        )
    console.print(timeline)


def _offset(start: datetime, moment: datetime) -> str:
    return f"+{(moment - start).total_seconds() * 1000:.0f} ms"


def _details(event: Any) -> str:
    shown = ("step", "attempt", "command", "error_code", "message", "plan", "reason", "compensated")
    return ", ".join(f"{k}={v}" for k, v in vars(event).items() if k in shown and v not in ("", []))


def main() -> None:
    try:
        app()
    except SagaError as exc:
        errors.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
