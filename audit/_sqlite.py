"""
The audit log in one SQLite file: signed, hash-chained, committed before ``append`` returns.

Invariants:

- ``append`` returns only after its record is committed in WAL mode. The commit is
  fsynced (``synchronous=FULL``) before ``append`` returns (``sync="every"``, the
  default) unless the store's ``sync`` is ``"authorized"`` and the transaction holds only
  ``DEFERRED_SYNC_KINDS`` records (``call.completed``, ``call.denied``,
  ``call.rejected``): those are in the file at once (a killed process loses none),
  and reach the disk with the next fsynced commit (every ``call.authorized``), the
  flush at most ``_FLUSH_SECONDS`` later, a checkpoint, or ``close``; only a crash
  of the machine in that window can lose them (and a receipt already handed out may
  then name a checkpoint the log no longer matches, which looks like a fork: hence
  not the default). So ``call.authorized`` is always on
  disk before the call it authorizes runs. If ``append`` raises, the caller must
  assume nothing was written and must not proceed; the next append chains from
  whatever the file really holds.
- Each append reads the head (last seq and hash) inside its own ``BEGIN IMMEDIATE``
  transaction, so appends from threads (one lock) and from processes sharing the
  file (SQLite's write lock, waited on up to ``busy_timeout_seconds``) chain one
  after another: seqs are 1..N, each exactly once.
- Every failure of the file, of SQLite, of the signer or of canonicalization leaves
  as ``AuditUnavailable``; no ``sqlite3`` type escapes this module.
- Timestamps never go backwards along the chain: a clock that steps back is held at
  the head's ts (and logged), so a verifier never sees a false alarm.
- Group commit: appends from many threads that arrive while one transaction is
  being written queue up, and the next transaction writes them all with one fsync;
  no append returns before the transaction holding its record has committed.
- The Merkle tree (``_tree``) and the set of authorized-but-unfinished calls are
  written in the same transaction as the records, so they never disagree with them.
  The store keeps the tree's frontier in memory while the file's head is the one it
  wrote last (else it reads it again), and the inclusion proofs of its newest
  records, so an append and a receipt read no tree rows.
- A signed checkpoint is written every ``checkpoint_every`` records, every
  ``checkpoint_seconds`` while records arrive, and on ``close``; each is offered to
  the witnesses after it commits.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal, Self

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from callward.audit._chain import (
    GENESIS_PREV,
    canonical_body,
    format_ts,
    is_record_kind,
    parse_ts,
    seal,
)
from callward.audit._checkpoint import Checkpoint, note_key_hash, sign_checkpoint
from callward.audit._merkle import leaf_hash, node_hash, root_from_inclusion_proof
from callward.audit._tree import (
    TREE_TABLES,
    MissingNode,
    add_leaf,
    extend_frontier,
    frontier_at,
    get_meta,
    inclusion_path,
    put_nodes,
    root_at,
    set_meta,
)
from callward.audit._witness import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_SECONDS,
    Witness,
    publish_to_all,
)
from callward.audit.signer import Signer
from callward.core._canonical import JSONValue, Sha256Hex
from callward.core.errors import AuditUnavailable, ConfigurationError, VerificationFailed
from callward.core.types import AuditRecord, KeyId, Receipt, ReceiptProof

log = structlog.get_logger()

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
# What an append transaction reads first, in one statement: the key the log is
# signed by now, the size of the latest checkpoint, and the head (NULLs if empty).
_STATE: Final = (
    "SELECT (SELECT value FROM meta WHERE name = 'current_key_id'),"
    " (SELECT coalesce(max(size), 0) FROM checkpoints), head.seq, head.hash, head.ts"
    " FROM (SELECT 1) LEFT JOIN"
    " (SELECT seq, hash, ts FROM records ORDER BY seq DESC LIMIT 1) AS head"
)
#: Kinds whose transaction need not be fsynced before ``append`` returns under
#: ``sync="authorized"``: nothing waits on them to be on disk before it runs. They
#: are committed (a killed process loses none of them) and become durable with the
#: next fsynced transaction, the flush at most ``_FLUSH_SECONDS`` later, or ``close``.
DEFERRED_SYNC_KINDS: Final = frozenset({"call.completed", "call.denied", "call.rejected"})
Sync = Literal["authorized", "every"]
_FLUSH_SECONDS: Final = 0.5
# How many of this store's newest records keep their inclusion proof in memory.
_PROOF_CACHE: Final = 1024
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


@dataclass(slots=True)
class _Request:
    """One append waiting for a transaction; the leader fills ``record`` or ``error``."""

    kind: str
    body_json: bytes
    ts: str
    authorizes: str | None = None
    completes: int | None = None
    only_if_pending: bool = False
    rotate_to: Signer | None = None
    record: AuditRecord | None = None
    error: BaseException | None = None
    done: bool = False

    def result(self) -> AuditRecord | None:
        if self.error is not None:
            raise self.error
        return self.record


class SQLiteAuditStore:
    """
    An append-only log of signed records in one SQLite file; ``callward.core.AuditLog``.

    The constructor does no I/O: call ``open()`` (or use ``with``), which creates the
    file and its tables on first use. Safe to share between threads, and between
    processes that open the same file.

    Args:
        path: The database file. Its directory must exist.
        signer: Signs every record and checkpoint.
        clock: Returns the current time, timezone-aware; injected for tests.
        busy_timeout_seconds: How long an append waits for another process's write.
        checkpoint_every: Write a signed checkpoint once this many records follow the
            last one.
        checkpoint_seconds: Also write one when this long has passed since the last
            and records arrived (checked by a background thread; 0 turns it off).
        witnesses: Where each new checkpoint is copied.
        sync: ``"every"`` (the default): every transaction is fsynced before its
            appends return, so a receipt never names a record a machine crash could
            lose. ``"authorized"``: a transaction is fsynced before its appends return
            unless it holds only ``DEFERRED_SYNC_KINDS`` records, which are fsynced
            with the next one or within ``_FLUSH_SECONDS`` (one fsync per call instead
            of two); every ``call.authorized`` is still on disk before the call runs.

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
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
        witnesses: Sequence[Witness] = (),
        sync: Sync = "every",
    ) -> None:
        if sync not in ("authorized", "every"):
            raise ValueError('sync is "authorized" or "every"')
        if not busy_timeout_seconds >= 0:
            raise ValueError("busy_timeout_seconds must be zero or more")
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        if not checkpoint_seconds >= 0:
            raise ValueError("checkpoint_seconds must be zero or more")
        self._path = Path(path)
        self._signer = signer
        self._clock = clock
        self._busy_timeout_seconds = busy_timeout_seconds
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        self._witnesses = tuple(witnesses)
        self._lock = threading.Lock()
        self._queue_cond = threading.Condition()
        self._queue: list[_Request] = []
        self._leading = False
        self._conn: sqlite3.Connection | None = None
        self._origin = ""
        self._key_hash = b""
        self._writer_id = uuid.uuid4().hex
        self._writer_lock: int | None = None
        self._last_checkpoint_at = time.monotonic()
        self._ticker_stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._commits = 0
        self._sync: Sync = sync
        self._synchronous = "FULL"
        self._unsynced = False
        self._busy_zero = False
        # The tree as this store last wrote it: the head it ends at, its frontier
        # (trusted only while the file's head is still that one), and the inclusion
        # proofs of the newest records it wrote, for their receipts.
        self._tip: tuple[int, str] | None = None
        self._frontier: tuple[bytes, ...] = ()
        self._proofs: dict[int, tuple[str, bytes, tuple[bytes, ...]]] = {}

    @property
    def path(self) -> Path:
        return self._path

    @property
    def key_id(self) -> KeyId:
        return self._signer.key_id

    @property
    def origin(self) -> str:
        """The log's name in its checkpoints (``callward.audit/<first key id>``)."""
        return self._origin

    @property
    def commits(self) -> int:
        """
        How many append transactions (each one fsync) this store committed; with many
        concurrent appends it is smaller than the number of records.
        """
        return self._commits

    @property
    def unsynced(self) -> bool:
        """
        Whether committed records wait for an fsync (``sync="authorized"`` defers it for
        ``DEFERRED_SYNC_KINDS``); ``flush`` ends that, so does any fsynced commit.
        """
        return self._unsynced

    @property
    def writer_id(self) -> str:
        """This store's id in the pending-calls table, unique per ``open``."""
        return self._writer_id

    def open(self) -> None:
        """
        Open the file (WAL, ``synchronous=FULL``), creating the tables on first use.

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
                    origin = _prepare(conn, self._path, self._busy_timeout_seconds, self._signer)
                    self._writer_lock = _hold_writer_lock(self._path, self._writer_id)
                except BaseException:
                    conn.close()
                    raise
            self._origin = origin
            self._key_hash = note_key_hash(origin, _public_key_of(self._signer))
            self._conn = conn
            self._synchronous = "FULL"
            self._unsynced = False
            self._busy_zero = False
            self._tip = None
            self._proofs = {}
            self._last_checkpoint_at = time.monotonic()
        if self._checkpoint_seconds > 0 or self._sync == "authorized":
            self._ticker_stop.clear()
            self._ticker = threading.Thread(
                target=self._tick, name="callward-audit-checkpoints", daemon=True
            )
            self._ticker.start()
        log.info("audit_store_opened", path=str(self._path), key_id=self._signer.key_id)

    def close(self) -> None:
        """
        Write a final checkpoint if records followed the last one, then close the file.
        Appends after this raise ``AuditUnavailable``.
        """
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            self._ticker_stop.set()
            ticker.join()
        if self._conn is not None:
            try:
                self.checkpoint(only_if_grown=True)
            except AuditUnavailable:
                log.warning("audit_final_checkpoint_failed", path=str(self._path))
            self.flush()
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
            if self._writer_lock is not None:
                _release_writer_lock(self._path, self._writer_id, self._writer_lock)
                self._writer_lock = None

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
        Sign ``body`` as the next record and commit it before returning (fsynced
        before returning unless ``sync`` defers it for this kind; see the module).

        Raises:
            ValueError: ``kind`` is not a dotted lower-case name like ``call.completed``.
            AuditUnavailable: The record is not committed; the caller must not proceed.
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
        request = self._request(kind, body, now)
        record = self._commit(request)
        if record is None:  # pragma: no cover - only conditional appends skip
            raise AuditUnavailable(f"audit append on {self._path} was skipped")
        return record

    def _request(
        self,
        kind: str,
        body: Mapping[str, JSONValue],
        now: datetime,
        *,
        only_if_pending: bool = False,
        rotate_to: Signer | None = None,
    ) -> _Request:
        if not is_record_kind(kind):
            raise ValueError("a record kind is dotted lower-case, like call.completed")
        ts = format_ts(now)
        with _store_errors("append", self._path, kind=kind):
            body_json = canonical_body(body)
        request = _Request(
            kind=kind, body_json=body_json, ts=ts, only_if_pending=only_if_pending,
            rotate_to=rotate_to,
        )
        if kind == "call.authorized":
            call = body.get("call")
            call_id = call.get("id") if isinstance(call, Mapping) else None
            request.authorizes = call_id if isinstance(call_id, str) else ""
        elif kind in ("call.completed", CALL_INTERRUPTED):
            seq = body.get("authorized_seq")
            if isinstance(seq, int) and not isinstance(seq, bool):
                request.completes = seq
        return request

    def _commit(self, request: _Request) -> AuditRecord | None:
        """Queue ``request``; lead a transaction for the queue or wait for the leader's."""
        with self._queue_cond:
            self._queue.append(request)
            while not request.done:
                if not self._leading:
                    self._leading = True
                    batch, self._queue = self._queue, []
                    break
                self._queue_cond.wait()
            else:
                return request.result()
        checkpoint = None
        try:
            checkpoint = self._write(batch)
        finally:
            with self._queue_cond:
                for item in batch:
                    item.done = True
                self._leading = False
                self._queue_cond.notify_all()
        if checkpoint is not None:
            self.flush()  # a witness never holds a checkpoint of records not on disk
            publish_to_all(self._witnesses, self._origin, checkpoint.note)
        return request.result()

    def _write(self, batch: list[_Request]) -> Checkpoint | None:
        """Write ``batch`` in one transaction (one fsync); set each request's outcome."""
        written: list[tuple[_Request, AuditRecord]] = []
        checkpoint = None
        signer_before, key_hash_before = self._signer, self._key_hash
        proofs: list[tuple[int, str, bytes, tuple[bytes, ...]]] = []
        full = self._sync == "every" or any(r.kind not in DEFERRED_SYNC_KINDS for r in batch)
        try:
            with self._lock:
                conn = self._require_open(appending=True)
                with _store_errors("append", self._path, kind=batch[0].kind):
                    self._set_synchronous(conn, full=full)
                    with _transaction(conn, self._busy_timeout_seconds, polling=True):
                        current_key, last_checkpoint, seq, prev, head_ts = conn.execute(
                            _STATE
                        ).fetchone()
                        self._check_key(current_key)
                        if seq is None:
                            seq, prev = 0, GENESIS_PREV
                        tip = (int(seq), str(prev))
                        frontier = self._frontier if tip == self._tip else frontier_at(conn, tip[0])
                        seq, prev = tip
                        for request in batch:
                            one = self._write_one(
                                conn, request, seq, Sha256Hex(prev), head_ts, frontier=frontier
                            )
                            if one is not None:
                                record, leaf, path, frontier = one
                                written.append((request, record))
                                proofs.append((record.seq, record.record_hash, leaf, path))
                                seq, prev, head_ts = record.seq, record.record_hash, record.ts
                        checkpoint = self._checkpoint_if_due(
                            conn, seq, int(last_checkpoint), frontier
                        )
                self._tip, self._frontier = (seq, prev), frontier
                self._remember_proofs(proofs)
                self._unsynced = not full  # a fsynced commit covers every one before it
        except BaseException as exc:  # noqa: BLE001 - each request of the batch re-raises it
            # A rotation whose record rolled back never happened.
            self._signer, self._key_hash = signer_before, key_hash_before
            self._tip = None
            for request in batch:
                if request.error is None:
                    request.error = exc
            return None
        for request, record in written:
            request.record = record
        self._commits += 1
        return checkpoint

    def _set_synchronous(self, conn: sqlite3.Connection, *, full: bool) -> None:
        """``PRAGMA synchronous``: FULL fsyncs the WAL at commit, NORMAL leaves it to later."""
        wanted = "FULL" if full else "NORMAL"
        if self._synchronous != wanted:
            conn.execute(f"PRAGMA synchronous={wanted}")
            self._synchronous = wanted

    def _remember_proofs(self, proofs: list[tuple[int, str, bytes, tuple[bytes, ...]]]) -> None:
        for seq, record_hash, leaf, path in proofs:
            self._proofs[seq] = (record_hash, leaf, path)
        while len(self._proofs) > _PROOF_CACHE:
            del self._proofs[next(iter(self._proofs))]

    def _write_one(
        self,
        conn: sqlite3.Connection,
        request: _Request,
        seq: int,
        prev: Sha256Hex,
        head_ts: object,
        *,
        frontier: tuple[bytes, ...],
    ) -> tuple[AuditRecord, bytes, tuple[bytes, ...], tuple[bytes, ...]] | None:
        """
        Write one record after ``seq``; return it, its leaf hash, its inclusion path in
        the tree of ``seq + 1`` records, and the tree's new frontier.
        """
        if request.only_if_pending and request.completes is not None:
            still = conn.execute(
                "SELECT 1 FROM pending_calls WHERE authorized_seq = ?", (request.completes,)
            ).fetchone()
            if still is None:
                return None
        ts = request.ts
        if head_ts is not None and ts < str(head_ts):
            _log_held_ts(ts, str(head_ts))
            ts = str(head_ts)
        try:
            record = seal(
                seq=seq + 1,
                ts=ts,
                kind=request.kind,
                prev=prev,
                body_json=request.body_json,
                signer=self._signer,
            )
        except ValueError as exc:
            # This record alone is malformed (too large): it fails, the batch goes on.
            request.error = AuditUnavailable(f"audit append on {self._path} failed ({exc})")
            return None
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
        new_frontier, rows = extend_frontier(frontier, seq, record.record_bytes)
        put_nodes(conn, rows)
        if request.authorizes is not None:
            conn.execute(
                "INSERT INTO pending_calls (authorized_seq, call_id, writer) VALUES (?, ?, ?)",
                (record.seq, request.authorizes, self._writer_id),
            )
        elif request.completes is not None:
            conn.execute(
                "DELETE FROM pending_calls WHERE authorized_seq = ?", (request.completes,)
            )
        if request.rotate_to is not None:
            set_meta(conn, "current_key_id", request.rotate_to.key_id)
            self._signer = request.rotate_to
            self._key_hash = note_key_hash(self._origin, _public_key_of(request.rotate_to))
        return record, rows[0][2], frontier[::-1], new_frontier

    def _check_current_key(self, conn: sqlite3.Connection) -> None:
        self._check_key(get_meta(conn, "current_key_id"))

    def _check_key(self, current: object) -> None:
        if current is not None and current != self._signer.key_id:
            raise AuditUnavailable(
                f"the audit log {self._path} is now signed by key {current}, not by this "
                f"store's key {self._signer.key_id} (the key was rotated)",
                remediation="restart this gateway so it loads the current audit key",
            )

    def _checkpoint_if_due(
        self, conn: sqlite3.Connection, size: int, last: int, frontier: tuple[bytes, ...]
    ) -> Checkpoint | None:
        grown = size - last
        if grown <= 0:
            return None
        elapsed = time.monotonic() - self._last_checkpoint_at
        if grown < self._checkpoint_every and not (
            self._checkpoint_seconds > 0 and elapsed >= self._checkpoint_seconds
        ):
            return None
        return self._write_checkpoint(conn, size, _frontier_root(frontier))

    def _write_checkpoint(self, conn: sqlite3.Connection, size: int, root: bytes) -> Checkpoint:
        checkpoint = sign_checkpoint(
            self._origin, size, root, signer=self._signer, key_hash=self._key_hash
        )
        conn.execute(
            "INSERT INTO checkpoints (size, ts, note) VALUES (?, ?, ?)",
            (size, format_ts(self._clock()), checkpoint.note),
        )
        self._last_checkpoint_at = time.monotonic()
        log.info("audit_checkpoint_written", size=size)
        return checkpoint

    def checkpoint(self, *, only_if_grown: bool = False) -> Checkpoint | None:
        """
        Sign and store a checkpoint of the whole log now, and offer it to the witnesses.

        Args:
            only_if_grown: Write nothing (return None) if the latest checkpoint
                already covers every record.

        Returns:
            The checkpoint written, or the latest one when nothing grew (None if the
            log is empty or ``only_if_grown`` found nothing new).

        Raises:
            AuditUnavailable: The checkpoint could not be written.
        """
        with self._lock:
            conn = self._require_open()
            with _store_errors("checkpoint", self._path):
                self._set_synchronous(conn, full=True)
            with (
                _store_errors("checkpoint", self._path),
                _transaction(conn, self._busy_timeout_seconds),
            ):
                self._check_current_key(conn)
                head = conn.execute(_HEAD).fetchone()
                size = 0 if head is None else int(head[0])
                row = conn.execute(
                    "SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1"
                ).fetchone()
                if size == 0 or (row is not None and int(row[0]) >= size):
                    if only_if_grown or row is None:
                        return None
                    return Checkpoint(self._origin, int(row[0]), root_at(conn, int(row[0])),
                                      str(row[1]))
                checkpoint = self._write_checkpoint(conn, size, root_at(conn, size))
            self._unsynced = False  # the fsync of this commit covers every commit before it
        publish_to_all(self._witnesses, self._origin, checkpoint.note)
        return checkpoint

    def _tick(self) -> None:
        """Write a checkpoint every ``checkpoint_seconds``; flush deferred commits meanwhile."""
        every = self._checkpoint_seconds
        interval = _FLUSH_SECONDS if every == 0 else min(every, _FLUSH_SECONDS)
        next_checkpoint = time.monotonic() + every
        while not self._ticker_stop.wait(interval):
            if every > 0 and time.monotonic() >= next_checkpoint:
                next_checkpoint = time.monotonic() + every
                try:
                    self.checkpoint(only_if_grown=True)
                except AuditUnavailable:
                    log.warning("audit_timed_checkpoint_failed", path=str(self._path))
            self.flush()

    def flush(self) -> None:
        """
        Make every committed record durable now (fsync the WAL), if any is not yet.

        Under ``sync="authorized"`` this runs at most ``_FLUSH_SECONDS`` after a
        deferred commit; callers may run it sooner. Failures are logged, not raised:
        the records stay committed and the next fsynced transaction covers them.
        """
        if not self._unsynced or self._conn is None:
            return
        self._unsynced = False  # set again by any commit after this point
        wal = self._path.with_name(self._path.name + "-wal")
        try:
            fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)  # covers every commit already in the file
            finally:
                os.close(fd)
        except OSError as exc:
            self._unsynced = True
            log.warning("audit_flush_failed", path=str(self._path), error=type(exc).__name__)

    def receipt_for(self, record: AuditRecord) -> Receipt:
        """
        The receipt of ``record`` with its inclusion proof under a checkpoint of the
        tree at its own seq, signed now. ``callward.core.ReceiptIssuer``.

        For one of the newest records this store wrote, the proof is the one it kept
        when it appended the record (the tree's frontier then, computed from the
        record bytes); any other is read from the stored tree and checked against
        the stored root before it is returned, so a damaged tree table fails here
        rather than in a reviewer's hands.

        Raises:
            AuditUnavailable: The tree cannot be read or disagrees with the record.
        """
        size = record.seq
        leaf = leaf_hash(record.record_bytes)
        if self._conn is None:
            self._require_open()  # raises
        cached = self._proofs.get(size)
        stored_root = None
        if cached is not None and cached[0] == record.record_hash and cached[1] == leaf:
            path = cached[2]
        else:
            with self._lock:
                conn = self._require_open()
                with _store_errors("receipt", self._path):
                    path = inclusion_path(conn, record.seq, size)
                    stored_root = root_at(conn, size)
        try:
            root = root_from_inclusion_proof(record.seq - 1, size, leaf, path)
        except VerificationFailed as exc:
            raise AuditUnavailable(f"the Merkle tree in {self._path} is damaged") from exc
        if stored_root is not None and root != stored_root:
            raise AuditUnavailable(
                f"the Merkle tree in {self._path} does not hold record {record.seq}"
            )
        checkpoint = sign_checkpoint(
            self._origin, size, root, signer=self._signer, key_hash=self._key_hash
        )
        return Receipt(
            seq=record.seq,
            record_hash=record.record_hash,
            key_id=record.key_id,
            proof=ReceiptProof(
                leaf_hash=Sha256Hex(leaf.hex()),
                tree_size=size,
                inclusion_proof=tuple(Sha256Hex(node.hex()) for node in path),
                checkpoint=checkpoint.note,
            ),
        )

    def rotate_key(self, new_signer: Signer) -> AuditRecord:
        """
        Hand the log to ``new_signer``: a ``key.rotated`` record signed by the current
        key names the new key, and every later record and checkpoint is signed by it.

        Other stores still holding the old key refuse to append from then on.

        Raises:
            AuditUnavailable: The rotation record is not durable; the old key stays.
        """
        raw = _public_key_of(new_signer).public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        body: dict[str, JSONValue] = {
            "previous_key_id": self._signer.key_id,
            "new_key_id": new_signer.key_id,
            "new_public_key": base64.b64encode(raw).decode(),
        }
        request = self._request(KEY_ROTATED, body, self._clock(), rotate_to=new_signer)
        record = self._commit(request)
        if record is None:  # pragma: no cover - a rotation is never conditional
            raise AuditUnavailable("the key rotation was not written")
        log.info("audit_key_rotated", previous=body["previous_key_id"], new=new_signer.key_id)
        return record

    def rotated_to(self, key_id: str) -> bool:
        """
        Whether the log was already handed to ``key_id`` by a ``key.rotated`` record.

        Raises:
            AuditUnavailable: The file cannot be read.
        """
        with self._lock:
            conn = self._require_open()
            with _store_errors("read", self._path):
                return get_meta(conn, "current_key_id") == key_id

    def recover_interrupted(self) -> list[AuditRecord]:
        """
        Close out calls that were authorized by a gateway that is gone: each gets a
        ``call.interrupted`` record naming its ``call.authorized`` seq.

        A writer is gone when its lock file is free (its process ended, crashed or
        was killed); calls of writers still running are left alone. Safe to run from
        several processes at once: each call is closed out exactly once.

        Raises:
            AuditUnavailable: The records could not be written.
        """
        with self._lock:
            conn = self._require_open()
            with _store_errors("read", self._path):
                rows = conn.execute(
                    "SELECT authorized_seq, call_id, writer FROM pending_calls"
                    " WHERE writer != ? ORDER BY authorized_seq",
                    (self._writer_id,),
                ).fetchall()
        gone: dict[str, bool] = {}
        written = []
        for authorized_seq, call_id, writer in rows:
            if writer not in gone:
                gone[writer] = not _writer_alive(self._path, str(writer))
            if not gone[writer]:
                continue
            body: dict[str, JSONValue] = {
                "call_id": str(call_id),
                "authorized_seq": int(authorized_seq),
                "outcome": "interrupted",
                "message": "the gateway stopped before the call completed; its result, "
                "if any, never reached the model",
            }
            request = self._request(CALL_INTERRUPTED, body, self._clock(), only_if_pending=True)
            record = self._commit(request)
            if record is not None:
                written.append(record)
        for writer, is_gone in gone.items():
            if is_gone:
                _writer_lock_path(self._path, writer).unlink(missing_ok=True)
        _remove_dead_writer_files(self._path, keep=self._writer_id)
        if written:
            log.warning("audit_calls_interrupted", count=len(written))
        return written

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

    def _require_open(self, *, appending: bool = False) -> sqlite3.Connection:
        """
        The open connection, its busy timeout set for what comes (call under ``_lock``):
        0 for appends, which poll for the write lock themselves (``_begin_immediate``),
        ``busy_timeout_seconds`` for everything else. Set only when it changes, so
        appends one after another run no PRAGMA.
        """
        conn = self._conn
        if conn is None:
            raise AuditUnavailable(
                f"the audit store {self._path} is not open",
                remediation="open the store (SQLiteAuditStore.open or `with`) before use",
            )
        if appending != self._busy_zero:
            wait_ms = 0 if appending else round(self._busy_timeout_seconds * 1000)
            with _store_errors("open", self._path):
                conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
            self._busy_zero = appending
        return conn


def _frontier_root(frontier: tuple[bytes, ...]) -> bytes:
    """The root of the tree whose (non-empty) frontier is given, largest subtree first."""
    root = frontier[-1]
    for h in reversed(frontier[:-1]):
        root = node_hash(h, root)
    return root


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


def _prepare(conn: sqlite3.Connection, path: Path, wait_seconds: float, signer: Signer) -> str:
    """
    Set WAL and full sync, and create, upgrade or recognise the tables, in one
    transaction. Returns the log's origin.
    """
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


def _public_key_of(signer: Signer) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(signer.public_key_pem())
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigurationError("the audit signer's public key is not Ed25519")
    return key


def _writer_lock_path(db: Path, writer_id: str) -> Path:
    return db.with_name(db.name + ".writers") / writer_id


def _hold_writer_lock(db: Path, writer_id: str) -> int:
    """
    Create and lock this store's writer file; the lock lives as long as the process
    holds it open, so a crashed or killed writer frees it and can be recognised.
    """
    directory = db.with_name(db.name + ".writers")
    directory.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(
        _writer_lock_path(db, writer_id),
        os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
        0o600,
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release_writer_lock(db: Path, writer_id: str, fd: int) -> None:
    _writer_lock_path(db, writer_id).unlink(missing_ok=True)
    os.close(fd)


def _remove_dead_writer_files(db: Path, *, keep: str) -> None:
    """Remove the lock files of writers that are gone and left no call open."""
    directory = db.with_name(db.name + ".writers")
    try:
        names = [entry.name for entry in directory.iterdir()]
    except OSError:
        return
    for name in names:
        if name != keep and not _writer_alive(db, name):
            _writer_lock_path(db, name).unlink(missing_ok=True)


def _writer_alive(db: Path, writer_id: str) -> bool:
    """Whether the writer ``writer_id`` still holds its lock (its process still runs)."""
    try:
        fd = os.open(_writer_lock_path(db, writer_id), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: never close out a call that may still be running
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


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
def _transaction(
    conn: sqlite3.Connection, wait_seconds: float, *, polling: bool = False
) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; on any exception, roll back and re-raise."""
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
def _store_errors(operation: str, path: Path, *, kind: str = "") -> Iterator[None]:
    """The one place SQLite, OS, signer and encoding failures become ``AuditUnavailable``."""
    try:
        yield
    except (sqlite3.Error, OSError, ValueError, MissingNode) as exc:
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
