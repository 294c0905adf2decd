"""
Checking the stored and witness checkpoints of a log as ``verify`` streams its records.

Invariants:

- A stored checkpoint is checked when the stream of verified records reaches its
  size: it must be signed by a key in force (or one a rotation introduced), sign
  exactly that size, and name the Merkle root recomputed from records 1..size. A
  checkpoint at a size the stream skipped is a failure.
- Where the file holds a tree, the root it would serve proofs from must equal the
  recomputed one.
- After the last record, nothing signed may reach past it: a stored checkpoint left
  over means records were removed from the end; a witness checkpoint of more records
  than the log, or newer than the log's latest, means it was rolled back; one whose
  root differs from the log's at that size means it was rewritten. A witness's
  checkpoint of another log (another origin) is not this log's and is skipped.
- When the log names its origin (a fleet store's ``meta``), every stored checkpoint
  must carry that origin.
- Checkpoints stream from their own cursor: memory does not grow with the log, only
  with the number of witness checkpoints.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from typing import cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from callward.audit._checkpoint import Checkpoint, open_checkpoint
from callward.audit._merkle import Frontier
from callward.audit._sqlite_format import ReadConnection, has_table
from callward.audit._tree import MissingNode, root_at
from callward.core.errors import VerificationFailed
from callward.core.types import KeyId


def _stored_checkpoints(conn: ReadConnection) -> Iterator[tuple[int, str]]:
    """The stored checkpoints by size; none in a version 1 file."""
    if not has_table(conn, "checkpoints"):
        return iter(())
    # A second cursor beside the records': checkpoints stream too, in constant memory.
    return ((int(size), str(note)) for size, note in
            conn.execute("SELECT size, note FROM checkpoints ORDER BY size"))


class CheckpointChecks:
    """Checks stored and witness checkpoints as the stream of records passes their size."""

    def __init__(
        self,
        conn: ReadConnection,
        witnessed: list[tuple[str, Checkpoint]],
        *,
        origin: str | None = None,
    ) -> None:
        """
        Args:
            origin: The log's own name, if it keeps one (a fleet store's ``meta``):
                every stored checkpoint must carry it. Else the first verified
                checkpoint's origin is the one the others must carry.
        """
        self._conn = conn
        self._stored = _stored_checkpoints(conn)
        self._has_tree = has_table(conn, "merkle_nodes")
        self._next = next(self._stored, None)
        self._witnessed = witnessed
        self._witness_sizes = {checkpoint.size for _, checkpoint in witnessed}
        self.roots: dict[int, bytes] = {}
        self.verified = 0
        self.latest = 0
        self.origin = origin

    def passed(
        self, size: int, frontier: Frontier, keys: Mapping[KeyId, Ed25519PublicKey]
    ) -> None:
        """
        The first ``size`` records verified; ``frontier`` is their tree, ``keys`` the
        keys in force or introduced so far.
        """
        if size in self._witness_sizes:
            self.roots[size] = frontier.root()
        while self._next is not None and self._next[0] <= size:
            stored_size, note = self._next
            if stored_size < size:
                raise VerificationFailed(
                    f"checkpoint {stored_size}: not a size the log passed through", seq=size
                )
            self._check(stored_size, note, frontier.root(), keys)
            self._next = next(self._stored, None)

    def _check(
        self, size: int, note: str, root: bytes, keys: Mapping[KeyId, Ed25519PublicKey]
    ) -> None:
        try:
            checkpoint = open_checkpoint(note, keys.values(), origin=self.origin)
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
            # _tree reads through execute(...).fetchone() only, which both stores offer.
            stored = root_at(cast("sqlite3.Connection", self._conn), size)
        except MissingNode:
            stored = b""
        if stored != root:
            raise VerificationFailed(
                f"checkpoint {size}: the file's stored Merkle tree does not give the root of "
                f"records 1..{size}, so proofs made from it would fail",
                seq=size,
            )

    def finish(self, count: int, keys: Mapping[KeyId, Ed25519PublicKey]) -> None:
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
                checkpoint = open_checkpoint(claimed.note, keys.values())
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


__all__ = ["CheckpointChecks"]
