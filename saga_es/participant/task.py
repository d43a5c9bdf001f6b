"""The Celery edge of a participant: one task per command, named like the command.

Per message: read the envelope (a malformed one is dead-lettered and acknowledged, never
retried), apply the command in one transaction, then send the reply. A transient failure is
retried by Celery with exponential backoff; when the retries run out, the engine gets a
*retryable* failure (``transient_exhausted``) and decides itself whether to try the step again.

Tasks are acknowledged late and rejected back to the queue if the worker dies: a worker killed
after its commit but before its reply gets the message again, finds the inbox row and replies
with the stored outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from saga_es.backoff import exponential_delay
from saga_es.messages import CommandMessage, ReplyMessage
from saga_es.messaging import reply_id_for
from saga_es.participant.applying import describe
from saga_es.participant.delivery import Delivery, delivering
from saga_es.participant.envelope import read_command
from saga_es.participant.errors import MalformedCommandError

if TYPE_CHECKING:
    from saga_es.participant.participant import Participant, Registration

__all__ = ["TRANSIENT_EXHAUSTED", "register_task"]

log = logging.getLogger("saga_es.participant")

#: Error code of the retryable failure replied when a command's transient retries ran out.
TRANSIENT_EXHAUSTED = "transient_exhausted"


def register_task(participant: Participant, registration: Registration) -> None:
    @participant.celery.task(  # type: ignore[untyped-decorator]
        name=registration.command,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        # The message decides what is wrong with its arguments (read_command), not Celery.
        typing=False,
        max_retries=registration.max_retries,
        ignore_result=True,
        # Celery's default adds a task to every app in the process: it is this app's only.
        shared=False,
    )
    def run(task: Any, *args: Any, **kwargs: Any) -> None:
        _handle(participant, registration, task, args, kwargs)


def _handle(
    participant: Participant,
    registration: Registration,
    task: Any,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> None:
    request = task.request
    message_id = None if request.id is None else str(request.id)
    retries = int(request.retries or 0)
    try:
        command = read_command(
            participant=participant.name,
            task=registration.command,
            message_id=message_id,
            args=args,
            kwargs=kwargs,
        )
    except MalformedCommandError as malformed:
        _dead_letter(participant, registration, task, malformed, args, kwargs)
        return
    delivery = Delivery(
        task_id=message_id or "",
        retries=retries,
        redelivered=bool((request.delivery_info or {}).get("redelivered")),
    )
    with delivering(delivery):
        try:
            reply = participant.process(command)
        except Exception as exc:
            reply = _transient(registration, task, command, exc)
    _send(participant, registration, task, command, reply)


def _transient(
    registration: Registration, task: Any, command: CommandMessage, exc: Exception
) -> ReplyMessage:
    """Retry later (raises Celery's Retry) or, with no retries left, the failure to reply."""
    retries = int(task.request.retries or 0)
    failure = f"{type(exc).__name__}: {exc}"
    if retries < registration.max_retries:
        delay = _delay(registration, retries)
        log.warning(
            "%s: transient failure (%s); retry %d of %d in %.2fs",
            describe(command),
            failure,
            retries + 1,
            registration.max_retries,
            delay,
        )
        raise task.retry(exc=exc, countdown=delay, max_retries=registration.max_retries)
    log.error(
        "%s: transient failure (%s) after %d retries; replying a retryable failure",
        describe(command),
        failure,
        retries,
        exc_info=exc,
    )
    return command.reply_failure(
        reply_id_for(command), TRANSIENT_EXHAUSTED, failure[:10_000], retryable=True
    )


def _send(
    participant: Participant,
    registration: Registration,
    task: Any,
    command: CommandMessage,
    reply: ReplyMessage,
) -> None:
    try:
        participant.send_reply(command, reply)
    except Exception as exc:
        retries = int(task.request.retries or 0)
        if retries < registration.max_retries:
            # The outcome is committed: running the command again only replays it.
            log.warning(
                "%s: reply not sent (%s: %s); retrying", describe(command), type(exc).__name__, exc
            )
            raise task.retry(
                exc=exc,
                countdown=_delay(registration, retries),
                max_retries=registration.max_retries,
            ) from exc
        # The saga's deadline for the step covers a reply that never arrives: the engine
        # retries (same idempotency key) and that attempt replays the stored outcome.
        log.error(
            "%s: reply not sent (%s: %s); giving up", describe(command), type(exc).__name__, exc
        )
        return
    if log.isEnabledFor(logging.INFO):  # describe() is not free, and this runs per command
        outcome = (
            reply.outcome if reply.ok else f"failure {reply.error_code} ({reply.error_message})"
        )
        log.info("%s: replied %s", describe(command), outcome)


def _dead_letter(
    participant: Participant,
    registration: Registration,
    task: Any,
    malformed: MalformedCommandError,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> None:
    message_id = malformed.context.get("message_id")
    try:
        participant.dead_letter(
            task=registration.command,
            message_id=message_id,
            body={"args": list(args), "kwargs": dict(kwargs)},
            error=str(malformed),
        )
    except Exception as exc:
        retries = int(task.request.retries or 0)
        if retries < registration.max_retries:
            log.warning("%s; could not keep it (%s), retrying", malformed, exc)
            raise task.retry(
                exc=exc,
                countdown=_delay(registration, retries),
                max_retries=registration.max_retries,
            ) from exc
        log.critical("%s; could not keep it (%s): dropped", malformed, exc)
        return
    log.error("%s; kept in participant_dead_letters, not handled", malformed)


def _delay(registration: Registration, retries: int) -> float:
    return exponential_delay(
        retries, base=registration.backoff, cap=registration.backoff_max, jitter=registration.jitter
    )
