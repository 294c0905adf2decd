"""
The writer's connection to the audit database: preparing the file, transactions, and
the one place SQLite's failures become ``AuditUnavailable``.

Invariants:

- ``prepare`` puts the file in WAL mode with ``synchronous=FULL`` (and ``fullfsync``
  on macOS), then creates the tables of a new file, upgrades a version 1 file, or
  recognises one of this version, in one transaction; anything else is refused. A
  new file's directory is fsynced, so its entry survives a crash like its records.
- ``transaction`` is ``BEGIN IMMEDIATE`` ... ``COMMIT``: any exception inside rolls
  back and is raised again, so a transaction that fails leaves the file as it was.
- Writers waiting for SQLite's write lock poll at a fixed short interval, so a
  process appending in a loop cannot starve another one until its timeout.
- Every failure of the file, of SQLite, of the signer or of canonicalization leaves
  through ``store_errors`` as ``AuditUnavailable``; no ``sqlite3`` type escapes.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import structlog

from callward.audit._sqlite_format import (
    APPLICATION_ID,
    CREATE_RECORDS_TABLE,
    SCHEMA_VERSION,
    error_name,
)
from callward.audit._tree import TREE_TABLES, MissingNode, add_leaf, get_meta, set_meta
from callward.audit.signer import Signer
from callward.core.errors import AuditUnavailable

log = structlog.get_logger()

_POLL_SECONDS: Final = 0.0005


def prepare(conn: sqlite3.Connection, path: Path, wait_seconds: float, signer: Signer) -> str:
    """
    Set WAL and full sync, and create, upgrade or recognise the tables, in one
    transaction. Returns the log's origin.

    Raises:
        AuditUnavailable: The file cannot be put in WAL mode, is not a callward audit
            database, or has lost its origin.
        sqlite3.Error: SQLite failed (the caller maps it, in ``store_errors``).
    """
    (journal_mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
    if str(journal_mode).lower() != "wal":
        raise AuditUnavailable(f"{path} cannot be put in WAL mode (it is in {journal_mode})")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA fullfsync=ON")  # macOS: fsync alone does not reach the disk
    created = False
    with transaction(conn, wait_seconds):
        (application_id,) = conn.execute("PRAGMA application_id").fetchone()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        (tables,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if application_id == 0 and version == 0 and tables == 0:
            conn.execute(CREATE_RECORDS_TABLE)
            _create_tree_tables(conn, signer)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            created = True
        elif application_id == APPLICATION_ID and version == 1:
            _upgrade_from_version_1(conn, path, signer)
        elif application_id != APPLICATION_ID or version != SCHEMA_VERSION:
            raise AuditUnavailable(
                f"{path} is not a callward audit database (version {SCHEMA_VERSION})",
                remediation="point the audit store at a callward audit.db, or at a new path",
            )
        origin = get_meta(conn, "origin")
        if origin is None:
            raise AuditUnavailable(f"{path} has lost its origin (the meta table was edited)")
    if created:
        # The new file's directory entry must survive a crash, like its records.
        _fsync_directory(path.parent)
        log.info("audit_store_created", path=str(path))
    return origin


def _create_tree_tables(conn: sqlite3.Connection, signer: Signer) -> None:
    for statement in TREE_TABLES:
        conn.execute(statement)
    set_meta(conn, "origin", f"callward.audit/{signer.key_id}")


def _upgrade_from_version_1(conn: sqlite3.Connection, path: Path, signer: Signer) -> None:
    """Add the version 2 tables and build the tree over the records already there."""
    _create_tree_tables(conn, signer)
    first = conn.execute("SELECT key_id FROM records ORDER BY seq LIMIT 1").fetchone()
    if first is not None:
        set_meta(conn, "origin", f"callward.audit/{first[0]}")
    for seq, data in conn.execute("SELECT seq, record FROM records ORDER BY seq").fetchall():
        add_leaf(conn, int(seq) - 1, bytes(data))
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    log.info("audit_store_upgraded", path=str(path), version=SCHEMA_VERSION)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _begin_immediate(conn: sqlite3.Connection, wait_seconds: float, *, polling: bool) -> None:
    """
    ``BEGIN IMMEDIATE``, retried every ``_POLL_SECONDS`` for up to ``wait_seconds``.

    SQLite's own busy handler backs off to 100 ms sleeps, so a process appending in a
    loop can keep the write lock from a waiting one until its timeout; polling at a
    fixed short interval gives each writer its turn. With ``polling`` the connection's
    busy timeout is already 0 and stays so; otherwise it is 0 only meanwhile.
    """
    deadline = time.monotonic() + wait_seconds
    if polling:
        _poll_begin(conn, deadline)
        return
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        _poll_begin(conn, deadline)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {round(wait_seconds * 1000)}")


def _poll_begin(conn: sqlite3.Connection, deadline: float) -> None:
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(_POLL_SECONDS)
        else:
            return


@contextlib.contextmanager
def transaction(
    conn: sqlite3.Connection, wait_seconds: float, *, polling: bool = False
) -> Iterator[None]:
    """
    ``BEGIN IMMEDIATE`` ... ``COMMIT``; on any exception, roll back and re-raise.

    Args:
        wait_seconds: How long to wait for SQLite's write lock.
        polling: The connection's busy timeout is already 0 (an append's); leave it so.
    """
    _begin_immediate(conn, wait_seconds, polling=polling)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                # The original error is what the caller needs; SQLite rolls back a
                # failed transaction itself when the connection closes.
                log.exception("audit_rollback_failed", error=type(exc).__name__)
        raise


@contextlib.contextmanager
def store_errors(operation: str, path: Path, *, kind: str = "") -> Iterator[None]:
    """The one place SQLite, OS, signer and encoding failures become ``AuditUnavailable``."""
    try:
        yield
    except (sqlite3.Error, OSError, ValueError, MissingNode) as exc:
        error = error_name(exc) if isinstance(exc, sqlite3.Error) else type(exc).__name__
        log.exception(
            "audit_store_failed", operation=operation, path=str(path), kind=kind, error=error
        )
        raise AuditUnavailable(f"audit {operation} on {path} failed ({error})") from exc


__all__ = ["prepare", "store_errors", "transaction"]
