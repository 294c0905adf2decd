"""
The audit database's file format, and opening it read-only.

What makes a file a callward audit database: its ``application_id``, its
``user_version`` and the columns of its ``records`` table; the tree, checkpoint,
meta and pending-call tables beside it are ``_tree``'s. Readers (``verify``,
``prove``, ``read_records``) need only this module; the writer (``_sqlite``)
builds on it, so reading a log never loads the code that writes one.

Invariants:

- ``connect_read_only`` opens with ``mode=ro`` (or ``immutable=1`` for a reviewer's
  read-only copy with no ``-wal`` beside it): a reader never changes the file. Given
  a fleet's ``postgresql://`` URL instead, it opens the fleet's store in one read-only
  snapshot (``_postgres_read``), behind the same ``ReadConnection`` surface.
- A file that is not one of ours (wrong application id, version or columns) is
  refused as ``UnreadableDatabase`` before any record is read.
- ``row_to_record`` turns a row into an ``AuditRecord`` or raises ``ValueError``; it
  never checks the columns against the signed bytes (``_chain.check_record`` does).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, TypeAlias, overload

from callward.core._canonical import Sha256Hex
from callward.core._postgres import StoreUrl, is_store_url
from callward.core.types import AuditRecord, KeyId

#: Where a reader finds a log: an SQLite file, or a fleet's PostgreSQL store (a
#: ``StoreUrl``, or its ``postgresql://`` text).
AuditSource: TypeAlias = Path | str | StoreUrl

#: ``PRAGMA application_id`` of a callward audit database ("cwal").
APPLICATION_ID: Final = 0x6377616C
#: ``PRAGMA user_version``: the version of the table layout below (2 adds the tree,
#: checkpoints, meta and pending calls; a version 1 file is upgraded when opened).
SCHEMA_VERSION: Final = 2
#: The record kind that hands the log to a new key, signed by the old one.
KEY_ROTATED: Final = "key.rotated"
#: The record kind written at start for an authorized call that never completed.
CALL_INTERRUPTED: Final = "call.interrupted"
COLUMNS: Final = ("seq", "ts", "kind", "prev", "key_id", "body", "record", "hash", "signature")

CREATE_RECORDS_TABLE: Final = """
CREATE TABLE records (
    seq INTEGER PRIMARY KEY,
    ts TEXT NOT NULL,
    kind TEXT NOT NULL,
    prev TEXT NOT NULL,
    key_id TEXT NOT NULL,
    body TEXT NOT NULL,
    record BLOB NOT NULL,
    hash TEXT NOT NULL,
    signature BLOB NOT NULL
)
"""
SELECT_RECORDS: Final = (
    "SELECT seq, ts, kind, prev, key_id, body, record, hash, signature FROM records"
)
INSERT_RECORD: Final = (
    "INSERT INTO records (seq, ts, kind, prev, key_id, body, record, hash, signature)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# What SQLite says when a read-only WAL database sits where it cannot make its -shm.
_NEEDS_IMMUTABLE: Final = frozenset({"SQLITE_READONLY_DIRECTORY", "SQLITE_CANTOPEN"})


class UnreadableDatabase(Exception):
    """A file that cannot be read as a callward audit database (missing, not SQLite, other)."""


class Rows(Protocol):
    """What a reader's query returns: ``sqlite3.Cursor``'s reading surface."""

    def fetchone(self) -> Any:
        ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class ReadConnection(Protocol):
    """
    The part of ``sqlite3.Connection`` the readers use, which an SQLite file and a
    fleet's PostgreSQL store (``_postgres_read``) both offer: ``?`` placeholders, and
    failures raised as ``sqlite3.Error``.
    """

    def execute(self, sql: str, parameters: Sequence[object] = ..., /) -> Rows: ...

    def close(self) -> None: ...


def resolve_source(source: AuditSource) -> Path | StoreUrl:
    """
    The SQLite file or the fleet store ``source`` names.

    Raises:
        ConfigurationError: ``source`` is ``postgresql://`` text that is not a valid
            store URL, or it holds a password.
    """
    if isinstance(source, StoreUrl):
        return source
    if is_store_url(source):
        return StoreUrl.parse(source)
    return Path(source)


def describe_source(source: AuditSource) -> str:
    """``source`` as messages and logs name it: a path, or a URL (never with a password)."""
    return source.url if isinstance(source, StoreUrl) else str(source)


@overload
def connect_read_only(path: Path) -> sqlite3.Connection: ...


@overload
def connect_read_only(path: AuditSource) -> ReadConnection: ...


def connect_read_only(path: AuditSource) -> ReadConnection:
    """
    Open an audit database read-only (``mode=ro``), for verifying and reading; a
    fleet's store URL opens the fleet's PostgreSQL in one read-only snapshot.

    Raises:
        UnreadableDatabase: The file is missing, is not SQLite, or is not a callward
            audit database of this version (or the store cannot be reached, or is not
            a callward fleet audit store).
        ConfigurationError: A ``postgresql://`` text that is not a valid store URL.
    """
    source = resolve_source(path)
    if isinstance(source, StoreUrl):
        from callward.audit._postgres_read import (  # noqa: PLC0415 - fleet readers only
            connect_store_read_only,
        )

        return connect_store_read_only(source)
    return _connect_sqlite_read_only(source)


def _connect_sqlite_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise UnreadableDatabase(f"{path} does not exist or is not a file")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        return _connect_and_check(uri, path)
    except sqlite3.Error as exc:
        wal = path.with_name(path.name + "-wal")
        if error_name(exc) not in _NEEDS_IMMUTABLE or wal.exists():
            raise UnreadableDatabase(
                f"{path} cannot be opened as an SQLite database ({error_name(exc)})"
            ) from exc
    # A WAL database in a directory we cannot write (a reviewer's copy): with no -wal
    # file beside it, the main file holds every committed record and nothing is
    # writing it, so it may be read as immutable.
    try:
        return _connect_and_check(uri + "&immutable=1", path)
    except sqlite3.Error as exc:
        raise UnreadableDatabase(
            f"{path} cannot be opened as an SQLite database ({error_name(exc)})"
        ) from exc


def _connect_and_check(uri: str, path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        (application_id,) = conn.execute("PRAGMA application_id").fetchone()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(records)"))
    except BaseException:
        conn.close()
        raise
    if application_id != APPLICATION_ID or version not in (1, SCHEMA_VERSION) or columns != COLUMNS:
        conn.close()
        raise UnreadableDatabase(
            f"{path} is not a callward audit database (version {SCHEMA_VERSION})"
        )
    return conn


def has_table(conn: ReadConnection, name: str) -> bool:
    """Whether the database holds the table ``name`` (a version 1 file has no tree)."""
    if isinstance(conn, sqlite3.Connection):
        (count,) = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return bool(count)
    from callward.audit._postgres_read import PostgresReadConnection  # noqa: PLC0415

    if isinstance(conn, PostgresReadConnection):
        return conn.has_table(name)
    raise TypeError("has_table reads an SQLite or PostgreSQL reader's connection")


def error_name(exc: sqlite3.Error) -> str:
    """
    SQLite's own name for an error (``SQLITE_BUSY``); for a fleet store's, what
    ``callward.core._postgres.describe`` says; else its Python type.
    """
    reason = getattr(exc, "postgres_reason", None)
    if isinstance(reason, str):
        return reason
    return getattr(exc, "sqlite_errorname", None) or type(exc).__name__


def row_to_record(row: Sequence[object]) -> AuditRecord:
    """
    A row of the ``records`` table as an ``AuditRecord``, its columns not yet checked
    against the signed bytes (``check_record`` does that).

    Raises:
        ValueError: A column has the wrong type, or a hash column is not 64 hex digits.
    """
    seq, ts, kind, prev, key_id, body, record, record_hash, signature = row
    if not isinstance(seq, int):
        raise ValueError("the seq column is not an integer")  # noqa: TRY004 - a data error
    return AuditRecord(
        seq=seq,
        ts=_text(ts, "ts"),
        kind=_text(kind, "kind"),
        prev=Sha256Hex(_text(prev, "prev")),
        key_id=KeyId(_text(key_id, "key_id")),
        body_json=_text(body, "body").encode("utf-8"),
        record_bytes=_blob(record, "record"),
        record_hash=Sha256Hex(_text(record_hash, "hash")),
        signature=_blob(signature, "signature"),
    )


def _text(value: object, column: str) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"the {column} column is not text")


def _blob(value: object, column: str) -> bytes:
    if isinstance(value, bytes):
        return value
    raise ValueError(f"the {column} column is not a blob")


__all__ = [
    "APPLICATION_ID",
    "CALL_INTERRUPTED",
    "COLUMNS",
    "CREATE_RECORDS_TABLE",
    "INSERT_RECORD",
    "KEY_ROTATED",
    "SCHEMA_VERSION",
    "SELECT_RECORDS",
    "AuditSource",
    "ReadConnection",
    "Rows",
    "UnreadableDatabase",
    "connect_read_only",
    "describe_source",
    "error_name",
    "has_table",
    "resolve_source",
    "row_to_record",
]
