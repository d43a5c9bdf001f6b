"""The definitions an engine knows, by name and version.

A saga keeps the definition version it started with: version 2 of a definition only applies to
sagas started after it was registered, so both versions stay registered while old sagas run.
"""

from __future__ import annotations

from collections.abc import Iterable

from saga_es.definition import SagaDefinition
from saga_es.errors import DefinitionError, UnknownDefinitionError

__all__ = ["DefinitionRegistry"]


class DefinitionRegistry:
    def __init__(self, definitions: Iterable[SagaDefinition] = ()) -> None:
        self._by_key: dict[tuple[str, int], SagaDefinition] = {}
        for definition in definitions:
            self.add(definition)

    def add(self, definition: SagaDefinition) -> None:
        key = (definition.name, definition.version)
        existing = self._by_key.get(key)
        if existing is not None and existing is not definition:
            raise DefinitionError(
                definition=definition.name,
                rule="unique-version",
                detail=f"version {definition.version} is registered twice with different steps",
            )
        self._by_key[key] = definition

    def get(self, name: str, version: int | None = None) -> SagaDefinition:
        if version is None:
            versions = [v for (n, v) in self._by_key if n == name]
            if versions:
                return self._by_key[(name, max(versions))]
        elif (name, version) in self._by_key:
            return self._by_key[(name, version)]
        raise UnknownDefinitionError(definition=name, version=version, known=self.names())

    def names(self) -> list[str]:
        return sorted(f"{n}@v{v}" for n, v in self._by_key)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_key.values())
