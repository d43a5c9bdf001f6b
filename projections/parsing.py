"""Reading the inspection commands' arguments: ids, durations, times, refused with the reason."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from uuid import UUID

from projections.errors import InvalidQueryError

__all__ = ["parse_duration", "parse_saga_id", "parse_time"]

_PART = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_UNITS = {
    "ms": timedelta(milliseconds=1), "s": timedelta(seconds=1), "m": timedelta(minutes=1),
    "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1),
}  # fmt: skip


def parse_duration(text: str, *, field: str) -> timedelta:
    """``10m``, ``90s``, ``1h30m``, ``2d``: a positive duration."""
    compact = text.strip().replace(" ", "")
    parts = _PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise InvalidQueryError(
            field=field, value=text, detail="not a duration (like 90s, 10m, 1h30m, 2d)"
        )
    total = sum((int(n) * _UNITS[u] for n, u in parts), timedelta())
    if total <= timedelta(0):
        raise InvalidQueryError(field=field, value=text, detail="must be longer than zero")
    return total


def parse_time(text: str, *, field: str) -> datetime:
    """An ISO 8601 time (``2030-01-01T12:00``, ``2030-01-01 12:00:00+02:00``); UTC if it
    names no timezone."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidQueryError(
            field=field, value=text, detail="not an ISO 8601 time (like 2030-01-31T12:00:00Z)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_saga_id(text: str) -> UUID:
    try:
        return UUID(text.strip())
    except ValueError:
        raise InvalidQueryError(
            field="saga id", value=text, detail="not a UUID (use --key for a business key)"
        ) from None
