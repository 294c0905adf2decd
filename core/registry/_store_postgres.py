"""
The live tool registry of a fleet: ``RegistryStore``'s twin in the fleet's PostgreSQL.

Every replica attaches its registry to the same tables, so ``callward tools load`` on
one replica is in force on all of them before their next call: a gateway reads the
generation (one small query) before each call and re-reads the state when it moved.

Invariants (those of ``RegistryStore``, across processes and hosts):

- Every change bumps the generation in the same transaction as its writes, so a
  replica never sees half a change, and sees the whole change on its next read.
- Changers are serialized: a change first locks the generation row
  (``SELECT ... FOR UPDATE``), so two replicas changing at once change one after the
  other, the second seeing the first's writes; no change is lost.
- A stored version is immutable and its digest is checked when it is first read.
- The state is read in one ``REPEATABLE READ`` snapshot: never half of a change.
- Inside ``change()``, reads on the same thread go through the change's own
  transaction (as the SQLite store's one connection does), so the caller sees what
  it wrote and what others committed before it took the lock.
- Reads outside a change run on autocommit connections (``generation`` is one
  statement, one round trip), once more on another connection when theirs turned out
  broken; a change is never run twice.
- The database unreachable is a ``ConfigurationError``, as an unreadable
  ``registry.db`` is: the registry then resolves every name to nothing (fail
  closed), and the pool's fresh connections serve again once the server is back.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, TypeVar

from callward.core._canonical import canonical_bytes
from callward.core._postgres import (
    StoreUrl,
    migrated_pool,
    retry_once_on_broken_connection,
    store_errors,
)
from callward.core.errors import ConfigurationError
from callward.core.registry._registry import LiveState, LiveVersion
from callward.core.registry._spec import spec_from_preimage, spec_preimage
from callward.core.registry._store import Action, HistoryEntry
from callward.core.types import ToolSpec

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

    Connection = psycopg.Connection[tuple[object, ...]]

T = TypeVar("T")

COMPONENT: Final = "registry"
_APPLICATION: Final = "callward-registry"
_READ: Final = "the registry database cannot be read"
_WRITE: Final = "the registry database cannot be written"
_ACTIONS: Final[dict[str, Action]] = {
    "activated": "activated", "rolled_back": "rolled_back", "unloaded": "unloaded"}
#: The schema, one step per version (``callward.core._postgres.migrate``).
STEPS: Final = (
    """
    CREATE TABLE registry_generation (
        id SMALLINT PRIMARY KEY CHECK (id = 1),
        value BIGINT NOT NULL
    );
    INSERT INTO registry_generation (id, value) VALUES (1, 0);
    CREATE TABLE registry_versions (
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        digest TEXT NOT NULL,
        preimage BYTEA NOT NULL,
        source_path TEXT NOT NULL,
        file_text TEXT NOT NULL,
        file_sha256 TEXT NOT NULL,
        loaded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (name, version)
    );
    CREATE TABLE registry_active (name TEXT PRIMARY KEY, version TEXT NOT NULL);
    CREATE TABLE registry_withdrawn (
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        digest TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (name, version, digest)
    );
    CREATE TABLE registry_history (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL,
        version TEXT,
        previous TEXT,
        action TEXT NOT NULL CHECK (action IN ('activated', 'rolled_back', 'unloaded')),
        at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX registry_history_by_name ON registry_history (name, seq);
    """,
)


def _text(value: object) -> str:
    """A timestamp as the SQLite store writes it (UTC, ISO 8601, milliseconds)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="milliseconds")
    return str(value)


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise ConfigurationError("the registry's generation is not a number",
                                 remediation="the registry tables were changed outside callward")
    return value


def _optional(value: object) -> str | None:
    return None if value is None else str(value)


class PostgresRegistryStore:
    """
    The fleet's registry tables. Satisfies ``LiveSource`` and ``LiveStore``, as
    ``RegistryStore`` does; safe across threads (a self-healing pool of connections).

    The constructor does no I/O; ``open()`` migrates the tables (component
    ``registry``), safely when replicas start at once.

    Args:
        url: The fleet's PostgreSQL.
        timeout: How long a read or a change waits for a connection before it fails
            (closed: the registry then resolves nothing until the server is back).
    """

    def __init__(self, url: StoreUrl, *, timeout: float = 5.0) -> None:
        self._url = url
        self._timeout = timeout
        self._pool: psycopg_pool.ConnectionPool[Connection] | None = None
        self._open_lock = threading.Lock()
        # The connection of this thread's change(), if one is under way.
        self._held = threading.local()
        self._specs: dict[tuple[str, str, str], ToolSpec] = {}

    @property
    def url(self) -> StoreUrl:
        return self._url

    def open(self) -> None:
        """
        Raises:
            ConfigurationError: The database cannot be reached, or its registry tables
                are newer than this callward.
        """
        with self._open_lock:
            if self._pool is None:
                self._pool = migrated_pool(
                    self._url, component=COMPONENT, steps=STEPS, error=ConfigurationError,
                    what="the registry database cannot be opened",
                    application_name=_APPLICATION, timeout=self._timeout, autocommit=True)

    def close(self) -> None:
        with self._open_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def __enter__(self) -> PostgresRegistryStore:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _require(self) -> psycopg_pool.ConnectionPool[Connection]:
        if self._pool is None:
            raise ConfigurationError("the registry database is not open",
                                     remediation="open the store before use")
        return self._pool

    def _read(self, work: Callable[[Connection], T]) -> T:
        """
        ``work`` on this thread's change's connection, else on one from the pool (run once
        more on another if that one turned out broken); errors mapped.
        """
        held: Connection | None = getattr(self._held, "conn", None)
        if held is not None:
            return work(held)
        connections = self._require()
        with store_errors(ConfigurationError, _READ, url=self._url):
            return retry_once_on_broken_connection(connections, work)

    # -- reading (LiveSource) -------------------------------------------------

    def generation(self) -> int:
        """
        One small query, read from the database on every call (never cached), so a
        change committed by any replica is seen by the next call here.

        Raises:
            ConfigurationError: The database cannot be read.
        """
        row = self._read(lambda conn: conn.execute(
            "SELECT value FROM registry_generation WHERE id = 1").fetchone())
        if row is None:
            raise ConfigurationError("the registry's generation row is missing",
                                     remediation="the registry tables were changed outside "
                                                 "callward; restore them from a backup")
        return _int(row[0])

    def state(self) -> LiveState:
        """
        Every stored version (digests checked) and every active choice, in one snapshot.

        Raises:
            ConfigurationError: The database cannot be read or a snapshot fails its digest.
        """
        in_change = getattr(self._held, "conn", None) is not None

        def read(conn: Connection) -> LiveState:
            with contextlib.ExitStack() as snapshot:
                if not in_change:  # else the change's transaction
                    snapshot.enter_context(conn.transaction())
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                rows = conn.execute(
                    "SELECT name, version, digest, source_path, loaded_at "
                    "FROM registry_versions ORDER BY name, version").fetchall()
                versions = tuple(
                    LiveVersion(self._spec(conn, str(name), str(version), str(digest)),
                                str(path), _text(at))
                    for name, version, digest, path, at in rows)
                active = {str(name): str(version) for name, version in conn.execute(
                    "SELECT name, version FROM registry_active").fetchall()}
                withdrawn = frozenset(
                    (str(name), str(version), str(digest)) for name, version, digest in
                    conn.execute("SELECT name, version, digest FROM registry_withdrawn"
                                 ).fetchall())
            return LiveState(versions, active, withdrawn)

        return self._read(read)

    def _spec(self, conn: Connection, name: str, version: str, digest: str) -> ToolSpec:
        key = (name, version, digest)
        spec = self._specs.get(key)
        if spec is None:
            row = conn.execute(
                "SELECT preimage FROM registry_versions WHERE name = %s AND version = %s",
                (name, version)).fetchone()
            preimage = None if row is None else row[0]
            if isinstance(preimage, memoryview):
                preimage = bytes(preimage)
            if not isinstance(preimage, bytes):
                raise ConfigurationError(
                    "a stored tool snapshot is not a snapshot (not bytes)",
                    remediation="the registry tables were changed outside callward; "
                                "load the tool again")
            spec = spec_from_preimage(preimage, digest)
            if (spec.name, spec.version) != (name, version):
                raise ConfigurationError(f"the stored snapshot of {name}@{version} names "
                                         f"another tool ({spec.ref})")
            self._specs[key] = spec
        return spec

    def file_text(self, ref_name: str, version: str) -> str | None:
        """The text of the file a stored version was loaded from, as it was read."""
        row = self._read(lambda conn: conn.execute(
            "SELECT file_text FROM registry_versions WHERE name = %s AND version = %s",
            (ref_name, version)).fetchone())
        return None if row is None else str(row[0])

    def history(self, name: str) -> tuple[HistoryEntry, ...]:
        """The changes of a name's active version, oldest first."""
        rows = self._read(lambda conn: conn.execute(
            "SELECT seq, name, version, previous, action, at FROM registry_history "
            "WHERE name = %s ORDER BY seq", (name,)).fetchall())
        entries: list[HistoryEntry] = []
        for seq, entry_name, version, previous, action, at in rows:
            known = _ACTIONS.get(str(action))
            if known is None:
                raise ConfigurationError(f"the registry history names an unknown action "
                                         f"for {name}")
            entries.append(HistoryEntry(_int(seq), str(entry_name), _optional(version),
                                        _optional(previous), known, _text(at)))
        return tuple(entries)

    # -- changing -------------------------------------------------------------

    @contextlib.contextmanager
    def change(self) -> Iterator[PostgresRegistryChange]:
        """
        One transaction: the generation row locked (changers wait for each other), every
        write through the yielded object, then the generation bump and the commit. An
        exception inside rolls all of it back.

        Raises:
            ConfigurationError: The database cannot be written.
            RuntimeError: A change is already under way on this thread.
        """
        if getattr(self._held, "conn", None) is not None:
            raise RuntimeError("a registry change is already under way on this thread")
        connections = self._require()
        with store_errors(ConfigurationError, _WRITE, url=self._url), \
                connections.connection() as conn, conn.transaction():
            conn.execute("SELECT value FROM registry_generation WHERE id = 1 FOR UPDATE")
            self._held.conn = conn
            try:
                yield PostgresRegistryChange(conn)
            finally:
                self._held.conn = None
            conn.execute("UPDATE registry_generation SET value = value + 1 WHERE id = 1")


class PostgresRegistryChange:
    """The writes of one ``PostgresRegistryStore.change()`` transaction."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def stored_digest(self, name: str, version: str) -> str | None:
        row = self._conn.execute(
            "SELECT digest FROM registry_versions WHERE name = %s AND version = %s",
            (name, version)).fetchone()
        return None if row is None else str(row[0])

    def put_version(self, spec: ToolSpec, *, source_path: str, file_text: str,
                    file_sha256: str) -> None:
        """Store a version; storing the same digest again is a no-op."""
        known = self.stored_digest(spec.name, spec.version)
        if known == spec.digest:
            return
        if known is not None:
            raise ConfigurationError(
                f"{spec.ref} is already loaded with another digest",
                remediation="a changed tool needs a new version number",
            )
        self._conn.execute(
            "INSERT INTO registry_versions (name, version, digest, preimage, source_path, "
            "file_text, file_sha256) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (spec.name, spec.version, spec.digest, canonical_bytes(spec_preimage(spec)),
             source_path, file_text, file_sha256))

    def delete_version(self, name: str, version: str) -> None:
        self._conn.execute("DELETE FROM registry_versions WHERE name = %s AND version = %s",
                           (name, version))

    def withdraw(self, spec: ToolSpec) -> None:
        """Take a configuration version out of service, and record it in the history."""
        self._conn.execute(
            "INSERT INTO registry_withdrawn (name, version, digest) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING", (spec.name, spec.version, spec.digest))
        self._history(spec.name, None, spec.version, "unloaded")

    def reinstate(self, spec: ToolSpec) -> None:
        """Put a withdrawn configuration version back in service, and record it."""
        self._conn.execute(
            "DELETE FROM registry_withdrawn WHERE name = %s AND version = %s AND digest = %s",
            (spec.name, spec.version, spec.digest))
        self._history(spec.name, spec.version, None, "activated")

    def _history(self, name: str, version: str | None, previous: str | None,
                 action: Action) -> None:
        self._conn.execute(
            "INSERT INTO registry_history (name, version, previous, action) "
            "VALUES (%s, %s, %s, %s)", (name, version, previous, action))

    def set_active(self, name: str, version: str | None, *, previous: str | None,
                   action: Action) -> None:
        """Make ``version`` the active one (None: the configuration's), and record it."""
        if version is None:
            self._conn.execute("DELETE FROM registry_active WHERE name = %s", (name,))
        else:
            self._conn.execute(
                "INSERT INTO registry_active (name, version) VALUES (%s, %s) "
                "ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version", (name, version))
        self._history(name, version, previous, action)


__all__ = ["COMPONENT", "STEPS", "PostgresRegistryChange", "PostgresRegistryStore"]
