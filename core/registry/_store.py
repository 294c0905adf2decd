"""
The live tool registry's state: an SQLite file under the home (``registry.db``).

It holds every version loaded at run time (the digest preimage, i.e. exactly
what runs, and the text of the file it came from), the active version of each
name, and the history of activations (what rollback walks back through).

Invariants:

- A stored version is immutable: ``name@version`` names one digest for as long
  as it is stored. Reading a version recomputes its digest; a snapshot whose
  digest differs from the one it was stored with fails the whole read.
- Every change bumps ``generation`` in the same transaction, so a reader
  (a running gateway) notices it with one small query and never sees half a
  change.
- A configuration version (only model tools, see ``LiveRegistry.unload``) is never
  stored as a snapshot: unloading it stores a *withdrawn* marker (name, version,
  digest) and reinstating it deletes the marker.
- Changes are made inside ``change()``: the caller writes the audit record
  inside the transaction, so a change whose record could not be written is
  rolled back, and a reader never sees an unaudited change.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

import structlog

from callward.core._canonical import canonical_bytes
from callward.core.errors import ConfigurationError
from callward.core.registry._registry import LiveState, LiveVersion
from callward.core.registry._spec import spec_from_preimage, spec_preimage
from callward.core.types import ToolSpec

log = structlog.get_logger()

REGISTRY_DB: Final = "registry.db"
_BUSY_MS: Final = 10_000
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0), ('schema', 1);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    digest TEXT NOT NULL,
    preimage BLOB NOT NULL,
    source_path TEXT NOT NULL,
    file_text TEXT NOT NULL,
    file_sha256 TEXT NOT NULL,
    loaded_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS active (name TEXT PRIMARY KEY, version TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS withdrawn (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    digest TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (name, version, digest)
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version TEXT,
    previous TEXT,
    action TEXT NOT NULL,
    at TEXT NOT NULL
);
"""

Action = Literal["activated", "rolled_back", "unloaded"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One change of a name's active version: to ``version`` from ``previous``."""

    seq: int
    name: str
    version: str | None
    previous: str | None
    action: Action
    at: str


class RegistryStore:
    """
    The registry database. Satisfies ``LiveSource``; one connection, safe across threads.

    The constructor does no I/O; ``open()`` creates the file and its tables.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._specs: dict[tuple[str, str, str], ToolSpec] = {}

    @property
    def path(self) -> Path:
        return self._path

    def open(self) -> None:
        """
        Raises:
            ConfigurationError: The database cannot be opened or is not a registry.
        """
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False,
                                   timeout=_BUSY_MS / 1000)
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ConfigurationError(
                f"registry database {self._path} cannot be opened ({type(exc).__name__})",
                remediation="check the file under the home; move it aside to start empty",
            ) from exc
        self._conn = conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> RegistryStore:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ConfigurationError("the registry database is not open",
                                     remediation="open the store before use")
        return self._conn

    # -- reading (LiveSource) -------------------------------------------------

    def generation(self) -> int:
        """
        Raises:
            ConfigurationError: The database cannot be read.
        """
        with self._lock, _mapped("read"):
            row = self._require().execute(
                "SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0])

    def state(self) -> LiveState:
        """
        Every stored version (digests checked) and every active choice, read at once.

        A version is immutable, so its spec is rebuilt and its digest checked once
        per process; later reads fetch only name, version and digest for it.

        Raises:
            ConfigurationError: The database cannot be read or a snapshot fails its digest.
        """
        with self._lock, _mapped("read"):
            conn = self._require()
            # One read transaction, unless inside change(), which already holds one.
            outer = not conn.in_transaction
            if outer:
                conn.execute("BEGIN")
            try:
                rows = conn.execute(
                    "SELECT name, version, digest, source_path, loaded_at FROM versions "
                    "ORDER BY name, version").fetchall()
                versions = tuple(LiveVersion(self._spec(conn, name, version, digest), path, at)
                                 for name, version, digest, path, at in rows)
                active = dict(conn.execute("SELECT name, version FROM active").fetchall())
                withdrawn = frozenset(
                    (str(name), str(version), str(digest)) for name, version, digest in
                    conn.execute("SELECT name, version, digest FROM withdrawn").fetchall())
            finally:
                if outer:
                    conn.execute("COMMIT")
        return LiveState(versions, active, withdrawn)

    def _spec(self, conn: sqlite3.Connection, name: str, version: str, digest: str) -> ToolSpec:
        key = (name, version, digest)
        spec = self._specs.get(key)
        if spec is None:
            (preimage,) = conn.execute(
                "SELECT preimage FROM versions WHERE name = ? AND version = ?",
                (name, version)).fetchone()
            if not isinstance(preimage, bytes):
                raise ConfigurationError(
                    "a stored tool snapshot is not a snapshot (not a blob)",
                    remediation="the registry database was changed outside callward; "
                                "load the tool again")
            spec = spec_from_preimage(preimage, digest)
            if (spec.name, spec.version) != (name, version):
                raise ConfigurationError(f"the stored snapshot of {name}@{version} names "
                                         f"another tool ({spec.ref})")
            self._specs[key] = spec
        return spec

    def file_text(self, ref_name: str, version: str) -> str | None:
        """The text of the file a stored version was loaded from, as it was read."""
        with self._lock, _mapped("read"):
            row = self._require().execute(
                "SELECT file_text FROM versions WHERE name = ? AND version = ?",
                (ref_name, version)).fetchone()
        return None if row is None else str(row[0])

    def history(self, name: str) -> tuple[HistoryEntry, ...]:
        """The changes of a name's active version, oldest first."""
        with self._lock, _mapped("read"):
            rows = self._require().execute(
                "SELECT seq, name, version, previous, action, at FROM history "
                "WHERE name = ? ORDER BY seq", (name,)).fetchall()
        return tuple(HistoryEntry(*row) for row in rows)

    # -- changing -------------------------------------------------------------

    @contextlib.contextmanager
    def change(self) -> Iterator[RegistryChange]:
        """
        One transaction: every write through the yielded object, then the generation
        bump and the commit. An exception inside rolls all of it back.

        Raises:
            ConfigurationError: The database cannot be written.
        """
        with self._lock, _mapped("write"):
            conn = self._require()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield RegistryChange(conn)
                conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise


class RegistryChange:
    """The writes of one ``RegistryStore.change()`` transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def stored_digest(self, name: str, version: str) -> str | None:
        row = self._conn.execute("SELECT digest FROM versions WHERE name = ? AND version = ?",
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
            "INSERT INTO versions (name, version, digest, preimage, source_path, file_text, "
            "file_sha256, loaded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (spec.name, spec.version, spec.digest, canonical_bytes(spec_preimage(spec)),
             source_path, file_text, file_sha256, _now()))

    def delete_version(self, name: str, version: str) -> None:
        self._conn.execute("DELETE FROM versions WHERE name = ? AND version = ?",
                           (name, version))

    def withdraw(self, spec: ToolSpec) -> None:
        """Take a configuration version out of service, and record it in the history."""
        self._conn.execute(
            "INSERT OR IGNORE INTO withdrawn (name, version, digest, at) VALUES (?, ?, ?, ?)",
            (spec.name, spec.version, spec.digest, _now()))
        self._history(spec.name, None, spec.version, "unloaded")

    def reinstate(self, spec: ToolSpec) -> None:
        """Put a withdrawn configuration version back in service, and record it."""
        self._conn.execute("DELETE FROM withdrawn WHERE name = ? AND version = ? AND digest = ?",
                           (spec.name, spec.version, spec.digest))
        self._history(spec.name, spec.version, None, "activated")

    def _history(self, name: str, version: str | None, previous: str | None,
                 action: Action) -> None:
        self._conn.execute(
            "INSERT INTO history (name, version, previous, action, at) VALUES (?, ?, ?, ?, ?)",
            (name, version, previous, action, _now()))

    def set_active(self, name: str, version: str | None, *, previous: str | None,
                   action: Action) -> None:
        """Make ``version`` the active one (None: the configuration's), and record it."""
        if version is None:
            self._conn.execute("DELETE FROM active WHERE name = ?", (name,))
        else:
            self._conn.execute(
                "INSERT INTO active (name, version) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET version = excluded.version", (name, version))
        self._history(name, version, previous, action)


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise ConfigurationError(
            f"the registry database cannot be {'read' if what == 'read' else 'written'} "
            f"({type(exc).__name__})",
            remediation="check the registry database under the home",
        ) from exc
