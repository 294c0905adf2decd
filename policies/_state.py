"""
The policy engine's own state: rate-limit counters, session labels, approvals.

It lives in its own SQLite file (``CALLWARD_HOME/policy-state.db``), apart
from the audit log, so that limits and approvals survive a restart. Every
check-and-consume runs in one ``BEGIN IMMEDIATE`` transaction, so two
gateways sharing the file cannot both take the last token.

Any error reading or writing the state is raised as ``StateUnavailable``;
the evaluator turns it into a denial (fail closed).

``PolicyStateStore`` is what the evaluator needs of a state; this SQLite file
is one, ``PostgresPolicyState`` (a fleet's shared database) the other.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Final, Protocol

from callward.core import RuleId
from callward.core.errors import StateUnavailable

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS rate_events (key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS rate_events_key_at ON rate_events (key, at);
CREATE TABLE IF NOT EXISTS rate_buckets (
    key TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS session_labels (
    session TEXT NOT NULL, label TEXT NOT NULL, call_id TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (session, label));
CREATE TABLE IF NOT EXISTS call_labels (
    session TEXT NOT NULL, call_id TEXT NOT NULL, label TEXT NOT NULL,
    PRIMARY KEY (session, call_id, label));
CREATE TABLE IF NOT EXISTS unattributed_labels (
    session TEXT NOT NULL, label TEXT NOT NULL, PRIMARY KEY (session, label));
CREATE TABLE IF NOT EXISTS proposals (
    id TEXT PRIMARY KEY, rule_id TEXT NOT NULL, call_id TEXT NOT NULL,
    principal TEXT NOT NULL, session TEXT NOT NULL, tool TEXT NOT NULL,
    tool_digest TEXT NOT NULL, arguments_sha256 TEXT NOT NULL,
    created REAL NOT NULL, expires REAL NOT NULL, status TEXT NOT NULL,
    decided_by TEXT, decided_at REAL, approval BLOB, signature BLOB, key_id TEXT,
    used_at REAL, used_call_id TEXT);
CREATE INDEX IF NOT EXISTS proposals_match
    ON proposals (principal, tool, arguments_sha256, status);
"""


@dataclass(frozen=True, slots=True)
class RateCharge:
    """One rate limit to check and charge: ``limit`` per ``window_seconds`` under ``key``."""

    rule: RuleId
    key: str
    algorithm: str
    limit: int
    window_seconds: float


@dataclass(frozen=True, slots=True)
class Proposal:
    """A call that waits for approval, and what became of it."""

    id: str
    rule_id: str
    call_id: str
    principal: str
    session: str
    tool: str
    tool_digest: str
    arguments_sha256: str
    created: float
    expires: float
    status: str
    decided_by: str | None
    approval: bytes | None
    signature: bytes | None
    key_id: str | None
    used_call_id: str | None

    def status_at(self, now: float) -> str:
        """``proposed``/``approved`` turn ``expired`` once past their expiry."""
        if self.status in {"proposed", "approved"} and now >= self.expires:
            return "expired"
        return self.status


_PROPOSAL_COLUMNS: Final = (
    "id, rule_id, call_id, principal, session, tool, tool_digest, arguments_sha256, created, "
    "expires, status, decided_by, approval, signature, key_id, used_call_id"
)



class PolicyStateStore(Protocol):
    """
    What the policy needs of its state, whichever store keeps it: the SQLite file of
    one gateway (``PolicyState``) or a fleet's PostgreSQL (``PostgresPolicyState``).

    Every check-and-consume (``charge``, ``decide_proposal``, ``use_approval``) is
    atomic across every process that shares the store. Every method raises
    ``StateUnavailable`` when the state cannot be read or written.
    """

    def charge(self, charges: Sequence[RateCharge], now: float, *, commit: bool = True
               ) -> RuleId | None: ...

    def session_labels(self, session: str) -> frozenset[str]: ...

    def add_session_labels(self, session: str, labels: frozenset[str], call_id: str,
                           now: float, *, per_call: bool = False) -> None: ...

    def unattributed_labels(self, session: str) -> frozenset[str]: ...

    def call_labels(self, session: str, call_ids: Sequence[str]
                    ) -> dict[str, frozenset[str]]: ...

    def propose(self, proposal: Proposal) -> Proposal: ...

    def proposal(self, proposal_id: str) -> Proposal | None: ...

    def proposals(self) -> tuple[Proposal, ...]: ...

    def decide_proposal(self, proposal_id: str, *, status: str, by: str, now: float,
                        approval: bytes | None, signature: bytes | None,
                        key_id: str | None) -> bool: ...

    def approved_for(self, principal: str, tool: str, arguments_sha256: str, now: float
                     ) -> Proposal | None: ...

    def expired_approval(self, principal: str, tool: str, arguments_sha256: str, now: float
                         ) -> str | None: ...

    def use_approval(self, proposal_id: str, call_id: str, now: float) -> bool: ...

    def close(self) -> None: ...


class PolicyState:
    """
    The SQLite file of the policy's state. Opens on first use; ``None`` keeps it in memory.

    Args:
        path: The file, or None for a state that lives as long as this object (tests,
            ``policy test``, ``policy explain``).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            if self.path is not None:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            db = sqlite3.connect(
                ":memory:" if self.path is None else str(self.path),
                isolation_level=None,
                check_same_thread=False,
                timeout=5.0,
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextlib.contextmanager
    def _transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                db = self._connect()
                db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StateUnavailable(f"policy state: {type(exc).__name__}") from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._connect()
            except sqlite3.Error as exc:
                raise StateUnavailable(f"policy state: {type(exc).__name__}") from exc

    # -- rate limits ----------------------------------------------------------

    def charge(self, charges: Sequence[RateCharge], now: float, *, commit: bool = True
               ) -> RuleId | None:
        """
        Check every charge and, when all pass and ``commit``, take one from each.

        Returns:
            The first rate limit that is exhausted (nothing is taken), or None.
        """
        if not charges:
            return None
        with self._transaction(write=commit) as db:
            updates: list[tuple[RateCharge, float]] = []
            for charge in charges:
                if charge.algorithm == "token_bucket":
                    row = db.execute("SELECT tokens, updated FROM rate_buckets WHERE key = ?",
                                     (charge.key,)).fetchone()
                    tokens = float(charge.limit) if row is None else min(
                        float(charge.limit),
                        row[0] + max(0.0, now - row[1]) * charge.limit / charge.window_seconds,
                    )
                    if tokens < 1.0:
                        return charge.rule
                    updates.append((charge, tokens - 1.0))
                else:
                    if commit:
                        db.execute("DELETE FROM rate_events WHERE key = ? AND at <= ?",
                                   (charge.key, now - charge.window_seconds))
                    (count,) = db.execute(
                        "SELECT count(*) FROM rate_events WHERE key = ? AND at > ?",
                        (charge.key, now - charge.window_seconds)).fetchone()
                    if count >= charge.limit:
                        return charge.rule
                    updates.append((charge, 0.0))
            if commit:
                for charge, tokens in updates:
                    if charge.algorithm == "token_bucket":
                        db.execute("INSERT OR REPLACE INTO rate_buckets VALUES (?, ?, ?)",
                                   (charge.key, tokens, now))
                    else:
                        db.execute("INSERT INTO rate_events VALUES (?, ?)", (charge.key, now))
        return None

    # -- data-flow labels -----------------------------------------------------

    def session_labels(self, session: str) -> frozenset[str]:
        with self._read() as db:
            rows = db.execute("SELECT label FROM session_labels WHERE session = ?",
                              (session,)).fetchall()
        return frozenset(row[0] for row in rows)

    def add_session_labels(self, session: str, labels: frozenset[str], call_id: str,
                           now: float, *, per_call: bool = False) -> None:
        """
        Record that a result with ``labels`` was produced in ``session``.

        Args:
            per_call: The call's provenance is known: record the labels of this one
                result (even none), so a later call whose provenance names
                ``call_id`` is checked per value. Otherwise the labels are also
                recorded as unattributed: whoever saw them (a model) may have copied
                them anywhere, a plan's literals included.
        """
        if not labels and not per_call:
            return
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO session_labels VALUES (?, ?, ?, ?)",
                           [(session, label, call_id, now) for label in sorted(labels)])
            if per_call:
                # The empty label marks the result as observed, labelled or not.
                db.executemany("INSERT OR IGNORE INTO call_labels VALUES (?, ?, ?)",
                               [(session, call_id, label) for label in ("", *sorted(labels))])
            else:
                db.executemany("INSERT OR IGNORE INTO unattributed_labels VALUES (?, ?)",
                               [(session, label) for label in sorted(labels)])

    def unattributed_labels(self, session: str) -> frozenset[str]:
        """Labels of results in ``session`` whose calls had no known provenance."""
        with self._read() as db:
            rows = db.execute("SELECT label FROM unattributed_labels WHERE session = ?",
                              (session,)).fetchall()
        return frozenset(row[0] for row in rows)

    def call_labels(self, session: str, call_ids: Sequence[str]
                    ) -> dict[str, frozenset[str]]:
        """
        The labels of each result in ``session`` recorded per call; a call id
        absent from the answer was never recorded (its labels are unknown).
        """
        found: dict[str, set[str]] = {}
        with self._read() as db:
            for call_id in dict.fromkeys(call_ids):
                for (label,) in db.execute(
                    "SELECT label FROM call_labels WHERE session = ? AND call_id = ?",
                    (session, call_id),
                ):
                    labels = found.setdefault(call_id, set())
                    if label:
                        labels.add(label)
        return {call_id: frozenset(labels) for call_id, labels in found.items()}

    # -- approvals ------------------------------------------------------------

    def propose(self, proposal: Proposal) -> Proposal:
        """Record a proposal, or return the open one for the same principal, tool and digest."""
        with self._transaction() as db:
            row = db.execute(
                f"SELECT {_PROPOSAL_COLUMNS} FROM proposals WHERE principal = ? AND tool = ? "  # noqa: S608 - constant columns
                "AND arguments_sha256 = ? AND status = 'proposed' AND expires > ? "
                "ORDER BY created DESC LIMIT 1",
                (proposal.principal, proposal.tool, proposal.arguments_sha256, proposal.created),
            ).fetchone()
            if row is not None:
                return Proposal(*row)
            db.execute(
                f"INSERT INTO proposals ({_PROPOSAL_COLUMNS}) VALUES "  # noqa: S608 - constant columns
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (proposal.id, proposal.rule_id, proposal.call_id, proposal.principal,
                 proposal.session, proposal.tool, proposal.tool_digest,
                 proposal.arguments_sha256, proposal.created, proposal.expires, proposal.status,
                 None, None, None, None, None),
            )
        return proposal

    def proposal(self, proposal_id: str) -> Proposal | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_PROPOSAL_COLUMNS} FROM proposals WHERE id = ?",  # noqa: S608 - constant columns
                             (proposal_id,)).fetchone()
        return None if row is None else Proposal(*row)

    def proposals(self) -> tuple[Proposal, ...]:
        with self._read() as db:
            rows = db.execute(f"SELECT {_PROPOSAL_COLUMNS} FROM proposals "  # noqa: S608 - constant columns
                              "ORDER BY created").fetchall()
        return tuple(Proposal(*row) for row in rows)

    def decide_proposal(self, proposal_id: str, *, status: str, by: str, now: float,
                        approval: bytes | None, signature: bytes | None,
                        key_id: str | None) -> bool:
        """Move an open proposal to ``approved`` or ``rejected``; False if it was not open."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE proposals SET status = ?, decided_by = ?, decided_at = ?, approval = ?, "
                "signature = ?, key_id = ? WHERE id = ? AND status = 'proposed' AND expires > ?",
                (status, by, now, approval, signature, key_id, proposal_id, now),
            )
            return cursor.rowcount == 1

    def approved_for(self, principal: str, tool: str, arguments_sha256: str, now: float
                     ) -> Proposal | None:
        """The oldest unexpired, unused approval for exactly this principal, tool and digest."""
        with self._read() as db:
            row = db.execute(
                f"SELECT {_PROPOSAL_COLUMNS} FROM proposals WHERE principal = ? AND tool = ? "  # noqa: S608 - constant columns
                "AND arguments_sha256 = ? AND status = 'approved' AND expires > ? "
                "ORDER BY created LIMIT 1",
                (principal, tool, arguments_sha256, now),
            ).fetchone()
        return None if row is None else Proposal(*row)

    def expired_approval(self, principal: str, tool: str, arguments_sha256: str, now: float
                         ) -> str | None:
        """The id of the newest approval for exactly this call that expired unused, if any."""
        with self._read() as db:
            row = db.execute(
                "SELECT id FROM proposals WHERE principal = ? AND tool = ? "
                "AND arguments_sha256 = ? AND status = 'approved' AND expires <= ? "
                "ORDER BY expires DESC LIMIT 1",
                (principal, tool, arguments_sha256, now),
            ).fetchone()
        return None if row is None else str(row[0])

    def use_approval(self, proposal_id: str, call_id: str, now: float) -> bool:
        """Mark an approval used; False when it was used (or expired) in the meantime."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE proposals SET status = 'executed', used_at = ?, used_call_id = ? "
                "WHERE id = ? AND status = 'approved' AND expires > ?",
                (now, call_id, proposal_id, now),
            )
            return cursor.rowcount == 1
