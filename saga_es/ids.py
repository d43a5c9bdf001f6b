"""Deterministic identifiers.

Everything the engine names is derived from the saga id, so that deciding the same thing twice
(after an optimistic-concurrency retry, or in a replay) yields the same ids, and the unique keys
of the outbox and the event store turn a repeat into a rejected duplicate instead of a second
command.
"""

from __future__ import annotations

from uuid import UUID, uuid5

__all__ = [
    "SAGA_NAMESPACE",
    "command_id",
    "event_id",
    "idempotency_key",
    "retry_timer_id",
    "saga_id_for",
    "spread",
]

#: Fixed namespace for saga ids. Changing it would orphan every stored saga.
SAGA_NAMESPACE = UUID("5b0c1f0e-6a52-4c1e-9d37-3f1a7c2e9b11")


def saga_id_for(definition: str, business_key: str) -> UUID:
    """The one saga a (definition name, business key) pair can ever have."""
    return uuid5(SAGA_NAMESPACE, f"{definition}/{business_key}")


def command_id(saga_id: UUID, phase: str, step: str, attempt: int) -> UUID:
    """Message id of one attempt of a step's action or compensation (also its outbox key)."""
    return uuid5(saga_id, f"command/{phase}/{step}/{attempt}")


def idempotency_key(saga_id: UUID, phase: str, step: str) -> UUID:
    """The same for every attempt of a step's action (or compensation).

    Participants deduplicate on this key, not on the message id: a retry after a timeout must not
    apply the effect a second time if the first attempt did commit, only late.
    """
    return uuid5(saga_id, f"effect/{phase}/{step}")


def retry_timer_id(saga_id: UUID, phase: str, step: str, attempt: int) -> UUID:
    return uuid5(saga_id, f"retry/{phase}/{step}/{attempt}")


def event_id(saga_id: UUID, version: int) -> UUID:
    """A stable id for the saga's event at ``version`` (used as a command's causation id)."""
    return uuid5(saga_id, f"event/{version}")


def spread(saga_id: UUID, phase: str, step: str, attempt: int) -> float:
    """A number in [0, 1) fixed by its arguments: the jitter of a retry delay, without a RNG."""
    return uuid5(saga_id, f"jitter/{phase}/{step}/{attempt}").int / 2**128
