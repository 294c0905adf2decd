"""
Verify an audit log offline, with nothing but the database file and the public key.

This module streams the records and checks the chain and the keys; signatures are
checked by ``_verify_signatures`` (here or in worker processes) and checkpoints by
``_verify_checkpoints``, as the stream passes them.

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
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from callward.audit._chain import GENESIS_PREV, check_contents, check_position
from callward.audit._checkpoint import Checkpoint, read_unverified
from callward.audit._merkle import EMPTY_ROOT, Frontier, leaf_hash
from callward.audit._sqlite_format import (
    KEY_ROTATED,
    UnreadableDatabase,
    connect_read_only,
    error_name,
    row_to_record,
)
from callward.audit._verify_checkpoints import CheckpointChecks
from callward.audit._verify_signatures import InlineSignatures, PooledSignatures, Signatures
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
            verified = _verify_rows(conn, trust, InlineSignatures(), witnessed)
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
            return _verify_rows(conn, trust, PooledSignatures(pool, processes), witnessed)
    except (BrokenProcessPool, OSError) as exc:
        # Worker processes cannot run here; the answer must not depend on them.
        log.warning("audit_verify_workers_failed", error=type(exc).__name__)
        trust.known, trust.current, trust.current_id = initial
        trust.used = []
        return _verify_rows(conn, trust, InlineSignatures(), witnessed)


def _verify_rows(
    conn: sqlite3.Connection,
    trust: _Trust,
    signatures: Signatures,
    witnessed: list[tuple[str, Checkpoint]],
) -> VerifiedLog:
    count = 0
    prev = GENESIS_PREV
    first_ts: str | None = None
    last_ts: str | None = None
    frontier = Frontier()
    checkpoints = CheckpointChecks(conn, witnessed)
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
                checkpoints.passed(count, frontier, trust.known)
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
    checkpoints.finish(count, trust.known)
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


__all__ = ["VerifiedLog", "verify"]
