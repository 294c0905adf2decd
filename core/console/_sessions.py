"""
The console's sessions: server-side, random, expiring, each with its own CSRF token.

Invariants:

- A session id is 32 random bytes (``secrets.token_urlsafe``) handed to the browser in a
  cookie; the server keeps only its SHA-256, so a memory dump or a log line holding the
  key of the table cannot be replayed as a cookie.
- A session ends ``idle_seconds`` after its last use and ``absolute_seconds`` after it
  was made, or at its ``ends_at`` (a signed-in OIDC token's ``exp``), whichever comes
  first; an ended session is removed on sight and never revived, and its cookie never
  outlives it. Signing in always makes a new session (the pre-login one is dropped), so a
  session id planted before login is worth nothing after it.
- Every session, the anonymous one that carries the login form included, has its own
  CSRF token; ``csrf_matches`` compares in constant time and refuses an empty token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final, Literal

from callward.core.types import Identity

#: The cookie that carries the session id.
SESSION_COOKIE: Final = "callward_console"
DEFAULT_IDLE_SECONDS: Final = 15 * 60.0
DEFAULT_ABSOLUTE_SECONDS: Final = 8 * 3600.0
#: Sessions kept at most (anonymous login forms included); the oldest go first.
MAX_SESSIONS: Final = 10_000

Role = Literal["approver", "reader"]


@dataclass(frozen=True, slots=True)
class Session:
    """
    One browser's session.

    Attributes:
        principal: Who signed in; None for the anonymous session of the login form.
        role: ``approver`` may approve and reject proposals; ``reader`` only reads.
        csrf_token: Must accompany every POST of this session.
        created: When the session was made (seconds since the epoch).
        last_seen: When it was last used.
        ends_at: An end set when it was made (a token's ``exp``); None: only the
            store's idle and absolute limits.
        identity: What a verified OIDC token said of the principal (issuer, roles,
            groups); None for a static token.
    """

    principal: str | None
    role: Role
    csrf_token: str
    created: float
    last_seen: float
    ends_at: float | None = None
    identity: Identity | None = None

    @property
    def signed_in(self) -> bool:
        return self.principal is not None


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


def csrf_matches(session: Session, presented: str | None) -> bool:
    """Whether ``presented`` is this session's CSRF token (constant time; empty never is)."""
    if not presented:
        return False
    return hmac.compare_digest(session.csrf_token.encode(), presented.encode("utf-8",
                                                                            "surrogatepass"))


class SessionStore:
    """
    The live sessions, in this process's memory (a restart signs everybody out).

    Args:
        clock: Seconds since the epoch.
        new_token: A fresh random token (session ids and CSRF tokens).
        idle_seconds: A session unused this long has ended.
        absolute_seconds: A session this old has ended, however busy.
        max_sessions: Sessions kept at most; login forms are dropped first.
    """

    def __init__(self, *, clock: Callable[[], float],
                 new_token: Callable[[], str] = lambda: secrets.token_urlsafe(32),
                 idle_seconds: float = DEFAULT_IDLE_SECONDS,
                 absolute_seconds: float = DEFAULT_ABSOLUTE_SECONDS,
                 max_sessions: int = MAX_SESSIONS) -> None:
        if not 0 < idle_seconds <= absolute_seconds:
            raise ValueError("sessions need 0 < idle_seconds <= absolute_seconds")
        self._clock = clock
        self._new_token = new_token
        self.idle_seconds = idle_seconds
        self.absolute_seconds = absolute_seconds
        self._max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, principal: str | None, role: Role = "reader", *,
               ends_at: float | None = None,
               identity: Identity | None = None) -> tuple[str, Session]:
        """
        A new session; returns its id (for the cookie only) and the session. ``ends_at``
        ends it earlier than ``absolute_seconds`` would (never later).
        """
        now = self._clock()
        session_id = self._new_token()
        if ends_at is not None:
            ends_at = min(ends_at, now + self.absolute_seconds)
        session = Session(principal, role, self._new_token(), now, now, ends_at=ends_at,
                          identity=identity)
        with self._lock:
            if len(self._sessions) >= self._max_sessions:
                # Full: the oldest login form goes first, so a flood of them never signs
                # anybody out; only a table full of signed-in sessions drops the oldest.
                oldest = min(self._sessions, key=lambda k: (self._sessions[k].signed_in,
                                                            self._sessions[k].last_seen))
                del self._sessions[oldest]
            self._sessions[_key(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None, *, touch: bool = True) -> Session | None:
        """
        The live session of ``session_id``, or None (unknown or ended; an ended one is
        removed). ``touch`` counts this as a use, for the idle limit.
        """
        if not session_id:
            return None
        key = _key(session_id)
        now = self._clock()
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return None
            if (now - session.last_seen >= self.idle_seconds
                    or now - session.created >= self.absolute_seconds
                    or (session.ends_at is not None and now >= session.ends_at)):
                del self._sessions[key]
                return None
            if touch:
                session = replace(session, last_seen=now)
                self._sessions[key] = session
            return session

    def now(self) -> float:
        """The store's clock: what session ends are compared with."""
        return self._clock()

    def end(self, session_id: str | None) -> None:
        """Forget a session (sign out); unknown ids are ignored."""
        if session_id:
            with self._lock:
                self._sessions.pop(_key(session_id), None)

    def max_age_seconds(self, session: Session) -> int:
        """How long the cookie may live: no longer than the session's absolute end."""
        end = session.created + self.absolute_seconds
        if session.ends_at is not None:
            end = min(end, session.ends_at)
        return max(0, int(end - self._clock()))


__all__ = ["DEFAULT_ABSOLUTE_SECONDS", "DEFAULT_IDLE_SECONDS", "SESSION_COOKIE", "Role",
           "Session", "SessionStore", "csrf_matches"]
