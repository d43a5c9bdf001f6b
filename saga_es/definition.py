"""Saga definitions: the business process as a list of steps, validated when built.

    order_fulfillment = saga(
        "order-fulfillment", version=1, data=Order,
        steps=[
            step(name="reserve_inventory", action="inventory.reserve",
                 compensation="inventory.release"),
            step(name="charge_payment", action="payment.charge", compensation="payment.refund"),
            step(name="create_shipment", action="shipping.create", kind=PIVOT),
            step(name="send_confirmation", action="notification.send", kind=RETRIABLE,
                 retry=RetryPolicy.forever()),
        ],
    )

Steps run one after another. ``compensatable`` steps come first and are undone in reverse order
if a later step fails; the ``pivot`` is the point of no return; ``retriable`` steps follow the
pivot and are retried until they succeed, because there is nothing left to undo.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from saga_es.errors import DefinitionError
from saga_es.retry import RetryPolicy

__all__ = [
    "COMPENSATABLE",
    "PIVOT",
    "RETRIABLE",
    "RETRIABLE_MIN_ATTEMPTS",
    "PayloadBuilder",
    "SagaDefinition",
    "Step",
    "StepKind",
    "saga",
    "step",
]


class StepKind(StrEnum):
    COMPENSATABLE = "compensatable"
    PIVOT = "pivot"
    RETRIABLE = "retriable"


COMPENSATABLE, PIVOT, RETRIABLE = StepKind.COMPENSATABLE, StepKind.PIVOT, StepKind.RETRIABLE

#: A retriable step must be retried "until it succeeds"; a bounded policy below this many
#: attempts is refused as a definition error rather than discovered as a stuck saga.
RETRIABLE_MIN_ATTEMPTS = 20

#: Builds a command's payload from the saga's validated data and the results of the steps that
#: succeeded so far (by step name). Must be pure: it runs inside ``decide``.
PayloadBuilder = Callable[[BaseModel, Mapping[str, Mapping[str, Any]]], dict[str, Any]]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,99}$")


def default_payload(data: BaseModel, results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "data": data.model_dump(mode="json"),
        "results": {k: dict(v) for k, v in results.items()},
    }


@dataclass(frozen=True, kw_only=True)
class Step:
    name: str
    action: str
    compensation: str | None
    kind: StepKind
    timeout: timedelta
    retry: RetryPolicy
    compensation_timeout: timedelta
    compensation_retry: RetryPolicy
    queue: str
    compensation_queue: str
    payload: PayloadBuilder = field(repr=False, compare=False)

    @property
    def is_compensatable(self) -> bool:
        return self.kind is StepKind.COMPENSATABLE


def step(
    *,
    name: str,
    action: str,
    compensation: str | None = None,
    kind: StepKind | str = StepKind.COMPENSATABLE,
    timeout: timedelta = timedelta(seconds=30),
    retry: RetryPolicy | None = None,
    compensation_timeout: timedelta | None = None,
    compensation_retry: RetryPolicy | None = None,
    queue: str | None = None,
    compensation_queue: str | None = None,
    payload: PayloadBuilder = default_payload,
) -> Step:
    """One step of a saga. Every option is keyword-only.

    name: unique within the saga; appears in events, status and errors.
    action / compensation: command names sent to participants, e.g. ``"payment.charge"``.
        ``compensation`` is required on compensatable steps and refused on the others.
    kind: ``compensatable`` (default), ``pivot`` or ``retriable``.
    timeout: how long to wait for the action's reply before the attempt counts as failed.
    retry: the action's retry policy (default: 3 attempts; ``RetryPolicy.forever()`` for
        retriable steps, which raises a retry alert after 10 failures in a row).
    compensation_timeout / compensation_retry: the same for the compensation (defaults: the
        step's timeout; 5 attempts). When compensation retries run out the saga becomes stuck.
    queue / compensation_queue: destination queue; default is the command name's prefix before
        the first dot (``"payment.charge"`` goes to ``"payment"``).
    payload: builds the command payload from the data and earlier results (default: both).
    """
    kind = StepKind(kind)
    if retry is None:
        retry = RetryPolicy.forever() if kind is StepKind.RETRIABLE else RetryPolicy()
    return Step(
        name=name,
        action=action,
        compensation=compensation,
        kind=kind,
        timeout=timeout,
        retry=retry,
        compensation_timeout=timeout if compensation_timeout is None else compensation_timeout,
        compensation_retry=compensation_retry or RetryPolicy(max_attempts=5),
        queue=queue or action.split(".", 1)[0],
        compensation_queue=compensation_queue or (compensation or action).split(".", 1)[0],
        payload=payload,
    )


@dataclass(frozen=True)
class SagaDefinition:
    name: str
    version: int
    data_model: type[BaseModel]
    steps: tuple[Step, ...]

    @property
    def key(self) -> str:
        return f"{self.name}@v{self.version}"

    def step_named(self, name: str) -> Step:
        for candidate in self.steps:
            if candidate.name == name:
                return candidate
        raise KeyError(name)

    def index_of(self, name: str) -> int:
        return [s.name for s in self.steps].index(name)


def saga(
    name: str, *, version: int = 1, data: type[BaseModel], steps: Sequence[Step]
) -> SagaDefinition:
    """Build and validate a saga definition; raises ``DefinitionError`` naming step and rule."""
    definition = SagaDefinition(name=name, version=version, data_model=data, steps=tuple(steps))
    _validate(definition)
    return definition


def _validate(d: SagaDefinition) -> None:
    def fail(rule: str, detail: str, at: str | None = None) -> DefinitionError:
        return DefinitionError(definition=d.name, step=at, rule=rule, detail=detail)

    if not isinstance(d.name, str) or not _NAME.match(d.name):
        raise fail("name", f"saga name {d.name!r} must start with a letter and use [A-Za-z0-9_.:-]")
    if not isinstance(d.version, int) or d.version < 1:
        raise fail("version", f"version must be a positive integer, not {d.version!r}")
    if not (isinstance(d.data_model, type) and issubclass(d.data_model, BaseModel)):
        raise fail("data-model", f"data must be a pydantic model class, not {d.data_model!r}")
    if not d.steps:
        raise fail("steps", "a saga needs at least one step")

    seen: set[str] = set()
    pivot_at: int | None = None
    for index, s in enumerate(d.steps):
        if not isinstance(s, Step):
            raise fail("steps", f"step {index} is {s!r}; build steps with step(...)")
        if not _NAME.match(s.name):
            raise fail("step-name", f"step name {s.name!r} is not a valid name", s.name)
        if s.name in seen:
            raise fail("unique-step-names", "another step has the same name", s.name)
        seen.add(s.name)
        for label, command in (("action", s.action), ("compensation", s.compensation)):
            if command is not None and not _NAME.match(command):
                raise fail(
                    "command-name", f"{label} command {command!r} is not a valid name", s.name
                )
        for label, policy in (("retry", s.retry), ("compensation_retry", s.compensation_retry)):
            for problem in policy.problems():
                raise fail("retry-policy", f"{label}: {problem}", s.name)
        for label, limit in (
            ("timeout", s.timeout),
            ("compensation_timeout", s.compensation_timeout),
        ):
            if limit <= timedelta(0):
                raise fail("timeout", f"{label} must be positive", s.name)

        if s.kind is StepKind.COMPENSATABLE:
            if pivot_at is not None:
                raise fail(
                    "no-compensatable-after-pivot",
                    f"compensatable step after the pivot '{d.steps[pivot_at].name}'; "
                    "after the point of no return steps must be retriable",
                    s.name,
                )
            if not s.compensation:
                raise fail(
                    "compensation-required",
                    "compensatable step has no compensation command; make it the pivot, "
                    "or give it compensation=...",
                    s.name,
                )
        else:
            if s.compensation:
                raise fail(
                    "no-compensation-on-" + s.kind.value,
                    f"a {s.kind.value} step is never compensated, so its compensation "
                    f"{s.compensation!r} would never run",
                    s.name,
                )
        if s.kind is StepKind.PIVOT:
            if pivot_at is not None:
                raise fail(
                    "single-pivot", f"second pivot; '{d.steps[pivot_at].name}' is the pivot", s.name
                )
            pivot_at = index
        if s.kind is StepKind.RETRIABLE:
            if pivot_at is None:
                raise fail(
                    "retriable-after-pivot",
                    "retriable step before any pivot; without a pivot before it, a failure here "
                    "should compensate, so make it compensatable or add a pivot",
                    s.name,
                )
            attempts = s.retry.max_attempts
            if attempts is not None and attempts < RETRIABLE_MIN_ATTEMPTS:
                raise fail(
                    "retriable-retries",
                    f"retriable step allows only {attempts} attempts; it must be retried until it "
                    f"succeeds: use RetryPolicy.forever() or at least {RETRIABLE_MIN_ATTEMPTS}",
                    s.name,
                )
