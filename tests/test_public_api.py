"""Pins what users import and what is stored: changing either must be a conscious decision."""

from __future__ import annotations

import re
from pathlib import Path

from eventsourcing.utils import get_topic

import saga_es
from saga_es import errors
from saga_es.aggregate import Saga
from saga_es.events import ALL_EVENT_TYPES

PUBLIC = {
    "ActionRefusedError",
    "COMPENSATABLE",
    "PIVOT",
    "RETRIABLE",
    "CommandMessage",
    "ConcurrencyError",
    "ConfigurationError",
    "Decision",
    "DefinitionError",
    "InvalidInputError",
    "InvalidSagaDataError",
    "MalformedReplyError",
    "Outcome",
    "ReplyMessage",
    "RetryPolicy",
    "SagaDefinition",
    "SagaEngine",
    "SagaError",
    "SagaState",
    "SagaStatus",
    "StartConflictError",
    "Step",
    "StepKind",
    "StoreError",
    "TimerFired",
    "UnknownCommandError",
    "UnknownDefinitionError",
    "UnknownSagaError",
    "begin",
    "decide",
    "replay",
    "saga",
    "step",
}

# Stored events name their class by topic. Renaming or moving one of these classes without
# registering the old topic would make every stored saga unreadable.
STORED_TOPICS = [
    "saga_es.events:SagaStarted",
    "saga_es.events:StepCommandIssued",
    "saga_es.events:StepSucceeded",
    "saga_es.events:StepFailed",
    "saga_es.events:StepTimedOut",
    "saga_es.events:RetryScheduled",
    "saga_es.events:CompensationStarted",
    "saga_es.events:CompensationIssued",
    "saga_es.events:CompensationSucceeded",
    "saga_es.events:CompensationFailed",
    "saga_es.events:ReplyIgnored",
    "saga_es.events:SagaCompleted",
    "saga_es.events:SagaCompensated",
    "saga_es.events:SagaStuck",
    "saga_es.events:RetryAlertRaised",
    "saga_es.events:RetryRequested",
    "saga_es.events:SagaResumed",
    "saga_es.events:SagaAborted",
    "saga_es.events:StepMarkedCompensated",
    "saga_es.events:TimerRescheduled",
    "saga_es.events:TimerCancelled",
]


def test_public_surface_is_pinned() -> None:
    assert set(saga_es.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(saga_es, name), name


def test_stored_topics_are_pinned() -> None:
    assert [get_topic(cls) for cls in ALL_EVENT_TYPES] == STORED_TOPICS
    assert get_topic(Saga) == "saga_es.aggregate:Saga"


def test_every_error_is_drawn_in_the_errors_docstring() -> None:
    doc = errors.__doc__ or ""
    drawn = set(re.findall(r"(\w+Error)\b", doc))
    defined = {n for n in errors.__all__}
    assert defined <= drawn, f"not in the hierarchy drawing: {defined - drawn}"
    for name in defined:
        assert issubclass(getattr(errors, name), errors.SagaError)


def test_modules_stay_small() -> None:
    root = Path(saga_es.__file__).parent
    too_long = {
        str(p.relative_to(root)): n
        for p in root.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert not too_long, f"split these modules (one concept each): {too_long}"
