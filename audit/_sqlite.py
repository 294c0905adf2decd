"""
The audit log in one SQLite file: signed, hash-chained, durable before ``append`` returns.

Invariants:

- ``append`` returns only after its record is committed with ``synchronous=FULL`` in
  WAL mode, i.e. fsynced. If it raises, the caller must assume nothing was written
  and must not proceed; the next append chains from whatever the file really holds.
- Each append reads the head (last seq and hash) inside its own ``BEGIN IMMEDIATE``
  transaction, so appends from threads (one lock) and from processes sharing the
  file (SQLite's write lock, waited on up to ``busy_timeout_seconds``) chain one
  after another: seqs are 1..N, each exactly once.
- Every failure of the file, of SQLite, of the signer or of canonicalization leaves
  as ``AuditUnavailable``; no ``sqlite3`` type escapes this module.
- Timestamps never go backwards along the chain: a clock that steps back is held at
  the head's ts (and logged), so a verifier never sees a false alarm.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

import structlog

from callward.audit._chain import (
    GENESIS_PREV,
    canonical_body,
    format_ts,
    is_record_kind,
    parse_ts,
    seal,
)
from callward.audit.signer import Signer
from callward.core._canonical import JSONValue, Sha256Hex
from callward.core.errors import AuditUnavailable
from callward.core.types import AuditRecord, KeyId

log = structlog.get_logger()

#: ``PRAGMA application_id`` of a callward audit database ("cwal").
APPLICATION_ID: Final = 0x6377616C
#: ``PRAGMA user_version``: the version of the table layout below.
SCHEMA_VERSION: Final = 1
COLUMNS: Final = ("seq", "ts", "kind", "prev", "key_id", "body", "record", "hash", "signature")

_CREATE_TABLE: Final = """
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
_SELECT: Final = "SELECT seq, ts, kind, prev, key_id, body, record, hash, signature FROM records"
_INSERT: Final = (
    "INSERT INTO records (seq, ts, kind, prev, key_id, body, record, hash, signature)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_HEAD: Final = "SELECT seq, hash, ts FROM records ORDER BY seq DESC LIMIT 1"
_PAGE_ROWS: Final = 512
_POLL_SECONDS: Final = 0.0005
# A writer that waited for the lock stamps a time just before the head's; that is
# expected. A step back larger than this is the clock itself going backwards.
_CLOCK_STEP_BACK_SECONDS: Final = 1.0
# What SQLite says when a read-only WAL database sits where it cannot make its -shm.
_NEEDS_IMMUTABLE: Final = frozenset({"SQLITE_READONLY_DIRECTORY", "SQLITE_CANTOPEN"})


class UnreadableDatabase(Exception):
    """A file that cannot be read as a callward audit database (missing, not SQLite, other)."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SQLiteAuditStore:
    """
    An append-only log of signed records in one SQLite file; ``callward.core.AuditLog``.

    The constructor does no I/O: call ``open()`` (or use ``with``), which creates the
    file and its table on first use. Safe to share between threads, and between
    processes that open the same file.

    Args:
        path: The database file. Its directory must exist.
        signer: Signs every record.
        clock: Returns the current time, timezone-aware; injected for tests.
        busy_timeout_seconds: How long an append waits for another process's write.

    Example::

        with SQLiteAuditStore(home / "audit.db", FileSigner.load_or_create(home / "keys")) as log:
            record = log.append("call.denied", {"call_id": "c1", "kind": "schema"})
    """

    def __init__(
        self,
        path: Path,
        signer: Signer,
        *,
        clock: Callable[[], datetime] = _utc_now,
        busy_timeout_seconds: float = 5.0,
    ) -> None:
        if not busy_timeout_seconds >= 0:
            raise ValueError("busy_timeout_seconds must be zero or more")
        self._path = Path(path)
        self._signer = signer
        self._clock = clock
        self._busy_timeout_seconds = busy_timeout_seconds
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def key_id(self) -> KeyId:
        return self._signer.key_id

    def open(self) -> None:
        """
        Open the file (WAL, ``synchronous=FULL``), creating the table on first use.

        Opening an open store does nothing.

        Raises:
            AuditUnavailable: The file cannot be opened or created, or is not a
                callward audit database.
        """
        with self._lock:
            if self._conn is not None:
                return
            with _store_errors("open", self._path):
                conn = sqlite3.connect(
                    self._path,
                    timeout=self._busy_timeout_seconds,
                    isolation_level=None,
                    check_same_thread=False,
                )
                try:
                    _prepare(conn, self._path, self._busy_timeout_seconds)
                except BaseException:
                    conn.close()
                    raise
            self._conn = conn
        log.info("audit_store_opened", path=str(self._path), key_id=self._signer.key_id)

    def close(self) -> None:
        """Close the file. Appends after this raise ``AuditUnavailable``."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def append(self, kind: str, body: Mapping[str, JSONValue]) -> AuditRecord:
        """
        Sign ``body`` as the next record and make it durable before returning.

        Raises:
            ValueError: ``kind`` is not a dotted lower-case name like ``call.completed``.
            AuditUnavailable: The record is not durable; the caller must not proceed.
        """
        return self.append_at(kind, body, now=self._clock())

    def append_at(self, kind: str, body: Mapping[str, JSONValue], *, now: datetime) -> AuditRecord:
        """
        ``append`` at a given time (timezone-aware), the twin tests call.

        Raises:
            ValueError: ``kind`` is malformed or ``now`` is naive.
            TypeError: ``body`` is not a mapping.
            AuditUnavailable: The record is not durable; the caller must not proceed.
        """
        if not is_record_kind(kind):
            raise ValueError("a record kind is dotted lower-case, like call.completed")
        ts = format_ts(now)
        with _store_errors("append", self._path, kind=kind):
            body_json = canonical_body(body)
        with self._lock:
            conn = self._require_open()
            with (
                _store_errors("append", self._path, kind=kind),
                _transaction(conn, self._busy_timeout_seconds),
            ):
                head = conn.execute(_HEAD).fetchone()
                seq, prev, head_ts = (0, GENESIS_PREV, None) if head is None else head
                if head_ts is not None and ts < str(head_ts):
                    _log_held_ts(ts, str(head_ts))
                    ts = str(head_ts)
                record = seal(
                    seq=seq + 1,
                    ts=ts,
                    kind=kind,
                    prev=Sha256Hex(prev),
                    body_json=body_json,
                    signer=self._signer,
                )
                conn.execute(
                    _INSERT,
                    (
                        record.seq,
                        record.ts,
                        record.kind,
                        record.prev,
                        record.key_id,
                        record.body_json.decode("utf-8"),
                        record.record_bytes,
                        record.record_hash,
                        record.signature,
                    ),
                )
        return record

    def last(self) -> AuditRecord | None:
        """
        The newest record in the file (from any process), or None if it is empty.

        Raises:
            AuditUnavailable: The file cannot be read.
        """
        records = self._fetch(f"{_SELECT} ORDER BY seq DESC LIMIT 1", ())
        return records[0] if records else None

    def get(self, seq: int) -> AuditRecord | None:
        """
        The record at ``seq``, or None if there is none.

        Raises:
            AuditUnavailable: The file cannot be read.
        """
        records = self._fetch(f"{_SELECT} WHERE seq = ?", (seq,))
        return records[0] if records else None

    def records(self, start: int = 1) -> Iterator[AuditRecord]:
        """
        The records from ``start`` on, in seq order, read a page at a time.

        Records appended while iterating are included if the iterator has not
        passed their seq yet.

        Raises:
            AuditUnavailable: The file cannot be read.
        """
        after = start - 1
        while True:
            page = self._fetch(f"{_SELECT} WHERE seq > ? ORDER BY seq LIMIT {_PAGE_ROWS}", (after,))
            yield from page
            if len(page) < _PAGE_ROWS:
                return
            after = page[-1].seq

    def count(self) -> int:
        """
        The number of records in the file.

        Raises:
            AuditUnavailable: The file cannot be read.
        """
        with self._lock:
            conn = self._require_open()
            with _store_errors("read", self._path):
                (count,) = conn.execute("SELECT count(*) FROM records").fetchone()
        return int(count)

    def _fetch(self, sql: str, params: tuple[int, ...]) -> list[AuditRecord]:
        with self._lock:
            conn = self._require_open()
            with _store_errors("read", self._path):
                # A row that is not a record (the file was edited) fails as a read.
                return [row_to_record(row) for row in conn.execute(sql, params)]

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise AuditUnavailable(
                f"the audit store {self._path} is not open",
                remediation="open the store (SQLiteAuditStore.open or `with`) before use",
            )
        return self._conn


def _log_held_ts(ts: str, head_ts: str) -> None:
    """Log a ts held at the head's: a warning only if the clock really stepped back."""
    try:
        behind = parse_ts(head_ts) - parse_ts(ts)
    except ValueError:
        behind = timedelta.max
    if behind.total_seconds() > _CLOCK_STEP_BACK_SECONDS:
        log.warning("audit_clock_went_backwards", clock_ts=ts, head_ts=head_ts)
    else:
        log.debug("audit_ts_held_at_head", clock_ts=ts, head_ts=head_ts)


def _prepare(conn: sqlite3.Connection, path: Path, wait_seconds: float) -> None:
    """Set WAL and full sync, and create or recognise the table, in one transaction."""
    (journal_mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
    if str(journal_mode).lower() != "wal":
        raise AuditUnavailable(f"{path} cannot be put in WAL mode (it is in {journal_mode})")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA fullfsync=ON")  # macOS: fsync alone does not reach the disk
    created = False
    with _transaction(conn, wait_seconds):
        (application_id,) = conn.execute("PRAGMA application_id").fetchone()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        (tables,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if application_id == 0 and version == 0 and tables == 0:
            conn.execute(_CREATE_TABLE)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            created = True
        elif application_id != APPLICATION_ID or version != SCHEMA_VERSION:
            raise AuditUnavailable(
                f"{path} is not a callward audit database (version {SCHEMA_VERSION})",
                remediation="point the audit store at a callward audit.db, or at a new path",
            )
    if created:
        # The new file's directory entry must survive a crash, like its records.
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info("audit_store_created", path=str(path))


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
    if application_id != APPLICATION_ID or version != SCHEMA_VERSION or columns != COLUMNS:
        conn.close()
        raise UnreadableDatabase(
            f"{path} is not a callward audit database (version {SCHEMA_VERSION})"
        )
    return conn


def error_name(exc: sqlite3.Error) -> str:
    """SQLite's own name for an error (``SQLITE_BUSY``), or its Python type."""
    return getattr(exc, "sqlite_errorname", None) or type(exc).__name__


def _begin_immediate(conn: sqlite3.Connection, wait_seconds: float) -> None:
    """
    ``BEGIN IMMEDIATE``, retried every ``_POLL_SECONDS`` for up to ``wait_seconds``.

    SQLite's own busy handler backs off to 100 ms sleeps, so a process appending in a
    loop can keep the write lock from a waiting one until its timeout; polling at a
    fixed short interval gives each writer its turn.
    """
    deadline = time.monotonic() + wait_seconds
    conn.execute("PRAGMA busy_timeout = 0")
    try:
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
    finally:
        conn.execute(f"PRAGMA busy_timeout = {round(wait_seconds * 1000)}")


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, wait_seconds: float) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; on any exception, roll back and re-raise."""
    _begin_immediate(conn, wait_seconds)
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
def _store_errors(operation: str, path: Path, *, kind: str = "") -> Iterator[None]:
    """The one place SQLite, OS, signer and encoding failures become ``AuditUnavailable``."""
    try:
        yield
    except (sqlite3.Error, OSError, ValueError) as exc:
        error = error_name(exc) if isinstance(exc, sqlite3.Error) else type(exc).__name__
        log.exception(
            "audit_store_failed", operation=operation, path=str(path), kind=kind, error=error
        )
        raise AuditUnavailable(f"audit {operation} on {path} failed ({error})") from exc


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


if TYPE_CHECKING:
    from callward.core.protocols import AuditLog

    def _is_an_audit_log(store: SQLiteAuditStore) -> AuditLog:
        """mypy proves the store satisfies the protocol the gateway is handed."""
        return store


__all__ = [
    "APPLICATION_ID",
    "COLUMNS",
    "SCHEMA_VERSION",
    "SQLiteAuditStore",
    "UnreadableDatabase",
    "connect_read_only",
    "error_name",
    "row_to_record",
]
