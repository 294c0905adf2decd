"""
Where a configuration keeps its state: SQLite files at home, or the fleet's PostgreSQL.

One function per store, used by the gateway and by every command that reads or writes
that state (``tools load``, ``policy approve``, ``anomalies resolve``, ...), so a
command acts on the same state the configured gateways decide against: with
``store:`` configured, a pin, an approval or a tool version made from any replica's
machine holds for the whole fleet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import callward.audit
from callward.audit import FileSigner, Signer, store_settings
from callward.policies import AnomalyState, PolicyState

if TYPE_CHECKING:
    from callward.audit import PostgresAuditStore, SQLiteAuditStore
    from callward.core.gateway._config import GatewayConfig, Home
    from callward.core.registry._store import RegistryStore
    from callward.core.registry._store_postgres import PostgresRegistryStore
    from callward.policies._anomaly_state_postgres import PostgresAnomalyState
    from callward.policies._state_postgres import PostgresPolicyState

    AuditStore = SQLiteAuditStore | PostgresAuditStore


def registry_store_for(config: GatewayConfig, home: Home
                       ) -> RegistryStore | PostgresRegistryStore:
    """The live registry's store, not yet open."""
    if config.store is not None:
        # A fleet's replicas share one registry: a version loaded on one is in force
        # on all before their next call.
        from callward.core.registry._store_postgres import (  # noqa: PLC0415
            PostgresRegistryStore,
        )

        return PostgresRegistryStore(config.store.url)
    from callward.core.registry._store import RegistryStore  # noqa: PLC0415

    return RegistryStore(home.registry_db)


def policy_state_for(config: GatewayConfig, home: Home, *, existing_only: bool = False
                     ) -> PolicyState | PostgresPolicyState:
    """
    The policy's state (rate limits, session labels, approvals).

    Args:
        existing_only: For a command that only reads: with no state file at home yet,
            an empty state in memory rather than a new file.
    """
    if config.store is not None:
        from callward.policies._state_postgres import PostgresPolicyState  # noqa: PLC0415

        return PostgresPolicyState(config.store.url)
    path = home.policy_state_db
    return PolicyState(None if existing_only and not path.is_file() else path)


def anomaly_state_for(config: GatewayConfig, home: Home, *, quiet_seconds: float = 900.0,
                      existing_only: bool = False) -> AnomalyState | PostgresAnomalyState:
    """The open anomalies a policy gate reads (``existing_only`` as for the policy state)."""
    if config.store is not None:
        from callward.policies._anomaly_state_postgres import (  # noqa: PLC0415
            PostgresAnomalyState,
        )

        return PostgresAnomalyState(config.store.url, quiet_seconds=quiet_seconds)
    path = home.anomaly_state_db
    return AnomalyState(None if existing_only and not path.is_file() else path,
                        quiet_seconds=quiet_seconds)


def audit_store_for(config: GatewayConfig, home: Home, signer: Signer | None = None
                    ) -> AuditStore:
    """
    The audit log a gateway of ``config`` writes, not yet open: the home's ``audit.db``,
    or the fleet's one log, signed by this machine's key either way.
    """
    signer = signer if signer is not None else FileSigner.load_or_create(home.keys_dir)
    settings = store_settings(config.audit or {}, base=config.source.parent)
    # The writers are loaded on first use, so commands that only read never load them.
    if config.store is not None:
        # The fleet's one log: appends from every replica are ordered by the database.
        return callward.audit.PostgresAuditStore(
            config.store.url, signer, checkpoint_every=settings.checkpoint_every,
            checkpoint_seconds=settings.checkpoint_seconds, witnesses=settings.witnesses,
            lease_seconds=config.store.lease_seconds,
            heartbeat_seconds=config.store.heartbeat_seconds)
    return callward.audit.SQLiteAuditStore(
        home.audit_db, signer, checkpoint_every=settings.checkpoint_every,
        checkpoint_seconds=settings.checkpoint_seconds, witnesses=settings.witnesses,
        sync=settings.sync)


__all__ = ["anomaly_state_for", "audit_store_for", "policy_state_for", "registry_store_for"]
