"""
Read records from an audit database for review (``callward audit show``), read-only.

Reading is not verifying: these records are what the file holds. ``verify`` says
whether the file can be trusted.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from callward.audit._chain import is_record_kind
from callward.audit._sqlite import (
    UnreadableDatabase,
    connect_read_only,
    error_name,
    row_to_record,
)
from callward.core.errors import AuditUnavailable, ConfigurationError
from callward.core.types import AuditRecord

_COLUMNS = "seq, ts, kind, prev, key_id, body, record, hash, signature"


def read_records(
    db_path: Path, *, start: int = 1, last: int | None = None, kind: str | None = None
) -> Iterator[AuditRecord]:
    """
    The records of an audit database in seq order, streamed, without verifying them.

    Args:
        start: The first seq to read.
        last: Only the last ``last`` records (of those from ``start`` on, of ``kind``).
        kind: Only records of this kind, e.g. ``call.denied``.

    Raises:
        ValueError: ``kind`` is not a record kind, or ``last`` is negative.
        ConfigurationError: The file is missing or is not a callward audit database.
        AuditUnavailable: The file failed while it was being read.
    """
    if kind is not None and not is_record_kind(kind):
        raise ValueError("a record kind is dotted lower-case, like call.completed")
    if last is not None and last < 0:
        raise ValueError("last must be zero or more")
    where = "seq >= ?"
    params: list[object] = [start]
    if kind is not None:
        where += " AND kind = ?"
        params.append(kind)
    sql = f"SELECT {_COLUMNS} FROM records WHERE {where} ORDER BY seq"  # noqa: S608 - constants
    if last is not None:
        sql = (
            f"SELECT {_COLUMNS} FROM (SELECT {_COLUMNS} FROM records WHERE {where}"  # noqa: S608
            " ORDER BY seq DESC LIMIT ?) ORDER BY seq"
        )
        params.append(last)
    try:
        conn = connect_read_only(Path(db_path))
    except UnreadableDatabase as exc:
        raise ConfigurationError(
            str(exc), remediation="pass the audit.db of a callward home (--home or --db)"
        ) from exc
    return _stream(conn, sql, tuple(params), Path(db_path))


def _stream(
    conn: sqlite3.Connection, sql: str, params: tuple[object, ...], path: Path
) -> Iterator[AuditRecord]:
    try:
        for row in conn.execute(sql, params):
            yield row_to_record(row)
    except (sqlite3.Error, ValueError) as exc:
        name = error_name(exc) if isinstance(exc, sqlite3.Error) else type(exc).__name__
        raise AuditUnavailable(f"reading {path} failed ({name})") from exc
    finally:
        conn.close()


__all__ = ["read_records"]
