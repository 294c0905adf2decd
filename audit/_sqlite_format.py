"""
The audit database's file format, and opening it read-only.

What makes a file a callward audit database: its ``application_id``, its
``user_version`` and the columns of its ``records`` table; the tree, checkpoint,
meta and pending-call tables beside it are ``_tree``'s. Readers (``verify``,
``prove``, ``read_records``) need only this module; the writer (``_sqlite``)
builds on it, so reading a log never loads the code that writes one.

Invariants:

- ``connect_read_only`` opens with ``mode=ro`` (or ``immutable=1`` for a reviewer's
  read-only copy with no ``-wal`` beside it): a reader never changes the file.
- A file that is not one of ours (wrong application id, version or columns) is
  refused as ``UnreadableDatabase`` before any record is read.
- ``row_to_record`` turns a row into an ``AuditRecord`` or raises ``ValueError``; it
  never checks the columns against the signed bytes (``_chain.check_record`` does).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from callward.core._canonical import Sha256Hex
from callward.core.types import AuditRecord, KeyId

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


def connect_read_only(path: Path) -> sqlite3.Connection:
    """
    Open an audit database read-only (``mode=ro``), for verifying and reading.

    Raises:
        UnreadableDatabase: The file is missing, is not SQLite, or is not a callward
            audit database of this version.
    """
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


def error_name(exc: sqlite3.Error) -> str:
    """SQLite's own name for an error (``SQLITE_BUSY``), or its Python type."""
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
    "UnreadableDatabase",
    "connect_read_only",
    "error_name",
    "row_to_record",
]
