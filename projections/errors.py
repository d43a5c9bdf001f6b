"""Every error the projections and their queries raise on purpose.

    SagaError                     (saga_es.errors: the CLI prints any of these as one line)
    └── ProjectionError
        ├── UnknownProjectionError     no projection has that name
        ├── RebuildInProgressError     another rebuild of the same projection is under way
        ├── RebuildSupersededError     a forced rebuild took over the version this one built
        ├── ViewNotReadyError          the views' tables do not exist yet (nothing ran)
        ├── SagaNotFoundError          no saga with that id or business key in the status view
        └── InvalidQueryError          a filter, cursor, duration or time range is unusable
            └── ImpossibleTimeRangeError   a range whose start is after its end

Each exception takes the ids it is about as keyword arguments and builds its own message.
Lower-level errors (SQLAlchemy, psycopg, sqlite3) are translated where they are caught, with
``raise ... from exc``.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from saga_es.errors import SagaError

__all__ = [
    "ImpossibleTimeRangeError",
    "InvalidQueryError",
    "ProjectionError",
    "RebuildInProgressError",
    "RebuildSupersededError",
    "SagaNotFoundError",
    "UnknownProjectionError",
    "ViewNotReadyError",
]


class ProjectionError(SagaError):
    """Base class of the projections' own errors."""


class UnknownProjectionError(ProjectionError):
    def __init__(self, *, name: str, known: list[str]) -> None:
        super().__init__(
            f"unknown projection {name!r}; projections: {', '.join(known)}", projection=name
        )
        self.name = name


class RebuildInProgressError(ProjectionError):
    def __init__(self, *, name: str, version: int) -> None:
        super().__init__(
            f"projection {name!r}: version {version} is already being rebuilt; wait for it to "
            f"finish, or run `saga-es projections rebuild {name} --force` if its process died",
            projection=name,
            version=version,
        )


class RebuildSupersededError(ProjectionError):
    def __init__(self, *, name: str, version: int) -> None:
        super().__init__(
            f"projection {name!r}: version {version} was dropped by a forced rebuild; "
            "this rebuild stops",
            projection=name,
            version=version,
        )


class ViewNotReadyError(ProjectionError):
    def __init__(self, *, where: str) -> None:
        super().__init__(
            f"no projection tables at {where}: run `saga-es projections run` (or with --once) "
            "first",
            where=where,
        )


class SagaNotFoundError(ProjectionError):
    def __init__(self, *, saga_id: UUID | None = None, business_key: str | None = None) -> None:
        what = f"saga {saga_id}" if saga_id is not None else f"business key {business_key!r}"
        super().__init__(
            f"{what}: not in the status view (unknown, or the projection is behind: "
            "see `saga-es projections status`)",
            saga_id=saga_id,
            business_key=business_key,
        )
        self.saga_id, self.business_key = saga_id, business_key


class InvalidQueryError(ProjectionError):
    def __init__(self, *, field: str, value: object, detail: str) -> None:
        super().__init__(f"{field} {value!r}: {detail}", field=field)
        self.field = field


class ImpossibleTimeRangeError(InvalidQueryError):
    def __init__(self, *, field: str, after: datetime, before: datetime) -> None:
        super().__init__(
            field=field,
            value=f"{after.isoformat()}..{before.isoformat()}",
            detail="impossible time range: its start is after its end",
        )
