"""
Open anomalies and first uses, kept in their own SQLite file so they survive a restart.

The file (``CALLWARD_HOME/anomaly-state.db``) is written by the anomaly detector
and the ``callward anomalies`` commands, and read by the policy when a rule
depends on open anomalies. Any error reading or writing it is raised as
``AnomalyStateUnavailable``; the policy turns that into a denial (fail closed).

``AnomalyStore`` is what the detector and the commands need of it; this file is
one, ``PostgresAnomalyState`` (a fleet's shared database) the other.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Final, Literal, Protocol, get_args

from callward.core import errors
from callward.core._canonical import JSONValue

AnomalyMetric = Literal["call_rate", "denial_ratio", "limits_tripped", "result_size",
                        "first_use"]
ANOMALY_METRICS: Final[tuple[str, ...]] = get_args(AnomalyMetric)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS anomalies (
    id TEXT PRIMARY KEY, principal TEXT NOT NULL, tool TEXT NOT NULL, metric TEXT NOT NULL,
    evidence TEXT NOT NULL, detected_at REAL NOT NULL, last_seen REAL NOT NULL,
    status TEXT NOT NULL, resolved_at REAL, resolved_by TEXT);
CREATE INDEX IF NOT EXISTS anomalies_open ON anomalies (status, principal);
CREATE TABLE IF NOT EXISTS first_uses (
    principal TEXT NOT NULL, tool TEXT NOT NULL, at REAL NOT NULL, calls_before INTEGER NOT NULL,
    PRIMARY KEY (principal, tool));
"""
_COLUMNS: Final = ("id, principal, tool, metric, evidence, detected_at, last_seen, status, "
                   "resolved_at, resolved_by")


class AnomalyStateUnavailable(errors.StateUnavailable):
    """The anomaly state could not be read or written; a policy that needs it denies."""


@dataclass(frozen=True, slots=True)
class Anomaly:
    """
    One detected deviation and its evidence.

    Attributes:
        evidence: ``observed``, ``baseline``, ``threshold``, ``window`` and how the
            baseline was made, exactly as written in ``anomaly.detected``.
        last_seen: When the deviation was last observed; the quiet period runs from here.
    """

    id: str
    principal: str
    tool: str
    metric: AnomalyMetric
    evidence: Mapping[str, JSONValue]
    detected_at: float
    last_seen: float
    status: Literal["open", "resolved"] = "open"
    resolved_at: float | None = None
    resolved_by: str | None = None

    def __post_init__(self) -> None:
        if self.metric not in ANOMALY_METRICS:
            raise ValueError(f"not an anomaly metric: {self.metric!r}")

    def to_json(self) -> dict[str, JSONValue]:
        return {"id": self.id, "principal": self.principal, "tool": self.tool,
                "metric": self.metric, "evidence": dict(self.evidence),
                "detected_at": self.detected_at, "last_seen": self.last_seen,
                "status": self.status, "resolved_at": self.resolved_at,
                "resolved_by": self.resolved_by}


class OpenAnomalies(Protocol):
    """What the policy reads: the anomalies open for a principal."""

    def open_for(self, principal: str, now: float) -> tuple[Anomaly, ...]:
        """
        Raises:
            AnomalyStateUnavailable: The state cannot be read.
        """
        ...



class AnomalyStore(OpenAnomalies, Protocol):
    """
    The whole anomaly state, whichever store keeps it: the SQLite file of one gateway
    (``AnomalyState``) or a fleet's PostgreSQL (``PostgresAnomalyState``). Every method
    raises ``AnomalyStateUnavailable`` when the state cannot be read or written.
    """

    quiet_seconds: float

    def all_open(self) -> tuple[Anomaly, ...]: ...

    def get(self, anomaly_id: str) -> Anomaly | None: ...

    def listing(self, *, status: str | None = None, limit: int = 1000
                ) -> tuple[Anomaly, ...]: ...

    def add(self, anomaly: Anomaly) -> None: ...

    def seen(self, anomaly_id: str, at: float) -> None: ...

    def resolve(self, anomaly_id: str, *, by: str, at: float) -> Anomaly | None: ...

    def first_uses(self) -> dict[tuple[str, str], int]: ...

    def add_first_use(self, principal: str, tool: str, at: float, calls_before: int
                      ) -> None: ...

    def close(self) -> None: ...


def _float(value: object) -> float:
    if not isinstance(value, int | float):
        raise AnomalyStateUnavailable("a time in the anomaly state is not a number")
    return float(value)


def _row(row: tuple[object, ...]) -> Anomaly:
    (aid, principal, tool, metric, evidence, detected, seen, status, resolved_at,
     resolved_by) = row
    if metric not in ANOMALY_METRICS:
        raise AnomalyStateUnavailable("an anomaly in the state has an unknown metric")
    loaded = json.loads(str(evidence))
    if not isinstance(loaded, dict):
        raise AnomalyStateUnavailable("an anomaly's evidence in the state is not an object")
    return Anomaly(id=str(aid), principal=str(principal), tool=str(tool),
                   metric=metric,  # type: ignore[arg-type] # checked just above
                   evidence=loaded, detected_at=_float(detected), last_seen=_float(seen),
                   status="resolved" if status == "resolved" else "open",
                   resolved_at=None if resolved_at is None else _float(resolved_at),
                   resolved_by=None if resolved_by is None else str(resolved_by))


class AnomalyState:
    """
    The anomaly state file. Opens on first use; ``path=None`` keeps it in memory.

    Args:
        quiet_seconds: An open anomaly not seen again for this long no longer counts
            as open for the policy, even before the detector writes ``anomaly.resolved``.
    """

    def __init__(self, path: Path | None = None, *, quiet_seconds: float = 900.0) -> None:
        if quiet_seconds <= 0:
            raise ValueError("quiet_seconds is positive")
        self.path = path
        self.quiet_seconds = quiet_seconds
        self._db: sqlite3.Connection | None = None
        self._lock = Lock()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextlib.contextmanager
    def _use(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                if self._db is None:
                    if self.path is not None:
                        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    db = sqlite3.connect(":memory:" if self.path is None else str(self.path),
                                         isolation_level=None, check_same_thread=False,
                                         timeout=5.0)
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")
                    db.executescript(_SCHEMA)
                    self._db = db
                yield self._db
            except (sqlite3.Error, ValueError) as exc:
                raise AnomalyStateUnavailable(f"anomaly state: {type(exc).__name__}") from exc

    def open_for(self, principal: str, now: float) -> tuple[Anomaly, ...]:
        """The principal's open anomalies seen within the quiet period."""
        with self._use() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM anomalies WHERE status = 'open' "  # noqa: S608 - constant columns
                              "AND principal = ? AND last_seen > ? ORDER BY detected_at",
                              (principal, now - self.quiet_seconds)).fetchall()
        return tuple(_row(row) for row in rows)

    def all_open(self) -> tuple[Anomaly, ...]:
        with self._use() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM anomalies WHERE status = 'open' "  # noqa: S608 - constant columns
                              "ORDER BY detected_at").fetchall()
        return tuple(_row(row) for row in rows)

    def get(self, anomaly_id: str) -> Anomaly | None:
        with self._use() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM anomalies WHERE id = ?",  # noqa: S608 - constant columns
                             (anomaly_id,)).fetchone()
        return None if row is None else _row(row)

    def listing(self, *, status: str | None = None, limit: int = 1000) -> tuple[Anomaly, ...]:
        with self._use() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM anomalies "  # noqa: S608 - constant columns
                              "WHERE ? IS NULL OR status = ? ORDER BY detected_at DESC LIMIT ?",
                              (status, status, limit)).fetchall()
        return tuple(_row(row) for row in rows)

    def add(self, anomaly: Anomaly) -> None:
        with self._use() as db:
            db.execute(f"INSERT INTO anomalies ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",  # noqa: S608 - constant columns
                       (anomaly.id, anomaly.principal, anomaly.tool, anomaly.metric,
                        json.dumps(dict(anomaly.evidence), sort_keys=True),
                        anomaly.detected_at, anomaly.last_seen, anomaly.status,
                        anomaly.resolved_at, anomaly.resolved_by))

    def seen(self, anomaly_id: str, at: float) -> None:
        with self._use() as db:
            db.execute("UPDATE anomalies SET last_seen = max(last_seen, ?) WHERE id = ?",
                       (at, anomaly_id))

    def resolve(self, anomaly_id: str, *, by: str, at: float) -> Anomaly | None:
        """
        Close an open anomaly.

        Returns:
            The resolved anomaly, or None when no open anomaly has that id.
        """
        with self._use() as db:
            changed = db.execute("UPDATE anomalies SET status = 'resolved', resolved_at = ?, "
                                 "resolved_by = ? WHERE id = ? AND status = 'open'",
                                 (at, by, anomaly_id)).rowcount
        if not changed:
            return None
        return self.get(anomaly_id)

    def first_uses(self) -> dict[tuple[str, str], int]:
        """Every (principal, tool) seen, with the principal's call count when it was first seen."""
        with self._use() as db:
            rows = db.execute("SELECT principal, tool, calls_before FROM first_uses").fetchall()
        return {(str(p), str(t)): int(n) for p, t, n in rows}

    def add_first_use(self, principal: str, tool: str, at: float, calls_before: int) -> None:
        with self._use() as db:
            db.execute("INSERT OR IGNORE INTO first_uses VALUES (?, ?, ?, ?)",
                       (principal, tool, at, calls_before))
