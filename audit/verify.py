"""
Verify an audit log offline, with nothing but the database and the public key(s).

The database is an SQLite file, or a fleet's PostgreSQL store (a ``postgresql://``
URL), read through the same queries. This module streams the records and checks
the chain and the keys; signatures are checked by ``_verify_signatures`` (here or in
worker processes) and checkpoints by ``_verify_checkpoints``, as the stream passes
them.

Invariants:

- The database is opened read-only; verifying never changes it. A fleet store is
  read in one repeatable-read snapshot, so replicas appending meanwhile do not move
  what is verified.
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
  held by a witness) signs more records than the log holds, or, in a fleet store,
  when the log's head row names more; a database rolled back to an older copy is
  caught against a witness whose checkpoint is newer than the log's own latest.
- Keys of a single gateway's log (chain mode): a ``key.rotated`` record, signed by
  the key in force, hands the log to the key it names; later records must be
  signed by that key.
- Keys of a fleet's log (a PostgreSQL store, or any log whose origin starts with
  ``callward.fleet/``): many replicas append at once, each with its own key, so
  trust is a set. Each record must be signed by the key its ``key_id`` names, and
  that key must be one of the keys given; checkpoints must be signed by one of
  them. Rotation records hand nothing over: a replica's new key is trusted only
  once it is given.
"""

from __future__ import annotations

import base64
import binascii
import multiprocessing
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from callward.audit._chain import GENESIS_PREV, check_contents, check_position
from callward.audit._checkpoint import Checkpoint, read_unverified
from callward.audit._merkle import EMPTY_ROOT, Frontier, leaf_hash
from callward.audit._postgres_schema import FLEET_ORIGIN_PREFIX
from callward.audit._sqlite_format import (
    KEY_ROTATED,
    AuditSource,
    ReadConnection,
    UnreadableDatabase,
    connect_read_only,
    describe_source,
    error_name,
    has_table,
    resolve_source,
    row_to_record,
)
from callward.audit._verify_checkpoints import CheckpointChecks
from callward.audit._verify_signatures import InlineSignatures, PooledSignatures, Signatures
from callward.audit._witness import checkpoint_file_name
from callward.audit.signer import key_id_of, load_public_key
from callward.core._canonical import STRICT_DECODER, Sha256Hex
from callward.core._postgres import StoreUrl
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
            rotation; in a fleet's log, each replica's key, in order of first use).
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
    db_path_or_url: AuditSource,
    public_key: Ed25519PublicKey | Path | Sequence[Ed25519PublicKey | Path],
    *,
    workers: int | Literal["auto"] = 1,
    witnesses: Sequence[Path] = (),
) -> VerifiedLog:
    """
    Check every record and checkpoint of the audit log at ``db_path_or_url``.

    Args:
        db_path_or_url: A callward ``audit.db``, or a fleet's store (a ``StoreUrl``
            or its ``postgresql://`` text); opened read-only.
        public_key: The Ed25519 public key, or the path of its PEM file, or several:
            the log's keys before and after a rotation, or a fleet's set of keys
            (every record must be signed by one of them).
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
            unreadable, or not a callward audit database (or the store cannot be
            reached, or is not a fleet audit store), or a witness shows the log was
            rolled back.
        ConfigurationError: ``public_key`` is a path to a file that is not an
            Ed25519 public key, or ``db_path_or_url`` is a ``postgresql://`` text
            that is not a valid store URL (one holding a password is refused).
    """
    if workers != "auto" and workers < 1:
        raise ValueError('workers is "auto" or at least 1')
    given = public_key if isinstance(public_key, Sequence) else [public_key]
    keys = [load_public_key(k) if isinstance(k, Path) else k for k in given]
    if not keys:
        raise ValueError("verify needs at least one public key")
    witnessed = _read_witnesses(witnesses)
    source = resolve_source(db_path_or_url)
    is_store = isinstance(source, StoreUrl)
    try:
        conn = connect_read_only(source)
    except UnreadableDatabase as exc:
        raise VerificationFailed(str(exc), seq=None) from exc
    try:
        fleet, origin = _fleet_origin(conn, is_store=is_store)
        if fleet:
            def make_trust() -> _Trust:
                return _KeySet(keys)
        else:
            first_key_id = _first_key_id(conn)

            def make_trust() -> _Trust:
                return _KeyChain(keys, first_key_id)
        processes = _worker_count(conn) if workers == "auto" else workers
        if processes == 1:
            verified = _verify_rows(conn, make_trust(), InlineSignatures(), witnessed, origin)
        else:
            verified = _verify_pooled(conn, make_trust, processes, witnessed, origin)
        if is_store:
            _check_head(conn, verified)
    finally:
        conn.close()
    log.info(
        "audit_log_verified", path=describe_source(source), records=verified.records,
        key_id=verified.key_id, checkpoints=verified.checkpoints, fleet=fleet,
    )
    return verified


def _first_key_id(conn: ReadConnection) -> str | None:
    try:
        row = conn.execute("SELECT key_id FROM records ORDER BY seq LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    return None if row is None else str(row[0])


def _fleet_origin(conn: ReadConnection, *, is_store: bool) -> tuple[bool, str | None]:
    """
    Whether the log is a fleet's (a PostgreSQL store, or a log whose origin says so),
    and, for a fleet's, the origin its ``meta`` names (its checkpoints must carry it).
    """
    try:
        origin = _meta_origin(conn)
        claimed = origin if origin is not None else _first_checkpoint_origin(conn)
    except sqlite3.Error:
        # Unreadable tables: decide by the store; the row loop reports the failure.
        return is_store, None
    fleet = is_store or (claimed is not None and claimed.startswith(FLEET_ORIGIN_PREFIX))
    return fleet, (origin if fleet else None)


def _meta_origin(conn: ReadConnection) -> str | None:
    if not has_table(conn, "meta"):
        return None
    row = conn.execute("SELECT value FROM meta WHERE name = ?", ("origin",)).fetchone()
    return None if row is None else str(row[0])


def _first_checkpoint_origin(conn: ReadConnection) -> str | None:
    """What the first stored checkpoint claims to be (checked later, as the stream passes)."""
    if not has_table(conn, "checkpoints"):
        return None
    row = conn.execute("SELECT note FROM checkpoints ORDER BY size LIMIT 1").fetchone()
    if row is None:
        return None
    try:
        return read_unverified(str(row[0])).origin
    except VerificationFailed:
        return None  # the stream reports the malformed checkpoint at its size


def _check_head(conn: ReadConnection, verified: VerifiedLog) -> None:
    """
    A fleet store's head row, which every append updates with its record, must name
    the last record verified: a head ahead of the records means records were removed
    from the end (in the same snapshot, so no append can be half seen).
    """
    try:
        row = conn.execute("SELECT seq, hash FROM log_head").fetchone()
    except sqlite3.Error as exc:
        raise VerificationFailed(
            f"the log's head could not be read ({error_name(exc)})", seq=None
        ) from exc
    if row is None:
        raise VerificationFailed("the log's head row is missing", seq=None)
    head_seq, head_hash = int(row[0]), str(row[1])
    if head_seq > verified.records:
        raise VerificationFailed(
            f"the log's head names {head_seq} records but the log holds {verified.records}: "
            "records were removed from the end",
            seq=verified.records + 1,
        )
    if head_seq < verified.records or head_hash != verified.head_hash:
        raise VerificationFailed(
            f"the log's head (record {head_seq}) is not its last record "
            f"({verified.records}): the head row or the records were edited",
            seq=head_seq + 1 if head_seq < verified.records else verified.records,
        )


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


class _Trust(Protocol):
    """Which key each record must be signed by, as the stream passes it."""

    #: The keys checkpoints may be signed by (so far, in chain mode).
    known: dict[KeyId, Ed25519PublicKey]
    #: The key the last record was signed by (before any record, the first given).
    current_id: KeyId
    #: Every key used, in order.
    used: list[KeyId]

    def key_for(self, record: AuditRecord) -> tuple[Ed25519PublicKey, KeyId]:
        """
        The key ``record`` must verify under.

        Raises:
            VerificationFailed: No key given may sign it.
        """
        ...

    def signed(self, record: AuditRecord, key_id: KeyId) -> None:
        """``record`` verified under ``key_id``: follow a rotation, note the key used."""
        ...


class _KeyChain:
    """Chain mode: one key in force, and those rotations introduced."""

    def __init__(self, keys: list[Ed25519PublicKey], first_key_id: str | None) -> None:
        self.known = {key_id_of(key): key for key in keys}
        self.current = next(
            (key for key in keys if key_id_of(key) == first_key_id), keys[0]
        )
        self.current_id = key_id_of(self.current)
        self.used: list[KeyId] = []

    def key_for(self, record: AuditRecord) -> tuple[Ed25519PublicKey, KeyId]:
        del record  # the key in force signs every record until a rotation
        return self.current, self.current_id

    def signed(self, record: AuditRecord, key_id: KeyId) -> None:
        if not self.used or self.used[-1] != key_id:
            self.used.append(key_id)
        if record.kind == KEY_ROTATED:
            self.rotate(record)

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


class _KeySet:
    """Fleet mode: each record names its key, which must be one of the keys given."""

    def __init__(self, keys: list[Ed25519PublicKey]) -> None:
        self.known = {key_id_of(key): key for key in keys}
        self.current_id = key_id_of(keys[0])
        self.used: list[KeyId] = []
        self._seen: set[KeyId] = set()

    def key_for(self, record: AuditRecord) -> tuple[Ed25519PublicKey, KeyId]:
        key_id = KeyId(record.key_id)
        key = self.known.get(key_id)
        if key is None:
            raise VerificationFailed(
                f"record {record.seq}: signed under key id {record.key_id}, which is not one "
                "of the trusted keys",
                seq=record.seq,
            )
        return key, key_id

    def signed(self, record: AuditRecord, key_id: KeyId) -> None:
        del record  # a rotation record hands nothing over in a fleet's log
        self.current_id = key_id
        if key_id not in self._seen:
            self._seen.add(key_id)
            self.used.append(key_id)


def _worker_count(conn: ReadConnection) -> int:
    try:
        (last_seq,) = conn.execute("SELECT max(seq) FROM records").fetchone()
    except sqlite3.Error:
        return 1  # the row loop reports the failure at its seq
    if not isinstance(last_seq, int) or last_seq < PARALLEL_MIN_RECORDS:
        return 1
    return min(len(os.sched_getaffinity(0)), _MAX_WORKERS)


def _verify_pooled(
    conn: ReadConnection,
    make_trust: Callable[[], _Trust],
    processes: int,
    witnessed: list[tuple[str, Checkpoint]],
    origin: str | None,
) -> VerifiedLog:
    # Workers get record bytes, signatures and raw keys only, never the connection,
    # so they serve a fleet store as they serve a file.
    try:
        with ProcessPoolExecutor(
            max_workers=processes, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            return _verify_rows(
                conn, make_trust(), PooledSignatures(pool, processes), witnessed, origin
            )
    except (BrokenProcessPool, OSError) as exc:
        # Worker processes cannot run here; the answer must not depend on them.
        log.warning("audit_verify_workers_failed", error=type(exc).__name__)
        return _verify_rows(conn, make_trust(), InlineSignatures(), witnessed, origin)


def _verify_rows(
    conn: ReadConnection,
    trust: _Trust,
    signatures: Signatures,
    witnessed: list[tuple[str, Checkpoint]],
    origin: str | None,
) -> VerifiedLog:
    count = 0
    prev = GENESIS_PREV
    first_ts: str | None = None
    last_ts: str | None = None
    frontier = Frontier()
    checkpoints = CheckpointChecks(conn, witnessed, origin=origin)
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
                key, key_id = trust.key_for(record)
            except VerificationFailed as failure:
                signatures.raise_first(failure, including_seq=False)
            signatures.check(record, key, key_id)
            try:
                check_contents(record, key_id=key_id, prev=prev, not_before=last_ts)
                if record.kind == KEY_ROTATED:
                    # The rotation record itself must be genuine before it is followed.
                    signatures.finish()
                trust.signed(record, key_id)
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
