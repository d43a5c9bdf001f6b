"""The saga engine: load, decide, commit. The application shell around ``decide``.

Each operation is one decision in one transaction: the saga's new events, one outbox row per
command, the saga's timer and (for a reply) the inbox row commit together or not at all.
When two workers decide for the same saga at once, the second commit fails on the event
store's (saga id, version) key; the loser reloads and decides again, a bounded number of times.
Because command ids are derived from the saga, deciding again can never send a second command
for the same step attempt.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, PersistenceError
from pydantic import BaseModel, ValidationError

from saga_es.decide import Decision, TimerFired, begin, decide
from saga_es.definition import SagaDefinition
from saga_es.errors import (
    ConcurrencyError,
    InvalidSagaDataError,
    SagaError,
    StartConflictError,
    StoreError,
    UnknownCommandError,
    UnknownSagaError,
)
from saga_es.events import ReplyIgnored
from saga_es.ids import saga_id_for
from saga_es.messages import CommandMessage, ReplyMessage, parse_reply
from saga_es.operator import (
    Abort,
    CancelTimer,
    MarkCompensated,
    OperatorAction,
    RescheduleTimer,
    Resume,
    RetryNow,
    act,
)
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.store import SagaStore
from saga_es.persistence.timer_table import ScheduledTimer, TimerTable
from saga_es.registry import DefinitionRegistry
from saga_es.state import SagaState

__all__ = ["Outcome", "SagaEngine", "utc_now"]

log = logging.getLogger("saga_es.engine")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Outcome:
    """What one engine call did. ``duplicate``: the input had been handled already."""

    saga_id: UUID
    state: SagaState
    events: tuple[Any, ...] = ()
    commands: tuple[CommandMessage, ...] = ()
    created: bool = False
    duplicate: bool = False


class SagaEngine:
    """Starts sagas and feeds them replies and timers.

    definitions: every definition (and version) whose sagas this engine may see.
    database_url: ``postgresql://...`` or ``sqlite:///...``; default ``$SAGA_ES_DATABASE_URL``,
        else ``sqlite:///saga-es.db``.
    clock: where ``now`` comes from (tests pass a virtual clock).
    max_conflict_retries: decisions retried after optimistic-concurrency conflicts.
    """

    def __init__(
        self,
        definitions: Iterable[SagaDefinition],
        *,
        database_url: str | None = None,
        clock: Callable[[], datetime] = utc_now,
        create_tables: bool | None = None,
        max_conflict_retries: int = 20,
        store: SagaStore | None = None,
    ) -> None:
        self.definitions = DefinitionRegistry(definitions)
        self.clock = clock
        self.max_conflict_retries = max_conflict_retries
        self.store = store or SagaStore(
            DatabaseSettings.resolve(database_url), create_tables=create_tables
        )

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> SagaEngine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- commands -----------------------------------------------------------------------------

    def start(
        self,
        definition: SagaDefinition | str,
        data: BaseModel | Mapping[str, Any],
        *,
        business_key: str,
        correlation_id: str | None = None,
    ) -> Outcome:
        """Start the saga for ``business_key``, or return it if it was started already.

        The saga id is derived from (definition name, business key): a second start with the
        same data is a no-op that returns the existing saga (``created=False``); with other
        data it raises ``StartConflictError``.
        """
        d = (
            definition
            if isinstance(definition, SagaDefinition)
            else self.definitions.get(definition)
        )
        self.definitions.add(d)
        if not isinstance(business_key, str) or not business_key.strip():
            raise InvalidSagaDataError(
                definition=d.name,
                business_key=str(business_key),
                problems=["field 'business_key': must be a non-empty string"],
            )
        model = self._validate_data(d, data, business_key)
        saga_id = saga_id_for(d.name, business_key)
        decision = begin(
            d,
            saga_id=saga_id,
            business_key=business_key,
            data=model,
            correlation_id=correlation_id or str(uuid.uuid4()),
            now=self.clock(),
        )
        try:
            # Optimistic: a first start is the common case, and the event store's key on
            # (saga id, version 1) is the "already started" check, race-free.
            self._commit(decision)
        except IntegrityError:
            existing = self.store.load_state(saga_id)
            if existing is None:  # the key held, yet no stream: the database is inconsistent
                raise ConcurrencyError(saga_id=saga_id, attempts=1) from None
            return self._existing_start(existing, d, model, business_key)
        return self._outcome(decision, created=True)

    def handle_reply(self, reply: ReplyMessage | Mapping[str, Any] | str | bytes) -> Outcome:
        """Feed a participant's reply to its saga. Redelivery of a handled reply is a no-op."""
        message = parse_reply(reply)
        return self._decide_with_retries(message.saga_id, message, reply_id=message.message_id)

    def handle_replies(
        self, replies: Sequence[ReplyMessage | Mapping[str, Any] | str | bytes]
    ) -> list[Outcome | SagaError]:
        """Handle a batch of replies, committing their decisions in one transaction.

        For a worker that drains a reply queue: the per-transaction cost (commit, event-table
        lock, round trips) is paid once per batch instead of once per reply. Each result is
        the reply's ``Outcome``, or the ``SagaError`` it was rejected with; one bad reply never
        fails the others. If the group commit conflicts (another worker advanced one of the
        sagas, or a reply was handled already) every reply falls back to ``handle_reply``.
        """
        results: list[Outcome | SagaError | None] = [None] * len(replies)
        states: dict[UUID, SagaState] = {}
        grouped: list[tuple[int, ReplyMessage, Decision]] = []
        alone: list[tuple[int, ReplyMessage]] = []
        for index, raw in enumerate(replies):
            try:
                message = parse_reply(raw)
                state = states.get(message.saga_id) or self._load(
                    message.saga_id, what="reply", cached_ok=True
                )
                definition = self.definitions.get(state.definition, state.definition_version)
                decision = decide(definition, state, message, self.clock())
            except UnknownCommandError:
                alone.append((index, message))  # the cached state may be behind: check alone
                continue
            except SagaError as exc:
                results[index] = exc
                continue
            if _commits_nothing_new(decision):
                alone.append((index, message))
                continue
            assert decision.state is not None
            states[message.saga_id] = decision.state
            grouped.append((index, message, decision))
        if grouped:
            try:
                self._commit_many([(d, m.message_id) for _, m, d in grouped])
                for index, _, decision in grouped:
                    results[index] = self._outcome(decision)
            except IntegrityError:
                alone.extend((index, message) for index, message, _ in grouped)
        for index, message in sorted(alone, key=lambda pair: pair[0]):
            try:
                results[index] = self.handle_reply(message)
            except SagaError as exc:
                results[index] = exc
        return [r for r in results if r is not None]

    def handle_timer(self, saga_id: UUID, timer_id: UUID) -> Outcome:
        """A timer came due. A timer that is no longer the saga's current one changes nothing."""
        return self._decide_with_retries(saga_id, TimerFired(saga_id, timer_id), reply_id=None)

    # -- operator actions (``saga_es.operator`` says when each is allowed) ---------------------

    def retry_now(self, saga_id: UUID, *, actor: str, reason: str) -> Outcome:
        """Issue the current step's next attempt now, instead of waiting for its reply or its
        retry."""
        return self.act(saga_id, RetryNow(actor=actor, reason=reason))

    def resume(self, saga_id: UUID, *, actor: str, reason: str) -> Outcome:
        """Issue again what a stuck saga got stuck on, with a fresh retry budget."""
        return self.act(saga_id, Resume(actor=actor, reason=reason))

    def abort(self, saga_id: UUID, *, actor: str, reason: str) -> Outcome:
        """Stop going forward and compensate; refused once the pivot may have taken effect."""
        return self.act(saga_id, Abort(actor=actor, reason=reason))

    def mark_compensated(
        self, saga_id: UUID, step: str, *, actor: str, reason: str, note: str = ""
    ) -> Outcome:
        """Record that ``step``'s effect was undone by hand; the saga goes on compensating."""
        action = MarkCompensated(actor=actor, reason=reason, step=step, note=note)
        return self.act(saga_id, action)

    def cancel_timer(
        self, saga_id: UUID, *, actor: str, reason: str, timer_id: UUID | None = None
    ) -> Outcome:
        """Cancel the saga's pending timer (a cancelled retry leaves the saga stuck)."""
        return self.act(saga_id, CancelTimer(actor=actor, reason=reason, timer_id=timer_id))

    def reschedule_timer(
        self,
        saga_id: UUID,
        due: datetime,
        *,
        actor: str,
        reason: str,
        timer_id: UUID | None = None,
    ) -> Outcome:
        """Move the saga's timer (its reply deadline or its retry) to ``due``."""
        action = RescheduleTimer(actor=actor, reason=reason, due=due, timer_id=timer_id)
        return self.act(saga_id, action)

    def act(self, saga_id: UUID, action: OperatorAction) -> Outcome:
        """Record an operator action, or raise ``ActionRefusedError`` recording nothing.

        Decided on the saga's latest state, never a cached one: a refusal must not rest on a
        stale view. A decision that loses a race is decided again, and may then be refused.
        """
        for attempt in range(1, self.max_conflict_retries + 1):
            state = self._load(saga_id, what="operator action")
            definition = self.definitions.get(state.definition, state.definition_version)
            decision = act(definition, state, action, self.clock())
            try:
                self._commit(decision)
            except IntegrityError:
                time.sleep(random.uniform(0, 0.002 * attempt))
                continue
            log.info(
                "saga %s: %s by %s (%s): now %s",
                saga_id,
                action.verb,
                action.actor,
                action.reason,
                decision.state.status.value if decision.state else "?",
            )
            return self._outcome(decision)
        raise ConcurrencyError(saga_id=saga_id, attempts=self.max_conflict_retries)

    # -- queries ------------------------------------------------------------------------------

    def timers(self, saga_id: UUID | None = None, *, limit: int = 1000) -> list[ScheduledTimer]:
        """Pending timers, soonest first (one saga's, or every saga's). A timer being fired
        shows as due at the end of its claim's lease."""
        try:
            return TimerTable(self.store).pending(saga_id, limit=limit)
        except PersistenceError as exc:
            raise StoreError(f"could not list timers: {exc}") from exc

    def get_state(self, saga_id: UUID, *, version: int | None = None) -> SagaState:
        """The saga's state now, or as it was after event ``version`` (time travel)."""
        return self._load(saga_id, what="query", version=version)

    def events(self, saga_id: UUID) -> list[Any]:
        events = self.store.events(saga_id)
        if not events:
            raise UnknownSagaError(saga_id=saga_id, what="query")
        return events

    def saga_id(self, definition: str, business_key: str) -> UUID:
        return saga_id_for(definition, business_key)

    # -- internals ----------------------------------------------------------------------------

    def _decide_with_retries(
        self, saga_id: UUID, message: ReplyMessage | TimerFired, *, reply_id: UUID | None
    ) -> Outcome:
        # The first attempt decides on the cached state without reading the stream. If that
        # state is behind, a decision that changes the saga cannot commit (its version is
        # taken), so only outcomes that commit nothing need checking against the stream.
        fresh = False
        what = "reply" if reply_id else "timer"
        for attempt in range(1, self.max_conflict_retries + 1):
            state = self._load(saga_id, what=what, cached_ok=not fresh)
            definition = self.definitions.get(state.definition, state.definition_version)
            try:
                decision = decide(definition, state, message, self.clock())
            except UnknownCommandError:
                if fresh:
                    raise
                fresh = True
                continue
            if not fresh and _commits_nothing_new(decision):
                fresh = True
                continue
            if not decision.changed:
                return Outcome(saga_id, state)
            try:
                self._commit(decision, reply_id=reply_id)
            except IntegrityError:
                if reply_id is not None and self.store.has_reply(reply_id):
                    # Already handled (possibly by a worker racing us): nothing more to do.
                    return Outcome(saga_id, self._load(saga_id, what=what), duplicate=True)
                log.debug("saga %s: concurrency conflict, deciding again (%d)", saga_id, attempt)
                fresh = True
                time.sleep(random.uniform(0, 0.002 * attempt))  # de-synchronise racing workers
                continue
            return self._outcome(decision)
        raise ConcurrencyError(saga_id=saga_id, attempts=self.max_conflict_retries)

    def _commit(self, decision: Decision, *, reply_id: UUID | None = None) -> None:
        self._commit_many([(decision, reply_id)])

    def _commit_many(self, decisions: Sequence[tuple[Decision, UUID | None]]) -> None:
        try:
            self.store.commit_many(decisions)
        except IntegrityError:
            raise
        except PersistenceError as exc:
            sagas = ", ".join(str(d.state.saga_id) for d, _ in decisions if d.state)
            raise StoreError(f"saga {sagas}: decision not recorded: {exc}") from exc

    def _load(
        self, saga_id: UUID, *, what: str, version: int | None = None, cached_ok: bool = False
    ) -> SagaState:
        try:
            state = self.store.load_state(saga_id, version=version, cached_ok=cached_ok)
        except PersistenceError as exc:
            raise StoreError(f"saga {saga_id}: could not load: {exc}") from exc
        if state is None:
            raise UnknownSagaError(saga_id=saga_id, what=what)
        return state

    def _validate_data(
        self, d: SagaDefinition, data: BaseModel | Mapping[str, Any], business_key: str
    ) -> BaseModel:
        try:
            raw = data.model_dump() if isinstance(data, BaseModel) else data
            return d.data_model.model_validate(raw)
        except ValidationError as exc:
            problems = [
                f"field '{'.'.join(str(p) for p in err['loc']) or '(data)'}': {err['msg']}"
                for err in exc.errors()
            ]
            raise InvalidSagaDataError(
                definition=d.name, business_key=business_key, problems=problems
            ) from exc

    def _existing_start(
        self, state: SagaState, d: SagaDefinition, model: BaseModel, business_key: str
    ) -> Outcome:
        if dict(state.data) != model.model_dump(mode="json"):
            raise StartConflictError(
                saga_id=state.saga_id, definition=d.name, business_key=business_key
            )
        return Outcome(state.saga_id, state, created=False)

    @staticmethod
    def _outcome(decision: Decision, *, created: bool = False) -> Outcome:
        assert decision.state is not None
        return Outcome(
            decision.state.saga_id,
            decision.state,
            decision.events,
            decision.commands,
            created=created,
        )


def _commits_nothing_new(decision: Decision) -> bool:
    """Nothing happened, or only an ignored reply: conclusions a stale state could draw."""
    return all(isinstance(e, ReplyIgnored) for e in decision.events)
