"""
The fleet's audit log in PostgreSQL: its tables, as versioned migrations.

The tables and columns have the names and meanings of the SQLite file's
(``_sqlite_format``, ``_tree``): ``records``, ``merkle_nodes``, ``checkpoints``,
``meta`` and ``pending_calls``, so one set of readers (verify, prove, query, show,
export, report) reads either store. Beside them:

- ``log_head``: one row, the head of the log (seq, hash, ts), the Merkle tree's
  frontier after it (the roots of its perfect subtrees, largest first), and the
  size of the newest checkpoint (``checkpointed``). Every append transaction locks
  it (``SELECT ... FOR UPDATE``) first, so appends from every replica are serialized
  by the database: seqs 1..N, each exactly once, each ``prev`` the record before.
  The frontier lets any replica extend the tree without reading tree rows.
- ``writers``: one row per open store (a replica's gateway), with a heartbeat the
  store renews; a writer whose heartbeat is older than its lease is gone, and any
  replica closes its pending calls with ``call.interrupted``.

``meta`` holds the log's ``origin`` (``callward.fleet/<uuid>``), written once by
the first migration: the name every checkpoint of the fleet's one log carries.
"""

from __future__ import annotations

from typing import Final

#: The component name in ``callward_schema`` (``callward.core._postgres.migrate``).
COMPONENT: Final = "audit"
#: Where a fleet log's origin starts; the rest is a random id made once per database.
FLEET_ORIGIN_PREFIX: Final = "callward.fleet/"

MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE records (
        seq BIGINT PRIMARY KEY CHECK (seq >= 1),
        ts TEXT NOT NULL,
        kind TEXT NOT NULL,
        prev TEXT NOT NULL,
        key_id TEXT NOT NULL,
        body TEXT NOT NULL,
        record BYTEA NOT NULL,
        hash TEXT NOT NULL,
        signature BYTEA NOT NULL
    );
    CREATE INDEX records_kind_seq ON records (kind, seq);
    CREATE TABLE merkle_nodes (
        level INTEGER NOT NULL,
        idx BIGINT NOT NULL,
        hash BYTEA NOT NULL,
        PRIMARY KEY (level, idx)
    );
    CREATE TABLE checkpoints (
        size BIGINT PRIMARY KEY,
        ts TEXT NOT NULL,
        note TEXT NOT NULL
    );
    CREATE TABLE meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE pending_calls (
        authorized_seq BIGINT PRIMARY KEY,
        call_id TEXT NOT NULL,
        writer TEXT NOT NULL
    );
    CREATE INDEX pending_calls_writer ON pending_calls (writer);
    CREATE TABLE log_head (
        one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
        seq BIGINT NOT NULL,
        hash TEXT NOT NULL,
        ts TEXT,
        frontier BYTEA[] NOT NULL,
        checkpointed BIGINT NOT NULL DEFAULT 0
    );
    INSERT INTO log_head (seq, hash, ts, frontier)
        VALUES (0, repeat('0', 64), NULL, ARRAY[]::BYTEA[]);
    CREATE TABLE writers (
        writer TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        started TIMESTAMPTZ NOT NULL DEFAULT now(),
        heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(),
        lease_seconds DOUBLE PRECISION NOT NULL,
        closed BOOLEAN NOT NULL DEFAULT FALSE
    );
    INSERT INTO meta (name, value)
        VALUES ('origin', 'callward.fleet/' || md5(random()::text || clock_timestamp()::text));
    """,
)

__all__ = ["COMPONENT", "FLEET_ORIGIN_PREFIX", "MIGRATIONS"]
