"""
Open anomalies and first uses in a fleet's PostgreSQL: an anomaly one replica opens
gates the calls of every replica, and a resolution on one is seen by all.

Invariants:

- Fail closed: any failure of the database is raised as ``AnomalyStateUnavailable``,
  which the policy turns into a denial where a rule depends on open anomalies. The
  pool heals itself, so the same object serves again once the database is back.
- ``resolve`` is one conditional ``UPDATE``: of two replicas resolving one anomaly,
  exactly one gets it back; ``seen`` never moves ``last_seen`` backwards.
- Every read and write is one statement on an autocommit connection: one round
  trip, its own transaction. A read whose connection turned out broken runs once more
  on another; a write never runs twice.
- Times are the callers' (the replicas' clocks are assumed synchronised, e.g. NTP).
- psycopg is loaded on first use, never by importing ``callward.policies``.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final, TypeAlias, TypeVar

from callward.core._postgres import (
    StoreUrl,
    migrated_pool,
    retry_once_on_broken_connection,
    store_errors,
)
from callward.policies._anomaly_state import Anomaly, AnomalyStateUnavailable, _row

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

    _Connection: TypeAlias = psycopg.Connection[tuple[object, ...]]

#: The component name of these tables in ``callward_schema``.
COMPONENT: Final = "anomalies"

_STEPS: Final = (
    """
    CREATE TABLE anomalies (
        id TEXT PRIMARY KEY, principal TEXT NOT NULL, tool TEXT NOT NULL,
        metric TEXT NOT NULL, evidence TEXT NOT NULL,
        detected_at DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL,
        status TEXT NOT NULL, resolved_at DOUBLE PRECISION, resolved_by TEXT);
    CREATE INDEX anomalies_open ON anomalies (status, principal);
    CREATE TABLE anomaly_first_uses (
        principal TEXT NOT NULL, tool TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
        calls_before BIGINT NOT NULL, PRIMARY KEY (principal, tool));
    """,
)
_COLUMNS: Final = ("id, principal, tool, metric, evidence, detected_at, last_seen, status, "
                   "resolved_at, resolved_by")
_WHAT: Final = "anomaly state"
T = TypeVar("T")


class PostgresAnomalyState:
    """
    The anomaly state in PostgreSQL, shared by every replica of a fleet. Connects and
    migrates its tables on first use.

    Args:
        url: The fleet's database.
        quiet_seconds: An open anomaly not seen again for this long no longer counts
            as open for the policy, even before the detector writes ``anomaly.resolved``.
        pool_size: The most connections this replica holds open.
        timeout: How long a call waits for a connection before the state is unavailable.

    Attributes:
        path: Always None: this state has no file (``url`` says where it is).
    """

    path: None = None

    def __init__(self, url: StoreUrl, *, quiet_seconds: float = 900.0, pool_size: int = 2,
                 timeout: float = 5.0) -> None:
        if quiet_seconds <= 0:
            raise ValueError("quiet_seconds is positive")
        if pool_size < 1:
            raise ValueError("pool_size is at least 1")
        self.url = url
        self.quiet_seconds = quiet_seconds
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: psycopg_pool.ConnectionPool[_Connection] | None = None
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def _connections(self) -> psycopg_pool.ConnectionPool[_Connection]:
        """The pool, made and the tables migrated on first use (inside ``store_errors``)."""
        with self._lock:
            if self._closed:
                raise AnomalyStateUnavailable(f"{_WHAT} at {self.url.url} is closed")
            if self._pool is None:
                self._pool = migrated_pool(
                    self.url, component=COMPONENT, steps=_STEPS,
                    error=AnomalyStateUnavailable, what=_WHAT,
                    application_name="callward anomaly state", max_size=self._pool_size,
                    timeout=self._timeout, autocommit=True)
            return self._pool

    @contextlib.contextmanager
    def _use(self) -> Iterator[_Connection]:
        """A pooled autocommit connection (one statement, one transaction); any failure is
        AnomalyStateUnavailable."""
        with store_errors(AnomalyStateUnavailable, _WHAT, url=self.url), \
                self._connections().connection() as conn:
            yield conn

    def _read(self, work: Callable[[_Connection], T]) -> T:
        """A read, retried once on another connection if its own broke."""
        with store_errors(AnomalyStateUnavailable, _WHAT, url=self.url):
            return retry_once_on_broken_connection(self._connections(), work)

    def _select(self, where: str, params: tuple[object, ...]) -> tuple[Anomaly, ...]:
        rows = self._read(lambda conn: conn.execute(
            f"SELECT {_COLUMNS} FROM anomalies {where}",  # noqa: S608 - constant columns and clauses
            params).fetchall())
        try:
            return tuple(_row(row) for row in rows)
        except ValueError as exc:  # evidence that is not JSON
            raise AnomalyStateUnavailable(f"{_WHAT}: {type(exc).__name__}") from exc

    def open_for(self, principal: str, now: float) -> tuple[Anomaly, ...]:
        """The principal's open anomalies seen within the quiet period, on any replica."""
        return self._select("WHERE status = 'open' AND principal = %s AND last_seen > %s "
                            "ORDER BY detected_at, id", (principal, now - self.quiet_seconds))

    def all_open(self) -> tuple[Anomaly, ...]:
        return self._select("WHERE status = 'open' ORDER BY detected_at, id", ())

    def get(self, anomaly_id: str) -> Anomaly | None:
        found = self._select("WHERE id = %s", (anomaly_id,))
        return found[0] if found else None

    def listing(self, *, status: str | None = None, limit: int = 1000) -> tuple[Anomaly, ...]:
        return self._select("WHERE %s::text IS NULL OR status = %s "
                            "ORDER BY detected_at DESC, id LIMIT %s", (status, status, limit))

    def add(self, anomaly: Anomaly) -> None:
        with self._use() as conn:
            conn.execute(f"INSERT INTO anomalies ({_COLUMNS}) "  # noqa: S608 - constant columns
                         "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                         (anomaly.id, anomaly.principal, anomaly.tool, anomaly.metric,
                          json.dumps(dict(anomaly.evidence), sort_keys=True),
                          anomaly.detected_at, anomaly.last_seen, anomaly.status,
                          anomaly.resolved_at, anomaly.resolved_by))

    def seen(self, anomaly_id: str, at: float) -> None:
        with self._use() as conn:
            conn.execute("UPDATE anomalies SET last_seen = greatest(last_seen, %s) "
                         "WHERE id = %s", (at, anomaly_id))

    def resolve(self, anomaly_id: str, *, by: str, at: float) -> Anomaly | None:
        """
        Close an open anomaly.

        Returns:
            The resolved anomaly, or None when no open anomaly has that id (another
            replica resolved it first).
        """
        with self._use() as conn:
            changed = conn.execute(
                f"UPDATE anomalies SET status = 'resolved', resolved_at = %s, "  # noqa: S608 - constant columns
                f"resolved_by = %s WHERE id = %s AND status = 'open' RETURNING {_COLUMNS}",
                (at, by, anomaly_id)).fetchone()
        if changed is None:
            return None
        try:
            return _row(changed)
        except ValueError as exc:
            raise AnomalyStateUnavailable(f"{_WHAT}: {type(exc).__name__}") from exc

    def first_uses(self) -> dict[tuple[str, str], int]:
        """Every (principal, tool) seen, with the principal's call count when it was first seen."""
        rows = self._read(lambda conn: conn.execute(
            "SELECT principal, tool, calls_before FROM anomaly_first_uses").fetchall())
        return {(str(p), str(t)): int(str(n)) for p, t, n in rows}

    def add_first_use(self, principal: str, tool: str, at: float, calls_before: int) -> None:
        with self._use() as conn:
            conn.execute("INSERT INTO anomaly_first_uses (principal, tool, at, calls_before) "
                         "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                         (principal, tool, at, calls_before))


__all__ = ["COMPONENT", "PostgresAnomalyState"]
