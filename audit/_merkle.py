"""
The RFC 9162 Merkle tree over audit records: hashes, proofs, and their verification.

Invariants:

- A leaf is the exact record bytes; its hash is ``SHA-256(0x00 || bytes)`` and an
  interior node's is ``SHA-256(0x01 || left || right)`` (RFC 9162 §2.1.1), so a leaf
  can never pass for a node.
- Proofs are built from ``subtree(start, end)``, the root of leaves ``[start, end)``;
  the store answers it from the perfect subtrees it keeps, so a proof costs
  O(log n) lookups however large the log.
- ``verify_inclusion`` and ``verify_consistency`` follow RFC 9162 §2.1.3.2 and
  §2.1.4.2 step by step; they return nothing and raise ``VerificationFailed``
  saying which input is wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Final

from callward.core.errors import VerificationFailed

#: RFC 9162 §2.1.1 domain separation: a leaf hash starts with 0x00, a node hash with 0x01.
LEAF_PREFIX: Final = b"\x00"
NODE_PREFIX: Final = b"\x01"
HASH_BYTES: Final = 32
#: The root of the empty tree: SHA-256 of nothing.
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()

Subtree = Callable[[int, int], bytes]


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one leaf."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def split_point(size: int) -> int:
    """The largest power of two smaller than ``size`` (``size`` > 1): RFC 9162's ``k``."""
    return 1 << ((size - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """The tree head over these leaf hashes, by the RFC's recursive definition."""
    if not hashes:
        return EMPTY_ROOT
    if len(hashes) == 1:
        return hashes[0]
    k = split_point(len(hashes))
    return node_hash(root_from_leaf_hashes(hashes[:k]), root_from_leaf_hashes(hashes[k:]))


def subtree_from_perfect(perfect: Callable[[int, int], bytes]) -> Subtree:
    """
    ``subtree(start, end)`` built on ``perfect(level, index)``, the root of the perfect
    subtree of ``2**level`` leaves starting at leaf ``index * 2**level``.

    Only ranges that the RFC's recursion asks for are supported: ``start`` is a
    multiple of the largest power of two not above ``end - start``.
    """

    def subtree(start: int, end: int) -> bytes:
        size = end - start
        if size <= 0:
            raise ValueError("a subtree holds at least one leaf")
        if size & (size - 1) == 0:
            level = size.bit_length() - 1
            if start % size:
                raise ValueError("a perfect subtree starts at a multiple of its size")
            return perfect(level, start >> level)
        k = split_point(size)
        return node_hash(subtree(start, start + k), subtree(start + k, end))

    return subtree


def inclusion_proof(index: int, size: int, subtree: Subtree) -> tuple[bytes, ...]:
    """
    The audit path of leaf ``index`` in the tree of ``size`` leaves (RFC 9162 §2.1.3.1).

    Raises:
        ValueError: ``index`` is not a leaf of that tree.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
    path: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = split_point(end - start)
        if index - start < k:
            path.append(subtree(start + k, end))
            end = start + k
        else:
            path.append(subtree(start, start + k))
            start += k
    path.reverse()
    return tuple(path)


def consistency_proof(old_size: int, new_size: int, subtree: Subtree) -> tuple[bytes, ...]:
    """
    The proof that the tree of ``old_size`` leaves is a prefix of the tree of
    ``new_size`` leaves (RFC 9162 §2.1.4.1); empty when ``old_size`` is 0 or equal.

    Raises:
        ValueError: ``old_size`` is larger than ``new_size``, or a size is negative.
    """
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return ()
    path: list[bytes] = []
    m, start, end, whole = old_size, 0, new_size, True
    while m != end - start:
        k = split_point(end - start)
        if m <= k:
            path.append(subtree(start + k, end))
            end = start + k
        else:
            path.append(subtree(start, start + k))
            m -= k
            start += k
            whole = False
    if not whole:
        path.append(subtree(start, end))
    path.reverse()
    return tuple(path)


def _fail(message: str) -> VerificationFailed:
    return VerificationFailed(message, seq=None)


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_BYTES:
        raise _fail(f"{what} is {len(value)} bytes, not a {HASH_BYTES}-byte SHA-256 hash")


def root_from_inclusion_proof(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes]
) -> bytes:
    """
    The root that ``proof`` leads to from ``leaf`` (RFC 9162 §2.1.3.2, steps 1-5).

    Raises:
        VerificationFailed: The index is outside the tree, or the proof is too long,
            too short, or holds something that is not a hash.
    """
    if not 0 <= index < size:
        raise _fail(f"leaf index {index} is outside a tree of {size} leaves")
    _check_hash(leaf, "the leaf hash")
    fn, sn = index, size - 1
    r = leaf
    for position, p in enumerate(proof):
        _check_hash(p, f"inclusion proof element {position}")
        if sn == 0:
            raise _fail(f"the inclusion proof has {len(proof)} hashes, more than the tree needs")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise _fail(f"the inclusion proof has {len(proof)} hashes, fewer than the tree needs")
    return r


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """
    Check that ``leaf`` is leaf ``index`` of the tree of ``size`` leaves with ``root``.

    Raises:
        VerificationFailed: Saying which part does not fit.
    """
    _check_hash(root, "the root hash")
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise _fail(
            f"the inclusion proof for leaf {index} does not lead to the root of the tree of "
            f"{size} leaves"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """
    Check that the tree of ``old_size`` leaves with ``old_root`` is a prefix of the tree
    of ``new_size`` leaves with ``new_root`` (RFC 9162 §2.1.4.2).

    Raises:
        VerificationFailed: Saying which part does not fit.
    """
    _check_hash(old_root, "the old root hash")
    _check_hash(new_root, "the new root hash")
    for position, p in enumerate(proof):
        _check_hash(p, f"consistency proof element {position}")
    if _trivially_consistent(old_size, new_size, old_root, new_root, proof):
        return
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise _fail(f"the consistency proof has {len(proof)} hashes, more than it needs")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise _fail(f"the consistency proof has {len(proof)} hashes, fewer than it needs")
    if fr != old_root:
        raise _fail(f"the consistency proof does not lead to the old root (size {old_size})")
    if sr != new_root:
        raise _fail(f"the consistency proof does not lead to the new root (size {new_size})")


def _trivially_consistent(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """The cases with nothing to compute: True if consistent, raise if not, else False."""
    if not 0 <= old_size <= new_size:
        raise _fail(
            f"tree size {new_size} is smaller than the earlier {old_size}: the log shrank"
        )
    if old_size == new_size:
        if proof:
            raise _fail("a consistency proof between equal sizes is empty")
        if old_root != new_root:
            raise _fail(f"two different roots for the same tree size {old_size}")
        return True
    if old_size == 0:
        if proof:
            raise _fail("a consistency proof from the empty tree is empty")
        return True
    if not proof:
        raise _fail("the consistency proof is empty")
    return False


def frontier_root(frontier: Sequence[bytes]) -> bytes:
    """
    The root of the tree whose frontier is given: the roots of its perfect subtrees,
    largest first (``EMPTY_ROOT`` for none).
    """
    if not frontier:
        return EMPTY_ROOT
    root = frontier[-1]
    for h in reversed(frontier[:-1]):
        root = node_hash(h, root)
    return root


class Frontier:
    """
    The roots of the perfect subtrees that make up a growing tree (a compact range):
    append a leaf in O(1) amortized, read the root in O(log n). Used to recompute
    the tree while streaming a log.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._hashes: list[bytes] = []
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf: bytes) -> None:
        """Add the next leaf hash."""
        h = leaf
        n = self._size
        while n & 1:
            h = node_hash(self._hashes.pop(), h)
            n >>= 1
        self._hashes.append(h)
        self._size += 1

    def root(self) -> bytes:
        """The tree head over every leaf appended so far."""
        return frontier_root(self._hashes)


__all__ = [
    "EMPTY_ROOT",
    "HASH_BYTES",
    "LEAF_PREFIX",
    "NODE_PREFIX",
    "Frontier",
    "Subtree",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_from_inclusion_proof",
    "root_from_leaf_hashes",
    "split_point",
    "subtree_from_perfect",
    "verify_consistency",
    "verify_inclusion",
]
