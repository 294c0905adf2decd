"""Serve the console with uvicorn, on loopback unless the operator says otherwise."""

from __future__ import annotations

import ipaddress
import time

import structlog
import uvicorn

from callward.core.console._app import LOOPBACK_HOSTS, create_app
from callward.core.console._limits import LoginLimit
from callward.core.console._review import Review
from callward.core.console._sessions import SessionStore
from callward.core.errors import ConfigurationError

log = structlog.get_logger()


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(review: Review, *, host: str, port: int, idle_seconds: float,
          absolute_seconds: float, unsafe_allow_remote: bool = False,
          login_limit: LoginLimit | None = None) -> None:
    """
    Serve the console until interrupted.

    Args:
        unsafe_allow_remote: Listen on a host that is not loopback. The console speaks
            plain HTTP: tokens and session cookies cross the network in clear unless a
            TLS proxy fronts it. Warned about on every start.
        login_limit: Refused sign-ins allowed per client address and window.

    Raises:
        ConfigurationError: ``host`` is not loopback and ``unsafe_allow_remote`` is off.
    """
    allowed: tuple[str, ...] = LOOPBACK_HOSTS
    if not is_loopback(host):
        if not unsafe_allow_remote:
            raise ConfigurationError(
                f"callward console listens on loopback only, not {host}",
                remediation="use --host 127.0.0.1 (and an SSH tunnel), or front it with a "
                "TLS proxy and pass --unsafe-allow-remote")
        log.warning("console_listens_beyond_loopback", host=host)
        allowed = (*LOOPBACK_HOSTS, host)
    sessions = SessionStore(clock=time.time, idle_seconds=idle_seconds,
                            absolute_seconds=absolute_seconds)
    app = create_app(review, sessions=sessions, allowed_hosts=allowed, login_limit=login_limit)
    log.info("console_serving", host=host, port=port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=2, server_header=False)


__all__ = ["is_loopback", "serve"]
