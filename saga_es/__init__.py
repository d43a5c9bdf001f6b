"""saga-es: event-sourced sagas with a transactional outbox.

The public surface is what ``__all__`` lists; ``tests/test_public_api.py`` pins it.
"""

from saga_es.decide import Decision, TimerFired, begin, decide
from saga_es.definition import (
    COMPENSATABLE,
    PIVOT,
    RETRIABLE,
    SagaDefinition,
    Step,
    StepKind,
    saga,
    step,
)
from saga_es.engine import Outcome, SagaEngine
from saga_es.errors import (
    ActionRefusedError,
    ConcurrencyError,
    ConfigurationError,
    DefinitionError,
    InvalidInputError,
    InvalidSagaDataError,
    MalformedReplyError,
    SagaError,
    StartConflictError,
    StoreError,
    UnknownCommandError,
    UnknownDefinitionError,
    UnknownSagaError,
)
from saga_es.messages import CommandMessage, ReplyMessage
from saga_es.retry import RetryPolicy
from saga_es.state import SagaState, SagaStatus, replay

__all__ = [
    "COMPENSATABLE",
    "PIVOT",
    "RETRIABLE",
    "ActionRefusedError",
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
]
