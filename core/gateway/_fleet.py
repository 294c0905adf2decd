"""
The ``store`` section: a gateway that is one replica of a fleet sharing one PostgreSQL.

With ``store: {url: postgresql://...}`` in ``callward.yaml`` every piece of durable
state a gateway keeps moves from the SQLite files under ``CALLWARD_HOME`` to the
fleet's database: the audit log (one log for the fleet), the policy's state (rate
limits, session labels, approvals), anomalies, the live tool registry and the
replicas' own registry. The signing key stays on the replica (``CALLWARD_HOME/keys``):
each replica signs with its own, and a reviewer trusts the set.

Invariants:

- The URL never holds a password (``StoreUrl.parse`` refuses one); the password comes
  from ``PGPASSWORD``, ``PGPASSFILE``/``~/.pgpass`` or ``store.password_file``.
- Nothing is opened here but what the gateway asks for; each store migrates its own
  tables on open, safely when replicas start at once.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from callward.core._postgres import StoreUrl

#: How long a replica's heartbeat stays good: a replica silent for longer is gone,
#: and another closes the calls it left open (``call.interrupted``).
DEFAULT_LEASE_SECONDS: Final = 10.0
DEFAULT_HEARTBEAT_SECONDS: Final = 2.0

STORE_SCHEMA: Final = {
    "type": "object",
    "additionalProperties": False,
    "required": ["url"],
    "properties": {
        "url": {"type": "string", "pattern": "^postgres(ql)?://"},
        "password_file": {"type": "string", "minLength": 1},
        "lease_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        "heartbeat_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 600},
    },
}


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """
    The ``store`` section, checked.

    Attributes:
        url: The fleet's PostgreSQL, without a password.
        lease_seconds: A replica whose heartbeat is older than this is gone.
        heartbeat_seconds: How often a replica renews its heartbeat.
    """

    url: StoreUrl
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS


def fleet_settings(section: Mapping[str, Any] | None,
                   resolve: Callable[[str], str]) -> FleetSettings | None:
    """
    The ``store`` section (already checked against ``STORE_SCHEMA``), or None.

    Raises:
        ConfigurationError: The URL holds a password or is not a PostgreSQL URL, or the
            heartbeat is not shorter than the lease.
    """
    if section is None:
        return None
    password_file = section.get("password_file")
    url = StoreUrl.parse(section["url"], password_file=None if password_file is None
                         else resolve(str(password_file)))
    lease = float(section.get("lease_seconds", DEFAULT_LEASE_SECONDS))
    heartbeat = float(section.get("heartbeat_seconds", min(DEFAULT_HEARTBEAT_SECONDS,
                                                           lease / 3)))
    if heartbeat >= lease:
        from callward.core.errors import ConfigurationError  # noqa: PLC0415

        raise ConfigurationError("store.heartbeat_seconds must be shorter than "
                                 "store.lease_seconds")
    return FleetSettings(url=url, lease_seconds=lease, heartbeat_seconds=heartbeat)


def new_replica_id() -> str:
    """
    This process's name in the fleet: ``CALLWARD_REPLICA_ID`` when set, else the host,
    the pid and a random suffix (unique across restarts of the same pid).
    """
    given = os.environ.get("CALLWARD_REPLICA_ID", "").strip()
    if given:
        return given[:128]
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


__all__ = [
    "DEFAULT_HEARTBEAT_SECONDS",
    "DEFAULT_LEASE_SECONDS",
    "STORE_SCHEMA",
    "FleetSettings",
    "fleet_settings",
    "new_replica_id",
]
