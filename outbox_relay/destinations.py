"""Which queues the relay may publish to: an optional allow-list.

A row is written by the engine from a saga definition, so its queue is normally right; the
allow-list guards against a definition (or a hand-edited row) sending commands somewhere
unexpected, such as another system's queue on a shared broker. Entries are exact names or
shell-style patterns (``payments.*``).
"""

from __future__ import annotations

from collections.abc import Collection
from fnmatch import fnmatchcase

from outbox_relay.errors import MessageRejectedError
from saga_es.messages import CommandMessage

__all__ = ["Destinations"]


class Destinations:
    def __init__(self, allowed: Collection[str] | None = None) -> None:
        self.allowed = None if allowed is None else tuple(allowed)
        self._exact = frozenset(a for a in self.allowed or () if not _is_pattern(a))
        self._patterns = tuple(a for a in self.allowed or () if _is_pattern(a))

    def check(self, command: CommandMessage) -> None:
        if self.allowed is None or command.queue in self._exact:
            return
        if any(fnmatchcase(command.queue, p) for p in self._patterns):
            return
        raise MessageRejectedError(
            command.message_id,
            f"queue {command.queue!r} is not an allowed destination "
            f"(allowed: {', '.join(self.allowed) or 'none'})",
        )


def _is_pattern(entry: str) -> bool:
    return any(c in entry for c in "*?[")
