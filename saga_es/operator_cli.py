"""Operator commands: move a saga on by hand, on the record.

    saga-es retry ID --reason TEXT [--actor NAME]             issue the current step again now
    saga-es resume ID --reason TEXT [--actor NAME]            a stuck saga: issue again what failed
    saga-es abort ID --reason TEXT [--actor NAME]             stop going forward and compensate
    saga-es mark-compensated ID STEP --reason TEXT [--note TEXT] [--actor NAME]

Each is recorded as an event in the saga's own stream, with the actor and the reason; when the
saga's state rules an action out it is refused with one line saying why (exit status 2), and
nothing is recorded. ``saga_es.operator`` says when each action is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console

from saga_es.cli_options import (
    Actor,
    DatabaseUrl,
    Definitions,
    Reason,
    SagaId,
    default_actor,
    open_engine,
    parse_saga_id,
)
from saga_es.engine import Outcome, SagaEngine
from saga_es.worker import DEFAULT_DEFINITIONS

__all__ = ["register", "report"]

console = Console(highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the operator commands to ``app``."""
    app.command("retry")(retry)
    app.command("resume")(resume)
    app.command("abort")(abort)
    app.command("mark-compensated")(mark_compensated)


def retry(
    saga_id: SagaId,
    reason: Reason,
    actor: Actor = None,
    database_url: DatabaseUrl = None,
    definitions: Definitions = DEFAULT_DEFINITIONS,
) -> None:
    """Issue the current step's next attempt now, instead of waiting for its reply or retry."""
    _run(database_url, definitions, "retried", lambda e: e.retry_now(
        parse_saga_id(saga_id), actor=default_actor(actor), reason=reason))  # fmt: skip


def resume(
    saga_id: SagaId,
    reason: Reason,
    actor: Actor = None,
    database_url: DatabaseUrl = None,
    definitions: Definitions = DEFAULT_DEFINITIONS,
) -> None:
    """Resume a stuck saga: issue again what it got stuck on, with a fresh retry budget."""
    _run(database_url, definitions, "resumed", lambda e: e.resume(
        parse_saga_id(saga_id), actor=default_actor(actor), reason=reason))  # fmt: skip


def abort(
    saga_id: SagaId,
    reason: Reason,
    actor: Actor = None,
    database_url: DatabaseUrl = None,
    definitions: Definitions = DEFAULT_DEFINITIONS,
) -> None:
    """Stop going forward and compensate what was done (refused past the pivot)."""
    _run(database_url, definitions, "aborted", lambda e: e.abort(
        parse_saga_id(saga_id), actor=default_actor(actor), reason=reason))  # fmt: skip


def mark_compensated(
    saga_id: SagaId,
    step: Annotated[str, typer.Argument(help="The step whose effect was undone by hand.")],
    reason: Reason,
    note: Annotated[str, typer.Option(help="What was done by hand, for the record.")] = "",
    actor: Actor = None,
    database_url: DatabaseUrl = None,
    definitions: Definitions = DEFAULT_DEFINITIONS,
) -> None:
    """Record that a step's effect was undone by hand; the saga goes on compensating."""
    _run(database_url, definitions, f"step '{step}' marked compensated", lambda e: (
        e.mark_compensated(parse_saga_id(saga_id), step, actor=default_actor(actor),
                           reason=reason, note=note)))  # fmt: skip


def _run(
    database_url: str | None,
    definitions: str,
    done: str,
    action: Callable[[SagaEngine], Outcome],
) -> None:
    with open_engine(database_url, definitions) as engine:
        outcome = action(engine)
    console.print(report(outcome, done))


def report(outcome: Outcome, done: str) -> str:
    """One line: what was recorded, what was sent, where the saga is now."""
    state = outcome.state
    sent = "; ".join(f"sent {c.command} ({c.phase} attempt {c.attempt})" for c in outcome.commands)
    where = f"now {state.status.value}" + (
        f" at '{state.current_step}'" if state.current_step else ""
    )
    return f"saga {outcome.saga_id}: {done}" + (f"; {sent}" if sent else "") + f"; {where}"
