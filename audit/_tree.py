"""
The Merkle tree and checkpoints as SQLite tables beside ``records``.

Invariants:

- ``merkle_nodes`` holds the root of every *perfect* subtree the records form:
  ``(level, idx)`` is the subtree of ``2**level`` leaves starting at leaf
  ``idx * 2**level``. A perfect subtree never changes once complete, so each row is
  written in the same transaction as the record that completes it: appending
  writes one leaf row and at most log2(n) node rows (one on average). A row past
  the head (records removed by hand) is stale and is replaced, never trusted.
- Any root or proof for any size up to the head is computed from those rows with
  O(log n) lookups; nothing else is stored, so nothing else can disagree.
- ``checkpoints`` holds signed notes; ``verify`` recomputes each one's root from the
  records, so a stored node or checkpoint that lies is caught, never trusted.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from callward.audit._merkle import (
    EMPTY_ROOT,
    Subtree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    subtree_from_perfect,
)

TREE_TABLES: Final = (
    """
    CREATE TABLE merkle_nodes (
        level INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        hash BLOB NOT NULL,
        PRIMARY KEY (level, idx)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE checkpoints (
        size INTEGER PRIMARY KEY,
        ts TEXT NOT NULL,
        note TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE pending_calls (
        authorized_seq INTEGER PRIMARY KEY,
        call_id TEXT NOT NULL,
        writer TEXT NOT NULL
    )
    """,
)
_GET_NODE: Final = "SELECT hash FROM merkle_nodes WHERE level = ? AND idx = ?"
_PUT_NODE: Final = "INSERT OR REPLACE INTO merkle_nodes (level, idx, hash) VALUES (?, ?, ?)"


class MissingNode(LookupError):
    """A subtree the records should have completed has no row: the tree table is damaged."""


def add_leaf(conn: sqlite3.Connection, index: int, data: bytes) -> None:
    """
    Store leaf ``index`` (the record bytes ``data``) and every perfect subtree it completes.

    Raises:
        MissingNode: A sibling subtree is missing (the table was damaged).
    """
    h = leaf_hash(data)
    level = 0
    conn.execute(_PUT_NODE, (0, index, h))
    while index & 1:
        sibling = _node(conn, level, index - 1)
        h = node_hash(sibling, h)
        level += 1
        index >>= 1
        conn.execute(_PUT_NODE, (level, index, h))


def frontier_at(conn: sqlite3.Connection, size: int) -> tuple[bytes, ...]:
    """
    The roots of the perfect subtrees that make up the tree of ``size`` leaves, largest
    (leftmost) first: all a writer needs to append and to prove its newest leaf.

    Raises:
        MissingNode: One of those subtrees has no row (the table was damaged).
    """
    hashes: list[bytes] = []
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            hashes.append(_node(conn, level, start >> level))
            start += 1 << level
    return tuple(hashes)


def extend_frontier(
    frontier: tuple[bytes, ...], size: int, data: bytes
) -> tuple[tuple[bytes, ...], list[tuple[int, int, bytes]]]:
    """
    Add leaf ``size`` (the record bytes ``data``) to the tree whose frontier is given.

    Returns the new frontier and the ``merkle_nodes`` rows the leaf completes (the
    leaf itself and every perfect subtree it closes), as ``add_leaf`` writes them.
    The inclusion proof of the new leaf in the tree of ``size + 1`` leaves is the
    old frontier, smallest subtree first.
    """
    h = leaf_hash(data)
    rows = [(0, size, h)]
    hashes = list(frontier)
    index, level = size, 0
    while index & 1:
        h = node_hash(hashes.pop(), h)
        level += 1
        index >>= 1
        rows.append((level, index, h))
    hashes.append(h)
    return tuple(hashes), rows


def put_nodes(conn: sqlite3.Connection, rows: list[tuple[int, int, bytes]]) -> None:
    """Write the rows ``extend_frontier`` returned."""
    conn.executemany(_PUT_NODE, rows)


def _node(conn: sqlite3.Connection, level: int, index: int) -> bytes:
    row = conn.execute(_GET_NODE, (level, index)).fetchone()
    if row is None or not isinstance(row[0], bytes):
        raise MissingNode(f"the Merkle node at level {level}, index {index} is missing")
    return row[0]


def subtree_reader(conn: sqlite3.Connection) -> Subtree:
    """``subtree(start, end)`` answered from the ``merkle_nodes`` table."""
    return subtree_from_perfect(lambda level, index: _node(conn, level, index))


def root_at(conn: sqlite3.Connection, size: int) -> bytes:
    """The root of the tree over records 1..``size``."""
    if size == 0:
        return EMPTY_ROOT
    return subtree_reader(conn)(0, size)


def inclusion_path(conn: sqlite3.Connection, seq: int, size: int) -> tuple[bytes, ...]:
    """The inclusion proof of record ``seq`` (leaf ``seq - 1``) in the tree of ``size``."""
    return inclusion_proof(seq - 1, size, subtree_reader(conn))


def consistency_path(conn: sqlite3.Connection, old: int, new: int) -> tuple[bytes, ...]:
    """The consistency proof from the tree of ``old`` records to the tree of ``new``."""
    return consistency_proof(old, new, subtree_reader(conn))


def leaf_count(conn: sqlite3.Connection) -> int:
    """How many leaves the tree table holds."""
    (count,) = conn.execute(
        "SELECT coalesce(max(idx) + 1, 0) FROM merkle_nodes WHERE level = 0"
    ).fetchone()
    return int(count)


def get_meta(conn: sqlite3.Connection, name: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: sqlite3.Connection, name: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))


__all__ = [
    "TREE_TABLES",
    "MissingNode",
    "add_leaf",
    "consistency_path",
    "extend_frontier",
    "frontier_at",
    "get_meta",
    "inclusion_path",
    "leaf_count",
    "put_nodes",
    "root_at",
    "set_meta",
    "subtree_reader",
]
