"""Reporting a step's outcome straight to the engine, without a broker.

A service that shares the engine's database (or simply holds a ``SagaEngine``) can append the
saga's events itself: ``report_outcome`` builds the reply the participant worker would have
sent, with the same deterministic id, and hands it to ``SagaEngine.handle_reply`` in the
caller's thread. Reporting twice, or reporting and also replying through the broker, is
harmless: the engine's inbox keeps the first.

    outcome = report_outcome(engine, command, result={"charge_id": "ch-1"})
    outcome = report_outcome(engine, command, error=BusinessError("card_declined"))
    outcome = report_outcome(engine, command, error=TimeoutError("gateway"), retryable=True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from saga_es.engine import Outcome, SagaEngine
from saga_es.messages import CommandMessage, ReplyMessage
from saga_es.messaging import reply_id_for
from saga_es.participant.errors import BusinessError

__all__ = ["outcome_reply", "report_outcome"]


def outcome_reply(
    command: CommandMessage,
    *,
    result: Mapping[str, Any] | None = None,
    error: Exception | None = None,
    retryable: bool = False,
) -> ReplyMessage:
    """The reply to ``command``: success with ``result``, or a failure from ``error``.

    A ``BusinessError`` gives its code and message; any other exception the code
    ``transient`` (pass ``retryable=True`` to let the saga's retry policy try again).
    """
    if error is not None and result is not None:
        raise ValueError("a step's outcome is a result or an error, not both")
    reply_id = reply_id_for(command)
    if error is None:
        if retryable:
            raise ValueError("only a failure can be retryable")
        return command.reply_success(reply_id, dict(result or {}))
    if isinstance(error, BusinessError):
        return command.reply_failure(reply_id, error.code, error.message, retryable=retryable)
    message = f"{type(error).__name__}: {error}"[:10_000]
    return command.reply_failure(reply_id, "transient", message, retryable=retryable)


def report_outcome(
    engine: SagaEngine,
    command: CommandMessage,
    *,
    result: Mapping[str, Any] | None = None,
    error: Exception | None = None,
    retryable: bool = False,
) -> Outcome:
    """Feed the outcome of ``command`` to its saga now; returns what the engine decided
    (its ``commands`` are in the outbox for the relay, as after any reply)."""
    reply = outcome_reply(command, result=result, error=error, retryable=retryable)
    return engine.handle_reply(reply)
