"""
The fleet's audit log in one PostgreSQL: every replica appends to one chain, one tree.

This is the fleet's writer, the twin of ``_sqlite`` (``SQLiteAuditStore``). The
tables are ``_postgres_schema``'s; the connections, migrations and error mapping are
``callward.core._postgres``; the queue of appends is ``_group_commit``; the record
format, the tree's math and the checkpoints are ``_chain``, ``_tree``/``_merkle`` and
``_checkpoint``, shared with the SQLite store.

Invariants:

- One order across every replica: each append transaction locks the one
  ``log_head`` row and writes its records, their ``merkle_nodes`` rows, their
  ``pending_calls`` changes, the new head (seq, hash, ts, frontier) and maybe a
  checkpoint only if that row is exactly the head its records were sealed after;
  then it commits. So seqs are 1..N, each exactly once, and each ``prev`` is the
  hash of the record before, whichever replica wrote it. The head a batch is sealed
  after is either read under the lock (``SELECT ... FOR UPDATE``) or the one this
  store's own last transaction left, when that one found no other replica's append
  before it; a kept head is only ever an expectation the database checks under the
  lock, so a stale one writes nothing and the batch is sealed again after the head
  read under the lock.
- ``append`` returns only after its transaction committed, and every connection runs
  with ``synchronous_commit = on``: a committed record is on the server's disk. If
  ``append`` raises, the caller must assume nothing was written (a commit whose
  answer was lost may still have landed; the next append chains from whatever the
  database really holds).
- Every failure of the server, the connection, the pool, the signer or
  canonicalization leaves as ``AuditUnavailable``; no psycopg type escapes the store.
  Appends run on one connection of their own (only the group commit's leader uses
  it); reads, heartbeats and checkpoints on the pool. A broken connection is dropped
  (the pool's by the pool) and a new one made once the server answers again, so
  appends succeed again without reopening the store. The append connection is
  replaced before use when the server has ended it, and a transaction that fails
  at BEGIN on a kept connection found broken is begun once more on a new one; one
  that fails later is never retried (its commit may have landed).
- Timestamps never go backwards along the chain: a record stamped before the head
  (another replica's clock, or this one stepping back) is held at the head's ts.
- Each replica signs its records and checkpoints with its own Ed25519 key: a
  record's ``key_id`` names the key that signed it, and a checkpoint carries the
  fleet's origin (``callward.fleet/...`` in ``meta``) and the signing replica's
  key hash. There is no "current key": a verifier trusts the set of the fleet's keys.
- Leases: each open store is a row of ``writers`` whose heartbeat a thread renews
  every ``heartbeat_seconds``. A writer is gone when it closed, or when its heartbeat
  is older than its ``lease_seconds`` by the database's clock (never a replica's).
  Its pending calls are then closed out with ``call.interrupted``, by whichever
  replica runs ``recover_interrupted`` first (each store's thread runs it every few
  heartbeats); a call is closed only if it is still pending, and its writer still
  gone, inside the locked transaction that closes it, so exactly once.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, Final, Self

import structlog

from callward.audit._chain import (
    GENESIS_PREV,
    canonical_body,
    format_ts,
    held_at_head,
    is_record_kind,
    seal,
)
from callward.audit._checkpoint import Checkpoint, note_key_hash, sign_checkpoint
from callward.audit._group_commit import AppendRequest, GroupCommit
from callward.audit._merkle import (
    HASH_BYTES,
    frontier_root,
    inclusion_proof,
    leaf_hash,
    root_from_inclusion_proof,
    subtree_from_perfect,
)
from callward.audit._pending_calls import call_links, interrupted_body
from callward.audit._postgres_schema import COMPONENT, FLEET_ORIGIN_PREFIX, MIGRATIONS
from callward.audit._sqlite_format import CALL_INTERRUPTED, SELECT_RECORDS, row_to_record
from callward.audit._tree import MissingNode, extend_frontier
from callward.audit._witness import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_SECONDS,
    Witness,
    publish_to_all,
)
from callward.audit.signer import Signer, public_key_of
from callward.core._canonical import JSONValue, Sha256Hex
from callward.core._postgres import StoreUrl, connect, describe, migrate, pool, store_errors
from callward.core.errors import AuditUnavailable, ConfigurationError, VerificationFailed
from callward.core.types import AuditRecord, KeyId, Receipt, ReceiptProof

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

    Connection = psycopg.Connection[tuple[object, ...]]
    Cursor = psycopg.Cursor[tuple[object, ...]]
    Pool = psycopg_pool.ConnectionPool[Connection]

log = structlog.get_logger()

_APPLICATION_NAME: Final = "callward-audit"
# How long an append waits for another replica's transaction to release the head,
# and how long the server lets a replica's transaction sit idle (a frozen replica
# must not hold the whole fleet's log): both fail closed, as AuditUnavailable.
_LOCK_WAIT_SECONDS: Final = 10
_IDLE_IN_TRANSACTION_SECONDS: Final = 15
# How long making the writer connection may take (the pool's connections wait as long).
_CONNECT_SECONDS: Final = 5.0
# The heartbeat thread closes out gone writers' calls every this many heartbeats.
_RECOVER_EVERY_HEARTBEATS: Final = 5
# How many of this store's newest records keep their inclusion proof in memory.
_PROOF_CACHE: Final = 1024
_PAGE_ROWS: Final = 512

_LIMITS: Final = (
    "SELECT set_config('lock_timeout', %s, true),"
    " set_config('idle_in_transaction_session_timeout', %s, true)"
)
_LOCK_HEAD: Final = "SELECT seq, hash, ts, frontier, checkpointed FROM log_head FOR UPDATE"
# The pending calls whose writer is gone: it closed, or its heartbeat is older than
# its lease by the database's clock (never a replica's).
_CLOSABLE: Final = (
    "SELECT p.authorized_seq FROM pending_calls p LEFT JOIN writers w ON w.writer = p.writer"
    " WHERE p.authorized_seq = ANY(%s) AND p.writer <> %s AND (w.writer IS NULL OR w.closed"
    " OR w.heartbeat + w.lease_seconds * interval '1 second' < clock_timestamp())"
)
_PENDING_OF_GONE: Final = (
    "SELECT p.authorized_seq, p.call_id, p.writer FROM pending_calls p"
    " LEFT JOIN writers w ON w.writer = p.writer WHERE p.writer <> %s AND (w.writer IS NULL"
    " OR w.closed OR w.heartbeat + w.lease_seconds * interval '1 second' < clock_timestamp())"
    " ORDER BY p.authorized_seq"
)
# The writer connection's limits, set once when it is made (session-wide: that
# connection runs nothing but append transactions); and the one plan of its
# statements kept once they are prepared (planning ``_WRITE_BATCH`` again on every
# append would cost more than running it).
_SESSION_LIMITS: Final = (
    "SELECT set_config('lock_timeout', %s, false),"
    " set_config('idle_in_transaction_session_timeout', %s, false),"
    " set_config('plan_cache_mode', 'force_generic_plan', false)"
)
_GET_NODES: Final = (
    "SELECT n.level, n.idx, n.hash FROM merkle_nodes n"
    " JOIN unnest(%s::integer[], %s::bigint[]) AS w(level, idx)"
    " ON n.level = w.level AND n.idx = w.idx"
)
# BEGIN and the head's lock in one round trip (the simple protocol: no parameters).
_BEGIN_AND_LOCK_HEAD: Final = f"BEGIN; {_LOCK_HEAD}"
# Everything an append transaction writes, as one statement the connection prepares
# once, its values sent in binary: the new head, set only where the head is exactly
# the one the batch was sealed after (this takes the head's lock, waiting for any
# other replica's append, and then checks the row as that append left it), and each
# table's rows as arrays (a row per position), written only if the head was. It
# returns how many heads it set: 1, or 0 when the head was another and it wrote
# nothing. Each part writes its own table; a call authorized and completed in one
# batch is in neither pending part (``_plan`` drops it from both).
_WRITE_BATCH: Final = (
    "WITH head AS ("
    " UPDATE log_head SET seq = %b::bigint, hash = %b::text, ts = %b::text,"
    " frontier = %b::bytea[], checkpointed = %b::bigint"
    " WHERE seq = %b::bigint AND hash = %b::text AND ts IS NOT DISTINCT FROM %b::text"
    " AND frontier = %b::bytea[] AND checkpointed = %b::bigint RETURNING 1),"
    " records_added AS ("
    " INSERT INTO records (seq, ts, kind, prev, key_id, body, record, hash, signature)"
    " SELECT * FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::text[], %b::text[],"
    " %b::text[], %b::bytea[], %b::text[], %b::bytea[]) WHERE EXISTS (SELECT FROM head)),"
    " nodes_put AS ("
    " INSERT INTO merkle_nodes (level, idx, hash)"
    " SELECT * FROM unnest(%b::integer[], %b::bigint[], %b::bytea[])"
    " WHERE EXISTS (SELECT FROM head)"
    " ON CONFLICT (level, idx) DO UPDATE SET hash = EXCLUDED.hash),"
    " pending_added AS ("
    " INSERT INTO pending_calls (authorized_seq, call_id, writer)"
    " SELECT seq, call_id, %b::text FROM unnest(%b::bigint[], %b::text[]) AS a(seq, call_id)"
    " WHERE EXISTS (SELECT FROM head)),"
    " pending_removed AS ("
    " DELETE FROM pending_calls WHERE authorized_seq = ANY(%b::bigint[])"
    " AND EXISTS (SELECT FROM head)),"
    " checkpoint_added AS ("
    " INSERT INTO checkpoints (size, ts, note)"
    " SELECT * FROM unnest(%b::bigint[], %b::text[], %b::text[])"
    " WHERE EXISTS (SELECT FROM head))"
    " SELECT count(*) FROM head"
)
_INSERT_CHECKPOINT: Final = "INSERT INTO checkpoints (size, ts, note) VALUES (%s, %s, %s)"
_REGISTER: Final = (
    "INSERT INTO writers (writer, host, pid, key_id, lease_seconds) VALUES (%s, %s, %s, %s, %s)"
)
_HEARTBEAT: Final = "UPDATE writers SET heartbeat = now() WHERE writer = %s AND NOT closed"
_CLOSE_WRITER: Final = "UPDATE writers SET closed = TRUE, heartbeat = now() WHERE writer = %s"


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _Head:
    """The locked ``log_head`` row, checked: what an append transaction builds on."""

    __slots__ = ("checkpointed", "frontier", "prev", "seq", "ts")

    def __init__(self, row: Sequence[object] | None) -> None:
        if row is None:
            raise AuditUnavailable("the fleet audit store has no log_head row")
        seq, prev, ts, frontier, checkpointed = row
        if not isinstance(seq, int) or not isinstance(prev, str) or not isinstance(
            checkpointed, int
        ):
            raise AuditUnavailable("the fleet audit store's log_head row is malformed")
        hashes = tuple(bytes(h) for h in frontier) if isinstance(frontier, list) else None
        # A tree of n leaves is one perfect subtree per set bit of n.
        if hashes is None or len(hashes) != seq.bit_count() or any(
            len(h) != HASH_BYTES for h in hashes
        ):
            raise AuditUnavailable(
                f"the fleet audit store's log_head frontier does not fit seq {seq}"
            )
        self.seq = seq
        self.prev = Sha256Hex(prev) if seq else GENESIS_PREV
        self.ts = ts if isinstance(ts, str) else None
        self.frontier = hashes
        self.checkpointed = checkpointed

    def row(self) -> tuple[object, ...]:
        """The ``log_head`` values this head stands for: seq, hash, ts, frontier, checkpointed."""
        return (self.seq, self.prev, self.ts, list(self.frontier), self.checkpointed)


@dataclass(slots=True)
class _Plan:
    """What one append transaction writes: built by ``_plan`` before anything is sent."""

    head: _Head
    seq: int = 0
    prev: Sha256Hex = GENESIS_PREV
    ts: str | None = None
    frontier: tuple[bytes, ...] = ()
    checkpoint: Checkpoint | None = None
    written: list[tuple[AppendRequest, AuditRecord]] = field(default_factory=list)
    proofs: list[tuple[int, str, bytes, tuple[bytes, ...]]] = field(default_factory=list)
    records: list[tuple[object, ...]] = field(default_factory=list)
    nodes: list[tuple[int, int, bytes]] = field(default_factory=list)
    added: dict[int, str] = field(default_factory=dict)
    removed: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seq, self.prev = self.head.seq, self.head.prev
        self.ts, self.frontier = self.head.ts, self.head.frontier

    def head_row(self) -> tuple[object, ...]:
        """The new ``log_head`` values: seq, hash, ts, frontier, checkpointed."""
        checkpointed = self.head.checkpointed if self.checkpoint is None else self.checkpoint.size
        return (self.seq, self.prev, self.ts, list(self.frontier), checkpointed)

    def new_head(self) -> _Head:
        """The head once this plan committed."""
        return _Head(self.head_row())

    def write_params(self, writer: str, checkpoint_ts: str) -> tuple[object, ...]:
        """``_WRITE_BATCH``'s parameters: every row, the new head and the checkpoint."""
        checkpoints: list[tuple[object, ...]] = []
        if self.checkpoint is not None:
            checkpoints.append((self.checkpoint.size, checkpoint_ts, self.checkpoint.note))
        seqs, tss, kinds, prevs, key_ids, bodies, records, hashes, signatures = _columns(
            self.records, 9
        )
        levels, indexes, node_hashes = _columns(self.nodes, 3)
        sizes, checkpoint_tss, notes = _columns(checkpoints, 3)
        return (
            *_head_params(self.head_row()), *_head_params(self.head.row()),
            _Int8Array.of(seqs), _TextArray.of(tss), _TextArray.of(kinds),
            _TextArray.of(prevs), _TextArray.of(key_ids), _TextArray.of(bodies),
            _ByteaArray.of(records), _TextArray.of(hashes), _ByteaArray.of(signatures),
            _Int4Array.of(levels), _Int8Array.of(indexes), _ByteaArray.of(node_hashes),
            writer, _Int8Array.of(list(self.added)), _TextArray.of(list(self.added.values())),
            _Int8Array.of(self.removed),
            _Int8Array.of(sizes), _TextArray.of(checkpoint_tss), _TextArray.of(notes),
        )


class _Array(bytes):
    """
    A one-dimensional array of ``OID``'s elements, already in PostgreSQL's binary
    array format: psycopg sends it as it is (its generic list dumper costs more than
    the rest of an append on the client).
    """

    __slots__ = ()
    OID: ClassVar[int]
    ELEMENT_OID: ClassVar[int]

    @staticmethod
    def elements(values: Sequence[object]) -> Iterator[bytes]:
        """Each element's binary value, after its length."""
        raise NotImplementedError

    @classmethod
    def of(cls, values: Sequence[object]) -> Self:
        """The array of ``values`` (none of them None)."""
        if not values:
            return cls(_EMPTY_ARRAY.pack(0, 0, cls.ELEMENT_OID))
        header = _ARRAY_HEADER.pack(1, 0, cls.ELEMENT_OID, len(values), 1)
        return cls(header + b"".join(cls.elements(values)))


class _Int8Array(_Array):
    __slots__ = ()
    OID, ELEMENT_OID = 1016, 20

    @staticmethod
    def elements(values: Sequence[object]) -> Iterator[bytes]:
        for value in values:
            if not isinstance(value, int):
                raise TypeError("an integer array holds integers")
            yield _INT8.pack(8, value)


class _Int4Array(_Array):
    __slots__ = ()
    OID, ELEMENT_OID = 1007, 23

    @staticmethod
    def elements(values: Sequence[object]) -> Iterator[bytes]:
        for value in values:
            if not isinstance(value, int):
                raise TypeError("an integer array holds integers")
            yield _INT4.pack(4, value)


class _TextArray(_Array):
    __slots__ = ()
    OID, ELEMENT_OID = 1009, 25

    @staticmethod
    def elements(values: Sequence[object]) -> Iterator[bytes]:
        for value in values:
            data = value if isinstance(value, bytes) else str(value).encode("utf-8")
            yield _LENGTH.pack(len(data))
            yield data


class _ByteaArray(_Array):
    __slots__ = ()
    OID, ELEMENT_OID = 1001, 17

    @staticmethod
    def elements(values: Sequence[object]) -> Iterator[bytes]:
        for value in values:
            if not isinstance(value, bytes):
                raise TypeError("a bytea array holds bytes")
            yield _LENGTH.pack(len(value))
            yield value


_ARRAYS: Final = (_Int8Array, _Int4Array, _TextArray, _ByteaArray)
_ARRAY_HEADER: Final = struct.Struct("!iiIii")
_EMPTY_ARRAY: Final = struct.Struct("!iiI")
_LENGTH: Final = struct.Struct("!i")
_INT8: Final = struct.Struct("!iq")  # the length (8), then the value
_INT4: Final = struct.Struct("!ii")


def _head_params(row: tuple[object, ...]) -> tuple[object, ...]:
    """A ``log_head`` row as ``_WRITE_BATCH`` takes it: its frontier a binary array."""
    seq, prev, ts, frontier, checkpointed = row
    if not isinstance(frontier, list):
        raise TypeError("a head's frontier is a list")
    return (seq, prev, ts, _ByteaArray.of(frontier), checkpointed)


def _register_arrays(conn: Connection) -> None:
    """Let ``conn`` send each ``_Array`` as it is, as its binary parameter."""
    from psycopg.adapt import Buffer, Dumper  # noqa: PLC0415 - psycopg is loaded by now
    from psycopg.pq import Format  # noqa: PLC0415

    for kind in _ARRAYS:

        class _Dumper(Dumper):
            format = Format.BINARY
            oid = kind.OID

            def dump(self, obj: object) -> Buffer:
                if not isinstance(obj, bytes):
                    raise TypeError("an array parameter is its binary value")
                return obj

        conn.adapters.register_dumper(kind, _Dumper)


class PostgresAuditStore:
    """
    The fleet's append-only log of signed records in PostgreSQL;
    ``callward.core.AuditLog`` and ``ReceiptIssuer``.

    The constructor does no I/O: ``open()`` (or ``with``) migrates the tables,
    registers this store in ``writers`` and starts its heartbeat. Safe to share
    between threads; any number of replicas (processes, hosts) may append at once.

    Args:
        url: The fleet's store (``StoreUrl.parse``); never holds a password.
        signer: This replica's key: signs its records, checkpoints and receipts.
        clock: Returns the current time, timezone-aware; injected for tests.
        checkpoint_every: Write a signed checkpoint once this many records follow the
            latest one (whichever replica wrote it).
        checkpoint_seconds: Also write one when this long has passed since this
            store's last one and records arrived (0 turns it off).
        witnesses: Where each checkpoint this store writes is copied.
        lease_seconds: How long after its last heartbeat this store counts as gone
            and its pending calls may be closed out by another replica.
        heartbeat_seconds: How often the heartbeat is renewed; less than the lease.
        pool_size: At most this many connections to the server for reads,
            heartbeats and checkpoints; appends use one more of their own.

    Example::

        url = StoreUrl.parse("postgresql://callward@db:5432/callward")
        with PostgresAuditStore(url, FileSigner.load_or_create(home / "keys")) as log:
            record = log.append("call.denied", {"call_id": "c1", "kind": "schema"})
    """

    def __init__(
        self,
        url: StoreUrl,
        signer: Signer,
        *,
        clock: Callable[[], datetime] = _utc_now,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
        witnesses: Sequence[Witness] = (),
        lease_seconds: float = 10.0,
        heartbeat_seconds: float = 2.0,
        pool_size: int = 4,
    ) -> None:
        if not isinstance(url, StoreUrl):
            raise TypeError("url is a StoreUrl (StoreUrl.parse)")
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        if not checkpoint_seconds >= 0:
            raise ValueError("checkpoint_seconds must be zero or more")
        if not 0 < heartbeat_seconds < lease_seconds:
            raise ValueError("heartbeat_seconds must be more than zero and less than the lease")
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self._url = url
        self._signer = signer
        self._clock = clock
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        self._witnesses = tuple(witnesses)
        self._lease_seconds = float(lease_seconds)
        self._heartbeat_seconds = float(heartbeat_seconds)
        self._pool_size = pool_size
        self._lock = threading.Lock()
        self._group = GroupCommit(self._write)
        # The connection append transactions run on (outside the pool), and the lock
        # its one user at a time holds: the group commit's leader, or ``close``.
        self._writer: Connection | None = None
        self._writer_lock = threading.Lock()
        # The head as this store's last transaction left it, and whether the next
        # batch may be sealed after it (the last one found the head where it was).
        self._known: _Head | None = None
        self._speculate = False
        self._pool: Pool | None = None
        self._origin = ""
        self._key_hash = b""
        self._writer_id = uuid.uuid4().hex
        self._last_checkpoint_at = time.monotonic()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._commits = 0
        # The inclusion proofs of the newest records this store wrote, for their
        # receipts: seq -> (record hash, leaf hash, proof in the tree of seq leaves).
        self._proofs: dict[int, tuple[str, bytes, tuple[bytes, ...]]] = {}

    @property
    def url(self) -> StoreUrl:
        return self._url

    @property
    def key_id(self) -> KeyId:
        """The id of this replica's key, which signs what this store writes."""
        return self._signer.key_id

    @property
    def origin(self) -> str:
        """The fleet log's name in its checkpoints (``callward.fleet/...``); set by ``open``."""
        return self._origin

    @property
    def commits(self) -> int:
        """How many append transactions this store committed (fewer than its records)."""
        return self._commits

    @property
    def writer_id(self) -> str:
        """This store's row in ``writers`` and its id in ``pending_calls``; new per ``open``."""
        return self._writer_id

    def open(self) -> None:
        """
        Migrate the tables, register this store as a writer, start its heartbeat.

        Opening an open store does nothing.

        Raises:
            AuditUnavailable: The server cannot be reached, or holds no fleet log.
            ConfigurationError: The tables were migrated by a newer callward, or the
                signer's key is not Ed25519.
        """
        with self._lock:
            if self._pool is not None:
                return
            key_hash_of = public_key_of(self._signer)
            writer_id = uuid.uuid4().hex
            connections = pool(
                self._url, application_name=_APPLICATION_NAME, max_size=self._pool_size
            )
            try:
                with self._errors("open"), connections.connection() as conn:
                    migrate(conn, COMPONENT, MIGRATIONS)
                    with conn.transaction():
                        row = conn.execute(
                            "SELECT value FROM meta WHERE name = 'origin'"
                        ).fetchone()
                        conn.execute(
                            _REGISTER,
                            (writer_id, socket.gethostname()[:255], os.getpid(),
                             self._signer.key_id, self._lease_seconds),
                        )
            except BaseException:
                connections.close()
                raise
            origin = None if row is None else row[0]
            if not isinstance(origin, str) or not origin.startswith(FLEET_ORIGIN_PREFIX):
                connections.close()
                raise AuditUnavailable(
                    f"the store at {self._url.url} holds no fleet audit log origin",
                    remediation="point store.url at the fleet's callward database",
                )
            self._origin = origin
            self._key_hash = note_key_hash(origin, key_hash_of)
            self._writer_id = writer_id
            self._proofs = {}
            self._known, self._speculate = None, False
            self._last_checkpoint_at = time.monotonic()
            self._pool = connections
            self._stop.clear()
            self._heartbeat = threading.Thread(
                target=self._keep_lease, name="callward-audit-lease", daemon=True
            )
            self._heartbeat.start()
        log.info("audit_store_opened", url=self._url.url, key_id=self._signer.key_id,
                 writer=writer_id, origin=origin)

    def close(self) -> None:
        """
        Write a final checkpoint if records followed the latest one, mark this writer
        closed (its pending calls may then be closed out by any replica), stop the
        heartbeat and close the connections. Appends after this raise
        ``AuditUnavailable``. Failures here are logged, not raised.
        """
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            self._stop.set()
            heartbeat.join()
        if self._pool is None:
            return
        try:
            self.checkpoint(only_if_grown=True)
        except AuditUnavailable:
            log.warning("audit_final_checkpoint_failed", url=self._url.url)
        try:
            with self._errors("close"), self._connection() as conn:
                conn.execute(_CLOSE_WRITER, (self._writer_id,))
        except AuditUnavailable:
            log.warning("audit_writer_close_failed", url=self._url.url, writer=self._writer_id)
        with self._writer_lock, self._lock:
            connections, self._pool = self._pool, None
            self._drop_writer()
        if connections is not None:
            connections.close()
        log.info("audit_store_closed", url=self._url.url, writer=self._writer_id)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def append(self, kind: str, body: Mapping[str, JSONValue]) -> AuditRecord:
        """
        Sign ``body`` as the next record of the fleet's log and commit it (durably)
        before returning.

        Raises:
            ValueError: ``kind`` is not a dotted lower-case name like ``call.completed``.
            AuditUnavailable: The record is not committed; the caller must not proceed.
        """
        return self.append_at(kind, body, now=self._clock())

    def append_at(self, kind: str, body: Mapping[str, JSONValue], *, now: datetime) -> AuditRecord:
        """
        ``append`` at a given time (timezone-aware), the twin tests call.

        Raises:
            ValueError: ``kind`` is malformed or ``now`` is naive.
            TypeError: ``body`` is not a mapping.
            AuditUnavailable: The record is not committed; the caller must not proceed.
        """
        record = self._commit(self._request(kind, body, now))
        if record is None:  # pragma: no cover - only conditional appends skip
            raise AuditUnavailable(f"audit append at {self._url.url} was skipped")
        return record

    def flush(self) -> None:
        """Nothing to do: every commit is durable before ``append`` returns."""

    def rotate_key(self, new_signer: Signer) -> AuditRecord:
        """
        Refused: a fleet's log has no single key to hand over.

        Raises:
            ConfigurationError: Always.
        """
        raise ConfigurationError(
            f"a fleet's audit log has no single key to rotate (asked for {new_signer.key_id}); "
            "each replica signs with its own key",
            remediation="start a replica with the new key and add its public key to the "
            "fleet's trusted keys; retire the old replica once it has closed",
        )

    def _request(
        self,
        kind: str,
        body: Mapping[str, JSONValue],
        now: datetime,
        *,
        only_if_pending: bool = False,
    ) -> AppendRequest:
        if not is_record_kind(kind):
            raise ValueError("a record kind is dotted lower-case, like call.completed")
        ts = format_ts(now)
        with self._errors("append", kind=kind):
            body_json = canonical_body(body)
        authorizes, completes = call_links(kind, body)
        return AppendRequest(
            kind=kind, body_json=body_json, ts=ts, authorizes=authorizes, completes=completes,
            only_if_pending=only_if_pending,
        )

    def _commit(self, request: AppendRequest) -> AuditRecord | None:
        """Queue ``request`` for the next transaction; its record once that committed."""
        self._require_open()
        checkpoint = self._group.submit(request)
        if checkpoint is not None:
            publish_to_all(self._witnesses, self._origin, checkpoint.note)
        return request.result()

    def _write(self, batch: list[AppendRequest]) -> Checkpoint | None:
        """Write ``batch`` in one transaction; set each request's outcome."""
        try:
            closing = [r.completes for r in batch if r.only_if_pending and r.completes is not None]
            with self._errors("append", kind=batch[0].kind), self._writer_lock:
                plan = self._transact(batch, closing)
        except BaseException as exc:  # noqa: BLE001 - each request of the batch re-raises it
            for request in batch:
                if request.error is None:
                    request.error = exc
            return None
        with self._lock:
            for seq, record_hash, leaf, path in plan.proofs:
                self._proofs[seq] = (record_hash, leaf, path)
            while len(self._proofs) > _PROOF_CACHE:
                del self._proofs[next(iter(self._proofs))]
            self._commits += 1
        for request, record in plan.written:
            request.record = record
        if plan.checkpoint is not None:
            self._last_checkpoint_at = time.monotonic()
            log.info("audit_checkpoint_written", size=plan.checkpoint.size)
        return plan.checkpoint

    def _transact(self, batch: list[AppendRequest], closing: list[int]) -> _Plan:
        """
        The append transaction, on the writer connection. Holds ``_writer_lock``.

        When this store's last transaction found the head where it had left it (no
        other replica appended in between), the batch is sealed after that head and
        sent as one statement that commits on its own (one round trip): it writes
        only if the head is still exactly that one, under the head's lock. Otherwise,
        or when it wrote nothing, the batch goes the locked way, in two round trips:
        BEGIN with the head's lock (and which of ``closing`` may be closed), sealing
        after the head read, then every row, the new head and COMMIT.

        A connection kept from an earlier batch that turns out broken at BEGIN (the
        server restarted since) is replaced and the transaction begun once more:
        nothing of it had been sent for commit. A failure from the statement that
        commits on is never retried: its commit may have landed.
        """
        conn, fresh = self._writer_connection()
        known, self._known = self._known, None
        if known is not None and self._speculate and not closing:
            plan = self._plan(batch, known, set())
            try:
                written = _wrote(self._send_batch(conn, plan))
            except BaseException:
                self._drop_writer()
                raise
            if written:
                self._known = plan.new_head()
                return plan
        try:
            head, closable = self._begin(conn, closing)
        except Exception as exc:
            broken = conn.broken or conn.closed
            self._drop_writer()
            if fresh or not broken:
                raise
            log.info("audit_writer_reconnecting", url=self._url.url, error=describe(exc))
            conn, _ = self._writer_connection()
            try:
                head, closable = self._begin(conn, closing)
            except BaseException:
                self._drop_writer()
                raise
        except BaseException:
            self._drop_writer()
            raise
        self._speculate = known is not None and head.row() == known.row()
        try:
            plan = self._plan(batch, head, closable)
            self._commit_locked(conn, plan)
        except BaseException:
            # The server rolls back whatever the dropped connection left open.
            self._drop_writer()
            raise
        self._known = plan.new_head()
        return plan

    def _commit_locked(self, conn: Connection, plan: _Plan) -> None:
        """
        In the transaction holding the head's lock: send ``plan`` and COMMIT at once
        (one round trip); return once the server answered that it committed.

        Raises:
            AuditUnavailable: The server did not commit it.
        """
        with conn.pipeline():
            sent = self._send_batch(conn, plan)
            committed = conn.execute("COMMIT", prepare=False)
        # A COMMIT of a transaction that failed answers ROLLBACK, not an error.
        if not _wrote(sent) or committed.statusmessage != "COMMIT":
            raise AuditUnavailable(
                f"audit append at {self._url.url} was not committed "
                f"({committed.statusmessage or 'no answer'})"
            )

    def _begin(self, conn: Connection, closing: list[int]) -> tuple[_Head, set[int]]:
        """
        BEGIN, lock ``log_head`` and read it (one round trip); with it, which of the
        calls ``closing`` are still pending with their writer gone (one more, only
        when closing out calls).
        """
        cursor = conn.execute(_BEGIN_AND_LOCK_HEAD, prepare=False)
        cursor.nextset()
        head = _Head(cursor.fetchone())
        closable = set()
        if closing:
            rows = conn.execute(_CLOSABLE, (closing, self._writer_id)).fetchall()
            closable = {int(str(row[0])) for row in rows}
        return head, closable

    def _send_batch(self, conn: Connection, plan: _Plan) -> Cursor:
        """
        Send ``_WRITE_BATCH`` for ``plan``; ``_wrote`` reads its answer. On its own
        (not in a pipeline) the statement is its own transaction, committed once its
        answer is read.
        """
        checkpoint_ts = "" if plan.checkpoint is None else format_ts(self._clock())
        return conn.execute(_WRITE_BATCH, plan.write_params(self._writer_id, checkpoint_ts))

    def _writer_connection(self) -> tuple[Connection, bool]:
        """
        The connection append transactions run on, and whether it is new: only the
        group commit's leader uses it, one batch at a time (under ``_writer_lock``).
        Made on first use and after a failure, with this session's limits set once.
        """
        self._require_open()
        conn = self._writer
        if conn is not None and not conn.closed and not _has_input(conn):
            return conn, False
        self._drop_writer()
        conn = connect(
            self._url, application_name=_APPLICATION_NAME, autocommit=True,
            connect_timeout=_CONNECT_SECONDS,
        )
        # Every integer goes out as a bigint, so the prepared statement's types hold.
        from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper  # noqa: PLC0415

        conn.adapters.register_dumper(int, Int8BinaryDumper)
        conn.adapters.register_dumper(int, Int8Dumper)
        _register_arrays(conn)
        try:
            conn.execute(
                _SESSION_LIMITS, (f"{_LOCK_WAIT_SECONDS}s", f"{_IDLE_IN_TRANSACTION_SECONDS}s")
            )
        except BaseException:
            conn.close()
            raise
        self._writer = conn
        return conn, True

    def _drop_writer(self) -> None:
        """Close the writer connection (the server rolls back its open transaction)."""
        conn, self._writer = self._writer, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _plan(self, batch: list[AppendRequest], head: _Head, closable: set[int]) -> _Plan:
        """
        Seal ``batch``'s records after ``head`` and work out every row they write;
        writes nothing. A conditional request whose call is not in ``closable`` is
        skipped; a request whose record alone is malformed fails alone.
        """
        plan = _Plan(head)
        for request in batch:
            if request.only_if_pending and request.completes not in closable:
                continue  # closed out already, or its writer came back
            record = self._seal(request, plan.seq, plan.prev, plan.ts)
            if record is None:
                continue
            frontier, rows = extend_frontier(plan.frontier, plan.seq, record.record_bytes)
            plan.written.append((request, record))
            plan.proofs.append((record.seq, record.record_hash, rows[0][2], plan.frontier[::-1]))
            plan.records.append(_record_row(record))
            plan.nodes.extend(rows)
            if request.authorizes is not None:
                plan.added[record.seq] = request.authorizes
            elif request.completes is not None:
                if plan.added.pop(request.completes, None) is None:
                    plan.removed.append(request.completes)
                closable.discard(request.completes)
            plan.seq, plan.prev, plan.ts, plan.frontier = (
                record.seq, record.record_hash, record.ts, frontier
            )
        plan.checkpoint = self._checkpoint_if_due(plan.seq, head.checkpointed, plan.frontier)
        return plan

    def _lock_head(self, conn: Connection) -> _Head:
        """
        In a transaction on a pooled connection: lock ``log_head`` (waiting for any
        other replica's append) and read it, with this transaction's limits. One round
        trip.
        """
        with conn.pipeline():
            conn.execute(_LIMITS, (f"{_LOCK_WAIT_SECONDS}s", f"{_IDLE_IN_TRANSACTION_SECONDS}s"))
            head_rows = conn.execute(_LOCK_HEAD)
        return _Head(head_rows.fetchone())

    def _seal(
        self, request: AppendRequest, seq: int, prev: Sha256Hex, head_ts: str | None
    ) -> AuditRecord | None:
        """The record after ``seq``, its ts held at the head's; None if it alone is malformed."""
        ts = held_at_head(request.ts, head_ts)
        try:
            return seal(
                seq=seq + 1, ts=ts, kind=request.kind, prev=prev,
                body_json=request.body_json, signer=self._signer,
            )
        except ValueError as exc:
            # This record alone is malformed (too large): it fails, the batch goes on.
            request.error = AuditUnavailable(f"audit append at {self._url.url} failed ({exc})")
            return None

    def _checkpoint_if_due(
        self, size: int, last: int, frontier: tuple[bytes, ...]
    ) -> Checkpoint | None:
        grown = size - last
        if grown <= 0:
            return None
        elapsed = time.monotonic() - self._last_checkpoint_at
        if grown < self._checkpoint_every and not (
            self._checkpoint_seconds > 0 and elapsed >= self._checkpoint_seconds
        ):
            return None
        return sign_checkpoint(
            self._origin, size, frontier_root(frontier), signer=self._signer,
            key_hash=self._key_hash,
        )

    def checkpoint(self, *, only_if_grown: bool = False) -> Checkpoint | None:
        """
        Sign and store a checkpoint of the whole fleet log now, with this replica's
        key, and offer it to the witnesses.

        Args:
            only_if_grown: Write nothing (return None) if the latest checkpoint
                already covers every record.

        Returns:
            The checkpoint written, or the latest one when nothing grew (None if the
            log is empty or ``only_if_grown`` found nothing new).

        Raises:
            AuditUnavailable: The checkpoint could not be written.
        """
        with self._errors("checkpoint"), self._connection() as conn, conn.transaction():
            head = self._lock_head(conn)
            if head.seq == 0 or head.checkpointed > head.seq:
                return None
            root = frontier_root(head.frontier)
            if head.checkpointed == head.seq:
                if only_if_grown:
                    return None
                row = conn.execute(
                    "SELECT note FROM checkpoints WHERE size = %s", (head.seq,)
                ).fetchone()
                if row is None or not isinstance(row[0], str):
                    raise AuditUnavailable(
                        f"the fleet log's checkpoint of size {head.seq} is missing"
                    )
                return Checkpoint(self._origin, head.seq, root, row[0])
            checkpoint = sign_checkpoint(
                self._origin, head.seq, root, signer=self._signer, key_hash=self._key_hash
            )
            with conn.pipeline():
                conn.execute(
                    _INSERT_CHECKPOINT, (head.seq, format_ts(self._clock()), checkpoint.note)
                )
                conn.execute("UPDATE log_head SET checkpointed = %s", (head.seq,))
        self._last_checkpoint_at = time.monotonic()
        log.info("audit_checkpoint_written", size=checkpoint.size)
        publish_to_all(self._witnesses, self._origin, checkpoint.note)
        return checkpoint

    def receipt_for(self, record: AuditRecord) -> Receipt:
        """
        The receipt of ``record`` with its inclusion proof under a checkpoint of the
        tree at its own seq, signed now by this replica. ``callward.core.ReceiptIssuer``.

        For one of the newest records this store wrote, the proof is the one it kept
        when it appended the record; any other (another replica's, an older one) is
        read from ``merkle_nodes`` and checked against the stored root before it is
        returned, so a damaged tree fails here rather than in a reviewer's hands.

        Raises:
            AuditUnavailable: The tree cannot be read or disagrees with the record.
        """
        self._require_open()
        size = record.seq
        leaf = leaf_hash(record.record_bytes)
        with self._lock:
            cached = self._proofs.get(size)
        stored_root = None
        if cached is not None and cached[0] == record.record_hash and cached[1] == leaf:
            path = cached[2]
        else:
            with self._errors("receipt"), self._connection() as conn:
                path, stored_root = _read_proof(conn, size)
        try:
            root = root_from_inclusion_proof(record.seq - 1, size, leaf, path)
        except VerificationFailed as exc:
            raise AuditUnavailable(
                f"the Merkle tree at {self._url.url} is damaged near record {record.seq}"
            ) from exc
        if stored_root is not None and root != stored_root:
            raise AuditUnavailable(
                f"the Merkle tree at {self._url.url} does not hold record {record.seq}"
            )
        checkpoint = sign_checkpoint(
            self._origin, size, root, signer=self._signer, key_hash=self._key_hash
        )
        return Receipt(
            seq=record.seq,
            record_hash=record.record_hash,
            key_id=record.key_id,
            proof=ReceiptProof(
                leaf_hash=Sha256Hex(leaf.hex()),
                tree_size=size,
                inclusion_proof=tuple(Sha256Hex(node.hex()) for node in path),
                checkpoint=checkpoint.note,
            ),
        )

    def recover_interrupted(self) -> list[AuditRecord]:
        """
        Close out the calls authorized by writers that are gone: each gets a
        ``call.interrupted`` record naming its ``call.authorized`` seq.

        A writer is gone when it closed, or when its heartbeat is older than its
        lease by the database's clock; calls of live writers are left alone. Safe to
        run from every replica at once: each call is closed out exactly once.

        Returns:
            The records this store wrote (another replica may have closed the rest).

        Raises:
            AuditUnavailable: The pending calls could not be read or closed out.
        """
        with self._errors("read"), self._connection() as conn:
            rows = conn.execute(_PENDING_OF_GONE, (self._writer_id,)).fetchall()
        written = []
        for authorized_seq, call_id, _writer in rows:
            body = interrupted_body(str(call_id), int(str(authorized_seq)))
            request = self._request(CALL_INTERRUPTED, body, self._clock(), only_if_pending=True)
            record = self._commit(request)
            if record is not None:
                written.append(record)
        if written:
            log.warning("audit_calls_interrupted", count=len(written))
        return written

    def last(self) -> AuditRecord | None:
        """
        The newest record of the fleet log (from any replica), or None if it is empty.

        Raises:
            AuditUnavailable: The store cannot be read.
        """
        records = self._fetch(f"{SELECT_RECORDS} ORDER BY seq DESC LIMIT 1", ())
        return records[0] if records else None

    def get(self, seq: int) -> AuditRecord | None:
        """
        The record at ``seq``, or None if there is none.

        Raises:
            AuditUnavailable: The store cannot be read.
        """
        records = self._fetch(f"{SELECT_RECORDS} WHERE seq = %s", (seq,))
        return records[0] if records else None

    def records(self, start: int = 1) -> Iterator[AuditRecord]:
        """
        The records from ``start`` on, in seq order, read a page at a time.

        Raises:
            AuditUnavailable: The store cannot be read.
        """
        after = start - 1
        while True:
            page = self._fetch(
                f"{SELECT_RECORDS} WHERE seq > %s ORDER BY seq LIMIT {_PAGE_ROWS}", (after,)
            )
            yield from page
            if len(page) < _PAGE_ROWS:
                return
            after = page[-1].seq

    def count(self) -> int:
        """
        The number of records in the fleet log.

        Raises:
            AuditUnavailable: The store cannot be read.
        """
        with self._errors("read"), self._connection() as conn:
            row = conn.execute("SELECT count(*) FROM records").fetchone()
        return 0 if row is None else int(str(row[0]))

    def _fetch(self, sql: str, params: tuple[int, ...]) -> list[AuditRecord]:
        with self._errors("read"), self._connection() as conn:
            # A row that is not a record (the table was edited) fails as a read.
            return [row_to_record(row) for row in conn.execute(sql, params).fetchall()]

    def _keep_lease(self) -> None:
        """
        The heartbeat thread: renew the lease, close out gone writers' calls every
        few heartbeats, write the timed checkpoint. Logs failures, never raises.
        """
        beats = 0
        while not self._stop.wait(self._heartbeat_seconds):
            beats += 1
            try:
                self._beat()
                if beats % _RECOVER_EVERY_HEARTBEATS == 0:
                    self.recover_interrupted()
                elapsed = time.monotonic() - self._last_checkpoint_at
                if self._checkpoint_seconds > 0 and elapsed >= self._checkpoint_seconds:
                    self._last_checkpoint_at = time.monotonic()
                    self.checkpoint(only_if_grown=True)
            except AuditUnavailable as exc:
                log.warning("audit_lease_work_failed", url=self._url.url, error=str(exc))
            except Exception:  # the thread's boundary: a dead heartbeat would lose the lease
                log.exception("audit_lease_thread_error", url=self._url.url)

    def _beat(self) -> None:
        with self._errors("heartbeat"), self._connection() as conn:
            renewed = conn.execute(_HEARTBEAT, (self._writer_id,)).rowcount
        if renewed != 1:
            log.warning("audit_writer_lease_lost", writer=self._writer_id)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Connection]:
        """A connection from the pool, returned (or dropped, if broken) after the block."""
        with self._require_open().connection() as conn:
            yield conn

    def _require_open(self) -> Pool:
        connections = self._pool
        if connections is None:
            raise AuditUnavailable(
                f"the audit store at {self._url.url} is not open",
                remediation="open the store (PostgresAuditStore.open or `with`) before use",
            )
        return connections

    @contextlib.contextmanager
    def _errors(self, operation: str, *, kind: str = "") -> Iterator[None]:
        """The one place server, pool, signer and encoding failures become ``AuditUnavailable``."""
        try:
            with store_errors(AuditUnavailable, f"audit {operation}", url=self._url):
                yield
        except AuditUnavailable as exc:
            cause = exc.__cause__
            log.warning("audit_store_failed", operation=operation, url=self._url.url, kind=kind,
                        error=describe(cause) if cause is not None else type(exc).__name__)
            raise
        except (ValueError, MissingNode) as exc:
            log.warning("audit_store_failed", operation=operation, url=self._url.url, kind=kind,
                        error=type(exc).__name__)
            raise AuditUnavailable(
                f"audit {operation} at {self._url.url} failed ({type(exc).__name__})"
            ) from exc


def _record_row(record: AuditRecord) -> tuple[object, ...]:
    """The ``records`` row of ``record`` (its body as the UTF-8 text it is)."""
    return (
        record.seq, record.ts, record.kind, record.prev, record.key_id, record.body_json,
        record.record_bytes, record.record_hash, record.signature,
    )


def _read_proof(conn: Connection, size: int) -> tuple[tuple[bytes, ...], bytes]:
    """
    The inclusion proof of record ``size`` in the tree of ``size`` records, and that
    tree's root, from ``merkle_nodes`` in one query: a first pass with placeholder
    hashes learns which perfect subtrees the proof needs (which does not depend on
    their hashes), then they are read at once and the proof is computed.

    Raises:
        MissingNode: A subtree the records should have completed has no row.
    """

    def compute(perfect: Callable[[int, int], bytes]) -> tuple[tuple[bytes, ...], bytes]:
        subtree = subtree_from_perfect(perfect)
        return inclusion_proof(size - 1, size, subtree), subtree(0, size)

    wanted: set[tuple[int, int]] = set()

    def probe(level: int, index: int) -> bytes:
        wanted.add((level, index))
        return bytes(HASH_BYTES)

    compute(probe)
    levels = [level for level, _ in wanted]
    indexes = [index for _, index in wanted]
    nodes = {
        (int(str(level)), int(str(index))): value
        for level, index, value in conn.execute(_GET_NODES, (levels, indexes)).fetchall()
        if isinstance(value, bytes)
    }

    def lookup(level: int, index: int) -> bytes:
        found = nodes.get((level, index))
        if found is None or len(found) != HASH_BYTES:
            raise MissingNode(f"the Merkle node at level {level}, index {index} is missing")
        return found

    return compute(lookup)


def _has_input(conn: Connection) -> bool:
    """
    Whether an idle connection has something to read: never, unless the server
    ended it (it said why, or closed the socket), so it is dropped before use.
    """
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _wrote(cursor: Cursor) -> bool:
    """Whether ``_WRITE_BATCH`` wrote: it set the head, which was the one expected."""
    row = cursor.fetchone()
    return row is not None and row[0] == 1


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> tuple[list[object], ...]:
    """``rows`` as ``width`` lists, one per column: the arrays an ``unnest`` takes."""
    if not rows:
        return tuple([] for _ in range(width))
    return tuple(list(column) for column in zip(*rows, strict=True))


if TYPE_CHECKING:
    from callward.core.protocols import AuditLog, ReceiptIssuer

    def _is_an_audit_log(store: PostgresAuditStore) -> AuditLog:
        """mypy proves the store satisfies the protocol the gateway is handed."""
        return store

    def _is_a_receipt_issuer(store: PostgresAuditStore) -> ReceiptIssuer:
        return store


__all__ = ["PostgresAuditStore"]
