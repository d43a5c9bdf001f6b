"""Options the operator and timer commands share, and opening an engine from them."""

from __future__ import annotations

import getpass
import os
from typing import Annotated
from uuid import UUID

import typer

from saga_es.definition import SagaDefinition
from saga_es.engine import SagaEngine
from saga_es.persistence.settings import DATABASE_URL_ENV
from saga_es.worker import DEFAULT_DEFINITIONS, DEFINITIONS_ENV, load_definitions

__all__ = [
    "ACTOR_ENV",
    "Actor",
    "DatabaseUrl",
    "Definitions",
    "Reason",
    "SagaId",
    "default_actor",
    "definitions_from",
    "open_engine",
    "parse_saga_id",
]

ACTOR_ENV = "SAGA_ES_ACTOR"

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help=f"postgresql://... or sqlite:///path (default: ${DATABASE_URL_ENV}, else "
        "sqlite:///saga-es.db)",
        show_default=False,
    ),
]
Definitions = Annotated[
    str,
    typer.Option(
        envvar=DEFINITIONS_ENV, help="The sagas' definitions, as module:attribute, comma-separated."
    ),
]
SagaId = Annotated[str, typer.Argument(help="The saga's id (a UUID).", show_default=False)]
Reason = Annotated[
    str, typer.Option("--reason", help="Why; recorded in the saga's history.", show_default=False)
]
Actor = Annotated[
    str | None,
    typer.Option(
        "--actor",
        help=f"Who is acting (default: ${ACTOR_ENV}, else the login name).",
        show_default=False,
    ),
]


def default_actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return os.environ.get(ACTOR_ENV) or getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown"


def parse_saga_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a saga id (a UUID)", param_hint="ID") from None


def definitions_from(spec: str) -> list[SagaDefinition]:
    try:
        return load_definitions(spec)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--definitions") from exc


def open_engine(database_url: str | None, definitions: str = DEFAULT_DEFINITIONS) -> SagaEngine:
    return SagaEngine(definitions_from(definitions), database_url=database_url)
