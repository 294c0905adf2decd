"""
Checking the signatures of a log's records, in this process or in worker processes.

Invariants:

- Whichever way signatures are checked, the failure reported is the one a check of
  every record in seq order would report first: a bad signature at a seq before a
  failure of the chain (or at it, since a record's signature is checked before its
  contents) wins over that failure.
- Worker processes get batches of ``_BATCH_RECORDS`` records, and about two batches
  per worker are in flight at most: memory does not grow with the log.
- A worker sees only record bytes, signatures and raw public keys; it opens no file.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Final, NoReturn, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from callward.audit._chain import check_signature, signature_problem
from callward.audit.signer import key_id_of
from callward.core.errors import VerificationFailed
from callward.core.types import AuditRecord, KeyId

_BATCH_RECORDS: Final = 1024


class Signatures(Protocol):
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


class InlineSignatures:
    """Checks each signature here, at once."""

    def check(self, record: AuditRecord, key: Ed25519PublicKey, key_id: KeyId) -> None:
        check_signature(record, public_key=key, key_id=key_id)

    def raise_first(self, failure: VerificationFailed, *, including_seq: bool) -> NoReturn:
        raise failure

    def finish(self) -> None:
        return


_Item = tuple[int, bytes, bytes, str, bytes]


class PooledSignatures:
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


__all__ = ["InlineSignatures", "PooledSignatures", "Signatures"]
