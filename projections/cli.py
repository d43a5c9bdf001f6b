"""The inspection commands: where a saga is, what happened to it, and the projections.

    saga-es status ID | --key KEY [--definition D]
    saga-es list [--state S] [--definition D] [--step X] [--error-code C] [--correlation-id I]
                 [--started-after T] [--started-before T] [--updated-after T]
                 [--updated-before T] [--stuck-for 10m] [--limit N] [--after CURSOR]
    saga-es history ID            the audit trail
    saga-es replay ID [--to-version N]     from the event stream itself, with each decision
    saga-es stats [--definition D]
    saga-es projections run [--once] | status | rebuild NAME

Every command takes ``--json`` (for scripts) and ``--database-url``. Errors are one line on
stderr and exit status 2 (``saga_es.cli.main`` prints every ``SagaError`` so).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console

from projections import render
from projections.errors import InvalidQueryError, UnknownProjectionError
from projections.monitor import positions
from projections.parsing import parse_duration, parse_saga_id, parse_time
from projections.queries import SagaQueries, TimeRange
from projections.rebuild import rebuild
from projections.replay import explain
from projections.runner import CATCH_UP_GROWTH, CATCH_UP_LIMIT, ProjectionRunner
from projections.schema import PROJECTIONS
from saga_es.cli_options import DatabaseUrl
from saga_es.errors import UnknownSagaError
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.store import SagaStore
from saga_es.signals import stop_on_signals

__all__ = ["projections_app", "register"]

console = Console()
log = logging.getLogger("projections.cli")
projections_app = typer.Typer(no_args_is_help=True, help="Run, watch and rebuild the views.")

Json = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]


def register(app: typer.Typer) -> None:
    """Add the inspection commands and ``projections`` to the ``saga-es`` command line."""
    for command in (status, list_sagas, history, replay, stats):
        name = "list" if command is list_sagas else command.__name__
        app.command(name)(command)
    app.add_typer(projections_app, name="projections")


@contextmanager
def _queries(database_url: str | None) -> Iterator[SagaQueries]:
    queries = SagaQueries(DatabaseSettings.resolve(database_url))
    try:
        yield queries
    finally:
        queries.close()


def status(
    saga_id: Annotated[
        str | None, typer.Argument(help="The saga's id.", show_default=False)
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="The saga's business key instead.")
    ] = None,
    definition: Annotated[
        str | None, typer.Option(help="With --key: only this definition.")
    ] = None,
    as_json: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Where a saga is, why, since when, and its latest events."""
    if (saga_id is None) == (key is None):
        raise InvalidQueryError(
            field="saga", value=saga_id or key, detail="give an ID or --key KEY, not both"
        )
    with _queries(database_url) as queries:
        if saga_id is not None:
            rows = [queries.status(parse_saga_id(saga_id))]
        else:
            assert key is not None
            rows = queries.status_by_key(key, definition=definition)
        histories = [queries.history(row.saga_id) for row in rows]
    if as_json:
        found = [
            {**render.plain(r), "history": render.plain(h)}
            for r, h in zip(rows, histories, strict=True)
        ]
        render.print_json(console, found[0] if saga_id is not None else found)
        return
    for row, entries in zip(rows, histories, strict=True):
        console.print(render.status_table(row))
        recent = entries[-8:]
        more = (
            f" (last {len(recent)} of {len(entries)}: saga-es history {row.saga_id})"
            if len(entries) > len(recent)
            else ""
        )
        console.print(render.history_table(recent, title=f"what happened{more}"))


def list_sagas(
    state: Annotated[
        str | None, typer.Option(help="started, pending, compensating, completed, failed or stuck.")
    ] = None,
    definition: Annotated[str | None, typer.Option(help="Definition name.")] = None,
    step: Annotated[str | None, typer.Option(help="Current step.")] = None,
    error_code: Annotated[str | None, typer.Option(help="Last error code.")] = None,
    correlation_id: Annotated[str | None, typer.Option(help="Correlation id.")] = None,
    started_after: Annotated[str | None, typer.Option(help="ISO 8601 time.")] = None,
    started_before: Annotated[str | None, typer.Option(help="ISO 8601 time.")] = None,
    updated_after: Annotated[str | None, typer.Option(help="ISO 8601 time.")] = None,
    updated_before: Annotated[str | None, typer.Option(help="ISO 8601 time.")] = None,
    stuck_for: Annotated[
        str | None,
        typer.Option(help="Still running, but no event for this long (10m, 2h): stuck candidates."),
    ] = None,
    limit: Annotated[int, typer.Option(help="Sagas per page (1-1000).")] = 50,
    after: Annotated[
        str | None, typer.Option(help="The cursor printed under the previous page.")
    ] = None,
    as_json: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Sagas matching every filter given, newest first, a page at a time."""

    def span(after_: str | None, before_: str | None, name: str) -> TimeRange | None:
        if after_ is None and before_ is None:
            return None
        return TimeRange(
            parse_time(after_, field=f"--{name}-after") if after_ else None,
            parse_time(before_, field=f"--{name}-before") if before_ else None,
        )

    started, updated = (
        span(started_after, started_before, "started"),
        span(updated_after, updated_before, "updated"),
    )
    idle = parse_duration(stuck_for, field="--stuck-for") if stuck_for is not None else None
    with _queries(database_url) as queries:
        page = queries.list_sagas(
            state=state, definition=definition, step=step, error_code=error_code,
            correlation_id=correlation_id, started=started, updated=updated, idle_for=idle,
            limit=limit, after=after,
        )  # fmt: skip
    if as_json:
        render.print_json(console, {"items": page.items, "next_cursor": page.next_cursor})
        return
    console.print(render.page_table(page))
    if page.next_cursor:
        console.print(f"next page: --after {page.next_cursor}", highlight=False, soft_wrap=True)


def history(
    saga_id: Annotated[str, typer.Argument(help="The saga's id.")],
    as_json: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """The saga's audit trail: every event, oldest first, with who caused it."""
    parsed = parse_saga_id(saga_id)
    with _queries(database_url) as queries:
        entries = queries.history(parsed)
    if as_json:
        render.print_json(console, entries)
        return
    console.print(render.history_table(entries, title=f"history of saga {parsed}"))


def replay(
    saga_id: Annotated[str, typer.Argument(help="The saga's id.")],
    to_version: Annotated[
        int | None, typer.Option(help="Stop after this event: the state as it was then.")
    ] = None,
    as_json: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Replay the saga's own event stream: each decision, its cause, its commands, and why."""
    parsed = parse_saga_id(saga_id)
    settings = DatabaseSettings.resolve(database_url)
    store = SagaStore(settings, create_tables=False, cache_size=0)
    try:
        events = store.events(parsed)
    finally:
        store.close()
    if not events:
        raise UnknownSagaError(saga_id=parsed, what="replay")
    result = explain(events, to_version=to_version)
    if as_json:
        render.print_json(console, render.replay_json(result))
        return
    for table in render.replay_tables(result):
        console.print(table)


def stats(
    definition: Annotated[str | None, typer.Option(help="Only this definition.")] = None,
    as_json: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Per step: commands issued, succeeded, failed, retried, timed out; latency p50/p95/p99."""
    with _queries(database_url) as queries:
        rows = queries.step_stats(definition=definition)
    if as_json:
        render.print_json(
            console, [{**render.plain(r), "compensated": r.compensated} for r in rows]
        )
        return
    console.print(render.stats_table(rows))


# -- saga-es projections ----------------------------------------------------------------------

_BATCH_HELP = (
    f"Events per transaction; while catching up on PostgreSQL batches grow to {CATCH_UP_GROWTH} "
    f"times as many (at most {CATCH_UP_LIMIT:,})."
)


@projections_app.command("run")
def run(
    once: Annotated[bool, typer.Option("--once", help="Catch up with the log, then exit.")] = False,
    only: Annotated[
        list[str] | None, typer.Option(help="Only this projection (repeatable).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=100_000, help=_BATCH_HELP)] = 1000,
    poll_interval: Annotated[float, typer.Option(min=0.01, help="Seconds between polls.")] = 1.0,
    pause_before_commit: Annotated[float, typer.Option(hidden=True, min=0.0)] = 0.0,
    log_level: Annotated[
        str, typer.Option(help="DEBUG, INFO (logs every batch), WARNING.")
    ] = "WARNING",
    as_json: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Follow the saga log and keep the views up to date (until SIGTERM/SIGINT: exit 0)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    names = _names(only)
    settings = DatabaseSettings.resolve(database_url)
    with ProjectionRunner(
        settings, names=names, batch_size=batch_size, poll_interval=poll_interval,
        pause_before_commit=pause_before_commit,
    ) as runner:  # fmt: skip
        if once:
            applied = runner.catch_up()
            if as_json:
                render.print_json(console, {"events": applied, "position": runner.head()})
            else:
                console.print(f"projections caught up: {applied} events applied")
            return
        stop = threading.Event()
        with stop_on_signals(
            stop.set,
            stopping=stop.is_set,
            log=log,
            graceful="stopping after the batch in hand",
            abrupt="stopping now; the batch in hand rolls back",
        ):
            runner.run(stop)


@projections_app.command("status")
def projections_status(as_json: Json = False, database_url: DatabaseUrl = None) -> None:
    """Each projection's position in the log, and how far behind it is."""
    settings = DatabaseSettings.resolve(database_url)
    runner = ProjectionRunner(settings)  # creates the views' tables if this is the first use
    try:
        found = positions(runner.db, runner.store)
    finally:
        runner.close()
    if as_json:
        render.print_json(console, found)
        return
    console.print(render.positions_table(found))


@projections_app.command("rebuild")
def projections_rebuild(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(PROJECTIONS)}.")],
    batch_size: Annotated[int, typer.Option(min=1, max=100_000, help=_BATCH_HELP)] = 1000,
    force: Annotated[
        bool, typer.Option(help="Take over from a rebuild whose process died.")
    ] = False,
    as_json: Json = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Build a new version of a view from the start of the log beside the live one, then
    switch to it atomically and drop the old one. Writers and runners keep going."""
    _names([name])
    report = rebuild(
        DatabaseSettings.resolve(database_url), name, batch_size=batch_size, force=force
    )
    if as_json:
        render.print_json(console, report)
        return
    console.print(
        f"{name}: version {report.new_version} built from {report.events} events in "
        f"{report.seconds:.1f}s and switched to; version {report.old_version} dropped"
    )


def _names(only: list[str] | None) -> list[str] | None:
    for name in only or []:
        if name not in PROJECTIONS:
            raise UnknownProjectionError(name=name, known=sorted(PROJECTIONS))
    return only or None
