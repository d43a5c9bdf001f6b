"""The participant SDK: the service side of saga steps.

    Participant        a service's handlers, its database and its Celery tasks
    BusinessError      raised by a handler to refuse a command (final for the step)
    current_delivery   which delivery a handler runs in (retries so far, redelivered)
    report_outcome     tell the engine a step's outcome directly, without the broker

Guarantees, per command (see ``applying`` and ``task``): the handler's writes and the record of
its outcome commit in one transaction, keyed by the command's ``idempotency_key``; retries and
redeliveries replay the recorded outcome; a compensation whose action never took effect is a
no-op that also makes sure the action never will.
"""

from saga_es.participant.applying import COMPENSATED, NOT_APPLIED, Handler
from saga_es.participant.delivery import Delivery, current_delivery
from saga_es.participant.errors import BusinessError, MalformedCommandError
from saga_es.participant.participant import Participant, Registration
from saga_es.participant.report import outcome_reply, report_outcome
from saga_es.participant.tables import DeadLetter, InboxEntry, Tables
from saga_es.participant.task import TRANSIENT_EXHAUSTED

__all__ = [
    "COMPENSATED",
    "NOT_APPLIED",
    "TRANSIENT_EXHAUSTED",
    "BusinessError",
    "DeadLetter",
    "Delivery",
    "Handler",
    "InboxEntry",
    "MalformedCommandError",
    "Participant",
    "Registration",
    "Tables",
    "current_delivery",
    "outcome_reply",
    "report_outcome",
]
