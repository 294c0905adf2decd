"""
The fleet's replica registry: every gateway sharing one PostgreSQL says who it is.

Each replica keeps one row in ``replicas``: its id, host, pid, callward version, the
digest of the policy it enforces, the sandbox image's digest, when it started and its
last heartbeat. ``callward policy status --store URL`` lists them, so a fleet that
enforces two policies by mistake is visible at a glance.

Invariants:

- Alive is judged by the database's clock: a replica is alive while it has not
  stopped and ``now() - heartbeat`` is under its lease. Replicas on hosts whose
  clocks disagree are judged alike.
- Every heartbeat writes the replica's current digests too, so a digest a failed
  ``update`` could not write is written by the next heartbeat.
- A heartbeat or an update that fails is logged, never raised: a database away for a
  while must not stop a gateway serving (its row simply stops being alive, which is
  what the fleet should see). Only ``start`` raises.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

import structlog

from callward.core._postgres import StoreUrl, describe, migrate, pool, store_errors
from callward.core.errors import StateUnavailable

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

    Connection = psycopg.Connection[tuple[object, ...]]

log = structlog.get_logger()

COMPONENT: Final = "replicas"
#: The rows of replicas silent for this long are removed when a replica starts.
FORGET_AFTER: Final = "7 days"
_APPLICATION: Final = "callward-replicas"
_REMEDIATION: Final = "check that the fleet's PostgreSQL runs and this replica may reach it"
#: The schema, one step per version (``callward.core._postgres.migrate``).
STEPS: Final = (
    """
    CREATE TABLE replicas (
        replica_id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        version TEXT NOT NULL,
        policy_digest TEXT NOT NULL,
        image_digest TEXT NOT NULL,
        lease_seconds DOUBLE PRECISION NOT NULL CHECK (lease_seconds > 0),
        started TIMESTAMPTZ NOT NULL DEFAULT now(),
        heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(),
        stopped TIMESTAMPTZ
    );
    """,
)
_LIST: Final = """
SELECT replica_id, host, pid, version, policy_digest, image_digest, started, heartbeat,
       stopped,
       stopped IS NULL AND now() - heartbeat < lease_seconds * interval '1 second',
       extract(epoch FROM now() - heartbeat)
FROM replicas
ORDER BY replica_id
"""


@dataclass(frozen=True, slots=True)
class Replica:
    """
    One gateway of the fleet, as its row says.

    Attributes:
        alive: Not stopped, and its last heartbeat is younger than its lease by the
            database's clock.
        age_seconds: How old its last heartbeat is, by the database's clock.
        stopped: When it stopped cleanly (``ReplicaRegistry.stop``), else None.
    """

    replica_id: str
    host: str
    pid: int
    version: str
    policy_digest: str
    image_digest: str
    started: datetime
    heartbeat: datetime
    alive: bool
    age_seconds: float = 0.0
    stopped: datetime | None = None

    def __post_init__(self) -> None:
        if not self.replica_id:
            raise ValueError("a replica has an id")


def _datetime(value: object) -> datetime:
    if not isinstance(value, datetime):
        raise StateUnavailable("the replicas table holds a time that is not a timestamp",
                               remediation="the table was changed outside callward")
    return value


def _replica(row: tuple[object, ...]) -> Replica:
    (replica_id, host, pid, version, policy_digest, image_digest, started, heartbeat,
     stopped, alive, age) = row
    return Replica(
        replica_id=str(replica_id), host=str(host), pid=int(str(pid)), version=str(version),
        policy_digest=str(policy_digest), image_digest=str(image_digest),
        started=_datetime(started), heartbeat=_datetime(heartbeat), alive=alive is True,
        age_seconds=float(str(age)), stopped=None if stopped is None else _datetime(stopped))


def replicas(url: StoreUrl, *, timeout: float = 5.0) -> tuple[Replica, ...]:
    """
    Every replica the fleet's database knows, alive or not, by id.

    Raises:
        StateUnavailable: The database cannot be reached or read.
    """
    from callward.core._postgres import connect  # noqa: PLC0415 - one connection, no pool

    with store_errors(StateUnavailable, "the replicas cannot be read", url=url), \
            connect(url, application_name=_APPLICATION, connect_timeout=timeout) as conn:
        known = conn.execute(
            "SELECT 1 FROM information_schema.tables WHERE table_name = 'replicas' "
            "AND table_schema = current_schema()").fetchone()
        if known is None:  # no replica ever started on this database
            return ()
        return tuple(_replica(row) for row in conn.execute(_LIST).fetchall())


def policy_digests(members: Iterable[Replica]) -> tuple[str, ...]:
    """
    The distinct policy digests the live members enforce, the most enforced first
    (then by digest). More than one: the fleet enforces more than one policy.
    """
    counts = Counter(member.policy_digest for member in members if member.alive)
    return tuple(digest for digest, _ in sorted(counts.items(), key=lambda c: (-c[1], c[0])))


class ReplicaRegistry:
    """
    This replica's row, kept fresh by a daemon heartbeat thread.

    Args:
        url: The fleet's PostgreSQL.
        replica_id: This replica's name in the fleet (unique).
        version: The callward version it runs.
        policy_digest: The digest of the policy it enforces now.
        image_digest: The sandbox image's digest ("" if unknown).
        heartbeat_seconds: How often the row is renewed.
        lease_seconds: How long a heartbeat stays good; shorter than the lease, the
            heartbeat must be.

    Raises:
        ValueError: The heartbeat is not shorter than the lease, or not positive.
    """

    def __init__(self, url: StoreUrl, *, replica_id: str, version: str, policy_digest: str,
                 image_digest: str, heartbeat_seconds: float = 2.0,
                 lease_seconds: float = 10.0) -> None:
        if not replica_id:
            raise ValueError("a replica has an id")
        if not 0 < heartbeat_seconds < lease_seconds:
            raise ValueError("the heartbeat must be positive and shorter than the lease")
        self.url = url
        self.replica_id = replica_id
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.version = version
        self.heartbeat_seconds = heartbeat_seconds
        self.lease_seconds = lease_seconds
        self._policy_digest = policy_digest
        self._image_digest = image_digest
        # The digests are read and set together; only the heartbeat thread writes them.
        self._write_lock = threading.Lock()
        self._stopping = threading.Event()
        # Set by update and stop: the heartbeat thread writes (or ends) at once.
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: psycopg_pool.ConnectionPool[Connection] | None = None

    @property
    def policy_digest(self) -> str:
        return self._policy_digest

    @property
    def image_digest(self) -> str:
        return self._image_digest

    def start(self) -> None:
        """
        Register (or re-register) this replica and start its heartbeat.

        Raises:
            StateUnavailable: The database cannot be reached or written.
        """
        if self._thread is not None:
            return
        connections = pool(self.url, application_name=_APPLICATION, max_size=2)
        try:
            with store_errors(StateUnavailable, "this replica cannot register",
                              url=self.url), connections.connection() as conn:
                migrate(conn, COMPONENT, STEPS)
                with conn.transaction():
                    conn.execute("DELETE FROM replicas WHERE heartbeat < now() - %s::interval",
                                 (FORGET_AFTER,))
                    self._register(conn)
        except BaseException:
            connections.close()
            raise
        self._pool = connections
        self._stopping.clear()
        self._wake.clear()
        self._thread = threading.Thread(target=self._beat_until_stopped, daemon=True,
                                        name=f"callward-heartbeat-{self.replica_id}"[:63])
        self._thread.start()
        log.info("replica_registered", replica=self.replica_id, host=self.host,
                 version=self.version, policy_digest=self._policy_digest)

    def _register(self, conn: Connection) -> None:
        """This replica's row, new or renewed (started now, not stopped)."""
        conn.execute(
            "INSERT INTO replicas (replica_id, host, pid, version, policy_digest, "
            "image_digest, lease_seconds) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (replica_id) DO UPDATE SET host = EXCLUDED.host, "
            "pid = EXCLUDED.pid, version = EXCLUDED.version, "
            "policy_digest = EXCLUDED.policy_digest, image_digest = EXCLUDED.image_digest, "
            "lease_seconds = EXCLUDED.lease_seconds, started = now(), heartbeat = now(), "
            "stopped = NULL",
            (self.replica_id, self.host, self.pid, self.version, self._policy_digest,
             self._image_digest, self.lease_seconds))

    def update(self, *, policy_digest: str | None = None,
               image_digest: str | None = None) -> None:
        """
        Say this replica now enforces another policy (after a reload) or runs another
        image. The heartbeat thread writes it at once (a call never waits for the
        database here); if that fails, the next heartbeat does. Never raises.
        """
        with self._write_lock:
            if policy_digest is not None:
                self._policy_digest = policy_digest
            if image_digest is not None:
                self._image_digest = image_digest
        self._wake.set()

    def stop(self) -> None:
        """Stop the heartbeat and mark the row stopped (no longer alive). Never raises."""
        thread, self._thread = self._thread, None
        self._stopping.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout=self.heartbeat_seconds + 10)
        connections, self._pool = self._pool, None
        if connections is None:
            return
        try:
            with connections.connection() as conn:
                conn.execute("UPDATE replicas SET stopped = now(), heartbeat = now() "
                             "WHERE replica_id = %s", (self.replica_id,))
        except Exception as exc:  # noqa: BLE001 - logged; its lease will lapse instead
            log.warning("replica_stop_unrecorded", replica=self.replica_id,
                        error=describe(exc))
        finally:
            connections.close()
        log.info("replica_stopped", replica=self.replica_id)

    def _beat_until_stopped(self) -> None:
        while True:
            woken = self._wake.wait(self.heartbeat_seconds)
            self._wake.clear()
            if self._stopping.is_set():
                return
            self._beat("replica_update_failed" if woken else "replica_heartbeat_failed")

    def _beat(self, event: str) -> None:
        """Renew the heartbeat with the current digests; log a failure, never raise."""
        connections = self._pool
        if connections is None:
            return
        with self._write_lock:  # both digests of one moment; only this thread writes them
            digests = (self._policy_digest, self._image_digest)
        try:
            with connections.connection() as conn:
                renewed = conn.execute(
                    "UPDATE replicas SET heartbeat = now(), policy_digest = %s, "
                    "image_digest = %s WHERE replica_id = %s AND stopped IS NULL",
                    (*digests, self.replica_id)).rowcount
                if renewed == 0 and not self._stopping.is_set():
                    # The row was removed (or marked stopped) behind this replica's back.
                    self._register(conn)
                    log.warning(event, replica=self.replica_id,
                                error="this replica's row was gone; registered again")
        except Exception as exc:  # noqa: BLE001 - logged, never raised (module invariants)
            log.warning(event, replica=self.replica_id, error=describe(exc))


__all__ = ["COMPONENT", "STEPS", "Replica", "ReplicaRegistry", "policy_digests", "replicas"]
