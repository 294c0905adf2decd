"""
The review console: ``callward console`` serves the log and the approval queue to a
browser on loopback, behind the configured bearer tokens or OIDC access tokens.

It reads through the same functions as ``callward audit`` and ``callward policy``
(nothing is kept but sessions, in memory) and writes only signed records: logins,
refused logins, and approvals made with ``Policy.approve``. See docs/console.md.

Example::

    >>> from callward.core.console import CONTENT_SECURITY_POLICY
    >>> "script-src 'self'" in CONTENT_SECURITY_POLICY
    True
"""

from __future__ import annotations

from callward.core.console._app import CONTENT_SECURITY_POLICY, LOOPBACK_HOSTS, create_app
from callward.core.console._limits import LoginLimit, LoginLimiter
from callward.core.console._review import CallQuery, ConsoleSources, Review
from callward.core.console._serve import serve
from callward.core.console._sessions import SESSION_COOKIE, Session, SessionStore

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "LOOPBACK_HOSTS",
    "SESSION_COOKIE",
    "CallQuery",
    "ConsoleSources",
    "LoginLimit",
    "LoginLimiter",
    "Review",
    "Session",
    "SessionStore",
    "create_app",
    "serve",
]
