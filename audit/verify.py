"""
Verify an audit log offline, with nothing but the database file and the public key.

Invariants:

- The database is opened read-only; verifying never changes the file.
- Rows are streamed in seq order, one at a time: memory does not grow with the log
  (with worker processes, a fixed number of batches is in flight).
- Every record is checked in full (hash, signature, seq, prev, ts, and every column
  against the signed bytes) and the first failure raises ``VerificationFailed`` with
  that record's seq and which check failed. There is no boolean result to ignore.
- Each stored checkpoint must be signed by a trusted key (or one a rotation record
  introduced) and name the Merkle root recomputed from the records 1..size, as the
  stream passes that size. Since every root is recomputed from one sequence of
  leaves, successive checkpoints are consistent exactly when they all verify.
- Records removed from the end of the log are caught when a checkpoint (stored or
  held by a witness) signs more records than the log holds; a database rolled back
  to an older copy is caught against a witness whose checkpoint is newer than the
  log's own latest.
- Keys: a ``key.rotated`` record, signed by the key in force, hands the log to the
  key it names; later records must be signed by that key.
"""

from __future__ import annotations

import base64
import binascii
import multiprocessing
import os
import sqlite3
from collections import deque
from collections.abc import Iterator, Sequence
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
    check_signature,
    signature_problem,
)
from callward.audit._checkpoint import Checkpoint, open_checkpoint, read_unverified
from callward.audit._merkle import EMPTY_ROOT, Frontier, leaf_hash
from callward.audit._sqlite import (
    KEY_ROTATED,
    UnreadableDatabase,
    connect_read_only,
    error_name,
    row_to_record,
)
from callward.audit._tree import MissingNode, root_at
from callward.audit._witness import checkpoint_file_name
from callward.audit.signer import key_id_of, load_public_key
from callward.core._canonical import STRICT_DECODER, Sha256Hex
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
        key_id: The id of the key the last record verified under.
        checkpoints: How many stored checkpoints verified.
        root_hash: The Merkle root over all the records (hex).
        key_ids: Every key the log was signed with, in order (more than one after a
            rotation).
        witnessed: How many witness checkpoints the log was checked against.
    """

    records: int
    head_hash: Sha256Hex
    first_ts: str | None
    last_ts: str | None
    key_id: KeyId
    checkpoints: int = 0
    root_hash: str = EMPTY_ROOT.hex()
    key_ids: tuple[KeyId, ...] = ()
    witnessed: int = 0


def verify(
    db_path: Path,
    public_key: Ed25519PublicKey | Path | Sequence[Ed25519PublicKey | Path],
    *,
    workers: int | Literal["auto"] = 1,
    witnesses: Sequence[Path] = (),
) -> VerifiedLog:
    """
    Check every record and checkpoint of the audit database at ``db_path``.

    Args:
        db_path: A callward ``audit.db``; opened read-only.
        public_key: The Ed25519 public key, or the path of its PEM file, or several
            (the log's keys before and after a rotation).
        workers: 1 checks everything in this process. More starts that many worker
            processes that check signatures (the slowest check) while this one checks
            the chain; ``"auto"`` starts one per CPU for logs of at least
            ``PARALLEL_MIN_RECORDS`` records. Workers are spawned, so a script that
            asks for them must call ``verify`` under ``if __name__ == "__main__":``.
            The outcome, including which failure is reported, never depends on it.
        witnesses: Checkpoint files, or directories of them, kept by witnesses; the
            log must hold every record they sign, with the same root.

    Returns:
        What was verified.

    Raises:
        VerificationFailed: At the first record that fails, with its ``seq`` and a
            message naming the check; with ``seq=None`` when the file is missing,
            unreadable, or not a callward audit database, or a witness shows the
            log was rolled back.
        ConfigurationError: ``public_key`` is a path to a file that is not an
            Ed25519 public key.
    """
    if workers != "auto" and workers < 1:
        raise ValueError('workers is "auto" or at least 1')
    given = public_key if isinstance(public_key, Sequence) else [public_key]
    keys = [load_public_key(k) if isinstance(k, Path) else k for k in given]
    if not keys:
        raise ValueError("verify needs at least one public key")
    witnessed = _read_witnesses(witnesses)
    try:
        conn = connect_read_only(Path(db_path))
    except UnreadableDatabase as exc:
        raise VerificationFailed(str(exc), seq=None) from exc
    try:
        trust = _Trust(keys, _first_key_id(conn))
        processes = _worker_count(conn) if workers == "auto" else workers
        if processes == 1:
            verified = _verify_rows(conn, trust, _InlineSignatures(), witnessed)
        else:
            verified = _verify_pooled(conn, trust, processes, witnessed)
    finally:
        conn.close()
    log.info(
        "audit_log_verified", path=str(db_path), records=verified.records,
        key_id=verified.key_id, checkpoints=verified.checkpoints,
    )
    return verified


def _first_key_id(conn: sqlite3.Connection) -> str | None:
    try:
        row = conn.execute("SELECT key_id FROM records ORDER BY seq LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    return None if row is None else str(row[0])


def _read_witnesses(paths: Sequence[Path]) -> list[tuple[str, Checkpoint]]:
    """Every witness checkpoint, as (where, what it claims); signatures are checked later."""
    found: list[tuple[str, Checkpoint]] = []
    for path in paths:
        where = Path(path)
        suffix = checkpoint_file_name("")  # "" gives just the suffix
        files = sorted(where.glob("*" + suffix)) if where.is_dir() else [where]
        for file in files:
            try:
                note = file.read_bytes()
            except OSError as exc:
                message = f"cannot read witness checkpoint {file}"
                raise VerificationFailed(message, seq=None) from exc
            try:
                found.append((str(file), read_unverified(note)))
            except VerificationFailed as exc:
                raise VerificationFailed(f"witness {file}: {exc.message}", seq=None) from exc
    return found


class _Trust:
    """The keys in force while streaming: trusted ones, and those rotations introduced."""

    def __init__(self, keys: list[Ed25519PublicKey], first_key_id: str | None) -> None:
        self.known = {key_id_of(key): key for key in keys}
        self.current = next(
            (key for key in keys if key_id_of(key) == first_key_id), keys[0]
        )
        self.current_id = key_id_of(self.current)
        self.used: list[KeyId] = []

    def rotate(self, record: AuditRecord) -> None:
        """Follow a verified ``key.rotated`` record to the key it names."""
        seq = record.seq
        try:
            body = STRICT_DECODER.decode(record.body_json.decode("utf-8"))
            raw = base64.b64decode(body["new_public_key"], validate=True)
            new = Ed25519PublicKey.from_public_bytes(raw)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise VerificationFailed(
                f"record {seq}: the key rotation does not name an Ed25519 public key", seq=seq
            ) from exc
        if body.get("new_key_id") != key_id_of(new):
            raise VerificationFailed(
                f"record {seq}: the key rotation's new_key_id is not the id of its key", seq=seq
            )
        if body.get("previous_key_id") != self.current_id:
            raise VerificationFailed(
                f"record {seq}: the key rotation's previous_key_id is not the key in force",
                seq=seq,
            )
        self.current = new
        self.current_id = key_id_of(new)
        self.known[self.current_id] = new


def _worker_count(conn: sqlite3.Connection) -> int:
    try:
        (last_seq,) = conn.execute("SELECT max(seq) FROM records").fetchone()
    except sqlite3.Error:
        return 1  # the row loop reports the failure at its seq
    if not isinstance(last_seq, int) or last_seq < PARALLEL_MIN_RECORDS:
        return 1
    return min(len(os.sched_getaffinity(0)), _MAX_WORKERS)


def _verify_pooled(
    conn: sqlite3.Connection,
    trust: _Trust,
    processes: int,
    witnessed: list[tuple[str, Checkpoint]],
) -> VerifiedLog:
    initial = (dict(trust.known), trust.current, trust.current_id)
    try:
        with ProcessPoolExecutor(
            max_workers=processes, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            return _verify_rows(conn, trust, _PooledSignatures(pool, processes), witnessed)
    except (BrokenProcessPool, OSError) as exc:
        # Worker processes cannot run here; the answer must not depend on them.
        log.warning("audit_verify_workers_failed", error=type(exc).__name__)
        trust.known, trust.current, trust.current_id = initial
        trust.used = []
        return _verify_rows(conn, trust, _InlineSignatures(), witnessed)


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    (count,) = conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return bool(count)


def _stored_checkpoints(conn: sqlite3.Connection) -> Iterator[tuple[int, str]]:
    """The stored checkpoints by size; none in a version 1 file."""
    if not _has_table(conn, "checkpoints"):
        return iter(())
    # A second cursor beside the records': checkpoints stream too, in constant memory.
    return ((int(size), str(note)) for size, note in
            conn.execute("SELECT size, note FROM checkpoints ORDER BY size"))


class _Checkpoints:
    """Checks stored and witness checkpoints as the stream of records passes their size."""

    def __init__(
        self, conn: sqlite3.Connection, witnessed: list[tuple[str, Checkpoint]]
    ) -> None:
        self._conn = conn
        self._stored = _stored_checkpoints(conn)
        self._has_tree = _has_table(conn, "merkle_nodes")
        self._next = next(self._stored, None)
        self._witnessed = witnessed
        self._witness_sizes = {checkpoint.size for _, checkpoint in witnessed}
        self.roots: dict[int, bytes] = {}
        self.verified = 0
        self.latest = 0
        self.origin: str | None = None

    def passed(self, size: int, frontier: Frontier, trust: _Trust) -> None:
        """The first ``size`` records verified; ``frontier`` is their tree."""
        if size in self._witness_sizes:
            self.roots[size] = frontier.root()
        while self._next is not None and self._next[0] <= size:
            stored_size, note = self._next
            if stored_size < size:
                raise VerificationFailed(
                    f"checkpoint {stored_size}: not a size the log passed through", seq=size
                )
            self._check(stored_size, note, frontier.root(), trust)
            self._next = next(self._stored, None)

    def _check(self, size: int, note: str, root: bytes, trust: _Trust) -> None:
        try:
            checkpoint = open_checkpoint(note, trust.known.values(), origin=self.origin)
        except VerificationFailed as exc:
            raise VerificationFailed(f"checkpoint {size}: {exc.message}", seq=size) from exc
        if checkpoint.size != size:
            raise VerificationFailed(
                f"checkpoint {size}: stored as size {size} but signs size {checkpoint.size}",
                seq=size,
            )
        if checkpoint.root != root:
            raise VerificationFailed(
                f"checkpoint {size}: its root is not the Merkle root of records 1..{size}",
                seq=size,
            )
        if self._has_tree:
            self._check_stored_tree(size, root)
        self.origin = checkpoint.origin
        self.verified += 1
        self.latest = size

    def _check_stored_tree(self, size: int, root: bytes) -> None:
        """The tree the file serves proofs from must give the root the records give."""
        try:
            stored = root_at(self._conn, size)
        except MissingNode:
            stored = b""
        if stored != root:
            raise VerificationFailed(
                f"checkpoint {size}: the file's stored Merkle tree does not give the root of "
                f"records 1..{size}, so proofs made from it would fail",
                seq=size,
            )

    def finish(self, count: int, trust: _Trust) -> None:
        """After the last record: nothing signed may reach past it; witnesses agree."""
        if self._next is not None:
            size = self._next[0]
            raise VerificationFailed(
                f"checkpoint {size} signs {size} records but the log holds {count}: records "
                "were removed from the end",
                seq=count + 1,
            )
        for where, claimed in self._witnessed:
            try:
                checkpoint = open_checkpoint(claimed.note, trust.known.values())
            except VerificationFailed as exc:
                raise VerificationFailed(f"witness {where}: {exc.message}", seq=None) from exc
            if self.origin is not None and checkpoint.origin != self.origin:
                continue  # another log's checkpoint in a shared witness directory
            if checkpoint.size > count:
                raise VerificationFailed(
                    f"rolled back: witness {where} holds a checkpoint of {checkpoint.size} "
                    f"records, the log only {count}",
                    seq=None,
                )
            if self.roots.get(checkpoint.size) != checkpoint.root:
                raise VerificationFailed(
                    f"rewritten: the log's first {checkpoint.size} records are not those "
                    f"witness {where} signed",
                    seq=None,
                )
            if checkpoint.size > self.latest:
                raise VerificationFailed(
                    f"rolled back: the log's latest checkpoint ({self.latest}) is behind "
                    f"witness {where}'s ({checkpoint.size})",
                    seq=None,
                )


def _verify_rows(
    conn: sqlite3.Connection,
    trust: _Trust,
    signatures: _Signatures,
    witnessed: list[tuple[str, Checkpoint]],
) -> VerifiedLog:
    count = 0
    prev = GENESIS_PREV
    first_ts: str | None = None
    last_ts: str | None = None
    frontier = Frontier()
    checkpoints = _Checkpoints(conn, witnessed)
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
            signatures.check(record, trust.current, trust.current_id)
            try:
                check_contents(record, key_id=trust.current_id, prev=prev, not_before=last_ts)
                if not trust.used or trust.used[-1] != trust.current_id:
                    trust.used.append(trust.current_id)
                if record.kind == KEY_ROTATED:
                    # The rotation record itself must be genuine before it is followed.
                    signatures.finish()
                    trust.rotate(record)
                frontier.append(leaf_hash(record.record_bytes))
                count = record.seq
                checkpoints.passed(count, frontier, trust)
            except VerificationFailed as failure:
                signatures.raise_first(failure, including_seq=True)
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
    checkpoints.finish(count, trust)
    return VerifiedLog(
        records=count,
        head_hash=prev,
        first_ts=first_ts,
        last_ts=last_ts,
        key_id=trust.current_id,
        checkpoints=checkpoints.verified,
        root_hash=frontier.root().hex(),
        key_ids=tuple(trust.used),
        witnessed=len(witnessed),
    )


class _Signatures(Protocol):
    """Checks signatures in seq order, here or elsewhere, and reports the first failure."""

    def check(self, record: AuditRecord, key: Ed25519PublicKey, key_id: KeyId) -> None:
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
    def check(self, record: AuditRecord, key: Ed25519PublicKey, key_id: KeyId) -> None:
        check_signature(record, public_key=key, key_id=key_id)

    def raise_first(self, failure: VerificationFailed, *, including_seq: bool) -> NoReturn:
        raise failure

    def finish(self) -> None:
        return


_Item = tuple[int, bytes, bytes, str, bytes]


class _PooledSignatures:
    """Batches of signatures checked by worker processes, with a bounded queue."""

    def __init__(self, pool: ProcessPoolExecutor, processes: int) -> None:
        self._pool = pool
        self._max_pending = 2 * processes
        self._batch: list[_Item] = []
        self._pending: deque[Future[tuple[int, str] | None]] = deque()
        self._raw: dict[KeyId, bytes] = {}

    def check(self, record: AuditRecord, key: Ed25519PublicKey, key_id: KeyId) -> None:
        raw = self._raw.get(key_id)
        if raw is None:
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            self._raw[key_id] = raw
        item = (record.seq, record.record_bytes, record.signature, record.key_id, raw)
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
            self._pending.append(self._pool.submit(_check_batch, self._batch))
            self._batch = []

    def _collect_oldest(self) -> None:
        problem = self._pending.popleft().result()
        if problem is not None:
            seq, message = problem
            raise VerificationFailed(message, seq=seq)


def _check_batch(batch: list[_Item]) -> tuple[int, str] | None:
    """In a worker process: the first bad signature of a batch, as (seq, message)."""
    keys: dict[bytes, tuple[Ed25519PublicKey, KeyId]] = {}
    for seq, data, signature, stored_key_id, raw_key in batch:
        if raw_key not in keys:
            key = Ed25519PublicKey.from_public_bytes(raw_key)
            keys[raw_key] = (key, key_id_of(key))
        key, key_id = keys[raw_key]
        problem = signature_problem(
            seq, data, signature, stored_key_id, public_key=key, key_id=key_id
        )
        if problem is not None:
            return seq, problem
    return None


__all__ = ["VerifiedLog", "verify"]
