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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, PersistenceError
from pydantic import BaseModel, ValidationError

from saga_es.aggregate import Saga
from saga_es.decide import Decision, TimerFired, begin, decide
from saga_es.definition import SagaDefinition
from saga_es.errors import (
    ConcurrencyError,
    InvalidSagaDataError,
    StartConflictError,
    StoreError,
    UnknownSagaError,
)
from saga_es.ids import saga_id_for
from saga_es.messages import CommandMessage, ReplyMessage, parse_reply
from saga_es.persistence.settings import DatabaseSettings
from saga_es.persistence.store import SagaStore
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
        for _ in range(2):
            existing = self.store.load(saga_id)
            if existing is not None:
                return self._existing_start(existing, d, model, business_key)
            decision = begin(
                d,
                saga_id=saga_id,
                business_key=business_key,
                data=model,
                correlation_id=correlation_id or str(uuid.uuid4()),
                now=self.clock(),
            )
            try:
                self._commit(None, decision)
            except IntegrityError:
                continue  # started concurrently: the loop returns the winner's saga
            return self._outcome(decision, created=True)
        raise ConcurrencyError(saga_id=saga_id, attempts=2)

    def handle_reply(self, reply: ReplyMessage | Mapping[str, Any] | str | bytes) -> Outcome:
        """Feed a participant's reply to its saga. Redelivery of a handled reply is a no-op."""
        message = parse_reply(reply)
        return self._decide_with_retries(message.saga_id, message, reply_id=message.message_id)

    def handle_timer(self, saga_id: UUID, timer_id: UUID) -> Outcome:
        """A timer came due. A timer that is no longer the saga's current one changes nothing."""
        return self._decide_with_retries(saga_id, TimerFired(saga_id, timer_id), reply_id=None)

    # -- queries ------------------------------------------------------------------------------

    def get_state(self, saga_id: UUID, *, version: int | None = None) -> SagaState:
        """The saga's state now, or as it was after event ``version`` (time travel)."""
        return self._load(saga_id, what="query", version=version).saga_state

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
        for attempt in range(1, self.max_conflict_retries + 1):
            saga = self._load(saga_id, what="reply" if reply_id else "timer")
            state = saga.saga_state
            definition = self.definitions.get(state.definition, state.definition_version)
            decision = decide(definition, state, message, self.clock())
            if not decision.changed:
                return Outcome(saga_id, state)
            try:
                self._commit(saga, decision, reply_id=reply_id)
            except IntegrityError:
                if reply_id is not None and self.store.has_reply(reply_id):
                    # Already handled (possibly by a worker racing us): nothing more to do.
                    return Outcome(
                        saga_id, self._load(saga_id, what="reply").saga_state, duplicate=True
                    )
                log.debug("saga %s: concurrency conflict, deciding again (%d)", saga_id, attempt)
                time.sleep(random.uniform(0, 0.002 * attempt))  # de-synchronise racing workers
                continue
            return self._outcome(decision)
        raise ConcurrencyError(saga_id=saga_id, attempts=self.max_conflict_retries)

    def _commit(
        self, saga: Saga | None, decision: Decision, *, reply_id: UUID | None = None
    ) -> None:
        try:
            self.store.commit(saga, decision, reply_id=reply_id)
        except IntegrityError:
            raise
        except PersistenceError as exc:
            state = decision.state
            raise StoreError(
                f"saga {state.saga_id if state else '?'}: decision not recorded: {exc}"
            ) from exc

    def _load(self, saga_id: UUID, *, what: str, version: int | None = None) -> Saga:
        try:
            saga = self.store.load(saga_id, version=version)
        except PersistenceError as exc:
            raise StoreError(f"saga {saga_id}: could not load: {exc}") from exc
        if saga is None:
            raise UnknownSagaError(saga_id=saga_id, what=what)
        return saga

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
        self, saga: Saga, d: SagaDefinition, model: BaseModel, business_key: str
    ) -> Outcome:
        state = saga.saga_state
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
