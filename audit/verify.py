"""
Verify an audit log offline, with nothing but the database file and the public key.

Invariants:

- The database is opened read-only; verifying never changes the file.
- Rows are streamed in seq order, one at a time: memory does not grow with the log.
- Every record is checked in full (hash, signature, seq, prev, ts, and every column
  against the signed bytes) and the first failure raises ``VerificationFailed`` with
  that record's seq and which check failed. There is no boolean result to ignore.
- What this cannot see: records removed from the *end* of the log. A reviewer who
  needs that compares ``VerifiedLog.records`` and ``head_hash`` with a receipt or a
  checkpoint taken earlier.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog
from callward.audit._chain import GENESIS_PREV, check_record
from callward.audit._sqlite import (
    UnreadableDatabase,
    connect_read_only,
    error_name,
    row_to_record,
)
from callward.audit.signer import key_id_of, load_public_key
from callward.core._canonical import Sha256Hex
from callward.core.errors import VerificationFailed
from callward.core.types import KeyId
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = structlog.get_logger()

_SELECT_ALL: Final = (
    "SELECT seq, ts, kind, prev, key_id, body, record, hash, signature FROM records ORDER BY seq"
)


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


def verify(db_path: Path, public_key: Ed25519PublicKey | Path) -> VerifiedLog:
    """
    Check every record of the audit database at ``db_path``.

    Args:
        db_path: A callward ``audit.db``; opened read-only.
        public_key: The Ed25519 public key, or the path of its PEM file.

    Returns:
        What was verified.

    Raises:
        VerificationFailed: At the first record that fails, with its ``seq`` and a
            message naming the check; with ``seq=None`` when the file is missing,
            unreadable, or not a callward audit database.
        ConfigurationError: ``public_key`` is a path to a file that is not an
            Ed25519 public key.
    """
    key = load_public_key(public_key) if isinstance(public_key, Path) else public_key
    key_id = key_id_of(key)
    try:
        conn = connect_read_only(Path(db_path))
    except UnreadableDatabase as exc:
        raise VerificationFailed(str(exc), seq=None) from exc
    try:
        verified = _verify_rows(conn, key, key_id)
    finally:
        conn.close()
    log.info(
        "audit_log_verified", path=str(db_path), records=verified.records, key_id=key_id
    )
    return verified


def _verify_rows(conn: sqlite3.Connection, key: Ed25519PublicKey, key_id: KeyId) -> VerifiedLog:
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
                raise VerificationFailed(f"record {seq}: {exc}", seq=seq) from None
            check_record(
                record,
                public_key=key,
                key_id=key_id,
                expected_seq=count + 1,
                prev=prev,
                not_before=last_ts,
            )
            count = record.seq
            prev = record.record_hash
            last_ts = record.ts
            if first_ts is None:
                first_ts = record.ts
    except sqlite3.Error as exc:
        raise VerificationFailed(
            f"the database could not be read after record {count} ({error_name(exc)})",
            seq=count + 1,
        ) from exc
    return VerifiedLog(
        records=count, head_hash=prev, first_ts=first_ts, last_ts=last_ts, key_id=key_id
    )


__all__ = ["VerifiedLog", "verify"]
