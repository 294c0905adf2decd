"""
Verify an audit log offline, with nothing but the database file and the public key.

Invariants:

- The database is opened read-only; verifying never changes the file.
- Rows are streamed in seq order, one at a time: memory does not grow with the log
  (with worker processes, a fixed number of batches is in flight).
- Every record is checked in full (hash, signature, seq, prev, ts, and every column
  against the signed bytes) and the first failure raises ``VerificationFailed`` with
  that record's seq and which check failed. There is no boolean result to ignore.
- What this cannot see: records removed from the *end* of the log. A reviewer who
  needs that compares ``VerifiedLog.records`` and ``head_hash`` with a receipt or a
  checkpoint taken earlier.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, NoReturn, Protocol

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from callward.audit._chain import (
    GENESIS_PREV,
    check_contents,
    check_position,
    signature_problem,
)
from callward.audit._sqlite import (
    UnreadableDatabase,
    connect_read_only,
    error_name,
    row_to_record,
)
from callward.audit.signer import key_id_of, load_public_key
from callward.core._canonical import Sha256Hex
from callward.core.errors import VerificationFailed
from callward.core.types import AuditRecord, KeyId

log = structlog.get_logger()

_SELECT_ALL: Final = (
    "SELECT seq, ts, kind, prev, key_id, body, record, hash, signature FROM records ORDER BY seq"
)
#: Logs at least this long are verified with worker processes when ``workers="auto"``.
PARALLEL_MIN_RECORDS: Final = 50_000
_MAX_WORKERS: Final = 8
_BATCH_RECORDS: Final = 1024


@dataclass(frozen=True, slots=True)
class VerifiedLog:
    """
    What a successful ``verify`` proved: these many records, chained to this head.

    Attributes:
        records: How many records verified (seqs 1..records).
        head_hash: The last record's hash (``"0" * 64`` for an empty log); compare it
            with a receipt to detect a truncated log.
        first_ts: The first record's ts, or None for an empty log.
        last_ts: The last record's ts, or None for an empty log.
        key_id: The id of the public key every record verified under.
    """

    records: int
    head_hash: Sha256Hex
    first_ts: str | None
    last_ts: str | None
    key_id: KeyId


def verify(
    db_path: Path, public_key: Ed25519PublicKey | Path, *, workers: int | Literal["auto"] = 1
) -> VerifiedLog:
    """
    Check every record of the audit database at ``db_path``.

    Args:
        db_path: A callward ``audit.db``; opened read-only.
        public_key: The Ed25519 public key, or the path of its PEM file.
        workers: 1 checks everything in this process. More starts that many worker
            processes that check signatures (the slowest check) while this one checks
            the chain; ``"auto"`` starts one per CPU for logs of at least
            ``PARALLEL_MIN_RECORDS`` records. Workers are spawned, so a script that
            asks for them must call ``verify`` under ``if __name__ == "__main__":``.
            The outcome, including which failure is reported, never depends on it.

    Returns:
        What was verified.

    Raises:
        VerificationFailed: At the first record that fails, with its ``seq`` and a
            message naming the check; with ``seq=None`` when the file is missing,
            unreadable, or not a callward audit database.
        ConfigurationError: ``public_key`` is a path to a file that is not an
            Ed25519 public key.
    """
    if workers != "auto" and workers < 1:
        raise ValueError('workers is "auto" or at least 1')
    key = load_public_key(public_key) if isinstance(public_key, Path) else public_key
    key_id = key_id_of(key)
    try:
        conn = connect_read_only(Path(db_path))
    except UnreadableDatabase as exc:
        raise VerificationFailed(str(exc), seq=None) from exc
    try:
        processes = _worker_count(conn) if workers == "auto" else workers
        if processes == 1:
            verified = _verify_rows(conn, key_id, _InlineSignatures(key, key_id))
        else:
            verified = _verify_pooled(conn, key, key_id, processes)
    finally:
        conn.close()
    log.info(
        "audit_log_verified", path=str(db_path), records=verified.records, key_id=key_id
    )
    return verified


def _worker_count(conn: sqlite3.Connection) -> int:
    try:
        (last_seq,) = conn.execute("SELECT max(seq) FROM records").fetchone()
    except sqlite3.Error:
        return 1  # the row loop reports the failure at its seq
    if not isinstance(last_seq, int) or last_seq < PARALLEL_MIN_RECORDS:
        return 1
    return min(len(os.sched_getaffinity(0)), _MAX_WORKERS)


def _verify_pooled(
    conn: sqlite3.Connection, key: Ed25519PublicKey, key_id: KeyId, processes: int
) -> VerifiedLog:
    raw_key = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        with ProcessPoolExecutor(
            max_workers=processes, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            return _verify_rows(conn, key_id, _PooledSignatures(pool, raw_key, processes))
    except (BrokenProcessPool, OSError) as exc:
        # Worker processes cannot run here; the answer must not depend on them.
        log.warning("audit_verify_workers_failed", error=type(exc).__name__)
        return _verify_rows(conn, key_id, _InlineSignatures(key, key_id))


def _verify_rows(
    conn: sqlite3.Connection, key_id: KeyId, signatures: _Signatures
) -> VerifiedLog:
    count = 0
    prev = GENESIS_PREV
    first_ts: str | None = None
    last_ts: str | None = None
    try:
        for row in conn.execute(_SELECT_ALL):
            try:
                record = row_to_record(row)
            except ValueError as exc:
                seq = row[0] if isinstance(row[0], int) else None
                signatures.raise_first(
                    VerificationFailed(f"record {seq}: {exc}", seq=seq), including_seq=False
                )
            # check_record's order: position, signature, contents.
            try:
                check_position(record, expected_seq=count + 1)
            except VerificationFailed as failure:
                signatures.raise_first(failure, including_seq=False)
            signatures.check(record)
            try:
                check_contents(record, key_id=key_id, prev=prev, not_before=last_ts)
            except VerificationFailed as failure:
                signatures.raise_first(failure, including_seq=True)
            count = record.seq
            prev = record.record_hash
            last_ts = record.ts
            if first_ts is None:
                first_ts = record.ts
    except sqlite3.Error as exc:
        signatures.raise_first(
            VerificationFailed(
                f"the database could not be read after record {count} ({error_name(exc)})",
                seq=count + 1,
            ),
            including_seq=False,
        )
    signatures.finish()
    return VerifiedLog(
        records=count, head_hash=prev, first_ts=first_ts, last_ts=last_ts, key_id=key_id
    )


class _Signatures(Protocol):
    """Checks signatures in seq order, here or elsewhere, and reports the first failure."""

    def check(self, record: AuditRecord) -> None:
        """Check (or queue) this record's signature; may raise an earlier record's failure."""
        ...

    def raise_first(self, failure: VerificationFailed, *, including_seq: bool) -> NoReturn:
        """
        Raise the first failure: a signature failure before ``failure.seq`` (or at it, if
        ``including_seq``, since contents are checked after the signature), else ``failure``.
        """
        ...

    def finish(self) -> None:
        """Raise the first signature failure still outstanding, if any."""
        ...


class _InlineSignatures:
    def __init__(self, key: Ed25519PublicKey, key_id: KeyId) -> None:
        self._key = key
        self._key_id = key_id

    def check(self, record: AuditRecord) -> None:
        problem = signature_problem(
            record.seq,
            record.record_bytes,
            record.signature,
            record.key_id,
            public_key=self._key,
            key_id=self._key_id,
        )
        if problem is not None:
            raise VerificationFailed(problem, seq=record.seq)

    def raise_first(self, failure: VerificationFailed, *, including_seq: bool) -> NoReturn:
        raise failure

    def finish(self) -> None:
        return


_Item = tuple[int, bytes, bytes, str]


class _PooledSignatures:
    """Batches of signatures checked by worker processes, with a bounded queue."""

    def __init__(self, pool: ProcessPoolExecutor, raw_key: bytes, processes: int) -> None:
        self._pool = pool
        self._raw_key = raw_key
        self._max_pending = 2 * processes
        self._batch: list[_Item] = []
        self._pending: deque[Future[tuple[int, str] | None]] = deque()

    def check(self, record: AuditRecord) -> None:
        item = (record.seq, record.record_bytes, record.signature, record.key_id)
        self._batch.append(item)
        if len(self._batch) >= _BATCH_RECORDS:
            self._flush()
        # Bounded memory: wait for the oldest batch once enough are queued.
        while len(self._pending) > self._max_pending:
            self._collect_oldest()

    def raise_first(self, failure: VerificationFailed, *, including_seq: bool) -> NoReturn:
        self._flush()
        while self._pending:
            problem = self._pending.popleft().result()
            if problem is None or failure.seq is None:
                continue
            seq, message = problem
            if seq < failure.seq or (including_seq and seq == failure.seq):
                raise VerificationFailed(message, seq=seq) from None
        raise failure

    def finish(self) -> None:
        self._flush()
        while self._pending:
            self._collect_oldest()

    def _flush(self) -> None:
        if self._batch:
            self._pending.append(self._pool.submit(_check_batch, self._raw_key, self._batch))
            self._batch = []

    def _collect_oldest(self) -> None:
        problem = self._pending.popleft().result()
        if problem is not None:
            seq, message = problem
            raise VerificationFailed(message, seq=seq)


def _check_batch(raw_key: bytes, batch: list[_Item]) -> tuple[int, str] | None:
    """In a worker process: the first bad signature of a batch, as (seq, message)."""
    key = Ed25519PublicKey.from_public_bytes(raw_key)
    key_id = key_id_of(key)
    for seq, data, signature, stored_key_id in batch:
        problem = signature_problem(
            seq, data, signature, stored_key_id, public_key=key, key_id=key_id
        )
        if problem is not None:
            return seq, problem
    return None


__all__ = ["VerifiedLog", "verify"]
