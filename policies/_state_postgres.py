"""
The policy's state in a fleet's PostgreSQL: one rate limit, one approval, one set of
session labels for every gateway replica that shares the database.

Invariants:

- Every check-and-consume is exact across processes. ``charge`` takes a
  transaction-scoped advisory lock per rate key, in one global order (the locks'
  numbers, ascending), before it reads a counter: two replicas charging the same key
  run one after the other (each statement after the lock reads what the previous
  holder committed), and no two charges can deadlock. A charge of one limit is one
  statement, one round trip: ``policy_rate_take`` takes the lock, and checks and
  writes under it, in the statement's own transaction.
  ``propose`` locks the call it proposes the same way, so racing replicas open one
  proposal.
  ``decide_proposal`` and ``use_approval`` are one conditional ``UPDATE``: of two
  replicas racing for one approval, exactly one changes the row.
- Fail closed: any failure of the database (down, restarting, out of space, a lock
  not granted in time) is raised as ``StateUnavailable``, which the evaluator turns
  into a denial. The pool heals itself, so the same object serves again once the
  database is back, without a restart.
- Times are the callers' ``now`` (as with the SQLite file), so the replicas' clocks
  are assumed synchronised (NTP); a skew of a second shifts a window by a second.
- Reads are single statements on autocommit connections (one round trip each), run
  once more on another connection when theirs turned out broken; a write is never
  run twice.
- psycopg is loaded on first use, never by importing ``callward.policies``.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Final, TypeAlias, TypeVar

from callward.core import RuleId
from callward.core._postgres import (
    StoreUrl,
    migrated_pool,
    retry_once_on_broken_connection,
    store_errors,
)
from callward.core.errors import StateUnavailable
from callward.policies._state import Proposal, RateCharge

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

#: The component name of these tables in ``callward_schema``.
COMPONENT: Final = "policy_state"

_STEPS: Final = (
    """
    CREATE TABLE policy_rate_events (
        key TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
    CREATE INDEX policy_rate_events_key_at ON policy_rate_events (key, at);
    CREATE TABLE policy_rate_buckets (
        key TEXT PRIMARY KEY, tokens DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL);
    CREATE TABLE policy_session_labels (
        session TEXT NOT NULL, label TEXT NOT NULL, call_id TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL, PRIMARY KEY (session, label));
    CREATE TABLE policy_call_labels (
        session TEXT NOT NULL, call_id TEXT NOT NULL, label TEXT NOT NULL,
        PRIMARY KEY (session, call_id, label));
    CREATE TABLE policy_unattributed_labels (
        session TEXT NOT NULL, label TEXT NOT NULL, PRIMARY KEY (session, label));
    CREATE TABLE policy_proposals (
        id TEXT PRIMARY KEY, rule_id TEXT NOT NULL, call_id TEXT NOT NULL,
        principal TEXT NOT NULL, session TEXT NOT NULL, tool TEXT NOT NULL,
        tool_digest TEXT NOT NULL, arguments_sha256 TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION NOT NULL,
        status TEXT NOT NULL, decided_by TEXT, decided_at DOUBLE PRECISION,
        approval BYTEA, signature BYTEA, key_id TEXT,
        used_at DOUBLE PRECISION, used_call_id TEXT);
    CREATE INDEX policy_proposals_match
        ON policy_proposals (principal, tool, arguments_sha256, status);
    """,
    # One charge of one limit as one statement (see ``charge``). A VOLATILE function takes
    # a fresh snapshot for each statement in it, so what it counts after the lock is
    # what the previous holder committed; the lock is held until the caller's
    # transaction ends. The arithmetic is the SQLite state's, in float8.
    """
    CREATE FUNCTION policy_rate_take(p_key TEXT, p_lock BIGINT, p_bucket BOOLEAN,
                                     p_limit DOUBLE PRECISION, p_window DOUBLE PRECISION,
                                     p_now DOUBLE PRECISION) RETURNS BOOLEAN
    LANGUAGE plpgsql VOLATILE AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(p_lock);
        IF p_bucket THEN
            -- Refilled to p_now, then one token taken if there is one; a new key is full.
            INSERT INTO policy_rate_buckets AS b (key, tokens, updated)
            SELECT p_key, p_limit - 1, p_now WHERE p_limit >= 1
            ON CONFLICT (key) DO UPDATE
            SET tokens = least(p_limit, b.tokens + greatest(0, p_now - b.updated)
                               * p_limit / p_window) - 1,
                updated = p_now
            WHERE least(p_limit, b.tokens + greatest(0, p_now - b.updated)
                        * p_limit / p_window) >= 1;
        ELSE
            -- The events out of the window forgotten, then one recorded if there is room.
            DELETE FROM policy_rate_events WHERE key = p_key AND at <= p_now - p_window;
            INSERT INTO policy_rate_events (key, at) SELECT p_key, p_now
            WHERE (SELECT count(*) FROM policy_rate_events
                   WHERE key = p_key AND at > p_now - p_window) < p_limit;
        END IF;
        RETURN FOUND;
    END
    $$;
    """,
)
_COLUMNS: Final = (
    "id, rule_id, call_id, principal, session, tool, tool_digest, arguments_sha256, created, "
    "expires, status, decided_by, approval, signature, key_id, used_call_id"
)
# How long a statement waits for another replica's lock before the call is denied
# (set once per connection).
_LOCK_TIMEOUT: Final = "10s"
_WHAT: Final = "policy state"
_FORGET_EVENTS: Final = "DELETE FROM policy_rate_events WHERE key = %s AND at <= %s"

if TYPE_CHECKING:
    _Connection: TypeAlias = psycopg.Connection[tuple[object, ...]]

T = TypeVar("T")


def _configure(conn: _Connection) -> None:
    """Each new connection's session settings."""
    conn.execute(f"SET lock_timeout = '{_LOCK_TIMEOUT}'")


def lock_key(scope: str, key: str) -> int:
    """
    The advisory lock number of ``key`` in ``scope``: 64 bits of its SHA-256, the same
    in every process (two keys sharing a number only wait for each other).
    """
    digest = hashlib.sha256(f"callward.{COMPONENT}.{scope}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _number(value: object) -> float:
    if not isinstance(value, int | float):
        raise StateUnavailable(f"{_WHAT}: a stored number is not a number")
    return float(value)


def _proposal(row: tuple[object, ...] | None) -> Proposal | None:
    if row is None:
        return None
    return Proposal(*row)  # type: ignore[arg-type] # the columns are Proposal's, in order


class PostgresPolicyState:
    """
    The policy's state in PostgreSQL, shared by every replica of a fleet. Connects and
    migrates its tables on first use.

    Args:
        url: The fleet's database.
        pool_size: The most connections this replica holds open.
        timeout: How long a call waits for a connection before it is denied.

    Attributes:
        path: Always None: this state has no file (``url`` says where it is).
    """

    path: None = None

    def __init__(self, url: StoreUrl, *, pool_size: int = 4, timeout: float = 5.0) -> None:
        if pool_size < 1:
            raise ValueError("pool_size is at least 1")
        self.url = url
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
                raise StateUnavailable(f"{_WHAT} at {self.url.url} is closed")
            if self._pool is None:
                self._pool = migrated_pool(
                    self.url, component=COMPONENT, steps=_STEPS, error=StateUnavailable,
                    what=_WHAT, application_name="callward policy state",
                    max_size=self._pool_size, timeout=self._timeout, autocommit=True,
                    configure=_configure)
            return self._pool

    @contextlib.contextmanager
    def _connection(self) -> Iterator[_Connection]:
        """A pooled autocommit connection; every database failure is StateUnavailable."""
        with store_errors(StateUnavailable, _WHAT, url=self.url), \
                self._connections().connection() as conn:
            yield conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[_Connection]:
        """One transaction on a pooled connection; every database failure is StateUnavailable."""
        with self._connection() as conn, conn.transaction():
            yield conn

    def _read(self, work: Callable[[_Connection], T]) -> T:
        """A read (one statement), retried once on another connection if its own broke."""
        with store_errors(StateUnavailable, _WHAT, url=self.url):
            return retry_once_on_broken_connection(self._connections(), work)

    @staticmethod
    def _lock_all(conn: _Connection, scope: str, keys: Sequence[str]) -> None:
        """Wait for the locks of ``keys`` in ascending order, so no two callers deadlock."""
        for number in sorted({lock_key(scope, key) for key in keys}):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (number,))

    # -- rate limits ----------------------------------------------------------

    def charge(self, charges: Sequence[RateCharge], now: float, *, commit: bool = True
               ) -> RuleId | None:
        """
        Check every charge and, when all pass and ``commit``, take one from each, as one
        step for the whole fleet.

        Returns:
            The first rate limit that is exhausted (nothing is taken), or None.
        """
        if not charges:
            return None
        if not commit:
            return self._read(lambda conn: self._exhausted(conn, charges, now))
        if len(charges) == 1:
            (charge,) = charges
            with self._connection() as conn:
                return None if self._take_one(conn, charge, now) else charge.rule
        # Several limits: all or nothing, in one transaction under all their locks.
        with self._transaction() as conn:
            self._lock_all(conn, "rate", [charge.key for charge in charges])
            updates: list[tuple[RateCharge, float]] = []
            exhausted = self._exhausted(conn, charges, now, forget=True, tokens=updates)
            if exhausted is not None:
                return exhausted
            for charge, tokens in updates:
                if charge.algorithm == "token_bucket":
                    conn.execute(
                        "INSERT INTO policy_rate_buckets (key, tokens, updated) "
                        "VALUES (%s, %s, %s) ON CONFLICT (key) DO UPDATE "
                        "SET tokens = EXCLUDED.tokens, updated = EXCLUDED.updated",
                        (charge.key, tokens - 1.0, now))
                else:
                    conn.execute("INSERT INTO policy_rate_events (key, at) VALUES (%s, %s)",
                                 (charge.key, now))
        return None

    @staticmethod
    def _take_one(conn: _Connection, charge: RateCharge, now: float) -> bool:
        """
        One charge checked and taken in one statement (its own transaction, committed
        before it returns); whether a token was taken.
        """
        row = conn.execute(
            "SELECT policy_rate_take(%s, %s, %s, %s, %s, %s)",
            (charge.key, lock_key("rate", charge.key), charge.algorithm == "token_bucket",
             float(charge.limit), float(charge.window_seconds), now)).fetchone()
        return row is not None and row[0] is True

    @staticmethod
    def _exhausted(conn: _Connection, charges: Sequence[RateCharge], now: float, *,
                   forget: bool = False, tokens: list[tuple[RateCharge, float]] | None = None
                   ) -> RuleId | None:
        """
        The first of ``charges`` with nothing left, or None. ``forget``: drop the events
        out of their windows; ``tokens``: gets each charge with what it has now.
        """
        found_tokens = [] if tokens is None else tokens
        for charge in charges:
            if charge.algorithm == "token_bucket":
                row = conn.execute(
                    "SELECT tokens, updated FROM policy_rate_buckets WHERE key = %s",
                    (charge.key,)).fetchone()
                left = float(charge.limit) if row is None else min(
                    float(charge.limit),
                    _number(row[0]) + max(0.0, now - _number(row[1]))
                    * charge.limit / charge.window_seconds,
                )
                if left < 1.0:
                    return charge.rule
                found_tokens.append((charge, left))
            else:
                since = now - charge.window_seconds
                if forget:
                    conn.execute(_FORGET_EVENTS, (charge.key, since))
                found = conn.execute(
                    "SELECT count(*) FROM policy_rate_events WHERE key = %s AND at > %s",
                    (charge.key, since)).fetchone()
                if found is not None and _number(found[0]) >= charge.limit:
                    return charge.rule
                found_tokens.append((charge, 0.0))
        return None

    # -- data-flow labels -----------------------------------------------------

    def session_labels(self, session: str) -> frozenset[str]:
        rows = self._read(lambda conn: conn.execute(
            "SELECT label FROM policy_session_labels WHERE session = %s", (session,)
        ).fetchall())
        return frozenset(str(row[0]) for row in rows)

    def add_session_labels(self, session: str, labels: frozenset[str], call_id: str,
                           now: float, *, per_call: bool = False) -> None:
        """
        Record that a result with ``labels`` was produced in ``session`` (see
        ``PolicyState.add_session_labels``); seen by every replica once this returns.
        """
        if not labels and not per_call:
            return
        ordered = sorted(labels)
        # One round trip: BEGIN, both inserts and COMMIT, pipelined.
        with self._connection() as conn, conn.pipeline():
            conn.execute("BEGIN")
            conn.execute(
                "INSERT INTO policy_session_labels (session, label, call_id, at) "
                "SELECT %s, label, %s, %s FROM unnest(%s::text[]) AS label "
                "ON CONFLICT DO NOTHING",
                (session, call_id, now, ordered))
            if per_call:
                # The empty label marks the result as observed, labelled or not.
                conn.execute(
                    "INSERT INTO policy_call_labels (session, call_id, label) "
                    "SELECT %s, %s, label FROM unnest(%s::text[]) AS label "
                    "ON CONFLICT DO NOTHING",
                    (session, call_id, ["", *ordered]))
            else:
                conn.execute(
                    "INSERT INTO policy_unattributed_labels (session, label) "
                    "SELECT %s, label FROM unnest(%s::text[]) AS label ON CONFLICT DO NOTHING",
                    (session, ordered))
            conn.execute("COMMIT")

    def unattributed_labels(self, session: str) -> frozenset[str]:
        """Labels of results in ``session`` whose calls had no known provenance."""
        rows = self._read(lambda conn: conn.execute(
            "SELECT label FROM policy_unattributed_labels WHERE session = %s", (session,)
        ).fetchall())
        return frozenset(str(row[0]) for row in rows)

    def call_labels(self, session: str, call_ids: Sequence[str]
                    ) -> dict[str, frozenset[str]]:
        """
        The labels of each result in ``session`` recorded per call; a call id absent
        from the answer was never recorded (its labels are unknown).
        """
        wanted = list(dict.fromkeys(call_ids))
        if not wanted:
            return {}
        found: dict[str, set[str]] = {}
        rows = self._read(lambda conn: conn.execute(
            "SELECT call_id, label FROM policy_call_labels "
            "WHERE session = %s AND call_id = ANY(%s::text[])", (session, wanted)
        ).fetchall())
        for call_id, label in rows:
            labels = found.setdefault(str(call_id), set())
            if label:
                labels.add(str(label))
        return {call_id: frozenset(found[call_id]) for call_id in wanted if call_id in found}

    # -- approvals ------------------------------------------------------------

    def propose(self, proposal: Proposal) -> Proposal:
        """Record a proposal, or return the open one for the same principal, tool and digest."""
        with self._transaction() as conn:
            self._lock_all(conn, "proposal", [
                "\0".join((proposal.principal, proposal.tool, proposal.arguments_sha256))])
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM policy_proposals WHERE principal = %s AND tool = %s "  # noqa: S608 - constant columns
                "AND arguments_sha256 = %s AND status = 'proposed' AND expires > %s "
                "ORDER BY created DESC LIMIT 1",
                (proposal.principal, proposal.tool, proposal.arguments_sha256, proposal.created),
            ).fetchone()
            existing = _proposal(row)
            if existing is not None:
                return existing
            conn.execute(
                f"INSERT INTO policy_proposals ({_COLUMNS}) VALUES "  # noqa: S608 - constant columns
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NULL, NULL, NULL, NULL, NULL)",
                (proposal.id, proposal.rule_id, proposal.call_id, proposal.principal,
                 proposal.session, proposal.tool, proposal.tool_digest,
                 proposal.arguments_sha256, proposal.created, proposal.expires,
                 proposal.status),
            )
        return proposal

    def proposal(self, proposal_id: str) -> Proposal | None:
        row = self._read(lambda conn: conn.execute(
            f"SELECT {_COLUMNS} FROM policy_proposals WHERE id = %s",  # noqa: S608 - constant columns
            (proposal_id,)).fetchone())
        return _proposal(row)

    def proposals(self) -> tuple[Proposal, ...]:
        rows = self._read(lambda conn: conn.execute(
            f"SELECT {_COLUMNS} FROM policy_proposals ORDER BY created, id"  # noqa: S608 - constant columns
        ).fetchall())
        return tuple(Proposal(*row) for row in rows)  # type: ignore[arg-type] # Proposal's columns

    def decide_proposal(self, proposal_id: str, *, status: str, by: str, now: float,
                        approval: bytes | None, signature: bytes | None,
                        key_id: str | None) -> bool:
        """
        Move an open proposal to ``approved`` or ``rejected``; False if it was not open
        (of two replicas deciding at once, exactly one gets True).
        """
        with self._connection() as conn:  # one statement: its own transaction
            changed = conn.execute(
                "UPDATE policy_proposals SET status = %s, decided_by = %s, decided_at = %s, "
                "approval = %s, signature = %s, key_id = %s "
                "WHERE id = %s AND status = 'proposed' AND expires > %s RETURNING id",
                (status, by, now, approval, signature, key_id, proposal_id, now),
            ).fetchone()
        return changed is not None

    def approved_for(self, principal: str, tool: str, arguments_sha256: str, now: float
                     ) -> Proposal | None:
        """The oldest unexpired, unused approval for exactly this principal, tool and digest."""
        row = self._read(lambda conn: conn.execute(
            f"SELECT {_COLUMNS} FROM policy_proposals WHERE principal = %s AND tool = %s "  # noqa: S608 - constant columns
            "AND arguments_sha256 = %s AND status = 'approved' AND expires > %s "
            "ORDER BY created LIMIT 1",
            (principal, tool, arguments_sha256, now),
        ).fetchone())
        return _proposal(row)

    def expired_approval(self, principal: str, tool: str, arguments_sha256: str, now: float
                         ) -> str | None:
        """The id of the newest approval for exactly this call that expired unused, if any."""
        row = self._read(lambda conn: conn.execute(
            "SELECT id FROM policy_proposals WHERE principal = %s AND tool = %s "
            "AND arguments_sha256 = %s AND status = 'approved' AND expires <= %s "
            "ORDER BY expires DESC LIMIT 1",
            (principal, tool, arguments_sha256, now),
        ).fetchone())
        return None if row is None else str(row[0])

    def use_approval(self, proposal_id: str, call_id: str, now: float) -> bool:
        """
        Mark an approval used; False when it was used (or expired) in the meantime. Of
        replicas racing for one approval, exactly one gets True: the ``UPDATE`` of the
        others waits for the winner's row lock, then finds the row no longer approved.
        """
        with self._connection() as conn:  # one statement: its own transaction
            used = conn.execute(
                "UPDATE policy_proposals SET status = 'executed', used_at = %s, "
                "used_call_id = %s WHERE id = %s AND status = 'approved' AND expires > %s "
                "RETURNING id",
                (now, call_id, proposal_id, now),
            ).fetchone()
        return used is not None


__all__ = ["COMPONENT", "PostgresPolicyState", "lock_key"]
