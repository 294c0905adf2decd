"""
The audit log in one SQLite file: signed, hash-chained, committed before ``append`` returns.

This is the writer. What the file holds and how a reader opens it is
``_sqlite_format``; preparing the file, transactions and error mapping are
``_sqlite_connection``; the queue of appends is ``_group_commit``; telling live
writers from gone ones is ``_writer_lock``; the Merkle tree's tables are ``_tree``.

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
  as ``AuditUnavailable`` (through ``_sqlite_connection.store_errors``); no
  ``sqlite3`` type escapes the store.
- Timestamps never go backwards along the chain: a clock that steps back is held at
  the head's ts (and logged), so a verifier never sees a false alarm.
- Group commit (``_group_commit``): appends from many threads that arrive while one
  transaction is being written queue up, and the next transaction writes them all
  with one fsync; no append returns before the transaction holding its record has
  committed.
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
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal, Self

import structlog
from cryptography.hazmat.primitives import serialization

from callward.audit._chain import (
    GENESIS_PREV,
    canonical_body,
    format_ts,
    held_at_head,
    is_record_kind,
    seal,
)
from callward.audit._checkpoint import Checkpoint, note_key_hash, sign_checkpoint
from callward.audit._group_commit import AppendRequest, GroupCommit
from callward.audit._merkle import frontier_root, leaf_hash, root_from_inclusion_proof
from callward.audit._pending_calls import (
    call_links,
    interrupted_body,
    is_pending,
    pending_of_others,
    update_pending,
)
from callward.audit._sqlite_connection import prepare, store_errors, transaction
from callward.audit._sqlite_format import (
    CALL_INTERRUPTED,
    INSERT_RECORD,
    KEY_ROTATED,
    SELECT_RECORDS,
    row_to_record,
)
from callward.audit._tree import (
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
from callward.audit._writer_lock import (
    hold_writer_lock,
    release_writer_lock,
    remove_dead_writer_files,
    writer_alive,
    writer_lock_path,
)
from callward.audit.signer import Signer, public_key_of
from callward.core._canonical import JSONValue, Sha256Hex
from callward.core.errors import AuditUnavailable, VerificationFailed
from callward.core.types import AuditRecord, KeyId, Receipt, ReceiptProof

log = structlog.get_logger()

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


def _utc_now() -> datetime:
    return datetime.now(UTC)


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
        self._group = GroupCommit(self._write)
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
            with store_errors("open", self._path):
                conn = sqlite3.connect(
                    self._path,
                    timeout=self._busy_timeout_seconds,
                    isolation_level=None,
                    check_same_thread=False,
                )
                try:
                    origin = prepare(conn, self._path, self._busy_timeout_seconds, self._signer)
                    self._writer_lock = hold_writer_lock(self._path, self._writer_id)
                except BaseException:
                    conn.close()
                    raise
            self._origin = origin
            self._key_hash = note_key_hash(origin, public_key_of(self._signer))
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
                release_writer_lock(self._path, self._writer_id, self._writer_lock)
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
    ) -> AppendRequest:
        if not is_record_kind(kind):
            raise ValueError("a record kind is dotted lower-case, like call.completed")
        ts = format_ts(now)
        with store_errors("append", self._path, kind=kind):
            body_json = canonical_body(body)
        authorizes, completes = call_links(kind, body)
        return AppendRequest(
            kind=kind, body_json=body_json, ts=ts, authorizes=authorizes, completes=completes,
            only_if_pending=only_if_pending, rotate_to=rotate_to,
        )

    def _commit(self, request: AppendRequest) -> AuditRecord | None:
        """Queue ``request`` for the next transaction; its record once that committed."""
        checkpoint = self._group.submit(request)
        if checkpoint is not None:
            self.flush()  # a witness never holds a checkpoint of records not on disk
            publish_to_all(self._witnesses, self._origin, checkpoint.note)
        return request.result()

    def _write(self, batch: list[AppendRequest]) -> Checkpoint | None:
        """Write ``batch`` in one transaction (one fsync); set each request's outcome."""
        written: list[tuple[AppendRequest, AuditRecord]] = []
        checkpoint = None
        signer_before, key_hash_before = self._signer, self._key_hash
        proofs: list[tuple[int, str, bytes, tuple[bytes, ...]]] = []
        full = self._sync == "every" or any(r.kind not in DEFERRED_SYNC_KINDS for r in batch)
        try:
            with self._lock:
                conn = self._require_open(appending=True)
                with store_errors("append", self._path, kind=batch[0].kind):
                    self._set_synchronous(conn, full=full)
                    with transaction(conn, self._busy_timeout_seconds, polling=True):
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
        request: AppendRequest,
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
        if (
            request.only_if_pending
            and request.completes is not None
            and not is_pending(conn, request.completes)
        ):
            return None
        ts = held_at_head(request.ts, None if head_ts is None else str(head_ts))
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
            INSERT_RECORD,
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
        update_pending(
            conn,
            record.seq,
            authorizes=request.authorizes,
            completes=request.completes,
            writer_id=self._writer_id,
        )
        if request.rotate_to is not None:
            set_meta(conn, "current_key_id", request.rotate_to.key_id)
            self._signer = request.rotate_to
            self._key_hash = note_key_hash(self._origin, public_key_of(request.rotate_to))
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
        return self._write_checkpoint(conn, size, frontier_root(frontier))

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
            with store_errors("checkpoint", self._path):
                self._set_synchronous(conn, full=True)
            with (
                store_errors("checkpoint", self._path),
                transaction(conn, self._busy_timeout_seconds),
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
                with store_errors("receipt", self._path):
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
        raw = public_key_of(new_signer).public_bytes(
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
            with store_errors("read", self._path):
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
            with store_errors("read", self._path):
                rows = pending_of_others(conn, self._writer_id)
        gone: dict[str, bool] = {}
        written = []
        for authorized_seq, call_id, writer in rows:
            if writer not in gone:
                gone[writer] = not writer_alive(self._path, writer)
            if not gone[writer]:
                continue
            body = interrupted_body(call_id, authorized_seq)
            request = self._request(CALL_INTERRUPTED, body, self._clock(), only_if_pending=True)
            record = self._commit(request)
            if record is not None:
                written.append(record)
        for writer, is_gone in gone.items():
            if is_gone:
                writer_lock_path(self._path, writer).unlink(missing_ok=True)
        remove_dead_writer_files(self._path, keep=self._writer_id)
        if written:
            log.warning("audit_calls_interrupted", count=len(written))
        return written

    def last(self) -> AuditRecord | None:
        """
        The newest record in the file (from any process), or None if it is empty.

        Raises:
            AuditUnavailable: The file cannot be read.
        """
        records = self._fetch(f"{SELECT_RECORDS} ORDER BY seq DESC LIMIT 1", ())
        return records[0] if records else None

    def get(self, seq: int) -> AuditRecord | None:
        """
        The record at ``seq``, or None if there is none.

        Raises:
            AuditUnavailable: The file cannot be read.
        """
        records = self._fetch(f"{SELECT_RECORDS} WHERE seq = ?", (seq,))
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
            page = self._fetch(
                f"{SELECT_RECORDS} WHERE seq > ? ORDER BY seq LIMIT {_PAGE_ROWS}", (after,)
            )
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
            with store_errors("read", self._path):
                (count,) = conn.execute("SELECT count(*) FROM records").fetchone()
        return int(count)

    def _fetch(self, sql: str, params: tuple[int, ...]) -> list[AuditRecord]:
        with self._lock:
            conn = self._require_open()
            with store_errors("read", self._path):
                # A row that is not a record (the file was edited) fails as a read.
                return [row_to_record(row) for row in conn.execute(sql, params)]

    def _require_open(self, *, appending: bool = False) -> sqlite3.Connection:
        """
        The open connection, its busy timeout set for what comes (call under ``_lock``):
        0 for appends, which poll for the write lock themselves
        (``transaction(..., polling=True)``), ``busy_timeout_seconds`` for everything
        else. Set only when it changes, so appends one after another run no PRAGMA.
        """
        conn = self._conn
        if conn is None:
            raise AuditUnavailable(
                f"the audit store {self._path} is not open",
                remediation="open the store (SQLiteAuditStore.open or `with`) before use",
            )
        if appending != self._busy_zero:
            wait_ms = 0 if appending else round(self._busy_timeout_seconds * 1000)
            with store_errors("open", self._path):
                conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
            self._busy_zero = appending
        return conn


if TYPE_CHECKING:
    from callward.core.protocols import AuditLog

    def _is_an_audit_log(store: SQLiteAuditStore) -> AuditLog:
        """mypy proves the store satisfies the protocol the gateway is handed."""
        return store


__all__ = ["DEFERRED_SYNC_KINDS", "SQLiteAuditStore"]
