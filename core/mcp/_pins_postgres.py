"""
The operator's approvals of upstream tools, shared by a fleet: ``PinStore``'s twin in
the fleet's PostgreSQL.

An upstream tool pinned or re-approved on one replica is pinned on every replica: each
``get`` reads the database, so the next check anywhere sees the new digest.

Invariants:

- A pin is one upsert in one transaction: a reader sees the old digest or the new one.
- A read is one statement on an autocommit connection (one round trip), run once more
  on another connection when its own turned out broken; a pin never runs twice.
- The database unreachable is a ``ConfigurationError``, as an unreadable pin file is;
  the upstream then stays blocked (fail closed) until the server is back, and the
  pool's fresh connections serve again without a restart.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Final

from callward.core._postgres import (
    StoreUrl,
    migrated_pool,
    retry_once_on_broken_connection,
    store_errors,
)
from callward.core.errors import ConfigurationError

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

    Connection = psycopg.Connection[tuple[object, ...]]

COMPONENT: Final = "mcp_pins"
_APPLICATION: Final = "callward-mcp-pins"
#: The schema, one step per version (``callward.core._postgres.migrate``).
STEPS: Final = (
    """
    CREATE TABLE mcp_pins (
        server TEXT NOT NULL,
        tool TEXT NOT NULL,
        digest TEXT NOT NULL,
        pinned_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (server, tool)
    );
    """,
)


class PostgresPinStore:
    """
    The fleet's approvals, ``{server: {tool: digest}}``, in the table ``mcp_pins``.
    Satisfies ``Pins``, as ``PinStore`` does; safe across threads.

    The constructor does no I/O; the first use (or ``open()``) migrates the table.

    Args:
        url: The fleet's PostgreSQL.
        timeout: How long a read or a pin waits for a connection before it fails.
    """

    def __init__(self, url: StoreUrl, *, timeout: float = 5.0) -> None:
        self.url = url
        self._timeout = timeout
        self._pool: psycopg_pool.ConnectionPool[Connection] | None = None
        self._open_lock = threading.Lock()

    def open(self) -> None:
        """
        Raises:
            ConfigurationError: The database cannot be reached, or its pin table is
                newer than this callward.
        """
        self._connections()

    def close(self) -> None:
        with self._open_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def __enter__(self) -> PostgresPinStore:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connections(self) -> psycopg_pool.ConnectionPool[Connection]:
        with self._open_lock:
            if self._pool is None:
                self._pool = migrated_pool(
                    self.url, component=COMPONENT, steps=STEPS, error=ConfigurationError,
                    what="the pin table cannot be opened", application_name=_APPLICATION,
                    timeout=self._timeout, autocommit=True)
            return self._pool

    def load(self) -> dict[str, dict[str, str]]:
        """
        Raises:
            ConfigurationError: The pins cannot be read.
        """
        connections = self._connections()
        with store_errors(ConfigurationError, "the pin table cannot be read", url=self.url):
            rows = retry_once_on_broken_connection(connections, lambda conn: conn.execute(
                "SELECT server, tool, digest FROM mcp_pins ORDER BY server, tool").fetchall())
        pins: dict[str, dict[str, str]] = {}
        for server, tool, digest in rows:
            pins.setdefault(str(server), {})[str(tool)] = str(digest)
        return pins

    def get(self, server: str, tool: str) -> str | None:
        """
        Raises:
            ConfigurationError: The pins cannot be read.
        """
        connections = self._connections()
        with store_errors(ConfigurationError, "the pin table cannot be read", url=self.url):
            row = retry_once_on_broken_connection(connections, lambda conn: conn.execute(
                "SELECT digest FROM mcp_pins WHERE server = %s AND tool = %s", (server, tool)
            ).fetchone())
        return None if row is None else str(row[0])

    def pin(self, server: str, tool: str, digest: str) -> None:
        """
        Approve ``digest`` for ``server``'s ``tool`` on every replica (one upsert).

        Raises:
            ConfigurationError: The pin cannot be written; nothing changed.
        """
        connections = self._connections()
        with store_errors(ConfigurationError, "the pin table cannot be written",
                          url=self.url), connections.connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO mcp_pins (server, tool, digest) VALUES (%s, %s, %s) "
                "ON CONFLICT (server, tool) DO UPDATE SET digest = EXCLUDED.digest, "
                "pinned_at = now()", (server, tool, digest))


__all__ = ["COMPONENT", "STEPS", "PostgresPinStore"]
