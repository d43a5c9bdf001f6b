"""Saga definitions are validated when built: every rule names the saga, the step and the rule."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from saga_es.definition import (
    COMPENSATABLE,
    PIVOT,
    RETRIABLE,
    RETRIABLE_MIN_ATTEMPTS,
    SagaDefinition,
    Step,
    StepKind,
    saga,
    step,
)
from saga_es.demo.order_saga import Order, order_fulfillment
from saga_es.errors import DefinitionError
from saga_es.retry import RetryPolicy


class Data(BaseModel):
    x: int = 1


def comp(name: str = "reserve", **options: Any) -> Step:
    options.setdefault("action", f"svc.{name}")
    options.setdefault("compensation", f"svc.undo_{name}")
    return step(name=name, **options)


def pivot(name: str = "ship", **options: Any) -> Step:
    return step(name=name, action=f"ship.{name}", kind=PIVOT, **options)


def retriable(name: str = "notify", **options: Any) -> Step:
    return step(name=name, action=f"notify.{name}", kind=RETRIABLE, **options)


def build(
    *steps: Step, name: str = "my-saga", version: Any = 1, data: Any = Data
) -> SagaDefinition:
    return saga(name, version=version, data=data, steps=list(steps))


def refused(*steps: Step, rule: str, step_name: str | None, **saga_options: Any) -> DefinitionError:
    with pytest.raises(DefinitionError) as caught:
        build(*steps, **saga_options)
    error = caught.value
    assert error.rule == rule
    assert error.step == step_name
    saga_name = saga_options.get("name", "my-saga")
    assert error.definition == saga_name
    text = str(error)
    assert f"saga '{saga_name}'" in text
    assert f"(rule: {rule})" in text
    if step_name:
        assert f"step '{step_name}'" in text
    else:
        assert " step '" not in text
    return error


# -- step structure -------------------------------------------------------------------------------


def test_duplicate_step_names_are_refused() -> None:
    error = refused(
        comp("a"), comp("b"), comp("a", action="other.a"), rule="unique-step-names", step_name="a"
    )
    assert "same name" in str(error)


def test_compensatable_step_needs_a_compensation() -> None:
    error = refused(
        comp("a"), step(name="b", action="svc.b"), rule="compensation-required", step_name="b"
    )
    assert "no compensation command" in str(error)


def test_empty_compensation_is_refused() -> None:
    # An empty command name is caught by the command-name rule before compensation-required.
    error = refused(
        step(name="a", action="svc.a", compensation=""), rule="command-name", step_name="a"
    )
    assert "compensation command ''" in str(error)


def test_compensatable_step_after_the_pivot_is_refused() -> None:
    error = refused(
        comp("a"), pivot("p"), comp("late"), rule="no-compensatable-after-pivot", step_name="late"
    )
    assert "after the pivot 'p'" in str(error)


def test_two_pivots_are_refused() -> None:
    error = refused(comp("a"), pivot("p1"), pivot("p2"), rule="single-pivot", step_name="p2")
    assert "'p1' is the pivot" in str(error)


def test_retriable_step_before_any_pivot_is_refused() -> None:
    error = refused(comp("a"), retriable("r"), rule="retriable-after-pivot", step_name="r")
    assert "before any pivot" in str(error)


def test_retriable_step_first_is_refused() -> None:
    refused(retriable("r"), pivot("p"), rule="retriable-after-pivot", step_name="r")


@pytest.mark.parametrize("attempts", [1, 3, RETRIABLE_MIN_ATTEMPTS - 1])
def test_retriable_step_with_too_few_attempts_is_refused(attempts: int) -> None:
    error = refused(
        pivot("p"),
        retriable("r", retry=RetryPolicy(max_attempts=attempts)),
        rule="retriable-retries",
        step_name="r",
    )
    assert f"only {attempts} attempts" in str(error)
    assert "RetryPolicy.forever()" in str(error)


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy.forever(),
        RetryPolicy(max_attempts=RETRIABLE_MIN_ATTEMPTS),
        RetryPolicy(max_attempts=RETRIABLE_MIN_ATTEMPTS + 50),
    ],
)
def test_retriable_step_with_enough_attempts_is_accepted(policy: RetryPolicy) -> None:
    d = build(comp("a"), pivot("p"), retriable("r", retry=policy))
    assert d.step_named("r").retry == policy


def test_retriable_step_defaults_to_retrying_forever() -> None:
    d = build(pivot("p"), retriable("r"))
    assert d.step_named("r").retry.max_attempts is None


@pytest.mark.parametrize(
    ("make", "kind"),
    [(pivot, "pivot"), (retriable, "retriable")],
)
def test_compensation_on_pivot_or_retriable_is_refused(make: Any, kind: str) -> None:
    steps = [pivot("p")] if kind == "retriable" else []
    bad = make("bad", compensation="svc.undo_bad")
    error = refused(*steps, bad, rule=f"no-compensation-on-{kind}", step_name="bad")
    assert "'svc.undo_bad' would never run" in str(error)


# -- retry policies and timeouts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        (RetryPolicy(max_attempts=0), "max_attempts must be at least 1"),
        (RetryPolicy(max_attempts=-2), "max_attempts must be at least 1"),
        (
            RetryPolicy(initial_backoff=timedelta(seconds=-1)),
            "initial_backoff must not be negative",
        ),
        (RetryPolicy(multiplier=0.5), "multiplier must be at least 1"),
        (RetryPolicy(multiplier=float("nan")), "multiplier must be at least 1"),
        (
            RetryPolicy(initial_backoff=timedelta(minutes=10), max_backoff=timedelta(minutes=1)),
            "max_backoff must not be shorter than initial_backoff",
        ),
        (RetryPolicy(jitter=-0.1), "jitter must be between 0 and 1"),
        (RetryPolicy(jitter=1.5), "jitter must be between 0 and 1"),
        (RetryPolicy(jitter=float("nan")), "jitter must be between 0 and 1"),
    ],
)
@pytest.mark.parametrize("label", ["retry", "compensation_retry"])
def test_bad_retry_policy_values_are_refused(policy: RetryPolicy, words: str, label: str) -> None:
    assert policy.problems()
    error = refused(comp("a"), comp("b", **{label: policy}), rule="retry-policy", step_name="b")
    assert f"{label}: {words}" in str(error)


def test_edge_retry_policy_values_are_accepted() -> None:
    policy = RetryPolicy(
        max_attempts=1,
        initial_backoff=timedelta(0),
        multiplier=1.0,
        max_backoff=timedelta(0),
        jitter=1.0,
    )
    assert policy.problems() == []
    assert build(comp("a", retry=policy, compensation_retry=policy)).steps[0].retry == policy
    assert RetryPolicy(jitter=0.0).problems() == []


@pytest.mark.parametrize("label", ["timeout", "compensation_timeout"])
@pytest.mark.parametrize("limit", [timedelta(0), timedelta(seconds=-5)])
def test_non_positive_timeouts_are_refused(label: str, limit: timedelta) -> None:
    error = refused(comp("a", **{label: limit}), rule="timeout", step_name="a")
    assert f"{label} must be positive" in str(error)


def test_non_positive_timeout_on_a_pivot_is_refused() -> None:
    refused(comp("a"), pivot("p", timeout=timedelta(0)), rule="timeout", step_name="p")


# -- names, steps, data, version ------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "1saga", "has space", "-x", "x" * 101, "ünïcode", 42])
def test_bad_saga_names_are_refused(bad: Any) -> None:
    with pytest.raises(DefinitionError) as caught:
        build(comp("a"), name=bad)
    assert caught.value.rule == "name"
    assert caught.value.step is None
    assert caught.value.definition == bad
    assert "(rule: name)" in str(caught.value)
    assert "must start with a letter" in str(caught.value)


@pytest.mark.parametrize("good", ["a", "order-fulfillment", "A.b:c_d-1", "x" * 100])
def test_good_saga_names_are_accepted(good: str) -> None:
    assert build(comp("a"), name=good).name == good


@pytest.mark.parametrize("bad", ["", "2nd", "with space", "slash/name", "x" * 101])
def test_bad_step_names_are_refused(bad: str) -> None:
    error = refused(
        comp("a"),
        comp(bad, action="svc.ok", compensation="svc.undo"),
        rule="step-name",
        step_name=bad,
    )
    assert f"step name {bad!r} is not a valid name" in str(error)


@pytest.mark.parametrize(
    ("options", "label"),
    [
        ({"action": "bad action"}, "action"),
        ({"action": "9.x"}, "action"),
        ({"compensation": "bad/undo"}, "compensation"),
    ],
)
def test_bad_command_names_are_refused(options: dict[str, str], label: str) -> None:
    error = refused(comp("a", **options), rule="command-name", step_name="a")
    assert f"{label} command" in str(error)


def test_empty_steps_are_refused() -> None:
    error = refused(rule="steps", step_name=None)
    assert "at least one step" in str(error)


def test_a_step_not_built_with_step_is_refused() -> None:
    with pytest.raises(DefinitionError) as caught:
        saga("my-saga", data=Data, steps=[comp("a"), {"name": "b"}])  # type: ignore[list-item]
    assert caught.value.rule == "steps"
    assert "step 1" in str(caught.value)
    assert "step(...)" in str(caught.value)


@pytest.mark.parametrize("bad", [dict, Data(), "Data", None, int])
def test_data_must_be_a_pydantic_model_class(bad: Any) -> None:
    error = refused(comp("a"), rule="data-model", step_name=None, data=bad)
    assert "pydantic model class" in str(error)


@pytest.mark.parametrize("bad", [0, -1, "1", 1.5, None])
def test_version_must_be_a_positive_integer(bad: Any) -> None:
    error = refused(comp("a"), rule="version", step_name=None, version=bad)
    assert "positive integer" in str(error)


def test_saga_level_rules_are_checked_before_step_rules() -> None:
    # A bad name is reported even if the steps are broken too.
    refused(comp("a"), comp("a"), rule="name", step_name=None, name="")


# -- step() itself --------------------------------------------------------------------------------


def test_step_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        step("a", "svc.a", "svc.undo_a")  # type: ignore[misc]
    with pytest.raises(TypeError):
        step("a", action="svc.a", compensation="svc.undo_a")  # type: ignore[misc]


def test_step_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="sideways"):
        step(name="a", action="svc.a", kind="sideways")


def test_kind_given_as_text_is_accepted() -> None:
    assert step(name="p", action="svc.p", kind="pivot").kind is StepKind.PIVOT


def test_queue_defaults_to_the_command_prefix() -> None:
    s = step(name="charge", action="payment.charge", compensation="refunds.refund")
    assert s.queue == "payment"
    assert s.compensation_queue == "refunds"
    dotless = step(name="p", action="shipping", kind=PIVOT)
    assert dotless.queue == "shipping"
    assert dotless.compensation_queue == "shipping"
    nested = step(name="n", action="a.b.c", compensation="d.e.f")
    assert (nested.queue, nested.compensation_queue) == ("a", "d")


def test_explicit_queues_win() -> None:
    s = step(
        name="charge",
        action="payment.charge",
        compensation="payment.refund",
        queue="fast",
        compensation_queue="slow",
    )
    assert (s.queue, s.compensation_queue) == ("fast", "slow")


def test_step_defaults() -> None:
    s = step(name="a", action="svc.a", compensation="svc.undo", timeout=timedelta(seconds=7))
    assert s.kind is COMPENSATABLE
    assert s.is_compensatable
    assert s.retry == RetryPolicy()
    assert s.retry.max_attempts == 3
    assert s.compensation_timeout == timedelta(seconds=7)
    assert s.compensation_retry.max_attempts == 5
    assert not pivot("p").is_compensatable
    assert not retriable("r").is_compensatable


def test_explicit_compensation_timeout_and_retry_win() -> None:
    policy = RetryPolicy(max_attempts=9)
    s = comp("a", compensation_timeout=timedelta(seconds=3), compensation_retry=policy)
    assert s.compensation_timeout == timedelta(seconds=3)
    assert s.compensation_retry == policy


# -- the demo saga ---------------------------------------------------------------------------------


def test_order_saga_builds() -> None:
    d = order_fulfillment
    assert isinstance(d, SagaDefinition)
    assert (d.name, d.version, d.key) == ("order-fulfillment", 1, "order-fulfillment@v1")
    assert d.data_model is Order
    assert [(s.name, s.action, s.compensation, s.kind) for s in d.steps] == [
        ("reserve_inventory", "inventory.reserve", "inventory.release", COMPENSATABLE),
        ("charge_payment", "payment.charge", "payment.refund", COMPENSATABLE),
        ("create_shipment", "shipping.create", None, PIVOT),
        ("send_confirmation", "notification.send", None, RETRIABLE),
    ]
    assert [s.queue for s in d.steps] == ["inventory", "payment", "shipping", "notification"]
    charge = d.step_named("charge_payment")
    assert charge.retry.max_attempts == 4
    assert "card_declined" in charge.retry.non_retryable
    assert d.step_named("send_confirmation").retry.max_attempts is None
    assert d.index_of("create_shipment") == 2
    with pytest.raises(KeyError):
        d.step_named("nope")
    # Rebuilding it from its own steps passes validation again.
    assert saga(d.name, version=d.version, data=d.data_model, steps=d.steps).steps == d.steps


def test_valid_shapes_are_accepted() -> None:
    assert len(build(comp("a")).steps) == 1
    assert len(build(pivot("p")).steps) == 1
    assert len(build(comp("a"), comp("b")).steps) == 2
    assert len(build(pivot("p"), retriable("r1"), retriable("r2")).steps) == 3
    assert len(build(comp("a"), comp("b"), pivot("p"), retriable("r")).steps) == 4
