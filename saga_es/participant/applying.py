"""Apply one command exactly once per idempotency key, in one transaction.

    claim the key ──taken──> replay the stored outcome (or refuse an action that was compensated)
        │
        ├─ compensation whose action never applied here ──> tombstone the action's key, succeed
        │
        └─ run the handler
             ├─ returns        ──> record success + result, commit
             ├─ BusinessError  ──> roll back everything, then in a new transaction claim the
             │                     key with the failure (or, if another delivery claimed it
             │                     meanwhile, replay that outcome)
             └─ anything else  ──> roll back everything (nothing recorded): a transient failure,
                                   raised to the caller, which tries again later

Whichever way it goes, the handler's writes (if they stay) and the inbox row are one fact. A
refusal costs a second transaction instead of a savepoint around every handler: refusals are
the rare path, and a savepoint is two more round trips on every command. The reply is only
built here; sending it is the caller's business, after the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from saga_es.ids import idempotency_key
from saga_es.messages import CommandMessage, ReplyMessage
from saga_es.messaging import reply_id_for
from saga_es.participant.errors import BusinessError
from saga_es.participant.inbox import Inbox, InboxRecord
from saga_es.participant.tables import FAILURE, SUCCESS, TOMBSTONE
from saga_es.participant.transactions import Transactions

__all__ = ["COMPENSATED", "NOT_APPLIED", "Handler", "apply_command", "describe"]

log = logging.getLogger("saga_es.participant")

#: Handlers take the command and what the participant's transaction writes with: a SQLAlchemy
#: ``Session`` or a psycopg ``Connection`` (see ``transactions``). They must not commit or roll
#: back: the participant does, together with its inbox row.
Handler = Callable[[CommandMessage, Any], Mapping[str, Any] | None]

#: Error code of a late action refused because its compensation came first.
COMPENSATED = "compensated"
#: Result of a compensation whose action never took effect here: there was nothing to undo.
NOT_APPLIED: Mapping[str, Any] = MappingProxyType(
    {"undone": False, "reason": "the action never took effect here"}
)


def apply_command(begin: Transactions, command: CommandMessage, handler: Handler) -> ReplyMessage:
    """Apply ``command`` with ``handler`` unless its effect was decided already; the reply.

    ``begin`` opens the participant's transactions (``saga_es.participant.transactions``).
    Raises whatever the handler (or the database) raised other than ``BusinessError``, after
    rolling back: the command may be tried again.
    """
    try:
        with begin() as (inbox, writer):
            if not inbox.claim(command):
                return _replay(command, inbox.get(command.idempotency_key))
            if command.phase == "compensation" and not _action_took_effect(inbox, command):
                log.info(
                    "%s: the action never took effect here; nothing to undo", describe(command)
                )
                return _record(inbox, command, _success(command, NOT_APPLIED))
            try:
                result = handler(command, writer)
            except BusinessError as refusal:
                raise _RefusedError(refusal) from refusal  # leaving the block rolls it all back
            if result is not None and not isinstance(result, Mapping):
                raise TypeError(
                    f"{describe(command)}: the handler returned {type(result).__name__}; "
                    "a handler returns a dict (the step's result) or None"
                )
            return _record(inbox, command, _success(command, result or {}))
    except _RefusedError as refused:
        reply = _failure(command, refused.refusal.code, refused.refusal.message)
        with begin() as (inbox, _):
            if inbox.claim(command, reply):
                return reply
            return _replay(command, inbox.get(command.idempotency_key))


class _RefusedError(Exception):
    """Carries a handler's ``BusinessError`` out of its transaction, rolling that back."""

    def __init__(self, refusal: BusinessError) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


def _action_took_effect(inbox: Inbox, compensation: CommandMessage) -> bool:
    """Whether the action this compensation undoes committed here. When it has not (yet),
    its key is tombstoned in this transaction, so it can never commit later: "compensate an
    in-doubt step" is safe because the no-op and the refusal are decided together."""
    action_key = idempotency_key(compensation.saga_id, "action", compensation.step)
    # Usually the action committed long before: one read settles it. Committed inbox rows
    # always hold a final outcome (the claim and its outcome commit together).
    action = inbox.get(action_key)
    if action is None:
        if inbox.tombstone(action_key, compensation):
            return False
        # The action claimed its key after that read: the tombstone waited for its
        # transaction, which committed. Its outcome is final now.
        action = inbox.get(action_key)
    return action is not None and action.outcome == SUCCESS


def _replay(command: CommandMessage, entry: InboxRecord | None) -> ReplyMessage:
    if entry is None:  # the key was taken, yet there is no row: only a deleted row does that
        raise RuntimeError(f"{describe(command)}: inbox key taken but no row found; try again")
    log.info(
        "%s: decided already (%s, by message %s); replying that outcome again",
        describe(command),
        entry.outcome,
        entry.first_message_id,
    )
    if entry.outcome == TOMBSTONE:
        return _failure(
            command,
            COMPENSATED,
            f"saga {command.saga_id} step '{command.step}': compensated before this action "
            "arrived; it was not applied and will not be",
        )
    if entry.outcome == FAILURE:
        return _failure(command, entry.error_code or "error", entry.error_message)
    return _success(command, entry.result)


def _record(inbox: Inbox, command: CommandMessage, reply: ReplyMessage) -> ReplyMessage:
    inbox.record(command, reply)
    return reply


def _success(command: CommandMessage, result: Mapping[str, Any]) -> ReplyMessage:
    reply = command.reply_success(reply_id_for(command), dict(result))
    # Stored and sent as JSON: a Decimal or a UUID in a result becomes text once, here, so the
    # replayed result is exactly the first one.
    return ReplyMessage.model_validate(reply.model_dump(mode="json"))


def _failure(command: CommandMessage, code: str, message: str) -> ReplyMessage:
    return command.reply_failure(reply_id_for(command), code[:200], message[:10_000])


def describe(command: CommandMessage) -> str:
    """How log lines and errors name a command: saga, step, phase, command, attempt, message."""
    return (
        f"saga {command.saga_id} step '{command.step}' {command.phase} '{command.command}' "
        f"attempt {command.attempt} (message {command.message_id})"
    )
