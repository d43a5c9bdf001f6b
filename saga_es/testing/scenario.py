"""Given/expect scenarios for saga definitions: no database, no broker, no clock.

    (scenario(order_fulfillment)
        .given({"order_id": "o-1", ...})
        .expect_command("inventory.reserve")
        .reply_success({"reservation_id": "r-1"})
        .expect_command("payment.charge")
        .reply_failure("card_declined")
        .expect_compensation("inventory.release")
        .reply_success()
        .expect_state("failed"))

Each step runs the real ``begin``/``decide`` and folds the events with the real ``evolve``; the
scenario only remembers what was decided. Time moves only through ``advance``/``time_out``.
Operator actions go through the real ``operator.act``: ``.act(Abort(actor=..., reason=...))``.
A failed expectation raises ``AssertionError`` with the saga's recent history.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Self

from pydantic import BaseModel

from saga_es.decide import Decision, TimerFired, begin, decide
from saga_es.definition import SagaDefinition
from saga_es.ids import saga_id_for
from saga_es.messages import CommandMessage, ReplyMessage
from saga_es.operator import OperatorAction, act
from saga_es.state import SagaState, SagaStatus

__all__ = ["Scenario", "scenario"]


def scenario(definition: SagaDefinition, **options: Any) -> Scenario:
    return Scenario(definition, **options)


class Scenario:
    def __init__(
        self,
        definition: SagaDefinition,
        *,
        business_key: str = "key-1",
        correlation_id: str = "correlation-1",
        now: datetime = datetime(2030, 1, 1, tzinfo=UTC),
    ) -> None:
        self.definition = definition
        self.business_key = business_key
        self.correlation_id = correlation_id
        self.now = now
        self.events: list[Any] = []
        self.commands: list[CommandMessage] = []  # every command, in order
        self.replies: list[ReplyMessage] = []  # every reply delivered, in order
        self.last: Decision | None = None
        self._state: SagaState | None = None

    # -- inputs -------------------------------------------------------------------------------

    def given(self, data: BaseModel | dict[str, Any]) -> Self:
        model = self.definition.data_model.model_validate(
            data.model_dump() if isinstance(data, BaseModel) else data
        )
        self._apply(
            begin(
                self.definition,
                saga_id=saga_id_for(self.definition.name, self.business_key),
                business_key=self.business_key,
                data=model,
                correlation_id=self.correlation_id,
                now=self.now,
            )
        )
        return self

    def reply_success(
        self, result: dict[str, Any] | None = None, *, to: CommandMessage | None = None
    ) -> Self:
        return self.deliver((to or self.awaited).reply_success(uuid.uuid4(), result))

    def reply_failure(
        self,
        error_code: str,
        message: str = "",
        *,
        retryable: bool = False,
        to: CommandMessage | None = None,
    ) -> Self:
        command = to or self.awaited
        return self.deliver(
            command.reply_failure(uuid.uuid4(), error_code, message, retryable=retryable)
        )

    def deliver(self, reply: ReplyMessage) -> Self:
        """Deliver any reply, e.g. one delivered before (a duplicate) or for an old attempt."""
        self.replies.append(reply)
        self._apply(decide(self.definition, self.state, reply, self.now))
        return self

    def redeliver_last_reply(self) -> Self:
        self._check(bool(self.replies), "no reply was delivered yet")
        return self.deliver(self.replies[-1])

    def advance(self, delta: timedelta) -> Self:
        """Move time forward, firing the saga's timer each time it comes due on the way."""
        target = self.now + delta
        while (timer := self.timer) is not None and timer.due <= target:
            self.now = max(self.now, timer.due)
            self.fire_timer(timer.timer_id)
        self.now = target
        return self

    def time_out(self) -> Self:
        """Move to the awaited command's deadline and fire it."""
        timer = self.timer
        self._check(
            timer is not None and timer.kind == "deadline",
            self._explain("no reply deadline pending"),
        )
        self.now = max(self.now, timer.due)
        return self.fire_timer(timer.timer_id)

    def retry_now(self) -> Self:
        """Move to the scheduled retry and fire it."""
        timer = self.timer
        self._check(
            timer is not None and timer.kind == "retry", self._explain("no retry scheduled")
        )
        self.now = max(self.now, timer.due)
        return self.fire_timer(timer.timer_id)

    def fire_timer(self, timer_id: uuid.UUID) -> Self:
        self._apply(
            decide(self.definition, self.state, TimerFired(self.state.saga_id, timer_id), self.now)
        )
        return self

    def act(self, action: OperatorAction) -> Self:
        """An operator action (``saga_es.operator``); a refusal raises ``ActionRefusedError``
        and changes nothing."""
        self._apply(act(self.definition, self.state, action, self.now))
        return self

    # -- expectations -------------------------------------------------------------------------

    def expect_command(self, command: str, *, attempt: int | None = None) -> Self:
        return self._expect_issued("action", command, attempt)

    def expect_compensation(self, command: str, *, attempt: int | None = None) -> Self:
        return self._expect_issued("compensation", command, attempt)

    def expect_no_command(self) -> Self:
        issued = [c.command for c in self._last_commands]
        self._check(not issued, self._explain(f"expected no command, but {issued} were issued"))
        return self

    def expect_state(self, status: SagaStatus | str) -> Self:
        self._check(
            self.state.status == SagaStatus(status),
            self._explain(
                f"expected state {SagaStatus(status).value}, it is {self.state.status.value}"
            ),
        )
        return self

    def expect_events(self, *names: str) -> Self:
        """The last input recorded exactly these event types, in order."""
        got = [type(e).__name__ for e in self._last_events]
        self._check(got == list(names), self._explain(f"expected events {list(names)}, got {got}"))
        return self

    def expect_ignored(self, reason: str) -> Self:
        self.expect_events("ReplyIgnored")
        got = self._last_events[0].reason
        self._check(
            got == reason, self._explain(f"expected reply ignored as {reason!r}, got {got!r}")
        )
        return self

    def expect_unchanged(self) -> Self:
        """The last input recorded nothing at all (e.g. a stale timer)."""
        return self.expect_events()

    # -- what the scenario saw ----------------------------------------------------------------

    @property
    def state(self) -> SagaState:
        if self._state is None:
            raise AssertionError("call given(...) first")
        return self._state

    @property
    def awaited(self) -> CommandMessage:
        awaiting = self.state.awaiting
        if awaiting is None:
            raise AssertionError(self._explain("the saga is not waiting for any reply"))
        return self.command(awaiting.command_id)

    @property
    def timer(self) -> Any:
        return self.last.timer if self.last else None

    def command(self, command_id: uuid.UUID) -> CommandMessage:
        return next(c for c in self.commands if c.message_id == command_id)

    def commands_named(self, name: str) -> list[CommandMessage]:
        return [c for c in self.commands if c.command == name]

    @property
    def _last_events(self) -> tuple[Any, ...]:
        return self.last.events if self.last else ()

    @property
    def _last_commands(self) -> tuple[CommandMessage, ...]:
        return self.last.commands if self.last else ()

    def _apply(self, decision: Decision) -> None:
        self.last = decision
        if decision.state is not None:
            self._state = decision.state
        self.events.extend(decision.events)
        self.commands.extend(decision.commands)

    def _expect_issued(self, phase: str, command: str, attempt: int | None) -> Self:
        issued = [(c.phase, c.command, c.attempt) for c in self._last_commands]
        matches = [
            c
            for c in self._last_commands
            if c.phase == phase
            and c.command == command
            and (attempt is None or c.attempt == attempt)
        ]
        what = "compensation" if phase == "compensation" else "command"
        self._check(
            len(matches) == 1 and len(issued) == 1,
            self._explain(
                f"expected {what} {command!r}"
                + (f" attempt {attempt}" if attempt else "")
                + f", the last input issued {issued or 'nothing'}"
            ),
        )
        return self

    def _check(self, condition: bool, problem: str) -> None:
        # Not ``assert``: expectations must hold under ``python -O`` too.
        if not condition:
            raise AssertionError(problem)

    def _explain(self, problem: str) -> str:
        tail = [
            f"  v{e.originator_version} {type(e).__name__} "
            + ", ".join(
                f"{k}={v}"
                for k, v in vars(e).items()
                if k in ("step", "attempt", "reason", "error_code", "plan", "phase")
            )
            for e in self.events[-8:]
        ]
        status = self._state.status.value if self._state else "not started"
        return f"{problem}\n saga state: {status}\n last events:\n" + "\n".join(tail)
