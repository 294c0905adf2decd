"""
Calls authorized but not yet completed, kept in ``pending_calls`` beside the records.

Invariants:

- A ``call.authorized`` record adds its call, with the id of the writer that wrote
  it, in the same transaction as the record; the ``call.completed`` or
  ``call.interrupted`` naming its seq removes it in the same transaction as that
  record. So the table never disagrees with the records.
- A call is closed out as ``call.interrupted`` only if its writer is gone (its lock
  is free, see ``_writer_lock``) and only if the call is still pending inside the
  transaction that closes it out: each call is closed out exactly once, whichever
  process gets there first.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

from callward.audit._sqlite_format import CALL_INTERRUPTED
from callward.core._canonical import JSONValue


def call_links(kind: str, body: Mapping[str, JSONValue]) -> tuple[str | None, int | None]:
    """
    What a record of ``kind`` does to the pending calls.

    Returns:
        The id of the call it authorizes (``""`` if a ``call.authorized`` names none),
        and the ``authorized_seq`` it completes; None for what it does not do.
    """
    if kind == "call.authorized":
        call = body.get("call")
        call_id = call.get("id") if isinstance(call, Mapping) else None
        return (call_id if isinstance(call_id, str) else ""), None
    if kind in ("call.completed", CALL_INTERRUPTED):
        seq = body.get("authorized_seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            return None, seq
    return None, None


def is_pending(conn: sqlite3.Connection, authorized_seq: int) -> bool:
    """Whether the call authorized at ``authorized_seq`` is still open."""
    row = conn.execute(
        "SELECT 1 FROM pending_calls WHERE authorized_seq = ?", (authorized_seq,)
    ).fetchone()
    return row is not None


def update_pending(
    conn: sqlite3.Connection,
    seq: int,
    *,
    authorizes: str | None,
    completes: int | None,
    writer_id: str,
) -> None:
    """Record what the record at ``seq`` (see ``call_links``) does to the pending calls."""
    if authorizes is not None:
        conn.execute(
            "INSERT INTO pending_calls (authorized_seq, call_id, writer) VALUES (?, ?, ?)",
            (seq, authorizes, writer_id),
        )
    elif completes is not None:
        conn.execute("DELETE FROM pending_calls WHERE authorized_seq = ?", (completes,))


def pending_of_others(conn: sqlite3.Connection, writer_id: str) -> list[tuple[int, str, str]]:
    """The open calls of every writer but ``writer_id``: (authorized seq, call id, writer)."""
    rows = conn.execute(
        "SELECT authorized_seq, call_id, writer FROM pending_calls"
        " WHERE writer != ? ORDER BY authorized_seq",
        (writer_id,),
    ).fetchall()
    return [(int(seq), str(call_id), str(writer)) for seq, call_id, writer in rows]


def interrupted_body(call_id: str, authorized_seq: int) -> dict[str, JSONValue]:
    """The body of the ``call.interrupted`` record that closes out a call."""
    return {
        "call_id": call_id,
        "authorized_seq": authorized_seq,
        "outcome": "interrupted",
        "message": "the gateway stopped before the call completed; its result, "
        "if any, never reached the model",
    }


__all__ = ["call_links", "interrupted_body", "is_pending", "pending_of_others", "update_pending"]
