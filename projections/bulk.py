"""Writing a batch's rows in a few statements, the fast way each database offers.

PostgreSQL: rows go in by binary ``COPY`` (the driver's C adapters, no text formatting in
Python); upserts copy the batch into a temporary table and merge it with one
``INSERT ... SELECT ... ON CONFLICT``, so a batch costs a handful of round trips whatever its
size. SQLite is in-process: an ``executemany`` of ``INSERT ... ON CONFLICT`` is the fast way there.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Integer,
    Table,
    Uuid,
    any_,
    bindparam,
    func,
    insert,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from projections.database import UTCDateTime

__all__ = ["insert_many", "qualified", "rows_by_id", "upsert_many"]

#: Ids per ``IN (...)`` list on SQLite, well under its parameter limit.
_CHUNK = 500


def _pg_type(column: Column[Any]) -> str:
    """The PostgreSQL type a binary COPY must announce for the column."""
    kind = column.type
    if isinstance(kind, UTCDateTime):
        return "timestamptz"
    if isinstance(kind, Uuid):
        return "uuid"
    if isinstance(kind, BigInteger):
        return "int8"
    if isinstance(kind, Integer):
        return "int4"
    if isinstance(kind, Float):
        return "float8"
    return "text"  # String and Text columns; varchar's binary input reads text


def qualified(conn: Connection, table: Table) -> str:
    """The table's name for raw SQL, in the schema the connection's statements use."""
    schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(None)
    return f'"{schema}"."{table.name}"' if schema else f'"{table.name}"'


def _copy(conn: Connection, target: str, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    columns = list(table.columns)
    names = [c.name for c in columns]
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    quoted = ", ".join(f'"{n}"' for n in names)
    with cursor.copy(f"COPY {target} ({quoted}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types([_pg_type(c) for c in columns])
        values = itemgetter(*names)  # a row's values in column order, without a Python loop
        for row in rows:
            copy.write_row(values(row))


def rows_by_id(conn: Connection, table: Table, ids: Sequence[UUID]) -> list[Any]:
    """The rows of ``table`` whose ``saga_id`` is in ``ids``."""
    if not ids:
        return []
    if conn.dialect.name == "postgresql":
        wanted = bindparam("ids", list(ids), type_=postgresql.ARRAY(table.c.saga_id.type))
        return list(conn.execute(select(table).where(table.c.saga_id == any_(wanted))).all())
    found: list[Any] = []
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        found.extend(conn.execute(select(table).where(table.c.saga_id.in_(chunk))).all())
    return found


def insert_many(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert new rows (a duplicate key fails the transaction)."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(insert(table), list(rows))
        return
    _copy(conn, qualified(conn, table), table, rows)


def upsert_many(
    conn: Connection,
    table: Table,
    keys: Sequence[str],
    rows: Sequence[dict[str, Any]],
    *,
    add: Sequence[str] = (),
    maximum: Sequence[str] = (),
) -> None:
    """Insert rows, or update the row with the same ``keys``: columns in ``add`` are added to
    the stored value, those in ``maximum`` keep the larger, all others are replaced."""
    if not rows:
        return
    others = [c.name for c in table.columns if c.name not in keys]
    if conn.dialect.name == "postgresql":
        name = qualified(conn, table)
        staging = f'"_batch_{table.name}"'
        # Created once per connection (IF NOT EXISTS: a rolled-back batch takes its creation
        # with it); emptied by every commit.
        conn.exec_driver_sql(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {staging} (LIKE {name}) ON COMMIT DELETE ROWS"
        )
        _copy(conn, staging, table, rows)
        columns = ", ".join(f'"{c.name}"' for c in table.columns)

        def assignment(c: str) -> str:
            if c in add:
                return f'"{c}" = {name}."{c}" + EXCLUDED."{c}"'
            if c in maximum:
                return f'"{c}" = GREATEST({name}."{c}", EXCLUDED."{c}")'
            return f'"{c}" = EXCLUDED."{c}"'

        conn.exec_driver_sql(
            f"INSERT INTO {name} ({columns}) SELECT {columns} FROM {staging} "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET "
            + ", ".join(assignment(c) for c in others)
        )
        conn.exec_driver_sql(f"TRUNCATE {staging}")
        return
    statement = sqlite.insert(table)
    new = statement.excluded
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=list(keys),
            set_={
                c: (
                    table.c[c] + new[c]
                    if c in add
                    else func.max(table.c[c], new[c])
                    if c in maximum
                    else new[c]
                )
                for c in others
            },
        ),
        list(rows),
    )
